"""offload.preprocess: the one preprocessing, checked against tensors computed here from the card's numbers.

Each expected tensor is written out in the test with OpenCV and NumPy (the
formulas of docs/classifiers.md, "Model card"), not by calling the module.
Device-side conventions go through a real interpreter: ``echo_model`` returns
its input tensor as its output, so ``classify(image).q`` is what the device fed.
"""

import glob
import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

cv2 = pytest.importorskip("cv2")
pytest.importorskip("ai_edge_litert")

from card_models import echo_model  # noqa: E402
from offload import preprocess  # noqa: E402
from offload.card import CardError, ModelCard, resolve  # noqa: E402
from offload.classifier import ClassifierError, WeakClassifier  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEAK = os.path.join(ROOT, "artifacts", "weak_int8.tflite")
STRONG = os.path.join(ROOT, "artifacts", "strong.onnx")
FRAMES = os.path.join(ROOT, "artifacts", "demo", "frames")
FMNIST_TEST = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
UNIT = np.float32(1.0 / 255.0)


def fashion_images(count=300):
    """Real Fashion-MNIST test images (28x28 uint8): the Debian files, else the committed demo frames."""
    if os.path.isfile(FMNIST_TEST):
        from training.data import read_idx

        return read_idx(FMNIST_TEST)[:count]
    frames = sorted(glob.glob(os.path.join(FRAMES, "*.png")))
    if not frames:
        pytest.skip("neither Fashion-MNIST nor the committed demo frames are here")
    return np.stack([cv2.imread(f, cv2.IMREAD_GRAYSCALE) for f in frames[:count]])


def half_up_q(v, dtype, zero_point=0):
    """The documented integer rule, in float64: clip(floor(round(v, 3) + 0.5) + zero_point)."""
    info = np.iinfo(dtype)
    return np.clip(np.floor(np.round(v, 3) + 0.5) + zero_point, info.min, info.max).astype(dtype)


def assert_quantised_equal(got, v, dtype, zero_point=0):
    """``got`` equals the rule applied to the real-valued ``v``, except where ``v`` sits on a tie.

    ``v`` is computed here in float64 from the card's numbers; the module
    works in float32 (about 1e-5 apart at 255), so an element whose ``v`` is
    within the 1/1000 snap (plus that noise) of a tie k + 0.5 may go either way
    and is allowed one step. Every other element must be equal.
    """
    want = half_up_q(v, dtype, zero_point)
    got = np.asarray(got).reshape(want.shape)
    tie = np.abs(v - np.floor(v) - 0.5) < 5e-4 + 1e-4
    diff = np.abs(got.astype(np.int64) - want.astype(np.int64))
    assert np.all(diff[~tie] == 0), f"{int((diff[~tie] != 0).sum())} elements differ"
    assert np.all(diff[tie] <= 1)


# --------------------------------------------------------------------------- parity


@pytest.fixture(scope="module")
def weak():
    if not os.path.isfile(WEAK):
        pytest.skip("artifacts/weak_int8.tflite not found")
    return WeakClassifier(WEAK, edgetpu=False)


def test_default_card_weak_tensor_is_the_committed_formula(weak):
    """The committed weak model with its default card: exactly uint8 * float32(1/255), area-resized
    28 -> 14 in float32, then floor(round(x / scale, 3) + 0.5) + zero_point (main's quantize_input)."""
    assert weak.card.source == "defaults" and (weak.height, weak.width, weak.channels) == (14, 14, 1)
    scale, zp = weak.input_scale, weak.input_zero_point
    for img in fashion_images():
        x = cv2.resize(img.astype(np.float32) * UNIT, (14, 14), interpolation=cv2.INTER_AREA)
        x = np.clip(x, 0.0, 1.0)
        want = half_up_q(x.astype(np.float64) / scale, np.int8, zp)[None, :, :, None]
        got = weak.quantize_input(img)
        assert got.dtype == np.int8
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(preprocess.to_input(
            img, weak.card, dtype=np.int8, scale=scale, zero_point=zp), want)
        bgr = np.repeat(img[:, :, None], 3, axis=2)
        np.testing.assert_array_equal(weak.quantize_input(bgr), want)


def test_default_card_weak_same_size_uint8(weak):
    """A uint8 image already 14x14 is normalised from its exact pixels (p / 255): for every pixel
    value the quantised input is still main's (uint8 * float32(1/255) / scale, rounded)."""
    p = np.arange(256, dtype=np.uint8)
    img = np.resize(p, (14, 14))
    old = half_up_q((img.astype(np.float32) * UNIT).astype(np.float64) / weak.input_scale,
                    np.int8, weak.input_zero_point)
    np.testing.assert_array_equal(weak.quantize_input(img)[0, :, :, 0], old)


@pytest.fixture(scope="module")
def strong():
    pytest.importorskip("onnxruntime")
    if not os.path.isfile(STRONG):
        pytest.skip("artifacts/strong.onnx not found")
    from offload.server.model import StrongModel

    return StrongModel(STRONG, threads=1)


def test_default_card_strong_tensor_is_the_committed_formula(strong):
    """The committed strong model: a 28x28 grey uint8 image is float32 pixels / 255 (NCHW), bit for
    bit; a BGR image of another size is the float area resize of uint8 * float32(1/255) to grey."""
    assert strong.card.labels[0] == "T-shirt/top" and strong.card.channels == 1
    assert strong.class_names == list(strong.card.labels)
    for img in fashion_images():
        want = (img.astype(np.float32) / 255.0)[None]
        got = strong.prepare(img)
        assert got.dtype == np.float32 and got.shape == (1, 28, 28)
        np.testing.assert_array_equal(got, want)
    big = cv2.resize(fashion_images(1)[0], (56, 42), interpolation=cv2.INTER_LINEAR)
    bgr = np.ascontiguousarray(np.stack([big, big // 2, 255 - big], axis=2))
    grey = cv2.cvtColor(bgr.astype(np.float32) * UNIT, cv2.COLOR_BGR2GRAY)
    want = np.clip(cv2.resize(grey, (28, 28), interpolation=cv2.INTER_AREA), 0, 1)[None]
    np.testing.assert_array_equal(strong.prepare(bgr), want)


# --------------------------------------------------------------------------- conventions


def colour_image(seed, h, w):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("dtype,scale,zp", [(np.uint8, 1 / 128, 128), (np.int8, 1 / 128, 0)])
def test_zoo_minus_one_to_one(tmp_path, dtype, scale, zp):
    """Coral zoo style: [-1, 1] input (mean = std = 128) on a uint8 tensor (q - 128) / 128 and on
    an int8 tensor q / 128; the fed tensor is (p - 128) / 128 / scale + zero_point."""
    model = echo_model(tmp_path / "m.tflite", 16, 16, 3, dtype, scale, zp)
    clf = WeakClassifier(model, edgetpu=False, card={"mean": 128, "std": 128, "order": "rgb"})
    img = colour_image(1, 16, 16)          # BGR, model size: no resize
    rgb = img[:, :, ::-1].astype(np.float64)
    v = (rgb - 128.0) / 128.0 / scale
    got = clf.classify(img).q
    np.testing.assert_array_equal(got.reshape(16, 16, 3), half_up_q(v, dtype, zp))


@pytest.mark.parametrize("dtype,scale,zp,offset", [(np.uint8, 1 / 128, 128, 0),
                                                   (np.int8, 1 / 128, 0, 128)])
def test_tensor_normalisation_feeds_raw_pixels(tmp_path, dtype, scale, zp, offset):
    """normalization = "tensor": uint8 q = pixel, int8 q = pixel - 128, whatever the scale;
    resolve reports the mean and std the quantisation implies."""
    model = echo_model(tmp_path / "m.tflite", 8, 8, 3, dtype, scale, zp)
    clf = WeakClassifier(model, edgetpu=False, card={"normalization": "tensor"})
    assert clf.card.mean == (zp + offset,) and clf.card.std == (128.0,)
    img = colour_image(2, 8, 8)
    got = clf.classify(img).q.reshape(8, 8, 3)
    np.testing.assert_array_equal(got, (img.astype(np.int16) - offset).astype(dtype))


def test_tensor_normalisation_refused_on_a_float_tensor(tmp_path):
    model = echo_model(tmp_path / "f.tflite", 4, 4, 1, np.float32)
    with pytest.raises(ClassifierError, match=r"'tensor'.*float32"):
        WeakClassifier(model, edgetpu=False, card={"normalization": "tensor"})


def test_imagenet_mean_std_rgb_float_tensor(tmp_path):
    """Per-channel mean/std in pixel units, RGB order, on a float tensor: (p - mean) / std."""
    mean, std = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
    model = echo_model(tmp_path / "f.tflite", 10, 12, 3, np.float32)
    clf = WeakClassifier(model, edgetpu=False, card={"mean": mean, "std": std, "order": "rgb"})
    img = colour_image(3, 10, 12)
    want = (img[:, :, ::-1].astype(np.float64) - mean) / std
    np.testing.assert_allclose(clf.classify(img).q.reshape(10, 12, 3), want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("order", ["rgb", "bgr"])
@pytest.mark.parametrize("input_order", ["rgb", "bgr"])
def test_colour_order(tmp_path, order, input_order):
    """The model's channel 0 is red for an "rgb" card, blue for "bgr", whatever order the image is in."""
    model = echo_model(tmp_path / "m.tflite", 4, 4, 3, np.uint8, 1 / 255, 0)
    clf = WeakClassifier(model, edgetpu=False, card={"order": order}, bgr=input_order == "bgr")
    img = np.zeros((4, 4, 3), np.uint8)
    red, blue = (2, 0) if input_order == "bgr" else (0, 2)
    img[:, :, red], img[:, :, blue] = 200, 10
    got = clf.classify(img).q.reshape(4, 4, 3)
    assert np.all(got[:, :, 0] == (200 if order == "rgb" else 10))
    assert np.all(got[:, :, 2] == (10 if order == "rgb" else 200))


def crop_window(H, W, h, w):
    """The documented centre crop: the largest centred window of aspect w/h (side rounded half up,
    at least 1)."""
    if W * h > H * w:
        cw = min(W, max(1, int(np.floor(H * w / h + 0.5))))
        return 0, H, (W - cw) // 2, (W - cw) // 2 + cw
    if W * h < H * w:
        ch = min(H, max(1, int(np.floor(W * h / w + 0.5))))
        return (H - ch) // 2, (H - ch) // 2 + ch, 0, W
    return 0, H, 0, W


def interp(src_h, src_w, h, w):
    return cv2.INTER_AREA if h <= src_h and w <= src_w else cv2.INTER_LINEAR


@given(H=st.integers(3, 60), W=st.integers(3, 60), h=st.integers(2, 20), w=st.integers(2, 20),
       seed=st.integers(0, 2**16))
def test_crop_fed_tensor(tmp_path_factory, H, W, h, w, seed):
    """resize = "crop" on a uint8 tensor (scale 1/255): the centre window, resized, quantised."""
    model = _echo(tmp_path_factory, h, w)
    clf = WeakClassifier(model, edgetpu=False, card={"resize": "crop", "order": "rgb"})
    img = colour_image(seed, H, W)
    y0, y1, x0, x1 = crop_window(H, W, h, w)
    win = np.ascontiguousarray(img[y0:y1, x0:x1, ::-1]).astype(np.float32) * UNIT
    x = win
    if (y1 - y0, x1 - x0) != (h, w):
        x = cv2.resize(win, (w, h), interpolation=interp(y1 - y0, x1 - x0, h, w))
    assert_quantised_equal(clf.classify(img).q, np.clip(x, 0, 1).astype(np.float64) * 255, np.uint8)


@given(H=st.integers(3, 60), W=st.integers(3, 60), h=st.integers(2, 20), w=st.integers(2, 20),
       pad=st.integers(0, 255), seed=st.integers(0, 2**16))
def test_letterbox_fed_tensor(tmp_path_factory, H, W, h, w, pad, seed):
    """resize = "letterbox": fit inside (scale min(h/H, w/W), sides rounded half up), centred on pad."""
    model = _echo(tmp_path_factory, h, w)
    clf = WeakClassifier(model, edgetpu=False, card={"resize": "letterbox", "pad": pad,
                                                     "order": "rgb"})
    img = colour_image(seed, H, W)
    s = min(h / H, w / W)
    nh, nw = min(h, max(1, int(np.floor(H * s + 0.5)))), min(w, max(1, int(np.floor(W * s + 0.5))))
    src = np.ascontiguousarray(img[:, :, ::-1]).astype(np.float32) * UNIT
    inner = cv2.resize(src, (nw, nh), interpolation=interp(H, W, nh, nw)) if (nh, nw) != (H, W) else src
    want = np.full((h, w, 3), pad, np.float64)
    top, left = (h - nh) // 2, (w - nw) // 2
    want[top:top + nh, left:left + nw] = np.clip(inner, 0, 1).astype(np.float64) * 255
    # the pad is pad / 255 in float32, times 255 here: within 1e-4 of pad
    assert_quantised_equal(clf.classify(img).q, want, np.uint8)


_ECHO = {}


def _echo(factory, h, w):
    """One echo model per size for the hypothesis tests (a fixture cannot vary with the example)."""
    if (h, w) not in _ECHO:
        _ECHO[(h, w)] = echo_model(factory.mktemp("echo") / f"e{h}x{w}.tflite", h, w, 3,
                                   np.uint8, 1 / 255, 0)
    return _ECHO[(h, w)]


def test_fit_pixels_uint8_path_for_sending():
    """fit_pixels keeps uint8 (each OpenCV step rounds): a crop of a 1080p frame to 236x236 is the
    centre 1080x1080 window area-resized by OpenCV in uint8."""
    frame = colour_image(7, 1080, 1920)
    card = ModelCard(height=236, width=236, channels=3, resize="crop")
    got = preprocess.fit_pixels(frame, card)
    want = cv2.resize(np.ascontiguousarray(frame[:, 420:1500]), (236, 236),
                      interpolation=cv2.INTER_AREA)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)


def test_grey_and_colour_conversions():
    """Colour -> grey by OpenCV's weights in the image's order; grey -> 3 identical channels."""
    card1 = ModelCard(height=5, width=5, channels=1)
    card3 = ModelCard(height=5, width=5, channels=3)
    img = colour_image(8, 5, 5)
    np.testing.assert_array_equal(preprocess.fit_pixels(img, card1)[:, :, 0],
                                  cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
    np.testing.assert_array_equal(preprocess.fit_pixels(img, card1, input_order="rgb")[:, :, 0],
                                  cv2.cvtColor(img, cv2.COLOR_RGB2GRAY))
    bgra = np.concatenate([img, np.full((5, 5, 1), 9, np.uint8)], axis=2)
    np.testing.assert_array_equal(preprocess.fit_pixels(bgra, card3), img)
    grey = img[:, :, 0]
    np.testing.assert_array_equal(preprocess.fit_pixels(grey, card3), np.stack([grey] * 3, 2))


def test_nchw_layout(tmp_path):
    model = echo_model(tmp_path / "nchw.tflite", 4, 6, 3, np.uint8, 1 / 255, 0, layout="NCHW")
    clf = WeakClassifier(model, edgetpu=False)
    assert clf.layout == "NCHW" and (clf.height, clf.width, clf.channels) == (4, 6, 3)
    img = colour_image(9, 4, 6)
    np.testing.assert_array_equal(clf.classify(img).q.reshape(3, 4, 6), np.transpose(img, (2, 0, 1)))


def test_bad_images_and_unresolved_cards():
    card = ModelCard(height=4, width=4, channels=1)
    with pytest.raises(preprocess.ImageError, match="dtype"):
        preprocess.to_input(np.zeros((4, 4), np.int32), card)
    with pytest.raises(preprocess.ImageError, match="shape"):
        preprocess.to_input(np.zeros((4, 4, 2), np.uint8), card)
    with pytest.raises(preprocess.ImageError, match=r"\[0, 1\]"):
        preprocess.to_input(np.full((4, 4), 2.0), card)
    with pytest.raises(CardError, match="resolve"):
        preprocess.to_input(np.zeros((4, 4), np.uint8), ModelCard())
    with pytest.raises(CardError, match="tensor"):
        preprocess.to_input(np.zeros((4, 4), np.uint8), ModelCard(height=4, width=4, channels=1,
                                                                 normalization="tensor"))
    r = resolve(ModelCard(), shape=(1, 4, 4, 1), dtype=np.float32)
    assert preprocess.to_input(np.zeros((4, 4), np.uint8), r).shape == (1, 4, 4, 1)


def test_model_size_uint8_is_normalised_from_exact_pixels():
    """At the model's size, BGR, RGB and BGRA frames of one picture give the same tensor, bit for
    bit: float32 (pixel - mean) / std of the exact pixels in the card's order."""
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    card = resolve(ModelCard(order="rgb", mean=mean, std=std), shape=(1, 3, 6, 5),
                   dtype=np.float32, layout="NCHW")
    bgr = colour_image(11, 6, 5)
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    bgra = np.concatenate([bgr, np.zeros((6, 5, 1), np.uint8)], axis=2)
    want = (rgb.astype(np.float32) - np.float32(mean)) / np.float32(std)
    want = np.transpose(want, (2, 0, 1))[None]
    for img, order in ((bgr, "bgr"), (rgb, "rgb"), (bgra, "bgr")):
        got = preprocess.to_input(img, card, layout="NCHW", input_order=order)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)
