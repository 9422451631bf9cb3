"""Figures in the paper's style: sweep results (Figs. 5, 6, 8, 9, 12) and decision traces
(Figs. 7, 10, 11).

``results_figures`` turns a sweep's results table into one figure per grid
part: average loss against the swept parameter, one line per policy, one
panel per value of the part's other axes. ``trace_figure`` draws two
policies' decisions on a window of one simulated stream: the metric of each
image, marked by which policy offloaded it, and each policy's token count.

Functions return matplotlib figures (callers save them with ``save_png``), so
tests can look at the lines they hold. matplotlib is in the ``training`` extra.
"""

from __future__ import annotations

import csv
import json
import os
import textwrap

import numpy as np

__all__ = ["PLOT_POLICIES", "facet_keys", "read_results", "results_figures", "busiest_window", "trace_figure",
           "save_png"]

#: Policies drawn against the swept parameter: label, colour, marker, line style.
PLOT_POLICIES = {
    "dqn-int8": ("DQN", "#1f77b4", "o", "-"),
    "mdp": ("MDP", "#ff7f0e", "s", "-"),
    "baseline": ("Baseline", "#2ca02c", "^", "-"),
    "lower-bound": ("Lower bound", "#d62728", "v", "-"),
    "oracle-metric": ("Oracle (metric)", "#7f7f7f", "", "--"),
    "belief": ("Belief (history + generator model)", "#e377c2", "", (0, (5, 1, 1, 1))),
    "ceiling": ("Ceiling (knows hidden state)", "#9467bd", "", ":"),
    "oracle": ("Oracle (true rewards)", "#8c564b", "", "-."),
}
#: Columns of a results table that are results, not settings (never a panel or an axis).
_RESULT_COLUMNS = ("point", "status", "parts", "policy", "avg_loss", "mean_reward", "offload_rate",
                   "train_seconds", "stopped_by", "stream_reward", "seconds", "error")
_PARAMS = ("rate", "depth", "choice", "sp", "rprob", "arrivals", "I1", "I2", "tprob1", "tprob2",
           "T", "interarrival", "train_choice", "seed")
_LABELS = {"rate": "token rate r", "depth": "bucket depth b", "sp": "sub-sequence spread sp",
           "rprob": "location reset probability rprob", "tprob1": "transition probability tprob1",
           "tprob2": "transition probability tprob2", "T": "history window length T",
           "train_choice": "image choice the DQN was trained on",
           "interarrival": "inter-arrival inputs", "I2": "I2 (slots)", "I1": "I1 (slots)"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path, dpi=120):
    """Save ``fig`` as a PNG atomically and close it."""
    from offload.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    _pyplot().close(fig)


# --------------------------------------------------------------------------- results


def _number(s):
    if s in ("", None):
        return None
    if s in ("True", "False"):
        return s == "True"
    try:
        v = float(s)
    except ValueError:
        return s
    return int(v) if v.is_integer() and "." not in s and "e" not in s.lower() else v


def read_results(path):
    """``(rows, meta)`` of a sweep's ``results.json`` or ``results.csv`` (or its folder).

    ``meta`` has the grid's title and parts when the JSON table is read; a
    CSV gives the rows only. Raises ``ValueError`` naming the file.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ("results.json", "results.csv"):
            if os.path.exists(os.path.join(path, name)):
                return read_results(os.path.join(path, name))
        raise ValueError(f"{path}: no results.json or results.csv in this folder")
    try:
        if path.endswith(".json"):
            with open(path) as f:
                doc = json.load(f)
            if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
                raise ValueError("not a sweep results table (no rows)")
            return doc["rows"], {k: v for k, v in doc.items() if k != "rows"}
        with open(path, newline="") as f:
            rows = [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(f)]
        if rows and not {"policy", "avg_loss", "status"} <= set(rows[0]):
            raise ValueError("not a sweep results table (needs policy, avg_loss, status columns)")
        return rows, {}
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: {exc}") from None


def _varying(rows, keys):
    return [k for k in keys if len({repr(r.get(k)) for r in rows}) > 1]


def _sort_key(v):
    return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def results_figures(rows, meta=None, policies=None, oracle=False):
    """One figure per grid part: ``[(name, figure)]``.

    ``rows`` from ``read_results``; ``meta['parts']`` (the JSON table) says
    each part's points and x axis, otherwise the whole table is one part
    whose x is the varying setting with the most values. ``policies``
    (default: every one of ``PLOT_POLICIES`` but the true-reward oracle, which
    ``oracle=True`` adds) are drawn where the table has them.
    """
    plt = _pyplot()
    meta = meta or {}
    done = [r for r in rows if r.get("status") == "done" and r.get("avg_loss") is not None]
    names = list(policies or [p for p in PLOT_POLICIES if p != "oracle" or oracle])
    extra_keys = [k for k in (meta.get("columns") or (rows[0].keys() if rows else []))
                  if k not in _PARAMS and k not in _RESULT_COLUMNS
                  and not str(k).startswith("share_of")]
    keys = list(_PARAMS) + extra_keys
    parts = meta.get("parts") or [{"name": meta.get("grid", "sweep"), "x": None, "logx": 0,
                                   "points": sorted({r["point"] for r in done})}]
    figs = []
    for part in parts:
        prow = [r for r in done if r["point"] in set(part.get("points") or [])]
        if not prow:
            continue
        vary = _varying(prow, keys)
        x = part.get("x") or (max(vary, key=lambda k: len({repr(r.get(k)) for r in prow}))
                              if vary else "point")
        facets = facet_keys(prow, x, vary, part.get("axes"))
        combos = sorted({tuple(r.get(k) for k in facets) for r in prow},
                        key=lambda c: [_sort_key(v) for v in c])
        n = len(combos)
        width = 4.0 * n + 2.3  # inches: panels, then the legend at the right
        fig, axes = plt.subplots(1, n, figsize=(width, 3.8), squeeze=False)
        for ax, combo in zip(axes[0], combos):
            sel = [r for r in prow if tuple(r.get(k) for k in facets) == combo]
            _panel(ax, sel, x, names, part.get("logx") or 0)
            ax.set_title(", ".join(f"{k} = {_fmt(v)}" for k, v in zip(facets, combo)), fontsize=9)
        axes[0][0].set_ylabel("average loss")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
        title = meta.get("title") or ""
        name = part.get("name") or ""
        text = "\n".join(t for t in (title, name if name != title else "") if t)
        # About 15 characters of 9-point text per inch: long grid titles wrap.
        fig.suptitle("\n".join(textwrap.fill(t, int(15 * width)) for t in text.split("\n")),
                     fontsize=9)
        fig.tight_layout()
        fig.subplots_adjust(right=1 - 2.1 / width)
        figs.append((_slug(part.get("name") or "sweep"), fig))
    return figs


def facet_keys(rows, x, vary, axes=None):
    """The settings that get a panel each: the part's other axes when known.

    ``rows``: result rows (dicts) of one part; ``x``: the setting along the x
    axis; ``vary``: the settings whose values differ among ``rows``;
    ``axes``: the part's axes, when the results say them.

    Without them (a CSV table), every varying setting not already fixed by
    ``x`` and the facets before it (fewest values first): a setting derived
    from others, like ``tprob2`` from ``tprob1`` and ``tprob_ratio``, adds no
    panels.
    """
    if axes:
        return [k for k in axes if k != x]
    facets = []
    for k in sorted((k for k in vary if k != x),
                    key=lambda k: len({repr(r.get(k)) for r in rows})):
        seen = {}
        for r in rows:
            key = tuple(repr(r.get(c)) for c in [x, *facets])
            seen.setdefault(key, set()).add(repr(r.get(k)))
        if any(len(v) > 1 for v in seen.values()):
            facets.append(k)
    return facets


def _panel(ax, rows, x, names, logx):
    xs = sorted({r.get(x) for r in rows}, key=_sort_key)
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xs)
    pos = {v: (v if numeric else i) for i, v in enumerate(xs)}
    for name in names:
        pts = sorted(((pos[r.get(x)], r["avg_loss"]) for r in rows if r.get("policy") == name),
                     key=lambda t: t[0])
        if not pts:
            continue
        label, color, marker, style = PLOT_POLICIES.get(name, (name, None, "o", "-"))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle=style, marker=marker or None,
                ms=4, lw=1.3, color=color, label=label)
    if numeric and logx:
        positive = all(v > 0 for v in xs)
        if positive:
            ax.set_xscale("log", base=logx)
    if not numeric:
        ax.set_xticks(list(range(len(xs))), [_fmt(v) for v in xs])
        ax.set_xlim(-0.5, len(xs) - 0.5)
    ax.set_xlabel(_LABELS.get(x, x))
    ax.grid(alpha=0.3)


def _slug(name):
    s = "".join(c if c.isalnum() else "-" for c in str(name).lower())
    while "--" in s:
        s = s.replace("--", "-")
    return s.strip("-") or "part"


# --------------------------------------------------------------------------- traces


def busiest_window(a, b, width):
    """Start of the ``width``-image window where the offload counts of ``a`` and ``b`` differ most."""
    diff = np.concatenate([[0], np.cumsum(a.astype(np.int64) - b.astype(np.int64))])
    counts = np.abs(diff[width:] - diff[:-width])
    return int(np.argmax(counts))


_TRACE_COLORS = ("#1b9e77", "#d95f02")


def trace_figure(seg, names, P, M, title, thresholds=None):
    """Two policies' decisions on one stream segment (the paper's Figs. 7, 10, 11).

    ``seg``: per-image arrays ``k`` (positions), ``metric`` (standardised),
    ``dec0, dec1`` (decisions of ``names[0]``, ``names[1]``), ``tok0, tok1``
    (scaled tokens before each decision) and optionally ``state`` (the
    arrival state, drawn as a vertical line where it changes).
    ``thresholds``: ``{name: theta}`` of threshold policies, ``theta`` a
    scalar or a per-token-state vector (its first and last values drawn).
    """
    plt = _pyplot()
    k, m = seg["k"], seg["metric"]
    d0, d1 = seg["dec0"].astype(bool), seg["dec1"].astype(bool)
    fig, (ax0, ax1, ax2) = plt.subplots(3, 1, figsize=(11, 7.2), sharex=True,
                                        gridspec_kw={"height_ratios": [3, 2, 1]})
    groups = [(~d0 & ~d1, "not offloaded", "#c8c8c8", "o", 10),
              (d0 & d1, "offloaded by both", "#7b3294", "D", 22),
              (d0 & ~d1, f"offloaded by {names[0]} only", _TRACE_COLORS[0], "^", 30),
              (~d0 & d1, f"offloaded by {names[1]} only", _TRACE_COLORS[1], "v", 30)]
    for mask, label, color, marker, size in groups:
        ax0.scatter(k[mask], m[mask], s=size, c=color, marker=marker, label=label,
                    edgecolors="none", zorder=3 if label != "not offloaded" else 2)
    for i, name in enumerate(names):
        theta = (thresholds or {}).get(name)
        if theta is None:
            continue
        theta = np.atleast_1d(np.asarray(theta, float))
        color = _TRACE_COLORS[i]
        if theta.size == 1:
            ax0.axhline(theta[0], color=color, lw=1, ls="--",
                        label=f"{name} threshold ({theta[0]:.2f})")
        else:
            ax0.axhline(theta[-1], color=color, lw=1, ls=":",
                        label=f"{name} threshold, full bucket ({theta[-1]:.2f})")
            ax0.axhline(theta[0], color=color, lw=1, ls="--",
                        label=f"{name} threshold, 1 token ({theta[0]:.2f})")
    state = seg.get("state")
    if state is not None:
        for j in np.flatnonzero(np.diff(state.astype(np.int64)) != 0):
            ax0.axvline(k[j + 1], color="k", lw=1.2, ls="-.", label="arrival state change")
    handles, labels = ax0.get_legend_handles_labels()
    keep = dict(zip(labels, handles))  # one legend entry per label
    ax0.legend(keep.values(), keep.keys(), loc="upper left", bbox_to_anchor=(1.005, 1.0),
               fontsize=8, frameon=False)
    ax0.set_ylabel("standardised metric")
    ax0.set_title(title, fontsize=10)
    ax0.grid(alpha=0.3)

    for i, name in enumerate(names):
        ax1.step(k, seg[f"tok{i}"] / P, where="post", color=_TRACE_COLORS[i], lw=1.4, label=name)
    ax1.axhline(1.0, color="k", lw=0.8, ls=":", label="1 token (can offload)")
    ax1.set_ylabel("tokens before\ndecision")
    ax1.set_ylim(0, M / P + 0.3)
    ax1.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)
    ax1.grid(alpha=0.3)

    ax2.eventplot([k[d1], k[d0]], lineoffsets=[0, 1], linelengths=0.7,
                  colors=[_TRACE_COLORS[1], _TRACE_COLORS[0]])
    ax2.set_yticks([0, 1], [names[1], names[0]])
    ax2.set_ylim(-0.6, 1.6)
    ax2.set_xlabel("image (position in the stream)")
    ax2.set_ylabel("offloads")
    ax2.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig

