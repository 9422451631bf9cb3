"""One training run from data to report: train -> int8 -> blob -> evaluate -> report.

``train_policy`` is the whole sequence, the one ``offload-train dqn`` and
every sweep point (``training.sweep.run_point``) call. What each caller shows
while it runs comes through a ``Hooks`` object (the command's progress bars
and messages; a sweep shows nothing). A run stopped by SIGINT / SIGTERM keeps
the best policy so far and skips the test (``TrainedPolicy.interrupted``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .evaluation import evaluate
from .int8 import Int8Policy, int8_policy, quantize
from .reporting import report
from .split import profile_fingerprint
from .trainer import Trainer

__all__ = ["Hooks", "TrainedPolicy", "TestInterrupted", "train_policy", "policy_blob"]


class Hooks:
    """What a caller sees of a run as it goes; each method here does nothing.

    Override the ones to show: ``started`` (the trainer is ready, its MDP and
    Baseline validation rewards known; ``resumed``: from a checkpoint),
    ``iteration`` (a ``training.dqn.trainer.Progress`` after each training
    iteration), ``trained`` (training ended), ``tuning`` (``i, n, val`` after
    each int8 tuning iteration), ``tuned`` (the tuning record), ``testing``
    (the test report starts).
    """

    def started(self, trainer, resumed):
        """The trainer is built (and restored when ``resumed``)."""

    def iteration(self, progress):
        """One training iteration is done."""

    def trained(self, trainer):
        """Training has ended (``trainer.stopped_by`` says why)."""

    def tuning(self, i, n, val):
        """Int8 tuning iteration ``i`` of ``n`` is done (``val`` NaN between validations)."""

    def tuned(self, record):
        """Int8 tuning has ended (``int8.tune_int8``'s record)."""

    def testing(self):
        """The test report starts."""


class TestInterrupted(KeyboardInterrupt):
    """Ctrl+C during the test report: the blob is written, the report is not."""


@dataclass
class TrainedPolicy:
    """What ``train_policy`` returns.

    ``trainer``: the finished ``Trainer`` (curve, validation rewards);
    ``int8``: the ``Int8Policy`` (float reference layers, int8 network,
    tuning record); ``policy``: the ``offload.blob.Policy``; ``rows, extra``:
    the test report (``None`` when interrupted); ``report``: the JSON report
    (``training.dqn.report``); ``interrupted``: a signal stopped training or
    tuning (no test then).
    """

    trainer: Trainer
    int8: Int8Policy
    policy: object
    rows: list
    extra: dict
    report: dict
    interrupted: bool


def policy_blob(prof, scenario, config, qmlp, meta):
    """The trained policy as a ``blob.Policy`` with the profile's metric pipeline.

    A profile imported with metrics only (no entropy -> metric table) cannot
    give the device its metric; the blob then carries a flat placeholder
    table and says so in ``meta['device_ready'] = False`` (it still runs in
    the simulator, which works on metrics).
    """
    from offload import blob

    meta = dict(meta)
    if prof.lut_x is not None:
        lut_x, lut_y, ready = prof.lut_x, prof.lut_y, True
    else:
        lut_x = np.array([0.0, 1.0], np.float32)
        lut_y = np.full(2, prof.metric_mean, np.float32)
        ready = False
    meta["device_ready"] = ready
    return blob.Policy("dqn", *scenario.bucket, float(prof.metric_mean),
                       float(prof.metric_std), lut_x, lut_y,
                       tinv=float(prof.tinv if prof.tinv is not None else 1.0), T=config.T,
                       interarrival=config.interarrival, qmlp=qmlp, meta=meta)


def _train(data, scenario, config, prof, fingerprint, checkpoint, resume, hooks):
    trainer = Trainer(data, scenario, config, fingerprint or profile_fingerprint(prof),
                      checkpoint=checkpoint)
    if resume:
        trainer.restore(checkpoint)
    hooks.started(trainer, resume)
    trainer.run(hooks.iteration)
    hooks.trained(trainer)
    return trainer


def _int8(trainer, interrupted, hooks):
    """The int8 policy; ``(Int8Policy, interrupted)`` (a signal during tuning interrupts)."""
    if interrupted or not trainer.cfg.int8_tune:
        # Stopped by a signal: keep the best policy now, without tuning.
        layers = trainer.best_layers()
        return Int8Policy(layers, quantize(trainer, layers), None), interrupted
    policy = int8_policy(trainer, hooks.tuning)
    hooks.tuned(policy.tuning)
    return policy, bool(policy.tuning["stopped_by"])


def train_policy(data, scenario, config, prof, *, meta, test_scenario=None, fingerprint=None,
                 checkpoint=None, resume=False, blob_path=None, provenance=None, threads=None,
                 progress=False, hooks=None):
    """Train, quantise, write the blob, test and report one DQN policy; a ``TrainedPolicy``.

    ``data``: ``prepare_data``'s split of ``prof``; ``scenario``: the one to
    train on; ``config``: a ``DQNConfig``. ``meta``: the blob's provenance
    (its ``iterations`` and ``best_iteration`` are added). ``test_scenario``:
    the one to test on and to record (default: ``scenario``).
    ``fingerprint``: ``profile_fingerprint(prof)`` when the caller has it.
    ``checkpoint``: a path written at every validation; ``resume``: continue
    from it first. ``blob_path``: where to write the blob before the test
    (so an interrupted test keeps it). ``provenance``: the report's
    ``profile_path``, ``preset`` and ``files``. ``threads``, ``progress``:
    the test's native threads and progress bars. ``hooks``: a ``Hooks``.

    Raises ``ValueError`` for a bad scenario or an unusable checkpoint
    (``CheckpointError``), ``TestInterrupted`` on Ctrl+C during the test.
    """
    from offload import blob

    hooks = hooks or Hooks()
    test_scenario = test_scenario or scenario
    t0 = time.time()
    trainer = _train(data, scenario, config, prof, fingerprint, checkpoint, resume, hooks)
    int8, interrupted = _int8(trainer, trainer.stopped_by.startswith("stopped by"), hooks)
    if interrupted and int8.tuning and int8.tuning["stopped_by"]:
        trainer.stopped_by = int8.tuning["stopped_by"]
    meta = {**meta, "iterations": trainer.iteration, "best_iteration": trainer.best_iteration}
    policy = policy_blob(prof, test_scenario, config, int8.qmlp, meta)
    if blob_path:
        blob.write_blob(blob_path, policy)
    rows = extra = None
    if not interrupted:
        hooks.testing()
        try:
            rows, extra = evaluate(trainer, int8.layers, int8.qmlp, scenario=test_scenario,
                                   progress=progress, threads=threads)
        except KeyboardInterrupt:
            raise TestInterrupted from None
    rec = report(trainer, prof, rows, extra, scenario=test_scenario, int8_tuning=int8.tuning,
                 seconds=time.time() - t0, **(provenance or {}))
    return TrainedPolicy(trainer, int8, policy, rows, extra, rec, interrupted)
