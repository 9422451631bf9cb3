"""API keys of the edge server: a TOML key file holding only hashes, and per-key token buckets.

Key file (TOML, written by ``offload-serve keys add``)::

    # offload-serve key file: SHA-256 hashes of API keys, never the keys.
    [keys."camera-01"]
    sha256 = "9f86d081884c7d65..."     # hex SHA-256 of the key's UTF-8 bytes
    created = "2026-11-27T11:20:00Z"
    rate = 0.1                          # optional: tokens per slot, 0 < rate < 1
    depth = 4                           # optional: bucket depth in tokens, >= 1

A key is ``secrets.token_urlsafe(32)`` (256 random bits), so a plain SHA-256
is enough to store it: nothing short of guessing 256 bits recovers a key from
its hash, and a slow password hash would only cost time on every request.
A presented key is hashed and compared with every stored hash by
``hmac.compare_digest`` (no early exit), so the answer time does not tell
which bytes or which entry matched.

Per-key bucket: a key with ``rate``/``depth`` gets the device's token bucket
(``offload.bucket.scale`` -> integer ``(N, P, M)`` scaled tokens; SPEC
section 1). Time is cut into slots of ``slot_s`` seconds (default 0.2 s)
counted from the bucket's creation; a request in slot ``s`` first refills
``N`` per slot since the previous request (capped at ``M``), then is
allowed iff ``n >= P`` and spends ``P``. That is the device's
``n <- min(M, n - P*a + N*I)`` with ``I`` the slots between two requests; two
requests in the same slot see no refill between them.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import math
import os
import re
import secrets
import threading
import time

try:
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from offload.atomic import atomic_path
from offload.bucket import Bucket, refill, scale, slot_index

__all__ = [
    "KeyFileError",
    "KeyEntry",
    "KeyStore",
    "KeyBucket",
    "hash_key",
    "new_key",
    "read_key_file",
    "write_key_file",
    "add_key",
    "remove_key",
    "NAME_PATTERN",
]

#: Key names: letters, digits, ``.``, ``_``, ``-``; 1..64 characters.
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")


class KeyFileError(ValueError):
    """A key file that is missing, not TOML, or not in the documented shape."""


def hash_key(key):
    """Hex SHA-256 of an API key's UTF-8 bytes (what the key file stores)."""
    return hashlib.sha256(str(key).encode("utf-8")).hexdigest()


def new_key():
    """A new random API key: ``secrets.token_urlsafe(32)`` (43 URL-safe characters, 256 bits)."""
    return secrets.token_urlsafe(32)


class KeyBucket:
    """The core token bucket (``offload.bucket.Bucket``) plus a slotted clock (thread-safe).

    Slots follow ``offload.bucket.slot_index`` (half-up rounding, the device's
    rule: slot ``s`` covers ``[t0 + (s - 1/2) slot_s, t0 + (s + 1/2) slot_s)``);
    the count refills by ``offload.bucket.refill``, the rule ``step_reference``
    (the native bucket's reference) uses.

    Parameters
    ----------
    rate : float
        Tokens per slot, ``0 < rate < 1``.
    depth : float
        Depth in tokens, ``>= 1``.
    slot_s : float
        Slot length in seconds.
    now : float
        Clock reading (seconds) at creation; slots are counted from it. The
        bucket starts full.
    """

    def __init__(self, rate, depth, slot_s, now):
        self.bucket = Bucket.from_rate(rate, depth)
        self.N, self.P, self.M = self.bucket
        if not (slot_s > 0 and math.isfinite(slot_s)):
            raise ValueError(f"slot length {slot_s!r} s must be a positive number")
        self.rate, self.depth, self.slot_s = float(rate), float(depth), float(slot_s)
        self.t0 = float(now)
        self.n = self.M
        self.slot = 0
        self._lock = threading.Lock()

    def slot_of(self, now):
        """Index of the slot holding clock reading ``now`` (seconds): ``slot_index``, at least 0."""
        return max(0, slot_index(now, self.t0, self.slot_s))

    def take(self, now):
        """One request at clock ``now``: ``(allowed, retry_after_s)``.

        Refills for the slots since the previous request, then spends ``P``
        scaled tokens when at least ``P`` are there. ``retry_after_s`` is 0
        when allowed, else the seconds until the slot in which ``n >= P`` begins
        (slot ``s + k`` begins at ``t0 + (s + k - 1/2) slot_s``).
        """
        with self._lock:
            s = max(self.slot_of(now), self.slot)  # a clock never runs backwards here
            self.n = refill(self.n, s - self.slot, self.N, self.M)
            self.slot = s
            if self.bucket.can_send(self.n):
                self.n -= self.P
                return True, 0.0
            k = -(-(self.P - self.n) // self.N)  # slots until n >= P (ceiling division)
            return False, max(0.0, self.t0 + (s + k - 0.5) * self.slot_s - now)

    @property
    def tokens(self):
        """Scaled tokens after the last request (no refill applied)."""
        return self.n


class KeyEntry:
    """One key: its name, stored hash and optional bucket ``rate``/``depth``."""

    __slots__ = ("name", "sha256", "created", "rate", "depth")

    def __init__(self, name, sha256, created="", rate=None, depth=None):
        self.name, self.sha256, self.created = name, sha256, created
        self.rate, self.depth = rate, depth

    @property
    def limited(self):
        return self.rate is not None

    def __repr__(self):
        lim = f", rate={self.rate}, depth={self.depth}" if self.limited else ""
        return f"KeyEntry({self.name!r}{lim})"


def _check_name(name):
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise KeyFileError(f"key name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    return name


def _check_bucket(name, rate, depth):
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


def read_key_file(path):
    """Read and check a key file; returns ``{name: KeyEntry}`` in file order.

    Raises
    ------
    KeyFileError
        Missing or unreadable file, bad TOML, or an entry without a valid
        ``sha256``, with a bad name, or with an invalid bucket.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} not found; create it with "
                           f"`offload-serve keys add NAME --keys {path}`") from None
    except IsADirectoryError:
        raise KeyFileError(f"key file {path} is a directory") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"key file {path} is not valid TOML: {exc}") from None
    table = doc.get("keys", {})
    if not isinstance(table, dict):
        raise KeyFileError(f"key file {path}: 'keys' must be a table of [keys.NAME] entries")
    unknown = sorted(set(doc) - {"keys"})
    if unknown:
        raise KeyFileError(f"key file {path}: unknown top-level entries {unknown}")
    out = {}
    for name, entry in table.items():
        try:
            _check_name(name)
            if not isinstance(entry, dict):
                raise KeyFileError(f"key {name!r} must be a table with sha256 = \"...\"")
            h = entry.get("sha256")
            if not isinstance(h, str) or not _HEX64.match(h):
                raise KeyFileError(f"key {name!r}: sha256 must be 64 lower-case hex digits")
            extra = sorted(set(entry) - {"sha256", "created", "rate", "depth"})
            if extra:
                raise KeyFileError(f"key {name!r}: unknown fields {extra}")
            rate, depth = _check_bucket(name, entry.get("rate"), entry.get("depth"))
        except KeyFileError as exc:
            raise KeyFileError(f"key file {path}: {exc}") from None
        out[name] = KeyEntry(name, h, str(entry.get("created", "")), rate, depth)
    return out


def write_key_file(path, entries):
    """Write ``{name: KeyEntry}`` as a key file, atomically (``offload.atomic``), mode 0600."""
    lines = ["# offload-serve key file: SHA-256 hashes of API keys, never the keys.",
             "# Manage it with `offload-serve keys add/list/remove`; see docs/server.md.", ""]
    for e in entries.values():
        _check_name(e.name)
        lines.append(f'[keys."{e.name}"]')
        lines.append(f'sha256 = "{e.sha256}"')
        if e.created:
            lines.append(f'created = "{e.created}"')
        if e.limited:
            lines.append(f"rate = {float(e.rate)!r}")
            lines.append(f"depth = {float(e.depth)!r}")
        lines.append("")
    text = "\n".join(lines)
    tomllib.loads(text)  # what we write must read back
    with atomic_path(path) as tmp:
        # Only hashes are inside, but who may use the server is still nobody else's business.
        os.chmod(tmp, 0o600)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def add_key(path, name, *, rate=None, depth=None, key=None):
    """Add a new key named ``name`` to the key file (created when missing); returns the key.

    The key itself (``new_key()`` unless given) is returned once and never
    stored. Raises :class:`KeyFileError` for a bad name, an existing name,
    a bad bucket, or a damaged existing file.
    """
    _check_name(name)
    rate, depth = _check_bucket(name, rate, depth)
    entries = read_key_file(path) if os.path.exists(path) else {}
    if name in entries:
        raise KeyFileError(f"a key named {name!r} already exists in {path}; "
                           f"remove it first (`offload-serve keys remove {name}`)")
    key = key or new_key()
    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    entries[name] = KeyEntry(name, hash_key(key), created, rate, depth)
    write_key_file(path, entries)
    return key


def remove_key(path, name):
    """Remove the key ``name`` from the key file. Raises :class:`KeyFileError` when absent."""
    entries = read_key_file(path)
    if name not in entries:
        raise KeyFileError(f"no key named {name!r} in {path} (keys: {', '.join(entries) or 'none'})")
    del entries[name]
    write_key_file(path, entries)


class KeyStore:
    """The keys a server accepts, with their buckets; optionally reloaded when the file changes.

    Parameters
    ----------
    entries : dict ``{name: KeyEntry}``
    slot_s : float
        Bucket slot length in seconds.
    path : str, optional
        Key file the entries came from; when given, :meth:`maybe_reload`
        rereads it after it changes (checked at most every ``reload_s``
        seconds), so ``offload-serve keys add`` takes effect without a
        restart. A file that has become invalid is logged and ignored.
    clock : callable
        Seconds, monotonic (``time.monotonic``); tests pass a fake one.
    """

    def __init__(self, entries, *, slot_s=0.2, path=None, clock=time.monotonic, reload_s=1.0):
        if not (slot_s > 0 and math.isfinite(slot_s)):
            raise ValueError(f"slot length {slot_s!r} s must be a positive number")
        self.slot_s, self.path, self.clock, self.reload_s = float(slot_s), path, clock, reload_s
        self._buckets = {}
        self._lock = threading.Lock()
        self._install(entries)
        self._stamp = self._file_stamp()
        self._checked = clock()

    @classmethod
    def from_file(cls, path, **kw):
        """A store of the keys in ``path`` (:func:`read_key_file`), reloaded when it changes."""
        return cls(read_key_file(path), path=os.fspath(path), **kw)

    @classmethod
    def single(cls, key, *, name="default", rate=None, depth=None, **kw):
        """A store accepting one key (e.g. a throw-away key for a demo), no file."""
        rate, depth = _check_bucket(name, rate, depth)
        return cls({name: KeyEntry(_check_name(name), hash_key(key), "", rate, depth)}, **kw)

    def _install(self, entries):
        old = getattr(self, "_entries", {})
        self._entries = dict(entries)
        self._hashes = [(e.name, bytes.fromhex(e.sha256)) for e in self._entries.values()]
        now = self.clock()
        buckets = {}
        for e in self._entries.values():
            if not e.limited:
                continue
            prev = old.get(e.name)
            b = self._buckets.get(e.name)
            # A reload keeps a key's bucket state unless its limit changed.
            if b is not None and prev is not None and (prev.rate, prev.depth) == (e.rate, e.depth):
                buckets[e.name] = b
            else:
                buckets[e.name] = KeyBucket(e.rate, e.depth, self.slot_s, now)
        self._buckets = buckets

    def _file_stamp(self):
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def maybe_reload(self):
        """Reread the key file when it changed since the last look (at most every ``reload_s``)."""
        if self.path is None:
            return False
        now = self.clock()
        if now - self._checked < self.reload_s:
            return False
        self._checked = now
        stamp = self._file_stamp()
        if stamp == self._stamp or stamp is None:
            return False
        self._stamp = stamp
        try:
            entries = read_key_file(self.path)
        except KeyFileError as exc:
            import logging

            logging.getLogger(__name__).error("key file changed but is unusable, keeping the "
                                              "previous keys: %s", exc)
            return False
        with self._lock:
            self._install(entries)
        return True

    def __len__(self):
        return len(self._entries)

    @property
    def names(self):
        return list(self._entries)

    def check(self, presented):
        """Name of the key ``presented`` (a string), or ``None`` when it is no known key.

        Hashes the presented key and compares it with every stored hash by
        ``hmac.compare_digest``; the loop never stops early.
        """
        if not isinstance(presented, str) or not presented:
            return None
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found = None
        for name, h in self._hashes:
            if hmac.compare_digest(digest, h):
                found = name
        return found

    def take(self, name):
        """Spend one token of ``name``'s bucket: ``(allowed, retry_after_s)``; unlimited keys pass."""
        b = self._buckets.get(name)
        if b is None:
            return True, 0.0
        return b.take(self.clock())

    def bucket(self, name):
        """The :class:`KeyBucket` of ``name`` (``None`` when unlimited)."""
        return self._buckets.get(name)
