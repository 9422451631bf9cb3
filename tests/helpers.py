"""Helpers shared by the tests and the benchmarks: DQN-like inputs, small random networks.

A plain module (``from helpers import ...``), not conftest.py: conftest is a
pytest plugin that pytest loads itself, and importing it by name yields
whichever conftest.py is first on ``sys.path``. The fixtures built from these
stay in conftest.py.
"""

import os
import time

import numpy as np
import pytest

from offload import artifacts, mlp


def dqn_inputs(rng, count, H=96, interarrival=True):
    """Standardised metrics ~ N(0,1) and inter-arrival slots in 1..9, newest first."""
    x = np.empty((count, 2 * H if interarrival else H), np.float32)
    x[:, :H] = rng.normal(size=(count, H))
    if interarrival:
        x[:, H:] = rng.integers(1, 10, size=(count, H))
    return x


def random_network(rng, din, dout, hidden=(64,) * 5):
    """He-uniform MLP with small random biases (list of (weight, bias))."""
    layers = mlp.he_uniform([din, *hidden, dout], rng)
    return [(w, rng.normal(scale=0.1, size=b.shape).astype(np.float32)) for w, b in layers]


def demo_frame():
    """The PNG bytes of the first committed demo frame; skips without the artifacts."""
    path = artifacts.find(os.path.join("demo", "frames", "000001.png"))
    if path is None:
        pytest.skip("demo frames not found")
    with open(path, "rb") as f:
        return f.read()


def load_strong_model():
    """The committed strong ONNX model on one CPU thread; skips without onnxruntime or the file."""
    pytest.importorskip("onnxruntime")
    from offload.server.model import StrongModel

    path = artifacts.find("strong.onnx")
    if path is None:
        pytest.skip("artifacts/strong.onnx not found")
    return StrongModel(path, threads=1)


def listening_url(proc, err_path, timeout=60.0):
    """The URL ``offload-serve --port 0`` reports on stderr (written to ``err_path``) once bound.

    The server binds port 0 itself and says which port it got, so no port is
    picked here, closed and hoped to be still free when the server binds it.
    stderr goes to a file, not a pipe, so the server never blocks on a full pipe.
    """
    from offload.server.serve import LISTENING

    deadline = time.monotonic() + timeout  # a guard against a hang only
    while time.monotonic() < deadline:
        text = err_path.read_text()
        m = LISTENING.search(text)
        if m:
            return m.group(1)
        assert proc.poll() is None, text
        time.sleep(0.05)
    raise AssertionError("offload-serve did not report its address")


def spy_compare_digest(monkeypatch, keys_module):
    """Record every ``hmac.compare_digest`` call the key store makes: the list of ``(a, b)``."""
    seen = []
    real = keys_module.hmac.compare_digest

    def spy(a, b):
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(keys_module.hmac, "compare_digest", spy)
    return seen


@pytest.fixture(scope="module")
def frame():
    """PNG bytes of one committed demo frame (a Fashion-MNIST test image)."""
    return demo_frame()


@pytest.fixture(scope="module")
def strong_model():
    """The committed strong ONNX model on one CPU thread (skips without onnxruntime or the file)."""
    return load_strong_model()
