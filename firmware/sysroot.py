"""An aarch64 CPython in a folder: Debian arm64 packages unpacked with ``dpkg -x``, for cross builds.

The cross build of our wheel (``firmware.crosswheel``) needs the target's
Python headers, its ``python-3.N.pc`` and an interpreter that answers Meson's
questions about itself; the twin tests under emulation (tools/aarch64_twins.sh)
need an aarch64 CPython that imports the cross-built core. Both come from the
same folder: the Debian release that ships that CPython (trixie: 3.13, the
Raspberry Pi OS the firmware targets; bookworm: 3.11), its arm64 packages
fetched with ``apt-get download`` through a private apt configuration (its
own sources list, state and cache under the folder: the host's apt sources,
architectures and package database are left alone) and unpacked with
``dpkg -x``. The interpreter runs under ``qemu-aarch64 -L FOLDER`` (Debian's
qemu-user), invoked explicitly: no binfmt handler is registered.

Signatures are checked as apt always does, against the host's Debian archive
keyring. The folder is a cache: a second call finds it complete and returns.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

from firmware.tools import FirmwareError, which

__all__ = ["SUITES", "PACKAGES", "QEMU_CPU", "KEYRING", "MIRROR", "default_cache", "ensure", "interpreter",
           "qemu_command", "require_tools"]

#: The Debian release whose arm64 packages give each target CPython.
SUITES = {"3.13": "trixie", "3.11": "bookworm"}
#: What the folder holds: the interpreter, its standard library and headers, and
#: the shared libraries they (and numpy's aarch64 wheel) load. ``a|b``: the first the
#: release has; ``?``: only where the release has it (bookworm's CPython 3.11 carries
#: its own mpdecimal, trixie's links libmpdec4).
PACKAGES = ["python{v}-minimal", "libpython{v}-minimal", "libpython{v}-stdlib", "libpython{v}-dev",
            "libc6", "libexpat1", "zlib1g", "libffi8", "libbz2-1.0", "liblzma5", "libuuid1",
            "libgcc-s1", "libstdc++6", "libzstd1", "libssl3|libssl3t64", "?libmpdec4"]
#: The CPU qemu-aarch64 emulates: the Pi 4's. qemu's default ("max": SVE, SME and more)
#: is no Pi, and under Debian bookworm's qemu 7.2 numpy's OpenBLAS computed wrong float32
#: matrix products on it (errors of 47 on a 64x96 by 96x80 product); on cortex-a72 they
#: are right, and numpy and OpenBLAS pick the plain NEON code paths a Pi 4 runs.
QEMU_CPU = "cortex-a72"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
MIRROR = "http://deb.debian.org/debian"
#: Debian packages of the host tools, for the messages.
TOOL_PACKAGES = {"apt-get": "apt", "dpkg": "dpkg", "qemu-aarch64": "qemu-user",
                 "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu",
                 "aarch64-linux-gnu-readelf": "binutils-aarch64-linux-gnu"}
_DONE = ".complete"


def default_cache():
    """The folder the cross build and the emulated tests keep downloads in.

    ``$OFFLOAD_AARCH64_CACHE``, else ``$XDG_CACHE_HOME/offload/aarch64``
    (``~/.cache/offload/aarch64``).
    """
    env = os.environ.get("OFFLOAD_AARCH64_CACHE")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "offload", "aarch64")


def require_tools(*tools):
    """Refuse, naming the Debian package to install, when one of ``tools`` is missing."""
    gone = [t for t in tools if which(t) is None]
    if gone:
        pkgs = sorted({TOOL_PACKAGES.get(t, t) for t in gone})
        raise FirmwareError(f"{', '.join(gone)} not found: install {' '.join(pkgs)} (apt-get "
                            f"install --no-install-recommends {' '.join(pkgs)})")


def _suite(python):
    if python not in SUITES:
        known = ", ".join(f"{v} ({s})" for v, s in sorted(SUITES.items()))
        raise FirmwareError(f"CPython {python}: no Debian release ships it for arm64; the cross "
                            f"build knows {known}")
    return SUITES[python]


def _apt(root, *args, cwd=None):
    """Run apt-get/apt-cache with the private configuration under ``root``; its stdout."""
    opts = [f"Dir::Etc::SourceList={root}/sources.list", "Dir::Etc::SourceParts=/nonexistent",
            "Dir::Etc::Preferences=/dev/null", "Dir::Etc::PreferencesParts=/nonexistent",
            f"Dir::State={root}/state", f"Dir::State::status={root}/state/status",
            f"Dir::Cache={root}/cache", "APT::Architecture=arm64", "APT::Architectures::=arm64",
            "Debug::NoLocking=1", "Acquire::Languages=none", "APT::Sandbox::User=root"]
    cmd = [args[0]] + [x for o in opts for x in ("-o", o)] + list(args[1:])
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()] or [f"exit {proc.returncode}"]
        raise FirmwareError(f"{' '.join(args[:2])} (arm64 packages from {MIRROR}): {lines[-1]}")
    return proc.stdout


def _pick(root, alternatives):
    """The first of ``a|b`` that the suite has (library packages were renamed between releases).

    ``None`` for an optional (``?name``) package the suite lacks.
    """
    optional = alternatives.startswith("?")
    for name in alternatives.lstrip("?").split("|"):
        with contextlib.suppress(FirmwareError):
            if _apt(root, "apt-cache", "show", "--no-all-versions", name).strip():
                return name
    if optional:
        return None
    raise FirmwareError(f"none of {alternatives} in the arm64 package index")


def interpreter(folder, python):
    """The target interpreter's path inside the unpacked folder."""
    return os.path.join(folder, "usr", "bin", f"python{python}")


def qemu_command(folder, python):
    """The command that runs the aarch64 CPython of ``folder`` on this machine (a list)."""
    return [which("qemu-aarch64"), "-cpu", QEMU_CPU, "-L", folder, interpreter(folder, python)]


def ensure(python="3.13", *, cache=None, echo=print):
    """The folder holding an unpacked arm64 CPython ``python``, made (or found complete) in ``cache``.

    Needs the network the first time (about 17 MB of packages), then none.
    """
    require_tools("apt-get", "dpkg")
    suite = _suite(python)
    cache = os.path.abspath(cache or default_cache())
    folder = os.path.join(cache, f"sysroot-{suite}")
    if os.path.isfile(os.path.join(folder, _DONE)):
        return folder
    if not os.path.isfile(KEYRING):
        raise FirmwareError(f"{KEYRING} missing: install debian-archive-keyring")
    apt = os.path.join(cache, f"apt-{suite}")
    for d in ("state/lists/partial", "cache/archives/partial", "debs"):
        os.makedirs(os.path.join(apt, d), exist_ok=True)
    with open(os.path.join(apt, "sources.list"), "w") as f:
        f.write(f"deb [arch=arm64 signed-by={KEYRING}] {MIRROR} {suite} main\n")
    open(os.path.join(apt, "state", "status"), "a").close()
    echo(f"sysroot: arm64 package index of Debian {suite} (private apt state in {apt})")
    _apt(apt, "apt-get", "update")
    names = [n for n in (_pick(apt, p.format(v=python)) for p in PACKAGES) if n]
    debs = os.path.join(apt, "debs")
    for old in os.listdir(debs):
        os.unlink(os.path.join(debs, old))
    echo(f"sysroot: apt-get download {len(names)} arm64 packages")
    _apt(apt, "apt-get", "download", *names, cwd=debs)
    partial = folder + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    for deb in sorted(os.listdir(debs)):
        subprocess.run(["dpkg", "-x", os.path.join(debs, deb), partial], check=True)
    # Merged /usr (trixie): base-files provides these links on a real system.
    for link in ("lib", "bin", "sbin"):
        if not os.path.lexists(os.path.join(partial, link)) and \
                os.path.isdir(os.path.join(partial, "usr", link)):
            os.symlink(os.path.join("usr", link), os.path.join(partial, link))
    open(os.path.join(partial, _DONE), "w").close()
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    with contextlib.suppress(OSError):
        shutil.rmtree(os.path.join(apt, "cache", "archives"))
    echo(f"sysroot: {folder}")
    return folder
