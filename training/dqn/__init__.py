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

The package, one module per concept (each imports only those before it)::

    settings     DQNConfig (each setting declared once, with its help), PRESETS, preset
    convergence  plateau_action (the stopping rule), time_to_quality: pure functions
                 of the validation curve
    split        Data, prepare_data, profile_fingerprint: the profile's images split
    replay       Replay: training sequences and vectorised tuple sampling
    targets      q_targets (and its loop twin), ceiling_targets
    network      QNetwork, export_layers, center_output, float_forward, adam
    checkpoint   CheckpointError, identity, save_checkpoint, load_checkpoint
    trainer      Trainer (training, validation, checkpoints), Progress
    int8         int8_policy, tune_int8 (GridMLP), quantize: the blob's int8 network
    evaluation   evaluate, int8_agreement: the test report
    reporting    report: the JSON report of a run
    plots        plot_curve: the validation curve
    pipeline     train_policy (train -> int8 -> blob -> evaluate -> report), Hooks,
                 policy_blob; offload-train dqn and the sweep both call it
"""

from __future__ import annotations

import importlib

# Torch-free, imported at once: what a command line needs to list its options.
from .convergence import CONVERGED, plateau_action, time_to_quality
from .settings import PRESETS, DQNConfig, preset, resolve_interarrival
from .split import Data, prepare_data, profile_fingerprint

#: Where each torch-bound name lives; imported on first use (PEP 562), so that
#: ``training.dqn.settings`` and the CLI's ``--help`` need no torch.
_LAZY = {
    "Replay": "replay",
    "q_targets": "targets", "q_targets_reference": "targets", "ceiling_targets": "targets",
    "QNetwork": "network", "build_network": "network", "export_layers": "network",
    "center_output": "network", "TorchForward": "network", "float_forward": "network",
    "adam": "network",
    "CheckpointError": "checkpoint", "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "Trainer": "trainer", "Progress": "trainer",
    "GridMLP": "int8", "Int8Policy": "int8", "int8_policy": "int8", "tune_int8": "int8",
    "quantize": "int8", "calibration_states": "int8",
    "evaluate": "evaluation", "int8_agreement": "evaluation",
    "report": "reporting",
    "plot_curve": "plots",
    "Hooks": "pipeline", "TrainedPolicy": "pipeline", "TestInterrupted": "pipeline",
    "train_policy": "pipeline", "policy_blob": "pipeline",
}

__all__ = ["DQNConfig", "PRESETS", "preset", "resolve_interarrival",
           "CONVERGED", "plateau_action", "time_to_quality",
           "Data", "prepare_data", "profile_fingerprint", *_LAZY]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
