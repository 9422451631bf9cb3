"""Device loop runtime: watchdog, accelerator choice, config, log rotation, signals, CLI."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner

import offload.classifier as C
from offload.blob import read_blob
from offload.classifier import EdgeTPUUnavailable, WeakClassifier
from offload.device import ConfigError, make_config, run
from offload.device.capture import MemorySource, SourceError
from offload.device.cli import main
from offload.device.config import load_toml
from offload.device.framelog import FrameLog, read_log
from offload.device.weak import AcceleratorWarning, open_weak

from device_helpers import CLIP, DQN, KEY, LABELS, MODEL, FakeServer, check_log, demo_frames

BLOB = read_blob(DQN)


# --------------------------------------------------------------------------- watchdog


class Hanging:
    """A classifier that hangs (until released) on the calls listed in ``hang_on``."""

    def __init__(self, hang_on=(), release=None):
        self.inner = WeakClassifier(MODEL, edgetpu=False)
        self.n_classes = self.inner.n_classes
        self.hang_on, self.calls = set(hang_on), 0
        self.release = release or threading.Event()

    def classify(self, image):
        self.calls += 1
        if self.calls in self.hang_on:
            self.release.wait(30)
        return self.inner.classify(image)


def _run_with(tmp_path, make, make_cpu=None, n=30, timeout=0.3):
    frames, _ = demo_frames()
    log = str(tmp_path / "frames.jsonl")
    cfg = make_config(overrides={"policy": DQN, "model": MODEL, "log": log,
                                 "inference_timeout": timeout})
    s = run(cfg, source=MemorySource(frames[:n]), make_classifier=make,
            make_cpu_classifier=make_cpu, echo=lambda m: None, install_signals=False)
    return s, check_log(read_log(log), n, BLOB.N, BLOB.P, BLOB.M)


def test_watchdog_reloads_after_a_hang(tmp_path):
    release = threading.Event()
    built = []

    def make():
        built.append(Hanging(hang_on={5} if not built else (), release=release))
        return built[-1]

    try:
        s, recs = _run_with(tmp_path, make)
    finally:
        release.set()
    assert len(built) == 2                             # loaded, then reloaded once
    assert recs[4]["event"] == "hang-reloaded" and recs[4]["outcome"] == "weak-failed"
    assert recs[4]["final"] is None and recs[4]["ms"]["weak"] >= 300
    assert all("event" not in r and "weak_top" in r for i, r in enumerate(recs) if i != 4)
    assert s["weak_events"] == {"hang-reloaded": 1} and s["frames"] == 30
    # the slot of the failed frame is still counted: frame 5 is 2 slots after frame 3
    assert recs[5]["slots"] == 2


def test_watchdog_falls_back_to_cpu_when_reload_hangs(tmp_path):
    release = threading.Event()
    calls = {"make": 0, "cpu": 0}

    def make():
        calls["make"] += 1
        if calls["make"] == 2:
            release.wait(30)                            # the reload hangs too
        return Hanging(hang_on={3} if calls["make"] == 1 else (), release=release)

    def make_cpu():
        calls["cpu"] += 1
        return Hanging()

    try:
        s, recs = _run_with(tmp_path, make, make_cpu)
    finally:
        release.set()
    assert calls["cpu"] == 1
    assert recs[2]["event"] == "hang-cpu" and recs[2]["outcome"] == "weak-failed"
    assert s["weak_events"] == {"hang-cpu": 1} and len(recs) == 30


def test_watchdog_second_hang_moves_to_cpu(tmp_path):
    release = threading.Event()
    built = {"make": 0, "cpu": 0}

    def make():                      # every instance hangs on its 3rd inference
        built["make"] += 1
        return Hanging(hang_on={3}, release=release)

    def make_cpu():
        built["cpu"] += 1
        return Hanging()

    try:
        s, recs = _run_with(tmp_path, make, make_cpu)
    finally:
        release.set()
    assert [(r["id"], r["event"]) for r in recs if "event" in r] == [(2, "hang-reloaded"),
                                                                      (5, "hang-cpu")]
    assert built == {"make": 2, "cpu": 1} and len(recs) == 30


def test_watchdog_gives_up_with_a_clear_error_and_a_complete_log(tmp_path):
    release = threading.Event()
    calls = []

    def make():                      # loads once, hangs on frame 4, and the reload fails
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("device gone")
        return Hanging(hang_on={4}, release=release)

    from offload.device.weak import WatchdogError

    try:
        with pytest.raises(WatchdogError, match="could not be reloaded .*device gone"):
            _run_with(tmp_path, make, n=10)
    finally:
        release.set()
    recs = read_log(tmp_path / "frames.jsonl")
    assert [r["id"] for r in recs] == [0, 1, 2, 3]     # the failed frame is logged too
    assert recs[3]["outcome"] == "error" and "WatchdogError" in recs[3]["error"]


# --------------------------------------------------------------------------- accelerators


def _compiled_copy(tmp_path, twin=True):
    """A model file that looks Edge-TPU-compiled (holds the custom op's name)."""
    path = tmp_path / "weak_edgetpu.tflite"
    path.write_bytes(open(MODEL, "rb").read() + b"edgetpu-custom-op")
    if twin:
        shutil.copy(MODEL, tmp_path / "weak.tflite")
    return str(path)


@pytest.fixture
def no_edgetpu(monkeypatch):
    monkeypatch.setattr(C, "EDGETPU_LIBRARY", "libedgetpu-absent-for-test.so.1")


def test_compiled_model_refused_without_delegate(tmp_path, no_edgetpu):
    path = _compiled_copy(tmp_path)
    with pytest.raises(EdgeTPUUnavailable, match=r"weak\.tflite"):
        open_weak(path, "cpu")
    with pytest.raises(EdgeTPUUnavailable, match=r"weak\.tflite"):
        WeakClassifier(path, edgetpu=False)
    with pytest.raises(EdgeTPUUnavailable):
        open_weak(path, "edgetpu")
    r = CliRunner().invoke(main, ["--video", CLIP, "--policy", DQN, "--model", path,
                                  "--accelerator", "cpu"])
    assert r.exit_code == 1 and "Error:" in r.output and "weak.tflite" in r.output
    assert "Traceback" not in r.output


def test_auto_with_compiled_model_uses_its_cpu_twin(tmp_path, no_edgetpu):
    path = _compiled_copy(tmp_path)
    with pytest.warns(AcceleratorWarning) as w:
        clf, spec = open_weak(path, "auto")
    assert len(w) == 1 and spec.model.endswith("weak.tflite") and spec.accelerator == "cpu"
    os.remove(tmp_path / "weak.tflite")
    with pytest.raises(EdgeTPUUnavailable, match=r"--model .*weak\.tflite"):
        open_weak(path, "auto")


def test_auto_warns_once_and_falls_back(tmp_path, no_edgetpu):
    msgs = []
    cfg = make_config(overrides={"video": CLIP, "policy": DQN, "model": MODEL,
                                 "accelerator": "auto", "max_frames": 20})
    s = run(cfg, echo=msgs.append, install_signals=False)
    warns = [m for m in msgs if m.startswith("warning:")]
    assert len(warns) == 1 and "CPU" in warns[0] and s["frames"] == 20
    r = CliRunner().invoke(main, ["--video", CLIP, "--policy", DQN, "--max-frames", "5"])
    assert r.exit_code == 0 and r.output.count("warning: Edge TPU not available") == 1


def test_device_spec_reaches_the_delegate(monkeypatch):
    seen = []
    import ai_edge_litert.interpreter as I

    def fake_load(lib, options=None):
        seen.append((lib, options))
        raise ValueError("no device in the test")

    monkeypatch.setattr(C.ctypes, "CDLL", lambda name: None)
    monkeypatch.setattr(I, "load_delegate", fake_load)
    with pytest.warns(AcceleratorWarning):
        open_weak(MODEL, "auto", device="usb:0")
    assert seen == [(C.EDGETPU_LIBRARY, {"device": "usb:0"})]
    with pytest.raises(EdgeTPUUnavailable):
        open_weak(MODEL, "edgetpu", device="pci")
    assert seen[-1][1] == {"device": "pci"}
    with pytest.raises(ConfigError, match="device"):
        make_config(overrides={"device": "usb0"})


# --------------------------------------------------------------------------- config


def test_config_file_and_flag_precedence(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('video = "clip.avi"\nslot-ms = 100\nqueue_size = 4\nrealtime = true\n')
    cfg = make_config(load_toml(f), {"slot-ms": 250, "queue-size": None})
    assert cfg.slot_ms == 250.0 and cfg.queue_size == 4 and cfg.realtime is True
    assert cfg.source == ("video", "clip.avi")


@pytest.mark.parametrize("values,key", [
    ({"slot-ms": -5}, "slot-ms"), ({"slot-ms": "fast"}, "slot-ms"),
    ({"queue-size": 0}, "queue-size"), ({"colour": "red"}, "colour"),
    ({"accelerator": "gpu"}, "accelerator"), ({"image-format": "gif"}, "image-format"),
    ({"realtime": "maybe"}, "realtime"), ({"video": "a", "camera": 0}, "video"),
    ({"server": "https://"}, "server"), ({"server": "ftp://x"}, "server"),
    ({"key": "a", "key-file": "b"}, "key"), ({"top-k": True}, "top-k"),
    ({"jpeg-quality": 101}, "jpeg-quality"), ({"log-backups": 0}, "log-backups"),
    ({"fps": 5}, "fps"), ({"max-frames": 0}, "max-frames"),
])
def test_config_errors_name_the_key(values, key):
    with pytest.raises(ConfigError) as e:
        make_config(values)
    assert str(e.value).startswith(key + ":")


def test_docs_config_table_is_generated():
    """docs/device.md holds exactly the table generated from RunConfig's declaration."""
    from offload.device.config import DOCS_BEGIN, DOCS_END, docs_table

    doc = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "device.md"),
               encoding="utf-8").read()
    assert doc.count(DOCS_BEGIN) == 1 and doc.count(DOCS_END) == 1
    block = doc.split(DOCS_BEGIN, 1)[1].split(DOCS_END, 1)[0]
    assert block == docs_table(), "regenerate with offload.device.config.update_docs_table"


def test_each_key_is_declared_once_and_drives_reader_and_flags():
    from offload.device.cli import main as cli_main
    from offload.device.config import KEYS, RunConfig

    assert [k.attr for k in KEYS] == [f for f in RunConfig.__dataclass_fields__]
    defaults = make_config()
    flags = {o.name: o for o in cli_main.params}
    for k in KEYS:
        assert getattr(defaults, k.attr) == k.default      # the reader's default is the declared one
        opt = flags[k.attr]                                 # one flag per key, typed as declared
        assert opt.opts == [f"--{k.name}"] and k.help in opt.help
        if k.type is bool:
            assert opt.secondary_opts == [f"--no-{k.name}"]
        else:
            assert opt.type.name == {int: "integer", float: "float", str: "text"}[k.type]
    bounded = {k.name: k.bound for k in KEYS if k.bound}
    assert bounded["jpeg-quality"] == "1..100" and bounded["slot-ms"] == "> 0"
    assert bounded["accelerator"] == "auto, edgetpu, cpu"
    with pytest.raises(ConfigError, match=r"^jpeg-quality: must be in 1\.\.100, got 101$"):
        make_config({"jpeg-quality": 101})
    with pytest.raises(ConfigError, match=r"^camera: must be >= 0, got -1$"):
        make_config({"camera": -1})


def test_firmware_settings_use_declared_keys():
    """The keys the firmware sets or refuses are declared device keys (a rename breaks here)."""
    from firmware import settings

    from offload.device.config import key_name

    table, _ = settings.device_config({"server": "https://h:1", "queue_size": 4},
                                      settings_name="s")
    assert all(key_name(k) == k for k in (*settings.RESERVED, *table))
    assert table["queue-size"] == 4


def test_cli_config_errors_are_one_line(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('video = "x.avi"\nbogus-key = 1\n')
    r = CliRunner().invoke(main, ["--config", str(f)])
    assert r.exit_code == 1 and "Error: bogus-key: unknown config file key" in r.output
    f.write_text("video = [unclosed\n")
    r = CliRunner().invoke(main, ["--config", str(f)])
    assert r.exit_code == 1 and "not valid TOML" in r.output
    r = CliRunner().invoke(main, ["--video", CLIP, "--slot-ms", "0"])
    assert r.exit_code == 1 and "Error: slot-ms:" in r.output
    r = CliRunner().invoke(main, ["--policy", DQN])
    assert r.exit_code == 1 and "no frame source" in r.output
    r = CliRunner().invoke(main, ["--video", str(tmp_path / "none.avi"), "--policy", DQN])
    assert r.exit_code == 1 and "no such file" in r.output
    (tmp_path / "junk.avi").write_bytes(b"not a video at all" * 10)
    r = CliRunner().invoke(main, ["--video", str(tmp_path / "junk.avi"), "--policy", DQN])
    assert r.exit_code == 1 and "Error: video" in r.output
    r = CliRunner().invoke(main, ["--video", CLIP, "--policy", str(tmp_path / "none.bin")])
    assert r.exit_code == 1 and "cannot read" in r.output
    r = CliRunner().invoke(main, ["--video", CLIP, "--policy", DQN, "--server", "http://h:1"])
    assert r.exit_code == 1 and "Error: key:" in r.output
    (tmp_path / "empty.key").write_text("\n")
    r = CliRunner().invoke(main, ["--video", CLIP, "--policy", DQN, "--server", "http://h:1",
                                  "--key-file", str(tmp_path / "empty.key")])
    assert r.exit_code == 1 and "key-file:" in r.output and "empty" in r.output
    r = CliRunner().invoke(main, ["--video", CLIP, "--policy", DQN, "--labels", LABELS + ".no"])
    assert r.exit_code == 1 and "labels" in r.output
    for res in (r,):
        assert "Traceback" not in res.output


def test_missing_default_policy_is_a_clear_error(monkeypatch, tmp_path):
    import offload.device.loop as L

    monkeypatch.setattr(L.artifacts, "find", lambda name: None)
    r = CliRunner().invoke(main, ["--video", CLIP])
    assert r.exit_code == 1 and "Error: policy: no --policy given" in r.output


def test_images_folder_errors(tmp_path):
    with pytest.raises(SourceError, match="no image files"):
        run(make_config(overrides={"images": str(tmp_path), "policy": DQN}),
            echo=lambda m: None, install_signals=False)


# --------------------------------------------------------------------------- frame log


def test_rotation_keeps_every_record_whole(tmp_path):
    log = tmp_path / "f.jsonl"
    cfg = make_config(overrides={"video": CLIP, "policy": DQN, "model": MODEL, "log": str(log),
                                 "log_max_bytes": 8000, "log_backups": 100,
                                 "accelerator": "cpu"})
    s = run(cfg, echo=lambda m: None, install_signals=False)
    files = sorted(p for p in os.listdir(tmp_path) if p.startswith("f.jsonl"))
    assert len(files) > 3
    for p in files:
        data = (tmp_path / p).read_bytes()
        assert len(data) <= 8000 and data.endswith(b"\n")
        for line in data.splitlines():
            json.loads(line)
    recs = read_log(log)
    assert [r["id"] for r in recs] == list(range(200)) and s["frames"] == 200


def test_rotation_drops_the_oldest_beyond_backups(tmp_path):
    path = tmp_path / "x.log"
    with FrameLog(path, max_bytes=100, backups=2) as fl:
        for i in range(20):
            fl.write({"id": i, "pad": "x" * 40})
    assert sorted(os.listdir(tmp_path)) == ["x.log", "x.log.1", "x.log.2"]
    ids = [r["id"] for r in read_log(path)]
    assert ids == list(range(20 - len(ids), 20))
    with FrameLog(tmp_path / "big.log", max_bytes=10, backups=1) as fl:   # record > max: own file
        fl.write({"id": 0, "pad": "y" * 50})
        fl.write({"id": 1, "pad": "y" * 50})
    assert [r["id"] for r in read_log(tmp_path / "big.log")] == [0, 1]


def test_log_nan_is_null(tmp_path):
    with FrameLog(tmp_path / "n.log") as fl:
        fl.write({"x": float("nan")})
    assert json.loads((tmp_path / "n.log").read_text()) == {"x": None}


# --------------------------------------------------------------------------- signals, CLI


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_run_leaves_a_complete_log(tmp_path, sig):
    """A paced replay with answers held back by the server: stop mid-run, every frame logged."""
    srv = FakeServer("gate")
    key = tmp_path / "cam1.key"
    key.write_text(KEY + "\n")
    log = tmp_path / "frames.jsonl"
    summ = tmp_path / "s.json"
    exe = os.path.join(os.path.dirname(sys.executable), "offload-run")
    cmd = [exe, "--video", CLIP, "--server", srv.url, "--key-file", str(key), "--policy", DQN,
           "--log", str(log), "--realtime", "--slot-ms", "200", "--drain-timeout", "0.5",
           "--read-timeout", "20", "--summary-json", str(summ), "--accelerator", "cpu"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30     # a generous limit for a slow machine, not a measurement
        ready = False
        while not ready and time.monotonic() < deadline and p.poll() is None:
            # wait until frames are being logged and sent
            ready = log.exists() and log.read_text().count("\n") >= 8 and bool(srv.requests)
            if not ready:
                time.sleep(0.05)
        if not ready:
            p.kill()
            out, err = p.communicate(timeout=10)
            pytest.fail(f"the loop never got ready (8 frames logged, one request sent) before the "
                        f"signal; exit status {p.returncode}, stderr:\n{err[-2000:]}")
        p.send_signal(sig)
        out, err = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
        srv.kill()
    assert p.returncode == 128 + int(sig), err
    s = json.loads(summ.read_text())
    assert s["interrupted"] and s["signal"] == sig.name and 8 <= s["frames"] < 200
    recs = check_log(read_log(log), s["frames"], BLOB.N, BLOB.P, BLOB.M)
    assert any(r["outcome"] == "cancelled" for r in recs)   # held answers: cancelled, still logged
    assert "Traceback" not in err and "weak inference" in out


def test_cli_documented_command_with_a_server(tmp_path):
    frames, labels = demo_frames()
    srv = FakeServer(answer_class=lambda fid: labels[fid])
    (tmp_path / "cam1.key").write_text(KEY)
    shutil.copy(DQN, tmp_path / "policy.bin")
    shutil.copy(CLIP, tmp_path / "clip.avi")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        r = CliRunner().invoke(main, ["--video", "clip.avi", "--server", srv.url, "--key-file",
                                      "cam1.key", "--policy", "policy.bin", "--log",
                                      "frames.jsonl", "--queue-size", "200"])
    finally:
        os.chdir(cwd)
        srv.kill()
    assert r.exit_code == 0, r.output
    assert "weak inference" in r.output and "strong inference" in r.output
    recs = check_log(read_log(tmp_path / "frames.jsonl"), 200, BLOB.N, BLOB.P, BLOB.M)
    assert sum(r["outcome"] == "sent" for r in recs) >= 5


# --------------------------------------------------------------------------- sources, status


def test_camera_source_with_a_stand_in_device(monkeypatch):
    """cv2.VideoCapture(N) replaced by the demo clip: ids, monotonic times, labels."""
    import cv2

    from offload.device import capture

    real = cv2.VideoCapture
    monkeypatch.setattr(cv2, "VideoCapture", lambda index: real(CLIP) if index == 3 else real(""))
    src = capture.CameraSource(3, labels={0: 5})
    frames = [f for _, f in zip(range(5), src)]
    src.close()
    assert [f.frame_id for f in frames] == list(range(5)) and frames[0].label == 5
    assert frames[0].t == 0.0 and all(b.t >= a.t for a, b in zip(frames, frames[1:]))
    with pytest.raises(SourceError, match="camera 7"):
        capture.CameraSource(7)


def test_picamera_source_with_a_stand_in_module(monkeypatch):
    import types

    import numpy as np

    from offload.device import capture

    class Req:
        def __init__(self, k):
            self.k = k

        def make_array(self, name):
            return np.full((4, 6, 3), self.k, np.uint8)

        def get_metadata(self):
            return {"SensorTimestamp": 10**9 + self.k * 200_000_000}

        def release(self):
            pass

    class Picamera2:
        def __init__(self, num):
            self.k = 0

        def create_video_configuration(self, main):
            assert main["format"] == "RGB888"
            return main

        def configure(self, c):
            pass

        def start(self):
            pass

        def capture_request(self):
            self.k += 1
            return Req(self.k)

        def stop(self):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "picamera2", types.SimpleNamespace(Picamera2=Picamera2))
    src = capture.PicameraSource(0)
    frames = [f for _, f in zip(range(3), src)]
    src.close()
    assert [f.t for f in frames] == pytest.approx([0.0, 0.2, 0.4])
    assert frames[2].image.shape == (4, 6, 3) and frames[2].image[0, 0, 0] == 3
    monkeypatch.setitem(sys.modules, "picamera2", None)     # import fails
    with pytest.raises(SourceError, match="picamera2"):
        capture.PicameraSource(0)


def test_status_line_only_on_a_tty(monkeypatch):
    import io

    from offload.device import status as S
    from offload.device.record import FrameRecord, Outcome
    from offload.device.status import Stats, StatusLine

    clock = [100.0]
    monkeypatch.setattr(S.time, "monotonic", lambda: clock[0])

    class Tty(io.StringIO):
        def isatty(self):
            return True

    stats = Stats()
    stats.add(FrameRecord(id=0, t=0.0, label=None, offload=True, outcome=Outcome.SENT,
                          ms={"weak": 1.0, "policy": 0.1}, tokens_after=3.0))
    tty, plain = Tty(), io.StringIO()
    for stream in (tty, plain):
        line = StatusLine(stream, stats)
        clock[0] += 1.0
        line.update()
        clock[0] += 0.1
        line.update()          # within 1/4 s of the last: not redrawn
        clock[0] += 0.2
        line.update()          # 0.3 s after: redrawn
        line.finish()
    assert plain.getvalue() == ""
    text = tty.getvalue()
    assert text.startswith("\r1 frames 1.0/s") and text.count("\r") == 3 and text.endswith("\n")
    assert "offload 100.0%" in text and "tokens 3.00" in text
