"""Hierarchical search over DQN policies, bounded: a DQN only at the threshold search's best buckets.

A DQN per grid bucket would be about 700 trainings per setting, each minutes
long. The search here is bounded instead: the threshold (MDP) grid search
ranks every bucket first (seconds), then a DQN is trained only for the
``top`` best buckets of that ranking, one per distinct camera data (cameras
sharing a profile and scenario share one DQN), each within its preset's
time limit. Each DQN fleet is scored on the same training streams as the
threshold fleets; the best of all (thresholds at the best bucket, or a DQN
fleet) is kept. Cost: ``top x (distinct camera data) x one DQN training``.

Needs torch (``training.dqn``).
"""

from __future__ import annotations

import json

import numpy as np

from offload import fleet

__all__ = ["parse_overrides", "dqn_candidates", "dqn_fleet"]


def parse_overrides(items):
    """``KEY=VALUE`` words (``--dqn-set``) as DQNConfig overrides; values parsed as JSON when they can be."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--dqn-set {item!r}: need KEY=VALUE (a DQN setting, e.g. iterations=50)")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def dqn_candidates(search, top):
    """The ``top`` buckets of a threshold search, best training reward first."""
    order = np.argsort(-np.asarray(search["train_reward"]), kind="stable")
    return [search["points"][i] for i in order[:int(top)]]


def _train(data, prof, rate, depth, preset, overrides, seed):
    from training import dqn as D

    sc = data.scenario.replace(rate=rate, depth=depth)
    cfg = D.preset(preset, **overrides, seed=seed)
    split = D.prepare_data(prof, cfg.holdout, seed)
    meta = {"name": "dqn", "rate": rate, "depth": depth, "fleet_search": True}
    return D.train_policy(split, sc, cfg, prof, meta=meta).policy


def dqn_fleet(datas, profs, setting, bucket, streams, *, preset, overrides, seed, policies=None,
              name="hierarchical-dqn", order="fixed"):
    """Every camera with a DQN for ``bucket`` (trained once per distinct data): ``(FleetResult, blobs)``.

    ``profs``: each camera's ``Profile`` (the DQN's training data); ``policies``:
    already trained blobs by data id, reused (and filled in).
    """
    policies = {} if policies is None else policies
    cams = []
    for d, prof, st in zip(datas, profs, streams):
        key = (id(d), bucket)
        if key not in policies:
            policies[key] = _train(d, prof, *bucket, preset, overrides, seed)
        pol = policies[key]
        cams.append(fleet.Camera(st, pol.bucket, send=fleet.dqn_send_table(pol, st), name=d.name))
    res = fleet.run_fleet(cams, setting.switch, name=name, buckets=[bucket] * len(datas),
                          order=order, seed=seed)
    return res, [policies[(id(d), bucket)] for d in datas]
