"""Ray Data scale-out: throughput with 1 vs 2 actors on a latency-bound workload, same run.

A local Ray cluster (``--cpus``, default 2) and the fake server (in this process's background thread,
so that its arrival timestamps can be read) answering after ``--latency`` seconds (default 0.2).
Each actor keeps ``--concurrency`` requests in flight (default 8), so one actor is bound to about
``concurrency / latency`` rows/s and two actors should reach about twice that: the work waits on the
network, not the CPU, and each actor has its own event loop and HTTP session.

Two rates are reported per setting, best of ``--rounds`` alternating rounds:
- steady: rows / (last request arrival - first arrival + latency), from the server's clock; it leaves
  out the actor pool's start-up, which is a fixed cost per run;
- end-to-end: rows / wall time of the whole ``batch_complete(ds, ...)`` run, start-up included.

The same rows through the in-process ``batch_complete`` (one executor, same concurrency) are the
baseline that one actor should match. Ratios are computed within the run (a noisy shared machine
affects both sides alike).

Usage: ``python benchmarks/bench_ray.py [--rows N] [--latency S] [--concurrency C] [--rounds R] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa

from nagents_frames import Provider, batch_complete
from nagents_frames.testing import FakeLLMServer


def steady_rate(server: FakeLLMServer, rows: int, latency: float) -> float:
    arrivals = server.stats.arrivals
    return rows / (max(arrivals) - min(arrivals) + latency)


def run_ray(ray: Any, server: FakeLLMServer, provider: Provider, rows: int, actors: int, args: argparse.Namespace,
            tag: str) -> dict[str, float]:
    server.reset_stats()
    # distinct prompts per run, in enough blocks for every actor to get work
    ds = ray.data.from_items([{"text": f"{tag} row {i}"} for i in range(rows)],
                             override_num_blocks=max(rows // args.rows_per_task, 1))
    started = time.perf_counter()
    out = batch_complete(ds, provider=provider, prompt="Summarize: {text}", num_actors=actors,
                         concurrency=args.concurrency, chunk_size=25, rows_per_task=args.rows_per_task)
    table = pa.concat_tables(out.iter_batches(batch_format="pyarrow", batch_size=None))
    wall = time.perf_counter() - started
    assert table.num_rows == rows and table.column("error").null_count == rows, "every row must succeed"
    assert server.stats.requests == rows
    return {"steady_rows_per_s": steady_rate(server, rows, args.latency), "end_to_end_rows_per_s": rows / wall,
            "wall_s": wall}


def run_local(server: FakeLLMServer, provider: Provider, rows: int, args: argparse.Namespace,
              tag: str) -> dict[str, float]:
    server.reset_stats()
    table = pa.table({"text": [f"{tag} row {i}" for i in range(rows)]})
    started = time.perf_counter()
    out = batch_complete(table, provider=provider, prompt="Summarize: {text}", concurrency=args.concurrency,
                         chunk_size=25, progress=False)
    wall = time.perf_counter() - started
    assert out.column("error").null_count == rows
    return {"steady_rows_per_s": steady_rate(server, rows, args.latency), "end_to_end_rows_per_s": rows / wall,
            "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=800)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight per actor")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rows-per-task", type=int, default=100,
                        help="rows per Ray task; an actor idles during the last round trip of each task")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results: dict[str, list[dict[str, float]]] = {"local": [], "1 actor": [], "2 actors": []}
    try:
        with FakeLLMServer(latency=args.latency) as server:
            server.stats.keep_bodies = False
            provider = Provider(provider_type="openai_compatible", model="echo", base_url=server.base_url)
            for round_no in range(args.rounds):
                results["local"].append(run_local(server, provider, args.rows, args, f"r{round_no}l"))
                results["1 actor"].append(run_ray(ray, server, provider, args.rows, 1, args, f"r{round_no}a"))
                results["2 actors"].append(run_ray(ray, server, provider, args.rows, 2, args, f"r{round_no}b"))
    finally:
        ray.shutdown()

    best = {name: {k: max(r[k] for r in runs) for k in ("steady_rows_per_s", "end_to_end_rows_per_s")}
            for name, runs in results.items()}
    ideal = args.concurrency / args.latency
    report = {
        "rows": args.rows, "rows_per_task": args.rows_per_task, "latency_s": args.latency, "concurrency_per_actor": args.concurrency,
        "ideal_rows_per_s_per_actor": ideal, "best": best, "runs": results,
        "ratio_2_vs_1_steady": best["2 actors"]["steady_rows_per_s"] / best["1 actor"]["steady_rows_per_s"],
        "ratio_2_vs_1_end_to_end": best["2 actors"]["end_to_end_rows_per_s"] / best["1 actor"]["end_to_end_rows_per_s"],
        "ratio_1_actor_vs_local_steady": best["1 actor"]["steady_rows_per_s"] / best["local"]["steady_rows_per_s"],
    }
    print(f"rows={args.rows} latency={args.latency}s concurrency/actor={args.concurrency} "
          f"(ideal {ideal:.0f} rows/s per actor)")
    for name, rates in best.items():
        print(f"  {name:9s} steady {rates['steady_rows_per_s']:7.1f} rows/s   "
              f"end-to-end {rates['end_to_end_rows_per_s']:7.1f} rows/s")
    print(f"  2 vs 1 actors: steady x{report['ratio_2_vs_1_steady']:.2f}, "
          f"end-to-end x{report['ratio_2_vs_1_end_to_end']:.2f}; "
          f"1 actor vs in-process: x{report['ratio_1_actor_vs_local_steady']:.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
