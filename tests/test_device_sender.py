"""Offloading through a fake wire-format server: answers, every fault, no stalled capture."""

import contextlib
import socket

import pytest

from offload.blob import read_blob
from offload.device import make_config, run
from offload.device.capture import MemorySource
from offload.device.framelog import read_log
from offload.device.record import Outcome
from offload.device.sender import MAX_HOLD_S, Sender, retry_after_seconds

from device_helpers import CLIP, DQN, KEY, LABELS, MODEL, FakeServer, check_log, demo_frames

BLOB = read_blob(DQN)


@pytest.fixture
def server():
    srv = FakeServer()
    yield srv
    srv.kill()


def _run(tmp_path, server_url, source=None, **kw):
    kw.setdefault("policy", DQN)
    kw.setdefault("model", MODEL)
    kw.setdefault("accelerator", "cpu")
    kw.setdefault("key", KEY)
    kw.setdefault("read_timeout", 0.5)
    kw.setdefault("connect_timeout", 0.5)
    kw.setdefault("drain_timeout", 3.0)
    kw["log"] = str(tmp_path / "frames.jsonl")
    if server_url:
        kw["server"] = server_url
    s = run(make_config(overrides=kw), source=source, echo=lambda m: None, install_signals=False)
    recs = check_log(read_log(kw["log"]), s["frames"], BLOB.N, BLOB.P, BLOB.M)
    return s, recs


@contextlib.contextmanager
def _closed_port():
    """A loopback port bound but not listening for the whole block: connections are refused,
    and no other process can take the port meanwhile (binding, closing and reusing would race)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def test_answers_come_back_and_replace_the_weak_answer(tmp_path, server):
    frames, labels = demo_frames()
    server.answer_class = lambda fid: labels[fid]   # a perfect strong model
    # a replay runs far faster than 5 frames/s: a queue for every offload keeps all of them
    s, recs = _run(tmp_path, server.url, video=CLIP, labels=LABELS, queue_size=200)
    sent = [r for r in recs if r["offload"]]
    assert sent and all(r["outcome"] == "sent" for r in sent)
    assert all(r["final"] == r["label"] and r["final_source"] == "strong" for r in sent)
    assert all(r["ms"]["strong"] == 1.5 and r["ms"]["transmission"] >= 0 for r in sent)
    assert [int(q["frame_id"]) for q in server.requests] == [r["id"] for r in sent]
    assert {q["auth"] for q in server.requests} == {f"Bearer {KEY}"}
    assert {q["type"] for q in server.requests} == {"image/png"}
    loss = s["loss"]
    assert loss["strong_on_answered"] == 0.0 and loss["answered_frames"] == len(sent)
    assert loss["policy"] < loss["weak_only"] or loss["weak_on_answered"] == 0.0
    assert s["stages_ms"]["strong"]["n"] == len(sent) and s["failures"] == {}


def test_jpeg_option(tmp_path, server):
    s, recs = _run(tmp_path, server.url, video=CLIP, max_frames=30, image_format="jpeg")
    assert server.requests and {q["type"] for q in server.requests} == {"image/jpeg"}


@pytest.mark.parametrize("mode,outcome", [("garbage", "bad-answer"), ("500", "http-500"),
                                          ("close", "disconnected"), ("slow", "timeout")])
def test_server_faults_leave_the_weak_answer(tmp_path, mode, outcome):
    srv = FakeServer(mode, delay=1.0)
    try:
        s, recs = _run(tmp_path, srv.url, video=CLIP, max_frames=60, read_timeout=0.3,
                       drain_timeout=3.0)
    finally:
        srv.kill()
    offl = [r for r in recs if r["offload"]]
    assert offl, "the policy offloads some of the first 60 frames"
    # every offload decision failed for the fault's reason (or was cancelled/queue-full under a slow server)
    outs = {r["outcome"] for r in offl}
    assert outcome in outs and outs <= {outcome, "queue-full", "cancelled"}
    assert all(r["error"] for r in offl)
    assert s["failures"][outcome] >= 1 and s["answered"] == 0
    assert sum(r["offload"] for r in recs) == s["offload_decisions"]


def test_no_server_listening_is_refused(tmp_path):
    with _closed_port() as port:
        s, recs = _run(tmp_path, f"http://127.0.0.1:{port}", video=CLIP, max_frames=60)
    assert {r["outcome"] for r in recs if r["offload"]} == {"refused"}


def test_wrong_key_is_http_401(tmp_path, server):
    s, recs = _run(tmp_path, server.url, video=CLIP, max_frames=40, key="wrong")
    assert {r["outcome"] for r in recs if r["offload"]} == {"http-401"}


def test_server_killed_mid_run(tmp_path, server):
    frames, _ = demo_frames()

    def frames_then_kill():
        for k, f in enumerate(frames):
            if k == 100:
                server.kill()
            yield f

    src = MemorySource(frames, period=0.2)
    src.images = frames_then_kill()        # the kill happens while the loop reads frame 100
    s, recs = _run(tmp_path, server.url, source=src)
    before = [r for r in recs if r["offload"] and r["id"] < 90]
    after = [r for r in recs if r["offload"] and r["id"] > 100]
    assert before and after
    assert {r["outcome"] for r in before} == {"sent"}
    assert {r["outcome"] for r in after} <= {"refused", "disconnected", "net-error"}


def test_capture_never_waits_for_the_network(tmp_path):
    """The server holds every answer until the last frame is captured: all frames are still
    decided and logged, the offloaded ones last (their records wait for the answers)."""
    srv = FakeServer("gate")
    frames, _ = demo_frames()

    def gen():
        for k, f in enumerate(frames):
            if k == len(frames) - 1:
                srv.release.set()
            yield f

    src = MemorySource(frames, period=0.2)
    src.images = gen()
    try:
        s, recs_sorted = _run(tmp_path, srv.url, source=src, read_timeout=5.0, queue_size=2,
                              drain_timeout=5.0)
    finally:
        srv.kill()
    order = [r["id"] for r in read_log(tmp_path / "frames.jsonl")]
    offl = [r for r in recs_sorted if r["offload"]]
    queued = [r for r in offl if r["outcome"] != "queue-full"]
    assert len(queued) >= 1 and any(r["outcome"] == "queue-full" for r in offl)
    # the first offloaded frame's record comes after the records of every later, non-offloaded frame
    first = queued[0]["id"]
    later_local = [r["id"] for r in recs_sorted if r["id"] > first and r["outcome"] == "not-offloaded"]
    assert later_local and order.index(first) > max(order.index(i) for i in later_local)
    assert {r["outcome"] for r in queued} == {"sent"}


def test_sender_reports_every_frame_once_and_cancels_on_close():
    srv = FakeServer("gate")
    try:
        snd = Sender(srv.url, KEY, queue_size=3, read_timeout=5.0)
        frames, _ = demo_frames()
        accepted = [k for k in range(10) if snd.submit(k, frames[k])]
        assert 3 <= len(accepted) <= 4           # 3 queued (+1 maybe already taken by the thread)
        snd.close(timeout=0.2)
        results = []
        while not snd.results.empty():
            results.append(snd.results.get())
        assert sorted(r.frame_id for r in results) == accepted
        assert {r.outcome for r in results} == {Outcome.CANCELLED}
        assert not snd.submit(99, frames[0])     # closed
    finally:
        srv.kill()


def test_keep_alive_one_connection(tmp_path, server):
    s, recs = _run(tmp_path, server.url, video=CLIP)
    assert s["answered"] >= 5 and len(server.connections) == 1


def _next_result(snd, timeout=10.0):
    return snd.results.get(timeout=timeout)


class FakeClock:
    """A monotonic clock that moves only when a test says so (s)."""

    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


@contextlib.contextmanager
def _sender_to(mode, retry_after, clock=None):
    """A Sender posting to a FakeServer in ``mode`` whose Retry-After is ``retry_after``."""
    srv = FakeServer(mode)
    srv.retry_after = retry_after
    snd = Sender(srv.url, KEY, queue_size=8, clock=clock or FakeClock())
    try:
        yield srv, snd, demo_frames()[0]
    finally:
        snd.close(timeout=0.0)
        srv.kill()


@pytest.mark.parametrize("status", ["429", "503"])
def test_retry_after_holds_the_sender_off(status):
    with _sender_to(status, "30") as (srv, snd, frames):
        assert snd.submit(0, frames[0])
        first = _next_result(snd)
        assert first.outcome is Outcome.HTTP and first.label == f"http-{status}"
        for k in range(1, 4):
            assert snd.submit(k, frames[k])
        held = [_next_result(snd) for _ in range(3)]
        assert [r.frame_id for r in held] == [1, 2, 3]
        assert {r.outcome for r in held} == {Outcome.HELD_OFF}
        assert all("Retry-After" in r.error for r in held)
        assert len(srv.requests) == 1            # nothing else reached the network


def test_sending_resumes_after_the_hold():
    clock = FakeClock()
    with _sender_to("429", "2", clock) as (srv, snd, frames):
        assert snd.submit(0, frames[0]) and _next_result(snd).label == "http-429"
        srv.mode = "ok"
        clock.now += 1.5                         # still inside the 2 s hold
        assert snd.submit(1, frames[1]) and _next_result(snd).outcome is Outcome.HELD_OFF
        clock.now += 0.5                         # the hold is over (exactly 2 s later)
        assert snd.submit(2, frames[2])
        assert _next_result(snd).outcome is Outcome.SENT and len(srv.requests) == 2


def test_http_500_with_retry_after_does_not_hold():
    # only 429 and 503 mean "come back later"; a 500 is a fault of this one request
    with _sender_to("500", "30") as (srv, snd, frames):
        outs = []
        for k in range(2):
            assert snd.submit(k, frames[k])
            outs.append(_next_result(snd).label)
        assert outs == ["http-500", "http-500"] and len(srv.requests) == 2


@pytest.mark.parametrize("value,want", [
    ("5", 5.0), (" 0 ", 0.0), ("100000", MAX_HOLD_S),
    ("Thu, 01 Jan 1970 00:00:10 GMT", 7.0),      # an HTTP date, 7 s after now=3
    ("Thu, 01 Jan 1970 00:00:01 GMT", 0.0),      # already past
    ("-3", None), ("1.5", None), ("soon", None), ("", None), (None, None), ("\u00b2", None),
    ("Thu, 01 Jan 1970 00:00:10 -0000", None),   # no time zone: ambiguous
])
def test_retry_after_seconds(value, want):
    assert retry_after_seconds(value, now=3.0) == want
