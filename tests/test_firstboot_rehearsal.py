"""A rehearsal of first boot on this machine: the card's user-data and firstboot.sh against a scratch root.

What it is: the boot partition that ``offload-firmware build`` plans
(``firmware.build.plan``: user-data, network-config, firstboot.sh,
device.toml, device.key, policy, model, Edge TPU .deb) written to a scratch
folder standing for ``/boot/firmware``; then the ``runcmd`` of that very
user-data executed in order, with the paths under ``/boot/firmware`` made
relative to the scratch folder and ``OFFLOAD_ROOT`` pointing the script's
``/opt``, ``/var/log`` and ``/etc`` into a scratch root. ``apt-get``,
``systemctl``, ``udevadm``, ``useradd``, ``usermod`` and ``raspi-config`` are
stand-ins that only record their arguments. The service user is the user
running the test (cloud-init's users module is not run).

Stand-ins, said plainly: the card's aarch64 wheels are swapped for wheels of
this machine (x86-64, the host's CPython): our package assembled from this
checkout's sources with the host's compiled core and installed metadata,
numpy, click, tqdm and pip repacked from the installed distributions, and
OpenCV and LiteRT as metadata-only wheels (first boot installs them but never
imports them). So the venv is built with the host's Python from host wheels.

What it proves: the script's order and commands, that pip installs from the
card alone (``--isolated --no-index --only-binary=:all:``; no compiler, no
network), that the venv's ``offload-firmware provision`` writes
``/etc/offload`` with the right modes and wipes the key from the boot
partition, and what the script hands to systemd and apt. What it does not
prove: anything about the Pi (aarch64 wheels installing there, cloud-init's
own modules, systemd starting the unit, the camera, the Coral): the checklist
in docs/firmware.md covers those.
"""

from __future__ import annotations

import getpass
import importlib.metadata as md
import os
import stat
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from firmware import BOOT_DIR, build, cloudinit, edgetpu, image
from firmware.build import data_path

yaml = pytest.importorskip("yaml", reason="PyYAML (the dev extra) reads the user-data back")

KEY = "rehearsal-key-0123456789abcdef"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUBS = ("apt-get", "systemctl", "udevadm", "useradd", "usermod", "raspi-config")


def _zip(path, files, dist, version, tag, metadata):
    """Write a wheel: ``files`` maps archive names to bytes; adds WHEEL and RECORD."""
    info = f"{dist}-{version}.dist-info"
    files = dict(files)
    files[f"{info}/METADATA"] = metadata
    files[f"{info}/WHEEL"] = (f"Wheel-Version: 1.0\nGenerator: rehearsal\nRoot-Is-Purelib: "
                              f"{'true' if tag.endswith('-any') else 'false'}\nTag: {tag}\n").encode()
    files[f"{info}/RECORD"] = "".join(f"{n},,\n" for n in list(files) + [f"{info}/RECORD"]).encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in files.items():
            z.writestr(name, data)


def _host_tag():
    cp = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    return f"{cp}-{cp}-{sysconfig.get_platform().replace('-', '_').replace('.', '_')}"


def repack(name, folder, *, pure):
    """A wheel of the installed distribution ``name`` (its RECORD's files, no byte code)."""
    dist = md.distribution(name)
    files = {}
    for f in dist.files or ():
        path = str(f)
        if path.startswith("..") or "__pycache__" in path or path.endswith(".pyc") or \
                ".dist-info/" in path:
            continue
        files[path] = f.locate().read_bytes()
    for extra in ("entry_points.txt", "top_level.txt"):
        text = dist.read_text(extra)
        if text:
            files[f"{dist.metadata['Name'].replace('-', '_')}-{dist.version}.dist-info/{extra}"] = text.encode()
    dname = dist.metadata["Name"].replace("-", "_")
    tag = "py3-none-any" if pure else _host_tag()
    _zip(folder / f"{dname}-{dist.version}-{tag}.whl", files, dname, dist.version, tag,
         dist.read_text("METADATA").encode())


def metadata_only(name, version, folder):
    dname = name.replace("-", "_")
    _zip(folder / f"{dname}-{version}-py3-none-any.whl", {}, dname, version, "py3-none-any",
         f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode())


def ours(folder):
    """The stand-in offload wheel: this checkout's Python sources, the host's compiled core."""
    import offload_native

    files = {}
    for package in ("offload", "firmware"):
        for base, dirs, names in os.walk(os.path.join(REPO, package)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for n in names:
                if not n.endswith(".pyc"):
                    full = os.path.join(base, n)
                    with open(full, "rb") as f:
                        files[os.path.relpath(full, REPO)] = f.read()
    native = os.path.dirname(offload_native.__file__)
    for n in os.listdir(native):
        if n.endswith((".so", ".py")):
            with open(os.path.join(native, n), "rb") as f:
                files[f"offload_native/{n}"] = f.read()
    dist = md.distribution("offload")
    files[f"offload-{dist.version}.dist-info/entry_points.txt"] = dist.read_text("entry_points.txt").encode()
    _zip(folder / f"offload-{dist.version}-{_host_tag()}.whl", files, "offload", dist.version,
         _host_tag(), dist.read_text("METADATA").encode())


def host_wheels(folder):
    folder.mkdir()
    ours(folder)
    for name, pure in (("numpy", False), ("click", True), ("tqdm", True), ("pip", True)):
        repack(name, folder, pure=pure)
    metadata_only("opencv-python-headless", "4.12.0.88", folder)
    metadata_only("ai-edge-litert", "2.3.0", folder)


def fake_aarch64_wheels(folder):
    """Names that pass the build's check for CPython 3.13 aarch64 (the plan runs before the swap)."""
    folder.mkdir()
    for n in ("numpy-2.3.3-cp313-cp313-manylinux_2_27_aarch64.whl", "click-8.2.1-py3-none-any.whl",
              "opencv_python_headless-4.12.0.88-cp37-abi3-manylinux_2_17_aarch64.whl",
              "ai_edge_litert-2.3.0-cp313-cp313-manylinux_2_27_aarch64.whl", "tqdm-4.67.1-py3-none-any.whl",
              "pip-25.2-py3-none-any.whl", "offload-0.1.0-cp313-cp313-manylinux_2_17_aarch64.whl"):
        (folder / n).write_bytes(b"aarch64 stand-in")
    return folder


@pytest.fixture
def card(tmp_path):
    """The planned boot partition written to a folder standing for /boot/firmware, wheels swapped."""
    (tmp_path / "device.toml").write_text('server = "https://10.0.0.2:8443"\ncamera = 0\n')
    (tmp_path / "cam1.key").write_text(KEY + "\n")
    deb = tmp_path / edgetpu.DEB_NAME
    deb.write_bytes(b"!<arch>\n")      # first boot hands it to apt-get (a stand-in here)
    info = image.ImageInfo(path="-", boot=None, root=None, codename="trixie", python="3.13",
                           pretty_name="rehearsal")
    plan = build.plan(info, settings_file=str(tmp_path / "device.toml"), key_file=str(tmp_path / "cam1.key"),
                      wheels_dir=str(fake_aarch64_wheels(tmp_path / "aarch64")), edgetpu_deb=None)
    bootfs = tmp_path / "bootfs"
    for folder in plan.folders:
        (bootfs / folder.lstrip("/")).mkdir(parents=True, exist_ok=True)
    for e in plan.entries:
        dest = bootfs / e.dest.lstrip("/")
        if e.data is not None:
            dest.write_bytes(e.data)
        else:
            with open(e.source, "rb") as f:
                dest.write_bytes(f.read())
    (bootfs / BOOT_DIR / "edgetpu").mkdir()
    (bootfs / BOOT_DIR / "edgetpu" / deb.name).write_bytes(deb.read_bytes())
    host_wheels(bootfs / BOOT_DIR / "wheels_host")
    wheels = bootfs / BOOT_DIR / "wheels"
    for f in wheels.iterdir():
        f.unlink()
    wheels.rmdir()
    (bootfs / BOOT_DIR / "wheels_host").rename(wheels)
    return bootfs


def stubs(folder, log):
    folder.mkdir()
    for name in STUBS:
        p = folder / name
        p.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\n')
        p.chmod(0o755)
    return folder


def test_first_boot_rehearsal_on_a_scratch_root(card, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    calls = tmp_path / "calls.log"
    user = yaml.safe_load((card / "user-data").read_text())
    assert [u["name"] for u in user["users"]] == ["offload"]
    env = dict(os.environ, OFFLOAD_ROOT=str(root), OFFLOAD_PYTHON=sys.executable,
               OFFLOAD_USER=getpass.getuser(), OFFLOAD_BOOT=str(card / BOOT_DIR),
               PATH=f"{stubs(tmp_path / 'bin', calls)}{os.pathsep}{os.environ['PATH']}")
    env.pop("PYTHONPATH", None)             # the venv must import its own install, not this checkout
    # The user-data's runcmd, in order, paths under the boot mount made relative.
    for cmd in user["runcmd"]:
        cmd = [c.replace(cloudinit.BOOT_MOUNT, str(card)) for c in cmd]
        res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert "offload-firstboot: done" in out
    # /etc/offload as provision writes it.
    etc = root / "etc/offload"
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(etc) == 0o750
    assert (etc / "device.key").read_text() == KEY + "\n" and mode(etc / "device.key") == 0o600
    assert mode(etc / "config.toml") == 0o640
    assert mode(etc / "policy.bin") == 0o644 and mode(etc / "weak.tflite") == 0o644
    assert (root / "etc/systemd/system/offload.service").read_bytes() == open(data_path("offload.service"), "rb").read()
    assert (root / "etc/udev/rules.d/70-offload-coral.rules").exists()
    assert not (card / BOOT_DIR / "device.key").exists()            # wiped from the boot partition
    assert (root / "var/log/offload-firstboot.log").read_text().count("offload-firstboot:") >= 3
    # The venv, from the card's wheels only, imports its own copy of the core.
    venv_py = root / "opt/offload/venv/bin/python"
    probe = subprocess.run([str(venv_py), "-c", "import offload, offload_native, numpy; "
                            "print(offload.__file__); print(offload_native.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    assert all(line.startswith(str(root / "opt/offload/venv")) for line in probe.stdout.split())
    assert (root / "opt/offload/venv/bin/offload-run").exists()
    # What went to the stand-ins: the .deb to apt, the unit to systemd, nothing compiled.
    log = calls.read_text().splitlines()
    assert log[0].startswith("useradd --system") or "usermod" in log[0]
    assert f"apt-get install -y --no-install-recommends {card / BOOT_DIR / 'edgetpu' / edgetpu.DEB_NAME}" in log
    assert log[-3:] == ["systemctl daemon-reload", "systemctl enable offload.service",
                        "systemctl restart --no-block offload.service"]
    assert not any("update" in line or "gcc" in line or "python3-dev" in line for line in log)
