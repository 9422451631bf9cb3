"""offload-serve's Open Inference Protocol (KServe v2) endpoints: health, metadata, infer, keys, buckets."""

import json
import re

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("starlette")

from click.testing import CliRunner  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from offload import oip, wire  # noqa: E402
from offload.server import keys as K  # noqa: E402
from offload.server.app import create_app  # noqa: E402
from offload.server.cli import main as serve_main  # noqa: E402

KEY = "test-key-v2-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
INFER = oip.infer_path("strong")


def _store(**kw):
    return K.KeyStore.single(KEY, name="cam", **kw)


@pytest.fixture
def client(strong_model):
    with TestClient(create_app(strong_model, _store()), raise_server_exceptions=False) as c:
        yield c


def _tensor(n=1, seed=0, shape=(1, 28, 28)):
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


def _post(c, x, *, binary, headers=AUTH, path=INFER, binary_output=None, name="image"):
    body, h = oip.encode_infer([(name, x)], binary=binary, request_id="r1",
                               binary_output=binary_output)
    return c.post(path, content=body, headers={**h, **headers})


def _outputs(r):
    ans = oip.decode_infer(r.content, r.headers.get(oip.HEADER_LENGTH), kind="answer",
                           max_elements=oip.MAX_OUTPUT_ELEMENTS, max_bytes=oip.MAX_ANSWER_BYTES)
    return ans


def _metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_health_server_and_model_metadata(client, strong_model):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    server = client.get("/v2").json()
    assert server["name"] == "offload" and oip.BINARY_EXTENSION in server["extensions"]
    meta = oip.parse_metadata(client.get("/v2/models/strong").content, model="strong")
    assert meta.name == "strong"
    assert meta.inputs == (oip.TensorSpec(strong_model.input_name, "FP32", (-1, 1, 28, 28)),)
    assert meta.outputs == (oip.TensorSpec(strong_model.output_name, "FP32", (-1, 10)),)
    assert client.get("/v2/models/strong/ready").json() == {"name": "strong", "ready": True}
    for path in ("/v2/models/other", "/v2/models/other/ready"):
        r = client.get(path)
        assert r.status_code == 404 and "no model 'other' here" in r.json()["error"]


@pytest.mark.parametrize("binary, binary_output", [(False, None), (True, True), (True, False),
                                                   (False, True)])
def test_infer_equals_onnx_runtime_directly(client, strong_model, binary, binary_output):
    x = _tensor(3, seed=1)
    r = _post(client, x, binary=binary, binary_output=binary_output)
    assert r.status_code == 200
    assert (oip.HEADER_LENGTH.lower() in r.headers) == bool(binary_output)
    ans = _outputs(r)
    (t,) = ans.tensors
    direct = strong_model.session.run(None, {strong_model.input_name: x})[0]
    assert t.name == strong_model.output_name and t.data.shape == (3, 10)
    np.testing.assert_allclose(t.data, direct, rtol=1e-5, atol=1e-5)
    assert ans.id == "r1" and ans.parameters["batch_size"] >= 1
    assert ans.parameters["inference_ms"] >= 0


def test_infer_and_classify_agree_on_a_frame(client, strong_model):
    from helpers import demo_frame

    png = demo_frame()
    v1 = wire.parse_answer(client.post(wire.CLASSIFY_PATH, content=png,
                                       headers={**AUTH, "Content-Type": "image/png"}).content)
    x = strong_model.prepare(wire.decode_image(png, "image/png"))[None]
    p = oip.to_distribution(_outputs(_post(client, x, binary=True)).tensors[0].data)
    assert int(np.argmax(p)) == v1.top1
    np.testing.assert_allclose(p[v1.classes], v1.scores, atol=1e-5)


@pytest.mark.parametrize("make, message", [
    (lambda: _tensor(1, shape=(1, 28, 27)), r"takes input image FP32 \[-1, 1, 28, 28\], but "
                                            r"the device would send FP32 \[1, 1, 28, 27\]"),
    (lambda: _tensor(1).astype(np.float64), "would send FP64"),
    (lambda: _tensor(33), r"more elements than the limit left for it \(25088\)"),  # 32 x 784
    (lambda: np.zeros((0, 1, 28, 28), np.float32), "a batch of 0"),
])
def test_wrong_tensors_are_400(client, make, message):
    for binary in (False, True):
        r = _post(client, make(), binary=binary)
        assert r.status_code == 400
        assert re.search(message, r.json()["error"]), r.json()


def test_protocol_errors_are_400_naming_the_fault(client):
    r = _post(client, _tensor(), binary=True, name="pixels")
    assert r.status_code == 400 and "no input 'pixels' (its input is 'image')" in r.json()["error"]
    r = client.post(INFER, content=b"{", headers=AUTH)
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    body, h = oip.encode_infer([("image", _tensor())], binary=True)
    r = client.post(INFER, content=body[:-4], headers={**AUTH, **h})
    assert r.status_code == 400 and "binary data declared" in r.json()["error"]
    r = client.post(INFER, content=body, headers=AUTH)  # binary body without its header
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    obj = json.loads(oip.encode_infer([("image", _tensor())], binary=False)[0])
    obj["outputs"] = [{"name": "probs"}]
    r = client.post(INFER, content=json.dumps(obj).encode(), headers=AUTH)
    assert r.status_code == 400 and "no output 'probs'" in r.json()["error"]


def test_keys_apply_to_infer_as_to_classify(client):
    r = _post(client, _tensor(), binary=True, headers={})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = _post(client, _tensor(), binary=True, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    # the key is checked before the model name: no key, no list of what is served
    r = _post(client, _tensor(), binary=True, headers={}, path=oip.infer_path("other"))
    assert r.status_code == 401
    r = _post(client, _tensor(), binary=True, path=oip.infer_path("other"))
    assert r.status_code == 404


def test_infer_spends_the_keys_tokens_and_429s_with_retry_after(strong_model):
    now = [0.0]
    # rate 0.25, depth 2 -> two requests at once, then one per 4 slots of 0.2 s
    store = _store(rate=0.25, depth=2, slot_s=0.2, clock=lambda: now[0])
    with TestClient(create_app(strong_model, store)) as c:
        png = {**AUTH, "Content-Type": "image/png"}
        from helpers import demo_frame

        assert c.post(wire.CLASSIFY_PATH, content=demo_frame(), headers=png).status_code == 200
        assert _post(c, _tensor(), binary=True).status_code == 200  # the same bucket: the 2nd token
        r = _post(c, _tensor(), binary=False)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert "rate limit of key 'cam'" in r.json()["error"]
        assert c.post(wire.CLASSIFY_PATH, content=demo_frame(), headers=png).status_code == 429
        now[0] = 0.8  # four slots on: one token
        assert _post(c, _tensor(), binary=True).status_code == 200
        m = c.get(wire.METRICS_PATH).text
    assert _metric(m, 'offload_v2_requests_total{endpoint="infer",status="200"}') == 2
    assert _metric(m, 'offload_v2_requests_total{endpoint="infer",status="429"}') == 1
    assert _metric(m, 'offload_requests_total{status="429"}') == 1  # classify's own count


def test_body_caps_are_413(strong_model):
    with TestClient(create_app(strong_model, _store(), max_body=10_000)) as c:
        r = _post(c, _tensor(), binary=False)  # about 15 kB of JSON
        assert r.status_code == 413 and "over the limit of 10000" in r.json()["error"]
        assert _post(c, _tensor(), binary=True).status_code == 200  # 3.3 kB


def test_metrics_count_v2_requests(client):
    client.get("/v2/health/ready")
    client.get("/v2/models/strong")
    client.get("/v2/models/nope")
    _post(client, _tensor(), binary=True)
    _post(client, _tensor(), binary=True, headers={})
    m = client.get(wire.METRICS_PATH).text
    assert _metric(m, 'offload_v2_requests_total{endpoint="health",status="200"}') == 1
    assert _metric(m, 'offload_v2_requests_total{endpoint="metadata",status="200"}') == 1
    assert _metric(m, 'offload_v2_requests_total{endpoint="metadata",status="404"}') == 1
    assert _metric(m, 'offload_v2_requests_total{endpoint="infer",status="200"}') == 1
    assert _metric(m, 'offload_v2_requests_total{endpoint="infer",status="401"}') == 1
    assert _metric(m, "offload_batch_size_count") == 1


def test_model_name_option_and_its_check(strong_model):
    with TestClient(create_app(strong_model, _store(), model_name="fashion")) as c:
        assert c.get("/v2/models/fashion").json()["name"] == "fashion"
        assert _post(c, _tensor(), binary=True, path=oip.infer_path("fashion")).status_code == 200
        assert c.get("/v2/models/strong").status_code == 404
    with pytest.raises(ValueError, match="model name 'a/b'"):
        create_app(strong_model, _store(), model_name="a/b")


def test_serve_cli_refuses_a_bad_model_name(tmp_path):
    keys = tmp_path / "keys.toml"
    assert CliRunner().invoke(serve_main, ["keys", "add", "cam", "--keys", str(keys)]).exit_code == 0
    r = CliRunner().invoke(serve_main, ["--keys", str(keys), "--model-name", "bad name",
                                        "--port", "0"])
    assert r.exit_code == 1 and "Error: model name 'bad name'" in r.output
    assert "Traceback" not in r.output


def test_ready_is_503_while_stopping(strong_model):
    app = create_app(strong_model, _store())
    with TestClient(app) as c:
        app.state.service.stopping = True
        assert c.get("/v2/health/ready").status_code == 503
        assert c.get("/v2/models/strong/ready").status_code == 503
        assert c.get("/v2/health/live").status_code == 200


def test_large_json_batch_is_parsed_off_the_event_loop_and_correct(client, strong_model):
    x = _tensor(32, seed=4)
    r = _post(client, x, binary=False)  # ~500 kB of JSON: the worker-thread path
    assert r.status_code == 200
    direct = strong_model.session.run(None, {strong_model.input_name: x})[0]
    np.testing.assert_allclose(_outputs(r).tensors[0].data, direct, rtol=1e-5, atol=1e-5)
