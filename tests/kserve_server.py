"""A real Open Inference Protocol (v2) server: KServe's ``ModelServer`` over an ONNX model, for the tests.

Runs in its own virtual environment, ``.venv-kserve`` (``bash tools/setup.sh``
makes it from tools/kserve-requirements.txt), so that KServe's dependencies
(FastAPI, gRPC, kubernetes, pandas) never meet the project's::

    .venv-kserve/bin/python tests/kserve_server.py --model artifacts/strong.onnx --port 0

It serves two models on loopback:

* ``--name`` (default: the model file's stem): ONNX Runtime on the CPU over
  ``--model``; a tensor that is not the model's input (name, datatype,
  shape) is refused with KServe's ``InvalidInput`` (HTTP 400);
* ``broken``: the same metadata, but its ``predict`` raises (HTTP 500);
* ``loose``: metadata that takes any height and width (``[-1, C, -1, -1]``),
  but ONNX Runtime still needs the model's own: another size is refused with
  ``InvalidInput`` (HTTP 400), as a server refuses a wrong-shape tensor.

With ``--port 0`` (the default) the system picks a free port as the server
binds it, and uvicorn says which on stderr: ``Uvicorn running on
http://127.0.0.1:PORT`` (:data:`LISTENING` matches it); then wait for
``/v2/health/ready``. Imports nothing of ``offload``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import numpy as np

#: uvicorn's line once the socket is bound (group 1: the URL).
LISTENING = re.compile(r"Uvicorn running on (http://127\.0\.0\.1:\d+)")


def _onnx_model_class():
    import kserve
    import onnxruntime as ort
    from kserve.errors import InvalidInput

    datatypes = {"tensor(float)": "FP32", "tensor(uint8)": "UINT8", "tensor(int8)": "INT8"}
    dtypes = {"FP32": np.float32, "UINT8": np.uint8, "INT8": np.int8}

    class OnnxModel(kserve.Model):
        """One ONNX model run by ONNX Runtime; ``broken`` models raise in ``predict``."""

        def __init__(self, name, path, *, broken=False, loose=False):
            super().__init__(name)
            self.path, self.broken, self.loose = path, broken, loose
            self.load()

        def load(self):
            self.session = ort.InferenceSession(self.path, providers=["CPUExecutionProvider"])
            self.input, self.output = self.session.get_inputs()[0], self.session.get_outputs()[0]
            self.ready = True
            return self.ready

        def _spec(self, t):
            return {"name": t.name, "datatype": datatypes.get(t.type, t.type),
                    "shape": [s if isinstance(s, int) else -1 for s in t.shape]}

        def get_input_types(self):
            spec = self._spec(self.input)
            if self.loose:
                spec["shape"] = spec["shape"][:2] + [-1] * (len(spec["shape"]) - 2)
            return [spec]

        def get_output_types(self):
            return [self._spec(self.output)]

        def predict(self, payload, headers=None, response_headers=None):
            if self.broken:
                raise RuntimeError("this test model always fails")
            x = payload.inputs[0].as_numpy()
            want = self._spec(self.input)
            if payload.inputs[0].name != self.input.name or x.dtype != dtypes[want["datatype"]] \
                    or x.ndim != len(want["shape"]) \
                    or any(w not in (-1, g) for w, g in zip(want["shape"], x.shape)):
                raise InvalidInput(f"input must be {want}, got {payload.inputs[0].name} "
                                   f"{x.dtype} {list(x.shape)}")
            y = self.session.run([self.output.name], {self.input.name: x})[0]
            out = kserve.InferOutput(self.output.name, list(y.shape), "FP32")
            out.set_data_from_numpy(y.astype(np.float32), binary_data=False)
            # KServe's answer needs an id; binary outputs only when the model passes the wish on.
            return kserve.InferResponse(model_name=self.name, infer_outputs=[out],
                                        response_id=payload.id or "none",
                                        use_binary_outputs=payload.use_binary_outputs,
                                        requested_outputs=payload.request_outputs)

    return OnnxModel


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="ONNX model file")
    ap.add_argument("--name", default=None, help="model name (default: the file's stem)")
    ap.add_argument("--port", type=int, default=0, help="HTTP port (0: a free one)")
    args = ap.parse_args(argv)
    if not os.path.isfile(args.model):
        sys.exit(f"error: model file {args.model} not found")
    # kserve.model_server parses sys.argv when imported (parse_known_args, which
    # abbreviates: our --model would be taken for its --model_name): it gets none.
    sys.argv = sys.argv[:1]
    import kserve
    import kserve.protocol.rest.server as rest

    class LoopbackConfig(rest.uvicorn.Config):
        # KServe 0.21 listens on 0.0.0.0 with no option to change it; a test server
        # stays on loopback.
        def __init__(self, *a, **kw):
            kw["host"] = "127.0.0.1"
            super().__init__(*a, **kw)

    rest.uvicorn.Config = LoopbackConfig

    name = args.name or os.path.splitext(os.path.basename(args.model))[0]
    port = args.port
    model_class = _onnx_model_class()
    models = [model_class(name, args.model), model_class("broken", args.model, broken=True),
              model_class("loose", args.model, loose=True)]
    server = kserve.ModelServer(http_port=port, enable_grpc=False, workers=1,
                                enable_docs_url=False)
    server.start(models)


if __name__ == "__main__":
    main()
