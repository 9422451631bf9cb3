#!/usr/bin/env python3
"""Plot a trace of MDP and Baseline decisions on one stream segment (like the paper's Fig. 4/7).

Builds the same profile, bucket and test streams as ``offload-sim`` (same
options and defaults), runs Baseline and MDP with a trace, and draws for a
window of one stream: the standardised metric of each image, marked by which
policy offloaded it; the token count of each policy before every decision; and
the decisions as two rows of ticks. By default the window is the one where the
two policies' offload counts differ most (``--start`` picks one by hand).

    python tools/plot_trace.py --out docs/img/trace.png

Needs matplotlib (in the ``training`` extra).
"""

import sys

import click
import numpy as np

from offload import policies, simulate
from offload.atomic import atomic_path
from offload.cli import training_arrivals, load_scenario, scenario_options


def _atomic_savefig(fig, path, dpi):
    """Save ``fig`` as PNG beside ``path``, then rename it over ``path``."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def busiest_window(a, b, width):
    """Start of the ``width``-image window where the offload counts of ``a`` and ``b`` differ most."""
    diff = np.concatenate([[0], np.cumsum(a.astype(np.int64) - b.astype(np.int64))])
    counts = np.abs(diff[width:] - diff[:-width])
    return int(np.argmax(counts))


def plot(seg, N, P, M, theta_base, theta_mdp, title):
    """The figure for one segment: dict of per-image arrays ``k, metric, dec_*, tok_*``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k, m = seg["k"], seg["metric"]
    dm, db = seg["dec_mdp"].astype(bool), seg["dec_base"].astype(bool)
    fig, (ax0, ax1, ax2) = plt.subplots(3, 1, figsize=(11, 7.2), sharex=True,
                                        gridspec_kw={"height_ratios": [3, 2, 1]})
    groups = [(~dm & ~db, "not offloaded", "#c8c8c8", "o", 10),
              (dm & db, "offloaded by both", "#7b3294", "D", 22),
              (dm & ~db, "offloaded by MDP only", "#1b9e77", "^", 30),
              (~dm & db, "offloaded by Baseline only", "#d95f02", "v", 30)]
    for mask, label, color, marker, size in groups:
        ax0.scatter(k[mask], m[mask], s=size, c=color, marker=marker, label=label,
                    edgecolors="none", zorder=3 if label != "not offloaded" else 2)
    ax0.axhline(theta_base, color="#d95f02", lw=1, ls="--",
                label=f"Baseline threshold ({theta_base:.2f})")
    ax0.axhline(theta_mdp[-1], color="#1b9e77", lw=1, ls=":",
                label=f"MDP threshold, full bucket ({theta_mdp[-1]:.2f})")
    ax0.axhline(theta_mdp[0], color="#1b9e77", lw=1, ls="--",
                label=f"MDP threshold, 1 token ({theta_mdp[0]:.2f})")
    ax0.set_ylabel("standardised metric")
    ax0.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)
    ax0.set_title(title, fontsize=10)
    ax0.grid(alpha=0.3)

    ax1.step(k, seg["tok_mdp"] / P, where="post", color="#1b9e77", lw=1.4, label="MDP")
    ax1.step(k, seg["tok_base"] / P, where="post", color="#d95f02", lw=1.4, label="Baseline")
    ax1.axhline(1.0, color="k", lw=0.8, ls=":", label="1 token (can offload)")
    ax1.set_ylabel("tokens before\ndecision")
    ax1.set_ylim(0, M / P + 0.3)
    ax1.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)
    ax1.grid(alpha=0.3)

    ax2.eventplot([k[db], k[dm]], lineoffsets=[0, 1], linelengths=0.7,
                  colors=["#d95f02", "#1b9e77"])
    ax2.set_yticks([0, 1], ["Baseline", "MDP"])
    ax2.set_ylim(-0.6, 1.6)
    ax2.set_xlabel("image (position in the stream)")
    ax2.set_ylabel("offloads")
    ax2.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@scenario_options
@click.option("--length", default=10000, type=click.IntRange(1), help="Images in the stream.")
@click.option("--window", default=300, type=click.IntRange(10), help="Images to plot.")
@click.option("--start", default=None, type=click.IntRange(0),
              help="First image plotted; default: where MDP and Baseline offload counts differ most.")
@click.option("--out", default="docs/img/trace.png", type=click.Path(dir_okay=False),
              help="PNG to write (atomically).")
@click.option("--dpi", default=110, type=click.IntRange(30, 600))
def main(profile_path, synthetic, rate, depth, choice, spread, rprob, arrivals, markov, length,
         seed, window, start, out, dpi):
    """Plot MDP and Baseline decisions on a window of one simulated stream."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise click.ClickException("matplotlib is needed: pip install matplotlib") from None
    if window > length:
        raise click.ClickException(f"--window {window} is longer than --length {length}")
    if start is not None and start + window > length:
        raise click.ClickException(f"--start {start} + --window {window} exceeds --length {length}")
    (N, P, M), prof, m, tr, te = load_scenario(profile_path, synthetic, rate, depth, arrivals,
                                               markov, seed)
    try:
        st = simulate.make_streams(m[te], prof.reward[te], prof.weak_loss[te], length, 1, seed,
                                   choice, spread, rprob, arrivals, markov,
                                   raw_metric=prof.metric[te])
        theta_mdp = policies.mdp_thresholds(m[tr], prof.reward[tr], N, P, M,
                                            interarrival=training_arrivals(arrivals, markov,
                                                                            seed))
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    theta_base = policies.baseline_threshold(m[tr], rate, st.mean_interarrival)
    mdp = simulate.run_thresholds(theta_mdp, st, N, P, M, trace=True, name="mdp")
    base = simulate.run_thresholds(theta_base, st, N, P, M, trace=True, name="baseline")
    if start is None:
        start = busiest_window(mdp.decisions[0], base.decisions[0], window)
    sl = slice(start, start + window)
    seg = {"k": np.arange(start, start + window), "metric": st.metric[0, sl],
           "dec_mdp": mdp.decisions[0, sl], "dec_base": base.decisions[0, sl],
           "tok_mdp": mdp.tokens[0, sl].astype(float), "tok_base": base.tokens[0, sl].astype(float)}
    r_m = float(st.reward[0, sl][seg["dec_mdp"] == 1].sum())
    r_b = float(st.reward[0, sl][seg["dec_base"] == 1].sum())
    title = (f"r={rate}, b={depth} (N, P, M = {N}, {P}, {M}), {choice}"
             + (f" sp={spread} rprob={rprob}" if choice == "location-reset" else "")
             + f", {arrivals} arrivals, seed {seed}\nimages {start}-{start + window - 1}: "
             f"MDP {int(seg['dec_mdp'].sum())} offloads (reward {r_m:+.0f}), "
             f"Baseline {int(seg['dec_base'].sum())} (reward {r_b:+.0f})")
    fig = plot(seg, N, P, M, theta_base, theta_mdp, title)
    _atomic_savefig(fig, out, dpi)
    click.echo(f"wrote {out} (images {start}..{start + window - 1} of stream 0)", err=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
