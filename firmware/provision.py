"""First boot on the Pi: the card's settings become ``/etc/offload``, the key leaves the boot partition.

``offload-firmware provision --boot /boot/firmware/offload`` (run as root by
``firstboot.sh``, from the freshly installed virtual environment):

1. reads ``device.toml`` and ``device.key`` from the boot partition and
   validates them exactly as the build did (``firmware.settings``), now also
   requiring ``server`` and the key;
2. writes ``/etc/offload``: ``config.toml`` (0640, group offload), the policy
   blob and weak model(s) (0644), and ``device.key`` (0600, owner offload),
   each atomically; the key file is created with mode 0600 from the start;
3. installs the systemd unit, the udev rule, and a drop-in ordering the
   service after the camera's device node for camera sources;
4. overwrites ``device.key`` on the boot partition with zeros and deletes it
   (FAT has no permissions: anyone with the card could read it; and a plain
   delete on FAT leaves the bytes in the freed clusters), and syncs.

The TLS files (``ca.pem``, ``client.pem``, ``client.key``; ``firmware.tls``)
go the same way: checked, written to ``/etc/offload`` with mode 0600 (owner
offload), the device's ``ca-file``/``client-cert``/``client-key`` pointed at
them, and wiped from the card once everything is written.

Run again after editing ``device.toml`` on the card; with no ``device.key``
(or TLS file) there it keeps the one already in ``/etc/offload``.
"""

from __future__ import annotations

import os
import pwd

from firmware import ETC, USER, settings, tls
from firmware.build import data_path
from firmware.tools import FirmwareError
from offload.atomic import atomic_path

__all__ = ["provision", "camera_dropin", "wipe"]


def _ids(user):
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise FirmwareError(f"user {user!r} does not exist (cloud-init's users module should have "
                            "created it; see /var/log/cloud-init.log)") from None
    return pw.pw_uid, pw.pw_gid


def _write(path, data, mode, uid=None, gid=None):
    """Write ``path`` atomically with ``mode`` (and owner) set before the data go in."""
    with atomic_path(path, mode=mode) as tmp:
        if uid is not None and os.geteuid() == 0:
            os.chown(tmp, uid, gid)
        with open(tmp, "wb") as f:
            f.write(data)


def wipe(path):
    """Overwrite ``path`` with zeros, then delete it.

    Deleting a file on FAT only frees its clusters; the key would stay
    readable on the card until something else overwrites them. FAT updates a
    file in place, so writing zeros over it first leaves nothing behind.
    """
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.write(b"\0" * size)
        f.flush()
        os.fsync(f.fileno())
    os.unlink(path)


def camera_dropin(table):
    """The ``offload.service.d/camera.conf`` text for a camera source, or ``None``.

    ``camera = N`` is ``/dev/videoN``; the Pi camera (``picamera``) appears as
    ``/dev/video0`` on a Pi 4 (unicam). The udev rule tags video nodes for
    systemd, so ``dev-videoN.device`` exists once the node does. ``Wants``
    (not ``Requires``): if the camera never appears the service still starts
    after systemd's device timeout and ``offload-run`` says what is wrong.
    """
    if "camera" in table:
        n = int(table["camera"])
    elif "picamera" in table:
        n = 0
    else:
        return None
    unit = f"dev-video{n}.device"
    return ("# Written by offload-firmware provision: start after the camera's device node.\n"
            f"[Unit]\nWants={unit}\nAfter={unit}\n")


def _tls_sources(boot, etc):
    """``{device key: path}`` of the TLS files to use: the card's, else those already in ``etc``.

    Checked here, before anything is written (``firmware.tls``).
    """
    found = {}
    for key, name in tls.FILES.items():
        for folder in (boot, etc):
            if os.path.isfile(os.path.join(folder, name)):
                found[key] = os.path.join(folder, name)
                break
    if "ca-file" in found:
        tls.check_ca(found["ca-file"], what=tls.CA_NAME)
    if "client-key" in found and "client-cert" not in found:
        raise FirmwareError(f"{found['client-key']}: a client key without its certificate "
                            f"({tls.CLIENT_CERT_NAME})")
    if "client-cert" in found:
        tls.check_client(found["client-cert"], found.get("client-key"),
                         what=(tls.CLIENT_CERT_NAME, tls.CLIENT_KEY_NAME))
    return found


def provision(boot, *, root="/", user=USER, echo=print):
    """Apply the settings on the boot partition folder ``boot`` to the system under ``root``.

    Returns the ``offload-run`` table written to ``config.toml``.
    """
    boot = os.fspath(boot)
    etc = os.path.join(root, ETC.lstrip("/"))
    settings_file = os.path.join(boot, settings.SETTINGS_NAME)
    if not os.path.isfile(settings_file):
        raise FirmwareError(f"{settings_file}: missing; the card holds no device settings")
    key_src = os.path.join(boot, settings.KEY_NAME)
    key_dst = os.path.join(etc, settings.KEY_NAME)
    key_path = key_src if os.path.isfile(key_src) else key_dst if os.path.isfile(key_dst) else None
    if key_path is None:
        raise FirmwareError(f"{key_src}: missing; put the device's API key there (one line)")
    has_tpu_model = os.path.isfile(os.path.join(boot, settings.EDGETPU_MODEL_NAME))
    values = settings.load_settings(settings_file)
    tls_paths = _tls_sources(boot, etc)
    table = settings.validate(values, settings_name=settings_file,
                              policy_path=os.path.join(boot, settings.POLICY_NAME),
                              key_path=key_path, has_edgetpu_model=has_tpu_model,
                              require_server=True, tls_files=tuple(tls_paths))
    model = os.path.join(boot, settings.MODEL_NAME)
    if not os.path.isfile(model):
        raise FirmwareError(f"{model}: missing; the weak model must be on the card")
    uid, gid = _ids(user)
    os.makedirs(etc, exist_ok=True)
    os.chmod(etc, 0o750)
    if os.geteuid() == 0:
        os.chown(etc, 0, gid)
    key = settings.read_key_file(key_path)
    _write(key_dst, (key + "\n").encode(), 0o600, uid, gid)
    for src in tls_paths.values():
        dst = os.path.join(etc, os.path.basename(src))
        if src != dst:
            with open(src, "rb") as f:
                _write(dst, f.read(), 0o600, uid, gid)
    header = (f"offload-run settings, written at first boot from {settings_file}.\n"
              "Edit and run 'systemctl restart offload' to change them (docs/device.md).")
    _write(os.path.join(etc, "config.toml"), settings.to_toml(table, header).encode(), 0o640, 0, gid)
    names = [settings.POLICY_NAME, settings.MODEL_NAME] + (
        [settings.EDGETPU_MODEL_NAME] if has_tpu_model else [])
    for name in names:
        with open(os.path.join(boot, name), "rb") as f:
            _write(os.path.join(etc, name), f.read(), 0o644, 0, 0)
    unit_dir = os.path.join(root, "etc/systemd/system")
    os.makedirs(unit_dir, exist_ok=True)
    with open(data_path("offload.service"), "rb") as f:
        _write(os.path.join(unit_dir, "offload.service"), f.read(), 0o644, 0, 0)
    dropin = camera_dropin(table)
    dropin_dir = os.path.join(unit_dir, "offload.service.d")
    dropin_path = os.path.join(dropin_dir, "camera.conf")
    if dropin is not None:
        os.makedirs(dropin_dir, exist_ok=True)
        _write(dropin_path, dropin.encode(), 0o644, 0, 0)
    elif os.path.exists(dropin_path):
        os.unlink(dropin_path)
    rules_dir = os.path.join(root, "etc/udev/rules.d")
    os.makedirs(rules_dir, exist_ok=True)
    with open(data_path("70-offload-coral.rules"), "rb") as f:
        _write(os.path.join(rules_dir, "70-offload-coral.rules"), f.read(), 0o644, 0, 0)
    if key_path == key_src:
        wipe(key_src)
        echo(f"provision: moved the API key to {ETC}/{settings.KEY_NAME} (mode 0600) and removed it "
             "from the boot partition")
    moved = [src for k, src in tls_paths.items() if src == os.path.join(boot, tls.FILES[k])]
    for src in moved:
        wipe(src)
    if moved:
        names = ", ".join(os.path.basename(p) for p in moved)
        echo(f"provision: moved {names} to {ETC} (mode 0600) and removed them from the boot "
             "partition")
    os.sync()
    echo(f"provision: wrote {ETC}/config.toml (server {table.get('server')})")
    return table
