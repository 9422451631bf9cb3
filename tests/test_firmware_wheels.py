"""The Raspberry Pi's wheel folder: the platform tags pip is given, resolution by pip itself, the checks.

Offline, pip resolves the device's dependency set from a folder of tiny but
valid wheels that carry the file names real wheels carry (numpy's
``manylinux_2_27_aarch64.manylinux_2_28_aarch64``, LiteRT's bare
``manylinux_2_27_aarch64``, OpenCV's ``manylinux2014``/``manylinux_2_17``
abi3), plus decoys that must not be chosen (a newer glibc, musl, x86-64).
Online, the same tags resolve against the real PyPI (skipped, saying why,
when it cannot be reached). pip runs ``--isolated`` here: this machine's pip
configuration adds local mirrors that would otherwise join the search.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import urllib.request
import zipfile

import pytest

from firmware import crosswheel, wheels
from firmware.tools import FirmwareError

#: name-version -> (Requires-Dist lines, the wheel tags of each file), after real releases.
FAKES = {
    "numpy-2.3.3": ([], [f"cp{v}-cp{v}-manylinux_2_27_aarch64.manylinux_2_28_aarch64"
                         for v in (311, 312, 313)]),
    "opencv_python_headless-4.12.0.88": (["numpy>=2"], ["cp37-abi3-manylinux2014_aarch64.manylinux_2_17_aarch64"]),
    "ai_edge_litert-2.3.0": (["numpy>=1.23.2", "flatbuffers", "tqdm"],
                             [f"cp{v}-cp{v}-manylinux_2_27_aarch64" for v in (311, 312, 313)]),
    "flatbuffers-25.2.10": ([], ["py2.py3-none-any"]),
    "click-8.2.1": ([], ["py3-none-any"]),
    "tqdm-4.67.1": ([], ["py3-none-any"]),
    "pip-25.2": ([], ["py3-none-any"]),
    # Decoys, each newer than the right one: pip must not pick them for a trixie Pi.
    "numpy-2.4.0": ([], ["cp313-cp313-manylinux_2_42_aarch64", "cp313-cp313-musllinux_1_2_aarch64",
                         "cp313-cp313-manylinux_2_28_x86_64"]),
}


def fake_wheel(folder, stem, tag, requires=()):
    """A minimal valid wheel (METADATA, WHEEL, RECORD) named ``stem-tag.whl``; returns its name."""
    name, version = stem.split("-")
    dist = f"{name}-{version}.dist-info"
    meta = (f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n"
            + "".join(f"Requires-Dist: {r}\n" for r in requires))
    tags = "".join(f"Tag: {t}\n" for t in _expand(tag))
    wheel = f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\n{tags}"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(f"{dist}/METADATA", meta)
        z.writestr(f"{dist}/WHEEL", wheel)
        z.writestr(f"{dist}/RECORD", f"{dist}/METADATA,,\n{dist}/WHEEL,,\n{dist}/RECORD,,\n")
    filename = f"{stem}-{tag}.whl"
    (folder / filename).write_bytes(buf.getvalue())
    return filename


def _expand(tag):
    py, abi, plat = tag.split("-")
    return [f"{a}-{b}-{c}" for a in py.split(".") for b in abi.split(".") for c in plat.split(".")]


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    folder = tmp_path_factory.mktemp("index")
    for stem, (requires, tags) in FAKES.items():
        for tag in tags:
            fake_wheel(folder, stem, tag, requires)
    return folder


DEVICE = ["numpy>=1.22", "click>=8.0", "tqdm>=4.60", "opencv-python-headless>=4.5", "ai-edge-litert>=1.0", "pip"]


def test_platform_tags_cover_every_glibc_from_2_17_to_the_target():
    tags = wheels.platforms()
    assert wheels.TARGET_GLIBC == (2, 41)
    assert tags == [f"manylinux_2_{m}_aarch64" for m in range(41, 16, -1)] + \
        ["manylinux2014_aarch64", "linux_aarch64"]
    assert wheels.platforms((2, 17))[0] == "manylinux_2_17_aarch64"
    assert "manylinux_2_27_aarch64" in tags             # LiteRT's and numpy's (the issue's failure)
    for bad in ((2, 16), (3, 0)):
        with pytest.raises(FirmwareError, match="glibc"):
            wheels.platforms(bad)
    assert wheels.parse_glibc("2.36") == (2, 36)
    with pytest.raises(FirmwareError, match="MAJOR.MINOR"):
        wheels.parse_glibc("trixie")


def test_the_tags_real_wheels_carry_are_accepted_and_decoys_are_not():
    for stem, (_, tags) in FAKES.items():
        for tag in tags:
            py = tag.split("-")[0]
            python = f"3.{py[3:]}" if py.startswith("cp3") and "abi3" not in tag else "3.13"
            want = not stem.startswith("numpy-2.4")
            assert wheels.compatible(f"{stem}-{tag}.whl", python) is want, (stem, tag)
    assert not wheels.compatible("x-1-cp313-cp313-manylinux_2_39_aarch64.whl", "3.13", glibc=(2, 36))
    assert not wheels.compatible("numpy-2.3.3-cp313-cp313-manylinux_2_28_aarch64.whl", "3.12")


@pytest.mark.parametrize("python", wheels.PYTHONS)
def test_pip_resolves_the_device_set_offline_for_each_python(index, tmp_path, python):
    dest = tmp_path / "wheels"
    wheels.download(str(dest), python, requirements=DEVICE, echo=lambda s: None,
                    pip_args=["--isolated", "--no-index", "--find-links", str(index), "--quiet"])
    got = sorted(os.listdir(dest))
    cp = "cp" + python.replace(".", "")
    assert got == sorted([
        f"ai_edge_litert-2.3.0-{cp}-{cp}-manylinux_2_27_aarch64.whl",
        "click-8.2.1-py3-none-any.whl",
        "flatbuffers-25.2.10-py2.py3-none-any.whl",
        f"numpy-2.3.3-{cp}-{cp}-manylinux_2_27_aarch64.manylinux_2_28_aarch64.whl",
        "opencv_python_headless-4.12.0.88-cp37-abi3-manylinux2014_aarch64.manylinux_2_17_aarch64.whl",
        "pip-25.2-py3-none-any.whl",
        "tqdm-4.67.1-py3-none-any.whl",
    ])


def test_the_old_hand_written_tag_list_fails_as_the_issue_reported(index, tmp_path):
    # What fetch-wheels passed before: pip does not widen --platform to 2_27.
    cmd = [sys.executable, "-m", "pip", "--isolated", "download", "--dest", str(tmp_path), "--no-index",
           "--find-links", str(index), "--only-binary=:all:", "--python-version", "3.13",
           "--implementation", "cp"]
    for p in ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64", "linux_aarch64"):
        cmd += ["--platform", p]
    res = subprocess.run(cmd + ["ai-edge-litert>=1.0"], capture_output=True, text=True)
    assert res.returncode != 0
    assert "No matching distribution found for ai-edge-litert" in res.stderr


def _pypi_reachable():
    try:
        with urllib.request.urlopen("https://pypi.org/simple/ai-edge-litert/", timeout=10) as r:
            return r.status == 200, ""
    except OSError as e:
        return False, str(e)


@pytest.mark.parametrize("python", wheels.PYTHONS)
def test_the_real_index_resolves_the_device_set(tmp_path, python):
    ok, why = _pypi_reachable()
    if not ok:
        pytest.skip(f"PyPI unreachable from here ({why}): the real index was not tried")
    # pip's resolver with the same tags as fetch-wheels, reading PyPI's metadata
    # files (PEP 658) rather than downloading some 100 MB of wheels.
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "--isolated", "install", "--dry-run", "--ignore-installed",
           "--quiet", "--target", str(tmp_path / "t"), "--report", str(report),
           *wheels.pip_target_args(python), *DEVICE]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    names = {item["metadata"]["name"].lower().replace("_", "-"): item["download_info"]["url"]
             for item in json.loads(report.read_text())["install"]}
    for name in wheels.REQUIRED:
        assert name in names, name
        assert wheels.compatible(names[name].rsplit("/", 1)[-1], python), names[name]


# ---------------------------------------------------------------- the folder check


def _folder(folder, extra):
    """A card's wheel folder: the right dependency wheels plus ``extra`` (stem, tag) ones."""
    folder.mkdir(parents=True)
    for stem, (requires, tags) in FAKES.items():
        if not stem.startswith("numpy-2.4"):
            for tag in tags:
                fake_wheel(folder, stem, tag, requires)
    for stem, tag in extra:
        fake_wheel(folder, stem, tag)
    return folder


def test_check_wants_our_wheel_for_the_images_python(tmp_path):
    ok = _folder(tmp_path / "ok", [("offload-0.1.0", "cp313-cp313-manylinux_2_17_aarch64")])
    assert any(p.endswith("offload-0.1.0-cp313-cp313-manylinux_2_17_aarch64.whl")
               for p in wheels.check(str(ok), "3.13"))
    cases = [
        ([], "no offload wheel for CPython 3.13 aarch64; first boot installs wheels only"),
        ([("offload-0.1.0", "cp311-cp311-manylinux_2_17_aarch64")],
         "offload-0.1.0-cp311-cp311-manylinux_2_17_aarch64.whl is for CPython 3.11, and the image "
         "has CPython 3.13"),
        ([("offload-0.1.0", "cp313-cp313-manylinux_2_17_aarch64"),
          ("offload-0.1.0", "cp312-cp312-linux_aarch64")], "is for CPython 3.12"),
        ([("offload-0.1.0", "cp313-cp313-linux_x86_64")], "is not for aarch64 Linux with glibc 2.41"),
    ]
    for i, (extra, message) in enumerate(cases):
        with pytest.raises(FirmwareError, match="--wheels ") as e:
            wheels.check(str(_folder(tmp_path / str(i), extra)), "3.13")
        assert message in str(e.value)
    sdist = _folder(tmp_path / "sdist", [("offload-0.1.0", "cp313-cp313-manylinux_2_17_aarch64")])
    (sdist / "offload-0.1.0.tar.gz").write_bytes(b"x")
    with pytest.raises(FirmwareError, match="is a source distribution; first boot installs wheels only"):
        wheels.check(str(sdist), "3.13")


# ---------------------------------------------------------------- retagging and ELF checks


def test_retag_rewrites_the_tag_and_a_valid_record(tmp_path):
    import base64
    import hashlib

    src = tmp_path / "in"
    src.mkdir()
    name = fake_wheel(src, "offload-0.1.0", "cp311-cp311-linux_x86_64")
    out = crosswheel.retag(str(src / name), str(tmp_path), "cp313-cp313-manylinux_2_17_aarch64")
    assert os.path.basename(out) == "offload-0.1.0-cp313-cp313-manylinux_2_17_aarch64.whl"
    with zipfile.ZipFile(out) as z:
        wheel = z.read("offload-0.1.0.dist-info/WHEEL").decode()
        assert "Tag: cp313-cp313-manylinux_2_17_aarch64\n" in wheel and "x86_64" not in wheel
        for row in z.read("offload-0.1.0.dist-info/RECORD").decode().splitlines():
            path, digest, size = row.split(",")
            if digest:
                data = z.read(path)
                want = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                assert digest == f"sha256={want}" and int(size) == len(data)


def test_elf_check_refuses_a_host_binary(tmp_path):
    if crosswheel.which("aarch64-linux-gnu-readelf") is None:
        pytest.skip("binutils-aarch64-linux-gnu not installed")
    with pytest.raises(FirmwareError, match="not a 64-bit ARM"):
        crosswheel.elf_info(sys.executable)
