"""Where the committed artifacts are: ``artifacts/`` in the repository, or a copy installed with the package.

The repository's ``artifacts/`` folder is the single source of truth (the
weak ``.tflite`` model, the strong TorchScript model, the real profile and
their reports; see docs/classifiers.md). A regular, non-editable install
cannot see the repository, so the build installs a copy of those files
(the demo clip included) as ``offload/_artifacts`` inside the
package. ``find`` looks in this order and returns the first file that exists:

1. ``$OFFLOAD_ARTIFACTS/<name>``, when that environment variable is set;
2. ``artifacts/<name>`` next to the ``offload`` package: the repository,
   for a source checkout or an editable install;
3. ``offload/_artifacts/<name>``: the copy installed with the package.
"""

import os

__all__ = ["find", "search_path"]

ENV = "OFFLOAD_ARTIFACTS"
_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def search_path():
    """The folders ``find`` looks in, in order."""
    dirs = []
    if os.environ.get(ENV):
        dirs.append(os.environ[ENV])
    dirs.append(os.path.join(os.path.dirname(_PACKAGE), "artifacts"))
    dirs.append(os.path.join(_PACKAGE, "_artifacts"))
    return dirs


def find(name):
    """Path of the artifact ``name`` (e.g. ``"profile.npz"``), or ``None`` when there is none."""
    for d in search_path():
        path = os.path.join(d, name)
        if os.path.exists(path):
            return path
    return None
