"""TLS on the edge server, with certificates made here by ``offload-serve tls init``.

Loopback only. A client that trusts the private CA talks HTTPS; with
``--tls-client-ca`` a client without a certificate, or with one from another
CA, is refused in the handshake, and a certificate is only good with its own
device's key. ``tls init`` writes keys 0600 and never overwrites without
``--force``; bad certificate files stop ``offload-serve`` with one line.
"""

import datetime
import os
import ssl
import stat
import time

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("uvicorn")
pytest.importorskip("cryptography")
httpx = pytest.importorskip("httpx")

from click.testing import CliRunner  # noqa: E402

from offload import wire  # noqa: E402
from offload.server import KeyStore, Limits, ServerStartError, serve_in_thread  # noqa: E402
from offload.server.cli import main as serve_main  # noqa: E402
from offload.server.tls import TLSConfigError, certificate_expiry, init_fleet, server_context  # noqa: E402

KEY = "tls-test-key-0123456789"
HEADERS = {"Authorization": f"Bearer {KEY}", "Content-Type": "image/png"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Two private CAs: ``a`` (server localhost/127.0.0.1, devices cam1 and cam2) and ``b`` (cam1)."""
    root = tmp_path_factory.mktemp("pki")
    runner = CliRunner()
    r = runner.invoke(serve_main, ["tls", "init", str(root / "a"), "--server-name", "localhost",
                                   "--ip", "127.0.0.1", "--devices", "cam1,cam2"])
    assert r.exit_code == 0, r.output
    init_fleet(str(root / "b"), devices=["cam1"])
    return root


def _client_ctx(pki, ca="a", cert=None):
    ctx = ssl.create_default_context(cafile=str(pki / ca / "ca.pem"))
    # What Python 3.13 (the device's) does by default: certificates must be
    # well-formed X.509 v3 (key identifiers, critical basic constraints).
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    if cert is not None:
        folder, name = cert
        ctx.load_cert_chain(str(pki / folder / "devices" / f"{name}.pem"),
                            str(pki / folder / "devices" / f"{name}.key"))
    return ctx


def _tls_server(strong_model, pki, client_ca=False, keys=None, **kw):
    a = pki / "a"
    return serve_in_thread(strong_model, api_key=KEY, keys=keys, tls_cert=str(a / "server.pem"),
                           tls_key=str(a / "server.key"),
                           tls_client_ca=str(a / "ca.pem") if client_ca else None, **kw)


def _metric(server, name, **labels):
    value = server.app.state.service.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def _wait_for(predicate, timeout=15.0):
    """The server counts a failed handshake just after the client sees it: poll (bounded)."""
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_tls_init_files_modes_and_chain(pki):
    a = pki / "a"
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    assert names == ["ca.key", "ca.pem", "devices/cam1.key", "devices/cam1.pem",
                     "devices/cam2.key", "devices/cam2.pem", "server.key", "server.pem"]
    for n in names:
        mode = stat.S_IMODE(os.stat(a / n).st_mode)
        assert mode == (0o600 if n.endswith(".key") else 0o644), n
    assert not [p for p in a.rglob(".*")]  # no temporary files left
    now = datetime.datetime.now(datetime.timezone.utc)
    assert 3649 <= (certificate_expiry(a / "ca.pem") - now).days <= 3650
    assert 729 <= (certificate_expiry(a / "server.pem") - now).days <= 730


def test_tls_init_never_overwrites_without_force_and_reuses_the_ca(pki, tmp_path):
    folder = tmp_path / "f"
    init_fleet(str(folder), server_names=["edge"], devices=["cam1"])
    ca = (folder / "ca.pem").read_bytes()
    cam1 = (folder / "devices" / "cam1.pem").read_bytes()
    r = CliRunner().invoke(serve_main, ["tls", "init", str(folder), "--devices", "cam1,cam3"])
    assert r.exit_code == 1 and "cam1.pem" in r.output and "--force" in r.output
    assert not (folder / "devices" / "cam3.pem").exists()  # checked before writing anything
    r = CliRunner().invoke(serve_main, ["tls", "init", str(folder), "--devices", "cam3"])
    assert r.exit_code == 0 and "cam3.pem" in r.output
    r = CliRunner().invoke(serve_main, ["tls", "init", str(folder), "--devices", "cam1", "--force"])
    assert r.exit_code == 0
    assert (folder / "devices" / "cam1.pem").read_bytes() != cam1
    assert (folder / "ca.pem").read_bytes() == ca


@pytest.mark.parametrize("args, message", [
    (["--devices", "bad name"], "bad device name"),
    (["--ip", "10.0.0.300"], "does not appear to be an IPv4 or IPv6 address"),
    ([], "nothing to issue"),
    (["--devices", "cam1", "--days", "5000"], "within the CA"),
])
def test_tls_init_bad_input_is_one_line(tmp_path, args, message):
    r = CliRunner().invoke(serve_main, ["tls", "init", str(tmp_path / "x")] + args)
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x").exists()


def test_https_with_the_ca(strong_model, pki, frame):
    with _tls_server(strong_model, pki) as srv:
        assert srv.url.startswith("https://127.0.0.1:")
        with httpx.Client(verify=_client_ctx(pki)) as c:
            r = c.post(srv.url + wire.CLASSIFY_PATH, content=frame, headers=HEADERS)
            assert r.status_code == 200 and wire.parse_answer(r.content).top1 == 9
            r = c.post(srv.url + wire.CLASSIFY_PATH, content=frame, headers=HEADERS)
            assert r.status_code == 200  # the same (kept-alive) connection
        # A client with another CA does not trust this server.
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(srv.url + wire.HEALTH_PATH, verify=_client_ctx(pki, ca="b"))
        # Plain HTTP to the TLS port gets nothing useful and does not hang the server.
        with pytest.raises(httpx.HTTPError):
            httpx.get(srv.url.replace("https://", "http://") + wire.HEALTH_PATH, timeout=10)
        with httpx.Client(verify=_client_ctx(pki)) as c:
            assert c.get(srv.url + wire.HEALTH_PATH).status_code == 200


def test_client_certificate_required_when_client_ca_set(strong_model, pki, frame):
    keys = KeyStore.single(KEY, name="cam1")
    with _tls_server(strong_model, pki, client_ca=True, keys=keys) as srv:
        with httpx.Client(verify=_client_ctx(pki, cert=("a", "cam1"))) as c:
            r = c.post(srv.url + wire.CLASSIFY_PATH, content=frame, headers=HEADERS)
            assert r.status_code == 200
        for ctx in (_client_ctx(pki), _client_ctx(pki, cert=("b", "cam1"))):
            # No certificate, or one from another CA: the handshake fails
            # (TLS 1.3 reports it on the first read, hence any HTTPError).
            with pytest.raises(httpx.HTTPError):
                httpx.post(srv.url + wire.CLASSIFY_PATH, content=frame, headers=HEADERS,
                           verify=ctx, timeout=10)
        _wait_for(lambda: _metric(srv, "offload_tls_failures_total", error="certificate") == 2)
        # cam2's certificate with cam1's key: 401, a copied key alone does not pass.
        with httpx.Client(verify=_client_ctx(pki, cert=("a", "cam2"))) as c:
            r = c.post(srv.url + wire.CLASSIFY_PATH, content=frame, headers=HEADERS)
            assert r.status_code == 401 and "certificate" in r.json()["error"]


def test_tls_handshake_is_under_the_head_deadline(strong_model, pki):
    import socket

    with _tls_server(strong_model, pki, limits=Limits(head_timeout=0.4)) as srv:
        port = int(srv.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
            assert s.recv(100) == b""  # silent: closed by the deadline, no plaintext 408
        assert _metric(srv, "offload_deadline_hits_total", phase="head") == 1


def test_expired_server_certificate_is_refused_by_a_client(strong_model, tmp_path):
    old = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=800)
    init_fleet(str(tmp_path), server_names=["localhost"], ips=["127.0.0.1"], days=730, now=old)
    with serve_in_thread(strong_model, api_key=KEY, tls_cert=str(tmp_path / "server.pem"),
                         tls_key=str(tmp_path / "server.key")) as srv:
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        with pytest.raises(httpx.ConnectError, match="expired"):
            httpx.get(srv.url + wire.HEALTH_PATH, verify=ctx)


def test_bad_certificate_files_are_one_clear_error(pki, tmp_path):
    a, b = pki / "a", pki / "b"
    with pytest.raises(TLSConfigError, match="does not belong to the certificate"):
        server_context(str(a / "server.pem"), str(b / "devices" / "cam1.key"))
    with pytest.raises(TLSConfigError, match="cannot read the TLS certificate"):
        server_context(str(tmp_path / "missing.pem"), str(a / "server.key"))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(TLSConfigError, match="cannot load the TLS certificate"):
        server_context(str(garbage), str(a / "server.key"))
    with pytest.raises(TLSConfigError, match="cannot load the client CA"):
        server_context(str(a / "server.pem"), str(a / "server.key"), client_ca=str(garbage))
    with pytest.raises(ServerStartError, match="give both --tls-cert and --tls-key"):
        serve_in_thread(tls_cert=str(a / "server.pem"), api_key=KEY)


@pytest.mark.parametrize("flags, message", [
    (["--tls-cert", "{a}/server.pem", "--tls-key", "{b}/devices/cam1.key"], "does not belong"),
    (["--tls-cert", "{a}/nope.pem", "--tls-key", "{a}/server.key"], "cannot read the TLS certificate"),
    (["--tls-client-ca", "{a}/ca.pem"], "--tls-client-ca needs --tls-cert"),
    (["--head-timeout", "0"], "--head-timeout"),
    (["--max-connections", "0"], "--max-connections"),
])
def test_serve_refuses_to_start_on_bad_tls_or_limits(pki, tmp_path, flags, message):
    flags = [f.format(a=pki / "a", b=pki / "b") for f in flags]
    keys = tmp_path / "keys.toml"
    assert CliRunner().invoke(serve_main, ["keys", "add", "cam1", "--keys", str(keys)]).exit_code == 0
    r = CliRunner().invoke(serve_main, ["--keys", str(keys), "--port", "0"] + flags)
    assert r.exit_code in (1, 2) and message in r.output and "Traceback" not in r.output
