#!/bin/bash
# offload first boot: cloud-init runs this once as root (runcmd in user-data)
# from the boot partition. It installs the Edge TPU runtime and the project
# from the wheels on the card (no compiler, no network: pip --no-index
# --only-binary), validates the device settings, writes /etc/offload and
# starts offload.service. Safe to run again by hand after fixing a setting:
#   sudo bash /boot/firmware/offload/firstboot.sh
#
# OFFLOAD_ROOT, OFFLOAD_PYTHON and OFFLOAD_USER exist for the rehearsal on a
# workstation (tests/test_firstboot_rehearsal.py: a scratch root folder, the
# host's Python, stand-in commands for apt-get, systemctl and udevadm); on the
# Pi they are unset.
set -euo pipefail

BOOT="${OFFLOAD_BOOT:-}"
if [ -z "$BOOT" ]; then
    for d in /boot/firmware/offload /boot/offload; do
        if [ -d "$d" ]; then BOOT="$d"; break; fi
    done
fi
ROOT="${OFFLOAD_ROOT:-}"
VENV="$ROOT/opt/offload/venv"
PY="${OFFLOAD_PYTHON:-/usr/bin/python3}"
SERVICE_USER="${OFFLOAD_USER:-offload}"
LOG="$ROOT/var/log/offload-firstboot.log"

say() { echo "offload-firstboot: $*"; }
die() { echo "offload-firstboot: error: $*" >&2; exit 1; }

[ -n "$BOOT" ] || die "no offload folder on the boot partition (/boot/firmware/offload)"
WHEELS="$BOOT/wheels"
# Everything also goes to a persistent log (cloud-init keeps its own copy in
# /var/log/cloud-init-output.log).
mkdir -p "$(dirname "$LOG")"
exec > >(tee -a "$LOG") 2>&1
say "starting from $BOOT"

# 1. The unprivileged service user (cloud-init's users module creates it;
#    this covers a run by hand on a system where that did not happen).
if ! id "$SERVICE_USER" >/dev/null 2>&1; then
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
            --user-group "$SERVICE_USER"
fi
for g in video plugdev; do
    if getent group "$g" >/dev/null; then usermod -a -G "$g" "$SERVICE_USER"; fi
done

# 2. The Edge TPU runtime (libedgetpu built against the TensorFlow Lite that
#    our LiteRT matches; see docs/firmware.md). Without it the device runs the
#    weak model on the CPU and says so once in its log.
deb=""
for f in "$BOOT"/edgetpu/*.deb; do
    if [ -f "$f" ]; then deb="$f"; break; fi
done
if [ -n "$deb" ]; then
    say "installing the Edge TPU runtime $(basename "$deb")"
    # apt resolves its one dependency (libusb-1.0-0) from the image when present.
    if ! apt-get install -y --no-install-recommends "$deb"; then
        say "warning: the Edge TPU runtime did not install; offload-run will use the CPU"
    fi
else
    say "no Edge TPU runtime on the boot partition; offload-run will use the CPU"
fi

# 3. Our wheel for this Python: cross-compiled on the workstation (offload-firmware
#    fetch-wheels), so nothing is compiled here and no compiler is needed.
pytag=$("$PY" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
ours=""
for f in "$WHEELS"/offload-*-"$pytag"-*.whl; do
    if [ -f "$f" ]; then ours="$f"; fi
done
[ -n "$ours" ] || die "no offload wheel for $pytag in $WHEELS: rebuild the card with a wheel folder from 'offload-firmware fetch-wheels --python $("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')'"

# 4. The virtual environment. --without-pip: Raspberry Pi OS Lite may lack
#    python3-venv (ensurepip), so pip comes from the wheel on the card.
#    --system-site-packages: Picamera2 and libcamera come from apt.
if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    "$PY" -m venv --without-pip --system-site-packages "$VENV"
fi
pipwhl=""
for f in "$WHEELS"/pip-*.whl; do
    if [ -f "$f" ]; then pipwhl="$f"; fi
done
[ -n "$pipwhl" ] || die "no pip wheel in $WHEELS"
# --only-binary=:all: as well as --no-index: never a source build, whatever the folder
# holds; --isolated: no pip.conf or PIP_* variable adds another source (Raspberry Pi OS's
# /etc/pip.conf names piwheels).
pip=("$VENV/bin/python" -m pip --isolated install --no-index --find-links "$WHEELS" --only-binary=:all:
     --ignore-installed --disable-pip-version-check --no-cache-dir)
"$VENV/bin/python" "$pipwhl/pip" --isolated install --no-index --find-links "$WHEELS" --ignore-installed \
    --disable-pip-version-check --no-cache-dir --quiet pip
say "installing $(basename "$ours") and its dependencies from $WHEELS"
"${pip[@]}" "offload[device]"

# 5. Settings -> /etc/offload (validated again here), key and TLS files moved off the boot
#    partition, systemd unit and udev rule installed.
"$VENV/bin/offload-firmware" provision --boot "$BOOT" --root "${ROOT:-/}" --user "$SERVICE_USER"
udevadm control --reload || true
udevadm trigger --subsystem-match=usb --subsystem-match=video4linux || true

# 6. The service.
systemctl daemon-reload
systemctl enable offload.service
systemctl restart --no-block offload.service
say "done: check it with 'systemctl status offload' and 'journalctl -u offload'"
