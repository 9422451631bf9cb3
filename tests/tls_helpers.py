"""Certificates for TLS tests on loopback, made by the test (the ``cryptography`` package).

``make_pki(folder)`` writes a small private PKI as PEM files and returns their
paths: a CA, a server certificate for ``127.0.0.1``/``localhost`` (SAN), one
for another host name, an expired one, one signed by another CA, and client
certificates from the CA and from the other CA. Keys are EC P-256 (fast to
make). Nothing here touches the network.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_DAY = datetime.timedelta(days=1)


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _now():
    return datetime.datetime.now(datetime.timezone.utc)


def _write(folder, stem, cert, key):
    cert_path, key_path = os.path.join(folder, stem + ".pem"), os.path.join(folder, stem + ".key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


def make_ca(cn):
    """``(certificate, key)`` of a self-signed CA valid from yesterday for 10 days."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - _DAY).not_valid_after(_now() + 10 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def issue(ca, cn, *, hosts=(), client=False, expired=False):
    """``(certificate, key)`` for ``cn`` signed by ``ca`` (``(cert, key)``).

    ``hosts``: DNS names and IP addresses for the SAN (a server certificate);
    ``client``: a client certificate; ``expired``: valid only until yesterday.
    """
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = ((_now() - 10 * _DAY, _now() - _DAY) if expired
                  else (_now() - _DAY, _now() + 5 * _DAY))
    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(start).not_valid_after(end)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client
                                               else ExtendedKeyUsageOID.SERVER_AUTH]),
                        critical=False))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(ca_key, hashes.SHA256()), key


@dataclass
class PKI:
    """Paths of the PEM files ``make_pki`` wrote; each ``*_cert`` has its ``*_key``."""

    ca: str
    other_ca: str
    server_cert: str
    server_key: str
    wrong_host_cert: str
    wrong_host_key: str
    expired_cert: str
    expired_key: str
    other_ca_server_cert: str
    other_ca_server_key: str
    client_cert: str
    client_key: str
    other_ca_client_cert: str
    other_ca_client_key: str


def make_pki(folder):
    """Write the test PKI into ``folder`` (see the module docstring); returns a :class:`PKI`."""
    folder = os.fspath(folder)
    ca, other = make_ca("offload test CA"), make_ca("some other CA")
    paths = {}
    for name, (cert, _) in (("ca", ca), ("other_ca", other)):
        paths[name] = _write(folder, name, cert, ca[1] if name == "ca" else other[1])[0]
    loopback = ("127.0.0.1", "localhost")
    made = {
        "server": issue(ca, "edge server", hosts=loopback),
        "wrong_host": issue(ca, "elsewhere", hosts=("edge.example.org", "10.9.8.7")),
        "expired": issue(ca, "edge server (expired)", hosts=loopback, expired=True),
        "other_ca_server": issue(other, "edge server (other CA)", hosts=loopback),
        "client": issue(ca, "camera-1", client=True),
        "other_ca_client": issue(other, "camera-x", client=True),
    }
    for stem, (cert, key) in made.items():
        paths[stem + "_cert"], paths[stem + "_key"] = _write(folder, stem, cert, key)
    return PKI(**paths)


def server_context(cert, key, *, client_ca=None):
    """A server-side ``ssl.SSLContext`` presenting ``cert``; with ``client_ca`` it requires a
    client certificate from that CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(client_ca)
    return ctx
