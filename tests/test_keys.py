"""Key lifecycle of the edge server: rotate with an overlap, revoke, live reloading, SIGHUP.

Clocks are injected (the store's monotonic ``clock`` for the reload interval
and buckets, ``wall_clock`` for rotation expiry), so nothing here sleeps to
let time pass. The live-server tests poll with a generous deadline that only
guards against a hang; they assert what happens, never how fast.
"""

import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from offload.server import keys as K
from offload.server.cli import main as serve_main
from offload.server.keyfile import format_time, parse_duration

from helpers import listening_url, spy_compare_digest

T0 = 1_800_000_000.0  # a fixed wall-clock time, Unix seconds
HOUR = 3600.0


def _cli(*args):
    return CliRunner().invoke(serve_main, [str(a) for a in args])


def _store(path, wall, mono=None, **kw):
    mono = mono if mono is not None else [0.0]
    return K.KeyStore.from_file(path, clock=lambda: mono[0], wall_clock=lambda: wall[0], **kw)


# ----------------------------------------------------------------------------- the file


def test_old_key_files_still_load(tmp_path):
    """A file written before rotation and revocation existed reads as before."""
    path = tmp_path / "keys.toml"
    path.write_text(
        "# offload-serve key file: SHA-256 hashes of API keys, never the keys.\n\n"
        f'[keys."cam-1"]\nsha256 = "{K.hash_key("one")}"\ncreated = "2026-11-27T11:20:00Z"\n\n'
        f'[keys."cam-2"]\nsha256 = "{K.hash_key("two")}"\nrate = 0.1\ndepth = 4.0\n')
    entries = K.read_key_file(path)
    assert [(e.name, e.previous, e.revoked, e.rotated) for e in entries.values()] == [
        ("cam-1", (), "", ""), ("cam-2", (), "", "")]
    store = K.KeyStore.from_file(path)
    assert store.check("one") == "cam-1" and store.check("two") == "cam-2"
    assert store.bucket("cam-2") is not None and store.bucket("cam-1") is None


@pytest.mark.parametrize("body, message", [
    ('previous = "x"\n', "previous must be a list"),
    (f'previous = [{{ sha256 = "{"1" * 64}" }}]\n', "exactly sha256 and expires"),
    (f'previous = [{{ sha256 = "{"1" * 64}", expires = "tomorrow" }}]\n', "UTC time"),
    (f'previous = [{{ sha256 = "{"1" * 64}", expires = 2026-12-01T09:00:00 }}]\n', "UTC time"),
    (f'previous = [{{ sha256 = "abc", expires = "2026-12-01T09:00:00Z" }}]\n', "64 lower-case"),
    ('revoked = "soon"\n', "revoked must be a UTC time"),
    (f'previous = [{{ sha256 = "{"0" * 64}", expires = "2026-12-01T09:00:00Z" }}]\n',
     "listed twice"),
])
def test_bad_rotation_fields(tmp_path, body, message):
    path = tmp_path / "k.toml"
    path.write_text(f'[keys.a]\nsha256 = "{"0" * 64}"\n{body}')
    with pytest.raises(K.KeyFileError, match=re.escape(message)):
        K.read_key_file(path)


def test_one_hash_under_two_names_is_refused(tmp_path):
    path = tmp_path / "k.toml"
    path.write_text(f'[keys.a]\nsha256 = "{"0" * 64}"\n[keys.b]\nsha256 = "{"0" * 64}"\n')
    with pytest.raises(K.KeyFileError, match="keys 'a' and 'b'"):
        K.read_key_file(path)


def test_times_read_as_toml_datetimes_too(tmp_path):
    path = tmp_path / "k.toml"
    path.write_text(f'[keys.a]\nsha256 = "{"0" * 64}"\nrevoked = 2026-12-03T10:00:00+01:00\n'
                    f'previous = [{{ sha256 = "{"1" * 64}", expires = "2026-12-02T09:00:00Z" }}]\n')
    e = K.read_key_file(path)["a"]
    assert e.revoked == "2026-12-03T09:00:00Z"
    assert format_time(e.previous[0].expires) == "2026-12-02T09:00:00Z"


@pytest.mark.parametrize("text, seconds", [
    ("0", 0.0), ("90", 90.0), ("30s", 30.0), ("90m", 5400.0), ("24h", 86400.0),
    ("1.5h", 5400.0), ("7d", 604800.0), (" 2 h ", 7200.0)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "-1h", "1w", "h", "1e9999", "nan", "1h30m"])
def test_parse_duration_refusals(text):
    with pytest.raises(K.KeyFileError, match="duration"):
        parse_duration(text)


# ----------------------------------------------------------------------------- rotate


def test_rotate_keeps_the_old_key_for_the_overlap(tmp_path):
    path = tmp_path / "keys.toml"
    old = K.add_key(path, "cam", now=T0)
    wall = [T0 + HOUR]
    new = K.rotate_key(path, "cam", overlap_s=2 * HOUR, now=wall[0])
    assert new != old and old not in path.read_text() and new not in path.read_text()
    e = K.read_key_file(path)["cam"]
    assert e.sha256 == K.hash_key(new) and e.rotated == format_time(T0 + HOUR)
    assert e.previous == (K.OldKey(K.hash_key(old), T0 + 3 * HOUR),)
    assert e.created == format_time(T0)  # the name's age, not the key's
    store = _store(path, wall)
    assert store.check(old) == "cam" and store.check(new) == "cam"
    wall[0] = T0 + 3 * HOUR - 1
    assert store.check(old) == "cam"
    wall[0] = T0 + 3 * HOUR  # the overlap is over: the old key is refused, the new one is not
    assert store.check(old) is None and store.check(new) == "cam"


def test_rotate_twice_and_with_no_overlap(tmp_path):
    path = tmp_path / "keys.toml"
    k1 = K.add_key(path, "cam", now=T0)
    k2 = K.rotate_key(path, "cam", overlap_s=HOUR, now=T0)
    k3 = K.rotate_key(path, "cam", overlap_s=2 * HOUR, now=T0 + 10)
    wall = [T0 + 20]
    store = _store(path, wall)
    assert [store.check(k) for k in (k1, k2, k3)] == ["cam"] * 3  # both old keys, in overlap
    wall[0] = T0 + HOUR
    assert [store.check(k) for k in (k1, k2, k3)] == [None, "cam", "cam"]
    # A rotation drops old keys already past their overlap; overlap 0 keeps none.
    k4 = K.rotate_key(path, "cam", overlap_s=0, now=T0 + HOUR + 5)
    e = K.read_key_file(path)["cam"]
    assert [o.sha256 for o in e.previous] == [K.hash_key(k2)]
    store = _store(path, wall)
    assert [store.check(k) for k in (k1, k2, k3, k4)] == [None, "cam", None, "cam"]


def test_old_and_new_key_share_one_bucket(tmp_path):
    """One device, one budget: spending with the old key drains the new key's bucket."""
    path = tmp_path / "keys.toml"
    old = K.add_key(path, "cam", rate=0.5, depth=2, now=T0)
    new = K.rotate_key(path, "cam", overlap_s=HOUR, now=T0)
    store = _store(path, [T0])  # monotonic clock fixed at 0: no refill
    assert store.authorize(old).bucket is store.authorize(new).bucket is store.bucket("cam")
    assert store.authorize(old).take()[0] and store.authorize(old).take()[0]  # depth 2 spent
    allowed, wait = store.authorize(new).take()
    assert not allowed and wait > 0


def test_rotation_reloaded_keeps_the_bucket_state(tmp_path):
    path = tmp_path / "keys.toml"
    old = K.add_key(path, "cam", rate=0.5, depth=2, now=T0)
    mono, wall = [0.0], [T0]
    store = _store(path, wall, mono, reload_s=1.0)
    bucket = store.bucket("cam")
    assert store.authorize(old).take()[0] and store.authorize(old).take()[0]
    new = K.rotate_key(path, "cam", overlap_s=HOUR, now=T0)
    store.request_reload()
    assert store.maybe_reload() is True  # at clock 0 still: no refill
    assert store.check(new) == "cam" and store.bucket("cam") is bucket
    assert store.authorize(new).take()[0] is False  # the old key's spending counts


# ----------------------------------------------------------------------------- revoke


def test_revoke_refuses_every_key_of_the_name(tmp_path):
    path = tmp_path / "keys.toml"
    old = K.add_key(path, "cam", now=T0)
    new = K.rotate_key(path, "cam", overlap_s=HOUR, now=T0)
    other = K.add_key(path, "other", now=T0)
    assert K.revoke_key(path, "cam", now=T0 + 60) is True
    assert K.revoke_key(path, "cam", now=T0 + 120) is False  # already: unchanged
    e = K.read_key_file(path)["cam"]
    assert e.revoked == format_time(T0 + 60) and e.previous  # kept, marked
    store = _store(path, [T0 + 61])
    assert store.check(old) is None and store.check(new) is None
    assert store.check(other) == "other"
    assert "cam" in store.names  # still known, so a presented revoked key is told apart
    with pytest.raises(K.KeyFileError, match="is revoked"):
        K.rotate_key(path, "cam", overlap_s=HOUR)
    with pytest.raises(K.KeyFileError, match=r"already exists .*\(revoked"):
        K.add_key(path, "cam")
    K.remove_key(path, "cam")
    fresh = K.add_key(path, "cam")
    assert K.KeyStore.from_file(path).check(fresh) == "cam"


def test_a_presented_revoked_key_is_logged_once(tmp_path, caplog):
    path = tmp_path / "keys.toml"
    key = K.add_key(path, "cam")
    K.revoke_key(path, "cam")
    store = K.KeyStore.from_file(path)
    with caplog.at_level(logging.WARNING, logger="offload.server.keys"):
        assert store.check(key) is None and store.check(key) is None
        assert store.check("unknown") is None
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "'cam' (revoked)" in warnings[0] and key not in warnings[0]


def test_refusals_stay_constant_time(tmp_path, monkeypatch):
    """Every stored hash (current, rotated-out, revoked) is compared, whatever the outcome."""
    path = tmp_path / "keys.toml"
    a = K.add_key(path, "a", now=T0)
    a2 = K.rotate_key(path, "a", overlap_s=HOUR, now=T0)
    b = K.add_key(path, "b", now=T0)
    K.revoke_key(path, "b", now=T0)
    c = K.add_key(path, "c", now=T0)
    wall = [T0 + 10]
    store = _store(path, wall)
    seen = spy_compare_digest(monkeypatch, K)
    for key, name, t in [(a, "a", T0 + 10), (a2, "a", T0 + 10), (c, "c", T0 + 10),
                         (b, None, T0 + 10), (a, None, T0 + 2 * HOUR), ("nope", None, T0)]:
        wall[0] = t
        seen.clear()
        assert store.check(key) == name
        assert len(seen) == 4 and all(len(x) == len(y) == 32 for x, y in seen)


# ----------------------------------------------------------------------------- CLI


def test_cli_list_rotate_revoke(tmp_path):
    path = tmp_path / "keys.toml"
    r = _cli("keys", "add", "cam-1", "--keys", path)
    k1 = r.stdout.strip().splitlines()[-1]
    _cli("keys", "add", "cam-2", "--keys", path, "--rate", "0.1", "--depth", "4")
    r = _cli("keys", "rotate", "cam-1", "--keys", path, "--overlap", "2h")
    assert r.exit_code == 0, r.output
    k1b = r.stdout.strip().splitlines()[-1]
    assert len(k1b) == 43 and k1b != k1 and "stays valid until" in r.stderr
    r = _cli("keys", "revoke", "cam-2", "--keys", path)
    assert r.exit_code == 0 and "revoked every key of 'cam-2'" in r.stderr
    r = _cli("keys", "list", "--keys", path)
    assert r.exit_code == 0 and k1 not in r.output and k1b not in r.output
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    assert [row[0] for row in rows] == ["cam-1", "cam-2"] and all(len(row) == 4 for row in rows)
    assert rows[0][2] == "unlimited" and rows[1][2] == "rate=0.1 depth=4"
    assert re.fullmatch(r"active, rotated \S+Z; old key valid until \S+Z", rows[0][3])
    assert re.fullmatch(r"revoked \S+Z", rows[1][3])
    store = K.KeyStore.from_file(path)
    assert store.check(k1) == store.check(k1b) == "cam-1"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.toml"]  # no temporary files
    r = _cli("keys", "rotate", "cam-1", "--keys", path, "--overlap", "0")
    assert r.exit_code == 0 and "no longer works" in r.stderr
    assert K.KeyStore.from_file(path).check(k1b) is None


@pytest.mark.parametrize("args, message", [
    (["keys", "rotate", "nobody"], "no key named 'nobody'"),
    (["keys", "rotate", "cam", "--overlap", "1w"], "duration '1w'"),
    (["keys", "revoke", "nobody"], "no key named 'nobody'"),
    (["keys", "rotate", "gone"], "is revoked"),
])
def test_cli_lifecycle_refusals(tmp_path, args, message):
    path = tmp_path / "k.toml"
    K.add_key(path, "cam")
    K.add_key(path, "gone")
    K.revoke_key(path, "gone")
    before = path.read_bytes()
    r = _cli(*args, "--keys", path)
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output
    assert path.read_bytes() == before


# ----------------------------------------------------------------------------- reloading


def _looks(store, mono, *times):
    """Let the store look at its file at each monotonic time in ``times``."""
    out = []
    for t in times:
        mono[0] = t
        out.append(store.maybe_reload())
    return out


def test_a_change_is_taken_once_two_looks_agree(tmp_path):
    path = tmp_path / "keys.toml"
    k1 = K.add_key(path, "one")
    mono = [0.0]
    store = _store(path, [time.time()], mono, reload_s=1.0)
    k2 = K.add_key(path, "two")
    assert _looks(store, mono, 0.5, 1.0) == [False, False]  # too soon; then seen once
    assert store.check(k2) is None
    assert _looks(store, mono, 2.0) == [True]
    assert store.check(k2) == "two" and store.check(k1) == "one"
    assert _looks(store, mono, 3.0, 4.0) == [False, False]  # unchanged: nothing reread


def test_a_half_written_file_is_never_loaded(tmp_path):
    """An in-place writer caught midway (a valid prefix: fewer keys) is never taken."""
    path = tmp_path / "keys.toml"
    K.add_key(path, "one")
    keys = [K.add_key(path, f"cam-{i}") for i in range(3)]
    full = path.read_bytes()
    mono = [0.0]
    store = _store(path, [time.time()], mono, reload_s=1.0)
    cut = full.index(b'[keys."cam-1"]')
    with open(path, "r+b") as f:  # in place: same inode, as an editor writing over it
        f.truncate(0)
        f.write(full[:cut])
        f.flush()
        assert _looks(store, mono, 1.0) == [False]  # seen once mid-write
        f.write(full[cut:] + b"\n")
        f.flush()
    assert _looks(store, mono, 2.0) == [False]  # changed since the first look: wait again
    assert [store.check(k) for k in keys] == ["cam-0", "cam-1", "cam-2"]  # old set, whole
    assert _looks(store, mono, 3.0) == [True]
    assert [store.check(k) for k in keys] == ["cam-0", "cam-1", "cam-2"]


def test_a_corrupt_file_keeps_the_old_keys_and_is_logged_once(tmp_path, caplog):
    path = tmp_path / "keys.toml"
    k1 = K.add_key(path, "one")
    mono = [0.0]
    store = _store(path, [time.time()], mono, reload_s=1.0)
    with caplog.at_level(logging.ERROR, logger="offload.server.keys"):
        path.write_text('[keys."one"]\nsha256 = "short"\n')
        assert _looks(store, mono, 1, 2, 3, 4) == [False] * 4
        assert store.check(k1) == "one"
        errors = [r.getMessage() for r in caplog.records]
        assert len(errors) == 1 and "keeping the previous keys" in errors[0]
        assert "64 lower-case hex" in errors[0]
        path.write_text("[broken\n")  # another bad version: logged once more
        assert _looks(store, mono, 5, 6, 7) == [False] * 3
        assert len(caplog.records) == 2 and "not valid TOML" in caplog.records[1].getMessage()
        os.unlink(path)  # a vanished file too keeps the keys
        assert _looks(store, mono, 8, 9) == [False, False]
        assert len(caplog.records) == 3 and "missing" in caplog.records[2].getMessage()
    assert store.check(k1) == "one"
    k2 = K.add_key(path, "two")  # fixed: taken as any change is
    assert _looks(store, mono, 10, 11) == [False, True]
    assert store.check(k2) == "two" and store.check(k1) is None


def test_a_forced_reload_rereads_a_file_that_looks_unchanged(tmp_path):
    """SIGHUP's path: same size and mtime (a coarse-clock file system), still reread, at once."""
    path = tmp_path / "keys.toml"
    k1 = K.add_key(path, "cam")
    mono = [0.0]
    store = _store(path, [time.time()], mono, reload_s=1.0)
    k2 = _swap_key_in_place(path, k1)
    assert _looks(store, mono, 5, 10) == [False, False]  # the stamp did not move
    assert store.check(k1) == "cam"
    store.request_reload()
    assert store.maybe_reload() is True  # no interval, no second look
    assert store.check(k2) == "cam" and store.check(k1) is None


def _swap_key_in_place(path, old_key):
    """Replace ``old_key``'s hash by a new key's, in place, keeping size and mtime; new key."""
    st = os.stat(path)
    new = K.new_key()
    data = path.read_bytes().replace(K.hash_key(old_key).encode(), K.hash_key(new).encode())
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return new


# ----------------------------------------------------------------------------- live server


def _poll(predicate, timeout=20.0):
    """Wait until ``predicate()`` holds; the deadline only guards against a hang."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_live_server_applies_add_rotate_revoke(tmp_path, strong_model, caplog):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from offload import artifacts, wire
    from offload.server import serve_in_thread

    frame = open(artifacts.find("demo/frames/000001.png"), "rb").read()
    path = tmp_path / "keys.toml"
    k1 = K.add_key(path, "one")
    store = K.KeyStore.from_file(path, reload_s=0.05)

    with serve_in_thread(strong_model, keys=store) as server, httpx.Client() as client:
        def status(key):
            return client.post(server.url + wire.CLASSIFY_PATH, content=frame, timeout=30,
                               headers={"Authorization": f"Bearer {key}",
                                        "Content-Type": "image/png"}).status_code

        assert status(k1) == 200
        k2 = K.add_key(path, "two")
        # The watcher thread applies it with no request coming in.
        assert _poll(lambda: "two" in store.names)
        assert status(k2) == 200
        k1b = K.rotate_key(path, "one", overlap_s=HOUR)
        assert _poll(lambda: store.check(k1b) == "one")
        assert status(k1) == 200 and status(k1b) == 200  # in the overlap: both
        K.revoke_key(path, "one")
        assert _poll(lambda: store.entries["one"].revoked != "")
        assert status(k1) == 401 and status(k1b) == 401 and status(k2) == 200
        with caplog.at_level(logging.ERROR, logger="offload.server.keys"):
            path.write_text("[broken\n")
            assert _poll(lambda: any("keeping the previous keys" in r.getMessage()
                                     for r in caplog.records))
        assert status(k2) == 200  # a broken file keeps the keys in force


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this system")
def test_sighup_rereads_the_key_file_in_a_running_offload_serve(tmp_path):
    """The file is changed so that polling cannot see it (same size, same mtime): only
    SIGHUP can make the server take it, and SIGHUP must not end the process."""
    httpx = pytest.importorskip("httpx")
    from offload import artifacts, wire

    frame = open(artifacts.find("demo/frames/000001.png"), "rb").read()
    path = tmp_path / "keys.toml"
    k1 = K.add_key(path, "cam")
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "offload.server.cli", "--keys", str(path),
                                 "--port", "0", "--log-level", "info"],
                                stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path)
    try:
        url = listening_url(proc, err_path)

        def status(key):
            return httpx.post(url + wire.CLASSIFY_PATH, content=frame, timeout=30,
                              headers={"Authorization": f"Bearer {key}",
                                       "Content-Type": "image/png"}).status_code

        assert status(k1) == 200
        k2 = _swap_key_in_place(path, k1)
        proc.send_signal(signal.SIGHUP)
        assert _poll(lambda: "reread (SIGHUP)" in err_path.read_text()), err_path.read_text()
        assert proc.poll() is None
        assert status(k2) == 200 and status(k1) == 401
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert "Traceback" not in err_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
