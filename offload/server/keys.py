"""API keys of the edge server: the accepted keys, their buckets, and live reloading.

The key file (``offload.server.keyfile``, re-exported here) holds only
SHA-256 hashes. A presented key is hashed and compared with every stored
hash (current and rotated-out keys of every name, revoked ones included)
by ``hmac.compare_digest``, and the loop never stops early; whether the
matching key is revoked or past its overlap is decided after the loop, so
the answer time does not tell which bytes or which entry matched, nor
whether a refused key was unknown, revoked or expired.

Per-key bucket: a name with ``rate``/``depth`` gets the device's token bucket
(``offload.bucket.scale`` -> integer ``(N, P, M)`` scaled tokens; SPEC
section 1), shared by all of the name's valid keys (one device, one budget).
Time is cut into slots of ``slot_s`` seconds (default 0.2 s) counted from the
bucket's creation; a request in slot ``s`` first refills ``N`` per slot since
the previous request (capped at ``M``), then is allowed iff ``n >= P`` and
spends ``P``. That is the device's ``n <- min(M, n - P*a + N*I)`` with ``I``
the slots between two requests; two requests in the same slot see no refill
between them.

Switches: a name with ``switch = "S"`` also passes switch ``S``'s bucket
(``[switches."S"]`` of the key file; the same bucket and slots, but a rate
that may be >= 1 token per slot, since many devices share it). A request is
checked against its key's bucket first; one refused there never touches the
switch. One the key's bucket lets through has spent its key token even when
the switch then refuses it, as a device's send the shared link drops has
spent the device's token (the fleet model, docs/fleet.md). :meth:`Grant.admit`
says which bucket refused (:class:`Decision`). These in-memory buckets are
one replica's; ``offload.server.state`` keeps them in Redis for many.

Reloading (:class:`KeyStore`): the file is looked at every ``reload_s``
seconds (default 0.25 s; a watcher thread while the app runs, and on
requests). A changed file is loaded once two looks ``reload_s`` apart see
the same (inode, mtime, size) and it reads back whole, so a file being
written in place (an editor, ``cat >``) is not taken before it is done;
``offload-serve keys`` commands replace the file by a rename, which is
atomic anyway. A change thus applies within about ``2 * reload_s``.
SIGHUP (:func:`reload_on_sighup`) rereads at once, even a file that looks
unchanged. A file that cannot be read or parsed keeps the previous
keys and is logged once per version. The new keys replace the old ones in
one step: a request sees either the old set or the new one.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import signal
import threading
import time

from typing import NamedTuple, Optional

from offload.bucket import Bucket, refill, scale, slot_index, slot_start
from offload.server.keyfile import (
    NAME_PATTERN, KeyEntry, KeyFileError, KeyTable, OldKey, SwitchEntry, add_key, add_switch,
    check_bucket, check_name, hash_key, new_key, parse_key_file, read_key_file, remove_key,
    remove_switch, revoke_key, rotate_key, write_key_file,
)


__all__ = [
    "KeyFileError", "KeyEntry", "OldKey", "SwitchEntry", "KeyTable", "KeyStore", "KeyBucket",
    "Grant", "Decision", "hash_key", "new_key", "read_key_file", "write_key_file", "add_key",
    "remove_key", "rotate_key", "revoke_key", "add_switch", "remove_switch", "reload_on_sighup",
    "NAME_PATTERN",
]

log = logging.getLogger(__name__)


class KeyBucket:
    """The core token bucket (``offload.bucket.Bucket``) plus a slotted clock (thread-safe).

    Slots follow ``offload.bucket.slot_index`` (half-up rounding, the device's
    rule: slot ``s`` covers ``[t0 + (s - 1/2) slot_s, t0 + (s + 1/2) slot_s)``);
    the count refills by ``offload.bucket.refill``, the rule ``step_reference``
    (the native bucket's reference) uses.

    Parameters
    ----------
    rate : float
        Tokens per slot, ``0 < rate < 1`` (any ``rate > 0`` with ``any_rate``).
    depth : float
        Depth in tokens, ``>= 1``.
    slot_s : float
        Slot length in seconds.
    now : float
        Clock reading (seconds) at creation; slots are counted from it. The
        bucket starts full.
    any_rate : bool
        A switch's bucket: ``rate >= 1`` allowed (``offload.bucket.scale``);
        ``bucket`` is then ``None``, since ``Bucket`` holds device buckets.
    """

    def __init__(self, rate, depth, slot_s, now, *, any_rate=False):
        self.N, self.P, self.M = scale(rate, depth, any_rate=any_rate)
        self.bucket = Bucket(self.N, self.P, self.M) if self.N < self.P else None
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
        (``bucket.slot_start``: slot ``s + k`` begins at ``t0 + (s + k - 1/2) slot_s``);
        always > 0, since that slot is a later one.
        """
        with self._lock:
            s = max(self.slot_of(now), self.slot)  # a clock never runs backwards here
            self.n = refill(self.n, s - self.slot, self.N, self.M)
            self.slot = s
            if self.n >= self.P:  # Bucket.can_send
                self.n -= self.P
                return True, 0.0
            k = -(-(self.P - self.n) // self.N)  # slots until n >= P (ceiling division)
            return False, slot_start(s + k, self.t0, self.slot_s) - now

    @property
    def tokens(self):
        """Scaled tokens after the last request (no refill applied)."""
        return self.n


class Decision(NamedTuple):
    """Whether a request may go on, and if not, who refused it and for how long.

    ``refused_by``: ``None`` (admitted), ``"key"`` (the key's own bucket),
    ``"switch"`` (switch ``bucket``), or ``"state"`` (the shared state could
    not be reached and ``--state-failure closed``). ``wait_s``: seconds until
    the refusing bucket has a token (0 when admitted).
    """

    allowed: bool
    wait_s: float = 0.0
    refused_by: Optional[str] = None
    bucket: Optional[str] = None


ADMITTED = Decision(True)


class Grant:
    """An accepted key: its name, the bucket its requests spend from, and its switch.

    All come from the same set of keys, so a reload between the check and
    the spend cannot pair a name with another set's bucket. ``entry`` is the
    key's :class:`KeyEntry`; ``switch`` the switch's name (``None``: none)
    and ``switch_bucket`` its in-memory :class:`KeyBucket`.
    """

    __slots__ = ("name", "bucket", "entry", "switch", "switch_bucket", "_clock")

    def __init__(self, name, bucket, clock, *, entry=None, switch=None, switch_bucket=None):
        self.name, self.bucket, self._clock = name, bucket, clock
        self.entry, self.switch, self.switch_bucket = entry, switch, switch_bucket

    def take(self):
        """Spend one token: ``(allowed, retry_after_s)``; :meth:`admit` without the who."""
        d = self.admit()
        return d.allowed, d.wait_s

    def admit(self):
        """Pass the key's bucket, then the switch's (in memory): a :class:`Decision`.

        A name without a bucket (or switch) passes that stage. A request the
        key's bucket refuses does not touch the switch.
        """
        now = self._clock()
        if self.bucket is not None:
            allowed, wait = self.bucket.take(now)
            if not allowed:
                return Decision(False, wait, "key", self.name)
        if self.switch_bucket is not None:
            allowed, wait = self.switch_bucket.take(now)
            if not allowed:
                return Decision(False, wait, "switch", self.switch)
        return ADMITTED


class _KeySet:
    """One consistent set of keys: entries, hashes, buckets, switch buckets; swapped in whole."""

    def __init__(self, entries, hashes, buckets, switches):
        self.entries, self.hashes, self.buckets = entries, hashes, buckets
        self.switches = switches  # {switch name: KeyBucket}
        self.warned = set()  # names whose refused (revoked, expired) keys were logged


class _Changing(Exception):
    """The key file changed while it was being read."""


class KeyStore:
    """The keys a server accepts, with their buckets; reloaded when the key file changes.

    Parameters
    ----------
    entries : dict ``{name: KeyEntry}``
    slot_s : float
        Bucket slot length in seconds.
    path : str, optional
        Key file the entries came from; when given, :meth:`maybe_reload`
        rereads it after it changes (looked at at most every ``reload_s``
        seconds; see the module docstring for when a change is taken), so
        ``offload-serve keys add/rotate/revoke/remove`` take effect without
        a restart. A file that has become unusable is logged and ignored.
    clock : callable
        Seconds, monotonic (``time.monotonic``): buckets and the reload
        interval. Tests pass a fake one.
    reload_s : float
        Seconds between two looks at the key file.
    wall_clock : callable
        Unix seconds (``time.time``): when rotated-out keys expire. Tests
        pass a fake one.
    """

    def __init__(self, entries, *, slot_s=0.2, path=None, clock=time.monotonic, reload_s=0.25,
                 wall_clock=time.time):
        if not (slot_s > 0 and math.isfinite(slot_s)):
            raise ValueError(f"slot length {slot_s!r} s must be a positive number")
        if not (reload_s > 0 and math.isfinite(reload_s)):
            raise ValueError(f"reload interval {reload_s!r} s must be a positive number")
        self.slot_s, self.path, self.clock, self.reload_s = float(slot_s), path, clock, reload_s
        self.wall_clock = wall_clock
        self._set = self._build(entries, None)
        self._stamp = self._file_stamp()  # the loaded version: (inode, mtime ns, size)
        self._pending = None  # an in-place change seen once, to be seen unchanged once more
        self._bad = False  # a version already logged as unusable (None: a missing file)
        self._checked = clock()
        self._forced = False
        self._reload_lock = threading.Lock()
        self._wake = threading.Event()
        self._watcher = None
        self._stopping = False

    @classmethod
    def from_file(cls, path, **kw):
        """A store of the keys in ``path`` (:func:`read_key_file`), reloaded when it changes."""
        path = os.fspath(path)
        read_key_file(path)  # the clear errors for a missing or unreadable file
        store = cls({}, path=path, **kw)
        try:
            stamp, data = store._read()
        except _Changing:
            raise KeyFileError(f"key file {path} changed while it was read; try again") from None
        store._set = store._build(parse_key_file(data, path), None)
        store._stamp = stamp
        return store

    @classmethod
    def single(cls, key, *, name="default", rate=None, depth=None, **kw):
        """A store accepting one key (e.g. a throw-away key for a demo), no file."""
        rate, depth = check_bucket(name, rate, depth)
        return cls({name: KeyEntry(check_name(name), hash_key(key), "", rate, depth)}, **kw)

    def _build(self, entries, old):
        switch_entries = dict(getattr(entries, "switches", {}))
        entries = KeyTable(entries, switch_entries)
        hashes = []
        for e in entries.values():
            # Revoked: every key of the name ends at -inf; a current key never ends.
            ends = -math.inf if e.revoked else math.inf
            hashes.append((e.name, bytes.fromhex(e.sha256), ends))
            hashes.extend((e.name, bytes.fromhex(o.sha256), min(ends, o.expires))
                          for o in e.previous)
        now = self.clock()
        buckets = {}
        for e in entries.values():
            if not e.limited:
                continue
            prev = old.entries.get(e.name) if old else None
            b = old.buckets.get(e.name) if old else None
            # A reload (a rotation too) keeps a name's bucket unless its limit changed.
            if b is not None and prev is not None and (prev.rate, prev.depth) == (e.rate, e.depth):
                buckets[e.name] = b
            else:
                buckets[e.name] = KeyBucket(e.rate, e.depth, self.slot_s, now)
        switches = {}
        for sw in switch_entries.values():
            prev = old.entries.switches.get(sw.name) if old else None
            b = old.switches.get(sw.name) if old else None
            if b is not None and prev == sw:  # kept unless its limit changed, like a key's
                switches[sw.name] = b
            else:
                switches[sw.name] = KeyBucket(sw.rate, sw.depth, self.slot_s, now, any_rate=True)
        return _KeySet(entries, hashes, buckets, switches)

    # ------------------------------------------------------------------ reloading

    def _file_stamp(self):
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _read(self):
        """``(stamp, bytes)`` of the key file; :class:`_Changing` when it changed meanwhile."""
        with open(self.path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if len(data) != st.st_size or self._file_stamp() != stamp:
            raise _Changing()
        return stamp, data

    def request_reload(self):
        """Reread the key file at the next look, which comes at once (safe in a signal handler)."""
        self._forced = True
        self._wake.set()

    def maybe_reload(self, *, force=False):
        """Look at the key file if ``reload_s`` has passed (or ``force``); True when reloaded.

        A forced look (SIGHUP, :meth:`request_reload`) rereads the file even
        when it looks unchanged, and takes an in-place change without waiting
        for a second look.
        """
        if self.path is None:
            return False
        now = self.clock()
        force = force or self._forced
        if not force and now - self._checked < self.reload_s:
            return False
        if not self._reload_lock.acquire(blocking=force):
            return False  # another thread is looking right now
        try:
            # Read and clear together: a SIGHUP arriving after this sets the flag anew.
            force, self._forced = force or self._forced, False
            self._checked = now
            return self._look(force)
        finally:
            self._reload_lock.release()

    def _look(self, force):
        stamp = self._file_stamp()
        if stamp is None:
            self._unusable(None, force, f"key file {self.path} is missing or unreadable")
            return False
        if stamp == self._stamp and not force:
            self._pending = None
            return False
        if not force and stamp != self._pending:
            # Maybe a write in progress (an editor writing in place): take the
            # file once a second look sees it unchanged. Telling a rename from
            # an in-place write by the inode fails when the inode is reused.
            self._pending = stamp
            return False
        self._pending = None
        try:
            stamp, data = self._read()
            entries = parse_key_file(data, self.path)
        except _Changing:
            return False  # a writer is at work; the next look sees the rest
        except OSError as exc:
            self._unusable(stamp, force, f"cannot read key file {self.path}: {exc}")
            return False
        except KeyFileError as exc:
            self._unusable(stamp, force, str(exc))
            self._stamp = stamp  # this version is judged; look again when it changes
            return False
        self._set = self._build(entries, self._set)
        self._stamp, self._bad = stamp, False
        revoked = sum(1 for e in entries.values() if e.revoked)
        log.info("key file %s %s: %d names (%d revoked)", self.path,
                 "reread (SIGHUP)" if force else "reloaded", len(entries), revoked)
        return True

    def _unusable(self, stamp, force, why):
        if force or stamp != self._bad:
            log.error("key file changed but is unusable, keeping the previous keys: %s", why)
        self._bad = stamp

    def start_watching(self):
        """Look at the key file every ``reload_s`` s in a daemon thread (the app does this)."""
        if self.path is None or self._watcher is not None:
            return
        self._stopping = False
        self._watcher = threading.Thread(target=self._watch, name="offload-keys", daemon=True)
        self._watcher.start()

    def stop_watching(self, timeout=5.0):
        """Stop the watcher thread (``timeout`` s)."""
        if self._watcher is None:
            return
        self._stopping = True
        self._wake.set()
        self._watcher.join(timeout)
        self._watcher = None

    def _watch(self):
        while True:
            self._wake.wait(self.reload_s)
            self._wake.clear()
            if self._stopping:
                return
            try:
                self.maybe_reload()
            except Exception:  # noqa: BLE001 - the watcher must outlive any surprise
                log.exception("looking at the key file failed")

    # ------------------------------------------------------------------ checking

    def __len__(self):
        return len(self._set.entries)

    @property
    def names(self):
        return list(self._set.entries)

    @property
    def entries(self):
        """The loaded ``{name: KeyEntry}`` (do not modify)."""
        return self._set.entries

    def authorize(self, presented):
        """A :class:`Grant` for the key ``presented`` (a string), or ``None`` when refused.

        Refused: no key, an unknown key, a key of a revoked name, or a
        rotated-out key past its overlap. The presented key's hash is
        compared with every stored hash by ``hmac.compare_digest``; the loop
        never stops early, and revocation and expiry are checked after it.
        """
        if not isinstance(presented, str) or not presented:
            return None
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        keys = self._set  # one set for the whole check
        found, ends = None, -math.inf
        for name, h, until in keys.hashes:
            if hmac.compare_digest(digest, h):
                found, ends = name, until
        if found is None:
            return None
        if not self.wall_clock() < ends:
            if found not in keys.warned:
                keys.warned.add(found)
                why = "revoked" if keys.entries[found].revoked else "rotated out, overlap over"
                log.warning("refused a key of %r (%s); logged once per name until the next "
                            "reload", found, why)
            return None
        entry = keys.entries[found]
        return Grant(found, keys.buckets.get(found), self.clock, entry=entry, switch=entry.switch,
                     switch_bucket=keys.switches.get(entry.switch))

    def check(self, presented):
        """Name of the accepted key ``presented``, or ``None`` (see :meth:`authorize`)."""
        grant = self.authorize(presented)
        return None if grant is None else grant.name

    def take(self, name):
        """Spend one token of ``name``'s bucket: ``(allowed, retry_after_s)``; unlimited keys pass."""
        b = self._set.buckets.get(name)
        if b is None:
            return True, 0.0
        return b.take(self.clock())

    def bucket(self, name):
        """The :class:`KeyBucket` of ``name`` (``None`` when unlimited)."""
        return self._set.buckets.get(name)

    @property
    def switches(self):
        """The loaded ``{switch name: SwitchEntry}`` (do not modify)."""
        return self._set.entries.switches

    def switch_bucket(self, name):
        """The in-memory :class:`KeyBucket` of switch ``name`` (``None`` when undefined)."""
        return self._set.switches.get(name)


def reload_on_sighup(store):
    """Make SIGHUP reread ``store``'s key file at once; True when installed.

    Only the main thread may install signal handlers, and not every system
    has SIGHUP: elsewhere this does nothing and returns False. The handler
    only sets a flag and wakes the watcher thread (no locks, no logging in
    the handler).
    """
    if not hasattr(signal, "SIGHUP") or threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGHUP, lambda signum, frame: store.request_reload())
    return True
