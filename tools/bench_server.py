#!/usr/bin/env python3
"""Load benchmark of the edge server: many simulated devices against one server on loopback.

For each server setting (micro-batching on, and ``--max-batch 1``) and each
client count, the script starts ``offload-serve`` in its own process (so the
clients do not share its interpreter), lets ``C`` asyncio clients (httpx,
one connection each, like ``C`` devices) post the committed demo frames
(``artifacts/demo/frames/*.png``) back to back for ``--seconds``, and
reports: requests, 5xx answers, other non-200 answers, throughput, latency
p50/p99 seen by the clients, and the mean batch size from the server's
``/metrics``. One run measures every setting, so they share the machine's
state; the Markdown table it prints is what docs/benchmarks.md quotes.

    .venv/bin/python tools/bench_server.py                      # 16 and 64 clients, 10 s each
    .venv/bin/python tools/bench_server.py --clients 32 --seconds 5 --json out.json

This is a benchmark, not a test: it asserts nothing except that the server
started; read the table.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np


def _frames():
    from offload import artifacts

    folder = artifacts.find(os.path.join("demo", "frames"))
    if folder is None:
        sys.exit("demo frames not found (artifacts/demo/frames)")
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "*.png"))):
        with open(path, "rb") as f:
            out.append(f.read())
    return out


def _start_server(keys_path, max_batch, window_ms, threads):
    """``offload-serve`` in a process of its own, run beside the key file (outside the
    checkout, whose source tree would shadow the installed compiled core)."""
    from offload.server.serve import ServerStartError, start_process

    cmd = ["--keys", keys_path, "--port", "0", "--log-level", "warning",
           "--max-batch", str(max_batch), "--batch-window-ms", str(window_ms)]
    if threads:
        cmd += ["--threads", str(threads)]
    try:
        return start_process(cmd, cwd=os.path.dirname(keys_path))
    except ServerStartError as exc:
        sys.exit(str(exc))


def _stop_server(proc):
    proc.send_signal(signal.SIGTERM)  # uvicorn's graceful shutdown
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _cpu_seconds(pid):
    """User + system CPU seconds of process ``pid`` so far (Linux /proc), NaN elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def _metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


async def _load(url, key, frames, clients, seconds):
    import httpx

    headers = {"Authorization": f"Bearer {key}", "Content-Type": "image/png"}
    latencies, statuses = [], {}
    stop_at = time.perf_counter() + seconds

    async def device(i):
        async with httpx.AsyncClient(timeout=30) as c:
            k = i
            while time.perf_counter() < stop_at:
                body = frames[k % len(frames)]
                k += clients
                t = time.perf_counter()
                try:
                    r = await c.post(url + "/v1/classify", content=body, headers=headers)
                    status = r.status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                latencies.append(time.perf_counter() - t)
                statuses[status] = statuses.get(status, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(device(i) for i in range(clients)))
    return latencies, statuses, time.perf_counter() - t0


def run_one(frames, key, keys_path, max_batch, window_ms, clients, seconds, threads):
    import httpx

    proc, url = _start_server(keys_path, max_batch, window_ms, threads)
    try:
        # Warm up (first ONNX Runtime calls, connection set-up) outside the measurement.
        with httpx.Client(timeout=30) as c:
            for b in frames[:20]:
                c.post(url + "/v1/classify", content=b,
                       headers={"Authorization": f"Bearer {key}", "Content-Type": "image/png"})
            before = c.get(url + "/metrics").text
        cpu0, own0 = _cpu_seconds(proc.pid), time.process_time()
        lat, statuses, wall = asyncio.run(_load(url, key, frames, clients, seconds))
        cpu1, own1 = _cpu_seconds(proc.pid), time.process_time()
        after = httpx.get(url + "/metrics", timeout=30).text
    finally:
        _stop_server(proc)
    n_calls = _metric(after, "offload_batch_size_count") - _metric(before, "offload_batch_size_count")
    n_imgs = _metric(after, "offload_batch_size_sum") - _metric(before, "offload_batch_size_sum")
    srv_n = _metric(after, "offload_request_seconds_count") - _metric(before, "offload_request_seconds_count")
    srv_s = _metric(after, "offload_request_seconds_sum") - _metric(before, "offload_request_seconds_sum")
    inf_s = _metric(after, "offload_inference_seconds_sum") - _metric(before, "offload_inference_seconds_sum")
    lat_ms = np.array(lat) * 1000.0
    ok = statuses.get(200, 0)
    server_errors = sum(v for k, v in statuses.items() if isinstance(k, int) and k >= 500)
    other = sum(v for k, v in statuses.items() if k != 200) - server_errors
    return dict(
        max_batch=max_batch, window_ms=window_ms, clients=clients, seconds=round(wall, 2),
        requests=int(len(lat)), ok=int(ok), server_errors=int(server_errors), other_errors=int(other),
        statuses={str(k): v for k, v in statuses.items()},
        throughput_rps=round(ok / wall, 1),
        p50_ms=round(float(np.percentile(lat_ms, 50)), 2) if len(lat_ms) else None,
        p99_ms=round(float(np.percentile(lat_ms, 99)), 2) if len(lat_ms) else None,
        mean_batch=round(n_imgs / n_calls, 2) if n_calls else None,
        server_mean_ms=round(1000.0 * srv_s / srv_n, 2) if srv_n else None,
        model_ms_per_image=round(1000.0 * inf_s / n_imgs, 3) if n_imgs else None,
        server_cpu_ms_per_request=round(1000.0 * (cpu1 - cpu0) / max(len(lat), 1), 2),
        client_cpu_ms_per_request=round(1000.0 * (own1 - own0) / max(len(lat), 1), 2),
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[16, 64],
                    help="simulated devices (concurrent connections), one run each")
    ap.add_argument("--seconds", type=float, default=10.0, help="load time per run")
    ap.add_argument("--max-batch", type=int, default=32, help="the micro-batching setting")
    ap.add_argument("--batch-window-ms", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: default)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the whole set this many times (to see the noise)")
    ap.add_argument("--json", dest="json_path", help="also write the rows as JSON here")
    args = ap.parse_args(argv)

    from offload.server.keys import add_key

    frames = _frames()
    # The chosen micro-batching, the same with no window (batches form only
    # from requests that queue while the model runs), and no batching.
    settings = [(args.max_batch, args.batch_window_ms), (args.max_batch, 0.0), (1, 0.0)]
    if args.batch_window_ms == 0:
        settings = settings[1:]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        keys_path = os.path.join(tmp, "keys.toml")
        key = add_key(keys_path, "bench")
        for rnd in range(1, args.rounds + 1):
            for clients in args.clients:
                for mb, win in settings:
                    row = run_one(frames, key, keys_path, mb, win, clients, args.seconds,
                                  args.threads)
                    row["round"] = rnd
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)

    print(f"\n{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"{len(frames)} demo frames (28x28 PNG), {args.seconds:g} s per run\n")
    head = ("| round | clients | server | requests | 5xx | other non-200 | throughput (req/s) "
            "| p50 (ms) | p99 (ms) | in server, mean (ms) | model per image (ms) | mean batch "
            "| server CPU per request (ms) | client CPU per request (ms) |")
    print(head)
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        server = (f"micro-batching (max {r['max_batch']}, {r['window_ms']:g} ms)"
                  if r["max_batch"] > 1 else "`--max-batch 1`")
        print(f"| {r['round']} | {r['clients']} | {server} | {r['requests']} | {r['server_errors']} | "
              f"{r['other_errors']} | {r['throughput_rps']} | {r['p50_ms']} | {r['p99_ms']} | "
              f"{r['server_mean_ms']} | {r['model_ms_per_image']} | {r['mean_batch']} | "
              f"{r['server_cpu_ms_per_request']} | {r['client_cpu_ms_per_request']} |")
    if args.json_path:
        from offload.atomic import atomic_write_json

        atomic_write_json(args.json_path, rows)


if __name__ == "__main__":
    main()
