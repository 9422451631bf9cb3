#!/usr/bin/env bash
# Set up offload on a fresh Debian / Raspberry Pi OS machine.
#   bash tools/setup.sh            # everything: device, server, training, tests
#   bash tools/setup.sh device     # a Raspberry Pi: base + device extra, no torch
# Installs Debian packages (needs root or sudo), then the package in editable
# mode so the native core is built for this machine's CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-all}"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if command -v apt-get >/dev/null 2>&1; then
    pkgs="python3-dev gcc"
    # The real dataset the tests and the classifier pair use.
    if [ "$extras" = "all" ]; then pkgs="$pkgs dataset-fashion-mnist"; fi
    missing=""
    for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
    if [ -n "$missing" ]; then
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing
    fi
fi

PY="${PYTHON:-python3}"
"$PY" -m pip install -q "meson-python>=0.15" "meson>=1.2" ninja "Cython>=3.0"
if [ "$extras" = "all" ] || [[ "$extras" == *training* ]] || [[ "$extras" == *server* ]]; then
    # The CPU build; a bare "torch" requirement would pull a multi-GB CUDA build.
    "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q --no-build-isolation -e ".[$extras]"
