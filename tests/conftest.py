"""Shared fixtures (a seeded generator, the paper-size network, the strong model) and hypothesis profiles.

Helper functions the tests import by name live in ``helpers.py``.

Hypothesis profiles, chosen by the environment variable ``HYPOTHESIS_PROFILE``:

* ``ci``: derandomised (the same examples on every run, so a change lands or
  not on its merits), no example database, 100 examples per test. The default
  whenever ``CI`` is set (to anything but ``""``, ``0`` or ``false``); ``.ci/run``
  selects it explicitly.
* ``dev`` (the default otherwise): random, 200 examples per test, with the
  local example database, for hunting bugs. Vary ``--hypothesis-seed=N`` to
  explore further.

Both print the failing example and a ``@reproduce_failure`` blob that replays it.
No profile has a per-example deadline: timing is not a pass criterion; a hang
is caught by pytest-timeout's per-test cap (``timeout`` in pyproject.toml).
"""

import os

import numpy as np
import pytest
from hypothesis import settings

from offload import mlp
from offload.bucket import Bucket

from helpers import dqn_inputs, random_network
# Fixtures shared with benchmarks/conftest.py, defined once in helpers.
from helpers import frame, strong_model  # noqa: F401

settings.register_profile("ci", derandomize=True, database=None, print_blob=True,
                          deadline=None, max_examples=100)
settings.register_profile("dev", print_blob=True, deadline=None, max_examples=200)


def _profile():
    chosen = os.environ.get("HYPOTHESIS_PROFILE")
    if chosen:
        return chosen
    ci = os.environ.get("CI", "").strip().lower()
    return "ci" if ci not in ("", "0", "false", "no") else "dev"


settings.load_profile(_profile())


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture
def paper_net(rng):
    """The paper's 5x64 network for bucket (1, 10, 40), 96 metrics + 96 inter-arrivals."""
    N, P, M = 1, 10, 40
    layers = random_network(rng, 192, Bucket(N, P, M).q_length)
    q = mlp.quantize(layers, dqn_inputs(rng, 4000), segments=(0, 96))
    return (N, P, M), layers, q
