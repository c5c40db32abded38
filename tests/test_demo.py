"""`make demo` runs the main job end to end: the demo module through its real entry point."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "nagents_frames.demo", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    result = pl.read_parquet(tmp_path / "reviews_completed.parquet")
    assert result.height == 8
    assert result.columns[:2] == ["sku", "review"]
    by_sku = {row["sku"]: row for row in result.iter_rows(named=True)}
    assert by_sku["B001"]["response"].startswith("echo: Classify the sentiment")
    assert by_sku["B005"]["error"].startswith("BadRequestError 400")
    assert by_sku["B007"]["error"].startswith("PromptError")
    assert (tmp_path / "jobs.duckdb").exists()
    assert "completed" in out.stdout
