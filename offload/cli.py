"""``offload-sim``: compare offloading policies on a profile under a token bucket.

Trains the threshold policies on the profile's training split, builds test
streams from its test split (SPEC section 4), runs each policy and prints a
table of average loss, reward, offload rate and the share of each oracle's gain
over Baseline captured. Can also write the table (JSON/CSV) and an MDP or
Baseline policy as a policy blob for the device.

``offload-sim fleet`` (``offload.fleet_command``) compares the strategies for
``K`` cameras behind one shared switch bucket instead.
"""

import csv
import functools
import io
import json
import math
import sys

import click

from offload import blob, simulate
from offload.atomic import atomic_write_text
from offload.commandline import (check_policy_names, echo_table, fit_thresholds, load_scenario,
                                 run_named_policy, scenario_options, threshold_policy_blob,
                                 user_errors)
from offload.fleet_command import fleet

BUILTIN = ("lower-bound", "baseline", "mdp", "oracle", "oracle-metric")
#: Policies run only when asked for by name.
OPTIONAL = ("ceiling", "belief")
#: What every run needs besides the policies asked for: the shares' reference points.
REFERENCES = ("baseline", "oracle", "oracle-metric")

#: The simulator's refusals; a ``MemoryError`` says which options to shrink.
sim_errors = functools.partial(user_errors,
                               memory_hint="use fewer or shorter streams (--streams, --length)")


# A group that runs its own command when no subcommand is named: ``offload-sim
# [OPTIONS]`` is unchanged, ``offload-sim fleet ...`` is the fleet comparison.
@click.group(invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@scenario_options
@click.option("--length", default=10000, type=click.IntRange(1), help="Images per test stream.")
@click.option("--streams", default=10, type=click.IntRange(1), help="Number of test streams.")
@click.option("--policy", "policy_names", multiple=True,
              help=f"Policy to run (repeatable): {', '.join(BUILTIN + OPTIONAL)} or a policy "
                   "blob path. Default: all but ceiling (offload.ceiling: knows the "
                   "generators' hidden state) and belief (offload.belief: infers it from the "
                   "history by Bayes' rule); each adds a share_of_..._gain column.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the table as JSON.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Write the table as CSV.")
@click.option("--write-blob", "write_blob", nargs=2, type=(click.Choice(["mdp", "baseline"]),
              click.Path(dir_okay=False)), multiple=True,
              help="Write a threshold policy as a policy blob: KIND PATH (repeatable).")
def sim_main(profile_path, synthetic, rate, depth, choice, spread, rprob, arrivals, markov,
             length, streams, seed, policy_names, json_path, csv_path, write_blob):
    """Compare offloading policies on a profile under a token bucket (rate r, depth b).

    `offload-sim fleet --help`: K cameras behind one shared switch instead.
    """
    if click.get_current_context().invoked_subcommand is not None:
        return  # offload-sim fleet ...: the subcommand does the work
    names = list(policy_names) or list(BUILTIN)
    check_policy_names(names, BUILTIN + OPTIONAL)
    sc, prof, m, tr, te = load_scenario(profile_path, synthetic, rate, depth, choice, spread,
                                        rprob, arrivals, markov, seed)
    with sim_errors("test streams"):
        st = sc.streams(m[te], prof.reward[te], prof.weak_loss[te], length=length, n_seq=streams,
                        raw_metric=prof.metric[te], hidden="ceiling" in names)
    click.echo(f"bucket r={rate} b={depth} -> {sc.bucket}; {streams} streams x "
               f"{length} images, {choice}, {arrivals} arrivals "
               f"(mean {st.mean_interarrival:.3f} slots)", err=True)
    want_mdp = "mdp" in names or any(k == "mdp" for k, _ in write_blob)
    thresholds = fit_thresholds(m[tr], prof.reward[tr], sc, st, mdp=want_mdp)
    solved = _solve_ceiling(sc, prof.metric[te], m[te]) if {"ceiling", "belief"} & set(names) \
        else None
    results = {name: _run_one(name, sc, st, prof, m, tr, te, thresholds, solved)
               for name in names + [n for n in REFERENCES if n not in names]}
    rows, cols = _table(names, results)
    echo_table(rows, cols)
    with sim_errors("writing"):
        if json_path:
            _write_json(json_path, sc, rows, streams=streams, length=length)
        if csv_path:
            _write_csv(csv_path, rows, cols)
        meta = {"rate": rate, "depth": depth, "profile": profile_path or "synthetic"}
        for kind, path in write_blob:
            blob.write_blob(path, threshold_policy_blob(prof, thresholds[kind], sc.bucket, kind,
                                                        meta))
            click.echo(f"wrote {kind} policy blob {path}", err=True)


def _run_one(name, sc, st, prof, m, tr, te, thresholds, solved):
    """The ``SimResult`` of policy ``name`` (a built-in or a blob file) on the test streams."""
    with sim_errors(name):
        if name == "lower-bound":
            return simulate.run_lower_bound(m[tr], st, sc.rate)
        if name == "ceiling":
            from offload import ceiling
            return ceiling.run_ceiling(solved, st, sc.bucket)
        if name == "belief":
            from offload import belief
            model = belief.belief_model(m[te], sc, bins=solved.bins)
            return belief.run_belief(model, solved, st, sc.bucket)
        if name in ("oracle", "oracle-metric"):
            return simulate.run_oracle(st, sc.bucket, metric_only=name == "oracle-metric",
                                       progress=True)
        # mdp, baseline or a blob: progress for the (slow) blob, as the oracle has
        return run_named_policy(name, st, sc, thresholds=thresholds,
                                progress=name not in thresholds)[0]


def _solve_ceiling(sc, raw_metric, metric):
    """The structure-aware ceiling (``offload.ceiling``) of the test images; the belief policy acts on it too."""
    from offload import ceiling

    click.echo("ceiling: value iteration over (hidden state, tokens)...", err=True)
    with sim_errors("ceiling"):
        c = ceiling.ceiling_policy(raw_metric, sc, metric=metric)
    if not c.converged:
        click.echo(f"ceiling: warning: not converged after {c.sweeps} sweeps", err=True)
    return c


def _table(names, results):
    """``(rows, columns)``: each policy's row with its share of every oracle's gain over Baseline."""
    refs = ["oracle", "oracle-metric"] + [n for n in OPTIONAL if n in results]
    rows = []
    for name in names:
        row = results[name].row()
        for o in refs:
            row[f"share_of_{o}_gain"] = simulate.captured_share(results[name], results["baseline"],
                                                                results[o])
        rows.append(row)
    cols = (["policy", "avg_loss", "mean_reward", "offload_rate"]
            + [f"share_of_{o}_gain" for o in refs] + ["feasible"])
    return rows, cols


def _write_json(path, sc, rows, *, streams, length):
    """The table as JSON (NaN as null), with the bucket and the streams' settings."""
    N, P, M = sc.bucket
    atomic_write_text(path, json.dumps(
        {"bucket": {"rate": sc.rate, "depth": sc.depth, "N": N, "P": P, "M": M},
         "streams": {"count": streams, "length": length, "choice": sc.choice,
                     "spread": sc.spread, "rprob": sc.rprob, "arrivals": sc.arrivals,
                     "markov": list(sc.markov), "seed": sc.seed},
         "results": [{k: (None if isinstance(v, float) and math.isnan(v) else v)
                      for k, v in r.items()} for r in rows]}, indent=2))


def _write_csv(path, rows, cols):
    """The table as CSV, one row per policy."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows({c: r[c] for c in cols} for r in rows)
    atomic_write_text(path, buf.getvalue())


sim_main.add_command(fleet)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(sim_main())
