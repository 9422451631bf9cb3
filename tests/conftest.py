"""Shared fixtures: small random networks and DQN-like inputs."""

import numpy as np
import pytest

from offload import mlp


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


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture
def paper_net(rng):
    """The paper's 5x64 network for bucket (1, 10, 40), 96 metrics + 96 inter-arrivals."""
    N, P, M = 1, 10, 40
    layers = random_network(rng, 192, mlp.q_length(N, P, M))
    q = mlp.quantize(layers, dqn_inputs(rng, 4000), segments=(0, 96))
    return (N, P, M), layers, q
