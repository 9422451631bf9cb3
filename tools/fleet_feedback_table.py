#!/usr/bin/env python3
"""The table "The feedback variants and the turn order" of docs/fleet.md.

Usage: ``python tools/fleet_feedback_table.py`` (prints the markdown table;
on stderr, each search's two best buckets with their training rewards, and
the range of two standard errors of a row's loss over the test streams).

Committed profile, i.i.d. images, periodic arrivals, ``K = 4``, switch
``(r_g, b_g) = (0.1, 8)`` (``--switch-rate 0.1 --switch-depth-per-camera 2``),
scenario seed 0; every row on the same 20 test streams x 10,000 images per
camera. Two groups of rows:

* hierarchical: the grid search (``strategies.hierarchical``, the whole
  published grid, 8 x 4,000 training images per camera) run once per row,
  with that row's feedback and turn order, then that bucket on the test streams;
* over-provisioned: every camera ``(0.5, 10)`` with its MDP policy, so the
  switch is the bottleneck.

The random turn order is drawn from ``named_seed(0, "fleet-order")``
(``offload.fleet.turn_order``): its rows change if that stream's id does.
"""

import sys

import numpy as np

from offload import fleet, strategies
from offload.commandline import select_profile
from offload.scenario import Scenario

K, R_G, B_P = 4, 0.1, 2.0
TEST = dict(length=10_000, n_seq=20)
TRAIN = dict(length=4_000, n_seq=8)
OVER = (0.5, 10.0)
SEED = 0
HIER_ROWS = (("none", "fixed"), ("retry-after", "fixed"), ("refund", "fixed"), ("none", "random"))
OVER_ROWS = (("none", "fixed"), ("retry-after", "fixed"), ("refund", "fixed"), ("none", "random"),
             ("retry-after", "random"))


def compute():
    """``(rows, test)``: ``(group, feedback, order, FleetResult, bucket)`` per row, test streams."""
    prof, _ = select_profile(None)
    d = strategies.camera_data(prof, Scenario(choice="iid", seed=SEED))
    datas = [d] * K
    setting = strategies.FleetSetting(K, R_G, B_P)
    cache = strategies.PolicyCache()
    test = strategies.fleet_streams(datas, purpose="test", **TEST)
    train = strategies.fleet_streams(datas, purpose="training", **TRAIN)
    rows = []
    for fb, order in HIER_ROWS:
        res, search = strategies.hierarchical(datas, setting, test, train, cache, feedback=fb,
                                              order=order, seed=SEED)
        rows.append(("hierarchical", fb, order, res, search["best"]))
        top = np.argsort(-search["train_reward"], kind="stable")[:2]
        print(f"hierarchical {fb} {order}: searched " + ", then ".join(
            f"{search['points'][j][0]:g}/{search['points'][j][1]:g} (training reward "
            f"{search['train_reward'][j]:.5f})" for j in top), file=sys.stderr, flush=True)
        fixed = [b for g, f, o, _, b in rows if g == "hierarchical" and f == fb and o == "fixed"]
        if order == "random" and fixed and tuple(fixed[0]) != tuple(search["best"]):
            # the fixed order's pick under this order: is the difference the order or the pick?
            alt = fleet.run_fleet(strategies._cameras(datas, test, [fixed[0]] * K, cache),
                                  setting.switch, order=order, seed=SEED, feedback=fb)
            print(f"  the fixed order's pick {fixed[0][0]:g}/{fixed[0][1]:g} under the {order} "
                  f"order: avg loss {alt.avg_loss:.4f}, refused per send "
                  f"{alt.row()['refused_per_send']:.3f}", file=sys.stderr, flush=True)
    stack = fleet.stack_streams(test)
    bucket, theta = cache.mdp(d, *OVER)
    cams = [fleet.Camera(st, bucket, theta=theta, name=d.name) for st in test]
    for fb, order in OVER_ROWS:
        res = fleet.run_fleet(cams, setting.switch, name="over-provisioned", buckets=[OVER] * K,
                              order=order, seed=SEED, feedback=fb, stack=stack)
        rows.append(("over", fb, order, res, OVER))
    return rows, test


def loss_2se(res, test):
    """Two standard errors of ``res.avg_loss`` from its streams' losses (weak loss - reward).

    Every camera's every image arrives (periodic arrivals, one per slot), so a
    stream's weak loss is the mean over its cameras' images.
    """
    if not np.all(res.images == np.prod(test[0].shape)):
        raise RuntimeError("not every image arrived: the streams' weak loss needs the walk's count")
    weak = np.mean([st.weak_loss.mean(axis=1) for st in test], axis=0)
    loss = weak - res.stream_reward
    return 2 * float(np.std(loss, ddof=1) / np.sqrt(len(loss)))


def diff_2se(a, b):
    """Two standard errors of ``a.avg_loss - b.avg_loss`` on the same streams (paired)."""
    d = a.stream_reward - b.stream_reward
    return 2 * float(np.std(d, ddof=1) / np.sqrt(len(d)))


def table(rows):
    bests = [(f"{b[0]:g}/{b[1]:g}", f"the {fb}/{o} row")
             for g, fb, o, _, b in rows if g == "hierarchical"]
    common = max(dict.fromkeys(b for b, _ in bests), key=[b for b, _ in bests].count)
    odd = [f"{b} for {label}" for b, label in bests if b != common]
    hier = (f"hierarchical (searched per feedback and order: {common}"
            + (f", but {'; '.join(odd)})" if odd else " each time)"))
    heads = {"hierarchical": hier,
             "over": f"over-provisioned: every camera {OVER[0]:g}/{OVER[1]:g}"}
    out = ["| cameras' buckets | feedback | order | avg loss | refused per send "
           "| share of admitted sends |", "|---|---|---|---|---|---|"]
    seen = set()
    for group, fb, order, res, _ in rows:
        r = res.row()
        head = "" if group in seen else heads[group]
        seen.add(group)
        share = " ".join(f"{x:.2f}" for x in r["share"])
        out.append(f"|{' ' + head if head else ''} | {fb} | {order} | {r['avg_loss']:.4f} | "
                   f"{r['refused_per_send']:.3f} | {share} |")
    return "\n".join(out)


if __name__ == "__main__":
    rows, test = compute()
    se = [loss_2se(res, test) for *_, res, _ in rows]
    print(f"two standard errors of a row's loss: {min(se):.4f} .. {max(se):.4f} (of the "
          f"difference of two rows on these streams, less)", file=sys.stderr)
    for group, fb, order, res, _ in rows:
        ref = [r for g, f, o, r, _ in rows if (g, f, o) == (group, fb, "fixed")]
        if order != "fixed" and ref:
            print(f"{group} {fb}: {order} - fixed order: {res.avg_loss - ref[0].avg_loss:+.4f} "
                  f"(two standard errors {diff_2se(res, ref[0]):.4f})", file=sys.stderr)
    print(table(rows))
