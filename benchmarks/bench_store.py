"""Store benchmark: what the DuckDB store costs a run, and how fast a big job finds what is left to do.

1. Overhead: ``batch_complete`` on the same rows without a store and with one (a DuckDB file, one
   transaction per chunk), alternating, several rounds; the report is the ratio of the best rates, so a
   noisy shared machine affects both sides alike. Target: with a store >= 0.9 x without. Two scenarios,
   as in the core benchmark: zero latency (CPU-bound: the CPU times of the event loop and of the process
   are reported too) and 200 ms latency.
2. Resume lookup: a job of 1,000,000 requests with 99% of them answered; time to open the file and find
   the 10,000 requests without a result (what ``BatchManager.resume`` sends), and the answered row indices
   (what a re-run of ``batch_complete`` skips). Target: < 5 s.

Usage: ``python benchmarks/bench_store.py [--quick] [--json out.json]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nagents_frames import BatchStatus, Provider, batch_complete
from nagents_frames.executor import Outcome, PreparedRequest, outcomes_to_arrow
from nagents_frames.store import REQUEST_SCHEMA, BatchStore, JobRecord
from nagents_frames.testing import server_process


def overhead(n: int, rounds: int, latency: float, concurrency: int) -> dict[str, float]:
    """Best rows/s of batch_complete without and with a store, and their ratio.

    Also the least CPU seconds per run of the event-loop thread (which bounds the rate when the machine has
    a free core for the store thread) and of the whole process: on a crowded machine the wall-clock rate
    mostly measures the share of CPU the process got, the CPU times do not.
    """
    table = pa.table({"text": [f"row {i}" for i in range(n)]})
    best = {"without": 0.0, "with": 0.0}
    rates: dict[str, list[float]] = {"without": [], "with": []}
    loop_cpu = {"without": float("inf"), "with": float("inf")}
    proc_cpu = {"without": float("inf"), "with": float("inf")}
    with server_process(latency=latency) as base_url, tempfile.TemporaryDirectory() as tmp:
        provider = Provider(provider_type="openai_compatible", model="echo", base_url=base_url)
        for r in range(rounds):
            for side in ("without", "with"):
                store = str(Path(tmp) / "bench.duckdb") if side == "with" else None
                started, thread0, proc0 = time.perf_counter(), time.thread_time(), time.process_time()
                out = batch_complete(table, provider=provider, prompt="{text}", concurrency=concurrency,
                                     progress=False, store=store, job_name=f"round-{r}")
                rate = n / (time.perf_counter() - started)
                loop_s, proc_s = time.thread_time() - thread0, time.process_time() - proc0
                assert out.column("error").null_count == n
                best[side] = max(best[side], rate)
                rates[side].append(rate)
                loop_cpu[side] = min(loop_cpu[side], loop_s)
                proc_cpu[side] = min(proc_cpu[side], proc_s)
                print(f"  round {r} {side:>7} store: {rate:8.0f} rows/s  (event-loop CPU {loop_s:.2f} s, "
                      f"process CPU {proc_s:.2f} s)", flush=True)
    return {
        "rate_without": best["without"], "rate_with": best["with"], "ratio": best["with"] / best["without"],
        "median_ratio": statistics.median(rates["with"]) / statistics.median(rates["without"]),
        "loop_cpu_without_s": loop_cpu["without"], "loop_cpu_with_s": loop_cpu["with"],
        "loop_cpu_ratio": loop_cpu["without"] / loop_cpu["with"],
        "process_cpu_without_s": proc_cpu["without"], "process_cpu_with_s": proc_cpu["with"],
        "process_cpu_ratio": proc_cpu["without"] / proc_cpu["with"],
    }


async def build_big_job(path: Path, total: int, done: int) -> str:
    """A job-API job of ``total`` requests, the first ``done`` of them answered."""
    store = await BatchStore(path).initialize()
    job_id = "batch_big"
    step = 100_000
    requests = pa.Table.from_pydict(
        {
            "row_index": list(range(total)),
            "request_id": [f"req-{i}" for i in range(total)],
            "request_key": [f"{i:032x}" for i in range(total)],
            "messages": [f'[{{"role": "user", "content": "Summarize document {i}"}}]' for i in range(total)],
            "params": [None] * total,
            "metadata": [None] * total,
        },
        schema=REQUEST_SCHEMA,
    )
    await store.create_job(JobRecord(id=job_id, kind="requests", status=BatchStatus.PENDING, total=total), requests)
    del requests
    for start in range(0, done, step):
        rows = range(start, min(start + step, done))
        prepared = [PreparedRequest(i, f"req-{i}", f"{i:032x}", None) for i in rows]
        outcomes = [Outcome(response=f"summary {i}", prompt_tokens=12, completion_tokens=30, attempts=1, latency_s=0.4)
                    for i in rows]
        await store.write_results(job_id, [outcomes_to_arrow(prepared, outcomes)])
    await store.close()
    return job_id


async def resume_lookup(path: Path, job_id: str) -> dict[str, float]:
    started = time.perf_counter()
    store = await BatchStore(path).initialize()
    pending = await store.pending_requests(job_id)
    lookup = time.perf_counter() - started
    started = time.perf_counter()
    answered = await store.result_indices(job_id, ok_only=True)
    indices = time.perf_counter() - started
    await store.close()
    return {"pending_rows": pending.num_rows, "answered_rows": len(answered), "open_and_find_pending_s": lookup,
            "answered_indices_s": indices}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller runs")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()
    results: dict[str, object] = {}
    n, rounds = (5_000, 2) if args.quick else (20_000, 3)
    print(f"store overhead: batch_complete, {n} rows, zero latency, concurrency 64", flush=True)
    ov = overhead(n, rounds, 0.0, 64)
    results["overhead"] = ov
    print(f"  rate ratio with/without store: {ov['ratio']:.2f} best, {ov['median_ratio']:.2f} median (target >= 0.9); "
          f"event-loop CPU ratio "
          f"{ov['loop_cpu_ratio']:.2f}; process CPU ratio {ov['process_cpu_ratio']:.2f}", flush=True)
    n_slow = 2_000 if args.quick else 5_000
    print(f"store overhead: batch_complete, {n_slow} rows, 200 ms latency, concurrency 256", flush=True)
    slow = overhead(n_slow, rounds, 0.2, 256)
    results["overhead_200ms"] = slow
    print(f"  rate ratio with/without store: {slow['ratio']:.2f} best, {slow['median_ratio']:.2f} median "
          "(target >= 0.9)", flush=True)
    total = 100_000 if args.quick else 1_000_000
    done = total * 99 // 100
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.duckdb"
        started = time.perf_counter()
        job_id = asyncio.run(build_big_job(path, total, done))
        print(f"resume lookup: built a {total:,}-row job, {done:,} answered, in {time.perf_counter() - started:.1f} s "
              f"({path.stat().st_size / 1e6:.0f} MB)", flush=True)
        lookup = asyncio.run(resume_lookup(path, job_id))
    results["resume"] = {"total": total, "done": done, **lookup}
    print(f"  open + find {lookup['pending_rows']:,} pending rows: {lookup['open_and_find_pending_s']:.2f} s "
          f"(target < 5 s); answered indices: {lookup['answered_indices_s']:.2f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
