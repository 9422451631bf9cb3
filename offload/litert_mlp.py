"""Write the DQN's MLP as a float32 LiteRT (.tflite) model, without TensorFlow.

The paper ran its DQN as a TFLite model on the Pi; this builds the same network
(FULLY_CONNECTED + LEAKY_RELU) from our float weights with the flatbuffer schema
that ships inside ``ai-edge-litert``, so the native int8 forward pass can be
compared against the LiteRT interpreter on identical weights.
"""

import numpy as np

__all__ = ["mlp_to_tflite", "LiteRTMLP"]


def mlp_to_tflite(layers):
    """Float32 ``.tflite`` bytes for ``layers`` (list of ``(weight (out,in), bias)``).

    Hidden layers are followed by LeakyReLU(0.2), as in ``offload.mlp.forward_float``.
    Input shape ``(1, in)``, output ``(1, out)``.
    """
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    buffers = [s.BufferT()]  # buffer 0 is the empty sentinel
    tensors = []

    def tensor(shape, name, data=None):
        t = s.TensorT()
        t.shape = list(shape)
        t.type = s.TensorType.FLOAT32
        t.name = name
        t.buffer = 0
        if data is not None:
            b = s.BufferT()
            b.data = np.ascontiguousarray(data, np.float32).tobytes()
            buffers.append(b)
            t.buffer = len(buffers) - 1
        tensors.append(t)
        return len(tensors) - 1

    def opcode(code):
        c = s.OperatorCodeT()
        c.builtinCode = code
        c.deprecatedBuiltinCode = min(code, 127)
        c.version = 1
        return c

    fc_code = opcode(s.BuiltinOperator.FULLY_CONNECTED)
    lr_code = opcode(s.BuiltinOperator.LEAKY_RELU)
    ops = []
    din = np.shape(layers[0][0])[1]
    cur = first = tensor((1, din), "input")
    for i, (w, b) in enumerate(layers):
        w = np.asarray(w, np.float32)
        wt = tensor(w.shape, f"w{i}", w)
        bt = tensor((w.shape[0],), f"b{i}", b)
        out = tensor((1, w.shape[0]), f"fc{i}")
        op = s.OperatorT()
        op.opcodeIndex = 0
        op.inputs, op.outputs = [cur, wt, bt], [out]
        op.builtinOptionsType = s.BuiltinOptions.FullyConnectedOptions
        op.builtinOptions = s.FullyConnectedOptionsT()
        ops.append(op)
        cur = out
        if i + 1 < len(layers):
            act = tensor((1, w.shape[0]), f"act{i}")
            op = s.OperatorT()
            op.opcodeIndex = 1
            op.inputs, op.outputs = [cur], [act]
            op.builtinOptionsType = s.BuiltinOptions.LeakyReluOptions
            op.builtinOptions = s.LeakyReluOptionsT()
            op.builtinOptions.alpha = 0.2
            ops.append(op)
            cur = act
    sg = s.SubGraphT()
    sg.tensors, sg.operators = tensors, ops
    sg.inputs, sg.outputs = [first], [cur]
    sg.name = "main"
    model = s.ModelT()
    model.version = 3
    model.operatorCodes = [fc_code, lr_code]
    model.subgraphs = [sg]
    model.buffers = buffers
    model.description = "offload DQN MLP (float32)"
    fb = flatbuffers.Builder(1024)
    fb.Finish(model.Pack(fb), file_identifier=b"TFL3")
    return bytes(fb.Output())


class LiteRTMLP:
    """The MLP run by the LiteRT interpreter (one input vector per call)."""

    def __init__(self, layers, num_threads=1):
        from ai_edge_litert.interpreter import Interpreter

        self.interp = Interpreter(model_content=mlp_to_tflite(layers), num_threads=num_threads)
        self.interp.allocate_tensors()
        self.inp = self.interp.get_input_details()[0]["index"]
        self.out = self.interp.get_output_details()[0]["index"]

    def __call__(self, x):
        """``x`` (in,) float32 -> Q-values (out,) float32."""
        self.interp.set_tensor(self.inp, np.asarray(x, np.float32).reshape(1, -1))
        self.interp.invoke()
        return self.interp.get_tensor(self.out)[0]
