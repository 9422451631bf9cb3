"""Sweep grids: what a grid is, the paper's ready-made ones, and the points a grid makes.

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
Every key and value is checked when the grid is read (``GridError``);
``training.sweep`` runs the points.

Units: ``rate`` tokens per slot, ``depth`` tokens, ``I1, I2`` slots,
``tprob1, tprob2`` per-slot probabilities.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os

from offload import scenario as _scenario_mod
from training.dqn.settings import DQNConfig, preset, resolve_interarrival, setting_info

__all__ = ["GRIDS", "SCALES", "GRID_SCALE", "DEPTHS_PAPER", "SCENARIO_KEYS", "CONFIG_KEYS",
           "PARAM_COLUMNS", "GridError", "Grid", "Part", "Point", "ready_grid", "load_toml",
           "load_grid", "grid_from_dict", "resolve", "point_scenario", "points", "scale_config"]

# --------------------------------------------------------------------------- the grids (data)

_BASE_BUCKET = {"rate": 0.1, "depth": 4.0}
_COMBINED = {"choice": "location-reset", "sp": 0.1, "rprob": 0.01, "arrivals": "markov",
             "I1": 1, "I2": 3, "tprob1": 0.001, "tprob2": 0.0005}
_LOG_STEPS = [10 ** e for e in (-3, -2.5, -2, -1.5, -1, -0.5)]
_LOG_STEPS_QUICK = [0.001, 0.01, 0.1, 10 ** -0.5]
#: The paper varies b "from 1 to 20" without listing its points; these are ours.
DEPTHS_PAPER = [1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 18, 20]


def _bucket_facets():
    """The (r, b) grid of Figs. 6 and 9, per scale (fresh dicts: grids are edited per run)."""
    return {"paper": [{"name": "bucket", "x": "depth",
                       "axes": {"rate": [0.05, 0.1, 0.25], "depth": list(DEPTHS_PAPER)}}],
            "quick": [{"name": "bucket", "x": "depth",
                       "axes": {"rate": [0.05, 0.1, 0.25], "depth": [2, 4, 10, 20]}}]}

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
        **_bucket_facets(),
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
        **_bucket_facets(),
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
GRID_SCALE = {"smoke": "quick", "quick": "quick", "paper": "paper"}

# --------------------------------------------------------------------------- point settings

_FIELDS = {f.name: f for f in dataclasses.fields(DQNConfig)}

#: Scenario settings of a point: (default, kind, check, help). The scenario's own
#: (``offload.scenario.SETTINGS``, declared there once) and those of a sweep point.
SCENARIO_KEYS = {
    **{k: v for k, v in _scenario_mod.SETTINGS.items() if k != "seed"},
    "tprob_ratio": (None, float, lambda v: v > 0,
                    "tprob1 / tprob2 > 0: sets tprob2 from tprob1 (instead of tprob2)"),
    "T": (_FIELDS["T"].default, int, setting_info(_FIELDS["T"])["bound"].holds,
          "history length T >= 2"),
    "interarrival": ("auto", (bool, str), lambda v: v in (True, False, "auto"),
                     "inter-arrival times as DQN inputs: true, false or \"auto\" "
                     "(on unless arrivals are periodic)"),
    "train_choice": (None, str, lambda v: v in _scenario_mod.CHOICES,
                     "image choice of the training sequences (default: choice); the test "
                     "always uses choice"),
    "seed": (None, int, *_scenario_mod.SETTINGS["seed"][2:3],
             _scenario_mod.SETTINGS["seed"][3] + " (default: --seed)"),
}
#: DQN settings a grid may change (the rest: the point's own, the scale's --threads, cpu).
CONFIG_KEYS = tuple(k for k in _FIELDS if k not in ("T", "interarrival", "threads", "device",
                                                    "seed"))
#: Columns of a point in the results table, in order (config keys a grid sets follow).
PARAM_COLUMNS = ("rate", "depth", "choice", "sp", "rprob", "arrivals", "I1", "I2", "tprob1",
                 "tprob2", "T", "interarrival", "train_choice", "seed")
#: The policies ``training.dqn.evaluate`` reports, in its order.


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
    return type(_FIELDS[key].default)


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
                           "part": copy.deepcopy(g[GRID_SCALE[scale]])}, name=name)


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
    s["interarrival"] = resolve_interarrival(s["interarrival"], s["arrivals"])
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
    name, over = SCALES[scale]
    p = point.params
    values = {**over, **point.config, "T": p["T"], "interarrival": p["interarrival"],
              "seed": p["seed"], "threads": int(threads), "device": "cpu"}
    try:
        return preset(name, **values)
    except ValueError as exc:
        raise GridError(f"point {point.id}: {exc}") from None
