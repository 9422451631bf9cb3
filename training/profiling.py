"""Profile the classifier pair the way the system runs them, and fit the offloading metric.

- The weak classifier runs as on the device: the int8 ``.tflite`` through
  LiteRT (:class:`offload.classifier.WeakClassifier`), one uint8 image at a
  time, int8 logits dequantised with the output tensor's scale/zero point.
- The strong classifier runs as on the edge server: the TorchScript file
  (the committed pair), or for any pair (:func:`run_pair_on_files`) the ONNX
  model through the server's own :class:`offload.server.model.StrongModel`.
- Ranks of the true class, the split and the weak logits go into an
  :class:`offload.profile.Profile`; its ``fit_metric`` calibrates, computes
  entropies and fits the metric map on the training split (SPEC section 3).

Also the paper's section II breakdown (both right / both wrong / only the
strong one right / only the weak one right) and its Fig. 3 (reward vs entropy
with the fitted metric curve).
"""

from __future__ import annotations

import os

import numpy as np
from tqdm import tqdm

from offload.atomic import atomic_write_json, atomic_write_text
from offload.profile import TEST, TRAIN, VALIDATION, Profile

__all__ = [
    "rank_of_true",
    "run_weak",
    "run_strong",
    "build_profile",
    "run_pair_on_files",
    "stratified_split",
    "breakdown",
    "format_breakdown",
    "plot_fig3",
    "SPLIT_NAMES",
    "write_breakdown",
]

SPLIT_NAMES = {TRAIN: "train", VALIDATION: "validation", TEST: "test"}


def rank_of_true(logits, labels):
    """Rank (1 = best) of the true class in each row of ``logits``.

    Ties are broken by class index, as a stable descending sort (and
    ``argmax``) does: rank 1 exactly when ``argmax(logits) == label``. With
    int8 outputs ties are common, so this matters.
    """
    z = np.asarray(logits)
    y = np.asarray(labels, dtype=np.int64)
    zy = z[np.arange(len(y)), y][:, None]
    cls = np.arange(z.shape[1])[None, :]
    ahead = (z > zy) | ((z == zy) & (cls < y[:, None]))
    return (1 + ahead.sum(axis=1)).astype(np.int64)


def run_weak(classifier, images, progress=True):
    """Weak classifier over uint8 images: ``(int8 logits, dequantised float32 logits)``."""
    return classifier.classify_many(images, progress=progress)


def run_strong(module, images, size, batch_size=512, progress=True):
    """Strong TorchScript classifier over uint8 images: float32 logits ``(n, n_classes)``."""
    import torch

    from training.train import images_to_tensor

    out = []
    with torch.no_grad():
        for b in tqdm(range(0, len(images), batch_size), desc="strong (TorchScript)",
                      unit="batch", disable=not progress):
            x = images_to_tensor(images[b:b + batch_size], size)
            out.append(module(x).numpy().astype(np.float32))
    return np.concatenate(out)


def run_pair_on_files(weak, strong, paths, *, batch_size=64, run_batch=None, progress=True):
    """Both models over image files, each image decoded once as the device's camera gives it.

    ``weak`` is an :class:`offload.classifier.WeakClassifier` (one image at a
    time, as on the device); ``strong`` an :class:`offload.server.model.StrongModel`
    (``prepare`` then ``run`` in batches of ``batch_size``, as the server's
    batcher does). Both apply their own model card, so the pixels profiled are
    the pixels the deployed system feeds. ``run_batch`` (a list of
    ``strong.prepare`` results -> ``(n, n_classes)`` scores) replaces
    ``strong.run`` (a remote server: ``training.remote_strong``).

    Returns
    -------
    (weak logits float32 (m, n_classes), strong logits float32 (m, n_classes),
     kept int64 (m,) indices into ``paths``, skipped list of ``(path, reason)``)
        Unreadable images (or ones a model cannot prepare) are skipped, not fatal.
    """
    from offload.classifier import ClassifierError
    from offload.server.model import ModelError
    from training.data import DataError, read_image_file

    zw, zs, kept, skipped, batch = [], [], [], [], []
    run_batch = run_batch or (lambda xs: strong.run(np.stack(xs))[0])

    def flush():
        if batch:
            zs.append(np.asarray(run_batch(batch), dtype=np.float32))
            batch.clear()

    for i, path in enumerate(tqdm(paths, desc="weak + strong", unit="img", mininterval=0.5,
                                  disable=not progress)):
        try:
            image = read_image_file(path)
            x = strong.prepare(image)
            w = weak.classify(image).logits
        except (DataError, ClassifierError, ModelError) as exc:
            skipped.append((path, str(exc)))
            continue
        zw.append(w)
        batch.append(x)
        kept.append(i)
        if len(batch) >= batch_size:
            flush()
    flush()
    n = weak.n_classes
    return (np.asarray(zw, dtype=np.float32).reshape(-1, n),
            (np.concatenate(zs) if zs else np.zeros((0, n), np.float32)),
            np.asarray(kept, dtype=np.int64), skipped)


def stratified_split(labels, *, val_fraction, test_fraction, seed):
    """Split codes (0 train, 1 validation, 2 test) drawn per class from ``seed``.

    Within each class a seeded permutation gives ``round(test_fraction * n)``
    images to test and ``round(val_fraction * n)`` to validation, the rest to
    train (the metric is fitted on train). ``seed`` is a
    ``numpy.random.SeedSequence`` or an int.

    Raises
    ------
    ValueError
        Fractions out of range, or no image left for train or test.
    """
    if not (0 <= val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"validation fraction {val_fraction} and test fraction {test_fraction} "
                         "must be in [0, 1) and (0, 1) and leave some images for train")
    y = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    codes = np.full(len(y), TRAIN, dtype=np.int8)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test, n_val = int(round(test_fraction * len(idx))), int(round(val_fraction * len(idx)))
        codes[idx[:n_test]] = TEST
        codes[idx[n_test:n_test + n_val]] = VALIDATION
    counts = {name: int(np.sum(codes == code)) for code, name in SPLIT_NAMES.items()}
    if counts["train"] == 0 or counts["test"] == 0:
        raise ValueError(f"too few images to split ({len(y)}: {counts})")
    return codes


def build_profile(weak_logits, strong_logits, labels, split, k=1, source=""):
    """A fitted :class:`Profile` from both classifiers' logits (metric fit on ``split == 0``)."""
    prof = Profile.from_ranks(
        rank_of_true(weak_logits, labels), rank_of_true(strong_logits, labels), split, k=k,
        weak_logits=weak_logits, labels=labels, source=source,
    )
    return prof.fit_metric()


def breakdown(profile):
    """Section II shares, overall and per split.

    Returns ``{"all"|"train"|"validation"|"test": {"n", "both_right" (a),
    "both_wrong" (b), "only_strong_right" (c), "only_weak_right",
    "weak_accuracy", "strong_accuracy"}}`` with shares in [0, 1] ("right" =
    top-k loss 0).
    """
    wl, sl = profile.weak_loss, profile.strong_loss
    parts = {"all": np.ones(profile.n, dtype=bool)}
    for code, name in SPLIT_NAMES.items():
        parts[name] = profile.split == code
    out = {}
    for name, m in parts.items():
        n = int(m.sum())
        if n == 0:
            continue
        w_ok, s_ok = wl[m] == 0, sl[m] == 0
        out[name] = dict(
            n=n,
            both_right=float(np.mean(w_ok & s_ok)),
            both_wrong=float(np.mean(~w_ok & ~s_ok)),
            only_strong_right=float(np.mean(~w_ok & s_ok)),
            only_weak_right=float(np.mean(w_ok & ~s_ok)),
            weak_accuracy=float(np.mean(w_ok)),
            strong_accuracy=float(np.mean(s_ok)),
        )
    return out


def format_breakdown(table, k=1):
    """A plain-text table of :func:`breakdown` (percentages)."""
    head = (f"{'split':<11}{'images':>8}  {'(a) both':>9}{'(b) none':>9}{'(c) strong':>11}"
            f"{'weak only':>10}  {'weak acc':>9}{'strong acc':>11}")
    lines = [f"top-{k} correctness of the weak/strong pair (paper section II)", head]
    for name, r in table.items():
        lines.append(
            f"{name:<11}{r['n']:>8}  {100 * r['both_right']:>8.2f}%{100 * r['both_wrong']:>8.2f}%"
            f"{100 * r['only_strong_right']:>10.2f}%{100 * r['only_weak_right']:>9.2f}%  "
            f"{100 * r['weak_accuracy']:>8.2f}%{100 * r['strong_accuracy']:>10.2f}%"
        )
    return "\n".join(lines)


def binned_means(entropy, reward, n_bins=25):
    """Mean reward in equal-count entropy bins: ``(bin centre, mean reward, count)``."""
    h = np.asarray(entropy, dtype=np.float64)
    r = np.asarray(reward, dtype=np.float64)
    order = np.argsort(h, kind="stable")
    chunks = np.array_split(order, min(n_bins, max(1, len(h))))
    centres = np.array([h[c].mean() for c in chunks if len(c)])
    means = np.array([r[c].mean() for c in chunks if len(c)])
    counts = np.array([len(c) for c in chunks if len(c)])
    return centres, means, counts


def plot_fig3(profile, path, title=None, seed=0):
    """The paper's Fig. 3 for ``profile``'s training split, as a PNG (atomic write).

    Purple dots: reward of each training image (jittered vertically so the
    three levels -1/0/1 show density) against the calibrated entropy of the
    weak output; black: mean reward in equal-count entropy bins; red: the
    fitted metric map ``f(h)``.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from offload.atomic import atomic_path

    train = profile.split == TRAIN
    h, r = profile.entropy[train], profile.reward[train]
    rng = np.random.default_rng(seed)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ax.scatter(h, r + rng.uniform(-0.06, 0.06, size=len(r)), s=4, alpha=0.25, color="#7b3fa0",
               linewidths=0, label="reward (training images, jittered)")
    cx, cy, _ = binned_means(h, r)
    ax.plot(cx, cy, "o", color="black", ms=3.5, label="binned mean reward")
    ax.plot(profile.lut_x, profile.lut_y, "-", color="red", lw=2, label="metric f(h)")
    ax.set_xlabel("entropy h(x) of the calibrated weak output (nats)")
    ax.set_ylabel("metric m(x) / reward R(x, y)")
    ax.set_ylim(-1.2, 1.2)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_title(title or f"Entropy to offloading metric (top-{profile.k}, tinv={profile.tinv:.3f})",
                 fontsize=10)
    ax.legend(loc="upper left", fontsize=8, markerscale=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_breakdown(prof, out_path, fig_path, *, k, source, on_edgetpu, extra=None,
                    echo=print):
    """Print the section II breakdown; write it (JSON, text) beside the profile, and Fig. 3.

    ``extra``: more entries for the JSON summary (the any-pair profile's skipped images, ...);
    ``echo``: where the printed lines go (the commands pass ``click.echo``).
    """
    table = breakdown(prof)
    text = format_breakdown(table, k)
    echo(text)
    summary = dict(
        profile=os.path.basename(out_path), k=k, images=prof.n, source=source,
        split_counts={name: int(np.sum(prof.split == code)) for code, name in
                      ((0, "train"), (1, "validation"), (2, "test"))},
        breakdown=table,
        metric=dict(tinv=prof.tinv, metric_mean=prof.metric_mean, metric_std=prof.metric_std,
                    entropy_range=[float(prof.lut_x[0]), float(prof.lut_x[-1])],
                    metric_range=[float(prof.lut_y.min()), float(prof.lut_y.max())]),
        weak_on_edgetpu=on_edgetpu,
        **(extra or {}),
    )
    base = os.path.splitext(out_path)[0]
    atomic_write_json(base + "_breakdown.json", summary)
    atomic_write_text(base + "_breakdown.txt", text + "\n")
    plot_fig3(prof, fig_path)
    echo(f"calibrated tinv={prof.tinv:.4f}; wrote {out_path}, {base}_breakdown.json, {fig_path}")
