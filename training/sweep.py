"""Evaluation sweeps: every point of a grid a trained DQN against every benchmark.

The grids themselves (what a grid is, the paper's ready-made ones, the
points a grid makes) are ``training.grid``'s; its names are re-exported here.
``run_sweep`` runs the points that have no finished result in the output
folder (local processes or Ray tasks), each with ``training.dqn.train_policy``
(``run_point``), writes each point's result and policy blob as soon as it
arrives, and rewrites the results table after each one. A point that fails
is recorded with its error; the others go on.

Times are in seconds.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import time
import traceback

from offload.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from offload.commandline import RAY_MISSING, connect_ray
from training.grid import (CONFIG_KEYS, GRIDS, PARAM_COLUMNS, SCALES, SCENARIO_KEYS, Grid,
                           GridError, Part, Point, grid_from_dict, load_grid, load_toml,
                           point_scenario, points, ready_grid, resolve, scale_config)

__all__ = ["GRIDS", "SCALES", "GridError", "Grid", "Part", "Point", "ready_grid", "load_toml",
           "load_grid", "grid_from_dict", "points", "point_scenario", "resolve", "scale_config",
           "SCENARIO_KEYS", "CONFIG_KEYS", "PARAM_COLUMNS", "run_point", "run_sweep",
           "results_rows", "TABLE_COLUMNS", "JSON_ONLY_COLUMNS", "POLICIES", "PointInterrupted",
           "SweepSummary"]

#: The policies ``training.dqn.evaluate`` reports, in its order.
POLICIES = ("dqn-float", "dqn-int8", "mdp", "baseline", "lower-bound", "oracle", "oracle-metric",
            "belief", "ceiling")
#: Columns of ``results.csv`` (after the point's settings). ``results.json``'s
#: rows also carry ``JSON_ONLY_COLUMNS``: each policy's mean reward per image
#: on each test stream, for paired standard errors (``training.tables``).
TABLE_COLUMNS = ("point", "status", "policy", "avg_loss", "mean_reward", "offload_rate",
                 "share_of_oracle_gain", "share_of_oracle-metric_gain", "share_of_belief_gain",
                 "share_of_ceiling_gain", "train_seconds", "stopped_by", "seconds", "error")
JSON_ONLY_COLUMNS = ("stream_reward",)


def _dqn():
    from training import dqn  # torch: only where a point runs

    return dqn


# --------------------------------------------------------------------------- one point


class PointInterrupted(Exception):
    """Training of a point was stopped by a signal: nothing is recorded for it."""


def run_point(point, config, prof, fingerprint, threads=1):
    """Train and evaluate one point with ``training.dqn.train_policy``; ``(record, blob_bytes)``.

    ``record`` is ``training.dqn.report``'s dict plus ``point`` (id, params,
    config), ``train_scenario`` and ``status = "done"``. The DQN trains on
    ``train_choice`` sequences and every policy is tested on ``choice``
    sequences (the same test sequences for all). Raises on any failure (the
    caller records it) and ``PointInterrupted`` when a signal stopped
    training or tuning.
    """
    import torch

    from offload import blob
    D = _dqn()

    torch.set_num_threads(max(1, int(threads)))
    p = point.params
    test_sc = point_scenario(p)
    train_sc = point_scenario(p, "train_choice")
    data = D.prepare_data(prof, config.holdout, p["seed"])
    meta = {"name": "dqn", "point": point.id, "rate": p["rate"], "depth": p["depth"],
            "choice": p["choice"], "train_choice": p["train_choice"], "arrivals": p["arrivals"]}
    run = D.train_policy(data, train_sc, config, prof, meta=meta, test_scenario=test_sc,
                         fingerprint=fingerprint, threads=threads,
                         provenance={"files": {"policy": f"{point.id}.bin"}})
    if run.interrupted:
        raise PointInterrupted(run.trainer.stopped_by)
    rec = dict(run.report, command="offload-train sweep", status="done",
               train_scenario=train_sc.to_dict(),
               point={"id": point.id, "params": point.params, "config": point.config})
    return _clean_json(rec), blob.to_bytes(run.policy)


# Worker state of a local process pool: the profile, sent once per worker.
_WORKER = {}


def _worker_init(prof, fingerprint, threads):
    import signal

    # Ctrl+C goes to the terminal's whole process group; the parent decides
    # what happens to running points (it ends them), so a worker leaves the
    # group (the trainer would otherwise catch the signal and stop early).
    if hasattr(os, "setpgrp"):
        os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER.update(prof=prof, fingerprint=fingerprint, threads=threads)


def _pool_task(point, config):
    return _guarded(point, config, _WORKER["prof"], _WORKER["fingerprint"], _WORKER["threads"])


def _guarded(point, config, prof, fingerprint, threads):
    """``("done", record, blob)`` or ``("failed", record, None)``: never raises but on interrupt."""
    t0 = time.time()
    try:
        rec, data = run_point(point, config, prof, fingerprint, threads)
        return "done", rec, data
    except PointInterrupted:
        raise
    except Exception as exc:  # any failure of one point is recorded, the sweep goes on
        tb = traceback.format_exc(limit=-3)
        return "failed", {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                          "traceback": tb, "seconds": time.time() - t0,
                          "point": {"id": point.id, "params": point.params,
                                    "config": point.config}}, None


# --------------------------------------------------------------------------- results


def point_paths(out, pid):
    """``(json, blob)`` paths of a point's result in the sweep folder ``out``."""
    return (os.path.join(out, "points", pid + ".json"), os.path.join(out, "points", pid + ".bin"))


def read_point(out, pid):
    """A point's stored record, or ``None`` when it has none or an unreadable one."""
    path, _ = point_paths(out, pid)
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def is_complete(out, pid):
    """A finished point: its record says done, lists every policy, and its blob exists."""
    rec = read_point(out, pid)
    if not rec or rec.get("status") != "done":
        return False
    names = [r.get("policy") for r in rec.get("test") or []]
    return names == list(POLICIES) and os.path.isfile(point_paths(out, pid)[1])


def results_rows(out, grid_points, config_keys=()):
    """One row per point and policy (a failed point: one row with its error)."""
    rows = []
    for pt in grid_points:
        rec = read_point(out, pt.id)
        if rec is None:
            continue
        base = {"point": pt.id, **pt.params, **{k: pt.config.get(k) for k in config_keys},
                "status": rec.get("status"), "parts": "; ".join(pt.parts)}
        if rec.get("status") == "done":
            training = rec.get("training") or {}
            for r in rec.get("test") or []:
                rows.append({**base, **{k: r.get(k) for k in TABLE_COLUMNS + JSON_ONLY_COLUMNS
                                        if k in r},
                             "train_seconds": training.get("seconds"),
                             "stopped_by": training.get("stopped_by"),
                             "seconds": rec.get("total_seconds"), "error": ""})
        else:
            rows.append({**base, "policy": "", "error": rec.get("error", ""),
                         "seconds": rec.get("seconds")})
    return rows


def write_table(out, grid, grid_points, meta):
    """Rewrite ``results.csv`` and ``results.json`` (atomically) from the point records."""
    config_keys = sorted({k for pt in grid_points for k in pt.config})
    rows = results_rows(out, grid_points, config_keys)
    cols = (["point", "status", "parts", *PARAM_COLUMNS, *config_keys]
            + [c for c in TABLE_COLUMNS if c not in ("point", "status")])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})
    atomic_write_text(os.path.join(out, "results.csv"), buf.getvalue())
    done = sum(1 for pt in grid_points if is_complete(out, pt.id))
    failed = sum(1 for r in rows if r["status"] == "failed")
    atomic_write_json(os.path.join(out, "results.json"), _clean_json({
        **meta, "points": {"total": len(grid_points), "done": done, "failed": failed},
        "parts": [{"name": p.name, "x": p.x, "logx": p.logx, "axes": list(p.axes),
                   "points": [pt.id for pt in grid_points if p.name in pt.parts]}
                  for p in grid.parts],
        "columns": cols, "rows": rows}))
    return rows


def _clean_json(v):
    if isinstance(v, dict):
        return {k: _clean_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean_json(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _record(out, pid, status, rec, data):
    """Store one point: the blob first, then the record that marks it finished."""
    jpath, bpath = point_paths(out, pid)
    if status == "done":
        atomic_write_bytes(bpath, data)
    atomic_write_json(jpath, rec)


# --------------------------------------------------------------------------- the sweep


@dataclasses.dataclass
class SweepSummary:
    total: int
    skipped: int
    done: int
    failed: int
    interrupted: bool
    seconds: float


def _check_folder(out, meta):
    """Refuse a folder holding a sweep on another profile or at another scale."""
    path = os.path.join(out, "sweep.json")
    try:
        with open(path) as f:
            old = json.load(f)
    except FileNotFoundError:
        atomic_write_json(path, meta)
        return
    except (OSError, ValueError) as exc:
        raise GridError(f"{path}: unreadable ({exc}); remove it or choose another --out") from None
    for key, label in (("profile_fingerprint", "profile"), ("scale", "scale")):
        if old.get(key) != meta[key]:
            raise GridError(f"{out} holds a sweep with another {label} ({old.get(key)!r}, "
                            f"this run {meta[key]!r}): choose another --out")


def run_sweep(grid, out, scale, prof, profile_label, workers=None, ray_address=None, seed=0,
              threads=None, progress=True, echo=print):
    """Run every unfinished point of ``grid`` into folder ``out``; returns a ``SweepSummary``.

    ``workers`` local processes (default: the number of cores; 1 runs in this
    process) or, with ``ray_address``, Ray tasks on that cluster. ``threads``
    torch threads per point (default: ``max(1, cores // workers)``; with Ray,
    one per task). Ctrl+C keeps every finished point.
    """
    from tqdm import tqdm

    D = _dqn()
    if ray_address:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise GridError(RAY_MISSING) from None
    cores = os.cpu_count() or 1
    workers = max(1, int(workers or cores))
    if threads is None:
        threads = 1 if ray_address else max(1, cores // workers)
    fingerprint = D.profile_fingerprint(prof)
    pts = points(grid, seed)
    configs = {pt.id: scale_config(scale, pt, threads) for pt in pts}
    os.makedirs(os.path.join(out, "points"), exist_ok=True)
    meta = {"command": "offload-train sweep", "grid": grid.name, "title": grid.title,
            "scale": scale, "profile": profile_label, "profile_fingerprint": fingerprint,
            "profile_source": prof.source}
    _check_folder(out, meta)
    todo = [pt for pt in pts if not is_complete(out, pt.id)]
    skipped = len(pts) - len(todo)
    write_table(out, grid, pts, meta)
    echo(f"sweep {grid.name} ({scale}): {len(pts)} points, {skipped} already finished, "
         f"{len(todo)} to run {'on Ray at ' + ray_address if ray_address else ''}"
         f"{'' if ray_address else f'in {min(workers, max(1, len(todo)))} process(es)'}, "
         f"{threads} torch thread(s) each; results in {out}")
    bar = tqdm(total=len(pts), initial=skipped, unit="point", desc=f"sweep {grid.name}",
               disable=None if progress else True, dynamic_ncols=True, smoothing=0)
    counts = {"done": 0, "failed": 0}
    t0 = time.time()

    def finished(pt, status, rec, data):
        _record(out, pt.id, status, rec, data)
        write_table(out, grid, pts, meta)
        counts[status] += 1
        bar.update(1)
        bar.set_postfix_str(f"{counts['failed']} failed", refresh=True)
        if status == "failed":
            bar.write(f"point {pt.id} failed: {rec['error']}")

    interrupted = False
    try:
        if not todo:
            pass
        elif ray_address:
            interrupted = _run_ray(todo, configs, prof, fingerprint, threads, ray_address,
                                   finished)
        elif workers == 1 or len(todo) == 1:
            interrupted = _run_here(todo, configs, prof, fingerprint, threads, finished)
        else:
            interrupted = _run_pool(todo, configs, prof, fingerprint, threads, workers, finished)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    return SweepSummary(len(pts), skipped, counts["done"], counts["failed"], interrupted,
                        time.time() - t0)


def _run_here(todo, configs, prof, fingerprint, threads, finished):
    for pt in todo:
        try:
            status, rec, data = _guarded(pt, configs[pt.id], prof, fingerprint, threads)
        except PointInterrupted:
            return True
        finished(pt, status, rec, data)
    return False


def _run_pool(todo, configs, prof, fingerprint, threads, workers, finished):
    import concurrent.futures as cf
    import multiprocessing

    # spawn: no forked torch or thread state; every worker imports afresh.
    pool = cf.ProcessPoolExecutor(min(workers, len(todo)), multiprocessing.get_context("spawn"),
                                  initializer=_worker_init, initargs=(prof, fingerprint, threads))
    futures = {pool.submit(_pool_task, pt, configs[pt.id]): pt for pt in todo}
    stop = False
    try:
        for fut in cf.as_completed(futures):
            pt = futures[fut]
            try:
                status, rec, data = fut.result()
            except PointInterrupted:
                stop = True
                break
            except Exception as exc:  # the worker died (BrokenProcessPool): record, go on
                status, rec, data = "failed", {
                    "status": "failed", "error": f"{type(exc).__name__}: {exc}",
                    "point": {"id": pt.id, "params": pt.params, "config": pt.config}}, None
            finished(pt, status, rec, data)
    except KeyboardInterrupt:
        stop = True
    finally:
        if stop:
            # Running points are abandoned (their results would come too late
            # to keep); the executor has no public way to end its workers.
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.kill()
        pool.shutdown(wait=True, cancel_futures=True)
    return stop


def _ray_task(point, config, prof, fingerprint, threads):
    return _guarded(point, config, prof, fingerprint, threads)


def _run_ray(todo, configs, prof, fingerprint, threads, address, finished):
    try:
        ray = connect_ray(address)
    except ValueError as exc:
        raise GridError(str(exc)) from None
    task = ray.remote(num_cpus=threads, max_retries=0)(_ray_task)
    prof_ref = ray.put(prof)
    refs = {task.remote(pt, configs[pt.id], prof_ref, fingerprint, threads): pt for pt in todo}
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            pt = refs[ready[0]]
            try:
                status, rec, data = ray.get(ready[0])
            except Exception as exc:  # the task or its worker died
                status, rec, data = "failed", {
                    "status": "failed", "error": f"{type(exc).__name__}: "
                                                 f"{str(exc).splitlines()[0] if str(exc) else ''}",
                    "point": {"id": pt.id, "params": pt.params, "config": pt.config}}, None
            finished(pt, status, rec, data)
    except KeyboardInterrupt:
        return True
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
    return False
