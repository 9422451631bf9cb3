"""Workstation-only training code (needs the training extra: torch, litert-torch).

Classifier pair (``offload-train classifiers`` / ``offload-train profile``, see
``docs/classifiers.md``):

- ``training.data``: IDX files and image folders, the fit/profile split;
- ``training.models``: the weak (Edge TPU) and strong (server) CNNs;
- ``training.train``: training and evaluation loops;
- ``training.export``: full-int8 ``.tflite`` via litert-torch PT2E, TorchScript;
- ``training.profiling``: run both as deployed, build the profile, fit the metric,
  section II breakdown, Fig. 3;
- ``training.demo``: a demo clip of held-out test images;
- ``training.cli``: the ``offload-train`` group and its ``dqn`` command;
  ``training.pair_commands`` (``classifiers``, ``onnx``, ``profile``) and
  ``training.figure_commands`` (``sweep``, ``plot``, ``trace``) add the rest.
"""
