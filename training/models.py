"""The classifier pair: a small weak CNN for the Edge TPU and a stronger one for the server.

Mirrors the paper's setting (a weak model on 64x64 crops vs a strong model on
224x224 images) at Fashion-MNIST scale: the weak model sees the image shrunk
to ``weak_size`` (14x14 by default, area-averaged), the strong model the full
28x28 image.

Both take float images in ``[0, 1]``, NCHW, and return logits. The weak
model uses only layers that become Edge TPU-friendly TFLite ops after int8
quantisation (CONV_2D / DEPTHWISE_CONV_2D with fused ReLU, MAX_POOL_2D,
FULLY_CONNECTED): its last convolution shrinks the feature map to 1x1 so the
flatten needs no TRANSPOSE (which the Edge TPU compiler does not map).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["WeakNet", "StrongNet", "build_weak", "build_strong", "count_params"]


def _conv_bn(cin, cout, k=3, pad=1):
    return [nn.Conv2d(cin, cout, k, padding=pad, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class WeakNet(nn.Module):
    """conv-pool, conv-pool, conv (to 1x1), linear; for an ``size x size`` input.

    Parameters
    ----------
    size : int
        Input height = width in pixels (>= 8).
    n_classes : int
    width : int
        Channels of the first convolution (then 2x, 4x).
    in_channels : int
        1 (greyscale, the committed pair) or 3 (RGB, the example pair).
    """

    def __init__(self, size=14, n_classes=10, width=8, in_channels=1):
        super().__init__()
        if size < 8:
            raise ValueError(f"weak input size must be >= 8, got {size}")
        self.size, self.n_classes, self.width = size, n_classes, width
        s = (size // 2) // 2  # spatial size after two 2x2 max pools
        self.features = nn.Sequential(
            *_conv_bn(in_channels, width), nn.MaxPool2d(2),
            *_conv_bn(width, 2 * width), nn.MaxPool2d(2),
            *_conv_bn(2 * width, 4 * width, k=s, pad=0),
        )
        self.classifier = nn.Linear(4 * width, n_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class StrongNet(nn.Module):
    """A VGG-style CNN for ``size x size`` images, ``in_channels`` 1 or 3 (the edge server's model).

    conv(w)-pool, conv(2w)-pool, conv(4w)-pool, dropout, linear.
    """

    def __init__(self, size=28, n_classes=10, width=32, dropout=0.3, in_channels=1):
        super().__init__()
        self.size, self.n_classes, self.width = size, n_classes, width
        w = width
        s = ((size // 2) // 2) // 2
        self.features = nn.Sequential(
            *_conv_bn(in_channels, w), nn.MaxPool2d(2),
            *_conv_bn(w, 2 * w), nn.MaxPool2d(2),
            *_conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(4 * w * s * s, n_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def build_weak(size=14, n_classes=10, width=8, in_channels=1):
    return WeakNet(size=size, n_classes=n_classes, width=width, in_channels=in_channels)


def build_strong(size=28, n_classes=10, width=32, in_channels=1):
    return StrongNet(size=size, n_classes=n_classes, width=width, in_channels=in_channels)


def count_params(model):
    return int(sum(p.numel() for p in model.parameters()))
