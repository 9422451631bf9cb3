"""The device-side weak classifier wrapper (LiteRT): input quantisation, delegates, errors."""

import logging
import os

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")
cv2 = pytest.importorskip("cv2")

from offload import classifier as C  # noqa: E402
from offload.classifier import (  # noqa: E402
    ClassifierError, EdgeTPUUnavailable, WeakClassifier, prepare_image, to_unit_float,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACT = os.path.join(ROOT, "artifacts", "weak_int8.tflite")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """The committed int8 weak model, or one exported here (torch + litert-torch) when it is absent."""
    if os.path.isfile(ARTIFACT):
        return ARTIFACT
    pytest.importorskip("torch", reason="needs artifacts/weak_int8.tflite or torch to export one")
    pytest.importorskip("litert_torch", reason="needs artifacts/weak_int8.tflite or litert-torch")
    import torch

    from training.export import export_weak_int8
    from training.models import build_weak

    torch.manual_seed(0)
    net = build_weak(14, 10, 4)
    with torch.no_grad():  # give BatchNorm non-trivial statistics
        net.train()
        net(torch.rand(256, 1, 14, 14))
    net.eval()
    path = tmp_path_factory.mktemp("weak") / "weak.tflite"
    export_weak_int8(net, torch.rand(128, 1, 14, 14), str(path))
    return str(path)


@pytest.fixture(scope="module")
def clf(model_path):
    return WeakClassifier(model_path, edgetpu=False)


def test_model_details(clf):
    assert clf.input_dtype == np.int8 and clf.output_dtype == np.int8
    assert clf.layout == "NHWC" and clf.input_shape == (1, clf.height, clf.width, 1)
    assert clf.n_classes == 10 and clf.input_scale > 0 and clf.output_scale > 0
    ops = clf.ops()
    assert "CONV_2D" in ops and "FULLY_CONNECTED" in ops and "DELEGATE" not in ops


def test_uint8_input_is_quantised_with_the_tensor_parameters(clf):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(28, 28), dtype=np.uint8)
    t = clf.quantize_input(img)
    assert t.dtype == np.int8 and t.shape == clf.input_shape
    small = cv2.resize(img.astype(np.float64) / 255.0, (clf.width, clf.height), interpolation=cv2.INTER_AREA)
    v = small / clf.input_scale
    expected = np.clip(np.floor(v + 0.5) + clf.input_zero_point, -128, 127)
    diff = t[0, :, :, 0].astype(np.int64) - expected
    half_way = np.abs(v - np.floor(v) - 0.5) < 1e-3  # 2x2 averages: exact halves, rounded up
    assert np.all(diff[~half_way] == 0) and np.all(np.abs(diff[half_way]) <= 1)
    # black and white map to the ends of the int8 range the model was calibrated on
    lo = clf.quantize_input(np.zeros((28, 28), np.uint8))
    hi = clf.quantize_input(np.full((28, 28), 255, np.uint8))
    assert np.all(lo == np.clip(clf.input_zero_point, -128, 127))
    assert np.all(hi == np.clip(round(1.0 / clf.input_scale) + clf.input_zero_point, -128, 127))


def test_uint8_pixels_map_to_int8_exactly(clf):
    """The export fixes the input range to [0, 1] (scale 1/255, zero point -128): int8 = pixel - 128."""
    assert clf.input_scale == pytest.approx(1 / 255) and clf.input_zero_point == -128
    img = np.round(np.linspace(0, 255, 14 * 14)).astype(np.int64).reshape(14, 14)
    t = clf.quantize_input(img.astype(np.uint8))
    np.testing.assert_array_equal(t[0, :, :, 0].astype(np.int64), img - 128)


def test_float_uint8_and_colour_inputs_agree(clf):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(28, 28), dtype=np.uint8)
    a = clf.quantize_input(img)
    np.testing.assert_array_equal(a, clf.quantize_input(img.astype(np.float32) / 255.0))
    np.testing.assert_array_equal(a, clf.quantize_input(img[:, :, None]))
    bgr = np.stack([img, img, img], axis=2)  # grey in colour: greyscale gives it back
    np.testing.assert_array_equal(a, clf.quantize_input(bgr))
    bgra = np.concatenate([bgr, np.full((28, 28, 1), 255, np.uint8)], axis=2)
    np.testing.assert_array_equal(a, clf.quantize_input(bgra))


def test_colour_uses_bgr_weights():
    img = np.zeros((4, 4, 3), np.uint8)
    img[:, :, 0] = 255  # pure blue in BGR
    grey = prepare_image(img, 4, 4, 1)[:, :, 0]
    assert np.allclose(grey, 0.114, atol=0.002)
    assert np.allclose(prepare_image(img, 4, 4, 1, bgr=False)[:, :, 0], 0.299, atol=0.002)
    assert prepare_image(img[:, :, 0], 2, 2, 3).shape == (2, 2, 3)


def test_classify_returns_int8_and_dequantised_logits(clf):
    img = np.random.default_rng(2).integers(0, 256, size=(40, 30), dtype=np.uint8)
    out = clf.classify(img)
    assert out.q.dtype == np.int8 and out.q.shape == (10,)
    np.testing.assert_allclose(out.logits, (out.q.astype(np.float32) - clf.output_zero_point) * clf.output_scale,
                               rtol=1e-6)
    assert out.top1 == int(np.argmax(out.q))
    q, z = clf.classify_many([img, img])
    np.testing.assert_array_equal(q[0], out.q)
    np.testing.assert_array_equal(z[1], out.logits)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((4, 4), np.int32), "uint8"),
    (np.full((4, 4), 1.5, np.float32), r"\[0, 1\]"),
    (np.full((4, 4), np.nan, np.float32), r"\[0, 1\]"),
    (np.zeros((4, 4, 2), np.uint8), "HxW"),
    (np.zeros((0, 4), np.uint8), "empty"),
])
def test_bad_images(clf, bad, message):
    with pytest.raises(ClassifierError, match=message):
        clf.quantize_input(bad)


def test_to_unit_float():
    assert to_unit_float(np.array([0, 255], np.uint8)).tolist() == [0.0, 1.0]


def test_auto_delegate_falls_back_to_cpu_with_a_note(model_path, monkeypatch, caplog):
    monkeypatch.setattr(C, "EDGETPU_LIBRARY", "libedgetpu-absent-for-test.so.1")
    with caplog.at_level(logging.INFO, logger="offload.classifier"):
        auto = WeakClassifier(model_path)  # edgetpu=None: try, then the CPU
    assert auto.on_edgetpu is False
    assert any("Edge TPU delegate unavailable" in r.getMessage() for r in caplog.records)
    img = np.full((28, 28), 128, np.uint8)
    np.testing.assert_array_equal(auto.classify(img).q, WeakClassifier(model_path, edgetpu=False).classify(img).q)


def test_required_edgetpu_fails_clearly(model_path, monkeypatch):
    monkeypatch.setattr(C, "EDGETPU_LIBRARY", "libedgetpu-absent-for-test.so.1")
    with pytest.raises(EdgeTPUUnavailable, match="Edge TPU requested"):
        WeakClassifier(model_path, edgetpu=True)


def test_edgetpu_argument_checked(model_path):
    with pytest.raises(ValueError, match="edgetpu"):
        WeakClassifier(model_path, edgetpu="yes")


def test_bad_model_files(tmp_path):
    with pytest.raises(ClassifierError, match="not found"):
        WeakClassifier(tmp_path / "missing.tflite")
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"definitely not a flatbuffer" * 20)
    with pytest.raises(ClassifierError, match="not a usable LiteRT model"):
        WeakClassifier(junk, edgetpu=False)
    with pytest.raises(ClassifierError, match="not a usable LiteRT model"):
        C.model_ops(junk)


def test_class_names_checked(model_path):
    with pytest.raises(ClassifierError, match="class names"):
        WeakClassifier(model_path, edgetpu=False, class_names=["a", "b"])


@pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, "artifacts", "demo", "labels.csv")),
                    reason="no committed demo clip (artifacts/demo)")
def test_committed_demo_clip_matches_the_profile():
    """Each demo frame (PNG and video) gives the weak logits stored in the committed profile."""
    import csv

    from offload.profile import Profile

    art = os.path.join(ROOT, "artifacts")
    weak = WeakClassifier(ARTIFACT, edgetpu=False)
    prof = Profile.load(os.path.join(art, "profile.npz"))
    with open(os.path.join(art, "demo", "labels.csv")) as f:
        rows = list(csv.DictReader(f))
    cap = cv2.VideoCapture(os.path.join(art, "demo", "clip.avi"))
    try:
        for row in rows:
            png = cv2.imread(os.path.join(art, "demo", row["file"]), cv2.IMREAD_UNCHANGED)
            ok, frame = cap.read()
            assert ok, f"video ends before frame {row['frame']}"
            j = int(row["profile_index"])
            assert prof.split[j] == 2 and prof.labels[j] == int(row["label"])
            out = weak.classify(png)
            np.testing.assert_array_equal(out.logits, prof.weak_logits[j])
            np.testing.assert_array_equal(weak.quantize_input(frame), weak.quantize_input(png))
            assert int(prof.weak_rank[j]) == int(row["weak_rank"])
    finally:
        cap.release()
