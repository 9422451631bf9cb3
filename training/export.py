"""Export the classifier pair: the weak model as a full-int8 ``.tflite`` (Edge TPU), the
strong one as ONNX (what the edge server runs, with ONNX Runtime) and TorchScript
(what the profile step loads).

Strong model to ONNX (:func:`export_strong_onnx`): the float module goes through
``torch.onnx.export(..., dynamo=True)`` with a dynamic batch axis, its
metadata (class names, input shape, preprocessing) is stored as the ONNX
``metadata_props`` entry ``offload.json``, and the file is checked against
torch with ONNX Runtime before it replaces the target.
:func:`strong_from_torchscript` rebuilds the ``training.models.StrongNet``
from a TorchScript file's weights, so the committed ONNX model is the
committed TorchScript model, weight for weight.

Weak model, with litert-torch's PT2E quantiser:

1. ``torch.export`` the float model (batch axis dynamic for calibration);
2. ``prepare_pt2e`` with ``PT2EQuantizer`` +
   ``get_symmetric_quantization_config(is_per_channel=True)`` (int8 activations
   per tensor, int8 weights per output channel; BatchNorm is folded into the
   convolutions here);
3. calibrate on training images (never on profiled ones); ``convert_pt2e``;
4. ``litert_torch.to_channel_last_io`` (NHWC input, as TFLite and the Edge TPU
   want) and ``litert_torch.convert(..., quant_config=QuantConfig(pt2e_quantizer=...))``.

The result has int8 input and output tensors and only int8 builtin ops
(checked: a float tensor or a non-Edge-TPU op raises :class:`ExportError`).
"""

from __future__ import annotations

import json
import logging
import os
import warnings

import numpy as np
import torch

from offload.atomic import atomic_path
from offload.card import ONNX_META_KEY

__all__ = [
    "ExportError",
    "export_weak_int8",
    "uint8_input",
    "export_strong_torchscript",
    "export_strong_onnx",
    "strong_from_torchscript",
    "check_onnx_matches",
    "load_strong",
    "tflite_report",
    "EDGETPU_OPS",
    "STRONG_META_NAME",
]

#: TFLite builtin ops the Edge TPU compiler can map (coral.ai "supported operations").
EDGETPU_OPS = frozenset({
    "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D", "EXPAND_DIMS",
    "FULLY_CONNECTED", "L2_NORMALIZATION", "LOGISTIC", "LSTM", "MAXIMUM", "MAX_POOL_2D", "MEAN",
    "MINIMUM", "MUL", "PACK", "PAD", "PRELU", "QUANTIZE", "REDUCE_MAX", "REDUCE_MIN", "RELU",
    "RELU6", "RELU_N1_TO_1", "RESHAPE", "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "RSQRT",
    "SLICE", "SOFTMAX", "SPACE_TO_DEPTH", "SPLIT", "SQUEEZE", "STRIDED_SLICE", "SUB", "SUM",
    "SQUARED_DIFFERENCE", "TANH", "TRANSPOSE_CONV",
})
#: Name of the JSON metadata stored inside the strong TorchScript file.
STRONG_META_NAME = ONNX_META_KEY


class ExportError(RuntimeError):
    """The model could not be exported in the required form."""


def _quiet_converter_logs():
    """torchao warns about optional CUDA kernels it cannot load on a CPU machine; hide that."""
    for name in ("torchao", "torch.utils._pytree", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _fix_input_range(prepared, lo, hi):
    """Give the model input the fixed quantisation range ``[lo, hi]`` instead of a calibrated one.

    With ``[0, 1]`` the int8 input is ``scale = 1/255, zero_point = -128``: a
    uint8 pixel ``p`` becomes exactly ``p - 128``, and no bright pixel is
    clipped (a histogram observer would trim the range to what it saw).
    """
    from torchao.quantization.pt2e.observer import MinMaxObserver

    placeholders = [n for n in prepared.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ExportError(f"expected one model input, found {len(placeholders)}")
    observers = [u for u in placeholders[0].users
                 if u.op == "call_module" and str(u.target).startswith("activation_post_process")]
    if len(observers) != 1:
        raise ExportError("cannot find the observer of the model input")
    obs = MinMaxObserver(dtype=torch.int8, quant_min=-128, quant_max=127,
                         qscheme=torch.per_tensor_affine, eps=2**-12)
    obs(torch.tensor([float(lo), float(hi)]))
    setattr(prepared, observers[0].target, obs)


def export_weak_int8(model, calib_x, out_path, *, calib_batch=64, input_range=(0.0, 1.0),
                     verbose=False):
    """Quantise ``model`` to full int8 and write it as a ``.tflite`` file.

    Parameters
    ----------
    model : torch.nn.Module
        Float weak model, NCHW input ``(n, 1, H, W)`` in [0, 1].
    calib_x : torch.Tensor, shape (n, 1, H, W)
        Calibration images (a few hundred to a few thousand training images).
    out_path : str
        Output ``.tflite`` (written atomically).
    input_range : (float, float) or None
        Fixed real range of the input (default ``[0, 1]``: int8 = pixel - 128);
        None calibrates it like every other activation.

    Returns
    -------
    dict
        :func:`tflite_report` of the written file.
    """
    _quiet_converter_logs()
    import litert_torch
    from litert_torch.quantize import pt2e_quantizer, quant_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if not verbose:
        litert_torch.config.show_progress = False
    model = model.eval()
    shape = tuple(calib_x.shape[1:])
    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True)
    )
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    sample = calib_x[:2].contiguous()
    exported = torch.export.export(model, (sample,), dynamic_shapes=({0: batch},)).module()
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for b in range(0, len(calib_x), calib_batch):
            prepared(calib_x[b:b + calib_batch])
    if input_range is not None:
        _fix_input_range(prepared, *input_range)
    converted = convert_pt2e(prepared, fold_quantize=False)
    try:
        from torchao.quantization.pt2e import move_exported_model_to_eval

        converted = move_exported_model_to_eval(converted)
    except ImportError:  # pragma: no cover - older torchao
        pass
    nhwc = litert_torch.to_channel_last_io(converted, args=[0])
    nhwc.training = False  # the graph inside is already in eval form; don't recurse into it
    one = calib_x[:1].permute(0, 2, 3, 1).contiguous()
    edge = litert_torch.convert(nhwc, (one,), quant_config=quant_config.QuantConfig(pt2e_quantizer=quantizer))
    with atomic_path(out_path) as tmp:
        edge.export(tmp)
        report = tflite_report(tmp)
        _check_int8(report, shape)
    return report


def _check_int8(report, shape):
    for which in ("input", "output"):
        if report[which]["dtype"] != "int8":
            raise ExportError(f"exported model's {which} is {report[which]['dtype']}, not int8")
    bad = sorted(set(report["ops"]) - EDGETPU_OPS)
    if bad:
        raise ExportError(f"exported model uses ops the Edge TPU compiler cannot map: {bad}")
    c, h, w = shape
    if tuple(report["input"]["shape"]) != (1, h, w, c):
        raise ExportError(f"unexpected input shape {report['input']['shape']}")


def uint8_input(path):
    """Give a full-int8 ``.tflite`` a uint8 input tensor, as TF's converter does for zoo models.

    litert-torch writes int8 inputs only. This rewrites the flatbuffer in place
    (atomically): a new uint8 input tensor with the int8 input's scale and
    ``zero_point + 128`` feeds a QUANTIZE op (uint8 -> int8, an exact shift by
    128 with equal scales) in front of the old input, and the subgraph's input
    and its signature point at the new tensor. The model's arithmetic is
    unchanged; a pixel ``p`` fed as ``q = p`` means ``(p - zp) * scale``.

    Returns
    -------
    dict
        :func:`tflite_report` of the rewritten file.
    """
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(os.fspath(path))
    sub = model.subgraphs[0]
    if len(sub.inputs) != 1:
        raise ExportError(f"{path}: expected one input, found {len(sub.inputs)}")
    old = int(sub.inputs[0])
    t = sub.tensors[old]
    if t.type != schema.TensorType.INT8 or t.quantization is None or not t.quantization.scale:
        raise ExportError(f"{path}: the input is not a quantised int8 tensor")
    model.buffers.append(schema.BufferT())
    new = schema.TensorT()
    new.shape, new.type, new.buffer = list(t.shape), schema.TensorType.UINT8, len(model.buffers) - 1
    name = t.name if isinstance(t.name, bytes) else str(t.name or "input").encode()
    new.name = name + b"_uint8"
    new.quantization = schema.QuantizationParametersT()
    new.quantization.scale = [float(t.quantization.scale[0])]
    new.quantization.zeroPoint = [int(t.quantization.zeroPoint[0]) + 128]
    sub.tensors.append(new)
    new_index = len(sub.tensors) - 1
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.QUANTIZE  # < 127
    code.version = 2  # QUANTIZE's requantising (integer in) version
    model.operatorCodes.append(code)
    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = len(model.operatorCodes) - 1, [new_index], [old]
    sub.operators.insert(0, op)
    sub.inputs = [new_index]
    for sig in model.signatureDefs or []:
        for tm in sig.inputs or []:
            if tm.tensorIndex == old:
                tm.tensorIndex = new_index
    with atomic_path(path) as tmp:
        flatbuffer_utils.write_model(model, tmp)
        report = tflite_report(tmp)
        if report["input"]["dtype"] != "uint8":  # pragma: no cover - the rewrite above sets it
            raise ExportError(f"{path}: rewritten input is {report['input']['dtype']}")
    return report


def tflite_report(path):
    """Size, tensor types, quantisation and op names of a ``.tflite`` file."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_path=os.fspath(path),
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()

    def tensor(d):
        scale, zp = d["quantization"]
        return dict(shape=[int(s) for s in d["shape"]], dtype=np.dtype(d["dtype"]).name,
                    scale=float(scale), zero_point=int(zp))

    ops = [d["op_name"] for d in it._get_ops_details() if d["op_name"] != "DELEGATE"]
    tensor_types = sorted({np.dtype(d["dtype"]).name for d in it.get_tensor_details()})
    return dict(
        size_bytes=os.path.getsize(path),
        input=tensor(it.get_input_details()[0]),
        output=tensor(it.get_output_details()[0]),
        ops=ops,
        tensor_dtypes=tensor_types,
    )


class _StrongWrapper(torch.nn.Module):
    """What the server runs: float ``(n, 1, H, W)`` in [0, 1] -> logits ``(n, n_classes)``."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


def export_strong_torchscript(model, out_path, *, class_names, size):
    """Trace the strong model to TorchScript (loadable with ``torch.jit.load`` alone).

    The file carries its own metadata as the extra file ``offload.json``:
    input layout ``NCHW``, ``(1, size, size)`` greyscale in [0, 1], class names.
    """
    model = model.eval()
    wrapper = _StrongWrapper(model).eval()
    example = torch.rand(2, 1, size, size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is what the server loads
        traced = torch.jit.trace(wrapper, example, check_trace=True)
    meta = dict(
        kind="strong-classifier", input_layout="NCHW", input_shape=[1, size, size],
        input_range=[0.0, 1.0], channels="grey", output="logits",
        class_names=list(class_names),
    )
    with atomic_path(out_path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(traced, tmp, _extra_files={STRONG_META_NAME: json.dumps(meta)})
    return meta


def load_strong(path):
    """Load the strong TorchScript model and its metadata: ``(module, meta)``."""
    extra = {STRONG_META_NAME: ""}
    if not os.path.isfile(os.fspath(path)):
        raise ExportError(f"strong model not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(os.fspath(path), map_location="cpu", _extra_files=extra)
    except (RuntimeError, ValueError, OSError) as exc:
        raise ExportError(f"{path} is not a TorchScript model: {str(exc).splitlines()[0]}") from None
    try:
        meta = json.loads(extra[STRONG_META_NAME]) if extra[STRONG_META_NAME] else {}
    except json.JSONDecodeError:
        meta = {}
    return module.eval(), meta


#: Preprocessing recorded with the strong model (the server must feed exactly this).
STRONG_PREPROCESSING = (
    "greyscale uint8 image -> float32 / 255 in [0, 1]; other sizes resized to the input size "
    "with offload.classifier.prepare_image (cv2.INTER_AREA when shrinking, INTER_LINEAR when "
    "enlarging; BGR colour -> grey by OpenCV's weights); NCHW (n, 1, H, W); output: logits"
)


def _strong_meta(class_names, size, channels=1, preprocessing=None):
    meta = dict(
        kind="strong-classifier", input_layout="NCHW", input_shape=[channels, size, size],
        input_range=[0.0, 1.0], channels="grey", output="logits",
        class_names=list(class_names), preprocessing=preprocessing or STRONG_PREPROCESSING,
    )
    if channels != 1:  # its model card says what the input holds
        del meta["input_range"], meta["channels"]
    return meta


def strong_from_torchscript(path, *, width=None):
    """Rebuild the strong ``StrongNet`` with the weights of a TorchScript file.

    The TorchScript file (``export_strong_torchscript``) holds the wrapped
    module's ``state_dict`` (keys ``net.*``) and its metadata; the network's
    size and class count come from the metadata, its base width from the
    first convolution's weights (``width`` overrides it).

    Returns
    -------
    (torch.nn.Module in eval mode, meta dict)
    """
    from training.models import build_strong

    module, meta = load_strong(path)
    state = {k[len("net."):] if k.startswith("net.") else k: v
             for k, v in module.state_dict().items()}
    try:
        size = int(meta.get("input_shape", [1, 28, 28])[-1])
        n_classes = len(meta["class_names"]) if meta.get("class_names") else int(
            state["classifier.2.bias"].shape[0])
        w = int(width or state["features.0.weight"].shape[0])
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ExportError(f"{path}: not a strong classifier from training.models ({exc})") from None
    net = build_strong(size, n_classes, w)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExportError(f"{path}: weights do not fit StrongNet(size={size}, "
                          f"n_classes={n_classes}, width={w}): {str(exc).splitlines()[0]}") from None
    return net.eval(), meta


def check_onnx_matches(model, onnx_path, x, *, atol=1e-4, batch_size=512):
    """Run ``x`` (float tensor ``(n, 1, H, W)``) through torch and ONNX Runtime.

    Returns ``(max_abs_diff, argmax_agreement, onnx_logits)``: the largest
    absolute logit difference, the share of images whose top-1 class agrees,
    and ONNX Runtime's logits ``(n, n_classes)``. Raises :class:`ExportError`
    when a difference exceeds ``atol`` or a top-1 class differs.
    """
    import onnxruntime as ort

    sess = ort.InferenceSession(os.fspath(onnx_path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    diffs, agree, outs = [], 0, []
    model = model.eval()
    with torch.no_grad():
        for b in range(0, len(x), batch_size):
            xb = x[b:b + batch_size]
            zt = model(xb).numpy()
            zo = sess.run(None, {name: xb.numpy()})[0]
            diffs.append(float(np.max(np.abs(zt - zo))) if len(xb) else 0.0)
            agree += int(np.sum(np.argmax(zt, 1) == np.argmax(zo, 1)))
            outs.append(zo)
    worst = max(diffs) if diffs else 0.0
    share = agree / max(len(x), 1)
    if worst > atol or agree != len(x):
        raise ExportError(f"{onnx_path}: ONNX Runtime disagrees with torch (max |diff| {worst:.3g} "
                          f"> {atol} or top-1 agreement {share:.4f} < 1)")
    return worst, share, (np.concatenate(outs) if outs else np.zeros((0, 0), np.float32))


def export_strong_onnx(model, out_path, *, class_names, size, check_x=None, opset=18, channels=1,
                       preprocessing=None):
    """Export the strong model to ONNX for the server (ONNX Runtime, no torch there).

    Input ``image``: float32 ``(batch, 1, size, size)`` in [0, 1] with a dynamic
    batch axis; output ``logits``: ``(batch, n_classes)``. The metadata
    (``offload.json`` in ``metadata_props``) holds the class names, input
    shape and layout, and the preprocessing (:data:`STRONG_PREPROCESSING`).

    Parameters
    ----------
    check_x : torch.Tensor ``(n, channels, size, size)``, optional
        Images the written file is checked on with ONNX Runtime against torch
        before it replaces ``out_path`` (random images when omitted).
    channels : int
        1 (the committed greyscale pair) or 3 (an RGB model, whose input
        convention its model card declares).
    preprocessing : str, optional
        Recorded in the metadata (default :data:`STRONG_PREPROCESSING`).

    Returns
    -------
    dict: the metadata, plus ``"check": {"images", "max_abs_diff", "top1_agreement"}``.
    """
    import onnx

    _quiet_converter_logs()  # torch.onnx warns that torchvision's ops are not registered
    model = model.eval()
    meta = _strong_meta(class_names, size, channels, preprocessing)
    example = torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (example,), dynamo=True, input_names=["image"], output_names=["logits"],
            dynamic_shapes=({0: batch},), opset_version=opset, verbose=False,
        )
    proto = program.model_proto
    # One JSON entry, the same document the TorchScript file carries as offload.json.
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = STRONG_META_NAME, json.dumps(meta)
    proto.producer_name = "offload.training.export"
    onnx.checker.check_model(proto)
    x = check_x if check_x is not None else torch.rand(
        64, channels, size, size, generator=torch.Generator().manual_seed(1))
    with atomic_path(out_path) as tmp:
        onnx.save_model(proto, tmp)
        worst, share, _ = check_onnx_matches(model, tmp, x)
    return dict(meta, check=dict(images=int(len(x)), max_abs_diff=worst, top1_agreement=share))


def read_onnx_meta(path):
    """The ``offload.json`` metadata of a strong ONNX file (``{}`` when it has none)."""
    import onnx

    proto = onnx.load(os.fspath(path), load_external_data=False)
    for p in proto.metadata_props:
        if p.key == STRONG_META_NAME:
            return json.loads(p.value)
    return {}
