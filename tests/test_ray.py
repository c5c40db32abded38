"""Ray Data integration: a local Ray cluster started here, the fake LLM server over real HTTP.

The cluster (``ray.init(num_cpus=2)``, no dashboard) is started once for the module; each Ray run
starts its own actor pool, so the runs here are few and small.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nagents_frames import AuthenticationError, ConfigurationError, Provider, batch_complete
from nagents_frames.frames import CompletionOptions
from nagents_frames.store import BatchStore
from nagents_frames.testing import FakeLLMServer
from tests.conftest import FRAME_KINDS, make_frame

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'nagents-frames[ray]'")
pytest.importorskip("ray.data", reason="ray[data] is not installed: pip install 'nagents-frames[ray]'")

from nagents_frames.integrations.ray import (  # noqa: E402  (after the importorskip above)
    MANIFEST_NAME,
    OUTCOMES_DIR,
    ChunkReport,
    ChunkSpec,
    _read_chunk,
    plan_chunks,
    run_parquet,
)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A local two-CPU Ray cluster for this module's tests."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()


def _provider(server: FakeLLMServer) -> Provider:
    return Provider(provider_type="openai_compatible", model="echo", base_url=server.base_url)


def _dataset(frame_kind: str, frame: Any) -> Any:
    """The Ray dataset a user of that frame library would make."""
    if frame_kind == "pandas":
        return ray.data.from_pandas(frame)
    if frame_kind == "polars":
        return ray.data.from_arrow(frame.to_arrow())
    return ray.data.from_arrow(frame)


def _sql(path: Path, query: str) -> dict[str, list[Any]]:
    """A query over a store file (the way a user looks at it afterwards)."""
    store = BatchStore(path)
    try:
        return dict(store.sql(query, arrow=True).to_pydict())
    finally:
        asyncio.run(store.close())


def _write_input(path: Path, texts: list[str], row_group_size: int) -> None:
    pq.write_table(pa.table({"text": texts, "n": list(range(len(texts)))}), path, row_group_size=row_group_size)


# --- no cluster needed ------------------------------------------------------------------------------------


def test_importing_nagents_frames_never_imports_ray() -> None:
    code = textwrap.dedent(
        """
        import sys
        import pyarrow as pa
        import nagents_frames, nagents_frames.integrations
        from nagents_frames import Provider, batch_complete
        from nagents_frames.testing import FakeLLMServer
        with FakeLLMServer() as s:
            p = Provider(provider_type="openai_compatible", model="echo", base_url=s.base_url)
            out = batch_complete(pa.table({"prompt": ["hi"]}), provider=p, progress=False)
        assert out.column("response").to_pylist() == ["echo: hi"]
        print(sorted(m for m in sys.modules if m == "ray" or m.startswith("ray.")))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"


@settings(max_examples=40, deadline=None)
@given(
    groups=st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=4), min_size=1, max_size=3),
    rows_per_file=st.integers(1, 25),
)
def test_chunks_cover_every_row_once_in_order(
    tmp_path_factory: pytest.TempPathFactory, groups: list[list[int]], rows_per_file: int
) -> None:
    directory = tmp_path_factory.mktemp("plan")
    files = []
    first = 0
    for number, sizes in enumerate(groups):
        path = directory / f"in-{number}.parquet"
        with pq.ParquetWriter(path, pa.schema([("n", pa.int64())])) as writer:
            for size in sizes:
                writer.write_table(pa.table({"n": list(range(first, first + size))}))
                first += size
        files.append(str(path))
    specs, schema = plan_chunks(files, rows_per_file)
    assert schema.names == ["n"]
    assert all(1 <= s.rows <= rows_per_file for s in specs)
    # contiguous, in order, every row once, and the file names sort in row order
    assert [s.first_row for s in specs] == [0, *[s.first_row + s.rows for s in specs][:-1]]
    assert sum(s.rows for s in specs) == first
    assert sorted(s.file_name for s in specs) == [s.file_name for s in specs]
    # each chunk reads exactly its rows (the values equal the global row index here)
    for spec in specs:
        assert _read_chunk(spec).column("n").to_pylist() == list(range(spec.first_row, spec.first_row + spec.rows))


def test_files_with_other_columns_are_refused(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"other": ["b"]}), tmp_path / "b.parquet")
    with pytest.raises(ConfigurationError, match="disagree on their columns"):
        plan_chunks([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")], 10)


def test_bad_arguments_fail_before_ray_runs(tmp_path: Path) -> None:
    _write_input(tmp_path / "in.parquet", ["a", "b"], 10)
    options = CompletionOptions(provider=Provider(provider_type="openai_compatible", model="m",
                                                  base_url="http://127.0.0.1:9/v1"), prompt="{text}")
    with pytest.raises(ConfigurationError, match="num_actors"):
        run_parquet(tmp_path / "in.parquet", tmp_path / "out", options=options, num_actors=0)
    with pytest.raises(ConfigurationError, match="clashes"):
        run_parquet(tmp_path / "in.parquet", tmp_path / "out", options=options, index_column="n")
    with pytest.raises(ConfigurationError, match=r"missing|lacks"):
        run_parquet(tmp_path / "in.parquet", tmp_path / "out",
                    options=CompletionOptions(provider=options.provider, prompt="{nope}"))
    with pytest.raises(ConfigurationError, match="does not exist"):
        run_parquet(tmp_path / "nothing.parquet", tmp_path / "out", options=options)


def test_an_output_directory_of_another_job_is_refused(tmp_path: Path) -> None:
    _write_input(tmp_path / "in.parquet", ["a", "b"], 10)
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST_NAME).write_text(json.dumps({"fingerprint": "someone else"}))
    provider = Provider(provider_type="openai_compatible", model="m", base_url="http://127.0.0.1:9/v1")
    with pytest.raises(ConfigurationError, match="different job"):
        run_parquet(tmp_path / "in.parquet", out, options=CompletionOptions(provider=provider, prompt="{text}"))
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / ChunkSpec(0, 2, "x", 0, 0).file_name).write_bytes(b"")
    with pytest.raises(ConfigurationError, match="empty output directory"):
        run_parquet(tmp_path / "in.parquet", stray, options=CompletionOptions(provider=provider, prompt="{text}"))


# --- on the local cluster -----------------------------------------------------------------------------------


def test_dataset_rows_keep_order_identity_and_their_own_errors(ray_cluster: None) -> None:
    # one Ray run over datasets built from each frame library (each run starts an actor pool, which is slow)
    texts = [f"bad {i}" if i % 7 == 3 else f"row {i}" for i in range(60)]
    parts = []
    for k, kind in enumerate(FRAME_KINDS):
        frame = make_frame(kind, {"text": texts[20 * k : 20 * k + 20], "kind": [kind] * 20,
                                  "weight": [float(i) for i in range(20 * k, 20 * k + 20)]})
        parts.append(_dataset(kind, frame))
    with FakeLLMServer(error_on_content={"bad": 400}) as server:
        ds = batch_complete(
            parts[0].union(*parts[1:]), provider=_provider(server), prompt="Say {text}", chunk_size=10,
            num_actors=2, index_column="row", usage=True, retry=None,
        )
        assert isinstance(ds, ray.data.Dataset)
        rows = ds.take_all()
    assert [r["row"] for r in rows] == list(range(60))
    by_row = {r["row"]: r for r in rows}
    for i, text in enumerate(texts):  # join back to the input by row index
        row = by_row[i]
        assert row["text"] == text and row["weight"] == float(i) and row["kind"] == FRAME_KINDS[i // 20]
        if text.startswith("bad"):
            assert row["response"] is None
            assert row["error"].startswith("BadRequestError") and "400" in row["error"]
        else:
            assert row["response"] == f"echo: Say {text}"
            assert row["error"] is None
            assert row["completion_tokens"] > 0
    assert server.stats.prompts[f"Say {texts[3]}"] == 1  # a 400 is not retried


def test_rpm_budget_is_global_across_actors(ray_cluster: None) -> None:
    rpm, actors, n = 1800.0, 2, 100
    rate = rpm / 60.0
    with FakeLLMServer() as server:
        ds = ray.data.from_items([{"text": f"t{i}"} for i in range(n)], override_num_blocks=10)
        out = batch_complete(ds, provider=_provider(server), prompt="{text}", rpm=rpm, num_actors=actors,
                             chunk_size=10, concurrency=16)
        rows = out.take_all()
        arrivals = sorted(server.stats.arrivals)
    assert len(rows) == n and all(r["error"] is None for r in rows)
    assert len(arrivals) == n
    # each actor may burst half a second of its share at first; beyond that the rate is the global one
    bursts = sum(max(rate / actors * 0.5, 1.0) for _ in range(actors))
    window = 2.0
    most = max(sum(1 for t in arrivals if start <= t < start + window) for start in arrivals)
    assert most <= rate * window + bursts + 2, f"{most} requests within {window}s; budget {rpm} rpm"
    # and the run took as long as the global budget demands (it would be half with a full budget each)
    assert arrivals[-1] - arrivals[0] >= (n - bursts - 2) / rate * 0.9


def test_run_parquet_resumes_after_an_interrupted_run(ray_cluster: None, tmp_path: Path) -> None:
    n = 120
    texts = [f"crash {i}" if i == 75 else (f"bad {i}" if i % 10 == 4 else f"row {i}") for i in range(n)]
    _write_input(tmp_path / "in.parquet", texts, row_group_size=50)
    out = tmp_path / "out"
    with FakeLLMServer(error_on_content={"bad": 400, "crash": 401}) as server:
        options = CompletionOptions(provider=_provider(server), prompt="Say {text}", chunk_size=5, usage=True,
                                    retry=None)
        store = tmp_path / "jobs.duckdb"
        # a bad key on one chunk stops the job: the typed error comes out of Ray's wrappers
        with pytest.raises(AuthenticationError):
            run_parquet(tmp_path / "in.parquet", out, options=options, num_actors=2, rows_per_file=10,
                        store=store, job_name="nightly")
        written = sorted(p.name for p in out.glob("part-*.parquet"))
        assert "part-000000000070-0000000010.parquet" not in written
        failed_job = _sql(store, "select id, status, error_type, succeeded + failed as done, total from jobs")
        assert failed_job["status"] == ["failed"] and failed_job["error_type"] == ["AuthenticationError"]
        # chunks that landed after the driver stopped listening are on disk but not yet in the store:
        # the resume records them from their outcome files
        assert failed_job["done"][0] <= 10 * len(written) and failed_job["total"] == [n]
        first_pass = {p for p, count in server.stats.prompts.items() if count}
        server.configure(error_on_content={"bad": 400})
        server.reset_stats()
        seen: list[ChunkReport] = []
        report = run_parquet(tmp_path / "in.parquet", out, options=options, num_actors=2, rows_per_file=10,
                             on_chunk=seen.append, store=store, job_name="nightly")
        second_pass = dict(server.stats.prompts)
    assert report.chunks_total == 12 and report.total_rows == n
    assert report.chunks_skipped == len(written) and report.chunks_written == 12 - len(written)
    assert report.rows_skipped == 10 * len(written)
    every = [ChunkSpec(start, 10, "", 0, 0).file_name for start in range(0, n, 10)]
    assert sorted(r.file_name for r in seen) == [name for name in every if name not in written]
    # rows of the chunks written by the first run were not sent again
    done_rows = {int(name.split("-")[1]) + k for name in written for k in range(10)}
    for i, text in enumerate(texts):
        if i in done_rows:
            assert f"Say {text}" not in second_pass
    assert not any(f"Say {texts[i]}" in first_pass and f"Say {texts[i]}" in second_pass for i in done_rows)
    # the output: every row once, in order by row_index, joined back to its input row
    table = pq.read_table(out).sort_by("row_index")
    assert table.column("row_index").to_pylist() == list(range(n))
    assert table.column("text").to_pylist() == texts
    assert table.column("n").to_pylist() == list(range(n))
    responses = table.column("response").to_pylist()
    errors = table.column("error").to_pylist()
    for i, text in enumerate(texts):
        if text.startswith("bad"):
            assert responses[i] is None and errors[i].startswith("BadRequestError")
        else:
            assert responses[i] == f"echo: Say {text}" and errors[i] is None
    assert report.failed == sum(1 for t in texts if t.startswith("bad"))
    assert report.succeeded == n - report.failed
    assert report.prompt_tokens == sum(t or 0 for t in table.column("prompt_tokens").to_pylist()) > 0
    assert not list(out.glob(".tmp-*"))
    # the store on the driver: one job (the same one, resumed), every row's result, SQL over it works
    job = _sql(store, "select id, kind, status, total, succeeded, failed, runs from jobs")
    assert job["id"] == failed_job["id"] and job["kind"] == ["ray"] and job["status"] == ["completed"]
    assert job["total"] == [n] and job["succeeded"] == [report.succeeded] and job["failed"] == [report.failed]
    assert job["runs"] == [2]
    breakdown = _sql(store, "select error_type, status_code, n from error_breakdown")
    assert breakdown == {"error_type": ["BadRequestError"], "status_code": [400], "n": [report.failed]}
    stored = _sql(store, "select row_index, response from results order by row_index")
    assert stored["row_index"] == list(range(n)) and stored["response"] == responses
    meta = _sql(store, "select value->>'parquet_glob' as glob from job_meta where key = 'ray'")
    assert _sql(store, f"select count(*) as rows from read_parquet('{meta['glob'][0]}')")["rows"] == [n]
    # a third run finds everything written (the server is gone: nothing may be sent); into a new store and
    # without the outcome files, it records what the part files hold
    shutil.rmtree(out / OUTCOMES_DIR)
    again = run_parquet(tmp_path / "in.parquet", out, options=options, num_actors=2, rows_per_file=10,
                        store=tmp_path / "other.duckdb")
    assert again.chunks_skipped == 12 and again.chunks_written == 0 and again.failed == report.failed
    other = _sql(tmp_path / "other.duckdb", "select status, succeeded, failed from jobs")
    assert other == {"status": ["completed"], "succeeded": [report.succeeded], "failed": [report.failed]}
    assert _sql(tmp_path / "other.duckdb", "select response from results order by row_index")["response"] == responses


def test_dataset_arguments_are_checked_before_anything_runs(ray_cluster: None) -> None:
    ds = ray.data.from_items([{"text": "a"}, {"text": "b"}])
    provider = Provider(provider_type="openai_compatible", model="m", base_url="http://127.0.0.1:9/v1")
    with pytest.raises(ConfigurationError, match="lacks"):
        batch_complete(ds, provider=provider, prompt="{nope}")
    with pytest.raises(ConfigurationError, match="unknown argument"):
        batch_complete(ds, provider=provider, prompt="{text}", temprature=0)
    with pytest.raises(ConfigurationError, match="run_parquet"):
        batch_complete(ds, provider=provider, prompt="{text}", store="jobs.duckdb")
    with pytest.raises(ConfigurationError, match="clashes"):
        batch_complete(ds, provider=provider, prompt="{text}", index_column="text")
    with pytest.raises(ConfigurationError, match="num_cpus"):
        batch_complete(ds, provider=provider, prompt="{text}", num_cpus=0)
