"""``offload-firmware``: build a flashable Raspberry Pi image, fetch its wheels, provision at first boot.

::

    offload-firmware fetch-wheels wheels/ --python 3.13    # dependencies + our wheel, cross-compiled
    offload-firmware wheel dist/ --python 3.13             # our aarch64 wheel alone
    offload-firmware build raspios-trixie-arm64-lite.img cam.img --settings device.toml \\
        --key-file cam1.key --ca-file tls/ca.pem --wheels wheels/ \\
        --edgetpu-deb libedgetpu1-std_16.0tf2.19.1-1.bookworm_arm64.deb
    offload-firmware provision --boot /boot/firmware/offload     # on the Pi, at first boot

Bad input gives one ``Error: ...`` line and exit status 1, never a traceback
(``offload.commandline.user_errors``; a ``FirmwareError`` is a ``ValueError``).
"""

from __future__ import annotations

import os

import click

from firmware.tools import FirmwareError
from offload.commandline import user_errors

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Flashable Raspberry Pi OS image for the offloading camera device (docs/firmware.md)."""


_file = click.Path(dir_okay=False)


@main.command()
@click.argument("input_image", type=_file)
@click.argument("output_image", type=_file)
@click.option("--settings", "settings_file", type=_file,
              help="Device settings TOML (offload-run keys + rate/depth); copied to offload/device.toml.")
@click.option("--key-file", type=_file, help="The device's API key (one line); moved to /etc/offload, mode 0600, at first boot.")
@click.option("--wheels", "wheels_dir", required=True, type=click.Path(file_okay=False),
              help="Folder from 'offload-firmware fetch-wheels': our aarch64 wheel and its dependencies'.")
@click.option("--policy", type=_file, help="Policy blob [default: the committed policy.bin].")
@click.option("--model", type=_file, help="Weak model .tflite [default: the committed weak_int8.tflite].")
@click.option("--edgetpu-model", type=_file, help="The weak model compiled by edgetpu_compiler (optional).")
@click.option("--edgetpu-deb", type=_file, help="libedgetpu1-std arm64 .deb (the build paired with our LiteRT: see docs/firmware.md).")
@click.option("--admin-user", help="Login user to create (with --ssh-key); none by default.")
@click.option("--ssh-key", type=_file, help="OpenSSH public key file for --admin-user; enables sshd.")
@click.option("--wifi-ssid", help="Wi-Fi network to join (wired DHCP is always on).")
@click.option("--wifi-password-file", type=_file, help="File holding the Wi-Fi passphrase (first line).")
@click.option("--wifi-country", help="Wi-Fi regulatory country, two letters (e.g. GB).")
@click.option("--ca-file", type=_file,
              help="PEM CA certificate(s) the https:// server's certificate must chain to (e.g. "
                   "offload-serve tls init's ca.pem); moved to /etc/offload, 0600, at first boot.")
@click.option("--client-cert", type=_file,
              help="PEM client certificate of the device, for a server with --tls-client-ca.")
@click.option("--client-key", type=_file,
              help="PEM private key of --client-cert (checked to be its pair), unencrypted.")
@click.option("--allow-plain-http", is_flag=True,
              help="Allow an http:// server that is not on loopback (images and API key in the "
                   "clear on the network); refused without it.")
@click.option("--force", is_flag=True, help="Replace OUTPUT_IMAGE if it exists.")
def build(input_image, output_image, force, **options):
    """Write OUTPUT_IMAGE: INPUT_IMAGE (Raspberry Pi OS Lite arm64, trixie or later, uncompressed) plus the device.

    INPUT_IMAGE is never modified; OUTPUT_IMAGE appears only when complete.
    """
    from firmware.build import build as run_build

    with user_errors():
        summary = run_build(input_image, output_image, force=force, echo=click.echo, **options)
    click.echo(f"wrote {summary['output']}: {summary['release']}, Python {summary['python']}, "
               f"{summary['files']} files ({summary['bytes'] / 1e6:.1f} MB) on the boot partition, "
               f"{summary['free_after'] / 1e6:.1f} MB left free")
    click.echo("flash it with rpi-imager (no OS customisation) or dd; see docs/firmware.md")


def _python_option(python):
    if not python.count(".") == 1 or not all(x.isdigit() for x in python.split(".")):
        raise FirmwareError(f"--python {python!r}: give MAJOR.MINOR, e.g. 3.13")
    return python


@main.command("fetch-wheels")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--python", "python", default="3.13", show_default=True,
              help="The image's Python (Raspberry Pi OS trixie: 3.13).")
@click.option("--glibc", default=None,
              help="The image's glibc, MAJOR.MINOR: wheels tagged manylinux_2_17 up to it are "
                   "accepted [default: 2.41, trixie's].")
@click.option("--source", default=".", show_default=True, type=click.Path(file_okay=False),
              help="The offload checkout to cross-compile our wheel from.")
@click.option("--offload-wheel", type=_file,
              help="Use this aarch64 offload wheel instead of cross-compiling one.")
def fetch_wheels(folder, python, glibc, source, offload_wheel):
    """Fill FOLDER with aarch64 wheels (needs the network) and the offload wheel, cross-compiled."""
    from firmware import crosswheel, wheels

    with user_errors():
        python = _python_option(python)
        target = wheels.parse_glibc(glibc) if glibc else wheels.TARGET_GLIBC
        files = crosswheel.fetch(folder, python, os.path.abspath(source), glibc=target,
                             offload_wheel=offload_wheel, echo=click.echo)
    click.echo(f"{folder}: {len(files)} wheels ready for CPython {python} aarch64")


@main.command("wheel")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--python", "python", default="3.13", show_default=True,
              help="The target's CPython (Raspberry Pi OS trixie: 3.13; bookworm: 3.11).")
@click.option("--source", default=".", show_default=True, type=click.Path(file_okay=False),
              help="The offload checkout.")
def wheel(folder, python, source):
    """Cross-compile the offload wheel for a Raspberry Pi 4 (aarch64) into FOLDER."""
    from firmware import crosswheel

    with user_errors():
        crosswheel.build(os.path.abspath(source), folder, python=_python_option(python),
                         echo=click.echo)


@main.command()
@click.option("--boot", default="/boot/firmware/offload", show_default=True,
              type=click.Path(file_okay=False), help="The offload folder on the boot partition.")
@click.option("--root", default="/", show_default=True, type=click.Path(file_okay=False),
              help="System root to write under (tests use a scratch folder).")
@click.option("--user", default="offload", show_default=True, help="The service user.")
def provision(boot, root, user):
    """First boot on the Pi: validate the card's settings and write /etc/offload (run as root)."""
    from firmware.provision import provision as run_provision

    with user_errors():
        run_provision(boot, root=root, user=user, echo=click.echo)


if __name__ == "__main__":  # python -m firmware.cli (tools/aarch64_twins.sh)
    main()
