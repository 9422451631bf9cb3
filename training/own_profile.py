"""``offload-train profile --images DIR``: profile ANY weak ``.tflite`` + strong ONNX pair.

The pair runs exactly as the deployed system runs it: the weak model through
:class:`offload.classifier.WeakClassifier` (the device's class) and the
strong one through :class:`offload.server.model.StrongModel` (the server's),
each with its model card (:mod:`offload.card`: read from the file, its
sidecar TOML, or the ``--weak-card`` / ``--strong-card`` override), so the
pixels profiled are the pixels the device and the server feed. Images come
from an ImageFolder tree or a CSV of ``path,label``
(:func:`training.data.list_labelled_images`); unreadable ones are listed and
skipped. The images are split per class (seed ``named_seed(seed,
"profile-split")``), the metric is fitted on the train split, and the
profile, the section II breakdown, Fig. 3 and a demo clip are written as by
the committed pair's ``profile`` (``training.pair_commands``).
"""

from __future__ import annotations

import os
import time

import click
import numpy as np

from offload.commandline import fail

__all__ = ["profile_own_pair", "describe_card", "SHOW_SKIPPED"]

#: Skipped images named on the terminal (all of them go to the breakdown JSON).
SHOW_SKIPPED = 10


def _cards(weak_path, strong_path, weak_card, strong_card):
    """The two cards as read (the strong one ``None`` for a server: it applies its own)."""
    from offload.card import CardError, ModelCard, read_card
    from training.remote_strong import is_url

    try:
        weak = read_card(weak_path, override=weak_card)
        if is_url(strong_path):
            if strong_card:
                fail("--strong-card cannot apply to a server: it preprocesses with its own card")
            return weak, ModelCard()
        return weak, read_card(strong_path, override=strong_card)
    except CardError as exc:
        fail(exc)


def _strong_model(strong_path, card, threads, key_file, k):
    """The strong side: the server's own ``StrongModel`` over an ONNX file, or a running server."""
    from offload.card import CardError
    from offload.server.model import ModelError, StrongModel
    from training.remote_strong import RemoteError, RemoteStrong, is_url

    if is_url(strong_path):
        if not key_file:
            fail(f"--strong {strong_path} is a server: pass --key-file with one of its API keys")
        try:
            with open(key_file) as f:
                key = f.readline().strip()
            return RemoteStrong(strong_path, key=key, k=k)
        except OSError as exc:
            fail(f"{key_file}: {exc.strerror or exc}")
        except RemoteError as exc:
            fail(exc)
    if not str(strong_path).lower().endswith(".onnx"):
        fail(f"{strong_path}: --strong must be an ONNX model (.onnx) or a server URL with --images")
    try:
        return StrongModel(strong_path, card=card, threads=threads)
    except (ModelError, CardError) as exc:
        fail(exc)


def _load_models(weak_path, strong_path, cards, edgetpu, threads, key_file, k):
    """``(WeakClassifier, strong side)`` with their cards; one error line when one is unusable."""
    from offload.card import CardError
    from offload.classifier import ClassifierError, EdgeTPUUnavailable, WeakClassifier

    try:
        weak = WeakClassifier(weak_path, edgetpu={"auto": None, "on": True, "off": False}[edgetpu],
                              card=cards[0])
    except (ClassifierError, EdgeTPUUnavailable, CardError) as exc:
        fail(exc)
    strong = _strong_model(strong_path, cards[1], threads, key_file, k)
    if weak.n_classes != strong.n_classes:
        fail(f"{weak_path} has {weak.n_classes} classes but {strong_path} has {strong.n_classes}")
    return weak, strong


def describe_card(card):
    """One line of what a resolved card does to an image (printed so a user can check it)."""
    def nums(v):
        return f"{v[0]:g}" if len(v) == 1 else "[" + ", ".join(f"{x:g}" for x in v) + "]"

    norm = f"(pixel - {nums(card.mean)}) / {nums(card.std)}"
    if card.normalization == "tensor":
        norm += " (the input tensor's own quantisation)"
    return (f"{card.height}x{card.width} {'grey' if card.channels == 1 else card.order}, "
            f"{card.resize}, {norm}; from {card.source}")


def _class_names(labels_path, cards, paths, n_classes):
    """The class names in the models' output order: ``--labels``, else the cards' labels.

    ``None`` (folder or CSV names, sorted) when neither declares them.
    """
    from offload.card import CardError, read_labels

    if labels_path:
        try:
            names = list(read_labels(labels_path))
        except CardError as exc:
            fail(exc)
        where = labels_path
    else:
        declared = [(p, c.labels) for p, c in zip(paths, cards) if c.labels]
        if len(declared) == 2 and tuple(declared[0][1]) != tuple(declared[1][1]):
            fail(f"the labels of {declared[0][0]} and {declared[1][0]} differ; pass --labels")
        if not declared:
            return None
        where, names = declared[0][0], list(declared[0][1])
    if len(names) != n_classes:
        fail(f"{where}: {len(names)} labels for models with {n_classes} classes")
    return names


def _report_skipped(skipped, total, source):
    if not skipped:
        return
    click.echo(f"skipped {len(skipped)} of {total} images that could not be read:", err=True)
    for path, reason in skipped[:SHOW_SKIPPED]:
        click.echo(f"  {path}: {reason}" if path not in reason else f"  {reason}", err=True)
    if len(skipped) > SHOW_SKIPPED:
        click.echo(f"  ... and {len(skipped) - SHOW_SKIPPED} more (all listed in the breakdown JSON)",
                   err=True)
    if len(skipped) == total:
        fail(f"{source}: no readable image among its {total} image files "
             f"(first: {skipped[0][1]})")


class _LazyImages:
    """Profiled images read back from their files on demand (the demo clip takes a few)."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from training.data import read_image_file

        return read_image_file(self.paths[i])


def profile_own_pair(*, weak_model, strong_model, images, labels_path, weak_card, strong_card,
                     out_path, k, edgetpu, val_fraction, test_fraction, seed, batch_size, threads,
                     fig_path, demo_dir, demo_count, demo_fps, progress, key_file=None):
    """The body of ``offload-train profile --images``: see the module docstring."""
    from offload.scenario import named_seed
    from training.data import DataError, list_labelled_images
    from training.profiling import write_breakdown
    from training.profiling import build_profile, run_pair_on_files, stratified_split
    from training.remote_strong import RemoteError, RemoteStrong

    t0 = time.time()
    if weak_model is None or strong_model is None:
        fail("--images needs --weak W.tflite and --strong S.onnx")
    cards = _cards(weak_model, strong_model, weak_card, strong_card)
    weak, strong = _load_models(weak_model, strong_model, cards, edgetpu, threads, key_file, k)
    remote = isinstance(strong, RemoteStrong)
    names = _class_names(labels_path, cards, (weak_model, strong_model), weak.n_classes)
    try:
        files = list_labelled_images(images, class_names=names)
    except DataError as exc:
        fail(exc)
    if names is None:
        click.echo("no labels in --labels or the cards: output i is taken to be the i-th sorted "
                   "class name of the images", err=True)
    if len(files.class_names) != weak.n_classes:
        fail(f"{images}: {len(files.class_names)} classes ({', '.join(files.class_names)}) "
             f"but the models have {weak.n_classes}; pass --labels")
    if not 1 <= k <= weak.n_classes:
        fail(f"--top-k {k} must be between 1 and the number of classes ({weak.n_classes})")
    click.echo(f"weak card: {describe_card(weak.card)}")
    click.echo("strong card: " + ("applied by the server" if remote else describe_card(strong.card)))
    click.echo(f"profiling {len(files)} images ({files.source}, {weak.n_classes} classes); "
               f"weak {weak_model} on {'the Edge TPU' if weak.on_edgetpu else 'the CPU'}, "
               f"strong {strong_model} ({'' if remote else 'ONNX Runtime '}{', '.join(strong.providers)})")
    try:
        zw, zs, kept, skipped = run_pair_on_files(weak, strong, files.paths, batch_size=batch_size,
                                                  run_batch=strong.scores if remote else None,
                                                  progress=progress)
    except RemoteError as exc:
        fail(exc)
    _report_skipped(skipped, len(files), images)
    labels = files.labels[kept]
    try:
        split = stratified_split(labels, val_fraction=val_fraction, test_fraction=test_fraction,
                                 seed=named_seed(seed, "profile-split"))
        prof = build_profile(zw, zs, labels, split, k=k,
                             source=f"offload-train profile: {files.source}; weak "
                                    f"{os.path.basename(weak_model)}, strong "
                                    f"{strong_model if remote else os.path.basename(strong_model)}")
    except ValueError as exc:
        fail(f"{images}: {exc}")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    prof.save(out_path, compress=True)
    kept_paths = [files.paths[i] for i in kept]
    write_breakdown(prof, out_path, fig_path, echo=click.echo, k=k, source=files.source,
                    on_edgetpu=weak.on_edgetpu,
                    extra=dict(class_names=files.class_names, weak_model=weak_model,
                               strong_model=strong_model, seed=seed,
                               fractions=dict(validation=val_fraction, test=test_fraction),
                               skipped=[dict(path=p, reason=r) for p, r in skipped]))
    if demo_count > 0:
        from training.demo import write_demo

        n_demo = write_demo(demo_dir, _LazyImages(kept_paths), labels, np.flatnonzero(prof.split == 2),
                            prof, files.class_names, count=demo_count, fps=demo_fps, scale=1,
                            seed=seed)
        click.echo(f"wrote a demo clip of {n_demo} held-out test images to {demo_dir}")
    click.echo(f"done in {time.time() - t0:.0f} s")
