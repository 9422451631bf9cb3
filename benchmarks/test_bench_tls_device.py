"""The device's per-frame send cost with TLS against plain HTTP, kept-alive, loopback.

Contenders (each sends the same 50 demo frames, one after another, through one
``Sender`` whose connection is opened before the timing, to a loopback
``FakeServer``):

* ``plain``: ``http://127.0.0.1``;
* ``tls``: ``https://127.0.0.1`` with a certificate from a CA the test makes,
  verified against ``ca-file`` (the handshake happens once, before the timing:
  a device keeps its connection).

A round is submit -> result for each frame in turn: encode (PNG), request,
the fake server's answer, parsing, the hand-off back. The contenders agree:
every frame comes back ``sent`` with the same classes, over one connection.

Run with ``pytest benchmarks/test_bench_tls_device.py --benchmark-enable``.
"""

import pytest

from offload.device.record import Outcome
from offload.device.sender import Sender

from device_helpers import KEY, FakeServer, demo_frames
from tls_helpers import make_pki, server_context

N_FRAMES = 50


@pytest.fixture(scope="module")
def frames():
    return demo_frames()[0][:N_FRAMES]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _send_all(snd, frames):
    out = []
    for k, f in enumerate(frames):
        assert snd.submit(k, f)
        out.append(snd.results.get(timeout=10))
    return out


def _bench(benchmark, frames, srv, **kw):
    snd = Sender(srv.url, KEY, queue_size=4, read_timeout=5.0, warn=lambda m: None, **kw)
    try:
        _send_all(snd, frames[:3])                 # connect (and handshake) outside the timing
        results = benchmark.pedantic(_send_all, args=(snd, frames), rounds=10, warmup_rounds=1)
    finally:
        snd.close(timeout=0.0)
    assert [r.outcome for r in results] == [Outcome.SENT] * len(frames)
    assert len(srv.connections) == 1               # kept alive throughout
    benchmark.extra_info["frames_per_round"] = len(frames)
    return [r.answer.classes for r in results]


@pytest.fixture(scope="module")
def answers():
    return {}


@pytest.mark.benchmark(group="device-send")
def test_send_plain_http(benchmark, frames, answers):
    srv = FakeServer(answer_class=lambda fid: fid % 10)
    try:
        answers["plain"] = _bench(benchmark, frames, srv)
    finally:
        srv.kill()
    if "tls" in answers:
        assert answers["plain"] == answers["tls"]


@pytest.mark.benchmark(group="device-send")
def test_send_tls(benchmark, frames, pki, answers):
    srv = FakeServer(answer_class=lambda fid: fid % 10,
                     tls=server_context(pki.server_cert, pki.server_key))
    try:
        answers["tls"] = _bench(benchmark, frames, srv, ca_file=pki.ca)
    finally:
        srv.kill()
    assert srv.tls_failures == []
    if "plain" in answers:
        assert answers["plain"] == answers["tls"]
