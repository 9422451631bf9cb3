#!/usr/bin/env bash
# The native core's twin tests on aarch64, under user-mode emulation.
#
#   bash tools/aarch64_twins.sh              # run them (tools missing: an error)
#   bash tools/aarch64_twins.sh --install    # apt-get install the tools first (root or sudo)
#   bash tools/aarch64_twins.sh --skip-unavailable   # CI: one SKIPPED line when the tools
#                                            # cannot be had, exit 0
#   bash tools/aarch64_twins.sh --card wheels/   # also: install a fetch-wheels folder as first
#                                            # boot does (venv, pip --no-index --only-binary)
#                                            # with the emulated CPython 3.13, then import it
#
# 1. cross-compiles the project's wheel for CPython 3.13 on a Raspberry Pi 4
#    (offload-firmware wheel: gcc-aarch64-linux-gnu, tools/cross/aarch64-linux-gnu.ini,
#    -Dnative_cpu=false -mcpu=cortex-a72);
# 2. unpacks Debian trixie's arm64 CPython 3.13 into a folder (firmware/sysroot.py:
#    apt-get download + dpkg -x with a private apt state; the host's apt is untouched);
# 3. installs that wheel, numpy's aarch64 wheel from PyPI and pytest into
#    target folders (pip install --target --platform ..., wheels only);
# 4. runs, under `qemu-aarch64 -cpu cortex-a72 -L SYSROOT SYSROOT/usr/bin/python3.13`
#    (invoked explicitly; no binfmt handler is registered), the tests that compare every
#    native kernel with its numpy twin bit for bit, from tests/ as they are.
# Emulated timings mean nothing about a Pi: no speed is claimed from this run.
# Downloads are cached in $OFFLOAD_AARCH64_CACHE (default ~/.cache/offload/aarch64).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
PY="${PYTHON:-$REPO/.venv/bin/python}"
TARGET=3.13
TESTS=(tests/test_mlp.py tests/test_bucket.py tests/test_ring.py tests/test_decider.py
       tests/test_simulate.py tests/test_oracle.py tests/test_policies.py)
install=0
skip=0
card=""
while [ $# -gt 0 ]; do
    case "$1" in
        --install) install=1 ;;
        --skip-unavailable) skip=1 ;;
        --card) shift; card="$(cd "${1:?--card needs a folder}" && pwd)" ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "aarch64_twins: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
start=$(date +%s)
tools_missing() {
    local gone=""
    for t in aarch64-linux-gnu-gcc aarch64-linux-gnu-readelf qemu-aarch64 pkg-config; do
        command -v "$t" >/dev/null 2>&1 || gone="$gone $t"
    done
    echo "$gone"
}
gone=$(tools_missing)
if [ -n "$gone" ] && [ "$install" = 1 ] && command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo -n"; fi
    # --no-install-recommends: qemu-user recommends qemu-user-binfmt, which would
    # register binfmt handlers in the host kernel; the emulator is invoked explicitly.
    pkgs="gcc-aarch64-linux-gnu binutils-aarch64-linux-gnu qemu-user pkgconf"
    echo "aarch64_twins: apt-get install --no-install-recommends $pkgs"
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
        --no-install-recommends $pkgs >/dev/null; } || echo "aarch64_twins: apt-get install failed"
    gone=$(tools_missing)
fi
if [ -n "$gone" ]; then
    msg="not installed:$gone (apt-get install --no-install-recommends gcc-aarch64-linux-gnu binutils-aarch64-linux-gnu qemu-user pkgconf)"
    if [ "$skip" = 1 ]; then echo "aarch64 twin tests: SKIPPED: $msg"; exit 0; fi
    echo "aarch64 twin tests: error: $msg" >&2; exit 1
fi

CACHE="${OFFLOAD_AARCH64_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/offload/aarch64}"
export OFFLOAD_AARCH64_CACHE="$CACHE"
mkdir -p "$CACHE"
WHEEL_DIR="$CACHE/wheel-$TARGET"
DL="$CACHE/wheels-$TARGET"
# The test dependencies stay installed between runs (with the byte code the emulated
# interpreter wrote for them: compiling them again under emulation costs minutes);
# our package is installed afresh from the wheel built above, every run.
DEPS="$CACHE/site-deps-$TARGET"
SITE="$CACHE/site-offload-$TARGET"
rm -rf "$WHEEL_DIR" "$SITE"
# The host Python imports the INSTALLED firmware and offload packages: run it outside the
# checkout, whose offload_native holds no compiled core after a regular install.
host() { (cd "$CACHE" && "$PY" "$@"); }

echo "aarch64_twins: 1/4 cross-compiling the offload wheel for CPython $TARGET aarch64"
PATH="$(dirname "$PY"):$PATH" host -m firmware.cli wheel "$WHEEL_DIR" --python "$TARGET" --source "$REPO"
echo "aarch64_twins: 2/4 the arm64 CPython $TARGET (Debian packages, dpkg -x)"
ROOT=$(host -c 'import sys; from firmware import sysroot
print(sysroot.ensure(sys.argv[1], echo=lambda s: print(s, file=sys.stderr)))' "$TARGET")
echo "aarch64_twins: 3/4 numpy and pytest for CPython $TARGET aarch64 (pip, wheels only)"
mapfile -t PLAT < <(host -c 'from firmware import wheels
for p in wheels.platforms(): print("--platform"); print(p)')
TEST_REQS=(numpy pytest pytest-timeout hypothesis click tqdm)
pipt=(-m pip install --quiet --disable-pip-version-check --no-index --only-binary=:all:
      --python-version "$TARGET" --implementation cp --abi "cp${TARGET/./}" "${PLAT[@]}")
if [ "$(cat "$DEPS/.requirements" 2>/dev/null)" != "${TEST_REQS[*]}" ]; then
    rm -rf "$DEPS"
    host -c 'import sys; from firmware import wheels
wheels.download(sys.argv[1], sys.argv[2], requirements=sys.argv[3:], pip_args=["--quiet"])' \
        "$DL" "$TARGET" "${TEST_REQS[@]}"
    "$PY" "${pipt[@]}" --target "$DEPS" --find-links "$DL" "${TEST_REQS[@]}"
    echo "${TEST_REQS[*]}" > "$DEPS/.requirements"
fi
"$PY" "${pipt[@]}" --target "$SITE" --no-deps --find-links "$WHEEL_DIR" offload

echo "aarch64_twins: 4/4 the twin tests under qemu-aarch64 (timings are emulated: no speed claims)"
# qemu-aarch64 -cpu cortex-a72 -L SYSROOT SYSROOT/usr/bin/python3.13 (firmware.sysroot.qemu_command:
# the Pi 4's CPU; qemu's default CPU model broke numpy's OpenBLAS, see there).
mapfile -t QEMU < <(host -c 'import sys; from firmware import sysroot
print("\n".join(sysroot.qemu_command(sys.argv[1], sys.argv[2])))' "$ROOT" "$TARGET")
cat > "$CACHE/pytest.ini" <<EOF
[pytest]
timeout = 1200
EOF
# Run outside the checkout, so `offload` is the wheel's copy in $SITE (with its
# AArch64 modules), never the checkout's sources or a host build.
cd "$CACHE"
export PYTHONPATH="$SITE:$DEPS" HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"
"${QEMU[@]}" - "$SITE" <<'EOF'
import platform, sys, sysconfig
import numpy, offload_native, offload.mlp
site = sys.argv[1]
assert platform.machine() == "aarch64", platform.machine()
assert offload_native.__file__.startswith(site), offload_native.__file__
assert offload.mlp.__file__.startswith(site), offload.mlp.__file__
print(f"aarch64_twins: CPython {platform.python_version()} on {platform.machine()}, "
      f"numpy {numpy.__version__}, core {offload_native._mlp.__file__.rsplit('/', 1)[-1]}")
EOF
tests=()
for t in "${TESTS[@]}"; do tests+=("$REPO/$t"); done
status=0
"${QEMU[@]}" -m pytest -q -p no:cacheprovider -c "$CACHE/pytest.ini" --rootdir "$REPO/tests" \
    "${tests[@]}" || status=$?
if [ -n "$card" ] && [ "$status" = 0 ]; then
    echo "aarch64_twins: the card's wheels, installed as first boot does, on the emulated CPython $TARGET"
    VENV="$CACHE/card-venv"
    rm -rf "$VENV"
    "${QEMU[@]}" -m venv --without-pip "$VENV"
    pipwhl=$(ls "$card"/pip-*.whl | tail -n 1)
    unset PYTHONPATH
    QV=("${QEMU[@]:0:$((${#QEMU[@]} - 1))}" "$VENV/bin/python")
    "${QV[@]}" "$pipwhl/pip" --isolated install --quiet --no-index --find-links "$card" \
        --only-binary=:all: --disable-pip-version-check --no-cache-dir "offload[device]" || status=$?
    # LiteRT is imported, not run: its interpreter crashes under qemu-user 7.2 (docs/firmware.md).
    "${QV[@]}" -c 'import platform, numpy, cv2, ai_edge_litert.interpreter, offload_native
print("aarch64_twins: card venv on", platform.machine(), "imports numpy", numpy.__version__,
      "cv2", cv2.__version__, "LiteRT and", offload_native._mlp.__file__.rsplit("/", 1)[-1])' || status=$?
fi
echo "aarch64_twins: done in $(( $(date +%s) - start )) s (exit $status)"
exit $status
