"""The benchmarks' fixtures; the benchmarks share tests/'s helper modules.

Run with ``pytest benchmarks --benchmark-enable`` (docs/benchmarks.md); the
README's test command (``pytest -q``, testpaths = tests) does not collect
them. Under the default ``--benchmark-disable`` each body runs once, which is
what ``.ci/run`` does so they cannot rot; every benchmark also asserts that
its contenders agree.

tests/ goes on ``sys.path`` here, as pytest's default import mode already
does for the test modules themselves, so ``helpers`` and ``device_helpers``
stay one module each rather than a copy per folder.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

# Fixtures shared with tests/conftest.py, defined once in helpers.
from helpers import frame, strong_model  # noqa: E402,F401
