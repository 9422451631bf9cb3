"""The sender under hostile answers: one result per frame, the thread alive, offloading back at once.

A raw loopback server (``RawServer``) reads each request and answers with
whatever bytes a test scripts: deep nesting, a 2 GB ``Content-Length``,
endless bodies, broken heads, floods of headers, redirects, resets. After
each, the same sender must send the next frame as soon as the server answers
properly again. Every wait is bounded by the sender's own timeouts (fractions
of a second) or a result queue timeout.
"""

import socket
import struct
import threading
import tracemalloc

import pytest

from offload import wire
from offload.blob import read_blob
from offload.device import make_config, run
from offload.device.conn import MAX_HEAD_BYTES, MAX_HEADERS
from offload.device.framelog import read_log
from offload.device.record import Outcome
from offload.device.sender import Sender

from device_helpers import CLIP, DQN, KEY, MODEL, check_log, tiny_images

_MAX_STREAM = 64 * 1024 * 1024      # what a streaming answer writes at most (the client stops it)


def ok(conn, stop):
    body = wire.answer_body([4, 1], [0.8, 0.1], inference_ms=1.0, batch_size=1)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)


def raw(data, close=False):
    """An answer of exactly ``data``; with ``close`` the connection is closed after it."""
    def answer(conn, stop):
        conn.sendall(data)
        return close
    return answer


def status_200(body, extra=b""):
    return raw(b"HTTP/1.1 200 OK\r\n" + extra + b"Content-Length: " + str(len(body)).encode()
               + b"\r\n\r\n" + body)


def stream(head, chunk):
    """``head``, then ``chunk`` over and over until the client goes away (or 64 MB)."""
    def answer(conn, stop):
        conn.sendall(head)
        sent = 0
        while not stop.is_set() and sent < _MAX_STREAM:
            conn.sendall(chunk)
            sent += len(chunk)
        return True
    return answer


def dribble(data, every):
    def answer(conn, stop):
        for b in data:
            if stop.wait(every):
                break
            conn.sendall(bytes([b]))
        return True
    return answer


def reset(conn, stop):
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return True   # closed with linger 0: an RST


class RawServer:
    """A loopback server that answers each request with ``self.answer(conn, stop)``.

    ``answer`` writes raw bytes; a true return value closes the connection.
    ``requests`` counts the requests read.
    """

    def __init__(self, answer=ok):
        self.answer, self.requests = answer, 0
        self.stop = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def close(self):
        self.stop.set()
        for t in self._threads:
            t.join(timeout=5.0)
        self.sock.close()

    def _accept(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _read_request(self, conn, buf):
        while b"\r\n\r\n" not in buf:
            data = conn.recv(65536)
            if not data:
                return None
            buf += data
        head, _, rest = bytes(buf).partition(b"\r\n\r\n")
        n = int([ln.split(b":", 1)[1] for ln in head.split(b"\r\n")
                 if ln.lower().startswith(b"content-length:")][0])
        while len(rest) < n:
            data = conn.recv(65536)
            if not data:
                return None
            rest += data
        buf[:] = rest[n:]
        return head

    def _serve(self, conn):
        conn.settimeout(5.0)
        buf = bytearray()
        with conn:
            try:
                while not self.stop.is_set():
                    if self._read_request(conn, buf) is None:
                        return
                    self.requests += 1
                    if self.answer(conn, self.stop):
                        return
            except OSError:
                return   # the client went away mid-answer: what a cut-off stream looks like


@pytest.fixture
def server():
    srv = RawServer()
    yield srv
    srv.close()


@pytest.fixture
def sender(server):
    snd = Sender(server.url, KEY, connect_timeout=0.5, read_timeout=0.5, warn=lambda m: None)
    yield snd
    snd.close(timeout=0.0)


IMG = tiny_images(1)[0]
DEEP = b'{"top": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"

HOSTILE = {
    "deep nesting (50,000 levels)": (status_200(DEEP), Outcome.BAD_ANSWER, "nested deeper"),
    "Content-Length 2e9 and a long stream": (
        stream(b"HTTP/1.1 200 OK\r\nContent-Length: 2000000000\r\n\r\n", b"x" * 65536),
        Outcome.BAD_ANSWER, "over the limit"),
    "endless body, no length": (stream(b"HTTP/1.1 200 OK\r\n\r\n", b"[" * 65536),
                                Outcome.BAD_ANSWER, "over the limit"),
    "endless chunked body": (stream(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                                    b"10000\r\n" + b"7" * 65536 + b"\r\n"),
                             Outcome.BAD_ANSWER, "over the limit"),
    "endless head": (stream(b"HTTP/1.1 200 OK\r\n", b"X-Pad: " + b"a" * 1000 + b"\r\n"),
                     Outcome.BAD_ANSWER, "head over"),
    "one header line of 100 kB": (raw(b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 100_000 + b"\r\n\r\n"),
                                  Outcome.BAD_ANSWER, "head over"),
    "too many headers": (raw(b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * (MAX_HEADERS + 1)
                             + b"Content-Length: 0\r\n\r\n"), Outcome.BAD_ANSWER, "header lines"),
    "bad status line": (raw(b"HTTP/1.1 OK\r\n\r\n"), Outcome.BAD_ANSWER, "bad status line"),
    "not HTTP at all": (raw(b"SSH-2.0-OpenSSH_9.2\r\n\r\n"), Outcome.BAD_ANSWER, "bad status line"),
    "header without a colon": (raw(b"HTTP/1.1 200 OK\r\nno colon\r\nContent-Length: 0\r\n\r\n"),
                               Outcome.BAD_ANSWER, "bad header line"),
    "bad Content-Length": (raw(b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n"),
                           Outcome.BAD_ANSWER, "bad Content-Length"),
    "bad chunk size": (raw(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
                       Outcome.BAD_ANSWER, "bad chunk size"),
    "redirect": (raw(b"HTTP/1.1 302 Found\r\nLocation: http://evil.example/steal\r\n"
                     b"Content-Length: 0\r\n\r\n"), Outcome.REDIRECT, "not followed"),
    "answer dribbled a byte at a time": (dribble(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
                                                 0.05), Outcome.TIMEOUT, "in time"),
    "connection reset": (reset, Outcome.DISCONNECTED, "ConnectionResetError"),
    "closed without an answer": (raw(b"", close=True), Outcome.DISCONNECTED, "before answering"),
    "body cut short": (raw(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"top\"", close=True),
                       Outcome.DISCONNECTED, "middle of the answer body"),
    "a 500 with a 2e9 body": (stream(b"HTTP/1.1 500 Oops\r\nContent-Length: 2000000000\r\n\r\n",
                                     b"x" * 65536), Outcome.HTTP, "over the limit"),
    "200 that is not JSON": (status_200(b"<html>hi</html>"), Outcome.BAD_ANSWER, "not JSON"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_answer_costs_one_frame_only(server, sender, case):
    answer, outcome, why = HOSTILE[case]
    server.answer = answer
    assert sender.submit(0, IMG)
    first = sender.results.get(timeout=10)
    assert first.frame_id == 0 and first.outcome is outcome, first.error
    assert why in first.error and "Traceback" not in first.error
    assert sender.alive and sender.restarts == 0
    server.answer = ok                                    # the server behaves again
    assert sender.submit(1, IMG)
    second = sender.results.get(timeout=10)
    assert second.frame_id == 1 and second.outcome is Outcome.SENT, second.error
    assert second.answer.top1 == 4
    assert sender.results.empty() and sender.pending == 0 and sender.alive


def test_a_redirect_is_not_followed(server, sender):
    server.answer = raw(b"HTTP/1.1 301 Moved\r\nLocation: " + server.url.encode()
                        + b"/elsewhere\r\nContent-Length: 0\r\n\r\n")
    assert sender.submit(0, IMG)
    res = sender.results.get(timeout=10)
    assert res.outcome is Outcome.REDIRECT and res.label == "redirect" and res.http_status == 301
    assert server.requests == 1                           # the Location was not asked for


def test_memory_stays_bounded_under_an_endless_body(server, sender):
    server.answer = stream(b"HTTP/1.1 200 OK\r\n\r\n", b"x" * 65536)
    tracemalloc.start()
    try:
        assert sender.submit(0, IMG)
        res = sender.results.get(timeout=10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert res.outcome is Outcome.BAD_ANSWER
    assert peak < 4 * wire.MAX_ANSWER_BYTES + MAX_HEAD_BYTES + (1 << 20), peak


def test_bytes_after_an_answer_are_not_taken_for_the_next_one(server, sender):
    body = wire.answer_body([4], [0.8], inference_ms=1.0, batch_size=1)
    smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 44\r\n\r\n" + b'{"top":[{"class":9,"score":1.0}]}'
    server.answer = raw(b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(body)).encode()
                        + b"\r\n\r\n" + body + smuggled)
    for k in range(2):
        assert sender.submit(k, IMG)
        res = sender.results.get(timeout=10)
        assert res.outcome is Outcome.SENT and res.answer.top1 == 4
    assert server.requests == 2


class _Boom(BaseException):
    """Not an ``Exception``: nothing per frame catches it, so it ends the sender thread."""


class _Image:
    def __init__(self, exc):
        self.exc = exc

    def __array__(self, *a, **k):
        raise self.exc


def test_any_exception_while_sending_is_one_error_record(server, sender):
    assert sender.submit(0, _Image(RuntimeError("the codec broke")))
    res = sender.results.get(timeout=10)
    assert res.outcome is Outcome.ERROR and "RuntimeError: the codec broke" in res.error
    assert sender.alive and sender.restarts == 0
    assert sender.submit(1, IMG) and sender.results.get(timeout=10).outcome is Outcome.SENT


def test_a_dead_sender_thread_is_noticed_recorded_and_started_again(server):
    said = []
    snd = Sender(server.url, KEY, read_timeout=0.5, warn=said.append)
    try:
        assert snd.submit(0, _Image(_Boom("gone")))
        for _ in range(500):                             # bounded: at most 5 s
            if not snd.alive:
                break
            threading.Event().wait(0.01)
        assert not snd.alive
        assert snd.submit(1, IMG)                        # noticed here: a new thread
        got = {r.frame_id: r for r in (snd.results.get(timeout=10) for _ in range(2))}
        assert got[0].outcome is Outcome.ERROR and "sender thread died (_Boom: gone)" in got[0].error
        assert got[1].outcome is Outcome.SENT and snd.alive and snd.restarts == 1
        assert len(said) == 1 and "sender thread died" in said[0]
    finally:
        snd.close(timeout=0.0)
    assert snd.pending == 0


def test_close_notices_a_dead_thread_too(server):
    snd = Sender(server.url, KEY, read_timeout=0.5, warn=lambda m: None)
    assert snd.submit(0, _Image(_Boom("gone")))
    for _ in range(500):
        if not snd.alive:
            break
        threading.Event().wait(0.01)
    snd.close(timeout=0.5)
    res = snd.results.get(timeout=1)
    assert res.outcome is Outcome.ERROR and snd.pending == 0


def test_the_loop_through_a_server_that_misbehaves_every_other_request(tmp_path):
    answers = [status_200(DEEP), ok, raw(b"HTTP/1.1 302 Found\r\nLocation: /x\r\n"
                                         b"Content-Length: 0\r\n\r\n"), ok, reset, ok]
    srv = RawServer()
    count = {"n": 0}

    def cycling(conn, stop):
        count["n"] += 1
        return answers[(count["n"] - 1) % len(answers)](conn, stop)

    srv.answer = cycling
    log = tmp_path / "frames.jsonl"
    try:
        s = run(make_config(overrides=dict(policy=DQN, model=MODEL, accelerator="cpu", key=KEY,
                                           video=CLIP, server=srv.url, log=str(log),
                                           queue_size=200, read_timeout=0.5,
                                           connect_timeout=0.5, drain_timeout=5.0)),
                echo=lambda m: None, install_signals=False)
    finally:
        srv.close()
    blob = read_blob(DQN)
    recs = check_log(read_log(log), s["frames"], blob.N, blob.P, blob.M)   # one record per frame
    outs = [r["outcome"] for r in recs if r["offload"]]
    assert len(outs) >= 6
    assert set(outs) <= {"sent", "bad-answer", "redirect", "disconnected"}
    assert outs.count("sent") >= len(outs) // 2 - 1 and "bad-answer" in outs and "redirect" in outs
