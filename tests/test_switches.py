"""Switches: shared buckets in the key file, their commands, and the server enforcing them.

The server tests use Starlette's TestClient with a fake bucket clock (the
store's ``clock``), so every refill happens because the test moved time on.
"""

import json
import re

import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient

from offload import wire
from offload.server import keys as K
from offload.server.app import create_app
from offload.server.cli import main as serve_main


def _cli(*args):
    return CliRunner().invoke(serve_main, [str(a) for a in args])


# ----------------------------------------------------------------------------- the key file


def test_switch_commands_write_the_agreed_format(tmp_path):
    path = tmp_path / "keys.toml"
    r = _cli("keys", "switch", "add", "uplink", "--rate", "1.2", "--depth", "16", "--keys", path)
    assert r.exit_code == 0 and "added switch 'uplink'" in r.output
    r = _cli("keys", "add", "cam1", "--rate", "0.5", "--depth", "3", "--switch", "uplink",
             "--keys", path)
    assert r.exit_code == 0, r.output
    r = _cli("keys", "add", "cam2", "--switch", "uplink", "--keys", path)
    assert r.exit_code == 0, r.output
    text = path.read_text()
    assert '[switches."uplink"]\nrate = 1.2\ndepth = 16.0\n' in text
    assert text.count('switch = "uplink"') == 2
    entries = K.read_key_file(path)
    assert entries.switches == {"uplink": K.SwitchEntry("uplink", 1.2, 16.0)}
    assert [e.switch for e in entries.values()] == ["uplink", "uplink"]
    r = _cli("keys", "list", "--keys", path)
    assert "rate=0.5 depth=3 switch=uplink" in r.stdout and "unlimited switch=uplink" in r.stdout
    r = _cli("keys", "switch", "list", "--keys", path)
    assert r.stdout == "uplink\trate=1.2 depth=16\tcam1,cam2\n"
    # Editing a key keeps the switches.
    assert _cli("keys", "rotate", "cam1", "--keys", path).exit_code == 0
    assert K.read_key_file(path).switches["uplink"].rate == 1.2
    r = _cli("keys", "switch", "add", "uplink", "--rate", "2", "--depth", "8", "--keys", path)
    assert r.exit_code == 0 and "changed switch 'uplink'" in r.output and "was rate 1.2" in r.output
    r = _cli("keys", "switch", "remove", "uplink", "--keys", path)
    assert r.exit_code == 1 and "used by keys cam1, cam2" in r.output
    r = _cli("keys", "switch", "remove", "uplink", "--detach", "--keys", path)
    assert r.exit_code == 0 and "cam1, cam2 no longer pass a switch" in r.output
    entries = K.read_key_file(path)
    assert entries.switches == {} and all(e.switch is None for e in entries.values())
    r = _cli("keys", "switch", "list", "--keys", path)
    assert r.exit_code == 0 and "no switches" in r.output


@pytest.mark.parametrize("args, message", [
    (["keys", "add", "c", "--switch", "nope"], "no switch named 'nope'"),
    (["keys", "switch", "add", "s", "--rate", "1", "--depth", "0.5"],
     "depth 0.5 is smaller than one send"),
    (["keys", "switch", "add", "s", "--rate", "0", "--depth", "2"], "must be a number > 0"),
    (["keys", "switch", "add", "bad name", "--rate", "1", "--depth", "2"], "switch name"),
    (["keys", "switch", "remove", "s"], "not found"),
])
def test_switch_command_refusals(tmp_path, args, message):
    r = _cli(*args, "--keys", tmp_path / "k.toml")
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "k.toml").exists()  # nothing half-written


@pytest.mark.parametrize("text, message", [
    (f'[keys.a]\nsha256 = "{"0" * 64}"\nswitch = "up"\n',
     "key 'a' names switch 'up', which the file does not define"),
    ('[switches.up]\nrate = 1.0\ndepth = 0.9\n', "smaller than one send"),
    ('[switches.up]\nrate = 1.0\n', "needs exactly rate and depth (missing: ['depth'])"),
    ('[switches.up]\nrate = 1.0\ndepth = 2\ncolour = 1\n', "unknown: ['colour']"),
    ('[switches.up]\nrate = "fast"\ndepth = 2\n', "rate must be a number"),
    ('switches = 3\n', "'switches' must be a table"),
    (f'[switches.up]\nrate = 1.0\ndepth = 2\n[keys.a]\nsha256 = "{"0" * 64}"\nswitch = 5\n',
     "switch must be the name"),
])
def test_bad_switches_refused_at_load(tmp_path, text, message):
    path = tmp_path / "k.toml"
    path.write_text(text)
    with pytest.raises(K.KeyFileError, match=re.escape(message)) as e:
        K.read_key_file(path)
    assert str(path) in str(e.value)
    r = _cli("--keys", path, "--port", "0")  # the server refuses to start with it
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output


def test_a_reload_keeps_the_switch_bucket_unless_its_limit_changes(tmp_path):
    path = tmp_path / "keys.toml"
    K.add_switch(path, "up", rate=1.0, depth=2)
    key = K.add_key(path, "a", switch="up")
    store = K.KeyStore.from_file(path, clock=lambda: 0.0)
    assert store.authorize(key).admit().allowed
    b = store.switch_bucket("up")
    K.add_key(path, "b", switch="up")
    assert store.maybe_reload(force=True)
    assert store.switch_bucket("up") is b and b.tokens == b.M - b.P
    K.add_switch(path, "up", rate=1.0, depth=3)
    assert store.maybe_reload(force=True)
    assert store.switch_bucket("up") is not b and store.switch_bucket("up").tokens == 3


# ----------------------------------------------------------------------------- the server


@pytest.fixture
def fleet(tmp_path):
    """Two keys (depth 2 each) through one switch of depth 3; a fake bucket clock."""
    path = tmp_path / "keys.toml"
    K.add_switch(path, "uplink", rate=1.0, depth=3)
    keys = {n: K.add_key(path, n, rate=0.5, depth=2, switch="uplink") for n in ("cam1", "cam2")}
    keys["solo"] = K.add_key(path, "solo", rate=0.5, depth=1)
    now = [0.0]
    store = K.KeyStore.from_file(path, clock=lambda: now[0], slot_s=0.2)
    return store, keys, now


def _post(c, key, body):
    return c.post(wire.CLASSIFY_PATH, content=body,
                  headers={"Authorization": f"Bearer {key}", "Content-Type": "image/png"})


def test_key_then_switch(strong_model, frame, fleet):
    """Refused by the key: the switch is untouched; by the switch: the body names it."""
    store, keys, now = fleet
    with TestClient(create_app(strong_model, store)) as c:
        r = [_post(c, keys["cam1"], frame) for _ in range(3)]
        assert [x.status_code for x in r] == [200, 200, 429]
        body = r[2].json()
        assert body["refused_by"] == "key" and body["bucket"] == "cam1"
        assert "rate limit of key 'cam1'" in body["error"]
        sw = store.switch_bucket("uplink")
        assert sw.tokens == sw.M - 2 * sw.P  # the refused request did not touch the switch
        assert _post(c, keys["cam2"], frame).status_code == 200  # the switch's last token
        r = _post(c, keys["cam2"], frame)
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        body = r.json()
        assert body == {"error": body["error"], "refused_by": "switch", "bucket": "uplink"}
        assert "switch 'uplink'" in body["error"]
        assert store.bucket("cam2").tokens == 0  # the key's token was spent (the fleet model)
        assert _post(c, keys["solo"], frame).status_code == 200  # not behind the switch
        now[0] = 0.2  # one slot: one token for the switch, a half for each key
        assert _post(c, keys["cam1"], frame).status_code == 429  # cam1: 1 of 2 scaled tokens
        now[0] = 0.4
        assert _post(c, keys["cam1"], frame).status_code == 200
        text = c.get(wire.METRICS_PATH).text
    assert 'offload_key_requests_total{key="cam1",result="admitted"} 3.0' in text
    assert 'offload_key_requests_total{key="cam1",result="key"} 2.0' in text
    assert 'offload_key_requests_total{key="cam2",result="switch"} 1.0' in text
    assert 'offload_switch_requests_total{result="admitted",switch="uplink"} 4.0' in text
    assert 'offload_switch_requests_total{result="refused",switch="uplink"} 1.0' in text
    assert "offload_state_up 1.0" in text


def test_wire_refused_by_reads_only_what_the_server_writes():
    assert wire.refused_by(wire.error_body("x", refused_by="switch", bucket="up")) == "switch"
    assert json.loads(wire.error_body("x")) == {"error": "x"}
    for body in (b"", b"not json", b"[1]", b'{"refused_by": 3}', b"\xff", b"{" * 10000):
        assert wire.refused_by(body) is None


def test_the_device_records_a_switch_refusal_as_its_own_outcome(strong_model, fleet):
    """The sender reads the 429 body: ``switch-refused``, not ``http-429``; Retry-After holds it off."""
    from offload.device.record import Outcome
    from offload.device.sender import Sender
    from offload.server.serve import serve_in_thread

    from device_helpers import demo_frames

    store, keys, now = fleet
    images = demo_frames()[0]
    device_clock = [1000.0]
    with serve_in_thread(strong_model, keys=store) as server:
        senders = {n: Sender(server.url, keys[n], clock=lambda: device_clock[0])
                   for n in ("cam1", "cam2")}
        try:
            def send(name, i):
                assert senders[name].submit(i, images[i])
                return senders[name].results.get(timeout=30)

            labels = [send("cam1", 0).label, send("cam1", 1).label, send("cam1", 2).label,
                      send("cam2", 3).label]
            assert labels == ["sent", "sent", "http-429", "sent"]  # cam1's own bucket said no
            r = send("cam2", 4)
            assert r.outcome is Outcome.SWITCH_REFUSED and r.label == "switch-refused"
            assert r.http_status == 429 and "switch 'uplink'" in r.error
            assert r.outcome.is_failure
            assert send("cam2", 5).outcome is Outcome.HELD_OFF  # Retry-After: 1 s
        finally:
            for s in senders.values():
                s.close(timeout=0.0)
