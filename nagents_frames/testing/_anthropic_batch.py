"""Fake-server routes for Anthropic Message Batches: ``/v1/messages/batches`` create / get / cancel / list
and the results stream.

The create body (up to 256 MB) is written to disk as it arrives and read back one request at a time, and
the results are streamed from disk in a shuffled order: a test can send 100,000 requests without the
server holding them in memory. The knobs are those of the OpenAI batch routes
(:func:`~nagents_frames.testing._openai_batch.configure_batches`): ``in_progress_polls``,
``finalizing_polls`` (more ``in_progress`` polls: this API has no finalizing state), ``cancel_polls``,
``expire_batches``, ``keep_fraction``, ``shuffle``, ``fail_create``.

>>> from nagents_frames.testing import FakeLLMServer
>>> from nagents_frames.testing._openai_batch import batch_stats
>>> with FakeLLMServer() as s:
...     batch_stats(s).uploads
0
"""

from __future__ import annotations

import asyncio
import codecs
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from nagents_frames.testing._anthropic import anthropic_error
from nagents_frames.testing._openai_batch import (
    SimBatch,
    advance,
    batch_stats,
    chat_answer,
    stream_body_to,
    write_results,
)
from nagents_frames.testing._server import FakeLLMServer

__all__ = ["install", "iter_json_array_items"]

ANTHROPIC_MAX_REQUESTS = 100_000
ANTHROPIC_MAX_BYTES = 256 * 1024 * 1024

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 529: "overloaded_error"}


def iter_json_array_items(path: Path, key: str = "requests") -> Iterator[Any]:
    """The items of the array ``key`` of a JSON object in a file, decoded one at a time.

    Reads in pieces and decodes each item as soon as it is complete, so memory holds one item (and one
    read block), never the whole document.
    """
    decoder = json.JSONDecoder()
    incremental = codecs.getincrementaldecoder("utf-8")()
    buffer = ""
    pos = 0
    started = False
    with path.open("rb") as handle:
        eof = False
        while True:
            if not eof:
                block = handle.read(256 * 1024)
                eof = not block
                buffer = buffer[pos:] + incremental.decode(block, final=eof)
                pos = 0
            if not started:
                marker = buffer.find(f'"{key}"')
                bracket = buffer.find("[", marker) if marker >= 0 else -1
                if bracket < 0:
                    if eof:
                        raise ValueError(f"no {key!r} array in the body")
                    continue
                pos = bracket + 1
                started = True
            while True:
                while pos < len(buffer) and buffer[pos] in " \t\r\n,":
                    pos += 1
                if pos < len(buffer) and buffer[pos] == "]":
                    return
                if pos >= len(buffer):
                    break
                try:
                    item, end = decoder.raw_decode(buffer, pos)
                except ValueError:
                    if eof:
                        raise
                    break  # incomplete: read more
                yield item
                pos = end
            if eof:
                raise ValueError("the requests array is not closed")


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _batch_json(server: FakeLLMServer, batch: SimBatch) -> dict[str, Any]:
    ended = batch.phase in ("completed", "expired", "cancelled")
    processing = 0 if ended else batch.count
    status = "ended" if ended else ("canceling" if batch.cancelled else "in_progress")
    return {
        "id": batch.id,
        "type": "message_batch",
        "processing_status": status,
        "request_counts": {
            "processing": processing,
            "succeeded": batch.succeeded,
            "errored": batch.failed,
            "canceled": batch.unrun if batch.cancelled else 0,
            "expired": batch.unrun if not batch.cancelled else 0,
        },
        "ended_at": _iso(batch.ended_at),
        "created_at": _iso(batch.created_at),
        "expires_at": _iso(batch.created_at + 86400),
        "archived_at": None,
        "cancel_initiated_at": _iso(batch.created_at) if batch.cancelled else None,
        "results_url": f"{server.base_url}/messages/batches/{batch.id}/results" if ended else None,
    }


def _to_chat(params: Any) -> Any:
    """The Messages ``params`` as a chat body, so the shared answer rules apply."""
    if not isinstance(params, dict) or not isinstance(params.get("messages"), list) or "max_tokens" not in params:
        return None
    return {"model": params.get("model"), "messages": params["messages"], "max_tokens": params.get("max_tokens")}


def _line(server: FakeLLMServer, item: dict[str, Any], custom_id: str | None) -> tuple[bytes, bool]:
    status, body, prompt = chat_answer(server, _to_chat(item.get("params")))
    if server.stats.keep_bodies:  # long runs turn bookkeeping off (python -m nagents_frames.testing --no-bodies)
        server.stats.prompts[prompt] += 1
    if status >= 400:
        message = body.get("error", {}).get("message", "error")
        kind = _ERROR_TYPES.get(status, "api_error")
        result: dict[str, Any] = {"type": "errored", "error": {"type": "error", "error": {"type": kind, "message": message}}}
        return json.dumps({"custom_id": custom_id, "result": result}).encode() + b"\n", False
    choice = body["choices"][0]
    usage = body["usage"]
    message = {
        "id": f"msg_{uuid.uuid4().hex[:20]}",
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": [{"type": "text", "text": choice["message"]["content"]}],
        "stop_reason": "max_tokens" if choice["finish_reason"] == "length" else "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"]},
    }
    return json.dumps({"custom_id": custom_id, "result": {"type": "succeeded", "message": message}}).encode() + b"\n", True


def _unrun(custom_id: str, why: str) -> bytes:
    kind = "expired" if why == "expired" else "canceled"
    return json.dumps({"custom_id": custom_id, "result": {"type": kind}}).encode() + b"\n"


def _finish(server: FakeLLMServer, batch: SimBatch) -> None:
    write_results(server, batch, lambda item, cid: _line(server, item, cid), _unrun)
    # one results stream: answers, errors and unrun requests together, shuffled again
    assert batch.output_path is not None and batch.error_path is not None
    merged = batch.output_path.with_suffix(".results.jsonl")
    with merged.open("wb") as out:
        for path in (batch.error_path, batch.output_path):
            with path.open("rb") as handle:
                for line in handle:
                    out.write(line)
    batch.output_path = merged


def _split_input(body_path: Path, jsonl_path: Path) -> tuple[int, str | None]:
    """Write the create body's requests as JSONL; the count, or an error message."""
    count = 0
    seen: set[str] = set()
    with jsonl_path.open("wb") as out:
        try:
            for item in iter_json_array_items(body_path):
                if not isinstance(item, dict) or not isinstance(item.get("custom_id"), str) or "params" not in item:
                    return count, "each request needs custom_id and params"
                custom_id = item["custom_id"]
                if custom_id in seen:
                    return count, f"duplicate custom_id {custom_id!r}"
                seen.add(custom_id)
                out.write(json.dumps(item).encode() + b"\n")
                count += 1
        except ValueError as exc:
            return count, f"the body is not valid JSON: {exc}"
    return count, None


def install(server: FakeLLMServer, app: web.Application) -> None:
    """Add the Message Batches routes."""
    sim = batch_stats(server)

    def authorised(request: web.Request) -> bool:
        expected = server.behavior.api_key
        return expected is None or request.headers.get("x-api-key") == expected

    async def create(request: web.Request) -> web.StreamResponse:
        if not authorised(request):
            return anthropic_error(401, "invalid x-api-key", {})
        if not request.headers.get("anthropic-version"):
            return anthropic_error(400, "anthropic-version: header is required", {})
        batch_id = f"msgbatch_{uuid.uuid4().hex[:24]}"
        body_path = sim.workdir / f"{batch_id}.body.json"
        with body_path.open("wb") as handle:
            size = await stream_body_to(request, handle)
        if sim.fail_create > 0:
            sim.fail_create -= 1
            return anthropic_error(500, "Internal server error", {})
        if size > ANTHROPIC_MAX_BYTES:
            return anthropic_error(413, f"request body is {size} bytes, over the {ANTHROPIC_MAX_BYTES} limit", {})
        jsonl = sim.workdir / f"{batch_id}.input.jsonl"
        count, problem = await asyncio.to_thread(_split_input, body_path, jsonl)
        body_path.unlink(missing_ok=True)
        if problem is None and count > ANTHROPIC_MAX_REQUESTS:
            problem = f"{count} requests, over the limit of {ANTHROPIC_MAX_REQUESTS}"
        if problem is None and count == 0:
            problem = "requests must not be empty"
        if problem is not None:
            return anthropic_error(400, problem, {})
        sim.uploads += 1
        batch = SimBatch(
            id=batch_id, kind="anthropic", input_path=jsonl, count=count, created_at=time.time(),
            expires=len(sim.created) < sim.expire_batches, phase="in_progress",
        )
        sim.created.append(batch.id)
        sim.requests_per_batch.append(count)
        sim.bytes_per_batch.append(size)
        sim.batches[batch.id] = batch
        return web.json_response(_batch_json(server, batch))

    def lookup(request: web.Request) -> SimBatch | None:
        batch = sim.batches.get(request.match_info["batch_id"])
        return batch if batch is not None and batch.kind == "anthropic" else None

    async def get(request: web.Request) -> web.StreamResponse:
        if not authorised(request):
            return anthropic_error(401, "invalid x-api-key", {})
        batch = lookup(request)
        if batch is None:
            return anthropic_error(404, "message batch not found", {})
        sim.polls += 1
        await asyncio.to_thread(advance, sim, batch, lambda b: _finish(server, b))
        return web.json_response(_batch_json(server, batch))

    async def cancel(request: web.Request) -> web.StreamResponse:
        if not authorised(request):
            return anthropic_error(401, "invalid x-api-key", {})
        batch = lookup(request)
        if batch is None:
            return anthropic_error(404, "message batch not found", {})
        sim.cancels += 1
        if batch.phase not in ("completed", "expired", "cancelled"):
            batch.cancelled = True
        return web.json_response(_batch_json(server, batch))

    async def results(request: web.Request) -> web.StreamResponse:
        if not authorised(request):
            return anthropic_error(401, "invalid x-api-key", {})
        batch = lookup(request)
        if batch is None:
            return anthropic_error(404, "message batch not found", {})
        if batch.output_path is None:
            return anthropic_error(400, "results are not available until processing has ended", {})
        sim.downloads += 1
        return web.FileResponse(batch.output_path, headers={"Content-Type": "application/x-jsonl"})

    async def listing(request: web.Request) -> web.StreamResponse:
        if not authorised(request):
            return anthropic_error(401, "invalid x-api-key", {})
        mine = sorted((b for b in sim.batches.values() if b.kind == "anthropic"), key=lambda b: b.created_at, reverse=True)
        data = [_batch_json(server, b) for b in mine[: int(request.query.get("limit", "20"))]]
        return web.json_response(
            {"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
             "last_id": data[-1]["id"] if data else None}
        )

    app.router.add_post("/v1/messages/batches", create)
    app.router.add_get("/v1/messages/batches", listing)
    app.router.add_get("/v1/messages/batches/{batch_id}", get)
    app.router.add_post("/v1/messages/batches/{batch_id}/cancel", cancel)
    app.router.add_get("/v1/messages/batches/{batch_id}/results", results)


FakeLLMServer.register(install)
