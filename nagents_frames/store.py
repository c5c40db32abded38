"""The job store: one DuckDB file (or an in-memory database) with jobs, requests and results.

The store is the only module of nagents_frames that speaks SQL. It writes whole Arrow chunks, one
transaction each (``INSERT ... SELECT`` from the Arrow table, upserting on ``(job_id, row_index)`` so that
a request that ran twice is recorded once), keeps DDL out of the hot path (the schema is created by
:meth:`BatchStore.initialize` through numbered migrations), and holds the file open for writing only
while it writes: between writes any other process may open it, read-only, with plain DuckDB::

    >>> import asyncio
    >>> async def main():
    ...     store = BatchStore()                       # in memory; BatchStore("jobs.duckdb") for a file
    ...     await store.initialize()
    ...     return store.sql("select version from schema_version order by version").to_series().to_list()
    >>> asyncio.run(main())
    [1, 2]

Tables (documented in the README): ``schema_version``, ``jobs``, ``requests``, ``results``,
``native_batches``, ``job_meta``; views ``job_counts``, ``error_breakdown``, ``token_totals``.

DuckDB facts this module is built around: one read-write process *or* many read-only ones; a
connection is not thread-safe (all of our own work runs on one store thread); a single-row autocommit
INSERT is ~1000x slower than one INSERT ... SELECT from Arrow; WAL replay has known failures when the
WAL holds DDL, hence DDL only in ``initialize`` followed by a CHECKPOINT, and a CHECKPOINT when a job ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from nagents_frames.errors import JobNotFoundError, SchemaVersionError, StoreError, StoreLockedError
from nagents_frames.executor import OUTCOME_SCHEMA
from nagents_frames.types import BatchJob, BatchStatus, Usage

if TYPE_CHECKING:
    import polars as pl

    from nagents_frames.native_batch._base import NativeBatchRecord

__all__ = ["SCHEMA_VERSION", "BatchStore", "JobRecord", "REQUEST_SCHEMA"]

T = TypeVar("T")

SCHEMA_VERSION = 2
"""The schema version this release writes (see :data:`_MIGRATIONS`)."""

REQUEST_SCHEMA: pa.Schema = pa.schema(
    [  # type: ignore[arg-type]
        pa.field("row_index", pa.int64(), nullable=False),
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("request_key", pa.string(), nullable=False),
        pa.field("messages", pa.string()),
        pa.field("params", pa.string()),
        pa.field("metadata", pa.string()),
    ]
)
"""The Arrow schema of the requests of a job-API job (messages, params and metadata as JSON text)."""

_STATUS_VALUES = ", ".join(f"'{s.value}'" for s in BatchStatus)

# Each migration takes the file from version N-1 to N. Never edit a released one: add the next.
_MIGRATIONS: dict[int, tuple[str, tuple[str, ...]]] = {
    1: (
        "jobs, requests and results",
        (
            """CREATE TABLE IF NOT EXISTS schema_version (
                version INTEGER PRIMARY KEY,
                applied_at TIMESTAMP NOT NULL,
                description VARCHAR NOT NULL
            )""",
            f"""CREATE TABLE jobs (
                id VARCHAR PRIMARY KEY,
                name VARCHAR,
                kind VARCHAR NOT NULL,
                mode VARCHAR NOT NULL,
                status VARCHAR NOT NULL CHECK (status IN ({_STATUS_VALUES})),
                provider VARCHAR,
                model VARCHAR,
                parameters JSON,
                fingerprint VARCHAR,
                total BIGINT NOT NULL DEFAULT 0,
                succeeded BIGINT NOT NULL DEFAULT 0,
                failed BIGINT NOT NULL DEFAULT 0,
                prompt_tokens BIGINT NOT NULL DEFAULT 0,
                completion_tokens BIGINT NOT NULL DEFAULT 0,
                created_at TIMESTAMP NOT NULL,
                started_at TIMESTAMP,
                updated_at TIMESTAMP NOT NULL,
                finished_at TIMESTAMP,
                heartbeat_at TIMESTAMP,
                owner VARCHAR,
                runs INTEGER NOT NULL DEFAULT 0,
                error VARCHAR,
                error_type VARCHAR,
                report JSON
            )""",
            """CREATE TABLE requests (
                job_id VARCHAR NOT NULL,
                row_index BIGINT NOT NULL,
                request_id VARCHAR NOT NULL,
                request_key VARCHAR NOT NULL,
                messages JSON,
                params JSON,
                metadata JSON,
                PRIMARY KEY (job_id, row_index)
            )""",
            """CREATE TABLE results (
                job_id VARCHAR NOT NULL,
                row_index BIGINT NOT NULL,
                request_id VARCHAR NOT NULL,
                request_key VARCHAR NOT NULL,
                response VARCHAR,
                error VARCHAR,
                error_type VARCHAR,
                status_code INTEGER,
                prompt_tokens BIGINT,
                completion_tokens BIGINT,
                attempts INTEGER NOT NULL,
                latency_s DOUBLE,
                finish_reason VARCHAR,
                run INTEGER NOT NULL,
                completed_at TIMESTAMP NOT NULL,
                PRIMARY KEY (job_id, row_index)
            )""",
        ),
    ),
    2: (
        "views, native_batches and job_meta",
        (
            """CREATE TABLE native_batches (
                job_id VARCHAR NOT NULL,
                part INTEGER NOT NULL,
                provider VARCHAR NOT NULL,
                ranges JSON NOT NULL,
                request_count BIGINT NOT NULL,
                phase VARCHAR NOT NULL,
                batch_id VARCHAR,
                input_file_id VARCHAR,
                state VARCHAR,
                output_ref VARCHAR,
                error_ref VARCHAR,
                bytes BIGINT NOT NULL DEFAULT 0,
                succeeded BIGINT NOT NULL DEFAULT 0,
                failed BIGINT NOT NULL DEFAULT 0,
                error VARCHAR,
                created_at TIMESTAMP NOT NULL,
                updated_at TIMESTAMP NOT NULL,
                PRIMARY KEY (job_id, part)
            )""",
            """CREATE TABLE job_meta (
                job_id VARCHAR NOT NULL,
                key VARCHAR NOT NULL,
                value JSON,
                updated_at TIMESTAMP NOT NULL,
                PRIMARY KEY (job_id, key)
            )""",
            """CREATE OR REPLACE VIEW job_counts AS
            SELECT j.id AS job_id, j.name, j.status, j.mode, j.model, j.total,
                   count(r.row_index) AS done,
                   count(r.row_index) FILTER (WHERE r.error IS NULL) AS succeeded,
                   count(r.row_index) FILTER (WHERE r.error IS NOT NULL) AS failed,
                   greatest(j.total - count(r.row_index), 0) AS remaining,
                   j.created_at, j.finished_at
            FROM jobs j LEFT JOIN results r ON r.job_id = j.id
            GROUP BY j.id, j.name, j.status, j.mode, j.model, j.total, j.created_at, j.finished_at""",
            """CREATE OR REPLACE VIEW error_breakdown AS
            SELECT job_id, error_type, status_code, count(*) AS n, min(error) AS example
            FROM results WHERE error IS NOT NULL
            GROUP BY job_id, error_type, status_code""",
            """CREATE OR REPLACE VIEW token_totals AS
            SELECT job_id,
                   coalesce(sum(prompt_tokens), 0)::BIGINT AS prompt_tokens,
                   coalesce(sum(completion_tokens), 0)::BIGINT AS completion_tokens,
                   (coalesce(sum(prompt_tokens), 0) + coalesce(sum(completion_tokens), 0))::BIGINT AS total_tokens,
                   coalesce(sum(attempts), 0)::BIGINT AS attempts,
                   avg(latency_s) AS mean_latency_s
            FROM results GROUP BY job_id""",
        ),
    ),
}


def utcnow() -> datetime:
    """Now, as a naive UTC datetime (the store's TIMESTAMP columns hold UTC)."""
    return datetime.now(UTC).replace(tzinfo=None)


def _aware(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


@dataclass(frozen=True)
class JobRecord:
    """A row of the ``jobs`` table.

    >>> JobRecord(id="j", kind="requests", status=BatchStatus.PENDING, total=3).to_job().pending
    3
    """

    id: str
    kind: str
    status: BatchStatus
    total: int = 0
    succeeded: int = 0
    failed: int = 0
    name: str | None = None
    mode: str = "realtime"
    provider: str | None = None
    model: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    fingerprint: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    created_at: datetime | None = None
    started_at: datetime | None = None
    updated_at: datetime | None = None
    finished_at: datetime | None = None
    heartbeat_at: datetime | None = None
    owner: str | None = None
    runs: int = 0
    error: str | None = None
    error_type: str | None = None
    report: Mapping[str, Any] | None = None

    def to_job(self) -> BatchJob:
        """The public :class:`~nagents_frames.BatchJob` view of this row."""
        return BatchJob(
            id=self.id,
            status=self.status,
            total=self.total,
            succeeded=self.succeeded,
            failed=self.failed,
            name=self.name,
            provider=self.provider,
            model=self.model,
            created_at=_aware(self.created_at),
            updated_at=_aware(self.updated_at),
            finished_at=_aware(self.finished_at),
            error=self.error,
            usage=Usage(self.prompt_tokens, self.completion_tokens),
            mode=self.mode,
        )


_JOB_COLUMNS = (
    "id", "kind", "status", "total", "succeeded", "failed", "name", "mode", "provider", "model", "parameters",
    "fingerprint", "prompt_tokens", "completion_tokens", "created_at", "started_at", "updated_at", "finished_at",
    "heartbeat_at", "owner", "runs", "error", "error_type", "report",
)
_JOB_SELECT = "SELECT " + ", ".join(_JOB_COLUMNS) + " FROM jobs"


def _job_from_row(row: Sequence[Any]) -> JobRecord:
    values = dict(zip(_JOB_COLUMNS, row))
    values["status"] = BatchStatus(values["status"])
    values["parameters"] = json.loads(values["parameters"]) if values["parameters"] else {}
    values["report"] = json.loads(values["report"]) if values["report"] else None
    return JobRecord(**values)


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)


class BatchStore:
    """Jobs and results in a DuckDB file that survives restarts and answers SQL.

    Args:
        path: the DuckDB file (created when missing); ``None`` keeps everything in memory.
        read_only: open the file read-only (for looking at a store another process is writing).
        lock_timeout: seconds to keep retrying while another process holds the file; writes of a
            running job wait this long for a reader to let go before the job fails.
        linger: seconds the file stays open after the last operation (saves reopening it for a burst of
            small operations; other processes wait at most this long for it).

    Call ``await store.initialize()`` once before use (idempotent). ``store.sql("select ...")`` returns
    a polars DataFrame (``arrow=True``: a pyarrow Table).

    >>> import asyncio
    >>> store = BatchStore()
    >>> _ = asyncio.run(store.initialize())
    >>> store.sql("select count(*) as n from jobs")["n"][0]
    0
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, read_only: bool = False,
                 lock_timeout: float = 60.0, linger: float = 0.05) -> None:
        self.path: Path | None = Path(path) if path is not None else None
        if self.path is not None and str(self.path) == ":memory:":
            self.path = None
        self.read_only = read_only
        self.lock_timeout = lock_timeout
        self._initialized = False
        self._closed = False
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nagents-store")
        self._root: duckdb.DuckDBPyConnection | None = None  # in memory: the database lives with it
        self._thread_con: duckdb.DuckDBPyConnection | None = None
        self._pending = 0
        self._generation = 0
        self.linger = linger
        self._pending_lock = threading.Lock()
        self._init_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"BatchStore({str(self.path) if self.path else ':memory:'!r})"

    # --- connections ------------------------------------------------------------------------------------

    def _check_path(self) -> None:
        path = self.path
        assert path is not None
        if path.is_dir():
            raise StoreError(f"store path {str(path)!r} is a directory; give a file name such as jobs.duckdb")
        parent = path.parent if str(path.parent) else Path(".")
        if self.read_only:
            if not path.exists():
                raise StoreError(f"store file {str(path)!r} does not exist (opened read-only)")
            return
        if path.exists():
            if not os.access(path, os.R_OK | os.W_OK):
                raise StoreError(f"store file {str(path)!r} is not writable")
        elif not parent.is_dir():
            raise StoreError(f"cannot create store file {str(path)!r}: {str(parent)!r} is not a directory")
        elif not os.access(parent, os.W_OK):
            raise StoreError(f"cannot create store file {str(path)!r}: directory {str(parent)!r} is not writable")

    def _open(self, timeout: float | None = None) -> duckdb.DuckDBPyConnection:
        """A new connection, retrying while another process holds the file."""
        if self.path is None:
            if self._root is None:
                self._root = duckdb.connect(":memory:")
            return self._root.cursor()
        deadline = time.monotonic() + (self.lock_timeout if timeout is None else timeout)
        delay = 0.005
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=self.read_only)
            except duckdb.IOException as exc:
                # DuckDB reports every file problem as IOException; its text is the only way to tell a
                # lock held by another process (worth waiting for) from a file that is not a database.
                text = str(exc)
                if "lock" not in text.lower():
                    raise StoreError(f"cannot open store file {str(self.path)!r}: {text}") from None
                if time.monotonic() >= deadline:
                    holder = text.split("Conflicting lock is held in", 1)[-1].split(". See also", 1)[0].strip()
                    raise StoreLockedError(
                        f"store file {str(self.path)!r} is locked by another process ({holder}); DuckDB allows one "
                        "writing process or many readers: stop the other writer, or open this one with "
                        "BatchStore(path, read_only=True) to read"
                    ) from None
                # short, even sleeps: file locks do not queue, so a long sleep would miss the gaps
                time.sleep(delay)
                delay = min(delay * 1.5, 0.03)
            except duckdb.Error as exc:
                raise StoreError(f"cannot open store file {str(self.path)!r}: {exc}") from None

    def _in_thread(self, fn: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """Run ``fn`` on the store thread's connection; the file is closed as soon as no work is queued."""
        try:
            con = self._thread_con
            if con is None:
                con = self._open()
                self._thread_con = con
            try:
                return fn(con)
            except (duckdb.Error, OSError) as exc:
                with contextlib.suppress(duckdb.Error):
                    _q(con, "ROLLBACK")
                raise StoreError(f"store {self!r}: {type(exc).__name__}: {exc}") from exc
        finally:
            with self._pending_lock:
                self._pending -= 1
                self._generation += 1
                generation = self._generation
                last = self._pending == 0
            if last and self.path is not None and self._thread_con is not None:
                # letting go of the file soon after the last write is what lets other processes read it; a
                # short linger saves reopening (~50-100 ms) for a burst of small operations
                timer = threading.Timer(self.linger, self._close_later, args=(generation,))
                timer.daemon = True
                timer.start()

    def _close_later(self, generation: int) -> None:
        with contextlib.suppress(RuntimeError):  # the pool is already shut down
            self._pool.submit(self._release, generation)

    def _release(self, generation: int | None = None) -> None:
        with self._pending_lock:
            if generation is not None and (generation != self._generation or self._pending):
                return
        if self._thread_con is not None and self.path is not None:
            with contextlib.suppress(duckdb.Error):
                self._thread_con.close()
            self._thread_con = None

    async def _run(self, fn: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        if self._closed:
            raise StoreError(f"store {self!r} is closed")
        with self._pending_lock:
            self._pending += 1
        future = self._pool.submit(self._in_thread, fn)
        return await asyncio.wrap_future(future)

    def _run_sync(self, fn: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        if self._closed:
            raise StoreError(f"store {self!r} is closed")
        with self._pending_lock:
            self._pending += 1
        return self._pool.submit(self._in_thread, fn).result()

    # --- setup ----------------------------------------------------------------------------------------------

    async def initialize(self) -> BatchStore:
        """Create the schema or bring an older file up to date (idempotent). Returns the store.

        Raises :class:`StoreLockedError` naming the file when another process writes it,
        :class:`SchemaVersionError` for a file of a newer schema, :class:`StoreError` for a path that
        cannot hold a store (a directory, an unwritable place, a file that is not a DuckDB database).
        """
        if self._initialized:
            return self
        if self.path is not None:
            self._check_path()
        await self._run(self._migrate)
        self._initialized = True
        return self

    def _migrate(self, con: duckdb.DuckDBPyConnection) -> None:
        with self._init_lock:
            present = {
                row[0] for row in _q(con,
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'"
                ).fetchall()
            }
            current = 0
            if "schema_version" in present:
                row = _q(con, "SELECT max(version) FROM schema_version").fetchone()
                current = int(row[0]) if row and row[0] is not None else 0
            elif "jobs" in present:
                raise SchemaVersionError(f"{self!r} has a jobs table but no schema_version: not a nagents_frames store")
            if current > SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"{self!r} has schema version {current}, newer than this release knows ({SCHEMA_VERSION}); "
                    "upgrade nagents_frames to open it"
                )
            if current == SCHEMA_VERSION:
                return
            if self.read_only:
                raise SchemaVersionError(f"{self!r} has schema version {current}; open it read-write once to migrate")
            self._apply_migrations(con, current, SCHEMA_VERSION)

    @staticmethod
    def _apply_migrations(con: duckdb.DuckDBPyConnection, current: int, target: int) -> None:
        for version in range(current + 1, target + 1):
            description, statements = _MIGRATIONS[version]
            _q(con, "BEGIN")
            for statement in statements:
                _q(con, statement)
            _q(con, "INSERT INTO schema_version VALUES (?, ?, ?)", [version, utcnow(), description])
            _q(con, "COMMIT")
        # the WAL must not hold DDL when a crash comes (replay of DDL is fragile): checkpoint it away now
        _q(con, "CHECKPOINT")

    async def close(self) -> None:
        """Checkpoint and release the file (in memory: drop the data). Safe to call twice."""
        if self._closed:
            return
        if self._initialized and not self.read_only:
            with contextlib.suppress(StoreError):
                await self.checkpoint()
        self._closed = True
        self._pool.submit(self._release)
        self._pool.shutdown(wait=True)
        if self._root is not None:
            self._root.close()
            self._root = None

    async def __aenter__(self) -> BatchStore:
        return await self.initialize()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def checkpoint(self) -> None:
        """Fold the write-ahead log into the database file."""
        await self._run(lambda con: _q(con, "CHECKPOINT"))

    # --- SQL for users ----------------------------------------------------------------------------------

    def sql(self, query: str, *, params: Sequence[Any] | Mapping[str, Any] | None = None,
            arrow: bool = False) -> pl.DataFrame | pa.Table:
        """Run ``query`` and return a polars DataFrame (``arrow=True``: a pyarrow Table).

        Meant for reading: tables ``jobs``, ``requests``, ``results`` and the views ``job_counts``,
        ``error_breakdown``, ``token_totals``.

        >>> import asyncio
        >>> store = BatchStore(); _ = asyncio.run(store.initialize())
        >>> store.sql("select 1 + 1 as two", arrow=True).to_pydict()
        {'two': [2]}
        """
        if not self._initialized and self.path is None:
            raise StoreError("call 'await store.initialize()' before using an in-memory store")

        def run(con: duckdb.DuckDBPyConnection) -> pa.Table:
            relation = con.sql(query, params=params) if params is not None else con.sql(query)
            return pa.table({}) if relation is None else relation.to_arrow_table()

        table = self._run_sync(run)
        if arrow:
            return table
        import polars as pl

        out = pl.from_arrow(table)
        assert isinstance(out, pl.DataFrame)
        return out

    def report_tables(self, job_id: str) -> tuple[pa.Table, pa.Table]:
        """The job's row (all columns of ``jobs``) and the result columns a job report draws, as Arrow.

        Synchronous like :meth:`sql`, so reports render from plain (notebook) code.
        """
        job = self.sql("SELECT * FROM jobs WHERE id = ?", params=[job_id], arrow=True)
        results = self.sql(
            "SELECT row_index, error, error_type, status_code, attempts, prompt_tokens, completion_tokens, "
            "latency_s, completed_at FROM results WHERE job_id = ? ORDER BY row_index",
            params=[job_id], arrow=True,
        )
        assert isinstance(job, pa.Table) and isinstance(results, pa.Table)
        return job, results

    # --- jobs -------------------------------------------------------------------------------------------

    async def create_job(self, job: JobRecord, requests: pa.Table | None = None) -> None:
        """Insert a job row and (for job-API jobs) its requests, in one transaction."""

        def write(con: duckdb.DuckDBPyConnection) -> None:
            now = utcnow()
            _q(con, "BEGIN")
            _q(con,
                "INSERT INTO jobs (id, name, kind, mode, status, provider, model, parameters, fingerprint, total, "
                "created_at, updated_at, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [job.id, job.name, job.kind, job.mode, job.status.value, job.provider, job.model,
                 _dumps(dict(job.parameters)), job.fingerprint, job.total, now, now, job.owner],
            )
            if requests is not None and requests.num_rows:
                con.register("_nf_requests", requests)
                try:
                    _q(con,
                        "INSERT INTO requests SELECT ?, row_index, request_id, request_key, messages, params, metadata "
                        "FROM _nf_requests",
                        [job.id],
                    )
                finally:
                    con.unregister("_nf_requests")
            _q(con, "COMMIT")

        try:
            await self._run(write)
        except StoreError as exc:
            if isinstance(exc.__cause__, duckdb.ConstraintException):
                raise StoreError(f"a job with id {job.id!r} already exists in {self!r}") from exc
            raise

    async def find_job(self, job_id: str) -> JobRecord | None:
        """The job's row, or ``None``."""

        def read(con: duckdb.DuckDBPyConnection) -> JobRecord | None:
            row = _q(con, _JOB_SELECT + " WHERE id = ?", [job_id]).fetchone()
            return _job_from_row(row) if row else None

        return await self._run(read)

    async def get_job(self, job_id: str) -> JobRecord:
        """The job's row; :class:`JobNotFoundError` when there is none."""
        record = await self.find_job(job_id)
        if record is None:
            raise JobNotFoundError(f"no job with id {job_id!r} in {self!r}")
        return record

    async def list_jobs(self) -> list[JobRecord]:
        """Every job, oldest first."""
        return await self._run(
            lambda con: [_job_from_row(r) for r in _q(con, _JOB_SELECT + " ORDER BY created_at, id").fetchall()]
        )

    async def claim_job(self, job_id: str, owner: str, *, expected_owner: str | None,
                        from_statuses: Sequence[BatchStatus]) -> bool:
        """Make ``owner`` the job's runner and set it PROCESSING, if it is still owned by ``expected_owner``
        and in one of ``from_statuses`` (so two processes cannot both take over a job)."""
        statuses = [s.value for s in from_statuses]

        def claim(con: duckdb.DuckDBPyConnection) -> bool:
            now = utcnow()
            placeholders = ", ".join("?" for _ in statuses)
            rows = _q(con,
                "UPDATE jobs SET owner = ?, status = 'processing', heartbeat_at = ?, updated_at = ?, "
                "started_at = coalesce(started_at, ?), finished_at = NULL, error = NULL, error_type = NULL, "
                f"runs = runs + 1 WHERE id = ? AND owner IS NOT DISTINCT FROM ? AND status IN ({placeholders}) "
                "RETURNING id",
                [owner, now, now, now, job_id, expected_owner, *statuses],
            ).fetchall()
            return bool(rows)

        return await self._run(claim)

    async def set_status(self, job_id: str, status: BatchStatus, *, from_statuses: Sequence[BatchStatus],
                         error: str | None = None, error_type: str | None = None) -> bool:
        """Move the job to ``status`` if it is in one of ``from_statuses``; True when it moved."""

        def update(con: duckdb.DuckDBPyConnection) -> bool:
            now = utcnow()
            placeholders = ", ".join("?" for _ in from_statuses)
            rows = _q(con,
                "UPDATE jobs SET status = ?, updated_at = ?, error = coalesce(?, error), "
                "error_type = coalesce(?, error_type), "
                "finished_at = CASE WHEN ? THEN ? ELSE finished_at END "
                f"WHERE id = ? AND status IN ({placeholders}) RETURNING id",
                [status.value, now, error, error_type, status.is_terminal, now, job_id,
                 *(s.value for s in from_statuses)],
            ).fetchall()
            return bool(rows)

        return await self._run(update)

    async def release_job(self, job_id: str, owner: str) -> None:
        """Let go of a job this owner was running (it stays resumable by anyone at once)."""
        await self._run(
            lambda con: _q(con,
                "UPDATE jobs SET owner = NULL, updated_at = ? WHERE id = ? AND owner = ?", [utcnow(), job_id, owner]
            )
        )

    async def heartbeat(self, job_id: str, owner: str) -> BatchStatus:
        """Record that ``owner`` is alive and still running the job; returns the job's status."""

        def beat(con: duckdb.DuckDBPyConnection) -> BatchStatus:
            now = utcnow()
            _q(con, "UPDATE jobs SET heartbeat_at = ? WHERE id = ? AND owner = ?", [now, job_id, owner])
            row = _q(con, "SELECT status FROM jobs WHERE id = ?", [job_id]).fetchone()
            if row is None:
                raise JobNotFoundError(f"no job with id {job_id!r} in {self!r}")
            return BatchStatus(row[0])

        return await self._run(beat)

    async def finish_job(self, job_id: str, *, status: BatchStatus | None, from_statuses: Sequence[BatchStatus],
                         report: Mapping[str, Any] | None = None, error: str | None = None,
                         error_type: str | None = None, total: int | None = None,
                         otherwise: BatchStatus | None = None) -> JobRecord:
        """End a run: recount the job from its results, store the run report, move the status (when it is
        in ``from_statuses``), let go of the owner, and checkpoint. Returns the job as it is now.

        With ``status=None`` the job becomes COMPLETED when every request has a result, and ``otherwise``
        (``None``: keeps its status) when some have none.
        """

        def finish(con: duckdb.DuckDBPyConnection) -> JobRecord:
            now = utcnow()
            _q(con, "BEGIN")
            if total is not None:
                _q(con, "UPDATE jobs SET total = ? WHERE id = ?", [total, job_id])
            counts = _q(con,
                "SELECT count(*) FILTER (WHERE error IS NULL), count(*) FILTER (WHERE error IS NOT NULL), "
                "coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0) FROM results WHERE job_id = ?",
                [job_id],
            ).fetchone()
            assert counts is not None
            row = _q(con, "SELECT total, status FROM jobs WHERE id = ?", [job_id]).fetchone()
            if row is None:
                _q(con, "ROLLBACK")
                raise JobNotFoundError(f"no job with id {job_id!r} in {self!r}")
            target = status
            if target is None:
                target = BatchStatus.COMPLETED if counts[0] + counts[1] >= row[0] else otherwise
            moved = target is not None and BatchStatus(row[1]) in from_statuses
            failure = (error, error_type) if target is not BatchStatus.COMPLETED else (None, None)
            _q(con,
                "UPDATE jobs SET succeeded = ?, failed = ?, prompt_tokens = ?, completion_tokens = ?, updated_at = ?, "
                "report = coalesce(?, report), owner = NULL, "
                "status = CASE WHEN ? THEN ? ELSE status END, "
                "finished_at = CASE WHEN ? THEN ? ELSE finished_at END, "
                "error = CASE WHEN ? THEN ? ELSE error END, error_type = CASE WHEN ? THEN ? ELSE error_type END "
                "WHERE id = ?",
                [counts[0], counts[1], counts[2], counts[3], now, _dumps(report),
                 moved, target.value if target else None,
                 moved and target is not None and target.is_terminal, now,
                 moved, failure[0], moved, failure[1], job_id],
            )
            _q(con, "COMMIT")
            _q(con, "CHECKPOINT")
            out = _q(con, _JOB_SELECT + " WHERE id = ?", [job_id]).fetchone()
            assert out is not None
            return _job_from_row(out)

        return await self._run(finish)

    # --- requests and results ---------------------------------------------------------------------------

    async def write_results(self, job_id: str, chunks: Sequence[pa.Table], *, run: int = 0,
                            owner: str | None = None) -> BatchStatus:
        """Write chunks of results (tables of :data:`~nagents_frames.executor.OUTCOME_SCHEMA`), one
        transaction per chunk, upserting on ``(job_id, row_index)``, and keep the job's counters and
        heartbeat current. Returns the job's status after the write (another process may have cancelled it).
        """

        def write(con: duckdb.DuckDBPyConnection) -> BatchStatus:
            status = BatchStatus.PROCESSING
            for table in chunks:
                status = self._write_chunk(con, job_id, table, run, owner)
            return status

        return await self._run(write)

    @staticmethod
    def _write_chunk(con: duckdb.DuckDBPyConnection, job_id: str, table: pa.Table, run: int,
                     owner: str | None) -> BatchStatus:
        if table.schema != OUTCOME_SCHEMA:
            table = table.select(OUTCOME_SCHEMA.names).cast(OUTCOME_SCHEMA)
        if pc.count_distinct(table.column("row_index")).as_py() != table.num_rows:
            raise StoreError(f"a chunk of job {job_id!r} holds the same row_index twice; nothing was written")
        now = utcnow()
        con.register("_nf_chunk", table)
        try:
            _q(con, "BEGIN")
            if table.num_rows:
                lo, hi = _q(con, "SELECT min(row_index), max(row_index) FROM _nf_chunk").fetchone() or (0, 0)
                # what these rows held before (a retried error, a request that ran twice), so the job's
                # counters move by the difference and a row is never counted twice
                before = _q(con,
                    "SELECT count(*) FILTER (WHERE error IS NULL), count(*) FILTER (WHERE error IS NOT NULL), "
                    "coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0) FROM results "
                    "WHERE job_id = ? AND row_index BETWEEN ? AND ? AND row_index IN (SELECT row_index FROM _nf_chunk)",
                    [job_id, lo, hi],
                ).fetchone()
                after = _q(con,
                    "SELECT count(*) FILTER (WHERE error IS NULL), count(*) FILTER (WHERE error IS NOT NULL), "
                    "coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0) FROM _nf_chunk"
                ).fetchone()
                assert before is not None and after is not None
                _q(con,
                    "INSERT INTO results SELECT ?, row_index, request_id, request_key, response, error, error_type, "
                    "status_code, prompt_tokens, completion_tokens, attempts, latency_s, finish_reason, ?, ? "
                    "FROM _nf_chunk ON CONFLICT (job_id, row_index) DO UPDATE SET "
                    "request_id = excluded.request_id, request_key = excluded.request_key, "
                    "response = excluded.response, error = excluded.error, error_type = excluded.error_type, "
                    "status_code = excluded.status_code, prompt_tokens = excluded.prompt_tokens, "
                    "completion_tokens = excluded.completion_tokens, attempts = excluded.attempts, "
                    "latency_s = excluded.latency_s, finish_reason = excluded.finish_reason, run = excluded.run, "
                    "completed_at = excluded.completed_at",
                    [job_id, run, now],
                )
                delta = [a - b for a, b in zip(after, before)]
                row = _q(con,
                    "UPDATE jobs SET succeeded = succeeded + ?, failed = failed + ?, prompt_tokens = prompt_tokens + ?, "
                    "completion_tokens = completion_tokens + ?, total = greatest(total, ? + 1), updated_at = ?, "
                    "heartbeat_at = CASE WHEN owner IS NOT DISTINCT FROM ? THEN ? ELSE heartbeat_at END "
                    "WHERE id = ? RETURNING status",
                    [*delta, hi, now, owner, now, job_id],
                ).fetchone()
            else:
                row = _q(con, "SELECT status FROM jobs WHERE id = ?", [job_id]).fetchone()
            if row is None:
                _q(con, "ROLLBACK")
                raise JobNotFoundError(f"no job with id {job_id!r} in the store; nothing was written")
            _q(con, "COMMIT")
        finally:
            con.unregister("_nf_chunk")
        return BatchStatus(row[0])

    async def append_results(self, job_id: str, table: pa.Table, *, run: int = 0) -> BatchStatus:
        """Write one chunk of results (see :meth:`write_results`)."""
        return await self.write_results(job_id, [table], run=run)

    async def pending_requests(self, job_id: str, *, errors_only: bool = False) -> pa.Table:
        """The stored requests of a job-API job that still need sending, by row index: those without a
        result, or (``errors_only``) those whose result has an error. Columns of :data:`REQUEST_SCHEMA`."""
        if errors_only:
            query = (
                "SELECT q.row_index, q.request_id, q.request_key, q.messages::VARCHAR AS messages, "
                "q.params::VARCHAR AS params, q.metadata::VARCHAR AS metadata FROM requests q "
                "SEMI JOIN (SELECT row_index FROM results WHERE job_id = ? AND error IS NOT NULL) r "
                "ON q.row_index = r.row_index WHERE q.job_id = ? ORDER BY q.row_index"
            )
        else:
            query = (
                "SELECT q.row_index, q.request_id, q.request_key, q.messages::VARCHAR AS messages, "
                "q.params::VARCHAR AS params, q.metadata::VARCHAR AS metadata FROM requests q "
                "ANTI JOIN (SELECT row_index FROM results WHERE job_id = ?) r "
                "ON q.row_index = r.row_index WHERE q.job_id = ? ORDER BY q.row_index"
            )
        table = await self._run(lambda con: con.sql(query, params=[job_id, job_id]).to_arrow_table())
        return table.cast(REQUEST_SCHEMA)

    async def result_indices(self, job_id: str, *, ok_only: bool = False) -> pa.Array:
        """Row indices of the job that have a result (``ok_only``: a result without error), ascending."""
        where = " AND error IS NULL" if ok_only else ""
        table = await self._run(
            lambda con: con.sql(
                f"SELECT row_index FROM results WHERE job_id = ?{where} ORDER BY row_index", params=[job_id]
            ).to_arrow_table()
        )
        return table.column(0).combine_chunks().cast(pa.int64())

    async def results(self, job_id: str, *, start: int | None = None, stop: int | None = None,
                      ok_only: bool = False) -> pa.Table:
        """The job's results ordered by row index (optionally rows ``start <= row_index < stop``), with the
        columns of :data:`~nagents_frames.executor.OUTCOME_SCHEMA`."""
        clauses = ["job_id = ?"]
        args: list[Any] = [job_id]
        if start is not None:
            clauses.append("row_index >= ?")
            args.append(start)
        if stop is not None:
            clauses.append("row_index < ?")
            args.append(stop)
        if ok_only:
            clauses.append("error IS NULL")
        query = (
            "SELECT " + ", ".join(OUTCOME_SCHEMA.names) + " FROM results WHERE " + " AND ".join(clauses)
            + " ORDER BY row_index"
        )
        table = await self._run(lambda con: con.sql(query, params=args).to_arrow_table())
        return table.cast(OUTCOME_SCHEMA)

    # --- provider batch ids (native batch APIs) and per-job key/value -----------------------------------

    def save_native_batch(self, record: NativeBatchRecord) -> None:
        """Insert or replace a provider batch record by ``(job_id, part)`` (the ``BatchLedger`` protocol)."""

        def save(con: duckdb.DuckDBPyConnection) -> None:
            _q(con,
                "INSERT OR REPLACE INTO native_batches VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [record.job_id, record.part, record.provider, record.ranges_json(), record.request_count,
                 str(record.phase), record.batch_id, record.input_file_id, record.state, record.output_ref,
                 record.error_ref, record.bytes, record.succeeded, record.failed, record.error,
                 _naive(record.created_at), _naive(record.updated_at)],
            )

        self._run_sync(save)

    def native_batches(self, job_id: str) -> list[NativeBatchRecord]:
        """Every provider batch record of the job, by part (the ``BatchLedger`` protocol)."""
        from nagents_frames.native_batch._base import NativeBatchRecord, RecordPhase

        rows = self._run_sync(
            lambda con: _q(con,
                "SELECT job_id, part, provider, ranges::VARCHAR, request_count, phase, batch_id, input_file_id, state, "
                "output_ref, error_ref, bytes, succeeded, failed, error, created_at, updated_at "
                "FROM native_batches WHERE job_id = ? ORDER BY part",
                [job_id],
            ).fetchall()
        )
        return [
            NativeBatchRecord(
                job_id=r[0], part=r[1], provider=r[2], ranges=NativeBatchRecord.parse_ranges(r[3]),
                request_count=r[4], phase=RecordPhase(r[5]), batch_id=r[6], input_file_id=r[7], state=r[8],
                output_ref=r[9], error_ref=r[10], bytes=r[11], succeeded=r[12], failed=r[13], error=r[14],
                created_at=_aware(r[15]) or utcnow(), updated_at=_aware(r[16]) or utcnow(),
            )
            for r in rows
        ]

    async def set_meta(self, job_id: str, key: str, value: Any) -> None:
        """Keep a JSON value under ``key`` for the job (room for other engines' bookkeeping)."""
        await self._run(
            lambda con: _q(con,
                "INSERT OR REPLACE INTO job_meta VALUES (?, ?, ?, ?)", [job_id, key, _dumps(value), utcnow()]
            )
        )

    async def get_meta(self, job_id: str) -> dict[str, Any]:
        """Every key/value kept for the job."""
        rows = await self._run(
            lambda con: _q(con, "SELECT key, value::VARCHAR FROM job_meta WHERE job_id = ?", [job_id]).fetchall()
        )
        return {k: json.loads(v) if v is not None else None for k, v in rows}


class _Rows(list[tuple[Any, ...]]):
    def fetchone(self) -> tuple[Any, ...] | None:
        return self[0] if self else None

    def fetchall(self) -> list[tuple[Any, ...]]:
        return list(self)


def _q(con: duckdb.DuckDBPyConnection, query: str, params: Sequence[Any] | None = None) -> _Rows:
    """Execute and fetch everything: DuckDB 2 refuses new work on a connection with an unread result."""
    result = con.execute(query, params) if params is not None else con.execute(query)
    return _Rows(result.fetchall() if result.description is not None else [])


def _naive(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo is not None else value
