"""The DuckDB store: schema and migrations, bad paths, locks, chunk writes (atomic, upserted, counted),
SQL and views, secrets, and the room left for provider batch ids."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nagents_frames import BatchManager, BatchRequest, BatchStatus, Provider
from nagents_frames.errors import JobNotFoundError, SchemaVersionError, StoreError, StoreLockedError
from nagents_frames.executor import OUTCOME_SCHEMA, Outcome, PreparedRequest, outcomes_to_arrow
from nagents_frames.store import _MIGRATIONS, SCHEMA_VERSION, BatchStore, JobRecord
from nagents_frames.testing import FakeLLMServer


def chunk(rows: list[tuple[int, str | None, str | None]], tokens: int = 1) -> pa.Table:
    """A result chunk: (row_index, response, error) triples."""
    requests = [PreparedRequest(i, f"id-{i}", f"key-{i}", None) for i, _, _ in rows]
    outcomes = [
        Outcome(response=r, error=e, error_type="ServerError" if e else None, status_code=500 if e else None,
                prompt_tokens=tokens, completion_tokens=tokens, attempts=1, latency_s=0.1)
        for _, r, e in rows
    ]
    return outcomes_to_arrow(requests, outcomes)


async def new_job(store: BatchStore, job_id: str = "job-1", total: int = 10) -> None:
    await store.create_job(JobRecord(id=job_id, kind="requests", status=BatchStatus.PENDING, total=total, owner="me"))


async def test_initialize_is_idempotent_and_versions_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "jobs.duckdb"
    store = BatchStore(path)
    assert await store.initialize() is store
    await store.initialize()
    await store.close()
    store = await BatchStore(path).initialize()  # reopening an existing file does not migrate again
    versions = store.sql("select version from schema_version order by version")["version"].to_list()
    assert versions == list(range(1, SCHEMA_VERSION + 1))
    names = set(store.sql("select table_name from information_schema.tables")["table_name"].to_list())
    assert {"jobs", "requests", "results", "native_batches", "job_meta", "job_counts", "error_breakdown",
            "token_totals"} <= names
    await store.close()
    # the file opens in plain DuckDB, read-only
    con = duckdb.connect(str(path), read_only=True)
    assert con.execute("select count(*) from jobs").fetchone() == (0,)
    con.close()


async def test_migrates_an_older_file(tmp_path: Path) -> None:
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    BatchStore._apply_migrations(con, 0, 1)  # a file written by the release with schema 1
    con.execute(
        "insert into jobs (id, kind, mode, status, total, created_at, updated_at) "
        "values ('old', 'requests', 'realtime', 'completed', 1, now()::timestamp, now()::timestamp)"
    )
    con.close()
    store = await BatchStore(path).initialize()
    assert store.sql("select max(version) as v from schema_version")["v"][0] == SCHEMA_VERSION
    assert store.sql("select job_id, total, remaining from job_counts").to_dicts() == [
        {"job_id": "old", "total": 1, "remaining": 1}
    ]
    assert (await store.get_job("old")).status is BatchStatus.COMPLETED
    await store.close()
    assert set(_MIGRATIONS) == set(range(1, SCHEMA_VERSION + 1))


async def test_newer_schema_and_bad_paths_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.duckdb"
    store = await BatchStore(path).initialize()
    store.sql("insert into schema_version values (99, now()::timestamp, 'from the future')")
    await store.close()
    with pytest.raises(SchemaVersionError, match="99"):
        await BatchStore(path).initialize()
    with pytest.raises(StoreError, match="directory"):
        await BatchStore(tmp_path).initialize()
    a_file = tmp_path / "plain.txt"
    a_file.write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        await BatchStore(a_file / "jobs.duckdb").initialize()
    garbage = tmp_path / "garbage.duckdb"
    garbage.write_bytes(b"not a database" * 500)
    with pytest.raises(StoreError, match=r"garbage\.duckdb") as info:
        await BatchStore(garbage, lock_timeout=0.2).initialize()
    assert not isinstance(info.value, StoreLockedError)
    with pytest.raises(StoreError, match="does not exist"):
        await BatchStore(tmp_path / "missing.duckdb", read_only=True).initialize()


def test_second_writer_gets_store_locked_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "held.duckdb"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('held', flush=True); time.sleep(60)",
         str(path)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreLockedError, match=r"held\.duckdb.*locked by another process"):
            asyncio.run(BatchStore(path, lock_timeout=0.3).initialize())
    finally:
        holder.kill()
        holder.wait(30)
    asyncio.run(BatchStore(path).initialize())  # free again once the other writer is gone


async def test_chunks_upsert_and_keep_counters_exact() -> None:
    store = await BatchStore().initialize()
    await new_job(store)
    status = await store.write_results("job-1", [chunk([(0, "a", None), (1, None, "E: boom"), (2, "c", None)])])
    assert status is BatchStatus.PENDING
    # a request that ran twice (and a retried error that now succeeded) is recorded once
    await store.write_results("job-1", [chunk([(1, "b", None), (2, "c2", None), (3, None, "E: x")], tokens=2)])
    job = await store.get_job("job-1")
    assert (job.succeeded, job.failed) == (3, 1)
    assert (job.prompt_tokens, job.completion_tokens) == (1 + 2 + 2 + 2, 1 + 2 + 2 + 2)
    table = await store.results("job-1")
    assert table.schema == OUTCOME_SCHEMA
    assert table.column("response").to_pylist() == ["a", "b", "c2", None]
    assert (await store.result_indices("job-1", ok_only=True)).to_pylist() == [0, 1, 2]
    finished = await store.finish_job("job-1", status=None, from_statuses=(BatchStatus.PENDING,), otherwise=None)
    assert finished.status is BatchStatus.PENDING  # 4 of 10 have results: not complete
    counts = store.sql("select * from job_counts").to_dicts()[0]
    assert (counts["done"], counts["succeeded"], counts["failed"], counts["remaining"]) == (4, 3, 1, 6)
    errors = store.sql("select error_type, status_code, n from error_breakdown").to_dicts()
    assert errors == [{"error_type": "ServerError", "status_code": 500, "n": 1}]
    tokens = store.sql("select prompt_tokens, total_tokens from token_totals").to_dicts()
    assert tokens == [{"prompt_tokens": 7, "total_tokens": 14}]
    await store.close()


async def test_a_failing_chunk_is_not_half_written() -> None:
    store = await BatchStore().initialize()
    await new_job(store)
    await store.write_results("job-1", [chunk([(0, "a", None)])])
    broken = chunk([(5, "x", None), (6, "y", None), (5, "again", None)])  # one row twice
    with pytest.raises(StoreError, match="twice"):
        await store.write_results("job-1", [broken])
    # the rows go in before the job's counters: a job that is gone rolls the whole chunk back
    with pytest.raises(JobNotFoundError, match="nothing was written"):
        await store.write_results("no-such-job", [chunk([(1, "x", None), (2, "y", None)])])
    assert store.sql("select count(*) as n from results where job_id = 'no-such-job'")["n"][0] == 0
    assert (await store.result_indices("job-1")).to_pylist() == [0]
    job = await store.get_job("job-1")
    assert (job.succeeded, job.failed) == (1, 0)
    await store.write_results("job-1", [chunk([(5, "x", None)])])  # the store is still usable
    assert (await store.result_indices("job-1")).to_pylist() == [0, 5]
    await store.close()


@settings(max_examples=15, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 30), st.booleans()), max_size=12, unique_by=lambda t: t[0]),
                max_size=8))
def test_counters_match_the_rows_whatever_is_rewritten(chunks: list[list[tuple[int, bool]]]) -> None:
    async def scenario() -> None:
        store = await BatchStore().initialize()
        await new_job(store, total=31)
        final: dict[int, bool] = {}
        for rows in chunks:
            await store.write_results("job-1", [chunk([(i, None if bad else f"r{i}", "E: x" if bad else None)
                                                       for i, bad in rows])])
            final.update(dict(rows))
        job = await store.get_job("job-1")
        assert job.succeeded == sum(1 for bad in final.values() if not bad)
        assert job.failed == sum(1 for bad in final.values() if bad)
        assert (await store.result_indices("job-1")).to_pylist() == sorted(final)
        await store.close()

    asyncio.run(scenario())


async def test_sql_returns_polars_or_arrow_and_job_rows_round_trip() -> None:
    store = await BatchStore().initialize()
    await store.create_job(JobRecord(id="j", kind="requests", status=BatchStatus.PENDING, total=2, name="n",
                                     provider="openai", model="m", parameters={"temperature": 0}))
    df = store.sql("select id, name, status, parameters->>'temperature' as t from jobs")
    assert isinstance(df, pl.DataFrame) and df.to_dicts() == [{"id": "j", "name": "n", "status": "pending", "t": "0"}]
    table = store.sql("select id from jobs where id = ?", params=["j"], arrow=True)
    assert isinstance(table, pa.Table) and table.to_pydict() == {"id": ["j"]}
    job = (await store.get_job("j")).to_job()
    assert job.name == "n" and job.created_at is not None and job.created_at.tzinfo is UTC
    assert abs((datetime.now(UTC) - job.created_at).total_seconds()) < 60
    assert [r.id for r in await store.list_jobs()] == ["j"]
    with pytest.raises(JobNotFoundError, match="nope"):
        await store.get_job("nope")
    with pytest.raises(StoreError, match="already exists"):
        await store.create_job(JobRecord(id="j", kind="requests", status=BatchStatus.PENDING))
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.get_job("j")


async def test_claims_are_exclusive_and_status_moves_are_guarded() -> None:
    store = await BatchStore().initialize()
    await new_job(store)
    assert await store.claim_job("job-1", "a", expected_owner="me", from_statuses=(BatchStatus.PENDING,))
    assert not await store.claim_job("job-1", "b", expected_owner="me", from_statuses=(BatchStatus.PROCESSING,))
    assert await store.heartbeat("job-1", "a") is BatchStatus.PROCESSING
    assert await store.set_status("job-1", BatchStatus.CANCELLED, from_statuses=(BatchStatus.PROCESSING,))
    assert not await store.set_status("job-1", BatchStatus.COMPLETED, from_statuses=(BatchStatus.PROCESSING,))
    job = await store.get_job("job-1")
    assert job.status is BatchStatus.CANCELLED and job.finished_at is not None
    await store.close()


async def test_native_batch_ledger_and_job_meta() -> None:
    from nagents_frames.native_batch._base import NativeBatchRecord, RecordPhase

    store = await BatchStore().initialize()
    await new_job(store)
    record = NativeBatchRecord(job_id="job-1", part=0, provider="openai", ranges=((0, 5), (7, 9)), request_count=7)
    store.save_native_batch(record)
    store.save_native_batch(record.evolve(phase=RecordPhase.SUBMITTED, batch_id="batch_abc", state="in_progress"))
    [saved] = store.native_batches("job-1")
    assert saved.batch_id == "batch_abc" and saved.phase is RecordPhase.SUBMITTED and saved.row_indices()[-1] == 8
    assert store.native_batches("other") == []
    await store.set_meta("job-1", "cursor", {"page": 3})
    assert await store.get_meta("job-1") == {"cursor": {"page": 3}}
    await store.close()


async def test_secrets_never_reach_the_file(tmp_path: Path) -> None:
    secret = "sk-very-secret-key-123"
    path = tmp_path / "secret.duckdb"
    with FakeLLMServer(api_key=secret) as server:
        provider = Provider(provider_type="openai_compatible", model="echo", base_url=server.base_url, api_key=secret)
        store = await BatchStore(path).initialize()
        async with BatchManager(provider=provider, store=store) as manager:
            job = await manager.submit([BatchRequest(id="a", messages=[{"role": "user", "content": "hi"}])])
            assert (await manager.wait(job.id, timeout=30)).status is BatchStatus.COMPLETED
        wrong = Provider(provider_type="openai_compatible", model="echo", base_url=server.base_url,
                         api_key="sk-wrong-secret-456")
        async with BatchManager(provider=wrong, store=store) as manager:
            job = await manager.submit([BatchRequest(id="a", messages=[{"role": "user", "content": "hi"}])])
            assert (await manager.wait(job.id, timeout=30)).status is BatchStatus.FAILED
        params = store.sql("select parameters::varchar as p from jobs")["p"].to_list()
        assert all("echo" in p and "api_key" not in p for p in params)
        await store.close()
    data = path.read_bytes() + (Path(f"{path}.wal").read_bytes() if Path(f"{path}.wal").exists() else b"")
    assert secret.encode() not in data and b"sk-wrong-secret-456" not in data
    assert os.path.getsize(path) > 0
