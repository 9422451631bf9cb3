"""``offload-train``: train, quantise and profile the weak/strong classifier pair.

Commands
--------
``offload-train classifiers``
    Read images (IDX files or a folder per class), split them, train the weak
    and strong CNNs, export the weak one as a full-int8 ``.tflite`` and the
    strong one as TorchScript, measure float / int8 / strong accuracy on the
    source's test set, write ``classifiers.json``.
``offload-train onnx``
    Export the strong model (rebuilt from the TorchScript file's weights) to
    ONNX for the edge server, check it against torch with ONNX Runtime on the
    test images, record its accuracy in ``classifiers.json``. ``classifiers``
    does this step too.
``offload-train profile``
    Run both exported models over the held-out images (the weak one through
    LiteRT, as the device does), write the profile ``.npz`` with its fitted
    metric, the section II breakdown (JSON), the Fig. 3 PNG and a demo clip.
``offload-train dqn``
    Train the DQN offloading policy (``training.dqn``) for one scenario and
    write it as a policy blob, with a JSON report and a validation curve.
``offload-train sweep``
    Train and evaluate a DQN at every point of a grid (``training.sweep``):
    the paper's evaluation figures or a TOML grid; one results table.
``offload-train plot``
    Figures of a sweep's results table in the paper's style
    (``training.figures``).
``offload-train trace``
    Two policies' decisions on one simulated stream (the paper's Figs. 7, 10, 11).

Every error the user can cause (missing data, malformed IDX, wrong model file)
ends in one ``click`` error message, no traceback.
"""

from __future__ import annotations

import json
import os
import time

import click
import numpy as np

from offload.atomic import atomic_write_json, atomic_write_text
from tqdm import tqdm

from offload.cli import scenario_options
from training.data import FASHION_MNIST_DIR, DataError, load_images, make_split

DEFAULT_OUT = "artifacts"
MANIFEST = "classifiers.json"
WEAK_FILE = "weak_int8.tflite"
STRONG_FILE = "strong.torchscript.pt"
STRONG_ONNX_FILE = "strong.onnx"


def _fail(exc):
    raise click.ClickException(str(exc)) from None


def _load_data(data_dir, size, progress):
    try:
        return load_images(data_dir, size=(size, size), progress=progress)
    except DataError as exc:
        _fail(exc)


@click.group()
def main():
    """Train, quantise and profile the weak/strong classifier pair (workstation, torch)."""


# --------------------------------------------------------------------------- classifiers


@main.command()
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
    try:
        import torch
    except ImportError:
        _fail("offload-train needs the training extra: pip install torch==2.13.0 'offload[training]'")
    from offload.classifier import ClassifierError, WeakClassifier
    from training.export import ExportError, export_strong_torchscript, export_weak_int8, load_strong
    from training.models import build_strong, build_weak, count_params
    from training.train import accuracy, images_to_tensor, predict_logits, set_threads, train_classifier

    progress = not quiet
    set_threads(threads)
    t0 = time.time()
    data = _load_data(data_dir, image_size, progress)
    if data.images.shape[1:] != (image_size, image_size):
        _fail(f"{data_dir}: images are {data.images.shape[1]}x{data.images.shape[2]}, "
              f"not {image_size}x{image_size}; pass --image-size")
    try:
        split = make_split(data, fit_fraction=fit_fraction, val_fraction=val_fraction, seed=seed,
                           max_fit=max_fit)
    except DataError as exc:
        _fail(exc)
    test = np.flatnonzero(data.is_test)
    if max_eval is not None:
        test = test[:max_eval]
    y_fit, y_test = data.labels[split.fit], data.labels[test]
    n_cls = data.n_classes
    click.echo(f"data: {data.source}: {len(data)} images, {n_cls} classes; "
               f"fit {len(split.fit)}, profiled {len(split.profile)} "
               f"(train {int(np.sum(split.profile_split == 0))}, "
               f"validation {int(np.sum(split.profile_split == 1))}, "
               f"test {int(np.sum(split.profile_split == 2))})")
    os.makedirs(out_dir, exist_ok=True)

    # weak -------------------------------------------------------------------
    xw_fit = images_to_tensor(data.images[split.fit], weak_size)
    xw_test = images_to_tensor(data.images[test], weak_size)
    weak = build_weak(weak_size, n_cls, weak_width)
    tw = time.time()
    train_classifier(weak, xw_fit, y_fit, epochs=weak_epochs, batch_size=batch_size, seed=seed,
                     desc="weak", progress=progress)
    weak_train_s = time.time() - tw
    weak_float_acc = accuracy(predict_logits(weak, xw_test, desc="weak float eval",
                                             progress=progress), y_test)
    click.echo(f"weak float accuracy: {100 * weak_float_acc:.2f}%")
    weak_path = os.path.join(out_dir, WEAK_FILE)
    calib = xw_fit[torch.randperm(len(xw_fit), generator=torch.Generator().manual_seed(seed))[:calib_images]]
    try:
        report = export_weak_int8(weak, calib, weak_path)
    except ExportError as exc:
        _fail(exc)
    try:
        clf = WeakClassifier(weak_path, edgetpu=False)
    except ClassifierError as exc:
        _fail(exc)
    _, zq = clf.classify_many(data.images[test], progress=progress)
    weak_int8_acc = accuracy(zq, y_test)
    drop = 100 * (weak_float_acc - weak_int8_acc)
    click.echo(f"weak int8 accuracy (LiteRT): {100 * weak_int8_acc:.2f}% "
               f"({drop:+.2f} points lost); {report['size_bytes']} bytes; ops {report['ops']}")
    if drop > 1.0:
        click.echo(f"warning: int8 model loses {drop:.2f} points (> 1)", err=True)

    # strong -----------------------------------------------------------------
    xs_fit = images_to_tensor(data.images[split.fit], image_size)
    xs_test = images_to_tensor(data.images[test], image_size)
    strong = build_strong(image_size, n_cls, strong_width)
    ts = time.time()
    train_classifier(strong, xs_fit, y_fit, epochs=strong_epochs, batch_size=batch_size, seed=seed + 1,
                     augment=True, desc="strong", progress=progress)
    strong_train_s = time.time() - ts
    strong_path = os.path.join(out_dir, STRONG_FILE)
    export_strong_torchscript(strong, strong_path, class_names=data.class_names, size=image_size)
    module, _ = load_strong(strong_path)  # the file, not the object in memory
    strong_acc = accuracy(predict_logits(module, xs_test, desc="strong eval (TorchScript)",
                                         progress=progress), y_test)
    click.echo(f"strong accuracy (TorchScript): {100 * strong_acc:.2f}%; "
               f"{os.path.getsize(strong_path)} bytes")
    onnx_entry = _export_onnx(strong, os.path.join(out_dir, STRONG_ONNX_FILE), data.class_names,
                              image_size, xs_test, y_test, strong_acc)

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
        weak=dict(
            file=WEAK_FILE, input_size=weak_size, width=weak_width, epochs=weak_epochs,
            params=count_params(weak), float_accuracy=weak_float_acc, int8_accuracy=weak_int8_acc,
            int8_drop_points=drop, int8_within_1_point=bool(drop <= 1.0),
            calibration_images=int(len(calib)), train_seconds=round(weak_train_s, 1), tflite=report,
        ),
        strong=dict(
            file=STRONG_FILE, input_size=image_size, width=strong_width, epochs=strong_epochs,
            params=count_params(strong), accuracy=strong_acc,
            size_bytes=os.path.getsize(strong_path), train_seconds=round(strong_train_s, 1),
            onnx=onnx_entry,
        ),
        seconds=round(time.time() - t0, 1),
    )
    atomic_write_json(os.path.join(out_dir, MANIFEST), manifest)
    click.echo(f"wrote {weak_path}, {strong_path}, {os.path.join(out_dir, MANIFEST)} "
               f"in {manifest['seconds']:.0f} s")


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
        _fail(exc)
    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(None, {"image": x_test[b:b + 1024].numpy()})[0]
                             for b in range(0, len(x_test), 1024)])
    acc = accuracy(logits, y_test)
    if acc != torch_acc:  # pragma: no cover - the check above makes them equal
        _fail(f"{onnx_path}: ONNX accuracy {acc} differs from torch's {torch_acc}")
    click.echo(f"strong accuracy (ONNX Runtime): {100 * acc:.2f}% on {len(y_test)} images; "
               f"max |logit difference| to torch {meta['check']['max_abs_diff']:.2g}; "
               f"{os.path.getsize(onnx_path)} bytes")
    return dict(file=os.path.basename(onnx_path), accuracy=acc,
                size_bytes=os.path.getsize(onnx_path), input="image float32 (batch, 1, H, W)",
                output="logits float32 (batch, n_classes)",
                max_abs_diff_vs_torch=meta["check"]["max_abs_diff"],
                top1_agreement_vs_torch=meta["check"]["top1_agreement"])


@main.command()
@click.option("--models-dir", default=DEFAULT_OUT, show_default=True,
              type=click.Path(file_okay=False),
              help="Folder written by `offload-train classifiers` (models + classifiers.json).")
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
    try:
        import torch  # noqa: F401
    except ImportError:
        _fail("offload-train needs the training extra: pip install torch==2.13.0 'offload[training]'")
    from training.export import ExportError, strong_from_torchscript
    from training.train import accuracy, images_to_tensor, predict_logits

    man = _read_manifest(models_dir)
    try:
        data_dir = data_dir or man["data_dir"]
        size = int(man["image_size"])
        strong_model = strong_model or os.path.join(models_dir, man["strong"]["file"])
    except (KeyError, TypeError, ValueError) as exc:
        _fail(f"{os.path.join(models_dir, MANIFEST)}: missing or bad entry {exc}")
    out_path = out_path or os.path.join(models_dir, STRONG_ONNX_FILE)
    try:
        net, meta = strong_from_torchscript(strong_model)
    except ExportError as exc:
        _fail(exc)
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
        _fail(f"{path} not found: run `offload-train classifiers --out-dir {models_dir}` first")
    except (OSError, json.JSONDecodeError) as exc:
        _fail(f"{path}: not a classifiers manifest ({exc})")


@main.command()
@click.option("--models-dir", default=DEFAULT_OUT, show_default=True,
              type=click.Path(file_okay=False),
              help="Folder written by `offload-train classifiers` (models + classifiers.json).")
@click.option("--data-dir", default=None,
              help="Image data (default: the one the classifiers were trained from).")
@click.option("--weak-model", default=None, help="Weak .tflite (default: from --models-dir).")
@click.option("--strong-model", default=None, help="Strong TorchScript (default: from --models-dir).")
@click.option("--out", "out_path", default=None,
              help="Profile .npz to write (default: MODELS_DIR/profile.npz).")
@click.option("-k", "--top-k", "k", default=1, show_default=True, help="k of the top-k loss.")
@click.option("--edgetpu", type=click.Choice(["auto", "on", "off"]), default="off", show_default=True,
              help="Run the weak model on the Edge TPU (on), CPU (off), or whichever is there.")
@click.option("--max-profile", type=int, default=None,
              help="Profile at most this many images (quick runs; keeps split proportions).")
@click.option("--fig", "fig_path", default=None,
              help="Fig. 3 PNG (default: MODELS_DIR/fig3_entropy_metric.png).")
@click.option("--demo-dir", default=None,
              help="Write a demo clip of held-out test images here (default: MODELS_DIR/demo).")
@click.option("--demo-count", default=200, show_default=True, help="Frames in the demo clip (0: none).")
@click.option("--demo-fps", default=5.0, show_default=True, help="Frame rate of the demo video.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def profile(models_dir, data_dir, weak_model, strong_model, out_path, k, edgetpu, max_profile,
            fig_path, demo_dir, demo_count, demo_fps, quiet):
    """Profile the pair on held-out images, fit the metric, write breakdown and Fig. 3."""
    try:
        import torch  # noqa: F401
    except ImportError:
        _fail("offload-train needs the training extra: pip install torch==2.13.0 'offload[training]'")
    from offload.classifier import ClassifierError, EdgeTPUUnavailable, WeakClassifier
    from training.export import ExportError, load_strong
    from training.profiling import breakdown, build_profile, format_breakdown, plot_fig3, run_strong

    progress = not quiet
    t0 = time.time()
    man = _read_manifest(models_dir)
    try:
        data_dir = data_dir or man["data_dir"]
        size = int(man["image_size"])
        sp = man["split"]
        weak_model = weak_model or os.path.join(models_dir, man["weak"]["file"])
        strong_model = strong_model or os.path.join(models_dir, man["strong"]["file"])
    except (KeyError, TypeError, ValueError) as exc:
        _fail(f"{os.path.join(models_dir, MANIFEST)}: missing or bad entry {exc}")
    out_path = out_path or os.path.join(models_dir, "profile.npz")
    fig_path = fig_path or os.path.join(models_dir, "fig3_entropy_metric.png")
    demo_dir = demo_dir or os.path.join(models_dir, "demo")

    try:
        weak = WeakClassifier(weak_model, edgetpu={"auto": None, "on": True, "off": False}[edgetpu],
                              class_names=man.get("class_names"))
    except (ClassifierError, EdgeTPUUnavailable) as exc:
        _fail(exc)
    try:
        strong, meta = load_strong(strong_model)
    except ExportError as exc:
        _fail(exc)
    data = _load_data(data_dir, size, progress)
    try:
        split = make_split(data, fit_fraction=sp["fit_fraction"], val_fraction=sp["val_fraction"],
                           seed=sp["seed"], max_fit=sp.get("max_fit"), max_profile=max_profile)
    except DataError as exc:
        _fail(exc)
    except KeyError as exc:
        _fail(f"{os.path.join(models_dir, MANIFEST)}: split entry lacks {exc}")
    if np.intersect1d(split.fit, split.profile).size:  # pragma: no cover - make_split guarantees it
        _fail("internal error: profiled images overlap the classifiers' training images")
    if weak.n_classes != data.n_classes:
        _fail(f"{weak_model} has {weak.n_classes} outputs but the data have {data.n_classes} classes")
    images, labels = data.images[split.profile], data.labels[split.profile]
    click.echo(f"profiling {len(labels)} images ({data.source}); weak on "
               f"{'the Edge TPU' if weak.on_edgetpu else 'the CPU'}")

    _, zw = weak.classify_many(images, progress=progress)
    try:
        zs = run_strong(strong, images, size, progress=progress)
    except RuntimeError as exc:
        _fail(f"{strong_model}: cannot run on {size}x{size} images ({str(exc).splitlines()[0]})")
    if zs.ndim != 2 or zs.shape[1] != data.n_classes:
        _fail(f"{strong_model}: output shape {zs.shape} does not match {data.n_classes} classes")
    try:
        prof = build_profile(zw, zs, labels, split.profile_split, k=k,
                             source=f"offload-train profile: {data.source}; weak {os.path.basename(weak_model)} "
                                    f"(int8, LiteRT), strong {os.path.basename(strong_model)}")
    except ValueError as exc:
        _fail(f"metric fit failed: {exc}")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    prof.save(out_path, compress=True)

    table = breakdown(prof)
    text = format_breakdown(table, k)
    click.echo(text)
    summary = dict(
        profile=os.path.basename(out_path), k=k, images=prof.n, source=data.source,
        split_counts={name: int(np.sum(prof.split == code)) for code, name in
                      ((0, "train"), (1, "validation"), (2, "test"))},
        breakdown=table,
        metric=dict(tinv=prof.tinv, metric_mean=prof.metric_mean, metric_std=prof.metric_std,
                    entropy_range=[float(prof.lut_x[0]), float(prof.lut_x[-1])],
                    metric_range=[float(prof.lut_y.min()), float(prof.lut_y.max())]),
        weak_on_edgetpu=weak.on_edgetpu,
    )
    base = os.path.splitext(out_path)[0]
    atomic_write_json(base + "_breakdown.json", summary)
    atomic_write_text(base + "_breakdown.txt", text + "\n")
    plot_fig3(prof, fig_path)
    click.echo(f"calibrated tinv={prof.tinv:.4f}; wrote {out_path}, {base}_breakdown.json, {fig_path}")

    if demo_count > 0:
        from training.demo import write_demo

        tests = np.flatnonzero(prof.split == 2)
        n_demo = write_demo(demo_dir, images, labels, tests, prof, data.class_names,
                            count=demo_count, fps=demo_fps, seed=sp["seed"])
        click.echo(f"wrote a demo clip of {n_demo} held-out test images to {demo_dir}")
    click.echo(f"done in {time.time() - t0:.0f} s")


# --------------------------------------------------------------------------- dqn


def default_profile():
    """The committed real profile (``artifacts/profile.npz``, found by ``offload.artifacts``)."""
    from offload import artifacts

    return artifacts.find("profile.npz")


def _outputs(out):
    base = os.path.splitext(out)[0]
    return base + ".json", base + ".png", base + ".ckpt"


def _setting_option(field, preset_keys):
    """The click option of one ``DQNConfig`` field, from its declaration (``dqn.settings``).

    A field some preset sets defaults to ``None``: not given, it keeps the
    preset's value. The others default to the field's value (or the
    command line's own default word, e.g. ``auto``), shown in ``--help``.
    """
    from training.dqn.settings import setting_info

    info = setting_info(field)
    flags = info["flags"] or ("--" + field.name.replace("_", "-"),)
    words = list(info["choices"] or ())
    if info["auto"]:
        words.insert(0, info["auto"])
    bound = info["bound"]
    if words:
        kind = click.Choice(words)
    elif bound is not None:
        rng = click.IntRange if isinstance(field.default, int) else click.FloatRange
        kind = rng(bound.lo, bound.hi, min_open=bound.lo_open, max_open=bound.hi_open)
    else:
        kind = type(field.default)
    default = info["cli_default"]
    if default is None and field.name not in preset_keys:
        default = {v: w for w, v in (info["choices"] or {}).items()}.get(field.default,
                                                                         field.default)
    return click.option(*flags, field.name, type=kind, default=default,
                        show_default=default is not None, help=info["help"])


def _dqn_options(command):
    """The preset, output and run options, then one option per ``DQNConfig`` setting.

    The settings' options are generated from ``DQNConfig``'s declarations
    (help, bounds, choices, names): ``None`` (not given) keeps the preset's value.
    """
    import dataclasses

    from training.dqn.settings import PRESETS, DQNConfig, setting_info

    preset_keys = {k for values in PRESETS.values() for k in values}
    opts = [
        click.option("--preset", type=click.Choice(list(PRESETS)), default="quick",
                     show_default=True,
                     help="quick: the quality bar in under 10 minutes on 2 cores; paper: the "
                          "published schedule (4,000 iterations, ~6.55e7 tuples)."),
        click.option("--out", "out", default="dqn.bin", show_default=True,
                     type=click.Path(dir_okay=False),
                     help="Policy blob to write; the report (.json), validation curve (.png) "
                          "and checkpoint (.ckpt) go beside it."),
        *[_setting_option(f, preset_keys) for f in dataclasses.fields(DQNConfig)
          if setting_info(f)["cli"]],
        click.option("--checkpoint", type=click.Path(dir_okay=False),
                     help="Checkpoint file (default: beside --out, .ckpt)."),
        click.option("--resume", is_flag=True, help="Continue from the checkpoint."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    for opt in reversed(opts):
        command = opt(command)
    return command


def _config_values(settings, arrivals):
    """``DQNConfig`` overrides from the generated options' values (words -> values)."""
    import dataclasses

    from training.dqn.settings import DQNConfig, resolve_interarrival, setting_info

    values = {}
    for f in dataclasses.fields(DQNConfig):
        if f.name not in settings:
            continue
        v, choices = settings[f.name], setting_info(f)["choices"]
        if f.name == "interarrival":
            v = resolve_interarrival(v if v == "auto" else choices[v], arrivals)
        elif choices and v is not None:
            v = choices[v]
        values[f.name] = v
    return values


class _DQNConsole:
    """``offload-train dqn``'s progress bars and messages (a ``training.dqn.Hooks``)."""

    def __init__(self, quiet, checkpoint):
        self.quiet, self.checkpoint = quiet, checkpoint
        self.bar = self.tbar = None
        self.last_val = float("nan")

    def started(self, trainer, resumed):
        if resumed:
            click.echo(f"resumed from {self.checkpoint} at iteration {trainer.iteration}",
                       err=True)
        click.echo(f"validation: MDP {trainer.val_mdp:.5f}, Baseline {trainer.val_base:.5f} "
                   f"reward per image", err=True)
        self.bar = tqdm(total=trainer.cfg.iterations, initial=trainer.iteration, unit="it",
                        desc="dqn", disable=True if self.quiet else None, dynamic_ncols=True)

    def iteration(self, p):
        if p.val_dqn == p.val_dqn:
            self.last_val = p.val_dqn
        self.bar.set_postfix_str(f"loss {p.loss:.4g} lr {p.lr:.1e} val dqn {self.last_val:.5f} "
                                 f"mdp {p.val_mdp:.5f}", refresh=False)
        self.bar.update(1)

    def trained(self, trainer):
        self.bar.close()
        click.echo(f"training: {trainer.stopped_by} after {trainer.iteration} iterations, "
                   f"{trainer.train_seconds:.0f} s; best validation {trainer.best_val:.5f} at "
                   f"iteration {trainer.best_iteration}", err=True)

    def tuning(self, i, n, val):
        if self.tbar is None:
            self.tbar = tqdm(total=n, unit="it", desc="int8 tuning",
                             disable=True if self.quiet else None, dynamic_ncols=True)
        if val == val:
            self.tbar.set_postfix_str(f"val dqn {val:.5f}", refresh=False)
        self.tbar.update(1)

    def tuned(self, t):
        if self.tbar is not None:
            self.tbar.close()
        click.echo(f"int8 tuning: {t['iterations']} iterations, {t['seconds']:.0f} s; validation "
                   f"{t['val_before']:.5f} trained, {t['val_rounded']:.5f} with weights rounded, "
                   f"{t['val_best']:.5f} best on the grid (iteration {t['best_iteration']})",
                   err=True)

    def testing(self):
        click.echo("test: running every policy on the test split...", err=True)


def _echo_test_table(rows, extra):
    cols = ["policy", "avg_loss", "mean_reward", "offload_rate", "share_of_oracle-metric_gain",
            "share_of_ceiling_gain"]
    cells = [[f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
             for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    a = extra["int8_agreement"]
    click.echo(f"int8 vs float: {100 * a['n_ge_P']:.2f}% of decisions with n >= P agree "
               f"({100 * a['all']:.2f}% of all); avg loss int8 - float = "
               f"{extra['int8_minus_float_avg_loss']:+.5f}")


def _dqn_profile(profile_path):
    """``(path to load, label for the blob and report)``: the committed profile by default."""
    from click.core import ParameterSource

    synthetic_asked = (click.get_current_context().get_parameter_source("synthetic")
                       == ParameterSource.COMMANDLINE)
    if profile_path is not None or synthetic_asked:  # --synthetic N alone: a synthetic profile
        return profile_path, profile_path
    path = default_profile()
    if path is None:
        _fail("no --profile given and the committed artifacts/profile.npz was not found")
    # The blob's provenance names the committed profile, not this machine's path to it.
    return path, "artifacts/profile.npz"


@main.command()
@scenario_options
@_dqn_options
def dqn(profile_path, synthetic, rate, depth, choice, spread, rprob, arrivals, markov, seed,
        preset, out, checkpoint, resume, quiet, **settings):
    """Train a DQN offloading policy and write it as a policy blob.

    Trains on the profile's training images (validating on its validation
    split, or on a held-out share of training when it has none), then reports
    every policy on the test split. Without --profile it uses the committed
    Fashion-MNIST profile (with --synthetic N alone, a synthetic profile of N
    images). Ctrl+C stops cleanly and keeps the best policy.
    """
    try:
        import torch  # noqa: F401
    except ImportError:
        _fail("offload-train needs the training extra: pip install torch==2.13.0 'offload[training]'")
    from offload.cli import load_scenario
    from training import dqn as D

    profile_path, profile_label = _dqn_profile(profile_path)
    scenario, prof, _, _, _ = load_scenario(profile_path, synthetic, rate, depth, choice, spread,
                                            rprob, arrivals, markov, seed)
    try:
        cfg = D.preset(preset, **_config_values(settings, arrivals), seed=seed)
        data = D.prepare_data(prof, cfg.holdout, seed)
    except ValueError as exc:
        _fail(exc)
    report_path, png_path, default_ckpt = _outputs(out)
    checkpoint = checkpoint or default_ckpt
    if not resume and os.path.exists(checkpoint):
        _fail(f"{checkpoint} exists from an earlier run: add --resume to continue it, "
              "or remove it to start over")
    click.echo(f"dqn: bucket r={rate} b={depth} -> {scenario.bucket}; {choice}, "
               f"{arrivals} arrivals; T={cfg.T}, inter-arrival inputs "
               f"{'on' if cfg.interarrival else 'off'}; preset {preset}; validation on the "
               f"{data.val_source}", err=True)
    meta = {"name": "dqn", "rate": rate, "depth": depth,
            "profile": profile_label or f"synthetic({synthetic})", "choice": choice,
            "arrivals": arrivals}
    files = {"policy": out, "curve_png": png_path, "checkpoint": checkpoint}
    try:
        run = D.train_policy(data, scenario, cfg, prof, meta=meta, checkpoint=checkpoint,
                             resume=resume, blob_path=out, progress=not quiet,
                             provenance={"profile_path": profile_label, "preset": preset,
                                         "files": files},
                             hooks=_DQNConsole(quiet, checkpoint))
    except D.TestInterrupted:
        click.echo(f"interrupted during the test report: {out} holds the trained policy; the "
                   "same command plus --resume continues from the checkpoint and then reports",
                   err=True)
        raise SystemExit(130) from None
    except ValueError as exc:  # bad generator parameters, damaged or mismatched checkpoint
        _fail(exc)
    atomic_write_json(report_path, run.report)
    D.plot_curve(run.trainer, png_path, title=f"DQN validation: {choice}, {arrivals} arrivals, "
                                              f"r={rate}, b={depth}")
    if run.rows:
        _echo_test_table(run.rows, run.extra)
    click.echo(f"wrote {out}, {report_path}, {png_path}; checkpoint {checkpoint}", err=True)
    if run.interrupted:
        click.echo("interrupted: the blob holds the best policy so far; continue with the same "
                   "command plus --resume", err=True)
        raise SystemExit(130)


# --------------------------------------------------------------------------- sweep


@main.command()
@click.argument("grid")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Sweep folder: points/<id>.json and .bin, results.csv, results.json. "
                   "A rerun into it skips finished points.")
@click.option("--scale", type=click.Choice(["smoke", "quick", "paper"]), default="quick",
              show_default=True,
              help="paper: the figure's full grid, published schedule; quick: a reduced grid, "
                   "at most 240 s of training per point; smoke: the quick grid in seconds "
                   "(tests).")
@click.option("--workers", type=click.IntRange(1), default=None,
              help="Points run at once in local processes (default: the number of cores; "
                   "1: in this process).")
@click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
              help="Run the points as tasks on the Ray cluster at ADDRESS (e.g. "
                   "127.0.0.1:6379 or auto) instead; needs the ray extra.")
@click.option("--profile", "profile_path", type=click.Path(dir_okay=False), default=None,
              help="Profile .npz in any layout offload-sim reads (this project's, or the MDP "
                   "or DQN paper's); default: the committed artifacts/profile.npz.")
@click.option("--synthetic", type=click.IntRange(20), default=None,
              help="Without --profile: a synthetic profile of this many images.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0),
              help="Seed of every point that does not set its own.")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="torch threads per point (default: cores // workers; 1 with --ray).")
@click.option("--list", "list_only", is_flag=True, help="Print the grid's points and exit.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def sweep(grid, out_dir, scale, workers, ray_address, profile_path, synthetic, seed, threads,
          list_only, quiet):
    """Train and evaluate a DQN at every point of GRID; one results table.

    GRID is a ready-made grid (fig5, fig6, fig8, fig9, fig11, fig12: the
    paper's evaluation figures) or a TOML file (docs/sweeps.md). Every point
    trains a DQN and tests it with MDP, Baseline, Lower bound, both oracles
    and the structure-aware ceiling on the same test sequences. A failed point
    is recorded with its error and retried by the next run; Ctrl+C keeps every
    finished point, and the same command resumes.
    """
    try:
        import torch  # noqa: F401
    except ImportError:
        _fail("offload-train needs the training extra: pip install torch==2.13.0 'offload[training]'")
    from training import sweep as S

    try:
        g = S.load_grid(grid, scale)
        pts = S.points(g, seed)
    except S.GridError as exc:
        _fail(exc)
    try:
        for pt in pts:  # the DQN settings of every point, against the scale's schedule
            S.scale_config(scale, pt)
    except S.GridError as exc:
        _fail(f"{g.source}: {exc}")
    if list_only:
        for pt in pts:
            click.echo(f"{pt.id}\t{', '.join(pt.parts)}")
        click.echo(f"{len(pts)} points", err=True)
        return
    prof, label = _sweep_profile(profile_path, synthetic, seed)
    t0 = time.time()
    try:
        res = S.run_sweep(g, out_dir, scale, prof, label, workers=workers,
                          ray_address=ray_address, seed=seed, threads=threads,
                          progress=not quiet, echo=lambda m: click.echo(m, err=True))
    except S.GridError as exc:
        _fail(exc)
    click.echo(f"sweep {g.name}: {res.skipped + res.done} of {res.total} points finished "
               f"({res.done} now, {res.skipped} before), {res.failed} failed, "
               f"{time.time() - t0:.0f} s; table {os.path.join(out_dir, 'results.csv')}",
               err=True)
    if res.interrupted:
        click.echo("interrupted: finished points are kept; the same command resumes", err=True)
        raise SystemExit(130)
    if res.failed:
        _fail(f"{res.failed} point(s) failed (their errors are in "
              f"{os.path.join(out_dir, 'results.csv')}); the same command retries them")


def _sweep_profile(profile_path, synthetic, seed):
    """``(profile, label)``: --profile, else --synthetic N, else the committed profile."""
    from offload.profile import read_profile

    if profile_path is None and synthetic:
        from offload.synthetic import synthetic_profile

        return synthetic_profile(synthetic, seed=seed), f"synthetic({synthetic})"
    label = profile_path
    if profile_path is None:
        profile_path = default_profile()
        label = "artifacts/profile.npz"
        if profile_path is None:
            _fail("no --profile given and the committed artifacts/profile.npz was not found")
    try:
        return read_profile(profile_path), label
    except (OSError, ValueError) as exc:
        _fail(exc)


# --------------------------------------------------------------------------- plot


@main.command()
@click.argument("results", type=click.Path(exists=True))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for the PNG figures (one per grid part).")
@click.option("--oracle", is_flag=True, help="Also draw the true-reward oracle (far below the "
                                             "others: it squeezes their lines).")
@click.option("--dpi", default=120, show_default=True, type=click.IntRange(30, 600))
def plot(results, out_dir, oracle, dpi):
    """Figures of a sweep's RESULTS (results.json, results.csv or the sweep folder).

    Average loss against the swept parameter, one line per policy (DQN int8,
    MDP, Baseline, Lower bound, metric-only oracle, ceiling), one figure per
    grid part and one panel per value of its other axes.
    """
    from training import figures as F

    try:
        rows, meta = F.read_results(results)
    except ValueError as exc:
        _fail(exc)
    figs = F.results_figures(rows, meta, oracle=oracle)
    if not figs:
        _fail(f"{results}: no finished points to plot")
    prefix = meta.get("grid", "sweep")
    for name, fig in figs:
        path = os.path.join(out_dir, f"{prefix}-{name}.png")
        F.save_png(fig, path, dpi)
        click.echo(f"wrote {path}", err=True)


# --------------------------------------------------------------------------- trace


def _trace_policy(spec, prof, m, tr, st, scenario):
    """``(label, SimResult with trace, thresholds or None)`` of ``[LABEL=]mdp|baseline|BLOB``."""
    from offload import blob, policies, simulate

    bucket = scenario.bucket
    label, _, what = spec.rpartition("=")
    if not label:
        label = {"mdp": "MDP", "baseline": "Baseline"}.get(what) or \
            os.path.splitext(os.path.basename(what))[0]
    if what == "mdp":
        theta = policies.mdp_thresholds(m[tr], prof.reward[tr], bucket,
                                        interarrival=scenario.training_arrivals())
        return label, simulate.run_thresholds(theta, st, bucket, trace=True, name=label), theta
    if what == "baseline":
        theta = policies.baseline_threshold(m[tr], scenario.rate, st.mean_interarrival)
        return label, simulate.run_thresholds(theta, st, bucket, trace=True, name=label), theta
    if not os.path.isfile(what):
        _fail(f"--policy {spec!r}: neither mdp, baseline nor a policy blob file")
    try:
        pol = blob.read_blob(what)
    except blob.BlobError as exc:
        _fail(exc)
    if pol.bucket != bucket:
        _fail(f"{what}: policy was made for bucket (N, P, M) = ({pol.N}, {pol.P}, {pol.M}), "
              f"this trace uses ({bucket.N}, {bucket.P}, {bucket.M})")
    theta = pol.theta if pol.kind == "thresholds" else None
    return label, simulate.run_policy(pol, st, trace=True, name=label), theta


@main.command()
@scenario_options
@click.option("--policy", "policy_specs", multiple=True,
              help="[LABEL=]mdp, baseline or a policy blob (e.g. a sweep's points/<id>.bin); "
                   "give two (default: mdp and baseline).")
@click.option("--length", default=10000, show_default=True, type=click.IntRange(1),
              help="Images in the stream.")
@click.option("--window", default=300, show_default=True, type=click.IntRange(10),
              help="Images to plot.")
@click.option("--start", default=None, type=click.IntRange(0),
              help="First image plotted; default: where the two policies' offload counts "
                   "differ most.")
@click.option("--out", default="docs/img/trace.png", show_default=True,
              type=click.Path(dir_okay=False), help="PNG to write (atomically).")
@click.option("--dpi", default=110, show_default=True, type=click.IntRange(30, 600))
def trace(profile_path, synthetic, rate, depth, choice, spread, rprob, arrivals, markov, seed,
          policy_specs, length, window, start, out, dpi):
    """Two policies' decisions on a window of one simulated stream (Figs. 7, 10, 11).

    Builds the same profile, bucket and test stream as offload-sim (same
    options and defaults) and draws each image's metric, marked by which
    policy offloaded it, each policy's token count, and the decisions.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        _fail("matplotlib is needed: pip install matplotlib")
    from offload.cli import load_scenario
    from training import figures as F

    specs = list(policy_specs) or ["mdp", "baseline"]
    if len(specs) != 2:
        _fail(f"--policy: give two policies to compare, got {len(specs)}")
    if window > length:
        _fail(f"--window {window} is longer than --length {length}")
    if start is not None and start + window > length:
        _fail(f"--start {start} + --window {window} exceeds --length {length}")
    sc, prof, m, tr, te = load_scenario(profile_path, synthetic, rate, depth, choice, spread,
                                        rprob, arrivals, markov, seed)
    N, P, M = sc.bucket
    try:
        st = sc.streams(m[te], prof.reward[te], prof.weak_loss[te], length=length, n_seq=1,
                        raw_metric=prof.metric[te], hidden=True)
        runs = [_trace_policy(s, prof, m, tr, st, sc) for s in specs]
    except ValueError as exc:
        _fail(exc)
    (n0, r0, th0), (n1, r1, th1) = runs
    if n0 == n1:
        n0, n1 = n0 + " (1)", n1 + " (2)"
    if start is None:
        start = F.busiest_window(r0.decisions[0], r1.decisions[0], window)
    sl = slice(start, start + window)
    seg = {"k": np.arange(start, start + window), "metric": st.metric[0, sl],
           "dec0": r0.decisions[0, sl], "dec1": r1.decisions[0, sl],
           "tok0": r0.tokens[0, sl].astype(float), "tok1": r1.tokens[0, sl].astype(float)}
    if arrivals == "markov":
        seg["state"] = st.arrival_state[0, sl]
    rew = [float(st.reward[0, sl][seg[f"dec{i}"] == 1].sum()) for i in (0, 1)]
    title = (f"r={rate}, b={depth} (N, P, M = {N}, {P}, {M}), {choice}"
             + (f" sp={spread} rprob={rprob}" if choice == "location-reset" else "")
             + f", {arrivals} arrivals"
             + (f" {' '.join(map(str, markov))}" if arrivals == "markov" else "")
             + f", seed {seed}\nimages {start}-{start + window - 1}: "
             f"{n0} {int(seg['dec0'].sum())} offloads (reward {rew[0]:+.0f}), "
             f"{n1} {int(seg['dec1'].sum())} (reward {rew[1]:+.0f})")
    fig = F.trace_figure(seg, (n0, n1), P, M, title,
                         thresholds={n: th for n, th in ((n0, th0), (n1, th1)) if th is not None})
    F.save_png(fig, out, dpi)
    click.echo(f"wrote {out} (images {start}..{start + window - 1} of stream 0)", err=True)


if __name__ == "__main__":  # pragma: no cover
    main(prog_name="offload-train")
