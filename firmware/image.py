"""The input image: its MBR partition table, and what its root file system holds.

Raspberry Pi OS images have an MBR ("dos") partition table with a FAT32 boot
partition (type 0x0c) first and an ext4 root partition (0x83) second. The table
comes from ``sfdisk --json`` (read only); the root file system is only ever
read, with ``debugfs`` (``image?offset=BYTES``, no mount), to learn the
release (``/usr/lib/os-release``), the Python version (``/usr/lib/python3.N``)
and whether cloud-init is installed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass

from firmware.tools import FirmwareError, require, run, tool_env, which

__all__ = ["Partition", "ImageInfo", "read_table", "inspect", "FAT_TYPES", "LINUX_TYPE",
           "OLD_RELEASES"]

FAT_TYPES = {"c": "FAT32 LBA", "b": "FAT32", "e": "FAT16 LBA", "6": "FAT16"}
LINUX_TYPE = "83"
#: Raspberry Pi OS releases that do not read cloud-init from the boot partition
#: (they used firstrun.sh); cloud-init arrived with the trixie images of October 2025.
OLD_RELEASES = ("stretch", "buster", "bullseye", "bookworm")
_COMPRESSED = {b"\xfd7zXZ\x00": "xz", b"\x1f\x8b": "gzip", b"PK\x03\x04": "zip",
               b"(\xb5/\xfd": "zstd"}


@dataclass(frozen=True)
class Partition:
    """One partition: its number (1-based), MBR type (hex, lower case) and extent in bytes."""

    number: int
    type: str
    offset: int
    size: int

    def spec(self, image):
        """``image@@offset``: how mtools addresses this partition inside ``image``."""
        return f"{image}@@{self.offset}"


@dataclass(frozen=True)
class ImageInfo:
    """What the build needs to know about an input image."""

    path: str
    boot: Partition
    root: Partition
    codename: str
    python: str            # "3.13"
    pretty_name: str


def _check_file(path):
    if not os.path.isfile(path):
        raise FirmwareError(f"{path}: no such image file")
    size = os.path.getsize(path)
    if size < 512:
        raise FirmwareError(f"{path}: {size} bytes, too small to be a disk image")
    with open(path, "rb") as f:
        head = f.read(8)
    for magic, kind in _COMPRESSED.items():
        if head.startswith(magic):
            hint = {"xz": "xz -dk", "gzip": "gunzip -k", "zip": "unzip", "zstd": "zstd -d"}[kind]
            raise FirmwareError(f"{path}: is {kind}-compressed; decompress it first ({hint} {path})")
    return size


def read_table(path):
    """``(boot, root)`` partitions of the MBR image at ``path``.

    Raises
    ------
    FirmwareError
        Not a file, compressed, no or not an MBR partition table, no FAT boot or
        Linux root partition, or a partition past the end of the file
        (a truncated download).
    """
    path = os.fspath(path)
    size = _check_file(path)
    require("sfdisk")
    proc = subprocess.run([which("sfdisk"), "--json", path], capture_output=True, text=True,
                          env=tool_env(), timeout=60)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise FirmwareError(f"{path}: no partition table found (corrupt, or not a disk image)")
    try:
        table = json.loads(proc.stdout)["partitiontable"]
    except (ValueError, KeyError):
        raise FirmwareError(f"{path}: sfdisk printed no readable partition table") from None
    if table.get("label") != "dos":
        raise FirmwareError(f"{path}: partition table is {table.get('label')!r}, not an MBR (dos) "
                            "one as Raspberry Pi OS images have")
    sector = int(table.get("sectorsize", 512))
    parts = []
    for i, p in enumerate(table.get("partitions", []), start=1):
        node = str(p.get("node", ""))
        m = re.search(r"(\d+)$", node)
        number = int(m.group(1)) if m else i
        ptype = str(p.get("type", "")).lower().removeprefix("0x")
        parts.append(Partition(number, ptype, int(p["start"]) * sector, int(p["size"]) * sector))
    boot = next((p for p in parts if p.type in FAT_TYPES), None)
    if boot is None:
        raise FirmwareError(f"{path}: no FAT boot partition (MBR type 0x0c) in the partition table")
    root = next((p for p in parts if p.type == LINUX_TYPE and p.number != boot.number), None)
    if root is None:
        raise FirmwareError(f"{path}: no Linux root partition (MBR type 0x83) in the partition table")
    for p in (boot, root):
        if p.offset + p.size > size:
            raise FirmwareError(f"{path}: partition {p.number} ends at byte {p.offset + p.size}, past "
                                f"the end of the file ({size} bytes): truncated image?")
    return boot, root


def _debugfs(path, part, request):
    """stdout of one read-only debugfs request on ``part``; ``None`` when the path is not there."""
    require("debugfs")
    proc = subprocess.run([which("debugfs"), "-R", request, f"{path}?offset={part.offset}"],
                          capture_output=True, env=tool_env(), timeout=120)
    err = proc.stderr.decode("utf-8", "replace")
    # debugfs exits 0 even when it cannot open the file system; its stderr says so.
    if "while trying to open" in err or "Bad magic number" in err or "Couldn't find valid filesystem" in err:
        raise FirmwareError(f"{path}: partition {part.number} is not an ext4 file system")
    if "not found by ext2_lookup" in err or "File not found" in err:
        return None
    return proc.stdout


def _os_release(text):
    out = {}
    for line in text.splitlines():
        k, sep, v = line.partition("=")
        if sep:
            out[k.strip()] = v.strip().strip('"').strip("'")
    return out


def inspect(path):
    """An :class:`ImageInfo` for a Raspberry Pi OS image this build supports.

    Raises
    ------
    FirmwareError
        Everything :func:`read_table` refuses, a boot partition that is not FAT,
        a root partition that is not ext4, a release older than trixie, or an
        image without cloud-init or Python 3.
    """
    path = os.fspath(path)
    boot, root = read_table(path)
    # mdir fails on anything that is not a FAT file system.
    run(["mdir", "-i", boot.spec(path), "::"], f"{path}: partition {boot.number} is not a FAT file system")
    # /etc/os-release is a symbolic link to this file on Debian; debugfs does not follow links.
    text = _debugfs(path, root, "cat /usr/lib/os-release") or _debugfs(path, root, "cat /etc/os-release")
    if not text or not text.strip():
        raise FirmwareError(f"{path}: no /usr/lib/os-release on the root partition: not a Raspberry Pi OS image")
    rel = _os_release(text.decode("utf-8", "replace"))
    codename = rel.get("VERSION_CODENAME", "").lower()
    pretty = rel.get("PRETTY_NAME", codename or "unknown")
    if not codename:
        raise FirmwareError(f"{path}: os-release names no VERSION_CODENAME ({pretty})")
    if codename in OLD_RELEASES:
        raise FirmwareError(f"{path}: {pretty} ({codename}) does not run cloud-init from the boot "
                            "partition; use a Raspberry Pi OS Lite (64-bit) image based on Debian 13 "
                            "trixie (October 2025 or later)")
    if _debugfs(path, root, "stat /usr/bin/cloud-init") is None:
        raise FirmwareError(f"{path}: cloud-init is not installed on the root partition ({pretty}); "
                            "use an official Raspberry Pi OS trixie image or later")
    listing = _debugfs(path, root, "ls -p /usr/lib") or b""
    versions = sorted({(int(a), int(b)) for a, b in
                       re.findall(rb"/python(3)\.(\d+)/", listing)})
    if not versions:
        raise FirmwareError(f"{path}: no /usr/lib/python3.N on the root partition: Python 3 is missing")
    python = "%d.%d" % versions[-1]
    return ImageInfo(path, boot, root, codename, python, pretty)
