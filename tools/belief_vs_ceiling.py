"""Belief policy against the ceiling on a profile's test streams, valued by expected rewards.

Prints one markdown row per setting: the shares of the metric-only oracle's
gain over Baseline that the ceiling and the belief policy capture when every
offload is scored by its expected reward ``f(h)`` (no coin flips of whether
it paid off), and their ratio. docs/science.md's table comes from

    python tools/belief_vs_ceiling.py --profile artifacts/profile.npz
"""

import argparse
import dataclasses

import numpy as np

from offload import belief, ceiling, simulate
from offload.commandline import fit_thresholds
from offload.profile import TEST, TRAIN, Profile
from offload.scenario import Scenario

MARKOV = (1, 3, 0.001, 0.0005)
#: (rate, depth, choice, spread, rprob, arrivals): Figs. 7 and 10 and the issue-22 settings.
SETTINGS = [(0.1, 4, "location-reset", 0.1, 0.01, "periodic"),
            (0.1, 4, "iid", 0.1, 0.01, "markov"),
            (0.05, 2, "location-reset", 0.1, 0.1, "periodic"),
            (0.25, 8, "location-reset", 0.1, 0.01, "markov")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="artifacts/profile.npz")
    ap.add_argument("--streams", type=int, default=10)
    ap.add_argument("--length", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    p = Profile.load(a.profile)
    m = p.standardized_metric().astype(np.float32)
    tr, te = p.indices(TRAIN), p.indices(TEST)
    print("| setting | ceiling | belief | belief / ceiling |\n|---|---|---|---|")
    for rate, depth, choice, spread, rprob, arrivals in SETTINGS:
        sc = Scenario(rate, depth, choice, spread, rprob, arrivals, MARKOV, a.seed)
        st = sc.streams(m[te], p.reward[te], p.weak_loss[te], length=a.length, n_seq=a.streams,
                        raw_metric=p.metric[te])
        c = ceiling.ceiling_policy(p.metric[te], sc, metric=m[te])
        model = belief.belief_model(m[te], sc, bins=c.bins)
        theta = fit_thresholds(m[tr], p.reward[tr], sc, st, mdp=False)["baseline"]
        hidden = sc.streams(m[te], p.reward[te], p.weak_loss[te], length=a.length,
                            n_seq=a.streams, raw_metric=p.metric[te], hidden=True)
        by_f = dataclasses.replace(hidden, reward=hidden.raw_metric.copy())
        base = simulate.run_thresholds(theta, by_f, sc.bucket)
        orc = simulate.run_oracle(by_f, sc.bucket, metric_only=True)
        shares = [simulate.captured_share(r, base, orc) for r in
                  (ceiling.run_ceiling(c, by_f, sc.bucket), belief.run_belief(model, c, by_f, sc.bucket))]
        what = f"r {rate}, b {depth}, {choice} (sp {spread}, rprob {rprob}), {arrivals}"
        print(f"| {what} | {shares[0]:.1%} | {shares[1]:.1%} | {shares[1] / shares[0]:.1%} |",
              flush=True)


if __name__ == "__main__":
    main()
