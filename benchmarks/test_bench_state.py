"""Shared bucket state: what Redis costs per request, and what replicas add, side by side.

Groups:

* ``state-admit``: one admission decision (key bucket then switch) in process:
  the in-memory buckets against the Lua script on a real loopback
  ``redis-server``. ``extra_info`` holds p50/p99 of 2000 single calls, the
  number the issue's target is about (at most 1 ms added at p99).
* ``state-request``: classify requests over loopback HTTP to two
  ``offload-serve`` processes, in-memory state and Redis state, in
  alternating blocks of 150 (6 each), one request at a time: p50/p99 of
  each and what Redis adds (``extra_info``; the target: at most 1 ms at p99).
* ``replicas``: total throughput of 1, 2 and 3 ``offload-serve`` processes
  sharing one Redis, 16 clients (4 processes of 4 threads, one connection
  each) for ``BENCH_REPLICA_SECONDS`` (3 s; 0.5 s under ``--benchmark-disable``). Clients and servers share
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
from offload.server.serve import default_model_path, start_process  # noqa: E402
from offload.server.state import MemoryState, RedisState  # noqa: E402

from redis_helpers import RedisServer  # noqa: E402

CALLS = 2000


@pytest.fixture(scope="module")
def redis_server_b(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_url(redis_server_b):
    return redis_server_b.url


def _cpu_s(pid):
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def _post_loop(url, key, frame, count):
    """Latencies (s) of ``count`` classify requests, one after another on one kept-alive connection."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "image/png"}
    times, top = [], set()
    for _ in range(count):
        t = time.perf_counter()
        conn.request("POST", wire.CLASSIFY_PATH, body=frame, headers=headers)
        r = conn.getresponse()
        body = r.read()
        times.append(time.perf_counter() - t)
        assert r.status == 200, body
        top.add(wire.parse_answer(body).top1)
    conn.close()
    assert top == {9}  # the same answer from every server
    return times


@pytest.fixture(scope="module")
def servers(tmp_path_factory, redis_url):
    """``(key, memory URL, [3 Redis URLs])``: four offload-serve processes, started at once."""
    folder = tmp_path_factory.mktemp("servers")
    path = folder / "keys.toml"
    K.add_switch(path, "up", rate=1e6, depth=1e6)
    key = K.add_key(path, "cam", switch="up")
    base = ["--keys", str(path), "--port", "0", "--model", default_model_path(), "--threads", "1",
            "--log-level", "warning", "--batch-window-ms", "0"]
    redis = ["--state", redis_url, "--state-timeout-ms", "1000"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        started = list(pool.map(lambda extra: start_process(base + extra, cwd=folder),
                                [[], redis, redis, redis]))
    try:
        urls = [u for _, u in started]
        yield key, urls[0], urls[1:], [p.pid for p, _ in started]
    finally:
        for p, _ in started:
            p.terminate()
        for p, _ in started:
            p.wait(20)


@pytest.mark.benchmark(group="state-request")
def test_bench_request_side_by_side(benchmark, servers, redis_server_b, frame):
    """Loopback requests to an in-memory and a Redis offload-serve in alternating blocks.

    Also the CPU each costs per request (the server process's, and Redis's for
    the Redis one), which a loaded machine moves far less than latency.
    """
    blocks, per_block = (1, 20) if benchmark.disabled else (6, 150)
    key, memory, redis, pids = servers
    urls, pids = [memory, redis[0]], pids[:2]
    for u in urls:
        _post_loop(u, key, frame, 10)  # warm: connections, the script in Redis
    cpu = {"memory": 0.0, "redis": 0.0, "redis-server": 0.0}

    def run():
        times = {"memory": [], "redis": []}
        for _ in range(blocks):
            for name, u, pid in zip(times, urls, pids):
                c0 = _cpu_s(pid)
                r0 = _cpu_s(redis_server_b.proc.pid)
                times[name] += _post_loop(u, key, frame, per_block)
                cpu[name] += _cpu_s(pid) - c0
                if name == "redis":
                    cpu["redis-server"] += _cpu_s(redis_server_b.proc.pid) - r0
        return times

    times = benchmark.pedantic(run, rounds=1, iterations=1)
    info = benchmark.extra_info
    for name, t in times.items():
        for k, v in _percentiles(t).items():
            info[f"{name}_{k}"] = v
    info["added_p50_ms"] = round(info["redis_p50_ms"] - info["memory_p50_ms"], 4)
    info["added_p99_ms"] = round(info["redis_p99_ms"] - info["memory_p99_ms"], 4)
    n = blocks * per_block
    for name, c in cpu.items():
        info[f"cpu_ms_per_request_{name}"] = round(c / n * 1e3, 4)
    print(f"\nstate-request, {blocks} x {per_block} requests each: {dict(info)}")


def _client_process(url, key, frame, seconds, threads):
    """One client process: ``threads`` threads posting for ``seconds``: (requests, non-200s)."""
    counts, bad = [0] * threads, [0] * threads
    end = time.perf_counter() + seconds

    def run(i):
        u = urlsplit(url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "image/png"}
        while time.perf_counter() < end:
            conn.request("POST", wire.CLASSIFY_PATH, body=frame, headers=headers)
            r = conn.getresponse()
            r.read()
            counts[i] += 1
            bad[i] += r.status != 200
        conn.close()

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(counts), sum(bad)


def _load(urls, key, frame, seconds, processes=4, threads=4):
    """Requests per second of ``processes`` x ``threads`` clients spread over ``urls``."""
    n = processes
    t0 = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(n) as pool:
        done = list(pool.map(_client_process, [urls[i % len(urls)] for i in range(n)],
                             [key] * n, [frame] * n, [seconds] * n, [threads] * n))
    elapsed = time.perf_counter() - t0
    assert sum(b for _, b in done) == 0, "every request answered 200"
    return sum(c for c, _ in done) / max(elapsed, seconds)


@pytest.mark.benchmark(group="replicas")
@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_bench_replica_throughput(benchmark, servers, frame, replicas):
    """Total requests/s of 1, 2, 3 offload-serve processes on one Redis."""
    key, _, redis, _ = servers
    seconds = 0.5 if benchmark.disabled else float(os.environ.get("BENCH_REPLICA_SECONDS", 3))
    rps = benchmark.pedantic(_load, args=(redis[:replicas], key, frame, seconds), rounds=1,
                             iterations=1)
    benchmark.extra_info["requests_per_s"] = round(rps, 1)
    print(f"\nreplicas={replicas}: {rps:.1f} requests/s")
    assert rps > 0
