"""Streaming file input and output: record batches in, record batches out, never the whole table.

Input is Parquet (a file, a directory of files, or a glob), CSV or NDJSON (``.csv``, ``.csv.gz``,
``.ndjson``, ``.jsonl``, ``.json``). Output is one Parquet file, written atomically: batches go to a
hidden temporary file next to the target, which is renamed over the target only when everything was
written, so a crash or Ctrl-C never leaves a half-written output behind.

Example::

    >>> import pyarrow as pa, pyarrow.parquet as pq, tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> pq.write_table(pa.table({"text": ["a", "b", "c"]}), os.path.join(d, "in.parquet"))
    >>> source = open_input(os.path.join(d, "in.parquet"))
    >>> source.num_rows, source.schema.names
    (3, ['text'])
    >>> with ParquetSink(os.path.join(d, "out.parquet")) as sink:
    ...     for batch in source.batches(batch_size=2):
    ...         sink.write(batch)
    >>> pq.read_table(os.path.join(d, "out.parquet")).num_rows
    3
"""

from __future__ import annotations

import contextlib
import enum
import glob
import hashlib
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from nagents_frames.errors import ConfigurationError

__all__ = ["InputFormat", "InputSource", "ParquetSink", "open_input", "resolve_paths"]

DEFAULT_BATCH_ROWS = 8192
"""Rows per record batch read from the input (memory grows with this, not with the file)."""


class InputFormat(enum.StrEnum):
    """The file formats :func:`open_input` reads.

    >>> InputFormat.from_path("data/part-0.jsonl")
    <InputFormat.NDJSON: 'ndjson'>
    """

    PARQUET = "parquet"
    CSV = "csv"
    NDJSON = "ndjson"

    @classmethod
    def from_path(cls, path: str | os.PathLike[str]) -> InputFormat:
        """The format by file suffix (compression suffixes such as ``.gz`` are looked through)."""
        suffixes = [s.lower() for s in Path(path).suffixes]
        while suffixes and suffixes[-1] in _COMPRESSED:
            suffixes.pop()
        suffix = suffixes[-1] if suffixes else ""
        try:
            return _SUFFIXES[suffix]
        except KeyError:
            known = ", ".join(sorted(_SUFFIXES))
            raise ConfigurationError(
                f"cannot tell the format of {str(path)!r} from its suffix (known: {known}); pass --input-format"
            ) from None

    def __str__(self) -> str:
        return self.value


_SUFFIXES = {
    ".parquet": InputFormat.PARQUET,
    ".pq": InputFormat.PARQUET,
    ".csv": InputFormat.CSV,
    ".tsv": InputFormat.CSV,
    ".ndjson": InputFormat.NDJSON,
    ".jsonl": InputFormat.NDJSON,
    ".json": InputFormat.NDJSON,
}
_COMPRESSED = {".gz", ".bz2", ".zst", ".lz4"}


def resolve_paths(spec: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The files an input names: a file, a directory (its data files, recursively, sorted) or a glob.

    Raises :class:`~nagents_frames.errors.ConfigurationError` naming the input when nothing matches.

    >>> resolve_paths("/nonexistent/*.parquet")
    Traceback (most recent call last):
    ...
    nagents_frames.errors.ConfigurationError: input '/nonexistent/*.parquet' matches no file
    """
    if isinstance(spec, (list, tuple)):
        return [p for item in spec for p in resolve_paths(item)]
    text = os.fspath(spec)  # type: ignore[arg-type]
    path = Path(text)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and not p.name.startswith((".", "_")) and _known_suffix(p)
        )
        if not files:
            raise ConfigurationError(f"input directory {text!r} holds no Parquet, CSV or NDJSON file")
        return files
    if glob.has_magic(text):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not files:
            raise ConfigurationError(f"input {text!r} matches no file")
        return files
    raise ConfigurationError(f"input file {text!r} does not exist")


def _known_suffix(path: Path) -> bool:
    try:
        InputFormat.from_path(path)
    except ConfigurationError:
        return False
    return True


@dataclass(frozen=True)
class InputSource:
    """One or more input files of one format, read as a stream of record batches of one schema.

    ``num_rows`` is known up front for Parquet (from the footers) and ``None`` for CSV / NDJSON.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "in.jsonl")
    >>> _ = open(path, "w").write('{"q": "a"}\n{"q": "b"}\n')
    >>> [b.num_rows for b in open_input(path).batches(batch_size=1)]
    [1, 1]
    """

    paths: tuple[Path, ...]
    format: InputFormat
    schema: pa.Schema
    num_rows: int | None

    def batches(
        self, batch_size: int = DEFAULT_BATCH_ROWS, *, columns: Sequence[str] | None = None
    ) -> Iterator[pa.RecordBatch]:
        """The rows, file after file, as record batches of at most ``batch_size`` rows (cast to :attr:`schema`).

        ``columns`` reads only those columns (Parquet skips the others on disk).
        """
        schema = self.schema if columns is None else pa.schema([self.schema.field(c) for c in columns])
        for path in self.paths:
            for batch in _read_file(path, self.format, batch_size, columns):
                if batch.num_rows == 0:
                    continue
                if columns is not None and batch.schema.names != list(columns):
                    batch = batch.select(list(columns))
                if batch.schema != schema:
                    batch = _conform(batch, schema, path)
                yield from _split(batch, batch_size)

    def batch_rows(self, target_bytes: int = 4 << 20, *, most: int = DEFAULT_BATCH_ROWS) -> int:
        """Rows per batch so that a batch holds about ``target_bytes`` (wide rows: fewer rows a batch).

        Known from the Parquet footers; CSV / NDJSON get ``most``.

        >>> import pyarrow as pa, pyarrow.parquet as pq, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "wide.parquet")
        >>> pq.write_table(pa.table({"blob": ["x" * 100_000] * 100}), path)
        >>> open_input(path).batch_rows()
        41
        """
        if self.format is not InputFormat.PARQUET:
            return most
        meta = pq.ParquetFile(self.paths[0]).metadata
        rows = sum(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        if rows <= 0 or size <= 0:
            return most
        return max(16, min(most, int(target_bytes // max(size / rows, 1))))

    def reader(self, batch_size: int = DEFAULT_BATCH_ROWS) -> pa.RecordBatchReader:
        """The same stream as a ``pyarrow.RecordBatchReader``."""
        return pa.RecordBatchReader.from_batches(self.schema, self.batches(batch_size))

    def fingerprint(self) -> str:
        """Identifies this input (names, sizes, modification times) so a rerun finds its job again.

        Cheap: no file is read. Changing a file changes the fingerprint.
        """
        h = hashlib.blake2b(digest_size=16)
        h.update(self.format.value.encode())
        for path in self.paths:
            st = path.stat()
            h.update(f"\0{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        return h.hexdigest()


def open_input(
    spec: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    format: InputFormat | str | None = None,
) -> InputSource:
    """Open an input for streaming: resolve the files, read the schema (and the row count for Parquet).

    Only footers / the first block of the first file are read here; :meth:`InputSource.batches` streams.

    >>> open_input("/nonexistent/dir/")
    Traceback (most recent call last):
    ...
    nagents_frames.errors.ConfigurationError: input file '/nonexistent/dir/' does not exist
    """
    paths = resolve_paths(spec)
    if format is not None:
        try:
            fmt = InputFormat(str(format).lower())
        except ValueError:
            raise ConfigurationError(f"unknown input format {format!r}; known: parquet, csv, ndjson") from None
    else:
        kinds = {InputFormat.from_path(p) for p in paths}
        if len(kinds) > 1:
            raise ConfigurationError(f"input mixes formats ({', '.join(sorted(k.value for k in kinds))}); pick one")
        fmt = kinds.pop()
    try:
        if fmt is InputFormat.PARQUET:
            files = [pq.ParquetFile(p) for p in paths]
            schema = _fill_null_types(files[0].schema_arrow, [f.schema_arrow for f in files[1:]])
            num_rows: int | None = sum(f.metadata.num_rows for f in files)
        else:
            schema = _first_schema(paths[0], fmt)
            num_rows = None
    except (pa.ArrowException, OSError) as exc:
        raise ConfigurationError(f"cannot read {str(paths[0])!r} as {fmt.value}: {_one_line(exc)}") from None
    return InputSource(tuple(paths), fmt, schema, num_rows)


def _fill_null_types(schema: pa.Schema, others: Sequence[pa.Schema]) -> pa.Schema:
    """The first file's columns rule, but a column it only knows as null (an empty file written from
    Python lists) takes its type from the first later file that has a real one."""
    fields = list(schema)
    for i, field in enumerate(fields):
        if pa.types.is_null(field.type):
            for other in others:
                if field.name in other.names and not pa.types.is_null(other.field(field.name).type):
                    fields[i] = field.with_type(other.field(field.name).type)
                    break
    return pa.schema(fields, metadata=dict(schema.metadata or {}))  # type: ignore[arg-type]


def _first_schema(path: Path, fmt: InputFormat) -> pa.Schema:
    reader = _open_stream(path, fmt, DEFAULT_BATCH_ROWS)
    try:
        return reader.schema
    finally:
        reader.close()


def _open_stream(path: Path, fmt: InputFormat, batch_size: int) -> pa.RecordBatchReader:
    # the block size bounds how much text is parsed at once; about 1 KiB a row is a generous guess
    block = max(1 << 20, min(batch_size * 1024, 64 << 20))
    if fmt is InputFormat.CSV:
        import pyarrow.csv as pacsv

        delimiter = "\t" if ".tsv" in [s.lower() for s in path.suffixes] else ","
        return pacsv.open_csv(
            str(path),
            read_options=pacsv.ReadOptions(block_size=block),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
            # an empty cell is a missing value (a null), as in every dataframe library's CSV reader
            convert_options=pacsv.ConvertOptions(strings_can_be_null=True),
        )
    import pyarrow.json as pajson

    return pajson.open_json(str(path), read_options=pajson.ReadOptions(block_size=block))


def _read_file(
    path: Path, fmt: InputFormat, batch_size: int, columns: Sequence[str] | None = None
) -> Iterator[pa.RecordBatch]:
    try:
        if fmt is InputFormat.PARQUET:
            # buffer_size: read column chunks in pieces instead of a whole row group at once
            parquet = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
            try:
                yield from parquet.iter_batches(
                    batch_size=batch_size, columns=list(columns) if columns is not None else None, use_threads=False
                )
            finally:
                parquet.close()
            return
        reader = _open_stream(path, fmt, batch_size)
        try:
            yield from reader
        finally:
            reader.close()
    except (pa.ArrowException, OSError) as exc:
        raise ConfigurationError(f"cannot read {str(path)!r} as {fmt.value}: {_one_line(exc)}") from exc


def _split(batch: pa.RecordBatch, size: int) -> Iterator[pa.RecordBatch]:
    if batch.num_rows <= size:
        yield batch
        return
    for offset in range(0, batch.num_rows, size):
        yield batch.slice(offset, size)


def _conform(batch: pa.RecordBatch, schema: pa.Schema, path: Path) -> pa.RecordBatch:
    missing = [n for n in schema.names if n not in batch.schema.names]
    if missing:
        raise ConfigurationError(f"{str(path)!r} lacks column(s) {missing} that the first input file has")
    try:
        return pa.RecordBatch.from_arrays(
            [batch.column(n).cast(schema.field(n).type) for n in schema.names], schema=schema
        )
    except (pa.ArrowException, ValueError) as exc:
        raise ConfigurationError(
            f"{str(path)!r} does not fit the schema of the first input file: {_one_line(exc)}"
        ) from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class ParquetSink:
    """Writes record batches to a Parquet file atomically (temporary file, then rename).

    Batches are gathered into row groups of ``row_group_rows`` rows or about ``row_group_bytes`` bytes,
    whichever comes first, so memory is bounded by one row group however wide the rows are. On success (:meth:`commit`, or leaving the ``with`` block normally) the file appears at
    ``path`` in one rename; on error (:meth:`abort`, or an exception in the block) nothing is left behind
    and an existing file at ``path`` is untouched.

    ``schema`` is used for an output without any rows; otherwise the first batch's schema rules and
    later batches are cast to it.

    >>> import tempfile, os, pyarrow as pa
    >>> target = os.path.join(tempfile.mkdtemp(), "out.parquet")
    >>> with ParquetSink(target) as sink:
    ...     sink.write(pa.record_batch({"x": [1, 2]}))
    ...     os.path.exists(target)  # not yet: the rows are in a hidden temporary file
    False
    >>> os.path.exists(target)
    True
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        schema: pa.Schema | None = None,
        compression: Any = "zstd",
        row_group_rows: int = 65_536,
        row_group_bytes: int = 16 << 20,
    ) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise ConfigurationError(f"output {str(self.path)!r} is a directory; give a file name")
        parent = self.path.parent
        if not parent.is_dir():
            raise ConfigurationError(f"output directory {str(parent)!r} does not exist")
        self.schema = schema
        self.compression = compression
        self.row_group_rows = row_group_rows
        self.row_group_bytes = row_group_bytes
        self.rows = 0
        self.tmp_path = parent / f".{self.path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._pending_bytes = 0
        self._closed = False

    def write(self, batch: pa.RecordBatch) -> None:
        """Add a batch (buffered up to one row group)."""
        if self._closed:
            raise RuntimeError("ParquetSink is closed")
        if self._writer is None:
            self.schema = batch.schema
            self._writer = pq.ParquetWriter(self.tmp_path, batch.schema, compression=self.compression)
        elif batch.schema != self.schema:
            assert self.schema is not None
            batch = pa.RecordBatch.from_arrays(
                [batch.column(i).cast(f.type) for i, f in enumerate(self.schema)], schema=self.schema
            )
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        self._pending_bytes += batch.nbytes
        self.rows += batch.num_rows
        if self._pending_bytes >= self.row_group_bytes:
            self._flush()  # wide rows: a smaller row group rather than unbounded buffering
        elif self._pending_rows >= self.row_group_rows:
            self._flush(final=False)

    def _flush(self, *, final: bool = True) -> None:
        if not self._pending or self._writer is None:
            return
        table = pa.Table.from_batches(self._pending)
        size = self.row_group_rows
        # whole row groups now; a remainder waits for more rows (or the end) so groups stay full
        cut = table.num_rows if final else (table.num_rows // size) * size
        if cut:
            self._writer.write_table(table.slice(0, cut), row_group_size=size)
        rest = table.slice(cut)
        self._pending = rest.combine_chunks().to_batches() if rest.num_rows else []
        self._pending_rows = rest.num_rows
        self._pending_bytes = rest.nbytes if rest.num_rows else 0

    def commit(self) -> Path:
        """Finish the file and move it into place; returns the output path."""
        if self._closed:
            return self.path
        if self._writer is None:
            if self.schema is None:
                raise ConfigurationError("no rows and no schema: nothing to write")
            self._writer = pq.ParquetWriter(self.tmp_path, self.schema, compression=self.compression)
        self._flush()
        self._writer.close()
        with open(self.tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp_path, self.path)
        self._closed = True
        return self.path

    def abort(self) -> None:
        """Drop everything written so far; the target path is left as it was."""
        if self._closed:
            return
        self._closed = True
        self._pending = []
        if self._writer is not None:
            with contextlib.suppress(pa.ArrowException, OSError):
                self._writer.close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp_path.unlink()

    def __enter__(self) -> ParquetSink:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
