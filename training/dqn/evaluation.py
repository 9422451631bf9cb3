"""The test report of a trained policy: every policy on the test streams (SPEC sections 5, 6).

The DQN (float and int8) runs against MDP, Baseline, the lower bound, both
oracles, the belief policy (``offload.belief``: the best a history-only
policy that knows the generator's model can do, as a yardstick) and the
structure-aware ceiling on the same test streams; each row also gives the
share of each oracle's, of the belief policy's and of the ceiling's gain
over Baseline that the policy captures, and its mean reward per image on
each test stream (``stream_reward``: every policy runs on the same streams,
so the difference of two policies has a paired standard error).
``int8_agreement`` says how often the float network decides as the int8 one
along the int8 trajectory.
"""

from __future__ import annotations

import time

import numpy as np

from offload import mlp, policies, simulate

from .network import float_forward

__all__ = ["int8_agreement", "evaluate"]


def int8_agreement(layers, streams, bucket, int8_result, *, H, use_ia):
    """Share of the int8 policy's decisions (on its own trajectory) the float network agrees with.

    Counts every decision and, separately, those with ``n >= P`` (where the
    network decides at all). ``int8_result`` is the int8 run with
    ``trace=True``: its decisions and token states are compared as they are,
    so only the float network runs here.
    """
    fwd_f = float_forward(layers)
    S, L = streams.shape
    agree = free = agree_free = 0
    for k0, k1, x in simulate.input_blocks(streams, H, use_ia):
        n = int8_result.tokens[:, k0:k1].reshape(-1).astype(np.int64)
        a_f = mlp.decide_batch(fwd_f(x), n, bucket)
        a_q = int8_result.decisions[:, k0:k1].reshape(-1).astype(bool)
        same = a_f == a_q
        agree += int(same.sum())
        ok = bucket.can_send(n)
        free += int(ok.sum())
        agree_free += int(same[ok].sum())
    return {"all": agree / (S * L), "n_ge_P": agree_free / free if free else float("nan"),
            "decisions": S * L, "decisions_n_ge_P": free}


def evaluate(trainer, layers, qmlp, *, scenario=None, progress=False, threads=None):
    """Test results (SPEC section 5 and 6) of every policy on the test streams.

    ``scenario``: the scenario to test on (default: the one ``trainer``
    trained on; a sweep point may train on another image choice).
    ``threads``: threads of the native int8 forward (default: every core; a
    sweep running several points at once gives each its share).

    Returns ``(rows, extra)``: one dict per policy (average loss, reward per
    image, offload rate, share of each oracle's, of the belief policy's and
    of the structure-aware ceiling's gain over Baseline, per-stream reward)
    and the int8 agreement figures, the ceiling's and the belief policy's
    settings.
    """
    from offload import belief, ceiling

    cfg, data = trainer.cfg, trainer.data
    sc = trainer.sc if scenario is None else scenario
    rate = sc.rate
    b = sc.bucket
    st = data.streams(sc, "test", length=cfg.test_length, n_seq=cfg.test_streams, hidden=True)
    te = data.test
    ceil = ceiling.ceiling_policy(data.raw_metric[te], sc, metric=data.metric[te])
    t0 = time.perf_counter()
    bel = belief.belief_model(data.metric[te], sc, bins=ceil.bins)
    bel_res = belief.run_belief(bel, ceil, st, b)
    bel_seconds = time.perf_counter() - t0
    dqn_args = dict(H=cfg.H, use_interarrival=cfg.interarrival, progress=progress)
    res = {
        "dqn-float": simulate.run_dqn(float_forward(layers), st, b, name="dqn-float", **dqn_args),
        "dqn-int8": simulate.run_dqn(qmlp, st, b, trace=True, name="dqn-int8", threads=threads,
                                     **dqn_args),
        "mdp": simulate.run_thresholds(trainer.theta_mdp, st, b, name="mdp"),
        "baseline": simulate.run_thresholds(policies.baseline_threshold(
            data.metric[data.train], rate, st.mean_interarrival), st, b, name="baseline"),
        "lower-bound": simulate.run_lower_bound(data.metric[data.train], st, rate),
        "oracle": simulate.run_oracle(st, b, progress=progress),
        "oracle-metric": simulate.run_oracle(st, b, metric_only=True, progress=progress),
        "belief": bel_res,
        "ceiling": ceiling.run_ceiling(ceil, st, b),
    }
    agreement = int8_agreement(layers, st, b, res["dqn-int8"], H=cfg.H, use_ia=cfg.interarrival)
    rows = []
    for name, r in res.items():
        row = r.row()
        row["policy"] = name
        for o in ("oracle", "oracle-metric", "belief", "ceiling"):
            row[f"share_of_{o}_gain"] = simulate.captured_share(r, res["baseline"], res[o])
        row["stream_reward"] = [float(v) for v in r.stream_reward]
        rows.append(row)
    extra = {"int8_agreement": agreement,
             "ceiling": {"bins": ceil.bins, "sweeps": ceil.sweeps, "converged": ceil.converged},
             "belief": {"bins": int(bel.lik.shape[1]), "arrival_states": int(bel.law.shape[0]),
                        "observations": int(len(bel.values)), "rprob": bel.rprob,
                        "seconds": bel_seconds},
             "int8_minus_float_avg_loss": res["dqn-int8"].avg_loss - res["dqn-float"].avg_loss,
             "test": {"streams": cfg.test_streams, "length": cfg.test_length, "seed": sc.seed,
                      "mean_interarrival": st.mean_interarrival}}
    return rows, extra
