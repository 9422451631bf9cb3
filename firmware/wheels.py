"""The offline wheel folder carried on the boot partition: fetching it, and checking it for a target.

The Pi installs the project with ``pip install --no-index --find-links
--only-binary=:all:`` from this folder, so a device comes up without a
compiler and without the network. It holds wheels only:

* our package as an aarch64 wheel for the image's CPython
  (``offload-X-cp313-cp313-manylinux_2_17_aarch64.whl``), cross-compiled on
  the workstation (``firmware.crosswheel``; docs/firmware.md);
* aarch64 wheels of the device's runtime dependencies (numpy, OpenCV, LiteRT,
  click, tqdm and what they need) for the image's CPython, and pip itself.

``fetch`` fills such a folder with ``pip download --only-binary=:all:
--python-version 3.N --platform ...`` for every platform tag the target's
glibc accepts (:func:`platforms`); ``check`` verifies one before it is
written to an image.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from firmware.tools import FirmwareError

__all__ = ["REQUIRED", "TARGET_GLIBC", "MANYLINUX_FLOOR", "PYTHONS", "platforms", "parse_glibc",
           "parse_wheel", "compatible", "check", "device_requirements", "pip_target_args", "download"]

#: glibc of the target image: Raspberry Pi OS trixie (Debian 13) ships 2.41.
TARGET_GLIBC = (2, 41)
#: The oldest glibc an aarch64 manylinux tag names: manylinux2014 is manylinux_2_17.
MANYLINUX_FLOOR = (2, 17)
#: The CPython versions fetch-wheels resolves the device's dependencies for
#: (3.11: bookworm; 3.13: trixie, the image the build accepts; 3.12 for other aarch64 systems).
PYTHONS = ("3.11", "3.12", "3.13")
#: Distributions that must be in the folder (normalised names), besides our own wheel.
REQUIRED = ["pip", "numpy", "click", "tqdm", "opencv-python-headless", "ai-edge-litert"]
#: The project's own distribution (normalised name).
OURS = "offload"

_WHEEL = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-(?P<build>\d[^-]*))?-(?P<py>[^-]+)-"
                    r"(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$")


def platforms(glibc=TARGET_GLIBC):
    """pip's ``--platform`` tags for 64-bit ARM Linux with ``glibc`` ((major, minor)), best first.

    Every ``manylinux_2_X_aarch64`` from the target's glibc down to 2.17, then
    the legacy alias ``manylinux2014_aarch64`` (= 2.17) and ``linux_aarch64``:
    the list pip itself accepts on such a machine. pip does not widen an
    explicit ``--platform`` to other glibc versions, so the list must be whole
    (a wheel tagged only ``manylinux_2_27`` is otherwise not found).
    """
    major, minor = glibc
    if (major, minor) < MANYLINUX_FLOOR or major != MANYLINUX_FLOOR[0]:
        raise FirmwareError(f"glibc {major}.{minor}: aarch64 wheels need glibc 2.17 or later")
    tags = [f"manylinux_{major}_{m}_aarch64" for m in range(minor, MANYLINUX_FLOOR[1] - 1, -1)]
    return tags + ["manylinux2014_aarch64", "linux_aarch64"]


def parse_glibc(text):
    """``"2.41"`` -> ``(2, 41)``; a clear error for anything else."""
    m = re.fullmatch(r"(\d+)\.(\d+)", str(text).strip())
    if not m:
        raise FirmwareError(f"--glibc {text!r}: give MAJOR.MINOR, e.g. 2.41")
    glibc = (int(m.group(1)), int(m.group(2)))
    platforms(glibc)                       # refuses one older than manylinux's floor
    return glibc


def _norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_wheel(filename):
    """``(name, version, python_tags, abi_tags, platform_tags)`` of a wheel file name, or ``None``."""
    m = _WHEEL.match(filename)
    if not m:
        return None
    return (_norm(m["name"]), m["version"], m["py"].split("."), m["abi"].split("."),
            m["plat"].split("."))


def _python_ok(pys, abis, python):
    major, minor = (int(x) for x in python.split("."))
    cp = f"cp{major}{minor}"
    for py in pys:
        if py in (f"py{major}", f"py{major}{minor}", cp) and any(a in ("none", "abi3", cp) for a in abis):
            return True
        m = re.match(r"^cp(\d)(\d+)$", py)
        # A stable-ABI wheel (abi3) built for an older CPython 3 works on newer ones.
        if m and "abi3" in abis and int(m.group(1)) == major and int(m.group(2)) <= minor:
            return True
    return False


def compatible(filename, python, *, glibc=TARGET_GLIBC):
    """Whether the wheel ``filename`` installs on CPython ``python`` ("3.13") on aarch64 with ``glibc``."""
    parsed = parse_wheel(filename)
    if parsed is None:
        return False
    _, _, pys, abis, plats = parsed
    accepted = set(platforms(glibc))
    return _python_ok(pys, abis, python) and any(p == "any" or p in accepted for p in plats)


def _wheel_python(filename):
    """The CPython version ("3.11") a cpXY-cpXY wheel is built for, or ``None``."""
    parsed = parse_wheel(filename)
    for py in parsed[2] if parsed else ():
        m = re.match(r"^cp(\d)(\d+)$", py)
        if m:
            return f"{m.group(1)}.{m.group(2)}"
    return None


def _check_ours(folder, files, python, glibc):
    """Our wheel for CPython ``python`` on aarch64: exactly one, and none for another target."""
    sdists = [f for f in files if f.endswith(".tar.gz")]
    if sdists:
        raise FirmwareError(f"--wheels {folder}: {sdists[0]} is a source distribution; first boot "
                            "installs wheels only (the card has no compiler): remove it")
    ours = [f for f in files if (parse_wheel(f) or ("",))[0] == OURS]
    good = [f for f in ours if compatible(f, python, glibc=glibc)]
    make = f"make it with: offload-firmware fetch-wheels {folder} --python {python}"
    for f in ours:
        if f in good:
            continue
        other = _wheel_python(f)
        why = (f"is for CPython {other}" if other and other != python
               else f"is not for aarch64 Linux with glibc {glibc[0]}.{glibc[1]}")
        raise FirmwareError(f"--wheels {folder}: {f} {why}, and the image has CPython {python} on "
                            f"aarch64: remove it ({make})")
    if not good:
        raise FirmwareError(f"--wheels {folder}: no offload wheel for CPython {python} aarch64; "
                            f"first boot installs wheels only ({make})")
    if len(good) > 1:
        raise FirmwareError(f"--wheels {folder}: {len(good)} offload wheels ({', '.join(good)}); "
                            "keep the one to install")
    return good[0]


def check(folder, python, *, glibc=TARGET_GLIBC):
    """The files of ``folder`` to carry; refuse a folder the Pi could not install from offline.

    Raises
    ------
    FirmwareError
        Missing folder; no ``offload`` wheel for CPython ``python`` on aarch64,
        or one for another Python or CPU; an sdist (first boot compiles
        nothing); a required distribution without a wheel for the target.
    """
    if not os.path.isdir(folder):
        raise FirmwareError(f"--wheels {folder}: no such folder (make one with: offload-firmware "
                            f"fetch-wheels {folder} --python {python})")
    files = sorted(f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f)))
    odd = [f for f in files if not (f.endswith(".whl") or f.endswith(".tar.gz"))]
    if odd:
        raise FirmwareError(f"--wheels {folder}: {odd[0]} is not a wheel")
    _check_ours(folder, files, python, glibc)
    have = {parse_wheel(f)[0] for f in files if compatible(f, python, glibc=glibc)}
    gone = [n for n in REQUIRED if n not in have]
    if gone:
        raise FirmwareError(f"--wheels {folder}: no wheel for CPython {python} aarch64 of "
                            f"{', '.join(gone)} (run: offload-firmware fetch-wheels {folder} "
                            f"--python {python})")
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


def pip_target_args(python, *, glibc=TARGET_GLIBC):
    """pip's options selecting wheels for CPython ``python`` on aarch64 with ``glibc`` (a list)."""
    args = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp",
            "--abi", f"cp{python.replace('.', '')}"]
    for p in platforms(glibc):
        args += ["--platform", p]
    return args


def download(folder, python, *, glibc=TARGET_GLIBC, requirements=None, pip_args=(), echo=print):
    """``pip download`` the wheels of ``requirements`` (default: the device's, and pip) into ``folder``.

    For CPython ``python`` on aarch64 with ``glibc``, wheels only, every
    platform tag of :func:`platforms`. ``pip_args``: more pip options (the
    tests pass ``--no-index --find-links DIR``). Needs the network otherwise.
    """
    os.makedirs(folder, exist_ok=True)
    reqs = list(requirements) if requirements is not None else device_requirements(python) + ["pip"]
    cmd = [sys.executable, "-m", "pip", "download", "--dest", folder, "--disable-pip-version-check",
           *pip_target_args(python, glibc=glibc), *pip_args]
    echo(f"fetch-wheels: pip download for CPython {python} aarch64 (glibc {glibc[0]}.{glibc[1]}): "
         f"{' '.join(reqs)}")
    if subprocess.run(cmd + reqs).returncode != 0:
        raise FirmwareError("pip download failed (see its output above)")
