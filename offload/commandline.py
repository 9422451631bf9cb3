"""What the five commands share on the command line (torch-free).

``offload-sim``, ``offload-train``, ``offload-run``, ``offload-serve`` and
``offload-firmware`` each take what they need from here:

- ``fail`` and ``user_errors``: every refusal the user can cause (a ``ValueError``, which
  ``ScenarioError``, ``BlobError``, ``ConfigError``, ``KeyFileError`` and
  ``FirmwareError`` all are; an ``OSError``; a ``MemoryError``) as one
  ``Error: ...`` line (``click.ClickException``, exit status 1), never a traceback;
- ``require_torch``: the one message saying how to install the training extra;
- ``scenario_options`` and ``load_scenario``: the scenario's options (their
  defaults from ``offload.scenario.SETTINGS``) checked into one ``Scenario``;
- ``select_profile``: ``--profile PATH``, else ``--synthetic N``, else the
  committed ``artifacts/profile.npz``;
- ``threshold_policy_blob``: a threshold policy as a blob with the profile's
  metric pipeline (``offload-sim --write-blob``, ``offload-train fleet``);
- ``fit_thresholds`` and ``run_named_policy``: the user's ``--policy`` words
  (``mdp``, ``baseline`` or a policy blob file) run on test streams; kept
  here rather than in ``offload.simulate`` because they turn option words
  into runs and their refusals name the options (the runs themselves are
  ``simulate``'s plain functions);
- ``format_table`` / ``echo_table``: a results table as aligned text.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings

import click
import numpy as np

from offload.profile import TEST, TRAIN, read_profile
from offload.scenario import SETTINGS, Scenario, ScenarioError

__all__ = ["fail", "user_errors", "os_error_line", "require_torch", "TORCH_MISSING", "scenario_options",
           "load_scenario", "select_profile", "committed_profile", "COMMITTED_PROFILE",
           "fit_thresholds", "run_named_policy", "check_policy_names", "threshold_policy_blob",
           "format_table",
           "echo_table", "format_cell", "ray_option", "connect_ray", "RAY_MISSING"]

def ray_option(what):
    """The ``--ray ADDRESS`` option (into ``ray_address``): run ``what`` as tasks on a Ray cluster."""
    return click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
                        help=f"Run {what} as tasks on the Ray cluster at ADDRESS (e.g. "
                             "127.0.0.1:6379 or auto) instead; needs the ray extra.")


#: How to get Ray when ``--ray`` is given.
RAY_MISSING = "--ray needs Ray: pip install 'offload[ray]'"


def connect_ray(address):
    """The ``ray`` module, connected to the cluster at ``address`` (once per process).

    Raises ``ValueError`` with one line: Ray not installed (:data:`RAY_MISSING`),
    or the cluster cannot be reached.
    """
    try:
        import ray
    except ImportError:
        raise ValueError(RAY_MISSING) from None
    if not ray.is_initialized():
        try:
            ray.init(address=address, log_to_driver=False)
        except Exception as exc:  # ConnectionError, ValueError, RuntimeError by version
            raise ValueError(f"--ray {address}: cannot connect ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return ray


#: How to get torch when a training command needs it (README: install).
TORCH_MISSING = ("offload-train needs the training extra: pip install torch==2.13.0 "
                 "'offload[training]'")
#: The committed real profile, as reports and blobs name it (not this machine's path).
COMMITTED_PROFILE = "artifacts/profile.npz"


# --------------------------------------------------------------------------- errors


def fail(message):
    """Stop the command with one ``Error: message`` line (exit status 1)."""
    raise click.ClickException(str(message)) from None


def os_error_line(exc):
    """One line for an ``OSError``: ``FILE: reason``.

    An error raised with our own message (no ``strerror``; it names the file
    itself) is that message; a system error naming no file is ``I/O: reason``.
    """
    if exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    return f"I/O: {exc.strerror}" if exc.strerror else str(exc)


@contextlib.contextmanager
def user_errors(what=None, *, refusals=(), memory_hint=None):
    """Turn a refusal of the user's input into one click error line, never a traceback.

    Catches ``ValueError`` (the core's refusals name the parameters; every
    project error class is one), the extra exception classes in ``refusals``
    (e.g. the accelerator's ``RuntimeError``), ``OSError`` (``FILE: reason``)
    and ``MemoryError`` (``not enough memory``, then ``memory_hint``). The
    line is prefixed with ``what: `` when ``what`` is given.
    """
    prefix = f"{what}: " if what else ""
    try:
        yield
    except (ValueError, *refusals) as e:
        raise click.ClickException(f"{prefix}{e}") from None
    except OSError as e:
        raise click.ClickException(f"{prefix}{os_error_line(e)}") from None
    except MemoryError:
        hint = f"; {memory_hint}" if memory_hint else ""
        raise click.ClickException(f"{prefix}not enough memory{hint}") from None


def require_torch():
    """Import and return ``torch``, or stop with the install instructions (``TORCH_MISSING``)."""
    try:
        import torch
    except ImportError:
        raise click.ClickException(TORCH_MISSING) from None
    return torch


# --------------------------------------------------------------------------- scenario, profile


def scenario_options(command=None, *, bucket=True):
    """The options every simulation command shares: profile, bucket, image choice, arrivals, seed.

    Defaults from ``offload.scenario.SETTINGS``, the one place they are declared.
    ``@scenario_options(bucket=False)`` leaves out ``--rate`` and ``--depth``
    (the fleet commands choose every camera's bucket themselves).
    """
    if command is None:
        return lambda c: scenario_options(c, bucket=bucket)
    d = {k: v[0] for k, v in SETTINGS.items()}
    opts = [
        click.option("--profile", "profile_path", type=click.Path(dir_okay=False),
                     help="Profile .npz: this project's (offload.profile) or either published layout (MDP or DQN paper), told apart by its keys; default: a synthetic profile."),
        click.option("--synthetic", default=20000, type=click.IntRange(20),
                     help="Images in the synthetic profile when no --profile is given."),
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
    if bucket:  # after --profile and --synthetic, as they always were
        opts[2:2] = [
            click.option("--rate", default=d["rate"], type=float,
                         help="Token rate r (tokens per slot)."),
            click.option("--depth", default=d["depth"], type=float,
                         help="Bucket depth b (tokens)."),
        ]
    for opt in reversed(opts):
        command = opt(command)
    return command


def committed_profile():
    """Path of the committed real profile (``artifacts/profile.npz``, via ``offload.artifacts``), or ``None``."""
    from offload import artifacts

    return artifacts.find("profile.npz")


def select_profile(path, *, synthetic=None, seed=0, announce=False):
    """``(profile, label)``: ``--profile PATH``, else ``--synthetic N`` images, else the committed one.

    ``label`` names the profile for reports and blobs: ``PATH``,
    ``synthetic(N)`` or ``artifacts/profile.npz``. ``announce`` says on
    stderr that a synthetic profile is used. An unreadable profile, or no
    committed one when it is the choice, is a ``click.ClickException``.
    """
    if path is None and synthetic:
        from offload.synthetic import synthetic_profile

        if announce:
            click.echo(f"profile: synthetic ({synthetic} images, seed {seed}); "
                       "pass --profile for a real one", err=True)
        return synthetic_profile(synthetic, seed=seed), f"synthetic({synthetic})"
    label = path
    if path is None:
        path, label = committed_profile(), COMMITTED_PROFILE
        if path is None:
            raise click.ClickException(
                f"no --profile given and the committed {COMMITTED_PROFILE} was not found")
    # This project's profiles and both published layouts, told apart by their keys.
    with user_errors():
        return read_profile(path), label


def load_scenario(profile_path, synthetic, rate, depth, choice, spread, rprob, arrivals, markov,
                  seed):
    """Check the scenario options (one ``Scenario``) and load the profile (``select_profile``).

    Returns the ``offload.scenario.Scenario``, the profile, its standardised
    metrics (float32) and the train and test indices; every problem becomes a
    ``click.ClickException`` naming the option.
    """
    try:
        sc = Scenario(rate, depth, choice, spread, rprob, arrivals, tuple(markov), seed)
    except ScenarioError as e:
        option = {"bucket": f"--rate {rate} --depth {depth}",
                  "markov": f"--markov {' '.join(map(str, markov))}"}.get(e.field, f"--{e.field}")
        raise click.ClickException(f"{option}: {e}") from None
    prof, _ = select_profile(profile_path, synthetic=synthetic, seed=seed, announce=True)
    tr, te = prof.indices(TRAIN), prof.indices(TEST)
    if len(tr) < 2 or len(te) < 1:
        raise click.ClickException(f"profile needs training and test images "
                                   f"(has {len(tr)} train, {len(te)} test)")
    return sc, prof, prof.standardized_metric().astype(np.float32), tr, te


# --------------------------------------------------------------------------- policies


def check_policy_names(names, known, *, option="--policy"):
    """Refuse (``click.ClickException``) a policy word that is neither in ``known`` nor a file."""
    for name in names:
        if name not in known and not os.path.isfile(name):
            raise click.ClickException(f"{option} {name!r}: neither one of {', '.join(known)} "
                                       "nor an existing policy blob file")


def fit_thresholds(train_metric, train_reward, scenario, streams, *, mdp=True):
    """Threshold vectors by policy name: ``baseline`` and, with ``mdp``, ``mdp`` (SPEC section 5).

    ``train_metric`` standardised metrics of the training images, ``streams``
    the test streams (their mean inter-arrival time, slots, sets Baseline's
    rate). The MDP's value iteration is announced on stderr with its warnings.
    Refusals are ``click.ClickException``s prefixed with the policy name.
    """
    from offload import policies  # native: loaded only by the commands that simulate

    out = {}
    if mdp:
        click.echo("mdp: value iteration...", err=True)
        with user_errors("mdp"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            out["mdp"] = policies.mdp_thresholds(train_metric, train_reward, scenario.bucket,
                                                 interarrival=scenario.training_arrivals())
        for w in caught:
            click.echo(f"mdp: warning: {w.message}", err=True)
    with user_errors("baseline"):
        out["baseline"] = policies.baseline_threshold(train_metric, scenario.rate,
                                                      streams.mean_interarrival)
    return out


def run_named_policy(what, streams, scenario, *, thresholds, name=None, trace=False,
                     progress=False):
    """``(SimResult, thresholds or None)`` of policy ``what`` on ``streams``.

    ``what`` is a key of ``thresholds`` (from ``fit_thresholds``) or a policy
    blob file made for the scenario's bucket; ``name`` labels the result
    (default ``what``). A blob that cannot be read or was made for another
    bucket is a ``click.ClickException`` naming the file.
    """
    from offload import blob, simulate

    name = name or what
    bucket = scenario.bucket
    if what in thresholds:
        theta = thresholds[what]
        return simulate.run_thresholds(theta, streams, bucket, trace=trace, name=name), theta
    with user_errors():
        pol = blob.read_blob(what)
    if pol.bucket != bucket:
        raise click.ClickException(
            f"{what}: policy was made for bucket (N, P, M) = ({pol.N}, {pol.P}, {pol.M}), "
            f"this run uses ({bucket.N}, {bucket.P}, {bucket.M}) "
            f"(r={scenario.rate}, b={scenario.depth})")
    theta = pol.theta if pol.kind == "thresholds" else None
    return simulate.run_policy(pol, streams, trace=trace, name=name, progress=progress), theta


def threshold_policy_blob(prof, theta, bucket, name, meta):
    """A thresholds ``blob.Policy`` carrying the profile's metric pipeline.

    For ``offload-sim --write-blob`` and ``offload-train fleet``; a profile
    without an entropy->metric table is refused (``click.ClickException``).
    """
    from offload import blob, policies

    if prof.lut_x is None:
        raise click.ClickException(
            "the profile has no entropy->metric table (imported metrics only): "
            "the device could not compute metrics, so no blob is written")
    return blob.Policy("thresholds", *bucket, float(prof.metric_mean), float(prof.metric_std),
                       prof.lut_x, prof.lut_y, tinv=float(prof.tinv or 1.0),
                       theta=policies.threshold_vector(theta, bucket),
                       meta={"name": name, **meta})


# --------------------------------------------------------------------------- tables


def format_cell(v):
    """A table cell: floats to 4 decimals (``n/a`` for NaN), anything else as ``str``."""
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def format_table(rows, columns):
    """Lines of ``rows`` (dicts) under ``columns``, left-aligned, two spaces apart."""
    cells = [[format_cell(r[c]) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    return ["  ".join(c.ljust(w) for c, w in zip(columns, widths))] + \
        ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]


def echo_table(rows, columns):
    """Print ``format_table(rows, columns)`` on stdout."""
    for line in format_table(rows, columns):
        click.echo(line)
