"""What the device sends: frames shrunk to --send-size, JPEG for cameras, bytes in the log."""

import cv2
import numpy as np
import pytest

from offload.device import make_config, run
from offload.device.capture import MemorySource
from offload.device.config import ConfigError
from offload.device.framelog import read_log
from offload.device.payload import (Payload, card_box, parse_size, resolve_format,
                                    shrink_to_cover, shrink_to_fit)

from device_helpers import DQN, KEY, MODEL, FakeServer, demo_frames


def test_parse_size():
    assert parse_size("236x236") == (236, 236)
    assert parse_size(" 640X480 ") == (640, 480)
    for bad in ("236", "0x10", "10x", "axb", "-3x4", "9000x10"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_send_size_is_checked_with_the_config():
    with pytest.raises(ConfigError, match="send-size"):
        make_config(overrides={"send_size": "236 by 236"})
    assert make_config(overrides={"send_size": "236X236"}).send_size == "236x236"


@pytest.mark.parametrize("shape,box,want", [
    ((1080, 1920, 3), (236, 236), (133, 236)),     # landscape: width bound, aspect kept
    ((1920, 1080, 3), (236, 236), (236, 133)),     # portrait: height bound
    ((480, 640), (64, 64), (48, 64)),              # greyscale
    ((28, 28, 3), (236, 236), (28, 28)),           # never enlarged
    ((3, 5000, 3), (100, 100), (1, 100)),          # a side never rounds to 0
])
def test_shrink_to_fit(shape, box, want):
    a = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    out = shrink_to_fit(a, *box)
    assert out.shape[:2] == want and out.dtype == np.uint8 and out.ndim == a.ndim
    if want == shape[:2]:
        assert out is a


def test_shrink_averages_the_pixels_it_drops():
    # A 2x2 checkerboard of 0/200 at 4x the size averages to 100 everywhere (area
    # interpolation), where nearest-neighbour sampling would keep 0 or 200.
    board = np.kron(np.indices((8, 8)).sum(axis=0) % 2 * 200, np.ones((1, 1))).astype(np.uint8)
    out = shrink_to_fit(board, 4, 4)
    assert out.shape == (4, 4) and np.all(out == 100)


def test_auto_format_is_jpeg_for_cameras_only():
    assert resolve_format("auto", "camera") == "jpeg"
    assert resolve_format("auto", "picamera") == "jpeg"
    for kind in ("video", "images", None):
        assert resolve_format("auto", kind) == "png"
    assert resolve_format("png", "camera") == "png"
    with pytest.raises(ValueError, match="gif"):
        resolve_format("gif", "camera")


def test_payload_encodes_the_shrunk_frame():
    frame = np.zeros((1080, 1920, 3), np.uint8)
    cv2.circle(frame, (960, 540), 400, (30, 160, 250), -1)
    body, ctype = Payload(fmt="jpeg", quality=80, size=(236, 236)).encode(frame)
    assert ctype == "image/jpeg"
    back = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
    assert back.shape == (133, 236, 3)
    whole, _ = Payload(fmt="png").encode(frame)
    assert len(body) < len(whole)
    with pytest.raises(ValueError, match="quality"):
        Payload(fmt="jpeg", quality=0)


def test_the_server_receives_the_send_size_and_the_log_counts_the_bytes(tmp_path):
    frames, _ = demo_frames()
    big = [cv2.resize(f, (320, 240), interpolation=cv2.INTER_LINEAR) for f in frames[:80]]
    srv = FakeServer()
    try:
        log = str(tmp_path / "frames.jsonl")
        cfg = make_config(overrides=dict(policy=DQN, model=MODEL, accelerator="cpu", key=KEY,
                                         server=srv.url, log=log, queue_size=200,
                                         send_size="64x64", image_format="jpeg",
                                         jpeg_quality=70))
        s = run(cfg, source=MemorySource(big), echo=lambda m: None, install_signals=False)
    finally:
        srv.kill()
    recs = read_log(log)
    sent = [r for r in recs if r["outcome"] == "sent"]
    assert sent, "the policy offloads some of the 80 frames"
    assert {q["shape"] for q in srv.requests} == {(48, 64, 3)}
    assert {q["type"] for q in srv.requests} == {"image/jpeg"}
    by_id = {int(q["frame_id"]): q["bytes"] for q in srv.requests}
    assert all(r["sent_bytes"] == by_id[r["id"]] for r in sent)
    assert all("sent_bytes" not in r for r in recs if not r["offload"])
    assert s["sent_bytes"]["total"] == sum(by_id.values())
    assert s["sent_bytes"]["requests"] == len(srv.requests)
    assert s["stages_ms"]["encode"]["n"] == len(sent)


def _card(tmp_path, resize, size=(64, 64)):
    path = tmp_path / f"strong-{resize}.card.toml"
    path.write_text(f'height = {size[1]}\nwidth = {size[0]}\nchannels = 3\nresize = "{resize}"\n')
    return str(path)


def test_card_box_covers_for_a_cropping_model(tmp_path):
    assert card_box(_card(tmp_path, "crop", (64, 48))) == ((64, 48), True)
    assert card_box(_card(tmp_path, "letterbox")) == ((64, 64), False)
    (tmp_path / "nosize.card.toml").write_text('resize = "crop"\n')
    with pytest.raises(ValueError, match="declares no height and width"):
        card_box(str(tmp_path / "nosize.card.toml"))
    with pytest.raises(ValueError, match="cannot read the card"):
        card_box(str(tmp_path / "missing.card.toml"))


@pytest.mark.parametrize("shape,want", [((240, 320, 3), (64, 85)), ((320, 240, 3), (85, 64)),
                                        ((60, 60, 3), (60, 60))])
def test_shrink_to_cover(shape, want):
    out = shrink_to_cover(np.zeros(shape, np.uint8), 64, 64)
    assert out.shape[:2] == want
    assert out.shape[0] >= min(64, shape[0]) and out.shape[1] >= min(64, shape[1])


def test_send_size_card_needs_a_card():
    with pytest.raises(ConfigError, match="send-size: card needs --server-card"):
        make_config(overrides={"send_size": "card"})
    with pytest.raises(ConfigError, match="server-card: only applies to --protocol v2, or to"):
        make_config(overrides={"server_card": "x.card.toml"})


@pytest.mark.parametrize("resize,want", [("crop", (64, 85, 3)), ("stretch", (48, 64, 3))])
def test_send_size_card_sends_the_server_models_size(tmp_path, resize, want):
    frames, _ = demo_frames()
    big = [cv2.resize(f, (320, 240), interpolation=cv2.INTER_LINEAR) for f in frames[:60]]
    srv = FakeServer()
    try:
        cfg = make_config(overrides=dict(policy=DQN, model=MODEL, accelerator="cpu", key=KEY,
                                         server=srv.url, queue_size=200, send_size="card",
                                         server_card=_card(tmp_path, resize)))
        run(cfg, source=MemorySource(big), echo=lambda m: None, install_signals=False)
    finally:
        srv.kill()
    assert srv.requests and {q["shape"] for q in srv.requests} == {want}
