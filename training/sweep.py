"""Evaluation sweeps: grids of scenarios, each point a trained DQN against every benchmark.

A *grid* is one or more *parts*; each part is the cartesian product of its
*axes* (lists of values) on top of a *base* (fixed settings). The points of
all parts are pooled (a point two parts share runs once). A point sets the
scenario (bucket ``rate, depth``; image choice ``choice, sp, rprob``;
arrivals ``arrivals, I1, I2, tprob1, tprob2``), the DQN's history length
``T`` and inter-arrival inputs, optionally another image choice to train on
(``train_choice``, the paper's Fig. 11), the seed, and any DQN schedule
setting (``training.dqn.DQNConfig``) that should differ from the scale's.

The ready-made grids (``GRIDS``) follow the paper's evaluation figures, each
at two *scales*: ``paper`` (the figure's full grid, the published schedule)
and ``quick`` (a reduced grid and a per-point schedule of a few minutes on
one core); ``smoke`` runs the quick grid with a seconds-long schedule (tests).
A user's grid comes from a TOML file (``docs/sweeps.md``, ``load_toml``).

``run_sweep`` runs the points that have no finished result in the output
folder (local processes or Ray tasks), writes each point's result and policy
blob as soon as it arrives, and rewrites the results table after each one.
A point that fails is recorded with its error; the others go on.

Units: ``rate`` tokens per slot, ``depth`` tokens, ``I1, I2`` slots,
``tprob1, tprob2`` per-slot probabilities, times in seconds.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import time
import traceback

from offload import scenario as _scenario_mod
from offload.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["GRIDS", "SCALES", "GridError", "Grid", "Part", "Point", "ready_grid", "load_toml",
           "grid_from_dict", "scale_config", "run_point", "run_sweep", "results_rows",
           "TABLE_COLUMNS", "POLICIES"]

# --------------------------------------------------------------------------- the grids (data)

_BASE_BUCKET = {"rate": 0.1, "depth": 4.0}
_COMBINED = {"choice": "location-reset", "sp": 0.1, "rprob": 0.01, "arrivals": "markov",
             "I1": 1, "I2": 3, "tprob1": 0.001, "tprob2": 0.0005}
_LOG_STEPS = [10 ** e for e in (-3, -2.5, -2, -1.5, -1, -0.5)]
_LOG_STEPS_QUICK = [0.001, 0.01, 0.1, 10 ** -0.5]
# The paper varies b "from 1 to 20" without listing its points; these are ours.
_DEPTHS_PAPER = [1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 18, 20]

#: The paper's evaluation figures as grids: per scale a list of parts, each with
#: its axes (``x``: the plotted axis; ``logx``: log scale, ``2`` for base 2).
GRIDS = {
    "fig5": {
        "title": "Fig. 5: correlated classifier outputs; r = 0.1, b = 4, periodic arrivals",
        "base": {**_BASE_BUCKET, "choice": "location-reset", "arrivals": "periodic"},
        "paper": [
            {"name": "spread", "x": "sp",
             "axes": {"rprob": [0.1, 0.01, 0.001],
                      "sp": [0.0, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0]}},
            {"name": "reset probability", "x": "rprob", "logx": 10,
             "axes": {"sp": [0.1, 0.2, 0.5], "rprob": [10 ** e for e in (-3, -2.5, -2, -1.5,
                                                                         -1, -0.5, 0)]}},
        ],
        "quick": [
            {"name": "spread", "x": "sp", "axes": {"rprob": [0.01], "sp": [0.05, 0.1, 0.4, 1.0]}},
            {"name": "reset probability", "x": "rprob", "logx": 10,
             "axes": {"sp": [0.1], "rprob": [0.001, 0.01, 0.1, 1.0]}},
        ],
    },
    "fig6": {
        "title": "Fig. 6: token bucket (r, b) under correlated outputs (sp = 0.1, rprob = 0.1)",
        "base": {"choice": "location-reset", "sp": 0.1, "rprob": 0.1, "arrivals": "periodic"},
        "paper": [{"name": "bucket", "x": "depth",
                   "axes": {"rate": [0.05, 0.1, 0.25], "depth": _DEPTHS_PAPER}}],
        "quick": [{"name": "bucket", "x": "depth",
                   "axes": {"rate": [0.05, 0.1, 0.25], "depth": [2, 4, 10, 20]}}],
    },
    "fig8": {
        "title": "Fig. 8: Markov-modulated arrivals (tprob1, tprob1/tprob2 fixed), i.i.d. outputs; "
                 "r = 0.1, b = 4",
        "base": {**_BASE_BUCKET, "choice": "iid", "arrivals": "markov", "I1": 1},
        "paper": [
            {"name": "I1 = 1, I2 = 3", "x": "tprob1", "logx": 10,
             "base": {"I2": 3, "tprob_ratio": 2}, "axes": {"tprob1": _LOG_STEPS}},
            {"name": "I1 = 1, I2 = 6", "x": "tprob1", "logx": 10,
             "base": {"I2": 6, "tprob_ratio": 4}, "axes": {"tprob1": _LOG_STEPS}},
        ],
        "quick": [
            {"name": "I1 = 1, I2 = 3", "x": "tprob1", "logx": 10,
             "base": {"I2": 3, "tprob_ratio": 2}, "axes": {"tprob1": _LOG_STEPS_QUICK}},
            {"name": "I1 = 1, I2 = 6", "x": "tprob1", "logx": 10,
             "base": {"I2": 6, "tprob_ratio": 4}, "axes": {"tprob1": _LOG_STEPS_QUICK}},
        ],
    },
    "fig9": {
        "title": "Fig. 9: token bucket (r, b) under Markov arrivals (1, 3, 0.001, 0.0005), "
                 "i.i.d. outputs",
        "base": {"choice": "iid", "arrivals": "markov", "I1": 1, "I2": 3, "tprob1": 0.001,
                 "tprob2": 0.0005},
        "paper": [{"name": "bucket", "x": "depth",
                   "axes": {"rate": [0.05, 0.1, 0.25], "depth": _DEPTHS_PAPER}}],
        "quick": [{"name": "bucket", "x": "depth",
                   "axes": {"rate": [0.05, 0.1, 0.25], "depth": [2, 4, 10, 20]}}],
    },
    "fig11": {
        "title": "Fig. 11: combined correlation (sp 0.1, rprob 0.01; Markov 1, 3, 0.001, 0.0005), "
                 "r = 0.1, b = 4: DQN trained on correlated or i.i.d. outputs, with or without "
                 "inter-arrival inputs",
        "base": {**_BASE_BUCKET, **_COMBINED},
        "paper": [{"name": "training", "x": "train_choice",
                   "axes": {"interarrival": [True, False],
                            "train_choice": ["location-reset", "iid"]}}],
        "quick": [{"name": "training", "x": "train_choice",
                   "axes": {"interarrival": [True, False],
                            "train_choice": ["location-reset", "iid"]}}],
    },
    "fig12": {
        "title": "Fig. 12: history length T, combined correlation, r = 0.1, b = 4",
        "base": {**_BASE_BUCKET, **_COMBINED},
        "paper": [{"name": "history", "x": "T", "logx": 2,
                   "axes": {"T": [2, 4, 8, 16, 32, 64, 128]}}],
        "quick": [{"name": "history", "x": "T", "logx": 2, "axes": {"T": [2, 8, 32, 128]}}],
    },
}

#: Per-point DQN schedules. ``quick`` is the ``offload-train dqn --preset quick``
#: schedule capped at 240 s of training and tested on 10 x 100,000 images: the
#: 12-point Fig. 6 grid took 26 minutes with 2 workers on 2 cores.
SCALES = {
    "smoke": ("quick", dict(layers=2, width=16, iterations=6, steps=4, batch=64,
                            validate_every=3, time_limit=0.0, train_streams=2, train_length=3000,
                            val_streams=2, val_length=1000, test_streams=2, test_length=2000,
                            calib_states=1000, int8_tune=3)),
    "quick": ("quick", dict(time_limit=240.0, test_streams=10, test_length=100_000)),
    "paper": ("paper", {}),
}
#: Which grid each scale runs (``smoke`` the quick grid).
_GRID_SCALE = {"smoke": "quick", "quick": "quick", "paper": "paper"}

# --------------------------------------------------------------------------- point settings

#: Scenario settings of a point: (default, kind, check, help). The scenario's own
#: (``offload.scenario.SETTINGS``, declared there once) and those of a sweep point.
SCENARIO_KEYS = {
    **{k: v for k, v in _scenario_mod.SETTINGS.items() if k != "seed"},
    "tprob_ratio": (None, float, lambda v: v > 0,
                    "tprob1 / tprob2 > 0: sets tprob2 from tprob1 (instead of tprob2)"),
    "T": (97, int, lambda v: v >= 2, "history length T >= 2"),
    "interarrival": ("auto", (bool, str), lambda v: v in (True, False, "auto"),
                     "inter-arrival times as DQN inputs: true, false or \"auto\" "
                     "(on unless arrivals are periodic)"),
    "train_choice": (None, str, lambda v: v in _scenario_mod.CHOICES,
                     "image choice of the training sequences (default: choice); the test "
                     "always uses choice"),
    "seed": (None, int, *_scenario_mod.SETTINGS["seed"][2:3],
             _scenario_mod.SETTINGS["seed"][3] + " (default: --seed)"),
}
#: DQN settings a grid may change (the rest: the scale's schedule, --threads).
CONFIG_KEYS = ("layers", "width", "discount", "shift", "targets", "val_reward", "act_bits",
               "int8_tune", "ema",
               "lr", "lr_decay", "lr_min", "lr_final_share", "patience", "batch", "steps",
               "iterations", "time_limit", "validate_every", "train_streams", "train_length",
               "val_streams", "val_length",
               "test_streams", "test_length", "calib_states", "holdout")
#: Columns of a point in the results table, in order (config keys a grid sets follow).
PARAM_COLUMNS = ("rate", "depth", "choice", "sp", "rprob", "arrivals", "I1", "I2", "tprob1",
                 "tprob2", "T", "interarrival", "train_choice", "seed")
#: The policies ``training.dqn.evaluate`` reports, in its order.
POLICIES = ("dqn-float", "dqn-int8", "mdp", "baseline", "lower-bound", "oracle", "oracle-metric",
            "ceiling")
TABLE_COLUMNS = ("point", "status", "policy", "avg_loss", "mean_reward", "offload_rate",
                 "share_of_oracle_gain", "share_of_oracle-metric_gain", "share_of_ceiling_gain",
                 "seconds", "error")


class GridError(ValueError):
    """A grid that cannot run; the message names the file, key and value."""


@dataclasses.dataclass
class Part:
    """One cartesian product of a grid: ``axes`` (lists) over ``base`` (settings)."""

    name: str
    base: dict
    axes: dict
    x: str = None       # the axis plotted along x
    logx: int = 0       # 0: linear x axis, else the log base


@dataclasses.dataclass
class Grid:
    """A named list of parts over a shared base."""

    name: str
    title: str
    base: dict
    parts: list
    source: str = ""   # where it came from (a file path or the grid's name), for messages


@dataclasses.dataclass
class Point:
    """One scenario to train and evaluate: resolved settings, id, parts it belongs to."""

    id: str
    params: dict   # every PARAM_COLUMNS key, resolved
    config: dict   # DQN settings the grid sets (CONFIG_KEYS)
    parts: list


# --------------------------------------------------------------------------- grid parsing


def _config_kind(key):
    default = {f.name: f.default for f in dataclasses.fields(_dqn().DQNConfig)}[key]
    return type(default)


def _dqn():
    from training import dqn  # torch: only where a grid's settings are checked or run

    return dqn


def _check_value(where, key, value):
    """``value`` converted to the key's kind, or ``GridError`` naming ``where`` and ``key``."""
    if key in SCENARIO_KEYS:
        _, kind, ok, why = SCENARIO_KEYS[key]
    elif key in CONFIG_KEYS:
        kind, ok, why = _config_kind(key), (lambda v: True), "see training.dqn.DQNConfig"
    else:
        known = ", ".join(list(SCENARIO_KEYS) + list(CONFIG_KEYS))
        raise GridError(f"{where}: unknown setting {key!r} (known: {known})")
    kinds = kind if isinstance(kind, tuple) else (kind,)
    v = value
    if isinstance(v, bool) and bool not in kinds:
        raise GridError(f"{where}: {key} = {value!r}: {why}")
    if float in kinds and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if not isinstance(v, kinds):
        raise GridError(f"{where}: {key} = {value!r} is a {type(value).__name__}; "
                        f"expected {' or '.join(k.__name__ for k in kinds)} ({why})")
    if isinstance(v, float) and not math.isfinite(v):
        raise GridError(f"{where}: {key} = {value!r} is not finite")
    if not ok(v):
        raise GridError(f"{where}: {key} = {value!r}: must be {why}")
    return v


def _settings(where, table):
    if not isinstance(table, dict):
        raise GridError(f"{where}: expected a table of settings, got {type(table).__name__}")
    return {k: _check_value(f"{where}", k, v) for k, v in table.items()}


def _axes(where, table):
    if not isinstance(table, dict):
        raise GridError(f"{where}: expected a table of lists, got {type(table).__name__}")
    out = {}
    for k, values in table.items():
        if not isinstance(values, list) or not values:
            raise GridError(f"{where}: {k} must be a non-empty list of values, got {values!r}")
        out[k] = [_check_value(f"{where}.{k}", k, v) for v in values]
        if len(set(map(repr, out[k]))) != len(out[k]):
            raise GridError(f"{where}: {k} lists a value twice: {values!r}")
    return out


def _part(where, d, top_axes=None):
    allowed = {"name", "base", "axes", "x", "logx"}
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise GridError(f"{where}: unknown key(s) {', '.join(unknown)} "
                        f"(a part has {', '.join(sorted(allowed))})")
    axes = _axes(f"{where}.axes", d.get("axes", top_axes or {}))
    base = _settings(f"{where}.base", d.get("base", {}))
    both = sorted(set(axes) & set(base))
    if both:
        raise GridError(f"{where}: {', '.join(both)} both fixed in base and swept in axes")
    x = d.get("x")
    if x is None and axes:  # the longest axis, the last one on a tie
        x = max(reversed(list(axes)), key=lambda k: len(axes[k]))
    if x is not None and axes and x not in axes:
        raise GridError(f"{where}: x = {x!r} is not one of its axes ({', '.join(axes)})")
    logx = d.get("logx", 0)
    if logx is True:
        logx = 10
    if logx is False:
        logx = 0
    if not isinstance(logx, int) or logx not in (0, 2, 10):
        raise GridError(f"{where}: logx = {d.get('logx')!r}: must be false, true, 2 or 10")
    return Part(str(d.get("name", where)), base, axes, x, logx)


def grid_from_dict(d, name="grid", where=None):
    """A ``Grid`` from plain data (a parsed TOML file or a ``GRIDS`` entry at one scale).

    Keys: ``title`` (text), ``base`` (settings), and either ``axes`` (lists;
    with ``plot = {x, logx}``) for one part or ``part`` (a list of tables with
    ``name``, ``base``, ``axes``, ``x``, ``logx``). Every key and value is
    checked here; ``GridError`` names the first problem.
    """
    where = where or name
    if not isinstance(d, dict):
        raise GridError(f"{where}: expected a table")
    allowed = {"title", "base", "axes", "plot", "part"}
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise GridError(f"{where}: unknown key(s) {', '.join(unknown)} "
                        f"(a grid has {', '.join(sorted(allowed))})")
    base = _settings(f"{where}: base", d.get("base", {}))
    if "part" in d:
        if "axes" in d or "plot" in d:
            raise GridError(f"{where}: give either [axes] (and [plot]) or [[part]] tables, "
                            "not both")
        if not isinstance(d["part"], list) or not d["part"]:
            raise GridError(f"{where}: part must be a non-empty list of tables")
        parts = [_part(f"{where}: part {i + 1}", p) for i, p in enumerate(d["part"])]
    else:
        plot = d.get("plot", {})
        if not isinstance(plot, dict) or set(plot) - {"x", "logx"}:
            raise GridError(f"{where}: plot takes x and logx only, got {plot!r}")
        parts = [_part(f"{where}: axes", {"name": d.get("title", name), "axes": d.get("axes", {}),
                                          **plot})]
    for p in parts:
        both = sorted(set(p.axes) & set(base))
        if both:
            raise GridError(f"{where}: {', '.join(both)} both fixed in base and swept in axes "
                            f"of part {p.name!r}")
    grid = Grid(name, str(d.get("title", name)), base, parts, where)
    points(grid, seed=0)  # every combination is checked up front
    return grid


def ready_grid(name, scale):
    """The ready-made grid ``name`` (a key of ``GRIDS``) at ``scale`` (a key of ``SCALES``)."""
    if name not in GRIDS:
        raise GridError(f"unknown grid {name!r} (ready-made: {', '.join(GRIDS)}; "
                        "or a path to a .toml file)")
    if scale not in SCALES:
        raise GridError(f"unknown scale {scale!r} ({', '.join(SCALES)})")
    g = GRIDS[name]
    return grid_from_dict({"title": g["title"], "base": g["base"],
                           "part": copy.deepcopy(g[_GRID_SCALE[scale]])}, name=name)


def _read_toml(path):
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise GridError(f"{path}: no such grid file (ready-made grids: "
                        f"{', '.join(GRIDS)})") from None
    except OSError as exc:
        raise GridError(f"{path}: cannot read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise GridError(f"{path}: not valid TOML ({exc})") from None


def load_toml(path):
    """A user's grid from a TOML file (format: docs/sweeps.md); ``GridError`` on any problem."""
    name = os.path.splitext(os.path.basename(path))[0]
    return grid_from_dict(_read_toml(path), name=name, where=os.fspath(path))


def load_grid(spec, scale):
    """A ready-made grid by name, else a TOML file by path."""
    if spec in GRIDS:
        return ready_grid(spec, scale)
    if not os.path.exists(spec) and not spec.endswith(".toml"):
        raise GridError(f"unknown grid {spec!r} (ready-made: {', '.join(GRIDS)}; or a path to "
                        "a .toml file)")
    return load_toml(spec)


def _fmt(v):
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _point_id(params, config):
    """Readable and stable: the settings that matter, then a hash of all of them."""
    p = params
    parts = [f"r{_fmt(p['rate'])}", f"b{_fmt(p['depth'])}"]
    parts.append("iid" if p["choice"] == "iid" else f"sp{_fmt(p['sp'])}-rp{_fmt(p['rprob'])}")
    if p["arrivals"] == "markov":
        parts.append(f"mk{p['I1']}.{p['I2']}.{_fmt(p['tprob1'])}.{_fmt(p['tprob2'])}")
    parts.append(f"T{p['T']}")
    parts.append("ia" if p["interarrival"] else "noia")
    if p["train_choice"] != p["choice"]:
        parts.append(f"train-{p['train_choice']}")
    parts.append(f"s{p['seed']}")
    parts += [f"{k}{_fmt(v)}" for k, v in sorted(config.items())]
    key = json.dumps({"params": params, "config": config}, sort_keys=True)
    return "-".join(parts) + "-" + hashlib.sha256(key.encode()).hexdigest()[:6]


def resolve(settings, seed):
    """Every scenario setting of a point from its (checked) settings; ``GridError`` on clashes.

    The scenario itself is checked by ``offload.scenario.Scenario`` (bucket,
    its size, Markov parameters), as ``offload-sim`` checks it.
    """
    s = {k: d for k, (d, *_rest) in SCENARIO_KEYS.items()}
    s.update({k: v for k, v in settings.items() if k in SCENARIO_KEYS})
    if s["seed"] is None:
        s["seed"] = int(seed)
    ratio = s.pop("tprob_ratio")
    if ratio is not None:
        if "tprob2" in settings:
            raise GridError("tprob2 and tprob_ratio both set: give one")
        s["tprob2"] = s["tprob1"] / ratio
        if not 0 < s["tprob2"] <= 1:
            raise GridError(f"tprob1 / tprob_ratio = {s['tprob2']:.4g} is outside (0, 1]")
    if s["interarrival"] == "auto":
        s["interarrival"] = s["arrivals"] != "periodic"
    if s["train_choice"] is None:
        s["train_choice"] = s["choice"]
    try:
        point_scenario(s)
    except ValueError as exc:
        raise GridError(str(exc)) from None
    return {k: s[k] for k in PARAM_COLUMNS}


def point_scenario(params, choice_key="choice"):
    """The ``offload.scenario.Scenario`` of resolved point settings ``params``.

    ``choice_key="train_choice"`` gives the scenario the DQN trains on.
    """
    return _scenario_mod.Scenario.from_settings({**params, "choice": params[choice_key]})


def points(grid, seed=0):
    """The grid's points in order (a point in several parts once, listing them all)."""
    out = {}
    for part in grid.parts:
        keys = list(part.axes)
        for combo in itertools.product(*(part.axes[k] for k in keys)):
            settings = {**grid.base, **part.base, **dict(zip(keys, combo))}
            where = ", ".join([grid.source or grid.name]
                              + ([f"part {part.name!r}"] if len(grid.parts) > 1 else [])
                              + [f"{k} = {_fmt(v)}" for k, v in zip(keys, combo)])
            try:
                params = resolve(settings, seed)
            except GridError as exc:
                raise GridError(f"{where}: {exc}") from None
            config = {k: v for k, v in settings.items() if k in CONFIG_KEYS}
            pid = _point_id(params, config)
            if pid in out:
                out[pid].parts.append(part.name)
            else:
                out[pid] = Point(pid, params, config, [part.name])
    return list(out.values())


def scale_config(scale, point, threads=1):
    """The ``DQNConfig`` of ``point`` at ``scale``: the scale's schedule, then the grid's."""
    D = _dqn()
    preset, over = SCALES[scale]
    p = point.params
    values = {**over, **point.config, "T": p["T"], "interarrival": p["interarrival"],
              "seed": p["seed"], "threads": int(threads), "device": "cpu"}
    try:
        return D.preset(preset, **values)
    except ValueError as exc:
        raise GridError(f"point {point.id}: {exc}") from None


# --------------------------------------------------------------------------- one point


class PointInterrupted(Exception):
    """Training of a point was stopped by a signal: nothing is recorded for it."""


def run_point(point, config, prof, fingerprint, threads=1):
    """Train and evaluate one point; returns ``(record, blob_bytes)``.

    ``record`` is ``training.dqn.report``'s dict plus ``point`` (id, params,
    config) and ``status = "done"``. The DQN trains on ``train_choice``
    sequences and every policy is tested on ``choice`` sequences (the same
    test sequences for all). Raises on any failure (the caller records it)
    and ``PointInterrupted`` when a signal stopped training.
    """
    import torch

    from offload import blob
    D = _dqn()

    t0 = time.time()
    torch.set_num_threads(max(1, int(threads)))
    p = point.params
    test_sc = point_scenario(p)
    train_sc = point_scenario(p, "train_choice")
    data = D.prepare_data(prof, config.holdout, p["seed"])
    trainer = _train(data, train_sc, config, fingerprint)
    if trainer.stopped_by.startswith("stopped by"):
        raise PointInterrupted(trainer.stopped_by)
    layers, qmlp = trainer.int8_policy()
    tester = copy.copy(trainer)  # the trained policies, judged on the test scenario
    tester.sc = test_sc
    rows, extra = D.evaluate(tester, layers, qmlp, p["rate"], threads=threads)
    meta = {"name": "dqn", "point": point.id, "rate": p["rate"], "depth": p["depth"],
            "choice": p["choice"], "train_choice": p["train_choice"], "arrivals": p["arrivals"],
            "iterations": trainer.iteration, "best_iteration": trainer.best_iteration}
    data_bytes = blob.to_bytes(D.policy_blob(prof, test_sc, config, qmlp, meta))
    rec = D.report(trainer, prof, None, None, rows, extra, f"{point.id}.bin", None, None,
                   time.time() - t0)
    rec.update(command="offload-train sweep", status="done", scenario=test_sc.to_dict(),
               train_scenario=train_sc.to_dict(),
               point={"id": point.id, "params": point.params, "config": point.config})
    return _clean_json(rec), data_bytes


def _train(data, scenario, config, fingerprint):
    """Train one DQN (a seam tests replace to make a point fail)."""
    D = _dqn()
    trainer = D.Trainer(data, scenario, config, fingerprint)
    trainer.run()
    return trainer


# Worker state of a local process pool: the profile, sent once per worker.
_WORKER = {}


def _worker_init(prof, fingerprint, threads):
    import signal

    # Ctrl+C goes to the terminal's whole process group; the parent decides
    # what happens to running points (it ends them), so a worker leaves the
    # group (the trainer would otherwise catch the signal and stop early).
    if hasattr(os, "setpgrp"):
        os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER.update(prof=prof, fingerprint=fingerprint, threads=threads)


def _pool_task(point, config):
    return _guarded(point, config, _WORKER["prof"], _WORKER["fingerprint"], _WORKER["threads"])


def _guarded(point, config, prof, fingerprint, threads):
    """``("done", record, blob)`` or ``("failed", record, None)``: never raises but on interrupt."""
    t0 = time.time()
    try:
        rec, data = run_point(point, config, prof, fingerprint, threads)
        return "done", rec, data
    except PointInterrupted:
        raise
    except Exception as exc:  # any failure of one point is recorded, the sweep goes on
        tb = traceback.format_exc(limit=-3)
        return "failed", {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                          "traceback": tb, "seconds": time.time() - t0,
                          "point": {"id": point.id, "params": point.params,
                                    "config": point.config}}, None


# --------------------------------------------------------------------------- results


def point_paths(out, pid):
    """``(json, blob)`` paths of a point's result in the sweep folder ``out``."""
    return (os.path.join(out, "points", pid + ".json"), os.path.join(out, "points", pid + ".bin"))


def read_point(out, pid):
    """A point's stored record, or ``None`` when it has none or an unreadable one."""
    path, _ = point_paths(out, pid)
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def is_complete(out, pid):
    """A finished point: its record says done, lists every policy, and its blob exists."""
    rec = read_point(out, pid)
    if not rec or rec.get("status") != "done":
        return False
    names = [r.get("policy") for r in rec.get("test") or []]
    return names == list(POLICIES) and os.path.isfile(point_paths(out, pid)[1])


def results_rows(out, grid_points, config_keys=()):
    """One row per point and policy (a failed point: one row with its error)."""
    rows = []
    for pt in grid_points:
        rec = read_point(out, pt.id)
        if rec is None:
            continue
        base = {"point": pt.id, **pt.params, **{k: pt.config.get(k) for k in config_keys},
                "status": rec.get("status"), "parts": "; ".join(pt.parts)}
        if rec.get("status") == "done":
            for r in rec.get("test") or []:
                rows.append({**base, **{k: r.get(k) for k in TABLE_COLUMNS if k in r},
                             "seconds": rec.get("total_seconds"), "error": ""})
        else:
            rows.append({**base, "policy": "", "error": rec.get("error", ""),
                         "seconds": rec.get("seconds")})
    return rows


def write_table(out, grid, grid_points, meta):
    """Rewrite ``results.csv`` and ``results.json`` (atomically) from the point records."""
    config_keys = sorted({k for pt in grid_points for k in pt.config})
    rows = results_rows(out, grid_points, config_keys)
    cols = (["point", "status", "parts", *PARAM_COLUMNS, *config_keys]
            + [c for c in TABLE_COLUMNS if c not in ("point", "status")])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})
    atomic_write_text(os.path.join(out, "results.csv"), buf.getvalue())
    done = sum(1 for pt in grid_points if is_complete(out, pt.id))
    failed = sum(1 for r in rows if r["status"] == "failed")
    atomic_write_json(os.path.join(out, "results.json"), _clean_json({
        **meta, "points": {"total": len(grid_points), "done": done, "failed": failed},
        "parts": [{"name": p.name, "x": p.x, "logx": p.logx, "axes": list(p.axes),
                   "points": [pt.id for pt in grid_points if p.name in pt.parts]}
                  for p in grid.parts],
        "columns": cols, "rows": rows}))
    return rows


def _clean_json(v):
    if isinstance(v, dict):
        return {k: _clean_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean_json(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _record(out, pid, status, rec, data):
    """Store one point: the blob first, then the record that marks it finished."""
    jpath, bpath = point_paths(out, pid)
    if status == "done":
        atomic_write_bytes(bpath, data)
    atomic_write_json(jpath, rec)


# --------------------------------------------------------------------------- the sweep


@dataclasses.dataclass
class SweepSummary:
    total: int
    skipped: int
    done: int
    failed: int
    interrupted: bool
    seconds: float


def _check_folder(out, meta):
    """Refuse a folder holding a sweep on another profile or at another scale."""
    path = os.path.join(out, "sweep.json")
    try:
        with open(path) as f:
            old = json.load(f)
    except FileNotFoundError:
        atomic_write_json(path, meta)
        return
    except (OSError, ValueError) as exc:
        raise GridError(f"{path}: unreadable ({exc}); remove it or choose another --out") from None
    for key, label in (("profile_fingerprint", "profile"), ("scale", "scale")):
        if old.get(key) != meta[key]:
            raise GridError(f"{out} holds a sweep with another {label} ({old.get(key)!r}, "
                            f"this run {meta[key]!r}): choose another --out")


def run_sweep(grid, out, scale, prof, profile_label, workers=None, ray_address=None, seed=0,
              threads=None, progress=True, echo=print):
    """Run every unfinished point of ``grid`` into folder ``out``; returns a ``SweepSummary``.

    ``workers`` local processes (default: the number of cores; 1 runs in this
    process) or, with ``ray_address``, Ray tasks on that cluster. ``threads``
    torch threads per point (default: ``max(1, cores // workers)``; with Ray,
    one per task). Ctrl+C keeps every finished point.
    """
    from tqdm import tqdm

    D = _dqn()
    if ray_address:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise GridError("--ray needs Ray: pip install 'offload[ray]'") from None
    cores = os.cpu_count() or 1
    workers = max(1, int(workers or cores))
    if threads is None:
        threads = 1 if ray_address else max(1, cores // workers)
    fingerprint = D.profile_fingerprint(prof)
    pts = points(grid, seed)
    configs = {pt.id: scale_config(scale, pt, threads) for pt in pts}
    os.makedirs(os.path.join(out, "points"), exist_ok=True)
    meta = {"command": "offload-train sweep", "grid": grid.name, "title": grid.title,
            "scale": scale, "profile": profile_label, "profile_fingerprint": fingerprint,
            "profile_source": prof.source}
    _check_folder(out, meta)
    todo = [pt for pt in pts if not is_complete(out, pt.id)]
    skipped = len(pts) - len(todo)
    write_table(out, grid, pts, meta)
    echo(f"sweep {grid.name} ({scale}): {len(pts)} points, {skipped} already finished, "
         f"{len(todo)} to run {'on Ray at ' + ray_address if ray_address else ''}"
         f"{'' if ray_address else f'in {min(workers, max(1, len(todo)))} process(es)'}, "
         f"{threads} torch thread(s) each; results in {out}")
    bar = tqdm(total=len(pts), initial=skipped, unit="point", desc=f"sweep {grid.name}",
               disable=None if progress else True, dynamic_ncols=True, smoothing=0)
    counts = {"done": 0, "failed": 0}
    t0 = time.time()

    def finished(pt, status, rec, data):
        _record(out, pt.id, status, rec, data)
        write_table(out, grid, pts, meta)
        counts[status] += 1
        bar.update(1)
        bar.set_postfix_str(f"{counts['failed']} failed", refresh=True)
        if status == "failed":
            bar.write(f"point {pt.id} failed: {rec['error']}")

    interrupted = False
    try:
        if not todo:
            pass
        elif ray_address:
            interrupted = _run_ray(todo, configs, prof, fingerprint, threads, ray_address,
                                   finished)
        elif workers == 1 or len(todo) == 1:
            interrupted = _run_here(todo, configs, prof, fingerprint, threads, finished)
        else:
            interrupted = _run_pool(todo, configs, prof, fingerprint, threads, workers, finished)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    return SweepSummary(len(pts), skipped, counts["done"], counts["failed"], interrupted,
                        time.time() - t0)


def _run_here(todo, configs, prof, fingerprint, threads, finished):
    for pt in todo:
        try:
            status, rec, data = _guarded(pt, configs[pt.id], prof, fingerprint, threads)
        except PointInterrupted:
            return True
        finished(pt, status, rec, data)
    return False


def _run_pool(todo, configs, prof, fingerprint, threads, workers, finished):
    import concurrent.futures as cf
    import multiprocessing

    # spawn: no forked torch or thread state; every worker imports afresh.
    pool = cf.ProcessPoolExecutor(min(workers, len(todo)), multiprocessing.get_context("spawn"),
                                  initializer=_worker_init, initargs=(prof, fingerprint, threads))
    futures = {pool.submit(_pool_task, pt, configs[pt.id]): pt for pt in todo}
    stop = False
    try:
        for fut in cf.as_completed(futures):
            pt = futures[fut]
            try:
                status, rec, data = fut.result()
            except PointInterrupted:
                stop = True
                break
            except Exception as exc:  # the worker died (BrokenProcessPool): record, go on
                status, rec, data = "failed", {
                    "status": "failed", "error": f"{type(exc).__name__}: {exc}",
                    "point": {"id": pt.id, "params": pt.params, "config": pt.config}}, None
            finished(pt, status, rec, data)
    except KeyboardInterrupt:
        stop = True
    finally:
        if stop:
            # Running points are abandoned (their results would come too late
            # to keep); the executor has no public way to end its workers.
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.kill()
        pool.shutdown(wait=True, cancel_futures=True)
    return stop


def _ray_task(point, config, prof, fingerprint, threads):
    return _guarded(point, config, prof, fingerprint, threads)


def _run_ray(todo, configs, prof, fingerprint, threads, address, finished):
    try:
        import ray
    except ImportError:
        raise GridError("--ray needs Ray: pip install 'offload[ray]'") from None
    if not ray.is_initialized():
        try:
            ray.init(address=address, log_to_driver=False)
        except Exception as exc:  # ConnectionError, ValueError, RuntimeError by version
            raise GridError(f"--ray {address}: cannot connect ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    task = ray.remote(num_cpus=threads, max_retries=0)(_ray_task)
    prof_ref = ray.put(prof)
    refs = {task.remote(pt, configs[pt.id], prof_ref, fingerprint, threads): pt for pt in todo}
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            pt = refs[ready[0]]
            try:
                status, rec, data = ray.get(ready[0])
            except Exception as exc:  # the task or its worker died
                status, rec, data = "failed", {
                    "status": "failed", "error": f"{type(exc).__name__}: "
                                                 f"{str(exc).splitlines()[0] if str(exc) else ''}",
                    "point": {"id": pt.id, "params": pt.params, "config": pt.config}}, None
            finished(pt, status, rec, data)
    except KeyboardInterrupt:
        return True
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
    return False
