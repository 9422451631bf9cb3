"""Tiny ``.tflite`` models for the model-card tests, written with the flatbuffer schema inside ai-edge-litert.

``echo_model`` is one RESHAPE: its output is its input tensor, flattened. A
``WeakClassifier`` on it therefore returns, as its raw output ``q``, exactly
the tensor the device fed the interpreter, so a test can compare that tensor
with one it computes itself, through the real interpreter and no private
name. Its "classes" are the H*W*C input values.
"""

import numpy as np


def echo_model(path, height, width, channels, dtype=np.uint8, scale=1 / 255, zero_point=0,
               layout="NHWC"):
    """Write a model ``1xHxWxC`` (or ``1xCxHxW``) -> ``1x(H*W*C)`` (the same values) to ``path``."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    dtype = np.dtype(dtype)
    kind = {np.dtype(np.uint8): s.TensorType.UINT8, np.dtype(np.int8): s.TensorType.INT8,
            np.dtype(np.float32): s.TensorType.FLOAT32}[dtype]
    n = height * width * channels
    shape = [1, height, width, channels] if layout == "NHWC" else [1, channels, height, width]

    def tensor(dims, name, buffer, tensor_type=kind, quantised=True):
        t = s.TensorT()
        t.shape, t.type, t.name, t.buffer = list(dims), tensor_type, name, buffer
        if quantised and dtype != np.float32:
            q = s.QuantizationParametersT()
            q.scale, q.zeroPoint = [float(scale)], [int(zero_point)]
            t.quantization = q
        return t

    empty = s.BufferT()
    new_shape = s.BufferT()
    new_shape.data = np.array([1, n], np.int32).tobytes()
    tensors = [tensor(shape, "image", 0), tensor([2], "shape", 1, s.TensorType.INT32, False),
               tensor([1, n], "echo", 0)]
    code = s.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.RESHAPE
    code.version = 1
    op = s.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1], [2]
    op.builtinOptionsType = s.BuiltinOptions.ReshapeOptions
    op.builtinOptions = s.ReshapeOptionsT()
    op.builtinOptions.newShape = [1, n]
    sg = s.SubGraphT()
    sg.tensors, sg.operators, sg.inputs, sg.outputs, sg.name = tensors, [op], [0], [2], "main"
    model = s.ModelT()
    model.version, model.operatorCodes, model.subgraphs = 3, [code], [sg]
    model.buffers = [empty, new_shape]
    model.description = "offload test: echo the input tensor"
    fb = flatbuffers.Builder(1024)
    fb.Finish(model.Pack(fb), file_identifier=b"TFL3")
    with open(path, "wb") as f:
        f.write(bytes(fb.Output()))
    return str(path)
