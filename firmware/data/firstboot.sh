#!/bin/bash
# offload first boot: cloud-init runs this once as root (runcmd in user-data)
# from the boot partition. It installs the Edge TPU runtime and the project
# from files on the card (no internet needed when a prebuilt offload wheel
# or a compiler is present), validates the device settings, writes
# /etc/offload and starts offload.service. Safe to run again by hand after
# fixing a setting:  sudo bash /boot/firmware/offload/firstboot.sh
set -euo pipefail

BOOT="${OFFLOAD_BOOT:-}"
if [ -z "$BOOT" ]; then
    for d in /boot/firmware/offload /boot/offload; do
        if [ -d "$d" ]; then BOOT="$d"; break; fi
    done
fi
VENV=/opt/offload/venv
PY=/usr/bin/python3
LOG=/var/log/offload-firstboot.log

say() { echo "offload-firstboot: $*"; }
die() { echo "offload-firstboot: error: $*" >&2; exit 1; }

[ -n "$BOOT" ] || die "no offload folder on the boot partition (/boot/firmware/offload)"
WHEELS="$BOOT/wheels"
# Everything also goes to a persistent log (cloud-init keeps its own copy in
# /var/log/cloud-init-output.log).
exec > >(tee -a "$LOG") 2>&1
say "starting from $BOOT"

# 1. The unprivileged service user (cloud-init's users module creates it;
#    this covers a run by hand on a system where that did not happen).
if ! id offload >/dev/null 2>&1; then
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
            --user-group offload
fi
for g in video plugdev; do
    if getent group "$g" >/dev/null; then usermod -a -G "$g" offload; fi
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

# 3. A compiler for the native core, unless a prebuilt offload wheel for this
#    Python and CPU is on the card.
pytag=$("$PY" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
pyinc=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("include"))')
prebuilt=""
for f in "$WHEELS"/offload-*-"$pytag"-*aarch64.whl; do
    if [ -f "$f" ]; then prebuilt="$f"; fi
done
if [ -z "$prebuilt" ]; then
    need=""
    command -v gcc >/dev/null 2>&1 || need="$need gcc"
    [ -f "$pyinc/Python.h" ] || need="$need python3-dev"
    if [ -n "$need" ]; then
        say "the native core is compiled on this Pi and needs:$need; installing with apt (needs the network)"
        if ! { apt-get update && apt-get install -y --no-install-recommends $need; }; then
            die "could not install$need: connect the Pi to the network, or put a prebuilt offload wheel for $pytag aarch64 in $WHEELS, then run: sudo bash $BOOT/firstboot.sh"
        fi
    fi
fi

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
pip=("$VENV/bin/python" -m pip install --no-index --find-links "$WHEELS" --ignore-installed
     --disable-pip-version-check --no-cache-dir)
"$VENV/bin/python" "$pipwhl/pip" install --no-index --find-links "$WHEELS" --ignore-installed \
    --disable-pip-version-check --no-cache-dir --quiet pip
say "installing offload (compiling the native core for this CPU: a few minutes on a Pi 4)"
"${pip[@]}" meson-python meson ninja Cython
"${pip[@]}" --no-build-isolation "offload[device]"

# 5. Settings -> /etc/offload (validated again here), key and TLS files moved off the boot
#    partition, systemd unit and udev rule installed.
"$VENV/bin/offload-firmware" provision --boot "$BOOT"
udevadm control --reload || true
udevadm trigger --subsystem-match=usb --subsystem-match=video4linux || true

# 6. The service.
systemctl daemon-reload
systemctl enable offload.service
systemctl restart --no-block offload.service
say "done: check it with 'systemctl status offload' and 'journalctl -u offload'"
