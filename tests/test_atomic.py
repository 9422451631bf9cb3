"""Atomic writes: the old file survives a failure, the new one gets normal permissions."""

import os
import stat

import pytest

from offload.atomic import atomic_path, atomic_write_json, atomic_write_text


def test_replaces_and_cleans_up(tmp_path):
    p = tmp_path / "out.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert [f.name for f in tmp_path.iterdir()] == ["out.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask


def test_failure_keeps_old_file(tmp_path):
    p = tmp_path / "out.json"
    atomic_write_json(p, {"a": 1})
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(p) as tmp:
            with open(tmp, "w") as f:
                f.write("{half")
            raise KeyboardInterrupt  # Ctrl+C in the middle of writing
    assert p.read_text().strip() == '{\n  "a": 1\n}'
    assert [f.name for f in tmp_path.iterdir()] == ["out.json"]


def test_keeps_extension_for_writers_that_look(tmp_path):
    with atomic_path(tmp_path / "x.npz") as tmp:
        assert tmp.endswith(".npz")
        open(tmp, "wb").close()
    assert (tmp_path / "x.npz").exists()
