"""``python -m nagents_frames.testing``: run the fake LLM server as a process (benchmarks, demos)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from dataclasses import fields

from nagents_frames.testing._server import FakeLLMServer, ServerBehavior


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nagents_frames.testing", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-bodies", action="store_true", help="do not keep request bodies (long runs)")
    for f in fields(ServerBehavior):
        if f.type in ("float", "int", "float | None", "int | None"):
            kind = float if "float" in str(f.type) else int
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=None)
    args = parser.parse_args(argv)
    knobs = {
        f.name: getattr(args, f.name)
        for f in fields(ServerBehavior)
        if getattr(args, f.name, None) is not None
    }

    async def serve() -> None:
        server = FakeLLMServer(port=args.port, seed=args.seed, **knobs)
        server.stats.keep_bodies = not args.no_bodies
        await server.astart()
        print(json.dumps({"base_url": server.base_url, "port": server.port}), flush=True)
        # serve until stdin closes or the process is signalled
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)
        await server.astop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
