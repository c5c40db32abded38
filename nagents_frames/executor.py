"""The chunked async engine: the only place that owns sockets, concurrency, timeouts, retries and budgets.

Requests arrive in chunks (lists of :class:`PreparedRequest`); a fixed pool of ``concurrency`` workers
sends them; results leave chunk by chunk *in input order* while later chunks are already in flight, so
the workers never idle at a chunk boundary and memory stays bounded by a few chunks.

::

    chunks ──► feeder ──► queue ──► N workers ──► adapter.build_request / transport.send / adapter.parse_response
                 │  (dedupe: identical keys share one request)         │ retries (RetryPolicy), budgets (RateLimiter)
                 └──────────────► ordered window of chunks ◄───────────┘ outcomes
                                        │
                                        ▼  run() yields (chunk, outcomes) in order

Until the first answer arrives only two requests are in flight, so bad credentials or an unknown model
(fatal errors) stop the run after a couple of requests instead of failing every row.

Example::

    >>> import asyncio
    >>> from nagents_frames import Provider
    >>> from nagents_frames.testing import FakeLLMServer
    >>> async def main():
    ...     async with FakeLLMServer() as server:
    ...         provider = Provider(provider_type="openai_compatible", model="echo", base_url=server.base_url)
    ...         async with Executor(provider, concurrency=4) as ex:
    ...             out = await ex.complete([{"role": "user", "content": "hi"}])
    ...     return out.response
    >>> asyncio.run(main())
    'echo: hi'
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import pyarrow as pa

from nagents_frames.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    ConfigurationError,
    DeadlineExceededError,
    MalformedResponseError,
    RequestError,
)
from nagents_frames.providers import Provider
from nagents_frames.providers._base import HTTPRequest, RawResponse
from nagents_frames.ratelimit import RateLimiter, estimate_tokens, parse_rate_limit_headers
from nagents_frames.types import GenerationParams, Message

__all__ = [
    "OUTCOME_SCHEMA",
    "Executor",
    "ExecutorStats",
    "FatalRunError",
    "HTTPTransport",
    "Outcome",
    "PreparedRequest",
    "RetryPolicy",
    "RunReport",
    "Timeouts",
    "Transport",
    "outcomes_to_arrow",
]

DEFAULT_RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how long to wait before trying a request again; shared by every provider.

    A failure is retried when its type says it is retryable (connection errors, timeouts, malformed
    bodies) or its HTTP status is in ``retry_statuses``, and attempts are left. The wait is exponential
    from ``base_delay`` up to ``max_delay`` with full jitter; a server's ``Retry-After`` wins when given
    (up to ``max_retry_after``).

    >>> RetryPolicy(max_attempts=3).backoff(1, rng=lambda: 1.0)
    0.5
    """

    max_attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 30.0
    jitter: bool = True
    retry_statuses: frozenset[int] = DEFAULT_RETRY_STATUSES
    retry_connection_errors: bool = True
    retry_malformed: bool = True
    max_retry_after: float = 120.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigurationError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ConfigurationError("retry delays must not be negative")

    def should_retry(self, error: RequestError, attempt: int) -> bool:
        """Whether to try again after ``attempt`` attempts failed with ``error``."""
        if attempt >= self.max_attempts or error.fatal:
            return False
        if isinstance(error, APIStatusError):
            return error.status_code in self.retry_statuses
        if isinstance(error, APIConnectionError):
            return self.retry_connection_errors
        if isinstance(error, MalformedResponseError):
            return self.retry_malformed
        return error.retryable

    def backoff(self, attempt: int, *, rng: Callable[[], float] = random.random) -> float:
        """Exponential delay after ``attempt`` failed attempts (full jitter when ``jitter``)."""
        ceiling = min(self.max_delay, self.base_delay * (2 ** (attempt - 1)))
        return ceiling * rng() if self.jitter else ceiling

    def delay(self, attempt: int, error: RequestError) -> float:
        """Seconds to wait before the next attempt."""
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            return min(float(retry_after), self.max_retry_after)
        return self.backoff(attempt)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Connect timeout and total time per request attempt, in seconds."""

    connect: float = 10.0
    request: float = 300.0

    def __post_init__(self) -> None:
        if self.connect <= 0 or self.request <= 0:
            raise ConfigurationError("timeouts must be positive")


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """One request ready for the executor.

    ``index`` is the row's position in its table or job, ``key`` a content hash of what is sent
    (model, messages, parameters): identical keys within one run are sent once. ``error`` marks a row
    that cannot be sent at all (no usable prompt); it becomes the row's outcome without a request.
    """

    index: int
    request_id: str
    key: str
    messages: tuple[Message, ...] | None
    params: GenerationParams | None = None
    error: RequestError | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """The final result of one request. ``attempts == 0`` means no request was sent for this row
    (its answer was shared from an identical request, or the row could not be sent)."""

    response: str | None = None
    error: str | None = None
    error_type: str | None = None
    status_code: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    attempts: int = 0
    latency_s: float | None = None
    finish_reason: str | None = None

    @classmethod
    def failure(cls, error: RequestError, *, attempts: int = 0, latency_s: float | None = None) -> Outcome:
        """The outcome of a request that ended with ``error``."""
        return cls(
            error=error.cell(),
            error_type=error.type_name,
            status_code=error.status_code,
            attempts=attempts,
            latency_s=latency_s,
        )

    def shared(self) -> Outcome:
        """This answer, as given to another row that asked the same thing (no request, no tokens)."""
        return Outcome(
            response=self.response,
            error=self.error,
            error_type=self.error_type,
            status_code=self.status_code,
            prompt_tokens=0 if self.prompt_tokens is not None else None,
            completion_tokens=0 if self.completion_tokens is not None else None,
            attempts=0,
            latency_s=0.0,
            finish_reason=self.finish_reason,
        )


OUTCOME_SCHEMA = pa.schema(
    [
        pa.field("row_index", pa.int64(), nullable=False),
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("request_key", pa.string(), nullable=False),
        pa.field("response", pa.string()),
        pa.field("error", pa.string()),
        pa.field("error_type", pa.string()),
        pa.field("status_code", pa.int32()),
        pa.field("prompt_tokens", pa.int64()),
        pa.field("completion_tokens", pa.int64()),
        pa.field("attempts", pa.int32(), nullable=False),
        pa.field("latency_s", pa.float64()),
        pa.field("finish_reason", pa.string()),
    ]
)
"""The Arrow schema of a chunk of results, as the store writes it and the frames read it."""


def outcomes_to_arrow(requests: Sequence[PreparedRequest], outcomes: Sequence[Outcome]) -> pa.Table:
    """One chunk's requests and outcomes as an Arrow table of :data:`OUTCOME_SCHEMA`."""
    columns = {
        "row_index": [r.index for r in requests],
        "request_id": [r.request_id for r in requests],
        "request_key": [r.key for r in requests],
        "response": [o.response for o in outcomes],
        "error": [o.error for o in outcomes],
        "error_type": [o.error_type for o in outcomes],
        "status_code": [o.status_code for o in outcomes],
        "prompt_tokens": [o.prompt_tokens for o in outcomes],
        "completion_tokens": [o.completion_tokens for o in outcomes],
        "attempts": [o.attempts for o in outcomes],
        "latency_s": [o.latency_s for o in outcomes],
        "finish_reason": [o.finish_reason for o in outcomes],
    }
    return pa.Table.from_pydict(columns, schema=OUTCOME_SCHEMA)


@dataclass
class ExecutorStats:
    """Running counters of one executor (mutable accumulator; see :meth:`report` for a frozen copy)."""

    requests_sent: int = 0
    succeeded: int = 0
    failed: int = 0
    shared: int = 0
    retries: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rate_limit_wait_s: float = 0.0
    backoff_wait_s: float = 0.0
    started_at: float = field(default_factory=time.monotonic)

    def report(self) -> RunReport:
        """A frozen snapshot."""
        return RunReport(
            requests_sent=self.requests_sent,
            succeeded=self.succeeded,
            failed=self.failed,
            shared=self.shared,
            retries=dict(self.retries),
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            rate_limit_wait_s=self.rate_limit_wait_s,
            backoff_wait_s=self.backoff_wait_s,
            elapsed_s=time.monotonic() - self.started_at,
        )


@dataclass(frozen=True)
class RunReport:
    """What happened in a run: attempts, retries by cause, time spent waiting, tokens.

    ``retries`` maps an error type (``RateLimitError``, ``ServerError`` ...) to how many retries it caused.
    """

    requests_sent: int = 0
    succeeded: int = 0
    failed: int = 0
    shared: int = 0
    retries: Mapping[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rate_limit_wait_s: float = 0.0
    backoff_wait_s: float = 0.0
    elapsed_s: float = 0.0

    @property
    def total_retries(self) -> int:
        """All retries, whatever their cause."""
        return sum(self.retries.values())


class FatalRunError(Exception):
    """Internal: carries a fatal :class:`RequestError` out of the workers (callers see the original)."""

    def __init__(self, error: RequestError) -> None:
        super().__init__(str(error))
        self.error = error


class Transport(Protocol):
    """Sends an :class:`HTTPRequest` and returns the raw response; raises :class:`RequestError` subclasses."""

    async def send(self, request: HTTPRequest, timeout: float) -> RawResponse:
        """Send one request within ``timeout`` seconds."""
        ...

    async def aclose(self) -> None:
        """Release connections / runtimes."""
        ...


class HTTPTransport:
    """aiohttp transport; the one place where aiohttp exceptions are turned into ours."""

    def __init__(self, *, concurrency: int, timeouts: Timeouts) -> None:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300, enable_cleanup_closed=True)
        self._timeouts = timeouts
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=timeouts.request, sock_connect=timeouts.connect),
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
            headers={"User-Agent": "nagents-frames"},
        )

    async def send(self, request: HTTPRequest, timeout: float) -> RawResponse:
        """POST the request; wrap every aiohttp / socket failure into our exception tree."""
        try:
            async with self._session.request(
                request.method,
                request.url,
                data=request.body,
                headers=request.headers,
                timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=self._timeouts.connect),
            ) as resp:
                body = await resp.read()
                return RawResponse(resp.status, resp.headers, body)
        except TimeoutError as exc:
            raise APITimeoutError(f"no complete answer within {timeout:g}s") from exc
        except aiohttp.ClientPayloadError as exc:
            raise MalformedResponseError(f"response body was cut off: {type(exc).__name__}") from exc
        except aiohttp.ClientResponseError as exc:
            raise MalformedResponseError(f"unreadable HTTP response: {exc.message}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise APIConnectionError(f"{type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        """Close the session and its connections."""
        await self._session.close()


class _Chunk:
    __slots__ = ("done", "outcomes", "remaining", "requests")

    def __init__(self, requests: Sequence[PreparedRequest]) -> None:
        self.requests = requests
        self.outcomes: list[Outcome | None] = [None] * len(requests)
        self.remaining = len(requests)
        self.done = asyncio.Event()
        if not requests:
            self.done.set()

    def settle(self, position: int, outcome: Outcome) -> None:
        self.outcomes[position] = outcome
        self.remaining -= 1
        if self.remaining == 0:
            self.done.set()


_ChunkSource = Iterable[Sequence[PreparedRequest]] | AsyncIterable[Sequence[PreparedRequest]]


class Executor:
    """Sends requests for one provider with bounded concurrency, budgets, timeouts and retries.

    Use as an async context manager (it owns the HTTP session). :meth:`run` processes a stream of
    chunks; :meth:`complete` sends a single request.

    Args:
        provider: the endpoint to call.
        concurrency: requests in flight at most.
        retry: the :class:`RetryPolicy`.
        timeouts: connect / per-request :class:`Timeouts`.
        rpm, tpm: request and token budgets per minute (``None``: only the server's signals apply).
        limiter: a :class:`RateLimiter` to share between executors (overrides ``rpm`` / ``tpm``).
        deadline: seconds for the whole run; requests not answered by then get a
            ``DeadlineExceededError`` row error.
        params: generation parameters for this run (layered over the provider's).
        dedupe_cache: how many finished answers are remembered to serve identical later requests.
        on_outcome: called with ``(outcome)`` for each finished row (progress bars).
    """

    def __init__(
        self,
        provider: Provider,
        *,
        concurrency: int = 64,
        retry: RetryPolicy | None = None,
        timeouts: Timeouts | None = None,
        rpm: float | None = None,
        tpm: float | None = None,
        limiter: RateLimiter | None = None,
        deadline: float | None = None,
        params: GenerationParams | None = None,
        dedupe_cache: int = 100_000,
        on_outcome: Callable[[Outcome], None] | None = None,
        transport: Transport | None = None,
    ) -> None:
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
            raise ConfigurationError(f"concurrency must be a positive integer, got {concurrency!r}")
        if deadline is not None and deadline <= 0:
            raise ConfigurationError(f"deadline must be positive seconds, got {deadline!r}")
        self.provider = provider
        self.concurrency = concurrency
        self.retry = retry or RetryPolicy()
        self.timeouts = timeouts or Timeouts()
        self.limiter = limiter or RateLimiter(rpm=rpm, tpm=tpm)
        self.deadline = deadline
        self.params = provider.params.merged(params)
        self.stats = ExecutorStats()
        self._adapter = provider.adapter
        self._transport = transport
        self._owns_transport = transport is None
        self._dedupe_cache = dedupe_cache
        self._on_outcome = on_outcome
        self._count_tokens = self.limiter.tpm is not None
        self._deadline_at: float | None = None
        self._opened = asyncio.Event()
        self._probe = asyncio.Semaphore(min(2, concurrency))
        self._cancelled = False

    async def __aenter__(self) -> Executor:
        if self._transport is None:
            factory = getattr(self._adapter, "make_transport", None)
            if factory is not None:
                self._transport = factory(self.provider, concurrency=self.concurrency)
            else:
                self._transport = HTTPTransport(concurrency=self.concurrency, timeouts=self.timeouts)
        if self.deadline is not None and self._deadline_at is None:
            self._deadline_at = time.monotonic() + self.deadline
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._owns_transport and self._transport is not None:
            await self._transport.aclose()
            self._transport = None

    def cancel(self) -> None:
        """Stop sending: no new request leaves after this (in-flight ones finish)."""
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancelled

    async def complete(
        self, messages: Sequence[Message], params: GenerationParams | None = None
    ) -> Outcome:
        """Send one request (with retries) and return its outcome; fatal errors are raised."""
        request = PreparedRequest(0, "0", "", tuple(messages), params)
        try:
            return await self._execute(request)
        except FatalRunError as exc:
            raise exc.error from None

    async def run(self, chunks: _ChunkSource, *, window: int | None = None) -> AsyncIterator[
        tuple[Sequence[PreparedRequest], list[Outcome]]
    ]:
        """Process ``chunks`` and yield ``(chunk, outcomes)`` in input order as each chunk completes.

        A fatal error (bad credentials, unknown model) is raised here, after at most a couple of requests.
        Closing the iterator (or cancelling its task) stops sending at once.
        """
        if self._transport is None:
            raise RuntimeError("use the Executor as 'async with Executor(...) as ex:'")
        queue: asyncio.Queue[tuple[_Chunk, int, PreparedRequest] | None] = asyncio.Queue(
            maxsize=self.concurrency * 2
        )
        ordered: deque[_Chunk] = deque()
        ready = asyncio.Condition()
        state: dict[str, Any] = {"fed": False, "fatal": None}
        inflight: dict[str, list[tuple[_Chunk, int]]] = {}
        finished: OrderedDict[str, Outcome] = OrderedDict()
        window_slots = asyncio.Semaphore(window or 2)
        sized = window is not None

        async def notify() -> None:
            async with ready:
                ready.notify_all()

        def settle(chunk: _Chunk, position: int, outcome: Outcome) -> None:
            chunk.settle(position, outcome)
            if self._on_outcome is not None:
                self._on_outcome(outcome)
            if chunk.remaining == 0:
                asyncio.get_running_loop().create_task(notify())

        async def feed() -> None:
            nonlocal window_slots, sized
            async for requests in _aiter(chunks):
                if not sized:
                    # enough chunks in flight that the queue never runs dry at a chunk boundary
                    per = max(len(requests), 1)
                    window_slots = asyncio.Semaphore(max(2, math.ceil(2 * self.concurrency / per) + 1))
                    sized = True
                await window_slots.acquire()
                chunk = _Chunk(requests)
                ordered.append(chunk)
                await notify()
                for position, request in enumerate(requests):
                    if self._cancelled:
                        return
                    if request.error is not None:
                        settle(chunk, position, Outcome.failure(request.error))
                        continue
                    cached = finished.get(request.key) if request.key else None
                    if cached is not None:
                        self.stats.shared += 1
                        settle(chunk, position, cached.shared())
                        continue
                    waiters = inflight.get(request.key) if request.key else None
                    if waiters is not None:
                        waiters.append((chunk, position))
                        continue
                    if request.key:
                        inflight[request.key] = []
                    await queue.put((chunk, position, request))
            state["fed"] = True
            await notify()

        async def work() -> None:
            while True:
                item = await queue.get()
                if item is None:
                    return
                chunk, position, request = item
                if self._cancelled:
                    continue
                try:
                    outcome = await self._execute(request)
                except FatalRunError as exc:
                    state["fatal"] = exc.error
                    await notify()
                    return
                except Exception as exc:  # a bug must surface, not leave its chunk waiting forever
                    state["fatal"] = exc
                    await notify()
                    return
                settle(chunk, position, outcome)
                if request.key:
                    for other_chunk, other_position in inflight.pop(request.key, ()):
                        self.stats.shared += 1
                        settle(other_chunk, other_position, outcome.shared())
                    if self._dedupe_cache:
                        finished[request.key] = outcome
                        if len(finished) > self._dedupe_cache:
                            finished.popitem(last=False)

        feeder = asyncio.create_task(feed())
        workers = [asyncio.create_task(work()) for _ in range(self.concurrency)]
        try:
            while True:
                async with ready:
                    await ready.wait_for(
                        lambda: state["fatal"] is not None
                        or (bool(ordered) and ordered[0].done.is_set())
                        or (state["fed"] and not ordered)
                        or (feeder.done() and not state["fed"])
                        or self._cancelled
                    )
                if state["fatal"] is not None:
                    raise state["fatal"]
                if feeder.done() and not state["fed"] and not self._cancelled:
                    feeder.result()  # re-raise an error of the chunk source
                if ordered and ordered[0].done.is_set():
                    chunk = ordered.popleft()
                    window_slots.release()
                    yield chunk.requests, [o for o in chunk.outcomes if o is not None]
                    continue
                if self._cancelled or (state["fed"] and not ordered):
                    return
        finally:
            feeder.cancel()
            for w in workers:
                w.cancel()
            await asyncio.gather(feeder, *workers, return_exceptions=True)

    async def _execute(self, request: PreparedRequest) -> Outcome:
        """One request with retries. Raises :class:`FatalRunError` for job-ending errors."""
        params = self.params if request.params is None else self.params.merged(request.params)
        messages = request.messages or ()
        http = self._adapter.build_request(self.provider, messages, params)
        estimate = estimate_tokens(messages, params.max_tokens) if self._count_tokens else 0
        transport = self._transport
        assert transport is not None
        started = time.monotonic()
        attempt = 0
        stats = self.stats
        while True:
            attempt += 1
            timeout = self.timeouts.request
            if self._deadline_at is not None:
                timeout = min(timeout, self._deadline_at - time.monotonic())
                if timeout <= 0:
                    stats.failed += 1
                    error = DeadlineExceededError("the job's deadline passed before this request was answered")
                    return Outcome(
                        error=f"DeadlineExceededError: {error}",
                        error_type="DeadlineExceededError",
                        attempts=attempt - 1,
                        latency_s=time.monotonic() - started,
                    )
            stats.rate_limit_wait_s += await self.limiter.acquire(estimate)
            probing = not self._opened.is_set()
            if probing:
                await self._probe.acquire()
            try:
                stats.requests_sent += 1
                try:
                    raw = await transport.send(http, timeout)
                    self.limiter.observe(parse_rate_limit_headers(raw.headers))
                    completion = self._adapter.parse_response(raw.status, raw.headers, raw.body)
                except RequestError as error:
                    if error.fatal:
                        raise FatalRunError(_redacted(self.provider, error)) from error
                    self._opened.set()
                    if self.retry.should_retry(error, attempt):
                        cause = error.type_name
                        stats.retries[cause] = stats.retries.get(cause, 0) + 1
                        delay = self.retry.delay(attempt, error)
                        retry_after = getattr(error, "retry_after", None)
                        if retry_after is not None:
                            self.limiter.pause(delay)
                        stats.backoff_wait_s += delay
                        await asyncio.sleep(delay)
                        continue
                    stats.failed += 1
                    return Outcome.failure(
                        _redacted(self.provider, error), attempts=attempt, latency_s=time.monotonic() - started
                    )
            finally:
                if probing:
                    self._probe.release()
            self._opened.set()
            stats.succeeded += 1
            usage = completion.usage
            if usage is not None:
                stats.prompt_tokens += usage.prompt_tokens
                stats.completion_tokens += usage.completion_tokens
                if self._count_tokens:
                    self.limiter.record_usage(estimate, usage.total_tokens)
            return Outcome(
                response=completion.text,
                prompt_tokens=usage.prompt_tokens if usage else None,
                completion_tokens=usage.completion_tokens if usage else None,
                attempts=attempt,
                latency_s=time.monotonic() - started,
                finish_reason=completion.finish_reason,
            )


def _redacted(provider: Provider, error: RequestError) -> RequestError:
    """The same error with the API key scrubbed from its message (servers sometimes echo it)."""
    clean = provider.redact(error.message)
    if clean != error.message:
        error.message = clean
        error.args = (clean,)
    return error


async def _aiter(source: _ChunkSource) -> AsyncIterator[Sequence[PreparedRequest]]:
    if isinstance(source, AsyncIterable):
        async for item in source:
            yield item
    else:
        for item in source:
            yield item
            await asyncio.sleep(0)
