"""Job reports: one picture per job, from the store.

A report shows, for one job: rows done over time (throughput), the latency distribution, errors by
type and by HTTP status, attempts per row with the retries and rate-limit waits of the run, and tokens
(and cost, when prices are known). It is read from the store with SQL only, so it works for any job
in any store file, finished or not, long after the process that ran it is gone.

In a notebook the report displays itself (``_repr_png_`` / ``_repr_html_``); ``.figure`` is the
matplotlib figure; :meth:`JobReport.save` writes a self-contained HTML page (the PNG embedded) or a PNG.

Example::

    >>> from nagents_frames.report import report, write_report
    >>> # rep = report(store, job.id)     # a JobReport; in Jupyter it shows the figure and a summary table
    >>> # rep.figure                      # the matplotlib Figure
    >>> # write_report(store, job.id, "report.html")   # or "report.png"

matplotlib is imported only when a figure is drawn (``import nagents_frames`` never imports it), and
always with the non-interactive Agg canvas, so reports render on servers without a display.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa
import pyarrow.compute as _pc

from nagents_frames.errors import ConfigurationError, JobNotFoundError, StoreError, StoreLockedError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# pyarrow-stubs type compute functions per argument kind and disagree with chunked columns; at runtime these
# calls take Arrays and ChunkedArrays alike.
pc: Any = _pc

__all__ = [
    "DPI",
    "FIGSIZE",
    "JobReport",
    "JobSummary",
    "ReportStats",
    "report",
    "write_report",
]

FIGSIZE: tuple[float, float] = (12.0, 7.5)
"""Size of the report figure in inches; with :data:`DPI` a PNG of 1200 x 750 pixels."""

DPI: int = 100
"""Dots per inch of the rendered PNG."""

# Columns the report reads from a result row; anything missing is treated as unknown (null).
RESULT_COLUMNS: dict[str, pa.DataType] = {
    "row_index": pa.int64(),
    "error": pa.string(),
    "error_type": pa.string(),
    "status_code": pa.int64(),
    "attempts": pa.int64(),
    "prompt_tokens": pa.int64(),
    "completion_tokens": pa.int64(),
    "latency_s": pa.float64(),
    "completed_at": pa.timestamp("us", tz="UTC"),
}

# The store may name the completion timestamp differently; first match wins.
_COMPLETED_ALIASES = ("completed_at", "finished_at", "created_at", "updated_at")

_OK_COLOR = "#2e7d32"
_ERR_COLOR = "#c62828"
_NEUTRAL_COLOR = "#1565c0"
_MUTED_COLOR = "#6d6d6d"


class SQLStore(Protocol):
    """What the report needs of a store (:class:`~nagents_frames.BatchStore` has it); the SQL itself
    stays in the store."""

    def report_tables(self, job_id: str) -> tuple[pa.Table, pa.Table]:
        """The job's row and its result rows, as Arrow."""
        ...


@dataclass(frozen=True)
class JobSummary:
    """The job-level facts shown in a report header (never holds secrets).

    >>> JobSummary(id="job-1", status="completed", total=3, succeeded=2, failed=1).done
    3
    """

    id: str
    status: str = "pending"
    total: int = 0
    succeeded: int = 0
    failed: int = 0
    name: str | None = None
    provider: str | None = None
    model: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    mode: str | None = None

    @property
    def done(self) -> int:
        """Rows with a final result."""
        return self.succeeded + self.failed

    @classmethod
    def from_job(cls, job: Any) -> JobSummary:
        """From a :class:`~nagents_frames.BatchJob` (or anything with the same attributes).

        >>> from nagents_frames import BatchJob
        >>> JobSummary.from_job(BatchJob(id="j", total=2, succeeded=2)).total
        2
        """
        return cls(
            id=str(job.id),
            status=str(getattr(job, "status", "pending")),
            total=int(getattr(job, "total", 0) or 0),
            succeeded=int(getattr(job, "succeeded", 0) or 0),
            failed=int(getattr(job, "failed", 0) or 0),
            name=getattr(job, "name", None),
            provider=_opt_str(getattr(job, "provider", None)),
            model=getattr(job, "model", None),
            created_at=getattr(job, "created_at", None),
            started_at=getattr(job, "started_at", None),
            finished_at=getattr(job, "finished_at", None),
            error=getattr(job, "error", None),
            mode=getattr(job, "mode", None),
        )


@dataclass(frozen=True)
class ReportStats:
    """The numbers behind a report (also printed in its HTML summary table).

    ``retries`` counts attempts beyond the first; ``rate_limit_wait_s`` / ``backoff_wait_s`` come from
    the run report the store kept for the job (``None`` when it kept none); ``cost_usd`` is ``None`` when
    the model's prices are unknown.
    """

    rows: int = 0
    succeeded: int = 0
    failed: int = 0
    requests_sent: int = 0
    retries: int = 0
    errors_by_type: Mapping[str, int] = field(default_factory=dict)
    errors_by_status: Mapping[str, int] = field(default_factory=dict)
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    latency_max_s: float | None = None
    duration_s: float | None = None
    rows_per_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None
    rate_limit_wait_s: float | None = None
    backoff_wait_s: float | None = None
    retries_by_cause: Mapping[str, int] = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


class JobReport:
    """The report of one job: statistics, a matplotlib figure, HTML and PNG renderings.

    Build it with :func:`report` (from a store) or :meth:`from_arrow` (from a results table).

    >>> import pyarrow as pa
    >>> rep = JobReport.from_arrow(JobSummary(id="j", status="completed", total=1, succeeded=1),
    ...                            pa.table({"row_index": [0], "latency_s": [0.2], "attempts": [1]}))
    >>> rep.stats.succeeded, rep.stats.retries
    (1, 0)
    """

    def __init__(
        self,
        job: JobSummary,
        results: pa.Table,
        *,
        run: Mapping[str, Any] | None = None,
        cost_usd: float | None = None,
        prices: Mapping[str, Any] | None = None,
    ) -> None:
        self.job = job
        self.results = _normalise_results(results)
        self.run: Mapping[str, Any] | None = dict(run) if run else None
        if cost_usd is None:
            cost_usd = _cost(job, self.results, prices)
        self.stats = _compute_stats(job, self.results, self.run, cost_usd)
        self._figure: Figure | None = None
        self._png: bytes | None = None

    @classmethod
    def from_arrow(
        cls,
        job: JobSummary | Any,
        results: pa.Table,
        *,
        run: Mapping[str, Any] | None = None,
        cost_usd: float | None = None,
        prices: Mapping[str, Any] | None = None,
    ) -> JobReport:
        """A report from a job (a :class:`JobSummary` or a ``BatchJob``) and an Arrow table of its results.

        ``results`` has one row per finished request, with any of the columns ``row_index``, ``error``,
        ``error_type``, ``status_code``, ``attempts``, ``prompt_tokens``, ``completion_tokens``,
        ``latency_s`` and a completion timestamp (``completed_at``); missing columns count as unknown.
        ``run`` is a run report as a mapping (``retries`` by cause, ``rate_limit_wait_s``, ...).
        ``cost_usd`` defaults to the tokens priced by :func:`nagents_frames.cost.cost_of` (with ``prices``).
        """
        summary = job if isinstance(job, JobSummary) else JobSummary.from_job(job)
        return cls(summary, results, run=run, cost_usd=cost_usd, prices=prices)

    def __repr__(self) -> str:
        s = self.stats
        return (
            f"JobReport(job={self.job.id!r}, status={self.job.status!r}, rows={s.rows}/{self.job.total}, "
            f"failed={s.failed}, retries={s.retries}, tokens={s.total_tokens})"
        )

    # --- renderings -----------------------------------------------------------------------------------

    @property
    def figure(self) -> Figure:
        """The matplotlib figure (six panels; drawn once, then cached)."""
        if self._figure is None:
            self._figure = _draw(self)
        return self._figure

    def to_png(self) -> bytes:
        """The figure as PNG bytes (:data:`FIGSIZE` x :data:`DPI` pixels)."""
        if self._png is None:
            buffer = io.BytesIO()
            # No bbox_inches="tight": the picture keeps its documented size whatever the labels.
            self.figure.savefig(buffer, format="png", dpi=DPI)
            self._png = buffer.getvalue()
        return self._png

    def to_html(self, *, full_page: bool = True) -> str:
        """A self-contained HTML rendering: summary table and the figure as an embedded PNG.

        With ``full_page=False`` only a fragment (for notebooks and other pages).
        """
        image = base64.b64encode(self.to_png()).decode("ascii")
        title = f"nagents-frames job {self.job.id}"
        body = (
            f'<div class="nf-report"><h2 style="margin:0.2em 0">{html.escape(title)}</h2>'
            f"{self._summary_table()}"
            f'<img alt="{html.escape(title)}" style="max-width:100%" src="data:image/png;base64,{image}"/></div>'
        )
        if not full_page:
            return body
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title>"
            "<style>body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}"
            "table.nf-summary{border-collapse:collapse;margin:0.5em 0 1em}"
            "table.nf-summary td,table.nf-summary th{border:1px solid #ddd;padding:0.25em 0.6em;text-align:left}"
            "table.nf-summary th{background:#f5f5f5}</style>"
            f"</head><body>{body}</body></html>\n"
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the report to ``path``: ``.html`` / ``.htm`` for HTML, ``.png`` for the picture.

        >>> # report(store, job.id).save("report.html")
        """
        target = Path(path)
        suffix = target.suffix.lower()
        if suffix in (".html", ".htm"):
            target.write_text(self.to_html(), encoding="utf-8")
        elif suffix == ".png":
            target.write_bytes(self.to_png())
        else:
            raise ConfigurationError(f"report path must end in .html or .png, got {target.name!r}")
        return target

    def close(self) -> None:
        """Forget the cached figure (frees its memory; it is redrawn when asked for again)."""
        self._figure = None

    def _repr_png_(self) -> bytes:
        return self.to_png()

    def _repr_html_(self) -> str:
        return self.to_html(full_page=False)

    def _summary_table(self) -> str:
        s, j = self.stats, self.job
        rows: list[tuple[str, str]] = [
            ("status", j.status),
            ("name", j.name or "—"),
            ("provider / model", f"{j.provider or '—'} / {j.model or '—'}"),
            ("rows", f"{s.rows:,} of {j.total:,} done: {s.succeeded:,} ok, {s.failed:,} failed"),
            ("requests sent", f"{s.requests_sent:,} ({_plural(s.retries, 'retry', 'retries')})"),
            ("latency p50 / p95 / max", " / ".join(_fmt_seconds(v) for v in (s.latency_p50_s, s.latency_p95_s, s.latency_max_s))),
            ("duration / throughput", f"{_fmt_seconds(s.duration_s)} / {_fmt_rate(s.rows_per_s)}"),
            ("tokens (prompt + completion)", f"{s.prompt_tokens:,} + {s.completion_tokens:,} = {s.total_tokens:,}"),
            ("cost", _fmt_cost(s.cost_usd)),
        ]
        if s.rate_limit_wait_s is not None:
            rows.append(("rate-limit / backoff waits", f"{_fmt_seconds(s.rate_limit_wait_s)} / {_fmt_seconds(s.backoff_wait_s)}"))
        if j.error:
            rows.append(("fatal error", j.error))
        cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
        return f'<table class="nf-summary">{cells}</table>'


# --- reading from a store ---------------------------------------------------------------------------------


def report(
    store: SQLStore | str | os.PathLike[str], job_id: str, *, prices: Mapping[str, Any] | None = None
) -> JobReport:
    """The report of job ``job_id`` in ``store``: a :class:`~nagents_frames.BatchStore`, or the path of a
    store file (opened read-only, so it works while another process runs jobs in it).

    Reads the job row and its result rows with ``store.sql``; works for running, finished, failed,
    cancelled and empty jobs. Raises :class:`~nagents_frames.errors.JobNotFoundError` for an unknown id.
    ``prices`` overrides the price table of :mod:`nagents_frames.cost` (``{"my-model": (input, output)}``
    in USD per million tokens).

    >>> # rep = report("jobs.duckdb", job.id)
    >>> # rep.save("report.png")
    """
    with _opened(store) as source:
        jobs, results = source.report_tables(job_id)
    if jobs.num_rows == 0:
        raise JobNotFoundError(f"no job with id {job_id!r} in the store")
    row = {name: jobs.column(name)[0].as_py() for name in jobs.column_names}
    results = _to_arrow(results)
    return JobReport(_summary_from_row(row), results, run=_run_from_row(row), prices=prices)


def write_report(
    store: SQLStore | str | os.PathLike[str],
    job_id: str,
    path: str | os.PathLike[str],
    *,
    prices: Mapping[str, Any] | None = None,
) -> Path:
    """Write the report of ``job_id`` to ``path`` (``.html``: a self-contained page; ``.png``: the figure).

    ``store`` is a :class:`~nagents_frames.BatchStore` or the path of a store file. This is what
    ``nagents-frames report JOB -o report.html`` calls.

    >>> # write_report("jobs.duckdb", job.id, "report.html")
    >>> # PosixPath('report.html')
    """
    suffix = Path(path).suffix.lower()
    if suffix not in (".html", ".htm", ".png"):
        # Checked before reading the store: a typo should not cost a query over a big file.
        raise ConfigurationError(f"report path must end in .html or .png, got {Path(path).name!r}")
    rep = report(store, job_id, prices=prices)
    try:
        return rep.save(path)
    finally:
        rep.close()


@contextlib.contextmanager
def _opened(store: SQLStore | str | os.PathLike[str]) -> Iterator[SQLStore]:
    """The store itself, or a store on the given file for reading (closed afterwards)."""
    if not isinstance(store, (str, os.PathLike)):
        yield store
        return
    from nagents_frames.frames import run_sync
    from nagents_frames.store import BatchStore

    if not Path(store).is_file():
        raise StoreError(f"no store file at {str(store)!r}")
    opened = BatchStore(store, read_only=True)
    try:
        opened.report_tables("")  # opens the file now: a lock or a wrong file shows here
    except StoreLockedError:
        run_sync(opened.close())
        raise
    except StoreError:
        # DuckDB refuses a read-only connection to a file this process already has open for writing (a
        # BatchStore in the same notebook); a second read-write connection shares that database instead.
        # Nothing is written through it.
        run_sync(opened.close())
        opened = BatchStore(store)
    try:
        yield opened
    finally:
        run_sync(opened.close())


def _to_arrow(data: Any) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatchReader):
        return data.read_all()
    module = type(data).__module__.split(".")[0]
    if module == "polars":
        return data.to_arrow()
    if module == "pandas":
        return pa.Table.from_pandas(data, preserve_index=False)
    if module == "duckdb":
        return data.arrow()  # a DuckDB relation
    raise TypeError(f"store.sql returned {type(data).__name__}, expected an Arrow, polars or pandas table")


def _summary_from_row(row: Mapping[str, Any]) -> JobSummary:
    job_id = row.get("id", row.get("job_id"))
    return JobSummary(
        id=str(job_id),
        status=str(row.get("status") or "pending"),
        total=_int(row.get("total", row.get("total_requests"))),
        succeeded=_int(row.get("succeeded")),
        failed=_int(row.get("failed")),
        name=row.get("name"),
        provider=_opt_str(row.get("provider")),
        model=row.get("model"),
        created_at=row.get("created_at"),
        started_at=row.get("started_at"),
        finished_at=row.get("finished_at"),
        error=row.get("error"),
        mode=row.get("mode"),
    )


def _run_from_row(row: Mapping[str, Any]) -> dict[str, Any] | None:
    """The run report the store kept with the job (a JSON column), if any."""
    import json

    for key in ("run_report", "report", "stats"):
        value = row.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                continue
        if isinstance(value, Mapping):
            return dict(value)
    return None


def _cost(job: JobSummary, results: pa.Table, prices: Mapping[str, Any] | None = None) -> float | None:
    """Cost in USD from the price table of :mod:`nagents_frames.cost`; ``None`` when the model has no price."""
    from nagents_frames.cost import cost_of
    from nagents_frames.types import Usage

    if job.model is None:
        return None
    usage = Usage(prompt_tokens=_column_sum(results, "prompt_tokens"),
                  completion_tokens=_column_sum(results, "completion_tokens"))
    # Jobs run through a provider's batch API are billed at the batch discount.
    return cost_of(usage, job.model, batch=job.mode not in (None, "realtime"), prices=prices)


# --- statistics -------------------------------------------------------------------------------------------


def _normalise_results(results: pa.Table) -> pa.Table:
    """The report's columns with its types; missing ones as nulls, the timestamp under ``completed_at``."""
    n = results.num_rows
    arrays: dict[str, pa.Array] = {}
    for name, dtype in RESULT_COLUMNS.items():
        source = name
        if name == "completed_at":
            source = next((a for a in _COMPLETED_ALIASES if a in results.column_names), "")
        if source and source in results.column_names:
            column = results.column(source).combine_chunks()
            column = _as_utc_timestamp(column) if name == "completed_at" else column.cast(dtype)
            arrays[name] = column
        else:
            arrays[name] = pa.array([None] * n, type=dtype)
    return pa.table(arrays)


def _as_utc_timestamp(column: pa.Array) -> pa.Array:
    if pa.types.is_timestamp(column.type):
        if column.type.tz is None:
            # Naive timestamps hold UTC in our store; the cast keeps the instant and labels it UTC.
            return column.cast(pa.timestamp(column.type.unit)).cast(pa.timestamp("us", tz="UTC"))
        return column.cast(pa.timestamp("us", tz="UTC"))
    if pa.types.is_floating(column.type) or pa.types.is_integer(column.type):
        # Epoch seconds.
        return pa.array(
            [datetime.fromtimestamp(v, tz=UTC) if v is not None else None for v in column.to_pylist()],
            type=pa.timestamp("us", tz="UTC"),
        )
    return pa.array([None] * len(column), type=pa.timestamp("us", tz="UTC"))


def _compute_stats(
    job: JobSummary, results: pa.Table, run: Mapping[str, Any] | None, cost_usd: float | None
) -> ReportStats:
    # Arrow compute throughout: a report of a million-row job must not walk a million Python objects.
    rows = results.num_rows
    failed_mask = _failed_mask(results)
    failures = results.filter(failed_mask)
    by_type = _value_counts(pc.fill_null(failures.column("error_type"), "unknown"))
    by_status = _value_counts(pc.fill_null(failures.column("status_code").cast(pa.string()), "no HTTP status"))
    attempts = results.column("attempts")
    latencies = _sent_latencies(results)
    p50 = p95 = None
    if len(latencies):
        p50, p95 = pc.quantile(latencies, q=[0.5, 0.95], interpolation="linear").to_pylist()
    extremes = pc.min_max(results.column("completed_at")).as_py()
    duration: float | None = None
    if extremes["min"] is not None:
        duration = max((extremes["max"] - _t0(job, [extremes["min"]])).total_seconds(), 0.0)
    run_retries: Mapping[str, int] = {}
    rate_wait: float | None = None
    backoff_wait: float | None = None
    if run:
        raw = run.get("retries")
        if isinstance(raw, Mapping):
            run_retries = {str(k): int(v) for k, v in raw.items()}
        rate_wait = _opt_float(run.get("rate_limit_wait_s"))
        backoff_wait = _opt_float(run.get("backoff_wait_s"))
    failed = len(failures)
    return ReportStats(
        rows=rows,
        succeeded=rows - failed,
        failed=failed,
        requests_sent=_column_sum(results, "attempts"),
        retries=int(pc.sum(pc.max_element_wise(pc.subtract(attempts, 1), 0)).as_py() or 0),
        errors_by_type=dict(sorted(by_type.items(), key=lambda kv: (-kv[1], kv[0]))),
        errors_by_status=dict(sorted(by_status.items())),
        latency_p50_s=p50,
        latency_p95_s=p95,
        latency_max_s=pc.max(latencies).as_py() if len(latencies) else None,
        duration_s=duration,
        rows_per_s=(rows / duration) if duration else None,
        prompt_tokens=_column_sum(results, "prompt_tokens"),
        completion_tokens=_column_sum(results, "completion_tokens"),
        cost_usd=cost_usd,
        rate_limit_wait_s=rate_wait,
        backoff_wait_s=backoff_wait,
        retries_by_cause=dict(run_retries),
    )


def _failed_mask(results: pa.Table) -> pa.Array:
    """True for rows with an error (a message or at least a type)."""
    return pc.or_(pc.is_valid(results.column("error")), pc.is_valid(results.column("error_type"))).combine_chunks()


def _value_counts(column: pa.ChunkedArray | pa.Array) -> dict[str, int]:
    counts = pc.value_counts(column)
    return {str(v): int(c) for v, c in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())}


def _sent_latencies(results: pa.Table) -> pa.Array:
    """Finite latencies of rows that really went to the server (shared answers have attempts == 0)."""
    latency = results.column("latency_s")
    shared = pc.fill_null(pc.equal(results.column("attempts"), 0), False)
    keep = pc.and_(pc.fill_null(pc.is_finite(latency), False), pc.invert(shared))
    return latency.filter(keep).combine_chunks()


def _column_sum(table: pa.Table, name: str) -> int:
    if name not in table.column_names:
        return 0
    return int(pc.sum(table.column(name)).as_py() or 0)


def _t0(job: JobSummary, times: Sequence[datetime]) -> datetime:
    """When the job's clock starts: when it started running (not when it was queued), or its first result."""
    first = min(times)
    begun = job.started_at or job.created_at
    # A resumed job may record the start of its last run only; earlier results then come first.
    return min(_utc(begun), first) if begun is not None else first


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _int(value: Any) -> int:
    return int(value) if value is not None else 0


def _opt_float(value: Any) -> float | None:
    return float(value) if value is not None else None


def _opt_str(value: Any) -> str | None:
    return str(value) if value is not None else None


def _plural(n: int, one: str, many: str) -> str:
    return f"{n:,} {one if n == 1 else many}"


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _fmt_seconds(value: float | None) -> str:
    if value is None:
        return "—"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    return f"{value / 60:.1f} min"


def _fmt_rate(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f} rows/s"


def _fmt_cost(value: float | None) -> str:
    return "unknown (no prices for this model)" if value is None else f"${value:,.4f}"


# --- drawing ----------------------------------------------------------------------------------------------


def _draw(rep: JobReport) -> Figure:
    # The Figure/Agg canvas pair, not pyplot: no global state, no GUI backend, safe in threads and servers.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    # Fixed margins instead of a layout engine: constrained/tight layout doubled the rendering time, and
    # every label is placed so that it fits (error types are written above their bars, not as tick labels).
    fig.subplots_adjust(left=0.065, right=0.985, bottom=0.075, top=0.855, wspace=0.25, hspace=0.42)
    job, stats = rep.job, rep.stats
    title = f"job {job.id}" + (f" ({job.name})" if job.name else "")
    subtitle = (
        f"{job.status} · {stats.rows:,} of {job.total:,} rows done · {stats.succeeded:,} ok · {stats.failed:,} failed"
        + (f" · {job.model}" if job.model else "")
    )
    heading = f"{title}\n{subtitle}"
    if job.error:
        heading += "\n" + _shorten(f"fatal error: {job.error}", 140)
    fig.suptitle(heading, fontsize=12)
    _draw_throughput(axes[0][0], rep)
    _draw_latency(axes[0][1], rep)
    _draw_counts(axes[0][2], stats.errors_by_type, "errors by type", horizontal=True)
    _draw_counts(axes[1][0], stats.errors_by_status, "errors by HTTP status", horizontal=False)
    _draw_attempts(axes[1][1], rep)
    _draw_tokens(axes[1][2], rep)
    return fig


def _compact(value: float, _position: Any = None) -> str:
    """Tick labels that stay short for a million rows: 950, 20k, 1.5M."""
    for limit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}"


def _count_axis(axis: Any) -> None:
    """Whole numbers, few ticks, compact labels: for axes that count rows, requests or tokens."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    axis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    axis.set_major_formatter(FuncFormatter(_compact))


def _no_data(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color=_MUTED_COLOR)
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_throughput(ax: Any, rep: JobReport) -> None:
    import numpy as np

    ax.set_title("rows done over time")
    columns: dict[str, Any] = {
        "t": rep.results.column("completed_at"),
        "failed": _failed_mask(rep.results).cast(pa.int64()),
    }
    stamped = pa.table(columns)
    stamped = stamped.filter(pc.is_valid(stamped.column("t")))
    if stamped.num_rows == 0:
        _no_data(ax, "no finished rows yet" if rep.results.num_rows == 0 else "no completion times stored")
        return
    # One point per distinct completion time (the store stamps whole chunks), cumulated.
    groups = stamped.group_by("t").aggregate([("failed", "sum"), ("failed", "count")]).sort_by("t")
    first = groups.column("t")[0].as_py()
    start = _t0(rep.job, [first])
    offsets = pc.subtract(groups.column("t"), pa.scalar(start, type=pa.timestamp("us", tz="UTC")))
    seconds = offsets.cast(pa.int64()).to_numpy() / 1e6
    span = float(seconds[-1])
    # Seconds read badly for an overnight job: pick the unit from the job's length.
    unit, scale = ("hours", 3600.0) if span > 7200 else ("minutes", 60.0) if span > 600 else ("seconds", 1.0)
    failed = groups.column("failed_sum").to_numpy()
    ok = groups.column("failed_count").to_numpy() - failed
    xs = np.concatenate([[0.0], seconds / scale])
    ok_ys = np.concatenate([[0], np.cumsum(ok)])
    err_ys = np.concatenate([[0], np.cumsum(failed)])
    if len(xs) > 4000:
        # A million distinct stamps would be a million-vertex line; every k-th point (and the last) looks the same.
        pick = np.unique(np.concatenate([np.arange(0, len(xs), len(xs) // 2000), [len(xs) - 1]]))
        xs, ok_ys, err_ys = xs[pick], ok_ys[pick], err_ys[pick]
    ax.step(xs, ok_ys, where="post", color=_OK_COLOR, label="ok")
    if err_ys[-1]:
        ax.step(xs, err_ys, where="post", color=_ERR_COLOR, label="failed")
    if rep.job.total:
        ax.axhline(rep.job.total, color=_MUTED_COLOR, linestyle=":", linewidth=1, label="total")
    if groups.num_rows < stamped.num_rows and groups.num_rows <= 5:
        # The store stamps a whole chunk at once: say so, or one vertical jump looks like a bug.
        ax.set_xlabel(f"{unit} since start (results are stored a chunk at a time)")
    else:
        ax.set_xlabel(f"{unit} since start")
    ax.set_ylabel("rows")
    _count_axis(ax.yaxis)
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=0)
    ax.legend(loc="upper left", fontsize=8)
    if rep.stats.rows_per_s is not None:
        ax.set_title(f"rows done over time · {_fmt_rate(rep.stats.rows_per_s)}")


def _draw_latency(ax: Any, rep: JobReport) -> None:
    ax.set_title("latency per request")
    values = _sent_latencies(rep.results).to_numpy(zero_copy_only=False)
    if not len(values):
        _no_data(ax, "no requests sent")
        return
    bins = max(5, min(40, int(math.sqrt(len(values))) * 2))
    ax.hist(values, bins=bins, color=_NEUTRAL_COLOR, alpha=0.85, edgecolor="white", linewidth=0.5)
    _count_axis(ax.yaxis)
    for q, style in ((rep.stats.latency_p50_s, "--"), (rep.stats.latency_p95_s, ":")):
        if q is not None:
            ax.axvline(q, color="black", linestyle=style, linewidth=1)
    ax.set_xlabel("seconds (dashed p50, dotted p95)")
    ax.set_ylabel("requests")


def _draw_counts(ax: Any, counts: Mapping[str, int], title: str, *, horizontal: bool) -> None:
    ax.set_title(title)
    if not counts:
        _no_data(ax, "no errors")
        return
    labels = list(counts)[:10]
    values = [counts[k] for k in labels]
    positions = list(range(len(labels)))
    # At least four slots, so one or two categories do not become wall-to-wall slabs.
    pad = (max(len(labels), 4) - len(labels)) / 2 + 0.6
    limits = (-pad, len(labels) - 1 + pad)
    if horizontal:
        ax.barh(positions, values, height=0.5, color=_ERR_COLOR)
        ax.set_yticks([])
        ax.set_ylim(*limits)
        ax.invert_yaxis()
        for position, label, value in zip(positions, labels, values):
            ax.text(0, position - 0.3, f"{_shorten(label, 48)}: {value:,}", ha="left", va="bottom", fontsize=8)
        ax.set_xlabel("rows")
        _count_axis(ax.xaxis)
    else:
        ax.bar(positions, values, width=0.6, color=_ERR_COLOR)
        ax.set_xticks(positions, labels, fontsize=8)
        ax.set_xlim(*limits)
        ax.set_ylabel("rows")
        _count_axis(ax.yaxis)


def _draw_attempts(ax: Any, rep: JobReport) -> None:
    ax.set_title("attempts per row")
    attempts = {int(k): v for k, v in _value_counts(rep.results.column("attempts").drop_null()).items()}
    stats = rep.stats
    if not attempts:
        _no_data(ax, "no requests sent")
        return
    keys = sorted(attempts)
    positions = list(range(len(keys)))
    pad = (max(len(keys), 4) - len(keys)) / 2 + 0.6
    ax.bar(positions, [attempts[k] for k in keys], width=0.6, color=_NEUTRAL_COLOR)
    ax.set_xticks(positions, [str(k) for k in keys])
    ax.set_xlim(-pad, len(keys) - 1 + pad)
    ax.set_xlabel("attempts (0 = answer shared with an identical row)")
    ax.set_ylabel("rows")
    _count_axis(ax.yaxis)
    ax.margins(y=0.3)  # headroom for the box of retries and waits
    ax.set_ylim(bottom=0)
    lines = [_plural(stats.retries, "retry", "retries")]
    if stats.retries_by_cause:
        lines.extend(f"{k}: {v}" for k, v in sorted(stats.retries_by_cause.items(), key=lambda kv: -kv[1])[:4])
    if stats.rate_limit_wait_s is not None:
        lines.append(f"rate-limit wait {_fmt_seconds(stats.rate_limit_wait_s)}")
    if stats.backoff_wait_s is not None:
        lines.append(f"backoff wait {_fmt_seconds(stats.backoff_wait_s)}")
    ax.text(0.98, 0.96, "\n".join(lines), ha="right", va="top", transform=ax.transAxes, fontsize=8,
            bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8, "edgecolor": "#cccccc"})


def _draw_tokens(ax: Any, rep: JobReport) -> None:
    stats = rep.stats
    ax.set_title(f"tokens · cost {_fmt_cost(stats.cost_usd) if stats.cost_usd is not None else 'unknown'}")
    if stats.total_tokens == 0:
        _no_data(ax, "no tokens used")
        return
    labels = ["prompt", "completion"]
    values = [stats.prompt_tokens, stats.completion_tokens]
    bars = ax.bar(labels, values, width=0.6, color=[_NEUTRAL_COLOR, _OK_COLOR])
    ax.bar_label(bars, labels=[f"{v:,}" for v in values], fontsize=8)
    ax.set_ylabel("tokens")
    _count_axis(ax.yaxis)
    ax.margins(y=0.15)
