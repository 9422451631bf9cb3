"""The edge server's per-image costs, side by side (cheap; the load test is tools/bench_server.py).

Groups:

* ``model``: the strong ONNX model per call on 1 image vs a batch of 32
  (divide the second by 32 for the per-image cost micro-batching buys);
* ``request``: one classify request through the whole app in process
  (Starlette TestClient: routing, key check, decode, batcher, JSON), no network.

Run with ``pytest tests/test_bench_server.py --benchmark-enable --benchmark-group-by=group``;
in the normal test run each one executes once, as a test that it works.
"""

import os

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("starlette")
pytest.importorskip("httpx")
cv2 = pytest.importorskip("cv2")

from starlette.testclient import TestClient  # noqa: E402

from offload import artifacts, wire  # noqa: E402
from offload.server.app import create_app  # noqa: E402
from offload.server.keys import KeyStore  # noqa: E402


@pytest.fixture(scope="module")
def frame():
    path = artifacts.find(os.path.join("demo", "frames", "000001.png"))
    if path is None:
        pytest.skip("demo frames not found")
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.benchmark(group="model")
@pytest.mark.parametrize("batch", [1, 32])
def test_bench_model_call(benchmark, strong_model, frame, batch):
    img = cv2.imdecode(np.frombuffer(frame, np.uint8), cv2.IMREAD_UNCHANGED)
    x = np.stack([strong_model.prepare(img)] * batch)
    out = benchmark(lambda: strong_model.run(x)[0])
    assert out.shape == (batch, 10) and np.all(out.argmax(1) == 9)


@pytest.mark.benchmark(group="request")
def test_bench_classify_request(benchmark, strong_model, frame):
    app = create_app(strong_model, KeyStore.single("k"), batch_window_ms=0.0)
    headers = {"Authorization": "Bearer k", "Content-Type": "image/png"}
    with TestClient(app) as c:
        r = benchmark(lambda: c.post(wire.CLASSIFY_PATH, content=frame, headers=headers))
    assert r.status_code == 200 and wire.parse_answer(r.content).top1 == 9
