"""Helpers shared by the tests and the benchmarks: DQN-like inputs, small random networks.

A plain module (``from helpers import ...``), not conftest.py: conftest is a
pytest plugin that pytest loads itself, and importing it by name yields
whichever conftest.py is first on ``sys.path``. The fixtures built from these
stay in conftest.py.
"""

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


def load_strong_model():
    """The committed strong ONNX model on one CPU thread; skips without onnxruntime or the file."""
    pytest.importorskip("onnxruntime")
    from offload.server.model import StrongModel

    path = artifacts.find("strong.onnx")
    if path is None:
        pytest.skip("artifacts/strong.onnx not found")
    return StrongModel(path, threads=1)
