"""The edge server: model, batching, keys and buckets, status codes, metrics, CLI.

No network beyond loopback, no GPU. Real HTTP goes through uvicorn on a
free loopback port (``serve_in_thread``); Starlette's TestClient is used
where the transport does not matter. Nothing here asserts on speed: batching
is made observable by holding the model call until requests have queued.
"""

import asyncio
import copy
import math
import os
import re
import socket
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
cv2 = pytest.importorskip("cv2")

from click.testing import CliRunner  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from offload import artifacts, wire  # noqa: E402
from offload.bucket import scale, slot_index, step_reference  # noqa: E402
from offload.server import keys as K  # noqa: E402
from offload.server import serve_in_thread  # noqa: E402
from offload.server.app import create_app  # noqa: E402
from offload.server.batcher import Batcher, Overloaded  # noqa: E402
from offload.server.cli import main as serve_main  # noqa: E402
from offload.server.model import StrongModel, softmax  # noqa: E402

from helpers import spy_compare_digest  # noqa: E402

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
PNG = {**AUTH, "Content-Type": "image/png"}


@pytest.fixture(scope="module")
def frames():
    out = []
    for i in range(16):
        path = artifacts.find(os.path.join("demo", "frames", f"{i:06d}.png"))
        if path is None:
            pytest.skip("demo frames not found")
        with open(path, "rb") as f:
            out.append(f.read())
    return out


def _store(**kw):
    return K.KeyStore.single(KEY, name="cam", **kw)


@pytest.fixture
def client(strong_model):
    app = create_app(strong_model, _store())
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _healthy(c):
    r = c.get(wire.HEALTH_PATH)
    assert r.status_code == 200 and r.json()["status"] == "ok"


def _direct_probs(path_or_bytes):
    """The strong model straight through ONNX Runtime, with training's preprocessing."""
    img = cv2.imdecode(np.frombuffer(path_or_bytes, np.uint8), cv2.IMREAD_GRAYSCALE)
    x = (img.astype(np.float32) / 255.0)[None, None]
    sess = ort.InferenceSession(artifacts.find("strong.onnx"), providers=["CPUExecutionProvider"])
    return softmax(sess.run(None, {"image": x})[0])[0]


# ----------------------------------------------------------------------------- model


def test_model_reads_metadata(strong_model):
    m = strong_model
    assert (m.channels, m.height, m.width, m.n_classes) == (1, 28, 28, 10)
    assert m.class_names[9] == "Ankle boot"
    assert m.providers[-1] == "CPUExecutionProvider"


def test_preprocessing_is_trainings(strong_model):
    from offload.classifier import prepare_image

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    assert np.array_equal(strong_model.prepare(img), (img.astype(np.float32) / 255.0)[None])
    big = rng.integers(0, 256, (56, 70, 3), dtype=np.uint8)
    assert np.array_equal(strong_model.prepare(big), prepare_image(big, 28, 28, 1).transpose(2, 0, 1))


def test_bad_model_files(tmp_path):
    from offload.server.model import ModelError

    with pytest.raises(ModelError, match="not found"):
        StrongModel(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelError, match="not a usable ONNX model"):
        StrongModel(bad)


# ----------------------------------------------------------------------------- classify


def test_classify_matches_direct_onnx_runtime(client, frames):
    for i, body in enumerate(frames[:6]):
        r = client.post(wire.CLASSIFY_PATH, content=body, headers={**PNG, "X-Frame-Id": str(i)})
        assert r.status_code == 200, r.text
        a = wire.parse_answer(r.content, n_classes=10)
        p = _direct_probs(body)
        order = np.argsort(-p, kind="stable")[:3]
        assert a.classes == [int(c) for c in order]
        np.testing.assert_allclose(a.scores, p[order], atol=2e-6)
        assert a.frame_id == str(i) and a.batch_size >= 1 and a.inference_ms >= 0
        assert a.names[0] == client.app.state.service.model.class_names[a.classes[0]]


def test_classify_colour_jpeg(client, frames):
    img = cv2.imdecode(np.frombuffer(frames[1], np.uint8), cv2.IMREAD_GRAYSCALE)
    big = cv2.cvtColor(cv2.resize(img, (112, 112), interpolation=cv2.INTER_NEAREST),
                       cv2.COLOR_GRAY2BGR)
    body, ctype = wire.encode_image(big, "jpeg", quality=95)
    r = client.post(wire.CLASSIFY_PATH, content=body, headers={**AUTH, "Content-Type": ctype})
    assert r.status_code == 200
    # Frame 1 of the demo clip is an ankle boot, which the strong model gets right.
    assert wire.parse_answer(r.content).top1 == 9


# ----------------------------------------------------------------------------- batching


def test_batcher_groups_concurrent_inputs():
    calls = []

    def run(batch):
        calls.append(len(batch))
        return batch * 2, 0.0

    async def go():
        # All ten are queued before the collector first runs, so batches fill
        # from the queue without waiting; only the last waits out the window.
        b = Batcher(run, max_batch=4, window_s=0.05)
        outs = await asyncio.gather(*(b.submit(np.array([i], np.float32)) for i in range(10)))
        await b.stop()
        return outs

    outs = asyncio.run(go())
    assert calls == [4, 4, 2]
    assert [float(o[0][0]) for o in outs] == [2.0 * i for i in range(10)]
    assert [o[1].size for o in outs] == [4] * 8 + [2] * 2


def test_batcher_queue_bound_and_stop():
    release, entered = threading.Event(), threading.Event()

    def run(batch):
        entered.set()
        release.wait(30)
        return batch, 0.0

    async def go():
        b = Batcher(run, max_batch=1, window_s=0.0, max_queue=2)
        first = asyncio.ensure_future(b.submit(np.zeros(1)))
        for _ in range(30_000):  # until the model holds the first input (30 s at most)
            if entered.is_set():
                break
            await asyncio.sleep(0.001)
        assert entered.is_set()
        waiting = [asyncio.ensure_future(b.submit(np.zeros(1))) for _ in range(2)]
        for _ in range(30_000):
            if b.pending == 2:
                break
            await asyncio.sleep(0.001)
        assert b.pending == 2
        with pytest.raises(Overloaded, match="overloaded"):
            await b.submit(np.zeros(1))
        release.set()
        await first
        await asyncio.gather(*waiting)
        await b.stop()
        with pytest.raises(Overloaded, match="shutting down"):
            await b.submit(np.zeros(1))

    asyncio.run(go())


def test_batcher_passes_model_errors_on():
    def run(batch):
        raise RuntimeError("model broke")

    async def go():
        b = Batcher(run, max_batch=4, window_s=0.0)
        with pytest.raises(RuntimeError, match="model broke"):
            await b.submit(np.zeros(1))
        await b.stop()

    asyncio.run(go())


def test_batched_results_equal_single(strong_model, frames):
    x = np.stack([strong_model.prepare(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_UNCHANGED))
                  for b in frames])
    together = strong_model.run(x)[0]
    alone = np.concatenate([strong_model.run(x[i:i + 1])[0] for i in range(len(x))])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert np.array_equal(together.argmax(1), alone.argmax(1))


def test_http_requests_really_share_model_calls(strong_model, frames):
    """16 concurrent HTTP requests over loopback: the model is held on the first call
    until the other 15 have queued, so the second call must batch them."""
    gate, entered = threading.Event(), threading.Event()

    def held_run(batch):
        entered.set()
        gate.wait(30)
        return strong_model.run(batch)

    held = copy.copy(strong_model)  # the same ONNX session, its model calls held at the gate
    held.run = held_run
    with serve_in_thread(held, api_key=KEY, max_batch=32, batch_window_ms=0.0) as srv:
        batcher = srv.app.state.service.batcher
        results = [None] * len(frames)

        def post(i):
            with httpx.Client(timeout=60) as c:
                results[i] = c.post(srv.url + wire.CLASSIFY_PATH, content=frames[i],
                                    headers={**PNG, "X-Frame-Id": str(i)})

        first = threading.Thread(target=post, args=(0,))
        first.start()
        assert entered.wait(30)
        rest = [threading.Thread(target=post, args=(i,)) for i in range(1, len(frames))]
        for t in rest:
            t.start()
        deadline = time.monotonic() + 30
        while batcher.pending < len(frames) - 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert batcher.pending == len(frames) - 1
        gate.set()
        for t in [first, *rest]:
            t.join(60)
        answers = [wire.parse_answer(r.content) for r in results]
        assert [r.status_code for r in results] == [200] * len(frames)
        assert answers[0].batch_size == 1
        assert all(a.batch_size == len(frames) - 1 for a in answers[1:])
        assert [a.frame_id for a in answers] == [str(i) for i in range(len(frames))]
        metrics = httpx.get(srv.url + wire.METRICS_PATH).text
        assert _metric(metrics, "offload_batch_size_count") == 2
        assert _metric(metrics, "offload_batch_size_sum") == len(frames)
    # ... and they are the answers of batch-1 calls (--max-batch 1).
    with serve_in_thread(strong_model, api_key=KEY, max_batch=1) as srv:
        with httpx.Client(timeout=60) as c:
            single = [wire.parse_answer(c.post(srv.url + wire.CLASSIFY_PATH, content=b,
                                               headers=PNG).content) for b in frames]
    for a, s in zip(answers, single):
        assert s.batch_size == 1 and a.classes == s.classes
        np.testing.assert_allclose(a.scores, s.scores, atol=2e-6)


# ----------------------------------------------------------------------------- keys


def test_keys_add_list_remove(tmp_path):
    path = tmp_path / "sub" / "keys.toml"
    r = CliRunner().invoke(serve_main, ["keys", "add", "cam-1", "--keys", str(path)])
    assert r.exit_code == 0, r.output
    key = r.stdout.strip().splitlines()[-1]
    assert len(key) == 43 and re.fullmatch(r"[A-Za-z0-9_-]+", key)
    text = path.read_text()
    assert key not in text and K.hash_key(key) in text
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    r = CliRunner().invoke(serve_main, ["keys", "add", "cam-2", "--keys", str(path),
                                        "--rate", "0.1", "--depth", "4"])
    assert r.exit_code == 0
    key2 = r.stdout.strip().splitlines()[-1]
    assert key2 != key
    entries = K.read_key_file(path)
    assert list(entries) == ["cam-1", "cam-2"]
    assert (entries["cam-2"].rate, entries["cam-2"].depth) == (0.1, 4.0)
    store = K.KeyStore.from_file(path)
    assert store.check(key) == "cam-1" and store.check(key2) == "cam-2"
    assert store.check(key + "x") is None and store.check("") is None
    r = CliRunner().invoke(serve_main, ["keys", "list", "--keys", str(path)])
    assert r.exit_code == 0 and "cam-1" in r.stdout and "rate=0.1 depth=4" in r.stdout
    assert key not in r.output
    r = CliRunner().invoke(serve_main, ["keys", "add", "cam-1", "--keys", str(path)])
    assert r.exit_code == 1 and "already exists" in r.output
    r = CliRunner().invoke(serve_main, ["keys", "remove", "cam-1", "--keys", str(path)])
    assert r.exit_code == 0
    assert list(K.read_key_file(path)) == ["cam-2"]
    r = CliRunner().invoke(serve_main, ["keys", "remove", "cam-1", "--keys", str(path)])
    assert r.exit_code == 1 and "no key named 'cam-1'" in r.output
    assert sorted(p.name for p in path.parent.iterdir()) == ["keys.toml"]  # no temporary files


@pytest.mark.parametrize("args, message", [
    (["keys", "add", "bad name"], "key name"),
    (["keys", "add", "x", "--rate", "0.1"], "both rate and depth"),
    (["keys", "add", "x", "--rate", "1.5", "--depth", "4"], "must be in (0, 1)"),
    (["keys", "list", "--keys", "missing.toml"], "not found"),
])
def test_keys_cli_refusals(tmp_path, args, message):
    if "--keys" not in args:
        args = args + ["--keys", str(tmp_path / "k.toml")]
    r = CliRunner().invoke(serve_main, args)
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("text, message", [
    ("[keys\n", "not valid TOML"),
    ('[keys.a]\nsha256 = "abc"\n', "64 lower-case hex"),
    (f'[keys.a]\nsha256 = "{"0" * 64}"\nrate = 0.1\n', "both rate and depth"),
    (f'[keys.a]\nsha256 = "{"0" * 64}"\ncolour = 1\n', "unknown fields"),
    ("other = 1\n", "unknown top-level"),
])
def test_bad_key_files(tmp_path, text, message):
    path = tmp_path / "k.toml"
    path.write_text(text)
    with pytest.raises(K.KeyFileError, match=re.escape(message)):
        K.read_key_file(path)


def test_key_check_is_constant_time(monkeypatch):
    seen = spy_compare_digest(monkeypatch, K)
    entries = {n: K.KeyEntry(n, K.hash_key(f"key-{n}")) for n in ("a", "b", "c")}
    store = K.KeyStore(entries)
    assert store.check("key-a") == "a"
    # Every stored hash is compared, even after the match, with hmac.compare_digest.
    assert len(seen) == 3 and all(len(a) == len(b) == 32 for a, b in seen)
    seen.clear()
    assert store.check("nope") is None and len(seen) == 3


@pytest.mark.parametrize("headers", [
    {"Content-Type": "image/png"},
    {"Content-Type": "image/png", "Authorization": "Bearer wrong"},
    {"Content-Type": "image/png", "Authorization": f"Basic {KEY}"},
    {"Content-Type": "image/png", "Authorization": "Bearer "},
])
def test_401(client, frames, headers):
    r = client.post(wire.CLASSIFY_PATH, content=frames[0], headers=headers)
    assert r.status_code == 401 and "API key" in r.json()["error"]
    assert r.headers["www-authenticate"] == "Bearer"
    _healthy(client)


def test_key_file_reloaded_while_serving(tmp_path, strong_model, frames):
    path = tmp_path / "keys.toml"
    key1 = K.add_key(path, "one")
    now = [0.0]
    store = K.KeyStore.from_file(path, clock=lambda: now[0], reload_s=1.0)
    with TestClient(create_app(strong_model, store)) as c:
        def status(key):
            return c.post(wire.CLASSIFY_PATH, content=frames[0],
                          headers={"Authorization": f"Bearer {key}",
                                   "Content-Type": "image/png"}).status_code

        assert status(key1) == 200
        key2 = K.add_key(path, "two")
        K.remove_key(path, "one")
        assert status(key2) == 401  # not looked at yet (at most once a second)
        now[0] = 1.5
        assert status(key2) == 401  # seen changed once; taken when a second look agrees
        now[0] = 3.0
        assert status(key2) == 200 and status(key1) == 401
        path.write_text("[broken\n")  # a damaged file keeps the previous keys
        now[0] = 4.5
        assert status(key2) == 200
        now[0] = 6.0
        assert status(key2) == 200


# ----------------------------------------------------------------------------- buckets


def _reference(times, rate, depth, slot_s, counts=None):
    """SPEC section 1 on request times: allowed flags from step_reference over slot counts.

    Slots by ``slot_index`` (half-up, the device's rule). ``counts``, a list,
    receives the scaled tokens left after each decision.
    """
    N, P, M = scale(rate, depth)
    n, out = M, []
    slots = [max(0, slot_index(t, 0.0, slot_s)) for t in times]
    for i, s in enumerate(slots):
        a = n >= P
        out.append(a)
        if counts is not None:
            counts.append(step_reference(n, a, 0, N, P, M))
        gap = (slots[i + 1] - s) if i + 1 < len(slots) else 0
        n = step_reference(n, a, gap, N, P, M)
    return out


@settings(max_examples=100, deadline=None)
@given(rate=st.sampled_from([0.1, 0.25, 0.5, 0.05, 0.3]), depth=st.sampled_from([1.0, 2.0, 4.0, 2.5]),
       gaps=st.lists(st.integers(0, 3000), min_size=1, max_size=60))
# 4.3 s is the start of slot 22 exactly, but 4.3 / 0.2 + 0.5 floors to 21 in floating point:
# the wait must still be > 0 (it once came out as 0.0).
@example(rate=0.25, depth=1.0, gaps=[500, 3000, 800])
def test_key_bucket_follows_spec(rate, depth, gaps):
    slot_ms = 200
    t_ms = np.cumsum(gaps)  # integer milliseconds: slot boundaries are exact
    times = [float(t) / 1000.0 for t in t_ms]
    b = K.KeyBucket(rate, depth, slot_ms / 1000.0, now=0.0)
    got, counts = [], []
    N, P, M = scale(rate, depth)
    for t in times:
        ok, wait = b.take(t)
        got.append(ok)
        counts.append(b.tokens)
        if ok:
            assert wait == 0.0
        else:  # the wait ends where the slot in which one token is back begins (half-up slots)
            s = slot_index(t, 0.0, 0.2)
            k = math.ceil((P - b.tokens) / N)
            assert wait == pytest.approx((s + k - 0.5) * 0.2 - t, abs=1e-9) and wait > 0
            assert slot_index(t + wait + 1e-9, 0.0, 0.2) == s + k  # and that slot is the one
    want_counts = []
    assert got == _reference(times, rate, depth, slot_ms / 1000.0, want_counts)
    assert counts == want_counts  # the same admit decisions and the same counts


def test_429_exactly_when_bucket_is_empty(strong_model, frames):
    # rate 0.25, depth 2 -> (N, P, M) = (1, 4, 8): two requests at once, then one per 4 slots.
    # Half-up slots: 0.79 s is already slot 4 (slot 4 begins at 0.7 s), 3.3 s slot 17.
    now = [0.0]
    store = _store(rate=0.25, depth=2, slot_s=0.2, clock=lambda: now[0])
    times = [0.0, 0.01, 0.05, 0.79, 0.81, 0.85, 1.60, 1.61, 3.3, 3.31, 3.32]
    expected = _reference(times, 0.25, 2, 0.2)
    assert expected == [True, True, False, True, False, False, True, False, True, True, False]
    with TestClient(create_app(strong_model, store)) as c:
        for t, ok in zip(times, expected):
            now[0] = t
            r = c.post(wire.CLASSIFY_PATH, content=frames[0], headers=PNG)
            if ok:
                assert r.status_code == 200
            else:
                assert r.status_code == 429
                assert int(r.headers["retry-after"]) >= 1
                wait = float(re.search(r"in ([0-9.]+) s", r.json()["error"]).group(1))
                b = store.bucket("cam")
                s = slot_index(t, 0.0, 0.2)  # half-up: slot s + k begins at (s + k - 1/2) slots
                k = math.ceil((b.P - b.tokens) / b.N)
                assert wait == pytest.approx((s + k - 0.5) * 0.2 - t, abs=1e-3)
                assert int(r.headers["retry-after"]) == max(1, math.ceil(wait - 1e-9))
                _healthy(c)
        m = c.get(wire.METRICS_PATH).text
        assert _metric(m, 'offload_requests_total{status="429"}') == expected.count(False)
        assert _metric(m, 'offload_requests_total{status="200"}') == expected.count(True)


def test_unlimited_key_never_429(client, frames):
    for _ in range(20):
        assert client.post(wire.CLASSIFY_PATH, content=frames[0], headers=PNG).status_code == 200


# ----------------------------------------------------------------------------- bad requests


def test_413_declared_length_over_http(strong_model):
    """A request declaring a huge body gets 413 without the server waiting for it."""
    with serve_in_thread(strong_model, api_key=KEY, max_body=4096) as srv:
        host, port = srv.url.rsplit("//", 1)[1].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall((f"POST {wire.CLASSIFY_PATH} HTTP/1.1\r\nHost: x\r\n"
                       f"Authorization: Bearer {KEY}\r\nContent-Type: image/png\r\n"
                       "Content-Length: 1000000000\r\n\r\n").encode())
            s.sendall(b"\x89PNG" * 10)  # a little of it, never the rest
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        assert data.startswith(b"HTTP/1.1 413"), data[:100]
        assert httpx.get(srv.url + wire.HEALTH_PATH).status_code == 200


def test_413_streamed_body_over_http(strong_model):
    """A chunked body (no Content-Length) is counted as it streams in."""
    sent = []

    def body():
        for _ in range(10):
            sent.append(1000)
            yield b"\x00" * 1000

    with serve_in_thread(strong_model, api_key=KEY, max_body=4096) as srv:
        with httpx.Client(timeout=30) as c:
            r = c.post(srv.url + wire.CLASSIFY_PATH, content=body(), headers=PNG)
            assert r.status_code == 413 and "over the limit of 4096" in r.json()["error"]
            assert c.get(srv.url + wire.HEALTH_PATH).status_code == 200
            # A chunked body under the limit is fine.
            ok = c.post(srv.url + wire.CLASSIFY_PATH, content=iter([b"x" * 100]), headers=PNG)
            assert ok.status_code == 400  # read in full, then refused as not a PNG


def test_413_testclient(strong_model, frames):
    with TestClient(create_app(strong_model, _store(), max_body=100)) as c:
        r = c.post(wire.CLASSIFY_PATH, content=frames[0], headers=PNG)
        assert r.status_code == 413
        _healthy(c)


@pytest.mark.parametrize("ctype", ["text/plain", "image/gif", "", "application/octet-stream"])
def test_415(client, frames, ctype):
    headers = {**AUTH, "Content-Type": ctype} if ctype else AUTH
    r = client.post(wire.CLASSIFY_PATH, content=frames[0], headers=headers)
    assert r.status_code == 415 and "content type" in r.json()["error"]
    _healthy(client)


def test_400s(client, frames):
    png = frames[0]
    jpg, _ = wire.encode_image(np.zeros((64, 64), np.uint8) + 100, "jpeg")
    huge, _ = wire.encode_image(np.zeros((2100, 2100), np.uint8), "png")
    cases = [
        (png[:len(png) // 2], "image/png", "truncated PNG"),
        (jpg[:len(jpg) - 10], "image/jpeg", "truncated JPEG"),
        (b"\x00" * 500, "image/png", "not a PNG"),
        (b"", "image/png", "empty"),
        (png, "image/jpeg", "not a JPEG"),
        (huge, "image/png", "over the server's limit"),
    ]
    for body, ctype, message in cases:
        r = client.post(wire.CLASSIFY_PATH, content=body, headers={**AUTH, "Content-Type": ctype})
        assert r.status_code == 400 and message in r.json()["error"], (message, r.text)
        _healthy(client)
    r = client.post(wire.CLASSIFY_PATH, content=png, headers={**PNG, "X-Frame-Id": "x" * 200})
    assert r.status_code == 400 and "X-Frame-Id" in r.json()["error"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=300), ctype=st.sampled_from(["image/png", "image/jpeg", "text/html"]),
       prefix=st.sampled_from([b"", b"\xff\xd8\xff\xc0\x00\x11", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"]))
def test_fuzzed_bodies_never_crash(client, body, ctype, prefix):
    r = client.post(wire.CLASSIFY_PATH, content=prefix + body, headers={**AUTH, "Content-Type": ctype})
    assert r.status_code in (200, 400, 415)
    assert "error" in r.json() or r.status_code == 200
    assert "Traceback" not in r.text


def test_unknown_paths_and_methods_answer_json(client):
    r = client.get("/nope")
    assert r.status_code == 404 and r.json() == {"error": "Not Found"}
    r = client.get(wire.CLASSIFY_PATH)
    assert r.status_code == 405 and "error" in r.json()
    _healthy(client)


# ----------------------------------------------------------------------------- metrics


def _metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_metrics_count_requests(strong_model, frames):
    with TestClient(create_app(strong_model, _store())) as c:
        for _ in range(3):
            assert c.post(wire.CLASSIFY_PATH, content=frames[0], headers=PNG).status_code == 200
        c.post(wire.CLASSIFY_PATH, content=frames[0], headers={"Content-Type": "image/png"})
        c.post(wire.CLASSIFY_PATH, content=b"xx", headers=PNG)
        r = c.get(wire.METRICS_PATH)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        m = r.text
        assert _metric(m, 'offload_requests_total{status="200"}') == 3
        assert _metric(m, 'offload_requests_total{status="401"}') == 1
        assert _metric(m, 'offload_requests_total{status="400"}') == 1
        assert _metric(m, "offload_request_seconds_count") == 5
        assert _metric(m, "offload_batch_size_count") == 3
        assert _metric(m, "offload_inference_seconds_count") == 3
        assert _metric(m, "offload_queue_depth") == 0
    # A second app in the same process has its own registry: counts start at zero.
    with TestClient(create_app(strong_model, _store())) as c2:
        m2 = c2.get(wire.METRICS_PATH).text
        assert "offload_requests_total{" not in m2 and _metric(m2, "offload_batch_size_count") == 0


# ----------------------------------------------------------------------------- serving API, CLI


def test_serve_in_thread_starts_and_stops(strong_model, frames):
    srv = serve_in_thread(strong_model)  # a throw-away key
    try:
        assert srv.running and srv.url.startswith("http://127.0.0.1:") and len(srv.api_key) == 43
        r = httpx.post(srv.url + wire.CLASSIFY_PATH, content=frames[1], timeout=30,
                       headers={"Authorization": f"Bearer {srv.api_key}", "Content-Type": "image/png"})
        assert r.status_code == 200 and wire.parse_answer(r.content).top1 == 9
    finally:
        srv.stop()
    assert not srv.running
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + wire.HEALTH_PATH, timeout=5)


def test_serve_in_thread_refusals(tmp_path, strong_model):
    from offload.server import ServerStartError

    with pytest.raises(ServerStartError, match="not found"):
        serve_in_thread(keys=str(tmp_path / "none.toml"))
    with pytest.raises(ServerStartError, match="not found"):
        serve_in_thread(tmp_path / "none.onnx")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        with pytest.raises(ServerStartError, match="cannot listen"):
            serve_in_thread(strong_model, port=s.getsockname()[1])


def test_serve_cli_errors(tmp_path):
    keys = tmp_path / "k.toml"
    K.add_key(keys, "a")
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[keys\n")
    empty = tmp_path / "empty.toml"
    K.write_key_file(empty, {})
    garbage = tmp_path / "g.onnx"
    garbage.write_bytes(b"nope")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        busy = str(s.getsockname()[1])
        cases = [
            (["--keys", str(tmp_path / "missing.toml")], "not found"),
            (["--keys", str(bad_toml)], "not valid TOML"),
            (["--keys", str(empty)], "holds no keys"),
            (["--keys", str(keys), "--model", str(tmp_path / "x.onnx")], "model file"),
            (["--keys", str(keys), "--model", str(garbage)], "not a usable ONNX model"),
            (["--keys", str(keys), "--port", busy], "cannot listen"),
            (["--keys", str(keys), "--max-batch", "0"], "max-batch"),
        ]
        for args, message in cases:
            r = CliRunner().invoke(serve_main, args)
            assert r.exit_code != 0, args
            assert message in r.output and "Traceback" not in r.output, (args, r.output)
            assert r.output.count("Error") == 1


def test_listening_socket_gets_tcp_nodelay():
    """asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP; without it every
    answer waited ~40 ms for a delayed ACK (headers and body go out as two writes)."""
    from offload.server.serve import bind_socket

    s = bind_socket("127.0.0.1", 0)
    try:
        assert s.proto == socket.IPPROTO_TCP
        c = socket.create_connection(s.getsockname()[:2], timeout=10)
        conn, _ = s.accept()
        with c, conn:
            assert conn.proto == socket.IPPROTO_TCP  # accepted sockets inherit it
    finally:
        s.close()


def test_large_picture_decoded_off_the_loop(client, frames):
    """Pictures over 256x256 are decoded in a worker thread; the answer is the same kind."""
    img = cv2.imdecode(np.frombuffer(frames[1], np.uint8), cv2.IMREAD_GRAYSCALE)
    big = cv2.cvtColor(cv2.resize(img, (280, 280), interpolation=cv2.INTER_NEAREST),
                       cv2.COLOR_GRAY2BGR)
    body, ctype = wire.encode_image(big, "png")
    r = client.post(wire.CLASSIFY_PATH, content=body, headers={**AUTH, "Content-Type": ctype})
    assert r.status_code == 200 and wire.parse_answer(r.content).top1 == 9


def test_server_imports_no_torch(tmp_path):
    import subprocess
    import sys

    code = ("import sys, offload.server, offload.server.cli; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    # cwd away from the repository: `python -c` puts the cwd first on sys.path, where the
    # source tree would shadow the installed package (no compiled core there).
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_cuda_provider_first_when_available():
    from offload.server.model import default_providers

    assert default_providers(["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert default_providers(["AzureExecutionProvider", "CPUExecutionProvider"]) == [
        "CPUExecutionProvider"]


@pytest.mark.parametrize("sig, code", [("SIGINT", 0), ("SIGTERM", -15)])
def test_offload_serve_process_serves_and_stops(tmp_path, frames, sig, code):
    """Ctrl+C stops it with status 0; SIGTERM ends it by that signal after a graceful
    shutdown (uvicorn re-raises it), as service managers expect. No traceback either way."""
    import signal

    from offload.server.serve import start_process

    keys = tmp_path / "keys.toml"
    key = K.add_key(keys, "cam")
    proc, url = start_process(["--keys", str(keys), "--port", "0", "--log-level", "warning"],
                              cwd=tmp_path)  # see above
    try:
        r = httpx.post(url + wire.CLASSIFY_PATH, content=frames[1], timeout=30,
                       headers={"Authorization": f"Bearer {key}", "Content-Type": "image/png"})
        assert r.status_code == 200 and wire.parse_answer(r.content).top1 == 9
        proc.send_signal(getattr(signal, sig))
        assert proc.wait(30) == code
        rest = proc.stderr.read()
        assert "Traceback" not in rest and "Aborted" not in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_top_k_is_bounded_by_what_a_device_accepts(strong_model):
    """A server configured to answer more classes than a device parses would have every
    answer refused as bad-answer: it refuses to start instead."""
    from offload import wire

    with pytest.raises(ValueError, match=f"top_k={wire.MAX_TOP_ITEMS + 1} must be <= "):
        create_app(strong_model, _store(), top_k=wire.MAX_TOP_ITEMS + 1)
    create_app(strong_model, _store(), top_k=wire.MAX_TOP_ITEMS)
