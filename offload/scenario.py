"""The scenario: a bucket and the sequence generators a policy is run or trained for.

One frozen value (``Scenario``) holds what SPEC sections 1 and 4 let a user
choose: the token bucket ``(rate, depth)``, the image choice (``choice``,
``spread``, ``rprob``), the arrivals (``arrivals``, ``markov``) and the seed.
It is validated once, here, with a ``ValueError`` naming the field; its
defaults are declared once, in ``SETTINGS`` (which the CLI options and the
sweep's grid keys read too); and every random stream a command draws (test
sequences, training sequences, the MDP's arrival sample, ...) takes its seed
from ``seed_for(name)``, so ``offload-sim``, ``offload-train dqn``, the sweep
and the ceiling draw the same streams for the same scenario by construction.

Defaults: ``rprob = 0.01``, the setting of the paper's Figs. 7 and 10 (its
Fig. 6 uses 0.1); ``spread = 0.1``; periodic arrivals; ``markov = (1, 10,
0.1, 0.1)``. Units: ``rate`` real tokens per slot, ``depth`` real tokens;
``markov = (I1, I2, tprob1, tprob2)``: slots, slots, per-slot probabilities.

Torch-free: the simulator, the device and the trainer all import it.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

import numpy as np

from offload import sequences
from offload.bucket import Bucket

__all__ = ["Scenario", "ScenarioError", "SETTINGS", "CHOICES", "ARRIVALS", "SEED_NAMES", "named_seed",
           "TRAINING_ARRIVALS"]

CHOICES = ("iid", "location-reset")
ARRIVALS = ("periodic", "markov")
#: Slots in the MDP's sample of training inter-arrival times (Markov arrivals).
TRAINING_ARRIVALS = 100_000

#: The scenario's settings, flat, as a grid or the CLI names them:
#: ``name: (default, kind, check, help)``. ``sp`` is ``Scenario.spread`` and
#: ``I1, I2, tprob1, tprob2`` are ``Scenario.markov``.
SETTINGS = {
    "rate": (0.1, float, lambda v: 0 < v < 1, "token rate r in (0, 1), tokens per slot"),
    "depth": (4.0, float, lambda v: v >= 1, "bucket depth b >= 1, tokens"),
    "choice": ("location-reset", str, lambda v: v in CHOICES, "iid or location-reset"),
    "sp": (0.1, float, lambda v: 0 <= v <= 1, "location-reset spread in [0, 1]"),
    "rprob": (0.01, float, lambda v: 0 <= v <= 1, "location-reset jump probability in [0, 1]"),
    "arrivals": ("periodic", str, lambda v: v in ARRIVALS, "periodic or markov"),
    "I1": (1, int, lambda v: v >= 1, "slots between images in arrival state 1, >= 1"),
    "I2": (10, int, lambda v: v >= 1, "slots between images in arrival state 2, >= 1"),
    "tprob1": (0.1, float, lambda v: 0 < v <= 1, "per-slot probability of leaving state 1, (0, 1]"),
    "tprob2": (0.1, float, lambda v: 0 < v <= 1, "per-slot probability of leaving state 2, (0, 1]"),
    "seed": (0, int, lambda v: v >= 0, "seed of profile split, sequences and training"),
}
_MARKOV = ("I1", "I2", "tprob1", "tprob2")

#: Every random stream drawn for a scenario, by name, with its stable id (never
#: renumber one: the id is part of the seed). ``named_seed`` derives each seed.
SEED_NAMES = {
    "test": 1,              # test sequences: offload-sim, offload-train's report, the sweep
    "training": 2,          # the DQN's training sequences (replay)
    "validation": 3,        # the DQN's validation sequences
    "mdp-arrivals": 4,      # the MDP's sample of inter-arrival times (offload-sim, trace)
    "ceiling": 5,           # the arrival law of the test images' ceiling
    "training-ceiling": 6,  # the arrival law of the training images' ceiling (targets="ceiling")
    "replay": 7,            # the trainer's sampling of training positions
    "calibration": 8,       # int8 calibration states
    "holdout": 9,           # validation images held out of training (no validation split)
    "profile-split": 10,    # train/validation/test split of `offload-train profile --images`
    "fleet-order": 11,      # the switch's random turn order per slot (offload.fleet)
}
#: Sub-streams of one sequence purpose: its image choice and its arrivals.
_IMAGES, _ARRIVALS = 0, 1


def named_seed(seed, name, *sub):
    """The ``numpy.random.SeedSequence`` of stream ``name`` of scenario seed ``seed``.

    ``SeedSequence(entropy=[seed, id(name), *sub])``: distinct for every name
    (and sub-stream), stable across versions and independent of the order
    in which streams are drawn, so every command that draws stream ``name``
    of a scenario draws the same numbers.
    """
    if name not in SEED_NAMES:
        raise ValueError(f"unknown stream {name!r} (one of {', '.join(SEED_NAMES)})")
    return np.random.SeedSequence([int(seed), SEED_NAMES[name], *map(int, sub)])


class ScenarioError(ValueError):
    """A scenario that cannot run; ``field`` names the field (``"rate"``, ``"markov"``, ...)."""

    def __init__(self, field, message):
        super().__init__(message)
        self.field = field


def _default(name):
    return SETTINGS[name][0]


@dataclass(frozen=True)
class Scenario:
    """A bucket and the generators of SPEC section 4, validated on construction.

    Raises ``ValueError`` naming the field for a bad setting, a bucket that
    ``scale`` refuses or that has more token states than the MDP and the
    oracles support (``policies.MAX_DP_STATES``), or Markov parameters that
    ``sequences.markov_arrivals`` would refuse.
    """

    rate: float = _default("rate")
    depth: float = _default("depth")
    choice: str = _default("choice")
    spread: float = _default("sp")
    rprob: float = _default("rprob")
    arrivals: str = _default("arrivals")
    markov: tuple = tuple(_default(k) for k in _MARKOV)
    seed: int = _default("seed")

    def __post_init__(self):
        object.__setattr__(self, "markov", tuple(self.markov))
        if len(self.markov) != 4:
            raise ScenarioError("markov", f"markov={self.markov!r}: need (I1, I2, tprob1, tprob2)")
        flat = self.settings()
        for key in SETTINGS:
            if key in ("rate", "depth"):
                continue  # the bucket's own check below names them
            if key in _MARKOV and self.arrivals != "markov":
                continue  # unused unless the arrivals are Markov-modulated
            _check(key, flat[key])
        from offload import policies  # native; here so that the module itself stays light

        try:
            b = Bucket.from_rate(self.rate, self.depth)  # its message names rate and depth
        except ValueError as exc:
            raise ScenarioError("bucket", str(exc)) from None
        if b.states > policies.MAX_DP_STATES:
            raise ScenarioError(
                "bucket", f"rate={self.rate}, depth={self.depth}: bucket {b} has {b.states:,} token "
                f"states, above the supported {policies.MAX_DP_STATES:,}; use a smaller depth")
        object.__setattr__(self, "_bucket", b)
        if self.arrivals == "markov":
            try:
                sequences.markov_check(*self.markov)  # its messages name i1, i2, tprob1, tprob2
            except ValueError as exc:
                raise ScenarioError("markov", str(exc)) from None

    @classmethod
    def from_settings(cls, settings):
        """A scenario from flat settings (``SETTINGS`` names; missing ones take their defaults)."""
        s = {k: settings.get(k, d) for k, (d, *_rest) in SETTINGS.items()}
        return cls(s["rate"], s["depth"], s["choice"], s["sp"], s["rprob"], s["arrivals"],
                   tuple(s[k] for k in _MARKOV), s["seed"])

    def settings(self):
        """The flat settings (``SETTINGS`` names) of this scenario."""
        return {"rate": self.rate, "depth": self.depth, "choice": self.choice, "sp": self.spread,
                "rprob": self.rprob, "arrivals": self.arrivals,
                **dict(zip(_MARKOV, self.markov)), "seed": self.seed}

    def replace(self, **changes):
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def bucket(self):
        """The token bucket in scaled tokens (``offload.bucket.Bucket``)."""
        return self._bucket

    def to_dict(self):
        """The scenario as reports and checkpoints record it (bucket included)."""
        b = self.bucket
        return {"rate": self.rate, "depth": self.depth, "N": b.N, "P": b.P, "M": b.M,
                "choice": self.choice, "spread": self.spread, "rprob": self.rprob,
                "arrivals": self.arrivals, "markov": list(self.markov), "seed": self.seed}

    # ------------------------------------------------------------------ seeds

    def seed_for(self, name):
        """Seed of the random stream ``name`` (one of ``SEED_NAMES``) of this scenario."""
        return named_seed(self.seed, name)

    def stream_seeds(self, purpose):
        """``(images, arrivals)`` seeds of the sequences drawn for ``purpose``."""
        return (named_seed(self.seed, purpose, _IMAGES), named_seed(self.seed, purpose, _ARRIVALS))

    # ------------------------------------------------------------------ streams

    def streams(self, metric, reward, weak_loss, *, length, n_seq, raw_metric=None,
                purpose="test", hidden=False):
        """``n_seq`` sequences of ``length`` images of this scenario (``simulate.make_streams``).

        ``purpose`` (``"test"``, ``"training"`` or ``"validation"``) picks the seeds.
        """
        from offload import simulate

        return simulate.make_streams(metric, reward, weak_loss, self, length=length, n_seq=n_seq,
                                     raw_metric=raw_metric, purpose=purpose, hidden=hidden)

    def training_arrivals(self, length=TRAINING_ARRIVALS):
        """The MDP's sample of ``length`` inter-arrival slots (None for periodic arrivals)."""
        if self.arrivals == "periodic":
            return None
        i1, i2, t1, t2 = self.markov
        return sequences.markov_arrivals(length, 1, i1, i2, t1, t2,
                                         self.seed_for("mdp-arrivals"))[0]


def _check(key, value):
    _, kind, ok, why = SETTINGS[key]
    name = {"sp": "spread"}.get(key, key)
    kinds = {float: numbers.Real, int: numbers.Integral}.get(kind, kind)
    field = "markov" if key in _MARKOV else name
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ScenarioError(field, f"{name}={value!r}: {why}")
    try:
        good = ok(value)
    except TypeError:
        good = False
    if not good:
        raise ScenarioError(field, f"{name}={value!r}: {why}")
