"""Files on a FAT partition inside an image file, through mtools (no mount, no root).

mtools addresses a partition as ``image@@offset`` (bytes); every function here
takes a :class:`firmware.image.Partition` and the image path. FAT keeps no
owners or modes: the first-boot script sets those when it moves files to the
root file system.
"""

from __future__ import annotations

import os
import re
import tempfile

from firmware.tools import FirmwareError, run

__all__ = ["free_bytes", "cluster_bytes", "exists", "mkdir", "put", "put_many", "get", "listdir",
           "remove"]


def free_bytes(image, part):
    """Free space on the partition, in bytes (mdir's "N bytes free")."""
    out = run(["mdir", "-i", part.spec(image), "::"], f"{image}: cannot read the boot partition")
    m = re.search(r"([\d ,.]+) bytes free", out)
    if not m:
        raise FirmwareError(f"{image}: mdir reported no free space on the boot partition")
    return int(re.sub(r"\D", "", m.group(1)))


def cluster_bytes(image, part):
    """Size of one cluster (the unit FAT allocates files in), in bytes."""
    out = run(["minfo", "-i", part.spec(image), "::"], f"{image}: cannot read the boot sector")
    sector = re.search(r"sector size: (\d+) bytes", out)
    cluster = re.search(r"cluster size: (\d+) sectors", out)
    if not (sector and cluster):
        raise FirmwareError(f"{image}: minfo reported no cluster size for the boot partition")
    return int(sector.group(1)) * int(cluster.group(1))


def listdir(image, part, path="/"):
    """Names in the folder ``path`` of the partition (long names), or ``None`` when it is missing."""
    try:
        out = run(["mdir", "-b", "-i", part.spec(image), "::" + path], "mdir")
    except FirmwareError:
        return None
    names = []
    for line in out.splitlines():
        line = line.strip()
        if line:
            # mdir -b prints "::/dir/name" (a trailing "/" for folders).
            names.append(line.rstrip("/").rsplit("/", 1)[-1])
    return names


def exists(image, part, path):
    """Whether the file or folder ``path`` exists on the partition."""
    head, name = os.path.split(path.rstrip("/"))
    names = listdir(image, part, head or "/")
    return names is not None and name.lower() in (n.lower() for n in names)


def mkdir(image, part, path):
    """Create the folder ``path`` (and its parents) when missing."""
    parts = [p for p in path.strip("/").split("/") if p]
    for i in range(1, len(parts) + 1):
        sub = "/" + "/".join(parts[:i])
        if not exists(image, part, sub):
            run(["mmd", "-i", part.spec(image), "::" + sub], f"{image}: cannot create {sub} on the boot partition")


def put_many(image, part, sources, folder):
    """Copy local files ``sources`` into the partition's folder ``folder``, replacing same-named files."""
    if not sources:
        return
    run(["mcopy", "-i", part.spec(image), "-o", "-Q", *[os.fspath(s) for s in sources],
         "::" + folder.rstrip("/") + "/"], f"{image}: cannot copy files to {folder} on the boot partition")


def put(image, part, data_or_path, dest):
    """Write ``dest`` on the partition from bytes/str or a local file path, replacing it."""
    if isinstance(data_or_path, (bytes, str)) and not (isinstance(data_or_path, str)
                                                      and os.path.isfile(data_or_path)):
        data = data_or_path.encode("utf-8") if isinstance(data_or_path, str) else data_or_path
        with tempfile.TemporaryDirectory(prefix="offload-fw-") as tmp:
            src = os.path.join(tmp, "data")
            with open(src, "wb") as f:
                f.write(data)
            run(["mcopy", "-i", part.spec(image), "-o", "-Q", src, "::" + dest],
                f"{image}: cannot write {dest} on the boot partition")
        return
    run(["mcopy", "-i", part.spec(image), "-o", "-Q", os.fspath(data_or_path), "::" + dest],
        f"{image}: cannot write {dest} on the boot partition")


def get(image, part, path):
    """The bytes of the file ``path`` on the partition."""
    return run(["mcopy", "-i", part.spec(image), "-n", "::" + path, "-"],
               f"{image}: cannot read {path} from the boot partition", binary=True)


def remove(image, part, path):
    """Delete the file ``path`` from the partition."""
    run(["mdel", "-i", part.spec(image), "::" + path], f"{image}: cannot delete {path}")
