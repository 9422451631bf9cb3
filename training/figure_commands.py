"""``offload-train sweep``, ``plot``, ``table`` and ``trace``: the paper's evaluation figures.

``sweep`` trains and evaluates a DQN at every point of a grid
(``training.sweep``) into one results table, ``plot`` draws that table in the
paper's style, ``table`` prints it as the markdown tables of the docs
(``training.tables``) and ``trace`` draws two policies' decisions on one
simulated stream (``training.figures``). Registered on the ``offload-train``
group by ``training.cli``.
"""

from __future__ import annotations

import os
import time

import click
import numpy as np

from offload.commandline import (check_policy_names, fail, fit_thresholds, load_scenario,
                                 ray_option, require_torch, run_named_policy, scenario_options,
                                 select_profile, user_errors)

__all__ = ["sweep", "plot", "table", "trace"]


# --------------------------------------------------------------------------- sweep


@click.command()
@click.argument("grid")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Sweep folder: points/<id>.json and .bin, results.csv, results.json. "
                   "A rerun into it skips finished points.")
@click.option("--scale", type=click.Choice(["smoke", "quick", "paper"]), default="quick",
              show_default=True,
              help="paper: the figure's full grid, published schedule; quick: a reduced grid, "
                   "at most 240 s of training per point; smoke: the quick grid in seconds "
                   "(tests).")
@click.option("--workers", type=click.IntRange(1), default=None,
              help="Points run at once in local processes (default: the number of cores; "
                   "1: in this process).")
@ray_option("the points")
@click.option("--profile", "profile_path", type=click.Path(dir_okay=False), default=None,
              help="Profile .npz in any layout offload-sim reads (this project's, or the MDP "
                   "or DQN paper's); default: the committed artifacts/profile.npz.")
@click.option("--synthetic", type=click.IntRange(20), default=None,
              help="Without --profile: a synthetic profile of this many images.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0),
              help="Seed of every point that does not set its own.")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="torch threads per point (default: cores // workers; 1 with --ray).")
@click.option("--list", "list_only", is_flag=True, help="Print the grid's points and exit.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def sweep(grid, out_dir, scale, workers, ray_address, profile_path, synthetic, seed, threads,
          list_only, quiet):
    """Train and evaluate a DQN at every point of GRID; one results table.

    GRID is a ready-made grid (fig5, fig6, fig8, fig9, fig11, fig12: the
    paper's evaluation figures) or a TOML file (docs/sweeps.md). Every point
    trains a DQN and tests it with MDP, Baseline, Lower bound, both oracles,
    the belief policy and the structure-aware ceiling on the same test
    sequences. A failed point
    is recorded with its error and retried by the next run; Ctrl+C keeps every
    finished point, and the same command resumes.
    """
    require_torch()
    from training import sweep as S

    try:
        g = S.load_grid(grid, scale)
        pts = S.points(g, seed)
    except S.GridError as exc:
        fail(exc)
    try:
        for pt in pts:  # the DQN settings of every point, against the scale's schedule
            S.scale_config(scale, pt)
    except S.GridError as exc:
        fail(f"{g.source}: {exc}")
    if list_only:
        for pt in pts:
            click.echo(f"{pt.id}\t{', '.join(pt.parts)}")
        click.echo(f"{len(pts)} points", err=True)
        return
    prof, label = select_profile(profile_path, synthetic=synthetic, seed=seed)
    t0 = time.time()
    try:
        res = S.run_sweep(g, out_dir, scale, prof, label, workers=workers,
                          ray_address=ray_address, seed=seed, threads=threads,
                          progress=not quiet, echo=lambda m: click.echo(m, err=True))
    except S.GridError as exc:
        fail(exc)
    click.echo(f"sweep {g.name}: {res.skipped + res.done} of {res.total} points finished "
               f"({res.done} now, {res.skipped} before), {res.failed} failed, "
               f"{time.time() - t0:.0f} s; table {os.path.join(out_dir, 'results.csv')}",
               err=True)
    if res.interrupted:
        click.echo("interrupted: finished points are kept; the same command resumes", err=True)
        raise SystemExit(130)
    if res.failed:
        fail(f"{res.failed} point(s) failed (their errors are in "
              f"{os.path.join(out_dir, 'results.csv')}); the same command retries them")



# --------------------------------------------------------------------------- plot


@click.command()
@click.argument("results", type=click.Path(exists=True))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for the PNG figures (one per grid part).")
@click.option("--oracle", is_flag=True, help="Also draw the true-reward oracle (far below the "
                                             "others: it squeezes their lines).")
@click.option("--dpi", default=120, show_default=True, type=click.IntRange(30, 600))
def plot(results, out_dir, oracle, dpi):
    """Figures of a sweep's RESULTS (results.json, results.csv or the sweep folder).

    Average loss against the swept parameter, one line per policy (DQN int8,
    MDP, Baseline, Lower bound, metric-only oracle, belief policy, ceiling),
    one figure per grid part and one panel per value of its other axes. A
    policy the table does not have (the belief policy in results written
    before it was reported) is left out.
    """
    from training import figures as F

    try:
        rows, meta = F.read_results(results)
    except ValueError as exc:
        fail(exc)
    figs = F.results_figures(rows, meta, oracle=oracle)
    if not figs:
        fail(f"{results}: no finished points to plot")
    prefix = meta.get("grid", "sweep")
    for name, fig in figs:
        path = os.path.join(out_dir, f"{prefix}-{name}.png")
        F.save_png(fig, path, dpi)
        click.echo(f"wrote {path}", err=True)



# --------------------------------------------------------------------------- table


@click.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False),
              help="Markdown file to write (atomically); default: standard output.")
def table(results, out_path):
    """Markdown tables of one or more sweeps' RESULTS (results.json, results.csv or folder).

    One table per grid part, a row per finished point: its varying
    settings; average loss of DQN int8, MDP and Baseline; the shares of the
    metric oracle's gain that MDP, the DQN, the belief policy and the
    ceiling capture; the DQN's share of the belief's and of the ceiling's;
    whether DQN < MDP < Baseline holds, with both margins against their
    paired standard errors (results.json of this version); training seconds
    and what stopped training. Missing values are "-".
    """
    from offload.atomic import atomic_write_text
    from training import figures as F
    from training import tables as T

    texts = []
    for path in results:
        try:
            rows, meta = F.read_results(path)
        except ValueError as exc:
            fail(exc)
        text = T.markdown_tables(rows, meta)
        if not text:
            fail(f"{path}: no finished or failed points to tabulate")
        texts.append(text)
    doc = "\n".join(texts)
    if out_path:
        atomic_write_text(out_path, doc)
        click.echo(f"wrote {out_path}", err=True)
    else:
        click.echo(doc, nl=False)


# --------------------------------------------------------------------------- trace


@click.command()
@scenario_options
@click.option("--policy", "policy_specs", multiple=True,
              help="[LABEL=]mdp, baseline or a policy blob (e.g. a sweep's points/<id>.bin); "
                   "give two (default: mdp and baseline).")
@click.option("--length", default=10000, show_default=True, type=click.IntRange(1),
              help="Images in the stream.")
@click.option("--window", default=300, show_default=True, type=click.IntRange(10),
              help="Images to plot.")
@click.option("--start", default=None, type=click.IntRange(0),
              help="First image plotted; default: where the two policies' offload counts "
                   "differ most.")
@click.option("--out", default="docs/img/trace.png", show_default=True,
              type=click.Path(dir_okay=False), help="PNG to write (atomically).")
@click.option("--dpi", default=110, show_default=True, type=click.IntRange(30, 600))
def trace(profile_path, synthetic, rate, depth, choice, spread, rprob, arrivals, markov, seed,
          policy_specs, length, window, start, out, dpi):
    """Two policies' decisions on a window of one simulated stream (Figs. 7, 10, 11).

    Builds the same profile, bucket and test stream as offload-sim (same
    options and defaults) and draws each image's metric, marked by which
    policy offloaded it, each policy's token count, and the decisions.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        fail("matplotlib is needed: pip install matplotlib")
    from training import figures as F

    specs = [_labelled(s) for s in (policy_specs or ("mdp", "baseline"))]
    if len(specs) != 2:
        fail(f"--policy: give two policies to compare, got {len(specs)}")
    if window > length:
        fail(f"--window {window} is longer than --length {length}")
    if start is not None and start + window > length:
        fail(f"--start {start} + --window {window} exceeds --length {length}")
    check_policy_names([what for _, what in specs], ("mdp", "baseline"))
    sc, prof, m, tr, te = load_scenario(profile_path, synthetic, rate, depth, choice, spread,
                                        rprob, arrivals, markov, seed)
    with user_errors():
        st = sc.streams(m[te], prof.reward[te], prof.weak_loss[te], length=length, n_seq=1,
                        raw_metric=prof.metric[te], hidden=True)
    thresholds = fit_thresholds(m[tr], prof.reward[tr], sc, st,
                                mdp=any(what == "mdp" for _, what in specs))
    with user_errors():
        runs = [(label, *run_named_policy(what, st, sc, thresholds=thresholds, name=label,
                                          trace=True)) for label, what in specs]
    (n0, r0, th0), (n1, r1, th1) = runs
    if n0 == n1:
        n0, n1 = n0 + " (1)", n1 + " (2)"
    if start is None:
        start = F.busiest_window(r0.decisions[0], r1.decisions[0], window)
    sl = slice(start, start + window)
    seg = {"k": np.arange(start, start + window), "metric": st.metric[0, sl],
           "dec0": r0.decisions[0, sl], "dec1": r1.decisions[0, sl],
           "tok0": r0.tokens[0, sl].astype(float), "tok1": r1.tokens[0, sl].astype(float)}
    if arrivals == "markov":
        seg["state"] = st.arrival_state[0, sl]
    rew = [float(st.reward[0, sl][seg[f"dec{i}"] == 1].sum()) for i in (0, 1)]
    title = (_scenario_title(sc) + f"\nimages {start}-{start + window - 1}: "
             f"{n0} {int(seg['dec0'].sum())} offloads (reward {rew[0]:+.0f}), "
             f"{n1} {int(seg['dec1'].sum())} (reward {rew[1]:+.0f})")
    fig = F.trace_figure(seg, (n0, n1), sc.bucket.P, sc.bucket.M, title,
                         thresholds={n: th for n, th in ((n0, th0), (n1, th1)) if th is not None})
    F.save_png(fig, out, dpi)
    click.echo(f"wrote {out} (images {start}..{start + window - 1} of stream 0)", err=True)


def _labelled(spec):
    """``(label, what)`` of ``[LABEL=]mdp|baseline|BLOB`` (default label: MDP, Baseline, the file's stem)."""
    label, _, what = spec.rpartition("=")
    if not label:
        label = {"mdp": "MDP", "baseline": "Baseline"}.get(what) or \
            os.path.splitext(os.path.basename(what))[0]
    return label, what


def _scenario_title(sc):
    """The figure's first title line: bucket, image choice, arrivals and seed."""
    N, P, M = sc.bucket
    return (f"r={sc.rate}, b={sc.depth} (N, P, M = {N}, {P}, {M}), {sc.choice}"
            + (f" sp={sc.spread} rprob={sc.rprob}" if sc.choice == "location-reset" else "")
            + f", {sc.arrivals} arrivals"
            + (f" {' '.join(map(str, sc.markov))}" if sc.arrivals == "markov" else "")
            + f", seed {sc.seed}")
