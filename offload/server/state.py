"""Where the buckets live: in this process (the default) or in Redis, shared by replicas.

``offload-serve`` decides every request that passes its key check through a
*state*: :class:`MemoryState` (this process's own :class:`~offload.server.keys.KeyBucket` s,
right for one replica) or :class:`RedisState` (``--state redis://HOST:PORT/DB``:
every key bucket and switch in one Redis, so any number of replicas enforce
one budget).

Redis: one Lua script (:data:`TAKE_SCRIPT`) updates the key's bucket and its
switch's bucket atomically, with Redis's own clock (``TIME``), so the
replicas' clocks never matter. Each bucket is a Redis hash ``offload:key:NAME``
or ``offload:switch:NAME`` with fields ``cfg`` (``"N P M slot_us"``: the bucket
and slot it was made for; a different one starts it over, full), ``t0`` (µs,
Redis time of its first request: slots are counted from there), ``slot``
(the last request's slot) and ``n`` (scaled tokens then). The equations are
those of ``offload.bucket`` and :class:`~offload.server.keys.KeyBucket`, in
integer microseconds (:func:`slot_of_us`, :func:`slot_start_us`). A bucket
idle for its full refill time plus an hour expires; it would be full by then
anyway.

Test hook: the script's first argument is a time in µs; empty (what the
server always passes) means Redis's ``TIME``. Tests pass a frozen clock to
compare exact sequences with the in-memory buckets (``tests/test_state.py``).

When Redis does not answer within ``timeout_ms`` (default
:data:`DEFAULT_TIMEOUT_MS`), the request is decided by ``failure``:
``"open"`` (the default) falls back to this replica's in-memory buckets, so a
key still gets at most its rate per replica and a device keeps its strong
answers through a Redis restart; ``"closed"`` refuses (503 + ``Retry-After``)
for a link whose budget must hold. Then for :data:`RETRY_S` seconds requests
skip Redis (no request waits on a dead Redis); the next one tries it again,
so the server reconnects by itself. An outage is logged once when it starts
and once when it ends, and counted in ``/metrics``.
"""

from __future__ import annotations

import logging
import math
import time
from urllib.parse import urlsplit

import anyio
from prometheus_client import Counter, Gauge, Histogram

from offload.server.keys import ADMITTED, Decision

__all__ = ["MemoryState", "RedisState", "StateError", "open_state", "slot_of_us",
           "slot_start_us", "TAKE_SCRIPT", "FAILURE_MODES", "DEFAULT_FAILURE",
           "DEFAULT_TIMEOUT_MS", "RETRY_S", "PREFIX"]

log = logging.getLogger("offload.server")

FAILURE_MODES = ("open", "closed")
#: Open: a Redis blip must not turn every camera's frames into weak-only answers;
#: the local buckets still hold each replica to the key's rate (docs/server.md).
DEFAULT_FAILURE = "open"
#: Longest wait for Redis per request, ms: a loopback or LAN round trip is well under 1 ms.
DEFAULT_TIMEOUT_MS = 50.0
#: After a failed Redis call, seconds during which requests do not try Redis.
RETRY_S = 0.5
#: Most connections one replica opens to Redis (requests beyond wait for one, within the timeout).
MAX_CONNECTIONS = 64
#: Prefix of the Redis keys holding the buckets.
PREFIX = "offload:"
_START_TIMEOUT_S = 2.0  # the check at start may wait longer than a request does

_RTT_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)


class StateError(ValueError):
    """An unusable ``--state``: a URL that does not parse, or a Redis that does not answer."""


def slot_of_us(t_us, t0_us, slot_us):
    """The slot of time ``t_us`` counted from ``t0_us`` (all integer µs): ``bucket.slot_index``, exact.

    ``floor((2 (t - t0) + slot) / (2 slot))``: half-up rounding of
    ``(t - t0) / slot`` in integers, as the Lua script computes it.
    """
    return (2 * (t_us - t0_us) + slot_us) // (2 * slot_us)


def slot_start_us(s, t0_us, slot_us):
    """The first µs of slot ``s``: ``t0 + ceil((2 s - 1) slot / 2)`` (``bucket.slot_start``, exact)."""
    return t0_us - (-((2 * s - 1) * slot_us) // 2)


#: The bucket update, run atomically by Redis. KEYS: the key's hash, the switch's hash.
#: ARGV: now (µs; "" = Redis TIME), the key's "N P M slot_us" ("" = no key bucket),
#: the switch's ("" = no switch). Returns {code, wait_us}: 0 admitted, 1 refused by
#: the key's bucket (the switch untouched), 2 refused by the switch (the key's token spent).
TAKE_SCRIPT = r"""
local function idiv(a, b)  -- floor(a / b) for integers a, b > 0 held in doubles, exact
  local q = math.floor(a / b)
  if q * b > a then q = q - 1 elseif (q + 1) * b <= a then q = q + 1 end
  return q
end
local function open(k, cfg, now)
  local N, P, M, S = string.match(cfg, "^(%d+) (%d+) (%d+) (%d+)$")
  N, P, M, S = tonumber(N), tonumber(P), tonumber(M), tonumber(S)
  local h = redis.call("HMGET", k, "cfg", "t0", "slot", "n")
  local b = {k = k, cfg = cfg, N = N, P = P, M = M, S = S}
  if h[1] == cfg then
    b.t0, b.slot, b.n = tonumber(h[2]), tonumber(h[3]), tonumber(h[4])
  else  -- new, expired, or made for another bucket: start full, slots from now
    b.t0, b.slot, b.n = now, 0, M
  end
  local s = idiv(2 * (now - b.t0) + S, 2 * S)
  if s < b.slot then s = b.slot end  -- a clock never runs backwards here
  b.n = math.min(M, b.n + N * (s - b.slot))
  b.slot = s
  return b
end
local function save(b)
  redis.call("HSET", b.k, "cfg", b.cfg, "t0", b.t0, "slot", b.slot, "n", b.n)
  local full = math.ceil(b.M / b.N) + 1  -- slots to refill from empty, and one more
  redis.call("PEXPIRE", b.k, math.floor(full * b.S / 1000) + 3600000)
end
local function wait(b, now)  -- µs until the slot in which n >= P begins
  local s = b.slot + idiv(b.P - b.n + b.N - 1, b.N)
  local x = (2 * s - 1) * b.S
  local start = b.t0 + (x + x % 2) / 2
  return start - now
end
local now = tonumber(ARGV[1])
if now == nil then
  local t = redis.call("TIME")
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local key, sw
if ARGV[2] ~= "" then
  key = open(KEYS[1], ARGV[2], now)
  if key.n < key.P then save(key); return {1, wait(key, now)} end
end
if ARGV[3] ~= "" then sw = open(KEYS[2], ARGV[3], now) end
if key then key.n = key.n - key.P; save(key) end
if sw then
  if sw.n < sw.P then save(sw); return {2, wait(sw, now)} end
  sw.n = sw.n - sw.P; save(sw)
end
return {0, 0}
"""


class _Metrics:
    """The state's part of ``/metrics``: admitted and refused per key and switch, Redis times."""

    def __init__(self, registry):
        self.keys = Counter("offload_key_requests", "Requests past the key check, by key and "
                            "result (admitted; refused by: key, switch, state).",
                            ["key", "result"], registry=registry)
        self.switches = Counter("offload_switch_requests", "Requests that reached a switch, by "
                                "switch and result (admitted, refused).",
                                ["switch", "result"], registry=registry)
        self.rtt = Histogram("offload_state_seconds", "Round trip of one bucket update in Redis, "
                             "seconds.", buckets=_RTT_BUCKETS, registry=registry)
        self.failures = Counter("offload_state_failures", "Redis calls that failed, by reason "
                                "(timeout, connection, error).", ["reason"], registry=registry)
        self.fallbacks = Counter("offload_state_fallbacks", "Requests decided without Redis, by "
                                 "--state-failure mode (open, closed).", ["mode"],
                                 registry=registry)
        self.up = Gauge("offload_state_up", "1 while the shared state answers (always 1 in "
                        "memory).", registry=registry)
        self.up.set(1)

    def count(self, grant, decision):
        result = "admitted" if decision.allowed else decision.refused_by
        self.keys.labels(grant.name, result).inc()
        if grant.switch is not None and decision.refused_by not in ("key", "state"):
            self.switches.labels(grant.switch, "admitted" if decision.allowed
                                 else "refused").inc()


class _State:
    """Common to both states: metrics, once bound to an app's registry."""

    kind = "memory"
    metrics = None

    def bind(self, registry):
        """Register this state's metrics in ``registry`` (the app does it once)."""
        if self.metrics is None:
            self.metrics = _Metrics(registry)

    async def admit(self, grant):
        """Decide one request of ``grant`` (a :class:`~offload.server.keys.Grant`): a ``Decision``."""
        if grant.bucket is None and grant.switch_bucket is None:
            return ADMITTED  # unlimited: nothing to count on, nothing to ask
        d = await self._decide(grant)
        if self.metrics is not None:
            self.metrics.count(grant, d)
        return d

    async def close(self):
        """Release connections (nothing in memory)."""

    def describe(self):
        return "in-memory buckets (this replica only)"


class MemoryState(_State):
    """This process's in-memory buckets (:meth:`Grant.admit`): one replica's view."""

    async def _decide(self, grant):
        return grant.admit()


def _parse_url(url):
    """``(redacted URL, host, port, db)`` of ``redis://HOST:PORT/DB``; :class:`StateError` if bad."""
    try:
        u = urlsplit(url)
        port = u.port or 6379
        host = u.hostname
    except ValueError as exc:
        raise StateError(f"--state {url!r} is not a valid URL: {exc}") from None
    if u.scheme not in ("redis", "rediss") or not host:
        raise StateError(f"--state {url!r} must look like redis://HOST:PORT/DB "
                         f"(or rediss:// for TLS)")
    db = u.path.lstrip("/") or "0"
    if not db.isdigit() or u.query or u.fragment:
        raise StateError(f"--state {url!r}: the path must be a database number, "
                         f"as in redis://{host}:{port}/0")
    shown = f"{u.scheme}://{host}:{port}/{int(db)}"  # never the password
    return shown, host, port, int(db)


class RedisState(_State):
    """Every key bucket and switch in one Redis; see the module docstring.

    Parameters
    ----------
    url : str
        ``redis://HOST:PORT/DB`` (``rediss://`` for TLS; a password as
        ``redis://:PASSWORD@HOST:PORT/DB``).
    timeout_ms : float
        Longest wait for Redis per request, ms.
    failure : str
        ``"open"`` (fall back to this replica's buckets) or ``"closed"`` (refuse).
    slot_s : float
        The key store's slot length, s (whole microseconds in Redis).
    clock : callable
        Monotonic seconds, for :data:`RETRY_S` (tests pass a fake one).
    """

    kind = "redis"

    def __init__(self, url, *, timeout_ms=DEFAULT_TIMEOUT_MS, failure=DEFAULT_FAILURE,
                 slot_s=0.2, clock=time.monotonic):
        import redis.asyncio as aredis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        if failure not in FAILURE_MODES:
            raise StateError(f"--state-failure {failure!r} must be one of {FAILURE_MODES}")
        if not (timeout_ms > 0 and math.isfinite(timeout_ms)):
            raise StateError(f"--state-timeout-ms {timeout_ms!r} must be a number > 0")
        self.shown, *_ = _parse_url(url)
        self.url, self.failure, self.timeout_s = url, failure, timeout_ms / 1000.0
        self.slot_us = int(round(slot_s * 1e6))
        if self.slot_us < 1:
            raise StateError(f"slot of {slot_s} s is under a microsecond")
        self.clock = clock
        # No retries inside the client: one request waits at most timeout_s, then falls back.
        self._pool = aredis.BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, timeout=self.timeout_s,
            socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s,
            retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self._client = aredis.Redis(connection_pool=self._pool)
        self._script = self._client.register_script(TAKE_SCRIPT)
        self._down_since = None  # monotonic time the outage began, None while up
        self._retry_at = -math.inf
        self._skipped = 0  # requests decided without Redis in this outage

    def describe(self):
        return (f"Redis state at {self.shown} (timeout {self.timeout_s * 1e3:g} ms, "
                f"--state-failure {self.failure})")

    def check(self):
        """Ask Redis once (PING and the script), synchronously; :class:`StateError` if it fails.

        The server calls it before it starts, so that it never runs with no
        limit because of a typo in ``--state``.
        """
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=_START_TIMEOUT_S,
                                      socket_connect_timeout=_START_TIMEOUT_S)
        try:
            client.ping()
            client.script_load(TAKE_SCRIPT)
        except (redis.RedisError, OSError) as exc:
            raise StateError(f"cannot use Redis at {self.shown} (--state): {exc}") from None
        finally:
            client.close()

    def _cfg(self, bucket):
        return "" if bucket is None else f"{bucket.N} {bucket.P} {bucket.M} {self.slot_us}"

    async def take(self, grant, *, now_us=None):
        """One bucket update in Redis for ``grant``: a ``Decision``; raises on a Redis failure.

        ``now_us``: the test hook (a frozen clock, µs); ``None`` uses Redis's ``TIME``.
        """
        keys = [f"{PREFIX}key:{grant.name}", f"{PREFIX}switch:{grant.switch or '-'}"]
        args = ["" if now_us is None else int(now_us), self._cfg(grant.bucket),
                self._cfg(grant.switch_bucket)]
        with anyio.fail_after(self.timeout_s):
            code, wait_us = await self._script(keys=keys, args=args)
        if code == 0:
            return ADMITTED
        who, name = ("key", grant.name) if code == 1 else ("switch", grant.switch)
        return Decision(False, wait_us / 1e6, who, name)

    async def _decide(self, grant):
        import redis

        now = self.clock()
        if self._down_since is not None and now < self._retry_at:
            return self._fallback(grant)
        self._retry_at = now + RETRY_S  # while this one tries, the others do not wait on it
        t0 = time.perf_counter()
        try:
            d = await self.take(grant)
        except (TimeoutError, redis.TimeoutError):
            return self._failed(grant, "timeout", f"no answer within {self.timeout_s * 1e3:g} ms")
        except (redis.ConnectionError, OSError) as exc:
            # Every pooled connection went to the same Redis: drop them all now, or
            # each would fail once more after a restart and look like a new outage.
            await self._pool.disconnect()
            return self._failed(grant, "connection", str(exc) or type(exc).__name__)
        except redis.RedisError as exc:
            return self._failed(grant, "error", str(exc) or type(exc).__name__)
        if self.metrics is not None:
            self.metrics.rtt.observe(time.perf_counter() - t0)
        if self._down_since is not None:
            log.warning("Redis state at %s answers again after %.1f s; %d requests were decided "
                        "without it (--state-failure %s)", self.shown, now - self._down_since,
                        self._skipped, self.failure)
            self._down_since, self._skipped = None, 0
            if self.metrics is not None:
                self.metrics.up.set(1)
        return d

    def _failed(self, grant, reason, why):
        if self.metrics is not None:
            self.metrics.failures.labels(reason).inc()
        if self._down_since is None:
            self._down_since = self.clock()
            log.error("Redis state at %s failed (%s): deciding requests %s until it answers "
                      "(--state-failure %s); logged once per outage", self.shown, why,
                      "with this replica's own buckets" if self.failure == "open"
                      else "as refused (503)", self.failure)
            if self.metrics is not None:
                self.metrics.up.set(0)
        return self._fallback(grant)

    def _fallback(self, grant):
        self._skipped += 1
        if self.metrics is not None:
            self.metrics.fallbacks.labels(self.failure).inc()
        if self.failure == "open":
            return grant.admit()
        return Decision(False, RETRY_S, "state", None)

    async def close(self):
        """Close the connections (at the app's shutdown; a Redis already gone is no error)."""
        import redis

        try:
            await self._client.aclose()
            await self._pool.disconnect()
        except (redis.RedisError, OSError):
            pass


def open_state(url, *, timeout_ms=DEFAULT_TIMEOUT_MS, failure=DEFAULT_FAILURE, slot_s=0.2):
    """The state of ``--state``: :class:`MemoryState` for ``None``/``"memory"``, else a checked
    :class:`RedisState`. Raises :class:`StateError` for a bad URL or a Redis that does not answer.
    """
    if url in (None, "", "memory"):
        return MemoryState()
    state = RedisState(url, timeout_ms=timeout_ms, failure=failure, slot_s=slot_s)
    state.check()
    return state
