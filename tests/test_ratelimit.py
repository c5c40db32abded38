"""The rate limiter: header parsing, budgets, pauses, ramps and AIMD, checked on a fake clock."""

from __future__ import annotations

import asyncio
import collections
import itertools
import math
import time
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from nagents_frames.errors import ConfigurationError
from nagents_frames.ratelimit import (
    LEARNED_HEADROOM,
    RateLimiter,
    RateLimitSnapshot,
    estimate_tokens,
    parse_rate_limit_headers,
)


class FakeClock:
    """A clock that only moves when someone sleeps on it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def limiter_on(clock: FakeClock, **kwargs: object) -> RateLimiter:
    return RateLimiter(clock=clock, sleep=clock.sleep, **kwargs)  # type: ignore[arg-type]


def max_in_window(stamps: list[float], window: float) -> int:
    """Most stamps in any closed interval of length ``window``."""
    best = 0
    start = 0
    for end, t in enumerate(stamps):
        while t - stamps[start] > window + 1e-9:
            start += 1
        best = max(best, end - start + 1)
    return best


# --- headers --------------------------------------------------------------------------------------------


def test_openai_headers_parsed() -> None:
    snap = parse_rate_limit_headers(
        {
            "x-ratelimit-limit-requests": "500",
            "x-ratelimit-remaining-requests": "499",
            "x-ratelimit-reset-requests": "120ms",
            "x-ratelimit-limit-tokens": "30000",
            "x-ratelimit-remaining-tokens": "0",
            "x-ratelimit-reset-tokens": "1m2.5s",
        }
    )
    assert snap == RateLimitSnapshot(
        remaining_requests=499,
        remaining_tokens=0,
        reset_requests_s=pytest.approx(0.12),
        reset_tokens_s=pytest.approx(62.5),
        limit_requests=500,
        limit_tokens=30000,
    )
    assert snap is not None and snap.exhausted


def test_header_names_are_case_insensitive_in_plain_dicts_and_multidicts() -> None:
    plain = parse_rate_limit_headers({"X-RateLimit-Remaining-Requests": "3", "X-RateLimit-Reset-Requests": "2s"})
    multi = parse_rate_limit_headers(
        CIMultiDictProxy(CIMultiDict({"X-RateLimit-Remaining-Requests": "3", "X-RateLimit-Reset-Requests": "2s"}))
    )
    assert plain == multi
    assert plain is not None and plain.remaining_requests == 3 and plain.reset_requests_s == 2.0


def test_anthropic_headers_parsed() -> None:
    reset = (datetime.now(UTC) + timedelta(seconds=30)).isoformat().replace("+00:00", "Z")
    snap = parse_rate_limit_headers(
        {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "0",
            "anthropic-ratelimit-requests-reset": reset,
            "anthropic-ratelimit-input-tokens-remaining": "900",
            "anthropic-ratelimit-output-tokens-remaining": "100",
        }
    )
    assert snap is not None
    assert snap.limit_requests == 50 and snap.remaining_requests == 0
    assert 25 < (snap.reset_requests_s or 0) <= 30
    assert snap.remaining_tokens == 100  # the tighter of input / output


@pytest.mark.parametrize(
    "headers",
    [{}, {"content-type": "application/json"}, {"x-ratelimit-limit-requests": "10"}],
)
def test_no_rate_limit_headers_gives_none(headers: dict[str, str]) -> None:
    assert parse_rate_limit_headers(headers) is None


@pytest.mark.parametrize("value", ["junk", "5x", "s", "1.2.3s", "nan"])
def test_unparseable_durations_are_ignored(value: str) -> None:
    snap = parse_rate_limit_headers({"x-ratelimit-remaining-requests": "abc", "x-ratelimit-reset-requests": value})
    assert snap is not None and snap.remaining_requests is None and snap.reset_requests_s is None


def test_estimate_tokens_counts_characters_and_max_tokens() -> None:
    assert estimate_tokens([{"role": "user", "content": "x" * 40}]) == 14
    assert estimate_tokens([{"role": "user", "content": "x" * 40}], max_tokens=100) == 114
    assert estimate_tokens([{"role": "user", "content": [{"type": "text", "text": "hi"}]}]) > 4


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf, True, "60"])
def test_invalid_budgets_rejected(bad: object) -> None:
    with pytest.raises(ConfigurationError):
        RateLimiter(rpm=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        RateLimiter(tpm=bad)  # type: ignore[arg-type]


# --- budgets on a fake clock ---------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    rpm=st.floats(min_value=30, max_value=6000),
    gaps=st.lists(st.floats(min_value=0, max_value=0.5), min_size=1, max_size=80),
)
def test_request_budget_never_exceeded_in_any_window(rpm: float, gaps: list[float]) -> None:
    clock = FakeClock()
    limiter = limiter_on(clock, rpm=rpm)
    stamps: list[float] = []

    async def scenario() -> None:
        for gap in gaps:
            clock.now += gap
            await limiter.acquire()
            stamps.append(clock.now)
            limiter.release()

    asyncio.run(scenario())
    rate = rpm / 60.0
    capacity = max(rate * limiter.burst, 1.0)
    for window in (0.1, 1.0, 5.0):
        assert max_in_window(stamps, window) <= rate * window + capacity + 1e-6
    # what the limiter says it waited is what it slept
    assert limiter.waited_s == pytest.approx(sum(clock.slept))


@settings(max_examples=60, deadline=None)
@given(
    tpm=st.floats(min_value=1000, max_value=200_000),
    sizes=st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=60),
)
def test_token_budget_never_exceeded_in_any_window(tpm: float, sizes: list[int]) -> None:
    clock = FakeClock()
    limiter = limiter_on(clock, tpm=tpm)
    spent: list[tuple[float, int]] = []

    async def scenario() -> None:
        for size in sizes:
            await limiter.acquire(tokens=size)
            spent.append((clock.now, size))
            limiter.release()

    asyncio.run(scenario())
    rate = tpm / 60.0
    capacity = max(rate * limiter.burst, 1.0)
    biggest = max(sizes)
    for i, (start, _) in enumerate(spent):
        for window in (1.0, 10.0):
            used = sum(size for t, size in spent[i:] if t - start <= window)
            # a request bigger than the bucket may leave once the bucket is full, and is paid off later
            assert used <= rate * window + max(capacity, biggest) + 1e-6


def test_record_usage_gives_back_overestimated_tokens() -> None:
    clock = FakeClock()
    limiter = limiter_on(clock, tpm=6000)  # 100 tokens/s, capacity 25

    async def scenario() -> float:
        await limiter.acquire(tokens=25)
        limiter.release()
        limiter.record_usage(estimated=25, actual=5)  # 20 tokens come back
        return await limiter.acquire(tokens=20)

    assert asyncio.run(scenario()) == 0.0


def test_requests_leave_in_fifo_order() -> None:
    clock = FakeClock()
    limiter = limiter_on(clock, rpm=600)
    order: list[int] = []

    async def one(i: int) -> None:
        await limiter.acquire()
        order.append(i)

    async def scenario() -> None:
        await asyncio.gather(*(one(i) for i in range(30)))

    asyncio.run(scenario())
    assert order == list(range(30))


def test_until_raises_without_taking_budget() -> None:
    clock = FakeClock()
    limiter = limiter_on(clock, rpm=60, burst=1.0)  # one request, then one a second

    async def scenario() -> None:
        await limiter.acquire()
        with pytest.raises(TimeoutError):
            await limiter.acquire(until=clock.now + 0.5)
        assert clock.now == 0.0  # gave up at once instead of sleeping to the deadline
        assert limiter.in_flight == 1
        waited = await limiter.acquire(until=clock.now + 2.0)
        assert waited == pytest.approx(1.0)

    asyncio.run(scenario())


# --- pauses, ramps, learned limits ---------------------------------------------------------------------------


def test_pause_holds_everyone_then_spreads_the_release() -> None:
    clock = FakeClock()
    limiter = limiter_on(clock)
    stamps: list[float] = []

    async def one() -> None:
        await limiter.acquire()
        stamps.append(clock.now)
        await clock.sleep(0.05)  # the request's round trip
        limiter.release()

    async def scenario() -> None:
        for _ in range(16):  # teach the limiter that 16 requests are usually in flight
            await limiter.acquire()
        for _ in range(16):
            limiter.release()
        limiter.pause(2.0)
        assert limiter.concurrency_limit == 4.0  # restarts at a quarter
        await asyncio.gather(*(one() for _ in range(32)))

    asyncio.run(scenario())
    assert min(stamps) >= 2.0
    # the first requests after the pause leave one by one over the ramp, the rest as answers come back
    assert all(b > a for a, b in itertools.pairwise(stamps[:4]))
    assert max(collections.Counter(stamps).values()) <= 2
    assert limiter.pauses == 1
    assert limiter.concurrency_limit == math.inf  # recovered once the answers kept coming


def test_pause_only_extends_and_is_capped() -> None:
    clock = FakeClock()
    limiter = limiter_on(clock, max_pause=10.0)
    limiter.pause(5.0)
    limiter.pause(1.0)
    assert limiter.paused_until == 5.0
    limiter.pause(1000.0)
    assert limiter.paused_until == 10.0
    limiter.pause(0.0)
    limiter.pause(-1.0)
    assert limiter.pauses == 2


def test_exhausted_budget_header_pauses_until_reset() -> None:
    clock = FakeClock()
    limiter = limiter_on(clock)
    limiter.observe(RateLimitSnapshot(remaining_requests=0, reset_requests_s=3.0))
    assert limiter.paused_until == 3.0
    limiter.observe(RateLimitSnapshot(remaining_requests=5, remaining_tokens=0))
    assert limiter.paused_until == 3.0  # a 1 s default does not shorten the pause
    limiter.observe(None)


@given(
    rpm=st.one_of(st.none(), st.floats(min_value=10, max_value=10_000)),
    announced=st.integers(min_value=1, max_value=100_000),
)
def test_learned_limit_only_tightens(rpm: float | None, announced: int) -> None:
    limiter = RateLimiter(rpm=rpm)
    limiter.observe(RateLimitSnapshot(remaining_requests=1, limit_requests=announced, limit_tokens=announced * 10))
    expected = announced * (1 - LEARNED_HEADROOM)
    if rpm is not None:
        expected = min(expected, rpm)
    assert limiter.effective_rpm == pytest.approx(expected)
    assert limiter.learned_rpm == announced
    assert limiter.counts_tokens and limiter.effective_tpm == pytest.approx(announced * 10 * (1 - LEARNED_HEADROOM))


def test_learning_can_be_switched_off() -> None:
    limiter = RateLimiter(learn_limits=False)
    limiter.observe(RateLimitSnapshot(remaining_requests=1, limit_requests=100))
    assert limiter.effective_rpm is None and not limiter.counts_tokens


# --- AIMD ------------------------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(events=st.lists(st.booleans(), min_size=1, max_size=200), width=st.integers(min_value=1, max_value=64))
def test_aimd_limit_stays_sane(events: list[bool], width: int) -> None:
    """Whatever the sequence of 429s and successes: the limit is >= 1, a congestion signal of the current
    round at least halves it, one of an older round does not, and success brings it back to unlimited."""
    clock = FakeClock()
    limiter = limiter_on(clock)

    async def top_up() -> None:
        while limiter.in_flight < min(width, limiter.concurrency_limit):
            await limiter.acquire()

    async def scenario() -> None:
        await top_up()
        for congested in events:
            before = limiter.concurrency_limit
            epoch = limiter.epoch
            limiter.release(congested=congested, epoch=epoch)
            after = limiter.concurrency_limit
            assert after >= 1.0
            if congested:
                assert after <= max(before / 2.0, 1.0)
                if limiter.in_flight:
                    # a signal from a request sent before this decrease does not count again
                    limiter.release(congested=True, epoch=epoch)
                    assert limiter.concurrency_limit == after
            else:
                assert after >= before
            assert limiter.in_flight <= max(width, 1)
            await top_up()
        for _ in range(100_000):
            if limiter.concurrency_limit == math.inf:
                break
            limiter.release()
            await top_up()
        assert limiter.concurrency_limit == math.inf

    asyncio.run(scenario())


async def test_aimd_gate_caps_requests_in_flight() -> None:
    limiter = RateLimiter()
    for _ in range(16):
        await limiter.acquire()
    limiter.release(congested=True, epoch=limiter.epoch)  # 15 in flight: limit 8
    assert limiter.concurrency_limit == 8.0
    waiter = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0.01)
    assert not waiter.done(), "over the limit: must wait for a slot"
    for _ in range(7):
        limiter.release()
    await asyncio.wait_for(waiter, 1.0)
    assert limiter.in_flight <= math.ceil(limiter.concurrency_limit)


async def test_aimd_gate_wait_respects_until() -> None:
    limiter = RateLimiter()
    for _ in range(4):
        await limiter.acquire()
    limiter.release(congested=True, epoch=limiter.epoch)  # 3 in flight, limit 2
    with pytest.raises(TimeoutError):
        await limiter.acquire(until=time.monotonic() + 0.05)
    assert limiter.in_flight == 3


@given(
    parts=st.lists(
        st.tuples(st.integers(min_value=0, max_value=999), st.sampled_from(["h", "m", "s", "ms"])),
        min_size=1,
        max_size=4,
    )
)
def test_duration_parts_add_up(parts: list[tuple[int, str]]) -> None:
    text = "".join(f"{n}{unit}" for n, unit in parts)
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    snap = parse_rate_limit_headers({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": text})
    assert snap is not None
    assert snap.reset_requests_s == pytest.approx(sum(n * scale[unit] for n, unit in parts))
