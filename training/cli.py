"""``offload-train``: train, quantise and profile the weak/strong classifier pair.

Commands
--------
``offload-train classifiers``
    Read images (IDX files or a folder per class), split them, train the weak
    and strong CNNs, export the weak one as a full-int8 ``.tflite`` and the
    strong one as TorchScript, measure float / int8 / strong accuracy on the
    source's test set, write ``classifiers.json``.
``offload-train onnx``
    Export the strong model (rebuilt from the TorchScript file's weights) to
    ONNX for the edge server, check it against torch with ONNX Runtime on the
    test images, record its accuracy in ``classifiers.json``. ``classifiers``
    does this step too.
``offload-train profile``
    Run both exported models over the held-out images (the weak one through
    LiteRT, as the device does), write the profile ``.npz`` with its fitted
    metric, the section II breakdown (JSON), the Fig. 3 PNG and a demo clip.
``offload-train example-pair``
    Make a second pair with a zoo model's conventions (RGB images written as an
    ImageFolder tree, uint8 ``[-1, 1]`` weak input, mean/std centre-crop strong
    model, model cards, labels file): ``training.example_pair``.
``offload-train dqn``
    Train the DQN offloading policy (``training.dqn``) for one scenario and
    write it as a policy blob, with a JSON report and a validation curve.
``offload-train sweep``
    Train and evaluate a DQN at every point of a grid (``training.sweep``):
    the paper's evaluation figures or a TOML grid; one results table.
``offload-train plot``
    Figures of a sweep's results table in the paper's style
    (``training.figures``).
``offload-train table``
    The markdown tables of the docs from sweeps' results tables
    (``training.tables``): losses, shares of the metric oracle's, belief
    policy's and ceiling's gains, the DQN < MDP < Baseline ordering against
    the sampling noise, training time.
``offload-train trace``
    Two policies' decisions on one simulated stream (the paper's Figs. 7, 10, 11).
``offload-train fleet``
    Provision K cameras behind one link (``training.fleet_command``): each
    camera's bucket and policy blob, and the server's key and switch lines.

Every error the user can cause (missing data, malformed IDX, wrong model file)
ends in one ``click`` error message, no traceback.
"""

from __future__ import annotations

import os

import click
from tqdm import tqdm

from offload.atomic import atomic_write_json
from offload.commandline import (COMMITTED_PROFILE, committed_profile, echo_table, fail,
                                 load_scenario, require_torch, scenario_options)
from training.example_pair import example_pair
from training.figure_commands import plot, sweep, table, trace
from training.fleet_command import fleet
from training.pair_commands import classifiers, onnx, profile


@click.group()
def main():
    """Train, quantise and profile the weak/strong classifier pair (workstation, torch)."""


for _command in (classifiers, onnx, profile, example_pair, sweep, plot, table, trace, fleet):
    main.add_command(_command)


# --------------------------------------------------------------------------- dqn


def _outputs(out):
    base = os.path.splitext(out)[0]
    return base + ".json", base + ".png", base + ".ckpt"


def _setting_option(field, preset_keys):
    """The click option of one ``DQNConfig`` field, from its declaration (``dqn.settings``).

    A field some preset sets defaults to ``None``: not given, it keeps the
    preset's value. The others default to the field's value (or the
    command line's own default word, e.g. ``auto``), shown in ``--help``.
    """
    from training.dqn.settings import setting_info

    info = setting_info(field)
    flags = info["flags"] or ("--" + field.name.replace("_", "-"),)
    words = list(info["choices"] or ())
    if info["auto"]:
        words.insert(0, info["auto"])
    bound = info["bound"]
    if words:
        kind = click.Choice(words)
    elif bound is not None:
        rng = click.IntRange if isinstance(field.default, int) else click.FloatRange
        kind = rng(bound.lo, bound.hi, min_open=bound.lo_open, max_open=bound.hi_open)
    else:
        kind = type(field.default)
    default = info["cli_default"]
    if default is None and field.name not in preset_keys:
        default = {v: w for w, v in (info["choices"] or {}).items()}.get(field.default,
                                                                         field.default)
    return click.option(*flags, field.name, type=kind, default=default,
                        show_default=default is not None, help=info["help"])


def _dqn_options(command):
    """The preset, output and run options, then one option per ``DQNConfig`` setting.

    The settings' options are generated from ``DQNConfig``'s declarations
    (help, bounds, choices, names): ``None`` (not given) keeps the preset's value.
    """
    import dataclasses

    from training.dqn.settings import PRESETS, DQNConfig, setting_info

    preset_keys = {k for values in PRESETS.values() for k in values}
    opts = [
        click.option("--preset", type=click.Choice(list(PRESETS)), default="quick",
                     show_default=True,
                     help="quick: the quality bar in under 10 minutes on 2 cores; paper: the "
                          "published schedule (4,000 iterations, ~6.55e7 tuples)."),
        click.option("--out", "out", default="dqn.bin", show_default=True,
                     type=click.Path(dir_okay=False),
                     help="Policy blob to write; the report (.json), validation curve (.png) "
                          "and checkpoint (.ckpt) go beside it."),
        *[_setting_option(f, preset_keys) for f in dataclasses.fields(DQNConfig)
          if setting_info(f)["cli"]],
        click.option("--checkpoint", type=click.Path(dir_okay=False),
                     help="Checkpoint file (default: beside --out, .ckpt)."),
        click.option("--resume", is_flag=True, help="Continue from the checkpoint."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    for opt in reversed(opts):
        command = opt(command)
    return command


def _config_values(settings, arrivals):
    """``DQNConfig`` overrides from the generated options' values (words -> values)."""
    import dataclasses

    from training.dqn.settings import DQNConfig, resolve_interarrival, setting_info

    values = {}
    for f in dataclasses.fields(DQNConfig):
        if f.name not in settings:
            continue
        v, choices = settings[f.name], setting_info(f)["choices"]
        if f.name == "interarrival":
            v = resolve_interarrival(v if v == "auto" else choices[v], arrivals)
        elif choices and v is not None:
            v = choices[v]
        values[f.name] = v
    return values


class _DQNConsole:
    """``offload-train dqn``'s progress bars and messages (a ``training.dqn.Hooks``)."""

    def __init__(self, quiet, checkpoint):
        self.quiet, self.checkpoint = quiet, checkpoint
        self.bar = self.tbar = None
        self.last_val = float("nan")

    def started(self, trainer, resumed):
        if resumed:
            click.echo(f"resumed from {self.checkpoint} at iteration {trainer.iteration}",
                       err=True)
        click.echo(f"validation: MDP {trainer.val_mdp:.5f}, Baseline {trainer.val_base:.5f} "
                   f"reward per image", err=True)
        self.bar = tqdm(total=trainer.cfg.iterations, initial=trainer.iteration, unit="it",
                        desc="dqn", disable=True if self.quiet else None, dynamic_ncols=True)

    def iteration(self, p):
        if p.val_dqn == p.val_dqn:
            self.last_val = p.val_dqn
        self.bar.set_postfix_str(f"loss {p.loss:.4g} lr {p.lr:.1e} val dqn {self.last_val:.5f} "
                                 f"mdp {p.val_mdp:.5f}", refresh=False)
        self.bar.update(1)

    def trained(self, trainer):
        self.bar.close()
        click.echo(f"training: {trainer.stopped_by} after {trainer.iteration} iterations, "
                   f"{trainer.train_seconds:.0f} s; best validation {trainer.best_val:.5f} at "
                   f"iteration {trainer.best_iteration}", err=True)

    def tuning(self, i, n, val):
        if self.tbar is None:
            self.tbar = tqdm(total=n, unit="it", desc="int8 tuning",
                             disable=True if self.quiet else None, dynamic_ncols=True)
        if val == val:
            self.tbar.set_postfix_str(f"val dqn {val:.5f}", refresh=False)
        self.tbar.update(1)

    def tuned(self, t):
        if self.tbar is not None:
            self.tbar.close()
        click.echo(f"int8 tuning: {t['iterations']} iterations, {t['seconds']:.0f} s; validation "
                   f"{t['val_before']:.5f} trained, {t['val_rounded']:.5f} with weights rounded, "
                   f"{t['val_best']:.5f} best on the grid (iteration {t['best_iteration']})",
                   err=True)

    def testing(self):
        click.echo("test: running every policy on the test split...", err=True)


def _echo_test_table(rows, extra):
    cols = ["policy", "avg_loss", "mean_reward", "offload_rate", "share_of_oracle-metric_gain",
            "share_of_belief_gain", "share_of_ceiling_gain"]
    echo_table(rows, cols)
    a = extra["int8_agreement"]
    click.echo(f"int8 vs float: {100 * a['n_ge_P']:.2f}% of decisions with n >= P agree "
               f"({100 * a['all']:.2f}% of all); avg loss int8 - float = "
               f"{extra['int8_minus_float_avg_loss']:+.5f}")


def _dqn_profile(profile_path):
    """``(path to load, label for the blob and report)``: the committed profile by default."""
    from click.core import ParameterSource

    synthetic_asked = (click.get_current_context().get_parameter_source("synthetic")
                       == ParameterSource.COMMANDLINE)
    if profile_path is not None or synthetic_asked:  # --synthetic N alone: a synthetic profile
        return profile_path, profile_path
    path = committed_profile()
    if path is None:
        fail(f"no --profile given and the committed {COMMITTED_PROFILE} was not found")
    # The blob's provenance names the committed profile, not this machine's path to it.
    return path, COMMITTED_PROFILE


@main.command()
@scenario_options
@_dqn_options
def dqn(profile_path, synthetic, rate, depth, choice, spread, rprob, arrivals, markov, seed,
        preset, out, checkpoint, resume, quiet, **settings):
    """Train a DQN offloading policy and write it as a policy blob.

    Trains on the profile's training images (validating on its validation
    split, or on a held-out share of training when it has none), then reports
    every policy on the test split. Without --profile it uses the committed
    Fashion-MNIST profile (with --synthetic N alone, a synthetic profile of N
    images). Ctrl+C stops cleanly and keeps the best policy.
    """
    require_torch()
    from training import dqn as D

    profile_path, profile_label = _dqn_profile(profile_path)
    scenario, prof, _, _, _ = load_scenario(profile_path, synthetic, rate, depth, choice, spread,
                                            rprob, arrivals, markov, seed)
    try:
        cfg = D.preset(preset, **_config_values(settings, arrivals), seed=seed)
        data = D.prepare_data(prof, cfg.holdout, seed)
    except ValueError as exc:
        fail(exc)
    report_path, png_path, default_ckpt = _outputs(out)
    checkpoint = checkpoint or default_ckpt
    if not resume and os.path.exists(checkpoint):
        fail(f"{checkpoint} exists from an earlier run: add --resume to continue it, "
              "or remove it to start over")
    click.echo(f"dqn: bucket r={rate} b={depth} -> {scenario.bucket}; {choice}, "
               f"{arrivals} arrivals; T={cfg.T}, inter-arrival inputs "
               f"{'on' if cfg.interarrival else 'off'}; preset {preset}; validation on the "
               f"{data.val_source}", err=True)
    meta = {"name": "dqn", "rate": rate, "depth": depth,
            "profile": profile_label or f"synthetic({synthetic})", "choice": choice,
            "arrivals": arrivals}
    files = {"policy": out, "curve_png": png_path, "checkpoint": checkpoint}
    try:
        run = D.train_policy(data, scenario, cfg, prof, meta=meta, checkpoint=checkpoint,
                             resume=resume, blob_path=out, progress=not quiet,
                             provenance={"profile_path": profile_label, "preset": preset,
                                         "files": files},
                             hooks=_DQNConsole(quiet, checkpoint))
    except D.TestInterrupted:
        click.echo(f"interrupted during the test report: {out} holds the trained policy; the "
                   "same command plus --resume continues from the checkpoint and then reports",
                   err=True)
        raise SystemExit(130) from None
    except ValueError as exc:  # bad generator parameters, damaged or mismatched checkpoint
        fail(exc)
    atomic_write_json(report_path, run.report)
    D.plot_curve(run.trainer, png_path, title=f"DQN validation: {choice}, {arrivals} arrivals, "
                                              f"r={rate}, b={depth}")
    if run.rows:
        _echo_test_table(run.rows, run.extra)
    click.echo(f"wrote {out}, {report_path}, {png_path}; checkpoint {checkpoint}", err=True)
    if run.interrupted:
        click.echo("interrupted: the blob holds the best policy so far; continue with the same "
                   "command plus --resume", err=True)
        raise SystemExit(130)


if __name__ == "__main__":  # pragma: no cover
    main(prog_name="offload-train")
