"""Per-frame cost of the device loop against the weak classifier alone, same frames, same run.

Contenders (each processes the 200 demo frames, held in memory, once per round):

* ``weak alone``: ``WeakClassifier.classify`` on every frame, nothing else;
* ``loop, local-only``: ``offload.device.run`` with no server (weak classifier
  under the watchdog, metric, DQN policy + bucket, JSON-lines log);
* ``loop, with server``: the same plus the sender queue, posting the
  offloaded frames to a loopback fake server (answers come back in the
  sender thread while the loop goes on).

The classifier is loaded once outside the timing (``make_classifier``), so a
round is the per-frame work only. Each loop round also reports its own
per-part means (``overhead_us`` of the summary) in ``extra_info``.

The contenders agree: the loop logs, frame by frame, the weak classifier's own
top-1, and the run with a server takes the same decisions at the same token
counts as the local-only run (the bucket replayed from the log each time).

Run with ``pytest benchmarks/test_bench_device.py --benchmark-enable -s`` (the
parts are printed); without ``--benchmark-enable`` each contender runs once,
with its checks.
"""

import pytest

from offload.classifier import WeakClassifier
from offload.device import make_config, run
from offload.device.capture import MemorySource

from offload.blob import read_blob

from device_helpers import DQN, KEY, MODEL, FakeServer, check_log, demo_frames, load


@pytest.fixture(scope="module")
def frames():
    return demo_frames()[0]


@pytest.fixture(scope="module")
def weak():
    return WeakClassifier(MODEL, edgetpu=False, num_threads=1)


def _run(frames, weak, log, server=None):
    kw = {"policy": DQN, "model": MODEL, "log": str(log), "log_max_bytes": 1 << 20,
          "log_backups": 1}
    if server is not None:
        kw.update(server=server.url, key=KEY, queue_size=256)
    s = run(make_config(overrides=kw), source=MemorySource(frames),
            make_classifier=lambda: weak, echo=lambda m: None, install_signals=False)
    assert s["frames"] == len(frames)
    return s


def _loop_round(frames, weak, tmp_path, server=None):
    over = {}

    def once():
        s = _run(frames, weak, tmp_path / "bench.jsonl", server)
        over.update(s["overhead_us"])
        return s

    return once, over


def _records(frames, weak, log, server=None):
    """The frame records of one fresh run, checked (one per frame, bucket never violated)."""
    _run(frames, weak, log, server)
    pol = read_blob(DQN)
    return check_log(load(log), len(frames), pol.N, pol.P, pol.M)


@pytest.fixture(scope="module")
def weak_top1(frames, weak):
    return [weak.classify(f).top1 for f in frames]


def _decisions(recs):
    return [(r["id"], r["n_before"], r["offload"], r["weak_top"]) for r in recs]


def _report(benchmark, over, n):
    total = sum(over.values())
    benchmark.extra_info["overhead_us"] = over
    benchmark.extra_info["per_frame_us"] = round(total, 2)
    shares = {k: f"{v:.1f} us ({v / total:.0%})" for k, v in over.items()}
    print(f"\n  per-frame parts of the loop: {shares}")


@pytest.mark.benchmark(group="device-frame")
def test_weak_alone(benchmark, frames, weak, weak_top1, tmp_path):
    def once():
        for f in frames:
            weak.classify(f)

    benchmark.pedantic(once, rounds=5, warmup_rounds=1)
    # the same answers the loop logs for those frames
    recs = _records(frames, weak, tmp_path / "check.jsonl")
    assert weak_top1 == [r["weak_top"][0][0] for r in recs]


@pytest.mark.benchmark(group="device-frame")
def test_loop_local_only(benchmark, frames, weak, weak_top1, tmp_path):
    once, over = _loop_round(frames, weak, tmp_path)
    benchmark.pedantic(once, rounds=5, warmup_rounds=1)
    _report(benchmark, over, len(frames))
    recs = _records(frames, weak, tmp_path / "check.jsonl")
    assert [r["weak_top"][0][0] for r in recs] == weak_top1
    assert any(r["offload"] for r in recs) and not all(r["offload"] for r in recs)


@pytest.mark.benchmark(group="device-frame")
def test_loop_with_server(benchmark, frames, weak, tmp_path):
    srv = FakeServer()
    try:
        once, over = _loop_round(frames, weak, tmp_path, srv)
        benchmark.pedantic(once, rounds=5, warmup_rounds=1)
        recs = _records(frames, weak, tmp_path / "check.jsonl", srv)
    finally:
        srv.kill()
    _report(benchmark, over, len(frames))
    local = _records(frames, weak, tmp_path / "local.jsonl")
    assert _decisions(recs) == _decisions(local)
    assert any(r["outcome"] == "sent" for r in recs)
