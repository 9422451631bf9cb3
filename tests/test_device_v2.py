"""The device's Open Inference Protocol (v2) client against a real v2 server (KServe) and offload-serve.

The KServe server runs in its own virtual environment, ``.venv-kserve``
(``bash tools/setup.sh`` makes it; ``OFFLOAD_KSERVE_PYTHON`` may name
another interpreter with kserve and onnxruntime), started on loopback by
the fixtures below from tests/kserve_server.py.
"""

import http.server
import json
import os
import subprocess
import threading
import time

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")

from offload import oip  # noqa: E402
from offload.device import make_config, run  # noqa: E402
from offload.device.capture import MemorySource  # noqa: E402
from offload.device.config import ConfigError  # noqa: E402
from offload.device.framelog import read_log  # noqa: E402
from offload.device.oipclient import TensorPlan, V2Protocol, default_plan  # noqa: E402
from offload.device.record import Outcome  # noqa: E402
from offload.device.sender import Sender  # noqa: E402
from offload.server import keys as K  # noqa: E402
from offload.server import serve_in_thread  # noqa: E402

from device_helpers import DQN, KEY, MODEL, ROOT, demo_frames  # noqa: E402
from kserve_server import LISTENING  # noqa: E402

STRONG = os.path.join(ROOT, "artifacts", "strong.onnx")
KSERVE_PYTHON = os.environ.get("OFFLOAD_KSERVE_PYTHON") or os.path.join(
    ROOT, ".venv-kserve", "bin", "python")
#: Longest wait for the KServe server to bind and be ready, both together (its imports take
#: seconds; within pytest-timeout's 300 s per test, so a server that never starts fails here).
START_S = 150.0


class KServe:
    """tests/kserve_server.py in .venv-kserve on a loopback port it picks itself."""

    def __init__(self, workdir):
        if not os.path.exists(KSERVE_PYTHON):
            pytest.fail(f"the real v2 test server needs {KSERVE_PYTHON}: run `bash tools/setup.sh` "
                        "(it makes .venv-kserve from tools/kserve-requirements.txt; CI does)")
        self.err_path = os.path.join(workdir, "kserve.err")
        with open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                [KSERVE_PYTHON, os.path.join(ROOT, "tests", "kserve_server.py"), "--model",
                 STRONG, "--port", "0"], stdout=subprocess.DEVNULL, stderr=err, cwd=workdir)
        end = time.monotonic() + START_S
        try:
            self.url = self._wait_listening(end)
            self._wait_ready(end)
        except BaseException:
            self.kill()
            raise

    def _log(self):
        with open(self.err_path, errors="replace") as f:
            return f.read()

    def _wait_listening(self, end):
        while time.monotonic() < end:
            m = LISTENING.search(self._log())
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        pytest.fail("the KServe test server did not start:\n" + self._log()[-3000:])

    def _wait_ready(self, end):
        import httpx

        while time.monotonic() < end:
            try:
                if httpx.get(self.url + oip.ready_path(), timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        pytest.fail("the KServe test server never became ready:\n" + self._log()[-3000:])

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


@pytest.fixture(scope="module")
def kserve(tmp_path_factory):
    srv = KServe(str(tmp_path_factory.mktemp("kserve")))
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def frames():
    return demo_frames()[0][:12]


@pytest.fixture(scope="module")
def session():
    return ort.InferenceSession(STRONG, providers=["CPUExecutionProvider"])


def _direct(session, frame):
    """What ONNX Runtime gives on the tensor the client sends: probabilities (float64)."""
    spec = oip.TensorSpec("image", "FP32", (-1, 1, 28, 28))
    x = default_plan(spec).make(frame)
    return oip.to_distribution(session.run(None, {"image": x})[0])


def _sender(url, *, model="strong", binary="auto", n_classes=10, key=KEY, plan_for=None,
            card=None, **kw):
    said = []
    s = Sender(url, key, read_timeout=10.0, connect_timeout=5.0, warn=said.append,
               protocol=V2Protocol.factory(model=model, binary=binary, n_classes=n_classes,
                                           card=card, plan_for=plan_for, warn=said.append),
               **kw)
    return s, said


def _send(sender, frames, first_id=0):
    for i, f in enumerate(frames):
        assert sender.submit(first_id + i, f)
        yield sender.results.get(timeout=60)


# ----------------------------------------------------------------------------- KServe

def test_kserve_start_check_reads_its_metadata(kserve):
    s, said = _sender(kserve.url)
    try:
        meta = s.protocol.metadata
        assert meta.name == "strong" and meta.inputs[0] == oip.TensorSpec(
            "image", "FP32", (-1, 1, 28, 28))
        assert meta.outputs[0].name == "logits" and said == []
    finally:
        s.close(1)


@pytest.mark.parametrize("binary", ["on", "off", "auto"])
def test_kserve_answers_are_onnx_runtimes(kserve, frames, session, binary):
    s, said = _sender(kserve.url, binary=binary)
    try:
        results = list(_send(s, frames))
    finally:
        s.close(1)
    assert said == [] and [r.outcome for r in results] == [Outcome.SENT] * len(frames)
    for r, f in zip(results, frames):
        p = _direct(session, f)
        order = list(np.lexsort((np.arange(10), -p)))
        assert r.answer.classes == order and r.answer.frame_id == str(r.frame_id)
        np.testing.assert_allclose(r.answer.scores, p[order], rtol=1e-5, atol=1e-7)
    sizes = {r.request_bytes for r in results}
    if binary == "off":
        assert min(sizes) > 4000  # 784 numbers as JSON text
    else:
        assert max(sizes) < 3136 + 300  # 784 x 4 bytes after a short JSON header


def test_kserve_wrong_shape_tensor_is_its_4xx(kserve, frames):
    # "loose" says it takes any H x W; ONNX Runtime behind it needs 28 x 28.
    def small(spec):
        return TensorPlan((1, 1, 20, 20), "FP32",
                          lambda image: np.zeros((1, 1, 20, 20), np.float32))

    s, said = _sender(kserve.url, model="loose", binary="on", plan_for=small)
    try:
        (r,) = _send(s, frames[:1])
        (again,) = _send(s, frames[:1], first_id=1)
        alive = s.alive
    finally:
        s.close(1)
    assert r.outcome is Outcome.HTTP and r.http_status == 400 and r.label == "http-400"
    assert "input must be" in r.error and "[1, 1, 20, 20]" in r.error
    assert again.label == "http-400" and alive and said == []  # no fall-back with binary on


def test_kserve_model_that_raises_is_its_5xx(kserve, frames):
    s, said = _sender(kserve.url, model="broken")
    try:
        results = list(_send(s, frames[:2]))
    finally:
        s.close(1)
    assert [r.label for r in results] == ["http-500"] * 2
    assert "this test model always fails" in results[0].error and said == []


def test_kserve_unknown_model_is_refused_at_start(kserve):
    with pytest.raises(ConfigError, match=r"server-model: GET /v2/models/nope answered 404"):
        _sender(kserve.url, model="nope")


def test_kserve_model_that_does_not_fit_is_refused_at_start_naming_both(kserve):
    with pytest.raises(ConfigError, match=r"output logits FP32 \[-1, 10\] has 10 classes; the "
                                          r"device's weak model has 7"):
        _sender(kserve.url, n_classes=7)

    def colour(spec):
        return TensorPlan((1, 3, 28, 28), "FP32", lambda image: None)

    with pytest.raises(ConfigError, match=r"takes input image FP32 \[-1, 1, 28, 28\], but the "
                                          r"device would send FP32 \[1, 3, 28, 28\]"):
        _sender(kserve.url, plan_for=colour)


def test_kserve_going_away_mid_run(tmp_path, frames):
    srv = KServe(str(tmp_path))
    try:
        s, said = _sender(srv.url)
        before = list(_send(s, frames[:3]))
        srv.kill()
        after = list(_send(s, frames[3:6], first_id=3))
        alive = s.alive
        s.close(1)
    finally:
        srv.kill()
    assert [r.outcome for r in before] == [Outcome.SENT] * 3
    # the kept-alive connection is gone (disconnected or reset), then nothing listens
    assert {r.outcome for r in after} <= {Outcome.REFUSED, Outcome.DISCONNECTED}
    assert after[-1].outcome is Outcome.REFUSED and alive and said == []


def test_offload_run_against_kserve(tmp_path, kserve, session):
    images, labels = demo_frames()
    images = images[:40]
    log = tmp_path / "frames.jsonl"
    cfg = make_config(overrides=dict(policy=DQN, model=MODEL, accelerator="cpu", key=KEY,
                                     server=kserve.url, protocol="v2", server_model="strong",
                                     queue_size=200, read_timeout=10.0, log=str(log)))
    summary = run(cfg, source=MemorySource(images, labels=dict(enumerate(labels[:40]))),
                  echo=lambda m: None,
                  install_signals=False)
    recs = read_log(str(log))
    sent = [r for r in recs if r["offload"]]
    assert summary["frames"] == 40 and sent
    assert all(r["outcome"] == "sent" and r["final_source"] == "strong" for r in sent)
    for r in sent:
        p = _direct(session, images[r["id"]])
        assert r["final"] == int(np.argmax(p))
        assert r["strong_top"][0][1] == pytest.approx(p.max(), abs=1e-5)


# ----------------------------------------------------------------------------- offload-serve

def _run_log(tmp_path, url, name, images, **kw):
    log = tmp_path / f"{name}.jsonl"
    cfg = make_config(overrides=dict(policy=DQN, model=MODEL, accelerator="cpu", key=KEY,
                                     server=url, queue_size=200, read_timeout=10.0,
                                     log=str(log), **kw))
    run(cfg, source=MemorySource(images), echo=lambda m: None, install_signals=False)
    return {r["id"]: r for r in read_log(str(log))}


def test_v1_and_v2_through_offload_serve_agree(tmp_path):
    images = demo_frames()[0][:40]
    with serve_in_thread(api_key=KEY) as srv:
        v1 = _run_log(tmp_path, srv.url, "v1", images)
        v2 = _run_log(tmp_path, srv.url, "v2", images, protocol="v2", server_model="strong")
    assert v1.keys() == v2.keys()
    sent = [i for i, r in v1.items() if r["offload"]]
    assert sent and all(v2[i]["offload"] and v2[i]["outcome"] == "sent" for i in sent)
    for i in sent:
        assert v1[i]["final"] == v2[i]["final"]
        a, b = v1[i]["strong_top"], v2[i]["strong_top"]
        assert [c for c, _ in a] == [c for c, _ in b]
        np.testing.assert_allclose([s for _, s in a], [s for _, s in b], atol=2e-5)


def test_keys_and_429_against_offload_serve(frames):
    now = [0.0]
    # depth 2: two requests at once, then a 429 whose Retry-After holds the sender off
    store = K.KeyStore.single(KEY, name="cam", rate=0.25, depth=2, slot_s=0.2,
                              clock=lambda: now[0])
    clock = [100.0]
    with serve_in_thread(keys=store) as srv:
        s, said = _sender(srv.url, clock=lambda: clock[0])
        try:
            results = list(_send(s, frames[:4]))
            clock[0] += 61.0  # past any hold (at most MAX_HOLD_S)
            now[0] = 0.8      # four slots later on the server: a token again
            (later,) = _send(s, frames[4:5], first_id=4)
        finally:
            s.close(1)
        bad, _ = _sender(srv.url, key="wrong-key")
        try:
            (refused,) = _send(bad, frames[:1])
        finally:
            bad.close(1)
    assert [r.label for r in results] == ["sent", "sent", "http-429", "held-off"]
    assert "rate limit of key 'cam'" in results[2].error and "Retry-After" in results[3].error
    assert later.label == "sent"
    assert refused.label == "http-401" and "API key" in refused.error


# ----------------------------------------------------------------------------- a server without binary

class _JSONOnlyV2(http.server.BaseHTTPRequestHandler):
    """A v2 server without the binary extension (as Seldon MLServer's REST is): 400 to a binary body."""

    protocol_version = "HTTP/1.1"
    answer = "ok"

    def log_message(self, *args):
        pass

    def _reply(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        meta = {"name": "strong", "inputs": [{"name": "image", "datatype": "FP32",
                                              "shape": [-1, 1, 28, 28]}],
                "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 10]}]}
        self._reply(200, meta if self.path == "/v2/models/strong" else {"ready": True})

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.seen.append(oip.HEADER_LENGTH in self.headers)
        if oip.HEADER_LENGTH in self.headers:
            return self._reply(400, {"error": "binary tensors are not supported"})
        x = np.asarray(json.loads(body)["inputs"][0]["data"], np.float32)
        probs = np.full(10, 0.05)
        probs[int(x.sum()) % 10] = 0.55  # already a distribution: kept as it is
        if self.server.answer == "eleven":
            probs = np.full(11, 1 / 11)
        if self.server.answer == "huge":  # a Content-Length over the device's cap: never read
            self.send_response(200)
            self.send_header("Content-Length", str(oip.MAX_ANSWER_BYTES + 1))
            self.end_headers()
            return
        out = {"name": "probs", "datatype": "FP32", "shape": [1, probs.size],
               "data": probs.tolist()}
        if self.server.answer == "deep":
            out["data"] = [[[[[[[[[[[[[[[[[[0.1]]]]]]]]]]]]]]]]]]
        self._reply(200, {"model_name": "strong", "outputs": [out]})


@pytest.fixture
def json_only():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _JSONOnlyV2)
    srv.seen, srv.answer = [], "ok"
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_auto_falls_back_to_json_once(json_only, frames):
    url = f"http://127.0.0.1:{json_only.server_address[1]}"
    s, said = _sender(url)
    try:
        results = list(_send(s, frames[:3]))
    finally:
        s.close(1)
    assert [r.label for r in results] == ["sent"] * 3
    assert json_only.seen == [True, False, False, False]  # one binary try, then JSON
    assert len(said) == 1 and "refused a binary tensor (400" in said[0]
    p = results[0].answer.scores
    assert p[0] == pytest.approx(0.55) and sum(p) == pytest.approx(1.0)  # not softmaxed again


def test_binary_on_does_not_fall_back_and_off_never_tries(json_only, frames):
    url = f"http://127.0.0.1:{json_only.server_address[1]}"
    s, _ = _sender(url, binary="on")
    try:
        assert [r.label for r in _send(s, frames[:2])] == ["http-400"] * 2
    finally:
        s.close(1)
    s, _ = _sender(url, binary="off")
    try:
        assert [r.label for r in _send(s, frames[:2])] == ["sent"] * 2
    finally:
        s.close(1)
    assert json_only.seen == [True, True, False, False]


@pytest.mark.parametrize("answer, message", [
    ("eleven", "has 11 classes, the weak model 10"),
    ("huge", f"over the limit of {oip.MAX_ANSWER_BYTES}"),
    ("deep", "nested deeper than 14 levels"),
])
def test_bad_answers_are_bad_answer_and_the_sender_goes_on(json_only, frames, answer, message):
    json_only.answer = answer
    s, _ = _sender(f"http://127.0.0.1:{json_only.server_address[1]}", binary="off")
    try:
        results = list(_send(s, frames[:2]))
        alive = s.alive
    finally:
        s.close(1)
    assert [r.outcome for r in results] == [Outcome.BAD_ANSWER] * 2 and alive
    assert message in results[0].error


# ----------------------------------------------------------------------------- configuration

def test_v2_config_keys():
    cfg = make_config(overrides={"server": "http://127.0.0.1:1", "protocol": "v2",
                                 "server-model": "strong"})
    assert (cfg.protocol, cfg.server_model, cfg.v2_binary) == ("v2", "strong", "auto")
    with pytest.raises(ConfigError, match="server-model: --protocol v2 needs the model's name"):
        make_config(overrides={"server": "http://127.0.0.1:1", "protocol": "v2"})
    with pytest.raises(ConfigError, match="server-model: only applies to --protocol v2"):
        make_config(overrides={"server-model": "strong"})
    with pytest.raises(ConfigError, match="server-model: model name 'a/b'"):
        make_config(overrides={"protocol": "v2", "server-model": "a/b"})
    with pytest.raises(ConfigError, match="v2-binary: must be one of auto, on, off"):
        make_config(overrides={"v2-binary": "maybe"})
    with pytest.raises(ConfigError, match="server-card: only applies to --protocol v2"):
        make_config(overrides={"server-card": "strong.card.toml"})
    with pytest.raises(ConfigError, match="send-size: only applies to --protocol v1"):
        make_config(overrides={"protocol": "v2", "send-size": "64x64"})
    assert make_config(overrides={"model": MODEL}).model == MODEL  # the weak model keeps --model


def test_server_not_up_at_start_is_a_warning_then_refused(frames):
    import socket

    with socket.socket() as sock:  # bound, not listening: refused, and no one else takes it
        sock.bind(("127.0.0.1", 0))
        s, said = _sender(f"http://127.0.0.1:{sock.getsockname()[1]}")
        try:
            (r,) = _send(s, frames[:1])
        finally:
            s.close(1)
    assert len(said) == 1 and said[0].startswith("warning: v2 server not ready at start")
    assert r.outcome is Outcome.REFUSED


class _Dies(BaseException):
    """Not an Exception: escapes the sender's per-frame handler and ends its thread."""


class _Frame:
    """A frame whose pixels cannot be read: raises ``exc`` when made into an array."""

    def __init__(self, exc):
        self.exc = exc

    def __array__(self, *a, **k):
        raise self.exc


def test_failures_while_making_the_tensor_keep_the_sender_going(frames):
    with serve_in_thread(api_key=KEY) as srv:
        s, said = _sender(srv.url)
        try:
            (broke,) = _send(s, [_Frame(RuntimeError("the camera buffer broke"))])
            assert s.submit(1, _Frame(_Dies("gone")))
            for _ in range(500):  # bounded: at most 5 s
                if not s.alive:
                    break
                threading.Event().wait(0.01)
            assert not s.alive
            assert s.submit(2, frames[0])  # noticed here: a new thread
            got = {r.frame_id: r for r in (s.results.get(timeout=30) for _ in range(2))}
            restarts = s.restarts
        finally:
            s.close(1)
    assert broke.outcome is Outcome.ERROR and "the camera buffer broke" in broke.error
    assert got[1].outcome is Outcome.ERROR and "sender thread died (_Dies: gone)" in got[1].error
    assert got[2].outcome is Outcome.SENT and restarts == 1
    assert len(said) == 1 and "sender thread died" in said[0]


def test_v2_over_tls_verifies_like_v1(tmp_path, frames):
    from tls_helpers import make_pki

    pki = make_pki(tmp_path)
    with serve_in_thread(api_key=KEY, tls_cert=pki.server_cert, tls_key=pki.server_key) as srv:
        assert srv.url.startswith("https://")
        s, said = _sender(srv.url, ca_file=pki.ca)
        try:
            (ok,) = _send(s, frames[:1])
        finally:
            s.close(1)
        # another CA: the start check's handshake fails, said once; nothing is sent
        bad, bad_said = _sender(srv.url, ca_file=pki.other_ca)
        try:
            refused = list(_send(bad, frames[:2]))
        finally:
            bad.close(1)
    assert ok.label == "sent" and said == []
    assert [r.outcome for r in refused] == [Outcome.TLS_ERROR] * 2
    tls_lines = [m for m in bad_said if "certificate verify failed" in m]
    assert len(tls_lines) == 1 and tls_lines[0].startswith("error: TLS handshake")


# ----------------------------------------------------------------------------- the server model's card

def test_a_card_that_contradicts_the_metadata_is_refused_naming_both(kserve, tmp_path):
    card = tmp_path / "strong.card.toml"
    card.write_text("height = 64\nwidth = 64\n")
    with pytest.raises(ConfigError, match=r"server-card: .*card's height 64 .*contradicts the "
                                          r"model's input tensor, whose height is 28"):
        _sender(kserve.url, card=str(card))
    with pytest.raises(ConfigError, match=r"server-card: .*cannot read the card"):
        _sender(kserve.url, card=str(tmp_path / "missing.toml"))


def test_a_dynamic_size_needs_the_card_and_then_works(kserve, tmp_path, frames, session):
    # "loose" says [-1, 1, -1, -1]: the defaults cannot know the size ...
    with pytest.raises(ConfigError, match=r"server-card: .*height is dynamic"):
        _sender(kserve.url, model="loose")
    card = tmp_path / "loose.card.toml"
    card.write_text("height = 28\nwidth = 28\n")
    s, said = _sender(kserve.url, model="loose", card=str(card))  # ... a card does
    try:
        (r,) = _send(s, frames[:1])
    finally:
        s.close(1)
    assert r.label == "sent" and r.answer.top1 == int(np.argmax(_direct(session, frames[0])))


def test_the_cards_mean_and_std_reach_the_model(kserve, tmp_path, frames, session):
    import cv2

    card = tmp_path / "strong.card.toml"
    card.write_text("mean = [10.0]\nstd = [2.0]\n")
    s, _ = _sender(kserve.url, card=str(card))
    try:
        results = list(_send(s, frames[:4]))
    finally:
        s.close(1)
    moved = []
    for r, f in zip(results, frames):
        # independently: OpenCV's grey of the 28x28 BGR frame, in pixel units, (p - 10) / 2
        grey = cv2.cvtColor(f.astype(np.float32) / 255.0, cv2.COLOR_BGR2GRAY) * 255.0
        x = ((grey - 10.0) / 2.0).astype(np.float32)[None, None]
        p = oip.to_distribution(session.run(None, {"image": x})[0])
        assert r.answer.top1 == int(np.argmax(p))
        np.testing.assert_allclose(r.answer.scores[0], p.max(), atol=1e-4)
        moved.append(abs(r.answer.scores[0] - _direct(session, f).max()))
    assert max(moved) > 1e-3  # not what the default card gives


def test_a_switch_refusal_on_v2_is_switch_refused(tmp_path, frames):
    from click.testing import CliRunner

    from offload.server.cli import main as serve_main

    keys = str(tmp_path / "keys.toml")
    run_cli = CliRunner().invoke
    assert run_cli(serve_main, ["keys", "switch", "add", "uplink", "--rate", "0.01", "--depth",
                                "1", "--keys", keys]).exit_code == 0
    added = run_cli(serve_main, ["keys", "add", "cam", "--switch", "uplink", "--keys", keys])
    assert added.exit_code == 0
    key = added.output.strip().splitlines()[-1]
    store = K.KeyStore.from_file(keys, clock=lambda: 0.0)
    with serve_in_thread(keys=store) as srv:
        s, _ = _sender(srv.url, key=key)
        try:
            results = list(_send(s, frames[:2]))
        finally:
            s.close(1)
    # the key has no bucket of its own; the switch lets one through, then refuses
    assert [r.label for r in results] == ["sent", "switch-refused"]
