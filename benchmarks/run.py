"""Core throughput benchmark: ``batch_complete`` against a bare aiohttp + semaphore loop, same run.

The fake server runs in its own process (``python -m nagents_frames.testing``). Each scenario sends the
same requests through both clients, alternating, several rounds; the report is the ratio of the best
rates, so a noisy shared machine affects both sides alike.

Targets (issue "Core"):
- zero latency, 20,000 requests, concurrency 64: batch_complete >= 0.8 x the bare loop;
- 200 ms latency, concurrency 256: >= 0.9 x min(ideal = concurrency / latency, bare loop).

Usage: ``python benchmarks/run.py [--quick] [--json out.json]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import aiohttp
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nagents_frames import Provider, batch_complete
from nagents_frames.testing import server_process


async def bare_loop(base_url: str, n: int, concurrency: int) -> float:
    """The baseline: one session, a semaphore, gather. Returns rows per second."""
    sem = asyncio.Semaphore(concurrency)
    url = f"{base_url}/chat/completions"
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(i: int) -> str:
            async with sem:
                body = {"model": "echo", "messages": [{"role": "user", "content": f"row {i}"}]}
                async with session.post(url, json=body) as resp:
                    data = await resp.json()
                    return str(data["choices"][0]["message"]["content"])

        answers = await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = time.perf_counter() - started
    assert len(answers) == n
    return n / elapsed


def ours(base_url: str, n: int, concurrency: int) -> float:
    """batch_complete over an Arrow table of the same prompts. Returns rows per second."""
    provider = Provider(provider_type="openai_compatible", model="echo", base_url=base_url)
    table = pa.table({"text": [f"row {i}" for i in range(n)]})
    started = time.perf_counter()
    out = batch_complete(table, provider=provider, prompt="{text}", concurrency=concurrency, progress=False)
    elapsed = time.perf_counter() - started
    errors = out.column("error").null_count
    assert errors == n, f"{n - errors} rows failed"
    return n / elapsed


def scenario(name: str, latency: float, n: int, concurrency: int, rounds: int) -> dict[str, float | str]:
    with server_process(latency=latency) as base_url:
        # warm both paths once (connections, imports)
        ours(base_url, min(n, 500), concurrency)
        asyncio.run(bare_loop(base_url, min(n, 500), concurrency))
        bare_rates, our_rates = [], []
        for _ in range(rounds):
            our_rates.append(ours(base_url, n, concurrency))
            bare_rates.append(asyncio.run(bare_loop(base_url, n, concurrency)))
    bare, mine = max(bare_rates), max(our_rates)
    result: dict[str, float | str] = {
        "scenario": name,
        "requests": n,
        "concurrency": concurrency,
        "latency_s": latency,
        "bare_rows_per_s": round(bare, 1),
        "batch_complete_rows_per_s": round(mine, 1),
        "ratio_vs_bare": round(mine / bare, 3),
    }
    if latency:
        ideal = concurrency / latency
        reference = min(ideal, bare)
        result["ideal_rows_per_s"] = round(ideal, 1)
        result["ratio_vs_min_ideal_bare"] = round(mine / reference, 3)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller runs (a smoke test of the harness)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    # 20,000 at 200 ms is ~16 s a pass: long enough that the start-up probe (one round trip) is ~1%
    n0, n1, rounds = (2_000, 1_500, 1) if args.quick else (20_000, 20_000, 3)
    results = [
        scenario("zero latency", 0.0, n0, 64, rounds),
        scenario("200 ms latency", 0.2, n1, 256, rounds),
    ]
    for r in results:
        print(json.dumps(r))
    zero, slow = results
    ok = float(zero["ratio_vs_bare"]) >= 0.8 and float(slow["ratio_vs_min_ideal_bare"]) >= 0.9
    print(f"targets: zero-latency ratio >= 0.8: {zero['ratio_vs_bare']}; "
          f"200 ms ratio >= 0.9: {slow['ratio_vs_min_ideal_bare']} -> {'MET' if ok else 'NOT MET'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
