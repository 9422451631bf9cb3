"""The device over TLS, on loopback with certificates the test makes (tests/tls_helpers.py).

The device sends only when the server's chain and host name verify against
``ca-file``; every other case (wrong CA, wrong host name, expired, no TLS at
all behind an ``https://`` URL, a client certificate missing or from another
CA) is refused, recorded ``tls-error`` with nothing sent, and said once.
"""

import pytest

from offload.blob import read_blob
from offload.device import make_config, run
from offload.device.config import ConfigError
from offload.device.framelog import read_log
from offload.device.record import Outcome
from offload.device.sender import Sender, is_loopback

from device_helpers import CLIP, DQN, KEY, MODEL, FakeServer, check_log, tiny_images
from tls_helpers import make_pki, server_context


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _results(snd, n, timeout=10.0):
    return [snd.results.get(timeout=timeout) for _ in range(n)]


def _send_some(url, n=3, **kw):
    """Submit ``n`` frames one after another; (results, warnings, sender still alive)."""
    said = []
    kw.setdefault("connect_timeout", 0.5)
    snd = Sender(url, KEY, read_timeout=2.0, warn=said.append, **kw)
    try:
        res = []
        for k, img in enumerate(tiny_images(n)):
            assert snd.submit(k, img)
            res += _results(snd, 1)
        alive = snd.alive
    finally:
        snd.close(timeout=0.0)
    return res, said, alive


def test_sends_when_the_chain_verifies_over_one_kept_alive_connection(pki):
    srv = FakeServer(tls=server_context(pki.server_cert, pki.server_key))
    try:
        res, said, alive = _send_some(srv.url, n=5, ca_file=pki.ca)
    finally:
        srv.kill()
    assert [r.outcome for r in res] == [Outcome.SENT] * 5 and said == [] and alive
    assert [q["frame_id"] for q in srv.requests] == ["0", "1", "2", "3", "4"]
    assert {q["auth"] for q in srv.requests} == {f"Bearer {KEY}"}
    assert len(srv.connections) == 1 and srv.tls_failures == []


def test_host_name_localhost_verifies_too(pki):
    srv = FakeServer(tls=server_context(pki.server_cert, pki.server_key), host="localhost")
    try:
        res, said, _ = _send_some(srv.url, n=1, ca_file=pki.ca)
    finally:
        srv.kill()
    assert res[0].outcome is Outcome.SENT and said == []


@pytest.mark.parametrize("case,why", [
    ("other CA signed the server", "certificate verify failed"),
    ("device trusts another CA", "certificate verify failed"),
    ("wrong host name", "mismatch"),
    ("expired", "expired"),
    ("system store only", "certificate verify failed"),
])
def test_a_certificate_that_does_not_verify_is_refused(pki, case, why):
    cert, key, ca = {
        "other CA signed the server": (pki.other_ca_server_cert, pki.other_ca_server_key, pki.ca),
        "device trusts another CA": (pki.server_cert, pki.server_key, pki.other_ca),
        "wrong host name": (pki.wrong_host_cert, pki.wrong_host_key, pki.ca),
        "expired": (pki.expired_cert, pki.expired_key, pki.ca),
        "system store only": (pki.server_cert, pki.server_key, None),  # a private CA is in no store
    }[case]
    srv = FakeServer(tls=server_context(cert, key))
    try:
        res, said, alive = _send_some(srv.url, ca_file=ca)
    finally:
        srv.kill()
    assert [r.outcome for r in res] == [Outcome.TLS_ERROR] * 3 and alive
    assert all(why in r.error and "TLS handshake with 127.0.0.1" in r.error for r in res)
    assert srv.requests == []                    # nothing sent: not the key, not an image
    assert len(said) == 1 and said[0].startswith("error: TLS handshake") and why in said[0]


def test_a_plain_http_server_behind_an_https_url_is_refused(pki):
    srv = FakeServer()                           # plain HTTP
    try:
        res, said, alive = _send_some(srv.url.replace("http://", "https://"), n=2,
                                      ca_file=pki.ca, connect_timeout=0.3)
    finally:
        srv.kill()
    assert [r.outcome for r in res] == [Outcome.TLS_ERROR] * 2 and alive
    assert srv.requests == [] and len(said) == 1 and "TLS handshake" in said[0]


@pytest.mark.parametrize("client", ["own CA", "none", "other CA"])
def test_a_server_requiring_client_certificates(pki, client):
    srv = FakeServer(tls=server_context(pki.server_cert, pki.server_key, client_ca=pki.ca))
    kw = {"own CA": {"client_cert": pki.client_cert, "client_key": pki.client_key},
          "none": {},
          "other CA": {"client_cert": pki.other_ca_client_cert,
                       "client_key": pki.other_ca_client_key}}[client]
    try:
        res, said, alive = _send_some(srv.url, n=2, ca_file=pki.ca, **kw)
    finally:
        srv.kill()
    assert alive
    if client == "own CA":
        assert [r.outcome for r in res] == [Outcome.SENT] * 2 and len(srv.requests) == 2
    else:
        # With TLS 1.3 the server refuses a client certificate after the device's side of the
        # handshake is done: its alert reaches the device (tls-error), or, when the device's
        # request crosses it, only the closed connection does (disconnected). Either way the
        # handler never saw a request.
        outs = [r.outcome for r in res]
        assert set(outs) <= {Outcome.TLS_ERROR, Outcome.DISCONNECTED}, [r.error for r in res]
        assert srv.requests == [] and srv.tls_failures and len(said) <= 1
        assert all("TLS" in r.error for r in res if r.outcome is Outcome.TLS_ERROR)


def test_tls_files_that_do_not_load_are_config_errors(pki, tmp_path):
    url = "https://127.0.0.1:9"
    with pytest.raises(ConfigError, match="^ca-file: cannot load"):
        Sender(url, KEY, ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="^ca-file: cannot load"):
        Sender(url, KEY, ca_file=pki.server_key)            # a key, not certificates
    with pytest.raises(ConfigError, match="^client-cert: cannot load"):
        Sender(url, KEY, ca_file=pki.ca, client_cert=pki.client_cert)   # its key is elsewhere
    with pytest.raises(ConfigError, match="^client-key: needs client-cert"):
        Sender(url, KEY, client_key=pki.client_key)
    with pytest.raises(ConfigError, match="^ca-file: TLS files only apply"):
        Sender("http://127.0.0.1:9", KEY, ca_file=pki.ca)


@pytest.mark.parametrize("values,key", [
    ({"server": "http://127.0.0.1:9", "ca-file": "ca.pem"}, "ca-file"),
    ({"client-cert": "c.pem"}, "client-cert"),
    ({"server": "https://127.0.0.1:9", "client-key": "k.pem"}, "client-key"),
])
def test_tls_keys_need_an_https_server(values, key):
    with pytest.raises(ConfigError, match=f"^{key}:"):
        make_config(values)


def test_plain_http_warns_once_off_loopback_only():
    said = []
    for url in ("http://127.0.0.1:9", "http://localhost:9", "http://[::1]:9"):
        Sender(url, KEY, warn=said.append).close(timeout=0.0)
    assert said == []
    Sender("http://10.0.0.2:8080", KEY, warn=said.append).close(timeout=0.0)
    assert len(said) == 1 and "unencrypted" in said[0] and "https://" in said[0]
    assert is_loopback("127.3.4.5") and not is_loopback("10.0.0.2") and not is_loopback("example.org")


def _run(log, url, **kw):
    said = []
    cfg = make_config(overrides=dict(policy=DQN, model=MODEL, accelerator="cpu", key=KEY,
                                     video=CLIP, max_frames=60, server=url,
                                     log=str(log), drain_timeout=3.0,
                                     connect_timeout=0.5, **kw))
    s = run(cfg, echo=said.append, install_signals=False)
    blob = read_blob(DQN)
    return s, check_log(read_log(cfg.log), s["frames"], blob.N, blob.P, blob.M), said


def test_the_loop_over_tls(tmp_path, pki):
    srv = FakeServer(tls=server_context(pki.server_cert, pki.server_key))
    try:
        s, recs, said = _run(tmp_path / "good.jsonl", srv.url, ca_file=pki.ca, queue_size=60)
        bad, bad_recs, bad_said = _run(tmp_path / "bad.jsonl", srv.url, ca_file=pki.other_ca,
                                       queue_size=60)
    finally:
        srv.kill()
    offl = [r for r in recs if r["offload"]]
    assert offl and {r["outcome"] for r in offl} == {"sent"} and said == []
    bad_offl = [r for r in bad_recs if r["offload"]]
    assert bad_offl and {r["outcome"] for r in bad_offl} == {"tls-error"}
    assert bad["failures"]["tls-error"] == len(bad_offl) and bad["answered"] == 0
    assert len(bad_said) == 1 and "certificate verify failed" in bad_said[0]
    assert bad["warnings"] == bad_said
    assert len(srv.requests) == len(offl)        # the refused run sent nothing
