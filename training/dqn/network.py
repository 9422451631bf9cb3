"""The DQN itself (SPEC section 6's MLP) and its export to plain float layers.

``export_layers`` folds the inter-arrival scale into the first layer, so the
exported network takes raw slots as the device's history ring gives them;
``float_forward`` runs exported layers fast in torch (the simulator's float
DQN); ``adam`` is the optimiser the trainer and the int8 tuning both use.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from offload import mlp

__all__ = ["QNetwork", "build_network", "export_layers", "center_output", "TorchForward",
           "float_forward", "adam"]


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


def float_forward(layers, device="cpu"):
    """A fast float forward for exported layers (torch), same maths as ``mlp.forward_float``."""
    din, width, dout = layers[0][0].shape[1], layers[0][0].shape[0], layers[-1][0].shape[0]
    net = build_network(din, dout, len(layers) - 1, width)
    with torch.no_grad():
        lins = [m for m in net.body if isinstance(m, nn.Linear)] + [net.out]
        for lin, (w, b) in zip(lins, layers):
            lin.weight.copy_(torch.from_numpy(w))
            lin.bias.copy_(torch.from_numpy(b))
    return TorchForward(net.to(device), device, din)


def adam(params, lr):
    """Adam; the fused kernel (one call per step) where this torch has it."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)
