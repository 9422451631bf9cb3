"""TLS for the edge server: its ``ssl.SSLContext``, and a private CA for a small fleet.

:func:`server_context` loads ``--tls-cert``/``--tls-key`` (and ``--tls-client-ca``)
and turns every unreadable, malformed or mismatched file into one
:class:`TLSConfigError` line. :func:`init_fleet` (``offload-serve tls init``)
writes, with the ``cryptography`` package::

    DIR/ca.pem  ca.key                  private CA, 10 years (CA_DAYS)
    DIR/server.pem  server.key          server certificate: SANs for the names and IPs given
    DIR/devices/NAME.pem  NAME.key      one client certificate per device, CN = NAME

Leaf certificates last 2 years (LEAF_DAYS). Keys are ECDSA P-256 (small, and
the cheapest handshake on a Pi), written atomically with mode 0600;
certificates 0644. An existing CA in DIR is reused (so the same command adds
devices or re-issues the server certificate), never overwritten; an existing
leaf file is overwritten only with ``force``. Everything is checked before
anything is written.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import ssl

from offload.atomic import atomic_path

__all__ = ["TLSConfigError", "server_context", "init_fleet", "CA_DAYS", "LEAF_DAYS"]

#: Lifetime of the private CA, days (10 years).
CA_DAYS = 3650
#: Lifetime of server and device certificates, days (2 years).
LEAF_DAYS = 730
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")  # the key-name rule of offload.server.keys


class TLSConfigError(ValueError):
    """A certificate or key file is missing, unreadable, malformed or does not match."""


def _readable(path, what):
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise TLSConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


def server_context(cert, key, *, client_ca=None):
    """The server's ``ssl.SSLContext`` (TLS 1.2 or later) from PEM files.

    ``client_ca``: a CA bundle; when given, a client must present a
    certificate that chains to it, or the handshake fails.
    Raises :class:`TLSConfigError` with one line naming the file and the fault.
    """
    _readable(cert, "TLS certificate (--tls-cert)")
    _readable(key, "TLS key (--tls-key)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise TLSConfigError(f"the TLS key {key} does not belong to the certificate {cert}") from None
        raise TLSConfigError(f"cannot load the TLS certificate {cert} with key {key} "
                             f"(not PEM, or encrypted?): {exc.reason or exc}") from None
    if client_ca is not None:
        _readable(client_ca, "client CA (--tls-client-ca)")
        try:
            ctx.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as exc:
            raise TLSConfigError(f"cannot load the client CA {client_ca}: {exc.reason or exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def certificate_expiry(path):
    """``datetime`` (UTC) when the first certificate in PEM file ``path`` expires."""
    from cryptography import x509

    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read()).not_valid_after_utc


# -- offload-serve tls init ------------------------------------------------
def _write(path, data, mode):
    with atomic_path(path, mode=mode) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def _key_pem(key):
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert):
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _issue(subject_cn, public_key, issuer, issuer_key, days, *, ca=False, sans=(), usage=None,
           now=None):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = now or datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    b = (x509.CertificateBuilder().subject_name(name)
         .issuer_name(name if issuer is None else issuer.subject)
         .public_key(public_key).serial_number(x509.random_serial_number())
         # a minute back: a device whose clock is a little behind still accepts it
         .not_valid_before(now - datetime.timedelta(minutes=1))
         .not_valid_after(now + datetime.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
             issuer_key.public_key()), critical=False))
    if ca:
        b = b.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        b = b.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=False, crl_sign=False, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _new_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _load_ca(cert_path, key_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        with open(cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise TLSConfigError(f"cannot reuse the CA in {os.path.dirname(cert_path)}: {exc}") from None
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise TLSConfigError(f"{key_path} is not the key of {cert_path}")
    return cert, key


def _checked_request(server_names, ips, devices, *, days, ca_days):
    """The server's IP addresses, after checking every name, address and lifetime of a request."""
    try:
        addresses = [ipaddress.ip_address(a) for a in ips]
    except ValueError as exc:
        raise TLSConfigError(str(exc)) from None
    for n in server_names:
        if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]{0,252})", n):
            raise TLSConfigError(f"bad server name {n!r}: letters, digits, '.', '-'")
    for d in devices:
        if not _NAME.match(d):
            raise TLSConfigError(f"bad device name {d!r}: 1-64 letters, digits, '.', '_', '-' "
                                 f"(the name of its API key)")
    if len(set(devices)) != len(devices):
        raise TLSConfigError("a device name is given twice")
    if not (server_names or addresses or devices):
        raise TLSConfigError("nothing to issue: give --server-name/--ip and/or --devices")
    if not (0 < days <= ca_days):
        raise TLSConfigError(f"leaf lifetime {days} days must be > 0 and within the CA's {ca_days}")
    return addresses


def init_fleet(folder, *, server_names=(), ips=(), devices=(), force=False,
               ca_days=CA_DAYS, days=LEAF_DAYS, now=None):
    """Create (or extend) a private CA in ``folder`` with a server and device certificates.

    Parameters
    ----------
    folder : str
        Output directory (created if needed).
    server_names : sequence of str
        DNS names of the server; the first is its CN. With ``ips``, the SANs of
        ``server.pem``; no server certificate when both are empty.
    ips : sequence of str
        IP addresses of the server (SANs).
    devices : sequence of str
        Device names (the names of their API keys): one client certificate each.
    force : bool
        Overwrite existing server/device files (the CA is never overwritten).
    ca_days, days : int
        Lifetimes of a new CA and of the leaf certificates, days.
    now : datetime, optional
        The issue time (UTC); tests make expired certificates with it.

    Returns the list of ``(path, what)`` written, in order. Raises
    :class:`TLSConfigError` (nothing written) on a bad name or address, or a
    file that exists without ``force``.
    """
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    server_names, devices = list(server_names), list(devices)
    addresses = _checked_request(server_names, ips, devices, days=days, ca_days=ca_days)

    ca_cert_path, ca_key_path = os.path.join(folder, "ca.pem"), os.path.join(folder, "ca.key")
    have_ca = os.path.exists(ca_cert_path) or os.path.exists(ca_key_path)
    leaves = []
    if server_names or addresses:
        leaves.append(("server", os.path.join(folder, "server")))
    leaves += [(d, os.path.join(folder, "devices", d)) for d in devices]
    clash = [p + ext for _, p in leaves for ext in (".pem", ".key") if os.path.exists(p + ext)]
    if clash and not force:
        raise TLSConfigError(f"{', '.join(clash)} exist; --force overwrites them "
                             f"(the CA is reused, never overwritten)")

    written = []
    if have_ca:
        ca_cert, ca_key = _load_ca(ca_cert_path, ca_key_path)
    else:
        ca_key = _new_key()
        ca_cert = _issue(f"offload private CA ({os.path.basename(os.path.abspath(folder))})",
                         ca_key.public_key(), None, ca_key, ca_days, ca=True, now=now)
        os.makedirs(folder, exist_ok=True)
        _write(ca_key_path, _key_pem(ca_key), 0o600)
        _write(ca_cert_path, _cert_pem(ca_cert), 0o644)
        written += [(ca_key_path, "CA key (keep it offline; it signs new certificates)"),
                    (ca_cert_path, f"CA certificate, {ca_days} days: --tls-client-ca of the "
                                   f"server, --ca-file of the devices")]
    for name, stem in leaves:
        key = _new_key()
        if name == "server":
            sans = [x509.DNSName(n) for n in server_names] + [x509.IPAddress(a) for a in addresses]
            cn = server_names[0] if server_names else str(addresses[0])
            cert = _issue(cn, key.public_key(), ca_cert, ca_key, days, sans=sans,
                          usage=ExtendedKeyUsageOID.SERVER_AUTH, now=now)
            what = f"server certificate, {days} days, for {', '.join(map(str, server_names + addresses))}"
        else:
            cert = _issue(name, key.public_key(), ca_cert, ca_key, days,
                          usage=ExtendedKeyUsageOID.CLIENT_AUTH, now=now)
            what = f"client certificate of device {name!r}, {days} days"
        _write(stem + ".key", _key_pem(key), 0o600)
        _write(stem + ".pem", _cert_pem(cert), 0o644)
        written += [(stem + ".key", f"{name} key"), (stem + ".pem", what)]
    return written
