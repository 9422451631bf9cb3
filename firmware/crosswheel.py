"""The project's own aarch64 wheel, cross-compiled on an x86-64 Debian workstation.

``build(source, dest, python="3.13")``:

1. an arm64 CPython of that version unpacked into a folder (``firmware.sysroot``:
   Debian's own packages, headers and ``python-3.13.pc`` included);
2. meson-python builds the wheel with two cross files: one written here
   (the constants: that folder, a wrapper running its interpreter under
   ``qemu-aarch64 -L``, the workstation's Cython) and the committed
   ``tools/cross/aarch64-linux-gnu.ini`` (Debian's gcc-aarch64-linux-gnu,
   ``-mcpu=cortex-a72``), with ``-Dnative_cpu=false``. Meson asks the target's
   own interpreter for the version, extension suffix and install paths, so the
   modules are named ``*.cpython-313-aarch64-linux-gnu.so``;
3. meson-python names the wheel after the interpreter running it (the
   workstation's), so the wheel is checked and retagged: every extension
   module must be an AArch64 ELF file with the target's suffix, linking only
   the libraries a manylinux wheel may assume (glibc's, libgcc_s), and the
   newest glibc symbol version they need sets the tag,
   ``cp313-cp313-manylinux_2_X_aarch64`` (2.17, the aarch64 floor, when
   nothing newer is needed). That tag states what the file needs from the
   Pi; ``linux_aarch64`` would state nothing (docs/firmware.md).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile

from firmware import sysroot
from firmware.tools import FirmwareError, which
from firmware import wheels
from firmware.wheels import MANYLINUX_FLOOR, parse_wheel
from offload.atomic import atomic_path

__all__ = ["CROSS_FILE", "ALLOWED_LIBS", "REQUIRED_FLAGS", "FORBIDDEN_FLAGS", "elf_info", "platform_tag", "build", "retag",
           "fetch"]

#: The committed cross file, relative to the checkout.
CROSS_FILE = os.path.join("tools", "cross", "aarch64-linux-gnu.ini")
#: Shared libraries a manylinux aarch64 wheel may link without carrying them (PEP 600's
#: "widely used" set, the part that concerns C code like ours).
ALLOWED_LIBS = frozenset({"libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1",
                          "ld-linux-aarch64.so.1", "libgcc_s.so.1"})
_EM_AARCH64 = 183


def _readelf(path, flag):
    proc = subprocess.run([which("aarch64-linux-gnu-readelf"), "-W", flag, path],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise FirmwareError(f"{path}: readelf {flag} failed: {proc.stderr.strip()}")
    return proc.stdout


def elf_info(path):
    """``(needed_libraries, newest_glibc)`` of an AArch64 shared object; refuse any other file.

    ``newest_glibc`` is the highest ``GLIBC_2.X`` symbol version it requires,
    as ``(2, X)``, or the manylinux floor (2, 17) when it names none higher.
    """
    with open(path, "rb") as f:
        head = f.read(20)
    if head[:4] != b"\x7fELF" or head[4] != 2 or int.from_bytes(head[18:20], "little") != _EM_AARCH64:
        raise FirmwareError(f"{os.path.basename(path)}: not a 64-bit ARM (AArch64) ELF file")
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", _readelf(path, "-d"))
    versions = [(int(a), int(b)) for a, b in re.findall(r"Name: GLIBC_(\d+)\.(\d+)", _readelf(path, "-V"))]
    return needed, max(versions + [MANYLINUX_FLOOR])


def platform_tag(glibc):
    """The manylinux platform tag of a wheel needing ``glibc`` ((2, X)) on aarch64."""
    return f"manylinux_{glibc[0]}_{glibc[1]}_aarch64"


def _record_hash(data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def retag(src, dest_dir, tag):
    """Copy the wheel ``src`` into ``dest_dir`` under the tag ``tag`` (``cp313-cp313-...``).

    Rewrites the ``Tag`` lines of ``WHEEL`` and the ``RECORD``; every other
    member is copied byte for byte. Returns the new wheel's path.
    """
    version = parse_wheel(os.path.basename(src))[1]
    dist = os.path.basename(src).split("-")[0]
    out = os.path.join(dest_dir, f"{dist}-{version}-{tag}.whl")
    with zipfile.ZipFile(src) as zin, atomic_path(out) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
            record = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
            rows = []
            for info in zin.infolist():
                if info.filename == record:
                    continue
                data = zin.read(info)
                if info.filename.endswith(".dist-info/WHEEL"):
                    keep = [ln for ln in data.decode().splitlines()
                            if ln.strip() and not ln.startswith(("Tag:", "Root-Is-Purelib:"))]
                    data = "\n".join(keep + ["Root-Is-Purelib: false", f"Tag: {tag}"]).encode() + b"\n"
                zout.writestr(info, data)
                rows.append(f"{info.filename},{_record_hash(data)},{len(data)}")
            rows.append(f"{record},,")
            zout.writestr(record, "\n".join(rows) + "\n")
    return out


def _check_modules(wheel, python):
    """The glibc the wheel's extension modules need; refuse one that is not for the target."""
    suffix = f".cpython-{python.replace('.', '')}-aarch64-linux-gnu.so"
    newest = MANYLINUX_FLOOR
    with zipfile.ZipFile(wheel) as z, tempfile.TemporaryDirectory() as tmp:
        modules = [n for n in z.namelist() if n.endswith(".so")]
        if not modules:
            raise FirmwareError(f"{wheel}: no extension modules in the cross-built wheel")
        for n in modules:
            if not n.endswith(suffix):
                raise FirmwareError(f"{n}: not named for CPython {python} on aarch64 (*{suffix})")
            path = z.extract(n, tmp)
            needed, glibc = elf_info(path)
            extra = sorted(set(needed) - ALLOWED_LIBS)
            if extra:
                raise FirmwareError(f"{n}: links {', '.join(extra)}, which a Raspberry Pi OS image "
                                    "need not have")
            newest = max(newest, glibc)
    return newest, len(modules)


#: Flags every compiled module must carry (the cross file's CPU, meson.build's float rule) and must not.
REQUIRED_FLAGS = ("-mcpu=cortex-a72", "-ffp-contract=off")
FORBIDDEN_FLAGS = ("-march=native", "-mcpu=native")


def _check_flags(builddir):
    """The compiler flags of the build, from Meson's compile_commands.json; refuse a wrong one."""
    with open(os.path.join(builddir, "compile_commands.json")) as f:
        # C compilations only (Meson lists the Cython transpile steps too).
        commands = [c["command"] for c in json.load(f) if c["file"].endswith(".c")]
    for cmd in commands:
        words = cmd.split()
        if not words[0].endswith("aarch64-linux-gnu-gcc"):
            raise FirmwareError(f"cross build compiled with {words[0]}, not aarch64-linux-gnu-gcc")
        gone = [x for x in REQUIRED_FLAGS if x not in words]
        bad = [x for x in FORBIDDEN_FLAGS if x in words]
        if gone or bad:
            raise FirmwareError(f"cross build flags: missing {gone}, forbidden {bad}: {cmd}")
    if not commands:
        raise FirmwareError(f"{builddir}: no C compilation in the cross build")
    return len(commands)


def _constants(work, root, python):
    """The cross file of this machine's paths (Meson constants the committed file uses)."""
    wrapper = os.path.join(work, "target-python")
    qemu = " ".join(f"'{x}'" for x in sysroot.qemu_command(root, python))
    with open(wrapper, "w") as f:
        f.write(f'#!/bin/sh\n# The target\'s CPython, emulated (no binfmt handler).\nexec {qemu} "$@"\n')
    os.chmod(wrapper, os.stat(wrapper).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    cython = which("cython") or os.path.join(os.path.dirname(sys.executable), "cython")
    if not os.path.isfile(cython):
        raise FirmwareError("cython not found: install the build tools (tools/setup.sh)")
    path = os.path.join(work, "paths.ini")
    with open(path, "w") as f:
        f.write(f"[constants]\nsysroot = '{root}'\ntarget_python = '{wrapper}'\ncython = '{cython}'\n")
    return path


def build(source, dest, *, python="3.13", cache=None, echo=print):
    """Cross-compile the checkout ``source`` into an aarch64 wheel for CPython ``python`` in ``dest``.

    Returns the wheel's path. Needs gcc-aarch64-linux-gnu and qemu-user, and
    the network the first time (the target's Python packages, cached).
    """
    sysroot.require_tools("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-readelf", "qemu-aarch64")
    if which("pkg-config") is None:
        raise FirmwareError("pkg-config not found: install pkgconf (apt-get install pkgconf)")
    cross = os.path.join(os.path.abspath(source), CROSS_FILE)
    if not os.path.isfile(cross):
        raise FirmwareError(f"--source {source}: no {CROSS_FILE} (give the offload checkout)")
    root = sysroot.ensure(python, cache=cache, echo=echo)
    os.makedirs(dest, exist_ok=True)
    work = tempfile.mkdtemp(prefix="offload-crosswheel-")
    try:
        consts = _constants(work, root, python)
        settings = {"setup-args": ["--cross-file", consts, "--cross-file", cross, "-Dnative_cpu=false"],
                    "builddir": os.path.join(work, "build")}
        echo(f"crosswheel: building offload for CPython {python} aarch64 (Cortex-A72) with "
             f"{CROSS_FILE}")
        code = "import mesonpy, sys, json; print(mesonpy.build_wheel(sys.argv[1], json.loads(sys.argv[2])))"
        proc = subprocess.run([sys.executable, "-c", code, work, json.dumps(settings)],
                              cwd=source, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise FirmwareError(f"the cross build failed:\n{tail}")
        built = os.path.join(work, proc.stdout.strip().splitlines()[-1])
        _check_flags(settings["builddir"])
        glibc, count = _check_modules(built, python)
        cp = f"cp{python.replace('.', '')}"
        out = retag(built, dest, f"{cp}-{cp}-{platform_tag(glibc)}")
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(work)
    echo(f"crosswheel: {out} ({count} AArch64 modules, glibc {glibc[0]}.{glibc[1]} or later)")
    return out


def fetch(folder, python, source, *, glibc=wheels.TARGET_GLIBC, offload_wheel=None, echo=print):
    """Fill ``folder`` for CPython ``python`` on aarch64: the dependencies' wheels and ours.

    Our wheel is ``offload_wheel`` when given (checked like the rest), else
    cross-compiled from the checkout ``source`` (:func:`build`;
    needs Debian's gcc-aarch64-linux-gnu and qemu-user, and the network once
    for the target's Python headers). Returns :func:`firmware.wheels.check`'s list.
    """
    if not os.path.isfile(os.path.join(source, "pyproject.toml")):
        raise FirmwareError(f"--source {source}: no pyproject.toml (give the offload checkout)")
    wheels.download(folder, python, glibc=glibc, echo=echo)
    if offload_wheel is not None:
        shutil.copy2(offload_wheel, folder)
    else:
        build(source, folder, python=python, echo=echo)
    return wheels.check(folder, python, glibc=glibc)
