"""Crash and concurrency proofs with real processes: a job SIGKILLed halfway resumes without paying twice,
and another process reads the store file while a job writes it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from nagents_frames import BatchManager, BatchRequest, BatchStatus, BatchStore, Provider
from nagents_frames.testing import FakeLLMServer

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import asyncio, sys
from pathlib import Path
from nagents_frames import BatchManager, BatchRequest, BatchStore, Provider

async def main(path: str, base_url: str, n: int) -> None:
    store = BatchStore(Path(path))
    await store.initialize()
    provider = Provider(provider_type="openai_compatible", model="echo", base_url=base_url, api_key="sk-child-secret")
    manager = BatchManager(provider=provider, store=store, concurrency=8, chunk_size=100, heartbeat_interval=0.5)
    requests = [BatchRequest(id=f"r{i}", messages=[{"role": "user", "content": f"row {i}"}]) for i in range(n)]
    job = await manager.submit(requests, name="crash-me")
    print(job.id, flush=True)
    final = await manager.wait(job.id)
    print(final.status.value, flush=True)
    await manager.close()
    await store.close()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


def _spawn(tmp_path: Path, store: Path, base_url: str, n: int) -> subprocess.Popen[str]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, str(script), str(store), base_url, str(n)], stdout=subprocess.PIPE, text=True, env=env
    )


def _read_count(path: Path, job_id: str) -> int:
    """Count the job's results with plain DuckDB, read-only, retrying while the writer holds the file."""
    deadline = time.monotonic() + 30
    while True:
        try:
            con = duckdb.connect(str(path), read_only=True)
        except duckdb.IOException:
            assert time.monotonic() < deadline, "the writer never let go of the file"
            time.sleep(0.02)
            continue
        try:
            row = con.execute("select count(*) from results where job_id = ?", [job_id]).fetchone()
            return int(row[0]) if row else 0
        finally:
            con.close()


@pytest.mark.timeout(180)
def test_sigkill_halfway_then_resume_sends_only_missing_rows(tmp_path: Path) -> None:
    n = 2000
    path = tmp_path / "crash.duckdb"
    with FakeLLMServer(latency=0.01) as server:
        child = _spawn(tmp_path, path, server.base_url, n)
        try:
            assert child.stdout is not None
            job_id = child.stdout.readline().strip()
            assert job_id.startswith("batch_")
            deadline = time.monotonic() + 90
            while (done := _read_count(path, job_id)) < n // 3:
                assert time.monotonic() < deadline, f"only {done} rows after 90 s"
                assert child.poll() is None, "the job process ended before it was killed"
                time.sleep(0.05)
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait(30)  # reap it: a zombie's pid would still look alive
        assert child.returncode == -signal.SIGKILL
        snapshot = server.stats.prompts.copy()

        async def restart() -> None:
            store = await BatchStore(path).initialize()
            crashed = await store.get_job(job_id)
            assert crashed.status is BatchStatus.PROCESSING
            committed = set((await store.result_indices(job_id)).to_pylist())
            assert n // 3 <= len(committed) < n
            assert all(snapshot[f"row {i}"] >= 1 for i in committed)
            provider = Provider(provider_type="openai_compatible", model="echo", base_url=server.base_url)
            async with BatchManager(provider=provider, store=store, concurrency=16, chunk_size=250) as manager:
                resumed = await manager.resume_all()
                assert [j.id for j in resumed] == [job_id]
                final = await manager.wait(job_id, timeout=120)
                assert final.status is BatchStatus.COMPLETED
                assert (final.total, final.succeeded, final.failed) == (n, n, 0)
                results = await manager.get_results(job_id)
            assert [r.id for r in results] == [f"r{i}" for i in range(n)]
            assert all(r.response == f"echo: row {i}" for i, r in enumerate(results))
            # no committed row was sent again; every other row was sent (again) at least once
            for i in range(n):
                count = server.stats.prompts[f"row {i}"]
                if i in committed:
                    assert count == snapshot[f"row {i}"], f"row {i} was committed but sent again"
                else:
                    assert count >= 1
            resent = sum(server.stats.prompts[f"row {i}"] - snapshot.get(f"row {i}", 0) for i in range(n))
            assert resent >= n - len(committed)
            assert store.sql("select count(*) as n from results")["n"][0] == n
            await store.close()

        asyncio.run(restart())
    # the API key of the crashed process never reached the file
    assert b"sk-child-secret" not in path.read_bytes()


@pytest.mark.timeout(180)
def test_other_process_reads_while_job_writes(tmp_path: Path) -> None:
    n = 800
    path = tmp_path / "busy.duckdb"
    with FakeLLMServer(latency=0.01) as server:
        child = _spawn(tmp_path, path, server.base_url, n)
        try:
            assert child.stdout is not None
            job_id = child.stdout.readline().strip()
            seen: list[int] = []
            deadline = time.monotonic() + 90
            while child.poll() is None and time.monotonic() < deadline:
                seen.append(_read_count(path, job_id))
                reader = BatchStore(path, read_only=True)
                status = reader.sql("select status from jobs where id = $1", params=[job_id])["status"][0]
                asyncio.run(reader.close())
                assert status in ("pending", "processing", "completed")
                time.sleep(0.05)
            out, _ = child.communicate(timeout=60)
        finally:
            child.kill()
            child.wait(30)
    assert child.returncode == 0 and out.strip() == "completed"
    assert len([c for c in seen if 0 < c < n]) >= 3, seen  # we read it while it was half-written
    assert seen == sorted(seen)
    assert _read_count(path, job_id) == n


HOLDER = """
import duckdb, sys, time
deadline = time.monotonic() + 60
while True:  # the job's writer lets go of the file between writes: take it then, and keep it
    try:
        con = duckdb.connect(sys.argv[1])
        break
    except duckdb.IOException:
        assert time.monotonic() < deadline
        time.sleep(0.002)
print("held", flush=True)
time.sleep(60)
"""


@pytest.mark.timeout(180)
async def test_store_becoming_unwritable_fails_the_job(tmp_path: Path) -> None:
    path = tmp_path / "taken.duckdb"
    async with FakeLLMServer(latency=0.02) as server:
        provider = Provider(provider_type="openai_compatible", model="echo", base_url=server.base_url)
        store = await BatchStore(path, lock_timeout=0.5).initialize()
        manager = BatchManager(provider=provider, store=store, concurrency=4, chunk_size=20)
        job = await manager.submit([BatchRequest(id=f"r{i}", messages=[{"role": "user", "content": f"x {i}"}])
                                    for i in range(1000)])
        while (await manager.get_job(job.id)).done < 40:
            await asyncio.sleep(0.02)
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None
            line = await asyncio.to_thread(holder.stdout.readline)
            assert line.strip() == "held"
            final = await manager.wait(job.id, timeout=60)
            assert final.status is BatchStatus.FAILED
            assert final.error is not None and "StoreLockedError" in final.error and "taken.duckdb" in final.error
            assert await manager.get_status(job.id) is BatchStatus.FAILED
        finally:
            holder.kill()
            holder.wait(30)
        await manager.close()
        # the file is fine once the other writer is gone; what was committed is there, and resume finishes it
        async with BatchManager(provider=provider, store=store, concurrency=16, chunk_size=500) as again:
            await again.resume(job.id)
            done = await again.wait(job.id, timeout=120)
            assert done.status is BatchStatus.COMPLETED and done.succeeded == 1000
        await store.close()


def test_owner_liveness() -> None:
    from datetime import timedelta

    from nagents_frames.manager import _HOST, owner_alive
    from nagents_frames.store import utcnow

    now = utcnow()
    fresh, stale = now - timedelta(seconds=1), now - timedelta(seconds=100)
    assert owner_alive("elsewhere:123:abc", fresh, stale_after=30, now=now)
    assert not owner_alive("elsewhere:123:abc", stale, stale_after=30, now=now)
    assert not owner_alive("elsewhere:123:abc", None, stale_after=30, now=now)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert not owner_alive(f"{_HOST}:{dead.stdout.strip()}:abc", fresh, stale_after=30, now=now)
    assert owner_alive(f"{_HOST}:{os.getppid()}:abc", fresh, stale_after=30, now=now)
    assert not owner_alive(f"{_HOST}:{os.getpid()}:closed-manager", fresh, stale_after=30, now=now)
