"""Training checkpoints: what one holds, what it must match to be resumed, and its errors.

A checkpoint is a ``torch.save`` dict (``Trainer.state``) with a format
name, a version and an *identity* (``identity``: bucket, scenario, network
layout, profile fingerprint); ``load_checkpoint`` refuses one made for
another run with one message saying what differs (``CheckpointError``).
"""

from __future__ import annotations

import json

import torch

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "CheckpointError", "identity",
           "save_checkpoint", "load_checkpoint", "damaged"]

CHECKPOINT_FORMAT = "offload-dqn-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed; the message says why."""


def identity(scenario, config, fingerprint):
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


def damaged(path, exc):
    """The ``CheckpointError`` of a checkpoint that loaded but could not be restored."""
    return CheckpointError(f"{path}: damaged checkpoint ({_first_line(exc)})")


def save_checkpoint(path, state):
    """Write ``state`` (``Trainer.state``) to ``path`` atomically."""
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
