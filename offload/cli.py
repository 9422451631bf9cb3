"""``offload-sim``: compare offloading policies on a profile under a token bucket.

Trains the threshold policies on the profile's training split, builds test
streams from its test split (SPEC section 4), runs each policy and prints a
table of average loss, reward, offload rate and the share of each oracle's gain
over Baseline captured. Can also write the table (JSON/CSV) and an MDP or
Baseline policy as a policy blob for the device.
"""

import contextlib
import csv
import json
import math
import os
import sys
import warnings

import click
import numpy as np

from offload import blob, policies, simulate
from offload.atomic import atomic_write_text
from offload.profile import TRAIN, TEST, read_profile
from offload.scenario import SETTINGS, Scenario, ScenarioError

BUILTIN = ("lower-bound", "baseline", "mdp", "oracle", "oracle-metric")
#: Policies run only when asked for by name.
OPTIONAL = ("ceiling",)


def _load_profile(path, synthetic, seed):
    if path is None:
        from offload.synthetic import synthetic_profile

        click.echo(f"profile: synthetic ({synthetic} images, seed {seed}); "
                   "pass --profile for a real one", err=True)
        return synthetic_profile(synthetic, seed=seed)
    try:
        # This project's profiles and both published layouts, told apart by their keys.
        return read_profile(path)
    except (OSError, ValueError) as e:
        raise click.ClickException(str(e)) from None


@contextlib.contextmanager
def user_errors(what):
    """Turn a refusal of the user's parameters (``ValueError``, ``MemoryError``) into one line.

    The core refuses what it cannot do in bounded time and memory with a
    ``ValueError`` that names the parameters; a command shows it as a click
    error (exit code 1) prefixed with ``what``, never as a traceback.
    """
    try:
        yield
    except ValueError as e:
        raise click.ClickException(f"{what}: {e}") from None
    except MemoryError:
        raise click.ClickException(f"{what}: not enough memory; use fewer or shorter streams "
                                   "(--streams, --length)") from None


def threshold_policy_blob(prof, theta, bucket, name, meta):
    """A thresholds ``blob.Policy`` carrying the profile's metric pipeline."""
    if prof.lut_x is None:
        raise click.ClickException(
            "the profile has no entropy->metric table (imported metrics only): "
            "the device could not compute metrics, so no blob is written")
    return blob.Policy("thresholds", *bucket, float(prof.metric_mean), float(prof.metric_std),
                       prof.lut_x, prof.lut_y, tinv=float(prof.tinv or 1.0),
                       theta=policies.threshold_vector(theta, bucket),
                       meta={"name": name, **meta})


def scenario_options(command):
    """The options every simulation command shares: profile, bucket, image choice, arrivals, seed.

    Defaults from ``offload.scenario.SETTINGS``, the one place they are declared.
    """
    d = {k: v[0] for k, v in SETTINGS.items()}
    opts = [
        click.option("--profile", "profile_path", type=click.Path(dir_okay=False),
                     help="Profile .npz: this project's (offload.profile) or either published layout (MDP or DQN paper), told apart by its keys; default: a synthetic profile."),
        click.option("--synthetic", default=20000, type=click.IntRange(20),
                     help="Images in the synthetic profile when no --profile is given."),
        click.option("--rate", default=d["rate"], type=float, help="Token rate r (tokens per slot)."),
        click.option("--depth", default=d["depth"], type=float, help="Bucket depth b (tokens)."),
        click.option("--choice", type=click.Choice(["iid", "location-reset"]),
                     default=d["choice"], help="Image choice process."),
        click.option("--sp", "spread", default=d["sp"], type=click.FloatRange(0, 1),
                     help="Location-reset spread (fraction of the dataset)."),
        click.option("--rprob", default=d["rprob"], type=click.FloatRange(0, 1),
                     help="Location-reset jump probability per image (the paper: 0.01 in "
                          "Figs. 7 and 10, 0.1 in Fig. 6)."),
        click.option("--arrivals", type=click.Choice(["periodic", "markov"]),
                     default=d["arrivals"]),
        click.option("--markov", nargs=4, type=(int, int, float, float),
                     default=tuple(d[k] for k in ("I1", "I2", "tprob1", "tprob2")),
                     help="Markov-modulated arrivals: I1 I2 tprob1 tprob2."),
        click.option("--seed", default=d["seed"], type=int,
                     help="Seed for profile, streams and arrivals."),
    ]
    for opt in reversed(opts):
        command = opt(command)
    return command


def load_scenario(profile_path, synthetic, rate, depth, choice, spread, rprob, arrivals, markov,
                  seed):
    """Check the shared options (one ``Scenario``) and load the profile.

    Returns the ``offload.scenario.Scenario``, the profile, its standardised
    metrics (float32) and the train and test indices; every problem becomes a
    ``click.ClickException``.
    """
    try:
        sc = Scenario(rate, depth, choice, spread, rprob, arrivals, tuple(markov), seed)
    except ScenarioError as e:
        option = {"bucket": f"--rate {rate} --depth {depth}",
                  "markov": f"--markov {' '.join(map(str, markov))}"}.get(e.field, f"--{e.field}")
        raise click.ClickException(f"{option}: {e}") from None
    prof = _load_profile(profile_path, synthetic, seed)
    tr, te = prof.indices(TRAIN), prof.indices(TEST)
    if len(tr) < 2 or len(te) < 1:
        raise click.ClickException(f"profile needs training and test images "
                                   f"(has {len(tr)} train, {len(te)} test)")
    return sc, prof, prof.standardized_metric().astype(np.float32), tr, te


def _fmt(v):
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4f}"
    return str(v)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@scenario_options
@click.option("--length", default=10000, type=click.IntRange(1), help="Images per test stream.")
@click.option("--streams", default=10, type=click.IntRange(1), help="Number of test streams.")
@click.option("--policy", "policy_names", multiple=True,
              help=f"Policy to run (repeatable): {', '.join(BUILTIN + OPTIONAL)} or a policy "
                   "blob path. Default: all but ceiling (offload.ceiling: knows the "
                   "generators' hidden state; adds a share_of_ceiling_gain column).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the table as JSON.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Write the table as CSV.")
@click.option("--write-blob", "write_blob", nargs=2, type=(click.Choice(["mdp", "baseline"]),
              click.Path(dir_okay=False)), multiple=True,
              help="Write a threshold policy as a policy blob: KIND PATH (repeatable).")
def sim_main(profile_path, synthetic, rate, depth, choice, spread, rprob, arrivals, markov,
             length, streams, seed, policy_names, json_path, csv_path, write_blob):
    """Compare offloading policies on a profile under a token bucket (rate r, depth b)."""
    names = list(policy_names) or list(BUILTIN)
    for name in names:
        if name not in BUILTIN + OPTIONAL and not os.path.isfile(name):
            raise click.ClickException(f"--policy {name!r}: neither one of "
                                       f"{', '.join(BUILTIN + OPTIONAL)} "
                                       "nor an existing policy blob file")
    sc, prof, m, tr, te = load_scenario(profile_path, synthetic, rate, depth, choice, spread,
                                        rprob, arrivals, markov, seed)
    bucket = sc.bucket
    N, P, M = bucket
    with user_errors("test streams"):
        st = sc.streams(m[te], prof.reward[te], prof.weak_loss[te], length=length, n_seq=streams,
                        raw_metric=prof.metric[te], hidden="ceiling" in names)
    tau = st.mean_interarrival
    click.echo(f"bucket r={rate} b={depth} -> {bucket}; {streams} streams x "
               f"{length} images, {choice}, {arrivals} arrivals (mean {tau:.3f} slots)", err=True)

    want_mdp = "mdp" in names or any(k == "mdp" for k, _ in write_blob)
    theta_mdp = None
    if want_mdp:
        click.echo("mdp: value iteration...", err=True)
        with user_errors("mdp"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            theta_mdp = policies.mdp_thresholds(
                m[tr], prof.reward[tr], bucket, interarrival=sc.training_arrivals())
        for w in caught:
            click.echo(f"mdp: warning: {w.message}", err=True)
    with user_errors("baseline"):
        theta_base = policies.baseline_threshold(m[tr], rate, tau)

    results = {}
    for name in names + [n for n in ("baseline", "oracle", "oracle-metric") if n not in names]:
        with user_errors(name):
            if name == "lower-bound":
                results[name] = simulate.run_lower_bound(m[tr], st, rate)
            elif name == "baseline":
                results[name] = simulate.run_thresholds(theta_base, st, bucket, name="baseline")
            elif name == "mdp":
                results[name] = simulate.run_thresholds(theta_mdp, st, bucket, name="mdp")
            elif name == "ceiling":
                from offload import ceiling

                click.echo("ceiling: value iteration over (hidden state, tokens)...", err=True)
                c = ceiling.ceiling_policy(prof.metric[te], sc, metric=m[te])
                if not c.converged:
                    click.echo(f"ceiling: warning: not converged after {c.sweeps} sweeps",
                               err=True)
                results[name] = ceiling.run_ceiling(c, st, bucket)
            elif name in ("oracle", "oracle-metric"):
                results[name] = simulate.run_oracle(
                    st, bucket, metric_only=name == "oracle-metric", progress=True)
            else:
                try:
                    pol = blob.read_blob(name)
                except blob.BlobError as e:
                    raise click.ClickException(str(e)) from None
                if pol.bucket != bucket:
                    raise click.ClickException(
                        f"{name}: policy was made for bucket (N, P, M) = "
                        f"({pol.N}, {pol.P}, {pol.M}), this run uses ({N}, {P}, {M}) "
                        f"(r={rate}, b={depth})")
                results[name] = simulate.run_policy(pol, st, name=name, progress=True)
    rows = []
    for name in names:
        row = results[name].row()
        for o in ("oracle", "oracle-metric"):
            row[f"share_of_{o}_gain"] = simulate.captured_share(results[name], results["baseline"],
                                                                results[o])
        if "ceiling" in results:
            row["share_of_ceiling_gain"] = simulate.captured_share(
                results[name], results["baseline"], results["ceiling"])
        rows.append(row)
    cols = ["policy", "avg_loss", "mean_reward", "offload_rate", "share_of_oracle_gain",
            "share_of_oracle-metric_gain"] + (["share_of_ceiling_gain"] if "ceiling" in results
                                              else []) + ["feasible"]
    widths = [max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in cols]
    click.echo("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        click.echo("  ".join(_fmt(r[c]).ljust(w) for c, w in zip(cols, widths)))
    meta = {"rate": rate, "depth": depth, "profile": profile_path or "synthetic"}
    if json_path:
        atomic_write_text(json_path, json.dumps(
            {"bucket": {"rate": rate, "depth": depth, "N": N, "P": P, "M": M},
             "streams": {"count": streams, "length": length, "choice": choice, "spread": spread,
                         "rprob": rprob, "arrivals": arrivals, "markov": list(markov),
                         "seed": seed},
             "results": [{k: (None if isinstance(v, float) and math.isnan(v) else v)
                          for k, v in r.items()} for r in rows]}, indent=2))
    if csv_path:
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        w.writerows({c: r[c] for c in cols} for r in rows)
        atomic_write_text(csv_path, buf.getvalue())
    for kind, path in write_blob:
        theta = theta_mdp if kind == "mdp" else theta_base
        blob.write_blob(path, threshold_policy_blob(prof, theta, bucket, kind, meta))
        click.echo(f"wrote {kind} policy blob {path}", err=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(sim_main())
