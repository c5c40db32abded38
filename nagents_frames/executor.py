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
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import aiohttp
import pyarrow as pa

from nagents_frames.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    ConfigurationError,
    JobCancelledError,
    MalformedResponseError,
    PromptError,
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
    "CONGESTION_STATUSES",
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
    """Connect timeout and total time per request attempt, in seconds.

    >>> Timeouts(connect=5, request=60).request
    60
    """

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

    >>> PreparedRequest(0, "req-1", "k", ({"role": "user", "content": "hi"},)).request_id
    'req-1'
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
    (its answer was shared from an identical request, or the row could not be sent).

    >>> Outcome(response="ok", attempts=1).shared().attempts
    0
    """

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


_OUTCOME_FIELDS: list[pa.Field[Any]] = [
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
OUTCOME_SCHEMA = pa.schema(_OUTCOME_FIELDS)
"""The Arrow schema of a chunk of results, as the store writes it and the frames read it."""


def outcomes_to_arrow(requests: Sequence[PreparedRequest], outcomes: Sequence[Outcome]) -> pa.Table:
    """One chunk's requests and outcomes as an Arrow table of :data:`OUTCOME_SCHEMA`."""
    columns: dict[str, list[Any]] = {
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


CONGESTION_STATUSES = frozenset({429, 503, 529})
"""Answers that mean "too much, slow down": they pause or shrink the whole executor, not just one request."""


@dataclass
class ExecutorStats:
    """Running counters of one executor (mutable accumulator; :meth:`report` gives a frozen copy).

    ``succeeded`` / ``failed`` count rows (including rows answered from an identical request, and rows
    that could not be sent); ``requests_sent`` counts HTTP attempts.
    """

    requests_sent: int = 0
    succeeded: int = 0
    failed: int = 0
    shared: int = 0
    retries: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rate_limited: int = 0
    rate_limit_wait_s: float = 0.0
    backoff_wait_s: float = 0.0
    deadline_exceeded: int = 0
    cancelled: bool = False
    started_at: float = field(default_factory=time.monotonic)
    limiter: RateLimiter | None = field(default=None, repr=False)
    _base_pauses: int = field(default=0, repr=False)
    _base_decreases: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if self.limiter is not None:
            self._base_pauses = self.limiter.pauses
            self._base_decreases = self.limiter.decreases

    def count(self, outcome: Outcome) -> None:
        """Count one finished row."""
        if outcome.error is None:
            self.succeeded += 1
        else:
            self.failed += 1
            kind = outcome.error_type or "Error"
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def report(self) -> RunReport:
        """A frozen snapshot.

        >>> ExecutorStats(requests_sent=3, retries={"ServerError": 2}).report().total_retries
        2
        """
        limiter = self.limiter
        min_limit = limiter.min_limit if limiter is not None else math.inf
        return RunReport(
            requests_sent=self.requests_sent,
            succeeded=self.succeeded,
            failed=self.failed,
            shared=self.shared,
            retries=dict(self.retries),
            errors=dict(self.errors),
            statuses=dict(self.statuses),
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            rate_limited=self.rate_limited,
            rate_limit_wait_s=self.rate_limit_wait_s,
            backoff_wait_s=self.backoff_wait_s,
            pauses=(limiter.pauses - self._base_pauses) if limiter is not None else 0,
            slowdowns=(limiter.decreases - self._base_decreases) if limiter is not None else 0,
            min_concurrency=None if min_limit == math.inf else int(min_limit),
            deadline_exceeded=self.deadline_exceeded,
            cancelled=self.cancelled,
            elapsed_s=time.monotonic() - self.started_at,
        )


@dataclass(frozen=True)
class RunReport:
    """What happened in a run: attempts, retries by cause, answers by status, time spent waiting, tokens.

    - ``requests_sent``: HTTP attempts (first tries and retries); ``retries`` maps an error type
      (``RateLimitError``, ``ServerError``, ``APITimeoutError`` ...) to the retries it caused.
    - ``succeeded`` / ``failed``: rows with an answer / an error; ``errors`` counts the failed rows by
      error type; ``shared``: rows answered from an identical request without a request of their own.
    - ``statuses``: HTTP error statuses received (every attempt); ``rate_limited``: 429 / 503 / 529 among them.
    - ``rate_limit_wait_s``: seconds requests were held back by budgets, server pauses and the adaptive
      limit, or slept before retrying a 429 / overload answer; ``backoff_wait_s``: seconds slept before
      retrying other failures (summed over requests, so it can exceed ``elapsed_s``).
    - ``pauses``: global pauses set by ``retry-after`` / exhausted budgets; ``slowdowns``: times a 429
      storm halved the requests in flight, down to ``min_concurrency`` at worst (``None``: never).
    - ``deadline_exceeded``: rows that got ``DeadlineExceededError``; ``cancelled``: the run was cancelled.

    >>> RunReport(retries={"RateLimitError": 3, "ServerError": 1}).total_retries
    4
    """

    requests_sent: int = 0
    succeeded: int = 0
    failed: int = 0
    shared: int = 0
    retries: Mapping[str, int] = field(default_factory=dict)
    errors: Mapping[str, int] = field(default_factory=dict)
    statuses: Mapping[int, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rate_limited: int = 0
    rate_limit_wait_s: float = 0.0
    backoff_wait_s: float = 0.0
    pauses: int = 0
    slowdowns: int = 0
    min_concurrency: int | None = None
    deadline_exceeded: int = 0
    cancelled: bool = False
    elapsed_s: float = 0.0

    @property
    def total_retries(self) -> int:
        """All retries, whatever their cause."""
        return sum(self.retries.values())

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping (status keys as strings), as the store persists it on the job.

        >>> RunReport(statuses={429: 2}).as_dict()["statuses"]
        {'429': 2}
        """
        out = asdict(self)
        out["statuses"] = {str(k): v for k, v in self.statuses.items()}
        out["retries"] = dict(self.retries)
        out["errors"] = dict(self.errors)
        out["total_retries"] = self.total_retries
        return out


class FatalRunError(Exception):
    """Internal: carries a fatal :class:`RequestError` out of the workers (callers see the original)."""

    def __init__(self, error: RequestError) -> None:
        super().__init__(str(error))
        self.error = error


class Transport(Protocol):
    """Sends an :class:`HTTPRequest` and returns the raw response; raises :class:`RequestError` subclasses."""

    async def send(self, request: HTTPRequest, timeout: float) -> RawResponse:  # noqa: ASYNC109
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
        # one shared object for the common case: a fresh ClientTimeout per request is measurable overhead
        self._default_timeout = aiohttp.ClientTimeout(total=timeouts.request, sock_connect=timeouts.connect)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=timeouts.request, sock_connect=timeouts.connect),
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
            headers={"User-Agent": "nagents-frames"},
        )

    async def send(self, request: HTTPRequest, timeout: float) -> RawResponse:  # noqa: ASYNC109
        """POST the request; wrap every aiohttp / socket failure into our exception tree."""
        try:
            async with self._session.request(
                request.method,
                request.url,
                data=request.body,
                headers=request.headers,
                timeout=self._default_timeout
                if timeout == self._timeouts.request
                else aiohttp.ClientTimeout(total=timeout, sock_connect=self._timeouts.connect),
            ) as resp:
                body = await resp.read()
                return RawResponse(resp.status, resp.headers, body)
        except TimeoutError as exc:
            raise APITimeoutError(f"no complete answer within {timeout:g}s") from exc
        except aiohttp.ClientPayloadError as exc:
            raise MalformedResponseError(f"response body was cut off: {type(exc).__name__}") from exc
        except aiohttp.ClientResponseError as exc:
            raise MalformedResponseError(f"unreadable HTTP response: {exc.message}") from exc
        except (aiohttp.ClientError, OSError, EOFError) as exc:
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


class _Cancelled(Exception):
    """Internal: the executor was cancelled before this request could be sent."""


class Executor:
    """Sends requests for one provider with bounded concurrency, budgets, timeouts and retries.

    Use as an async context manager (it owns the HTTP session). :meth:`run` processes a stream of
    chunks; :meth:`complete` sends a single request.

    Args:
        provider: the endpoint to call.
        concurrency: requests in flight at most (a 429 storm lowers it for a while; see :class:`RateLimiter`).
        retry: the :class:`RetryPolicy`.
        timeouts: connect / per-request :class:`Timeouts`.
        rpm, tpm: request and token budgets per minute (``None``: only the server's signals apply).
        limiter: a :class:`RateLimiter` to share between executors (overrides ``rpm`` / ``tpm``).
        deadline: seconds for the whole run, counted from entering the executor; requests not answered
            by then get a ``DeadlineExceededError`` row error (requests in flight are cut short).
        params: generation parameters for this run (layered over the provider's).
        dedupe_cache: how many finished answers are remembered to serve identical later requests.
        on_outcome: called with ``(outcome)`` for each finished row (progress bars).
        validate: called with each answer's text; raising a :class:`RequestError` (e.g.
            ``ResponseValidationError``) makes it that row's error (structured outputs).

    ``stats`` counts what happened; ``stats.report()`` is a frozen :class:`RunReport`.
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
        validate: Callable[[str], object] | None = None,
    ) -> None:
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
            raise ConfigurationError(f"concurrency must be a positive integer, got {concurrency!r}")
        if deadline is not None and (
            isinstance(deadline, bool) or not isinstance(deadline, int | float) or not deadline > 0
        ):
            raise ConfigurationError(f"deadline must be positive seconds, got {deadline!r}")
        self.provider = provider
        self.concurrency = concurrency
        self.retry = retry or RetryPolicy()
        self.timeouts = timeouts or Timeouts()
        self.limiter = limiter or RateLimiter(rpm=rpm, tpm=tpm)
        self.limiter.expect_concurrency(concurrency)
        self.deadline = deadline
        self.params = provider.params.merged(params)
        self.stats = ExecutorStats(limiter=self.limiter)
        self._adapter = provider.adapter
        self._transport = transport
        self._owns_transport = transport is None
        self._dedupe_cache = dedupe_cache
        self._on_outcome = on_outcome
        self._validate = validate
        self._deadline_at: float | None = None
        self._opened = asyncio.Event()
        self._probe_limit = min(2, concurrency)
        self._probes = 0
        self._probe_waiters: deque[asyncio.Future[None]] = deque()
        self._cancelled = False
        self._fatal: RequestError | None = None
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __aenter__(self) -> Executor:
        if self._transport is None:
            factory = getattr(self._adapter, "make_transport", None)
            if factory is not None:
                self._transport = factory(self.provider, concurrency=self.concurrency)
            else:
                self._transport = HTTPTransport(concurrency=self.concurrency, timeouts=self.timeouts)
        if self.deadline is not None and self._deadline_at is None:
            self._deadline_at = time.monotonic() + self.deadline
        self._loop = asyncio.get_running_loop()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._owns_transport and self._transport is not None:
            await self._transport.aclose()
            self._transport = None

    def cancel(self) -> None:
        """Stop sending: no request leaves after this; :meth:`run` yields what is complete and returns.

        Safe to call from another thread. Requests in flight at that moment are abandoned.
        """
        self._cancelled = True
        self.stats.cancelled = True
        wake, loop = self._wake, self._loop
        if wake is None or loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            wake.set()
        else:
            loop.call_soon_threadsafe(wake.set)

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancelled

    async def complete(
        self, messages: Sequence[Message], params: GenerationParams | None = None
    ) -> Outcome:
        """Send one request (with retries) and return its outcome; fatal errors are raised.

        Raises :class:`~nagents_frames.errors.JobCancelledError` after :meth:`cancel`.
        """
        request = PreparedRequest(0, "0", "", tuple(messages), params)
        try:
            outcome = await self._execute(request)
        except FatalRunError as exc:
            raise exc.error from None
        except _Cancelled:
            raise JobCancelledError("the executor was cancelled") from None
        self.stats.count(outcome)
        return outcome

    async def run(
        self, chunks: _ChunkSource, *, window: int | None = None, keep_partial: bool = False
    ) -> AsyncIterator[tuple[Sequence[PreparedRequest], list[Outcome]]]:
        """Process ``chunks`` and yield ``(chunk, outcomes)`` in input order as each chunk completes.

        A fatal error (bad credentials, unknown model) is raised here, after at most a couple of requests.
        After :meth:`cancel` no request leaves; the chunks already complete are yielded, then, with
        ``keep_partial``, the rows of unfinished chunks that do have an outcome (as shorter
        ``(requests, outcomes)`` pairs), and the iterator ends. Closing the iterator (or cancelling its
        task, e.g. Ctrl-C) stops sending at once.
        """
        if self._transport is None:
            raise RuntimeError("use the Executor as 'async with Executor(...) as ex:'")
        queue: asyncio.Queue[tuple[_Chunk, int, PreparedRequest]] = asyncio.Queue(maxsize=self.concurrency * 2)
        ordered: deque[_Chunk] = deque()
        wake = asyncio.Event()
        self._wake = wake
        self._loop = asyncio.get_running_loop()
        fed = False
        fatal: BaseException | None = None
        inflight: dict[str, list[tuple[_Chunk, int]]] = {}
        finished: OrderedDict[str, Outcome] = OrderedDict()
        window_slots = asyncio.Semaphore(window or 2)
        sized = window is not None
        stats = self.stats
        on_outcome = self._on_outcome

        def settle(chunk: _Chunk, position: int, outcome: Outcome) -> None:
            chunk.settle(position, outcome)
            stats.count(outcome)
            if on_outcome is not None:
                on_outcome(outcome)
            if chunk.remaining == 0:
                wake.set()

        async def feed() -> None:
            nonlocal window_slots, sized, fed
            async for requests in _aiter(chunks):
                if not sized:
                    # enough chunks in flight that the queue never runs dry at a chunk boundary
                    per = max(len(requests), 1)
                    window_slots = asyncio.Semaphore(max(2, math.ceil(2 * self.concurrency / per) + 1))
                    sized = True
                await window_slots.acquire()
                if self._cancelled:
                    return
                chunk = _Chunk(requests)
                ordered.append(chunk)
                wake.set()
                for position, request in enumerate(requests):
                    if self._cancelled:
                        return
                    if request.error is not None:
                        settle(chunk, position, Outcome.failure(request.error))
                        continue
                    key = request.key
                    if key:
                        cached = finished.get(key)
                        if cached is not None:
                            stats.shared += 1
                            settle(chunk, position, cached.shared())
                            continue
                        waiters = inflight.get(key)
                        if waiters is not None:
                            waiters.append((chunk, position))
                            continue
                        inflight[key] = []
                    await queue.put((chunk, position, request))
            fed = True
            wake.set()

        async def work() -> None:
            nonlocal fatal
            while True:
                chunk, position, request = await queue.get()
                if self._cancelled:
                    continue
                try:
                    outcome = await self._execute(request)
                    settle(chunk, position, outcome)
                    if request.key:
                        for other_chunk, other_position in inflight.pop(request.key, ()):
                            stats.shared += 1
                            settle(other_chunk, other_position, outcome.shared())
                        if self._dedupe_cache:
                            finished[request.key] = outcome
                            if len(finished) > self._dedupe_cache:
                                finished.popitem(last=False)
                except _Cancelled:
                    continue
                except FatalRunError as exc:
                    fatal = fatal or exc.error
                    wake.set()
                    return
                except Exception as exc:  # a bug (ours, or an on_outcome callback's) must surface, not hang
                    fatal = fatal or exc
                    wake.set()
                    return

        feeder = asyncio.create_task(feed())
        feeder.add_done_callback(lambda _task: wake.set())
        workers = [asyncio.create_task(work()) for _ in range(self.concurrency)]
        try:
            while True:
                if fatal is not None:
                    raise fatal
                if ordered and ordered[0].done.is_set():
                    chunk = ordered.popleft()
                    window_slots.release()
                    yield chunk.requests, [o for o in chunk.outcomes if o is not None]
                    continue
                if self._cancelled:
                    if keep_partial:
                        while ordered:
                            chunk = ordered.popleft()
                            kept = [i for i, o in enumerate(chunk.outcomes) if o is not None]
                            if kept:
                                yield [chunk.requests[i] for i in kept], [
                                    o for o in chunk.outcomes if o is not None
                                ]
                    return
                if fed and not ordered:
                    return
                if feeder.done() and not fed:
                    feeder.result()  # re-raise an error of the chunk source
                    return  # the feeder stopped without finishing: only cancellation does that
                wake.clear()
                await wake.wait()
        finally:
            self._wake = None
            feeder.cancel()
            for w in workers:
                w.cancel()
            await asyncio.gather(feeder, *workers, return_exceptions=True)

    def _deadline_outcome(self, attempts: int, started: float, last: RequestError | None) -> Outcome:
        self.stats.deadline_exceeded += 1
        message = f"the job's deadline of {self.deadline:g}s passed before this request was answered"
        if last is not None:
            message += f" (last error: {last.cell()})"
        return Outcome(
            error=f"DeadlineExceededError: {self.provider.redact(message)}",
            error_type="DeadlineExceededError",
            status_code=last.status_code if last is not None else None,
            attempts=attempts,
            latency_s=time.monotonic() - started,
        )

    async def _enter_probe(self) -> bool:
        """Until the first non-fatal answer only ``_probe_limit`` requests are in flight, so bad credentials
        or an unknown model end the run after a couple of requests. True: this request holds a probe slot."""
        while not self._opened.is_set():
            if self._probes < self._probe_limit:
                self._probes += 1
                return True
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._probe_waiters.append(waiter)
            try:
                await waiter
            finally:
                if not waiter.done():
                    waiter.cancel()
        return False

    def _exit_probe(self) -> None:
        self._probes -= 1
        while self._probe_waiters:
            waiter = self._probe_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    def _open(self) -> None:
        """The server gave a non-fatal answer: let every waiting request go."""
        if self._opened.is_set():
            return
        self._opened.set()
        while self._probe_waiters:
            waiter = self._probe_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    async def _execute(self, request: PreparedRequest) -> Outcome:
        """One request with retries. Raises :class:`FatalRunError` for job-ending errors and
        :class:`_Cancelled` when the executor is cancelled before the request could leave."""
        params = self.params if request.params is None else self.params.merged(request.params)
        messages = request.messages or ()
        try:
            http = self._adapter.build_request(self.provider, messages, params)
        except RequestError as error:
            return Outcome.failure(_redacted(self.provider, error))
        except (ValueError, TypeError, UnicodeError) as exc:
            # e.g. lone surrogates or unserialisable values in a messages column: this row cannot be sent
            return Outcome.failure(PromptError(f"cannot build the request: {type(exc).__name__}: {exc}"))
        limiter = self.limiter
        estimate = estimate_tokens(messages, params.max_tokens) if limiter.counts_tokens else 0
        transport = self._transport
        assert transport is not None
        policy = self.retry
        stats = self.stats
        deadline_at = self._deadline_at
        started = time.monotonic()
        attempt = 0
        last: RequestError | None = None
        while True:
            if self._fatal is not None:
                raise FatalRunError(self._fatal)
            if self._cancelled:
                raise _Cancelled
            # the probe comes before the budgets, so requests held by it are paced by what the first
            # answers teach the limiter (announced limits), not released all at once
            probing = await self._enter_probe() if not self._opened.is_set() else False
            try:
                timeout = self.timeouts.request
                if deadline_at is None:
                    stats.rate_limit_wait_s += await limiter.acquire(estimate)
                else:
                    waiting_since = time.monotonic()
                    if deadline_at <= waiting_since:
                        return self._deadline_outcome(attempt, started, last)
                    try:
                        stats.rate_limit_wait_s += await limiter.acquire(estimate, until=deadline_at)
                    except TimeoutError:
                        stats.rate_limit_wait_s += time.monotonic() - waiting_since
                        return self._deadline_outcome(attempt, started, last)
                    timeout = min(timeout, deadline_at - time.monotonic())
            except BaseException:
                if probing:
                    self._exit_probe()
                raise
            epoch = limiter.epoch
            congested = False
            retry_after: float | None = None
            try:
                if self._fatal is not None:
                    raise FatalRunError(self._fatal)
                if self._cancelled:
                    raise _Cancelled
                if timeout <= 0:
                    return self._deadline_outcome(attempt, started, last)
                attempt += 1
                stats.requests_sent += 1
                try:
                    raw = await transport.send(http, timeout)
                    if raw.status in CONGESTION_STATUSES:
                        congested = True
                    limiter.observe(parse_rate_limit_headers(raw.headers))
                    try:
                        completion = self._adapter.parse_response(raw.status, raw.headers, raw.body)
                    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
                        # an adapter tripping over an odd body is a malformed response, not a crash
                        raise MalformedResponseError(
                            f"unexpected response shape ({type(exc).__name__}: {exc})"
                        ) from exc
                    if self._validate is not None:
                        # structured outputs: an answer that does not match is this row's error
                        self._validate(completion.text)
                except RequestError as error:
                    error = _redacted(self.provider, error)
                    status = error.status_code
                    if status is not None:
                        stats.statuses[status] = stats.statuses.get(status, 0) + 1
                    if error.fatal:
                        if self._fatal is None:
                            self._fatal = error
                        raise FatalRunError(error) from None
                    self._open()
                    last = error
                    if congested:
                        stats.rate_limited += 1
                    retry_after = getattr(error, "retry_after", None)
                    if not policy.should_retry(error, attempt):
                        return Outcome.failure(error, attempts=attempt, latency_s=time.monotonic() - started)
                    cause = error.type_name
                    stats.retries[cause] = stats.retries.get(cause, 0) + 1
                    delay = policy.delay(attempt, error)
                    if deadline_at is not None:
                        delay = min(delay, max(deadline_at - time.monotonic(), 0.0))
                else:
                    break
            finally:
                if probing:
                    self._exit_probe()
                decreases = limiter.decreases
                limiter.release(congested=congested, epoch=epoch)
                if congested:
                    if retry_after is not None:
                        # the server said when: everybody waits, not just this request
                        limiter.pause(min(float(retry_after), policy.max_retry_after))
                    elif limiter.decreases > decreases:
                        # a fresh 429 without guidance: everybody takes one short jittered breath, so the
                        # rate drops too (fewer requests in flight alone does not slow a fast server)
                        limiter.pause(policy.backoff(1))
            if delay > 0:
                if congested:
                    stats.rate_limit_wait_s += delay
                else:
                    stats.backoff_wait_s += delay
                await asyncio.sleep(delay)
        self._open()
        usage = completion.usage
        if usage is not None:
            stats.prompt_tokens += usage.prompt_tokens
            stats.completion_tokens += usage.completion_tokens
            if estimate:
                limiter.record_usage(estimate, usage.total_tokens)
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
