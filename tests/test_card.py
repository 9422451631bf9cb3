"""offload.card: fields and their checks, label files, the file's own metadata, precedence, resolve."""

import json
import os
import shutil

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from offload import card as C
from offload import model_metadata
from offload.card import CardError, ModelCard, read_card, read_labels, resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEAK = os.path.join(ROOT, "artifacts", "weak_int8.tflite")
STRONG = os.path.join(ROOT, "artifacts", "strong.onnx")
#: The committed weak model with metadata written by Google's tflite-support
#: writer (tests/data/make_metadata_model.py): mean = std = 127.5, RGB, labels.txt.
WEAK_META = os.path.join(ROOT, "tests", "data", "weak_metadata.tflite")
FMNIST = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
          "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


# --------------------------------------------------------------------------- fields


def test_defaults_are_main_s_convention():
    c = ModelCard()
    assert (c.height, c.width, c.channels, c.order) == (None, None, None, "bgr")
    assert (c.mean, c.std, c.normalization, c.resize, c.pad) == ((0.0,), (255.0,), "meanstd",
                                                                 "stretch", 0)
    assert c.labels is None and c.source == "defaults" and not c.resolved


def test_fields_are_canonicalised_and_frozen():
    c = ModelCard(height=224.0, mean=128, std=[58.4, 57.1, 57.4], order="RGB", labels=["a", "b"])
    assert c.height == 224 and c.mean == (128.0,) and c.std == (58.4, 57.1, 57.4)
    assert c.order == "rgb" and c.labels == ("a", "b")
    with pytest.raises(Exception):
        c.height = 3


@pytest.mark.parametrize("fields,message", [
    ({"height": 0}, "height must be 1..16384"),
    ({"width": 2.5}, "width must be a whole number"),
    ({"channels": 2}, "channels must be 1 or 3"),
    ({"order": "grb"}, "order must be rgb or bgr"),
    ({"mean": [1, 2]}, "mean must be one number or one per channel"),
    ({"std": 0}, "std must be one number or one per channel, > 0"),
    ({"std": float("nan")}, "std must be"),
    ({"normalization": "zscore"}, "normalization must be meanstd or tensor"),
    ({"resize": "fill"}, "resize must be stretch, crop, letterbox"),
    ({"pad": 256}, "pad must be 0..255"),
    ({"labels": "abc"}, "labels must be a list"),
    ({"labels": ["a", ""]}, "label 1 must be a non-empty string"),
    ({"labels": ["a", "b", "a"]}, "label 2 repeats 'a' of label 0"),
    ({"channels": 1, "mean": [1, 2, 3]}, "mean has 3 values for 1 channel"),
    ({"height": True}, "height must be a whole number"),
])
def test_bad_fields_are_refused_naming_the_field_and_source(fields, message):
    with pytest.raises(CardError, match=message) as e:
        ModelCard(**fields, source="my.card.toml")
    assert str(e.value).startswith("my.card.toml: card field")


def test_toml_card_errors_name_the_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('height = 64\ncolour = "rgb"\n')
    with pytest.raises(CardError, match=rf"{p}: unknown card field\(s\) colour"):
        read_card(tmp_path / "m.tflite", override=p)
    p.write_text("height = [\n")
    with pytest.raises(CardError, match=rf"{p}: not a valid TOML card"):
        read_card(tmp_path / "m.tflite", override=p)
    p.write_text('order = "rbg"\n')
    with pytest.raises(CardError, match=rf"{p}: card field order must be rgb or bgr, got 'rbg'"):
        read_card(tmp_path / "m.tflite", override=p)
    p.write_text('labels = ["a", "b"]\nlabels_file = "l.txt"\n')
    with pytest.raises(CardError, match="labels or labels_file, not both"):
        read_card(tmp_path / "m.tflite", override=p)
    with pytest.raises(CardError, match="cannot read the card"):
        read_card(tmp_path / "m.tflite", override=tmp_path / "missing.toml")


def test_fields_table_lists_every_field_and_the_docs_show_it():
    table = C.fields_table()
    for f in C.FIELDS:
        assert f"`{f.name}`" in table
    assert "`labels_file`" in table
    with open(os.path.join(ROOT, "docs", "classifiers.md"), encoding="utf-8") as f:
        assert table in f.read(), "docs/classifiers.md: paste offload.card.fields_table() again"


# --------------------------------------------------------------------------- labels


@pytest.mark.parametrize("text", [
    "0:cat\n1:dog\n2:traffic light\n",
    "0 cat\n1  dog\n2\ttraffic light\n",
    "0: cat\n1 : dog\n2:traffic light",
    "cat\ndog\ntraffic light\n\n\n",
    "\ufeffcat\r\ndog\r\ntraffic light\r\n",
    "2 traffic light\n0 cat\n1 dog\n",
])
def test_label_file_forms(tmp_path, text):
    p = tmp_path / "labels.txt"
    p.write_text(text, encoding="utf-8")
    assert read_labels(p) == ("cat", "dog", "traffic light")


@pytest.mark.parametrize("text,message", [
    ("0 cat\n2 dog\n", r"ids must be 0..1 without gaps; id 1 is missing \(and id 2 on line 2"),
    ("1 cat\n2 dog\n", "id 0 is missing"),
    ("0 cat\n0 dog\n1 fox\n", "line 2 repeats id 0 of line 1"),
    ("0:cat\n1:cat\n", "line 2 repeats 'cat' of line 1"),
    ("cat\ndog\ncat\n", "line 3 repeats 'cat' of line 1"),
    ("0 cat\ndog\n", "line 2 is not 'id label' or 'id:label' as line 1 is"),
    ("cat\n\ndog\n", "line 2 is empty"),
    ("\n\n", "holds no labels"),
])
def test_bad_label_files_name_the_file_and_line(tmp_path, text, message):
    p = tmp_path / "labels.txt"
    p.write_text(text)
    with pytest.raises(CardError, match=message) as e:
        read_labels(p)
    assert str(e.value).startswith(str(p))


def test_label_file_unreadable(tmp_path):
    with pytest.raises(CardError, match="cannot read the label file"):
        read_labels(tmp_path / "none.txt")
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(CardError, match="not UTF-8"):
        read_labels(p)


_name = st.text(st.characters(categories=("L", "N", "P", "Zs"), exclude_characters="\r\n\x85"),
                min_size=1, max_size=12).map(str.strip).filter(
                    lambda s: s and not s[0].isdigit() and s[0] != ":"
                    and "\u2028" not in s and "\u2029" not in s)


@given(names=st.lists(_name, min_size=2, max_size=30, unique=True),
       form=st.sampled_from(["{i}:{n}", "{i} {n}", "{n}"]), shuffle=st.randoms())
def test_label_files_round_trip(tmp_path_factory, names, form, shuffle):
    """Any distinct names, written in any of the three forms (ids in any order), read back."""
    rows = [form.format(i=i, n=n) for i, n in enumerate(names)]
    if form != "{n}":
        shuffle.shuffle(rows)
    p = tmp_path_factory.mktemp("labels") / "l.txt"
    p.write_text("\n".join(rows) + "\n", encoding="utf-8")
    assert read_labels(p) == tuple(names)


# --------------------------------------------------------------------------- metadata


def test_tflite_metadata_written_by_tflite_support_is_read():
    """The real writer's file: NormalizationOptions 127.5/127.5, RGB, the packed labels.txt."""
    meta = model_metadata.tflite_card_metadata(WEAK_META)
    assert meta["mean"] == [127.5] and meta["std"] == [127.5] and meta["color_space"] == "rgb"
    assert meta["labels_text"][0] == "labels.txt"
    c = read_card(WEAK_META)
    assert (c.mean, c.std, c.order, c.labels) == ((127.5,), (127.5,), "rgb", FMNIST)
    assert c.channels is None  # the writer says RGB even for this 1-channel model
    assert c.source == f"{WEAK_META} metadata > defaults" and c.origin("mean") == f"{WEAK_META} metadata"


ECHO_GREY_META = os.path.join(ROOT, "tests", "data", "echo_grey_metadata.tflite")


def test_tflite_metadata_grayscale_and_the_label_file_without_locale():
    """tflite-support's lower-level writer: GRAYSCALE, mean 10 / std 2, labels.txt ('id label',
    ids reversed) listed after labels_fr.txt (locale fr): the file without a locale is used."""
    c = read_card(ECHO_GREY_META)
    assert (c.channels, c.mean, c.std) == (1, (10.0,), (2.0,))
    assert c.labels == tuple(f"v{i}" for i in range(36))


def test_metadata_card_drives_the_fed_tensor():
    """The echo model returns what it was fed: q = clip(floor((p - 10) / 2 / scale + 0.5)), scale 1."""
    pytest.importorskip("ai_edge_litert")
    from offload.classifier import WeakClassifier

    clf = WeakClassifier(ECHO_GREY_META, edgetpu=False)
    assert clf.class_names[35] == "v35" and clf.card.mean == (10.0,)
    img = np.arange(0, 256, 7, dtype=np.uint8)[:36].reshape(6, 6)
    want = np.clip(np.floor((img.astype(np.float64) - 10) / 2 + 0.5), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(clf.classify(img).q.reshape(6, 6), want)


def test_model_without_metadata_gets_the_defaults():
    assert model_metadata.tflite_card_metadata(WEAK) == {"mean": None, "std": None,
                                                         "color_space": None, "labels_text": None}
    assert read_card(WEAK) == ModelCard()


def test_damaged_tflite_is_one_clear_error(tmp_path):
    p = tmp_path / "bad.tflite"
    p.write_bytes(b"\x04\x00\x00\x00" + b"\xff" * 8)
    with pytest.raises(CardError, match=rf"{p}: damaged TFLite metadata"):
        read_card(p)


def test_onnx_metadata_props_read_without_onnx():
    """The committed strong.onnx: offload.json's class names become the labels; the hand-written
    protobuf scan finds what ONNX Runtime's custom_metadata_map holds."""
    props = model_metadata.onnx_metadata_props(STRONG)
    assert json.loads(props["offload.json"])["class_names"] == list(FMNIST)
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(STRONG, providers=["CPUExecutionProvider"])
    assert sess.get_modelmeta().custom_metadata_map == props
    assert read_card(STRONG).labels == FMNIST
    assert read_card(STRONG, metadata=props) == read_card(STRONG)


def onnx_echo(path, shape, card=None, extra=None):
    """A float ONNX model that flattens its input (its output is the tensor it was fed)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    n = int(np.prod(shape[1:])) if all(isinstance(d, int) for d in shape[1:]) else "n"
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["logits"], axis=1)], "echo",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [shape[0], n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    props = dict(extra or {})
    if card is not None:
        props[C.ONNX_CARD_KEY] = json.dumps(card)
    for k, v in props.items():
        e = model.metadata_props.add()
        e.key, e.value = k, v
    onnx.save(model, str(path))
    return str(path)


def test_onnx_card_key_is_read(tmp_path):
    card = {"height": 8, "width": 8, "order": "rgb", "mean": [123.675, 116.28, 103.53],
            "std": [58.395, 57.12, 57.375], "resize": "crop", "labels": [f"c{i}" for i in range(192)]}
    p = onnx_echo(tmp_path / "m.onnx", ["batch", 3, 8, 8], card=card)
    c = read_card(p)
    assert (c.height, c.order, c.resize, c.mean[0], c.labels[5]) == (8, "rgb", "crop", 123.675, "c5")
    bad = onnx_echo(tmp_path / "bad.onnx", ["batch", 3, 8, 8], extra={C.ONNX_CARD_KEY: "{nope"})
    with pytest.raises(CardError, match=r"bad.onnx metadata \(offload.card\): not valid JSON"):
        read_card(bad)


# --------------------------------------------------------------------------- precedence


def test_precedence_override_metadata_sidecar_defaults(tmp_path):
    """Each field from the highest layer declaring it: override > file metadata > sidecar > defaults."""
    model = tmp_path / "weak.tflite"
    shutil.copy(WEAK_META, model)
    (tmp_path / "labels.txt").write_text("\n".join(f"{i} s{i}" for i in range(10)) + "\n")
    sidecar = tmp_path / "weak.tflite.card.toml"
    sidecar.write_text('mean = 1\nstd = 2\nresize = "letterbox"\npad = 7\nlabels_file = "labels.txt"\n')
    over = tmp_path / "over.toml"
    over.write_text('pad = 9\norder = "bgr"\n')
    c = read_card(model, override=over)
    assert c.pad == 9 and c.order == "bgr"                          # override
    assert (c.mean, c.std, c.labels) == ((127.5,), (127.5,), FMNIST)  # the file's own metadata
    assert c.resize == "letterbox"                                   # sidecar
    assert c.normalization == "meanstd" and c.height is None          # defaults
    assert c.source == f"{over} > {model} metadata > {sidecar} > defaults"
    assert c.origin("resize") == str(sidecar) and c.origin("pad") == str(over)
    # without metadata, the sidecar's labels file (relative to the sidecar) and mean/std apply
    plain = tmp_path / "plain.tflite"
    shutil.copy(WEAK, plain)
    shutil.copy(sidecar, str(plain) + ".card.toml")
    c = read_card(plain, override={"pad": 3})
    assert (c.mean, c.std, c.pad, c.labels[9]) == ((1.0,), (2.0,), 3, "s9")
    assert c.source == f"override > {plain}.card.toml > defaults"


def test_an_override_card_object_is_used_as_given(tmp_path):
    given_card = ModelCard(height=3, source="mine")
    assert read_card(WEAK, override=given_card) is given_card


# --------------------------------------------------------------------------- resolve


def test_resolve_fills_from_the_tensor():
    r = resolve(ModelCard(), shape=(1, 14, 14, 1), dtype=np.int8, scale=1 / 255, zero_point=-128,
                n_classes=10, path="w.tflite")
    assert (r.height, r.width, r.channels) == (14, 14, 1) and r.resolved
    assert r.origin("height") == "w.tflite input tensor"
    r = resolve(ModelCard(), shape=("batch", 3, 32, 48), dtype=np.float32)
    assert (r.height, r.width, r.channels) == (32, 48, 3)


def test_resolve_tensor_normalisation_derives_mean_std():
    r = resolve(ModelCard(normalization="tensor"), shape=(1, 8, 8, 3), dtype=np.uint8,
                scale=1 / 128, zero_point=128)
    assert r.mean == (128.0,) and r.std == (128.0,)
    r = resolve(ModelCard(normalization="tensor"), shape=(1, 8, 8, 3), dtype=np.int8,
                scale=0.5, zero_point=-3)
    assert r.mean == (125.0,) and r.std == (2.0,)


@pytest.mark.parametrize("card,kw,message", [
    (ModelCard(height=64, source="c.toml", origins=(("height", "c.toml"),)), {},
     r"w.tflite: the card's height 64 \(from c.toml\) contradicts the model's input tensor, "
     r"whose height is 14"),
    (ModelCard(width=20), {}, "card's width 20 .* whose width is 14"),
    (ModelCard(channels=3), {}, "card's channels 3 .* whose channels is 1"),
    (ModelCard(labels=("a", "b", "c")), {"n_classes": 10},
     r"labels \(from defaults\) name 3 classes, but the model's output has 10"),
    (ModelCard(normalization="tensor"), {"dtype": np.float32},
     "normalization 'tensor' .* needs an integer input tensor, but the model's input tensor is float32"),
    (ModelCard(), {"shape": (1, "h", "w", 3), "dtype": np.float32},
     "input tensor's height is dynamic"),
    (ModelCard(), {"dtype": np.int16}, "int16 are not supported"),
    (ModelCard(), {"scale": 0.0}, "without quantisation parameters"),
    (ModelCard(mean=(1.0, 2.0, 3.0)), {}, "mean has 3 values for 1 channel"),
    (ModelCard(), {"shape": (1, 5, 5, 5)}, "cannot tell the channel axis"),
])
def test_resolve_refuses_contradictions_naming_both(card, kw, message):
    args = dict(shape=(1, 14, 14, 1), dtype=np.int8, scale=1 / 255, zero_point=-128,
                path="w.tflite")
    args.update(kw)
    with pytest.raises(CardError, match=message):
        resolve(card, **args)


def test_tensor_layout():
    assert C.tensor_layout((1, 224, 224, 3)) == "NHWC"
    assert C.tensor_layout(("n", 3, 224, 224)) == "NCHW"
    assert C.tensor_layout((1, 3, 4, 3)) == "NHWC"
    assert C.tensor_layout((1, 3, 4, 3), prefer="NCHW") == "NCHW"
    with pytest.raises(CardError, match="4-D"):
        C.tensor_layout((1, 10))


# --------------------------------------------------------------------------- models refuse


def test_weak_classifier_refuses_a_contradicting_card_at_start(tmp_path):
    pytest.importorskip("ai_edge_litert")
    from offload.classifier import ClassifierError, WeakClassifier
    from offload.device.weak import open_weak

    card = tmp_path / "c.toml"
    card.write_text("height = 64\nwidth = 64\n")
    with pytest.raises(ClassifierError, match=rf"{WEAK}: the card's height 64 \(from {card}\) "
                                              r"contradicts the model's input tensor, whose height is 14"):
        WeakClassifier(WEAK, edgetpu=False, card=card)
    with pytest.raises(ClassifierError, match="card's height 64"):
        open_weak(WEAK, "cpu", card=card)
    model = tmp_path / "weak.tflite"
    shutil.copy(WEAK, model)
    (tmp_path / "weak.tflite.card.toml").write_text('labels = ["a", "b"]\n')
    with pytest.raises(ClassifierError, match=r"name 2 classes, but the model's output has 10"):
        WeakClassifier(model, edgetpu=False)


def test_weak_classifier_exposes_its_resolved_card():
    pytest.importorskip("ai_edge_litert")
    from offload.classifier import WeakClassifier
    from offload.device.weak import open_weak

    clf = WeakClassifier(WEAK_META, edgetpu=False)
    assert clf.card.resolved and clf.card.mean == (127.5,) and clf.class_names == list(FMNIST)
    clf, spec = open_weak(WEAK, "cpu", card={"labels": [f"k{i}" for i in range(10)]})
    assert clf.class_names[3] == "k3" and clf.card.height == 14 and spec.make().card == clf.card


def test_strong_model_card(tmp_path):
    """An ImageNet-style card (RGB, per-channel mean/std, centre crop) on an ONNX model: the fed
    tensor is the centre crop, resized, in RGB, (p - mean) / std, NCHW."""
    pytest.importorskip("onnxruntime")
    cv2 = pytest.importorskip("cv2")
    from offload.server.model import ModelError, StrongModel

    mean, std = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
    card = {"order": "rgb", "mean": mean, "std": std, "resize": "crop"}
    p = onnx_echo(tmp_path / "m.onnx", ["batch", 3, 8, 8], card=card)
    m = StrongModel(p, threads=1)
    assert m.card.resize == "crop" and m.n_classes == 192 and m.layout == "NCHW"
    img = np.random.default_rng(4).integers(0, 256, (12, 20, 3), dtype=np.uint8)  # BGR
    win = img[:, 4:16, ::-1].astype(np.float32) * np.float32(1 / 255)
    small = cv2.resize(np.ascontiguousarray(win), (8, 8), interpolation=cv2.INTER_AREA)
    want = np.transpose((small.astype(np.float64) * 255 - mean) / std, (2, 0, 1))
    got = m.prepare(img)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    np.testing.assert_allclose(m.run(got[None])[0][0], want.ravel(), rtol=0, atol=1e-4)
    # a flag override wins over the metadata; a contradicting one is refused at start
    over = tmp_path / "over.toml"
    over.write_text("height = 16\n")
    with pytest.raises(ModelError, match=rf"the card's height 16 \(from {over}\) contradicts .* "
                                         "whose height is 8"):
        StrongModel(p, card=over)
    dyn = onnx_echo(tmp_path / "dyn.onnx", ["batch", 3, "h", "w"])
    with pytest.raises(ModelError, match="height is dynamic"):
        StrongModel(dyn)
    m = StrongModel(dyn, card={"height": 4, "width": 6})
    assert m.prepare(img).shape == (3, 4, 6) and m.n_classes == 72


def test_strong_model_nhwc_input(tmp_path):
    """An ONNX model whose channel axis is last (a converted TF model) gets (H, W, C) items."""
    pytest.importorskip("onnxruntime")
    from offload.server.model import StrongModel

    m = StrongModel(onnx_echo(tmp_path / "nhwc.onnx", ["batch", 5, 7, 3]), threads=1)
    assert m.layout == "NHWC" and m.item_shape == (5, 7, 3)
    img = np.random.default_rng(5).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(m.prepare(img), img.astype(np.float32) / np.float32(255))


def test_onnx_card_without_onnx_runtime(tmp_path):
    """read_onnx_card (the device's way to learn the strong model's input) agrees with
    StrongModel's resolved card, on the committed model and on a crop/RGB card with a dynamic size."""
    c = C.read_onnx_card(STRONG)
    assert (c.height, c.width, c.channels, c.labels) == (28, 28, 1, FMNIST)
    assert model_metadata.onnx_inputs(STRONG) == [("image", "float32", ["batch", 1, 28, 28])]
    dyn = onnx_echo(tmp_path / "dyn.onnx", ["batch", 3, "h", "w"],
                    card={"height": 12, "width": 16, "order": "rgb", "resize": "crop"})
    c = C.read_onnx_card(dyn)
    assert (c.height, c.width, c.channels, c.order, c.resize) == (12, 16, 3, "rgb", "crop")
    pytest.importorskip("onnxruntime")
    from offload.server.model import StrongModel

    assert StrongModel(dyn, threads=1).card == c
    assert StrongModel(STRONG, threads=1).card == C.read_onnx_card(STRONG)
    with pytest.raises(CardError, match="not a readable ONNX model"):
        (tmp_path / "junk.onnx").write_bytes(b"\xff\xff\xff")
        C.read_onnx_card(tmp_path / "junk.onnx")


def test_offload_serve_card_flag(tmp_path):
    pytest.importorskip("onnxruntime")
    from click.testing import CliRunner

    from offload.server import keys as K
    from offload.server.cli import main as serve_main

    keys = tmp_path / "k.toml"
    K.add_key(keys, "a")
    bad = tmp_path / "bad.toml"
    bad.write_text("channels = 3\n")
    for args, message in [
        (["--card", str(tmp_path / "none.toml")], "card file"),
        (["--card", str(bad)], "the card's channels 3"),
    ]:
        r = CliRunner().invoke(serve_main, ["--keys", str(keys), "--model", STRONG, *args])
        assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output, r.output
        assert r.output.count("Error") == 1
