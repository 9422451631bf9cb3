"""DQN trainer (SPEC section 6; paper section V-B): learn when to spend a token.

The inputs of the network (a window of standardised metrics and inter-arrival
times) do not depend on the offloading decisions, and the token state is a
deterministic function of them. So the replay buffer is just long training
sequences, a training tuple is a random position ``k`` in one of them, and one
regression target covers every token state ``n`` at once::

    best(n')   = max over feasible a' of Q~(x', n', a')       (a' = 1 needs n' >= P)
    target(n, 0) = g * best(min(M, n + N*I))                  n = N..M
    target(n, 1) = R + g * best(min(M, n - P + N*I))          n = P..M

with ``Q~`` the target network (frozen for one *iteration*), ``R`` the true
reward of image ``k``, ``I`` the slots to the next image, ``g`` the discount.
Each iteration samples ``steps x batch`` tuples, computes their targets in one
batch, shifts them by their mean, and takes ``steps`` Adam steps of MSE on
every output.

The shift (``DQNConfig.shift``). SPEC section 6 shifts the whole batch of
targets by one mean (``shift="batch"``, the default, as the published code
does). ``shift="row"`` instead shifts each tuple's target vector by its own
mean. A decision compares ``Q(n, 1)`` with ``Q(n, 0)`` of the same input,
and the targets' differences within a row depend only on differences within
``Q~(x', .)``, so the row shift keeps everything a decision uses and drops
only the value of the context itself (the network then learns Q-values up
to a constant per input). With Q-learning targets both give about the same
test results on the committed profile; with ceiling targets the batch shift
leaves the value of the hidden location in every target, about 99% of the
loss and none of the decision, and the row shift, which the quick preset
uses, does markedly better (docs/dqn.md).

The targets (``DQNConfig.targets``). ``"q"``, the default, is the Q-learning
above (SPEC section 6). ``"ceiling"`` is not Q-learning: it regresses the
network on the structure-aware ceiling's Q-values (``offload.ceiling``) at
the generator's true hidden state (location, arrival state) of each training
position, ``Q(n, 0) = g W[n]``, ``Q(n, 1) = f + g W[n - P]`` (``f`` the
image's expected reward). The network still sees only the history, so it
learns the ceiling's Q-values as well as the history reveals the hidden
state. It needs sequences from this project's generators (their hidden state
is known only there); docs/dqn.md compares the two.

Units: ``N, P, M`` (the scenario's ``offload.bucket.Bucket``) and ``n`` are scaled tokens; inter-arrival times are slots;
metrics are standardised (training mean and standard deviation).

The network sees inter-arrival times divided by their training mean (the
metrics are already standardised); that scale is folded into the first layer
when the float weights are exported, so the exported network takes raw slots
as SPEC section 6 and the device's history ring give them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import signal
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from offload import mlp, policies, simulate
from offload.profile import TEST, TRAIN, VALIDATION
from offload.ring import input_size
from offload.scenario import Scenario, named_seed

__all__ = [
    "Scenario", "DQNConfig", "PRESETS", "Data", "Replay", "q_targets", "q_targets_reference",
    "ceiling_targets",
    "build_network", "export_layers", "prepare_data", "Trainer", "CheckpointError",
    "profile_fingerprint", "evaluate",
]

CHECKPOINT_FORMAT = "offload-dqn-checkpoint"
CHECKPOINT_VERSION = 1


# --------------------------------------------------------------------------- settings


@dataclass
class DQNConfig:
    """Network, schedule and data sizes. Presets: ``PRESETS['quick']``, ``PRESETS['paper']``.

    ``iterations`` Q-iterations (target network frozen for each), each with
    ``steps`` Adam steps of ``batch`` tuples. The learning rate starts at
    ``lr`` and is multiplied by ``lr_decay`` whenever ``patience``
    validations in a row fail to improve on the best; training stops when it
    would fall below ``lr_min``, after ``iterations``, or after
    ``time_limit`` seconds (0: none), whichever comes first.
    ``lr_final_share`` instead switches to ``lr * lr_decay`` for that last
    share of the iterations (the published schedule). Validation every
    ``validate_every`` iterations on ``val_streams x val_length`` images.
    ``shift`` is ``"batch"`` (SPEC section 6's one mean per batch, the
    default) or ``"row"`` (each tuple's targets less their own mean);
    ``targets`` is ``"q"`` (SPEC section 6's Q-learning, the default) or
    ``"ceiling"`` (regression on the structure-aware ceiling's Q-values); see
    the module docstring. ``val_reward`` is what validation scores a policy
    by: ``"true"`` rewards (as the test does) or ``"expected"`` ones, the
    metric ``f(h)`` of each offloaded image, which leaves out the chance of
    whether each particular offload paid off (see ``Trainer.validate``).
    ``act_bits`` is the device network's activation
    width (8 or 16; weights are int8 either way; 0: ``activation_bits``
    decides), ``int8_tune`` the iterations of quantisation-aware tuning after
    training (0: none; see ``Trainer.int8_policy``), and ``ema`` the decay per
    iteration of the weight average that validation judges and keeps (0:
    the weights themselves).
    """

    T: int = 97
    interarrival: bool = False
    layers: int = 5
    width: int = 64
    discount: float = 0.9999
    shift: str = "batch"
    targets: str = "q"
    val_reward: str = "true"
    act_bits: int = 0
    int8_tune: int = 200
    ema: float = 0.0
    lr: float = 1e-3
    lr_decay: float = 0.3
    lr_min: float = 1e-5
    lr_final_share: float = 0.0
    patience: int = 6
    batch: int = 128
    steps: int = 128
    iterations: int = 4000
    time_limit: float = 0.0
    validate_every: int = 25
    train_streams: int = 16
    train_length: int = 100_000
    val_streams: int = 32
    val_length: int = 20_000
    test_streams: int = 100
    test_length: int = 100_000
    calib_states: int = 20_000
    holdout: float = 0.2
    threads: int = 0
    device: str = "cpu"
    seed: int = 0

    def _widest(self):
        return max(input_size(max(self.H, 1), self.interarrival), self.width)

    @property
    def activation_bits(self):
        """``act_bits``, with 0 (auto) resolved: 16 where every layer allows it, else 8."""
        if self.act_bits:
            return self.act_bits
        return 16 if self._widest() <= mlp.MAX_IN_16 else 8

    @property
    def H(self):
        """Past values of each kind in the input (``T - 1``)."""
        return self.T - 1

    def validate(self):
        """Raise ``ValueError`` naming the first bad setting."""
        checks = [
            ("T", self.T >= 2, "must be >= 2"),
            ("layers", self.layers >= 1, "must be >= 1"),
            ("width", self.width >= 1, "must be >= 1"),
            ("discount", 0 < self.discount < 1, "must be in (0, 1)"),
            ("shift", self.shift in ("batch", "row"), "must be batch or row"),
            ("targets", self.targets in ("q", "ceiling"), "must be q or ceiling"),
            ("val_reward", self.val_reward in ("true", "expected"), "must be true or expected"),
            ("act_bits", self.act_bits in (0, 8, 16), "must be 8, 16 or 0 (auto)"),
            ("act_bits", self.act_bits != 16 or self._widest() <= mlp.MAX_IN_16,
             f"allows at most {mlp.MAX_IN_16} inputs per layer (input "
             f"{input_size(max(self.H, 1), self.interarrival)}, width {self.width}); use 8"),
            ("int8_tune", self.int8_tune >= 0, "must be >= 0 (0: no tuning)"),
            ("ema", 0 <= self.ema < 1, "must be in [0, 1) (0: off)"),
            ("lr", self.lr > 0, "must be > 0"),
            ("lr_decay", 0 < self.lr_decay < 1, "must be in (0, 1)"),
            ("lr_min", 0 < self.lr_min <= self.lr, "must be in (0, lr]"),
            ("lr_final_share", 0 <= self.lr_final_share < 1, "must be in [0, 1)"),
            ("patience", self.patience >= 1, "must be >= 1"),
            ("batch", self.batch >= 1, "must be >= 1"),
            ("steps", self.steps >= 1, "must be >= 1"),
            ("iterations", self.iterations >= 1, "must be >= 1"),
            ("time_limit", self.time_limit >= 0, "must be >= 0 seconds"),
            ("validate_every", self.validate_every >= 1, "must be >= 1"),
            ("train_streams", self.train_streams >= 1, "must be >= 1"),
            ("train_length", self.train_length >= 2, "must be >= 2"),
            ("val_streams", self.val_streams >= 1, "must be >= 1"),
            ("val_length", self.val_length >= 1, "must be >= 1"),
            ("test_streams", self.test_streams >= 1, "must be >= 1"),
            ("test_length", self.test_length >= 1, "must be >= 1"),
            ("calib_states", self.calib_states >= 1, "must be >= 1"),
            ("holdout", 0 < self.holdout < 1, "must be in (0, 1)"),
            ("threads", self.threads >= 0, "must be >= 0 (0: all cores)"),
            ("device", self.device in ("cpu", "cuda", "auto"), "must be cpu, cuda or auto"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} {why}")
        return self


PRESETS = {
    # Within 10 minutes on 2 cores (training stops at 480 s at the latest): ceiling
    # targets shifted per row, a weight average, validation on expected rewards;
    # chosen on the committed profile (docs/dqn.md).
    "quick": dict(targets="ceiling", shift="row", val_reward="expected", ema=0.99,
                  iterations=8000, steps=32, batch=256,
                  lr=1e-3, lr_decay=0.3, lr_min=1e-5, patience=32, validate_every=25,
                  time_limit=480.0,
                  train_streams=16,
                  train_length=100_000, val_streams=32, val_length=20_000, test_streams=20,
                  test_length=100_000),
    # The published schedule: 4,000 iterations of 128 x 128 tuples (~6.55e7),
    # 10^8 training images, lr 1e-3 then 1e-4 for the last tenth.
    "paper": dict(iterations=4000, steps=128, batch=128, lr=1e-3, lr_decay=0.1, lr_min=1e-4,
                  lr_final_share=0.1, patience=10**9, validate_every=50, time_limit=0.0,
                  train_streams=100, train_length=1_000_000, val_streams=32, val_length=100_000,
                  test_streams=100, test_length=100_000),
}


def preset(name, **overrides):
    """A ``DQNConfig`` from a preset, with ``overrides`` (``None`` values ignored)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (one of {', '.join(PRESETS)})")
    values = dict(PRESETS[name])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return DQNConfig(**values).validate()


# --------------------------------------------------------------------------- data


@dataclass
class Data:
    """Standardised metrics, rewards and losses of a profile, split three ways."""

    metric: np.ndarray       # (n,) float32 standardised
    raw_metric: np.ndarray   # (n,) float32 expected reward f(h)
    reward: np.ndarray       # (n,) float32
    weak_loss: np.ndarray    # (n,) float32
    train: np.ndarray        # indices
    val: np.ndarray
    test: np.ndarray
    val_source: str = "validation split"

    def streams(self, scenario, part, *, length, n_seq, hidden=False):
        """``scenario``'s streams over the ``part`` images (``"train"``, ``"val"``, ``"test"``),
        drawn with the scenario's seeds of that purpose."""
        idx = {"train": self.train, "val": self.val, "test": self.test}[part]
        purpose = {"train": "training", "val": "validation", "test": "test"}[part]
        return scenario.streams(self.metric[idx], self.reward[idx], self.weak_loss[idx],
                                raw_metric=self.raw_metric[idx], length=length, n_seq=n_seq,
                                purpose=purpose, hidden=hidden)


def prepare_data(prof, holdout=0.2, seed=0):
    """Split a fitted profile for training: its validation split, or a held-out share of training.

    Test images are kept apart for the final report only. ``seed`` is the
    scenario's seed (its ``"holdout"`` stream draws the held-out share).
    """
    train, val, test = prof.indices(TRAIN), prof.indices(VALIDATION), prof.indices(TEST)
    source = "validation split"
    if len(val) == 0:
        rng = np.random.default_rng(named_seed(seed, "holdout"))
        perm = rng.permutation(train)
        cut = int(round(len(train) * holdout))
        val, train = np.sort(perm[:cut]), np.sort(perm[cut:])
        source = f"{holdout:.0%} of the training split held out (profile has no validation split)"
    if len(train) < 2 or len(val) < 1 or len(test) < 1:
        raise ValueError(f"profile needs training, validation and test images "
                         f"(has {len(train)} train, {len(val)} validation, {len(test)} test)")
    m = prof.standardized_metric().astype(np.float32)
    return Data(m, prof.metric.astype(np.float32), prof.reward.astype(np.float32),
                prof.weak_loss.astype(np.float32), train, val, test, source)


def profile_fingerprint(prof):
    """A short hash of what training reads from a profile (to match checkpoints)."""
    h = hashlib.sha256()
    for a in (prof.metric, prof.reward, prof.split):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


class Replay:
    """Training sequences and vectorised sampling of SPEC section 6 tuples.

    For each sequence, the metrics are stored with ``H - 1`` zeros in front and
    the inter-arrival times (divided by ``ia_scale``) with ``H`` zeros, so the
    ``H + 1`` values that make both ``x`` (position ``k``) and ``x'`` (position
    ``k + 1``) are one contiguous slice of each.
    """

    def __init__(self, streams, H, use_interarrival, ia_scale=1.0):
        S, L = streams.shape
        if L < 2:
            raise ValueError(f"training sequences need >= 2 images, got {L}")
        self.S, self.L, self.H, self.use_ia = S, L, H, use_interarrival
        self.ia_scale = float(ia_scale)
        self.pm = np.concatenate([np.zeros((S, H - 1), np.float32), streams.metric], axis=1)
        self.pm_flat = self.pm.ravel()
        if use_interarrival:
            ia = streams.interarrival.astype(np.float32) / np.float32(self.ia_scale)
            self.pi = np.concatenate([np.zeros((S, H), np.float32), ia], axis=1)
            self.pi_flat = self.pi.ravel()
        self.reward = streams.reward
        self.interarrival = streams.interarrival
        self.din = input_size(H, use_interarrival)
        self._rev = np.arange(H, -1, -1)

    def positions(self, rng, B):
        """``B`` uniform random positions ``(s, k)``, ``k`` in ``0..L-2`` (so ``x'`` exists)."""
        return rng.integers(0, self.S, size=B), rng.integers(0, self.L - 1, size=B)

    def sample(self, rng, B):
        """``B`` tuples at uniform random positions: see ``positions`` and ``tuples``."""
        return self.tuples(*self.positions(rng, B))

    def tuples(self, s, k):
        """Training tuples ``(x, x', R, I)`` at positions ``k`` of sequences ``s``.

        ``x`` (float32 ``(B, din)``) is the input at position ``k``
        (``m[k..k-H+1]``, then ``i[k-1..k-H] / ia_scale``), ``x'`` the one at
        ``k + 1``; ``R = reward[k]``, ``I = interarrival[k]`` (slots).
        """
        s, k = np.asarray(s, np.int64), np.asarray(k, np.int64)
        B, H = len(s), self.H
        # Reversed slices: column 0 is the newest value (m[k+1], i[k]).
        cols = k[:, None] + self._rev[None, :]
        gm = np.take(self.pm_flat, cols + (s * self.pm.shape[1])[:, None])
        x = np.empty((B, self.din), np.float32)
        xn = np.empty((B, self.din), np.float32)
        x[:, :H], xn[:, :H] = gm[:, 1:], gm[:, :H]
        if self.use_ia:
            gi = np.take(self.pi_flat, cols + (s * self.pi.shape[1])[:, None])
            x[:, H:], xn[:, H:] = gi[:, 1:], gi[:, :H]
        return x, xn, self.reward[s, k], self.interarrival[s, k]

    def raw_states(self, rng, count):
        """Inputs ``x`` in the exported network's units (raw slots): int8 calibration."""
        x = self.sample(rng, count)[0]
        if self.use_ia:
            x[:, self.H:] *= np.float32(self.ia_scale)
        return x


# --------------------------------------------------------------------------- targets


def q_targets(q_next, R, I, bucket, discount):
    """Regression targets for every token state at once (torch).

    ``q_next`` (B, bucket.q_length) target-network Q-vectors of ``x'``; ``R`` (B,)
    rewards; ``I`` (B,) slots to the next image. Returns (B, same) targets in
    the bucket's Q-vector layout (SPEC section 2; not yet mean-shifted).
    """
    N, P, M = bucket
    q0, q1 = q_next[:, bucket.q_keep], q_next[:, bucket.q_send]
    best = torch.cat([q0[:, :P - N], torch.maximum(q_next[:, bucket.q_keep_sendable], q1)],
                     dim=1)
    refill = (N * torch.clamp(I, max=M)).to(torch.long)[:, None]
    n = torch.arange(N, M + 1, device=q_next.device)[None, :]
    idx0 = torch.clamp(n + refill, max=M) - N
    idx1 = torch.clamp(n[:, P - N:] - P + refill, max=M) - N
    t0 = discount * best.gather(1, idx0)
    t1 = R.to(q_next.dtype)[:, None] + discount * best.gather(1, idx1)
    return torch.cat([t0, t1], dim=1)


def ceiling_targets(W, f, bucket, discount):
    """Regression targets from the structure-aware ceiling (torch), Q-vector layout.

    ``W`` (B, M+1): the ceiling's value after a decision leaving ``m``
    tokens (``offload.ceiling.Ceiling.W``) at each tuple's hidden state;
    ``f`` (B,) the image's expected reward. ``Q(n, 0) = g W[n]`` for
    ``n = N..M`` and ``Q(n, 1) = f + g W[n - P]`` for ``n = P..M``, so
    ``Q(n, 1) - Q(n, 0) = f - theta[n]``: the ceiling's own decision.
    """
    t0 = discount * W[:, bucket.N:bucket.M + 1]                       # n = N..M
    t1 = f.to(W.dtype)[:, None] + discount * W[:, :bucket.send_states]  # n - P for n = P..M
    return torch.cat([t0, t1], dim=1)


def q_targets_reference(q_next, R, I, bucket, discount):
    """Plain-loop twin of ``q_targets`` (numpy, one tuple and one state at a time)."""
    q_next = np.asarray(q_next, np.float64)
    out = np.zeros_like(q_next)
    N, P, M = bucket

    def best(row, n):
        v = row[bucket.q_index(n, 0)]
        if bucket.can_send(n):
            v = max(v, row[bucket.q_index(n, 1)])
        return v

    for b in range(q_next.shape[0]):
        for n in range(N, M + 1):
            keep = min(M, n + N * int(I[b]))
            out[b, bucket.q_index(n, 0)] = discount * best(q_next[b], keep)
            if bucket.can_send(n):
                out[b, bucket.q_index(n, 1)] = (
                    R[b] + discount * best(q_next[b], min(M, n - P + N * int(I[b]))))
    return out


# --------------------------------------------------------------------------- network


class QNetwork(nn.Module):
    """The DQN of SPEC section 6: ``layers`` hidden LeakyReLU(0.2) layers of ``width``
    units, He-uniform weights, zero biases, a linear output of ``dout`` Q-values."""

    def __init__(self, din, dout, layers=5, width=64, generator=None):
        super().__init__()
        mods, d = [], din
        for _ in range(layers):
            mods += [_he_linear(d, width, generator), nn.LeakyReLU(float(mlp.LEAKY_SLOPE))]
            d = width
        self.body = nn.Sequential(*mods)
        self.out = _he_linear(d, dout, generator)

    def forward(self, x):
        return self.out(self.body(x))


def _he_linear(din, dout, generator=None):
    lin = nn.Linear(din, dout)
    lim = math.sqrt(6.0 / din)
    with torch.no_grad():
        lin.weight.uniform_(-lim, lim, generator=generator)
        lin.bias.zero_()
    return lin


def build_network(din, dout, layers=5, width=64, generator=None):
    """A fresh ``QNetwork`` (SPEC section 6's MLP)."""
    return QNetwork(din, dout, layers, width, generator)


def export_layers(net, H, use_interarrival, ia_scale):
    """Float ``(weight, bias)`` layers of a plain MLP that computes ``net`` on raw inputs.

    The inter-arrival scale is folded into the first layer, so the layers take
    slots as SPEC section 6 and the device's history ring give them.
    """
    lins = [m for m in net.body if isinstance(m, nn.Linear)] + [net.out]
    layers = [(m.weight.detach().cpu().numpy().astype(np.float32).copy(),
               m.bias.detach().cpu().numpy().astype(np.float32).copy()) for m in lins]
    if use_interarrival:
        layers[0][0][:, H:] /= np.float32(ia_scale)
    return layers


class GridMLP(nn.Module):
    """Exported float layers (raw-slot inputs) trained with their weights on the int8 grid.

    The forward pass uses each weight matrix rounded to ``offload.mlp.weight_grid``
    (one scale per row, as ``quantize`` sets them); gradients pass the rounding
    unchanged (straight-through), so the latent weights keep learning while the
    network that is judged is always the on-grid one.
    """

    def __init__(self, layers):
        super().__init__()
        self.w = nn.ParameterList([nn.Parameter(torch.from_numpy(np.array(w, np.float32)))
                                   for w, _ in layers])
        self.b = nn.ParameterList([nn.Parameter(torch.from_numpy(np.array(b, np.float32)))
                                   for _, b in layers])

    @staticmethod
    def _grid(w):
        amax = w.detach().abs().amax(dim=1, keepdim=True)
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        return torch.clamp(torch.round(w.detach() / scale), -127, 127) * scale

    def forward(self, x):
        h = x
        for i, (w, b) in enumerate(zip(self.w, self.b)):
            wq = w + (self._grid(w) - w.detach())   # straight-through rounding
            h = h @ wq.T + b
            if i + 1 < len(self.w):
                h = torch.nn.functional.leaky_relu(h, float(mlp.LEAKY_SLOPE))
        return h

    def grid_layers(self):
        """The on-grid network as float32 numpy ``(weight, bias)`` layers."""
        return [(mlp.weight_grid(w.detach().cpu().numpy()), b.detach().cpu().numpy().copy())
                for w, b in zip(self.w, self.b)]


def center_output(layers):
    """The same decisions with the output's common part removed (for int8).

    Subtracting one value from every Q-output of an input changes no decision
    (each compares ``Q(n, 1)`` with ``Q(n, 0)`` of the same input). Removing
    the mean output row leaves the int8 weights of each row their full
    8 bits for what distinguishes it from the others, instead of spending
    them on the shared state value.
    """
    w, b = layers[-1]
    w = (w.astype(np.float64) - w.astype(np.float64).mean(axis=0, keepdims=True)).astype(np.float32)
    b = (b.astype(np.float64) - b.astype(np.float64).mean()).astype(np.float32)
    return list(layers[:-1]) + [(w, b)]


class TorchForward:
    """``forward(x) -> Q`` over numpy arrays with a torch network (no gradients).

    ``input_scale`` (optional, ``(din,)``) multiplies the raw inputs first: the
    trainer's network sees inter-arrival times divided by their mean.
    """

    def __init__(self, net, device, input_size, input_scale=None):
        self.net, self.device, self.input_size = net, device, input_size
        self.scale = (None if input_scale is None
                      else torch.as_tensor(np.asarray(input_scale, np.float32), device=device))

    def __call__(self, x):
        with torch.no_grad():
            t = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(self.device)
            if self.scale is not None:
                t = t * self.scale
            return self.net(t).cpu().numpy()


# --------------------------------------------------------------------------- checkpoints


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed; the message says why."""


def _identity(scenario, config, fingerprint):
    """What a checkpoint must match to be resumed: bucket, generators, layout, profile."""
    layout = {"T": config.T, "interarrival": config.interarrival, "layers": config.layers,
              "width": config.width, "shift": config.shift}
    # Absent at their defaults, so older checkpoints still resume.
    if config.targets != "q":
        layout["targets"] = config.targets
    if config.val_reward != "true":  # best validation rewards are comparable only alike
        layout["val_reward"] = config.val_reward
    return {
        "bucket": list(scenario.bucket),
        "scenario": json.loads(json.dumps(scenario.to_dict())),
        "layout": layout,
        "profile": fingerprint,
    }


def _describe_mismatch(have, want):
    for key, label in (("bucket", "bucket (N, P, M)"), ("layout", "network layout"),
                       ("profile", "profile"), ("scenario", "scenario")):
        if have.get(key) != want.get(key):
            return f"{label} {have.get(key)} in the checkpoint, {want.get(key)} in this run"
    return None


def _first_line(exc):
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else "no details"


def save_checkpoint(path, state):
    from offload.atomic import atomic_path

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path, identity):
    """Read and check a checkpoint; raise ``CheckpointError`` with one clear message."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no checkpoint to resume from") from None
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"{path}: not a readable DQN checkpoint "
                              f"({type(exc).__name__}: {_first_line(exc)})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an offload DQN checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state.get('version')}, "
                              f"this trainer reads {CHECKPOINT_VERSION}")
    try:
        have = json.loads(state["identity"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: checkpoint lacks its identity record") from None
    why = _describe_mismatch(have, identity)
    if why:
        raise CheckpointError(f"{path}: made for another run: {why}")
    for key in ("net", "opt", "best_net", "iteration", "lr", "rng", "curve"):
        if key not in state:
            raise CheckpointError(f"{path}: checkpoint lacks {key!r}")
    return state


# --------------------------------------------------------------------------- trainer


def _device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available to torch")
    return torch.device(name)


def _adam(params, lr):
    """Adam; the fused kernel (one call per step) where this torch has it."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


@dataclass
class Progress:
    """What a progress display shows after each iteration."""

    iteration: int
    iterations: int
    loss: float
    lr: float
    val_dqn: float = float("nan")
    val_mdp: float = float("nan")


class _StopFlag:
    """SIGINT / SIGTERM set a flag; the loop stops cleanly at the next iteration."""

    def __init__(self):
        self.stop = False
        self.signal = None
        self._old = {}

    def _handler(self, signum, frame):
        self.stop = True
        self.signal = signal.Signals(signum).name

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: no handlers, Ctrl+C raises as usual
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


class Trainer:
    """One DQN training run: data, networks, optimiser, validation, checkpoints.

    ``run()`` trains until the schedule ends, the time limit passes, validation
    stops improving or a signal arrives, and returns the best float network
    (by validation reward) as exported layers (raw-slot inputs).
    """

    def __init__(self, data, scenario, config, fingerprint, checkpoint=None):
        """``data`` from ``prepare_data``; ``fingerprint`` from ``profile_fingerprint``
        (checked when resuming); ``checkpoint`` a path written at every validation."""
        self.data, self.sc, self.cfg = data, scenario, config.validate()
        self.checkpoint = checkpoint
        self.device = _device(config.device)
        if config.threads:
            torch.set_num_threads(config.threads)
        bucket = scenario.bucket
        self.dout = bucket.q_length
        self.din = input_size(config.H, config.interarrival)
        self.identity = _identity(scenario, config, fingerprint)

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
        self.opt = _adam(self.net.parameters(), config.lr)
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
        self.int8_tuning = None  # set by tune_int8
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
            raise CheckpointError(f"{path}: damaged checkpoint ({_first_line(exc)})") from None
        self._set_lr(self.lr)

    def save(self):
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
        tq = self._targets(s, k, xn, R, I, lambda v: self.target(torch.from_numpy(v).to(dev)),
                           self.cfg.shift)
        return torch.from_numpy(x).to(dev), tq

    def _targets(self, s, k, xn, R, I, target_q, shift):
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

    def _update_ema(self):
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
        """Train; returns the best network's exported float layers."""
        cfg = self.cfg
        final_from = None  # the published schedule: lr * lr_decay for the last share
        if cfg.lr_final_share:
            final_from = int(round(cfg.iterations * (1 - cfg.lr_final_share)))
        t_start = time.perf_counter() - self.train_seconds
        loss = float("nan")
        with _StopFlag() as flag:
            while self.iteration < cfg.iterations:
                if final_from is not None and self.iteration >= final_from:
                    want = cfg.lr * cfg.lr_decay
                    if self.lr != want:
                        self._set_lr(want)
                t0 = time.perf_counter()
                loss = self.iterate()
                if self.ema_state is not None:
                    self._update_ema()
                self.iter_seconds.append(time.perf_counter() - t0)
                self.iteration += 1
                val = float("nan")
                stop = None
                if self.iteration % cfg.validate_every == 0 or self.iteration == cfg.iterations:
                    val = self.validate()
                    self.train_seconds = time.perf_counter() - t_start
                    self.curve.append({"iteration": self.iteration, "seconds": self.train_seconds,
                                       "loss": loss, "lr": self.lr, "dqn": val,
                                       "mdp": self.val_mdp, "baseline": self.val_base})
                    if val > self.best_val:
                        self.best_val, self.best_iteration, self.since_best = val, self.iteration, 0
                        judged = (self.ema_state if self.ema_state is not None
                                  else self.net.state_dict())
                        self.best_state = {k: v.detach().clone() for k, v in judged.items()}
                    else:
                        self.since_best += 1
                        if final_from is None and self.since_best >= cfg.patience:
                            if self.lr * cfg.lr_decay < cfg.lr_min * (1 - 1e-9):
                                stop = "validation stopped improving"
                            else:
                                self._set_lr(self.lr * cfg.lr_decay)
                                self.since_best = 0
                    self.save()
                self.train_seconds = time.perf_counter() - t_start
                if on_progress:
                    on_progress(Progress(self.iteration, cfg.iterations, loss, self.lr, val,
                                         self.val_mdp))
                if cfg.time_limit and self.train_seconds >= cfg.time_limit and stop is None:
                    stop = f"time limit of {cfg.time_limit:.0f} s reached"
                if flag.stop and stop is None:
                    stop = f"stopped by {flag.signal}"
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

    def best_layers(self):
        """The best network so far (by validation reward), exported with raw-slot inputs."""
        net = build_network(self.din, self.dout, self.cfg.layers, self.cfg.width)
        net.load_state_dict({k: v.cpu() for k, v in self.best_state.items()})
        return center_output(export_layers(net, self.cfg.H, self.cfg.interarrival,
                                           self.replay.ia_scale))

    def int8_policy(self, on_progress=None):
        """``(float layers, QuantMLP)``: the policy the blob carries, from the best network.

        With ``int8_tune > 0`` (the default) the best network is equalised
        (``offload.mlp.equalize``, the same function), then tuned for
        ``int8_tune`` iterations with its weights held on the int8 grid
        (``GridMLP``) on the training targets shifted per row (the centred
        output layer has a zero mean row, so the row shift is what it can
        match), validating every ``validate_every`` and keeping the best
        on-grid network, which may be the untuned one rounded. The float
        reference is then that on-grid network, and ``quantize`` keeps its
        weights exactly: the int8 policy differs from it only by activation
        rounding (negligible with 16-bit activations). ``on_progress(i, n, val)``
        is called after each tuning iteration. Without tuning, the best
        network is quantised as it is (``quantize``).
        """
        layers = self.best_layers()
        if not self.cfg.int8_tune:
            return layers, self.quantize(layers)
        calib = self._calibration()
        tuned = self.tune_int8(layers, calib, on_progress)
        q = mlp.quantize(tuned, calib, segments=self._segments(),
                         act_bits=self.cfg.activation_bits)
        return tuned, mlp.correct_bias(q, calib)

    def _calibration(self, count=None):
        rng = np.random.default_rng(self.sc.seed_for("calibration"))
        return self.replay.raw_states(rng, count or self.cfg.calib_states)

    def _segments(self):
        return (0, self.cfg.H) if self.cfg.interarrival else (0,)

    def _validate_layers(self, layers):
        return simulate.run_dqn(_float_forward(layers, self.device), self.val, self.sc.bucket,
                                H=self.cfg.H, use_interarrival=self.cfg.interarrival).mean_reward

    def tune_int8(self, layers, calib, on_progress=None):
        """Quantisation-aware tuning (see ``int8_policy``); returns on-grid float layers.

        ``calib``: raw-slot inputs from the training sequences (``equalize`` uses them).

        Records ``self.int8_tuning`` (validation before and after, iterations,
        the best one) for the report. Ctrl+C / SIGTERM stop it early with the
        best on-grid network so far.
        """
        cfg, dev = self.cfg, self.device
        t0 = time.perf_counter()
        net = GridMLP(mlp.equalize(layers, calib)).to(dev)
        raw = torch.ones(self.din, device=dev)
        if cfg.interarrival:  # replay inputs hold inter-arrival times / ia_scale
            raw[cfg.H:] = self.replay.ia_scale
        best = net.grid_layers()
        best_val = self._validate_layers(best)
        rec = {"iterations": 0, "best_iteration": 0, "val_rounded": best_val,
               "val_before": self.best_val, "curve": [], "stopped_by": None}
        opt = _adam(net.parameters(), self.lr)
        with _StopFlag() as flag:
            for it in range(1, cfg.int8_tune + 1):
                s, k = self.replay.positions(self.rng, cfg.steps * cfg.batch)
                x, xn, R, I = self.replay.tuples(s, k)
                tq = self._targets(s, k, xn, R, I,
                                   lambda v: net(torch.from_numpy(v).to(dev) * raw), "row")
                self.fit(torch.from_numpy(x).to(dev) * raw, tq, net, opt)
                val = float("nan")
                if it % cfg.validate_every == 0 or it == cfg.int8_tune:
                    cand = net.grid_layers()
                    val = self._validate_layers(cand)
                    rec["curve"].append({"iteration": it, "dqn": val})
                    if val > best_val:
                        best, best_val, rec["best_iteration"] = cand, val, it
                rec["iterations"] = it
                if on_progress:
                    on_progress(it, cfg.int8_tune, val)
                if flag.stop:
                    rec["stopped_by"] = f"stopped by {flag.signal}"
                    break
        rec.update(val_best=best_val, seconds=time.perf_counter() - t0)
        self.int8_tuning = rec
        return best

    def quantize(self, layers, count=None):
        """Int8 network calibrated on states from the training sequences.

        The layers are first equalised (``offload.mlp.equalize``: the same
        function, hidden ranges evened out for per-layer activation scales),
        then quantised, then each layer's mean int8 error on the calibration
        states is taken out of its bias (``offload.mlp.correct_bias``). The
        returned ``QuantMLP`` carries the equalised float layers.
        """
        calib = self._calibration(count)
        q = mlp.quantize(mlp.equalize(layers, calib), calib, segments=self._segments(),
                         act_bits=self.cfg.activation_bits)
        return mlp.correct_bias(q, calib)


# --------------------------------------------------------------------------- evaluation


def _float_forward(layers, device="cpu"):
    """A fast float forward for exported layers (torch), same maths as ``mlp.forward_float``."""
    din, width, dout = layers[0][0].shape[1], layers[0][0].shape[0], layers[-1][0].shape[0]
    net = build_network(din, dout, len(layers) - 1, width)
    with torch.no_grad():
        lins = [m for m in net.body if isinstance(m, nn.Linear)] + [net.out]
        for lin, (w, b) in zip(lins, layers):
            lin.weight.copy_(torch.from_numpy(w))
            lin.bias.copy_(torch.from_numpy(b))
    return TorchForward(net.to(device), device, din)


def int8_agreement(layers, streams, bucket, int8_result, *, H, use_ia):
    """Share of the int8 policy's decisions (on its own trajectory) the float network agrees with.

    Counts every decision and, separately, those with ``n >= P`` (where the
    network decides at all). ``int8_result`` is the int8 run with
    ``trace=True``: its decisions and token states are compared as they are,
    so only the float network runs here.
    """
    fwd_f = _float_forward(layers)
    S, L = streams.shape
    agree = free = agree_free = 0
    for k0, k1, x in simulate.input_blocks(streams, H, use_ia):
        n = int8_result.tokens[:, k0:k1].reshape(-1).astype(np.int64)
        a_f = mlp.decide_batch(fwd_f(x), n, bucket)
        a_q = int8_result.decisions[:, k0:k1].reshape(-1).astype(bool)
        same = a_f == a_q
        agree += int(same.sum())
        ok = bucket.can_send(n)
        free += int(ok.sum())
        agree_free += int(same[ok].sum())
    return {"all": agree / (S * L), "n_ge_P": agree_free / free if free else float("nan"),
            "decisions": S * L, "decisions_n_ge_P": free}


def evaluate(trainer, layers, qmlp, rate, progress=False, threads=None):
    """Test results (SPEC section 5 and 6) of every policy on the test streams.

    ``threads``: threads of the native int8 forward (default: every core; a
    sweep running several points at once gives each its share).

    Returns ``(rows, extra)``: one dict per policy (average loss, reward per
    image, offload rate, share of each oracle's and of the structure-aware
    ceiling's gain over Baseline) and the int8 agreement figures.
    """
    from offload import ceiling

    cfg, sc, data = trainer.cfg, trainer.sc, trainer.data
    b = sc.bucket
    st = data.streams(sc, "test", length=cfg.test_length, n_seq=cfg.test_streams, hidden=True)
    te = data.test
    ceil = ceiling.ceiling_policy(data.raw_metric[te], sc, metric=data.metric[te])
    dqn_args = dict(H=cfg.H, use_interarrival=cfg.interarrival, progress=progress)
    res = {
        "dqn-float": simulate.run_dqn(_float_forward(layers), st, b, name="dqn-float", **dqn_args),
        "dqn-int8": simulate.run_dqn(qmlp, st, b, trace=True, name="dqn-int8", threads=threads,
                                     **dqn_args),
        "mdp": simulate.run_thresholds(trainer.theta_mdp, st, b, name="mdp"),
        "baseline": simulate.run_thresholds(policies.baseline_threshold(
            data.metric[data.train], rate, st.mean_interarrival), st, b, name="baseline"),
        "lower-bound": simulate.run_lower_bound(data.metric[data.train], st, rate),
        "oracle": simulate.run_oracle(st, b, progress=progress),
        "oracle-metric": simulate.run_oracle(st, b, metric_only=True, progress=progress),
        "ceiling": ceiling.run_ceiling(ceil, st, b),
    }
    agreement = int8_agreement(layers, st, b, res["dqn-int8"], H=cfg.H, use_ia=cfg.interarrival)
    rows = []
    for name, r in res.items():
        row = r.row()
        row["policy"] = name
        for o in ("oracle", "oracle-metric", "ceiling"):
            row[f"share_of_{o}_gain"] = simulate.captured_share(r, res["baseline"], res[o])
        rows.append(row)
    extra = {"int8_agreement": agreement,
             "ceiling": {"bins": ceil.bins, "sweeps": ceil.sweeps, "converged": ceil.converged},
             "int8_minus_float_avg_loss": res["dqn-int8"].avg_loss - res["dqn-float"].avg_loss,
             "test": {"streams": cfg.test_streams, "length": cfg.test_length, "seed": sc.seed,
                      "mean_interarrival": st.mean_interarrival}}
    return rows, extra


# --------------------------------------------------------------------------- outputs


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


def _clean(v):
    """JSON-safe values (NaN -> None, numpy scalars -> Python)."""
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, (np.floating, float)):
        return None if not math.isfinite(float(v)) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def report(trainer, prof, profile_path, preset_name, rows, extra, out, png, checkpoint, seconds):
    """Everything a reader needs to judge a run: settings, training, validation, test."""
    its = np.asarray(trainer.iter_seconds) if trainer.iter_seconds else np.zeros(1)
    return _clean({
        "command": "offload-train dqn",
        "preset": preset_name,
        "profile": {"path": profile_path, "source": prof.source,
                    "fingerprint": profile_fingerprint(prof),
                    "images": {"train": int(len(trainer.data.train)),
                               "validation": int(len(trainer.data.val)),
                               "test": int(len(trainer.data.test))},
                    "validation_from": trainer.data.val_source},
        "scenario": trainer.sc.to_dict(),
        "config": asdict(trainer.cfg),
        "interarrival_scale_slots": trainer.replay.ia_scale,
        "torch": {"version": torch.__version__, "device": str(trainer.device),
                  "threads": torch.get_num_threads()},
        "training": {
            "stopped_by": trainer.stopped_by, "iterations": trainer.iteration,
            "seconds": trainer.train_seconds, "data_seconds": trainer.data_seconds,
            "seconds_per_iteration": {"mean": float(its.mean()), "median": float(np.median(its))},
            "tuples": trainer.iteration * trainer.cfg.steps * trainer.cfg.batch,
            "best_iteration": trainer.best_iteration,
            "best_validation_reward": trainer.best_val,
            "validation_rewards": trainer.cfg.val_reward,  # "true" or "expected" (metric)
            "validation_mdp_reward": trainer.val_mdp,
            "validation_baseline_reward": trainer.val_base,
            "curve": trainer.curve,
        },
        # Quantisation-aware tuning (Trainer.int8_policy); None when it did not run.
        "int8_tuning": trainer.int8_tuning,
        "test": rows,
        # No test report (extra None) when training was interrupted.
        "int8": {k: v for k, v in extra.items() if k != "ceiling"} if extra else None,
        "ceiling": extra.get("ceiling") if extra else None,
        "files": {"policy": out, "curve_png": png, "checkpoint": checkpoint},
        "total_seconds": seconds,
    })


def plot_curve(trainer, path, title="DQN validation"):
    """PNG: validation reward per image of DQN against MDP and Baseline over training time."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from offload.atomic import atomic_path

    curve = trainer.curve
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if curve:
        t = [c["seconds"] for c in curve]
        ax.plot(t, [c["dqn"] for c in curve], "-o", ms=2.5, lw=1.2, label="DQN (float)")
        best = [c for c in curve if c["iteration"] == trainer.best_iteration]
        if best:
            ax.plot([best[0]["seconds"]], [best[0]["dqn"]], "*", ms=12, color="C3",
                    label=f"best (iteration {trainer.best_iteration})")
        lo, hi = 0, max(t[-1], 1e-9)
    else:
        lo, hi = 0, 1
    ax.hlines(trainer.val_mdp, lo, hi, colors="C1", linestyles="--", label="MDP")
    ax.hlines(trainer.val_base, lo, hi, colors="C2", linestyles=":", label="Baseline")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("validation reward per image"
                  + (" (expected)" if trainer.cfg.val_reward == "expected" else ""))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
