"""Image data for the classifier pair: IDX files (Fashion-MNIST) or a folder per class.

Both sources give a :class:`ImageSet`: greyscale uint8 images at one size,
integer labels, class names, and which images come from the source's own test
set. :func:`make_split` then assigns every image one role (see
``docs/classifiers.md``):

- ``fit``: trains (and int8-calibrates) the classifiers;
- profile ``train`` (code 0) / ``validation`` (1): images from the source's
  training pool that the classifiers never saw;
- profile ``test`` (2): the source's test set.

Torch-free on purpose, so that the profile step and the tests can use it
without the training extra.
"""

from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "DataError",
    "ImageSet",
    "Split",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "IDX_FILES",
    "read_idx",
    "write_idx",
    "load_idx_dir",
    "load_image_folder",
    "load_images",
    "make_split",
    "LabelledFiles",
    "label_key",
    "list_labelled_images",
    "read_image_file",
    "SPLIT_TRAIN",
    "SPLIT_VALIDATION",
    "SPLIT_TEST",
]

#: Where Debian's ``dataset-fashion-mnist`` package installs the IDX files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
#: The four IDX files of an MNIST-style data set (each may also end in ``.gz``).
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".webp")

#: Profile split codes (stored in the profile's ``split`` array).
SPLIT_TRAIN, SPLIT_VALIDATION, SPLIT_TEST = 0, 1, 2

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(ValueError):
    """Missing, unreadable or malformed image data (one clear message, no traceback in the CLI)."""


@dataclass
class ImageSet:
    """Greyscale images with labels.

    Attributes
    ----------
    images : ndarray of uint8, shape (n, H, W)
    labels : ndarray of int64, shape (n,)
    class_names : list of str
    is_test : ndarray of bool, shape (n,)
        True for images of the source's own test set.
    source : str
        Where the images came from (for reports).
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list
    is_test: np.ndarray
    source: str = ""

    def __len__(self):
        return len(self.labels)

    @property
    def n_classes(self):
        return len(self.class_names)

    def subset(self, idx):
        idx = np.asarray(idx)
        return ImageSet(self.images[idx], self.labels[idx], list(self.class_names),
                        self.is_test[idx], self.source)


# --------------------------------------------------------------------------- IDX


def read_idx(path):
    """Read one IDX file (raw or gzip-compressed) into an ndarray.

    Raises
    ------
    DataError
        Missing file, bad magic number, unknown element type or a size that
        does not match the header.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f"IDX file not found: {path}") from None
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX element type 0x{code:02x}")
    if ndim < 1 or len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    body = raw[4 + 4 * ndim:]
    if len(body) != expected:
        raise DataError(
            f"{path}: header says {dims} ({expected} bytes of data) but the file holds {len(body)}"
        )
    return np.frombuffer(body, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path, array, compress=None):
    """Write an ndarray as an IDX file (gzip-compressed when the name ends in ``.gz``)."""
    a = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    key = a.dtype.newbyteorder("=")
    if key not in codes:
        raise DataError(f"IDX cannot store dtype {a.dtype}")
    code = codes[key]
    big = a.astype(np.dtype(_IDX_DTYPES[code]))
    data = bytes([0, 0, code, a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
    data += big.tobytes()
    path = os.fspath(path)
    if compress if compress is not None else path.endswith(".gz"):
        data = gzip.compress(data, compresslevel=6)
    from offload.atomic import atomic_write_bytes

    atomic_write_bytes(path, data)


def _find_idx(data_dir, stem):
    for name in (stem + ".gz", stem):
        p = os.path.join(data_dir, name)
        if os.path.isfile(p):
            return p
    # torchvision-style spelling (train-images.idx3-ubyte)
    alt = stem.replace("-idx", ".idx")
    for name in (alt + ".gz", alt):
        p = os.path.join(data_dir, name)
        if os.path.isfile(p):
            return p
    return None


def _is_idx_dir(data_dir):
    return any(_find_idx(data_dir, s) for s in IDX_FILES.values())


def load_idx_dir(data_dir, class_names=None):
    """Load the four MNIST-style IDX files of ``data_dir`` (``.gz`` or raw).

    Returns
    -------
    ImageSet
        Training-file images first, then the test-file images.
    """
    data_dir = os.fspath(data_dir)
    paths = {}
    for key, stem in IDX_FILES.items():
        p = _find_idx(data_dir, stem)
        if p is None:
            raise DataError(f"{data_dir}: missing {stem}[.gz]")
        paths[key] = p
    parts = {k: read_idx(p) for k, p in paths.items()}
    for which in ("train", "test"):
        im, lb = parts[f"{which}_images"], parts[f"{which}_labels"]
        if im.ndim != 3 or im.dtype != np.uint8:
            raise DataError(f"{paths[which + '_images']}: expected uint8 images (n, H, W), "
                            f"got {im.dtype} {im.shape}")
        if lb.ndim != 1 or len(lb) != len(im):
            raise DataError(f"{paths[which + '_labels']}: {lb.shape} labels for {len(im)} images")
    if parts["train_images"].shape[1:] != parts["test_images"].shape[1:]:
        raise DataError(f"{data_dir}: train and test images differ in size")
    images = np.concatenate([parts["train_images"], parts["test_images"]])
    labels = np.concatenate([parts["train_labels"], parts["test_labels"]]).astype(np.int64)
    if labels.min() < 0:
        raise DataError(f"{data_dir}: negative labels")
    n_classes = int(labels.max()) + 1
    if class_names is None:
        is_fmnist = n_classes == len(FASHION_MNIST_CLASSES) and "fashion" in data_dir.lower()
        class_names = FASHION_MNIST_CLASSES if is_fmnist else [str(i) for i in range(n_classes)]
    if len(class_names) < n_classes:
        raise DataError(f"{len(class_names)} class names for labels up to {n_classes - 1}")
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[len(parts["train_labels"]):] = True
    return ImageSet(images, labels, list(class_names), is_test, source=f"IDX {data_dir}")


# --------------------------------------------------------------------------- folders


def _class_dirs(root):
    return sorted(d for d in os.listdir(root)
                  if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))


def _read_image(path, size):
    import cv2

    from offload.classifier import ClassifierError, prepare_image

    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DataError(f"cannot read image {path}")
    if img.dtype == np.uint16:
        img = (img.astype(np.float32) / 65535.0)
    elif img.dtype != np.uint8:
        raise DataError(f"{path}: unsupported pixel type {img.dtype}")
    try:
        x = prepare_image(img, size[0], size[1], 1)
    except ClassifierError as exc:
        raise DataError(f"{path}: {exc}") from None
    return np.round(x[:, :, 0] * 255.0).astype(np.uint8)


def load_image_folder(root, size=(28, 28), test_fraction=1 / 7, seed=0, progress=True):
    """Load a folder of images, one sub-folder per class.

    Layouts: ``root/<class>/<image>`` (a deterministic ``test_fraction`` of
    each class is then treated as the test set), or ``root/train/<class>/...``
    plus ``root/test/<class>/...``. Images are converted to greyscale and
    resized to ``size`` (height, width) the way the device does it
    (:func:`offload.classifier.prepare_image`). Class names are the sorted
    sub-folder names.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f"image folder not found: {root}")
    sub = _class_dirs(root)
    if "train" in sub and "test" in sub:
        parts = [(os.path.join(root, "train"), False), (os.path.join(root, "test"), True)]
        classes = sorted(set(_class_dirs(parts[0][0])) | set(_class_dirs(parts[1][0])))
    else:
        parts = [(root, None)]
        classes = sub
    if len(classes) < 2:
        raise DataError(f"{root}: need at least 2 class sub-folders, found {len(classes)}")
    files, labels, test_flags = [], [], []
    for base, flag in parts:
        for ci, cname in enumerate(classes):
            d = os.path.join(base, cname)
            if not os.path.isdir(d):
                continue
            names = sorted(n for n in os.listdir(d) if n.lower().endswith(IMAGE_SUFFIXES))
            files += [os.path.join(d, n) for n in names]
            labels += [ci] * len(names)
            test_flags += [flag] * len(names)
    if not files:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders")
    labels = np.asarray(labels, dtype=np.int64)
    if parts[0][1] is None:
        rng = np.random.default_rng(seed)
        is_test = np.zeros(len(labels), dtype=bool)
        for c in range(len(classes)):
            idx = np.flatnonzero(labels == c)
            n_test = int(round(test_fraction * len(idx)))
            is_test[rng.permutation(idx)[:n_test]] = True
    else:
        is_test = np.asarray(test_flags, dtype=bool)
    it = files
    if progress:
        from tqdm import tqdm

        it = tqdm(files, desc="read images", unit="img")
    images = np.stack([_read_image(p, size) for p in it])
    return ImageSet(images, labels, list(classes), is_test, source=f"folder {root}")


def load_images(data_dir, size=(28, 28), progress=True):
    """IDX files when ``data_dir`` holds them, else a folder of class sub-folders."""
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory not found: {data_dir}")
    if _is_idx_dir(data_dir):
        return load_idx_dir(data_dir)
    return load_image_folder(data_dir, size=size, progress=progress)


# --------------------------------------------------------------------------- any labelled images


@dataclass
class LabelledFiles:
    """Image files with class indices, not yet read (``offload-train profile --images``).

    Attributes
    ----------
    paths : list of str
    labels : ndarray of int64, shape (n,)
        Index into ``class_names`` (the models' output order).
    class_names : list of str
    source : str
    """

    paths: list
    labels: np.ndarray
    class_names: list
    source: str = ""

    def __len__(self):
        return len(self.paths)


def label_key(name):
    """How a folder or CSV label is matched to a class name: case, spaces and punctuation ignored.

    ``"T-shirt/top"`` (not a possible folder name) matches the folder ``T-shirt_top``.
    """
    return re.sub(r"[^0-9a-z]+", "_", str(name).lower()).strip("_")


def _class_index(class_names, where):
    index = {}
    for i, name in enumerate(class_names):
        key = label_key(name)
        if key in index:
            raise DataError(f"{where}: class names {class_names[index[key]]!r} and {name!r} "
                            "cannot be told apart in folder or CSV labels")
        index[key] = i
    return index


def _unmatched(where, what, names, class_names):
    shown = ", ".join(repr(n) for n in sorted(names))
    raise DataError(f"{where}: {len(names)} {what} match no class label: {shown} "
                    f"(the labels are {', '.join(repr(c) for c in class_names)})")


def _folder_files(root, class_names):
    classes = _class_dirs(root)
    if not classes:
        raise DataError(f"{root}: no class sub-folders (an ImageFolder tree has one per class)")
    if class_names is None:
        class_names = classes
    index = _class_index(class_names, root)
    bad = [c for c in classes if label_key(c) not in index]
    if bad:
        _unmatched(root, "class folders", bad, class_names)
    paths, labels = [], []
    for cname in classes:
        d = os.path.join(root, cname)
        names = sorted(n for n in os.listdir(d) if n.lower().endswith(IMAGE_SUFFIXES)
                       and os.path.isfile(os.path.join(d, n)))
        paths += [os.path.join(d, n) for n in names]
        labels += [index[label_key(cname)]] * len(names)
    return paths, labels, list(class_names)


def _csv_files(path, class_names):
    import csv

    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    for n, r in enumerate(rows, 1):
        if len(r) != 2 or not r[0].strip() or not r[1].strip():
            raise DataError(f"{path}: row {n} is not 'path,label': {','.join(r)!r}")
    if class_names is None:
        class_names = sorted({r[1].strip() for r in rows})
    index = _class_index(class_names, path)
    bad = {r[1].strip() for r in rows if label_key(r[1]) not in index}
    if bad:
        _unmatched(path, "labels", bad, class_names)
    base = os.path.dirname(os.path.abspath(path))
    paths = [os.path.join(base, r[0].strip()) for r in rows]
    return paths, [index[label_key(r[1])] for r in rows], list(class_names)


def list_labelled_images(source, *, class_names=None):
    """The labelled images of ``source``: an ImageFolder tree or a CSV of ``path,label``.

    An ImageFolder tree has one sub-folder per class (images directly inside
    it); a CSV has rows ``path,label`` (an optional ``path,label`` header;
    paths relative to the CSV's folder). Folder names and CSV labels are
    matched to ``class_names`` by :func:`label_key`; without class names they
    are the sorted folder names / labels. Files are not opened here: an
    unreadable one is found (and skipped) when it is read.

    Raises
    ------
    DataError
        Missing source, class folders or labels that match no class name
        (all listed in one message), no image files at all.
    """
    source = os.fspath(source)
    if os.path.isdir(source):
        paths, labels, names = _folder_files(source, class_names)
        kind = "image folder"
    elif os.path.isfile(source):
        paths, labels, names = _csv_files(source, class_names)
        kind = "CSV"
    else:
        raise DataError(f"image folder or CSV not found: {source}")
    if not paths:
        raise DataError(f"{source}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return LabelledFiles(paths, np.asarray(labels, dtype=np.int64), names, f"{kind} {source}")


def read_image_file(path):
    """One image file as the device's camera gives it: uint8 ``HxW`` grey or ``HxWx3`` BGR.

    16-bit images are scaled to 8 bits, an alpha channel is dropped.

    Raises
    ------
    DataError
        The file cannot be decoded as an image.
    """
    import cv2

    img = cv2.imread(os.fspath(path), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise DataError(f"{path}: not a readable image")
    if img.dtype == np.uint16:
        img = (img.astype(np.float32) * (255.0 / 65535.0) + 0.5).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise DataError(f"{path}: unsupported pixel type {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    elif img.ndim == 3 and img.shape[2] == 4:
        img = np.ascontiguousarray(img[:, :, :3])
    elif img.ndim != 2 and not (img.ndim == 3 and img.shape[2] == 3):
        raise DataError(f"{path}: unsupported image shape {img.shape}")
    return img


# --------------------------------------------------------------------------- split


@dataclass
class Split:
    """Roles of the images of an :class:`ImageSet` (indices into it).

    Attributes
    ----------
    fit : ndarray of int
        Images that train the classifiers (never profiled).
    profile : ndarray of int
        Profiled images, in profile order: training-pool images by index,
        then the test set by index.
    profile_split : ndarray of int8
        Split code of each profiled image: 0 train, 1 validation, 2 test.
    """

    fit: np.ndarray
    profile: np.ndarray
    profile_split: np.ndarray
    params: dict = field(default_factory=dict)


def make_split(data, fit_fraction=2 / 3, val_fraction=0.25, seed=0, max_fit=None, max_profile=None):
    """Deterministic roles for ``data`` (same inputs -> same split).

    A seeded permutation of the source's training pool gives the first
    ``round(fit_fraction * n_train)`` images to ``fit``; of the rest (in that
    permuted order) the last ``round(val_fraction * rest)`` are profile
    validation (1) and the others profile train (0). The source's test set is
    profile test (2). ``max_fit`` / ``max_profile`` subsample (for quick
    runs), keeping the proportions of the profile splits.

    For Fashion-MNIST (60k + 10k) the defaults give 40,000 fit images and a
    profile of 30,000: 15,000 train, 5,000 validation, 10,000 test.
    """
    if not 0 < fit_fraction < 1:
        raise DataError(f"fit_fraction must be in (0, 1), got {fit_fraction}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    pool = np.flatnonzero(~data.is_test)
    test = np.flatnonzero(data.is_test)
    perm = pool[rng.permutation(len(pool))]
    n_fit = int(round(fit_fraction * len(pool)))
    fit, rest = perm[:n_fit], perm[n_fit:]
    n_val = int(round(val_fraction * len(rest)))
    ptrain, pval = rest[:len(rest) - n_val], rest[len(rest) - n_val:]
    if max_fit is not None and len(fit) > max_fit:
        fit = fit[:max_fit]
    if max_profile is not None:
        total = len(ptrain) + len(pval) + len(test)
        if total > max_profile:
            f = max_profile / total
            ptrain = ptrain[:max(1, int(len(ptrain) * f))]
            pval = pval[:max(1, int(len(pval) * f))] if len(pval) else pval
            test = rng.permutation(test)[:max(1, int(len(test) * f))]
    if len(fit) == 0 or len(ptrain) == 0 or len(test) == 0:
        raise DataError(
            f"too few images to split: {len(fit)} fit, {len(ptrain)} profile-train, "
            f"{len(test)} test (source {data.source})"
        )
    pool_part = np.sort(np.concatenate([ptrain, pval]))
    codes = np.where(np.isin(pool_part, pval), SPLIT_VALIDATION, SPLIT_TRAIN).astype(np.int8)
    profile = np.concatenate([pool_part, np.sort(test)])
    split = np.concatenate([codes, np.full(len(test), SPLIT_TEST, dtype=np.int8)])
    params = dict(fit_fraction=fit_fraction, val_fraction=val_fraction, seed=seed,
                  max_fit=max_fit, max_profile=max_profile)
    return Split(np.sort(fit), profile, split, params)
