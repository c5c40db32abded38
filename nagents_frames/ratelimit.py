"""Request and token budgets, server rate-limit signals and adaptive concurrency, shared by every request.

One :class:`RateLimiter` stands between an executor's workers and the server:

- two token buckets, requests per minute and tokens per minute (``rpm`` / ``tpm``), each refilled
  continuously and holding at most ``burst`` seconds of budget, so a fresh run does not fire a whole
  minute's budget at once;
- the server's own limits, learned from ``x-ratelimit-limit-*`` (OpenAI) and ``anthropic-ratelimit-*``
  headers, which tighten the buckets (never loosen what the user asked for);
- a global pause: a ``retry-after`` or an exhausted ``x-ratelimit-remaining-*`` stops *every* worker until
  the server's reset, instead of each worker finding out for itself with a 429 of its own;
- AIMD on the number of requests in flight: a 429 (or 503 / 529 overload) halves it, each success adds
  about one per round trip, so a storm slows the whole executor down and it speeds back up on its own;
- after a pause the in-flight limit restarts at a quarter and doubles back per round trip (slow start),
  and the first requests leave spread over a short ramp: no thundering herd when the pause ends.

Waiters are served in FIFO order. Everything is driven by an injectable clock and sleep, so the
invariants can be checked with a fake clock.

Example::

    >>> import asyncio
    >>> limiter = RateLimiter(rpm=600)            # 10 requests a second, bursts of a quarter second
    >>> waited = asyncio.run(limiter.acquire(tokens=100))  # returns the seconds waited
    >>> waited < 0.01
    True
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from nagents_frames.errors import ConfigurationError
from nagents_frames.providers._base import get_header
from nagents_frames.types import Message

__all__ = ["RateLimitSnapshot", "RateLimiter", "estimate_tokens", "parse_rate_limit_headers"]

DEFAULT_BURST_S = 0.25
"""Seconds of budget a bucket may hold: small, so bursts stay well within a per-minute window."""

LEARNED_HEADROOM = 0.02
"""A limit learned from the server's headers is used at 98%: its window and our bucket never align
exactly, and a 2% margin is cheaper than the 429s it avoids."""


def estimate_tokens(messages: Sequence[Message], max_tokens: int | None = None) -> int:
    """A cheap upper-ish estimate of a request's tokens (about 4 characters a token), before sending.

    >>> estimate_tokens([{"role": "user", "content": "x" * 400}], max_tokens=16)
    120
    """
    chars = 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif content is not None:
            chars += len(str(content))
    return chars // 4 + 4 * len(messages) + (max_tokens or 0)


def _parse_duration(value: str) -> float | None:
    """OpenAI reset durations look like ``1s``, ``6m0s``, ``20ms``, ``1h2m3.5s``; plain numbers are seconds.

    >>> _parse_duration("6m0.5s"), _parse_duration("20ms"), _parse_duration("junk")
    (360.5, 0.02, None)
    """
    value = value.strip()
    if value.endswith("s") and not value.endswith("ms"):
        # the common shape ("0.5s", "12.3s"): a float and a unit, without the general parser
        try:
            seconds = float(value[:-1])
        except ValueError:
            pass
        else:
            return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    parts = _DURATION_PART.findall(value)
    if not parts or "".join(number + unit for number, unit in parts) != value:
        return None
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ms|h|m|s)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True, slots=True)
class RateLimitSnapshot:
    """What a response's headers say of the server's budget (``None`` where they say nothing).

    >>> RateLimitSnapshot(remaining_requests=0).exhausted
    True
    """

    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests_s: float | None = None
    reset_tokens_s: float | None = None
    limit_requests: int | None = None
    limit_tokens: int | None = None

    @property
    def exhausted(self) -> bool:
        """Whether a budget is used up (the next request would be refused)."""
        return (self.remaining_requests is not None and self.remaining_requests <= 0) or (
            self.remaining_tokens is not None and self.remaining_tokens <= 0
        )


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return int(number) if math.isfinite(number) else None


def parse_rate_limit_headers(headers: Mapping[str, str]) -> RateLimitSnapshot | None:
    """Read OpenAI ``x-ratelimit-*`` and Anthropic ``anthropic-ratelimit-*`` headers (``None`` when absent).

    >>> parse_rate_limit_headers({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1.5s"})
    RateLimitSnapshot(remaining_requests=0, remaining_tokens=None, reset_requests_s=1.5, reset_tokens_s=None, limit_requests=None, limit_tokens=None)
    """
    rr = get_header(headers, "x-ratelimit-remaining-requests")
    rt = get_header(headers, "x-ratelimit-remaining-tokens")
    if rr is not None or rt is not None:
        reset_r = get_header(headers, "x-ratelimit-reset-requests")
        reset_t = get_header(headers, "x-ratelimit-reset-tokens")
        return RateLimitSnapshot(
            remaining_requests=_int(rr),
            remaining_tokens=_int(rt),
            reset_requests_s=_parse_duration(reset_r) if reset_r else None,
            reset_tokens_s=_parse_duration(reset_t) if reset_t else None,
            limit_requests=_int(get_header(headers, "x-ratelimit-limit-requests")),
            limit_tokens=_int(get_header(headers, "x-ratelimit-limit-tokens")),
        )
    ar = get_header(headers, "anthropic-ratelimit-requests-remaining")
    at = get_header(headers, "anthropic-ratelimit-tokens-remaining")
    if at is None:
        # Anthropic also splits tokens into input and output budgets; the tighter one governs
        split = [
            v
            for v in (
                _int(get_header(headers, "anthropic-ratelimit-input-tokens-remaining")),
                _int(get_header(headers, "anthropic-ratelimit-output-tokens-remaining")),
            )
            if v is not None
        ]
        if split:
            at = str(min(split))
    if ar is None and at is None:
        return None
    return RateLimitSnapshot(
        remaining_requests=_int(ar),
        remaining_tokens=_int(at),
        reset_requests_s=_reset_at(get_header(headers, "anthropic-ratelimit-requests-reset")),
        reset_tokens_s=_reset_at(
            get_header(headers, "anthropic-ratelimit-tokens-reset") or get_header(headers, "anthropic-ratelimit-input-tokens-reset")
        ),
        limit_requests=_int(get_header(headers, "anthropic-ratelimit-requests-limit")),
        limit_tokens=_int(
            get_header(headers, "anthropic-ratelimit-tokens-limit") or get_header(headers, "anthropic-ratelimit-input-tokens-limit")
        ),
    )


def _reset_at(value: str | None) -> float | None:
    """Anthropic gives an RFC 3339 time at which the bucket is full again."""
    if not value:
        return None
    from datetime import UTC, datetime

    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return _parse_duration(value)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


class _Bucket:
    """A token bucket refilled continuously at ``rate`` per second, holding at most ``capacity``."""

    __slots__ = ("capacity", "level", "rate", "stamp")

    def __init__(self, per_minute: float, now: float, burst_s: float, *, full: bool = True) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(self.rate * burst_s, 1.0)
        self.level = self.capacity if full else 0.0
        self.stamp = now

    def set_rate(self, per_minute: float, now: float, burst_s: float) -> None:
        self.refill(now)
        self.rate = per_minute / 60.0
        self.capacity = max(self.rate * burst_s, 1.0)
        self.level = min(self.level, self.capacity)

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
            self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` (at most a full bucket) is available (0 when it already is)."""
        need = min(amount, self.capacity) - self.level
        # a float hair short of the amount counts as there: sleeping 1e-17 s would never move the clock
        return 0.0 if need <= 1e-9 * max(amount, 1.0) else need / self.rate


class RateLimiter:
    """Requests-per-minute and tokens-per-minute budgets, server signals and adaptive concurrency.

    Every request calls :meth:`acquire` before it is sent and :meth:`release` once its answer (or
    failure) is in; :meth:`observe` feeds it the response's rate-limit headers, :meth:`record_usage`
    the tokens really used, :meth:`pause` a ``retry-after``. Share one limiter between executors that
    call the same account.

    Args:
        rpm, tpm: requests / tokens per minute (``None``: no budget of that kind; the server's headers
            may still set one).
        burst: seconds of budget a bucket may hold (how big a burst may leave at once).
        adaptive: halve the requests in flight on a 429 / overload answer and grow back on success.
        learn_limits: adopt the limits a server announces in its headers when they are tighter.
        clock, sleep: time source and sleep (a fake pair makes the limiter testable without waiting).

    >>> limiter = RateLimiter(rpm=1200, tpm=100_000)
    >>> limiter.rpm, limiter.effective_rpm
    (1200, 1200.0)
    """

    def __init__(
        self,
        rpm: float | None = None,
        tpm: float | None = None,
        *,
        burst: float = DEFAULT_BURST_S,
        adaptive: bool = True,
        learn_limits: bool = True,
        max_pause: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        for name, value in (("rpm", rpm), ("tpm", tpm)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0
            ):
                raise ConfigurationError(f"{name} must be a positive number, got {value!r}")
        if not (isinstance(burst, int | float) and math.isfinite(burst) and burst > 0):
            raise ConfigurationError(f"burst must be positive seconds, got {burst!r}")
        self.rpm = rpm
        self.tpm = tpm
        self.burst = float(burst)
        self.adaptive = adaptive
        self.learn_limits = learn_limits
        self.max_pause = max_pause
        self._clock = clock
        self._sleep = sleep
        now = clock()
        self._requests = _Bucket(rpm, now, self.burst) if rpm else None
        self._tokens = _Bucket(tpm, now, self.burst) if tpm else None
        self.learned_rpm: float | None = None
        """The request limit the server announced (per minute), once seen."""
        self.learned_tpm: float | None = None
        """The token limit the server announced (per minute), once seen."""
        self._paused_until = 0.0
        self._lock = asyncio.Lock()
        # adaptive concurrency (AIMD): inf until the first congestion signal
        self._limit = math.inf
        self._ssthresh = math.inf
        self._in_flight = 0
        self._peak = 0
        self._ceiling = 0
        self._epoch = 0
        self._slot_waiter: asyncio.Future[None] | None = None
        # the ramp after a pause: the next `_ramp_left` requests leave `_ramp_gap` apart
        self._ramp_left = 0
        self._ramp_gap = 0.0
        self._ramp_next = 0.0
        self.waited_s = 0.0
        """Total seconds that requests spent waiting in :meth:`acquire`."""
        self.pauses = 0
        """How many times a server signal paused every worker."""
        self.decreases = 0
        """How many times a 429 / overload halved the requests allowed in flight."""
        self.min_limit: float = math.inf
        """The lowest in-flight limit AIMD reached (``inf``: never limited)."""

    def expect_concurrency(self, requests: int) -> None:
        """Tell the limiter how many requests a caller may keep in flight (the executor's ``concurrency``);
        the adaptive limit is lifted once it grows back to this."""
        self._ceiling = max(self._ceiling, int(requests))

    # --- introspection -----------------------------------------------------------------------------------

    @property
    def effective_rpm(self) -> float | None:
        """The request rate in force: the user's ``rpm`` or the server's tighter announced limit."""
        return None if self._requests is None else self._requests.rate * 60.0

    @property
    def effective_tpm(self) -> float | None:
        """The token rate in force."""
        return None if self._tokens is None else self._tokens.rate * 60.0

    @property
    def counts_tokens(self) -> bool:
        """Whether requests should carry a token estimate (a token budget is in force)."""
        return self._tokens is not None

    @property
    def concurrency_limit(self) -> float:
        """Requests allowed in flight right now by AIMD (``inf`` when unconstrained)."""
        return self._limit

    @property
    def in_flight(self) -> int:
        """Requests acquired and not yet released."""
        return self._in_flight

    @property
    def epoch(self) -> int:
        """Bumped at each AIMD decrease; pass the value read after :meth:`acquire` to :meth:`release`."""
        return self._epoch

    @property
    def paused_until(self) -> float:
        """Clock time until which every worker waits (in the past when not paused)."""
        return self._paused_until

    # --- the request path ----------------------------------------------------------------------------------

    async def acquire(self, tokens: int = 0, *, until: float | None = None) -> float:
        """Wait until one request of ``tokens`` estimated tokens may leave; return the seconds waited.

        Counts the request as in flight until :meth:`release`. With ``until`` (a time of this limiter's
        clock), raises ``TimeoutError`` at once, without taking any budget, when the request could not
        leave before then.
        """
        if (
            self._requests is None
            and self._tokens is None
            and self._in_flight < self._limit
            and self._ramp_left == 0
            and not self._lock.locked()
            and self._paused_until <= self._clock()
        ):
            self._in_flight += 1
            if self._in_flight > self._peak:
                self._peak = self._in_flight
            return 0.0
        start = self._clock()
        # One waiter at a time holds the lock while it sleeps: FIFO release, no herd after a pause.
        async with self._lock:
            while True:
                now = self._clock()
                if self._paused_until > now:
                    await self._wait(self._paused_until - now, now, until)
                    continue
                if self._ramp_left and self._ramp_next > now:
                    await self._wait(self._ramp_next - now, now, until)
                    continue
                if self._in_flight >= self._limit:
                    await self._wait_for_slot(now, until)
                    continue
                delay = 0.0
                if self._requests is not None:
                    self._requests.refill(now)
                    delay = self._requests.wait_for(1)
                if self._tokens is not None and tokens:
                    self._tokens.refill(now)
                    delay = max(delay, self._tokens.wait_for(tokens))
                if delay <= 0:
                    break
                await self._wait(delay, now, until)
            if self._requests is not None:
                self._requests.level -= 1
            if self._tokens is not None and tokens:
                # the whole estimate is charged, even beyond the capacity: the level goes negative and
                # later requests wait it off, so large requests cannot exceed the long-run rate
                self._tokens.level -= tokens
            if self._ramp_left:
                self._ramp_left -= 1
                self._ramp_next = max(self._ramp_next, now) + self._ramp_gap
            self._in_flight += 1
            if self._in_flight > self._peak:
                self._peak = self._in_flight
        waited = self._clock() - start
        self.waited_s += waited
        return waited

    async def _wait(self, delay: float, now: float, until: float | None) -> None:
        if until is not None and now + delay > until:
            raise TimeoutError("the rate limits would hold this request past its deadline")
        await self._sleep(delay)

    async def _wait_for_slot(self, now: float, until: float | None) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._slot_waiter = waiter
        try:
            if until is None:
                await waiter
            else:
                # asyncio.wait does not cancel this task on timeout (a cancel racing with the wake-up
                # could otherwise leak into the caller's next await)
                await asyncio.wait({waiter}, timeout=max(until - now, 0.0))
                if not waiter.done():
                    raise TimeoutError("the adaptive concurrency limit would hold this request past its deadline")
        finally:
            self._slot_waiter = None
            if not waiter.done():
                waiter.cancel()

    def release(self, *, congested: bool = False, epoch: int | None = None) -> None:
        """A request acquired earlier is finished. ``congested``: it was answered 429 / 503 / 529.

        AIMD: a congestion signal halves the requests allowed in flight, once per round (signals from
        requests sent before the last decrease, i.e. with an older ``epoch``, do not count again); a
        success adds ``1 / limit``, about one per round trip, until the limit is lifted altogether.
        """
        if self._in_flight > 0:
            self._in_flight -= 1
        if self.adaptive:
            if congested:
                if epoch is None or epoch >= self._epoch:
                    base = min(self._limit, float(self._in_flight + 1))
                    self._limit = max(1.0, base / 2.0)
                    self._ssthresh = self._limit
                    self._epoch += 1
                    self.decreases += 1
                    self.min_limit = min(self.min_limit, self._limit)
            elif self._limit != math.inf:
                # slow start (one more per success: doubling per round trip) back up to the level of
                # the last decrease, then one more per round trip
                self._limit += 1.0 if self._limit < self._ssthresh else 1.0 / self._limit
                if self._limit >= max(self._peak, self._ceiling, 1):
                    self._limit = math.inf
                    self._ssthresh = math.inf
        waiter = self._slot_waiter
        if waiter is not None and not waiter.done() and self._in_flight < self._limit:
            waiter.set_result(None)

    def record_usage(self, estimated: int, actual: int) -> None:
        """Correct the token bucket once the server has said how many tokens a request really used."""
        if self._tokens is not None and actual >= 0:
            self._tokens.level = min(self._tokens.capacity, self._tokens.level + estimated - actual)

    def pause(self, seconds: float) -> None:
        """Stop every worker for ``seconds`` (extends, never shortens, a pause already set).

        When the pause ends, the waiting requests leave spread over a short ramp rather than at once.
        """
        if not seconds > 0:
            return
        seconds = min(seconds, self.max_pause)
        until = self._clock() + seconds
        if until > self._paused_until:
            self._paused_until = until
            self.pauses += 1
            ceiling = float(max(self._peak, self._ceiling, 1))
            width = self._limit if self._limit != math.inf else ceiling
            if self.adaptive:
                # restart small and let answers clock the rest out (slow start, doubling per round trip
                # up to half the ceiling), so the requests queued during the pause do not all leave the
                # moment it ends
                self._ssthresh = max(width, ceiling / 2.0, 1.0)
                self._limit = max(1.0, width / 4.0)
                self.min_limit = min(self.min_limit, self._limit)
                width = self._limit
            count = max(int(width), 1)
            ramp = min(max(seconds, 0.05), 1.0) * 0.5
            self._ramp_left = count
            self._ramp_gap = ramp / count
            self._ramp_next = until

    def observe(self, snapshot: RateLimitSnapshot | None) -> None:
        """Learn from a response's rate-limit headers: announced limits, and pause when a budget is used up."""
        if snapshot is None:
            return
        now = self._clock()
        if self.learn_limits:
            if snapshot.limit_requests and snapshot.limit_requests > 0:
                self._learn_requests(float(snapshot.limit_requests), now)
            if snapshot.limit_tokens and snapshot.limit_tokens > 0:
                self._learn_tokens(float(snapshot.limit_tokens), now)
        waits = []
        if snapshot.remaining_requests is not None and snapshot.remaining_requests <= 0:
            waits.append(snapshot.reset_requests_s if snapshot.reset_requests_s is not None else 1.0)
        if snapshot.remaining_tokens is not None and snapshot.remaining_tokens <= 0:
            waits.append(snapshot.reset_tokens_s if snapshot.reset_tokens_s is not None else 1.0)
        if waits:
            self.pause(max(waits))

    def _learn_requests(self, limit: float, now: float) -> None:
        if self.learned_rpm == limit:
            return
        self.learned_rpm = limit
        rate = limit * (1.0 - LEARNED_HEADROOM)
        if self.rpm is not None:
            rate = min(rate, self.rpm)
        if self._requests is None:
            # requests already sent before the first answer count against the server's window
            self._requests = _Bucket(rate, now, self.burst, full=False)
        else:
            self._requests.set_rate(rate, now, self.burst)

    def _learn_tokens(self, limit: float, now: float) -> None:
        if self.learned_tpm == limit:
            return
        self.learned_tpm = limit
        rate = limit * (1.0 - LEARNED_HEADROOM)
        if self.tpm is not None:
            rate = min(rate, self.tpm)
        if self._tokens is None:
            self._tokens = _Bucket(rate, now, self.burst, full=False)
        else:
            self._tokens.set_rate(rate, now, self.burst)
