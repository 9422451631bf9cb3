"""The strong model as ONNX: the committed file is the TorchScript model, and the export works.

Needs torch (training extra); skipped without it. The server tests check the
ONNX file without torch.
"""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from offload import artifacts  # noqa: E402
from training.data import FASHION_MNIST_DIR, DataError, load_images  # noqa: E402
from training.export import (  # noqa: E402
    ExportError, export_strong_onnx, read_onnx_meta, strong_from_torchscript,
)
from training.models import build_strong  # noqa: E402
from training.train import images_to_tensor  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _committed():
    onnx_path, ts_path = artifacts.find("strong.onnx"), artifacts.find("strong.torchscript.pt")
    if onnx_path is None or ts_path is None:
        pytest.skip("committed strong models not found")
    return onnx_path, ts_path


def _fashion_test_images(n):
    try:
        data = load_images(FASHION_MNIST_DIR, size=(28, 28), progress=False)
    except DataError:
        pytest.skip("Fashion-MNIST is not installed (apt install dataset-fashion-mnist)")
    test = np.flatnonzero(data.is_test)[:n]
    return data.images[test], data.labels[test]


def test_committed_onnx_matches_torch_on_real_images():
    onnx_path, ts_path = _committed()
    images, labels = _fashion_test_images(1000)
    net, meta = strong_from_torchscript(ts_path)
    x = images_to_tensor(images, 28)
    with torch.no_grad():
        zt = net(x).numpy()
        # The rebuilt module is the TorchScript module, weight for weight.
        from training.export import load_strong

        ts, _ = load_strong(ts_path)
        np.testing.assert_allclose(ts(x).numpy(), zt, atol=1e-5)
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    zo = sess.run(None, {"image": x.numpy()})[0]
    assert zo.shape == (1000, 10)
    np.testing.assert_allclose(zo, zt, atol=1e-4)
    assert np.array_equal(zo.argmax(1), zt.argmax(1))
    # Sanity: the strong model is ~90% right on the test set, not a random network.
    assert np.mean(zo.argmax(1) == labels) > 0.85


def test_committed_onnx_metadata_and_manifest():
    onnx_path, _ = _committed()
    meta = read_onnx_meta(onnx_path)
    assert meta["input_shape"] == [1, 28, 28] and meta["input_layout"] == "NCHW"
    assert len(meta["class_names"]) == 10 and "prepare_image" in meta["preprocessing"]
    man_path = artifacts.find("classifiers.json")
    with open(man_path) as f:
        man = json.load(f)
    # The recorded ONNX accuracy is the torch model's, on all 10,000 test images.
    assert man["strong"]["onnx"]["accuracy"] == man["strong"]["accuracy"]
    assert man["strong"]["onnx"]["images"] == 10000


def test_export_dynamic_batch_and_metadata(tmp_path):
    torch.manual_seed(0)
    net = build_strong(28, 10, 4).eval()
    out = tmp_path / "s.onnx"
    names = [f"c{i}" for i in range(10)]
    res = export_strong_onnx(net, out, class_names=names, size=28)
    assert res["check"]["top1_agreement"] == 1.0
    sess = ort.InferenceSession(os.fspath(out), providers=["CPUExecutionProvider"])
    for n in (1, 7, 33):  # the batch axis is dynamic
        x = torch.rand(n, 1, 28, 28)
        zo = sess.run(None, {"image": x.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(zo, net(x).numpy(), atol=1e-4)
    assert read_onnx_meta(out)["class_names"] == names
    # No temporary files left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.onnx"]


def test_strong_from_torchscript_refuses_other_files(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(ExportError, match="not a TorchScript model"):
        strong_from_torchscript(bad)
    with pytest.raises(ExportError, match="not found"):
        strong_from_torchscript(tmp_path / "missing.pt")


def test_offload_train_onnx_command(tmp_path):
    from click.testing import CliRunner

    from training import cli

    _committed()
    _fashion_test_images(1)  # skips without the data set
    models_dir = os.path.dirname(artifacts.find("classifiers.json"))
    with open(os.path.join(models_dir, "classifiers.json")) as f:
        before = f.read()
    out = tmp_path / "s.onnx"
    r = CliRunner().invoke(cli.main, ["onnx", "--models-dir", models_dir, "--out", str(out),
                                      "--max-eval", "300", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "strong accuracy (ONNX Runtime)" in r.output and out.exists()
    with open(os.path.join(models_dir, "classifiers.json")) as f:
        assert f.read() == before  # a partial check never touches the manifest
    r = CliRunner().invoke(cli.main, ["onnx", "--models-dir", str(tmp_path / "none")])
    assert r.exit_code != 0 and "classifiers.json not found" in r.output
