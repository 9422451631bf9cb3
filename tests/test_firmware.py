"""The firmware build (``offload-firmware``, docs/firmware.md) on synthetic Raspberry Pi OS images.

Each image is built here, unprivileged and without loop mounts, like a real
Raspberry Pi OS Lite image in miniature: a sparse file with an MBR partition
table (sfdisk), a FAT32 boot partition (type 0x0c, ``mkfs.vfat --offset``)
holding config.txt, cmdline.txt and the cloud-init seed files, and an ext4
root partition (0x83, ``mkfs.ext4 -E offset= -d``) holding os-release,
``/usr/bin/cloud-init`` and ``/usr/lib/python3.13``. Results are read back with
mtools and compared byte for byte. Every refusal must be one ``Error:`` line,
exit status 1, no output file (nor a temporary one) and the input unchanged.

The tests need sfdisk (fdisk), mtools, mkfs.vfat (dosfstools) and mkfs.ext4 /
debugfs (e2fsprogs); tools/setup.sh installs them, and without them the tests
skip saying which is missing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile

import pytest

from firmware import cloudinit, edgetpu, fat, image, settings, wheels
from firmware.build import data_path
from firmware.tools import FirmwareError, missing
from firmware.yamlout import dump
from offload import artifacts

TOOLS = ("sfdisk", "mcopy", "mdir", "mmd", "minfo", "mdel", "mkfs.vfat", "mkfs.ext4", "debugfs")
_GONE = missing(*TOOLS)
needs_tools = pytest.mark.skipif(bool(_GONE), reason=f"image tools missing: {', '.join(_GONE)} "
                                 "(apt-get install fdisk mtools dosfstools e2fsprogs)")
CLI = os.path.join(os.path.dirname(sys.executable), "offload-firmware")
SECTOR = 512
BOOT_START = 8192                   # 4 MiB, as Raspberry Pi OS images start their boot partition
KEY = "k3y-0123456789abcdefABCDEF_-"


def _sbin(tool):
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_image(path, tmp, *, boot_mb=40, root_mb=16, with_root=True, codename="trixie",
               cloud_init=True, python="3.13"):
    """A miniature Raspberry Pi OS image at ``path``; returns (boot_offset, root_offset)."""
    boot_sectors = boot_mb * 2048
    root_start = BOOT_START + boot_sectors
    root_sectors = root_mb * 2048 if with_root else 0
    total = (root_start + root_sectors + 2048) * SECTOR
    with open(path, "wb") as f:
        f.truncate(total)
    table = f"label: dos\nstart={BOOT_START}, size={boot_sectors}, type=c\n"
    if with_root:
        table += f"start={root_start}, size={root_sectors}, type=83\n"
    subprocess.run([_sbin("sfdisk"), "-q", path], input=table, text=True, check=True,
                   capture_output=True)
    subprocess.run([_sbin("mkfs.vfat"), "-F", "32", "-n", "BOOTFS", "--offset", str(BOOT_START),
                    path, str(boot_sectors // 2)], check=True, capture_output=True)
    boot = BOOT_START * SECTOR
    files = tmp / "bootfiles"
    files.mkdir(exist_ok=True)
    for name, text in (("config.txt", "arm_64bit=1\n"), ("cmdline.txt", "console=tty1 root=PARTUUID=x rootwait\n"),
                       ("meta-data", "instance-id: rpios-image\n"), ("user-data", "#cloud-config\n"),
                       ("network-config", "network:\n  version: 2\n")):
        (files / name).write_text(text)
    env = dict(os.environ, MTOOLSRC=os.devnull, MTOOLS_SKIP_CHECK="1")
    subprocess.run(["mcopy", "-i", f"{path}@@{boot}", *sorted(str(p) for p in files.iterdir()), "::/"],
                   check=True, capture_output=True, env=env)
    if with_root:
        rootdir = tmp / f"rootfs-{codename}-{cloud_init}"
        (rootdir / "usr/lib" / f"python{python}").mkdir(parents=True, exist_ok=True)
        (rootdir / "usr/bin").mkdir(parents=True, exist_ok=True)
        (rootdir / "etc").mkdir(exist_ok=True)
        (rootdir / "usr/lib/os-release").write_text(
            f'PRETTY_NAME="Debian GNU/Linux test ({codename})"\nVERSION_CODENAME={codename}\nID=debian\n')
        if not (rootdir / "etc/os-release").is_symlink():
            (rootdir / "etc/os-release").symlink_to("../usr/lib/os-release")
        if cloud_init:
            (rootdir / "usr/bin/cloud-init").write_text("#!/usr/bin/python3\n")
        subprocess.run([_sbin("mkfs.ext4"), "-q", "-F", "-E", f"offset={root_start * SECTOR}",
                        "-d", str(rootdir), path, f"{root_mb * 1024}k"], check=True, capture_output=True)
    return boot, root_start * SECTOR


WHEEL_NAMES = [
    "numpy-2.3.3-cp313-cp313-manylinux_2_27_aarch64.manylinux_2_28_aarch64.whl",
    "opencv_python_headless-4.12.0.88-cp37-abi3-manylinux2014_aarch64.manylinux_2_17_aarch64.whl",
    "ai_edge_litert-2.3.0-cp313-cp313-manylinux_2_27_aarch64.whl",
    "click-8.2.1-py3-none-any.whl",
    "tqdm-4.67.1-py3-none-any.whl",
    "pip-25.2-py3-none-any.whl",
    "offload-0.1.0-cp313-cp313-manylinux_2_17_aarch64.whl",
]


def make_wheels(folder, names=WHEEL_NAMES, big=None):
    """A fake wheel folder: the right names, a little content each (``big``: name -> sparse size)."""
    folder.mkdir(exist_ok=True)
    for i, name in enumerate(names):
        (folder / name).write_bytes(f"fake {name} {i}\n".encode() * 50)
    for name, size in (big or {}).items():
        with open(folder / name, "r+b") as f:
            f.truncate(size)
    return folder


def _ar(members):
    out = io.BytesIO()
    out.write(b"!<arch>\n")
    for name, body in members:
        out.write(f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode())
        out.write(body + (b"\n" if len(body) % 2 else b""))
    return out.getvalue()


def make_deb(path, package="libedgetpu1-std", version=edgetpu.PAIRED_VERSION, arch="arm64"):
    """A minimal .deb (ar: debian-binary, control.tar.gz, data.tar.gz) with the given control fields."""
    control = f"Package: {package}\nVersion: {version}\nArchitecture: {arch}\nDepends: libusb-1.0-0\n".encode()

    def tgz(files):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for name, body in files:
                info = tarfile.TarInfo(name)
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
        return buf.getvalue()

    path.write_bytes(_ar([("debian-binary", b"2.0\n"), ("control.tar.gz", tgz([("./control", control)])),
                          ("data.tar.gz", tgz([]))]))
    return path


@pytest.fixture(scope="module")
def base_image(tmp_path_factory):
    if _GONE:
        pytest.skip(f"image tools missing: {', '.join(_GONE)}")
    tmp = tmp_path_factory.mktemp("base")
    path = tmp / "raspios.img"
    make_image(str(path), tmp)
    return path


@pytest.fixture
def inputs(tmp_path, base_image):
    """A fresh copy of the base image, fake wheels, a libedgetpu .deb, settings and key."""
    img = tmp_path / "in.img"
    shutil.copyfile(base_image, img)
    (tmp_path / "device.toml").write_text(
        'server = "https://10.0.0.2:8443"\ncamera = 0\nrate = 0.1\ndepth = 4\nslot-ms = 200\n')
    (tmp_path / "cam1.key").write_text(KEY + "\n")
    (tmp_path / "out").mkdir()
    return {"img": img, "wheels": make_wheels(tmp_path / "wheels"),
            "deb": make_deb(tmp_path / edgetpu.DEB_NAME), "settings": tmp_path / "device.toml",
            "key": tmp_path / "cam1.key", "out": tmp_path / "out" / "cam1.img", "tmp": tmp_path}


def run_cli(*args, cwd=None):
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120)


def build_args(inp, **extra):
    args = ["build", inp["img"], inp["out"], "--settings", inp["settings"], "--key-file", inp["key"],
            "--wheels", inp["wheels"], "--edgetpu-deb", inp["deb"]]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", v]
    return args


def read_boot(img, path):
    boot, _ = image.read_table(str(img))
    return fat.get(str(img), boot, path)


# ---------------------------------------------------------------- the build


@needs_tools
def test_build_writes_the_device_payload_and_leaves_the_rest(inputs):
    before = sha(inputs["img"])
    r = run_cli(*build_args(inputs))
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "Python 3.13" in r.stdout
    out = inputs["out"]
    assert sha(inputs["img"]) == before                       # the input is never modified
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".part")]
    assert out.stat().st_size == inputs["img"].stat().st_size
    boot, root = image.read_table(str(out))
    assert image.read_table(str(inputs["img"])) == (boot, root)

    # The files on the boot partition, byte for byte.
    assert sorted(fat.listdir(str(out), boot, "/offload/wheels")) == sorted(WHEEL_NAMES)
    for name in WHEEL_NAMES:
        assert fat.get(str(out), boot, f"/offload/wheels/{name}") == (inputs["wheels"] / name).read_bytes()
    with open(artifacts.find("policy.bin"), "rb") as f:
        assert fat.get(str(out), boot, "/offload/policy.bin") == f.read()
    with open(artifacts.find("weak_int8.tflite"), "rb") as f:
        assert fat.get(str(out), boot, "/offload/weak.tflite") == f.read()
    with open(data_path("firstboot.sh"), "rb") as f:
        assert fat.get(str(out), boot, "/offload/firstboot.sh") == f.read()
    assert fat.get(str(out), boot, f"/offload/edgetpu/{edgetpu.DEB_NAME}") == inputs["deb"].read_bytes()
    assert fat.get(str(out), boot, "/offload/device.key") == (KEY + "\n").encode()
    written = settings.load_settings_text(fat.get(str(out), boot, "/offload/device.toml").decode())
    assert written == settings.load_settings(str(inputs["settings"]))
    # What the image had and we do not own stays as it was.
    for name in ("config.txt", "cmdline.txt", "meta-data"):
        assert fat.get(str(out), boot, "/" + name) == fat.get(str(inputs["img"]), boot, "/" + name)
    with open(inputs["img"], "rb") as a, open(out, "rb") as b:
        a.seek(root.offset)
        b.seek(root.offset)
        assert a.read(root.size) == b.read(root.size)         # the root partition is untouched
        a.seek(0)
        b.seek(0)
        assert a.read(boot.offset) == b.read(boot.offset)     # MBR and the gap before the boot partition


@needs_tools
def test_cloud_init_documents_parse_and_say_what_first_boot_does(inputs, tmp_path):
    yaml = pytest.importorskip("yaml", reason="PyYAML (the dev extra) parses the documents back")
    (tmp_path / "id.pub").write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBFFfakekeyfortests user@host\n")
    (tmp_path / "psk").write_text("correct horse battery\n")
    r = run_cli(*build_args(inputs, admin_user="ops", ssh_key=tmp_path / "id.pub", wifi_ssid="lab net",
                            wifi_password_file=tmp_path / "psk", wifi_country="gb"))
    assert r.returncode == 0, r.stderr
    user_text = read_boot(inputs["out"], "/user-data").decode()
    assert user_text.startswith("#cloud-config\n")
    user = yaml.safe_load(user_text)
    offload, ops = user["users"]
    assert offload == {"name": "offload", "gecos": "offload camera device", "system": True,
                       "no_create_home": True, "shell": "/usr/sbin/nologin", "lock_passwd": True,
                       "groups": ["video", "plugdev"]}
    assert ops["name"] == "ops" and ops["lock_passwd"] is True and "sudo" in ops["groups"]
    assert ops["ssh_authorized_keys"] == ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBFFfakekeyfortests user@host"]
    assert user["ssh_pwauth"] is False
    assert user["runcmd"] == [["systemctl", "enable", "--now", "ssh"],
                              ["raspi-config", "nonint", "do_wifi_country", "GB"],
                              ["bash", "/boot/firmware/offload/firstboot.sh"]]
    net = yaml.safe_load(read_boot(inputs["out"], "/network-config").decode())
    assert net == {"network": {"version": 2,
                               "ethernets": {"eth0": {"dhcp4": True, "optional": True}},
                               "wifis": {"wlan0": {"dhcp4": True, "optional": True, "access-points": {
                                   "lab net": {"password": "correct horse battery"}}}}}}
    schema = shutil.which("cloud-init")
    if schema is None:
        pytest.skip("cloud-init not installed: YAML checked, `cloud-init schema` not run")
    usage = subprocess.run([schema, "schema", "--help"], capture_output=True, text=True).stdout
    # --schema-type (network-config) arrived in cloud-init 23.x; older ones check cloud-config only.
    kinds = [("user-data", "cloud-config")]
    if "--schema-type" in usage:
        kinds.append(("network-config", "network-config"))
    for name, kind in kinds:
        doc = tmp_path / name
        doc.write_bytes(read_boot(inputs["out"], "/" + name))
        typed = ["--schema-type", kind] if "--schema-type" in usage else []
        res = subprocess.run([schema, "schema", *typed, "-c", str(doc)], capture_output=True, text=True)
        assert res.returncode == 0 and "Valid" in res.stdout + res.stderr, res.stdout + res.stderr


def test_yaml_emitter_round_trips():
    yaml = pytest.importorskip("yaml", reason="PyYAML (the dev extra) parses the documents back")
    docs = [
        {"a": [1, "two", True, None, {"k": "v", "l": [1, 2]}, [3, [4]]], "b": {}, "c": []},
        {"yes": "on", "no": "off", "key with space": "x: y # not a comment", "n": "123"},
        {"block": "line 1\n  indented\n\nlast\n", "noend": "a\nb", "trailing": "a\n\n",
         "tab": "a\tb\nc\n", "spaces": "a  \nb\n", "lead": " x\ny\n", "uni": "caf\u00e9 \u2603"},
    ]
    for doc in docs:
        assert yaml.safe_load(dump(doc, header="#cloud-config")) == doc
    u = yaml.safe_load(cloudinit.user_data())
    assert [x["name"] for x in u["users"]] == ["offload"]
    assert u["runcmd"] == [["bash", "/boot/firmware/offload/firstboot.sh"]]


def test_unit_passes_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed")
    # verify checks that ExecStart exists, and the venv is only created on the
    # Pi: point it at a stand-in; everything else is the unit as shipped.
    exe = tmp_path / "offload-run"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    with open(data_path("offload.service")) as f:
        text = f.read()
    assert "ExecStart=/opt/offload/venv/bin/offload-run --config /etc/offload/config.toml" in text
    unit = tmp_path / "offload.service"
    unit.write_text(text.replace("/opt/offload/venv/bin/offload-run", str(exe)))
    res = subprocess.run([tool, "verify", "--man=no", str(unit)], capture_output=True, text=True)
    version = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout.split()[1]
    problems = []
    for line in (res.stdout + res.stderr).splitlines():
        # RestartSteps / RestartMaxDelaySec (the back-off) arrived in systemd 254;
        # trixie has 257. An older systemd here only warns about them.
        newer = ("Unknown key 'RestartSteps'" in line or "Unknown key 'RestartMaxDelaySec'" in line)
        if line.strip() and not (newer and int(version) < 254):
            problems.append(line)
    assert res.returncode == 0 and not problems, "\n".join(problems)
    for needle in ("User=offload", "NoNewPrivileges=yes", "ProtectSystem=strict", "LogsDirectory=offload",
                   "Restart=on-failure", "After=network-online.target", "Wants=network-online.target"):
        assert needle in text


def test_firstboot_script_parses_and_uses_the_right_paths():
    res = subprocess.run(["bash", "-n", data_path("firstboot.sh")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    with open(data_path("firstboot.sh")) as f:
        text = f.read()
    for needle in ("--no-index --find-links", "--only-binary=:all:", '"offload[device]"',
                   "offload-firmware\" provision --boot", "systemctl enable offload.service",
                   "venv --without-pip --system-site-packages"):
        assert needle in text
    # First boot compiles nothing: no build tools, no compiler, no apt-get of one.
    for gone in ("--no-build-isolation", "meson", "gcc", "python3-dev", "apt-get update"):
        assert gone not in text


# ---------------------------------------------------------------- first boot


@needs_tools
def test_provision_writes_etc_with_modes_and_removes_the_key(inputs, tmp_path):
    r = run_cli(*build_args(inputs))
    assert r.returncode == 0, r.stderr
    # The card's offload folder, as the Pi sees it at /boot/firmware/offload.
    boot_dir = tmp_path / "bootfs"
    boot_dir.mkdir()
    part, _ = image.read_table(str(inputs["out"]))
    env = dict(os.environ, MTOOLSRC=os.devnull, MTOOLS_SKIP_CHECK="1")
    subprocess.run(["mcopy", "-s", "-i", part.spec(str(inputs["out"])), "::/offload", str(boot_dir)],
                   check=True, capture_output=True, env=env)
    boot = boot_dir / "offload"
    root = tmp_path / "root"
    root.mkdir()
    import getpass

    user = getpass.getuser()
    res = run_cli("provision", "--boot", boot, "--root", root, "--user", user)
    assert res.returncode == 0, res.stderr
    etc = root / "etc/offload"
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert (etc / "device.key").read_text() == KEY + "\n"
    assert mode(etc / "device.key") == 0o600
    assert mode(etc / "config.toml") == 0o640
    assert mode(etc) == 0o750
    assert mode(etc / "policy.bin") == 0o644 and mode(etc / "weak.tflite") == 0o644
    assert not (boot / "device.key").exists()                 # the key left the boot partition
    from offload.device.config import load_toml, make_config

    cfg = make_config(file_values=load_toml(etc / "config.toml"))
    assert (cfg.server, cfg.camera, cfg.slot_ms) == ("https://10.0.0.2:8443", 0, 200.0)
    assert cfg.key_file == "/etc/offload/device.key" and cfg.policy == "/etc/offload/policy.bin"
    assert cfg.model == "/etc/offload/weak.tflite" and cfg.log == "/var/log/offload/frames.jsonl"
    assert cfg.log_max_bytes == settings.DEFAULT_LOG_MAX_BYTES and cfg.log_backups == settings.DEFAULT_LOG_BACKUPS
    assert (etc / "policy.bin").read_bytes() == (boot / "policy.bin").read_bytes()
    with open(data_path("offload.service"), "rb") as f:
        assert (root / "etc/systemd/system/offload.service").read_bytes() == f.read()
    assert "After=dev-video0.device" in (root / "etc/systemd/system/offload.service.d/camera.conf").read_text()
    assert (root / "etc/udev/rules.d/70-offload-coral.rules").read_text().count('GROUP="plugdev"') == 2
    # Run again (settings edited on the card): the key already in /etc/offload is kept.
    (boot / "device.toml").write_text('server = "https://10.0.0.3:8443"\nvideo = "/srv/clip.avi"\n')
    res = run_cli("provision", "--boot", boot, "--root", root, "--user", user)
    assert res.returncode == 0, res.stderr
    cfg = make_config(file_values=load_toml(etc / "config.toml"))
    assert (cfg.server, cfg.video, cfg.camera) == ("https://10.0.0.3:8443", "/srv/clip.avi", None)
    assert (etc / "device.key").read_text() == KEY + "\n"
    assert not (root / "etc/systemd/system/offload.service.d/camera.conf").exists()


def _card(tmp_path, toml_text, key=KEY):
    boot = tmp_path / "card"
    boot.mkdir()
    (boot / "device.toml").write_text(toml_text)
    if key is not None:
        (boot / "device.key").write_text(key + "\n")
    shutil.copyfile(artifacts.find("policy.bin"), boot / "policy.bin")
    shutil.copyfile(artifacts.find("weak_int8.tflite"), boot / "weak.tflite")
    return boot


@pytest.mark.parametrize("toml_text, key, message", [
    ('camera = 0\n', KEY, "server: missing"),
    ('server = "https://x:8443"\nslot-ms = -5\n', KEY, "slot-ms: must be a finite number > 0"),
    ('server = "https://x:8443"\n', None, "device.key: missing"),
    ('server = "https://x:8443"\n', "two words", "contains spaces"),
])
def test_provision_refuses_bad_card_settings_and_keeps_the_key(tmp_path, toml_text, key, message):
    import getpass

    boot = _card(tmp_path, toml_text, key)
    root = tmp_path / "root"
    root.mkdir()
    res = run_cli("provision", "--boot", boot, "--root", root, "--user", getpass.getuser())
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not (root / "etc/offload/config.toml").exists()
    if key is not None:
        assert (boot / "device.key").exists()                 # still there to fix and retry


# ---------------------------------------------------------------- refusals


def _refused(inp, res, message):
    """One Error line naming the problem, exit 1, no output (nor temporary file), input unchanged."""
    assert res.returncode == 1, res.stdout + res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in res.stderr
    out = inp["out"]
    assert not out.exists()
    if out.parent.exists():
        assert not [p for p in out.parent.iterdir() if ".part" in p.name]


@needs_tools
def test_refuses_a_corrupt_image(inputs):
    inputs["img"].write_bytes(os.urandom(1 << 20))
    before = sha(inputs["img"])
    _refused(inputs, run_cli(*build_args(inputs)), "no partition table found")
    assert sha(inputs["img"]) == before


@needs_tools
def test_refuses_a_truncated_image(inputs):
    size = inputs["img"].stat().st_size
    with open(inputs["img"], "r+b") as f:
        f.truncate(size - 4 * 1024 * 1024)
    before = sha(inputs["img"])
    _refused(inputs, run_cli(*build_args(inputs)), "past the end of the file")
    assert sha(inputs["img"]) == before


@needs_tools
def test_refuses_an_image_without_a_root_partition(inputs, tmp_path):
    img = tmp_path / "bootonly.img"
    make_image(str(img), tmp_path, with_root=False)
    inputs["img"] = img
    before = sha(img)
    _refused(inputs, run_cli(*build_args(inputs)), "no Linux root partition (MBR type 0x83)")
    assert sha(img) == before


@needs_tools
def test_refuses_a_boot_partition_too_small_for_the_payload(inputs, tmp_path):
    # A 60 MB wheel (sparse: no disk used) cannot fit the 40 MB boot partition.
    inputs["wheels"] = make_wheels(tmp_path / "bigwheels", big={WHEEL_NAMES[2]: 60_000_000})
    before = sha(inputs["img"])
    _refused(inputs, run_cli(*build_args(inputs)), "boot partition too small for the payload")
    assert sha(inputs["img"]) == before


@needs_tools
@pytest.mark.parametrize("toml_text, message", [
    ('server = "ftp://10.0.0.2"\n', "server: must be an https://HOST[:PORT] or http://HOST[:PORT] URL"),
    ('server = "https://10.0.0.2:8443"\nkey = "abc"\n', "key: not allowed here"),
    ('server = "https://10.0.0.2:8443"\nrate = 0.2\n', "rate: 0.2 does not match the policy's bucket"),
    ('server = "https://10.0.0.2:8443"\ndepth = 2\n', "depth: 2 does not match the policy's bucket"),
    ('server = "https://10.0.0.2:8443"\nbucket-rate = 1\n', "bucket-rate: unknown config file key"),
    ('server = "https://10.0.0.2:8443"\ncamera = 0\nvideo = "a.avi"\n', "only one frame source"),
    ('server = "https://10.0.0.2:8443"\nlog-max-bytes = 0\n', "log-max-bytes: must be > 0 on the device"),
    ('server = "https://10.0.0.2:8443"\nlog = "/tmp/x"\n', "log: not allowed here"),
    ('server = http://10.0.0.2\n', "not valid TOML"),
])
def test_refuses_invalid_settings_naming_the_key(inputs, toml_text, message):
    inputs["settings"].write_text(toml_text)
    before = sha(inputs["img"])
    _refused(inputs, run_cli(*build_args(inputs)), message)
    assert sha(inputs["img"]) == before


@needs_tools
def test_refuses_other_bad_inputs(inputs, tmp_path):
    before = sha(inputs["img"])
    (tmp_path / "empty.key").write_text("\n")
    cases = []
    args = build_args(inputs)
    key_at = args.index("--key-file") + 1
    bad_key = list(args)
    bad_key[key_at] = tmp_path / "empty.key"
    cases.append((bad_key, "key file"))
    no_litert = make_wheels(tmp_path / "w2", [n for n in WHEEL_NAMES if "litert" not in n])
    cases.append((build_args(dict(inputs, wheels=no_litert)), "no wheel for CPython 3.13 aarch64 of ai-edge-litert"))
    x86 = make_wheels(tmp_path / "w3", [n.replace("aarch64", "x86_64") for n in WHEEL_NAMES])
    cases.append((build_args(dict(inputs, wheels=x86)), "offload-0.1.0-cp313-cp313-manylinux_2_17_x86_64.whl "
                  "is not for aarch64 Linux"))
    no_ours = make_wheels(tmp_path / "w4", [n for n in WHEEL_NAMES if not n.startswith("offload")])
    cases.append((build_args(dict(inputs, wheels=no_ours)), "no offload wheel for CPython 3.13 aarch64"))
    py311 = make_wheels(tmp_path / "w5", [n.replace("offload-0.1.0-cp313-cp313", "offload-0.1.0-cp311-cp311")
                                          for n in WHEEL_NAMES])
    cases.append((build_args(dict(inputs, wheels=py311)), "is for CPython 3.11, and the image has CPython 3.13"))
    no_numpy = make_wheels(tmp_path / "w6", [n for n in WHEEL_NAMES if not n.startswith("numpy")])
    cases.append((build_args(dict(inputs, wheels=no_numpy)), "no wheel for CPython 3.13 aarch64 of numpy"))
    cases.append((build_args(dict(inputs, deb=make_deb(tmp_path / "x.deb", arch="amd64"))),
                  "architecture 'amd64'"))
    (tmp_path / "notdeb.deb").write_bytes(b"hello")
    cases.append((build_args(dict(inputs, deb=tmp_path / "notdeb.deb")), "not a Debian package"))
    (tmp_path / "id").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nxx\n")
    cases.append((build_args(inputs, admin_user="ops", ssh_key=tmp_path / "id"), "not an OpenSSH public key"))
    cases.append((build_args(inputs, admin_user="ops"), "--admin-user and --ssh-key go together"))
    cases.append((build_args(inputs, model=artifacts.find("policy.bin")), "not a LiteRT (.tflite) model"))
    (tmp_path / "bad.bin").write_bytes(b"not a blob")
    cases.append((build_args(inputs, policy=tmp_path / "bad.bin"), "policy:"))
    for args, message in cases:
        _refused(inputs, run_cli(*args), message)
    assert sha(inputs["img"]) == before


@needs_tools
def test_refuses_old_releases_compressed_images_and_writing_over_the_input(inputs, tmp_path):
    old = tmp_path / "bookworm.img"
    make_image(str(old), tmp_path, codename="bookworm")
    before = sha(old)
    _refused(inputs, run_cli(*build_args(dict(inputs, img=old))), "does not run cloud-init from the boot partition")
    assert sha(old) == before
    noci = tmp_path / "noci.img"
    make_image(str(noci), tmp_path, codename="forky", cloud_init=False)
    _refused(inputs, run_cli(*build_args(dict(inputs, img=noci))), "cloud-init is not installed")
    xz = tmp_path / "raspios.img.xz"
    xz.write_bytes(b"\xfd7zXZ\x00" + b"\x00" * 1024)
    _refused(inputs, run_cli(*build_args(dict(inputs, img=xz))), "is xz-compressed")
    before = sha(inputs["img"])
    res = run_cli(*build_args(dict(inputs, out=inputs["img"])))
    assert res.returncode == 1 and "must not be the input image" in res.stderr
    assert sha(inputs["img"]) == before
    inputs["out"].write_bytes(b"keep me")
    res = run_cli(*build_args(inputs))
    assert res.returncode == 1 and "exists; give --force" in res.stderr
    assert inputs["out"].read_bytes() == b"keep me"


@needs_tools
def test_a_failure_while_writing_leaves_no_output(inputs, monkeypatch):
    from firmware import build as B

    calls = []

    def failing_put(*a, **k):
        calls.append(a)
        if len(calls) == 3:
            raise FirmwareError("disk full (simulated)")
        return real_put(*a, **k)

    real_put = fat.put
    monkeypatch.setattr(B.fat, "put", failing_put)
    before = sha(inputs["img"])
    with pytest.raises(FirmwareError, match="simulated"):
        B.build(str(inputs["img"]), str(inputs["out"]), echo=lambda s: None,
                settings_file=str(inputs["settings"]), key_file=str(inputs["key"]),
                wheels_dir=str(inputs["wheels"]), edgetpu_deb=str(inputs["deb"]))
    assert len(calls) == 3
    assert list((inputs["tmp"] / "out").iterdir()) == []
    assert sha(inputs["img"]) == before


# ---------------------------------------------------------------- pieces


def test_wheel_compatibility_for_the_image_python():
    ok = ["numpy-2.3.3-cp313-cp313-manylinux_2_27_aarch64.manylinux_2_28_aarch64.whl",
          "opencv_python_headless-4.12.0.88-cp37-abi3-manylinux2014_aarch64.whl",
          "click-8.2.1-py3-none-any.whl", "ninja-1.13.0-py3-none-manylinux2014_aarch64.whl"]
    bad = ["numpy-2.3.3-cp311-cp311-manylinux_2_28_aarch64.whl",            # other Python
           "numpy-2.3.3-cp313-cp313-manylinux_2_28_x86_64.whl",             # other CPU
           "numpy-2.3.3-cp313-cp313-musllinux_1_2_aarch64.whl",             # musl, not glibc
           "opencv_python_headless-4.12.0.88-cp314-abi3-manylinux2014_aarch64.whl",  # abi3 but newer
           "not-a-wheel.txt"]
    assert all(wheels.compatible(n, "3.13") for n in ok)
    assert not any(wheels.compatible(n, "3.13") for n in bad)


def test_device_requirements_come_from_the_package_metadata():
    reqs = wheels.device_requirements("3.13")
    names = {r.split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in reqs}
    assert {"numpy", "click", "tqdm", "opencv-python-headless", "ai-edge-litert"} <= names
    assert "tomli" not in names and "torch" not in names and "onnxruntime" not in names
    assert any(r.startswith("tomli") for r in wheels.device_requirements("3.10"))


def test_edgetpu_deb_check(tmp_path):
    info = edgetpu.check_deb(make_deb(tmp_path / "a.deb"))
    assert (info.package, info.version, info.arch) == ("libedgetpu1-std", edgetpu.PAIRED_VERSION, "arm64")
    with pytest.raises(FirmwareError, match="package 'libusb'"):
        edgetpu.check_deb(make_deb(tmp_path / "b.deb", package="libusb"))
    assert edgetpu.URL.endswith("/16.0TF2.19.1-1/libedgetpu1-std_16.0tf2.19.1-1.bookworm_arm64.deb")


def test_settings_are_validated_by_the_device_config():
    policy = artifacts.find("policy.bin")
    table = settings.validate({"server": "https://h:1", "picamera": 0, "image-format": "jpeg"},
                              settings_name="s", policy_path=policy)
    assert table["picamera"] == 0 and "camera" not in table and table["accelerator"] == "auto"
    with pytest.raises(FirmwareError, match="jpeg-quality: must be in 1..100"):
        settings.validate({"server": "https://h:1", "jpeg-quality": 101}, settings_name="s", policy_path=policy)
    with pytest.raises(FirmwareError, match="device: "):
        settings.validate({"server": "https://h:1", "device": "tpu9"}, settings_name="s", policy_path=policy)
    text = settings.to_toml({"server": "https://h:1", "realtime": True, "slot-ms": 200.0, "video": 'a "q".avi'})
    from offload.device.config import make_config

    assert make_config(file_values=settings.load_settings_text(text)).video == 'a "q".avi'


def test_missing_tools_are_named_with_their_package(monkeypatch):
    from firmware import tools

    monkeypatch.setattr(tools, "which", lambda t: None)
    with pytest.raises(FirmwareError, match=r"sfdisk, mcopy not found: install fdisk mtools"):
        tools.require("sfdisk", "mcopy")
    assert json.dumps(tools.PACKAGES)       # every tool maps to a Debian package name


def test_the_key_on_the_card_is_overwritten_before_it_is_deleted(tmp_path):
    # A hard link sees the same bytes as the file: after the wipe they are zeros,
    # so no copy of the key is left in the FAT partition's freed clusters.
    from firmware.provision import wipe

    key = tmp_path / "device.key"
    key.write_text(KEY + "\n")
    os.link(key, tmp_path / "same-inode")
    wipe(str(key))
    assert not key.exists()
    assert (tmp_path / "same-inode").read_bytes() == b"\0" * (len(KEY) + 1)


# ---------------------------------------------------------------- TLS material and plain HTTP


def _pki(folder):
    """A private CA, a device certificate it signed (with its key) and a stranger's key, as PEM files."""
    crypto = pytest.importorskip("cryptography", reason="the cryptography package makes test certificates")
    del crypto
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(subject, key, issuer, issuer_key, *, ca, days=30, start=-1):
        b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now + dt.timedelta(days=start))
             .not_valid_after(now + dt.timedelta(days=start + days))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        return b.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def key_pem(key, password=None):
        enc = (serialization.BestAvailableEncryption(password) if password
               else serialization.NoEncryption())
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)

    ca_key, dev_key, other_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    files = {
        "ca.pem": cert("test CA", ca_key, "test CA", ca_key, ca=True),
        "ca.key": key_pem(ca_key),
        "cam1.pem": cert("cam1", dev_key, "test CA", ca_key, ca=False),
        "cam1.key": key_pem(dev_key),
        "other.key": key_pem(other_key),
        "enc.key": key_pem(dev_key, b"secret"),
        "expired.pem": cert("old CA", ca_key, "old CA", ca_key, ca=True, days=1, start=-10),
    }
    for n, data in files.items():
        (folder / n).write_bytes(data)
    return {n: folder / n for n in files}


def _card_from_image(img, tmp_path):
    """The image's offload folder copied out, as the Pi sees /boot/firmware/offload."""
    boot_dir = tmp_path / "bootfs"
    boot_dir.mkdir()
    part, _ = image.read_table(str(img))
    env = dict(os.environ, MTOOLSRC=os.devnull, MTOOLS_SKIP_CHECK="1")
    subprocess.run(["mcopy", "-s", "-i", part.spec(str(img)), "::/offload", str(boot_dir)],
                   check=True, capture_output=True, env=env)
    return boot_dir / "offload"


@needs_tools
def test_the_ca_and_client_certificate_travel_like_the_key(inputs, tmp_path):
    import getpass

    pki = _pki(tmp_path / "pki")
    r = run_cli(*build_args(inputs, ca_file=pki["ca.pem"], client_cert=pki["cam1.pem"],
                            client_key=pki["cam1.key"]))
    assert r.returncode == 0, r.stderr
    assert "no --ca-file" not in r.stdout
    # On the boot partition, byte for byte.
    for card_name, src in (("ca.pem", "ca.pem"), ("client.pem", "cam1.pem"), ("client.key", "cam1.key")):
        assert read_boot(inputs["out"], f"/offload/{card_name}") == pki[src].read_bytes()
    boot = _card_from_image(inputs["out"], tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    res = run_cli("provision", "--boot", boot, "--root", root, "--user", getpass.getuser())
    assert res.returncode == 0, res.stderr
    assert "moved ca.pem, client.pem, client.key to /etc/offload" in res.stdout
    etc = root / "etc/offload"
    for card_name, src in (("ca.pem", "ca.pem"), ("client.pem", "cam1.pem"), ("client.key", "cam1.key")):
        assert (etc / card_name).read_bytes() == pki[src].read_bytes()
        assert stat.S_IMODE((etc / card_name).stat().st_mode) == 0o600
        assert not (boot / card_name).exists()                # wiped from the card
    from offload.device.config import load_toml, make_config

    cfg = make_config(file_values=load_toml(etc / "config.toml"))
    assert cfg.server == "https://10.0.0.2:8443"
    assert (cfg.ca_file, cfg.client_cert, cfg.client_key) == (
        "/etc/offload/ca.pem", "/etc/offload/client.pem", "/etc/offload/client.key")
    # Again, the card's copies gone: the ones in /etc/offload are kept and used.
    res = run_cli("provision", "--boot", boot, "--root", root, "--user", getpass.getuser())
    assert res.returncode == 0, res.stderr
    cfg = make_config(file_values=load_toml(etc / "config.toml"))
    assert cfg.ca_file == "/etc/offload/ca.pem" and cfg.client_key == "/etc/offload/client.key"
    assert (etc / "ca.pem").read_bytes() == pki["ca.pem"].read_bytes()


@needs_tools
def test_https_without_a_ca_file_uses_the_system_store_and_says_so(inputs):
    r = run_cli(*build_args(inputs))
    assert r.returncode == 0, r.stderr
    assert "no --ca-file: the device checks the server's certificate against the system's" in r.stdout
    boot, _ = image.read_table(str(inputs["out"]))
    assert "ca.pem" not in fat.listdir(str(inputs["out"]), boot, "/offload")


@needs_tools
def test_plain_http_is_refused_off_loopback_without_the_flag(inputs, tmp_path):
    import getpass

    inputs["settings"].write_text('server = "http://10.0.0.2:8080"\ncamera = 0\n')
    before = sha(inputs["img"])
    _refused(inputs, run_cli(*build_args(inputs)), "is plain HTTP to another machine")
    r = run_cli(*build_args(inputs))
    assert "--allow-plain-http" in r.stderr and "https://" in r.stderr
    assert sha(inputs["img"]) == before
    # Loopback (an SSH tunnel, a server on the device) needs no flag.
    inputs["settings"].write_text('server = "http://127.0.0.1:8080"\ncamera = 0\n')
    r = run_cli(*build_args(inputs))
    assert r.returncode == 0, r.stderr
    inputs["out"].unlink()
    # With the flag the image is built, and the card says so for first boot's check.
    inputs["settings"].write_text('server = "http://10.0.0.2:8080"\ncamera = 0\n')
    r = run_cli(*build_args(inputs), "--allow-plain-http")
    assert r.returncode == 0, r.stderr
    written = settings.load_settings_text(read_boot(inputs["out"], "/offload/device.toml").decode())
    assert written["allow-plain-http"] is True and written["server"] == "http://10.0.0.2:8080"
    boot = _card_from_image(inputs["out"], tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    res = run_cli("provision", "--boot", boot, "--root", root, "--user", getpass.getuser())
    assert res.returncode == 0, res.stderr
    assert "allow-plain-http" not in (root / "etc/offload/config.toml").read_text()
    # A card edited to plain HTTP afterwards, without the setting: first boot refuses it too.
    (boot / "device.toml").write_text('server = "http://10.0.0.9:8080"\n')
    res = run_cli("provision", "--boot", boot, "--root", root, "--user", getpass.getuser())
    assert res.returncode == 1 and "is plain HTTP to another machine" in res.stderr


@needs_tools
def test_refuses_bad_tls_files(inputs, tmp_path):
    pki = _pki(tmp_path / "pki")
    (tmp_path / "junk.pem").write_text("hello\n")
    (tmp_path / "bundle.pem").write_bytes(pki["ca.pem"].read_bytes() + pki["ca.key"].read_bytes())
    before = sha(inputs["img"])
    cases = [
        (dict(ca_file=tmp_path / "junk.pem"), "--ca-file", "not a PEM file"),
        (dict(ca_file=pki["ca.key"]), "--ca-file", "holds no certificate"),
        (dict(ca_file=tmp_path / "bundle.pem"), "--ca-file", "holds a private key"),
        (dict(ca_file=pki["expired.pem"]), "--ca-file", "expired on"),
        (dict(ca_file=tmp_path / "missing.pem"), "--ca-file", "cannot read"),
        (dict(client_key=pki["cam1.key"]), "--client-key", "needs --client-cert"),
        (dict(client_cert=pki["cam1.pem"]), "--client-cert", "holds no private key"),
        (dict(client_cert=pki["cam1.pem"], client_key=pki["other.key"]), "--client-key",
         "is not the key of the certificate"),
        (dict(client_cert=pki["cam1.pem"], client_key=pki["enc.key"]), "--client-key",
         "encrypted"),
        (dict(client_cert=pki["cam1.pem"], client_key=pki["cam1.pem"]), "--client-key",
         "holds no private key"),
    ]
    for extra, flag, message in cases:
        res = run_cli(*build_args(inputs, **extra))
        _refused(inputs, res, message)
        assert flag in res.stderr, res.stderr
    # TLS files with a plain-HTTP server make no sense: the device's own rule says so.
    inputs["settings"].write_text('server = "http://127.0.0.1:8080"\n')
    _refused(inputs, run_cli(*build_args(inputs, ca_file=pki["ca.pem"])),
             "ca-file: only applies to an https:// server")
    assert sha(inputs["img"]) == before


def test_provision_refuses_a_client_key_that_is_not_the_certificates(tmp_path):
    import getpass

    pki = _pki(tmp_path / "pki")
    boot = _card(tmp_path, 'server = "https://10.0.0.2:8443"\n')
    shutil.copyfile(pki["cam1.pem"], boot / "client.pem")
    shutil.copyfile(pki["other.key"], boot / "client.key")
    root = tmp_path / "root"
    root.mkdir()
    res = run_cli("provision", "--boot", boot, "--root", root, "--user", getpass.getuser())
    assert res.returncode == 1 and "client.key" in res.stderr
    assert "is not the key of the certificate" in res.stderr
    assert not (root / "etc/offload/config.toml").exists()
    assert (boot / "client.key").exists() and (boot / "device.key").exists()  # kept to fix and retry


@pytest.mark.parametrize("settings_toml", [
    'server = "https://x:8443"\nca-file = "/tmp/ca.pem"\n',
    'server = "https://x:8443"\nclient_key = "/tmp/k"\n',
])
def test_tls_paths_are_the_firmwares_to_set(settings_toml):
    with pytest.raises(FirmwareError, match="not allowed here; give"):
        settings.device_config(settings.load_settings_text(settings_toml), settings_name="s")


def test_loopback_rule():
    from firmware import tls

    assert [tls.is_loopback(h) for h in ("localhost", "127.0.0.1", "127.8.9.1", "::1")] == [True] * 4
    assert [tls.is_loopback(h) for h in ("10.0.0.2", "edge.lan", "0.0.0.0", None)] == [False] * 4
    tls.check_server("https://10.0.0.2:8443", allow_plain_http=False, settings_name="s")
    tls.check_server("http://[::1]:8080", allow_plain_http=False, settings_name="s")
    tls.check_server("http://10.0.0.2:8080", allow_plain_http=True, settings_name="s")
    with pytest.raises(FirmwareError, match="plain HTTP"):
        tls.check_server("http://edge.lan:8080", allow_plain_http=False, settings_name="s")
