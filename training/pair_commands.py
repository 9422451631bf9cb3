"""``offload-train classifiers``, ``onnx`` and ``profile``: the weak/strong classifier pair.

``classifiers`` trains the pair and exports the weak CNN as a full-int8
``.tflite`` (the device's) and the strong one as TorchScript and ONNX (the
server's), measuring each on the source's test set (``classifiers.json``);
``onnx`` redoes the ONNX step alone; ``profile`` runs both exported models
over the held-out images and writes the profile ``.npz`` with its fitted
metric, the section II breakdown, Fig. 3 and a demo clip (with ``--images``,
any weak ``.tflite`` + strong ONNX pair on any labelled images:
``training.own_profile``). Registered on the
``offload-train`` group by ``training.cli``.
"""

from __future__ import annotations

import json
import os
import time

import click
import numpy as np

from offload.atomic import atomic_write_json
from offload.commandline import fail, require_torch
from training.data import FASHION_MNIST_DIR, DataError, load_images, make_split
from training.profiling import write_breakdown

__all__ = ["classifiers", "onnx", "profile", "DEFAULT_OUT", "MANIFEST", "WEAK_FILE", "STRONG_FILE",
           "STRONG_ONNX_FILE"]

DEFAULT_OUT = "artifacts"
#: ``onnx`` and ``profile`` read what ``classifiers`` wrote.
_models_dir_option = click.option(
    "--models-dir", default=DEFAULT_OUT, show_default=True, type=click.Path(file_okay=False),
    help="Folder written by `offload-train classifiers` (models + classifiers.json).")
MANIFEST = "classifiers.json"
WEAK_FILE = "weak_int8.tflite"
STRONG_FILE = "strong.torchscript.pt"
STRONG_ONNX_FILE = "strong.onnx"

def _load_data(data_dir, size, progress):
    try:
        return load_images(data_dir, size=(size, size), progress=progress)
    except DataError as exc:
        fail(exc)


# --------------------------------------------------------------------------- classifiers


@click.command()
@click.option("--data-dir", default=FASHION_MNIST_DIR, show_default=True,
              help="Folder with the four MNIST-style IDX files (.gz or raw), or a folder "
                   "of images with one sub-folder per class (optionally under train/ and test/).")
@click.option("--out-dir", default=DEFAULT_OUT, show_default=True, type=click.Path(file_okay=False),
              help="Where to write the models and classifiers.json.")
@click.option("--image-size", default=28, show_default=True,
              help="Strong model input (and folder images are resized to it), pixels.")
@click.option("--weak-size", default=14, show_default=True, help="Weak model input, pixels.")
@click.option("--weak-width", default=4, show_default=True, help="Weak CNN base channels.")
@click.option("--strong-width", default=32, show_default=True, help="Strong CNN base channels.")
@click.option("--weak-epochs", default=4, show_default=True)
@click.option("--strong-epochs", default=8, show_default=True)
@click.option("--batch-size", default=128, show_default=True)
@click.option("--fit-fraction", default=2 / 3, show_default="2/3",
              help="Share of the source's training pool that trains the classifiers; "
                   "the rest is profiled.")
@click.option("--val-fraction", default=0.25, show_default=True,
              help="Share of the profiled training-pool images in the profile's validation split.")
@click.option("--max-fit", type=int, default=None, help="Use at most this many training images (quick runs).")
@click.option("--max-eval", type=int, default=None, help="Evaluate on at most this many test images.")
@click.option("--calib-images", default=1000, show_default=True,
              help="Training images used to calibrate the int8 quantisation.")
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=1, show_default=True, help="torch CPU threads.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def classifiers(data_dir, out_dir, image_size, weak_size, weak_width, strong_width, weak_epochs,
                strong_epochs, batch_size, fit_fraction, val_fraction, max_fit, max_eval,
                calib_images, seed, threads, quiet):
    """Train the weak/strong pair and export them for the device and the server."""
    require_torch()
    from training.train import set_threads

    progress = not quiet
    set_threads(threads)
    t0 = time.time()
    data, split, test = _fit_and_test_images(data_dir, image_size, fit_fraction=fit_fraction,
                                             val_fraction=val_fraction, seed=seed,
                                             max_fit=max_fit, max_eval=max_eval,
                                             progress=progress)
    os.makedirs(out_dir, exist_ok=True)
    weak, weak_path = _train_weak(data, split, test, out_dir, size=weak_size, width=weak_width,
                                  epochs=weak_epochs, batch_size=batch_size,
                                  calib_images=calib_images, seed=seed, progress=progress)
    strong, strong_path = _train_strong(data, split, test, out_dir, size=image_size,
                                        width=strong_width, epochs=strong_epochs,
                                        batch_size=batch_size, seed=seed, progress=progress)
    manifest = dict(
        source=data.source,
        data_dir=os.path.abspath(data_dir),
        class_names=data.class_names,
        image_size=image_size,
        split=dict(split.params, n_fit=int(len(split.fit)), n_profile=int(len(split.profile)),
                   n_profile_train=int(np.sum(split.profile_split == 0)),
                   n_profile_validation=int(np.sum(split.profile_split == 1)),
                   n_profile_test=int(np.sum(split.profile_split == 2))),
        evaluation=dict(images=int(len(test)), on="the source's test set"),
        weak=weak,
        strong=strong,
        seconds=round(time.time() - t0, 1),
    )
    atomic_write_json(os.path.join(out_dir, MANIFEST), manifest)
    click.echo(f"wrote {weak_path}, {strong_path}, {os.path.join(out_dir, MANIFEST)} "
               f"in {manifest['seconds']:.0f} s")


def _fit_and_test_images(data_dir, image_size, *, fit_fraction, val_fraction, seed, max_fit,
                         max_eval, progress):
    """``(data, split, test indices)``: the images read, split into fit and profiled ones."""
    data = _load_data(data_dir, image_size, progress)
    if data.images.shape[1:] != (image_size, image_size):
        fail(f"{data_dir}: images are {data.images.shape[1]}x{data.images.shape[2]}, "
              f"not {image_size}x{image_size}; pass --image-size")
    try:
        split = make_split(data, fit_fraction=fit_fraction, val_fraction=val_fraction, seed=seed,
                           max_fit=max_fit)
    except DataError as exc:
        fail(exc)
    test = np.flatnonzero(data.is_test)
    if max_eval is not None:
        test = test[:max_eval]
    click.echo(f"data: {data.source}: {len(data)} images, {data.n_classes} classes; "
               f"fit {len(split.fit)}, profiled {len(split.profile)} "
               f"(train {int(np.sum(split.profile_split == 0))}, "
               f"validation {int(np.sum(split.profile_split == 1))}, "
               f"test {int(np.sum(split.profile_split == 2))})")
    return data, split, test


def _train_weak(data, split, test, out_dir, *, size, width, epochs, batch_size, calib_images, seed,
                progress):
    """Train the weak CNN, export it as full-int8 ``.tflite``; ``(manifest entry, path)``.

    Its accuracy is measured in float (torch) and int8 (LiteRT, as the device
    runs it); a drop over 1 point is warned about.
    """
    import torch

    from offload.classifier import ClassifierError, WeakClassifier
    from training.export import ExportError, export_weak_int8
    from training.models import build_weak, count_params
    from training.train import accuracy, images_to_tensor, predict_logits, train_classifier

    y_fit, y_test = data.labels[split.fit], data.labels[test]
    xw_fit = images_to_tensor(data.images[split.fit], size)
    xw_test = images_to_tensor(data.images[test], size)
    weak = build_weak(size, data.n_classes, width)
    tw = time.time()
    train_classifier(weak, xw_fit, y_fit, epochs=epochs, batch_size=batch_size, seed=seed,
                     desc="weak", progress=progress)
    train_s = time.time() - tw
    float_acc = accuracy(predict_logits(weak, xw_test, desc="weak float eval",
                                        progress=progress), y_test)
    click.echo(f"weak float accuracy: {100 * float_acc:.2f}%")
    path = os.path.join(out_dir, WEAK_FILE)
    calib = xw_fit[torch.randperm(len(xw_fit), generator=torch.Generator().manual_seed(seed))[:calib_images]]
    try:
        report = export_weak_int8(weak, calib, path)
    except ExportError as exc:
        fail(exc)
    try:
        clf = WeakClassifier(path, edgetpu=False)
    except ClassifierError as exc:
        fail(exc)
    _, zq = clf.classify_many(data.images[test], progress=progress)
    int8_acc = accuracy(zq, y_test)
    drop = 100 * (float_acc - int8_acc)
    click.echo(f"weak int8 accuracy (LiteRT): {100 * int8_acc:.2f}% "
               f"({drop:+.2f} points lost); {report['size_bytes']} bytes; ops {report['ops']}")
    if drop > 1.0:
        click.echo(f"warning: int8 model loses {drop:.2f} points (> 1)", err=True)
    return dict(
        file=WEAK_FILE, input_size=size, width=width, epochs=epochs,
        params=count_params(weak), float_accuracy=float_acc, int8_accuracy=int8_acc,
        int8_drop_points=drop, int8_within_1_point=bool(drop <= 1.0),
        calibration_images=int(len(calib)), train_seconds=round(train_s, 1), tflite=report,
    ), path


def _train_strong(data, split, test, out_dir, *, size, width, epochs, batch_size, seed, progress):
    """Train the strong CNN, export it as TorchScript and ONNX; ``(manifest entry, path)``.

    Its accuracy is measured on the TorchScript file (not the object in
    memory) and checked against ONNX Runtime.
    """
    from training.export import export_strong_torchscript, load_strong
    from training.models import build_strong, count_params
    from training.train import accuracy, images_to_tensor, predict_logits, train_classifier

    y_fit, y_test = data.labels[split.fit], data.labels[test]
    xs_fit = images_to_tensor(data.images[split.fit], size)
    xs_test = images_to_tensor(data.images[test], size)
    strong = build_strong(size, data.n_classes, width)
    ts = time.time()
    train_classifier(strong, xs_fit, y_fit, epochs=epochs, batch_size=batch_size, seed=seed + 1,
                     augment=True, desc="strong", progress=progress)
    train_s = time.time() - ts
    path = os.path.join(out_dir, STRONG_FILE)
    export_strong_torchscript(strong, path, class_names=data.class_names, size=size)
    module, _ = load_strong(path)  # the file, not the object in memory
    acc = accuracy(predict_logits(module, xs_test, desc="strong eval (TorchScript)",
                                  progress=progress), y_test)
    click.echo(f"strong accuracy (TorchScript): {100 * acc:.2f}%; "
               f"{os.path.getsize(path)} bytes")
    onnx_entry = _export_onnx(strong, os.path.join(out_dir, STRONG_ONNX_FILE), data.class_names,
                              size, xs_test, y_test, acc)
    return dict(
        file=STRONG_FILE, input_size=size, width=width, epochs=epochs,
        params=count_params(strong), accuracy=acc,
        size_bytes=os.path.getsize(path), train_seconds=round(train_s, 1),
        onnx=onnx_entry,
    ), path


def _export_onnx(net, onnx_path, class_names, size, x_test, y_test, torch_acc):
    """Export ``net`` to ONNX, check it on the test images, return its manifest entry.

    The ONNX file must give the same top-1 class as torch on every test image
    (so the same accuracy) and logits within 1e-4; otherwise nothing is written.
    """
    from training.export import ExportError, export_strong_onnx
    from training.train import accuracy

    try:
        meta = export_strong_onnx(net, onnx_path, class_names=class_names, size=size,
                                  check_x=x_test)
    except ExportError as exc:
        fail(exc)
    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(None, {"image": x_test[b:b + 1024].numpy()})[0]
                             for b in range(0, len(x_test), 1024)])
    acc = accuracy(logits, y_test)
    if acc != torch_acc:  # pragma: no cover - the check above makes them equal
        fail(f"{onnx_path}: ONNX accuracy {acc} differs from torch's {torch_acc}")
    click.echo(f"strong accuracy (ONNX Runtime): {100 * acc:.2f}% on {len(y_test)} images; "
               f"max |logit difference| to torch {meta['check']['max_abs_diff']:.2g}; "
               f"{os.path.getsize(onnx_path)} bytes")
    return dict(file=os.path.basename(onnx_path), accuracy=acc,
                size_bytes=os.path.getsize(onnx_path), input="image float32 (batch, 1, H, W)",
                output="logits float32 (batch, n_classes)",
                max_abs_diff_vs_torch=meta["check"]["max_abs_diff"],
                top1_agreement_vs_torch=meta["check"]["top1_agreement"])



@click.command()
@_models_dir_option
@click.option("--strong-model", default=None,
              help="Strong TorchScript file to convert (default: from --models-dir).")
@click.option("--out", "out_path", default=None,
              help="ONNX file to write (default: MODELS_DIR/strong.onnx).")
@click.option("--data-dir", default=None,
              help="Image data for the check (default: the one the classifiers were trained from).")
@click.option("--max-eval", type=int, default=None, help="Check on at most this many test images.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def onnx(models_dir, strong_model, out_path, data_dir, max_eval, quiet):
    """Export the strong model to ONNX (the edge server's model) and record its accuracy.

    Rebuilds training.models.StrongNet with the TorchScript file's weights,
    exports it with a dynamic batch axis, checks ONNX Runtime against torch on
    the source's test images, and adds its accuracy to classifiers.json.
    """
    require_torch()
    from training.export import ExportError, strong_from_torchscript
    from training.train import accuracy, images_to_tensor, predict_logits

    man = _read_manifest(models_dir)
    try:
        data_dir = data_dir or man["data_dir"]
        size = int(man["image_size"])
        strong_model = strong_model or os.path.join(models_dir, man["strong"]["file"])
    except (KeyError, TypeError, ValueError) as exc:
        fail(f"{os.path.join(models_dir, MANIFEST)}: missing or bad entry {exc}")
    out_path = out_path or os.path.join(models_dir, STRONG_ONNX_FILE)
    try:
        net, meta = strong_from_torchscript(strong_model)
    except ExportError as exc:
        fail(exc)
    data = _load_data(data_dir, size, not quiet)
    test = np.flatnonzero(data.is_test)
    if max_eval is not None:
        test = test[:max_eval]
    x_test, y_test = images_to_tensor(data.images[test], size), data.labels[test]
    torch_acc = accuracy(predict_logits(net, x_test, desc="strong eval (torch)",
                                        progress=not quiet), y_test)
    click.echo(f"strong accuracy (torch, rebuilt from {strong_model}): {100 * torch_acc:.2f}%")
    entry = _export_onnx(net, out_path, meta.get("class_names") or data.class_names, size,
                         x_test, y_test, torch_acc)
    if max_eval is None and os.path.abspath(os.path.dirname(out_path)) == os.path.abspath(models_dir):
        man.setdefault("strong", {})["onnx"] = dict(entry, images=int(len(y_test)))
        atomic_write_json(os.path.join(models_dir, MANIFEST), man)
        click.echo(f"wrote {out_path}; recorded its accuracy in {os.path.join(models_dir, MANIFEST)}")
    else:
        click.echo(f"wrote {out_path} (classifiers.json unchanged: partial check or other folder)")



# --------------------------------------------------------------------------- profile


def _read_manifest(models_dir):
    path = os.path.join(models_dir, MANIFEST)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        fail(f"{path} not found: run `offload-train classifiers --out-dir {models_dir}` first")
    except (OSError, json.JSONDecodeError) as exc:
        fail(f"{path}: not a classifiers manifest ({exc})")



@click.command()
@_models_dir_option
@click.option("--data-dir", default=None,
              help="Image data (default: the one the classifiers were trained from).")
@click.option("--weak-model", "--weak", "weak_model", default=None,
              help="Weak .tflite (default: from --models-dir).")
@click.option("--strong-model", "--strong", "strong_model", default=None,
              help="Strong model: TorchScript (default: from --models-dir); with --images an ONNX "
                   "file or a running offload-serve's URL (with --key-file).")
@click.option("--images", default=None,
              help="Profile ANY pair (--weak W.tflite --strong S.onnx) on this ImageFolder tree "
                   "(one sub-folder per class) or CSV of path,label (paths relative to it).")
@click.option("--labels", "labels_path", default=None,
              help="With --images: class labels in output order (id:label, 'id label' or one per "
                   "line); default: the models' cards, else the sorted folder/CSV names.")
@click.option("--weak-card", default=None, help="With --images: TOML card overriding the weak model's.")
@click.option("--strong-card", default=None,
              help="With --images: TOML card overriding the strong model's.")
@click.option("--out", "out_path", default=None,
              help="Profile .npz to write (default: MODELS_DIR/profile.npz; ./profile.npz with --images).")
@click.option("-k", "--top-k", "k", default=1, show_default=True,
              help="k of the top-k loss (the paper uses 5 on ImageNet).")
@click.option("--edgetpu", type=click.Choice(["auto", "on", "off"]), default="off", show_default=True,
              help="Run the weak model on the Edge TPU (on), CPU (off), or whichever is there.")
@click.option("--max-profile", type=int, default=None,
              help="Profile at most this many images (quick runs; keeps split proportions).")
@click.option("--val-fraction", default=0.2, show_default=True,
              help="With --images: share of each class in the validation split.")
@click.option("--test-fraction", default=0.3, show_default=True,
              help="With --images: share of each class in the test split (the rest trains the metric).")
@click.option("--seed", default=0, show_default=True,
              help="With --images: scenario seed of the split (stream 'profile-split').")
@click.option("--batch-size", default=64, show_default=True,
              help="With --images: images per strong-model call.")
@click.option("--threads", type=int, default=None, help="With --images: ONNX Runtime CPU threads.")
@click.option("--key-file", default=None,
              help="With --images and --strong URL (a running offload-serve): file holding its API key.")
@click.option("--fig", "fig_path", default=None,
              help="Fig. 3 PNG (default: MODELS_DIR/fig3_entropy_metric.png; beside the profile "
                   "with --images).")
@click.option("--demo-dir", default=None,
              help="Write a demo clip of held-out test images here (default: MODELS_DIR/demo; "
                   "beside the profile with --images).")
@click.option("--demo-count", default=200, show_default=True, help="Frames in the demo clip (0: none).")
@click.option("--demo-fps", default=5.0, show_default=True, help="Frame rate of the demo video.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def profile(models_dir, data_dir, weak_model, strong_model, images, labels_path, weak_card,
            strong_card, out_path, k, edgetpu, max_profile, val_fraction, test_fraction, seed,
            batch_size, threads, key_file, fig_path, demo_dir, demo_count, demo_fps, quiet):
    """Profile a pair on held-out images, fit the metric, write breakdown and Fig. 3.

    Without --images: the pair `offload-train classifiers` made (MODELS_DIR). With
    --images: any weak .tflite and strong ONNX model, each run with its model card.
    """
    progress = not quiet
    if images is not None:
        if data_dir is not None or max_profile is not None:
            fail("--data-dir and --max-profile belong to the committed pair, not to --images")
        from training.own_profile import profile_own_pair

        out_path = out_path or "profile.npz"
        here = os.path.dirname(out_path)
        profile_own_pair(
            weak_model=weak_model, strong_model=strong_model, images=images,
            labels_path=labels_path, weak_card=weak_card, strong_card=strong_card,
            out_path=out_path, k=k, edgetpu=edgetpu, val_fraction=val_fraction,
            test_fraction=test_fraction, seed=seed, batch_size=batch_size, threads=threads,
            fig_path=fig_path or os.path.join(here, "fig3_entropy_metric.png"),
            demo_dir=demo_dir or os.path.join(here, "demo"), demo_count=demo_count,
            demo_fps=demo_fps, progress=progress, key_file=key_file)
        return
    if labels_path or weak_card or strong_card or key_file:
        fail("--labels, --weak-card, --strong-card and --key-file need --images")
    require_torch()
    t0 = time.time()
    man = _read_manifest(models_dir)
    try:
        data_dir = data_dir or man["data_dir"]
        size = int(man["image_size"])
        sp = man["split"]
        weak_model = weak_model or os.path.join(models_dir, man["weak"]["file"])
        strong_model = strong_model or os.path.join(models_dir, man["strong"]["file"])
    except (KeyError, TypeError, ValueError) as exc:
        fail(f"{os.path.join(models_dir, MANIFEST)}: missing or bad entry {exc}")
    out_path = out_path or os.path.join(models_dir, "profile.npz")
    fig_path = fig_path or os.path.join(models_dir, "fig3_entropy_metric.png")
    demo_dir = demo_dir or os.path.join(models_dir, "demo")

    weak, strong = _load_pair(weak_model, strong_model, edgetpu, man.get("class_names"))
    data = _load_data(data_dir, size, progress)
    split = _profiled_split(data, sp, max_profile, models_dir)
    if weak.n_classes != data.n_classes:
        fail(f"{weak_model} has {weak.n_classes} outputs but the data have {data.n_classes} classes")
    images, labels = data.images[split.profile], data.labels[split.profile]
    click.echo(f"profiling {len(labels)} images ({data.source}); weak on "
               f"{'the Edge TPU' if weak.on_edgetpu else 'the CPU'}")
    prof = _profile_pair(weak, strong, images, labels, split, size=size, k=k, source=data.source,
                         weak_model=weak_model, strong_model=strong_model, progress=progress)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    prof.save(out_path, compress=True)
    write_breakdown(prof, out_path, fig_path, echo=click.echo, k=k, source=data.source,
                    on_edgetpu=weak.on_edgetpu)
    if demo_count > 0:
        from training.demo import write_demo

        tests = np.flatnonzero(prof.split == 2)
        n_demo = write_demo(demo_dir, images, labels, tests, prof, data.class_names,
                            count=demo_count, fps=demo_fps, seed=sp["seed"])
        click.echo(f"wrote a demo clip of {n_demo} held-out test images to {demo_dir}")
    click.echo(f"done in {time.time() - t0:.0f} s")


def _load_pair(weak_model, strong_model, edgetpu, class_names):
    """``(WeakClassifier, strong TorchScript module)`` from their files; ``edgetpu``: auto/on/off."""
    from offload.classifier import ClassifierError, EdgeTPUUnavailable, WeakClassifier
    from training.export import ExportError, load_strong

    try:
        weak = WeakClassifier(weak_model, edgetpu={"auto": None, "on": True, "off": False}[edgetpu],
                              class_names=class_names)
    except (ClassifierError, EdgeTPUUnavailable) as exc:
        fail(exc)
    try:
        strong, _ = load_strong(strong_model)
    except ExportError as exc:
        fail(exc)
    return weak, strong


def _profiled_split(data, sp, max_profile, models_dir):
    """The manifest's split of ``data`` again (same seed): the images the classifiers never saw."""
    try:
        split = make_split(data, fit_fraction=sp["fit_fraction"], val_fraction=sp["val_fraction"],
                           seed=sp["seed"], max_fit=sp.get("max_fit"), max_profile=max_profile)
    except DataError as exc:
        fail(exc)
    except KeyError as exc:
        fail(f"{os.path.join(models_dir, MANIFEST)}: split entry lacks {exc}")
    if np.intersect1d(split.fit, split.profile).size:  # pragma: no cover - make_split guarantees it
        fail("internal error: profiled images overlap the classifiers' training images")
    return split


def _profile_pair(weak, strong, images, labels, split, *, size, k, source, weak_model,
                  strong_model, progress):
    """Both models' logits on ``images`` made into a ``Profile`` with its fitted metric."""
    from training.profiling import build_profile, run_strong

    _, zw = weak.classify_many(images, progress=progress)
    try:
        zs = run_strong(strong, images, size, progress=progress)
    except RuntimeError as exc:
        fail(f"{strong_model}: cannot run on {size}x{size} images ({str(exc).splitlines()[0]})")
    if zs.ndim != 2 or zs.shape[1] != weak.n_classes:
        fail(f"{strong_model}: output shape {zs.shape} does not match {weak.n_classes} classes")
    try:
        return build_profile(zw, zs, labels, split.profile_split, k=k,
                             source=f"offload-train profile: {source}; weak {os.path.basename(weak_model)} "
                                    f"(int8, LiteRT), strong {os.path.basename(strong_model)}")
    except ValueError as exc:
        fail(f"metric fit failed: {exc}")
