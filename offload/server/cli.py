"""``offload-serve``: run the edge server, manage its API keys.

::

    offload-serve keys add camera-01 --keys keys.toml [--rate 0.1 --depth 4] [--switch uplink]
    offload-serve keys switch add uplink --rate 1.2 --depth 16 --keys keys.toml   # a shared link
    offload-serve keys switch list --keys keys.toml
    offload-serve keys switch remove uplink --keys keys.toml [--detach]
    offload-serve keys list --keys keys.toml
    offload-serve keys rotate camera-01 --keys keys.toml [--overlap 24h]   # prints the new key
    offload-serve keys revoke camera-01 --keys keys.toml
    offload-serve keys remove camera-01 --keys keys.toml
    offload-serve --keys keys.toml [--host 127.0.0.1] [--port 8080] [--model strong.onnx] ...
    offload-serve --keys keys.toml --state redis://127.0.0.1:6379/0   # replicas share the buckets
    offload-serve tls init tls/ --server-name edge.lan --ip 10.0.0.2 --devices cam1,cam2
    offload-serve --keys keys.toml --host 0.0.0.0 --tls-cert tls/server.pem --tls-key tls/server.key

Every error the user can cause (missing or damaged key file, unknown model
file, port in use, bad option values) ends in one ``Error: ...`` line and a
non-zero exit code, never a traceback (``offload.commandline``).
"""

from __future__ import annotations

import logging
import os
import time

import click

from offload import wire
from offload.commandline import fail, user_errors
from offload.server.app import DEFAULTS
from offload.server.guard import Limits
from offload.server.keyfile import DEFAULT_OVERLAP
from offload.server.state import DEFAULT_FAILURE, DEFAULT_TIMEOUT_MS, FAILURE_MODES

_LIMITS = Limits()

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
@click.option("--model-name", default=None,
              help="Name of the model on the Open Inference Protocol (v2) endpoints, "
                   "/v2/models/NAME [default: the model file's stem, e.g. strong].")
@click.option("--card", "card_path", default=None, type=click.Path(dir_okay=False),
              help="Model card (TOML) overriding what the model declares: input size, colour "
                   "order, mean/std, resize mode, labels (docs/classifiers.md, \"Model card\").")
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
@click.option("--top-k", default=DEFAULTS["top_k"], show_default=True,
              type=click.IntRange(1, wire.MAX_TOP_ITEMS),
              help="Classes in each answer (at most what a device accepts in one answer).")
@click.option("--slot-ms", default=200.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Time slot of the per-key token buckets, ms.")
@click.option("--state", "state_url", default=None, metavar="URL",
              help="Keep every key bucket and switch in Redis (redis://HOST:PORT/DB), shared "
                   "by all replicas [default: in this process].")
@click.option("--state-timeout-ms", default=DEFAULT_TIMEOUT_MS, show_default=True,
              type=click.FloatRange(0, min_open=True),
              help="Longest wait for Redis per request, ms; then --state-failure decides.")
@click.option("--state-failure", default=DEFAULT_FAILURE, show_default=True,
              type=click.Choice(FAILURE_MODES),
              help="Redis unreachable: open = this replica's own buckets decide; "
                   "closed = refuse (503).")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0),
              help="ONNX Runtime CPU threads (0: its default, all cores).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@click.option("--tls-cert", type=click.Path(dir_okay=False), default=None,
              help="Serve HTTPS with this PEM certificate (chain); with --tls-key.")
@click.option("--tls-key", type=click.Path(dir_okay=False), default=None,
              help="The PEM private key of --tls-cert.")
@click.option("--tls-client-ca", type=click.Path(dir_okay=False), default=None,
              help="Require a client certificate from this CA, whose CN is the key's name "
                   "(in addition to the bearer key).")
@click.option("--head-timeout", default=_LIMITS.head_timeout, show_default=True,
              type=click.FloatRange(0, min_open=True),
              help="Seconds from connect (TLS handshake included) or a next request's first "
                   "byte to its complete head; then 408 and close.")
@click.option("--body-timeout", default=_LIMITS.body_timeout, show_default=True,
              type=click.FloatRange(0, min_open=True),
              help="Seconds from the complete head to the complete body; then 408 and close.")
@click.option("--keep-alive", default=_LIMITS.keep_alive, show_default=True,
              type=click.FloatRange(0, min_open=True),
              help="Seconds an idle keep-alive connection stays open.")
@click.option("--max-connections", default=_LIMITS.max_connections, show_default=True,
              type=click.IntRange(1), help="Open connections in all; more are refused at once.")
@click.option("--max-per-client", default=_LIMITS.max_per_client, show_default=True,
              type=click.IntRange(1),
              help="Open connections from one client address; more are refused at once.")
@click.pass_context
def main(ctx, keys_path, host, port, model_path, model_name, card_path, max_batch,
         batch_window_ms, max_queue, max_body, max_pixels, top_k, slot_ms, state_url,
         state_timeout_ms, state_failure, threads, log_level, tls_cert, tls_key, tls_client_ca,
         head_timeout, body_timeout, keep_alive, max_connections, max_per_client):
    """Serve the strong classifier (POST /v1/classify, the v2 protocol's /v2/..., GET /healthz, GET /metrics).

    With no subcommand, serves until Ctrl+C. Create a key first with
    `offload-serve keys add NAME`. See docs/server.md.
    """
    if ctx.invoked_subcommand is not None:
        return
    from offload.server.app import create_app
    from offload.server.keys import KeyStore, reload_on_sighup
    from offload.server.serve import (
        ServerStartError, is_loopback, load_model, serve_forever, tls_context,
    )

    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with user_errors():  # a TLSConfigError is a ValueError
        ssl_context = tls_context(tls_cert, tls_key, tls_client_ca)
    limits = Limits(head_timeout=head_timeout, body_timeout=body_timeout, keep_alive=keep_alive,
                    max_connections=max_connections, max_per_client=max_per_client)
    _check_open_files(limits.max_connections)
    with user_errors():
        store = KeyStore.from_file(keys_path, slot_s=slot_ms / 1000.0)
    if len(store) == 0:
        fail(f"{keys_path} holds no keys, so every request would get 401; "
             f"add one with `offload-serve keys add NAME --keys {keys_path}`")
    if model_path is not None and not os.path.isfile(model_path):
        fail(f"model file {model_path} not found")
    if card_path is not None and not os.path.isfile(card_path):
        fail(f"card file {card_path} not found")
    from offload.server.state import open_state

    with user_errors():  # a StateError is a ValueError: never serve unlimited by mistake
        state = open_state(state_url, timeout_ms=state_timeout_ms, failure=state_failure,
                           slot_s=slot_ms / 1000.0)
    with user_errors():  # ModelError is a ValueError
        if threads or card_path:
            from offload.server.model import StrongModel
            from offload.server.serve import default_model_path

            path = model_path or default_model_path()
            if path is None:
                fail("no --model given and the committed strong.onnx was not found")
            model = StrongModel(path, threads=threads or None, card=card_path)
        else:
            model = load_model(model_path)
        app = create_app(model, store, max_batch=max_batch, batch_window_ms=batch_window_ms,
                         max_queue=max_queue, max_body=max_body, max_pixels=max_pixels, top_k=top_k,
                         state=state, model_name=model_name)

    def ready(url):
        limited = sum(1 for n in store.names if store.bucket(n) is not None)
        click.echo(f"offload-serve: {model.name} (v2: /v2/models/{app.state.service.v2.name}) "
                   f"on {', '.join(model.providers)}; "
                   f"{len(store)} keys ({limited} rate-limited, {slot_ms:g} ms slots), "
                   f"{len(store.switches)} switches, {state.describe()}; "
                   f"micro-batches up to {max_batch} within {batch_window_ms:g} ms; "
                   f"listening on {url}", err=True)
        if ssl_context is None and not is_loopback(host):
            click.echo(f"offload-serve: WARNING: plain HTTP on {host}: anyone on the network can "
                       f"read the images and copy the keys; serve TLS with --tls-cert/--tls-key "
                       f"(docs/security.md)", err=True)

    reload_on_sighup(store)  # `kill -HUP PID` rereads the key file at once
    try:
        serve_forever(app, host, port, log_level=log_level, on_ready=ready, limits=limits,
                      ssl_context=ssl_context)
    except ServerStartError as exc:
        fail(exc)
    except KeyboardInterrupt:
        # uvicorn has already shut down gracefully and re-raised the Ctrl+C
        # for us; a requested stop is not an error. (SIGTERM ends the
        # process by that signal, exit status 143, as services expect.)
        click.echo("offload-serve: stopped", err=True)


# File descriptors kept beside client connections: the listening socket,
# the model's and the logging's files, worker threads' pipes.
_SPARE_FILES = 64


def _check_open_files(max_connections):
    """Warn when the open-file limit cannot hold ``max_connections`` (raise the soft limit if it can)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max_connections + _SPARE_FILES
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
        if soft < need:
            click.echo(f"offload-serve: WARNING: the open-file limit ({soft}) is below "
                       f"--max-connections {max_connections} + {_SPARE_FILES}: lower "
                       f"--max-connections or raise the limit (ulimit -n, LimitNOFILE=)", err=True)


@main.group()
def keys():
    """Manage API keys: add, list, rotate, revoke, remove.

    A running server applies every change within about half a second, or at
    once on SIGHUP; see docs/server.md.
    """


@keys.command("add")
@click.argument("name")
@_keys_option
@click.option("--rate", type=float, default=None,
              help="Token-bucket rate of this key, tokens per slot (0 < rate < 1); with --depth.")
@click.option("--depth", type=float, default=None,
              help="Token-bucket depth, tokens (>= 1); with --rate.")
@click.option("--switch", "switch", default=None, metavar="SWITCH",
              help="Its requests also pass this switch (`keys switch add` it first).")
def keys_add(name, keys_path, rate, depth, switch):
    """Create a key NAME (and the key file if needed); print the key on the last line.

    Only a SHA-256 hash is stored: the printed key cannot be shown again.
    """
    from offload.server.keys import add_key

    with user_errors():  # a KeyFileError is a ValueError
        key = add_key(keys_path, name, rate=rate, depth=depth, switch=switch)
    limit = f" with a bucket of rate {rate} tokens/slot, depth {depth}" if rate is not None else ""
    limit += f", through switch {switch!r}" if switch else ""
    click.echo(f"added key {name!r}{limit} to {keys_path}; it is shown only now:", err=True)
    click.echo(key)


@keys.command("list")
@_keys_option
def keys_list(keys_path):
    """List names, creation times, buckets and rotation/revocation state (never a key).

    One line per name, tab-separated: NAME, CREATED, BUCKET, STATE.
    """
    from offload.server.keys import read_key_file

    with user_errors():  # a KeyFileError is a ValueError
        entries = read_key_file(keys_path)
    if not entries:
        click.echo(f"{keys_path}: no keys", err=True)
    now = time.time()
    for e in entries.values():
        limit = f"rate={e.rate:g} depth={e.depth:g}" if e.limited else "unlimited"
        limit += f" switch={e.switch}" if e.switch else ""
        click.echo(f"{e.name}\t{e.created or '-'}\t{limit}\t{e.state(now)}")


@keys.command("rotate")
@click.argument("name")
@_keys_option
@click.option("--overlap", default=DEFAULT_OVERLAP, show_default=True,
              help="How long the current key stays valid beside the new one "
                   "(e.g. 30m, 24h, 7d; 0: it stops at once).")
def keys_rotate(name, keys_path, overlap):
    """Give NAME a new key, printed on the last line; the old one works until the overlap ends.

    Put the new key on the device within the overlap. Both keys spend from
    NAME's one bucket.
    """
    from offload.server.keys import rotate_key
    from offload.server.keyfile import format_time, parse_duration

    now = time.time()
    with user_errors():  # a KeyFileError is a ValueError
        overlap_s = parse_duration(overlap)
        key = rotate_key(keys_path, name, overlap_s=overlap_s, now=now)
    old = (f"the old key stays valid until {format_time(now + overlap_s)}"
           if overlap_s > 0 else "the old key no longer works")
    click.echo(f"rotated key {name!r} in {keys_path}; {old}. The new key is shown only now:",
               err=True)
    click.echo(key)


@keys.command("revoke")
@click.argument("name")
@_keys_option
def keys_revoke(name, keys_path):
    """Refuse every key of NAME from now on (401); `list` keeps showing it as revoked.

    Use it for a lost or stolen device. The entry stays so the server can log
    that a revoked key was presented; `keys remove NAME` deletes it.
    """
    from offload.server.keys import revoke_key

    with user_errors():  # a KeyFileError is a ValueError
        changed = revoke_key(keys_path, name)
    if changed:
        click.echo(f"revoked every key of {name!r} in {keys_path}; a running server refuses "
                   f"them within a second (at once on SIGHUP)", err=True)
    else:
        click.echo(f"{name!r} was already revoked in {keys_path}", err=True)


@keys.command("remove")
@click.argument("name")
@_keys_option
def keys_remove(name, keys_path):
    """Remove NAME and all its keys (a running server drops them within a second)."""
    from offload.server.keys import remove_key

    with user_errors():  # a KeyFileError is a ValueError
        remove_key(keys_path, name)
    click.echo(f"removed key {name!r} from {keys_path}", err=True)


@keys.group("switch")
def keys_switch():
    """Switches: buckets several keys share (the link they send through)."""


@keys_switch.command("add")
@click.argument("name")
@_keys_option
@click.option("--rate", type=float, required=True,
              help="Tokens per slot the switch lets through (> 0; may be >= 1 for many devices).")
@click.option("--depth", type=float, required=True, help="Switch depth, tokens (>= 1: one send).")
def switch_add(name, keys_path, rate, depth):
    """Define switch NAME (or change its rate and depth); then `keys add KEY --switch NAME`."""
    from offload.server.keys import add_switch

    with user_errors():  # a KeyFileError is a ValueError
        old = add_switch(keys_path, name, rate=rate, depth=depth)
    was = "" if old is None else f" (was rate {old.rate:g}, depth {old.depth:g})"
    click.echo(f"{'changed' if old else 'added'} switch {name!r}: rate {rate:g} tokens/slot, "
               f"depth {depth:g}{was} in {keys_path}", err=True)


@keys_switch.command("remove")
@click.argument("name")
@_keys_option
@click.option("--detach", is_flag=True, help="Also take the keys that use it off it.")
def switch_remove(name, keys_path, detach):
    """Remove switch NAME (refused while keys use it, unless --detach)."""
    from offload.server.keys import remove_switch

    with user_errors():  # a KeyFileError is a ValueError
        users = remove_switch(keys_path, name, detach=detach)
    off = f"; keys {', '.join(users)} no longer pass a switch" if users else ""
    click.echo(f"removed switch {name!r} from {keys_path}{off}", err=True)


@keys_switch.command("list")
@_keys_option
def switch_list(keys_path):
    """List switches, tab-separated: NAME, BUCKET, KEYS (comma-separated)."""
    from offload.server.keys import read_key_file

    with user_errors():  # a KeyFileError is a ValueError
        entries = read_key_file(keys_path)
    if not entries.switches:
        click.echo(f"{keys_path}: no switches", err=True)
    for sw in entries.switches.values():
        users = ",".join(entries.keys_of_switch(sw.name)) or "-"
        click.echo(f"{sw.name}\trate={sw.rate:g} depth={sw.depth:g}\t{users}")


@main.group()
def tls():
    """Certificates for TLS: a private CA, the server's and the devices' certificates."""


def _split_names(values):
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


@tls.command("init")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--server-name", "server_names", multiple=True,
              help="DNS name of the server (repeat or comma-separate; the first is its CN).")
@click.option("--ip", "ips", multiple=True, help="IP address of the server (repeat or comma-separate).")
@click.option("--devices", "devices", multiple=True,
              help="Device names, comma-separated (their API key names): a client certificate each.")
@click.option("--days", default=None, type=click.IntRange(1),
              help="Lifetime of the server and device certificates, days [default: 730].")
@click.option("--ca-days", default=None, type=click.IntRange(1),
              help="Lifetime of a new CA, days [default: 3650].")
@click.option("--force", is_flag=True, help="Overwrite existing server/device files (never the CA).")
def tls_init(folder, server_names, ips, devices, days, ca_days, force):
    """Create a private CA in FOLDER with a server certificate and device certificates.

    An existing CA in FOLDER is reused, so the same command adds devices
    (`--devices cam3`) or re-issues the server certificate (`--server-name ...
    --force`). Keys are written with mode 0600. See docs/security.md.
    """
    from offload.server.tls import CA_DAYS, LEAF_DAYS, init_fleet

    with user_errors():  # a TLSConfigError is a ValueError
        written = init_fleet(folder, server_names=_split_names(server_names),
                             ips=_split_names(ips), devices=_split_names(devices), force=force,
                             ca_days=ca_days or CA_DAYS, days=days or LEAF_DAYS)
    for path, what in written:
        click.echo(f"{path}\t{what}")


if __name__ == "__main__":  # pragma: no cover
    main(prog_name="offload-serve")
