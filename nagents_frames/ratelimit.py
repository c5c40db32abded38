"""Request and token budgets shared by every request of an executor.

The limiter is a pair of token buckets (requests per minute, tokens per minute) plus a global pause
that a 429 storm or an exhausted ``x-ratelimit-remaining-*`` header sets for *all* workers at once, so a
rate-limited server is not hammered by every worker finding out for itself. Waiters are released in
FIFO order and spaced out, so there is no thundering herd after a pause.

Example::

    >>> import asyncio
    >>> limiter = RateLimiter(rpm=600)            # 10 requests a second, bursts up to 10
    >>> asyncio.run(limiter.acquire(tokens=100))  # returns the seconds waited
    0.0
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from nagents_frames.errors import ConfigurationError
from nagents_frames.types import Message

__all__ = ["RateLimitSnapshot", "RateLimiter", "estimate_tokens", "parse_rate_limit_headers"]


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
    """OpenAI reset durations look like ``1s``, ``6m0s``, ``20ms``, ``1h2m3.5s``; plain numbers are seconds."""
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    total = 0.0
    number = ""
    i = 0
    matched = False
    while i < len(value):
        ch = value[i]
        if ch.isdigit() or ch == ".":
            number += ch
            i += 1
            continue
        unit = ch
        if value.startswith("ms", i):
            unit = "ms"
        i += len(unit)
        if not number:
            return None
        scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}.get(unit)
        if scale is None:
            return None
        total += float(number) * scale
        number = ""
        matched = True
    return total if matched and not number else None


@dataclass(frozen=True, slots=True)
class RateLimitSnapshot:
    """What a response's headers say of the server's budget (``None`` where they say nothing)."""

    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests_s: float | None = None
    reset_tokens_s: float | None = None
    limit_requests: int | None = None
    limit_tokens: int | None = None


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(float(value))
    except ValueError:
        return None


def _get(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        for key, candidate in headers.items():
            if key.lower() == name:
                return candidate
    return value


def parse_rate_limit_headers(headers: Mapping[str, str]) -> RateLimitSnapshot | None:
    """Read OpenAI ``x-ratelimit-*`` and Anthropic ``anthropic-ratelimit-*`` headers.

    >>> parse_rate_limit_headers({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1.5s"})
    RateLimitSnapshot(remaining_requests=0, remaining_tokens=None, reset_requests_s=1.5, reset_tokens_s=None, limit_requests=None, limit_tokens=None)
    """
    rr = _get(headers, "x-ratelimit-remaining-requests")
    rt = _get(headers, "x-ratelimit-remaining-tokens")
    if rr is not None or rt is not None:
        reset_r = _get(headers, "x-ratelimit-reset-requests")
        reset_t = _get(headers, "x-ratelimit-reset-tokens")
        return RateLimitSnapshot(
            remaining_requests=_int(rr),
            remaining_tokens=_int(rt),
            reset_requests_s=_parse_duration(reset_r) if reset_r else None,
            reset_tokens_s=_parse_duration(reset_t) if reset_t else None,
            limit_requests=_int(_get(headers, "x-ratelimit-limit-requests")),
            limit_tokens=_int(_get(headers, "x-ratelimit-limit-tokens")),
        )
    ar = _get(headers, "anthropic-ratelimit-requests-remaining")
    at = _get(headers, "anthropic-ratelimit-tokens-remaining")
    if ar is not None or at is not None:
        return RateLimitSnapshot(
            remaining_requests=_int(ar),
            remaining_tokens=_int(at),
            reset_requests_s=_reset_at(_get(headers, "anthropic-ratelimit-requests-reset")),
            reset_tokens_s=_reset_at(_get(headers, "anthropic-ratelimit-tokens-reset")),
            limit_requests=_int(_get(headers, "anthropic-ratelimit-requests-limit")),
            limit_tokens=_int(_get(headers, "anthropic-ratelimit-tokens-limit")),
        )
    return None


def _reset_at(value: str | None) -> float | None:
    """Anthropic gives an RFC 3339 time at which the bucket is full again."""
    if not value:
        return None
    from datetime import datetime, timezone

    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return _parse_duration(value)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max((when - datetime.now(timezone.utc)).total_seconds(), 0.0)


class _Bucket:
    """A token bucket refilled continuously at ``rate`` per second, holding at most ``capacity``."""

    __slots__ = ("capacity", "level", "rate", "stamp")

    def __init__(self, per_minute: float, now: float) -> None:
        self.rate = per_minute / 60.0
        # A full minute's budget as burst would let a fresh executor fire all of it at once and then
        # stall; a second's worth (at least one request) keeps the rate smooth from the start.
        self.capacity = max(self.rate, 1.0)
        self.level = self.capacity
        self.stamp = now

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
            self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` is available (0 when it already is)."""
        need = min(amount, self.capacity) - self.level
        return 0.0 if need <= 0 else need / self.rate


class RateLimiter:
    """Requests-per-minute and tokens-per-minute budgets with a global pause, shared by all workers.

    ``acquire`` blocks until the budgets allow one more request of ``tokens`` estimated tokens;
    ``record_usage`` corrects the token budget with what the server reports; ``pause`` stops every
    worker until a moment (from ``retry-after`` or a reset header); ``observe`` reads rate-limit headers.

    ``rpm`` / ``tpm`` of ``None`` mean "no budget of that kind" (only the server's signals apply).
    """

    def __init__(
        self,
        rpm: float | None = None,
        tpm: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for name, value in (("rpm", rpm), ("tpm", tpm)):
            if value is not None and (not math.isfinite(value) or value <= 0):
                raise ConfigurationError(f"{name} must be a positive number, got {value!r}")
        self.rpm = rpm
        self.tpm = tpm
        self._clock = clock
        now = clock()
        self._requests = _Bucket(rpm, now) if rpm else None
        self._tokens = _Bucket(tpm, now) if tpm else None
        self._paused_until = 0.0
        self._lock = asyncio.Lock()
        self.waited_s = 0.0
        """Total seconds that requests spent waiting on budgets and pauses."""
        self.pauses = 0
        """How many times a server signal paused every worker."""

    async def acquire(self, tokens: int = 0) -> float:
        """Wait until one request of ``tokens`` estimated tokens fits the budgets; return seconds waited."""
        start = self._clock()
        if self._requests is None and self._tokens is None and self._paused_until <= start and not self._lock.locked():
            return 0.0
        # One waiter at a time holds the lock while it sleeps: FIFO release, no herd after a pause.
        async with self._lock:
            while True:
                now = self._clock()
                delay = self._paused_until - now
                if delay <= 0:
                    delay = 0.0
                    if self._requests is not None:
                        self._requests.refill(now)
                        delay = self._requests.wait_for(1)
                    if self._tokens is not None and tokens:
                        self._tokens.refill(now)
                        delay = max(delay, self._tokens.wait_for(tokens))
                if delay <= 0:
                    break
                await asyncio.sleep(delay)
            if self._requests is not None:
                self._requests.level -= 1
            if self._tokens is not None and tokens:
                self._tokens.level -= min(tokens, self._tokens.capacity)
        waited = self._clock() - start
        self.waited_s += waited
        return waited

    def record_usage(self, estimated: int, actual: int) -> None:
        """Correct the token bucket once the server has said how many tokens a request really used."""
        if self._tokens is not None and actual >= 0:
            self._tokens.level = min(self._tokens.capacity, self._tokens.level + estimated - actual)

    def pause(self, seconds: float) -> None:
        """Stop every worker for ``seconds`` (extends, never shortens, a pause already set)."""
        if seconds <= 0:
            return
        until = self._clock() + seconds
        if until > self._paused_until:
            self._paused_until = until
            self.pauses += 1

    def observe(self, snapshot: RateLimitSnapshot | None) -> None:
        """Pause when the server says a budget is exhausted until its reset."""
        if snapshot is None:
            return
        waits = []
        if snapshot.remaining_requests is not None and snapshot.remaining_requests <= 0:
            waits.append(snapshot.reset_requests_s or 1.0)
        if snapshot.remaining_tokens is not None and snapshot.remaining_tokens <= 0:
            waits.append(snapshot.reset_tokens_s or 1.0)
        if waits:
            self.pause(max(waits))
