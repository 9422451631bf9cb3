"""The edge server's per-image costs, side by side (cheap; the load test is tools/bench_server.py).

Groups:

* ``model``: the strong ONNX model per call on 1 image vs a batch of 32
  (divide the second by 32 for the per-image cost micro-batching buys);
* ``request``: one classify request through the whole app in process
  (Starlette TestClient: routing, key check, decode, batcher, JSON), no network.

The contenders agree: every row of the batch of 32 is the single image's
logits (float rounding apart), and the request's answer is the model's own
top classes and probabilities for that image.

Run with ``pytest benchmarks/test_bench_server.py --benchmark-enable --benchmark-group-by=group``;
without ``--benchmark-enable`` each one executes once, with its checks.
"""


import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("starlette")
pytest.importorskip("httpx")
cv2 = pytest.importorskip("cv2")

from starlette.testclient import TestClient  # noqa: E402

from offload import wire  # noqa: E402
from offload.server.app import create_app  # noqa: E402
from offload.server.keys import KeyStore  # noqa: E402
from offload.server.model import softmax, top_k  # noqa: E402


def _image(frame):
    return cv2.imdecode(np.frombuffer(frame, np.uint8), cv2.IMREAD_UNCHANGED)


@pytest.mark.benchmark(group="model")
@pytest.mark.parametrize("batch", [1, 32])
def test_bench_model_call(benchmark, strong_model, frame, batch):
    one = strong_model.prepare(_image(frame))
    x = np.stack([one] * batch)
    out = benchmark(lambda: strong_model.run(x)[0])
    assert out.shape == (batch, 10) and np.all(out.argmax(1) == 9)
    alone = strong_model.run(one[None])[0][0]
    np.testing.assert_allclose(out, np.broadcast_to(alone, out.shape), rtol=1e-4, atol=1e-4)


@pytest.mark.benchmark(group="request")
def test_bench_classify_request(benchmark, strong_model, frame):
    app = create_app(strong_model, KeyStore.single("k"), batch_window_ms=0.0)
    headers = {"Authorization": "Bearer k", "Content-Type": "image/png"}
    with TestClient(app) as c:
        r = benchmark(lambda: c.post(wire.CLASSIFY_PATH, content=frame, headers=headers))
    assert r.status_code == 200
    ans = wire.parse_answer(r.content)
    classes, scores = top_k(softmax(strong_model.run(strong_model.prepare(_image(frame))[None])[0])[0],
                            len(ans.classes))
    assert ans.top1 == 9 and ans.classes == classes
    np.testing.assert_allclose(ans.scores, scores, rtol=1e-4, atol=1e-4)
