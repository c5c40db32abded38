"""The main job end to end on the embedded defaults: ``make demo`` / ``python -m nagents_frames.demo``.

It builds a small table of product reviews, starts the fake OpenAI-compatible server on 127.0.0.1
(no key, no network), completes every row with ``batch_complete``, records the job in a DuckDB store,
answers a SQL question about it, and writes the result to Parquet.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import polars as pl

from nagents_frames.frames import batch_complete
from nagents_frames.providers import Provider
from nagents_frames.testing import FakeLLMServer

REVIEWS: list[tuple[str, str | None]] = [
    ("B001", "The battery lasts two days and the screen is bright."),
    ("B002", "Stopped working after a week; support never answered."),
    ("B003", "Decent sound for the price, a little heavy."),
    ("B004", "Exactly as described, arrived early."),
    ("B005", "The lid cracked the first time I dropped it."),
    ("B006", "My kids love it and it survived the beach."),
    ("B007", None),
    ("B008", "Setup took five minutes; the app is clear."),
]


def sample_table() -> pl.DataFrame:
    """The demo's input: product reviews (one missing on purpose: it becomes that row's error)."""
    return pl.DataFrame({"sku": [s for s, _ in REVIEWS], "review": [r for _, r in REVIEWS]})


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m nagents_frames.demo", description=__doc__)
    parser.add_argument("--out", default="demo-output", help="folder for the Parquet output and the store")
    parser.add_argument("--local", action="store_true", help="answer with the local model (needs the [local] extra)")
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    df = sample_table()
    print(f"input: {df.height} reviews")

    if args.local:
        return _run_local(df, out_dir)

    # every first attempt of a prompt fails with a 503 (retried), and one review is refused for good (400)
    with FakeLLMServer(latency=0.05, fail_first=1, error_on_content={"cracked": 400}) as server:
        provider = Provider(provider_type="openai_compatible", model="echo", base_url=server.base_url)
        store_path = out_dir / "jobs.duckdb"
        started = time.perf_counter()
        kwargs: dict[str, object] = {"store": str(store_path), "job_name": "demo-reviews"} if _has_store() else {}
        result = df.pipe(
            batch_complete,
            provider=provider,
            prompt="Classify the sentiment of this review as positive or negative: {review}",
            system="You are a terse product analyst.",
            usage=True,
            concurrency=8,
            progress=False,
            **kwargs,
        )
        elapsed = time.perf_counter() - started
        print(f"fake server saw {server.stats.requests} requests ({dict(server.stats.by_status)})")

    answered = result.filter(pl.col("error").is_null()).height
    print(f"completed {result.height} rows in {elapsed:.2f}s: {answered} answered, {result.height - answered} errors")
    with pl.Config(fmt_str_lengths=60, tbl_width_chars=140):
        print(result.select("sku", "response", "error", "attempts"))
    path = out_dir / "reviews_completed.parquet"
    result.write_parquet(path)
    print(f"wrote {path}")
    if kwargs:
        from nagents_frames.store import BatchStore

        store = BatchStore(store_path, read_only=True)
        try:
            print(store.sql("select id, status, total, succeeded, failed from jobs order by created_at"))
        finally:
            asyncio.run(store.close())
    if result.height != df.height or answered == 0:
        print("demo failed: rows were lost or nothing was answered", file=sys.stderr)
        return 1
    return 0


def _has_store() -> bool:
    try:
        import nagents_frames.manager
        import nagents_frames.store  # noqa: F401
    except ImportError:
        return False
    return True


def _run_local(df: pl.DataFrame, out_dir: Path) -> int:
    provider = Provider(provider_type="local", model="gemma-3-270m", temperature=0.0, seed=0, max_tokens=4)
    examples = [
        ("Review: I love it, works perfectly.\nSentiment:", " positive"),
        ("Review: Broke on day one, waste of money.\nSentiment:", " negative"),
    ]
    result = df.filter(pl.col("review").is_not_null()).pipe(
        batch_complete,
        provider=provider,
        prompt="Review: {review}\nSentiment:",
        examples=examples,
        usage=True,
        concurrency=1,
        progress=False,
    )
    with pl.Config(fmt_str_lengths=60, tbl_width_chars=140):
        print(result.select("sku", "review", "response", "error"))
    path = out_dir / "reviews_local.parquet"
    result.write_parquet(path)
    print(f"wrote {path}")
    return 0 if result["error"].null_count() == result.height else 1


if __name__ == "__main__":
    raise SystemExit(main())
