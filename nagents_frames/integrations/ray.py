"""Ray Data integration: the same per-chunk work as :func:`~nagents_frames.batch_complete`, over a cluster.

Two entry points, both built on ``Dataset.map_batches`` with ``batch_format="pyarrow"`` and a fixed
pool of actors (``ActorPoolStrategy``); each actor owns one event loop and one
:class:`~nagents_frames.Executor` (one HTTP session), and renders prompts with the same
:class:`~nagents_frames.frames.CompletionOptions` as every other entry point:

- :func:`batch_complete_dataset` (what ``batch_complete(ds, ...)`` calls for a ``ray.data.Dataset``):
  a lazy Dataset in, a lazy Dataset out with the ``response`` and ``error`` columns added.
- :func:`run_parquet`: Parquet files in, a directory of Parquet files out, driven from this process.
  The input is cut into deterministic chunks (slices of row groups); each actor writes one output
  file per chunk, atomically and under a name fixed by the chunk's first row, so a chunk that Ray
  runs twice writes the same file twice and a re-run after a crash skips the chunks already written.
  The job's bookkeeping (job row, per-chunk progress, final counts, a view over the files) goes to
  the DuckDB store on the driver.

Budgets: ``rpm`` / ``tpm`` are *global* (what the account allows) and divided equally among the
actors; ``concurrency`` is the number of requests in flight *per actor*.

Example::

    >>> import ray                                                    # doctest: +SKIP
    >>> from nagents_frames import Provider, batch_complete           # doctest: +SKIP
    >>> ds = ray.data.read_parquet("reviews/")                        # doctest: +SKIP
    >>> out = batch_complete(ds, provider=Provider(provider_type="openai", model="gpt-4o-mini"),
    ...                      prompt="Classify: {review}", rpm=5000, num_actors=8)  # doctest: +SKIP
    >>> out.write_parquet("classified/")                              # doctest: +SKIP

Importing :mod:`nagents_frames` never imports ray; this module imports it only when called.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import glob as _glob
import hashlib
import json
import os
import socket
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from nagents_frames.errors import ConfigurationError, JobError, NagentsFramesError, RequestError
from nagents_frames.executor import OUTCOME_SCHEMA, Executor, Outcome, PreparedRequest, outcomes_to_arrow
from nagents_frames.frames import (
    CompletionOptions,
    _check_prompt_type,
    _Frame,
    _interactive,
    _options,
    complete_chunks,
    outcome_arrays,
    run_sync,
)
from nagents_frames.prompting import PromptPlan
from nagents_frames.types import BatchStatus

if TYPE_CHECKING:
    from nagents_frames.store import BatchStore

__all__ = [
    "DEFAULT_NUM_ACTORS",
    "DEFAULT_NUM_CPUS",
    "MANIFEST_NAME",
    "OUTCOMES_DIR",
    "ChunkReport",
    "ChunkSpec",
    "RayRunReport",
    "batch_complete_dataset",
    "plan_chunks",
    "run_parquet",
]

DEFAULT_NUM_ACTORS = 4
"""Actors in the pool unless told otherwise."""

DEFAULT_NUM_CPUS = 0.25
"""CPUs reserved per actor. Actors wait on the network, not the CPU; a whole CPU each would starve
Ray's read tasks on a small node and hang the pipeline."""

MANIFEST_NAME = "_nagents_job.json"
"""The file in a :func:`run_parquet` output directory that says which job wrote it (the leading
underscore makes Parquet readers - pyarrow, polars, DuckDB globs on ``*.parquet`` - ignore it)."""

OUTCOMES_DIR = "_outcomes"
"""With a store: the subdirectory holding each chunk's per-row outcomes (error type, HTTP status, attempts,
latency ...), from which the driver writes the store's ``results`` table."""

_PART_PREFIX = "part-"
_TMP_PREFIX = ".tmp-"
_MANIFEST_FORMAT = "nagents-frames/ray-parquet"
_MANIFEST_VERSION = 1


def _require_ray() -> Any:
    """The ``ray`` module, or a :class:`ConfigurationError` saying which extra to install."""
    try:
        import ray
        import ray.data  # the Data library is a separate extra of ray
    except ImportError as exc:
        raise ConfigurationError(
            "the Ray integration needs ray[data]: pip install 'nagents-frames[ray]' (not ray[llm], which pulls CUDA)"
        ) from exc
    return ray


def _check_scaling(num_actors: int, num_cpus: float) -> None:
    if not isinstance(num_actors, int) or isinstance(num_actors, bool) or num_actors < 1:
        raise ConfigurationError(f"num_actors must be a positive integer, got {num_actors!r}")
    if not isinstance(num_cpus, int | float) or isinstance(num_cpus, bool) or num_cpus <= 0:
        raise ConfigurationError(f"num_cpus must be a positive number of CPUs per actor, got {num_cpus!r}")


def _actor_share(options: CompletionOptions, num_actors: int) -> CompletionOptions:
    """The options of one actor: the global request / token budgets split equally."""
    return dataclasses.replace(
        options,
        rpm=options.rpm / num_actors if options.rpm is not None else None,
        tpm=options.tpm / num_actors if options.tpm is not None else None,
        progress=False,
    )


# --- the actors ----------------------------------------------------------------------------------------------


class _Worker:
    """Base of the Ray actors: one event loop and one executor (one HTTP session) for the actor's life."""

    def __init__(self, options: CompletionOptions, plan: PromptPlan) -> None:
        provider = options.provider
        if provider.api_key is None:
            # resolve the key from *this* machine's environment (runtime_env env_vars), so that the key
            # need not travel in the actor's arguments
            provider = provider.with_options()
            options = dataclasses.replace(options, provider=provider)
        self.options = options
        self.plan = plan
        self._loop = asyncio.new_event_loop()
        self._executor: Executor = options.executor()
        self._loop.run_until_complete(self._executor.__aenter__())

    def complete(self, table: pa.Table, first_row: int) -> tuple[list[PreparedRequest], list[Outcome]]:
        """Requests and outcomes for the rows of ``table`` (whose first row has index ``first_row``), in order."""
        return self._loop.run_until_complete(self._complete(table, first_row))

    async def _complete(self, table: pa.Table, first_row: int) -> tuple[list[PreparedRequest], list[Outcome]]:
        size = self.options.chunk_size
        columns = self.plan.columns

        def chunks() -> Iterator[tuple[int, dict[str, list[Any]]]]:
            for offset in range(0, table.num_rows, size):
                part = table.slice(offset, size)
                yield first_row + offset, {c: part.column(c).to_pylist() for c in columns}

        requests: list[PreparedRequest] = []
        outcomes: list[Outcome] = []
        async for chunk_requests, chunk_outcomes in complete_chunks(chunks(), self.plan, self.options, self._executor):
            requests.extend(chunk_requests)
            outcomes.extend(chunk_outcomes)
        return requests, outcomes

    def __del__(self) -> None:
        # Ray Data drops the UDF when the pool shuts down gracefully: close the session then
        loop = getattr(self, "_loop", None)
        executor = getattr(self, "_executor", None)
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(Exception):
            if executor is not None:
                loop.run_until_complete(executor.__aexit__(None, None, None))
            loop.close()


def _append(table: pa.Table, arrays: Mapping[str, pa.Array]) -> pa.Table:
    for name, array in arrays.items():
        table = table.append_column(name, array)
    return table


class _DatasetWorker(_Worker):
    """The ``map_batches`` UDF of :func:`batch_complete_dataset`: a batch in, the batch plus outputs out."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        _requests, outcomes = self.complete(batch, 0)
        return _append(batch, outcome_arrays(outcomes, self.options))


# --- Parquet in, Parquet out ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChunkSpec:
    """One unit of work of :func:`run_parquet`: rows ``[offset, offset + rows)`` of row group ``row_group``
    of the file ``path``, whose first row is row ``first_row`` of the whole input. One output file each.

    >>> ChunkSpec(first_row=20000, rows=10000, path="in.parquet", row_group=0, offset=20000).file_name
    'part-000000020000-0000010000.parquet'
    """

    first_row: int
    rows: int
    path: str
    row_group: int
    offset: int

    @property
    def file_name(self) -> str:
        """The output file's name: fixed by the chunk's place in the input, so retries and resumes find it."""
        return f"{_PART_PREFIX}{self.first_row:012d}-{self.rows:010d}.parquet"


@dataclass(frozen=True, slots=True)
class ChunkReport:
    """What one chunk of :func:`run_parquet` came to (``skipped``: written by an earlier run).

    >>> ChunkReport(first_row=0, rows=10, succeeded=9, failed=1, prompt_tokens=50, completion_tokens=80,
    ...             file_name="part-000000000000-0000000010.parquet").failed
    1
    """

    first_row: int
    rows: int
    succeeded: int
    failed: int
    prompt_tokens: int
    completion_tokens: int
    file_name: str
    skipped: bool = False


@dataclass(frozen=True)
class RayRunReport:
    """The result of :func:`run_parquet`: where the output is and what it holds.

    ``succeeded`` / ``failed`` count every row of the output, including chunks written by earlier runs;
    ``chunks_skipped`` / ``rows_skipped`` say how much an earlier, interrupted run had already done.

    >>> RayRunReport(out_dir="/data/out", total_rows=10, chunks_total=1, chunks_written=1, chunks_skipped=0,
    ...              rows_skipped=0, succeeded=10, failed=0, prompt_tokens=0, completion_tokens=0, files=()).glob
    '/data/out/part-*.parquet'
    """

    out_dir: str
    total_rows: int
    chunks_total: int
    chunks_written: int
    chunks_skipped: int
    rows_skipped: int
    succeeded: int
    failed: int
    prompt_tokens: int
    completion_tokens: int
    files: tuple[str, ...]
    job_id: str | None = None
    elapsed_s: float = 0.0

    @property
    def glob(self) -> str:
        """A glob over the output files, for DuckDB / polars / pyarrow (``read_parquet(report.glob)``)."""
        return _join(self.out_dir, f"{_PART_PREFIX}*.parquet")


_SUMMARY_FIELDS: list[tuple[str, pa.DataType]] = [
    ("first_row", pa.int64()),
    ("rows", pa.int64()),
    ("succeeded", pa.int64()),
    ("failed", pa.int64()),
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("file_name", pa.string()),
    ("fatal_type", pa.string()),
    ("fatal_message", pa.string()),
    ("fatal_status", pa.int64()),
]
_SUMMARY_SCHEMA = pa.schema(_SUMMARY_FIELDS)


def _is_uri(path: str) -> bool:
    return "://" in path


def _normalise(path: str | os.PathLike[str]) -> str:
    text = os.fspath(path)
    return text if _is_uri(text) else os.path.abspath(os.path.expanduser(text))


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path within it (local paths, ``s3://``, ``gs://``, ``hdfs://`` ...)."""
    fs, inner = pafs.FileSystem.from_uri(path)
    return fs, inner


def _join(directory: str, name: str) -> str:
    return directory.rstrip("/") + "/" + name


def _expand_inputs(in_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """Files named, files in directories named (``*.parquet``, sorted), and local globs; in that order."""
    items = [in_paths] if isinstance(in_paths, str | os.PathLike) else list(in_paths)
    files: list[str] = []
    for item in items:
        text = os.fspath(item)
        if not _is_uri(text) and any(ch in text for ch in "*?["):
            matched = sorted(_glob.glob(os.path.expanduser(text)))
            if not matched:
                raise ConfigurationError(f"no input file matches {text!r}")
            files.extend(_normalise(m) for m in matched)
            continue
        path = _normalise(text)
        fs, inner = _filesystem(path)
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.NotFound:
            raise ConfigurationError(f"input {text!r} does not exist")
        if info.type == pafs.FileType.Directory:
            found = sorted(
                i.path
                for i in fs.get_file_info(pafs.FileSelector(inner, recursive=False))
                if i.type == pafs.FileType.File
                and i.base_name.endswith(".parquet")
                and not i.base_name.startswith(("_", "."))
            )
            if not found:
                raise ConfigurationError(f"input directory {text!r} holds no .parquet file")
            scheme = path.split("://", 1)[0] + "://" if _is_uri(path) else ""
            files.extend(scheme + f for f in found)
        else:
            files.append(path)
    if not files:
        raise ConfigurationError("run_parquet needs at least one input file")
    return files


def plan_chunks(files: Sequence[str], rows_per_file: int) -> tuple[list[ChunkSpec], pa.Schema]:
    """Cut Parquet files into chunks of at most ``rows_per_file`` rows (never across row groups).

    Only the files' footers are read. Returns the chunks in input order and the input schema; all
    files must have the same column names.

    >>> import os, tempfile, pyarrow as pa, pyarrow.parquet as pq
    >>> path = os.path.join(tempfile.mkdtemp(), "in.parquet")
    >>> pq.write_table(pa.table({"text": ["a"] * 25}), path, row_group_size=20)
    >>> specs, schema = plan_chunks([path], 8)
    >>> [(s.first_row, s.rows, s.row_group) for s in specs]
    [(0, 8, 0), (8, 8, 0), (16, 4, 0), (20, 5, 1)]
    """
    if not isinstance(rows_per_file, int) or isinstance(rows_per_file, bool) or rows_per_file < 1:
        raise ConfigurationError(f"rows_per_file must be a positive integer, got {rows_per_file!r}")
    specs: list[ChunkSpec] = []
    schema: pa.Schema | None = None
    first = 0
    for path in files:
        fs, inner = _filesystem(path)
        with fs.open_input_file(inner) as handle:
            parquet = pq.ParquetFile(handle)
            metadata = parquet.metadata
            file_schema = parquet.schema_arrow
        if schema is None:
            schema = file_schema
        elif file_schema.names != schema.names:
            raise ConfigurationError(
                f"input files disagree on their columns: {path!r} has {file_schema.names}, the first had {schema.names}"
            )
        for group in range(metadata.num_row_groups):
            count = metadata.row_group(group).num_rows
            for offset in range(0, count, rows_per_file):
                specs.append(ChunkSpec(first + offset, min(rows_per_file, count - offset), path, group, offset))
            first += count
    assert schema is not None
    return specs, schema


def _read_chunk(spec: ChunkSpec) -> pa.Table:
    """The chunk's rows, decoding the row group batch by batch (memory stays near one chunk)."""
    fs, inner = _filesystem(spec.path)
    with fs.open_input_file(inner) as handle:
        parquet = pq.ParquetFile(handle)
        parts: list[pa.RecordBatch] = []
        position = 0
        end = spec.offset + spec.rows
        for batch in parquet.iter_batches(batch_size=min(spec.rows, 65_536), row_groups=[spec.row_group]):
            stop = position + batch.num_rows
            if stop > spec.offset:
                parts.append(batch.slice(max(spec.offset - position, 0), min(end, stop) - max(spec.offset, position)))
            position = stop
            if position >= end:
                break
        schema = parquet.schema_arrow
    table = pa.Table.from_batches(parts, schema=schema)
    if table.num_rows != spec.rows:
        raise ConfigurationError(
            f"{spec.path!r} row group {spec.row_group} changed since the job was planned "
            f"(expected {spec.rows} rows at offset {spec.offset}, read {table.num_rows})"
        )
    return table


def _write_atomically(table: pa.Table, out_dir: str, name: str) -> None:
    """Write to a temporary name, then rename: a reader (or a resume) never sees half a file, and two
    attempts of one chunk (Ray retries) each leave a whole file under the same name."""
    fs, inner = _filesystem(out_dir)
    final = _join(inner, name)
    temporary = _join(inner, f"{_TMP_PREFIX}{name}-{uuid.uuid4().hex}")
    try:
        with fs.open_output_stream(temporary) as sink:
            pq.write_table(table, sink)
        fs.move(temporary, final)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.delete_file(temporary)
        raise


class _ParquetWorker(_Worker):
    """The ``map_batches`` UDF of :func:`run_parquet`: chunk specs in, one written file and a summary each."""

    def __init__(
        self, options: CompletionOptions, plan: PromptPlan, out_dir: str, index_column: str, outcomes: bool
    ) -> None:
        super().__init__(options, plan)
        self.out_dir = out_dir
        self.index_column = index_column
        self.outcomes = outcomes

    def __call__(self, specs: pa.Table) -> pa.Table:
        rows = []
        for item in specs.to_pylist():
            spec = ChunkSpec(**item)
            try:
                rows.append(self.run_chunk(spec))
            except RequestError as error:
                # A fatal error (bad key, unknown model) ends the job. Raised here it would reach the driver
                # as Ray's UserCodeException with the type lost in pickling; as a summary row the driver
                # re-raises it typed. The chunk is not written, so a resume redoes it.
                rows.append(_fatal_row(spec, error))
        return pa.Table.from_pylist(rows, schema=_SUMMARY_SCHEMA)

    def run_chunk(self, spec: ChunkSpec) -> dict[str, Any]:
        """Complete one chunk and write its file; returns the summary row sent back to the driver."""
        table = _read_chunk(spec)
        requests, outcomes = self.complete(table, spec.first_row)
        out = _append(table, outcome_arrays(outcomes, self.options))
        out = out.append_column(
            self.index_column, pa.array(range(spec.first_row, spec.first_row + spec.rows), type=pa.int64())
        )
        if self.outcomes:
            # the full per-row record for the store, written first: a part file implies its outcome file
            _write_atomically(outcomes_to_arrow(requests, outcomes), _join(self.out_dir, OUTCOMES_DIR), spec.file_name)
        _write_atomically(out, self.out_dir, spec.file_name)
        failed = sum(1 for o in outcomes if o.error is not None)
        return {
            "first_row": spec.first_row,
            "rows": spec.rows,
            "succeeded": len(outcomes) - failed,
            "failed": failed,
            "prompt_tokens": sum(o.prompt_tokens or 0 for o in outcomes),
            "completion_tokens": sum(o.completion_tokens or 0 for o in outcomes),
            "file_name": spec.file_name,
        }


def _fatal_row(spec: ChunkSpec, error: RequestError) -> dict[str, Any]:
    return {
        "first_row": spec.first_row, "rows": spec.rows, "succeeded": 0, "failed": 0, "prompt_tokens": 0,
        "completion_tokens": 0, "file_name": spec.file_name, "fatal_type": error.type_name,
        "fatal_message": error.message, "fatal_status": error.status_code,
    }


def _fatal_error(row: Mapping[str, Any]) -> RequestError:
    """The typed error a worker reported (its class from our exception tree, by name)."""
    from nagents_frames import errors

    cls = getattr(errors, str(row["fatal_type"]), None)
    if not (isinstance(cls, type) and issubclass(cls, RequestError)):
        cls = RequestError
    return cls(str(row["fatal_message"]), status_code=row["fatal_status"])


def _fingerprint(files: Sequence[str], specs: Sequence[ChunkSpec], options: CompletionOptions) -> str:
    """What identifies a job's output: the input layout and everything that changes what is sent.

    Budgets, concurrency, retries and timeouts are left out: a resume may run faster or slower.
    """
    sizes = []
    for path in files:
        fs, inner = _filesystem(path)
        sizes.append([path, fs.get_file_info(inner).size])
    what = {
        "inputs": sizes,
        "chunks": [[s.first_row, s.rows] for s in specs],
        "provider": options.provider.describe(),
        "prompt": options.prompt,
        "prompt_column": options.prompt_column,
        "system": options.system,
        "examples": options.examples,
        "param_columns": dict(options.param_columns or {}),
        "id_column": options.id_column,
        "columns": list(options.output_columns()),
        "params": options.params.as_dict() if options.params is not None else {},
        "response_format": repr(options.response_format) if getattr(options, "response_format", None) else None,
        "max_prompt_chars": options.max_prompt_chars,
    }
    payload = json.dumps(what, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.blake2b(payload.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def _prepare_out_dir(out_dir: str, fingerprint: str, manifest: dict[str, Any]) -> tuple[set[str], dict[str, Any]]:
    """Create the output directory or check that it belongs to this job; return the part files present
    and the manifest in force (an earlier run's, when resuming)."""
    fs, inner = _filesystem(out_dir)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.File:
        raise ConfigurationError(f"output {out_dir!r} is a file; run_parquet writes a directory of Parquet files")
    fs.create_dir(inner, recursive=True)
    fs.create_dir(_join(inner, OUTCOMES_DIR), recursive=True)
    present: set[str] = set()
    for item in fs.get_file_info(pafs.FileSelector(inner, recursive=False)):
        name = item.base_name
        if name.startswith(_PART_PREFIX) and name.endswith(".parquet"):
            present.add(name)
    for directory in (inner, _join(inner, OUTCOMES_DIR)):
        for item in fs.get_file_info(pafs.FileSelector(directory, recursive=False)):
            if item.base_name.startswith(_TMP_PREFIX):
                # what a crashed attempt left half-written; never read, safe to drop
                with contextlib.suppress(Exception):
                    fs.delete_file(item.path)
    manifest_path = _join(inner, MANIFEST_NAME)
    if fs.get_file_info(manifest_path).type == pafs.FileType.File:
        with fs.open_input_stream(manifest_path) as stream:
            earlier = json.loads(stream.read().decode("utf-8"))
        if earlier.get("fingerprint") != fingerprint:
            raise ConfigurationError(
                f"{out_dir!r} holds the output of a different job (other input, prompt, model or chunking); "
                "choose another output directory or remove it"
            )
        return present, earlier
    if present:
        raise ConfigurationError(
            f"{out_dir!r} already holds part files but no {MANIFEST_NAME}; choose an empty output directory"
        )
    with fs.open_output_stream(manifest_path) as sink:
        sink.write(json.dumps(manifest, indent=2, sort_keys=True, default=str).encode("utf-8"))
    return present, manifest


def _existing_report(out_dir: str, spec: ChunkSpec, options: CompletionOptions) -> ChunkReport:
    """The counts of a chunk written by an earlier run (reads only its error / token columns)."""
    fs, inner = _filesystem(out_dir)
    wanted = [options.error_column, *(("prompt_tokens", "completion_tokens") if options.usage else ())]
    with fs.open_input_file(_join(inner, spec.file_name)) as handle:
        table = pq.read_table(handle, columns=wanted)
    failed = table.num_rows - table.column(options.error_column).null_count
    tokens = [
        int(pc.sum(table.column(c)).as_py() or 0) if c in table.column_names else 0
        for c in ("prompt_tokens", "completion_tokens")
    ]
    return ChunkReport(spec.first_row, table.num_rows, table.num_rows - failed, failed, tokens[0], tokens[1],
                       spec.file_name, skipped=True)


def _unwrap(exc: BaseException) -> BaseException | None:
    """Our typed error inside Ray's wrappers (RayTaskError, UserCodeException), if there is one."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, NagentsFramesError) and type(current).__module__.startswith("nagents_frames"):
            return current
        cause = getattr(current, "cause", None)
        nxt = cause if isinstance(cause, BaseException) else (current.__cause__ or current.__context__)
        current = nxt
    return None


def _ensure_ray(address: str | None, runtime_env: Mapping[str, Any] | None) -> bool:
    """Connect to (or start) Ray unless already connected; True when this call started the connection."""
    ray = _require_ray()
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False} if address is None else {}
    if runtime_env is not None:
        kwargs["runtime_env"] = dict(runtime_env)
    ray.init(address=address, **kwargs)
    return True


def run_parquet(
    in_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    options: CompletionOptions,
    address: str | None = None,
    store: BatchStore | str | os.PathLike[str] | None = None,
    job_name: str | None = None,
    num_actors: int = DEFAULT_NUM_ACTORS,
    num_cpus: float = DEFAULT_NUM_CPUS,
    rows_per_file: int | None = None,
    index_column: str = "row_index",
    runtime_env: Mapping[str, Any] | None = None,
    on_chunk: Callable[[ChunkReport], None] | None = None,
) -> RayRunReport:
    """Complete Parquet files on Ray and write the results as a directory of Parquet files.

    Args:
        in_paths: Parquet files, directories of them, or local globs (local paths, or ``s3://`` / ``gs://``
            URIs that every node can read). Row order is the order given, then file order.
        out_dir: the output directory (created). It holds ``part-<first row>-<rows>.parquet`` files (the
            input columns, the output columns and ``index_column``) and ``_nagents_job.json``.
        options: the :class:`~nagents_frames.frames.CompletionOptions` (prompt, provider, budgets ...).
            ``rpm`` / ``tpm`` are global and split among the actors; ``concurrency`` is per actor.
        address: the Ray cluster (``"auto"``, ``"ray://head:10001"``); ``None`` joins the cluster this
            process is connected to, or starts a local one.
        store: a :class:`~nagents_frames.store.BatchStore` or a path: records the job, its per-chunk
            progress and final counts, and a view over the output files.
        job_name: a name for the job in the store.
        num_actors, num_cpus: size of the actor pool and CPUs reserved per actor (fractional: they wait on I/O).
        rows_per_file: rows per chunk (one Ray task, one output file); default ten ``chunk_size``.
        index_column: name of the added column holding each row's position in the input.
        runtime_env: passed to ``ray.init`` when this call connects (e.g. ``{"pip": ["nagents-frames"]}``).
        on_chunk: called on the driver with a :class:`ChunkReport` for each chunk as it lands.

    Re-running the same call after a crash (same input, prompt, model and chunking) skips the chunks
    already written; a different job writing into the same directory is refused.

    >>> # report = run_parquet("in/", "out/", options=CompletionOptions(provider=p, prompt="{text}"))
    >>> # polars.scan_parquet(report.glob).sort("row_index")
    """
    if not isinstance(options, CompletionOptions):
        raise ConfigurationError("options must be a nagents_frames.frames.CompletionOptions")
    _check_scaling(num_actors, num_cpus)
    started = time.monotonic()
    files = _expand_inputs(in_paths)
    specs, schema = plan_chunks(files, rows_per_file if rows_per_file is not None else 10 * options.chunk_size)
    if index_column in schema.names or index_column in options.output_columns():
        raise ConfigurationError(f"index column {index_column!r} clashes with a column of the table; pick another name")
    plan = options.plan(schema.names)
    _check_prompt_type(_Frame(schema.empty_table()), options)
    target = _normalise(out_dir)
    fingerprint = _fingerprint(files, specs, options)
    manifest: dict[str, Any] = {
        "format": _MANIFEST_FORMAT,
        "version": _MANIFEST_VERSION,
        "fingerprint": fingerprint,
        "inputs": files,
        "total_rows": sum(s.rows for s in specs),
        "chunks": len(specs),
        "rows_per_file": rows_per_file if rows_per_file is not None else 10 * options.chunk_size,
        "index_column": index_column,
        "provider": options.provider.describe(),
        "prompt": options.prompt,
        "job_name": job_name,
    }
    present, manifest = _prepare_out_dir(target, fingerprint, manifest)
    done = [s for s in specs if s.file_name in present]
    pending = [s for s in specs if s.file_name not in present]
    book = _StoreBook.open(store, options, manifest, job_name, target) if store is not None else None
    bar = None
    try:
        reports: list[ChunkReport] = [_existing_report(target, s, options) for s in done]
        bar = _bar(options.progress, manifest["total_rows"], sum(s.rows for s in done))
        if book is not None:
            book.started(reports)
        if pending:
            for report in _run_pending(pending, target, plan, options, address, runtime_env, num_actors, num_cpus,
                                       index_column, outcomes=book is not None):
                reports.append(report)
                if bar is not None:
                    bar.update(report.rows)
                if book is not None:
                    book.chunk(report)
                if on_chunk is not None:
                    on_chunk(report)
    except BaseException as exc:
        if book is not None:
            book.failed(exc)
        typed = _unwrap(exc)
        if typed is not None and typed is not exc:
            raise typed from exc
        raise
    finally:
        if bar is not None:
            bar.close()
    result = RayRunReport(
        out_dir=target,
        total_rows=manifest["total_rows"],
        chunks_total=len(specs),
        chunks_written=len(reports) - len(done),
        chunks_skipped=len(done),
        rows_skipped=sum(s.rows for s in done),
        succeeded=sum(r.succeeded for r in reports),
        failed=sum(r.failed for r in reports),
        prompt_tokens=sum(r.prompt_tokens for r in reports),
        completion_tokens=sum(r.completion_tokens for r in reports),
        files=tuple(_join(target, s.file_name) for s in specs),
        job_id=book.job_id if book is not None else None,
        elapsed_s=time.monotonic() - started,
    )
    if book is not None:
        book.finished(result)
    return result


def _run_pending(
    pending: Sequence[ChunkSpec],
    out_dir: str,
    plan: PromptPlan,
    options: CompletionOptions,
    address: str | None,
    runtime_env: Mapping[str, Any] | None,
    num_actors: int,
    num_cpus: float,
    index_column: str,
    *,
    outcomes: bool,
) -> Iterator[ChunkReport]:
    """Run the chunks on an actor pool; yields each chunk's report on the driver as it lands."""
    ray = _require_ray()
    started_here = _ensure_ray(address, runtime_env)
    try:
        items = [dataclasses.asdict(s) for s in pending]
        # one block per chunk, so that the pool balances chunks one by one across actors
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds.context.enable_progress_bars = False
        actors = min(num_actors, len(pending))
        out = ds.map_batches(
            _ParquetWorker,
            fn_constructor_kwargs={
                "options": _actor_share(options, actors),
                "plan": plan,
                "out_dir": out_dir,
                "index_column": index_column,
                "outcomes": outcomes,
            },
            batch_size=1,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=num_cpus,
        )
        for batch in out.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                if row["fatal_type"] is not None:
                    raise _fatal_error(row)
                yield ChunkReport(**{k: v for k, v in row.items() if not k.startswith("fatal_")})
    finally:
        if started_here:
            ray.shutdown()


def _bar(progress: bool | None, total: int, initial: int) -> Any:
    if not (progress if progress is not None else _interactive()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="row", desc="ray", dynamic_ncols=True)


# --- store bookkeeping (driver side) ---------------------------------------------------------------------------


_STALE_DRIVER_S = 900.0
"""A driver on another host whose job saw no chunk land for this long is taken for dead (its heartbeat is
the chunk writes)."""


class _StoreBook:
    """The job's bookkeeping in the DuckDB store, done on the driver while Ray does the work.

    The job id is a hash of the job's fingerprint (input layout, prompt, model, parameters) and its name,
    so a re-run finds its job. Each chunk's outcomes are written to the ``results`` table as the chunk
    lands (one transaction, upserting on the row index: a chunk recorded twice counts once), which keeps
    the job's counters - the per-chunk progress - current and every SQL view of the store working.
    """

    def __init__(self, store: BatchStore, owned: bool, job_id: str, owner: str, run: int, out_dir: str,
                 options: CompletionOptions, index_column: str) -> None:
        self.store = store
        self.owned = owned
        self.job_id = job_id
        self.owner = owner
        self.run = run
        self.out_dir = out_dir
        self.response_column = options.response_column
        self.error_column = options.error_column
        self.index_column = index_column

    @classmethod
    def open(
        cls, store: Any, options: CompletionOptions, manifest: Mapping[str, Any], job_name: str | None, out_dir: str
    ) -> _StoreBook:
        """Find or create the job and claim it for this driver."""
        return cast(_StoreBook, run_sync(cls._aopen(store, options, manifest, job_name, out_dir)))

    @classmethod
    async def _aopen(
        cls, store: Any, options: CompletionOptions, manifest: Mapping[str, Any], job_name: str | None, out_dir: str
    ) -> _StoreBook:
        from nagents_frames.store import BatchStore, JobRecord

        if isinstance(store, BatchStore):
            bound, owned = await store.initialize(), False
        elif isinstance(store, str | os.PathLike):
            bound, owned = await BatchStore(store).initialize(), True
        else:
            raise ConfigurationError(f"store must be a BatchStore or a path, got {type(store).__name__}")
        fingerprint = str(manifest["fingerprint"])
        digest = hashlib.blake2b(f"ray\0{fingerprint}\0{job_name or ''}".encode(), digest_size=12).hexdigest()
        job_id = f"ray_{digest}"
        provider = options.provider
        record = await bound.find_job(job_id)
        if record is None:
            params = options.params.as_dict() if options.params else {}
            with contextlib.suppress(NagentsFramesError):  # a concurrent creator won: the claim decides
                await bound.create_job(
                    JobRecord(
                        id=job_id, kind="ray", status=BatchStatus.PENDING, total=int(manifest["total_rows"]),
                        name=job_name, provider=provider.type.value, model=provider.model,
                        parameters={
                            **provider.describe(), **({"params": params} if params else {}),
                            "engine": "ray", "prompt": options.prompt, "out_dir": out_dir,
                            "rows_per_file": manifest["rows_per_file"], "concurrency": options.concurrency,
                        },
                        fingerprint=fingerprint,
                    )
                )
            record = await bound.get_job(job_id)
        from nagents_frames.manager import owner_alive

        if not record.status.is_terminal and owner_alive(record.owner, record.heartbeat_at,
                                                          stale_after=_STALE_DRIVER_S):
            raise JobError(f"job {job_id} is already running in another process ({record.owner}); wait for it")
        # the manager's owner format (host:pid:nonce), so that its liveness check understands ours
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        if not await bound.claim_job(job_id, owner, expected_owner=record.owner, from_statuses=(record.status,)):
            raise JobError(f"another process took over job {job_id}")
        record = await bound.get_job(job_id)
        await bound.set_meta(job_id, "ray", {
            "out_dir": out_dir,
            "parquet_glob": _join(out_dir, f"{_PART_PREFIX}*.parquet"),
            "outcomes_glob": _join(_join(out_dir, OUTCOMES_DIR), f"{_PART_PREFIX}*.parquet"),
        })
        return cls(bound, owned, job_id, owner, record.runs, out_dir, options, str(manifest["index_column"]))

    def _outcomes(self, file_name: str) -> pa.Table:
        fs, inner = _filesystem(_join(self.out_dir, OUTCOMES_DIR))
        path = _join(inner, file_name)
        if fs.get_file_info(path).type != pafs.FileType.File:
            return self._outcomes_from_part(file_name)
        with fs.open_input_file(path) as handle:
            return pq.read_table(handle)

    def _outcomes_from_part(self, file_name: str) -> pa.Table:
        """A chunk written by a run without a store has no outcome file: record what its part file holds."""
        fs, inner = _filesystem(self.out_dir)
        with fs.open_input_file(_join(inner, file_name)) as handle:
            part = pq.read_table(handle)
        n = part.num_rows
        names = part.column_names

        def column(name: str, dtype: pa.DataType) -> pa.Array:
            return part.column(name).combine_chunks().cast(dtype) if name in names else pa.array([None] * n, type=dtype)

        index = column(self.index_column, pa.int64())
        return pa.Table.from_arrays(
            [
                index, pc.cast(index, pa.string()), pa.array([""] * n, pa.string()),
                column(self.response_column, pa.string()), column(self.error_column, pa.string()),
                pa.nulls(n, pa.string()), pa.nulls(n, pa.int32()),
                column("prompt_tokens", pa.int64()), column("completion_tokens", pa.int64()),
                pa.array([0] * n, pa.int32()), column("latency_s", pa.float64()), pa.nulls(n, pa.string()),
            ],
            schema=OUTCOME_SCHEMA,
        )

    def started(self, reports: Sequence[ChunkReport]) -> None:
        """Record the chunks an earlier run wrote but did not get into the store (it died in between)."""
        if not reports:
            return
        known = set(run_sync(self.store.result_indices(self.job_id)).to_pylist())
        missing = [r for r in reports if any(i not in known for i in range(r.first_row, r.first_row + r.rows))]
        tables = [self._outcomes(r.file_name) for r in missing]
        if tables:
            run_sync(self.store.write_results(self.job_id, tables, run=self.run, owner=self.owner))

    def chunk(self, report: ChunkReport) -> None:
        """One more chunk landed: its outcomes go to the results table."""
        run_sync(self.store.write_results(self.job_id, [self._outcomes(report.file_name)], run=self.run,
                                          owner=self.owner))

    def failed(self, exc: BaseException) -> None:
        """The run ended with an error: the job is FAILED (cancelled on an interrupt); a re-run resumes it."""
        try:
            error = exc if isinstance(exc, RequestError) else _unwrap(exc)
            if isinstance(exc, KeyboardInterrupt | GeneratorExit):
                run_sync(self.store.finish_job(
                    self.job_id, status=BatchStatus.CANCELLED, from_statuses=(BatchStatus.PROCESSING,)))
            elif isinstance(error, RequestError):
                run_sync(self.store.finish_job(
                    self.job_id, status=BatchStatus.FAILED, from_statuses=(BatchStatus.PROCESSING,),
                    error=error.cell(), error_type=error.type_name))
            else:
                cause = error or exc
                run_sync(self.store.finish_job(
                    self.job_id, status=BatchStatus.FAILED, from_statuses=(BatchStatus.PROCESSING,),
                    error=f"{type(cause).__name__}: {cause}"[:2000], error_type=type(cause).__name__))
        finally:
            self.close()

    def finished(self, result: RayRunReport) -> None:
        """Every chunk is written: recount the job from its results and mark it COMPLETED."""
        try:
            report = {
                "engine": "ray", "out_dir": result.out_dir, "chunks_total": result.chunks_total,
                "chunks_written": result.chunks_written, "chunks_skipped": result.chunks_skipped,
                "elapsed_s": result.elapsed_s,
            }
            run_sync(self.store.finish_job(
                self.job_id, status=None, from_statuses=(BatchStatus.PROCESSING,), report=report,
                total=result.total_rows, otherwise=BatchStatus.FAILED, error="rows without a result remain",
                error_type="JobError"))
        finally:
            self.close()

    def close(self) -> None:
        """Close the store if this run opened it."""
        if self.owned:
            with contextlib.suppress(Exception):
                run_sync(self.store.close())
            self.owned = False


# --- Dataset in, Dataset out ------------------------------------------------------------------------------------


def batch_complete_dataset(
    ds: Any,
    *,
    num_actors: int = DEFAULT_NUM_ACTORS,
    num_cpus: float = DEFAULT_NUM_CPUS,
    index_column: str | None = None,
    preserve_order: bool = True,
    rows_per_task: int | None = None,
    store: Any = None,
    job_name: str | None = None,
    **kwargs: Any,
) -> Any:
    """Complete every row of a ``ray.data.Dataset``; returns a lazy Dataset with ``response`` and ``error``.

    Takes the keyword arguments of :func:`~nagents_frames.batch_complete` (``provider``, ``prompt``,
    ``system``, ``usage``, ``rpm``, ``tpm``, ``concurrency``, ``retry`` ...), plus:

    Args:
        num_actors: actors in the pool, each with its own HTTP session; ``rpm`` / ``tpm`` are split
            among them, ``concurrency`` applies to each.
        num_cpus: CPUs reserved per actor (fractional: actors wait on the network).
        index_column: also add this column holding each row's position in the input, to join results
            back (this numbers the rows with ``Dataset.zip``, which materializes the input once).
        preserve_order: keep the input's row order (sets ``preserve_order`` on the dataset's
            ``DataContext``, shared with the datasets it derives from).
        rows_per_task: rows per actor call (default ``chunk_size``); larger blocks are split so that every
            actor gets work even when the input comes in a few big blocks (a streaming repartition, no
            shuffle). An actor idles during the last round trip of each call: keep it well above ``concurrency``.

    Nothing runs until the result is consumed (``write_parquet``, ``iter_batches``, ``take`` ...). For a
    recorded, resumable job use :func:`run_parquet` (or the CLI's ``run --engine ray``).

    >>> # out = batch_complete(ray.data.read_parquet("in/"), provider=p, prompt="Summarize: {text}")
    >>> # out.write_parquet("out/")
    """
    ray = _require_ray()
    if store is not None or job_name is not None:
        raise ConfigurationError(
            "a lazy Ray Dataset cannot be recorded in a store; use nagents_frames.integrations.ray.run_parquet "
            "(or `nagents-frames run --engine ray`) for recorded, resumable jobs"
        )
    _check_scaling(num_actors, num_cpus)
    if not isinstance(ds, ray.data.Dataset):
        raise ConfigurationError(f"expected a ray.data.Dataset, got {type(ds).__module__}.{type(ds).__name__}")
    options = _options_from_kwargs(kwargs)
    schema = ds.schema()
    if schema is None:
        raise ConfigurationError("the dataset has no schema (is it empty?)")
    names = list(schema.names)
    if index_column is not None and (index_column in names or index_column in options.output_columns()):
        raise ConfigurationError(f"index column {index_column!r} clashes with a column of the table; pick another name")
    plan = options.plan(names)
    base = getattr(schema, "base_schema", None)
    if isinstance(base, pa.Schema):
        _check_prompt_type(_Frame(base.empty_table()), options)
    if rows_per_task is not None and (not isinstance(rows_per_task, int) or rows_per_task < 1):
        raise ConfigurationError(f"rows_per_task must be a positive integer, got {rows_per_task!r}")
    if index_column is not None:
        numbers = ray.data.range(ds.count()).rename_columns({"id": index_column})
        with warnings.catch_warnings():
            # zip is deprecated from Ray 2.60 in favour of joins on a key; numbering rows is what it is for
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            ds = ds.zip(numbers)
    per_task = rows_per_task or options.chunk_size
    ds = ds.repartition(target_num_rows_per_block=per_task)
    out = ds.map_batches(
        _DatasetWorker,
        fn_constructor_kwargs={"options": _actor_share(options, num_actors), "plan": plan},
        # one call per task-sized batch: inside it the executor pipelines chunk_size chunks, so the actor
        # idles only during the last round trip of each call
        batch_size=per_task,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=num_cpus,
    )
    if preserve_order:
        out.context.execution_options.preserve_order = True
    return out


def _options_from_kwargs(kwargs: Mapping[str, Any]) -> CompletionOptions:
    """``batch_complete``'s keywords as :class:`CompletionOptions`, validated the same way."""
    import inspect

    from nagents_frames import frames

    signature = inspect.signature(frames.abatch_complete)
    accepted = {name for name, p in signature.parameters.items() if p.kind == p.KEYWORD_ONLY} - {"store", "job_name"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ConfigurationError(f"unknown argument(s) for batch_complete on a Ray Dataset: {', '.join(unknown)}")
    if "provider" not in kwargs:
        raise ConfigurationError("batch_complete needs provider=")
    values = {
        name: kwargs.get(name, p.default)
        for name, p in signature.parameters.items()
        if name in accepted
    }
    option_names = set(inspect.signature(_options).parameters)
    return _options(**{k: v for k, v in values.items() if k in option_names})
