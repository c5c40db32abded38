"""Rate-limit benchmark: sustained throughput against a server that allows R requests a minute.

The fake server runs in a process of its own (``python -m nagents_frames.testing --rpm-limit R``): it
allows R requests in any sliding 60-second window and answers 429 (with ``retry-after`` and
``x-ratelimit-*`` headers) beyond it. An executor sends an endless stream of distinct requests for a
fixed time per scenario; we report

- ``throughput / R``: answered requests per minute over the run, divided by R (target >= 0.9);
- ``429 share``: the share of all requests sent that were answered 429 (target < 2%);
- the peak number of requests in any 60 s window the client sent (must not exceed R much).

Scenarios (each runs ``--seconds``, default 62 s so the server's window really slides):

- ``headers``: no ``rpm`` given; the limiter learns R from the server's ``x-ratelimit-limit-requests``.
- ``rpm``: ``rpm=R`` given, header learning off: the token bucket alone.
- ``reactive`` (not in the default set): neither; only 429 / ``retry-after`` / remaining=0 pauses
  steer. Against a sliding-window server this is bursty by nature (the window rewards bursts).

Run: ``.venv/bin/python benchmarks/bench_ratelimit.py [--rpm 3000] [--seconds 62] [--scenarios headers,rpm]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

from nagents_frames import Provider
from nagents_frames.executor import Executor, PreparedRequest, RetryPolicy
from nagents_frames.ratelimit import RateLimiter
from nagents_frames.testing import server_process


def endless(tag: str, chunk: int = 50) -> Iterator[list[PreparedRequest]]:
    """Distinct requests forever, in chunks."""
    index = 0
    while True:
        batch = []
        for _ in range(chunk):
            text = f"{tag} {index}"
            batch.append(PreparedRequest(index, str(index), f"{tag}-{index}", ({"role": "user", "content": text},)))
            index += 1
        yield batch


def max_in_window(stamps: list[float], window: float) -> int:
    """The most stamps within any ``window`` seconds."""
    best = 0
    start = 0
    for end, t in enumerate(stamps):
        while t - stamps[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


async def run_scenario(name: str, base_url: str, rpm: int, seconds: float, concurrency: int) -> dict[str, Any]:
    """One scenario for ``seconds``; returns its numbers."""
    provider = Provider(provider_type="openai_compatible", model="echo", base_url=base_url)
    if name == "headers":
        limiter = RateLimiter()
    elif name == "rpm":
        limiter = RateLimiter(rpm=rpm, learn_limits=False)
    elif name == "reactive":
        limiter = RateLimiter(learn_limits=False)
    else:
        raise SystemExit(f"unknown scenario {name!r}")
    sent: list[float] = []
    answered = 0

    def on_outcome(outcome: Any) -> None:
        nonlocal answered
        if outcome.error is None:
            answered += 1
            sent.append(time.monotonic())

    retry = RetryPolicy(max_attempts=20, base_delay=0.05, max_delay=2.0)
    started = time.monotonic()
    async with Executor(provider, concurrency=concurrency, limiter=limiter, retry=retry, on_outcome=on_outcome) as ex:

        async def stop_later() -> None:
            await asyncio.sleep(seconds)
            ex.cancel()

        stopper = asyncio.create_task(stop_later())
        async for _requests, _outcomes in ex.run(endless(name)):
            pass
        await stopper
        report = ex.stats.report()
    elapsed = time.monotonic() - started
    rejected = report.statuses.get(429, 0)
    return {
        "scenario": name,
        "R_per_min": rpm,
        "seconds": round(elapsed, 1),
        "answered": answered,
        "requests_sent": report.requests_sent,
        "answered_429": rejected,
        "throughput_per_min": round(answered / elapsed * 60.0, 1),
        "throughput_over_R": round(answered / elapsed * 60.0 / rpm, 3),
        "share_429": round(rejected / max(report.requests_sent, 1), 4),
        "peak_answered_in_60s": max_in_window(sent, 60.0),
        "rate_limit_wait_s": round(report.rate_limit_wait_s, 1),
        "pauses": report.pauses,
        "slowdowns": report.slowdowns,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios and print one JSON line each."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rpm", type=int, default=3000, help="the server's limit R (requests / minute)")
    parser.add_argument("--seconds", type=float, default=62.0, help="duration of each scenario")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--scenarios", default="headers,rpm", help="comma-separated: headers, rpm, reactive")
    args = parser.parse_args(argv)
    ok = True
    for name in args.scenarios.split(","):
        with server_process(rpm_limit=args.rpm) as base_url:
            result = asyncio.run(run_scenario(name.strip(), base_url, args.rpm, args.seconds, args.concurrency))
        result["meets_targets"] = result["throughput_over_R"] >= 0.9 and result["share_429"] < 0.02
        ok = ok and (result["meets_targets"] or name.strip() == "reactive")
        print(json.dumps(result), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
