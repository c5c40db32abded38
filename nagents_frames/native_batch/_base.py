"""Values shared by the native batch formats and the runner: limits, batch states, per-row results,
the ledger of provider batch ids, and the Protocol every provider's batch format implements.

Everything here is pure (no sockets); the runner in :mod:`nagents_frames.native_batch._runner` does I/O.

>>> NativeState("in_progress").batch_status
<BatchStatus.PROCESSING: 'processing'>
>>> ranges_of([0, 1, 2, 5, 6, 9])
((0, 3), (5, 7), (9, 10))
"""

from __future__ import annotations

import enum
import json
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from nagents_frames.errors import ConfigurationError
from nagents_frames.executor import Outcome
from nagents_frames.providers._base import HTTPRequest
from nagents_frames.types import BatchStatus, GenerationParams, Message

if TYPE_CHECKING:
    from nagents_frames.providers import Provider

__all__ = [
    "BatchInfo",
    "BatchLedger",
    "BatchLimits",
    "MemoryLedger",
    "NativeBatchRecord",
    "NativeFormat",
    "NativeState",
    "RecordPhase",
    "RowResult",
    "RowState",
    "UploadSpec",
    "custom_id_for",
    "index_of_custom_id",
    "indices_of",
    "ranges_of",
]


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """How big one provider batch may be: requests and bytes of its input file / request body.

    >>> BatchLimits(max_requests=50_000, max_bytes=200_000_000).max_requests
    50000
    """

    max_requests: int
    max_bytes: int

    def __post_init__(self) -> None:
        if self.max_requests < 1 or self.max_bytes < 64:
            raise ConfigurationError(f"batch limits must be positive, got {self}")


class NativeState(enum.StrEnum):
    """A provider batch's state, normalised over OpenAI (``validating`` … ``cancelled``) and Anthropic
    (``in_progress`` / ``canceling`` / ``ended``).

    >>> NativeState.EXPIRED.is_terminal
    True
    """

    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """True once the provider will not touch the batch any more (results can be read)."""
        return self in (NativeState.COMPLETED, NativeState.FAILED, NativeState.EXPIRED, NativeState.CANCELLED)

    @property
    def batch_status(self) -> BatchStatus:
        """The job-API status this state shows as (an expired batch *failed* to finish in its window)."""
        return _STATE_TO_STATUS[self]



_STATE_TO_STATUS = {
    NativeState.VALIDATING: BatchStatus.PENDING,
    NativeState.IN_PROGRESS: BatchStatus.PROCESSING,
    NativeState.FINALIZING: BatchStatus.PROCESSING,
    NativeState.CANCELLING: BatchStatus.PROCESSING,
    NativeState.COMPLETED: BatchStatus.COMPLETED,
    NativeState.FAILED: BatchStatus.FAILED,
    NativeState.EXPIRED: BatchStatus.FAILED,
    NativeState.CANCELLED: BatchStatus.CANCELLED,
}


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """A provider batch object, parsed.

    ``output_ref`` / ``error_ref`` say where the results are: OpenAI's ``output_file_id`` and
    ``error_file_id``, Anthropic's ``results_url`` (and no error ref: errors are in the same stream).
    """

    id: str
    state: NativeState
    raw_status: str
    total: int = 0
    succeeded: int = 0
    failed: int = 0
    output_ref: str | None = None
    error_ref: str | None = None
    errors: str | None = None


class RowState(enum.StrEnum):
    """What a provider batch did with one request.

    ``EXPIRED`` and ``CANCELLED`` rows were never answered: they get no result row and can be sent again.
    """

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        """Whether the row has its answer (or its error) for good."""
        return self in (RowState.SUCCEEDED, RowState.FAILED)


@dataclass(frozen=True, slots=True)
class RowResult:
    """One line of a provider's result file, translated: which request, what happened, the outcome."""

    custom_id: str
    state: RowState
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class UploadSpec:
    """A streamed upload: ``prefix`` + the file's bytes + ``suffix`` is sent as the body of ``head``."""

    head: HTTPRequest
    prefix: bytes
    suffix: bytes


class RecordPhase(enum.StrEnum):
    """Where one provider batch of a job is in our own bookkeeping.

    ``SUBMITTING``: the input is being uploaded / the batch created (no batch id known yet);
    ``SUBMITTED``: the provider has it (we poll it); ``COLLECTED``: its results are in the store and its
    unanswered rows (expired, cancelled) are free to be sent again; ``ABANDONED``: creation failed for good.
    """

    SUBMITTING = "submitting"
    SUBMITTED = "submitted"
    COLLECTED = "collected"
    ABANDONED = "abandoned"


@dataclass(frozen=True)
class NativeBatchRecord:
    """What the store keeps about one provider batch of a job, so that a restart resumes it.

    ``ranges`` are the job's row indices in the batch as half-open ``(start, stop)`` runs.

    >>> r = NativeBatchRecord(job_id="j", part=0, provider="openai", ranges=((0, 3),), request_count=3)
    >>> r.row_indices()
    [0, 1, 2]
    """

    job_id: str
    part: int
    provider: str
    ranges: tuple[tuple[int, int], ...]
    request_count: int
    phase: RecordPhase = RecordPhase.SUBMITTING
    batch_id: str | None = None
    input_file_id: str | None = None
    state: str | None = None
    output_ref: str | None = None
    error_ref: str | None = None
    bytes: int = 0
    succeeded: int = 0
    failed: int = 0
    error: str | None = None
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    updated_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def row_indices(self) -> list[int]:
        """Every row index in this batch, ascending."""
        return list(indices_of(self.ranges))

    def ranges_json(self) -> str:
        """``ranges`` as JSON text (for a store column)."""
        return json.dumps([list(r) for r in self.ranges])

    @staticmethod
    def parse_ranges(text: str) -> tuple[tuple[int, int], ...]:
        """The inverse of :meth:`ranges_json`.

        >>> NativeBatchRecord.parse_ranges("[[0, 2], [5, 6]]")
        ((0, 2), (5, 6))
        """
        return tuple((int(a), int(b)) for a, b in json.loads(text))

    @property
    def native_state(self) -> NativeState | None:
        """The provider state as an enum (``None`` before the batch exists)."""
        return NativeState(self.state) if self.state else None

    def evolve(self, **changes: Any) -> NativeBatchRecord:
        """A copy with ``changes`` and a fresh ``updated_at``."""
        return replace(self, updated_at=datetime.now(UTC), **changes)


class BatchLedger(Protocol):
    """Where the provider batch ids of jobs are kept (the DuckDB store implements it; so does
    :class:`MemoryLedger`). A restart reads them back and resumes polling instead of creating batches again.
    """

    def native_batches(self, job_id: str) -> list[NativeBatchRecord]:
        """Every record of the job, by part number."""
        ...

    def save_native_batch(self, record: NativeBatchRecord) -> None:
        """Insert the record, or replace the one with the same ``(job_id, part)``."""
        ...


class MemoryLedger:
    """A :class:`BatchLedger` in a dict (tests, and jobs without a store). Thread-safe.

    >>> ledger = MemoryLedger()
    >>> ledger.save_native_batch(NativeBatchRecord("j", 0, "openai", ((0, 1),), 1))
    >>> [r.part for r in ledger.native_batches("j")]
    [0]
    """

    def __init__(self) -> None:
        self._records: dict[tuple[str, int], NativeBatchRecord] = {}
        self._lock = threading.Lock()

    def native_batches(self, job_id: str) -> list[NativeBatchRecord]:
        """Every record of the job, by part number."""
        with self._lock:
            return sorted((r for (j, _), r in self._records.items() if j == job_id), key=lambda r: r.part)

    def save_native_batch(self, record: NativeBatchRecord) -> None:
        """Insert or replace by ``(job_id, part)``."""
        with self._lock:
            self._records[(record.job_id, record.part)] = record


class NativeFormat(Protocol):
    """One provider's batch API as pure functions: encode requests, build HTTP requests, parse answers.

    The body of a batch is ``body_prefix`` + items joined by ``separator`` + ``body_suffix``; for OpenAI
    that is a JSONL file (uploaded first), for Anthropic the JSON body of the create call itself.
    """

    name: str
    limits: BatchLimits
    body_prefix: bytes
    separator: bytes
    body_suffix: bytes

    def encode_item(
        self, provider: Provider, custom_id: str, messages: Sequence[Message], params: GenerationParams
    ) -> bytes:
        """One request as it is written into the batch body."""
        ...

    def upload_spec(self, provider: Provider, filename: str, size: int) -> UploadSpec | None:
        """The upload of the body as a file (``None`` when the create call carries the body itself)."""
        ...

    def parse_upload(self, status: int, headers: Mapping[str, str], body: bytes) -> str:
        """The uploaded file's id."""
        ...

    def create_request(self, provider: Provider, file_id: str | None, metadata: Mapping[str, str]) -> HTTPRequest:
        """The create call; when :meth:`upload_spec` is ``None`` its body is streamed from the batch body."""
        ...

    def get_request(self, provider: Provider, batch_id: str) -> HTTPRequest:
        """Retrieve a batch (polling)."""
        ...

    def cancel_request(self, provider: Provider, batch_id: str) -> HTTPRequest:
        """Ask the provider to cancel a batch."""
        ...

    def list_request(self, provider: Provider) -> HTTPRequest | None:
        """List recent batches (to find one created just before a crash), ``None`` if unsupported."""
        ...

    def parse_list(self, status: int, headers: Mapping[str, str], body: bytes) -> list[tuple[BatchInfo, Mapping[str, str]]]:
        """Batches and their metadata from a list answer."""
        ...

    def parse_batch(self, status: int, headers: Mapping[str, str], body: bytes) -> BatchInfo:
        """A batch object; raises the typed error for an HTTP error status."""
        ...

    def result_requests(self, provider: Provider, info: BatchInfo) -> list[HTTPRequest]:
        """The downloads holding a finished batch's per-request results (output and error files)."""
        ...

    def parse_result_line(self, line: bytes) -> RowResult:
        """One line of a result download."""
        ...


def custom_id_for(index: int) -> str:
    """The ``custom_id`` of a job's row: ``r<index>`` (fits Anthropic's ``^[a-zA-Z0-9_-]{1,64}$``).

    Row indices, not user ids: user ids may hold any character and need not be unique across re-submits.

    >>> custom_id_for(12), index_of_custom_id("r12")
    ('r12', 12)
    """
    return f"r{index}"


def index_of_custom_id(custom_id: str) -> int | None:
    """The row index in a ``custom_id`` made by :func:`custom_id_for` (``None`` if it is not one)."""
    if len(custom_id) < 2 or custom_id[0] != "r" or not custom_id[1:].isdigit():
        return None
    return int(custom_id[1:])


def ranges_of(indices: Iterable[int]) -> tuple[tuple[int, int], ...]:
    """Sorted row indices as half-open runs ``(start, stop)``."""
    out: list[tuple[int, int]] = []
    for i in sorted(indices):
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        elif out and out[-1][1] > i:
            continue  # a duplicate
        else:
            out.append((i, i + 1))
    return tuple(out)


def indices_of(ranges: Iterable[tuple[int, int]]) -> Iterator[int]:
    """Every index in the runs."""
    for start, stop in ranges:
        yield from range(start, stop)
