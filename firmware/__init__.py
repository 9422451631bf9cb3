"""``offload-firmware``: a flashable Raspberry Pi OS image that boots into the offloading device.

The build never mounts anything and needs no root: it reads the image's MBR
with ``sfdisk --json``, the root file system with ``debugfs`` (read only) and
edits the FAT boot partition in place with ``mtools``, on a copy of the input
image. What it writes there is picked up at first boot by cloud-init, which
Raspberry Pi OS reads from the boot partition since its Debian 13 (trixie)
releases (October 2025 onwards). docs/firmware.md has the whole story.

Modules, one concept each:

* ``tools``: running the external tools, one clear error when one is missing;
* ``image``: the partition table and what the image holds (release, Python);
* ``fat``: files on the FAT boot partition through mtools;
* ``settings``: the per-device settings file, validated with the device's own
  ``offload.device.config.make_config``;
* ``tls``: the CA and client certificate the device carries, and the plain-HTTP rule;
* ``yamlout``: a tiny block-style YAML emitter for the cloud-init documents;
* ``cloudinit``: ``user-data`` and ``network-config``;
* ``edgetpu``: the libedgetpu build that pairs with our LiteRT, and .deb checks;
* ``wheels``: the offline wheel folder (fetching it, checking it; the aarch64 platform tags);
* ``sysroot``: an arm64 CPython unpacked from Debian packages, run under qemu-aarch64;
* ``crosswheel``: our aarch64 wheel, cross-compiled and retagged;
* ``payload``: everything that goes on the boot partition;
* ``build``: input image -> output image, atomically;
* ``provision``: first boot on the Pi (settings -> /etc/offload);
* ``cli``: the ``offload-firmware`` command.
"""

#: Where things live on the device; the unit and the first-boot script use the same paths.
BOOT_DIR = "offload"                      # folder on the boot partition
VENV = "/opt/offload/venv"
ETC = "/etc/offload"
LOG_DIR = "/var/log/offload"
USER = "offload"
