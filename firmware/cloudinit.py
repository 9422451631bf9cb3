"""The cloud-init documents the image's first boot reads from the boot partition.

Raspberry Pi OS trixie images (October 2025 on) run cloud-init with the
NoCloud data source on the boot partition: ``meta-data`` (left as the image
has it), ``user-data`` and ``network-config`` (both written here, replacing
the image's commented examples).

``user-data`` creates the unprivileged ``offload`` system user (groups
``video`` for the camera and ``plugdev`` for the Coral, whose udev rule the
first-boot script installs), optionally an administrator with an SSH key,
and runs ``offload/firstboot.sh`` from the boot partition once. It lists
users explicitly, so cloud-init creates no default user: give
``--admin-user`` and ``--ssh-key`` to be able to log in.
"""

from __future__ import annotations

import re

from firmware import BOOT_DIR, USER
from firmware.tools import FirmwareError
from firmware.yamlout import dump

__all__ = ["BOOT_MOUNT", "user_data", "network_config", "check_user_name", "check_ssh_key"]

#: Where Raspberry Pi OS (bookworm and later) mounts the boot partition.
BOOT_MOUNT = "/boot/firmware"
_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_SSH = re.compile(r"^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp\d+|sk-[a-z0-9@.-]+) [A-Za-z0-9+/=]+( .*)?$")


def check_user_name(name):
    """Refuse a login name Debian's useradd would refuse, or one the system already uses."""
    if not _USER.match(name or ""):
        raise FirmwareError(f"--admin-user {name!r}: must be lower case letters, digits, _ or -, "
                            "starting with a letter, at most 32 characters")
    if name in (USER, "root"):
        raise FirmwareError(f"--admin-user {name!r}: taken by the system; choose another name")
    return name


def check_ssh_key(text, path):
    """The public keys (one a line) in ``text``; refuse anything that is not an OpenSSH public key."""
    keys = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if not keys:
        raise FirmwareError(f"--ssh-key {path}: no public key in it")
    for k in keys:
        if not _SSH.match(k):
            raise FirmwareError(f"--ssh-key {path}: not an OpenSSH public key line "
                                "(give the .pub file, never the private key)")
    return keys


def user_data(*, admin_user=None, ssh_keys=None, wifi_country=None):
    """The ``user-data`` text (``#cloud-config``)."""
    users = [{
        "name": USER,
        "gecos": "offload camera device",
        "system": True,
        "no_create_home": True,
        "shell": "/usr/sbin/nologin",
        "lock_passwd": True,
        "groups": ["video", "plugdev"],
    }]
    runcmd = []
    doc = {}
    if admin_user:
        users.append({
            "name": admin_user,
            "gecos": "offload administrator",
            "shell": "/bin/bash",
            "lock_passwd": True,
            "groups": ["sudo", "adm", "video", "plugdev"],
            "sudo": "ALL=(ALL) NOPASSWD:ALL",
            "ssh_authorized_keys": list(ssh_keys or []),
        })
        doc["ssh_pwauth"] = False
        # Raspberry Pi OS ships sshd disabled.
        runcmd.append(["systemctl", "enable", "--now", "ssh"])
    if wifi_country:
        runcmd.append(["raspi-config", "nonint", "do_wifi_country", wifi_country])
    runcmd.append(["bash", f"{BOOT_MOUNT}/{BOOT_DIR}/firstboot.sh"])
    doc = {"users": users, **doc, "runcmd": runcmd}
    header = ("#cloud-config\n# offload camera device, written by offload-firmware build "
              "(docs/firmware.md).\n# The device settings are in offload/device.toml beside this file.")
    return dump(doc, header=header)


def network_config(*, wifi_ssid=None, wifi_password=None):
    """The ``network-config`` text (network config version 2): wired DHCP, and Wi-Fi when given."""
    net = {"version": 2,
           "ethernets": {"eth0": {"dhcp4": True, "optional": True}}}
    if wifi_ssid is not None:
        if not wifi_ssid or len(wifi_ssid.encode("utf-8")) > 32:
            raise FirmwareError("--wifi-ssid: must be 1 to 32 bytes")
        ap = {}
        if wifi_password is not None:
            if not 8 <= len(wifi_password) <= 63:
                raise FirmwareError("--wifi-password-file: a WPA passphrase has 8 to 63 characters")
            ap["password"] = wifi_password
        net["wifis"] = {"wlan0": {"dhcp4": True, "optional": True,
                                  "access-points": {wifi_ssid: ap}}}
    header = "# offload camera device network, written by offload-firmware build (docs/firmware.md)."
    return dump({"network": net}, header=header)
