"""Shared bucket state: what Redis costs per request, and what replicas add, side by side.

Groups:

* ``state-admit``: one admission decision (key bucket then switch) in process:
  the in-memory buckets against the Lua script on a real loopback
  ``redis-server``. ``extra_info`` holds p50/p99 of 2000 single calls, the
  number the issue's target is about (at most 1 ms added at p99).
* ``state-request``: one classify request over loopback HTTP to a server in a
  thread (``serve_in_thread``), in-memory state against Redis state.
* ``replicas``: total throughput of 1, 2 and 3 ``offload-serve`` processes
  sharing one Redis, 16 client threads for ``BENCH_REPLICA_SECONDS`` (3 s;
  one short round under ``--benchmark-disable``). Clients and servers share
  this machine's cores, so this is a floor, not the servers' limit.

Every key here passes a switch so fast (rate 1e6 tokens/slot) that nothing is
refused: each request costs one full Lua update without the refusals'
shortcut. The contenders agree: every decision is an admission, every
request a 200 with the same answer.

Run with ``pytest benchmarks/test_bench_state.py --benchmark-enable --benchmark-group-by=group``.
"""

import asyncio
import concurrent.futures
import http.client
import os
import threading
import time
from urllib.parse import urlsplit

import numpy as np
import pytest

pytest.importorskip("redis")
pytest.importorskip("onnxruntime")

from offload import wire  # noqa: E402
from offload.server import keys as K  # noqa: E402
from offload.server.keys import Grant, KeyBucket  # noqa: E402
from offload.server.serve import default_model_path, serve_in_thread, start_process  # noqa: E402
from offload.server.state import MemoryState, RedisState  # noqa: E402

from redis_helpers import RedisServer  # noqa: E402

CALLS = 2000


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()


def _fast_grant():
    sw = KeyBucket(1e6, 1e6, 0.2, 0.0, any_rate=True)
    return Grant("cam", None, time.monotonic, switch="up", switch_bucket=sw)


def _percentiles(samples):
    a = np.asarray(samples) * 1e3
    return {"p50_ms": round(float(np.percentile(a, 50)), 4),
            "p99_ms": round(float(np.percentile(a, 99)), 4)}


@pytest.mark.benchmark(group="state-admit")
@pytest.mark.parametrize("where", ["memory", "redis"])
def test_bench_admit(benchmark, redis_url, where):
    loop = asyncio.new_event_loop()
    state = MemoryState() if where == "memory" else RedisState(redis_url, timeout_ms=1000)
    grant = _fast_grant()

    async def many(n):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            d = await state.admit(grant)
            times.append(time.perf_counter() - t)
            assert d.allowed and d.refused_by is None
        return times

    try:
        benchmark.extra_info.update(_percentiles(loop.run_until_complete(many(CALLS))))
        d = benchmark(lambda: loop.run_until_complete(state.admit(grant)))
        assert d.allowed
    finally:
        loop.run_until_complete(state.close())
        loop.close()


@pytest.mark.benchmark(group="state-request")
@pytest.mark.parametrize("where", ["memory", "redis"])
def test_bench_request(benchmark, tmp_path, redis_url, strong_model, frame, where):
    path = tmp_path / "keys.toml"
    K.add_switch(path, "up", rate=1e6, depth=1e6)
    key = K.add_key(path, "cam", switch="up")
    state = None if where == "memory" else RedisState(redis_url, timeout_ms=1000)
    opts = {} if state is None else {"state": state}
    with serve_in_thread(strong_model, keys=str(path), batch_window_ms=0.0, **opts) as server:
        u = urlsplit(server.url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "image/png"}

        def post():
            conn.request("POST", wire.CLASSIFY_PATH, body=frame, headers=headers)
            r = conn.getresponse()
            return r.status, r.read()

        times = []
        for _ in range(300):
            t = time.perf_counter()
            status, body = post()
            times.append(time.perf_counter() - t)
            assert status == 200
        benchmark.extra_info.update(_percentiles(times))
        status, body = benchmark(post)
        conn.close()
    assert status == 200 and wire.parse_answer(body).top1 == 9


def _load(urls, key, frame, seconds, threads=16):
    """Requests per second of ``threads`` clients spread over ``urls``; all must be 200."""
    counts, bad = [0] * threads, []
    stop = threading.Event()

    def run(i):
        u = urlsplit(urls[i % len(urls)])
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "image/png"}
        while not stop.is_set():
            conn.request("POST", wire.CLASSIFY_PATH, body=frame, headers=headers)
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                bad.append(r.status)
            counts[i] += 1
        conn.close()

    pool = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
    t0 = time.perf_counter()
    for t in pool:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in pool:
        t.join(30)
    assert not bad, bad[:5]
    return sum(counts) / (time.perf_counter() - t0)


@pytest.mark.benchmark(group="replicas")
@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_bench_replica_throughput(benchmark, tmp_path, redis_url, frame, replicas):
    path = tmp_path / "keys.toml"
    K.add_switch(path, "up", rate=1e6, depth=1e6)
    key = K.add_key(path, "cam", switch="up")
    args = ["--keys", str(path), "--port", "0", "--model", default_model_path(), "--state",
            redis_url, "--threads", "1", "--log-level", "warning", "--state-timeout-ms", "1000"]
    with concurrent.futures.ThreadPoolExecutor(replicas) as pool:
        started = list(pool.map(lambda _: start_process(args, cwd=tmp_path), range(replicas)))
    seconds = 0.5 if benchmark.disabled else float(os.environ.get("BENCH_REPLICA_SECONDS", 3))
    try:
        urls = [u for _, u in started]
        rps = benchmark.pedantic(_load, args=(urls, key, frame, seconds), rounds=1, iterations=1)
        benchmark.extra_info["requests_per_s"] = round(rps, 1)
        assert rps > 0
    finally:
        for p, _ in started:
            p.terminate()
        for p, _ in started:
            p.wait(20)
