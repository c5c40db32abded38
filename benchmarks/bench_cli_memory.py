"""Peak memory of ``nagents-frames run`` on a large Parquet input: streaming vs loading the whole input.

A Parquet file of ``--rows`` rows (default 1,000,000) with a wide ``payload`` column (``--payload-bytes`` a
row, not used by the prompt) goes through the real console script against the fake server (its own
process). The peak resident set size of the CLI process is taken from the OS (``wait4`` rusage, i.e. the
kernel's ``ru_maxrss``, collected by a small launcher process) and compared, in the same run, with a process that imports the same modules and
just loads the input with ``pyarrow.parquet.read_table`` (what a non-streaming tool would have to do).

Reported: both peaks, their ratio, the input's size on disk and in memory, rows/s. The claim checked is
that the CLI's peak stays far below the in-memory size of the input (bounded, whatever the row count).

Measured 2026-11-29 on the shared 2-core build machine (load average ~13 from other test runs), 1,000,000
rows, 1 KiB payload a row, 1000 distinct prompts::

    input in memory 999 MB (6.9 MB zstd on disk); import-only process 100 MB
    nagents-frames run: peak RSS 216 MB   (0.16 x loading the input whole: 1345 MB; 0.22 x its size in memory)
    6,600 rows/s end to end (identical prompts are sent once; the rest is the per-row pipeline)

With 150,000 rows of 2 KiB (296 MB in memory) the CLI's peak was 214 MB: the peak depends on the batch
and row-group sizes (about 4 MiB input batches, 16 MiB output row groups), not on the number of rows.

Usage: ``python benchmarks/bench_cli_memory.py [--rows N] [--payload-bytes B] [--distinct D] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nagents_frames.testing import server_process

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "nagents-frames"


def write_input(path: Path, rows: int, payload_bytes: int, distinct: int) -> int:
    """Write the input in row groups of 100k rows; returns its in-memory (Arrow) size in bytes."""
    nbytes = 0
    schema = pa.schema([("id", pa.int64()), ("text", pa.string()), ("payload", pa.string())])
    filler = ("lorem ipsum dolor sit amet " * (payload_bytes // 27 + 1))[: max(payload_bytes - 8, 0)]
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for start in range(0, rows, 100_000):
            stop = min(start + 100_000, rows)
            ids = list(range(start, stop))
            table = pa.table(
                {
                    "id": pa.array(ids, pa.int64()),
                    "text": [f"item {i % distinct}" for i in ids],
                    "payload": [f"{i:08d}{filler}" for i in ids],  # distinct per row: no dictionary trick
                },
                schema=schema,
            )
            nbytes += table.nbytes
            writer.write_table(table)
    return nbytes


# The kernel carries the launching process's peak RSS over into a child's ru_maxrss at exec time, so a
# child started from a big process (pytest, this script after writing the input) would look big. A small
# fresh launcher starts the child and reports the child's own rusage.
_LAUNCHER = """
import json, os, subprocess, sys
report, argv = sys.argv[1], sys.argv[2:]
proc = subprocess.Popen(argv)
_, status, usage = os.wait4(proc.pid, 0)
with open(report, "w") as f:
    json.dump({"code": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss}, f)
"""


def peak_rss_mb(argv: list[str], *, timeout: float = 3600) -> tuple[int, float, float, str]:
    """Run a child; returns (exit status, its peak RSS in MB from the kernel, seconds, stdout)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "rusage.json"
        proc = subprocess.run(
            [sys.executable, "-c", _LAUNCHER, str(report), *argv], stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, cwd=ROOT, timeout=timeout, check=False, text=True,
        )
        usage = json.loads(report.read_text())
    return int(usage["code"]), usage["maxrss_kb"] / 1024, time.perf_counter() - started, proc.stdout


def measure(rows: int, payload_bytes: int, distinct: int, workdir: Path) -> dict[str, object]:
    """One measurement: the CLI streaming the input vs a process loading it whole."""
    src = workdir / "in.parquet"
    dst = workdir / "out.parquet"
    in_memory = write_input(src, rows, payload_bytes, distinct)
    with server_process() as base_url:
        code, cli_peak, seconds, stdout = peak_rss_mb(
            [str(CLI), "run", str(src), str(dst), "--model", "echo", "--base-url", base_url, "--prompt",
             "Classify: {text}", "--json", "--progress-interval", "5"]
        )
    if code != 0:
        raise RuntimeError(f"nagents-frames run exited {code}")
    done = [json.loads(line) for line in stdout.splitlines() if line.strip()][-1]
    assert done["event"] == "done" and done["rows"] == rows, done
    assert pq.ParquetFile(dst).metadata.num_rows == rows
    loader = (
        "import nagents_frames.cli, pyarrow.parquet as pq, sys; "
        "t = pq.read_table(sys.argv[1]); print(t.num_rows)"
    )
    code, load_peak, _, _ = peak_rss_mb([sys.executable, "-c", loader, str(src)])
    assert code == 0
    baseline_code, import_peak, _, _ = peak_rss_mb([sys.executable, "-c", "import nagents_frames.cli"])
    assert baseline_code == 0
    return {
        "rows": rows,
        "payload_bytes": payload_bytes,
        "distinct_prompts": distinct,
        "input_file_mb": round(src.stat().st_size / 2**20, 1),
        "input_in_memory_mb": round(in_memory / 2**20, 1),
        "import_only_peak_rss_mb": round(import_peak, 1),
        "cli_peak_rss_mb": round(cli_peak, 1),
        "load_whole_input_peak_rss_mb": round(load_peak, 1),
        "cli_over_load_whole_ratio": round(cli_peak / load_peak, 3),
        "cli_over_input_in_memory_ratio": round(cli_peak / (in_memory / 2**20), 3),
        "cli_seconds": round(seconds, 1),
        "rows_per_s": round(rows / seconds),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--payload-bytes", type=int, default=1024)
    parser.add_argument("--distinct", type=int, default=1000, help="distinct prompts (identical ones are sent once)")
    parser.add_argument("--json", metavar="FILE", help="also write the report here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nf-bench-cli-") as tmp:
        report = measure(args.rows, args.payload_bytes, args.distinct, Path(tmp))
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
