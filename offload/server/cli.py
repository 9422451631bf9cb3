"""``offload-serve``: run the edge server, manage its API keys.

::

    offload-serve keys add camera-01 --keys keys.toml [--rate 0.1 --depth 4]   # prints the key
    offload-serve keys list --keys keys.toml
    offload-serve keys remove camera-01 --keys keys.toml
    offload-serve --keys keys.toml [--host 127.0.0.1] [--port 8080] [--model strong.onnx] ...

Every error the user can cause (missing or damaged key file, unknown model
file, port in use, bad option values) ends in one ``Error: ...`` line and a
non-zero exit code, never a traceback (``offload.commandline``).
"""

from __future__ import annotations

import logging
import os

import click

from offload import wire
from offload.commandline import fail, user_errors
from offload.server.app import DEFAULTS

DEFAULT_KEYS = "keys.toml"

_keys_option = click.option(
    "--keys", "keys_path", default=DEFAULT_KEYS, show_default=True, type=click.Path(dir_okay=False),
    help="Key file (TOML; only hashes of the keys are stored).")


@click.group(invoke_without_command=True)
@_keys_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535),
              help="TCP port (0: a free one, printed at start).")
@click.option("--model", "model_path", default=None, type=click.Path(dir_okay=False),
              help="Strong model, ONNX [default: the committed artifacts/strong.onnx].")
@click.option("--max-batch", default=DEFAULTS["max_batch"], show_default=True,
              type=click.IntRange(1), help="Most images per model call (1: no micro-batching).")
@click.option("--batch-window-ms", default=DEFAULTS["batch_window_ms"], show_default=True,
              type=click.FloatRange(0), help="Longest wait for a batch to fill, ms.")
@click.option("--max-queue", default=DEFAULTS["max_queue"], show_default=True,
              type=click.IntRange(1), help="Images waiting for the model before answering 503.")
@click.option("--max-body", default=wire.MAX_BODY_BYTES, show_default=True, type=click.IntRange(1),
              help="Largest request body, bytes (413 above).")
@click.option("--max-pixels", default=DEFAULTS["max_pixels"], show_default=True,
              type=click.IntRange(1),
              help="Largest picture, pixels (400 above; checked before decoding).")
@click.option("--top-k", default=DEFAULTS["top_k"], show_default=True, type=click.IntRange(1),
              help="Classes in each answer.")
@click.option("--slot-ms", default=200.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Time slot of the per-key token buckets, ms.")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0),
              help="ONNX Runtime CPU threads (0: its default, all cores).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@click.pass_context
def main(ctx, keys_path, host, port, model_path, max_batch, batch_window_ms, max_queue, max_body,
         max_pixels, top_k, slot_ms, threads, log_level):
    """Serve the strong classifier (POST /v1/classify, GET /healthz, GET /metrics).

    With no subcommand, serves until Ctrl+C. Create a key first with
    `offload-serve keys add NAME`. See docs/server.md.
    """
    if ctx.invoked_subcommand is not None:
        return
    from offload.server.app import create_app
    from offload.server.keys import KeyStore
    from offload.server.serve import ServerStartError, load_model, serve_forever

    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with user_errors():
        store = KeyStore.from_file(keys_path, slot_s=slot_ms / 1000.0)
    if len(store) == 0:
        fail(f"{keys_path} holds no keys, so every request would get 401; "
             f"add one with `offload-serve keys add NAME --keys {keys_path}`")
    if model_path is not None and not os.path.isfile(model_path):
        fail(f"model file {model_path} not found")
    with user_errors():  # ModelError is a ValueError
        model = load_model(model_path)
        if threads:
            from offload.server.model import StrongModel

            model = StrongModel(model.path, threads=threads)
        app = create_app(model, store, max_batch=max_batch, batch_window_ms=batch_window_ms,
                         max_queue=max_queue, max_body=max_body, max_pixels=max_pixels, top_k=top_k)

    def ready(url):
        limited = sum(1 for n in store.names if store.bucket(n) is not None)
        click.echo(f"offload-serve: {model.name} on {', '.join(model.providers)}; "
                   f"{len(store)} keys ({limited} rate-limited, {slot_ms:g} ms slots); "
                   f"micro-batches up to {max_batch} within {batch_window_ms:g} ms; "
                   f"listening on {url}", err=True)

    try:
        serve_forever(app, host, port, log_level=log_level, on_ready=ready)
    except ServerStartError as exc:
        fail(exc)
    except KeyboardInterrupt:
        # uvicorn has already shut down gracefully and re-raised the Ctrl+C
        # for us; a requested stop is not an error. (SIGTERM ends the
        # process by that signal, exit status 143, as services expect.)
        click.echo("offload-serve: stopped", err=True)


@main.group()
def keys():
    """Manage API keys: add, list, remove."""


@keys.command("add")
@click.argument("name")
@_keys_option
@click.option("--rate", type=float, default=None,
              help="Token-bucket rate of this key, tokens per slot (0 < rate < 1); with --depth.")
@click.option("--depth", type=float, default=None,
              help="Token-bucket depth, tokens (>= 1); with --rate.")
def keys_add(name, keys_path, rate, depth):
    """Create a key NAME (and the key file if needed); print the key on the last line.

    Only a SHA-256 hash is stored: the printed key cannot be shown again.
    """
    from offload.server.keys import add_key

    with user_errors():  # a KeyFileError is a ValueError
        key = add_key(keys_path, name, rate=rate, depth=depth)
    limit = f" with a bucket of rate {rate} tokens/slot, depth {depth}" if rate is not None else ""
    click.echo(f"added key {name!r}{limit} to {keys_path}; it is shown only now:", err=True)
    click.echo(key)


@keys.command("list")
@_keys_option
def keys_list(keys_path):
    """List the key names, creation times and buckets (never the keys)."""
    from offload.server.keys import read_key_file

    with user_errors():  # a KeyFileError is a ValueError
        entries = read_key_file(keys_path)
    if not entries:
        click.echo(f"{keys_path}: no keys", err=True)
    for e in entries.values():
        limit = f"rate={e.rate:g} depth={e.depth:g}" if e.limited else "unlimited"
        click.echo(f"{e.name}\t{e.created or '-'}\t{limit}")


@keys.command("remove")
@click.argument("name")
@_keys_option
def keys_remove(name, keys_path):
    """Remove the key NAME (a running server drops it within about a second)."""
    from offload.server.keys import remove_key

    with user_errors():  # a KeyFileError is a ValueError
        remove_key(keys_path, name)
    click.echo(f"removed key {name!r} from {keys_path}", err=True)


if __name__ == "__main__":  # pragma: no cover
    main(prog_name="offload-serve")
