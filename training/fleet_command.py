"""``offload-train fleet``: provision ``K`` cameras behind one link.

For a link budget, given as the switch bucket ``(r_g, b_p)`` or as the
link's bits per second, the image size and the frame rate, it searches each
camera's bucket (``offload.strategies``, hierarchical by default) and writes,
into one new folder, atomically (built beside it, then renamed):

* ``<name><i>.blob``: camera ``i``'s threshold policy for its bucket;
* ``keys.sh``: the ``offload-serve keys switch add`` line for the switch and
  one ``offload-serve keys add ... --switch`` line per camera;
* ``fleet.json``: the setting, every camera's bucket and the strategies'
  training and test numbers.

Torch-free. Units: the simulator's ``r_g`` is tokens per image of the merged
stream (per camera turn); the server's rates are tokens per slot of time
(``--slot-ms``, one frame period), so the switch line carries ``K * r_g``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import click
import numpy as np

from offload import blob, strategies
from offload.commandline import (echo_table, fail, ray_option, scenario_options, select_profile,
                                 threshold_policy_blob, user_errors)
from offload.fleet_command import MAX_CAMERAS, fleet_rows, fleet_setting, load_cameras

__all__ = ["fleet", "link_switch_rate", "key_lines"]


def link_switch_rate(link_bps, image_bytes, fps, cameras):
    """``r_g`` of a link: images it carries per image the ``K`` cameras take (``(0, 1)`` or refused).

    ``link_bps`` bits per second, ``image_bytes`` bytes per offloaded image,
    ``fps`` images per second per camera.
    """
    for name, v in (("--link-bps", link_bps), ("--image-bytes", image_bytes), ("--fps", fps)):
        if not (v > 0 and np.isfinite(v)):
            raise ValueError(f"{name} {v}: must be a positive number")
    r = link_bps / (8.0 * image_bytes) / (cameras * fps)
    if r >= 1:
        raise ValueError(f"the link carries {link_bps / (8.0 * image_bytes):.4g} images/s, at "
                         f"least every image of {cameras} cameras at {fps:g} fps "
                         f"(r_g = {r:.3g} >= 1): no bucket is needed")
    return r


def key_lines(setting, buckets, names, switch_name, keys_path=None):
    """The ``offload-serve`` command lines that configure the switch and the cameras' keys."""
    kf = f" --keys {keys_path}" if keys_path else ""
    lines = [f"offload-serve keys switch add {switch_name} --rate {setting.server_rate:.6g} "
             f"--depth {setting.switch_depth:g}{kf}"]
    lines += [f"offload-serve keys add {n} --rate {r:g} --depth {b:g} --switch {switch_name}{kf}"
              for n, (r, b) in zip(names, buckets)]
    return lines


def _setting(cameras, switch_rate, depth_per_camera, link_bps, image_bytes, fps):
    link = [link_bps, image_bytes, fps]
    if any(v is not None for v in link):
        if None in link:
            fail("--link-bps, --image-bytes and --fps go together")
        if switch_rate is not None:
            fail("give either --switch-rate or --link-bps/--image-bytes/--fps, not both")
        with user_errors():
            switch_rate = link_switch_rate(link_bps, image_bytes, fps, cameras)
    elif switch_rate is None:
        fail("give the link budget: --switch-rate R, or --link-bps, --image-bytes and --fps")
    return fleet_setting(cameras, switch_rate, depth_per_camera)


def _check_out(out):
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        fail(f"{out}: exists and is not an empty folder; give a new --out")


def _write(out, files):
    """Write ``files`` (name -> bytes) as folder ``out``, all or nothing."""
    parent = os.path.dirname(os.path.abspath(out))
    tmp = tempfile.mkdtemp(prefix=".fleet-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the folder from the server
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked before the work
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@click.command()
@click.option("--cameras", "-K", required=True, type=click.IntRange(1, MAX_CAMERAS),
              help="Number of cameras sharing the link.")
@click.option("--switch-rate", type=float, default=None,
              help="r_g: tokens per image of the merged stream of the K cameras.")
@click.option("--link-bps", type=float, default=None, help="Link budget, bits per second.")
@click.option("--image-bytes", type=float, default=None, help="Bytes per offloaded image.")
@click.option("--fps", type=float, default=None, help="Frames per second of each camera.")
@click.option("--switch-depth-per-camera", default=2.0, show_default=True, type=float,
              help="b_p: the switch holds K * b_p tokens (bursts).")
@scenario_options(bucket=False)
@click.option("--strategy", type=click.Choice(["hierarchical", "hierarchical-retry-after",
                                               "isolated"]),
              default="hierarchical", show_default=True, help="How each camera's bucket is chosen.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="New folder for the blobs, keys.sh and fleet.json.")
@click.option("--name", "prefix", default="cam", show_default=True,
              help="Key and blob names: NAME1 .. NAMEK.")
@click.option("--switch-name", default="uplink", show_default=True, help="The switch's name.")
@click.option("--keys", "keys_path", default=None, help="Key file the printed lines name.")
@click.option("--length", default=10000, show_default=True, type=click.IntRange(2),
              help="Images per test stream of the report.")
@click.option("--streams", default=10, show_default=True, type=click.IntRange(1))
@click.option("--train-length", default=4000, show_default=True, type=click.IntRange(2))
@click.option("--train-streams", default=8, show_default=True, type=click.IntRange(1))
@click.option("--dqn-top", default=0, show_default=True, type=click.IntRange(0),
              help="Also train a DQN (torch) at the threshold search's N best buckets and keep "
                   "it where it beats thresholds on the training streams (training.fleet_dqn).")
@click.option("--dqn-preset", default="quick", show_default=True,
              help="DQN preset for --dqn-top (offload-train dqn --preset).")
@click.option("--dqn-set", "dqn_set", multiple=True, metavar="KEY=VALUE",
              help="A DQN setting for --dqn-top, e.g. iterations=200 (repeatable).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1),
              help="Local processes for the grid's MDP solves.")
@ray_option("the grid's MDP solves")
@click.option("--grid-step", default=1, show_default=True, type=click.IntRange(1),
              help="Search every n-th rate and depth of the published grid.")
def fleet(cameras, switch_rate, link_bps, image_bytes, fps, switch_depth_per_camera,
          profile_path, synthetic, choice, spread, rprob, arrivals, markov, seed, strategy, out,
          prefix, switch_name, keys_path, length, streams, train_length, train_streams,
          dqn_top, dqn_preset, dqn_set, workers, ray_address, grid_step):
    """Provision K cameras behind one link: every camera's bucket, policy blob and key line."""
    _check_out(out)
    if dqn_top and strategy == "isolated":
        fail("--dqn-top searches hierarchical buckets: use it with --strategy hierarchical")
    setting = _setting(cameras, switch_rate, switch_depth_per_camera, link_bps, image_bytes, fps)
    # As offload-train dqn: the committed profile unless --profile or --synthetic N is given.
    synthetic = synthetic if _given("synthetic") else None
    datas = load_cameras(setting, [profile_path] if profile_path else [], synthetic, choice,
                         spread, rprob, arrivals, markov, seed)
    prof, label = select_profile(profile_path, synthetic=synthetic, seed=seed)
    names = [f"{prefix}{i + 1}" for i in range(cameras)]
    cache = strategies.PolicyCache()
    with user_errors("fleet"):
        results, searches = strategies.run_strategies(
            datas, setting, length=length, n_seq=streams, train_length=train_length,
            train_seq=train_streams, seed=seed, names=_compared(strategy), grid_step=grid_step,
            workers=workers, ray_address=ray_address, cache=cache, progress=True)
    chosen, pols, dqn_report = results[strategy], None, None
    if dqn_top:
        dqn_res, pols, dqn_report = _dqn_search(
            datas, prof, setting, searches[strategy], top=dqn_top, preset=dqn_preset,
            overrides=dqn_set, seed=seed, lengths=(length, streams, train_length, train_streams))
        results["hierarchical-dqn"] = dqn_res
        if pols is not None:
            chosen, strategy = dqn_res, "hierarchical-dqn"
    files = _blobs(datas, names, chosen.buckets, cache, prof, label, pols, meta={
        "cameras": cameras, "switch": switch_name, "strategy": strategy})
    lines = key_lines(setting, chosen.buckets, names, switch_name, keys_path)
    files["keys.sh"] = ("#!/bin/sh\n# offload-train fleet: the switch, then one key per camera"
                        "\nset -e\n" + "\n".join(lines) + "\n").encode()
    report = {"setting": setting.to_dict(), "strategy": strategy, "profile": label,
              "cameras": [{"name": n, "rate": r, "depth": b, "blob": f"{n}.blob"}
                          for n, (r, b) in zip(names, chosen.buckets)],
              "results": [res.row() for res in results.values()],
              "slot_ms_per_frame": (1000.0 / fps) if fps else None, "dqn_search": dqn_report}
    files["fleet.json"] = json.dumps(report, indent=2).encode()
    with user_errors("writing"):
        _write(out, files)
    rows, cols = fleet_rows(results)
    echo_table(rows, cols)
    for line in lines:
        click.echo(line)
    slot = f" (offload-serve --slot-ms {1000.0 / fps:g}: one slot per frame)" if fps else ""
    click.echo(f"wrote {out}/: {cameras} policy blobs, keys.sh, fleet.json{slot}", err=True)


def _blobs(datas, names, buckets, cache, prof, label, dqn_policies, *, meta):
    """Each camera's policy blob (bytes by file name): its MDP thresholds, or the chosen DQN."""
    files = {}
    with user_errors("blob"):
        for i, (d, n, (r, b)) in enumerate(zip(datas, names, buckets)):
            fleet_meta = {"camera": n, **meta}
            if dqn_policies is not None:
                pol = dqn_policies[i]
                pol.meta = {**pol.meta, "profile": label, "fleet": fleet_meta}
            else:
                bucket, theta = cache.mdp(d, r, b)
                pol = threshold_policy_blob(prof, theta, bucket, "mdp", {
                    "rate": r, "depth": b, "profile": label, "fleet": fleet_meta})
            files[f"{n}.blob"] = blob.to_bytes(pol)
    return files


def _dqn_search(datas, prof, setting, search, *, top, preset, overrides, seed, lengths):
    """The bounded DQN search (``training.fleet_dqn``): ``(test result, blobs or None, report)``.

    Blobs are returned only when a DQN fleet beats the best threshold fleet on
    the training streams; the test result is the best DQN fleet's either way.
    """
    from offload.commandline import require_torch
    from training import fleet_dqn

    require_torch()
    length, n_seq, train_length, train_seq = lengths
    with user_errors("--dqn-set"):
        overrides = fleet_dqn.parse_overrides(overrides)
    train = strategies.fleet_streams(datas, purpose="training", length=train_length,
                                     n_seq=train_seq)
    test = strategies.fleet_streams(datas, purpose="test", length=length, n_seq=n_seq)
    trained, rows = {}, []
    with user_errors("dqn"):
        for b in fleet_dqn.dqn_candidates(search, top):
            click.echo(f"dqn: training a DQN for r_i={b[0]:g} b_i={b[1]:g}...", err=True)
            res, pols = fleet_dqn.dqn_fleet(datas, [prof] * len(datas), setting, b, train,
                                            preset=preset, overrides=overrides, seed=seed,
                                            policies=trained)
            thr = float(search["train_reward"][search["points"].index(b)])
            rows.append({"rate": b[0], "depth": b[1], "dqn_train_reward": res.reward,
                         "thresholds_train_reward": thr})
        best = max(rows, key=lambda r: r["dqn_train_reward"])
        bucket = (best["rate"], best["depth"])
        res, pols = fleet_dqn.dqn_fleet(datas, [prof] * len(datas), setting, bucket, test,
                                        preset=preset, overrides=overrides, seed=seed,
                                        policies=trained)
    wins = best["dqn_train_reward"] > float(np.max(search["train_reward"]))
    click.echo(f"dqn: best DQN fleet r_i={bucket[0]:g} b_i={bucket[1]:g}: training reward "
               f"{best['dqn_train_reward']:.5f} vs thresholds' best "
               f"{float(np.max(search['train_reward'])):.5f}: "
               f"{'DQN blobs written' if wins else 'threshold blobs kept'}", err=True)
    return res, (pols if wins else None), {"candidates": rows, "dqn_chosen": bool(wins)}


def _given(param):
    from click.core import ParameterSource

    return click.get_current_context().get_parameter_source(param) == ParameterSource.COMMANDLINE


def _compared(strategy):
    """The chosen strategy and the references its report compares it with."""
    return tuple(dict.fromkeys(["isolated", strategy, "pooled"]))
