#!/usr/bin/env bash
# Set up offload on a fresh Debian / Raspberry Pi OS machine, in ./.venv.
#   bash tools/setup.sh                  # everything: device, server, training, tests
#                                        # (and .venv-kserve, the tests' KServe v2 server)
#   bash tools/setup.sh device           # a Raspberry Pi: base + device extra, no torch
#   bash tools/setup.sh all --editable   # development: an editable install (or EDITABLE=1)
# Installs the Debian packages it needs (root or sudo), makes a virtual
# environment (Debian's own Python refuses system-wide pip installs), and
# installs the package, building the native core for this CPU.
#
# The default is a regular install: the compiled core is built once and
# copied into .venv, so any number of processes (sweeps, Ray or server
# workers) can import it at the same time. An editable install instead
# rebuilds changed sources on import; concurrent imports then race on
# build/cp*/.ninja_deps and each may rebuild for a minute, so keep it for
# development, and rerun this script after changing the code otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
editable="${EDITABLE:-0}"
for arg in "$@"; do
    case "$arg" in
        --editable) editable=1 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        -*) echo "setup: unknown option $arg (see --help)" >&2; exit 2 ;;
        *) if [ -n "$extras" ]; then echo "setup: one extras list only, got '$extras' and '$arg'" >&2; exit 2; fi
           extras="$arg" ;;
    esac
done
extras="${extras:-all}"
case "$editable" in 0|"") editable=0 ;; *) editable=1 ;; esac

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if command -v apt-get >/dev/null 2>&1; then
    pkgs="python3-venv python3-dev gcc"
    # The real dataset the classifier pair and its tests use.
    if [ "$extras" = "all" ]; then pkgs="$pkgs dataset-fashion-mnist"; fi
    # offload-firmware build (sfdisk, mtools, debugfs) and its tests' synthetic images (mkfs.vfat).
    if [ "$extras" = "all" ]; then pkgs="$pkgs fdisk mtools dosfstools e2fsprogs"; fi
    # The Redis the server tests start on a loopback port (offload-serve --state redis://).
    if [ "$extras" = "all" ]; then pkgs="$pkgs redis-server"; fi
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
    *all*|*training*)  # the server runs ONNX Runtime: no torch
        # The CPU build; a bare "torch" requirement would pull a multi-GB CUDA build.
        "$PY" -m pip install -q "torch==2.13.0" ;;
esac
if [ "$editable" = 1 ]; then
    echo "setup: installing offload[$extras] editable (builds the native core; rebuilds on import)"
    "$PY" -m pip install -q --no-build-isolation -e ".[$extras]"
else
    echo "setup: installing offload[$extras] (builds the native core)"
    # A regular install replaces an earlier editable one (its loader and .pth go).
    "$PY" -m pip install -q --no-build-isolation ".[$extras]"
fi
case "$extras" in
    *all*)
        # The tests' real Open Inference Protocol (v2) server, KServe, lives in a
        # venv of its own: its FastAPI, gRPC, kubernetes and pandas pins never meet
        # the project's (tests/kserve_server.py, tests/test_device_v2.py).
        if [ ! -x .venv-kserve/bin/python ]; then
            echo "setup: creating .venv-kserve (KServe, the tests' v2 server)"
            "${PYTHON:-python3}" -m venv .venv-kserve
        fi
        .venv-kserve/bin/python -m pip install -q --upgrade pip
        .venv-kserve/bin/python -m pip install -q -r tools/kserve-requirements.txt ;;
esac
echo "setup: done; commands are in .venv/bin (offload-sim, offload-train, ...)"
