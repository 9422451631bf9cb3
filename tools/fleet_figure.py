#!/usr/bin/env python3
"""The fleet figure of docs/fleet.md: average loss against the number of cameras, per strategy.

Usage: ``python tools/fleet_figure.py docs/img/fleet_strategies.png [docs/results/fleet.json]``.
On the committed profile, i.i.d. images, periodic arrivals, the switch
``(r_g, K * b_p)`` with ``b_p = 2`` and ``r_g`` in {0.1, 0.25} (one panel
each), ``K = 1..8``: every strategy of ``offload.strategies`` on 20 test
streams x 10,000 images per camera (the hierarchical searches on 8 x 4,000
training images per camera, over the whole published grid). The MDP
solutions are shared across ``K`` (one ``PolicyCache``). Also writes the
numbers as JSON. Needs matplotlib (the ``training`` extra).
"""

import json
import sys

from offload import strategies
from offload.atomic import atomic_path, atomic_write_text
from offload.commandline import select_profile
from offload.scenario import Scenario

RATES = (0.1, 0.25)
B_P = 2.0
CAMERAS = range(1, 9)


def compute():
    prof, _ = select_profile(None)
    d = strategies.camera_data(prof, Scenario(choice="iid"))
    cache = strategies.PolicyCache()
    rows = []
    for r_g in RATES:
        for k in CAMERAS:
            res, search = strategies.run_strategies(
                [d] * k, strategies.FleetSetting(k, r_g, B_P), length=10_000, n_seq=20,
                train_length=4_000, train_seq=8, cache=cache, progress=True)
            rows.append({"r_g": r_g, "b_p": B_P, "K": k,
                         **{n: {**v.row(), "reward_se": v.reward_se} for n, v in res.items()},
                         "best": {n: list(s["best"]) for n, s in search.items()}})
            print(r_g, k, {n: round(v.avg_loss, 4) for n, v in res.items()}, flush=True)
    return rows


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(RATES), figsize=(10, 4), sharey=False)
    for ax, r_g in zip(axes, RATES):
        sel = [r for r in rows if r["r_g"] == r_g]
        for name, style in zip(strategies.STRATEGIES, ("o-", "s-", "^-", "x--")):
            ax.plot([r["K"] for r in sel], [r[name]["avg_loss"] for r in sel], style, label=name)
        ax.set_title(f"switch r_g = {r_g}, b_g = K x {B_P:g}")
        ax.set_xlabel("cameras K")
        ax.set_ylabel("average loss (top-1 error)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Fleet strategies on the committed profile (i.i.d. images)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    rows = compute()
    plot(rows, sys.argv[1])
    if len(sys.argv) > 2:
        atomic_write_text(sys.argv[2], json.dumps(rows, indent=1))
