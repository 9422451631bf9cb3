"""The installed package: parallel imports, and the committed artifacts it can find.

tools/setup.sh makes a regular (non-editable) install by default, so several
processes (sweeps, Ray or server workers) can import the package at once. An
editable install rebuilds on import and concurrent imports race on
build/cp*/.ninja_deps, each then rebuilding for 40-70 s: the parallel-import
test is skipped there (CI's install is regular, so it runs there).
"""

import importlib.util
import os
import subprocess
import sys
import sysconfig

import pytest

import offload
import offload_native
from offload import artifacts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPORTERS = 5
# Per process, far above a plain import (well under a second) and far below
# a rebuild of the native core (40-70 s on 2 cores).
IMPORT_TIMEOUT_S = 30


def _editable():
    """Why this is an editable install (or a source tree on sys.path), or None."""
    if importlib.util.find_spec("_offload_editable_loader") is not None:
        return "meson-python editable install (_offload_editable_loader)"
    site = os.path.realpath(sysconfig.get_paths()["platlib"])
    here = os.path.realpath(offload_native.__file__)
    if not here.startswith(site + os.sep):
        return f"offload_native imported from {here}, not from {site}"
    return None


def test_tests_use_the_installed_package():
    # pytest (the script, not ``python -m pytest``) keeps the repository root
    # off sys.path, so the tests exercise what was installed.
    if _editable():
        pytest.skip(f"not a regular install: {_editable()}")
    site = os.path.realpath(sysconfig.get_paths()["platlib"])
    for mod in (offload, offload_native):
        assert os.path.realpath(mod.__file__).startswith(site + os.sep), mod.__file__


def test_parallel_imports_of_the_installed_package(tmp_path):
    reason = _editable()
    if reason:
        pytest.skip(f"parallel imports need a regular install; this is a {reason}")
    code = ("import offload, offload_native, offload.simulate, offload.policies; "
            "print(offload_native.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # From an empty folder, so no source tree can shadow the installed package.
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(IMPORTERS)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=IMPORT_TIMEOUT_S)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rc, out, err in results:
        assert rc == 0, err
        assert os.path.realpath(out.strip()) == os.path.realpath(offload_native.__file__)


def test_artifacts_are_found(monkeypatch, tmp_path):
    # The repository's artifacts in a checkout or editable install, the copy
    # installed inside the package otherwise; the same bytes either way.
    path = artifacts.find("profile.npz")
    assert path is not None, artifacts.search_path()
    with open(path, "rb") as a, open(os.path.join(ROOT, "artifacts", "profile.npz"), "rb") as b:
        assert a.read() == b.read()
    assert artifacts.find("weak_int8.tflite") is not None
    assert artifacts.find("no-such-artifact") is None
    # The environment variable comes first.
    (tmp_path / "profile.npz").write_bytes(b"x")
    monkeypatch.setenv(artifacts.ENV, str(tmp_path))
    assert artifacts.find("profile.npz") == str(tmp_path / "profile.npz")
