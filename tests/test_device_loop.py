"""The device loop: one record per frame, bucket never violated, decisions equal the references."""

import numpy as np
import pytest

from offload.blob import Policy as BlobPolicy, read_blob, write_blob
from offload.bucket import Bucket, step_reference
from offload.decider import decide_sequence_reference
from offload.device import make_config, run
from offload.device.capture import MemorySource
from offload.device.framelog import read_log
from offload.device.policy import FrameMetric
from offload.device.slotter import Slotter
from offload.metric import apply_metric_map, entropy, standardize

from device_helpers import (CLIP, DQN, DQN_IA, LABELS, MODEL, check_log, demo_frames,
                            write_video)


def _run(tmp_path, **kw):
    kw.setdefault("policy", DQN)
    kw.setdefault("model", MODEL)
    kw.setdefault("accelerator", "cpu")
    kw.setdefault("log", str(tmp_path / "frames.jsonl"))
    source = kw.pop("source", None)
    msgs = []
    s = run(make_config(overrides=kw), source=source, echo=msgs.append, install_signals=False)
    s["messages"] = msgs
    return s, read_log(kw["log"])


def _reference(recs, blob):
    m = np.array([r["metric_std"] for r in recs], np.float32)
    gaps = np.array([r["slots"] for r in recs[1:]] + [1])   # i[k] = slots from k to k+1
    return decide_sequence_reference(blob.qmlp, m, gaps, Bucket(blob.N, blob.P, blob.M), H=blob.H, use_interarrival=blob.interarrival)


def test_slot_rule():
    # rounds the time since the first frame (half up), at least one slot after the previous
    def places(times):
        slotter = Slotter(0.2)
        return [slotter.place(t) for t in times]

    assert places([0.0]) == [(0, 0)]
    assert places([0.0, 0.29]) == [(0, 0), (1, 1)]
    assert places([0.0, 0.31]) == [(0, 0), (2, 2)]
    assert places([0.0, 0.05]) == [(0, 0), (1, 1)]      # too close: pushed to the next slot
    assert places([5.0, 5.2])[1] == (1, 1)              # counted from the first frame's time
    # no drift: 7 frames at 0.4 s with jitter land on even slots
    got = places([0.0, 0.41, 0.79, 1.2, 1.61, 1.99, 2.4])
    assert [s for s, _ in got] == [0, 2, 4, 6, 8, 10, 12]
    assert [n for _, n in got] == [0, 2, 2, 2, 2, 2, 2]


def test_local_only_demo_clip_matches_dqn_reference(tmp_path):
    s, recs = _run(tmp_path, video=CLIP, labels=LABELS)
    blob = read_blob(DQN)
    recs = check_log(recs, 200, blob.N, blob.P, blob.M)
    assert s["frames"] == 200 and s["local_only"]
    assert any("local-only" in m for m in s["messages"])
    assert {r["outcome"] for r in recs} == {"local-only", "not-offloaded"}
    assert all(r["slots"] == 1 for r in recs[1:])      # 5 frames/s = one 200 ms slot each
    want, states = _reference(recs, blob)
    got = np.array([r["offload"] for r in recs])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal([r["n_before"] for r in recs], states)
    assert 0 < got.sum() < 200
    assert s["loss"]["labelled_frames"] == 200
    assert s["loss"]["weak_only"] == s["loss"]["policy"]     # nothing answered: weak answers stand
    assert s["loss"]["strong_only"] is None
    assert all(r["label"] is not None for r in recs)


def test_interarrival_policy_on_a_generated_video(tmp_path):
    frames, labels = demo_frames()
    video = write_video(tmp_path / "v.avi", frames[:120], fps=2.5)   # 0.4 s = 2 slots apart
    s, recs = _run(tmp_path, video=video, policy=DQN_IA)
    blob = read_blob(DQN_IA)
    recs = check_log(recs, 120, blob.N, blob.P, blob.M)
    assert [r["slots"] for r in recs[1:]] == [2] * 119
    assert recs[5]["t"] == pytest.approx(2.0)
    want, states = _reference(recs, blob)
    np.testing.assert_array_equal([r["offload"] for r in recs], want)
    np.testing.assert_array_equal([r["n_before"] for r in recs], states)


def test_irregular_arrivals_memory_source(tmp_path):
    frames, labels = demo_frames()
    rng = np.random.default_rng(3)
    times = np.cumsum(rng.choice([0.2, 0.4, 0.6, 1.4], size=200)) - 0.2
    src = MemorySource(frames, times=list(times), labels=dict(enumerate(labels)))
    s, recs = _run(tmp_path, source=src, policy=DQN_IA)
    blob = read_blob(DQN_IA)
    recs = check_log(recs, 200, blob.N, blob.P, blob.M)
    assert sorted({r["slots"] for r in recs[1:]}) == [1, 2, 3, 7]
    want, _ = _reference(recs, blob)
    np.testing.assert_array_equal([r["offload"] for r in recs], want)


def test_threshold_blob_matches_threshold_rule(tmp_path):
    base = read_blob(DQN)
    theta = np.linspace(0.5, -0.5, base.M - base.P + 1).astype(np.float32)
    pol = BlobPolicy("thresholds", base.N, base.P, base.M, base.metric_mean, base.metric_std,
                     base.lut_x, base.lut_y, tinv=base.tinv, theta=theta)
    path = tmp_path / "thr.bin"
    write_blob(path, pol)
    s, recs = _run(tmp_path, video=CLIP, policy=str(path))
    recs = check_log(recs, 200, pol.N, pol.P, pol.M)
    n, want = pol.M, []
    for k, r in enumerate(recs):
        a = n >= pol.P and np.float32(r["metric_std"]) >= theta[n - pol.P]
        want.append(bool(a))
        gap = recs[k + 1]["slots"] if k + 1 < len(recs) else 1
        n = step_reference(n, a, gap, pol.N, pol.P, pol.M)
    assert [r["offload"] for r in recs] == want
    assert 0 < sum(want) < 200


def test_frame_metric_equals_metric_module():
    blob = read_blob(DQN)
    fm = FrameMetric(blob)
    rng = np.random.default_rng(0)
    for _ in range(50):
        z = rng.normal(scale=3, size=10).astype(np.float32)
        p, h, raw, m = fm(z)
        assert h == pytest.approx(float(entropy(z, blob.tinv)), abs=1e-12)
        assert raw == pytest.approx(float(apply_metric_map(h, blob.lut_x, blob.lut_y)), abs=1e-12)
        assert m == pytest.approx(float(standardize(raw, blob.metric_mean, blob.metric_std)),
                                  abs=1e-9)
        assert p.sum() == pytest.approx(1.0)


def test_max_frames_and_summary_json(tmp_path):
    out = tmp_path / "summary.json"
    s, recs = _run(tmp_path, video=CLIP, max_frames=17, summary_json=str(out))
    assert s["frames"] == 17 and len(recs) == 17
    import json

    saved = json.loads(out.read_text())
    assert saved["frames"] == 17 and saved["stages_ms"]["weak"]["n"] == 17
    assert set(s["overhead_us"]) >= {"weak", "metric", "policy", "log"}


def test_images_folder_source_one_slot_apart(tmp_path):
    import shutil

    folder = tmp_path / "imgs"
    folder.mkdir()
    frames, _ = demo_frames()
    import cv2

    for i in range(10):
        cv2.imwrite(str(folder / f"{i:03d}.png"), frames[i])
    (folder / "notes.txt").write_text("ignored")
    s, recs = _run(tmp_path, images=str(folder), labels=LABELS)
    assert [r["t"] for r in recs] == pytest.approx([0.2 * k for k in range(10)])
    assert [r["label"] for r in recs] == demo_frames()[1][:10]
    s, recs = _run(tmp_path, images=str(folder), fps=1.0, log=str(tmp_path / "b.jsonl"))
    assert [r["slots"] for r in recs[1:]] == [5] * 9
    shutil.rmtree(folder)


@pytest.mark.parametrize("kind", ["dqn", "thresholds"])
def test_policy_unit_random_metrics_and_gaps(kind):
    """device.policy.Policy against the references on random metrics and inter-arrivals."""
    from offload.device.policy import Policy

    base = read_blob(DQN_IA)
    rng = np.random.default_rng(5)
    metrics = rng.normal(size=400).astype(np.float32)
    gaps = rng.integers(1, 6, size=400)            # gaps[k] = slots from k to k+1
    if kind == "thresholds":
        theta = rng.normal(size=base.M - base.P + 1).astype(np.float32)
        blob = BlobPolicy("thresholds", base.N, base.P, base.M, base.metric_mean,
                          base.metric_std, base.lut_x, base.lut_y, theta=theta)
        n, want, states = blob.M, [], []
        for k in range(400):
            a = bool(n >= blob.P and metrics[k] >= theta[n - blob.P])
            want.append(a)
            states.append(n)
            n = step_reference(n, a, int(gaps[k]), blob.N, blob.P, blob.M)
    else:
        blob = base
        want, states = decide_sequence_reference(blob.qmlp, metrics, gaps, Bucket(blob.N, blob.P, blob.M), H=blob.H, use_interarrival=blob.interarrival)
    pol = Policy(blob)
    got, seen = [], []
    for k in range(400):
        a, n0, n1 = pol.decide(float(metrics[k]), int(gaps[k - 1]) if k else 0)
        got.append(bool(a))
        seen.append(n0)
        assert n1 == n0 - blob.P * a
    assert got == list(map(bool, want)) and seen == list(states)
    assert 0 < sum(got) < 400
    with pytest.raises(ValueError, match="slots"):
        pol.decide(0.0, 0)


def test_stopwatch_books_nested_parts_to_themselves():
    from offload.device.stopwatch import Stopwatch

    now = [0.0]
    watch = Stopwatch(("outer", "inner"), clock=lambda: now[0])
    with watch.part("outer") as outer:
        now[0] += 1.0
        with watch.part("inner") as inner:
            now[0] += 0.25
        now[0] += 0.5
    assert inner.seconds == 0.25 and outer.seconds == 1.75
    assert watch.totals == {"outer": 1.5, "inner": 0.25}     # the parts add up to the time
    assert watch.per_frame_us(2) == {"outer": 750000.0, "inner": 125000.0}


def test_stop_on_signal_sets_the_event_and_restores_handlers():
    import os
    import signal

    from offload.stopsignal import StopOnSignal

    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignal() as stop:
        assert not stop.is_set() and stop.signal is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.event.wait(5), "the handler did not run"
        os.kill(os.getpid(), signal.SIGINT)        # a second signal: the first one is kept
        assert stop.signal == "SIGTERM" and stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    with StopOnSignal(install=False) as quiet:     # no handlers: only the event stops the run
        assert signal.getsignal(signal.SIGTERM) is before
        quiet.event.set()
        assert quiet.is_set() and quiet.signal is None


def test_record_serialises_to_the_log_line():
    from offload.device.capture import Frame
    from offload.device.record import FrameRecord, Outcome
    from offload.device.sender import Result

    rec = FrameRecord.of(Frame(7, 1.23456789, None, 4))
    rec.time("weak", 0.0012345)
    rec.decided(slot=6, slots=1, probs=np.array([0.1, 0.7, 0.2]), entropy=0.81234567,
                metric=0.51234567, metric_std=np.float32(0.5), n_before=30, n_after=20, P=10,
                offload=True, k=2)
    assert not rec.done
    rec.answered(Result(7, Outcome.HTTP, http_status=429, error="slow down", queue_ms=0.5), 2)
    assert rec.as_dict() == {
        "id": 7, "t": 1.234568, "label": 4, "ms": {"weak": 1.2345, "queue": 0.5},
        "slot": 6, "slots": 1, "weak_top": [[1, 0.7], [2, 0.2]], "entropy": 0.812346,
        "metric": 0.512346, "metric_std": 0.5, "n_before": 30, "n_after": 20,
        "tokens_before": 3.0, "tokens_after": 2.0, "offload": True, "final": 1,
        "final_source": "weak", "outcome": "http-429", "error": "slow down"}
    failed = FrameRecord.of(Frame(8, 2.0, None, None))
    failed.end(Outcome.WEAK_FAILED)
    assert failed.as_dict() == {"id": 8, "t": 2.0, "label": None, "ms": {}, "offload": False,
                                "final": None, "final_source": None, "outcome": "weak-failed"}
    assert Outcome.HELD_OFF.is_failure and not Outcome.LOCAL_ONLY.is_failure
