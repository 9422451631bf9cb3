"""The edge server's key file: TOML holding only hashes of API keys, and its edits.

Key file (written by ``offload-serve keys add/rotate/revoke/remove``)::

    # offload-serve key file: SHA-256 hashes of API keys, never the keys.
    [keys."camera-01"]
    sha256 = "9f86d081884c7d65..."     # hex SHA-256 of the current key's UTF-8 bytes
    created = "2026-11-27T11:20:00Z"   # when the name was added
    rate = 0.1                          # optional: tokens per slot, 0 < rate < 1
    depth = 4                           # optional: bucket depth in tokens, >= 1
    rotated = "2026-12-01T09:00:00Z"   # optional: when `keys rotate` issued the current key
    previous = [{ sha256 = "2c26b46b...", expires = "2026-12-02T09:00:00Z" }]
                                        # optional: old keys, still valid until `expires` (UTC)
    revoked = "2026-12-03T10:00:00Z"   # optional: every key of this name refused since then
    switch = "uplink"                   # optional: the switch this key's requests also pass

    [switches."uplink"]                 # a shared bucket several keys send through
    rate = 1.2                          # tokens per slot, > 0 (may be >= 1: many devices)
    depth = 16                          # tokens, >= 1 (one send)

A switch (``keys switch add/remove/list``) is a bucket several keys belong
to: the link they share. A key naming a switch the file does not define, or
a switch smaller than one send, is refused when the file is read.

Files without ``rotated``/``previous``/``revoked`` (what earlier versions
wrote) read as before: one current key per name. Times are UTC, written
``YYYY-MM-DDTHH:MM:SSZ`` (a TOML date-time with an offset is accepted too).

A key is ``secrets.token_urlsafe(32)`` (256 random bits), so a plain SHA-256
is enough to store it: nothing short of guessing 256 bits recovers a key from
its hash, and a slow password hash would only cost time on every request.

Every edit reads the file, changes it and writes it back through
``offload.atomic`` (a temporary file renamed over the old one), so a server
rereading it sees the old file or the new one, never a half-written one.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
import os
import re
import secrets
import time
from typing import NamedTuple

try:
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from offload.atomic import atomic_path
from offload.bucket import scale

__all__ = [
    "KeyFileError", "KeyEntry", "OldKey", "SwitchEntry", "KeyTable", "hash_key", "new_key",
    "read_key_file", "parse_key_file", "write_key_file", "add_key", "remove_key", "rotate_key",
    "revoke_key", "add_switch", "remove_switch", "parse_duration", "format_time", "check_name",
    "check_bucket", "check_switch", "NAME_PATTERN", "DEFAULT_OVERLAP",
]

#: Key names: letters, digits, ``.``, ``_``, ``-``; 1..64 characters.
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_FIELDS = {"sha256", "created", "rate", "depth", "rotated", "previous", "revoked", "switch"}
_SWITCH_FIELDS = {"rate", "depth"}
#: How long ``keys rotate`` keeps the old key valid by default.
DEFAULT_OVERLAP = "24h"
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class KeyFileError(ValueError):
    """A key file that is missing, not TOML, or not in the documented shape."""


def hash_key(key):
    """Hex SHA-256 of an API key's UTF-8 bytes (what the key file stores)."""
    return hashlib.sha256(str(key).encode("utf-8")).hexdigest()


def new_key():
    """A new random API key: ``secrets.token_urlsafe(32)`` (43 URL-safe characters, 256 bits)."""
    return secrets.token_urlsafe(32)


def format_time(t):
    """``t`` (Unix seconds) as the key file writes times: ``YYYY-MM-DDTHH:MM:SSZ`` (UTC)."""
    return _dt.datetime.fromtimestamp(int(t), _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value, what):
    """Unix seconds of a key-file time (a ``...Z`` string or a TOML offset date-time)."""
    if isinstance(value, str):
        try:
            value = _dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            value = None
    if not isinstance(value, _dt.datetime) or value.tzinfo is None:
        raise KeyFileError(f"{what} must be a UTC time like \"2026-12-01T09:00:00Z\"")
    return value.timestamp()


def parse_duration(text):
    """Seconds in a duration like ``"24h"``, ``"90m"``, ``"7d"``, ``"30s"`` or ``"0"``.

    Raises :class:`KeyFileError` for anything else (negative, not finite, unknown unit).
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smhd]?)\s*", str(text))
    seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"] if m else math.nan
    if not math.isfinite(seconds):
        raise KeyFileError(f"duration {text!r} must be a number of seconds or a number with "
                           f"s, m, h or d (e.g. 24h, 90m, 7d, 0)")
    return seconds


class OldKey(NamedTuple):
    """A rotated-out key of a name: its hash and when it stops working (Unix seconds)."""

    sha256: str
    expires: float


class KeyEntry:
    """One name in the key file: its current hash, bucket, rotation and revocation state.

    ``previous`` holds the :class:`OldKey` s still in the file (a rotated-out
    key is valid while ``now < expires``); ``revoked`` is the time the name
    was revoked (``""``: not revoked), after which none of its keys is valid.
    """

    __slots__ = ("name", "sha256", "created", "rate", "depth", "rotated", "previous", "revoked",
                 "switch")

    def __init__(self, name, sha256, created="", rate=None, depth=None, *, rotated="",
                 previous=(), revoked="", switch=None):
        self.name, self.sha256, self.created = name, sha256, created
        self.rate, self.depth = rate, depth
        self.rotated, self.previous, self.revoked = rotated, tuple(previous), revoked
        self.switch = switch  # name of the switch its requests also pass, or None

    @property
    def limited(self):
        return self.rate is not None

    def valid_old(self, now):
        """The old keys still valid at ``now`` (Unix seconds)."""
        return tuple(o for o in self.previous if now < o.expires)

    def state(self, now):
        """One line for ``keys list``: ``active``, rotation with its overlap, or ``revoked``."""
        if self.revoked:
            return f"revoked {self.revoked}"
        if not self.previous:
            return f"active, rotated {self.rotated}" if self.rotated else "active"
        until = max(o.expires for o in self.previous)
        old = (f"old key valid until {format_time(until)}" if now < until
               else f"old key expired {format_time(until)}")
        return f"active, rotated {self.rotated or '-'}; {old}"

    def __repr__(self):
        lim = f", rate={self.rate}, depth={self.depth}" if self.limited else ""
        lim += f", switch={self.switch!r}" if self.switch else ""
        extra = f", previous={len(self.previous)}" if self.previous else ""
        return f"KeyEntry({self.name!r}{lim}{extra}{', revoked' if self.revoked else ''})"


class SwitchEntry(NamedTuple):
    """A switch of the key file: a bucket of ``rate`` tokens per slot and ``depth`` tokens."""

    name: str
    rate: float
    depth: float


class KeyTable(dict):
    """``{name: KeyEntry}`` in file order, plus the file's ``switches`` ``{name: SwitchEntry}``.

    A plain dict to every caller that only needs the keys; :func:`write_key_file`
    writes the switches back, so an edit of a key keeps them.
    """

    def __init__(self, entries=(), switches=None):
        super().__init__(entries)
        self.switches = dict(switches or {})

    def keys_of_switch(self, name):
        """Names of the keys whose requests pass switch ``name``."""
        return [e.name for e in self.values() if e.switch == name]


def check_name(name):
    """``name`` when it is a valid key name (:data:`NAME_PATTERN`), else :class:`KeyFileError`."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise KeyFileError(f"key name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    return name


def check_bucket(name, rate, depth):
    """``(rate, depth)`` as floats (or ``(None, None)``) when valid for a bucket; else KeyFileError."""
    if (rate is None) != (depth is None):
        raise KeyFileError(f"key {name!r}: give both rate and depth, or neither")
    if rate is None:
        return None, None
    for what, v in (("rate", rate), ("depth", depth)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise KeyFileError(f"key {name!r}: {what} must be a number, got {v!r}")
    try:
        scale(rate, depth)
    except ValueError as exc:
        raise KeyFileError(f"key {name!r}: {exc}") from None
    return float(rate), float(depth)


def check_switch(name, rate, depth):
    """``(rate, depth)`` as floats when valid for a switch ``name``; else :class:`KeyFileError`.

    A switch may refill more than one send per slot (``rate >= 1``: the link
    of many devices) but must hold at least one send (``depth >= 1`` token).
    """
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise KeyFileError(f"switch name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    for what, v in (("rate", rate), ("depth", depth)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise KeyFileError(f"switch {name!r}: {what} must be a number, got {v!r}")
    if not (math.isfinite(rate) and math.isfinite(depth) and rate > 0):
        raise KeyFileError(f"switch {name!r}: rate {rate!r} tokens/slot must be a number > 0")
    if depth < 1:
        raise KeyFileError(f"switch {name!r}: depth {depth:g} is smaller than one send "
                           f"(1 token); give depth >= 1")
    try:
        scale(rate, depth, any_rate=True)
    except ValueError as exc:
        raise KeyFileError(f"switch {name!r}: {exc}") from None
    return float(rate), float(depth)


def _switches(path, doc):
    table = doc.get("switches", {})
    if not isinstance(table, dict):
        raise KeyFileError(f"key file {path}: 'switches' must be a table of [switches.NAME] entries")
    out = {}
    for name, entry in table.items():
        if not isinstance(entry, dict):
            raise KeyFileError(f"key file {path}: switch {name!r} must be a table with rate "
                               f"and depth")
        extra = sorted(set(entry) - _SWITCH_FIELDS)
        missing = sorted(_SWITCH_FIELDS - set(entry))
        if extra or missing:
            raise KeyFileError(f"key file {path}: switch {name!r} needs exactly rate and depth"
                               + (f" (unknown: {extra})" if extra else "")
                               + (f" (missing: {missing})" if missing else ""))
        try:
            out[name] = SwitchEntry(name, *check_switch(name, entry["rate"], entry["depth"]))
        except KeyFileError as exc:
            raise KeyFileError(f"key file {path}: {exc}") from None
    return out


def _check_hash(name, h, what="sha256"):
    if not isinstance(h, str) or not _HEX64.match(h):
        raise KeyFileError(f"key {name!r}: {what} must be 64 lower-case hex digits")
    return h


def _time_field(name, entry, field):
    value = entry.get(field)
    if value is None:
        return ""
    return format_time(_parse_time(value, f"key {name!r}: {field}"))


def _previous(name, value):
    if not isinstance(value, list):
        raise KeyFileError(f"key {name!r}: previous must be a list of "
                           f"{{ sha256 = \"...\", expires = \"...Z\" }}")
    out = []
    for old in value:
        if not isinstance(old, dict) or set(old) != {"sha256", "expires"}:
            raise KeyFileError(f"key {name!r}: each previous key needs exactly sha256 and expires")
        out.append(OldKey(_check_hash(name, old["sha256"], "previous sha256"),
                          _parse_time(old["expires"], f"key {name!r}: previous expires")))
    return out


def _entry(name, entry):
    check_name(name)
    if not isinstance(entry, dict):
        raise KeyFileError(f"key {name!r} must be a table with sha256 = \"...\"")
    h = _check_hash(name, entry.get("sha256"))
    extra = sorted(set(entry) - _FIELDS)
    if extra:
        raise KeyFileError(f"key {name!r}: unknown fields {extra}")
    rate, depth = check_bucket(name, entry.get("rate"), entry.get("depth"))
    switch = entry.get("switch")
    if switch is not None and not isinstance(switch, str):
        raise KeyFileError(f"key {name!r}: switch must be the name of a [switches.NAME] entry")
    return KeyEntry(name, h, str(entry.get("created", "")), rate, depth,
                    rotated=_time_field(name, entry, "rotated"),
                    previous=_previous(name, entry.get("previous", [])),
                    revoked=_time_field(name, entry, "revoked"), switch=switch)


def parse_key_file(data, path="<key file>"):
    """Check key-file ``data`` (bytes); returns a :class:`KeyTable` ``{name: KeyEntry}`` in file order.

    Raises :class:`KeyFileError` for bad TOML, a bad entry, one key hash
    listed twice (one key would stand for two names, or for itself twice), a
    switch smaller than one send, or a key naming a switch the file does not
    define.
    """
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"key file {path} is not valid TOML: {exc}") from None
    table = doc.get("keys", {})
    if not isinstance(table, dict):
        raise KeyFileError(f"key file {path}: 'keys' must be a table of [keys.NAME] entries")
    unknown = sorted(set(doc) - {"keys", "switches"})
    if unknown:
        raise KeyFileError(f"key file {path}: unknown top-level entries {unknown}")
    out, owner = KeyTable(switches=_switches(path, doc)), {}
    for name, entry in table.items():
        try:
            e = _entry(name, entry)
        except KeyFileError as exc:
            raise KeyFileError(f"key file {path}: {exc}") from None
        for h in (e.sha256, *(o.sha256 for o in e.previous)):
            if h in owner:
                raise KeyFileError(f"key file {path}: the hash {h[:12]}... is listed twice "
                                   f"(keys {owner[h]!r} and {name!r})")
            owner[h] = name
        if e.switch is not None and e.switch not in out.switches:
            raise KeyFileError(
                f"key file {path}: key {name!r} names switch {e.switch!r}, which the file does "
                f"not define (defined: {', '.join(out.switches) or 'none'}); add it with "
                f"`offload-serve keys switch add {e.switch} --rate R --depth B`")
        out[name] = e
    return out


def read_key_file(path):
    """Read and check a key file; returns ``{name: KeyEntry}`` in file order.

    Raises
    ------
    KeyFileError
        Missing or unreadable file, bad TOML, or an entry without a valid
        ``sha256``, with a bad name, an invalid bucket or a bad time.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} not found; create it with "
                           f"`offload-serve keys add NAME --keys {path}`") from None
    except IsADirectoryError:
        raise KeyFileError(f"key file {path} is a directory") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    return parse_key_file(data, path)


def write_key_file(path, entries):
    """Write ``{name: KeyEntry}`` (and a :class:`KeyTable`'s switches) as a key file.

    Atomically (``offload.atomic``), mode 0600.
    """
    lines = ["# offload-serve key file: SHA-256 hashes of API keys, never the keys.",
             "# Manage it with `offload-serve keys add/list/rotate/revoke/remove` and "
             "`keys switch add/remove`; see docs/server.md.", ""]
    for sw in getattr(entries, "switches", {}).values():
        lines += [f'[switches."{sw.name}"]', f"rate = {float(sw.rate)!r}",
                  f"depth = {float(sw.depth)!r}", ""]
    for e in entries.values():
        check_name(e.name)
        lines.append(f'[keys."{e.name}"]')
        lines.append(f'sha256 = "{e.sha256}"')
        for field in ("created", "rotated", "revoked"):
            if getattr(e, field):
                lines.append(f'{field} = "{getattr(e, field)}"')
        if e.limited:
            lines.append(f"rate = {float(e.rate)!r}")
            lines.append(f"depth = {float(e.depth)!r}")
        if e.switch:
            lines.append(f'switch = "{e.switch}"')
        if e.previous:
            olds = ", ".join(f'{{ sha256 = "{o.sha256}", expires = "{format_time(o.expires)}" }}'
                             for o in e.previous)
            lines.append(f"previous = [{olds}]")
        lines.append("")
    text = "\n".join(lines)
    parse_key_file(text.encode("utf-8"), path)  # what we write must read back
    with atomic_path(path) as tmp:
        # Only hashes are inside, but who may use the server is still nobody else's business.
        os.chmod(tmp, 0o600)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def _entry_of(entries, path, name):
    if name not in entries:
        raise KeyFileError(f"no key named {name!r} in {path} (keys: {', '.join(entries) or 'none'})")
    return entries[name]


def add_key(path, name, *, rate=None, depth=None, key=None, now=None, switch=None):
    """Add a new key named ``name`` to the key file (created when missing); returns the key.

    The key itself (``new_key()`` unless given) is returned once and never
    stored. ``now``: Unix seconds of the creation time (default: the clock).
    ``switch``: name of a switch of the file its requests also pass.
    Raises :class:`KeyFileError` for a bad name, an existing name (revoked
    ones included), a bad bucket, an undefined switch, or a damaged existing file.
    """
    check_name(name)
    rate, depth = check_bucket(name, rate, depth)
    entries = read_key_file(path) if os.path.exists(path) else KeyTable()
    if switch is not None and switch not in entries.switches:
        raise KeyFileError(f"no switch named {switch!r} in {path} (switches: "
                           f"{', '.join(entries.switches) or 'none'}); add it first with "
                           f"`offload-serve keys switch add {switch} --rate R --depth B`")
    if name in entries:
        how = f" (revoked {entries[name].revoked})" if entries[name].revoked else ""
        raise KeyFileError(f"a key named {name!r} already exists in {path}{how}; "
                           f"remove it first (`offload-serve keys remove {name}`)")
    key = key or new_key()
    created = format_time(time.time() if now is None else now)
    entries[name] = KeyEntry(name, hash_key(key), created, rate, depth, switch=switch)
    write_key_file(path, entries)
    return key


def add_switch(path, name, *, rate, depth):
    """Define switch ``name`` (``rate`` tokens/slot, ``depth`` tokens), or change an existing one.

    Creates the key file when missing. Returns the previous
    :class:`SwitchEntry` (``None`` for a new switch). Raises
    :class:`KeyFileError` for a bad name or bucket, or a damaged file.
    """
    rate, depth = check_switch(name, rate, depth)
    entries = read_key_file(path) if os.path.exists(path) else KeyTable()
    old = entries.switches.get(name)
    entries.switches[name] = SwitchEntry(name, rate, depth)
    write_key_file(path, entries)
    return old


def remove_switch(path, name, *, detach=False):
    """Remove switch ``name``; returns the names of the keys taken off it.

    A switch still named by keys is refused unless ``detach``, which takes
    those keys off it (they are then limited by their own buckets only).
    """
    entries = read_key_file(path)
    if name not in entries.switches:
        raise KeyFileError(f"no switch named {name!r} in {path} (switches: "
                           f"{', '.join(entries.switches) or 'none'})")
    users = entries.keys_of_switch(name)
    if users and not detach:
        raise KeyFileError(f"switch {name!r} is used by keys {', '.join(users)}; "
                           f"give --detach to take them off it too")
    for user in users:
        entries[user].switch = None
    del entries.switches[name]
    write_key_file(path, entries)
    return users


def remove_key(path, name):
    """Remove the name ``name`` (all its keys) from the key file; :class:`KeyFileError` when absent."""
    entries = read_key_file(path)
    _entry_of(entries, path, name)
    del entries[name]
    write_key_file(path, entries)


def rotate_key(path, name, *, overlap_s, key=None, now=None):
    """Give ``name`` a new key; the current one stays valid ``overlap_s`` seconds more.

    Returns the new key (shown once, never stored). Old keys whose overlap
    has ended are dropped from the file; ``overlap_s = 0`` drops the current
    key at once. The name's bucket is unchanged: old and new key share it.
    ``now``: Unix seconds (default: the clock). Raises :class:`KeyFileError`
    for an unknown or revoked name or a negative overlap.
    """
    if not (overlap_s >= 0 and math.isfinite(overlap_s)):
        raise KeyFileError(f"overlap {overlap_s!r} s must be a number of seconds >= 0")
    entries = read_key_file(path)
    e = _entry_of(entries, path, name)
    if e.revoked:
        raise KeyFileError(f"key {name!r} is revoked ({e.revoked}); a revoked name gets no new "
                           f"key: `offload-serve keys remove {name}` then `keys add {name}`")
    now = time.time() if now is None else float(now)
    key = key or new_key()
    old = list(e.valid_old(now))
    if overlap_s > 0:
        old.append(OldKey(e.sha256, math.floor(now + overlap_s)))
    e.sha256, e.previous, e.rotated = hash_key(key), tuple(old), format_time(now)
    write_key_file(path, entries)
    return key


def revoke_key(path, name, *, now=None):
    """Revoke every key of ``name`` at once; returns False when it was already revoked.

    The entry stays in the file, marked ``revoked``, so ``keys list`` shows
    it and the server can say in its log that a revoked key was presented
    (rather than an unknown one). Raises :class:`KeyFileError` when absent.
    """
    entries = read_key_file(path)
    e = _entry_of(entries, path, name)
    if e.revoked:
        return False
    e.revoked = format_time(time.time() if now is None else now)
    write_key_file(path, entries)
    return True
