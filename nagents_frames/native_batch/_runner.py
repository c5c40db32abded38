"""NativeBatchRunner: a job's requests through a provider's own batch API, resumable from the ledger.

::

    pending requests ─► split to the limits ─► temp file per part ─► upload / create ─► ledger (batch id)
                                                                                         │
    (requests, outcomes) chunks ◄─ join by custom_id ◄─ stream result files ◄─ poll (backoff)
                                                                                         │
                         expired / cancelled-by-provider rows ─► sent again (up to max_resubmits)

The ledger (the DuckDB store, or :class:`MemoryLedger`) holds every provider batch id as soon as the
provider returns it, so a new runner on the same store polls the same batches instead of creating new ones.
"""

from __future__ import annotations

import asyncio
import bisect
import tempfile
from collections.abc import AsyncGenerator, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import IO

from nagents_frames.errors import BadRequestError, ConfigurationError, PromptError, RequestError
from nagents_frames.executor import ExecutorStats, Outcome, PreparedRequest, RetryPolicy, Timeouts
from nagents_frames.native_batch._base import (
    BatchInfo,
    BatchLedger,
    BatchLimits,
    MemoryLedger,
    NativeBatchRecord,
    NativeFormat,
    NativeState,
    RecordPhase,
    custom_id_for,
    index_of_custom_id,
    indices_of,
    ranges_of,
)
from nagents_frames.native_batch._http import BatchHTTP
from nagents_frames.providers import Provider
from nagents_frames.types import BatchStatus, GenerationParams, ProviderType

__all__ = ["CANCEL_REQUESTED", "NativeBatchRunner", "format_for", "job_status"]

CANCEL_REQUESTED = "cancel requested"
"""The ``error`` of a record whose job the user cancelled: its rows are not sent again."""

Chunk = tuple[list[PreparedRequest], list[Outcome]]


def format_for(provider: Provider) -> NativeFormat:
    """The batch format of a provider type (OpenAI-compatible types use OpenAI's).

    >>> format_for(Provider(provider_type="anthropic", model="m", api_key="k")).name
    'anthropic'
    """
    ptype = provider.type
    # Azure OpenAI's batch API has other paths (deployments, api-version) and key header: not supported yet
    if ptype in (ProviderType.OPENAI, ProviderType.OPENAI_COMPATIBLE):
        from nagents_frames.native_batch.openai import FORMAT as openai_format

        return openai_format
    if ptype is ProviderType.ANTHROPIC:
        from nagents_frames.native_batch.anthropic import FORMAT as anthropic_format

        return anthropic_format
    raise ConfigurationError(f"provider type {ptype.value} has no native batch API here; use mode='realtime'")


def job_status(records: Sequence[NativeBatchRecord]) -> BatchStatus:
    """The job-API status shown for a job run as native batches.

    >>> job_status([])
    <BatchStatus.PENDING: 'pending'>
    """
    live = [r for r in records if r.phase in (RecordPhase.SUBMITTING, RecordPhase.SUBMITTED)]
    # cancelled when the latest batch was (a resume after a cancel sends the rest in newer batches)
    cancelled = bool(records) and records[-1].error == CANCEL_REQUESTED
    if live:
        states = {r.native_state for r in live}
        if states <= {None, NativeState.VALIDATING} and not any(r.phase is RecordPhase.COLLECTED for r in records):
            return BatchStatus.PENDING
        return BatchStatus.PROCESSING
    if not records:
        return BatchStatus.PENDING
    if cancelled:
        return BatchStatus.CANCELLED
    if all(r.phase is RecordPhase.ABANDONED for r in records):
        return BatchStatus.FAILED
    return BatchStatus.COMPLETED


class NativeBatchRunner:
    """Runs a job's requests as the provider's own batches (OpenAI Batch, Anthropic Message Batches).

    Half the price, answers within 24 hours. Use as an async context manager; :meth:`run` does it all
    and yields ``(requests, outcomes)`` chunks exactly like :meth:`Executor.run
    <nagents_frames.executor.Executor.run>`, so the caller writes them to the store the same way.

    Args:
        provider: an ``openai`` / ``openai_compatible`` or ``anthropic`` provider.
        ledger: where provider batch ids are kept (the store); a :class:`MemoryLedger` by default.
        params: generation parameters for the job (layered over the provider's).
        limits: per-batch limits (the provider's documented ones by default).
        poll_interval / max_poll_interval / poll_backoff: the first wait between polls, its ceiling, and
            the factor it grows by while nothing finishes.
        max_resubmits: how many times rows that a batch left unanswered (expired) are sent again.
        chunk_size: rows per yielded chunk.
        workdir: where part files are written before upload (the system temp dir by default).
        retry / timeouts: for each HTTP call (create, poll, download).

    Example::

        async with NativeBatchRunner(provider, ledger=store) as runner:
            async for requests, outcomes in runner.run(job_id, prepared):
                store.append_results(job_id, outcomes_to_arrow(requests, outcomes))
    """

    def __init__(
        self,
        provider: Provider,
        *,
        ledger: BatchLedger | None = None,
        params: GenerationParams | None = None,
        limits: BatchLimits | None = None,
        poll_interval: float | None = None,
        max_poll_interval: float | None = None,
        poll_backoff: float = 1.5,
        max_resubmits: int | None = None,
        chunk_size: int = 5_000,
        workdir: str | Path | None = None,
        retry: RetryPolicy | None = None,
        timeouts: Timeouts | None = None,
        format: NativeFormat | None = None,
    ) -> None:
        # the job API builds runners itself: Provider.options carries these settings through it
        options = provider.options or {}
        if poll_interval is None:
            poll_interval = float(options.get("batch_poll_interval", 5.0))
        if max_poll_interval is None:
            max_poll_interval = float(options.get("batch_max_poll_interval", max(60.0, poll_interval)))
        if max_resubmits is None:
            max_resubmits = int(options.get("batch_max_resubmits", 2))
        if poll_interval <= 0 or max_poll_interval < poll_interval or poll_backoff < 1.0:
            raise ConfigurationError("poll_interval must be positive, max_poll_interval >= it, poll_backoff >= 1")
        if chunk_size < 1 or max_resubmits < 0:
            raise ConfigurationError("chunk_size must be positive and max_resubmits not negative")
        self.provider = provider
        self.format = format or format_for(provider)
        self.limits = limits or self.format.limits
        if self.limits.max_requests > self.format.limits.max_requests or self.limits.max_bytes > self.format.limits.max_bytes:
            raise ConfigurationError(f"limits {self.limits} exceed the provider's {self.format.limits}")
        self.ledger: BatchLedger = ledger if ledger is not None else MemoryLedger()
        self.params = provider.params.merged(params)
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.poll_backoff = poll_backoff
        self.max_resubmits = max_resubmits
        self.chunk_size = chunk_size
        self.workdir = Path(workdir) if workdir is not None else None
        self.http = BatchHTTP(provider, retry=retry, timeouts=timeouts)
        self.batches_created = 0
        self.stats = ExecutorStats()
        """Rows sent, answered and failed, and tokens, of this runner (``stats.report()`` as for the executor)."""
        self._cancelled: set[str] = set()

    async def __aenter__(self) -> NativeBatchRunner:
        await self.http.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.__aexit__(*exc)

    # --- bookkeeping -------------------------------------------------------------------------------------

    def records(self, job_id: str) -> list[NativeBatchRecord]:
        """The job's provider batches as the ledger knows them."""
        return self.ledger.native_batches(job_id)

    def status(self, job_id: str) -> BatchStatus:
        """The job's status from the ledger (no network; see :meth:`poll` to refresh it)."""
        return job_status(self.records(job_id))

    def _save(self, record: NativeBatchRecord) -> NativeBatchRecord:
        if record.job_id in self._cancelled and record.error != CANCEL_REQUESTED and record.phase in (
            RecordPhase.SUBMITTING, RecordPhase.SUBMITTED
        ):
            # a poll that raced with cancel() must not drop the mark
            record = replace(record, error=CANCEL_REQUESTED)
        self.ledger.save_native_batch(record)
        return record

    @staticmethod
    def _taken(records: Sequence[NativeBatchRecord]) -> _RangeSet:
        return _RangeSet(
            run for r in records if r.phase in (RecordPhase.SUBMITTING, RecordPhase.SUBMITTED) for run in r.ranges
        )

    @staticmethod
    def _sent_count(records: Sequence[NativeBatchRecord]) -> Mapping[int, int]:
        return _Counts([_RangeSet(r.ranges) for r in records if r.phase is RecordPhase.COLLECTED])

    # --- submit ----------------------------------------------------------------------------------------

    async def submit(self, job_id: str, requests: Sequence[PreparedRequest]) -> tuple[list[NativeBatchRecord], Chunk]:
        """Create provider batches for the requests that no live batch of the job holds yet.

        Returns the new records and the rows that cannot be sent at all (no prompt, or one request over the
        byte limit) with their failure outcomes. Splits at ``limits``; each part is written to a temp file
        and streamed from there, so memory holds one request at a time.
        """
        records = self.records(job_id)
        if job_id in self._cancelled:
            return [], ([], [])
        taken = self._taken(records)
        todo = sorted((r for r in requests if r.index not in taken), key=lambda r: r.index)
        part = max((r.part for r in records), default=-1) + 1
        created: list[NativeBatchRecord] = []
        unsendable: Chunk = ([], [])
        fmt = self.format
        fixed = len(fmt.body_prefix) + len(fmt.body_suffix)
        with self._tempfile() as handle:
            rows: list[int] = []
            size = fixed

            async def flush() -> None:
                nonlocal part, rows, size
                if rows and job_id not in self._cancelled:
                    handle.flush()
                    created.append(await self._create(job_id, part, rows, handle, size))
                    part += 1
                handle.seek(0)
                handle.truncate()
                rows = []
                size = fixed

            for request in todo:
                if request.error is not None or request.messages is None:
                    unsendable[0].append(request)
                    unsendable[1].append(Outcome.failure(request.error or PromptError("the row has no messages")))
                    continue
                params = self.params if request.params is None else self.params.merged(request.params)
                item = fmt.encode_item(self.provider, custom_id_for(request.index), request.messages, params)
                extra = len(item) + (len(fmt.separator) if rows else 0)
                if fixed + len(item) > self.limits.max_bytes:
                    unsendable[0].append(request)
                    unsendable[1].append(
                        Outcome.failure(
                            PromptError(f"the request is {len(item)} bytes, over the batch limit of {self.limits.max_bytes}")
                        )
                    )
                    continue
                if len(rows) >= self.limits.max_requests or size + extra > self.limits.max_bytes:
                    await flush()
                    extra = len(item)
                if not rows:
                    handle.write(fmt.body_prefix)
                elif fmt.separator:
                    handle.write(fmt.separator)
                handle.write(item)
                rows.append(request.index)
                size += extra
            await flush()
        return created, unsendable

    def _tempfile(self) -> IO[bytes]:
        return tempfile.TemporaryFile(prefix="nagents-batch-", suffix=".jsonl", dir=self.workdir)

    async def _create(self, job_id: str, part: int, rows: list[int], handle: IO[bytes], size: int) -> NativeBatchRecord:
        """Upload one part (ending with the format's suffix) and create its batch; the ledger sees each step."""
        fmt = self.format
        handle.write(fmt.body_suffix)
        handle.flush()
        record = self._save(
            NativeBatchRecord(
                job_id=job_id, part=part, provider=fmt.name, ranges=ranges_of(rows), request_count=len(rows), bytes=size
            )
        )
        metadata = {"nagents_job_id": job_id[:512], "nagents_part": str(part)}
        try:
            file_id: str | None = None
            spec = fmt.upload_spec(self.provider, f"nagents-{part}.jsonl", size)
            if spec is not None:
                raw = await self.http.send_file(spec.head, handle, prefix=spec.prefix, suffix=spec.suffix)
                file_id = fmt.parse_upload(raw.status, raw.headers, raw.body)
                record = self._save(record.evolve(input_file_id=file_id))
                raw = await self.http.call(fmt.create_request(self.provider, file_id, metadata))
            else:
                raw = await self.http.send_file(fmt.create_request(self.provider, None, metadata), handle)
            info = fmt.parse_batch(raw.status, raw.headers, raw.body)
        except RequestError as error:
            # a batch that could not be created (after retries) holds no rows: a later run sends them again
            self._save(record.evolve(phase=RecordPhase.ABANDONED, error=error.cell()))
            raise
        self.batches_created += 1
        self.stats.requests_sent += record.request_count
        record = self._save(self._with_info(record.evolve(phase=RecordPhase.SUBMITTED), info))
        if job_id in self._cancelled:  # cancel() ran while this batch was being created
            raw = await self.http.call(fmt.cancel_request(self.provider, info.id))
            record = self._save(self._with_info(record, fmt.parse_batch(raw.status, raw.headers, raw.body)))
        return record

    def _count(self, outcome: Outcome) -> Outcome:
        stats = self.stats
        if outcome.error is None:
            stats.succeeded += 1
        else:
            stats.failed += 1
        stats.prompt_tokens += outcome.prompt_tokens or 0
        stats.completion_tokens += outcome.completion_tokens or 0
        return outcome

    @staticmethod
    def _with_info(record: NativeBatchRecord, info: BatchInfo) -> NativeBatchRecord:
        return record.evolve(
            batch_id=info.id,
            state=info.state.value,
            output_ref=info.output_ref or record.output_ref,
            error_ref=info.error_ref or record.error_ref,
            succeeded=info.succeeded,
            failed=info.failed,
            error=record.error if record.error == CANCEL_REQUESTED else (info.errors or record.error),
        )

    async def recover(self, job_id: str) -> list[NativeBatchRecord]:
        """Settle records left in SUBMITTING by a crash: adopt the batch if the provider has it (found by
        its metadata where the API lists batches), otherwise release its rows to be sent again."""
        out = []
        for record in self.records(job_id):
            if record.phase is not RecordPhase.SUBMITTING:
                out.append(record)
                continue
            found = await self._find_created(record)
            if found is not None:
                record = self._save(self._with_info(record.evolve(phase=RecordPhase.SUBMITTED), found))
            else:
                record = self._save(record.evolve(phase=RecordPhase.ABANDONED, error="interrupted before the batch was created"))
            out.append(record)
        return out

    async def _find_created(self, record: NativeBatchRecord) -> BatchInfo | None:
        if record.batch_id:
            raw = await self.http.call(self.format.get_request(self.provider, record.batch_id))
            return self.format.parse_batch(raw.status, raw.headers, raw.body)
        listing = self.format.list_request(self.provider)
        if listing is None or record.input_file_id is None:
            return None  # without an uploaded file no batch can have been created from it
        raw = await self.http.call(listing)
        for info, metadata in self.format.parse_list(raw.status, raw.headers, raw.body):
            if metadata.get("nagents_job_id") == record.job_id[:512] and metadata.get("nagents_part") == str(record.part):
                return info
        return None

    # --- poll / cancel ------------------------------------------------------------------------------------

    async def poll(self, job_id: str) -> list[NativeBatchRecord]:
        """Fetch every live batch of the job once and record its state; returns all records."""
        out = []
        for record in self.records(job_id):
            if record.phase is RecordPhase.SUBMITTED and record.batch_id and not _terminal(record):
                raw = await self.http.call(self.format.get_request(self.provider, record.batch_id))
                record = self._save(self._with_info(record, self.format.parse_batch(raw.status, raw.headers, raw.body)))
            out.append(record)
        return out

    async def cancel(self, job_id: str) -> list[NativeBatchRecord]:
        """Cancel every live batch of the job and send nothing more for it from this runner. Results the
        provider already produced are still collected by a running :meth:`run` (a cancelled batch keeps its
        partial results); the rows it never ran stay without a result, for a later resume to send."""
        self._cancelled.add(job_id)
        out = []
        for record in self.records(job_id):
            if record.phase is RecordPhase.SUBMITTED and record.batch_id and not _terminal(record):
                raw = await self.http.call(self.format.cancel_request(self.provider, record.batch_id))
                record = self._with_info(record, self.format.parse_batch(raw.status, raw.headers, raw.body))
                record = self._save(record.evolve(error=CANCEL_REQUESTED))
            out.append(record)
        return out

    # --- results ----------------------------------------------------------------------------------------

    async def collect(
        self, record: NativeBatchRecord, pending: dict[int, PreparedRequest], sent: Mapping[int, int]
    ) -> AsyncGenerator[Chunk, None]:
        """Stream a finished batch's result files and yield its final rows that are still ``pending``
        (removing them from it). The record is marked COLLECTED after the last chunk was consumed."""
        info = BatchInfo(
            id=record.batch_id or "",
            state=record.native_state or NativeState.FAILED,
            raw_status=record.state or "",
            output_ref=record.output_ref,
            error_ref=record.error_ref,
        )
        # membership by binary search over the runs and a bitmap of seen rows: O(batch) bytes, not O(batch) objects
        starts = [a for a, _ in record.ranges]
        ranges = record.ranges
        low = ranges[0][0] if ranges else 0
        seen = bytearray((ranges[-1][1] - low) if ranges else 0)

        def mine(index: int) -> bool:
            k = bisect.bisect_right(starts, index) - 1
            return k >= 0 and index < ranges[k][1]

        reqs: list[PreparedRequest] = []
        outs: list[Outcome] = []
        for download in self.format.result_requests(self.provider, info):
            async for line in self.http.lines(download):
                try:
                    row = self.format.parse_result_line(line)
                except RequestError:
                    continue  # a garbled line: its row stays unanswered and is sent again
                index = index_of_custom_id(row.custom_id)
                if index is None or not mine(index):
                    continue
                seen[index - low] = 1
                request = pending.get(index)
                if request is None:
                    continue  # answered already (a download repeated after a restart)
                outcome = row.outcome
                if not row.state.final and (sent.get(index, 0) < self.max_resubmits or record.error == CANCEL_REQUESTED):
                    continue  # never ran: free to be sent again (or left unanswered after a cancel)
                del pending[index]
                reqs.append(request)
                outs.append(self._count(_redact(self.provider, outcome)))
                if len(reqs) >= self.chunk_size:
                    yield reqs, outs
                    reqs, outs = [], []
        if info.state is NativeState.FAILED:
            # the batch failed as a whole (e.g. its input did not validate): every unanswered row fails
            error = BadRequestError(f"the provider batch {info.id} failed: {record.error or 'no reason given'}")
            missing = [i for i in indices_of(ranges) if not seen[i - low]]
        else:
            # rows without any result line are sent again, but not for ever
            error = BadRequestError(f"the provider batch {info.id} returned no result for this request")
            given_up = record.error != CANCEL_REQUESTED
            missing = [
                i for i in indices_of(ranges) if given_up and not seen[i - low] and sent.get(i, 0) >= self.max_resubmits
            ]
        for index in missing:
            request = pending.pop(index, None)
            if request is not None:
                reqs.append(request)
                outs.append(self._count(Outcome.failure(error)))
        if reqs:
            yield reqs, outs
        self._save(record.evolve(phase=RecordPhase.COLLECTED))

    async def run(self, job_id: str, requests: Sequence[PreparedRequest], *, wait: bool = True) -> AsyncGenerator[Chunk, None]:
        """Submit, poll with backoff, collect; yield ``(requests, outcomes)`` chunks as batches finish.

        ``requests`` are the job's rows still without a result (on a restart: the same rows, minus those
        the store already has). Batches already in the ledger are polled, not created again. Rows a batch
        left unanswered (expired) are sent again, up to ``max_resubmits`` times; after a :meth:`cancel`
        nothing is sent and the partial results are collected. With ``wait=False`` the run stops after one
        round of submits and polls instead of waiting for every batch to end.
        """
        pending = {r.index: r for r in requests}
        await self.recover(job_id)
        interval = self.poll_interval
        look_for_free = True  # at the start, and whenever a collected batch may have left rows unanswered
        sent: Mapping[int, int] = {}
        while True:
            records = self.records(job_id)
            if look_for_free:
                look_for_free = False
                sent = self._sent_count(records)
                taken = self._taken(records)
                free = [r for i, r in pending.items() if i not in taken]
                del taken
                if free and job_id not in self._cancelled:
                    _, unsendable = await self.submit(job_id, free)
                    for request, outcome in zip(*unsendable, strict=True):
                        pending.pop(request.index, None)
                        self._count(outcome)
                    if unsendable[0]:
                        yield unsendable
                    records = self.records(job_id)
                    interval = self.poll_interval
                del free
            live = [r for r in records if r.phase is RecordPhase.SUBMITTED]
            if not live:
                return
            for record in live:
                if not _terminal(record):
                    assert record.batch_id is not None
                    raw = await self.http.call(self.format.get_request(self.provider, record.batch_id))
                    record = self._save(self._with_info(record, self.format.parse_batch(raw.status, raw.headers, raw.body)))
                if _terminal(record):
                    async for chunk in self.collect(record, pending, sent):
                        yield chunk
                    interval = self.poll_interval
                    look_for_free = True
            if not wait:
                return
            if any(r.phase is RecordPhase.SUBMITTED and not _terminal(r) for r in self.records(job_id)):
                await asyncio.sleep(interval)
                interval = min(interval * self.poll_backoff, self.max_poll_interval)


class _RangeSet:
    """Membership in disjoint half-open runs by binary search (no set of every index)."""

    def __init__(self, runs: Iterable[tuple[int, int]]) -> None:
        self._runs = sorted(runs)
        self._starts = [a for a, _ in self._runs]

    def __contains__(self, index: object) -> bool:
        if not isinstance(index, int):
            return False
        k = bisect.bisect_right(self._starts, index) - 1
        return k >= 0 and index < self._runs[k][1]


class _Counts(Mapping[int, int]):
    """How many collected batches held each row, computed on demand."""

    def __init__(self, sets: list[_RangeSet]) -> None:
        self._sets = sets

    def __getitem__(self, index: int) -> int:
        return sum(1 for s in self._sets if index in s)

    def __iter__(self) -> Iterator[int]:
        return iter(())

    def __len__(self) -> int:
        return 0


def _terminal(record: NativeBatchRecord) -> bool:
    state = record.native_state
    return state is not None and state.is_terminal


def _redact(provider: Provider, outcome: Outcome) -> Outcome:
    if outcome.error and provider.api_key and provider.api_key in outcome.error:
        return replace(outcome, error=provider.redact(outcome.error))
    return outcome

