"""``offload-sim fleet``: compare the fleet strategies for ``K`` cameras behind one switch.

Builds every camera's test streams (and, for the hierarchical search, its
training streams) from the profile, runs the strategies of
``offload.strategies`` on the same streams and prints one row per strategy:
average loss, reward per image, sends the switch refused, and each camera's
share of the sends the switch admitted. ``--json`` writes the same table with
the bucket every camera used.

The hierarchical grid search runs in this process: on the published grid
(about 700 buckets) it takes seconds (docs/fleet.md), so it needs neither
local worker processes nor Ray.
"""

from __future__ import annotations

import json

import click
import numpy as np

from offload import strategies
from offload.atomic import atomic_write_text
from offload.commandline import (echo_table, fail, ray_option, scenario_options, select_profile,
                                 user_errors)
from offload.scenario import Scenario, ScenarioError

__all__ = ["fleet", "fleet_setting", "load_cameras", "fleet_rows", "run_blobs", "MAX_CAMERAS"]

#: Cameras one fleet may have (the switch's turn order is stored as uint8).
MAX_CAMERAS = 255


def fleet_setting(cameras, switch_rate, depth_per_camera):
    """The ``FleetSetting``, or one ``Error:`` line naming the options."""
    try:
        return strategies.FleetSetting(cameras, switch_rate, depth_per_camera)
    except ValueError as exc:
        fail(f"--cameras {cameras} --switch-rate {switch_rate} --switch-depth-per-camera "
             f"{depth_per_camera}: {exc}")


def load_cameras(setting, profile_paths, synthetic, choice, spread, rprob, arrivals, markov, seed):
    """One ``CameraData`` per camera: its profile (``--camera-profile``, cycled) and scenario.

    Refuses a fleet with more cameras than the profile can feed: every camera
    needs at least one image of the profile's training and test splits.
    """
    try:  # the camera scenario carries the isolated bucket (r_g, b_p)
        sc = Scenario(setting.switch_rate, setting.depth_per_camera, choice, spread, rprob,
                      arrivals, tuple(markov), seed)
    except ScenarioError as e:
        option = {"markov": f"--markov {' '.join(map(str, markov))}"}.get(e.field, f"--{e.field}")
        fail(f"{option}: {e}")
    paths = list(profile_paths) or [None]
    datas = []
    for path in paths:
        prof, label = select_profile(path, synthetic=synthetic, seed=seed, announce=path is None)
        with user_errors(label):
            d = strategies.camera_data(prof, sc, name=label)
        n = min(len(d.train[0]), len(d.test[0]))
        if setting.cameras > n:
            fail(f"{label}: {setting.cameras} cameras are more than the profile can feed "
                 f"({len(d.train[0])} training and {len(d.test[0])} test images; at least one "
                 "of each per camera)")
        datas.append(d)
    return [datas[i % len(datas)] for i in range(setting.cameras)]


def run_blobs(datas, setting, paths, *, length, n_seq, order, seed):
    """The fleet with camera ``i`` running policy blob ``paths[i mod n]``, on the strategies' test streams."""
    from offload import blob, fleet

    test = strategies.fleet_streams(datas, purpose="test", length=length, n_seq=n_seq)
    cams, buckets = [], []
    for i, st in enumerate(test):
        path = paths[i % len(paths)]
        with user_errors():
            pol = blob.read_blob(path)
        with user_errors(path):
            if pol.kind == "thresholds":
                cams.append(fleet.Camera(st, pol.bucket, theta=pol.theta, name=path))
            else:
                cams.append(fleet.Camera(st, pol.bucket, send=fleet.dqn_send_table(pol, st),
                                         name=path))
        N, P, M = pol.bucket
        buckets.append((pol.meta.get("rate", N / P), pol.meta.get("depth", M / P)))
    with user_errors("blobs"):
        return fleet.run_fleet(cams, setting.switch, name="blobs", buckets=buckets, order=order,
                               seed=seed)


def _buckets_cell(buckets):
    """``r/b`` of the cameras' buckets: one value when all are the same."""
    words = ["switch" if b is None else f"{b[0]:g}/{b[1]:g}" for b in buckets]
    return words[0] if len(set(words)) == 1 else " ".join(words)


def fleet_rows(results):
    """Table rows (text cells for the share and buckets) and their columns."""
    rows = []
    for res in results.values():
        r = res.row()
        rows.append({**r, "share": " ".join(f"{x:.2f}" for x in r["share"]),
                     "buckets (r/b)": _buckets_cell(res.buckets)})
    cols = ["strategy", "avg_loss", "reward", "switch_refusals", "refused_per_send", "share",
            "buckets (r/b)"]
    return rows, cols


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--cameras", "-K", default=4, type=click.IntRange(1, MAX_CAMERAS),
              help="Number of cameras K sharing the switch.")
@click.option("--switch-rate", default=0.1, type=float,
              help="Switch rate r_g: tokens per image of the merged stream of K cameras (the "
                   "server's switch rate per slot is K * r_g).")
@click.option("--switch-depth-per-camera", default=2.0, type=float,
              help="b_p: the switch depth is K * b_p tokens.")
@scenario_options(bucket=False)
@click.option("--camera-profile", "camera_profiles", multiple=True,
              type=click.Path(dir_okay=False),
              help="Heterogeneous cameras: camera i uses the (i mod n)-th of these profiles "
                   "(repeatable); default: --profile for every camera.")
@click.option("--camera-blob", "camera_blobs", multiple=True, type=click.Path(dir_okay=False),
              help="Also run these policy blobs, camera i the (i mod n)-th (thresholds or DQN, "
                   "each with its own bucket; e.g. offload-train fleet's): strategy 'blobs'.")
@click.option("--order", type=click.Choice(["fixed", "random"]), default="fixed",
              help="Switch turn order per slot: 0..K-1 (published), or random per slot.")
@click.option("--strategy", "names", multiple=True,
              type=click.Choice(list(strategies.STRATEGIES)),
              help="Strategy to run (repeatable); default: all.")
@click.option("--length", default=10000, type=click.IntRange(2), help="Images per test stream.")
@click.option("--streams", default=10, type=click.IntRange(1), help="Test streams per camera.")
@click.option("--train-length", default=4000, type=click.IntRange(2),
              help="Images per training stream of the hierarchical search.")
@click.option("--train-streams", default=8, type=click.IntRange(1),
              help="Training streams per camera of the hierarchical search.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1),
              help="Local processes for the grid's MDP solves.")
@ray_option("the grid's MDP solves")
@click.option("--grid-step", default=1, type=click.IntRange(1),
              help="Search every n-th rate and depth of the published grid (1: all of it).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Write the table as JSON.")
def fleet(cameras, switch_rate, switch_depth_per_camera, profile_path, synthetic, choice, spread,
          rprob, arrivals, markov, seed, camera_profiles, camera_blobs, order, names, length,
          streams, train_length, train_streams, workers, ray_address, grid_step, json_path):
    """Compare fleet strategies: K cameras behind one switch bucket (r_g, K * b_p)."""
    setting = fleet_setting(cameras, switch_rate, switch_depth_per_camera)
    paths = camera_profiles or ([profile_path] if profile_path else [])
    datas = load_cameras(setting, paths, synthetic, choice, spread, rprob, arrivals, markov, seed)
    N, P, M = setting.switch
    click.echo(f"fleet: {cameras} cameras, switch r_g={switch_rate} b_g={setting.switch_depth:g} "
               f"-> (N, P, M) = ({N}, {P}, {M}) ({setting.server_rate:g} tokens per slot); "
               f"{streams} streams x {length} images per camera, {choice}, {arrivals} arrivals, "
               f"{order} order", err=True)
    with user_errors("fleet", memory_hint="use fewer or shorter streams (--streams, --length)"):
        results, searches = strategies.run_strategies(
            datas, setting, length=length, n_seq=streams, train_length=train_length,
            train_seq=train_streams, order=order, seed=seed,
            names=list(names) or list(strategies.STRATEGIES), grid_step=grid_step, workers=workers,
            ray_address=ray_address, progress=True)
    if camera_blobs:
        results["blobs"] = run_blobs(datas, setting, camera_blobs, length=length, n_seq=streams,
                                     order=order, seed=seed)
    for name, s in searches.items():
        click.echo(f"{name}: best of {len(s['points'])} grid buckets on the training streams: "
                   f"r_i={s['best'][0]:g} b_i={s['best'][1]:g}", err=True)
    rows, cols = fleet_rows(results)
    echo_table(rows, cols)
    if json_path:
        with user_errors("writing"):
            _write_json(json_path, setting, results, searches, order=order, choice=choice,
                        arrivals=arrivals, streams=streams, length=length,
                        profiles=[d.name for d in datas])


def _write_json(path, setting, results, searches, *, profiles, **streams):
    atomic_write_text(path, json.dumps(
        {"setting": setting.to_dict(), "streams": streams, "profiles": profiles,
         "results": [r.row() for r in results.values()],
         "search": {k: {"best": {"rate": s["best"][0], "depth": s["best"][1]},
                        "points": len(s["points"]),
                        "best_train_reward": float(np.max(s["train_reward"]))}
                    for k, s in searches.items()}}, indent=2))
