"""One DQN Q-iteration at the published size, timed (training.dqn).

The anchor is the authors' TensorFlow trainer, which takes 1.0-1.3 s per
Q-iteration on a 2-core machine like ours: freeze the target network, sample
16,384 tuples (128 x 128), compute their targets, take 128 Adam steps of 128.
``dqn-iteration`` runs exactly that with our trainer on the paper's network
(5 x 64, 96 metrics + 96 inter-arrival times, bucket (1, 10, 40)), with
SPEC section 6's Q-learning targets and with the quick preset's ceiling
targets; the two
contenders split the same iteration into its parts (sampling and targets,
the Adam steps) to show where the time goes.

Each also checks its result: a whole iteration is exactly its parts (the
same loss and weights as freezing the target, ``sample_targets`` and ``fit``
on a copy of the same trainer), the sampled targets are mean-shifted, and the
Adam steps lower the error on the tuples they fit.

Run with
``pytest benchmarks/test_bench_dqn.py --benchmark-enable --benchmark-group-by=group``.
Without ``--benchmark-enable`` each executes once, with its checks.
"""

import copy
import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from offload.scenario import Scenario  # noqa: E402
from training import dqn  # noqa: E402

N, P, M = 1, 10, 40


@pytest.fixture(scope="module")
def trainer():
    return _trainer("q")


@pytest.fixture(scope="module")
def ceiling_trainer():
    return _trainer("ceiling")


def _trainer(targets):
    rng = np.random.default_rng(0)
    n = 6000
    metric = rng.normal(size=n).astype(np.float32)
    weak = (rng.random(n) < 0.3).astype(np.float32)
    strong = (rng.random(n) < 0.1).astype(np.float32)
    split = np.repeat(np.array([0, 1, 2], np.int8), [3000, 1000, 2000])
    from offload.profile import Profile

    prof = Profile(weak_loss=weak, strong_loss=strong, split=split, metric=metric,
                   metric_mean=0.0, metric_std=1.0)
    sc = Scenario(0.1, 4, "location-reset", 0.1, 0.01, "markov", (1, 3, 0.01, 0.01))
    cfg = dqn.DQNConfig(T=97, interarrival=True, steps=128, batch=128, train_streams=4,
                        train_length=50_000, val_streams=2, val_length=1000, threads=0,
                        device="cpu", targets=targets)
    return dqn.Trainer(dqn.prepare_data(prof), sc, cfg, dqn.profile_fingerprint(prof))


def _whole_is_parts(trainer):
    """``iterate`` on one copy and its three parts on another: the same loss and weights.

    The copies take 8 Adam steps, not 128: the same code, a sixteenth of the time.
    """
    whole, parts = copy.deepcopy(trainer), copy.deepcopy(trainer)
    whole.cfg = parts.cfg = dataclasses.replace(trainer.cfg, steps=8)
    loss = whole.iterate()
    parts.target.load_state_dict(parts.net.state_dict())
    x, t = parts.sample_targets(parts.cfg.steps * parts.cfg.batch)
    assert parts.fit(x, t) == loss
    for a, b in zip(whole.net.state_dict().values(), parts.net.state_dict().values()):
        assert torch.equal(a, b)


def _mse(trainer, x, t):
    with torch.no_grad():
        return float(torch.mean((trainer.net(x) - t) ** 2))


@pytest.mark.benchmark(group="dqn-iteration")
def test_bench_q_iteration(benchmark, trainer):
    """The whole Q-iteration: the number compared with the 1.0-1.3 s anchor."""
    loss = benchmark.pedantic(trainer.iterate, rounds=10, iterations=1, warmup_rounds=2)
    benchmark.extra_info["tuples"] = trainer.cfg.steps * trainer.cfg.batch
    benchmark.extra_info["torch_threads"] = torch.get_num_threads()
    assert np.isfinite(loss)
    _whole_is_parts(trainer)


@pytest.mark.benchmark(group="dqn-iteration")
def test_bench_ceiling_iteration(benchmark, ceiling_trainer):
    """The same iteration with the quick preset's ceiling targets (no target network)."""
    loss = benchmark.pedantic(ceiling_trainer.iterate, rounds=10, iterations=1, warmup_rounds=2)
    assert np.isfinite(loss)
    _whole_is_parts(ceiling_trainer)


@pytest.mark.benchmark(group="dqn-iteration-parts")
def test_bench_sample_and_targets(benchmark, trainer):
    B = trainer.cfg.steps * trainer.cfg.batch
    x, t = benchmark.pedantic(trainer.sample_targets, (B,), rounds=10, iterations=1,
                              warmup_rounds=1)
    assert x.shape == (B, trainer.din) and t.shape == (B, 2 * (M + 1) - N - P)
    assert trainer.cfg.shift == "batch" and abs(float(t.mean())) < 1e-4 * float(t.abs().mean())


@pytest.mark.benchmark(group="dqn-iteration-parts")
def test_bench_adam_steps(benchmark, trainer):
    cfg = trainer.cfg
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(cfg.steps * cfg.batch, trainer.din, generator=gen)
    t = torch.randn(cfg.steps * cfg.batch, trainer.dout, generator=gen)

    before = _mse(trainer, x, t)
    loss = benchmark.pedantic(trainer.fit, (x, t), rounds=10, iterations=1, warmup_rounds=1)
    assert np.isfinite(loss) and _mse(trainer, x, t) < before
