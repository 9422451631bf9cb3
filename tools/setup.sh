#!/usr/bin/env bash
# Set up offload on a fresh Debian / Raspberry Pi OS machine, in ./.venv.
#   bash tools/setup.sh            # everything: device, server, training, tests
#   bash tools/setup.sh device     # a Raspberry Pi: base + device extra, no torch
# Installs the Debian packages it needs (root or sudo), makes a virtual
# environment (Debian's own Python refuses system-wide pip installs), and
# installs the package editable so the native core is built for this CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-all}"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if command -v apt-get >/dev/null 2>&1; then
    pkgs="python3-venv python3-dev gcc"
    # The real dataset the classifier pair and its tests use.
    if [ "$extras" = "all" ]; then pkgs="$pkgs dataset-fashion-mnist"; fi
    missing=""
    for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
    if [ -n "$missing" ]; then
        echo "setup: apt-get install$missing"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
    fi
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "${PYTHON:-python3}" -m venv .venv
fi
PY=.venv/bin/python
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "meson-python>=0.15" "meson>=1.2" ninja "Cython>=3.0"
case "$extras" in
    *all*|*training*|*server*)
        # The CPU build; a bare "torch" requirement would pull a multi-GB CUDA build.
        "$PY" -m pip install -q "torch==2.13.0" ;;
esac
echo "setup: installing offload[$extras] (builds the native core)"
"$PY" -m pip install -q --no-build-isolation -e ".[$extras]"
echo "setup: done; commands are in .venv/bin (offload-sim, offload-train, ...)"
