"""Your own pair: `offload-train example-pair` (zoo conventions) and `offload-train profile --images`.

One tiny example pair is made per module (a few images per class, one epoch:
the models are poor, the conventions are what is checked); the profile tests
run the real command on copies of its image tree with corrupt files, extra
folders, a CSV, and then feed the profile to offload-sim and offload-train dqn.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from click.testing import CliRunner  # noqa: E402

from offload.card import read_card  # noqa: E402
from offload.cli import sim_main  # noqa: E402
from offload.profile import Profile  # noqa: E402
from training import cli  # noqa: E402
from training.data import FASHION_MNIST_DIR  # noqa: E402
from training.example_pair import (CLASS_FOLDERS, IMAGE_SIZE, LAYOUT, STRONG_CARD,  # noqa: E402
                                   WEAK_CARD)

pytestmark = pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR),
                                reason="Debian's Fashion-MNIST files are not installed")

TINY = ["--per-class", "20", "--profile-per-class", "8", "--weak-width", "4", "--strong-width", "4",
        "--weak-epochs", "2", "--strong-epochs", "3", "--calib-images", "50", "--threads", "1",
        "--quiet"]


def _invoke(args, ok=True):
    res = CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert res.exit_code == 0, res.output
    else:
        assert res.exit_code == 1, res.output
        assert "Traceback" not in res.output and res.output.count("Error:") == 1, res.output
    return res


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    out = tmp_path_factory.mktemp("pair") / "example"
    res = _invoke(["example-pair", "--out", out, *TINY])
    assert "weak int8 accuracy" in res.output
    return out


def _profile(pair, images, tmp_path, *extra, ok=True):
    return _invoke(["profile", "--weak", pair / LAYOUT["weak"], "--strong", pair / LAYOUT["strong"],
                    "--images", images, "--out", tmp_path / "prof" / "profile.npz",
                    "--demo-count", "4", "--quiet", *extra], ok=ok)


def _tree(pair, tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(pair / LAYOUT["profile"], root)
    return root


# --------------------------------------------------------------------------- example-pair


def test_example_pair_has_the_declared_conventions(pair):
    """RGB 64x64 uint8 weak input quantised (q - 128) / 128; strong RGB float 64x64; cards; labels."""
    from ai_edge_litert.interpreter import Interpreter

    from offload.classifier import WeakClassifier
    from offload.server.model import StrongModel
    from training.data import read_image_file
    from training.export import tflite_report

    weak_path, strong_path = pair / LAYOUT["weak"], pair / LAYOUT["strong"]
    rep = tflite_report(weak_path)
    assert rep["input"]["shape"] == [1, 64, 64, 3] and rep["input"]["dtype"] == "uint8"
    assert rep["input"]["scale"] == 1 / 128 and rep["input"]["zero_point"] == 128
    assert rep["ops"][0] == "QUANTIZE" and rep["output"]["dtype"] == "int8"
    it = Interpreter(model_path=str(weak_path))
    it.allocate_tensors()
    # the QUANTIZE op feeds the int8 graph exactly q - 128: same scale, zero point 0
    inner = [d for d in it.get_tensor_details() if d["dtype"] == np.int8
             and tuple(d["shape"]) == (1, 64, 64, 3)]
    assert inner and inner[0]["quantization"] == (1 / 128, 0)

    wc, sc = read_card(weak_path), read_card(strong_path)
    assert (wc.order, wc.normalization, wc.resize) == ("rgb", "tensor", "stretch")
    assert (sc.order, sc.normalization, sc.resize) == ("rgb", "meanstd", "crop")
    assert sc.mean == tuple(STRONG_CARD["mean"]) and sc.std == tuple(STRONG_CARD["std"])
    assert wc.labels == sc.labels == CLASS_FOLDERS
    assert (pair / LAYOUT["labels"]).read_text().splitlines()[1] == "1 Trouser"

    files = sorted((pair / LAYOUT["profile"] / "Sneaker").iterdir())
    assert len(files) == 8 and len(list((pair / LAYOUT["train"] / "Bag").iterdir())) == 20
    image = read_image_file(files[0])  # BGR as OpenCV reads it
    assert image.shape == (*IMAGE_SIZE, 3)
    weak = WeakClassifier(weak_path, edgetpu=False, card=wc)
    q = weak.quantize_input(image)
    assert q.dtype == np.uint8 and q.shape == (1, 64, 64, 3)
    import cv2

    rgb = cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA)[:, :, ::-1]
    assert np.abs(q[0].astype(int) - rgb.astype(int)).max() <= 1  # q = pixel, RGB, stretched
    strong = StrongModel(strong_path, card=sc, threads=1)
    assert (strong.channels, strong.height, strong.width) == (3, 64, 64)
    x = strong.prepare(image)
    h, w = IMAGE_SIZE
    crop = image[:, (w - h) // 2:(w + h) // 2][:, :, ::-1]
    want = (cv2.resize(crop, (64, 64), interpolation=cv2.INTER_AREA).astype(np.float32)
            - np.float32(STRONG_CARD["mean"])) / np.float32(STRONG_CARD["std"])
    assert np.abs(x - want.transpose(2, 0, 1)).max() < 2 / 58  # within one pixel level
    man = json.loads((pair / LAYOUT["manifest"]).read_text())
    assert man["weak_card"] == WEAK_CARD and 0 <= man["accuracy"]["weak_int8"] <= 1


def test_example_pair_refuses_an_existing_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    res = _invoke(["example-pair", "--out", tmp_path / "x", *TINY], ok=False)
    assert "exists and is not empty" in res.output
    assert os.listdir(tmp_path / "x") == ["keep.txt"]
    assert os.listdir(tmp_path) == ["x"]  # no temporary folder left behind


# --------------------------------------------------------------------------- profile --images


def test_profile_image_folder_skips_corrupt_files(pair, tmp_path):
    root = _tree(pair, tmp_path)
    (root / "Bag" / "broken.png").write_bytes(b"not a png at all")
    good = next((root / "Coat").iterdir()).read_bytes()
    (root / "Coat" / "truncated.png").write_bytes(good[:40])
    res = _profile(pair, root, tmp_path, "--top-k", "2")
    assert "skipped 2 of 82 images" in res.output
    assert "broken.png" in res.output and "truncated.png" in res.output
    prof = Profile.load(tmp_path / "prof" / "profile.npz")
    assert prof.n == 80 and prof.k == 2
    assert np.array_equal(prof.strong_loss, (prof.strong_rank > 2).astype(prof.strong_loss.dtype))
    counts = np.bincount(prof.split, minlength=3)
    assert counts.tolist() == [40, 20, 20]  # per class of 8: round(0.3 * 8) = 2 test, 2 validation
    summary = json.loads((tmp_path / "prof" / "profile_breakdown.json").read_text())
    assert sorted(os.path.basename(s["path"]) for s in summary["skipped"]) == ["broken.png",
                                                                              "truncated.png"]
    assert summary["class_names"] == list(CLASS_FOLDERS) and summary["k"] == 2
    assert (tmp_path / "prof" / "fig3_entropy_metric.png").stat().st_size > 1000
    assert len(os.listdir(tmp_path / "prof" / "demo" / "frames")) == 4


def test_profile_csv_gives_the_same_logits_as_the_folder(pair, tmp_path):
    root = pair / LAYOUT["profile"]
    rows = ["path,label"] + [f"{LAYOUT['profile']}/{c}/{n},{c.replace('_', '/')}"
                             for c in sorted(os.listdir(root)) for n in sorted(os.listdir(root / c))]
    (pair / "list.csv").write_text("\n".join(rows) + "\n")
    _profile(pair, pair / "list.csv", tmp_path / "a")
    _profile(pair, root, tmp_path / "b")
    a = Profile.load(tmp_path / "a" / "prof" / "profile.npz")
    b = Profile.load(tmp_path / "b" / "prof" / "profile.npz")
    assert np.array_equal(a.weak_logits, b.weak_logits) and np.array_equal(a.split, b.split)
    assert np.array_equal(a.strong_rank, b.strong_rank)


def test_profile_lists_every_unmatched_class_folder(pair, tmp_path):
    root = _tree(pair, tmp_path)
    for extra in ("Hat", "Scarf"):
        (root / extra).mkdir()
    res = _profile(pair, root, tmp_path, ok=False)
    assert "2 class folders match no class label: 'Hat', 'Scarf'" in res.output
    assert not (tmp_path / "prof").exists()


def test_profile_refuses_a_folder_without_readable_images(pair, tmp_path):
    root = tmp_path / "bad"
    for c in ("Bag", "Coat"):
        (root / c).mkdir(parents=True)
        (root / c / "x.png").write_bytes(b"\x89PNG garbage")
    res = _profile(pair, root, tmp_path, ok=False)
    assert "no readable image among its 2 image files" in res.output
    assert not (tmp_path / "prof").exists()
    (root / "Bag" / "x.png").unlink()
    (root / "Coat" / "x.png").unlink()
    res = _profile(pair, root, tmp_path, ok=False)
    assert "no image files" in res.output


def test_profile_refuses_a_top_k_beyond_the_classes(pair, tmp_path):
    res = _profile(pair, pair / LAYOUT["profile"], tmp_path, "--top-k", "11", ok=False)
    assert "--top-k 11 must be between 1 and the number of classes (10)" in res.output


def test_profile_feeds_offload_sim_and_dqn(pair, tmp_path):
    _profile(pair, pair / LAYOUT["profile"], tmp_path)
    path = tmp_path / "prof" / "profile.npz"
    res = CliRunner().invoke(sim_main, ["--profile", str(path), "--length", "300", "--streams",
                                        "2", "--json", str(tmp_path / "sim.json")],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "sim.json").read_text())["results"]
    out = tmp_path / "dqn.bin"
    _invoke(["dqn", "--profile", path, "--preset", "quick", "--out", out, "-T", "9", "--layers",
             "2", "--width", "8", "--iterations", "10", "--steps", "2", "--batch", "32",
             "--validate-every", "5", "--train-streams", "2", "--train-length", "500",
             "--val-streams", "1", "--val-length", "300", "--test-streams", "1",
             "--test-length", "300", "--int8-tune", "2", "--threads", "1", "--device", "cpu",
             "--quiet"])
    assert out.stat().st_size > 0


def test_profile_with_the_strong_side_a_running_server(pair, tmp_path):
    """--strong URL: every image goes to offload-serve as a device frame; same profile as the file."""
    from offload.server import keys as K
    from offload.server.serve import start_process

    keys = tmp_path / "keys.toml"
    (tmp_path / "key").write_text(K.add_key(keys, "profiler") + "\n")
    proc, url = start_process(["--keys", str(keys), "--port", "0", "--log-level", "warning",
                               "--model", str(pair / LAYOUT["strong"]), "--threads", "1"],
                              cwd=tmp_path)
    try:
        _profile(pair, pair / LAYOUT["profile"], tmp_path / "remote", "--strong", url,
                 "--key-file", tmp_path / "key", "--top-k", "2")
        res = _profile(pair, pair / LAYOUT["profile"], tmp_path / "few", "--strong", url,
                       "--key-file", tmp_path / "key", "--top-k", "4", ok=False)
        assert "answers 3 classes per image, fewer than --top-k 4" in res.output
    finally:
        proc.kill()
        proc.wait()
    _profile(pair, pair / LAYOUT["profile"], tmp_path / "local", "--top-k", "2")
    a = Profile.load(tmp_path / "remote" / "prof" / "profile.npz")
    b = Profile.load(tmp_path / "local" / "prof" / "profile.npz")
    assert np.array_equal(a.weak_logits, b.weak_logits)
    assert np.array_equal(a.strong_loss, b.strong_loss)
    assert np.array_equal(np.minimum(a.strong_rank, 4), np.minimum(b.strong_rank, 4))


# --------------------------------------------------------------------------- pieces (no models)


def test_stratified_split_is_per_class_and_seeded():
    from offload.scenario import named_seed
    from training.profiling import stratified_split

    y = np.repeat(np.arange(3), [10, 20, 7])
    a = stratified_split(y, val_fraction=0.2, test_fraction=0.3, seed=named_seed(0, "profile-split"))
    b = stratified_split(y, val_fraction=0.2, test_fraction=0.3, seed=named_seed(0, "profile-split"))
    c = stratified_split(y, val_fraction=0.2, test_fraction=0.3, seed=named_seed(1, "profile-split"))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    for cls, n in enumerate([10, 20, 7]):
        counts = np.bincount(a[y == cls], minlength=3)
        assert counts[2] == round(0.3 * n) and counts[1] == round(0.2 * n) and counts.sum() == n
    with pytest.raises(ValueError, match="leave some images for train"):
        stratified_split(y, val_fraction=0.5, test_fraction=0.5, seed=0)
    with pytest.raises(ValueError, match="too few images"):
        stratified_split(np.zeros(1, int), val_fraction=0.2, test_fraction=0.3, seed=0)


def test_csv_source_rows_and_labels(tmp_path):
    from training.data import DataError, label_key, list_labelled_images

    assert label_key("T-shirt/top") == label_key("t-shirt_top ") == "t_shirt_top"
    (tmp_path / "a.csv").write_text("path,label\nx/1.png,Bag\ny/2.png, t-shirt/TOP\n")
    files = list_labelled_images(tmp_path / "a.csv", class_names=["T-shirt/top", "Bag"])
    assert files.labels.tolist() == [1, 0]
    assert files.paths == [str(tmp_path / "x" / "1.png"), str(tmp_path / "y" / "2.png")]
    (tmp_path / "b.csv").write_text("x/1.png,Hat\nx/2.png,Cap\nx/3.png,Bag\n")
    with pytest.raises(DataError, match="2 labels match no class label: 'Cap', 'Hat'"):
        list_labelled_images(tmp_path / "b.csv", class_names=["Bag"])
    (tmp_path / "c.csv").write_text("x/1.png,Bag,extra\n")
    with pytest.raises(DataError, match="row 1 is not 'path,label'"):
        list_labelled_images(tmp_path / "c.csv")
    with pytest.raises(DataError, match="image folder or CSV not found"):
        list_labelled_images(tmp_path / "nope")
