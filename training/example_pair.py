"""``offload-train example-pair``: a second classifier pair with the conventions of real zoo models.

The committed pair is greyscale, 28x28 / 14x14, ``[0, 1]`` pixels. This one
is made with the conventions a user's own pair has (docs/your-own-models.md):

- images: RGB PNG files written to disk as an ImageFolder tree, 72 x 96
  pixels (H x W): each Fashion-MNIST garment tinted with a random colour on a
  random-colour, noisy background (colours independent of the class), with
  random stripes in the side margins that a centre crop removes;
- weak model: ``.tflite``, RGB 64x64 (the paper's weak input size), input
  resized by stretching, **uint8 input tensor quantised as (q - 128) / 128**
  (a Coral zoo model's ``[-1, 1]``: its card says ``normalization = "tensor"``);
- strong model: ONNX, RGB 64x64 float input, the centre 72x72 crop of the
  image resized, **per-channel mean/std** (ImageNet's, in pixel units);
- a labels file (``id label``) and each model's card as a sidecar TOML
  (``<model>.card.toml``), read by :func:`offload.card.read_card`.

Both models are trained on the PNG files read back from disk, each through
:func:`offload.preprocess.to_input` with the card it is deployed with, so the
training pixels are the device's and the server's. The weak one trains on
``(pixel - 128) / 128`` floats, what its uint8 tensor means.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import click
import numpy as np

from offload.commandline import fail, require_torch

__all__ = ["example_pair", "make_colour_images", "write_tree", "CLASS_FOLDERS", "IMAGE_SIZE",
           "WEAK_CARD", "STRONG_CARD", "WEAK_INPUT_SCALE", "WEAK_INPUT_ZERO_POINT", "LAYOUT"]

#: Class folder names (Fashion-MNIST's classes; "/" cannot be in a folder name).
CLASS_FOLDERS = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot")
#: Written image size, pixels (height, width): wider than tall, so a centre crop matters.
IMAGE_SIZE = (72, 96)
#: The weak input tensor's quantisation: real value = (q - 128) / 128, q = pixel.
WEAK_INPUT_SCALE, WEAK_INPUT_ZERO_POINT = 1.0 / 128.0, 128
#: The cards written beside the models (offload.card fields; labels added at export).
WEAK_CARD = dict(height=64, width=64, channels=3, order="rgb", normalization="tensor",
                 resize="stretch")
STRONG_CARD = dict(height=64, width=64, channels=3, order="rgb", normalization="meanstd",
                   mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], resize="crop")
#: What the command writes under --out.
LAYOUT = dict(train="images/train", profile="images/profile", labels="labels.txt",
              weak="weak.tflite", strong="strong.onnx", manifest="example_pair.json")


def make_colour_images(grey, *, rng, size=IMAGE_SIZE):
    """Tinted RGB versions ``(n, H, W, 3)`` uint8 of greyscale garments ``(n, 28, 28)``.

    The garment (its grey level as the mask) is scaled to 2x, placed at the
    centre with a random shift of up to 4 pixels, painted in a random colour
    over a random background colour (each channel of the garment's colour is
    the background's plus 96..160, modulo 256, so it always stands out); the
    background has Gaussian noise and the side margins random vertical stripes.
    """
    import cv2

    h, w = size
    n = len(grey)
    out = np.empty((n, h, w, 3), dtype=np.uint8)
    for i in range(n):
        mask = cv2.resize(grey[i], (56, 56), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255
        bg = rng.integers(0, 256, 3)
        fg = (bg + rng.integers(96, 161, 3)) % 256
        img = np.broadcast_to(bg.astype(np.float32), (h, w, 3)).copy()
        img += rng.normal(0.0, 10.0, (h, w, 3))
        margin = (w - h) // 2
        for x0 in rng.integers(0, margin - 2, 3).tolist() + (w - 1 - rng.integers(0, margin - 2, 3)).tolist():
            img[:, max(0, x0 - 1):x0 + 2] = rng.integers(0, 256, 3)
        dy, dx = rng.integers(-4, 5, 2)
        y0, x0 = (h - 56) // 2 + dy, (w - 56) // 2 + dx
        patch = img[y0:y0 + 56, x0:x0 + 56]
        img[y0:y0 + 56, x0:x0 + 56] = patch * (1 - mask[..., None]) + fg * mask[..., None]
        out[i] = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return out


def write_tree(root, images_rgb, labels, *, class_folders=CLASS_FOLDERS, progress=True):
    """Write RGB images as PNG files ``root/<class folder>/<class>_<n>.png`` (an ImageFolder tree)."""
    import cv2
    from tqdm import tqdm

    for c in sorted(set(int(y) for y in labels)):
        os.makedirs(os.path.join(root, class_folders[c]), exist_ok=True)
    for i in tqdm(range(len(labels)), desc=f"write {os.path.basename(root)}", unit="img",
                  disable=not progress, mininterval=0.5):
        name = class_folders[int(labels[i])]
        path = os.path.join(root, name, f"{name}_{i:06d}.png")
        if not cv2.imwrite(path, cv2.cvtColor(images_rgb[i], cv2.COLOR_RGB2BGR)):
            raise OSError(f"{path}: cannot write the image")


def _pick(labels, per_class, rng):
    """Indices of ``per_class`` images of each class, seeded, in index order."""
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class]
                                   for c in range(len(CLASS_FOLDERS))]))


def _write_images(tmp, data_dir, per_class, profile_per_class, seed, progress):
    """The two ImageFolder trees: training images from the train file, profiled from t10k."""
    from training.data import DataError, load_idx_dir

    try:
        data = load_idx_dir(data_dir)
    except DataError as exc:
        fail(exc)
    if data.n_classes != len(CLASS_FOLDERS):
        fail(f"{data_dir}: {data.n_classes} classes, the example pair needs Fashion-MNIST's 10")
    rng = np.random.default_rng(seed)
    for part, test, count in (("train", False, per_class), ("profile", True, profile_per_class)):
        pool = np.flatnonzero(data.is_test == test)
        idx = pool[_pick(data.labels[pool], count, rng)]
        rgb = make_colour_images(data.images[idx], rng=rng)
        write_tree(os.path.join(tmp, LAYOUT[part]), rgb, data.labels[idx], progress=progress)


def _write_card(path, fields, labels_file):
    """A sidecar card TOML (hand-written: only strings, numbers and lists of numbers)."""
    from offload.atomic import atomic_write_text

    def value(v):
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(repr(float(x)) for x in v) + "]"
        return repr(v)

    lines = [f"# model card of {os.path.basename(path)[:-len('.card.toml')]} "
             "(offload.card; written by offload-train example-pair)"]
    lines += [f"{k} = {value(v)}" for k, v in fields.items()]
    lines.append(f"labels_file = {json.dumps(labels_file)}")
    atomic_write_text(path, "\n".join(lines) + "\n")


def _tensors(root, card, *, progress):
    """``(x float32 torch (n, C, H, W), labels)``: the PNG files under ``root`` through ``card``."""
    import torch
    from tqdm import tqdm

    from offload.preprocess import to_input
    from training.data import list_labelled_images, read_image_file

    files = list_labelled_images(root, class_names=list(CLASS_FOLDERS))
    x = np.concatenate([to_input(read_image_file(p), card, layout="NCHW")
                        for p in tqdm(files.paths, desc=f"read {root}", unit="img",
                                      disable=not progress, mininterval=0.5)])
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), files.labels


def _weak_training_card():
    """The weak card as float training sees it: what the uint8 tensor means, (pixel - 128) / 128."""
    from offload.card import ModelCard

    fields = {k: v for k, v in WEAK_CARD.items() if k != "normalization"}
    return ModelCard(**fields, normalization="meanstd", mean=(float(WEAK_INPUT_ZERO_POINT),),
                     std=(1.0 / WEAK_INPUT_SCALE,))


def _strong_card():
    from offload.card import ModelCard

    return ModelCard(**{k: tuple(v) if isinstance(v, list) else v for k, v in STRONG_CARD.items()})


def _train_and_export(tmp, *, weak_width, strong_width, weak_epochs, strong_epochs, batch_size,
                      calib_images, seed, progress):
    """Train both models on the written training tree, export them with their cards."""
    import torch

    from training.export import ExportError, export_strong_onnx, export_weak_int8, uint8_input
    from training.models import build_strong, build_weak, count_params
    from training.train import train_classifier

    train_dir = os.path.join(tmp, LAYOUT["train"])
    xw, y = _tensors(train_dir, _weak_training_card(), progress=progress)
    xs, _ = _tensors(train_dir, _strong_card(), progress=progress)
    n = len(CLASS_FOLDERS)
    torch.manual_seed(seed)  # the initial weights too: same command, same models
    weak = build_weak(WEAK_CARD["height"], n, weak_width, in_channels=3)
    train_classifier(weak, xw, y, epochs=weak_epochs, batch_size=batch_size, seed=seed,
                     desc="weak", progress=progress)
    strong = build_strong(STRONG_CARD["height"], n, strong_width, in_channels=3)
    train_classifier(strong, xs, y, epochs=strong_epochs, batch_size=batch_size, seed=seed + 1,
                     augment=True, desc="strong", progress=progress)
    weak_path, strong_path = (os.path.join(tmp, LAYOUT[k]) for k in ("weak", "strong"))
    calib = xw[torch.randperm(len(xw), generator=torch.Generator().manual_seed(seed))[:calib_images]]
    lo = -WEAK_INPUT_ZERO_POINT * WEAK_INPUT_SCALE
    try:
        export_weak_int8(weak, calib, weak_path, input_range=(lo, lo + 255 * WEAK_INPUT_SCALE))
        report = uint8_input(weak_path)
        meta = export_strong_onnx(strong, strong_path, class_names=list(CLASS_FOLDERS),
                                  size=STRONG_CARD["height"], channels=3, check_x=xs[:256],
                                  preprocessing=f"see {LAYOUT['strong']}.card.toml")
    except ExportError as exc:
        fail(exc)
    got = (report["input"]["dtype"], report["input"]["scale"], report["input"]["zero_point"])
    if got != ("uint8", WEAK_INPUT_SCALE, WEAK_INPUT_ZERO_POINT):  # pragma: no cover - fixed range
        fail(f"{weak_path}: input tensor is {got}, not uint8 (q - 128) / 128")
    _write_card(weak_path + ".card.toml", WEAK_CARD, LAYOUT["labels"])
    _write_card(strong_path + ".card.toml", STRONG_CARD, LAYOUT["labels"])
    return dict(weak=dict(file=LAYOUT["weak"], width=weak_width, epochs=weak_epochs,
                          params=count_params(weak), tflite=report),
                strong=dict(file=LAYOUT["strong"], width=strong_width, epochs=strong_epochs,
                            params=count_params(strong), max_abs_diff_vs_torch=meta["check"]["max_abs_diff"]))


def _evaluate(tmp, progress):
    """Top-1 accuracy of the exported files on the profiled tree, run as device and server run them."""
    from offload.card import read_card
    from offload.classifier import WeakClassifier
    from offload.server.model import StrongModel
    from training.data import list_labelled_images, read_image_file

    weak_path, strong_path = (os.path.join(tmp, LAYOUT[k]) for k in ("weak", "strong"))
    weak = WeakClassifier(weak_path, edgetpu=False, card=read_card(weak_path))
    strong = StrongModel(strong_path, card=read_card(strong_path), threads=1)
    files = list_labelled_images(os.path.join(tmp, LAYOUT["profile"]), class_names=list(CLASS_FOLDERS))
    images = [read_image_file(p) for p in files.paths]
    zw = weak.classify_many(images, progress=progress)[1]
    zs = np.concatenate([strong.classify(images[b:b + 256]) for b in range(0, len(images), 256)])
    return dict(images=len(images), weak_int8=float(np.mean(zw.argmax(1) == files.labels)),
                strong_onnx=float(np.mean(zs.argmax(1) == files.labels)))


@click.command("example-pair")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder to create (must not exist yet): image trees, labels, models, cards.")
@click.option("--data-dir", default=None, help="Fashion-MNIST IDX files (default: Debian's).")
@click.option("--per-class", default=300, show_default=True, help="Training images per class.")
@click.option("--profile-per-class", default=200, show_default=True,
              help="Held-out images per class (the tree `offload-train profile --images` reads).")
@click.option("--weak-width", default=4, show_default=True, help="Weak CNN base channels.")
@click.option("--strong-width", default=16, show_default=True, help="Strong CNN base channels.")
@click.option("--weak-epochs", default=3, show_default=True)
@click.option("--strong-epochs", default=5, show_default=True)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--calib-images", default=300, show_default=True,
              help="Training images that calibrate the int8 quantisation.")
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=2, show_default=True, help="torch CPU threads.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def example_pair(out_dir, data_dir, per_class, profile_per_class, weak_width, strong_width,
                 weak_epochs, strong_epochs, batch_size, calib_images, seed, threads, quiet):
    """Make a second pair with zoo conventions: RGB images on disk, uint8 [-1, 1] weak, mean/std crop strong."""
    require_torch()
    from training.data import FASHION_MNIST_DIR
    from training.train import set_threads

    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        fail(f"{out_dir} exists and is not empty; choose a new --out")
    if min(per_class, profile_per_class) < 1:
        fail("--per-class and --profile-per-class must be at least 1")
    set_threads(threads)
    t0, progress = time.time(), not quiet
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(os.path.abspath(out_dir)) + ".", dir=parent)
    try:  # built beside the target and renamed at the end: never a half-made pair
        _write_images(tmp, data_dir or FASHION_MNIST_DIR, per_class, profile_per_class, seed, progress)
        from offload.atomic import atomic_write_json, atomic_write_text

        atomic_write_text(os.path.join(tmp, LAYOUT["labels"]),
                          "".join(f"{i} {c}\n" for i, c in enumerate(CLASS_FOLDERS)))
        models = _train_and_export(tmp, weak_width=weak_width, strong_width=strong_width,
                                   weak_epochs=weak_epochs, strong_epochs=strong_epochs,
                                   batch_size=batch_size, calib_images=calib_images, seed=seed,
                                   progress=progress)
        accuracy = _evaluate(tmp, progress)
        manifest = dict(layout=LAYOUT, image_size=list(IMAGE_SIZE), weak_card=WEAK_CARD,
                        strong_card=STRONG_CARD, per_class=per_class,
                        profile_per_class=profile_per_class, seed=seed, accuracy=accuracy,
                        seconds=round(time.time() - t0, 1), **models)
        atomic_write_json(os.path.join(tmp, LAYOUT["manifest"]), manifest)
        os.chmod(tmp, 0o755)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    click.echo(f"weak int8 accuracy (LiteRT, uint8 input): {100 * accuracy['weak_int8']:.2f}%; "
               f"strong accuracy (ONNX Runtime): {100 * accuracy['strong_onnx']:.2f}% "
               f"on {accuracy['images']} held-out images")
    click.echo(f"wrote {out_dir}: {LAYOUT['train']}/, {LAYOUT['profile']}/, {LAYOUT['labels']}, "
               f"{LAYOUT['weak']} (+ .card.toml), {LAYOUT['strong']} (+ .card.toml), "
               f"{LAYOUT['manifest']} in {time.time() - t0:.0f} s")
