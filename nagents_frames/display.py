"""Rich notebook display for jobs and results: a status badge, a progress bar and the counts.

Jupyter calls ``_repr_html_`` on the last value of a cell; :class:`~nagents_frames.BatchJob` delegates to
:func:`job_html`, and :func:`results_html` renders a list of :class:`~nagents_frames.BatchResult`.
Plain HTML with inline styles (no JavaScript, no widgets), so it also renders in static notebook
viewers and in exported HTML. Every value is escaped.

Example::

    >>> from nagents_frames import BatchJob, BatchStatus
    >>> from nagents_frames.display import job_html
    >>> "completed" in job_html(BatchJob(id="job-1", status=BatchStatus.COMPLETED, total=2, succeeded=2))
    True
"""

from __future__ import annotations

import asyncio
import html
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

from nagents_frames.errors import ConfigurationError

__all__ = ["STATUS_COLORS", "ResultsView", "job_html", "job_text", "results_html", "watch"]

STATUS_COLORS: dict[str, str] = {
    "pending": "#757575",
    "processing": "#1565c0",
    "completed": "#2e7d32",
    "failed": "#c62828",
    "cancelled": "#ef6c00",
}
"""Badge colour per job status."""

_CELL_CHARS = 120


def job_text(job: Any) -> str:
    """A one-line plain-text summary of a job (status, progress, counts).

    >>> from nagents_frames import BatchJob
    >>> job_text(BatchJob(id="j", total=4, succeeded=1, failed=1))
    'job j: pending, 2/4 done (50%), 1 ok, 1 failed'
    """
    total, done = _counts(job)
    percent = f" ({100 * done / total:.0f}%)" if total else ""
    return (
        f"job {job.id}: {job.status}, {done}/{total} done{percent}, "
        f"{int(getattr(job, 'succeeded', 0) or 0)} ok, {int(getattr(job, 'failed', 0) or 0)} failed"
    )


def job_html(job: Any) -> str:
    """HTML for a job: id and name, a status badge, a progress bar, counts, model, times, fatal error.

    >>> from nagents_frames import BatchJob
    >>> 'width:30.0%' in job_html(BatchJob(id="j", total=10, succeeded=3))
    True
    """
    status = str(getattr(job, "status", "pending"))
    color = STATUS_COLORS.get(status, "#757575")
    total, done = _counts(job)
    succeeded = int(getattr(job, "succeeded", 0) or 0)
    failed = int(getattr(job, "failed", 0) or 0)
    ok_width = 100.0 * succeeded / total if total else 0.0
    failed_width = 100.0 * failed / total if total else 0.0
    name = getattr(job, "name", None)
    title = f"{job.id}" + (f" · {name}" if name else "")
    # A div-based bar rather than <progress>: it can show ok and failed side by side and survives sanitisers.
    bar = (
        '<div style="display:flex;width:100%;max-width:32em;height:0.9em;background:#e0e0e0;border-radius:3px;'
        'overflow:hidden;margin:0.3em 0">'
        f'<div title="ok" style="width:{ok_width:.1f}%;background:#2e7d32"></div>'
        f'<div title="failed" style="width:{failed_width:.1f}%;background:#c62828"></div></div>'
    )
    rows: list[tuple[str, str]] = [
        ("progress", f"{done} of {total} done" + (f" ({100 * done / total:.0f}%)" if total else "")),
        ("ok / failed / pending", f"{succeeded} / {failed} / {max(total - done, 0)}"),
    ]
    provider, model = getattr(job, "provider", None), getattr(job, "model", None)
    if provider or model:
        rows.append(("provider / model", f"{provider or '—'} / {model or '—'}"))
    mode = getattr(job, "mode", None)
    if mode:
        rows.append(("mode", str(mode)))
    usage: Any = getattr(job, "usage", None)
    total_tokens = int(getattr(usage, "total_tokens", 0) or 0) if usage is not None else 0
    if total_tokens:
        rows.append(("tokens", f"{usage.prompt_tokens:,} prompt + {usage.completion_tokens:,} completion"))
    for label, attr in (("created", "created_at"), ("updated", "updated_at"), ("finished", "finished_at")):
        value = getattr(job, attr, None)
        if value is not None:
            rows.append((label, _fmt_time(value)))
    error = getattr(job, "error", None)
    if error:
        rows.append(("error", _shorten(str(error), 400)))
    table = "".join(
        f'<tr><th style="text-align:left;padding:0.1em 1em 0.1em 0;font-weight:600">{html.escape(k)}</th>'
        f'<td style="text-align:left">{html.escape(v)}</td></tr>'
        for k, v in rows
    )
    return (
        '<div class="nf-job" style="font-family:system-ui,sans-serif;line-height:1.4">'
        f'<div><b>BatchJob</b> <code>{html.escape(title)}</code> '
        f'<span style="background:{color};color:white;border-radius:3px;padding:0.05em 0.5em;font-size:0.9em">'
        f"{html.escape(status)}</span></div>{bar}<table>{table}</table></div>"
    )


def results_html(results: Iterable[Any], *, limit: int = 20) -> str:
    """HTML table of :class:`~nagents_frames.BatchResult` values: id, response or error, tokens, attempts.

    Shows the first ``limit`` results and says how many more there are.

    >>> from nagents_frames import BatchResult
    >>> "req-1" in results_html([BatchResult(id="req-1", response="ok")])
    True
    """
    items = list(results)
    ok = sum(1 for r in items if getattr(r, "error", None) is None)
    head = items[:limit]
    cells = []
    for r in head:
        error = getattr(r, "error", None)
        usage = getattr(r, "usage", None)
        tokens = f"{usage.prompt_tokens} + {usage.completion_tokens}" if usage is not None else ""
        text = error if error is not None else (getattr(r, "response", None) or "")
        style = ' style="color:#c62828"' if error is not None else ""
        cells.append(
            f"<tr><td><code>{html.escape(str(r.id))}</code></td>"
            f"<td{style}>{html.escape(_shorten(str(text), _CELL_CHARS))}</td>"
            f"<td>{html.escape(tokens)}</td><td>{int(getattr(r, 'attempts', 0) or 0)}</td></tr>"
        )
    more = len(items) - len(head)
    footer = f"<p>… and {more} more</p>" if more > 0 else ""
    return (
        '<div class="nf-results" style="font-family:system-ui,sans-serif">'
        f"<p><b>{len(items)} results</b>: {ok} ok, {len(items) - ok} failed</p>"
        '<table><thead><tr><th style="text-align:left">id</th><th style="text-align:left">response / error</th>'
        '<th style="text-align:left">tokens</th><th style="text-align:left">attempts</th></tr></thead>'
        f"<tbody>{''.join(cells)}</tbody></table>{footer}</div>"
    )


class ResultsView(Sequence[Any]):
    """A list of results that displays itself as a table in a notebook.

    Behaves like the list it wraps (``len``, indexing, iteration); only the display differs.

    >>> from nagents_frames import BatchResult
    >>> view = ResultsView([BatchResult(id="a", response="x")])
    >>> len(view), view[0].id
    (1, 'a')
    """

    def __init__(self, results: Iterable[Any], *, limit: int = 20) -> None:
        self._items = list(results)
        self._limit = limit

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: Any) -> Any:
        return self._items[index]

    def __repr__(self) -> str:
        return f"ResultsView({self._items!r})"

    def _repr_html_(self) -> str:
        return results_html(self._items, limit=self._limit)


async def watch(
    manager: Any,
    job_id: str,
    *,
    interval: float = 0.5,
    timeout: float | None = None,  # noqa: ASYNC109 (same signature as BatchManager.wait)
    out: Callable[[str], None] | None = None,
) -> Any:
    """Follow a job until it is completed, failed or cancelled, and return the final job.

    In Jupyter the job's card (status, progress bar, counts) is shown once and updated in place every
    ``interval`` seconds; elsewhere one line of :func:`job_text` is printed (or passed to ``out``) each time
    the job moves. ``manager`` is a :class:`~nagents_frames.BatchManager` (anything with an async
    ``get_job``). Raises ``TimeoutError`` after ``timeout`` seconds; the job keeps running.

    >>> # job = await watch(batch_manager, job.id)
    """
    if interval <= 0:
        raise ConfigurationError(f"interval must be positive, got {interval!r}")
    deadline = None if timeout is None else time.monotonic() + timeout
    job = await manager.get_job(job_id)
    show = _live_display(job) if out is None else None
    last = None
    while True:
        line = job_text(job)
        if show is not None:
            show(job)
        elif line != last:
            (out or print)(line)
        last = line
        if _terminal(job):
            return job
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"job {job_id} did not finish within {timeout}s ({line})")
        await asyncio.sleep(interval)
        job = await manager.get_job(job_id)


def _terminal(job: Any) -> bool:
    return str(getattr(job, "status", "")) in ("completed", "failed", "cancelled")


def _live_display(job: Any) -> Callable[[Any], None] | None:
    """An updater of one display in a Jupyter kernel, or None outside one."""
    try:
        from IPython import get_ipython
        from IPython.display import HTML, display
    except ImportError:
        return None
    shell = get_ipython()
    if shell is None or "IPKernelApp" not in getattr(shell, "config", {}):
        return None
    handle = display(HTML(job_html(job)), display_id=True)

    def update(current: Any) -> None:
        if handle is not None:
            handle.update(HTML(job_html(current)))

    return update


def _counts(job: Any) -> tuple[int, int]:
    total = int(getattr(job, "total", 0) or 0)
    done = int(getattr(job, "succeeded", 0) or 0) + int(getattr(job, "failed", 0) or 0)
    return total, done


def _fmt_time(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="seconds")
    return str(value)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
