"""Training and evaluation loops for the classifier pair (torch, CPU)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from offload.classifier import prepare_image

__all__ = ["images_to_tensor", "train_classifier", "predict_logits", "accuracy", "set_threads"]


def set_threads(n):
    """Limit torch's CPU threads (the training machines are small and shared)."""
    if n:
        torch.set_num_threads(int(n))
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set once in this process
            pass


def images_to_tensor(images, size):
    """uint8 images ``(n, H, W)`` -> float tensor ``(n, 1, size, size)`` in [0, 1].

    Uses the device's own resize (:func:`offload.classifier.prepare_image`), so
    the weak model trains on exactly the pixels it will see on the device.
    """
    images = np.asarray(images)
    if images.shape[1:] == (size, size):
        x = images.astype(np.float32) / 255.0
    else:
        x = np.stack([prepare_image(im, size, size, 1)[:, :, 0] for im in images])
    return torch.from_numpy(np.ascontiguousarray(x[:, None]))


def _augment(xb, gen):
    """Random horizontal flips and +-2 pixel shifts (zero fill)."""
    n, _, h, w = xb.shape
    flip = torch.rand(n, generator=gen) < 0.5
    xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
    pad = nn.functional.pad(xb, (2, 2, 2, 2))
    dy, dx = torch.randint(0, 5, (2,), generator=gen).tolist()
    return pad[:, :, dy:dy + h, dx:dx + w]


def train_classifier(model, x, y, *, epochs, batch_size=128, lr=2e-3, weight_decay=1e-4,
                     augment=False, seed=0, desc="train", progress=True):
    """Adam with a one-cycle learning rate, cross-entropy loss; returns per-epoch mean losses."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    y = torch.as_tensor(np.asarray(y), dtype=torch.long)
    n = len(y)
    steps = max(1, (n + batch_size - 1) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps)
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        total, seen = 0.0, 0
        bar = tqdm(range(steps), desc=f"{desc} epoch {ep + 1}/{epochs}", unit="batch",
                   disable=not progress, leave=True)
        for b in bar:
            idx = perm[b * batch_size:(b + 1) * batch_size]
            xb, yb = x[idx], y[idx]
            if augment:
                xb = _augment(xb, gen)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        losses.append(total / max(seen, 1))
    model.eval()
    return losses


@torch.no_grad()
def predict_logits(model, x, batch_size=1024, desc="eval", progress=True):
    """Float logits ``(n, n_classes)`` as a numpy array."""
    model.eval()
    out = []
    for b in tqdm(range(0, len(x), batch_size), desc=desc, unit="batch", disable=not progress):
        out.append(model(x[b:b + batch_size]).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def accuracy(logits, labels):
    """Top-1 accuracy (first index on ties)."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    return float(np.mean(np.argmax(logits, axis=1) == labels)) if len(labels) else float("nan")
