"""The Open Inference Protocol (KServe v2) bodies (offload.oip): round trips and strict, bounded reading."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offload import oip
from offload.oip import OIPError

BIG = 1 << 20


def _decode(body, headers, kind="request", max_elements=10_000):
    return oip.decode_infer(body, headers.get(oip.HEADER_LENGTH), max_elements=max_elements,
                            max_bytes=BIG, kind=kind)


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64", "uint8", "int8", "int16", "uint16",
                                   "int32", "int64", "bool"])
def test_request_round_trip_is_exact(binary, dtype):
    rng = np.random.default_rng(1)
    a = (rng.random((2, 3, 4)) * 100 - (0 if dtype.startswith("u") else 50)).astype(dtype)
    body, headers = oip.encode_infer([("x", a)], binary=binary, request_id="9",
                                     binary_output=binary)
    assert (oip.HEADER_LENGTH in headers) == binary
    req = _decode(body, headers)
    (t,) = req.tensors
    assert t.name == "x" and t.datatype == oip.datatype_of(a.dtype) and req.id == "9"
    assert t.data.dtype == a.dtype and np.array_equal(t.data, a)
    assert req.binary_output is binary


def test_fp16_round_trips_in_binary():
    a = np.array([[0.5, -1.25, 65504.0]], np.float16)
    body, headers = oip.encode_infer([("h", a)], binary=True)
    assert np.array_equal(_decode(body, headers).tensors[0].data, a)


def test_binary_body_layout_is_header_then_raw_bytes():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([1, 2], np.uint8)
    body, headers = oip.encode_infer([("a", a), ("b", b)], binary=True)
    n = int(headers[oip.HEADER_LENGTH])
    head = json.loads(body[:n])
    assert [i["parameters"]["binary_data_size"] for i in head["inputs"]] == [24, 2]
    assert body[n:] == a.astype("<f4").tobytes() + b.tobytes()


def test_answer_round_trip_with_model_name_and_parameters():
    y = np.array([[1.5, -2.0, 0.25]], np.float32)
    body, headers = oip.encode_infer([("logits", y)], binary=False, model_name="m",
                                     request_id="3", parameters={"inference_ms": 1.5})
    obj = json.loads(body)
    assert obj["model_name"] == "m" and obj["outputs"][0]["data"] == [1.5, -2.0, 0.25]
    ans = _decode(body, headers, kind="answer")
    assert ans.parameters == {"inference_ms": 1.5} and np.array_equal(ans.tensors[0].data, y)


def test_nested_json_data_is_accepted_row_major():
    body = json.dumps({"inputs": [{"name": "x", "datatype": "INT32", "shape": [2, 2],
                                   "data": [[1, 2], [3, 4]]}]}).encode()
    assert _decode(body, {}).tensors[0].data.tolist() == [[1, 2], [3, 4]]


def _json_request(**tensor):
    t = {"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0]}
    t.update(tensor)
    return json.dumps({"inputs": [t]}).encode()


@pytest.mark.parametrize("tensor, message", [
    ({"datatype": "BYTES"}, "BYTES tensors are not supported"),
    ({"datatype": "FP33"}, "datatype must be one of"),
    ({"shape": [3]}, "data has 2 values, shape [3] needs 3"),
    ({"shape": [-1]}, "shape must be a list"),
    ({"shape": [1] * 9, "data": [1.0]}, "at most 8"),
    ({"data": ["1.0", "2.0"]}, "must be FP32 values"),
    ({"data": [True, False]}, "must be FP32 values"),
    ({"data": [[1.0], [2.0, 3.0]]}, "not a regular"),
    ({"datatype": "UINT8", "data": [1, 256]}, "must be UINT8 values"),
    ({"datatype": "INT8", "data": [1.5, 2]}, "must be INT8 values"),
    ({"data": None}, "data must be a list"),
    ({"data": [1e39, 1.0]}, "beyond FP32's range"),
    ({"name": ""}, "non-empty name"),
])
def test_bad_json_tensors_are_refused_by_name(tensor, message):
    with pytest.raises(OIPError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _decode(_json_request(**tensor), {})


def test_overflowing_number_is_refused():
    with pytest.raises(OIPError, match="finite"):
        _decode(b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1e999]}]}', {})


def test_nan_constant_is_refused():
    with pytest.raises(OIPError, match="NaN"):
        _decode(b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[NaN]}]}', {})


@pytest.mark.parametrize("mangle, message", [
    (lambda body, n: (body[:-1], n), "declared, 23 left"),
    (lambda body, n: (body + b"\0", n), "1 bytes of binary data no tensor claims"),
    (lambda body, n: (body, str(len(body) + 1)), "longer than the body"),
    (lambda body, n: (body, "12x"), "is not a byte count"),
])
def test_bad_binary_bodies_are_refused(mangle, message):
    body, headers = oip.encode_infer([("x", np.zeros(6, np.float32))], binary=True)
    body, n = mangle(body, headers[oip.HEADER_LENGTH])
    with pytest.raises(OIPError, match=message):
        oip.decode_infer(body, n, max_elements=100, max_bytes=BIG)


def test_binary_size_must_match_shape_and_datatype():
    head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2],
                                   "parameters": {"binary_data_size": 4}}]}).encode()
    with pytest.raises(OIPError, match="binary_data_size 4 is not 2 x 4 bytes"):
        oip.decode_infer(head + b"\0" * 4, str(len(head)), max_elements=100, max_bytes=BIG)


def test_binary_nan_is_refused():
    body, headers = oip.encode_infer([("x", np.array([np.nan], np.float32))], binary=True)
    with pytest.raises(OIPError, match="NaN or infinity"):
        _decode(body, headers)


def test_element_and_byte_bounds_hold_before_any_array_is_made():
    body, headers = oip.encode_infer([("x", np.zeros((10, 10), np.float32))], binary=True)
    with pytest.raises(OIPError, match="more elements than the limit"):
        oip.decode_infer(body, headers[oip.HEADER_LENGTH], max_elements=99, max_bytes=BIG)
    # a shape that claims 2**62 elements with no data: refused by count, nothing allocated
    huge = _json_request(shape=[1 << 31, 1 << 31])
    with pytest.raises(OIPError, match="more elements than the limit"):
        _decode(huge, {})
    body, headers = oip.encode_infer([("x", np.zeros(200, np.float32))], binary=False)
    with pytest.raises(OIPError, match="over the limit of 100"):
        oip.decode_infer(body, None, max_elements=1000, max_bytes=100)
    with pytest.raises(OIPError, match="nested deeper"):
        _decode(b'{"inputs":' + b"[" * 40 + b"]" * 40 + b"}", {})


@pytest.mark.parametrize("body, message", [
    (b"not json", "not JSON"),
    (b"[]", "no non-empty 'inputs'"),
    (b'{"inputs": []}', "no non-empty 'inputs'"),
    (b'{"inputs": [1]}', "objects with a non-empty name"),
    (b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1]}],"parameters":{"binary_data_output":1}}',
     "binary_data_output must be true or false"),
    (b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1]}],"outputs":[{"nom":"y"}]}',
     "outputs must be objects with a name"),
])
def test_malformed_requests_get_one_clear_error(body, message):
    with pytest.raises(OIPError, match=message):
        _decode(body, {})


def test_requested_outputs_and_their_binary_wish_are_read():
    body = (b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1]}],'
            b'"outputs":[{"name":"y","parameters":{"binary_data":true}},{"name":"z"}]}')
    assert _decode(body, {}).outputs == [("y", True), ("z", None)]


def test_metadata_round_trip_and_fit_check():
    spec = oip.TensorSpec("image", "FP32", (-1, 1, 28, 28))
    meta = oip.ModelMetadata("strong", (spec,), (oip.TensorSpec("logits", "FP32", (-1, 10)),))
    back = oip.parse_metadata(oip.encode_metadata(meta), model="strong")
    assert back == meta
    oip.check_fits(back.inputs[0], (1, 1, 28, 28), "FP32", model="strong")
    with pytest.raises(OIPError, match=r"takes input image FP32 \[-1, 1, 28, 28\], but the device "
                                       r"would send FP32 \[1, 3, 28, 28\]"):
        oip.check_fits(spec, (1, 3, 28, 28), "FP32", model="strong")
    with pytest.raises(OIPError, match="would send UINT8"):
        oip.check_fits(spec, (1, 1, 28, 28), "UINT8", model="strong")


@pytest.mark.parametrize("body, message", [
    (b'{"name":"m","inputs":[],"outputs":[]}', "inputs must be a list of 1..16"),
    (b'{"name":"m","inputs":[{"name":"x","datatype":"FP32","shape":[-2]}],'
     b'"outputs":[{"name":"y","datatype":"FP32","shape":[1]}]}', "shape must be a list of integers >= -1"),
    (b"<html>", "not JSON"),
])
def test_bad_metadata_is_refused_naming_the_model(body, message):
    with pytest.raises(OIPError, match=f"model 'm'.*{message}"):
        oip.parse_metadata(body, model="m")


def test_kserve_style_nulls_in_metadata_are_accepted():
    body = (b'{"name":"strong","versions":null,"platform":"","inputs":[{"name":"image",'
            b'"datatype":"FP32","shape":[-1,1,28,28]}],"outputs":[{"name":"logits",'
            b'"datatype":"FP32","shape":[-1,10]}]}')
    assert oip.parse_metadata(body, model="strong").versions == ()


@pytest.mark.parametrize("name", ["strong", "mobilenet_v2.1", "a:b-c", "_x"])
def test_model_names(name):
    assert oip.infer_path(name) == f"/v2/models/{name}/infer"


@pytest.mark.parametrize("name", ["", "../x", "a/b", "a b", "-x", "x" * 129, "é"])
def test_bad_model_names_are_refused(name):
    with pytest.raises(OIPError, match="model name"):
        oip.check_model_name(name)


def test_distribution_rule_keeps_probabilities_and_softmaxes_logits():
    p = np.array([0.2, 0.5, 0.3])
    assert np.array_equal(oip.to_distribution(p), p)
    logits = np.array([1.0, 2.0, 0.5])
    e = np.exp(logits - logits.max())
    assert np.allclose(oip.to_distribution(logits), e / e.sum())
    # values in [0, 1] that do not sum to 1 are logits too
    assert np.allclose(oip.to_distribution([0.1, 0.2]), np.exp([0.1, 0.2]) / np.exp([0.1, 0.2]).sum())
    with pytest.raises(OIPError, match="NaN or infinity"):
        oip.to_distribution([np.inf, 0.0])


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300), st.one_of(st.none(), st.integers(0, 400).map(str)))
def test_any_bytes_are_refused_cleanly_or_read(body, header):
    try:
        oip.decode_infer(body, header, max_elements=1000, max_bytes=BIG)
    except OIPError:
        pass
