"""TLS material the image carries: the CA the device trusts, and its client certificate and key.

They travel like the API key: ``offload-firmware build --ca-file --client-cert
--client-key`` checks them and puts them on the boot partition as
``offload/ca.pem``, ``offload/client.pem`` and ``offload/client.key``; first
boot (``firmware.provision``) checks them again, copies them to
``/etc/offload`` with mode 0600 (owner offload), points the device's
``ca-file``/``client-cert``/``client-key`` at those copies, and wipes them
from the card. The checks use the standard library's ``ssl`` (a PEM
certificate that loads; a certificate and key that form a pair), and, where
the ``cryptography`` package is installed, refuse a certificate that has
expired or is not yet valid.

Plain HTTP: the device sends its API key and every offloaded image with
each request, so over ``http://`` anyone on the network can read the images
and copy the key. ``check_server`` refuses an ``http://`` server that is not
on loopback unless the settings say ``allow-plain-http = true`` (what
``build --allow-plain-http`` writes).
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import ssl
from urllib.parse import urlsplit

from firmware.tools import FirmwareError

__all__ = ["CA_NAME", "CLIENT_CERT_NAME", "CLIENT_KEY_NAME", "FILES", "ALLOW_PLAIN_HTTP",
           "read_pem", "check_ca", "check_client", "check_server", "is_loopback"]

CA_NAME = "ca.pem"
CLIENT_CERT_NAME = "client.pem"
CLIENT_KEY_NAME = "client.key"
#: Device key -> file name on the boot partition and in /etc/offload.
FILES = {"ca-file": CA_NAME, "client-cert": CLIENT_CERT_NAME, "client-key": CLIENT_KEY_NAME}
#: The firmware-only settings key that lets a non-loopback server be http://.
ALLOW_PLAIN_HTTP = "allow-plain-http"
_MAX_PEM = 1 << 20  # bytes; a CA bundle is a few kB
_CERT = b"-----BEGIN CERTIFICATE-----"


def read_pem(path, what):
    """The bytes of the PEM file ``path`` (at most 1 MiB, ASCII, with a ``-----BEGIN`` line)."""
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_PEM + 1)
    except OSError as e:
        raise FirmwareError(f"{what} {path}: cannot read ({e.strerror})") from None
    if len(data) > _MAX_PEM:
        raise FirmwareError(f"{what} {path}: larger than 1 MiB, not a PEM file")
    try:
        data.decode("ascii")
    except UnicodeDecodeError:
        raise FirmwareError(f"{what} {path}: not a PEM file (binary DER? convert it with "
                            "openssl x509 -inform der -out FILE.pem)") from None
    if b"-----BEGIN " not in data:
        raise FirmwareError(f"{what} {path}: not a PEM file (no -----BEGIN line)")
    return data


def _check_dates(data, what, path):
    """Refuse an expired or not yet valid certificate (only where ``cryptography`` is installed)."""
    try:
        from cryptography import x509
    except ImportError:  # the stdlib checks stand alone
        return
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise FirmwareError(f"{what} {path}: not a readable certificate ({e})") from None
    now = _dt.datetime.now(_dt.timezone.utc)
    for c in certs:
        subject = c.subject.rfc4514_string() or "(no subject)"
        if c.not_valid_after_utc <= now:
            raise FirmwareError(f"{what} {path}: the certificate {subject} expired on "
                                f"{c.not_valid_after_utc:%Y-%m-%d}; issue a new one")
        if c.not_valid_before_utc > now:
            raise FirmwareError(f"{what} {path}: the certificate {subject} is not valid before "
                                f"{c.not_valid_before_utc:%Y-%m-%d} (check this computer's clock)")


def check_ca(path, what="--ca-file"):
    """The bytes of a CA file: PEM certificate(s) that ``ssl`` loads as trust anchors."""
    data = read_pem(path, what)
    if _CERT not in data:
        raise FirmwareError(f"{what} {path}: holds no certificate (give the CA's ca.pem, "
                            "never its key)")
    if b"PRIVATE KEY-----" in data:
        raise FirmwareError(f"{what} {path}: holds a private key; the device needs only the CA "
                            "certificate (ca.pem), never the CA's key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_verify_locations(cadata=data.decode("ascii"))
    except ssl.SSLError as e:
        raise FirmwareError(f"{what} {path}: not a usable CA certificate ({e.reason or e})") from None
    _check_dates(data, what, path)
    return data


def _no_passphrase():
    raise FirmwareError("the private key is encrypted; the device cannot type a passphrase at "
                        "boot: give an unencrypted key (the file stays mode 0600 on the device)")


def check_client(cert_path, key_path=None, *, what=("--client-cert", "--client-key")):
    """``(cert_bytes, key_bytes or None)`` of a client certificate and its key, checked as a pair.

    ``key_path`` None: the key must be in the certificate file. ``ssl``'s
    ``load_cert_chain`` on a throw-away context proves the key is the
    certificate's.
    """
    cert = read_pem(cert_path, what[0])
    if _CERT not in cert:
        raise FirmwareError(f"{what[0]} {cert_path}: holds no certificate")
    key = read_pem(key_path, what[1]) if key_path is not None else None
    if key is not None and b"PRIVATE KEY-----" not in key:
        raise FirmwareError(f"{what[1]} {key_path}: holds no private key")
    if key is None and b"PRIVATE KEY-----" not in cert:
        raise FirmwareError(f"{what[0]} {cert_path}: holds no private key; give {what[1]} too")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_cert_chain(cert_path, key_path, password=_no_passphrase)
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" in str(e):
            raise FirmwareError(f"{what[1]} {key_path}: is not the key of the certificate in "
                                f"{cert_path}") from None
        raise FirmwareError(f"{what[0]} {cert_path}: certificate and key do not load "
                            f"({e.reason or e})") from None
    except FirmwareError as e:
        raise FirmwareError(f"{what[1] if key_path else what[0]} {key_path or cert_path}: "
                            f"{e}") from None
    _check_dates(cert, what[0], cert_path)
    return cert, key


def is_loopback(host):
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_server(url, *, allow_plain_http, settings_name):
    """Refuse a plain ``http://`` server that is not on loopback, unless allowed."""
    if url is None:
        return
    u = urlsplit(url)
    if u.scheme != "http" or is_loopback(u.hostname) or allow_plain_http:
        return
    raise FirmwareError(
        f"settings {settings_name}: server: {url} is plain HTTP to another machine: anyone on "
        "that network can read the offloaded images and copy the API key. Serve TLS "
        "(offload-serve --tls-cert/--tls-key) and use https:// with --ca-file (docs/firmware.md); "
        "on a network you trust, give --allow-plain-http (allow-plain-http = true in device.toml)")
