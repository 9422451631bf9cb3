"""Policy blob: round trips and one clear error for every kind of damage."""

import struct
import zlib

import numpy as np
import pytest

from offload import blob, mlp
from offload.blob import BlobError, Policy, from_bytes, read_blob, to_bytes, write_blob

from helpers import dqn_inputs


def _lut():
    x = np.linspace(0.0, 2.3, 1000, dtype=np.float32)
    return x, (0.4 - 0.2 * x).astype(np.float32)


@pytest.fixture
def dqn_policy(paper_net):
    (N, P, M), _, q = paper_net
    lx, ly = _lut()
    return Policy("dqn", N, P, M, metric_mean=0.05, metric_std=0.2, lut_x=lx, lut_y=ly,
                  tinv=1.3, T=97, interarrival=True, qmlp=q, meta={"rate": 0.1, "depth": 4})


@pytest.fixture
def threshold_policy():
    lx, ly = _lut()
    return Policy("thresholds", 1, 4, 8, 0.0, 1.0, lx, ly,
                  theta=np.linspace(1.0, -1.0, 5).astype(np.float32))


def _recrc(body):
    return body + struct.pack("<I", zlib.crc32(body))


def test_dqn_round_trip(dqn_policy, tmp_path, rng):
    path = tmp_path / "p.bin"
    write_blob(path, dqn_policy)
    got = read_blob(path)
    assert (got.kind, got.N, got.P, got.M, got.T, got.interarrival) == ("dqn", 1, 10, 40, 97, True)
    assert got.meta == {"rate": 0.1, "depth": 4}
    assert got.tinv == pytest.approx(1.3) and got.metric_std == pytest.approx(0.2)
    np.testing.assert_array_equal(got.lut_x, dqn_policy.lut_x)
    x = dqn_inputs(rng, 50)
    np.testing.assert_array_equal(got.qmlp.native().forward(x), dqn_policy.qmlp.native().forward(x))
    np.testing.assert_array_equal(mlp.forward_float(got.qmlp.float_layers, x),
                                  mlp.forward_float(dqn_policy.qmlp.float_layers, x))
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_threshold_round_trip(threshold_policy):
    got = from_bytes(to_bytes(threshold_policy))
    assert got.kind == "thresholds" and got.qmlp is None
    np.testing.assert_array_equal(got.theta, threshold_policy.theta)
    assert got.metric_from_entropy(np.array([0.0]))[0] == pytest.approx(0.4)


def test_truncated_at_every_length(threshold_policy, tmp_path):
    data = to_bytes(threshold_policy)
    for cut in [0, 4, 8, 20, len(data) // 2, len(data) - 1]:
        p = tmp_path / "t.bin"
        p.write_bytes(data[:cut])
        with pytest.raises(BlobError, match=r"t\.bin: .*(truncated|magic|CRC)"):
            read_blob(p)


def test_truncated_body_with_valid_crc(threshold_policy):
    body = to_bytes(threshold_policy)[:-4]
    with pytest.raises(BlobError, match="truncated while reading thresholds"):
        from_bytes(_recrc(body[:-8]), "x.bin")


def test_wrong_magic(threshold_policy):
    data = bytearray(to_bytes(threshold_policy))
    data[0:8] = b"GIF89a\0\0"
    with pytest.raises(BlobError, match="x.bin: not a policy blob"):
        from_bytes(data, "x.bin")


def test_unknown_version(threshold_policy):
    body = bytearray(to_bytes(threshold_policy)[:-4])
    struct.pack_into("<H", body, 8, 7)
    with pytest.raises(BlobError, match="unknown format version 7"):
        from_bytes(_recrc(bytes(body)), "x.bin")


def test_crc_mismatch(dqn_policy):
    data = bytearray(to_bytes(dqn_policy))
    data[len(data) // 2] ^= 0x01
    with pytest.raises(BlobError, match="CRC mismatch"):
        from_bytes(data, "x.bin")


def test_inconsistent_dimensions(dqn_policy):
    # Change M in the header (and fix the CRC): the network no longer fits the bucket.
    body = bytearray(to_bytes(dqn_policy)[:-4])
    struct.pack_into("<I", body, 20, 41)
    with pytest.raises(BlobError, match="Q-values"):
        from_bytes(_recrc(bytes(body)), "x.bin")
    # Clear the inter-arrival flag: the input size no longer matches.
    body = bytearray(to_bytes(dqn_policy)[:-4])
    struct.pack_into("<I", body, 28, 0)
    with pytest.raises(BlobError, match="inputs"):
        from_bytes(_recrc(bytes(body)), "x.bin")
    # Impossible bucket in the header.
    body = bytearray(to_bytes(dqn_policy)[:-4])
    struct.pack_into("<I", body, 12, 10)
    with pytest.raises(BlobError, match="inconsistent header"):
        from_bytes(_recrc(bytes(body)), "x.bin")


def test_trailing_bytes(threshold_policy):
    body = to_bytes(threshold_policy)[:-4] + b"\0\0\0\0"
    with pytest.raises(BlobError, match="unexpected bytes"):
        from_bytes(_recrc(body), "x.bin")


def test_missing_file(tmp_path):
    with pytest.raises(BlobError, match="cannot read"):
        read_blob(tmp_path / "nope.bin")


def test_invalid_policy_is_not_written(threshold_policy, tmp_path):
    path = tmp_path / "p.bin"
    write_blob(path, threshold_policy)
    before = path.read_bytes()
    threshold_policy.theta = threshold_policy.theta[:3]
    with pytest.raises(BlobError, match="M-P\\+1"):
        write_blob(path, threshold_policy)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.bin"]


def test_header_layout_is_documented_offsets(threshold_policy):
    """docs/blob.md gives byte offsets; keep them true."""
    data = to_bytes(threshold_policy)
    assert data[:8] == blob.MAGIC
    assert struct.unpack_from("<HHIIIII", data, 8) == (2, 1, 1, 4, 8, 97, 0)
    threshold_policy.tinv = 0.75
    data = to_bytes(threshold_policy)
    assert struct.unpack_from("<ddd", data, 32) == (0.0, 1.0, 0.75)  # mean, std, tinv


# docs/blob.md's header, magic .. tinv, restated here: the test reads the format, not blob.py
HEAD = "<8sHHIIIIIddd"


def _as_version_1(data, policy):
    """The same blob in format version 1: no separate float bias after each layer."""
    body = bytearray(data[:-4])
    struct.pack_into("<H", body, 8, 1)
    lx = np.asarray(policy.lut_x)
    head = struct.calcsize(HEAD)
    meta_len = struct.unpack_from("<I", body, head)[0]
    pos = head + 4 + meta_len + 4 + 2 * 4 * len(lx) + 4
    out = bytearray(body[:pos])
    for lay in policy.qmlp.layers:
        dout, din = lay.w_int8.shape
        nseg = len(lay.in_scale)
        size = 16 + 4 * (nseg + 1) + 8 * nseg + 8 * dout + dout * din + 4 * dout * din
        out += body[pos:pos + size]
        pos += size + 4 * dout          # skip the float bias
    assert pos == len(body)
    return _recrc(bytes(out))


def test_float_bias_kept_apart_from_the_int8_bias(dqn_policy, rng):
    # Bias correction changes the int8 layers' bias, never the float reference's.
    q = dqn_policy.qmlp
    q.layers[0].bias = q.layers[0].bias + 0.5
    back = from_bytes(to_bytes(dqn_policy))
    np.testing.assert_array_equal(back.qmlp.layers[0].bias, q.layers[0].bias)
    np.testing.assert_array_equal(back.qmlp.float_layers[0][1], q.float_layers[0][1])
    assert not np.array_equal(back.qmlp.float_layers[0][1], back.qmlp.layers[0].bias)


def test_version_1_blobs_still_read(dqn_policy):
    v1 = _as_version_1(to_bytes(dqn_policy), dqn_policy)
    back = from_bytes(v1)
    for lay, (w, b) in zip(back.qmlp.layers, back.qmlp.float_layers):
        np.testing.assert_array_equal(b, lay.bias)   # version 1: one shared bias
    x = dqn_inputs(np.random.default_rng(0), 50)
    np.testing.assert_array_equal(back.qmlp.native().forward(x), dqn_policy.qmlp.native().forward(x))


def test_16_bit_activations_round_trip_as_version_3(paper_net, dqn_policy):
    (N, P, M), layers, _ = paper_net
    rng = np.random.default_rng(5)
    q16 = mlp.quantize(layers, dqn_inputs(rng, 2000), segments=(0, 96), act_bits=16)
    dqn_policy.qmlp = q16
    data = to_bytes(dqn_policy)
    version, flags = struct.unpack_from("<H", data, 8)[0], struct.unpack_from("<I", data, 28)[0]
    assert version == 3 and flags == blob.FLAG_INTERARRIVAL | blob.FLAG_ACT16
    back = from_bytes(data)
    assert back.qmlp.act_bits == 16
    x = dqn_inputs(rng, 50)
    np.testing.assert_array_equal(back.qmlp.native().forward(x), q16.native().forward(x))
    # The same flag in a version 2 header is refused, not misread with 8-bit codes.
    body = bytearray(data[:-4])
    struct.pack_into("<H", body, 8, 2)
    with pytest.raises(BlobError, match="unknown flags 0x3 for format version 2"):
        from_bytes(_recrc(bytes(body)), "x.bin")


def test_8_bit_activations_are_still_written_as_version_2(dqn_policy):
    assert dqn_policy.qmlp.act_bits == 8
    assert struct.unpack_from("<H", to_bytes(dqn_policy), 8)[0] == 2
    assert from_bytes(to_bytes(dqn_policy)).qmlp.act_bits == 8
