"""The Edge TPU runtime the image installs, and the check of a libedgetpu ``.deb``.

Which build: LiteRT (``ai-edge-litert``, the device extra) loads the Edge TPU
delegate with ``load_delegate("libedgetpu.so.1")``. The delegate is compiled
against one TensorFlow Lite tree and must match the runtime's delegate ABI.
Coral's own package repository stops at ``libedgetpu1-std`` 16.0 (2021),
built against TensorFlow 2.5; with TensorFlow Lite 2.12 and later it
segfaults (google-coral/edgetpu issue #812). The maintained community build
is Nicola Ferralis' fork (github.com/feranick/libedgetpu), release
``16.0TF2.19.1-1``, built against TensorFlow 2.19.1; its author states in
google-ai-edge/LiteRT issue #3611 (September 2025) that with it
"ai-edge-litert is perfectly compatible with edgeTPU". That is the build we
pair with our LiteRT (ai-edge-litert 2.3.0 in the development environment;
not yet run on a Coral here). The arm64 package is built on Debian bookworm
and runs on trixie (newer glibc; its one dependency, libusb-1.0-0, has the
same name there).

The build carries the ``.deb`` the user downloaded on the boot partition; the
first-boot script installs it with apt.
"""

from __future__ import annotations

import io
import lzma
import os
import re
import tarfile
import zlib

from firmware.tools import FirmwareError

__all__ = ["TAG", "DEB_NAME", "URL", "PAIRED_VERSION", "PACKAGES", "DebInfo", "check_deb"]

TAG = "16.0TF2.19.1-1"
PAIRED_VERSION = "16.0tf2.19.1-1"
DEB_NAME = f"libedgetpu1-std_{PAIRED_VERSION}.bookworm_arm64.deb"
URL = f"https://github.com/feranick/libedgetpu/releases/download/{TAG}/{DEB_NAME}"
#: std: the standard clock; max: the maximum clock (runs hotter, needs cooling).
PACKAGES = ("libedgetpu1-std", "libedgetpu1-max")


class DebInfo:
    """Package name, version and architecture of a ``.deb``."""

    def __init__(self, package, version, arch):
        self.package, self.version, self.arch = package, version, arch

    def __repr__(self):
        return f"DebInfo({self.package!r}, {self.version!r}, {self.arch!r})"


def _members(data, path):
    """``{name: bytes}`` of an ``ar`` archive (the container of a .deb)."""
    if not data.startswith(b"!<arch>\n"):
        raise FirmwareError(f"Edge TPU runtime {path}: not a Debian package (.deb)")
    out, pos = {}, 8
    while pos + 60 <= len(data):
        head = data[pos:pos + 60]
        name = head[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(head[48:58].decode("ascii").strip())
        except ValueError:
            raise FirmwareError(f"Edge TPU runtime {path}: damaged .deb (bad member header)") from None
        body = data[pos + 60:pos + 60 + size]
        if len(body) != size:
            raise FirmwareError(f"Edge TPU runtime {path}: truncated .deb")
        out[name] = body
        pos += 60 + size + (size & 1)
    return out


def _control(members, path):
    for name, body in members.items():
        if not name.startswith("control.tar"):
            continue
        if name.endswith(".zst"):
            return None          # no zstd in the standard library: fall back to the file name
        try:
            if name.endswith(".xz"):
                raw = lzma.decompress(body)
            elif name.endswith(".gz"):
                raw = zlib.decompress(body, 16 + zlib.MAX_WBITS)
            else:
                raw = body
            with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
                for m in tar.getmembers():
                    if m.name.lstrip("./") == "control":
                        return tar.extractfile(m).read().decode("utf-8", "replace")
        except (lzma.LZMAError, zlib.error, tarfile.TarError, OSError):
            raise FirmwareError(f"Edge TPU runtime {path}: damaged control archive") from None
    raise FirmwareError(f"Edge TPU runtime {path}: .deb without a control file")


def check_deb(path):
    """Check that ``path`` is an arm64 libedgetpu package; return its :class:`DebInfo`.

    Raises
    ------
    FirmwareError
        Not a .deb, damaged, another package, or another architecture.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise FirmwareError(f"Edge TPU runtime {path}: cannot read ({e.strerror})") from None
    members = _members(data, path)
    if members.get("debian-binary", b"").strip() != b"2.0":
        raise FirmwareError(f"Edge TPU runtime {path}: not a Debian binary package")
    text = _control(members, path)
    if text is None:
        m = re.match(r"^([a-z0-9.+-]+)_([^_]+)_([a-z0-9]+)\.deb$", os.path.basename(path))
        if not m:
            raise FirmwareError(f"Edge TPU runtime {path}: cannot tell its package and architecture "
                                "(zstd control archive and a file name not NAME_VERSION_ARCH.deb)")
        info = DebInfo(*m.groups())
    else:
        fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", text, re.M))
        info = DebInfo(fields.get("Package", ""), fields.get("Version", ""),
                       fields.get("Architecture", ""))
    if info.package not in PACKAGES:
        raise FirmwareError(f"Edge TPU runtime {path}: package {info.package!r}, expected one of "
                            f"{', '.join(PACKAGES)}")
    if info.arch != "arm64":
        raise FirmwareError(f"Edge TPU runtime {path}: architecture {info.arch!r}; the Raspberry Pi "
                            f"image needs arm64 ({DEB_NAME})")
    return info
