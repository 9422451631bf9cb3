#!/usr/bin/env python3
"""Time to quality of ``offload-train dqn``: the quick preset with and without the convergence stop, per setting.

For each setting (default: the two of issue 22's table, then the Fig. 7 and
Fig. 10 settings of docs/dqn.md) the script runs ``offload-train dqn
--preset quick`` twice, one run after the other (so they do not share the
cores): with the convergence stop (``converge``: ``--converge-window 20
--converge-tol 0.002 --converge-decays 1 --time-limit 300``, stops when
validation has converged, 300 s at most) and as the preset is
(``quick``: the learning-rate schedule's own stop, 480 s at most). From each run's
report (``POLICY.json``) it prints and writes a Markdown table: why training
stopped, training seconds and iterations, when validation first reached 99%
of the final best gain over Baseline (``training.time_to_quality``), and the
int8 DQN's test shares of the metric oracle's, the ceiling's and, where the
report has it, the belief policy's gain over Baseline.

    .venv/bin/python tools/time_to_quality.py --out ttq                   # 8 runs, ~50 min on 2 cores
    .venv/bin/python tools/time_to_quality.py --out ttq --setting fig7 --preset converge
    .venv/bin/python tools/time_to_quality.py --out ttq-smoke -- --iterations 50 --test-streams 2

Arguments after ``--`` go to every ``offload-train dqn`` run (a profile,
``--threads``, a smaller run). A run whose report exists in ``--out`` and
was made by the same command is read, not rerun (``--fresh``: rerun all).
This is a benchmark, not a test; read the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Scenario options of each setting (``offload-train dqn``'s).
SETTINGS = {
    "r0.05-b2-lr-periodic": ("r 0.05, b 2, location-reset (sp 0.1, rprob 0.1), periodic",
                             "--rate 0.05 --depth 2 --choice location-reset --sp 0.1 "
                             "--rprob 0.1 --arrivals periodic"),
    "r0.25-b8-lr-markov": ("r 0.25, b 8, location-reset (sp 0.1, rprob 0.01), Markov arrivals "
                           "(1, 3, 0.001, 0.0005)",
                           "--rate 0.25 --depth 8 --choice location-reset --sp 0.1 "
                           "--rprob 0.01 --arrivals markov --markov 1 3 0.001 0.0005"),
    "fig7": ("Fig. 7: r 0.1, b 4, location-reset (sp 0.1, rprob 0.01), periodic",
             "--rate 0.1 --depth 4 --choice location-reset --sp 0.1 --rprob 0.01 "
             "--arrivals periodic"),
    "fig10": ("Fig. 10: r 0.1, b 4, i.i.d., Markov arrivals (1, 3, 0.001, 0.0005)",
              "--rate 0.1 --depth 4 --choice iid --arrivals markov --markov 1 3 0.001 0.0005"),
}

#: The preset as it is, and as it was before issue 22, as options of --preset quick.
PRESETS = {"converge": "--preset quick --converge-window 20 --converge-tol 0.002 "
                  "--converge-decays 1 --time-limit 300",
           "quick": "--preset quick"}

_SHARES = (("oracle-metric", "metric oracle"), ("ceiling", "ceiling"), ("belief", "belief"))


def command(setting, preset, out, extra):
    """The ``offload-train dqn`` command line of one run (a list)."""
    return ([sys.executable, "-m", "training.cli", "dqn", *shlex.split(SETTINGS[setting][1]),
             *shlex.split(PRESETS[preset]), "--out", out, "--quiet", *extra])


def run_one(setting, preset, out_dir, extra, fresh=False, echo=print):
    """Run (or reuse) one training; returns its report (dict) and the command's wall seconds."""
    base = os.path.join(out_dir, f"{setting}-{preset}")
    cmd = command(setting, preset, base + ".bin", extra)
    shown = shlex.join(["offload-train", *cmd[3:]])
    stamp = base + ".cmd"
    if not fresh and os.path.exists(base + ".json") and os.path.exists(stamp):
        with open(stamp) as fh:
            if fh.read().strip() == shown:
                echo(f"{setting} / {preset}: reusing {base}.json")
                with open(base + ".json") as fh2:
                    return json.load(fh2)
    for ext in (".ckpt", ".json", ".cmd"):   # a checkpoint is never overwritten otherwise
        if os.path.exists(base + ext):
            os.remove(base + ext)
    echo(f"{setting} / {preset}: {shown}")
    t0 = time.perf_counter()
    # cwd at the checkout: the command runs this tree's sources.
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{shown} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    echo(f"  done in {time.perf_counter() - t0:.0f} s")
    with open(stamp, "w") as fh:
        fh.write(shown + "\n")
    with open(base + ".json") as fh:
        return json.load(fh)


def _pct(v):
    return "" if v is None else f"{100 * v:.1f}%"


def row(setting, preset, rep):
    """One table row from a run's report."""
    tr = rep["training"]
    ttq = tr.get("time_to_quality") or {}
    dqn = next((r for r in rep.get("test") or [] if r["policy"] == "dqn-int8"), {})
    when = ("" if ttq.get("seconds") is None
            else f"{ttq['seconds']:.0f} s (it. {ttq['iteration']:,})")
    return {"setting": setting, "preset": preset, "stopped_by": tr["stopped_by"],
            "training s": f"{tr['seconds']:.{1 if tr['seconds'] < 10 else 0}f}", "iterations": f"{tr['iterations']:,}",
            "best at": f"{tr['best_iteration']:,}", "99% of final val. gain": when,
            **{f"DQN / {label}": _pct(dqn.get(f"share_of_{key}_gain"))
               for key, label in _SHARES}}


def markdown(rows):
    """A Markdown table of ``rows`` (dicts with the same keys)."""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Arguments after -- go to every offload-train dqn run.")
    ap.add_argument("--out", required=True, help="Folder for the policies, reports and table.")
    ap.add_argument("--setting", action="append", choices=list(SETTINGS),
                    help="A setting to run (repeatable; default: all, in this order: "
                         + ", ".join(SETTINGS) + ").")
    ap.add_argument("--preset", action="append", choices=list(PRESETS),
                    help="converge: the quick preset with the convergence stop; quick: the quick preset "
                         "(repeatable; default: both).")
    ap.add_argument("--fresh", action="store_true", help="Rerun runs whose report exists.")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for setting in args.setting or list(SETTINGS):
        for preset in args.preset or list(PRESETS):
            rep = run_one(setting, preset, args.out, extra, fresh=args.fresh,
                          echo=lambda m: print(m, file=sys.stderr, flush=True))
            rows.append(row(setting, preset, rep))
    legend = "\n".join(f"* `{k}`: {v[0]}" for k, v in SETTINGS.items()
                       if k in (args.setting or SETTINGS))
    presets = "\n".join(f"* `{k}`: `{v}`" for k, v in PRESETS.items())
    extra_s = f"\n* every run also: `{shlex.join(extra)}`" if extra else ""
    text = (f"{markdown(rows)}\n{legend}\n{presets}{extra_s}\n\nShares: the int8 DQN's share "
            "of each yardstick's gain over Baseline on the test sequences; 99%: the first "
            "validation reaching 99% of the final best validation gain over Baseline.\n")
    with open(os.path.join(args.out, "time_to_quality.md"), "w") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
