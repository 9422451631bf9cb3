"""From the trained float network to the int8 policy the blob carries.

``int8_policy`` is the step after training: with ``DQNConfig.int8_tune > 0``
(the default) the best network is equalised (``offload.mlp.equalize``), then
tuned for ``int8_tune`` iterations with its weights held on the int8 grid
(``GridMLP``) on the training targets shifted per row (the centred output
layer has a zero mean row, so the row shift is what it can match),
validating every ``validate_every`` and keeping the best on-grid network,
which may be the untuned one rounded. The float reference is then that
on-grid network, and ``offload.mlp.quantize`` keeps its weights exactly: the
int8 policy differs from it only by activation rounding (negligible with
16-bit activations). Without tuning the best network is quantised as it is
(``quantize``). ``DQNConfig.act_bits`` is the device network's activation
width (8 or 16; weights are int8 either way; 0: ``activation_bits`` decides).

Each function takes the finished ``training.dqn.trainer.Trainer`` (its
replay, validation streams, optimiser settings and replay generator).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from offload import mlp, simulate
from offload.stopsignal import StopOnSignal

from .network import adam, float_forward

__all__ = ["GridMLP", "Int8Policy", "int8_policy", "tune_int8", "quantize", "calibration_states"]


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


class Int8Policy(NamedTuple):
    """The policy the blob carries: float reference layers, the int8 network, the tuning record.

    ``tuning`` is ``tune_int8``'s record (``None`` without tuning).
    """

    layers: list
    qmlp: mlp.QuantMLP
    tuning: dict


def int8_policy(trainer, on_progress=None):
    """``Int8Policy`` of ``trainer``'s best network (see the module docstring).

    ``on_progress(i, n, val)`` is called after each tuning iteration (``val``
    NaN between validations).
    """
    layers = trainer.best_layers()
    if not trainer.cfg.int8_tune:
        return Int8Policy(layers, quantize(trainer, layers), None)
    calib = calibration_states(trainer)
    tuned, record = tune_int8(trainer, layers, calib, on_progress)
    q = mlp.quantize(tuned, calib, segments=_segments(trainer.cfg),
                     act_bits=trainer.cfg.activation_bits)
    return Int8Policy(tuned, mlp.correct_bias(q, calib), record)


def calibration_states(trainer, count=None):
    """Raw-slot inputs from the training sequences (``count``, default ``calib_states``),
    drawn with the scenario's ``"calibration"`` seed."""
    rng = np.random.default_rng(trainer.sc.seed_for("calibration"))
    return trainer.replay.raw_states(rng, count or trainer.cfg.calib_states)


def _segments(cfg):
    return (0, cfg.H) if cfg.interarrival else (0,)


def _validate_layers(trainer, layers):
    cfg = trainer.cfg
    return simulate.run_dqn(float_forward(layers, trainer.device), trainer.val, trainer.sc.bucket,
                            H=cfg.H, use_interarrival=cfg.interarrival).mean_reward


def tune_int8(trainer, layers, calib, on_progress=None):
    """Quantisation-aware tuning (module docstring); returns ``(on-grid float layers, record)``.

    ``calib``: raw-slot inputs from the training sequences (``equalize`` uses
    them). The record (validation before and after, iterations, the best
    one, ``stopped_by``) goes into the report. Ctrl+C / SIGTERM stop it early
    with the best on-grid network so far. Draws its tuples from the
    trainer's replay generator.
    """
    cfg, dev = trainer.cfg, trainer.device
    t0 = time.perf_counter()
    net = GridMLP(mlp.equalize(layers, calib)).to(dev)
    raw = torch.ones(trainer.din, device=dev)
    if cfg.interarrival:  # replay inputs hold inter-arrival times / ia_scale
        raw[cfg.H:] = trainer.replay.ia_scale
    best = net.grid_layers()
    best_val = _validate_layers(trainer, best)
    rec = {"iterations": 0, "best_iteration": 0, "val_rounded": best_val,
           "val_before": trainer.best_val, "curve": [], "stopped_by": None}
    opt = adam(net.parameters(), trainer.lr)
    with StopOnSignal() as signalled:
        for it in range(1, cfg.int8_tune + 1):
            s, k = trainer.replay.positions(trainer.rng, cfg.steps * cfg.batch)
            x, xn, R, I = trainer.replay.tuples(s, k)
            tq = trainer.targets(s, k, xn, R, I,
                                 lambda v: net(torch.from_numpy(v).to(dev) * raw), "row")
            trainer.fit(torch.from_numpy(x).to(dev) * raw, tq, net, opt)
            val = float("nan")
            if it % cfg.validate_every == 0 or it == cfg.int8_tune:
                cand = net.grid_layers()
                val = _validate_layers(trainer, cand)
                rec["curve"].append({"iteration": it, "dqn": val})
                if val > best_val:
                    best, best_val, rec["best_iteration"] = cand, val, it
            rec["iterations"] = it
            if on_progress:
                on_progress(it, cfg.int8_tune, val)
            if signalled.is_set():
                rec["stopped_by"] = f"stopped by {signalled.signal}"
                break
    rec.update(val_best=best_val, seconds=time.perf_counter() - t0)
    return best, rec


def quantize(trainer, layers, count=None):
    """Int8 network of ``layers``, calibrated on ``count`` states from the training sequences.

    The layers are first equalised (``offload.mlp.equalize``: the same
    function, hidden ranges evened out for per-layer activation scales),
    then quantised, then each layer's mean int8 error on the calibration
    states is taken out of its bias (``offload.mlp.correct_bias``). The
    returned ``QuantMLP`` carries the equalised float layers.
    """
    calib = calibration_states(trainer, count)
    q = mlp.quantize(mlp.equalize(layers, calib), calib, segments=_segments(trainer.cfg),
                     act_bits=trainer.cfg.activation_bits)
    return mlp.correct_bias(q, calib)
