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
``offload-train dqn``
    Train the DQN offloading policy (``training.dqn``) for one scenario and
    write it as a policy blob, with a JSON report and a validation curve.
``offload-train sweep``
    Train and evaluate a DQN at every point of a grid (``training.sweep``):
    the paper's evaluation figures or a TOML grid; one results table.
``offload-train plot``
    Figures of a sweep's results table in the paper's style
    (``training.figures``).
``offload-train trace``
    Two policies' decisions on one simulated stream (the paper's Figs. 7, 10, 11).

Every error the user can cause (missing data, malformed IDX, wrong model file)
ends in one ``click`` error message, no traceback.
"""

from __future__ import annotations

import os
import time

import click
from tqdm import tqdm

from offload.atomic import atomic_write_json
from offload.commandline import (committed_profile, fail as _fail, require_torch,
                                 scenario_options)
from training.figure_commands import plot, sweep, trace
from training.pair_commands import classifiers, onnx, profile


@click.group()
def main():
    """Train, quantise and profile the weak/strong classifier pair (workstation, torch)."""


for _command in (classifiers, onnx, profile, sweep, plot, trace):
    main.add_command(_command)


# --------------------------------------------------------------------------- dqn


def _outputs(out):
    base = os.path.splitext(out)[0]
    return base + ".json", base + ".png", base + ".ckpt"


def _dqn_options(command):
    """Network, schedule and data options; ``None`` keeps the preset's value."""
    opts = [
        click.option("--preset", type=click.Choice(["quick", "paper"]), default="quick",
                     show_default=True,
                     help="quick: the quality bar in under 10 minutes on 2 cores; paper: the "
                          "published schedule (4,000 iterations, ~6.55e7 tuples)."),
        click.option("--out", "out", default="dqn.bin", show_default=True,
                     type=click.Path(dir_okay=False),
                     help="Policy blob to write; the report (.json), validation curve (.png) "
                          "and checkpoint (.ckpt) go beside it."),
        click.option("-T", "--history", "T", type=click.IntRange(2), default=97, show_default=True,
                     help="History length T: the input holds T-1 metrics (and T-1 "
                          "inter-arrival times)."),
        click.option("--interarrival", type=click.Choice(["auto", "on", "off"]), default="auto",
                     show_default=True,
                     help="Inter-arrival times as inputs; auto: on unless arrivals are periodic."),
        click.option("--layers", type=click.IntRange(1), default=5, show_default=True,
                     help="Hidden layers."),
        click.option("--width", type=click.IntRange(1), default=64, show_default=True,
                     help="Units per hidden layer."),
        click.option("--discount", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                     default=0.9999, show_default=True, help="Discount g."),
        click.option("--shift", type=click.Choice(["batch", "row"]), default=None,
                     help="Targets less the mean of the whole batch (SPEC section 6, the "
                          "published code; the paper preset's) or of each tuple's own row "
                          "(the quick preset's); see docs/dqn.md."),
        click.option("--act-bits", type=click.Choice(["auto", "8", "16"]), default="auto",
                     show_default=True,
                     help="Activation width of the device network (weights are int8 either "
                          "way); auto: 16 unless a layer has over 516 inputs, then 8."),
        click.option("--ema", type=click.FloatRange(0, 1, max_open=True), default=None,
                     help="Validate (and keep) an exponential average of the weights, this "
                          "decay per iteration (0: the weights themselves)."),
        click.option("--int8-tune", type=click.IntRange(0), default=None,
                     help="Iterations of quantisation-aware tuning after training, weights "
                          "held on the int8 grid (0: none)  [default: 200]"),
        click.option("--targets", type=click.Choice(["q", "ceiling"]), default=None,
                     help="q: Q-learning (SPEC section 6; the paper preset's); ceiling: "
                          "regression on the structure-aware ceiling's Q-values at the "
                          "generator's hidden state (the quick preset's; not SPEC, see "
                          "docs/dqn.md)."),
        click.option("--val-reward", type=click.Choice(["true", "expected"]), default=None,
                     help="What validation scores policies by: true rewards, or expected "
                          "ones (each offloaded image's metric; less noisy; the quick "
                          "preset's)."),
        click.option("--lr", type=float, help="Initial Adam learning rate."),
        click.option("--lr-decay", type=float,
                     help="Factor applied to the learning rate when validation stops improving."),
        click.option("--lr-min", type=float,
                     help="Stop once the learning rate would fall below this."),
        click.option("--patience", type=int,
                     help="Validations without improvement before the learning rate decays."),
        click.option("--batch", type=int, help="Tuples per Adam step."),
        click.option("--steps", type=int, help="Adam steps per Q-iteration (target frozen)."),
        click.option("--iterations", type=int, help="Q-iterations at most."),
        click.option("--time-limit", type=float,
                     help="Stop training after this many seconds (0: no limit)."),
        click.option("--validate-every", type=int, help="Q-iterations between validations."),
        click.option("--train-streams", type=int, help="Training sequences."),
        click.option("--train-length", type=int, help="Images per training sequence."),
        click.option("--val-streams", type=int, help="Validation sequences."),
        click.option("--val-length", type=int, help="Images per validation sequence."),
        click.option("--test-streams", type=int, help="Test sequences of the final report."),
        click.option("--test-length", type=int, help="Images per test sequence."),
        click.option("--threads", type=click.IntRange(0), default=0, show_default=True,
                     help="torch CPU threads (0: all cores)."),
        click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="auto",
                     show_default=True, help="Where torch trains (auto: CUDA when present)."),
        click.option("--checkpoint", type=click.Path(dir_okay=False),
                     help="Checkpoint file (default: beside --out, .ckpt)."),
        click.option("--resume", is_flag=True, help="Continue from the checkpoint."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    for opt in reversed(opts):
        command = opt(command)
    return command


@main.command()
@scenario_options
@_dqn_options
def dqn(profile_path, synthetic, rate, depth, choice, spread, rprob, arrivals, markov, seed,
        preset, out, T, interarrival, layers, width, discount, shift, targets, act_bits, ema,
        int8_tune, val_reward, lr, lr_decay, lr_min,
        patience, batch, steps, iterations, time_limit, validate_every, train_streams, train_length,
        val_streams, val_length, test_streams, test_length, threads, device, checkpoint, resume,
        quiet):
    """Train a DQN offloading policy and write it as a policy blob.

    Trains on the profile's training images (validating on its validation
    split, or on a held-out share of training when it has none), then reports
    every policy on the test split. Without --profile it uses the committed
    Fashion-MNIST profile (with --synthetic N alone, a synthetic profile of N
    images). Ctrl+C stops cleanly and keeps the best policy.
    """
    require_torch()
    from offload.commandline import load_scenario
    from training import dqn as D

    from click.core import ParameterSource

    synthetic_asked = (click.get_current_context().get_parameter_source("synthetic")
                       == ParameterSource.COMMANDLINE)
    profile_label = profile_path
    if profile_path is None and not synthetic_asked:  # --synthetic N alone: a synthetic profile
        profile_path = committed_profile()
        # The blob's provenance names the committed profile, not this machine's path to it.
        profile_label = "artifacts/profile.npz"
        if profile_path is None:
            _fail("no --profile given and the committed artifacts/profile.npz was not found")
    scenario, prof, _, _, _ = load_scenario(profile_path, synthetic, rate, depth, choice, spread,
                                            rprob, arrivals, markov, seed)
    use_ia = {"on": True, "off": False, "auto": arrivals != "periodic"}[interarrival]
    try:
        cfg = D.preset(preset, T=T, interarrival=use_ia, layers=layers, width=width,
                       discount=discount, shift=shift, targets=targets, val_reward=val_reward,
                       act_bits={"auto": 0, "8": 8, "16": 16}[act_bits], int8_tune=int8_tune,
                       ema=ema, lr=lr, lr_decay=lr_decay, lr_min=lr_min,
                       patience=patience, batch=batch, steps=steps, iterations=iterations,
                       time_limit=time_limit, validate_every=validate_every,
                       train_streams=train_streams, train_length=train_length,
                       val_streams=val_streams, val_length=val_length, test_streams=test_streams,
                       test_length=test_length, threads=threads, device=device, seed=seed)
        data = D.prepare_data(prof, cfg.holdout, seed)
    except ValueError as exc:
        _fail(exc)
    report_path, png_path, default_ckpt = _outputs(out)
    checkpoint = checkpoint or default_ckpt
    if not resume and os.path.exists(checkpoint):
        _fail(f"{checkpoint} exists from an earlier run: add --resume to continue it, "
              "or remove it to start over")
    t0 = time.time()
    click.echo(f"dqn: bucket r={rate} b={depth} -> {scenario.bucket}; {choice}, "
               f"{arrivals} arrivals; T={cfg.T}, inter-arrival inputs {'on' if use_ia else 'off'}; "
               f"preset {preset}; validation on the {data.val_source}", err=True)
    try:
        trainer = D.Trainer(data, scenario, cfg, D.profile_fingerprint(prof), checkpoint=checkpoint)
        if resume:
            trainer.restore(checkpoint)
            click.echo(f"resumed from {checkpoint} at iteration {trainer.iteration}", err=True)
    except ValueError as exc:  # bad generator parameters, damaged or mismatched checkpoint
        _fail(exc)
    click.echo(f"validation: MDP {trainer.val_mdp:.5f}, Baseline {trainer.val_base:.5f} "
               f"reward per image", err=True)

    bar = tqdm(total=cfg.iterations, initial=trainer.iteration, unit="it", desc="dqn",
               disable=True if quiet else None, dynamic_ncols=True)
    last = {"dqn": float("nan")}

    def show(p):
        if p.val_dqn == p.val_dqn:
            last["dqn"] = p.val_dqn
        bar.set_postfix_str(f"loss {p.loss:.4g} lr {p.lr:.1e} val dqn {last['dqn']:.5f} "
                            f"mdp {p.val_mdp:.5f}", refresh=False)
        bar.update(1)

    layers_f = trainer.run(show)
    bar.close()
    click.echo(f"training: {trainer.stopped_by} after {trainer.iteration} iterations, "
               f"{trainer.train_seconds:.0f} s; best validation {trainer.best_val:.5f} at "
               f"iteration {trainer.best_iteration}", err=True)
    interrupted = trainer.stopped_by.startswith("stopped by")
    if interrupted or not cfg.int8_tune:
        # Stopped by a signal: keep the best policy now, without tuning.
        qmlp = trainer.quantize(layers_f)
    else:
        tbar = tqdm(total=cfg.int8_tune, unit="it", desc="int8 tuning",
                    disable=True if quiet else None, dynamic_ncols=True)

        def tshow(i, n, val):
            if val == val:
                tbar.set_postfix_str(f"val dqn {val:.5f}", refresh=False)
            tbar.update(1)

        layers_f, qmlp = trainer.int8_policy(tshow)
        tbar.close()
        t = trainer.int8_tuning
        click.echo(f"int8 tuning: {t['iterations']} iterations, {t['seconds']:.0f} s; validation "
                   f"{t['val_before']:.5f} trained, {t['val_rounded']:.5f} with weights rounded, "
                   f"{t['val_best']:.5f} best on the grid (iteration {t['best_iteration']})",
                   err=True)
        if t["stopped_by"]:  # a signal during the tuning: keep what there is, no test
            trainer.stopped_by = t["stopped_by"]
            interrupted = True
    meta = {"name": "dqn", "rate": rate, "depth": depth,
            "profile": profile_label or f"synthetic({synthetic})", "choice": choice,
            "arrivals": arrivals, "iterations": trainer.iteration,
            "best_iteration": trainer.best_iteration}
    policy = D.policy_blob(prof, scenario, cfg, qmlp, meta)
    from offload import blob

    blob.write_blob(out, policy)
    rows, extra = (None, None)
    if not interrupted:
        click.echo("test: running every policy on the test split...", err=True)
        try:
            rows, extra = D.evaluate(trainer, layers_f, qmlp, rate, progress=not quiet)
        except KeyboardInterrupt:
            click.echo(f"interrupted during the test report: {out} holds the trained policy; "
                       "the same command plus --resume continues from the checkpoint and "
                       "then reports",
                       err=True)
            raise SystemExit(130) from None
    report = D.report(trainer, prof, profile_label or profile_path, preset, rows, extra, out,
                      png_path, checkpoint, time.time() - t0)
    atomic_write_json(report_path, report)
    D.plot_curve(trainer, png_path, title=f"DQN validation: {choice}, {arrivals} arrivals, "
                                          f"r={rate}, b={depth}")
    if rows:
        cols = ["policy", "avg_loss", "mean_reward", "offload_rate", "share_of_oracle-metric_gain",
                "share_of_ceiling_gain"]
        cells = [[f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
                 for r in rows]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
        click.echo("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
        for row in cells:
            click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)))
        a = extra["int8_agreement"]
        click.echo(f"int8 vs float: {100 * a['n_ge_P']:.2f}% of decisions with n >= P agree "
                   f"({100 * a['all']:.2f}% of all); avg loss int8 - float = "
                   f"{extra['int8_minus_float_avg_loss']:+.5f}")
    click.echo(f"wrote {out}, {report_path}, {png_path}; checkpoint {checkpoint}", err=True)
    if interrupted:
        click.echo("interrupted: the blob holds the best policy so far; continue with the same "
                   "command plus --resume", err=True)
        raise SystemExit(130)


if __name__ == "__main__":  # pragma: no cover
    main(prog_name="offload-train")
