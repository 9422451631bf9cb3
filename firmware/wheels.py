"""The offline wheel folder carried on the boot partition: fetching it, and checking it for a target.

The Pi installs the project with ``pip install --no-index --find-links`` from
this folder, so a device without internet still comes up. It holds:

* our package as an sdist (``offload-X.tar.gz``): its native core is compiled
  on the Pi, for the Pi's own CPU (``-mcpu=native``); a prebuilt aarch64
  wheel of ``offload`` for the image's Python may replace it;
* aarch64 wheels of the device's runtime dependencies (numpy, OpenCV, LiteRT,
  click, tqdm and what they need) for the image's Python;
* the build tools for the native core (meson-python, meson, ninja, Cython)
  and pip itself.

``fetch`` fills such a folder with ``pip download --only-binary=:all:
--platform manylinux..._aarch64 --python-version 3.N`` and meson-python's
sdist hook; ``check`` verifies one before it is written to an image.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from firmware.tools import FirmwareError

__all__ = ["REQUIRED", "BUILD_TOOLS", "PLATFORMS", "parse_wheel", "compatible", "check",
           "device_requirements", "fetch"]

#: Build tools for the native core, and pip for the venv made without ensurepip.
BUILD_TOOLS = ["pip", "meson-python>=0.15", "meson>=1.2", "ninja", "Cython>=3.0"]
#: Distributions that must be in the folder (normalised names).
REQUIRED = ["pip", "meson-python", "meson", "ninja", "cython", "numpy", "click", "tqdm",
            "opencv-python-headless", "ai-edge-litert"]
#: pip's platform tags for a 64-bit Raspberry Pi OS (glibc 2.41 on trixie).
PLATFORMS = ["manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64",
             "linux_aarch64"]

_WHEEL = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-(?P<build>\d[^-]*))?-(?P<py>[^-]+)-"
                    r"(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$")


def _norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_wheel(filename):
    """``(name, version, python_tags, abi_tags, platform_tags)`` of a wheel file name, or ``None``."""
    m = _WHEEL.match(filename)
    if not m:
        return None
    return (_norm(m["name"]), m["version"], m["py"].split("."), m["abi"].split("."),
            m["plat"].split("."))


def compatible(filename, python):
    """Whether the wheel ``filename`` installs on CPython ``python`` ("3.13") on 64-bit ARM Linux."""
    parsed = parse_wheel(filename)
    if parsed is None:
        return False
    _, _, pys, abis, plats = parsed
    major, minor = (int(x) for x in python.split("."))
    cp = f"cp{major}{minor}"
    py_ok = False
    for py in pys:
        if py in (f"py{major}", f"py{major}{minor}", cp):
            py_ok = True
        m = re.match(r"^cp(\d)(\d+)$", py)
        # A stable-ABI wheel (abi3) built for an older CPython 3 works on newer ones.
        if m and "abi3" in abis and int(m.group(1)) == major and int(m.group(2)) <= minor:
            py_ok = True
    abi_ok = any(a in ("none", "abi3", cp) for a in abis)
    plat_ok = any(p == "any" or (p.endswith("_aarch64") and not p.startswith("musllinux"))
                  for p in plats)
    return py_ok and abi_ok and plat_ok


def check(folder, python):
    """The files of ``folder`` to carry; refuse a folder the Pi could not install from.

    Raises
    ------
    FirmwareError
        Missing folder, no ``offload`` sdist or matching wheel, or a required
        distribution without a wheel for CPython ``python`` on aarch64.
    """
    if not os.path.isdir(folder):
        raise FirmwareError(f"--wheels {folder}: no such folder (make one with: offload-firmware "
                            f"fetch-wheels {folder} --python {python})")
    files = sorted(f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f)))
    have = {}
    for f in files:
        parsed = parse_wheel(f)
        if parsed and compatible(f, python):
            have.setdefault(parsed[0], f)
    ours = [f for f in files if re.match(r"^offload-[^-]+\.tar\.gz$", f)] + \
           [f for f in files if f.startswith("offload-") and compatible(f, python)]
    if not ours:
        raise FirmwareError(f"--wheels {folder}: no offload sdist (offload-X.tar.gz) nor an offload "
                            f"wheel for CPython {python} aarch64")
    gone = [n for n in REQUIRED if n not in have]
    if gone:
        raise FirmwareError(f"--wheels {folder}: no wheel for CPython {python} aarch64 of "
                            f"{', '.join(gone)} (run: offload-firmware fetch-wheels {folder} "
                            f"--python {python})")
    odd = [f for f in files if not (f.endswith(".whl") or f.endswith(".tar.gz"))]
    if odd:
        raise FirmwareError(f"--wheels {folder}: {odd[0]} is neither a wheel nor an sdist")
    return [os.path.join(folder, f) for f in files]


def device_requirements(python):
    """The runtime requirements of ``offload[device]`` for CPython ``python``, from the installed metadata."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires("offload") or []
    except PackageNotFoundError:
        raise FirmwareError("the offload package metadata is not installed; install the project "
                            "(tools/setup.sh) first") from None
    major, minor = (int(x) for x in python.split("."))
    out = []
    for req in reqs:
        spec, _, marker = req.partition(";")
        marker = marker.strip()
        if marker and 'extra == "device"' not in marker and "extra == 'device'" not in marker:
            continue
        m = re.search(r"python_version\s*<\s*['\"](\d+)\.(\d+)['\"]", marker)
        if m and (major, minor) >= (int(m.group(1)), int(m.group(2))):
            continue          # e.g. tomli, only before Python 3.11
        out.append(spec.strip())
    return out


def fetch(folder, python, source, *, echo=print):
    """Fill ``folder`` with the wheels for CPython ``python`` on aarch64 and our sdist from ``source``.

    Needs the network (PyPI); ``source`` is the project's checkout (its pyproject.toml).
    """
    if not os.path.isfile(os.path.join(source, "pyproject.toml")):
        raise FirmwareError(f"--source {source}: no pyproject.toml (give the offload checkout)")
    os.makedirs(folder, exist_ok=True)
    reqs = device_requirements(python) + BUILD_TOOLS
    cmd = [sys.executable, "-m", "pip", "download", "--dest", folder, "--only-binary=:all:",
           "--python-version", python, "--implementation", "cp"]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    echo(f"fetch-wheels: pip download for CPython {python} aarch64: {' '.join(reqs)}")
    if subprocess.run(cmd + reqs).returncode != 0:
        raise FirmwareError("pip download failed (see its output above)")
    echo("fetch-wheels: building the offload sdist (meson-python)")
    code = ("import mesonpy, sys; print(mesonpy.build_sdist(sys.argv[1]))")
    proc = subprocess.run([sys.executable, "-c", code, os.path.abspath(folder)], cwd=source,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise FirmwareError(f"building the sdist failed: {tail}")
    return check(folder, python)
