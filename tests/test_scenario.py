"""The scenario: one validation, one set of defaults, named seeds shared by every command."""

import numpy as np
import pytest

from offload import simulate
from offload.bucket import Bucket
from offload.profile import TEST
from offload.scenario import SEED_NAMES, SETTINGS, Scenario, ScenarioError, named_seed
from offload.synthetic import synthetic_profile


def test_defaults_are_declared_once():
    sc = Scenario()
    assert sc.settings() == {k: d for k, (d, *_rest) in SETTINGS.items()}
    assert sc.rprob == 0.01 and sc.bucket == Bucket(1, 10, 40)
    assert Scenario.from_settings({"rate": 0.25, "sp": 0.3}).spread == 0.3


@pytest.mark.parametrize("kw, field, match", [
    ({"rate": 1.5}, "bucket", "rate=1.5 tokens/slot"),
    ({"depth": 0.5}, "bucket", "depth=0.5 tokens"),
    ({"rate": 0.1, "depth": 7000.0}, "bucket", "token states"),
    ({"choice": "bursty"}, "choice", "choice='bursty'"),
    ({"spread": 1.5}, "spread", "spread=1.5"),
    ({"rprob": -0.1}, "rprob", "rprob=-0.1"),
    ({"arrivals": "poisson"}, "arrivals", "arrivals='poisson'"),
    ({"arrivals": "markov", "markov": (0, 3, 0.1, 0.1)}, "markov", "I1=0"),
    ({"arrivals": "markov", "markov": (2, 3, 1.0, 1.0)}, "markov", "no image can ever arrive"),
    ({"seed": -1}, "seed", "seed=-1"),
])
def test_one_validation_names_the_field(kw, field, match):
    with pytest.raises(ScenarioError, match=match) as info:
        Scenario(**kw)
    assert info.value.field == field


def test_markov_parameters_are_checked_only_for_markov_arrivals():
    assert Scenario(markov=(0, 0, 0.0, 0.0)).arrivals == "periodic"


def test_named_seeds_are_distinct_and_stable():
    draws = {name: np.random.default_rng(named_seed(0, name)).integers(1 << 62)
             for name in SEED_NAMES}
    assert len(set(draws.values())) == len(SEED_NAMES)
    # Stable: the seed is SeedSequence([seed, stable id, ...]), never an order of drawing.
    assert named_seed(7, "test").entropy == [7, 1]
    assert Scenario(seed=7).stream_seeds("training")[1].entropy == [7, 2, 1]
    assert (np.random.default_rng(Scenario(seed=3).seed_for("ceiling")).integers(1 << 30)
            == np.random.default_rng(np.random.SeedSequence([3, 5])).integers(1 << 30))
    with pytest.raises(ValueError, match="unknown stream"):
        named_seed(0, "bogus")


def test_sim_and_trainer_draw_the_same_test_streams():
    """offload-sim's test streams are offload-train's for the same scenario, by construction."""
    dqn = pytest.importorskip("training.dqn")
    prof = synthetic_profile(3000, seed=2)
    sc = Scenario(arrivals="markov", markov=(1, 3, 0.05, 0.05), seed=4)
    m = prof.standardized_metric().astype(np.float32)
    te = prof.indices(TEST)
    sim = sc.streams(m[te], prof.reward[te], prof.weak_loss[te], length=500, n_seq=3,
                     raw_metric=prof.metric[te], hidden=True)
    data = dqn.prepare_data(prof, seed=sc.seed)
    train = data.streams(sc, "test", length=500, n_seq=3, hidden=True)
    for field in ("metric", "reward", "interarrival", "raw_metric", "location", "arrival_state"):
        np.testing.assert_array_equal(getattr(sim, field), getattr(train, field))
    other = data.streams(sc, "val", length=500, n_seq=3)
    assert not np.array_equal(other.interarrival, train.interarrival)


def test_make_streams_takes_the_scenario():
    m = np.linspace(-1, 1, 200).astype(np.float32)
    sc = Scenario(choice="location-reset", seed=1)
    a = simulate.make_streams(m, m, m, sc, length=100, n_seq=2)
    b = sc.streams(m, m, m, length=100, n_seq=2)
    np.testing.assert_array_equal(a.metric, b.metric)
    c = sc.streams(m, m, m, length=100, n_seq=2, purpose="training")
    assert not np.array_equal(a.metric, c.metric)


def test_training_arrivals():
    assert Scenario().training_arrivals() is None
    ia = Scenario(arrivals="markov", markov=(1, 4, 0.1, 0.1)).training_arrivals(length=2000)
    assert ia.shape == (2000,) and ia.min() >= 1 and {1, 4} <= set(np.unique(ia))
