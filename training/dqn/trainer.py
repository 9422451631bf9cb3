"""One DQN training run (``Trainer``): data, networks, optimiser, validation, checkpoints.

Each iteration freezes the target network, samples ``steps x batch`` tuples
from the replay, computes their targets (``training.dqn.targets``) in one
batch, shifts them by their mean (per batch or per row, ``DQNConfig.shift``)
and takes ``steps`` Adam steps of MSE on every output. Validation runs the
judged float network in the simulator and keeps the best; the learning-rate
schedule and the convergence rule (``training.dqn.convergence``) act on it. SIGINT / SIGTERM
stop the run cleanly at the next iteration (``offload.stopsignal``).
Quantisation (``training.dqn.int8``) and the test report
(``training.dqn.evaluation``) work on a finished trainer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from offload import policies, simulate
from offload.ring import input_size
from offload.stopsignal import StopOnSignal

from .checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, damaged, identity,
                         load_checkpoint, save_checkpoint)
from .convergence import CONVERGED, plateau_action
from .network import TorchForward, adam, build_network, center_output, export_layers
from .replay import Replay
from .targets import ceiling_targets, q_targets

__all__ = ["Trainer", "Progress", "torch_device"]


def torch_device(name):
    """The torch device of ``DQNConfig.device`` (``auto``: CUDA when present)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available to torch")
    return torch.device(name)


@dataclass
class Progress:
    """What a progress display shows after each iteration."""

    iteration: int
    iterations: int
    loss: float
    lr: float
    val_dqn: float = float("nan")
    val_mdp: float = float("nan")


class Trainer:
    """One DQN training run: data, networks, optimiser, validation, checkpoints.

    Public state a caller reads after ``run``: ``stopped_by``, ``iteration``,
    ``best_iteration``, ``best_val``, ``curve`` (one dict per validation),
    ``val_mdp`` and ``val_base`` (MDP's and Baseline's validation rewards),
    ``train_seconds``, ``data_seconds``, ``iter_seconds``, ``replay``, ``val``
    (validation streams), ``theta_mdp``, ``rng`` (the replay's generator),
    ``lr``, ``din``, ``dout``, ``device``.

    ``run()`` trains until the schedule ends, the time limit passes, validation
    stops improving or has converged (``training.dqn.convergence``) or a signal
    arrives, and returns the best float network (by validation reward) as
    exported layers (raw-slot inputs).
    """

    def __init__(self, data, scenario, config, fingerprint, checkpoint=None):
        """``data`` from ``prepare_data``; ``fingerprint`` from ``profile_fingerprint``
        (checked when resuming); ``checkpoint`` a path written at every validation."""
        self.data, self.sc, self.cfg = data, scenario, config.validate()
        self.checkpoint = checkpoint
        self.device = torch_device(config.device)
        if config.threads:
            torch.set_num_threads(config.threads)
        bucket = scenario.bucket
        self.dout = bucket.q_length
        self.din = input_size(config.H, config.interarrival)
        self.identity = identity(scenario, config, fingerprint)

        seed = config.seed
        t0 = time.perf_counter()
        train = data.streams(scenario, "train", length=config.train_length,
                             n_seq=config.train_streams)
        ia_scale = float(train.interarrival.mean()) if config.interarrival else 1.0
        self.replay = Replay(train, config.H, config.interarrival, ia_scale)
        self.val = data.streams(scenario, "val", length=config.val_length,
                                n_seq=config.val_streams)
        if config.val_reward == "expected":
            self.val = dataclasses.replace(self.val, reward=self.val.raw_metric)
        if config.targets == "ceiling":
            self._init_ceiling(train)
        # MDP and Baseline from the training images, as offload-sim trains them.
        tr_ia = train.interarrival.ravel() if scenario.arrivals != "periodic" else None
        self.theta_mdp = policies.mdp_thresholds(data.metric[data.train], data.reward[data.train],
                                                 bucket, interarrival=tr_ia)
        self.theta_base = policies.baseline_threshold(data.metric[data.train], scenario.rate,
                                                      float(train.interarrival.mean()))
        self.val_mdp = simulate.run_thresholds(self.theta_mdp, self.val, bucket).mean_reward
        self.val_base = simulate.run_thresholds(self.theta_base, self.val, bucket).mean_reward
        self.data_seconds = time.perf_counter() - t0

        gen = torch.Generator().manual_seed(seed)
        net_shape = (self.din, self.dout, config.layers, config.width)
        self.net = build_network(*net_shape, generator=gen).to(self.device)
        self.target = build_network(*net_shape).to(self.device)
        self.opt = adam(self.net.parameters(), config.lr)
        self.rng = np.random.default_rng(scenario.seed_for("replay"))
        self.iteration = 0
        self.lr = config.lr
        self.best_val = -math.inf
        self.best_iteration = 0
        self.best_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        self.since_best = 0
        self.curve = []          # one dict per validation
        self.train_seconds = 0.0
        self.iter_seconds = []   # wall time of each iteration (without validation)
        self.stopped_by = None
        # Exponential average of the weights, per iteration (cfg.ema): what is validated.
        self.ema_state = ({k: v.detach().clone() for k, v in self.net.state_dict().items()}
                          if config.ema else None)

    def _init_ceiling(self, train):
        """The ceiling on the training images and the hidden state of every training position."""
        from offload import ceiling

        sc, cfg, data = self.sc, self.cfg, self.data
        hidden = data.streams(sc, "train", length=cfg.train_length, n_seq=cfg.train_streams,
                              hidden=True)
        if not np.array_equal(hidden.metric, train.metric):  # the generators must repeat
            raise RuntimeError("training sequences with hidden state differ from the others")
        tr = data.train
        ceil = ceiling.ceiling_policy(data.raw_metric[tr], sc, metric=data.metric[tr],
                                      discount=cfg.discount, seed_name="training-ceiling")
        self.ceiling = ceil
        self.ceil_g = ceil.bin_of(hidden.location).astype(np.int16 if ceil.bins < 2**15
                                                          else np.int32)
        self.ceil_s = hidden.arrival_state.astype(np.int8)
        self.ceil_f = hidden.raw_metric
        self.ceil_W = torch.from_numpy(ceil.W.astype(np.float32)).to(self.device)

    # ---------------------------------------------------------------- state

    def state(self):
        """Everything a resumed run needs, as ``torch.save`` takes it (``checkpoint``)."""
        return {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "identity": json.dumps(self.identity, sort_keys=True),
            "config": json.dumps(asdict(self.cfg), sort_keys=True),
            "net": self.net.state_dict(), "opt": self.opt.state_dict(),
            "best_net": self.best_state, "best_val": float(self.best_val),
            "ema_net": self.ema_state,
            "best_iteration": self.best_iteration, "since_best": self.since_best,
            "iteration": self.iteration, "lr": self.lr,
            "rng": json.dumps(self.rng.bit_generator.state),
            "torch_rng": torch.get_rng_state(),
            "curve": json.dumps(self.curve), "train_seconds": self.train_seconds,
            "iter_seconds": torch.tensor(self.iter_seconds, dtype=torch.float64),
        }

    def restore(self, path):
        """Continue from a checkpoint (``CheckpointError`` if unusable)."""
        st = load_checkpoint(path, self.identity)
        try:
            self.net.load_state_dict(st["net"])
            self.opt.load_state_dict(st["opt"])
            self.best_state = {k: v.clone() for k, v in st["best_net"].items()}
            if self.ema_state is not None:
                ema = st.get("ema_net") or st["net"]  # a run started without ema
                self.ema_state = {k: v.clone() for k, v in ema.items()}
            self.target.load_state_dict(self.best_state)  # checks shapes
            self.best_val = float(st["best_val"])
            self.best_iteration = int(st["best_iteration"])
            self.since_best = int(st["since_best"])
            self.iteration = int(st["iteration"])
            self.lr = float(st["lr"])
            self.rng.bit_generator.state = json.loads(st["rng"])
            torch.set_rng_state(st["torch_rng"])
            self.curve = json.loads(st["curve"])
            self.train_seconds = float(st["train_seconds"])
            self.iter_seconds = [float(v) for v in st["iter_seconds"].tolist()]
        except (KeyError, RuntimeError, TypeError, ValueError) as exc:
            raise damaged(path, exc) from None
        self._set_lr(self.lr)

    def save(self):
        """Write the checkpoint (when the run has one)."""
        if self.checkpoint:
            save_checkpoint(self.checkpoint, self.state())

    # ---------------------------------------------------------------- training

    def _set_lr(self, lr):
        self.lr = lr
        for g in self.opt.param_groups:
            g["lr"] = lr

    def iterate(self):
        """One Q-iteration: freeze the target, sample, compute targets, ``steps`` Adam steps.

        Returns the mean training loss.
        """
        self.target.load_state_dict(self.net.state_dict())
        x, tq = self.sample_targets(self.cfg.steps * self.cfg.batch)
        return self.fit(x, tq)

    def sample_targets(self, B):
        """``B`` tuples from the replay and their mean-shifted targets, as tensors on the device."""
        dev = self.device
        s, k = self.replay.positions(self.rng, B)
        x, xn, R, I = self.replay.tuples(s, k)
        tq = self.targets(s, k, xn, R, I, lambda v: self.target(torch.from_numpy(v).to(dev)),
                          self.cfg.shift)
        return torch.from_numpy(x).to(dev), tq

    def targets(self, s, k, xn, R, I, target_q, shift):
        """Mean-shifted targets of the tuples at positions ``(s, k)`` (``Replay.tuples``).

        ``target_q`` maps next inputs ``xn`` (numpy) to the target network's
        Q-vectors (used by Q-learning only); ``shift`` is ``"batch"`` or ``"row"``.
        """
        cfg, sc, dev = self.cfg, self.sc, self.device
        with torch.no_grad():
            if cfg.targets == "ceiling":
                tq = self._ceiling_targets(s, k)
            else:
                tq = q_targets(target_q(xn), torch.from_numpy(R).to(dev),
                               torch.from_numpy(I).to(dev), sc.bucket, cfg.discount)
            if shift == "row":
                tq -= tq.mean(dim=1, keepdim=True)
            else:
                tq -= tq.mean()
        return tq

    def _ceiling_targets(self, s, k):
        """``ceiling_targets`` of training positions ``(s, k)``, at their hidden states."""
        dev = self.device
        W = self.ceil_W[torch.from_numpy(self.ceil_g[s, k]).long().to(dev),
                        torch.from_numpy(self.ceil_s[s, k]).long().to(dev)]
        return ceiling_targets(W, torch.from_numpy(self.ceil_f[s, k]).to(dev),
                               self.sc.bucket, self.cfg.discount)

    def fit(self, x, tq, net=None, opt=None):
        """``steps`` Adam steps of MSE between ``net(x)`` and ``tq`` in consecutive batches.

        ``net`` and ``opt`` default to the trained network and its optimiser.
        Returns the mean loss over the steps.
        """
        cfg = self.cfg
        net = self.net if net is None else net
        opt = self.opt if opt is None else opt
        total = torch.zeros((), device=x.device)
        for j in range(cfg.steps):
            sl = slice(j * cfg.batch, (j + 1) * cfg.batch)
            loss = torch.mean((net(x[sl]) - tq[sl]) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
        return float(total) / cfg.steps

    def forward_fn(self, net=None):
        """The network as a numpy function of raw inputs (slots), for the simulator."""
        scale = None
        if self.cfg.interarrival:
            scale = np.ones(self.din, np.float32)
            scale[self.cfg.H:] = 1.0 / self.replay.ia_scale
        return TorchForward(net or self.net, self.device, self.din, scale)

    def _judged_net(self):
        """The network validation judges: the weight average with ``ema``, else the current one."""
        if self.ema_state is None:
            return self.net
        net = build_network(self.din, self.dout, self.cfg.layers, self.cfg.width).to(self.device)
        net.load_state_dict(self.ema_state)
        return net

    def update_ema(self):
        """One step of the weight average: ``ema <- ema * d + weights * (1 - d)``, ``d = cfg.ema``."""
        d = self.cfg.ema
        with torch.no_grad():
            for k, v in self.net.state_dict().items():
                self.ema_state[k].mul_(d).add_(v.detach(), alpha=1.0 - d)

    def validate(self):
        """Mean reward per image of the judged float network on the validation streams.

        With ``val_reward="expected"`` an offloaded image earns its metric
        ``f(h)``, the expected reward given what the device saw, instead of
        its true reward. The decisions and hence the ranking of checkpoints
        are the same in expectation, without the coin flip of whether each
        offload paid off: two checkpoints differ on a few thousand offloads
        of a validation run, and that coin flip alone moves their difference
        by about as much as checkpoints differ (docs/dqn.md).
        """
        res = simulate.run_dqn(self.forward_fn(self._judged_net()), self.val, self.sc.bucket,
                               H=self.cfg.H, use_interarrival=self.cfg.interarrival)
        return res.mean_reward

    def run(self, on_progress=None):
        """Train; returns the best network's exported float layers.

        ``on_progress(Progress)`` is called after each iteration.
        """
        cfg = self.cfg
        final_from = None  # the published schedule: lr * lr_decay for the last share
        if cfg.lr_final_share:
            final_from = int(round(cfg.iterations * (1 - cfg.lr_final_share)))
        t_start = time.perf_counter() - self.train_seconds
        loss = float("nan")
        with StopOnSignal() as signalled:
            while self.iteration < cfg.iterations:
                if final_from is not None and self.iteration >= final_from:
                    want = cfg.lr * cfg.lr_decay
                    if self.lr != want:
                        self._set_lr(want)
                t0 = time.perf_counter()
                loss = self.iterate()
                if self.ema_state is not None:
                    self.update_ema()
                self.iter_seconds.append(time.perf_counter() - t0)
                self.iteration += 1
                val = float("nan")
                stop = None
                if self.iteration % cfg.validate_every == 0 or self.iteration == cfg.iterations:
                    val, stop = self._validation_step(loss, t_start, final_from)
                self.train_seconds = time.perf_counter() - t_start
                if on_progress:
                    on_progress(Progress(self.iteration, cfg.iterations, loss, self.lr, val,
                                         self.val_mdp))
                if cfg.time_limit and self.train_seconds >= cfg.time_limit and stop is None:
                    stop = f"time limit of {cfg.time_limit:.0f} s reached"
                if signalled.is_set() and stop is None:
                    stop = f"stopped by {signalled.signal}"
                if stop:
                    self.stopped_by = stop
                    break
            else:
                self.stopped_by = "all iterations done"
            if not self.curve:  # stopped before the first validation: judge what there is
                self.best_val = self.validate()
                self.best_iteration = self.iteration
                self.best_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
            self.save()
        return self.best_layers()

    def _validation_step(self, loss, t_start, final_from):
        """Validate, keep the best, decay the learning rate on a plateau, checkpoint.

        Returns ``(validation reward, why training stops or None)``.
        """
        cfg, stop = self.cfg, None
        val = self.validate()
        self.train_seconds = time.perf_counter() - t_start
        self.curve.append({"iteration": self.iteration, "seconds": self.train_seconds,
                           "loss": loss, "lr": self.lr, "dqn": val,
                           "mdp": self.val_mdp, "baseline": self.val_base})
        if val > self.best_val:
            self.best_val, self.best_iteration, self.since_best = val, self.iteration, 0
            judged = self.ema_state if self.ema_state is not None else self.net.state_dict()
            self.best_state = {k: v.detach().clone() for k, v in judged.items()}
        else:
            self.since_best += 1
            if final_from is None and self.since_best >= cfg.patience:
                if not self._can_decay():
                    stop = "validation stopped improving"
                else:
                    self._set_lr(self.lr * cfg.lr_decay)
                    self.since_best = 0
                self.save()
                return val, stop
        if final_from is None:  # the convergence rule (converge_window 0: off)
            action = plateau_action(self.curve, cfg.converge_window, cfg.converge_tol,
                                    cfg.converge_decays)
            if action == "decay" and self._can_decay():
                self._set_lr(self.lr * cfg.lr_decay)
                self.since_best = 0
            elif action:
                stop = CONVERGED
        self.save()
        return val, stop

    def _can_decay(self):
        """Whether one more learning-rate decay stays at or above ``lr_min``."""
        return self.lr * self.cfg.lr_decay >= self.cfg.lr_min * (1 - 1e-9)

    def best_layers(self):
        """The best network so far (by validation reward), exported with raw-slot inputs."""
        net = build_network(self.din, self.dout, self.cfg.layers, self.cfg.width)
        net.load_state_dict({k: v.cpu() for k, v in self.best_state.items()})
        return center_output(export_layers(net, self.cfg.H, self.cfg.interarrival,
                                           self.replay.ia_scale))
