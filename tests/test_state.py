"""The shared bucket state: the Lua/Redis buckets against the in-memory ones, and Redis failures.

Every test here runs a real ``redis-server`` (``redis_helpers``). Exact
sequences use the script's test hook (a frozen time in µs instead of Redis's
``TIME``) and are compared decision by decision with the in-memory
:class:`KeyBucket` s composed as :meth:`Grant.admit` composes them: the same
reference the core bucket is tested against (``bucket.refill`` and
``step_reference``). The slot length 0.199999 s puts every slot boundary
half a microsecond away from any whole-µs time, so the float slotting of
``KeyBucket`` and the integer slotting of the script cannot disagree there;
exact boundaries are tested on their own. The real-clock test bounds what
was admitted by the token-bucket equations over the Redis time it took;
failure tests use a fake clock for the retry interval, so nothing here
depends on how fast the machine is.
"""

import asyncio
import logging
import math
import time

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from offload.bucket import scale, slot_index, slot_start, step_reference
from offload.server.keys import Grant, KeyBucket
from offload.server.state import (
    RETRY_S, TAKE_SCRIPT, RedisState, StateError, open_state, slot_of_us, slot_start_us,
)

from redis_helpers import redis_server, shared_redis  # noqa: F401

SLOT_S = 0.199999
SLOT_US = 199999
T0_US = 1_800_000_000_000_000  # a Redis-like time, µs (exercises large doubles in Lua)
#: Where a test is about decisions, not timeouts: a loaded machine may hold a call for tens of ms.
GENEROUS_MS = 10_000


def _run(coro):
    return asyncio.run(coro)


# ----------------------------------------------------------------------------- slot arithmetic


@given(st.integers(-10**12, 10**12), st.integers(1, 10**7))
def test_integer_slots_agree_with_the_core(dt_us, slot_us):
    """slot_of_us / slot_start_us are bucket.slot_index / slot_start in exact integers."""
    s = slot_of_us(dt_us, 0, slot_us)
    start = slot_start_us(s, 0, slot_us)
    assert start <= dt_us < slot_start_us(s + 1, 0, slot_us)
    assert slot_of_us(start, 0, slot_us) == s and slot_of_us(start - 1, 0, slot_us) == s - 1
    # Away from a boundary (by more than float error) the float rule agrees.
    if min(dt_us - start, slot_start_us(s + 1, 0, slot_us) - dt_us) > 2:
        assert slot_index(dt_us / 1e6, 0.0, slot_us / 1e6) == s
        assert abs(slot_start(s, 0.0, slot_us / 1e6) * 1e6 - start) <= 1


def _grant(name, key, switch_name=None, switch=None):
    return Grant(name, key, lambda: 0.0, switch=switch_name, switch_bucket=switch)


async def _lua_slot(state, t_us, t0_us, slot_us):
    """The slot the script puts ``t_us`` in: a bucket made at ``t0_us`` holding 1 token, refill 1/slot."""
    b = KeyBucket(0.5, 1, slot_us / 1e6, 0.0)  # N=1, P=2, M=2: an empty bucket refills in 2 slots
    g = _grant(f"slot-{t0_us}-{t_us}", b)
    assert (await state.take(g, now_us=t0_us)).allowed  # made full at t0, now empty
    d = await state.take(g, now_us=t_us)
    # Refused at slot s (n = min(2, s) < 2 means s < 2): wait tells the slot it is in.
    return d


def test_script_slots_at_exact_boundaries(redis_server):
    """At and one µs around each half-slot boundary the script slots as slot_of_us (200 ms slots)."""
    async def go():
        state = RedisState(redis_server.url, slot_s=0.2, timeout_ms=GENEROUS_MS)
        try:
            for t in (0, 99_999, 100_000, 100_001, 299_999, 300_000):
                d = await _lua_slot(state, T0_US + t, T0_US, 200_000)
                s = slot_of_us(t, 0, 200_000)
                if s >= 2:
                    assert d.allowed
                else:  # n = s tokens (scaled), 2 needed: wait until slot 2 starts
                    assert not d.allowed and d.refused_by == "key"
                    assert round(d.wait_s * 1e6) == slot_start_us(2, 0, 200_000) - t
        finally:
            await state.close()

    _run(go())


# ----------------------------------------------------------------------------- exact sequences

_KEYS = {"a": (0.5, 2.0), "b": (0.3, 3.0), "c": None}  # c: no bucket of its own, only the switch
_SWITCHES = [(1.2, 4.0), (0.7, 2.0), (2.0, 1.0)]


class _Reference:
    """The in-memory buckets, each made at its first use (as a Redis hash is), composed as Grant.admit."""

    def __init__(self, switch):
        self.switch, self.keys, self.sw = switch, {}, None

    def grant(self, name, t_us):
        t = (t_us - T0_US) / 1e6
        if name not in self.keys:
            spec = _KEYS[name]
            self.keys[name] = None if spec is None else KeyBucket(*spec, SLOT_S, t)
        if self.sw is None:  # a first request always reaches the switch: a new key is full
            self.sw = KeyBucket(*self.switch, SLOT_S, t, any_rate=True)
        return Grant(name, self.keys[name], lambda: t, switch="uplink", switch_bucket=self.sw)


@settings(max_examples=60)
@given(switch=st.sampled_from(_SWITCHES),
       requests=st.lists(st.tuples(st.sampled_from(sorted(_KEYS)),
                                   st.one_of(st.integers(0, 3000), st.integers(0, 3 * SLOT_US)),
                                   st.integers(0, 2)),
                         min_size=5, max_size=60))
def test_lua_buckets_match_the_in_memory_ones(shared_redis, switch, requests):
    """Decision by decision (who refused, how long to wait), on frozen Redis time.

    Each request goes through one of three RedisStates (three replicas, each
    with its own connections); together they decide exactly as one
    in-memory replica does for the same sequence.
    """
    async def go():
        shared_redis.client().flushdb()
        states = [RedisState(shared_redis.url, slot_s=SLOT_S, timeout_ms=GENEROUS_MS)
                  for _ in range(3)]
        ref = _Reference(switch)
        t = T0_US
        try:
            for name, dt, replica in requests:
                t += dt
                g = ref.grant(name, t)
                want = g.admit()
                got = await states[replica].take(g, now_us=t)
                assert (got.allowed, got.refused_by, got.bucket) == \
                    (want.allowed, want.refused_by, want.bucket), (name, t - T0_US)
                assert got.wait_s == pytest.approx(want.wait_s, abs=2e-6)
        finally:
            for state in states:
                await state.close()

    _run(go())


@settings(max_examples=30)
@given(rate=st.sampled_from([0.1, 0.25, 0.5, 0.9, 1.0, 1.5, 3.0]),
       depth=st.sampled_from([1.0, 2.0, 3.5, 8.0]),
       gaps=st.lists(st.integers(0, 2), min_size=1, max_size=80))
def test_one_bucket_follows_step_reference(shared_redis, rate, depth, gaps):
    """A lone switch bucket, requests ``gap`` slots apart, against step_reference's recursion."""
    N, P, M = scale(rate, depth, any_rate=True)

    async def go():
        shared_redis.client().flushdb()
        state = RedisState(shared_redis.url, slot_s=SLOT_S, timeout_ms=GENEROUS_MS)
        sw = KeyBucket(rate, depth, SLOT_S, 0.0, any_rate=True)
        g = Grant("k", None, lambda: 0.0, switch="s", switch_bucket=sw)
        n, slot = M, 0
        try:
            for gap in gaps:
                slot += gap
                n = step_reference(n, False, gap, N, P, M)  # refill since the last request
                got = await state.take(g, now_us=T0_US + slot * SLOT_US)
                assert got.allowed == (n >= P)
                if got.allowed:
                    n -= P
        finally:
            await state.close()

    _run(go())


# ----------------------------------------------------------------------------- Redis's own clock


def test_real_time_admissions_stay_within_the_bound(redis_server):
    """On Redis's TIME: admitted * P <= M + N * slots spanned, per key and per switch."""
    async def go():
        state = RedisState(redis_server.url, slot_s=0.02, timeout_ms=GENEROUS_MS)
        key = KeyBucket(0.5, 2, 0.02, 0.0)
        sw = KeyBucket(0.8, 3, 0.02, 0.0, any_rate=True)
        g = Grant("k", key, lambda: 0.0, switch="s", switch_bucket=sw)
        client = redis_server.client()
        t_start = _redis_us(client)
        seen = {"admitted": 0, "key": 0, "switch": 0}
        try:
            for _ in range(300):
                d = await state.take(g)
                seen["admitted" if d.allowed else d.refused_by] += 1
                assert d.allowed or 0 < d.wait_s <= 0.02 * 4
        finally:
            await state.close()
        slots = (_redis_us(client) - t_start) // 20_000 + 1
        passed_key = seen["admitted"] + seen["switch"]
        assert passed_key * key.P <= key.M + key.N * slots
        assert seen["admitted"] * sw.P <= sw.M + sw.N * slots
        assert seen["admitted"] >= 1 and seen["key"] >= 1  # 300 requests do exhaust the buckets

    _run(go())


def _redis_us(client):
    s, us = client.time()
    return s * 1_000_000 + us


# ----------------------------------------------------------------------------- failures


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _limited_grant():
    key = KeyBucket(0.5, 2, 0.2, 0.0)
    sw = KeyBucket(1.0, 4, 0.2, 0.0, any_rate=True)
    return Grant("cam", key, lambda: 0.0, switch="up", switch_bucket=sw)


@pytest.mark.parametrize("failure", ["open", "closed"])
def test_redis_gone_then_back(redis_server, caplog, failure):
    """Killed: each request is decided at once by the failure mode, logged once, counted; back: resumes."""
    clock = _Clock()
    registry = CollectorRegistry()

    async def go():
        state = RedisState(redis_server.url, failure=failure, slot_s=0.2, clock=clock,
                           timeout_ms=GENEROUS_MS)  # a refused connection fails at once anyway
        state.bind(registry)
        g = _limited_grant()
        try:
            assert (await state.admit(g)).allowed  # up: Redis decides
            assert g.bucket.tokens == g.bucket.M  # ... and the local bucket was not touched
            redis_server.kill()
            with caplog.at_level(logging.WARNING, logger="offload.server"):
                decisions = []
                for _ in range(5):
                    t = time.perf_counter()
                    decisions.append(await state.admit(g))
                    assert time.perf_counter() - t < 5.0  # no hang (a guard; refused is fast)
                errors = [r for r in caplog.records if r.levelno == logging.ERROR]
                assert len(errors) == 1 and "once per outage" in errors[0].getMessage()
                if failure == "open":  # this replica's own buckets: depth 2 of the key
                    assert [d.allowed for d in decisions] == [True, True, False, False, False]
                    assert decisions[2].refused_by == "key"
                else:
                    assert all(d.refused_by == "state" and not d.allowed for d in decisions)
                assert _metric(registry, "offload_state_up") == 0
                assert _metric(registry, "offload_state_fallbacks_total", mode=failure) == 5
                # Within RETRY_S only the first request tried Redis.
                assert _metric(registry, "offload_state_failures_total", reason="connection") == 1
                redis_server.start()
                assert not (await state.admit(g)).allowed or failure == "open"  # still skipping
                clock.t += RETRY_S
                d = await state.admit(g)  # tries again: a fresh Redis, full buckets
                if not d.allowed:  # a pooled connection to the old process fails once
                    clock.t += RETRY_S
                    d = await state.admit(g)
                assert d.allowed and _metric(registry, "offload_state_up") == 1
                assert any("answers again" in r.getMessage() for r in caplog.records)
        finally:
            await state.close()

    _run(go())


def test_a_hung_redis_costs_a_request_at_most_the_timeout(redis_server):
    """SIGSTOP: the request that tries waits ~timeout_ms, then fails open; the next ones skip Redis."""
    clock = _Clock()
    registry = CollectorRegistry()

    async def go():
        state = RedisState(redis_server.url, timeout_ms=50, slot_s=0.2, clock=clock)
        state.bind(registry)
        g = _limited_grant()
        try:
            for _ in range(50):  # warm up (connect, load the script) without the breaker
                try:
                    assert (await state.take(g)).allowed
                    break
                except (TimeoutError, redis.TimeoutError):
                    pass  # a loaded machine: try again
            redis_server.pause()
            t = time.perf_counter()
            assert (await state.admit(g)).allowed  # the local bucket decides
            waited = time.perf_counter() - t
            assert waited >= 0.045  # it did wait for Redis, for the timeout ...
            assert waited < 5.0  # ... and not for seconds (a guard only)
            assert _metric(registry, "offload_state_failures_total", reason="timeout") == 1
            assert (await state.admit(g)).allowed
            # Skipped: the second request did not try Redis at all.
            assert _metric(registry, "offload_state_failures_total", reason="timeout") == 1
            assert _metric(registry, "offload_state_fallbacks_total", mode="open") == 2
        finally:
            redis_server.resume()
            await state.close()

    _run(go())


def _metric(registry, name, **labels):
    v = registry.get_sample_value(name, labels)
    return 0 if v is None else v


def test_bad_state_urls_refuse_to_start(redis_server):
    for url, message in [("http://x:1/0", "must look like redis://"),
                         ("redis://127.0.0.1:6379/zero", "database number"),
                         ("redis://127.0.0.1:99999/0", "not a valid URL"),
                         ("redis://127.0.0.1:1/0", "cannot use Redis at redis://127.0.0.1:1/0")]:
        with pytest.raises(StateError, match=message):
            open_state(url)
    with pytest.raises(StateError, match="--state-failure"):
        RedisState(redis_server.url, failure="maybe")
    assert open_state(None).kind == "memory"
    assert open_state(redis_server.url).kind == "redis"
    assert "TIME" in TAKE_SCRIPT and math.isfinite(RETRY_S)


def test_offload_serve_refuses_a_bad_or_unreachable_state(tmp_path):
    """One Error: line and exit 1, never a server running without its shared limits."""
    from click.testing import CliRunner

    from offload.server.cli import main as serve_main
    from offload.server.keys import add_key

    path = tmp_path / "keys.toml"
    add_key(path, "cam", rate=0.5, depth=2)
    for url, message in [("http://x:1/0", "must look like redis://HOST:PORT/DB"),
                         ("redis://127.0.0.1:1/0", "cannot use Redis at redis://127.0.0.1:1/0")]:
        r = CliRunner().invoke(serve_main, ["--keys", str(path), "--port", "0", "--state", url])
        assert r.exit_code == 1 and r.output.startswith("Error: "), r.output
        assert message in r.output and "Traceback" not in r.output
        assert "listening" not in r.output
