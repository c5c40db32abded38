"""Native batch benchmark: the client's cost of a job sent through a provider batch API, against a bare
baseline measured in the same run.

The fake server runs in its own process (``python -m nagents_frames.testing``), so only the client is
measured. For N requests, two clients do the same work against the same server:

- ``bare``: the least a client can do. It writes the JSONL lines to a file, uploads it with aiohttp,
  creates the batch, polls it, then downloads the output file and ``json.loads`` each line.
- ``native``: :class:`~nagents_frames.native_batch.NativeBatchRunner`, which also does the splitting,
  the ledger, the join by ``custom_id`` and the typed outcomes.

The report gives rows per second for both, their ratio (target: native >= 0.7 x bare), and the
runner's peak traced memory (tracemalloc, in a separate pass) against the bytes it moved.

Run: ``.venv/bin/python benchmarks/bench_native_batch.py [--n 50000] [--kind openai|anthropic]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nagents_frames import Provider
from nagents_frames.executor import PreparedRequest
from nagents_frames.native_batch import NativeBatchRunner
from nagents_frames.testing import server_process


def requests_for(n: int) -> list[PreparedRequest]:
    filler = "lorem ipsum dolor sit amet " * 10
    return [PreparedRequest(i, str(i), "", ({"role": "user", "content": f"{i} {filler}"},)) for i in range(n)]


async def bare_openai(base_url: str, requests: list[PreparedRequest]) -> float:
    """OpenAI Batch by hand, one batch (n <= 50,000). Returns rows per second."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as handle:
        for r in requests:
            body = {"model": "echo", "messages": [dict(m) for m in r.messages or ()]}
            line = {"custom_id": f"r{r.index}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            handle.write(json.dumps(line).encode() + b"\n")
        handle.seek(0)
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer k"}) as session:
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", handle, filename=f"{uuid.uuid4().hex}.jsonl")
            async with session.post(f"{base_url}/files", data=form) as resp:
                file_id = (await resp.json())["id"]
            create = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
            async with session.post(f"{base_url}/batches", json=create) as resp:
                batch = await resp.json()
            while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
                await asyncio.sleep(0.01)
                async with session.get(f"{base_url}/batches/{batch['id']}") as resp:
                    batch = await resp.json()
            answered = 0
            async with session.get(f"{base_url}/files/{batch['output_file_id']}/content") as resp:
                async for line in resp.content:
                    if line.strip():
                        payload = json.loads(line)
                        answered += payload["response"]["status_code"] == 200
    assert answered == len(requests), answered
    return len(requests) / (time.perf_counter() - started)


async def native(base_url: str, kind: str, requests: list[PreparedRequest], *, trace: bool) -> tuple[float, int, int]:
    """The runner; returns rows per second, peak traced bytes (0 unless ``trace``) and bytes moved."""
    provider = Provider(provider_type=kind, model="echo", api_key="k", base_url=base_url)
    job = uuid.uuid4().hex
    async with NativeBatchRunner(provider, poll_interval=0.01, max_poll_interval=0.05) as runner:
        if trace:
            tracemalloc.start()
        started = time.perf_counter()
        answered = 0
        async for _, outcomes in runner.run(job, requests):
            answered += sum(o.error is None for o in outcomes)
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1] if trace else 0
        if trace:
            tracemalloc.stop()
        moved = runner.http.bytes_sent + runner.http.bytes_received
    assert answered == len(requests), answered
    return len(requests) / elapsed, peak, moved


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000, help="requests per run (<= 50,000 for the bare client)")
    parser.add_argument("--kind", default="openai", choices=("openai", "anthropic"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    requests = requests_for(min(args.n, 50_000))
    with server_process() as base_url:
        bare_rates, native_rates = [], []
        for _ in range(args.rounds):
            bare_rates.append(await bare_openai(base_url, requests))
            rate, _, _ = await native(base_url, args.kind, requests, trace=False)
            native_rates.append(rate)
        _, peak, moved = await native(base_url, args.kind, requests, trace=True)
    report = {
        "n": len(requests),
        "kind": args.kind,
        "bare_rows_per_s": round(max(bare_rates)),
        "native_rows_per_s": round(max(native_rates)),
        "ratio": round(max(native_rates) / max(bare_rates), 3),
        "peak_traced_mb": round(peak / 1e6, 1),
        "moved_mb": round(moved / 1e6, 1),
        "peak_over_moved": round(peak / moved, 3),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
