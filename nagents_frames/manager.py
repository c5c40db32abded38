"""The nagents job API: submit a batch, poll its status, fetch its results, cancel, retry, resume.

Jobs run in the background on the running event loop; with a :class:`~nagents_frames.store.BatchStore`
on a file they survive restarts (a job left PROCESSING by a dead process is found by its stale heartbeat
and finished by :meth:`BatchManager.resume`, sending only what has no stored result). Without a store the
jobs live in an in-memory store for the life of the manager.

Example::

    >>> import asyncio
    >>> from nagents_frames import BatchManager, BatchRequest, Provider
    >>> from nagents_frames.testing import FakeLLMServer
    >>> async def main():
    ...     async with FakeLLMServer() as server:
    ...         p = Provider(provider_type="openai_compatible", model="echo", base_url=server.base_url)
    ...         async with BatchManager(provider=p) as manager:
    ...             job = await manager.submit([BatchRequest(id="r1", messages=[{"role": "user", "content": "hi"}])])
    ...             await manager.wait(job.id)
    ...             return [r.response for r in await manager.get_results(job.id)]
    >>> asyncio.run(main())
    ['echo: hi']

The module also holds the store side of ``batch_complete(..., store=...)``: :func:`complete_with_store` and
:func:`stream_with_store` (same input, prompt and model give the same job, so a re-run resumes it).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import socket
import sys
import uuid
from array import array
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from nagents_frames.errors import (
    ConfigurationError,
    DuplicateRequestIdError,
    JobError,
    JobFailedError,
    JobNotFinishedError,
    JobNotFoundError,
    PromptError,
    RequestError,
    StoreError,
)
from nagents_frames.executor import Executor, Outcome, PreparedRequest, RetryPolicy, Timeouts, outcomes_to_arrow
from nagents_frames.prompting import request_key
from nagents_frames.providers import Provider
from nagents_frames.ratelimit import RateLimiter
from nagents_frames.store import REQUEST_SCHEMA, BatchStore, JobRecord, utcnow
from nagents_frames.types import BatchJob, BatchRequest, BatchResult, BatchStatus, GenerationParams, Usage

if TYPE_CHECKING:
    from nagents_frames.frames import CompletionOptions, _Frame
    from nagents_frames.prompting import PromptPlan

__all__ = ["BatchManager", "complete_with_store", "owner_alive", "stream_with_store"]

_HOST = socket.gethostname()
_LIVE_OWNERS: set[str] = set()
"""Owner tokens of the managers / runs alive in this process (a closed manager's jobs are free at once)."""


def _new_owner() -> str:
    owner = f"{_HOST}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
    _LIVE_OWNERS.add(owner)
    return owner


def owner_alive(owner: str | None, heartbeat_at: datetime | None, *, stale_after: float,
                now: datetime | None = None) -> bool:
    """Whether the process that runs a job (its ``owner``) is still alive.

    Alive in this process: the owner's manager is open. On this host: its PID exists and its heartbeat
    is fresh. Elsewhere: its heartbeat is younger than ``stale_after`` seconds.

    >>> owner_alive(None, None, stale_after=30)
    False
    """
    if owner is None:
        return False
    if owner in _LIVE_OWNERS:
        return True
    parts = owner.rsplit(":", 2)
    if len(parts) == 3 and parts[0] == _HOST and parts[1].isdigit():
        pid = int(parts[1])
        if pid == os.getpid():
            return False  # one of ours, but its manager was closed
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
    if heartbeat_at is None:
        return False
    age = ((now or utcnow()) - heartbeat_at.replace(tzinfo=None)).total_seconds()
    return age <= stale_after


# --- writing a running job's results ---------------------------------------------------------------------


class _JobSink:
    """Writes a job's result chunks from a bounded queue (chunks waiting together share one opening of the
    file, each still its own transaction) and beats the heartbeat. Stops the run, through ``stop``, when
    the job was cancelled elsewhere or the store fails."""

    def __init__(self, store: BatchStore, job_id: str, owner: str, run: int, heartbeat_interval: float,
                 stop: Callable[[], None]) -> None:
        self.store = store
        self.job_id = job_id
        self.owner = owner
        self.run = run
        self.heartbeat_interval = heartbeat_interval
        self.stop = stop
        self.status = BatchStatus.PROCESSING
        self.error: BaseException | None = None
        self.queue: asyncio.Queue[pa.Table | None] = asyncio.Queue(maxsize=4)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> _JobSink:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._writer()), loop.create_task(self._heartbeat())]
        return self

    async def put(self, table: pa.Table) -> None:
        if self.error is not None:
            raise self.error
        await self.queue.put(table)

    def _observe(self, status: BatchStatus) -> None:
        self.status = status
        if status is not BatchStatus.PROCESSING:
            self.stop()

    async def _writer(self) -> None:
        done = False
        while not done:
            batch = [await self.queue.get()]
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            done = None in batch
            tables = [t for t in batch if t is not None]
            if not tables or self.error is not None:
                continue
            try:
                self._observe(await self.store.write_results(self.job_id, tables, run=self.run, owner=self.owner))
            except Exception as exc:  # the store failed: the run must stop, the caller sees why
                self.error = exc
                self.stop()

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            # a reader holding the file past the lock timeout must not end the job: the next beat will do
            with contextlib.suppress(StoreError):
                self._observe(await self.store.heartbeat(self.job_id, self.owner))

    async def close(self) -> None:
        """Write what is queued and stop; raises the store's error if a write failed."""
        writer, beat = self._tasks
        beat.cancel()
        await self.queue.put(None)
        await writer
        with contextlib.suppress(asyncio.CancelledError):
            await beat
        if self.error is not None:
            raise self.error


def _window(concurrency: int, chunk_size: int) -> int:
    # chunks in flight: enough that workers never idle at a chunk boundary, plus slack for a slow write
    return max(4, math.ceil(2 * concurrency / max(chunk_size, 1)) + 2)


class _NativeStopper:
    """``cancel()`` for a native batch run: asks the provider to cancel the job's batches."""

    def __init__(self, runner: Any, job_id: str) -> None:
        self.runner = runner
        self.job_id = job_id
        self.task: asyncio.Task[Any] | None = None

    def cancel(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self.runner.cancel(self.job_id))


# --- the job API ------------------------------------------------------------------------------------------


@dataclass
class _Run:
    job_id: str
    task: asyncio.Task[None] | None = None
    stopper: Any = None
    cancelled: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)
    failure: str | None = None

    def cancel(self) -> None:
        self.cancelled = True
        if self.stopper is not None:
            self.stopper.cancel()


class BatchManager:
    """Submit batches of requests and follow them: the nagents job API.

    Args:
        provider: the :class:`~nagents_frames.Provider` every request goes to.
        store: a :class:`~nagents_frames.BatchStore` (initialized); ``None`` keeps jobs in memory.
        concurrency, rpm, tpm, retry, timeouts: how requests are sent (see :class:`~nagents_frames.Executor`);
            the rate budgets are shared by all jobs of this manager.
        chunk_size: requests per chunk; each chunk's results are one transaction in the store.
        heartbeat_interval: seconds between heartbeats of a running job; a job whose heartbeat is older than
            ``stale_after`` (default three intervals) is taken to be orphaned by a dead process.
        mode: ``"realtime"`` (requests now, through the executor) or ``"native"`` (the provider's batch API).

    >>> # manager = BatchManager(provider=p, store=store)
    >>> # job = await manager.submit(requests); await manager.wait(job.id)
    """

    def __init__(
        self,
        provider: Provider,
        store: BatchStore | None = None,
        *,
        concurrency: int = 64,
        rpm: float | None = None,
        tpm: float | None = None,
        retry: RetryPolicy | None = None,
        timeouts: Timeouts | None = None,
        chunk_size: int = 1000,
        heartbeat_interval: float = 10.0,
        stale_after: float | None = None,
        mode: str = "realtime",
        params: GenerationParams | None = None,
    ) -> None:
        if not isinstance(provider, Provider):
            raise ConfigurationError(f"provider must be a nagents_frames.Provider, got {type(provider).__name__}")
        if store is not None and not isinstance(store, BatchStore):
            raise ConfigurationError(f"store must be a BatchStore, got {type(store).__name__}")
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
            raise ConfigurationError(f"concurrency must be a positive integer, got {concurrency!r}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ConfigurationError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        if heartbeat_interval <= 0:
            raise ConfigurationError(f"heartbeat_interval must be positive, got {heartbeat_interval!r}")
        if mode not in ("realtime", "native"):
            raise ConfigurationError(f"mode must be 'realtime' or 'native', got {mode!r}")
        self.provider = provider
        self.concurrency = concurrency
        self.retry = retry
        self.timeouts = timeouts
        self.chunk_size = chunk_size
        self.heartbeat_interval = heartbeat_interval
        self.stale_after = stale_after if stale_after is not None else 3 * heartbeat_interval
        self.mode = mode
        self.params = params
        self._limiter = RateLimiter(rpm=rpm, tpm=tpm)
        self._store = store
        self._owns_store = store is None
        self._owner = _new_owner()
        self._runs: dict[str, _Run] = {}
        self._closed = False

    @property
    def store(self) -> BatchStore | None:
        """The store (``None`` until first use when the manager keeps jobs in memory)."""
        return self._store

    async def _ready(self) -> BatchStore:
        if self._closed:
            raise JobError("this BatchManager is closed")
        if self._store is None:
            self._store = BatchStore()
        return await self._store.initialize()

    # --- submit -------------------------------------------------------------------------------------------

    async def submit(self, requests: Sequence[BatchRequest], *, name: str | None = None) -> BatchJob:
        """Register a job and start it in the background; returns at once with the PENDING job.

        Raises :class:`~nagents_frames.errors.DuplicateRequestIdError` when two requests share an id.
        """
        store = await self._ready()
        requests = list(requests)
        seen: dict[str, int] = {}
        for index, request in enumerate(requests):
            if not isinstance(request, BatchRequest):
                raise ConfigurationError(f"request {index} is a {type(request).__name__}, not a BatchRequest")
            if request.id in seen:
                raise DuplicateRequestIdError(
                    f"request id {request.id!r} is used by requests {seen[request.id]} and {index}; ids must be unique"
                )
            seen[request.id] = index
        prepared = [self._prepare(index, r) for index, r in enumerate(requests)]
        job_id = f"batch_{uuid.uuid4().hex}"
        record = JobRecord(
            id=job_id, kind="requests", status=BatchStatus.PENDING, total=len(requests), name=name, mode=self.mode,
            provider=self.provider.type.value, model=self.provider.model, parameters=self._parameters(),
            owner=self._owner,
        )
        await store.create_job(record, _requests_table(requests, prepared))
        run = _Run(job_id)
        self._runs[job_id] = run
        run.task = asyncio.get_running_loop().create_task(
            self._run_job(run, prepared=prepared, claim=(self._owner, (BatchStatus.PENDING,)))
        )
        return (await store.get_job(job_id)).to_job()

    def _prepare(self, index: int, request: BatchRequest) -> PreparedRequest:
        messages = request.messages
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
            error = PromptError(f"request {request.id!r} has no messages (a non-empty list of {{role, content}})")
            return PreparedRequest(index, request.id, "", None, request.params, error)
        effective = self.provider.params.merged(self.params).merged(request.params)
        key = request_key(self.provider.model, messages, effective)
        return PreparedRequest(index, request.id, key, tuple(messages), request.params)

    def _parameters(self) -> dict[str, Any]:
        retry = self.retry or RetryPolicy()
        return {
            **self.provider.describe(),
            **({"params": self.params.as_dict()} if self.params else {}),
            "concurrency": self.concurrency,
            "rpm": self._limiter.rpm,
            "tpm": self._limiter.tpm,
            "chunk_size": self.chunk_size,
            "max_attempts": retry.max_attempts,
        }

    # --- running ------------------------------------------------------------------------------------------

    async def _run_job(
        self,
        run: _Run,
        *,
        prepared: Sequence[PreparedRequest] | None = None,
        errors_only: bool = False,
        claim: tuple[str | None, Sequence[BatchStatus]] | None = None,
        otherwise: BatchStatus | None = None,
    ) -> None:
        store = self._store
        assert store is not None
        job_id = run.job_id
        report: dict[str, Any] | None = None
        try:
            if claim is not None:
                expected, statuses = claim
                if run.cancelled or not await store.claim_job(
                    job_id, self._owner, expected_owner=expected, from_statuses=statuses
                ):
                    return  # cancelled before it started
            record = await store.get_job(job_id)
            if prepared is None:
                table = await store.pending_requests(job_id, errors_only=errors_only)
                chunks: Iterator[list[PreparedRequest]] = _chunks_from_table(table, self.chunk_size)
            else:
                chunks = (list(prepared[i : i + self.chunk_size]) for i in range(0, len(prepared), self.chunk_size))
            report = await self._drive(run, record, chunks)
            status = BatchStatus.CANCELLED if run.cancelled else None
            await store.finish_job(
                job_id, status=status, from_statuses=(BatchStatus.PROCESSING, BatchStatus.CANCELLED) if status
                else (BatchStatus.PROCESSING,), report=report, otherwise=otherwise,
            )
        except RequestError as exc:  # fatal for the whole job: bad credentials, unknown model
            await self._fail(run, exc.cell(), exc.type_name, report)
        except asyncio.CancelledError:
            # the manager is closing: leave the job PROCESSING without an owner so that resume() takes it
            with contextlib.suppress(Exception):
                await asyncio.shield(store.release_job(job_id, self._owner))
            raise
        except Exception as exc:
            await self._fail(run, f"{type(exc).__name__}: {exc}", type(exc).__name__, report)
        finally:
            run.stopper = None
            run.done.set()

    async def _fail(self, run: _Run, error: str, error_type: str, report: dict[str, Any] | None) -> None:
        run.failure = error
        store = self._store
        assert store is not None
        with contextlib.suppress(Exception):
            await store.finish_job(
                run.job_id, status=BatchStatus.FAILED, from_statuses=(BatchStatus.PROCESSING,), report=report,
                error=error, error_type=error_type,
            )

    async def _drive(self, run: _Run, record: JobRecord, chunks: Iterator[list[PreparedRequest]]) -> dict[str, Any]:
        """Send the chunks and write their results; returns the run report."""
        store = self._store
        assert store is not None
        if record.mode == "native":
            return await self._drive_native(run, record, [r for chunk in chunks for r in chunk])
        executor = Executor(
            self.provider, concurrency=self.concurrency, retry=self.retry, timeouts=self.timeouts,
            limiter=self._limiter, params=self.params,
        )
        async with executor as ex:
            run.stopper = ex
            if run.cancelled:
                ex.cancel()
            sink = _JobSink(store, record.id, self._owner, record.runs, self.heartbeat_interval, ex.cancel).start()
            try:
                async for requests, outcomes in ex.run(
                    chunks, window=_window(self.concurrency, self.chunk_size), keep_partial=True
                ):
                    if requests:
                        await sink.put(outcomes_to_arrow(requests, outcomes))
            finally:
                await sink.close()
            if sink.status is BatchStatus.CANCELLED:
                run.cancelled = True
            return _report_dict(ex.stats.report())

    async def _drive_native(self, run: _Run, record: JobRecord, requests: list[PreparedRequest]) -> dict[str, Any]:
        from nagents_frames.native_batch import NativeBatchRunner

        store = self._store
        assert store is not None
        async with NativeBatchRunner(
            self.provider, ledger=store, params=self.params, retry=self.retry, timeouts=self.timeouts,
            chunk_size=self.chunk_size,
        ) as runner:
            stopper = _NativeStopper(runner, record.id)
            run.stopper = stopper
            if run.cancelled:
                stopper.cancel()
            sink = _JobSink(store, record.id, self._owner, record.runs, self.heartbeat_interval, stopper.cancel).start()
            try:
                async for chunk, outcomes in runner.run(record.id, requests):
                    if chunk:
                        await sink.put(outcomes_to_arrow(chunk, outcomes))
            finally:
                await sink.close()
                if stopper.task is not None:
                    # the provider's cancel call must leave before this run (and perhaps the manager) ends
                    with contextlib.suppress(Exception):
                        await asyncio.shield(stopper.task)
            if sink.status is BatchStatus.CANCELLED:
                run.cancelled = True
            stats = getattr(runner, "stats", None)
            report = getattr(stats, "report", None)
            return _report_dict(report()) if callable(report) else {"mode": "native"}

    # --- status and results -------------------------------------------------------------------------------

    async def get_status(self, job_id: str) -> BatchStatus:
        """The job's :class:`~nagents_frames.BatchStatus`."""
        return (await self.get_job(job_id)).status

    async def get_job(self, job_id: str) -> BatchJob:
        """The job with its counts (``total``, ``succeeded``, ``failed``, ``usage``)."""
        store = await self._ready()
        run = self._runs.get(job_id)
        failed = run is not None and run.done.is_set() and run.failure is not None
        try:
            job = (await store.get_job(job_id)).to_job()
        except StoreError:
            if not failed or isinstance(sys.exc_info()[1], JobNotFoundError):
                raise
            # the store itself is what failed: what this process knows is all there is
            return BatchJob(id=job_id, status=BatchStatus.FAILED, error=run.failure if run else None)
        if failed and not job.status.is_terminal and run is not None:
            # the run died with the store unwritable, so FAILED could not be recorded there
            return replace(job, status=BatchStatus.FAILED, error=run.failure)
        return job

    async def list_jobs(self) -> list[BatchJob]:
        """Every job in the store, oldest first, with its counts."""
        store = await self._ready()
        return [r.to_job() for r in await store.list_jobs()]

    async def get_results(self, job_id: str, *, partial: bool = False, wait: bool = True) -> list[BatchResult]:
        """The results in submission order.

        A job that this manager is running is waited for (so ``submit`` then ``get_results`` works, as in
        the nagents documentation). A job that has not finished and is not running here (another process,
        or one left to :meth:`resume`), or any unfinished job with ``wait=False``, raises
        :class:`~nagents_frames.errors.JobNotFinishedError` saying how far it is; ``partial=True`` gives
        the results so far instead. A FAILED job raises :class:`~nagents_frames.errors.JobFailedError`
        unless ``partial=True``. A CANCELLED job gives the results obtained before the cancel.
        """
        store = await self._ready()
        record = await self.get_job(job_id)
        if not partial:
            run = self._runs.get(job_id)
            if wait and not record.status.is_terminal and run is not None and not run.done.is_set():
                record = await self.wait(job_id)
            if not record.status.is_terminal:
                done = record.succeeded + record.failed
                share = 100.0 * done / record.total if record.total else 0.0
                raise JobNotFinishedError(
                    f"job {job_id} is {record.status.value}: {done} of {record.total} requests have a result "
                    f"({share:.0f}%); await manager.wait(job_id) (or resume it) first, or ask for get_results(job_id, partial=True)"
                )
            if record.status is BatchStatus.FAILED:
                raise JobFailedError(f"job {job_id} failed: {record.error}; get_results(job_id, partial=True) "
                                     "gives the results obtained before it failed")
        table = await store.results(job_id)
        return _results_from_table(table)

    async def wait(
        self, job_id: str, *, timeout: float | None = None, poll_interval: float = 0.2  # noqa: ASYNC109 (nagents API)
    ) -> BatchJob:
        """Wait until the job is COMPLETED, FAILED or CANCELLED and return it (``TimeoutError`` after
        ``timeout`` seconds). A job run by another process is followed by polling the store."""
        await self._ready()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        run = self._runs.get(job_id)
        if run is not None and not run.done.is_set():
            try:
                await asyncio.wait_for(asyncio.shield(run.done.wait()), timeout)
            except TimeoutError:
                raise TimeoutError(f"job {job_id} did not finish within {timeout}s") from None
        while True:
            job = await self.get_job(job_id)
            run = self._runs.get(job_id)
            if job.status.is_terminal and (run is None or run.done.is_set()):
                return job
            if deadline is not None and loop.time() >= deadline:
                raise TimeoutError(f"job {job_id} did not finish within {timeout}s (it is {job.status.value})")
            await asyncio.sleep(poll_interval)

    # --- cancel, retry, resume ------------------------------------------------------------------------------

    async def cancel(self, job_id: str) -> bool:
        """Stop a PENDING or PROCESSING job: no new request leaves, it is recorded CANCELLED at once, and the
        results already obtained are kept. Returns False when the job had already ended (nothing changes).
        Works for a job run by another process on the same store (it stops at its next write or heartbeat).
        """
        store = await self._ready()
        moved = await store.set_status(
            job_id, BatchStatus.CANCELLED, from_statuses=(BatchStatus.PENDING, BatchStatus.PROCESSING)
        )
        run = self._runs.get(job_id)
        if moved and run is not None:
            run.cancel()
        if not moved:
            await store.get_job(job_id)  # JobNotFoundError for an unknown id
        return moved

    async def retry_failed(self, job_id: str) -> BatchJob:
        """Send again, in the same job, only the requests whose result has an error.

        The job must have ended; it becomes PROCESSING and then COMPLETED (or returns to CANCELLED / FAILED
        when requests without any result remain: :meth:`resume` sends those).
        """
        store = await self._ready()
        await self._settled(job_id)
        record = await store.get_job(job_id)
        if not record.status.is_terminal:
            raise JobNotFinishedError(f"job {job_id} is {record.status.value}; retry_failed needs a finished job")
        if record.kind != "requests":
            raise JobError(f"job {job_id} was made by batch_complete; run it again with the same input to retry")
        if record.failed == 0:
            return record.to_job()
        if not await store.claim_job(job_id, self._owner, expected_owner=record.owner, from_statuses=(record.status,)):
            raise JobError(f"job {job_id} changed while retrying; try again")
        otherwise = None if record.status is BatchStatus.COMPLETED else record.status
        self._start(job_id, errors_only=True, otherwise=otherwise)
        return (await store.get_job(job_id)).to_job()

    async def resume(self, job_id: str) -> BatchJob:
        """Finish a job whose process died (PENDING / PROCESSING with a stale heartbeat), or a CANCELLED or
        FAILED one: sends only the requests without a stored result. A COMPLETED job is returned as is.

        Raises :class:`~nagents_frames.errors.JobError` when the job is running in a live process.
        """
        store = await self._ready()
        await self._settled(job_id)
        run = self._runs.get(job_id)
        if run is not None and not run.done.is_set():
            return await self.get_job(job_id)
        record = await store.get_job(job_id)
        if record.status is BatchStatus.COMPLETED:
            return record.to_job()
        if record.kind != "requests":
            raise JobError(f"job {job_id} was made by batch_complete; run it again with the same input to resume it")
        if not record.status.is_terminal and owner_alive(record.owner, record.heartbeat_at,
                                                          stale_after=self.stale_after):
            raise JobError(
                f"job {job_id} is {record.status.value} in a live process ({record.owner}, heartbeat at "
                f"{record.heartbeat_at} UTC); cancel it there, or wait for it"
            )
        if not await store.claim_job(job_id, self._owner, expected_owner=record.owner, from_statuses=(record.status,)):
            raise JobError(f"another process took over job {job_id}")
        otherwise = record.status if record.status.is_terminal else None
        self._start(job_id, errors_only=False, otherwise=otherwise)
        return (await store.get_job(job_id)).to_job()

    async def resume_all(self) -> list[BatchJob]:
        """Resume every job of the store left PENDING or PROCESSING by a process that is gone."""
        store = await self._ready()
        resumed = []
        for record in await store.list_jobs():
            if record.kind != "requests" or record.status.is_terminal or record.id in self._runs:
                continue
            if owner_alive(record.owner, record.heartbeat_at, stale_after=self.stale_after):
                continue
            with contextlib.suppress(JobError):
                resumed.append(await self.resume(record.id))
        return resumed

    async def _settled(self, job_id: str) -> None:
        """Let a cancelled run of this manager finish writing and recording its end before the job is taken
        up again (otherwise its last words would overwrite the new run's status)."""
        run = self._runs.get(job_id)
        if run is not None and run.cancelled and not run.done.is_set():
            await run.done.wait()

    def _start(self, job_id: str, *, errors_only: bool, otherwise: BatchStatus | None) -> None:
        run = _Run(job_id)
        self._runs[job_id] = run
        run.task = asyncio.get_running_loop().create_task(
            self._run_job(run, errors_only=errors_only, otherwise=otherwise)
        )

    # --- lifecycle ----------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop the jobs running here (they stay resumable: :meth:`resume_all` on a new manager finishes
        them) and, for a manager without a store, drop the in-memory jobs."""
        if self._closed:
            return
        live = {job_id: r.task for job_id, r in self._runs.items() if r.task is not None and not r.task.done()}
        for task in live.values():
            task.cancel()
        await asyncio.gather(*live.values(), return_exceptions=True)
        if self._store is not None:
            # a task cancelled before its first step never released its job: do it for each of them
            for job_id in live:
                with contextlib.suppress(Exception):
                    await self._store.release_job(job_id, self._owner)
        _LIVE_OWNERS.discard(self._owner)
        self._closed = True
        if self._owns_store and self._store is not None:
            await self._store.close()

    async def __aenter__(self) -> BatchManager:
        await self._ready()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _report_dict(report: Any) -> dict[str, Any]:
    """A run report (``Executor.stats.report()``) as JSON-ready values for the ``jobs.report`` column."""
    if dataclasses.is_dataclass(report) and not isinstance(report, type):
        out = {f.name: getattr(report, f.name) for f in dataclasses.fields(report)}
    else:
        out = dict(vars(report))
    out = {k: ({str(a): b for a, b in v.items()} if isinstance(v, Mapping) else v) for k, v in out.items()}
    total = getattr(report, "total_retries", None)
    if total is not None:
        out["total_retries"] = total
    return out


def _json_or_none(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def _requests_table(requests: Sequence[BatchRequest], prepared: Sequence[PreparedRequest]) -> pa.Table:
    return pa.Table.from_pydict(
        {
            "row_index": [p.index for p in prepared],
            "request_id": [r.id for r in requests],
            "request_key": [p.key for p in prepared],
            "messages": [_json_or_none([dict(m) for m in p.messages]) if p.messages is not None else None
                         for p in prepared],
            "params": [_json_or_none(r.params.as_dict()) if r.params is not None else None for r in requests],
            "metadata": [_json_or_none(dict(r.metadata)) if r.metadata is not None else None for r in requests],
        },
        schema=REQUEST_SCHEMA,
    )


def _chunks_from_table(table: pa.Table, size: int) -> Iterator[list[PreparedRequest]]:
    """Stored requests back into executor chunks (JSON parsed one chunk at a time)."""
    for start in range(0, table.num_rows, size):
        part = table.slice(start, size).to_pydict()
        chunk = []
        for index, rid, key, messages, params in zip(
            part["row_index"], part["request_id"], part["request_key"], part["messages"], part["params"]
        ):
            gen = GenerationParams.from_mapping(json.loads(params)) if params else None
            if messages is None:
                error = PromptError(f"request {rid!r} has no messages")
                chunk.append(PreparedRequest(index, rid, "", None, gen, error))
            else:
                chunk.append(PreparedRequest(index, rid, key, tuple(json.loads(messages)), gen))
        yield chunk


def _results_from_table(table: pa.Table) -> list[BatchResult]:
    columns = table.to_pydict()
    out = []
    for i in range(table.num_rows):
        prompt, completion = columns["prompt_tokens"][i], columns["completion_tokens"][i]
        usage = Usage(prompt or 0, completion or 0) if prompt is not None or completion is not None else None
        out.append(
            BatchResult(
                id=columns["request_id"][i], response=columns["response"][i], error=columns["error"][i],
                error_type=columns["error_type"][i], status_code=columns["status_code"][i], usage=usage,
                attempts=columns["attempts"][i], latency_s=columns["latency_s"][i],
                finish_reason=columns["finish_reason"][i], row_index=columns["row_index"][i],
            )
        )
    return out


def _outcomes_from_table(table: pa.Table) -> dict[int, Outcome]:
    columns = table.to_pydict()
    return {
        columns["row_index"][i]: Outcome(
            response=columns["response"][i], error=columns["error"][i], error_type=columns["error_type"][i],
            status_code=columns["status_code"][i], prompt_tokens=columns["prompt_tokens"][i],
            completion_tokens=columns["completion_tokens"][i], attempts=columns["attempts"][i],
            latency_s=columns["latency_s"][i], finish_reason=columns["finish_reason"][i],
        )
        for i in range(table.num_rows)
    }


# --- batch_complete(..., store=...) ------------------------------------------------------------------------


async def _resolve_store(store: BatchStore | str | os.PathLike[str]) -> tuple[BatchStore, bool]:
    if isinstance(store, BatchStore):
        return await store.initialize(), False
    if isinstance(store, (str, os.PathLike)):
        return await BatchStore(Path(store)).initialize(), True
    raise ConfigurationError(f"store must be a BatchStore or a path, got {type(store).__name__}")


def _job_id(kind: str, fingerprint: str, job_name: str | None) -> str:
    digest = hashlib.blake2b(f"{kind}\0{fingerprint}\0{job_name or ''}".encode(), digest_size=12).hexdigest()
    return f"{kind}_{digest}"


class _FrameJob:
    """The store side of one ``batch_complete`` / stream run: find or create the job, claim it, write its
    results, and end it. Same input, prompt, model and job name give the same job id, so a re-run resumes."""

    def __init__(self, store: BatchStore, options: CompletionOptions, *, kind: str, job_id: str, name: str | None,
                 fingerprint: str, total: int) -> None:
        self.store = store
        self.options = options
        self.kind = kind
        self.job_id = job_id
        self.name = name
        self.fingerprint = fingerprint
        self.total = total
        self.owner = _new_owner()
        self.sink: _JobSink | None = None
        self.run_no = 0

    async def open(self, stop: Callable[[], None], heartbeat_interval: float = 10.0) -> JobRecord:
        store = self.store
        provider = self.options.provider
        record = await store.find_job(self.job_id)
        if record is None:
            params = self.options.params.as_dict() if self.options.params else {}
            with contextlib.suppress(StoreError):  # a concurrent creator won: claim below decides
                await store.create_job(
                    JobRecord(
                        id=self.job_id, kind=self.kind, status=BatchStatus.PENDING, total=self.total, name=self.name,
                        provider=provider.type.value, model=provider.model,
                        parameters={**provider.describe(), **({"params": params} if params else {}),
                                    "concurrency": self.options.concurrency, "chunk_size": self.options.chunk_size},
                        fingerprint=self.fingerprint, owner=None,
                    )
                )
            record = await store.get_job(self.job_id)
        if not record.status.is_terminal and owner_alive(record.owner, record.heartbeat_at,
                                                          stale_after=3 * heartbeat_interval):
            raise JobError(
                f"job {self.job_id} is already running in another process ({record.owner}); wait for it or cancel it"
            )
        if not await store.claim_job(self.job_id, self.owner, expected_owner=record.owner,
                                     from_statuses=(record.status,)):
            raise JobError(f"another process took over job {self.job_id}")
        record = await store.get_job(self.job_id)
        self.run_no = record.runs
        self.sink = _JobSink(store, self.job_id, self.owner, self.run_no, heartbeat_interval, stop).start()
        return record

    async def write(self, requests: Sequence[PreparedRequest], outcomes: Sequence[Outcome]) -> None:
        assert self.sink is not None
        if requests:
            await self.sink.put(outcomes_to_arrow(requests, outcomes))

    async def close(self, error: BaseException | None, report: dict[str, Any] | None, total: int | None) -> None:
        """Flush and record how the run ended (COMPLETED, FAILED with the fatal error, CANCELLED)."""
        store = self.store
        try:
            if self.sink is not None:
                await self.sink.close()
        finally:
            _LIVE_OWNERS.discard(self.owner)
        if error is None and self.sink is not None and self.sink.status is BatchStatus.CANCELLED:
            error = asyncio.CancelledError()
        if error is None:
            await store.finish_job(self.job_id, status=None, from_statuses=(BatchStatus.PROCESSING,), report=report,
                                   total=total, otherwise=BatchStatus.FAILED, error="rows without a result remain",
                                   error_type="JobError")
        elif isinstance(error, RequestError):
            await store.finish_job(self.job_id, status=BatchStatus.FAILED, from_statuses=(BatchStatus.PROCESSING,),
                                   report=report, error=error.cell(), error_type=error.type_name, total=total)
        elif isinstance(error, (asyncio.CancelledError, KeyboardInterrupt, GeneratorExit)):
            await store.finish_job(self.job_id, status=BatchStatus.CANCELLED,
                                   from_statuses=(BatchStatus.PROCESSING, BatchStatus.CANCELLED), report=report)
        else:
            await store.finish_job(self.job_id, status=BatchStatus.FAILED, from_statuses=(BatchStatus.PROCESSING,),
                                   report=report, error=f"{type(error).__name__}: {error}",
                                   error_type=type(error).__name__)


async def complete_with_store(
    frame: _Frame, plan: PromptPlan, options: CompletionOptions, *, store: BatchStore | str | os.PathLike[str],
    job_name: str | None,
) -> list[Outcome]:
    """Complete every row of ``frame`` recording the job in ``store``; returns one outcome per row in order.

    Rows with a stored answer (from an earlier, interrupted run of the same input, prompt and model) are not
    sent again; rows whose stored result is an error are. The job id is a hash of the prompt plan, the
    provider (without secrets), the generation parameters, the values of the columns the prompts read, and
    ``job_name``.
    """
    from nagents_frames.frames import _Progress

    bound, owned = await _resolve_store(store)
    try:
        bar = _Progress(options.progress, frame.num_rows)
        executor = options.executor(on_outcome=bar)
        model = options.provider.model
        # identity of the job: the prompt plan, the model and its parameters, and the values of the columns
        # the prompts are made from (hashing the raw values is far cheaper than rendering every prompt)
        digest = hashlib.blake2b(digest_size=20)
        digest.update(json.dumps([repr(plan), options.provider.describe(), executor.params.as_dict()],
                                 sort_keys=True, default=str).encode())
        total = 0
        for _start, values in frame.chunks(plan.columns, options.chunk_size):
            digest.update(json.dumps([values[c] for c in plan.columns], default=repr).encode())
            total += len(values[plan.columns[0]]) if plan.columns else 0
        fingerprint = digest.hexdigest()
        if frame.num_rows is None:
            # a RecordBatchReader can be read once: the second pass reads the batches the first one kept
            from nagents_frames.frames import _Frame as _ArrowFrame

            kept = getattr(frame, "batches", [])
            frame = _ArrowFrame(pa.Table.from_batches(kept, schema=frame.data.schema))
        job = _FrameJob(bound, options, kind="frame", job_id=_job_id("frame", fingerprint, job_name), name=job_name,
                        fingerprint=fingerprint, total=total)
        outcomes: list[Outcome | None] = [None] * total
        error: BaseException | None = None
        report: dict[str, Any] | None = None
        try:
            async with executor as ex:
                await job.open(ex.cancel)
                for index, outcome in _outcomes_from_table(await bound.results(job.job_id, ok_only=True)).items():
                    if 0 <= index < total:
                        outcomes[index] = outcome
                        bar(outcome)

                def chunks() -> Iterator[list[PreparedRequest]]:
                    for start, values in frame.chunks(plan.columns, options.chunk_size):
                        reqs = plan.prepare(values, start=start, model=model, params=ex.params)
                        todo = [r for r in reqs if outcomes[r.index] is None]
                        if todo:
                            yield todo

                window = _window(ex.concurrency, options.chunk_size)
                async for requests, chunk_outcomes in ex.run(chunks(), window=window, keep_partial=True):
                    await job.write(requests, chunk_outcomes)
                    for request, outcome in zip(requests, chunk_outcomes):
                        outcomes[request.index] = outcome
                report = _report_dict(ex.stats.report())
        except BaseException as exc:
            error = exc
            raise
        finally:
            bar.close()
            if job.sink is not None:
                await asyncio.shield(job.close(error, report, total))
        if job.sink is not None and job.sink.status is BatchStatus.CANCELLED:
            raise JobError(f"job {job.job_id} was cancelled from another process")
        missing = [i for i, o in enumerate(outcomes) if o is None]
        if missing:
            raise JobError(f"{len(missing)} rows have no result (first: row {missing[0]})")
        return [o for o in outcomes if o is not None]
    finally:
        if owned:
            await bound.close()


class _StoredWindow:
    """Stored answers of a job, fetched a window of rows at a time (bounded memory on resume)."""

    def __init__(self, store: BatchStore, job_id: str, done: array[int], span: int) -> None:
        self.store = store
        self.job_id = job_id
        self.done = done
        self.span = span
        self.lo = 0
        self.hi = 0
        self.cache: dict[int, Outcome] = {}

    async def between(self, start: int, stop: int) -> dict[int, Outcome]:
        first = bisect.bisect_left(self.done, start)
        if first >= len(self.done) or self.done[first] >= stop:
            return {}
        if not (self.lo <= start and stop <= self.hi):
            self.lo, self.hi = start, max(stop, start + self.span)
            table = await self.store.results(self.job_id, start=self.lo, stop=self.hi, ok_only=True)
            self.cache = _outcomes_from_table(table)
        return {i: o for i, o in self.cache.items() if start <= i < stop}


async def stream_with_store(
    batches: Iterator[pa.RecordBatch], plan: PromptPlan, options: CompletionOptions, *,
    store: BatchStore | str | os.PathLike[str], job_name: str | None, input_fingerprint: str | None,
    on_outcome: Callable[[Outcome], None] | None,
    on_job: Callable[[str], None] | None = None,
) -> AsyncGenerator[pa.RecordBatch, None]:
    """Stream record batches through the model, recording the job in ``store``; yields each input batch with
    the output columns of :func:`nagents_frames.frames.outcome_arrays` added. Memory stays bounded.

    The job is identified by ``input_fingerprint`` (e.g. file names, sizes, mtimes), the prompt plan, the
    model and its parameters, and ``job_name``. Without ``input_fingerprint`` the identity is the prompt
    plan, model and ``job_name`` alone: give distinct inputs distinct job names then.
    """
    from nagents_frames.frames import outcome_arrays

    bound, owned = await _resolve_store(store)
    try:
        executor = options.executor(on_outcome=on_outcome)
        model = options.provider.model
        identity = json.dumps(
            [input_fingerprint, repr(plan), options.provider.describe(), executor.params.as_dict()],
            sort_keys=True, default=str,
        )
        fingerprint = hashlib.blake2b(identity.encode(), digest_size=20).hexdigest()
        job = _FrameJob(bound, options, kind="stream", job_id=_job_id("stream", fingerprint, job_name),
                        name=job_name, fingerprint=fingerprint, total=0)
        error: BaseException | None = None
        report: dict[str, Any] | None = None
        seen = 0
        try:
            async with executor as ex:
                await job.open(ex.cancel)
                if on_job is not None:
                    on_job(job.job_id)
                indices = await bound.result_indices(job.job_id, ok_only=True)
                done = array("q", [int(i) for i in indices.to_pylist() if i is not None])
                stored = _StoredWindow(bound, job.job_id, done, span=max(options.chunk_size * 50, 10_000))
                pending: deque[tuple[pa.RecordBatch, list[PreparedRequest], dict[int, Outcome]]] = deque()

                async def chunks() -> AsyncIterator[list[PreparedRequest]]:
                    nonlocal seen
                    start = 0
                    for batch in batches:
                        for offset in range(0, max(batch.num_rows, 1), options.chunk_size):
                            part = batch.slice(offset, options.chunk_size)
                            values = {c: part.column(c).to_pylist() for c in plan.columns}
                            reqs = plan.prepare(values, start=start + offset, model=model, params=ex.params)
                            known = await stored.between(start + offset, start + offset + part.num_rows)
                            pending.append((part, reqs, known))
                            yield [r for r in reqs if r.index not in known]
                        start += batch.num_rows
                        seen = start

                async for requests, chunk_outcomes in ex.run(chunks(), window=_window(ex.concurrency,
                                                                                       options.chunk_size)):
                    part, reqs, known = pending.popleft()
                    await job.write(requests, chunk_outcomes)
                    if on_outcome is not None:
                        for outcome in known.values():
                            on_outcome(outcome)
                    merged = dict(known)
                    merged.update((r.index, o) for r, o in zip(requests, chunk_outcomes))
                    arrays = outcome_arrays([merged[r.index] for r in reqs], options)
                    yield pa.RecordBatch.from_arrays(
                        [*part.columns, *arrays.values()], names=[*part.schema.names, *arrays.keys()]
                    )
                report = _report_dict(ex.stats.report())
        except BaseException as exc:
            error = exc
            raise
        finally:
            if job.sink is not None:
                await asyncio.shield(job.close(error, report, seen if error is None else None))
    finally:
        if owned:
            await bound.close()
