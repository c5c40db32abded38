"""Job reports (nagents_frames.report) and notebook display (nagents_frames.display).

Reports are rendered for real (matplotlib, Agg) and read back as PNGs: size, non-blank, and the colours of
the panels that must (or must not) be there.
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from nagents_frames import BatchJob, BatchResult, BatchStatus, Usage
from nagents_frames.display import ResultsView, job_html, job_text, results_html
from nagents_frames.errors import ConfigurationError, JobNotFoundError, StoreError
from nagents_frames.report import DPI, FIGSIZE, JobReport, JobSummary, report, write_report

T0 = datetime(2026, 11, 29, 21, 0, tzinfo=UTC)
WIDTH, HEIGHT = round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI)
ERROR_RGB = (0xC6, 0x28, 0x28)  # the report's colour for failed rows


def results_table(outcomes: list[dict[str, Any]]) -> pa.Table:
    """A results table as the store keeps it, from per-row dicts (missing keys: a successful row)."""
    rows = []
    for i, o in enumerate(outcomes):
        rows.append(
            {
                "row_index": i,
                "response": None if o.get("error_type") else f"echo: {i}",
                "error": f"{o['error_type']}: boom" if o.get("error_type") else None,
                "error_type": o.get("error_type"),
                "status_code": o.get("status_code"),
                "attempts": o.get("attempts", 1),
                "prompt_tokens": o.get("prompt_tokens", 0 if o.get("error_type") else 12),
                "completion_tokens": o.get("completion_tokens", 0 if o.get("error_type") else 5),
                "latency_s": o.get("latency_s", 0.05 + 0.01 * (i % 7)),
                "completed_at": T0 + timedelta(seconds=0.1 * i),
            }
        )
    schema = pa.schema(
        [
            ("row_index", pa.int64()), ("response", pa.string()), ("error", pa.string()), ("error_type", pa.string()),
            ("status_code", pa.int32()), ("attempts", pa.int32()), ("prompt_tokens", pa.int64()),
            ("completion_tokens", pa.int64()), ("latency_s", pa.float64()), ("completed_at", pa.timestamp("us")),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def job(status: str, total: int, table: pa.Table, **kwargs: Any) -> JobSummary:
    failed = sum(1 for e in table.column("error").to_pylist() if e is not None)
    return JobSummary(
        id=f"job-{status}", status=status, total=total, succeeded=table.num_rows - failed, failed=failed,
        provider="openai_compatible", model=kwargs.pop("model", "echo"), created_at=T0, **kwargs,
    )


def finished() -> JobReport:
    table = results_table([{}] * 40 + [{"attempts": 2}] * 5 + [{"attempts": 0, "latency_s": 0.0}] * 5)
    return JobReport.from_arrow(job("completed", 50, table), table)


def failed() -> JobReport:
    outcomes = [{}] * 10 + [{"error_type": "AuthenticationError", "status_code": 401}] * 2
    table = results_table(outcomes)
    return JobReport.from_arrow(
        job("failed", 30, table, error="AuthenticationError: HTTP 401: invalid api key"), table
    )


def cancelled() -> JobReport:
    outcomes = [{}] * 15 + [{"error_type": "ServerError", "status_code": 503, "attempts": 3}] * 3 + [
        {"error_type": "APITimeoutError", "attempts": 3}
    ]
    table = results_table(outcomes)
    run = {"retries": {"ServerError": 6, "RateLimitError": 4}, "rate_limit_wait_s": 2.5, "backoff_wait_s": 0.75}
    return JobReport.from_arrow(job("cancelled", 100, table), table, run=run)


def empty() -> JobReport:
    return JobReport.from_arrow(JobSummary(id="job-empty", status="pending"), results_table([]))


REPORTS = {"completed": finished, "failed": failed, "cancelled": cancelled, "empty": empty}


def png_image(data: bytes) -> Image.Image:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def count_colour(image: Image.Image, rgb: tuple[int, int, int], tolerance: int = 6) -> int:
    return sum(
        n for n, (r, g, b) in image.getcolors(maxcolors=WIDTH * HEIGHT) or []
        if abs(r - rgb[0]) <= tolerance and abs(g - rgb[1]) <= tolerance and abs(b - rgb[2]) <= tolerance
    )


# --- statistics -------------------------------------------------------------------------------------------


def test_stats_of_a_cancelled_job() -> None:
    s = cancelled().stats
    assert (s.rows, s.succeeded, s.failed) == (19, 15, 4)
    assert s.errors_by_type == {"ServerError": 3, "APITimeoutError": 1}
    assert s.errors_by_status == {"503": 3, "no HTTP status": 1}
    assert s.retries == 4 * 2  # four rows with 3 attempts each
    assert s.requests_sent == 15 + 4 * 3
    assert s.prompt_tokens == 15 * 12 and s.completion_tokens == 15 * 5
    assert s.retries_by_cause == {"ServerError": 6, "RateLimitError": 4}
    assert s.rate_limit_wait_s == 2.5 and s.backoff_wait_s == 0.75
    assert s.duration_s == pytest.approx(1.8)  # last row 18 x 0.1 s after the job was created
    assert s.rows_per_s == pytest.approx(19 / 1.8)


def test_latency_ignores_answers_shared_between_identical_rows() -> None:
    s = finished().stats
    # 45 rows really went out; the 5 shared ones (attempts 0, latency 0) must not drag the percentiles down.
    assert s.latency_p50_s is not None and s.latency_p50_s >= 0.05
    assert s.latency_max_s == pytest.approx(0.11)


def test_empty_job_has_no_numbers_only_zeros_and_unknowns() -> None:
    s = empty().stats
    assert (s.rows, s.failed, s.retries, s.total_tokens) == (0, 0, 0, 0)
    assert s.latency_p50_s is None and s.duration_s is None and s.rows_per_s is None and s.cost_usd is None


def test_missing_columns_count_as_unknown() -> None:
    rep = JobReport.from_arrow(JobSummary(id="j", status="completed", total=2, succeeded=2),
                               pa.table({"row_index": [0, 1]}))
    assert (rep.stats.rows, rep.stats.failed, rep.stats.requests_sent) == (2, 0, 0)
    assert len(rep.figure.axes) == 6  # every panel drew (with "no data" where nothing is known)


def test_cost_from_the_price_table() -> None:
    table = results_table([{"prompt_tokens": 1_000_000, "completion_tokens": 100_000}])
    priced = JobReport.from_arrow(job("completed", 1, table, model="gpt-4o-mini"), table)
    assert priced.stats.cost_usd == pytest.approx(0.21)
    batch = JobReport.from_arrow(job("completed", 1, table, model="gpt-4o-mini", mode="native"), table)
    assert batch.stats.cost_usd == pytest.approx(0.105)
    assert JobReport.from_arrow(job("completed", 1, table, model="my-own-model"), table).stats.cost_usd is None
    own = JobReport.from_arrow(job("completed", 1, table, model="my-own-model"), table,
                               prices={"my-own-model": (1.0, 2.0)})
    assert own.stats.cost_usd == pytest.approx(1.2)
    assert "$1.2000" in own._summary_table()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "error_type": st.sampled_from([None, None, "ServerError", "RateLimitError", "APIConnectionError"]),
                "attempts": st.integers(0, 6),
                "latency_s": st.one_of(st.none(), st.floats(0, 30, allow_nan=False)),
            }
        ),
        max_size=60,
    )
)
def test_stats_add_up(outcomes: list[dict[str, Any]]) -> None:
    for o in outcomes:
        o["status_code"] = {"ServerError": 500, "RateLimitError": 429}.get(o["error_type"] or "")
    table = results_table(outcomes)
    s = JobReport.from_arrow(job("completed", len(outcomes), table), table).stats
    assert s.succeeded + s.failed == s.rows == len(outcomes)
    assert sum(s.errors_by_type.values()) == sum(s.errors_by_status.values()) == s.failed
    assert s.requests_sent == sum(o["attempts"] for o in outcomes)
    assert s.retries == sum(max(o["attempts"] - 1, 0) for o in outcomes)
    if s.latency_p50_s is not None:
        assert s.latency_max_s is not None and s.latency_p95_s is not None
        assert 0 <= s.latency_p50_s <= s.latency_p95_s <= s.latency_max_s


# --- rendering --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(REPORTS))
def test_report_renders_to_a_png_of_the_documented_size(kind: str, tmp_path: Path) -> None:
    rep = REPORTS[kind]()
    path = rep.save(tmp_path / f"{kind}.png")
    data = path.read_bytes()
    assert len(data) > 10_000
    image = png_image(data)
    assert image.size == (WIDTH, HEIGHT)
    # Not blank: plenty of distinct colours (text antialiasing, bars, axes).
    assert len(image.getcolors(maxcolors=WIDTH * HEIGHT) or []) > 50
    red = count_colour(image, ERROR_RGB)
    if rep.stats.failed:
        assert red > 500, "failed rows must show as red bars"
        # ... and as a red 'failed' line in the throughput panel (top left).
        assert count_colour(image.crop((0, 0, WIDTH // 3, HEIGHT // 2)), ERROR_RGB) > 20
    else:
        assert red == 0, "no errors, so no red in the picture"


def test_html_is_self_contained_and_escaped(tmp_path: Path) -> None:
    table = results_table([{}, {"error_type": "ServerError", "status_code": 500}])
    rep = JobReport.from_arrow(
        job("failed", 2, table, name="<script>alert(1)</script>", error="boom <b>"), table
    )
    path = rep.save(tmp_path / "report.html")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert "<script>" not in text and "&lt;script&gt;" in text and "boom &lt;b&gt;" in text
    # Nothing fetched from elsewhere: the only image is inline.
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", text)
    match = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert match is not None
    assert png_image(base64.b64decode(match.group(1))).size == (WIDTH, HEIGHT)
    assert "1 ok, 1 failed" in text


def test_notebook_reprs() -> None:
    rep = cancelled()
    assert png_image(rep._repr_png_()).size == (WIDTH, HEIGHT)
    fragment = rep._repr_html_()
    assert fragment.startswith('<div class="nf-report">') and "<html" not in fragment
    assert "job-cancelled" in repr(rep)
    assert rep.figure is rep.figure  # drawn once
    assert len(rep.figure.axes) == 6


def test_many_rows_are_drawn_with_few_vertices_and_exact_totals() -> None:
    n = 20_000
    table = pa.table(
        {
            "error_type": pa.array(["ServerError" if i % 50 == 0 else None for i in range(n)], pa.string()),
            "attempts": pa.array([1] * n, pa.int32()),
            "latency_s": pa.array([0.1 + (i % 100) / 1000 for i in range(n)]),
            "completed_at": pa.array([T0 + timedelta(milliseconds=i) for i in range(n)]),
        }
    )
    rep = JobReport.from_arrow(JobSummary(id="big", status="completed", total=n), table)
    assert (rep.stats.rows, rep.stats.failed) == (n, n // 50)
    ok_line, failed_line = rep.figure.axes[0].lines[:2]
    assert len(ok_line.get_xdata()) <= 4001
    assert ok_line.get_ydata()[-1] == n - n // 50 and failed_line.get_ydata()[-1] == n // 50
    labels = [t.get_text() for t in rep.figure.axes[0].get_yticklabels()]
    assert any(label.endswith("k") for label in labels), labels  # 20k, not 20000 or 1e4


def test_save_refuses_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"\.html or \.png"):
        empty().save(tmp_path / "report.pdf")


def test_importing_the_package_does_not_import_matplotlib() -> None:
    code = (
        "import sys, nagents_frames, nagents_frames.report, nagents_frames.display\n"
        "from nagents_frames import BatchJob\n"
        "BatchJob(id='j')._repr_html_()\n"
        "bad = [m for m in ('matplotlib', 'pandas', 'PIL') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- display ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", list(BatchStatus))
def test_job_html_for_every_status(status: BatchStatus) -> None:
    j = BatchJob(
        id="job-1", status=status, total=10, succeeded=6, failed=1, model="echo", provider="openai_compatible",
        usage=Usage(100, 40), created_at=T0,
    )
    text = j._repr_html_()
    assert text == job_html(j)
    assert f">{status.value}</span>" in text
    assert "width:60.0%" in text and "width:10.0%" in text  # ok and failed parts of the bar
    assert "7 of 10 done (70%)" in text and "6 / 1 / 3" in text
    assert "100 prompt + 40 completion" in text
    assert job_text(j) == f"job job-1: {status.value}, 7/10 done (70%), 6 ok, 1 failed"


def test_job_html_escapes_and_handles_an_empty_job() -> None:
    text = job_html(BatchJob(id="<x>", name="a & b", error="<img src=x onerror=alert(1)>"))
    assert "<x>" not in text and "&lt;x&gt;" in text and "a &amp; b" in text
    assert "<img" not in text
    assert "0 of 0 done" in text and "width:0.0%" in text


def test_results_html() -> None:
    results = [BatchResult(id=f"req-{i}", response=f"answer {i}", usage=Usage(3, 2), attempts=1) for i in range(25)]
    results.append(BatchResult(id="req-bad", error="ServerError: HTTP 500 <oops>", attempts=3))
    text = results_html(results, limit=5)
    assert "26 results</b>: 25 ok, 1 failed" in text
    assert text.count("<tr><td>") == 5 and "… and 21 more" in text
    assert "&lt;oops&gt;" in results_html(results[-1:])
    view = ResultsView(results, limit=3)
    assert len(view) == 26 and view[-1].id == "req-bad" and [r.id for r in view][:2] == ["req-0", "req-1"]
    assert view._repr_html_().count("<tr><td>") == 3


# --- reports of real jobs, read back from a store file ------------------------------------------------------


async def _run_jobs(path: Path) -> dict[str, BatchJob]:
    """Four jobs run by the job API against the fake server: completed (with errors and retries), cancelled
    part-way, failed (bad key) and empty; plus one batch_complete(store=...) job."""
    import polars as pl

    from nagents_frames import BatchManager, BatchRequest, Provider, RetryPolicy, abatch_complete
    from nagents_frames.store import BatchStore
    from nagents_frames.testing import FakeLLMServer

    def requests(n: int) -> list[BatchRequest]:
        return [BatchRequest(id=f"req-{i}", messages=[{"role": "user", "content": f"item #{i}"}]) for i in range(n)]

    jobs: dict[str, BatchJob] = {}
    store = BatchStore(path)
    await store.initialize()
    # Every prompt is refused once with 429 (a retry each); prompts with a 7 always get 500.
    async with FakeLLMServer(fail_first=1, fail_first_status=429, error_on_content={"7": 500}) as server:
        provider = Provider(provider_type="openai_compatible", model="gpt-4o-mini", base_url=server.base_url)
        retry = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.02)
        async with BatchManager(provider=provider, store=store, chunk_size=5, concurrency=5, retry=retry) as manager:
            job = await manager.submit(requests(30), name="finished")
            jobs["completed"] = await manager.wait(job.id, timeout=60)

            server.configure(latency=0.2, fail_first=0)
            job = await manager.submit(requests(60), name="stopped")
            for _ in range(200):  # until a few chunks are stored, at most ~20 s
                if (await manager.get_job(job.id)).done >= 10:
                    break
                await asyncio.sleep(0.1)
            await manager.cancel(job.id)
            jobs["cancelled"] = await manager.wait(job.id, timeout=60)

            server.configure(latency=0.0, api_key="the-right-key")
            job = await manager.submit(requests(10), name="bad key")
            jobs["failed"] = await manager.wait(job.id, timeout=60)
            server.configure(api_key=None)

            job = await manager.submit([], name="nothing")
            jobs["empty"] = await manager.wait(job.id, timeout=60)

        frame = pl.DataFrame({"text": ["a", "b", "c", "d"]})
        await abatch_complete(frame, provider=provider, prompt="Say {text}", store=store, job_name="table",
                              progress=False, retry=retry)
        table_id = store.sql("select id from jobs where name = 'table'", arrow=True).column("id")[0].as_py()
        jobs["table"] = (await store.get_job(table_id)).to_job()
    await store.close()
    return jobs


@pytest.fixture(scope="module")
def store_jobs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, BatchJob]]:
    path = tmp_path_factory.mktemp("store") / "jobs.duckdb"
    return path, asyncio.run(_run_jobs(path))


def test_the_store_jobs_ended_as_intended(store_jobs: tuple[Path, dict[str, BatchJob]]) -> None:
    _, jobs = store_jobs
    assert {k: j.status.value for k, j in jobs.items()} == {
        "completed": "completed", "cancelled": "cancelled", "failed": "failed", "empty": "completed",
        "table": "completed",
    }
    assert 0 < jobs["cancelled"].done < jobs["cancelled"].total


@pytest.mark.parametrize("kind", ["completed", "cancelled", "failed", "empty", "table"])
def test_report_of_a_stored_job(kind: str, store_jobs: tuple[Path, dict[str, BatchJob]], tmp_path: Path) -> None:
    path, jobs = store_jobs
    j = jobs[kind]
    rep = report(str(path), j.id)  # by file name, read-only, as the CLI does
    s = rep.stats
    assert (rep.job.status, rep.job.total) == (j.status.value, j.total)
    assert (s.succeeded, s.failed) == (j.succeeded, j.failed)
    assert (s.prompt_tokens, s.completion_tokens) == (j.usage.prompt_tokens, j.usage.completion_tokens)
    # Rendering is the slow part: draw once per job, and go through write_report (the CLI's call) once.
    if kind == "completed":
        png = write_report(path, j.id, tmp_path / "report.png")
    else:
        png = rep.save(tmp_path / "report.png")
    assert png_image(png.read_bytes()).size == (WIDTH, HEIGHT)
    page = rep.save(tmp_path / "report.html").read_text(encoding="utf-8")
    assert j.id in page and "data:image/png;base64," in page
    if kind == "completed":
        assert s.failed == 3 and s.errors_by_type == {"ServerError": 3} and s.errors_by_status == {"500": 3}
        assert s.retries >= 30  # every row was refused once
        assert s.retries_by_cause.get("RateLimitError", 0) >= 27  # from the run report kept in the store
        assert s.rate_limit_wait_s is not None and s.backoff_wait_s is not None
        assert s.cost_usd is not None and s.cost_usd > 0  # gpt-4o-mini has a list price
        assert s.duration_s is not None and s.rows_per_s is not None
        assert count_colour(png_image(png.read_bytes()), ERROR_RGB) > 500
    if kind == "cancelled":
        assert 0 < s.rows < j.total and "cancelled" in page
    if kind == "failed":
        assert rep.job.error is not None and "AuthenticationError" in rep.job.error
        assert "the-right-key" not in page  # the server's key is never echoed into the report
    if kind == "empty":
        assert s.rows == 0 and rep.job.total == 0


def test_report_errors(store_jobs: tuple[Path, dict[str, BatchJob]], tmp_path: Path) -> None:
    path, jobs = store_jobs
    with pytest.raises(JobNotFoundError):
        report(path, "no-such-job")
    with pytest.raises(ConfigurationError):
        write_report(path, jobs["completed"].id, tmp_path / "report.svg")
    with pytest.raises(StoreError):
        report(tmp_path / "missing.duckdb", "x")
    assert not (tmp_path / "missing.duckdb").exists()  # looking never creates a store


async def test_watch_follows_a_job_to_its_end() -> None:
    """Outside Jupyter, watch() prints a line each time the job moves and returns the finished job."""
    from nagents_frames import BatchManager, BatchRequest, Provider
    from nagents_frames.display import watch
    from nagents_frames.testing import FakeLLMServer

    async with FakeLLMServer(latency=0.05) as server:
        provider = Provider(provider_type="openai_compatible", model="echo", base_url=server.base_url)
        async with BatchManager(provider=provider, chunk_size=4, concurrency=4) as manager:
            requests = [BatchRequest(id=f"r{i}", messages=[{"role": "user", "content": f"hi {i}"}]) for i in range(24)]
            job = await manager.submit(requests)
            lines: list[str] = []
            final = await watch(manager, job.id, interval=0.02, timeout=60, out=lines.append)
            assert final.status is BatchStatus.COMPLETED and final.done == 24
            assert lines[-1] == f"job {job.id}: completed, 24/24 done (100%), 24 ok, 0 failed"
            assert len(lines) >= 2 and len(set(lines)) == len(lines)  # one line per change, no repeats

            server.configure(latency=0.8)
            slow = await manager.submit(requests[:2])
            with pytest.raises(TimeoutError, match=slow.id):
                await watch(manager, slow.id, interval=0.02, timeout=0.2, out=lines.append)
            assert await manager.cancel(slow.id)
            with pytest.raises(ConfigurationError):
                await watch(manager, slow.id, interval=0)


async def test_report_by_path_while_this_process_has_the_store_open(
    store_jobs: tuple[Path, dict[str, BatchJob]],
) -> None:
    """In a notebook the store is usually open already; a report by file name must still work."""
    from nagents_frames.store import BatchStore

    path, jobs = store_jobs
    store = BatchStore(path, linger=30)  # keeps its connection open for the whole test
    await store.initialize()
    try:
        assert store.sql("select count(*) as n from jobs", arrow=True).column("n")[0].as_py() == 5
        rep = report(path, jobs["completed"].id)  # the store's connection is still open right now
        assert rep.stats.failed == 3
        assert store.sql("select count(*) as n from jobs", arrow=True).column("n")[0].as_py() == 5
    finally:
        await store.close()
