"""The wire format (offload.wire) and the server's header-first image checks (offload.server.images)."""

import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

cv2 = pytest.importorskip("cv2")

from offload import artifacts, wire  # noqa: E402
from offload.wire import WireError  # noqa: E402


def _frame(i=0):
    path = artifacts.find(os.path.join("demo", "frames", f"{i:06d}.png"))
    if path is None:
        pytest.skip("demo frames not found")
    return cv2.imread(path, cv2.IMREAD_UNCHANGED)


def _image(rng, shape):
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


@pytest.mark.parametrize("shape", [(28, 28), (17, 40, 3), (5, 3)])
def test_png_round_trip_is_exact(shape):
    img = _image(np.random.default_rng(0), shape)
    body, ctype = wire.encode_image(img, "png")
    assert ctype == "image/png"
    out = wire.decode_image(body, ctype)
    assert out.dtype == np.uint8 and np.array_equal(out, img)


def test_jpeg_round_trip_is_close():
    img = _frame(3)
    big = cv2.resize(img, (112, 112), interpolation=cv2.INTER_NEAREST)
    body, ctype = wire.encode_image(big, "jpeg", quality=95)
    assert ctype == "image/jpeg" and body[:2] == b"\xff\xd8"
    out = wire.decode_image(body, "image/jpeg; charset=binary")  # parameters are ignored
    assert out.shape == big.shape
    assert np.mean(np.abs(out.astype(int) - big.astype(int))) < 6


def test_encode_refuses_bad_input():
    with pytest.raises(WireError, match="format"):
        wire.encode_image(np.zeros((4, 4), np.uint8), "gif")
    with pytest.raises(WireError, match="uint8"):
        wire.encode_image(np.zeros((4, 4), np.float32))
    with pytest.raises(WireError, match="uint8"):
        wire.encode_image(np.zeros((4, 4, 2), np.uint8))


def _bodies():
    img = _frame(0)
    png, _ = wire.encode_image(img, "png")
    jpg, _ = wire.encode_image(cv2.resize(img, (64, 64)), "jpeg")
    return png, jpg


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.99])
def test_truncated_images_are_refused(fraction):
    png, jpg = _bodies()
    with pytest.raises(WireError, match="truncated PNG"):
        wire.decode_image(png[:int(len(png) * fraction)], "image/png")
    with pytest.raises(WireError, match="truncated JPEG"):
        wire.decode_image(jpg[:int(len(jpg) * fraction)], "image/jpeg")


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.integers(min_value=1, max_value=10_000))
def test_any_cut_of_an_image_is_refused(cut):
    png, jpg = _bodies()
    for body, media in ((png, "image/png"), (jpg, "image/jpeg")):
        k = max(1, len(body) - cut)
        with pytest.raises(WireError):
            wire.decode_image(body[:k], media)


@settings(max_examples=100)
@given(body=st.binary(max_size=512), media=st.sampled_from(["image/png", "image/jpeg"]),
       prefix=st.sampled_from([b"", b"\xff\xd8", b"\x89PNG\r\n\x1a\n"]))
def test_garbage_raises_wire_error_only(body, media, prefix):
    from offload.server.images import decode_body

    data = prefix + body
    for fn in (lambda: wire.decode_image(data, media), lambda: decode_body(data, media)):
        try:
            img = fn()
        except WireError:
            continue
        assert img.dtype == np.uint8  # rarely, random bytes are a valid tiny image


def test_empty_and_wrong_type():
    with pytest.raises(WireError, match="empty"):
        wire.decode_image(b"", "image/png")
    png, _ = _bodies()
    with pytest.raises(WireError, match="content type"):
        wire.decode_image(png, "text/plain")
    with pytest.raises(WireError, match="not a JPEG"):
        wire.decode_image(png, "image/jpeg")
    assert wire.content_type_ok("image/PNG; q=1") and not wire.content_type_ok("image/gif")
    assert not wire.content_type_ok(None)


def test_answer_round_trip_and_refusals():
    body = wire.answer_body([3, 1], [0.9, 0.05], names=["Dress", "Trouser"], inference_ms=1.25,
                            batch_size=4, frame_id=17)
    a = wire.parse_answer(body, n_classes=10)
    assert (a.classes, a.top1, a.names, a.batch_size, a.frame_id) == ([3, 1], 3, ["Dress", "Trouser"],
                                                                      4, "17")
    assert a.scores == pytest.approx([0.9, 0.05]) and a.inference_ms == pytest.approx(1.25)
    assert json.loads(wire.error_body("nope")) == {"error": "nope"}
    bad = [b"not json", b"{}", b'{"top": []}', b'{"top": [{"class": 11, "score": 0.5}]}',
           b'{"top": [{"class": 1, "score": 1.5}]}', b'{"top": [{"class": true, "score": 0.5}]}',
           b'{"top": [{"class": 1, "score": 0.5}], "batch_size": 0}']
    for b in bad:
        with pytest.raises(WireError):
            wire.parse_answer(b, n_classes=10)


def test_image_size_from_headers_matches_decoded():
    from offload.server.images import image_size

    rng = np.random.default_rng(1)
    for shape in [(28, 28), (31, 57, 3), (240, 320, 3)]:
        img = _image(rng, shape)
        for fmt in ("png", "jpeg"):
            body, ctype = wire.encode_image(img, fmt)
            assert image_size(body, ctype) == (shape[1], shape[0])


def test_oversized_picture_refused_before_decoding(monkeypatch):
    from offload.server import images

    # 3000x3000 zeros: a small PNG that would inflate to 9 megapixels.
    body, ctype = wire.encode_image(np.zeros((3000, 3000), np.uint8), "png")
    assert len(body) < 100_000

    def no_decode(*a, **k):  # the refusal must come from the header alone
        raise AssertionError("decoded an oversized image")

    monkeypatch.setattr(images, "decode_image", no_decode)
    with pytest.raises(WireError, match="3000x3000 pixels is over"):
        images.decode_body(body, ctype, max_pixels=2048 * 2048)


def _check_answer(a, n_classes):
    assert isinstance(a, wire.Answer) and 1 <= len(a.classes) <= wire.MAX_TOP_ITEMS
    assert len(a.classes) == len(a.scores) == len(a.names)
    assert all(isinstance(c, int) and 0 <= c < n_classes for c in a.classes)
    assert all(0.0 <= s <= 1.0 for s in a.scores) and all(isinstance(n, str) for n in a.names)
    assert a.inference_ms >= 0 and np.isfinite(a.inference_ms) and a.batch_size >= 1
    assert a.frame_id is None or isinstance(a.frame_id, str)


def _parses_or_refuses(body, n_classes=10):
    try:
        a = wire.parse_answer(body, n_classes)
    except WireError:
        return None
    _check_answer(a, n_classes)
    return a


@settings(max_examples=300)
@given(body=st.binary(max_size=2048))
def test_parse_answer_of_any_bytes_is_an_answer_or_a_wire_error(body):
    _parses_or_refuses(body)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda kids: st.lists(kids, max_size=4)
                     | st.dictionaries(st.sampled_from(["top", "class", "score", "name",
                                                        "inference_ms", "batch_size", "frame_id"]),
                                       kids, max_size=4), max_leaves=30)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(obj=_json, prefix=st.sampled_from(["", "[", "{\"top\": ", "[[[[[[[["]))
def test_parse_answer_of_any_json_is_an_answer_or_a_wire_error(obj, prefix):
    text = prefix + json.dumps(obj)
    _parses_or_refuses(text.encode())


_item = st.fixed_dictionaries({"class": st.integers(0, 9), "score": st.floats(0, 1)},
                              optional={"name": st.text(max_size=wire.MAX_NAME_CHARS + 2)})


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(top=st.lists(_item, min_size=1, max_size=wire.MAX_TOP_ITEMS + 3),
       depth=st.integers(0, wire.MAX_ANSWER_DEPTH + 2),
       fid=st.none() | st.text(max_size=wire.MAX_FRAME_ID_CHARS + 2))
def test_structured_answers_near_the_limits(top, depth, fid):
    obj = {"top": top, "inference_ms": 1.5, "batch_size": 2,
           "extra": json.loads("[" * depth + "]" * depth) if depth else 0}
    if fid is not None:
        obj["frame_id"] = fid
    body = json.dumps(obj).encode()
    a = _parses_or_refuses(body)
    within = (len(top) <= wire.MAX_TOP_ITEMS and 1 + depth <= wire.MAX_ANSWER_DEPTH
              and all(len(t.get("name", "")) <= wire.MAX_NAME_CHARS for t in top)
              and (fid is None or len(fid) <= wire.MAX_FRAME_ID_CHARS))
    assert (a is not None) == within
    if a is not None:
        assert a.classes == [t["class"] for t in top]


def test_the_largest_legitimate_answer_fits_the_cap():
    names = ["\U0001F600" * wire.MAX_NAME_CHARS] * wire.MAX_TOP_ITEMS   # each character escaped
    body = wire.answer_body(list(range(wire.MAX_TOP_ITEMS)), [1e-7] * wire.MAX_TOP_ITEMS,
                            names=names, inference_ms=123456789.123, batch_size=10**9,
                            frame_id="\U0001F600" * wire.MAX_FRAME_ID_CHARS)
    assert len(body) <= wire.LARGEST_ANSWER_BYTES <= wire.MAX_ANSWER_BYTES // 2
    a = wire.parse_answer(body, wire.MAX_TOP_ITEMS)
    assert len(a.classes) == wire.MAX_TOP_ITEMS and a.names[0] == names[0]
    # answer_body keeps a longer answer within the limits
    long = wire.answer_body(list(range(300)), [0.001] * 300, names=["n" * 500] * 300,
                            inference_ms=1, batch_size=1, frame_id="f" * 500)
    b = wire.parse_answer(long)
    assert len(b.classes) == wire.MAX_TOP_ITEMS and len(b.names[0]) == wire.MAX_NAME_CHARS
    assert len(b.frame_id) == wire.MAX_FRAME_ID_CHARS


@pytest.mark.parametrize("body,why", [
    (b'{"top": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "nested deeper"),
    (b"[" * 10_000_000, "over the limit"),
    (b'{"top": [' + b"0," * 5000 + b"0]}", "JSON values"),
    (b'{"top": [{"class": ' + b"9" * 5000 + b', "score": 0.5}]}', "number of 5000"),
    (b'{"top": [{"class": 1, "score": NaN}]}', "NaN"),
    (b'{"top": [{"class": 1, "score": 0.5}], "inference_ms": 1e999}', "not a time"),
    (b'{"top": [{"class": 1, "score": 0.5, "name": ["x"]}]}', "name must be a string"),
    (b'"' + b'\\"' * 50_000, "never ends"),
])
def test_hostile_answers_are_refused_before_parsing(body, why):
    with pytest.raises(WireError, match=why):
        wire.parse_answer(body)
