"""The classifier-pair chain: data -> train -> int8 .tflite + TorchScript -> profile -> metric.

The chain tests run on small synthetic IDX files and image folders written
here, so CI proves the whole path without the real dataset; one more test uses
Debian's Fashion-MNIST when it is installed (subsampled, a minute or so).
"""

import gzip
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert")
cv2 = pytest.importorskip("cv2")

from click.testing import CliRunner  # noqa: E402

from offload.profile import Profile  # noqa: E402
from training import cli  # noqa: E402
from training.pair_commands import STRONG_FILE, WEAK_FILE  # noqa: E402
from training.data import (  # noqa: E402
    FASHION_MNIST_DIR, DataError, ImageSet, load_idx_dir, load_images, make_split, read_idx, write_idx,
)
from training.export import EDGETPU_OPS  # noqa: E402
from training.profiling import breakdown, rank_of_true  # noqa: E402

N_CLASSES = 4

# litert-torch / torch.export internals; not ours to fix
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.*"),
]


def _synthetic(n, rng, size=28):
    """Learnable images: class c is a bright blob in quadrant c, plus noise."""
    labels = rng.integers(0, N_CLASSES, size=n)
    img = rng.integers(0, 60, size=(n, size, size)).astype(np.float32)
    half = size // 2
    for i, c in enumerate(labels):
        r0, c0 = (c // 2) * half, (c % 2) * half
        jitter = rng.integers(0, 4, size=2)
        img[i, r0 + 2 + jitter[0]:r0 + half - 4 + jitter[0], c0 + 2 + jitter[1]:c0 + half - 4 + jitter[1]] += \
            rng.uniform(80, 190)
    return np.clip(img, 0, 255).astype(np.uint8), labels.astype(np.uint8)


def _write_idx_dir(folder, n_train=480, n_test=160, seed=0, gz=True):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        im, lb = _synthetic(n, rng)
        ext = ".gz" if gz else ""
        write_idx(os.path.join(folder, f"{stem}-images-idx3-ubyte{ext}"), im)
        write_idx(os.path.join(folder, f"{stem}-labels-idx1-ubyte{ext}"), lb)
    return folder


QUICK = ["--weak-epochs", "4", "--strong-epochs", "4", "--strong-width", "8", "--calib-images", "64",
         "--batch-size", "32", "--quiet"]


def _invoke(args):
    res = CliRunner().invoke(cli.main, args, catch_exceptions=False)
    return res


# --------------------------------------------------------------------------- data


def test_idx_roundtrip_gz_and_raw(tmp_path):
    a = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    write_idx(tmp_path / "x.gz", a)
    write_idx(tmp_path / "x", a)
    assert gzip.decompress((tmp_path / "x.gz").read_bytes())[:4] == b"\x00\x00\x08\x03"
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz"), a)
    np.testing.assert_array_equal(read_idx(tmp_path / "x"), a)


@pytest.mark.parametrize("content, message", [
    (b"\x01\x02\x08\x03", "bad magic"),
    (b"\x00\x00\x77\x01\x00\x00\x00\x01\x05", "unknown IDX element type"),
    (b"\x00\x00\x08\x03\x00\x00", "truncated"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02", "header says"),
    (gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x02\x01")[:-6], "cannot read"),
])
def test_malformed_idx(tmp_path, content, message):
    p = tmp_path / "bad-idx"
    p.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_idx(p)


def test_split_fashion_mnist_shape():
    """60k + 10k -> 40k fit; 15k train, 5k validation, 10k test profiled; disjoint; repeatable."""
    is_test = np.r_[np.zeros(60000, bool), np.ones(10000, bool)]
    data = ImageSet(np.zeros((70000, 1, 1), np.uint8), np.zeros(70000, np.int64), ["a"], is_test)
    s1, s2 = make_split(data), make_split(data)
    np.testing.assert_array_equal(s1.fit, s2.fit)
    np.testing.assert_array_equal(s1.profile_split, s2.profile_split)
    assert len(s1.fit) == 40000 and len(s1.profile) == 30000
    assert np.bincount(s1.profile_split).tolist() == [15000, 5000, 10000]
    assert not np.intersect1d(s1.fit, s1.profile).size
    assert np.all(s1.profile[s1.profile_split == 2] >= 60000)
    assert np.all(s1.fit < 60000)
    assert not np.array_equal(make_split(data, seed=1).fit, s1.fit)


def test_rank_of_true_breaks_ties_like_argmax():
    z = np.array([[1, 3, 3, 0], [2, 2, 2, 2], [0, 0, 5, 1]], dtype=np.int8)
    y = np.array([2, 3, 2])
    assert rank_of_true(z, y).tolist() == [2, 4, 1]
    assert rank_of_true(z, np.array([1, 0, 3])).tolist() == [1, 1, 2]
    assert np.all((rank_of_true(z, np.argmax(z, axis=1)) == 1))


# --------------------------------------------------------------------------- whole chain


def _check_outputs(out, n_classes):
    man = json.loads((out / "classifiers.json").read_text())
    rep = man["weak"]["tflite"]
    assert rep["input"]["dtype"] == "int8" and rep["output"]["dtype"] == "int8"
    assert rep["output"]["shape"] == [1, n_classes]
    # fixed input range [0, 1]: a uint8 pixel p is the int8 value p - 128
    assert rep["input"]["scale"] == pytest.approx(1 / 255) and rep["input"]["zero_point"] == -128
    assert set(rep["ops"]) <= EDGETPU_OPS and "CONV_2D" in rep["ops"]
    assert "float32" not in rep["tensor_dtypes"]
    assert 0 <= man["weak"]["int8_accuracy"] <= 1 and 0 <= man["strong"]["accuracy"] <= 1
    # the strong model loads with torch alone, no training code
    m = torch.jit.load(str(out / STRONG_FILE))
    assert m(torch.rand(3, 1, 28, 28)).shape == (3, n_classes)

    prof = Profile.load(out / "profile.npz")
    assert prof.weak_logits.shape == (prof.n, n_classes)
    assert set(np.unique(prof.split)) == {0, 1, 2}
    assert prof.tinv is not None and prof.lut_x.shape == (1000,)
    assert prof.metric_std > 0
    summary = json.loads((out / "profile_breakdown.json").read_text())
    b = summary["breakdown"]["all"]
    total = b["both_right"] + b["both_wrong"] + b["only_strong_right"] + b["only_weak_right"]
    assert total == pytest.approx(1.0)
    assert b == breakdown(prof)["all"]
    png = (out / "fig3_entropy_metric.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    demo = out / "demo"
    rows = (demo / "labels.csv").read_text().splitlines()
    assert rows[0].startswith("frame,file,profile_index,label")
    assert len(rows) - 1 == len(list((demo / "frames").iterdir())) > 0
    first = rows[1].split(",")
    assert prof.split[int(first[2])] == 2
    assert (demo / "clip.avi").stat().st_size > 0
    return man, prof


def test_chain_on_synthetic_idx(tmp_path):
    data = _write_idx_dir(tmp_path / "idx")
    out = tmp_path / "out"
    res = _invoke(["classifiers", "--data-dir", str(data), "--out-dir", str(out), *QUICK])
    assert res.exit_code == 0, res.output
    assert "weak int8 accuracy (LiteRT)" in res.output
    res = _invoke(["profile", "--models-dir", str(out), "--quiet", "--demo-count", "12"])
    assert res.exit_code == 0, res.output
    assert "(c) strong" in res.output
    man, prof = _check_outputs(out, N_CLASSES)
    assert man["split"]["n_fit"] == 320 and prof.n == 160 + 160
    # the weak logits in the profile are what the LiteRT wrapper gives for that image
    from offload.classifier import WeakClassifier

    images = load_idx_dir(data).images
    split = make_split(load_idx_dir(data))
    clf = WeakClassifier(out / WEAK_FILE, edgetpu=False)
    j = 7
    np.testing.assert_array_equal(clf.classify(images[split.profile[j]]).logits, prof.weak_logits[j])
    # the easy synthetic task is learnt beyond chance (0.25) even in a few steps
    assert max(man["strong"]["accuracy"], man["weak"]["int8_accuracy"]) > 0.4


def test_chain_on_image_folder(tmp_path):
    """A folder per class of colour PNGs of another size, greyscaled and resized as on the device."""
    rng = np.random.default_rng(3)
    root = tmp_path / "imgs"
    names = ["cat", "dog", "emu", "yak"]
    im, lb = _synthetic(240, rng, size=40)
    for i, (x, c) in enumerate(zip(im, lb)):
        d = root / names[c]
        d.mkdir(parents=True, exist_ok=True)
        colour = np.stack([x, x, x], axis=2)
        cv2.imwrite(str(d / f"{i:04d}.png"), colour)
    (root / "README").write_text("not a class folder")
    data = load_images(root, size=(28, 28), progress=False)
    assert data.class_names == names and data.images.shape == (240, 28, 28)
    assert 0 < data.is_test.sum() < 60
    out = tmp_path / "out"
    res = _invoke(["classifiers", "--data-dir", str(root), "--out-dir", str(out), *QUICK])
    assert res.exit_code == 0, res.output
    res = _invoke(["profile", "--models-dir", str(out), "--quiet", "--demo-count", "5"])
    assert res.exit_code == 0, res.output
    man, _ = _check_outputs(out, len(names))
    assert man["class_names"] == names


# --------------------------------------------------------------------------- errors


def _no_traceback(res):
    assert res.exit_code != 0
    assert "Traceback" not in res.output
    assert res.output.startswith("Error:") or "\nError:" in res.output
    return res.output


def test_cli_missing_data_dir(tmp_path):
    res = CliRunner().invoke(cli.main, ["classifiers", "--data-dir", str(tmp_path / "nope"),
                                        "--out-dir", str(tmp_path / "o")])
    assert "data directory not found" in _no_traceback(res)


def test_cli_malformed_idx(tmp_path):
    data = _write_idx_dir(tmp_path / "idx", n_train=20, n_test=10, gz=False)
    (data / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x63\x01")
    res = CliRunner().invoke(cli.main, ["classifiers", "--data-dir", str(data),
                                        "--out-dir", str(tmp_path / "o")])
    assert "header says" in _no_traceback(res)


def test_cli_profile_wrong_model_files(tmp_path):
    data = _write_idx_dir(tmp_path / "idx", n_train=20, n_test=10)
    out = tmp_path / "out"
    out.mkdir()
    res = CliRunner().invoke(cli.main, ["profile", "--models-dir", str(out)])
    assert "classifiers.json not found" in _no_traceback(res)
    man = dict(data_dir=str(data), image_size=28, class_names=list("abcdefghij"),
               split=dict(fit_fraction=2 / 3, val_fraction=0.25, seed=0),
               weak=dict(file="weak.tflite"), strong=dict(file="strong.pt"))
    (out / "classifiers.json").write_text(json.dumps(man))
    (out / "weak.tflite").write_bytes(b"this is not a flatbuffer" * 10)
    res = CliRunner().invoke(cli.main, ["profile", "--models-dir", str(out)])
    assert "not a usable LiteRT model" in _no_traceback(res)
    committed = os.path.join(os.path.dirname(os.path.dirname(__file__)), "artifacts", WEAK_FILE)
    if os.path.isfile(committed):  # a good weak model, a junk strong one
        (out / "weak.tflite").write_bytes(open(committed, "rb").read())
        (out / "strong.pt").write_bytes(b"PK not really a zip")
        res = CliRunner().invoke(cli.main, ["profile", "--models-dir", str(out)])
        assert "not a TorchScript model" in _no_traceback(res)


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR),
                    reason=f"Fashion-MNIST not installed at {FASHION_MNIST_DIR} "
                           "(Debian package dataset-fashion-mnist)")
def test_chain_on_real_fashion_mnist(tmp_path):
    """Subsampled real run: 3,000 training images, 1,000 test images, 1,500 profiled."""
    out = tmp_path / "out"
    res = _invoke(["classifiers", "--out-dir", str(out), "--max-fit", "3000", "--max-eval", "1000",
                   "--weak-epochs", "3", "--strong-epochs", "2", "--strong-width", "16",
                   "--batch-size", "32", "--calib-images", "300", "--quiet"])
    assert res.exit_code == 0, res.output
    man = json.loads((out / "classifiers.json").read_text())
    assert man["class_names"][0] == "T-shirt/top"
    assert man["weak"]["float_accuracy"] > 0.6
    assert man["weak"]["int8_accuracy"] > man["weak"]["float_accuracy"] - 0.03
    assert man["strong"]["accuracy"] > 0.6
    res = _invoke(["profile", "--models-dir", str(out), "--max-profile", "1500", "--quiet",
                   "--demo-count", "10"])
    assert res.exit_code == 0, res.output
    prof = Profile.load(out / "profile.npz")
    assert 1400 <= prof.n <= 1500
    assert np.all(np.isfinite(prof.metric))
