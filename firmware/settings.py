"""The per-device settings file (``offload/device.toml`` on the boot partition) and its validation.

One image can be flashed onto many cards; each card then gets its own
settings by editing ``device.toml`` (and ``device.key``) on the FAT boot
partition, which any computer can mount, before the first boot. The same
validation runs twice: at build time on the settings given to
``offload-firmware build``, and at first boot on the Pi, on whatever the card
holds by then.

The file holds ``offload-run`` keys (docs/device.md), each declared once on
:class:`offload.device.config.RunConfig` and validated with the device's own
:func:`offload.device.config.make_config`, plus two checks of the
bucket: ``rate`` and ``depth``, when given, must match the token bucket
``(N, P, M)`` the policy blob was trained for (a policy is trained for one
bucket; the device takes its bucket from the blob). The firmware decides the
paths (key file, policy, model, frame log), so those keys are refused. The
API key never goes in this file: it lives in ``device.key`` beside it, and
first boot moves it to ``/etc/offload/device.key`` with mode 0600.
"""

from __future__ import annotations

import json
import math
import os
import sys

from firmware import ETC, LOG_DIR, tls
from firmware.tools import FirmwareError

__all__ = ["SETTINGS_NAME", "KEY_NAME", "POLICY_NAME", "MODEL_NAME", "EDGETPU_MODEL_NAME",
           "RESERVED", "DEFAULT_LOG_MAX_BYTES", "DEFAULT_LOG_BACKUPS", "load_settings",
           "load_settings_text",
           "validate", "read_key_file", "check_bucket", "to_toml", "device_config"]

SETTINGS_NAME = "device.toml"
KEY_NAME = "device.key"
POLICY_NAME = "policy.bin"
MODEL_NAME = "weak.tflite"
#: edgetpu_compiler's naming: the run falls back from ``weak_edgetpu.tflite`` to ``weak.tflite``.
EDGETPU_MODEL_NAME = "weak_edgetpu.tflite"
#: The frame log is capped at log-max-bytes * (1 + log-backups): 100 MB by default.
DEFAULT_LOG_MAX_BYTES = 20_000_000
DEFAULT_LOG_BACKUPS = 4

#: Keys the firmware sets itself, with the reason a user value is refused.
RESERVED = {
    "key": f"put the API key in {KEY_NAME} beside this file (--key-file at build), never in the "
           "settings file: first boot moves it to /etc/offload with mode 0600",
    "key-file": f"the firmware sets it to {ETC}/{KEY_NAME}",
    "policy": "give the policy blob to the build (--policy); it becomes /etc/offload/policy.bin",
    "model": "give the weak model to the build (--model); it becomes /etc/offload/weak.tflite",
    "log": f"the frame log is {LOG_DIR}/frames.jsonl, the one writable place of the hardened service",
    "summary-json": f"the service may only write under {LOG_DIR}",
    "ca-file": f"give the CA to the build (--ca-file) or put it in {tls.CA_NAME} beside this file; "
               f"it becomes {ETC}/{tls.CA_NAME}",
    "client-cert": f"give it to the build (--client-cert) or put it in {tls.CLIENT_CERT_NAME} "
                   f"beside this file; it becomes {ETC}/{tls.CLIENT_CERT_NAME}",
    "client-key": f"give it to the build (--client-key) or put it in {tls.CLIENT_KEY_NAME} "
                  f"beside this file; it becomes {ETC}/{tls.CLIENT_KEY_NAME}",
}
_BUCKET_KEYS = ("rate", "depth")


def _toml():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python < 3.11
        import tomli as tomllib
    return tomllib


def load_settings(path):
    """The table of a settings file; a missing or malformed one is a :class:`FirmwareError`."""
    tomllib = _toml()
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise FirmwareError(f"settings {path}: cannot read ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise FirmwareError(f"settings {path}: not valid TOML ({e})") from None


def load_settings_text(text, name="<text>"):
    """The table of settings TOML text (what the build wrote on the card, read back)."""
    tomllib = _toml()
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FirmwareError(f"settings {name}: not valid TOML ({e})") from None


def read_key_file(path):
    """The API key in ``path``: one line of printable ASCII without spaces (what offload-serve prints)."""
    try:
        with open(path, "rb") as f:
            data = f.read(4097)
    except OSError as e:
        raise FirmwareError(f"key file {path}: cannot read ({e.strerror})") from None
    if len(data) > 4096:
        raise FirmwareError(f"key file {path}: larger than 4 KiB, not an API key")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise FirmwareError(f"key file {path}: not ASCII text") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise FirmwareError(f"key file {path}: empty")
    if len(lines) > 1:
        raise FirmwareError(f"key file {path}: {len(lines)} lines; it must hold the key alone")
    key = lines[0]
    if any(c.isspace() or not c.isprintable() for c in key):
        raise FirmwareError(f"key file {path}: the key contains spaces or control characters")
    return key


def check_bucket(settings_name, rate, depth, policy, policy_name):
    """Refuse ``rate``/``depth`` that differ from the bucket ``policy`` (a blob Policy) was trained for."""
    r, b = policy.N / policy.P, policy.M / policy.P
    for key, want, have in (("rate", rate, r), ("depth", depth, b)):
        if want is None:
            continue
        if isinstance(want, bool) or not isinstance(want, (int, float)) or not math.isfinite(want):
            raise FirmwareError(f"settings {settings_name}: {key}: must be a number, got {want!r}")
        if not math.isclose(float(want), have, rel_tol=1e-6):
            raise FirmwareError(
                f"settings {settings_name}: {key}: {want} does not match the policy's bucket "
                f"(r = {r:g}, b = {b:g}, N={policy.N} P={policy.P} M={policy.M} in {policy_name}); "
                "train a policy for this bucket or give the matching one")


def device_config(values, *, settings_name, has_edgetpu_model=False, require_server=True,
                  tls_files=(), etc=ETC, log_dir=LOG_DIR):
    """The ``offload-run`` table for ``/etc/offload/config.toml`` from a settings table, validated.

    ``tls_files``: the device keys of ``firmware.tls.FILES`` whose file the
    device has (``ca-file``, ``client-cert``, ``client-key``); each is set
    to its copy in ``etc``. Returns ``(table, bucket)``: ``table`` maps keys
    to values (TOML-ready) and has passed
    :func:`offload.device.config.make_config`; ``bucket`` is
    ``{"rate": .., "depth": ..}`` (values or ``None``) for :func:`check_bucket`.

    Raises
    ------
    FirmwareError
        A reserved key, an unknown key, a bad value (the message names the key,
        as ``offload-run`` would), no frame log cap, a plain-HTTP server off
        loopback without ``allow-plain-http = true``.
    """
    from offload.device.config import SOURCE_KEYS, ConfigError, key_name, make_config

    if not isinstance(values, dict):
        raise FirmwareError(f"settings {settings_name}: expected a table of keys")
    table = {}
    bucket = {"rate": None, "depth": None}
    allow_plain_http = False
    for raw, value in values.items():
        # the device's spelling rule (dashes or underscores); make_config names an unknown key
        key = key_name(raw) or str(raw).replace("_", "-")
        if key in RESERVED:
            raise FirmwareError(f"settings {settings_name}: {raw}: not allowed here; {RESERVED[key]}")
        if key in _BUCKET_KEYS:
            bucket[key] = value
            continue
        if key == tls.ALLOW_PLAIN_HTTP:
            if not isinstance(value, bool):
                raise FirmwareError(f"settings {settings_name}: {raw}: must be true or false")
            allow_plain_http = value
            continue
        table[key] = value

    if not any(k in table for k in SOURCE_KEYS):
        table["camera"] = 0       # the first USB/V4L2 camera, the paper's testbed's source
    table.setdefault("log-max-bytes", DEFAULT_LOG_MAX_BYTES)
    table.setdefault("log-backups", DEFAULT_LOG_BACKUPS)
    table.setdefault("accelerator", "auto")
    model = EDGETPU_MODEL_NAME if has_edgetpu_model else MODEL_NAME
    fixed = {"key-file": f"{etc}/{KEY_NAME}", "policy": f"{etc}/{POLICY_NAME}",
             "model": f"{etc}/{model}", "log": f"{log_dir}/frames.jsonl"}
    fixed.update({k: f"{etc}/{tls.FILES[k]}" for k in tls.FILES if k in tls_files})
    table.update(fixed)
    checked = table
    if "server" not in table and not require_server:
        # An image for many cards, each given its server later: the TLS files
        # only apply to an https:// server, which is checked at first boot.
        checked = {k: v for k, v in table.items() if k not in tls.FILES}
    try:
        cfg = make_config(file_values=checked)
    except ConfigError as e:
        raise FirmwareError(f"settings {settings_name}: {e}") from None
    if cfg.log_max_bytes == 0:
        raise FirmwareError(f"settings {settings_name}: log-max-bytes: must be > 0 on the device, "
                            "so the frame log stays size-capped")
    if cfg.server is None and require_server:
        # Local-only is a valid run, but a device image without a server is
        # almost always a forgotten setting; say so rather than guess.
        raise FirmwareError(f"settings {settings_name}: server: missing; the device needs the edge "
                            "server's URL, e.g. server = \"https://10.0.0.2:8443\"")
    tls.check_server(cfg.server, allow_plain_http=allow_plain_http, settings_name=settings_name)
    return table, bucket


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (str, os.PathLike)):
        # A JSON string is a valid TOML basic string when non-ASCII stays raw
        # (TOML has no surrogate-pair escapes).
        return json.dumps(os.fspath(v), ensure_ascii=False)
    raise FirmwareError(f"cannot write {v!r} to TOML")


def to_toml(table, header=""):
    """TOML text of a flat table of scalars, keys in the given order."""
    lines = [f"# {ln}" if ln else "#" for ln in header.splitlines()]
    lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def validate(values, *, settings_name, policy_path, policy_name=None, key_path=None,
             has_edgetpu_model=False, require_server=True, tls_files=()):
    """Everything checked about one device's settings: table, bucket, policy, key.

    ``require_server=False`` accepts a settings file without ``server`` (the
    build of an image meant for many cards, each edited before its first
    boot); first boot always requires it. ``tls_files``: see
    :func:`device_config`. Returns the ``offload-run`` table.
    """
    from offload.blob import BlobError, read_blob

    table, bucket = device_config(values, settings_name=settings_name,
                                  has_edgetpu_model=has_edgetpu_model,
                                  require_server=require_server, tls_files=tls_files)
    try:
        policy = read_blob(policy_path)
    except BlobError as e:
        raise FirmwareError(f"policy: {e}") from None
    check_bucket(settings_name, bucket["rate"], bucket["depth"], policy,
                 policy_name or os.path.basename(policy_path))
    if key_path is not None:
        read_key_file(key_path)
    return table
