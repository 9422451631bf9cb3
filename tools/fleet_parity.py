#!/usr/bin/env python3
"""Fleet parity: this project's fleet strategies against the published ``mcsimulate`` / ``simulate``.

Three steps, two interpreters (the published code needs numba, which the
project does not depend on):

1. ``prepare OUT.npz`` (the project's venv): the committed profile's training
   and test arrays, this project's MDP thresholds for every bucket of the
   published grid and for the pooled buckets, and this project's results for
   each setting (isolated, hierarchical, pooled; ``OUT.npz.ours.json``).
2. ``published OUT.npz`` (a venv with numpy + numba, ``PYTHONPATH`` at a
   checkout of ``ayanc/edgeml.mdp``): the published pipeline on the same
   arrays and buckets: the hierarchical grid search with ``mcsimulate`` on the
   training split, then ``mcsimulate`` (isolated, hierarchical) and
   ``simulate`` (pooled) on the test split, with the same thresholds; and
   isolated and pooled once more with the published MDP's own thresholds
   (``OUT.npz.published.json``).
3. ``compare OUT.npz`` (either): the markdown table of docs/fleet.md.

Loss = mean weak loss of the test split - reward per image.
"""

import json
import sys

import numpy as np

SETTINGS = [(k, r, 2.0) for r in (0.1, 0.25) for k in (2, 4, 8)]
TEST = dict(length=10_000, n_seq=50)     # per camera; the published run uses the same sizes
TRAIN = dict(length=4_000, n_seq=8)      # the grid search's training streams, both sides


def _key(r, b):
    return f"theta_{r:.6f}_{b:.6f}"


def prepare(path):
    from offload import strategies
    from offload.commandline import select_profile
    from offload.scenario import Scenario

    prof, _ = select_profile(None)
    d = strategies.camera_data(prof, Scenario(choice="iid"))
    cache = strategies.PolicyCache()
    ours, arrays = [], {}
    for k, r_g, b_p in SETTINGS:
        setting = strategies.FleetSetting(k, r_g, b_p)
        res, search = strategies.run_strategies(
            [d] * k, setting, length=TEST["length"], n_seq=TEST["n_seq"],
            train_length=TRAIN["length"], train_seq=TRAIN["n_seq"], cache=cache,
            names=("isolated", "hierarchical", "pooled"))
        ours.append({"K": k, "r_g": r_g, "b_p": b_p,
                     "best": list(search["hierarchical"]["best"]),
                     **{n: {"avg_loss": v.avg_loss, "se": v.reward_se} for n, v in res.items()}})
        for rb in strategies.grid_points(setting):
            arrays[_key(*rb)] = cache.mdp(d, *rb)[1]
        arrays[_key(r_g, k * b_p)] = cache.mdp(cache.merged([d] * k), r_g, k * b_p,
                                               arrivals=False)[1]
        print(ours[-1], flush=True)
    np.savez(path, metric_tr=d.train[0], reward_tr=d.train[1], metric_ts=d.test[0],
             reward_ts=d.test[1], weak_ts=d.test[2], **arrays)
    with open(path + ".ours.json", "w") as f:
        json.dump(ours, f, indent=1)


def _grid(r_g, b_p):
    rates, depths = [r / 40 for r in range(2, 21)], [b / 4 for b in range(4, 41)]
    return [(r, b) for r in rates for b in depths
            if not ((r <= r_g and b < b_p) or (r < r_g and b <= b_p))]


def published(path):
    import time

    from eomdp import policy as po, simulate as sim  # the published code, from PYTHONPATH

    z = np.load(path)
    tr = (np.float64(z["metric_tr"]), np.float64(z["reward_tr"]))
    ts = (np.float64(z["metric_ts"]), np.float64(z["reward_ts"]))
    mweak = float(np.mean(z["weak_ts"]))
    rsz_tr, rsz_ts = (TRAIN["length"], TRAIN["n_seq"]), (TEST["length"], TEST["n_seq"])
    out = []
    for k, r_g, b_p in SETTINGS:
        t0 = time.time()
        b_g = k * b_p
        pts = _grid(r_g, b_p)
        gains = [sim.mcsimulate(rb, (r_g, b_g), k, z[_key(*rb)], tr, rsz_tr)[0] for rb in pts]
        best = pts[int(np.argmax(gains))]
        iso = sim.mcsimulate((r_g, b_p), (r_g, b_g), k, z[_key(r_g, b_p)], ts, rsz_ts)[0]
        hier = sim.mcsimulate(best, (r_g, b_g), k, z[_key(*best)], ts, rsz_ts)[0]
        pool = sim.simulate(r_g, b_g, z[_key(r_g, b_g)], ts, (TEST["length"] * k, TEST["n_seq"]))[0]
        iso_own = sim.mcsimulate((r_g, b_p), (r_g, b_g), k, po.mdp(r_g, b_p, tr), ts, rsz_ts)[0]
        pool_own = sim.simulate(r_g, b_g, po.mdp(r_g, b_g, tr), ts,
                                (TEST["length"] * k, TEST["n_seq"]))[0]
        out.append({"K": k, "r_g": r_g, "b_p": b_p, "best": list(best),
                    "isolated": mweak - iso, "hierarchical": mweak - hier, "pooled": mweak - pool,
                    "isolated_own_mdp": mweak - iso_own, "pooled_own_mdp": mweak - pool_own,
                    "search_seconds": time.time() - t0})
        print(out[-1], flush=True)
    with open(path + ".published.json", "w") as f:
        json.dump(out, f, indent=1)


def compare(path):
    ours = json.load(open(path + ".ours.json"))
    pub = json.load(open(path + ".published.json"))
    print("| K | r_g | b_p | strategy | ours: avg loss (± 2 SE) | published, same thresholds "
          "| published, own MDP | bucket (ours / published) |")
    print("|---|---|---|---|---|---|---|---|")
    for o, p in zip(ours, pub):
        for name in ("isolated", "hierarchical", "pooled"):
            own = p.get(f"{name}_own_mdp")
            bucket = (f"{o['best'][0]:g}/{o['best'][1]:g} / {p['best'][0]:g}/{p['best'][1]:g}"
                      if name == "hierarchical" else "")
            print(f"| {o['K']} | {o['r_g']:g} | {o['b_p']:g} | {name} | {o[name]['avg_loss']:.4f} "
                  f"± {2 * o[name]['se']:.4f} | {p[name]:.4f} | "
                  f"{'' if own is None else f'{own:.4f}'} | {bucket} |")


if __name__ == "__main__":
    {"prepare": prepare, "published": published, "compare": compare}[sys.argv[1]](sys.argv[2])
