"""The fake server in a process of its own (benchmarks, and tests that must not share a CPU-bound loop)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator

__all__ = ["server_process"]


@contextlib.contextmanager
def server_process(*, seed: int = 0, keep_bodies: bool = False, **knobs: float | int) -> Iterator[str]:
    """Run ``python -m nagents_frames.testing`` with numeric knobs; yields its base URL.

    The server stops when its standard input closes, which this does on exit (killing it if it lingers).

    >>> with server_process(latency=0.0) as base_url:
    ...     base_url.startswith("http://127.0.0.1:")
    True
    """
    argv = [sys.executable, "-m", "nagents_frames.testing", "--seed", str(seed)]
    if not keep_bodies:
        argv.append("--no-bodies")
    for name, value in knobs.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fake server process exited with {proc.wait(10)} before it served")
        yield str(json.loads(line)["base_url"])
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
