"""``offload-run``: the device loop from the command line.

Every key of ``offload.device.config.KEYS`` (declared once on ``RunConfig``)
is a flag (``--slot-ms 200``) and a TOML key (``--config run.toml``); a flag
overrides the file. Example::

    offload-run --video clip.avi --server http://127.0.0.1:8080 --key-file cam1.key \\
                --policy policy.bin --log frames.jsonl

Bad input gives one ``Error: ...`` line and exit status 1 (2 for a malformed
flag, as click does), never a traceback. After a SIGINT/SIGTERM the run drains,
prints its summary and exits with 128 + the signal number.

``--demo`` (``offload.device.demo.open_demo``) starts an edge server in-process
and runs the loop over the committed demo clip; the demo module does not
import this one.
"""

from __future__ import annotations

import signal
import sys

import click

from offload.commandline import user_errors
from offload.device.config import KEYS, ConfigError, load_toml, make_config

__all__ = ["main", "execute", "device_errors", "build_config", "config_options"]


def device_errors():
    """Every refusal of the loop as one ``Error: ...`` line (``offload.commandline.user_errors``).

    ``ValueError`` (config, source, blob, classifier, wire errors) and
    ``OSError`` (a log path that cannot be written), plus the ``RuntimeError``s
    of the accelerator, the watchdog and the demo.
    """
    from offload.classifier import EdgeTPUUnavailable
    from offload.device.demo import DemoError
    from offload.device.weak import WatchdogError

    return user_errors(refusals=(EdgeTPUUnavailable, WatchdogError, DemoError))


def config_options(command):
    """Add one ``--<key>`` option per declared key (``None`` = not given; ``make_config`` validates)."""
    for k in reversed(KEYS):
        shown = k.default_text
        text = k.help if shown is None else f"{k.help} [default: {shown}]"
        if k.type is bool:
            opt = click.option(f"--{k.name}/--no-{k.name}", default=None, help=text)
        else:
            # strings stay strings for choices: make_config's message names the key
            opt = click.option(f"--{k.name}", type=k.type, default=None, help=text)
        command = opt(command)
    return command


def build_config(config_file, flags):
    """A validated ``RunConfig`` from an optional TOML file and the flags given (None = not given)."""
    file_values = load_toml(config_file) if config_file else {}
    return make_config(file_values, {k: v for k, v in flags.items() if v is not None})


def execute(cfg, *, stream=None, complete=None):
    """Run the loop for ``cfg``, print the summary; returns the exit status (0, or 128+signal).

    ``complete(summary)``, when given, may add to the summary before it is printed.
    """
    from offload.device.loop import run
    from offload.device.status import format_summary

    out = stream or sys.stdout
    with device_errors():
        summary = run(cfg, status_stream=sys.stderr,
                      echo=lambda m: click.echo(m, err=True))
        if complete is not None:
            complete(summary)
    click.echo(format_summary(summary), file=out)
    if summary.get("log"):
        click.echo(f"frame log: {summary['log']}", file=out)
    if summary.get("signal"):
        return 128 + int(signal.Signals[summary["signal"]])
    return 0


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--demo", is_flag=True,
              help="Run the whole system here: an edge server on loopback (committed strong "
                   "model, throw-away key) and the device over the committed demo clip "
                   "(200 test images at 5 frames/s, about 45 s) with the committed weak model "
                   "and policy; prints the summary. Other flags still apply (--no-realtime, "
                   "--log, --policy, ...).")
@click.option("--config", "config_file", type=str, default=None,
              help="TOML file with any of the keys below (a flag overrides it).")
@config_options
def main(demo, config_file, **flags):
    """Classify frames on the device and offload some to the edge server under a token bucket.

    Give one frame source (--video, --images, --camera, --picamera). Without
    --server the run is local-only: the policy decides, nothing is sent.
    Try `offload-run --demo` first.
    """
    flags = {k.replace("_", "-"): v for k, v in flags.items()}
    if demo:
        if config_file:
            raise click.ClickException("--demo takes flags, not --config")
        sys.exit(_run_demo(flags))
    with device_errors():
        cfg = build_config(config_file, flags)
        if cfg.source[0] is None:
            raise ConfigError("no frame source: give one of --video, --images, --camera, "
                              "--picamera (or the same key in --config)")
    sys.exit(execute(cfg))


def _run_demo(flags):
    """``--demo``: the loop against an in-process server (``offload.device.demo``); exit status."""
    from offload.device.demo import open_demo

    with device_errors(), open_demo(flags) as demo:
        click.echo(demo.banner, err=True)
        return execute(build_config(None, demo.values), complete=demo.complete)
