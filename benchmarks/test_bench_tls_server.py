"""HTTPS against plain HTTP to ``offload-serve`` on loopback, over kept-alive connections.

Two ``offload-serve`` processes (one plain, one with a certificate from
``offload-serve tls init``), the same model and flags, started side by side.
A device reuses its connection, so the handshake is paid once and what TLS
costs per frame is the record encryption; the target is at most 15% fewer
requests per second with TLS.

* ``tls`` group: one classify request per round on one kept-alive connection
  (pytest-benchmark's table: mean, median, ops = requests/s);
* ``test_tls_side_by_side``: blocks of requests alternating between the two
  servers (so both see the same machine load), with ``C`` concurrent clients
  each on its own connection; prints requests/s, p50, p99 for both and the ratio.

Run with ``pytest benchmarks/test_bench_tls_server.py --benchmark-enable -s``;
without ``--benchmark-enable`` each runs briefly, with its checks (every
answer 200 and the same classes over both).
"""

import os
import signal
import ssl
import subprocess
import threading
import time

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("uvicorn")
pytest.importorskip("cryptography")
httpx = pytest.importorskip("httpx")

from offload import wire  # noqa: E402
from offload.server.keys import add_key  # noqa: E402
from offload.server.serve import start_process  # noqa: E402
from offload.server.tls import init_fleet  # noqa: E402



def _start(keys_path, extra):
    return start_process(["--keys", keys_path, "--port", "0", "--log-level", "warning",
                          "--threads", "1", *extra], cwd=os.path.dirname(keys_path))


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """{"http": (url, verify), "https": (url, verify)} and the key; both stopped afterwards."""
    root = tmp_path_factory.mktemp("bench-tls")
    init_fleet(str(root / "tls"), server_names=["localhost"], ips=["127.0.0.1"])
    key = add_key(str(root / "keys.toml"), "bench")
    procs, out = [], {}
    try:
        for scheme, extra in (("http", []),
                              ("https", ["--tls-cert", str(root / "tls" / "server.pem"),
                                         "--tls-key", str(root / "tls" / "server.key")])):
            proc, url = _start(str(root / "keys.toml"), extra)
            procs.append(proc)
            verify = ssl.create_default_context(cafile=str(root / "tls" / "ca.pem")) \
                if scheme == "https" else True
            out[scheme] = (url, verify)
        yield out, key
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _headers(key):
    return {"Authorization": f"Bearer {key}", "Content-Type": "image/png"}


@pytest.mark.benchmark(group="tls")
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_bench_classify_keep_alive(benchmark, servers, frame, scheme):
    (url, verify), key = servers[0][scheme], servers[1]
    with httpx.Client(verify=verify, timeout=30) as c:
        for _ in range(20):  # warm up: the handshake and the model's first calls
            c.post(url + wire.CLASSIFY_PATH, content=frame, headers=_headers(key))
        r = benchmark(lambda: c.post(url + wire.CLASSIFY_PATH, content=frame, headers=_headers(key)))
    assert r.status_code == 200 and wire.parse_answer(r.content).top1 == 9


def _block(url, verify, key, frame, clients, requests_each):
    """``clients`` threads, each on its own kept-alive connection: latencies (s), wall (s), classes."""
    latencies, answers = [], []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def device():
        mine, tops = [], set()
        with httpx.Client(verify=verify, timeout=30) as c:
            c.get(url + wire.HEALTH_PATH)  # the connection (and handshake) before the clock
            start.wait()
            for _ in range(requests_each):
                t = time.perf_counter()
                r = c.post(url + wire.CLASSIFY_PATH, content=frame, headers=_headers(key))
                mine.append(time.perf_counter() - t)
                assert r.status_code == 200, r.text
                tops.add(tuple(wire.parse_answer(r.content).classes))
        with lock:
            latencies.extend(mine)
            answers.extend(tops)

    threads = [threading.Thread(target=device) for _ in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - t0, set(answers)


def test_tls_side_by_side(servers, frame, request):
    enabled = request.config.getoption("benchmark_enable")
    blocks, clients, each = (6, 4, 150) if enabled else (1, 2, 5)
    (plain, key), results = (servers[0], servers[1]), {}
    stats = {s: dict(lat=[], wall=0.0, n=0, classes=set()) for s in ("http", "https")}
    block_ratios = []
    for _ in range(blocks):
        rps = {}
        for scheme in ("http", "https"):  # alternate, so both share the machine's state
            url, verify = plain[scheme]
            lat, wall, classes = _block(url, verify, key, frame, clients, each)
            rps[scheme] = len(lat) / wall
            st = stats[scheme]
            st["lat"] += lat
            st["wall"] += wall
            st["n"] += len(lat)
            st["classes"] |= classes
        block_ratios.append(rps["https"] / rps["http"])
    for scheme, st in stats.items():
        lat = np.array(st["lat"]) * 1000.0
        results[scheme] = dict(rps=st["n"] / st["wall"], p50=float(np.percentile(lat, 50)),
                               p99=float(np.percentile(lat, 99)), n=st["n"])
    ratio = results["https"]["rps"] / results["http"]["rps"]
    print(f"\n| {clients} kept-alive clients | requests | requests/s | p50 (ms) | p99 (ms) |")
    print("|---|---|---|---|---|")
    for scheme, r in results.items():
        print(f"| {scheme} | {r['n']} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} |")
    print(f"https/http requests/s: {ratio:.3f} overall; per block pair (adjacent in time) "
          f"min {min(block_ratios):.3f}, median {np.median(block_ratios):.3f}, "
          f"max {max(block_ratios):.3f}")
    # The same model answers both: the same classes for the same frame.
    assert stats["http"]["classes"] == stats["https"]["classes"] and len(stats["http"]["classes"]) == 1
