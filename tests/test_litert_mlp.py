"""offload.litert_mlp: the DQN's MLP written as a float32 LiteRT model computes the float forward."""

import numpy as np
import pytest

from offload import mlp

from helpers import dqn_inputs

pytest.importorskip("ai_edge_litert")
pytest.importorskip("flatbuffers")

from offload.litert_mlp import LiteRTMLP  # noqa: E402


def test_litert_model_matches_the_float_forward(paper_net):
    """The same weights through the LiteRT interpreter and numpy: the same Q-values
    (float32 rounding apart), on the paper's network and several inputs."""
    _, layers, _ = paper_net
    lite = LiteRTMLP(layers)
    for x in dqn_inputs(np.random.default_rng(3), 5):
        ref = mlp.forward_float(layers, x)
        np.testing.assert_allclose(lite(x), ref, rtol=1e-4, atol=1e-4)
