"""Running the external tools the build needs, with one clear error when one is missing or fails.

The build shells out to ``sfdisk`` (util-linux ``fdisk`` package), the
``mtools`` commands and ``debugfs`` (``e2fsprogs``); all of them work on an
image file as an unprivileged user, without loop devices.
"""

from __future__ import annotations

import os
import shutil
import subprocess

__all__ = ["FirmwareError", "PACKAGES", "missing", "require", "run", "tool_env", "which"]


class FirmwareError(ValueError):
    """A refusal of the firmware build or of first-boot provisioning; the message says why."""


#: Tool -> Debian package that provides it (named in the error when it is missing).
PACKAGES = {
    "sfdisk": "fdisk",
    "mcopy": "mtools", "mdir": "mtools", "mmd": "mtools", "mtype": "mtools",
    "minfo": "mtools", "mdel": "mtools",
    "debugfs": "e2fsprogs",
}

# sbin folders are often not on an unprivileged user's PATH, yet the tools
# there (sfdisk, debugfs) work fine on image files.
_EXTRA_PATH = ("/usr/sbin", "/sbin")


def which(tool):
    """The path of the command-line ``tool``, also looking in the sbin folders; None when absent."""
    found = shutil.which(tool)
    if found:
        return found
    path = os.pathsep.join(_EXTRA_PATH)
    return shutil.which(tool, path=path)


def missing(*tools):
    """The tools among ``tools`` that cannot be found."""
    return [t for t in tools if which(t) is None]


def require(*tools):
    """Raise :class:`FirmwareError` naming the first missing tool and its Debian package."""
    gone = missing(*tools)
    if gone:
        pkgs = sorted({PACKAGES.get(t, t) for t in gone})
        raise FirmwareError(f"{', '.join(gone)} not found: install {' '.join(pkgs)} "
                            f"(apt-get install {' '.join(pkgs)})")


def tool_env():
    """The environment the tools run in: this one, with mtools and the locale pinned."""
    env = dict(os.environ)
    # Never read a user's ~/.mtoolsrc (a drive letter mapping there could
    # redirect writes), and skip mtools' check of the BIOS geometry, which
    # means nothing for a partition inside an image file.
    env["MTOOLSRC"] = os.devnull
    env["MTOOLS_SKIP_CHECK"] = "1"
    env["LC_ALL"] = "C"
    return env


def run(cmd, what, *, input=None, binary=False):
    """Run ``cmd`` (a list); return its stdout. A failure raises :class:`FirmwareError`.

    ``what`` says what was being done, for the message; the tool's own last
    stderr line is appended, since it usually names the problem.
    """
    require(cmd[0])
    exe = which(cmd[0])
    try:
        proc = subprocess.run([exe, *cmd[1:]], input=input, capture_output=True,
                              env=tool_env(), text=not binary, timeout=600)
    except subprocess.TimeoutExpired:
        raise FirmwareError(f"{what}: {cmd[0]} did not finish in 600 s") from None
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace") if binary else proc.stderr
        lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
        detail = lines[-1] if lines else f"exit status {proc.returncode}"
        raise FirmwareError(f"{what}: {detail}")
    return proc.stdout
