"""Fake-server routes for the OpenAI Batch API: ``/v1/files`` and ``/v1/batches``.

Files live on disk (a temp dir per server) and are streamed in and out, so a test can push 100,000
requests through without the server holding them in memory. A batch moves one step per ``GET``:
``validating`` → ``in_progress`` → ``finalizing`` → ``completed`` (how many polls each takes is a knob),
and its output is written in a shuffled order, answers to the output file and failures to the error file.

Knobs, set with :func:`configure_batches` (shared with the Anthropic Message Batches routes)::

    configure_batches(server, in_progress_polls=3, finalizing_polls=2, expire_batches=1, keep_fraction=0.5)

Counters are in :func:`batch_stats` (``server.state["batch_sim"]``).

>>> import json, urllib.request
>>> from nagents_frames.testing import FakeLLMServer
>>> with FakeLLMServer() as s:
...     batch_stats(s).created
[]
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
from aiohttp import web

from nagents_frames.testing._server import FakeLLMServer, content_text, count_tokens, last_user_text, openai_error

__all__ = [
    "BatchSim",
    "SimBatch",
    "batch_stats",
    "configure_batches",
    "install",
    "shuffled_lines",
]

OPENAI_MAX_REQUESTS = 50_000
OPENAI_MAX_BYTES = 200 * 1024 * 1024


@dataclass
class BatchSim:
    """Knobs and counters of the fake batch endpoints (both formats) of one server.

    Knobs:
        validating_polls: GETs that still say ``validating`` (OpenAI).
        in_progress_polls: GETs that say ``in_progress`` before the batch finishes.
        finalizing_polls: GETs that say ``finalizing`` (slow finalisation; OpenAI).
        cancel_polls: GETs that say ``cancelling`` / ``canceling`` after a cancel.
        expire_batches: the first N batches created expire instead of completing.
        keep_fraction: the share of requests answered by an expired or cancelled batch (partial results).
        fail_validation: a message: every batch fails validation with it (OpenAI ``failed``).
        shuffle: write results out of input order.
        fail_create: the next N create calls answer 500.

    Counters: ``created`` (batch ids in order), ``uploads``, ``cancels``, ``polls``, ``requests_per_batch``,
    ``bytes_per_batch``, ``downloads``.
    """

    validating_polls: int = 0
    in_progress_polls: int = 1
    finalizing_polls: int = 0
    cancel_polls: int = 1
    expire_batches: int = 0
    keep_fraction: float = 0.5
    fail_validation: str | None = None
    shuffle: bool = True
    fail_create: int = 0
    created: list[str] = field(default_factory=list)
    uploads: int = 0
    cancels: int = 0
    polls: int = 0
    downloads: int = 0
    requests_per_batch: list[int] = field(default_factory=list)
    bytes_per_batch: list[int] = field(default_factory=list)
    batches: dict[str, SimBatch] = field(default_factory=dict)
    files: dict[str, tuple[Path, int, str]] = field(default_factory=dict)
    _workdir: Path | None = None

    @property
    def workdir(self) -> Path:
        """Where the batch files live (made on first use; removed when the server stops)."""
        if self._workdir is None or not self._workdir.exists():
            self._workdir = Path(tempfile.mkdtemp(prefix="nagents-fake-batch-"))
        return self._workdir


@dataclass
class SimBatch:
    """One fake batch: where its input is, how far it got, where its results are."""

    id: str
    kind: str  # "openai" or "anthropic"
    input_path: Path
    count: int
    created_at: float
    expires: bool
    metadata: Mapping[str, str] = field(default_factory=dict)
    input_file_id: str | None = None
    polls: int = 0
    phase: str = "validating"
    cancel_polls: int = 0
    cancelled: bool = False
    output_path: Path | None = None
    error_path: Path | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    succeeded: int = 0
    failed: int = 0
    unrun: int = 0
    ended_at: float | None = None
    errors: str | None = None


_KNOBS = {
    "validating_polls", "in_progress_polls", "finalizing_polls", "cancel_polls", "expire_batches",
    "keep_fraction", "fail_validation", "shuffle", "fail_create",
}


def batch_stats(server: FakeLLMServer) -> BatchSim:
    """The batch knobs and counters of ``server`` (created on first use)."""
    sim = server.state.get("batch_sim")
    if not isinstance(sim, BatchSim):
        sim = BatchSim()
        server.state["batch_sim"] = sim
    return sim


def configure_batches(server: FakeLLMServer, **knobs: Any) -> BatchSim:
    """Set knobs of the fake batch endpoints (see :class:`BatchSim`); unknown names raise ``TypeError``."""
    sim = batch_stats(server)
    for name, value in knobs.items():
        if name not in _KNOBS:
            raise TypeError(f"unknown batch knob {name!r}; known: {', '.join(sorted(_KNOBS))}")
        setattr(sim, name, value)
    return sim


def shuffled_lines(path: Path, shuffle: bool) -> Iterator[tuple[int, bytes]]:
    """``(position, line)`` of a JSONL file, out of order when ``shuffle`` (three strided passes, so the
    file is never held in memory)."""
    passes = 3 if shuffle else 1
    for k in reversed(range(passes)):
        with path.open("rb") as handle:
            for i, line in enumerate(handle):
                if i % passes == k and line.strip():
                    yield i, line


def _authorised(server: FakeLLMServer, request: web.Request, key: str | None) -> bool:
    expected = server.behavior.api_key
    return expected is None or key == expected


def chat_answer(server: FakeLLMServer, body: Any) -> tuple[int, dict[str, Any], str]:
    """What the chat endpoint would answer to ``body``: ``(status, json body, prompt)`` (no faults but
    ``error_on_content`` and ``models``)."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return 400, {"error": {"message": "Invalid request: 'messages' must be a list", "type": "invalid_request_error"}}, ""
    messages = body["messages"]
    prompt = last_user_text(messages)
    model = str(body.get("model"))
    behavior = server.behavior
    if behavior.models is not None and model not in behavior.models:
        return 404, {"error": {"message": f"The model '{model}' does not exist", "type": "invalid_request_error"}}, prompt
    for needle, status in behavior.error_on_content.items():
        if needle in prompt:
            return status, {"error": {"message": f"content rule {needle!r} answered {status}", "type": "server_error"}}, prompt
    text = behavior.echo_prefix + prompt
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
    finish = "stop"
    if isinstance(max_tokens, int) and count_tokens(text) > max_tokens:
        text, finish = text[: max_tokens * 4], "length"
    prompt_tokens = sum(count_tokens(content_text(m.get("content"))) for m in messages if isinstance(m, dict))
    return 200, {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": count_tokens(text),
            "total_tokens": prompt_tokens + count_tokens(text),
        },
    }, prompt


def advance(sim: BatchSim, batch: SimBatch, finish: Callable[[SimBatch], None]) -> None:
    """Move a batch one step along its life on a GET; ``finish`` writes its results when it ends."""
    batch.polls += 1
    if batch.phase in ("completed", "failed", "expired", "cancelled"):
        return
    if batch.cancelled:
        batch.cancel_polls += 1
        if batch.cancel_polls > sim.cancel_polls:
            finish(batch)
        return
    if batch.phase == "validating":
        if batch.polls > sim.validating_polls:
            if sim.fail_validation and batch.kind == "openai":
                batch.phase, batch.errors, batch.ended_at = "failed", sim.fail_validation, time.time()
                return
            batch.phase = "in_progress"
            batch.polls = 0
        return
    if batch.phase == "in_progress" and batch.polls >= sim.in_progress_polls:
        batch.phase, batch.polls = "finalizing", 0
    if batch.phase == "finalizing" and batch.polls >= sim.finalizing_polls:
        finish(batch)


def write_results(
    server: FakeLLMServer,
    batch: SimBatch,
    line_for: Callable[[dict[str, Any], str | None], tuple[bytes, bool]],
    unrun_line: Callable[[str, str], bytes],
) -> None:
    """Answer a batch's input, streaming: ``line_for(item, None)`` gives ``(line, ok)``; requests past the
    kept share of an expired / cancelled batch get ``unrun_line(custom_id, "expired" | "cancelled")``."""
    sim = batch_stats(server)
    workdir = sim.workdir
    out_path = workdir / f"{batch.id}.output.jsonl"
    err_path = workdir / f"{batch.id}.errors.jsonl"
    partial = batch.cancelled or batch.expires
    keep = int(batch.count * sim.keep_fraction) if partial else batch.count
    why = "cancelled" if batch.cancelled else "expired"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        for position, raw in shuffled_lines(batch.input_path, sim.shuffle):
            try:
                item = json.loads(raw)
            except ValueError:
                continue
            custom_id = str(item.get("custom_id"))
            if position >= keep:
                err.write(unrun_line(custom_id, why))
                batch.unrun += 1
                continue
            line, ok = line_for(item, custom_id)
            (out if ok else err).write(line)
            if ok:
                batch.succeeded += 1
            else:
                batch.failed += 1
    batch.output_path, batch.error_path = out_path, err_path
    batch.phase = "cancelled" if batch.cancelled else ("expired" if batch.expires else "completed")
    batch.ended_at = time.time()


async def stream_body_to(request: web.Request, handle: IO[bytes]) -> int:
    """Copy the request body to ``handle`` in pieces; the number of bytes."""
    total = 0
    async for block in request.content.iter_chunked(256 * 1024):
        handle.write(block)
        total += len(block)
    return total


# --- OpenAI ---------------------------------------------------------------------------------------------


def _key(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    return auth[7:] if auth.startswith("Bearer ") else None


def _openai_batch_json(batch: SimBatch) -> dict[str, Any]:
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "errors": {"object": "list", "data": [{"code": "invalid_request", "message": batch.errors, "line": None}]}
        if batch.errors
        else None,
        "input_file_id": batch.input_file_id,
        "completion_window": "24h",
        "status": batch.phase,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": int(batch.created_at),
        "in_progress_at": None,
        "expires_at": int(batch.created_at) + 86400,
        "completed_at": int(batch.ended_at) if batch.ended_at and batch.phase == "completed" else None,
        "request_counts": {"total": batch.count, "completed": batch.succeeded, "failed": batch.failed + batch.unrun},
        "metadata": dict(batch.metadata) or None,
    }


def _openai_line(server: FakeLLMServer, item: dict[str, Any], custom_id: str | None) -> tuple[bytes, bool]:
    status, body, prompt = chat_answer(server, item.get("body"))
    if server.stats.keep_bodies:  # long runs turn bookkeeping off (python -m nagents_frames.testing --no-bodies)
        server.stats.prompts[prompt] += 1
    line = {
        "id": f"batch_req_{uuid.uuid4().hex[:16]}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": uuid.uuid4().hex[:16], "body": body},
        "error": None,
    }
    return json.dumps(line).encode() + b"\n", status < 400


def _openai_unrun(custom_id: str, why: str) -> bytes:
    code = "batch_expired" if why == "expired" else "batch_cancelled"
    message = "This request could not be executed before the completion window expired." if why == "expired" else (
        "This request was not executed because the batch was cancelled."
    )
    line = {"id": f"batch_req_{uuid.uuid4().hex[:16]}", "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}
    return json.dumps(line).encode() + b"\n"


def _openai_finish(server: FakeLLMServer) -> Callable[[SimBatch], None]:
    sim = batch_stats(server)

    def finish(batch: SimBatch) -> None:
        write_results(server, batch, lambda item, cid: _openai_line(server, item, cid), _openai_unrun)
        for attr, path in (("output_file_id", batch.output_path), ("error_file_id", batch.error_path)):
            if path is not None and path.stat().st_size > 0:
                file_id = f"file-{uuid.uuid4().hex[:20]}"
                sim.files[file_id] = (path, path.stat().st_size, "batch_output")
                setattr(batch, attr, file_id)

    return finish


def install(server: FakeLLMServer, app: web.Application) -> None:
    """Add the OpenAI files and batches routes."""
    sim = batch_stats(server)

    async def upload(request: web.Request) -> web.StreamResponse:
        if not _authorised(server, request, _key(request)):
            return openai_error(401, "Incorrect API key provided.", {})
        reader = await request.multipart()
        purpose = None
        file_id = f"file-{uuid.uuid4().hex[:20]}"
        path = sim.workdir / f"{file_id}.jsonl"
        size = 0
        filename = "upload.jsonl"
        while True:
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, aiohttp.BodyPartReader):  # nested multipart: not ours
                continue
            if part.name == "purpose":
                purpose = (await part.text()).strip()
            elif part.name == "file":
                filename = part.filename or filename
                with path.open("wb") as handle:
                    while True:
                        block = await part.read_chunk(256 * 1024)
                        if not block:
                            break
                        handle.write(block)
                        size += len(block)
        if purpose != "batch" or not path.exists():
            return openai_error(400, "multipart upload needs purpose=batch and a file", {})
        if size > OPENAI_MAX_BYTES:
            return openai_error(400, f"file is {size} bytes, over the {OPENAI_MAX_BYTES} limit", {})
        sim.uploads += 1
        sim.files[file_id] = (path, size, purpose)
        return web.json_response(
            {"id": file_id, "object": "file", "bytes": size, "created_at": int(time.time()), "filename": filename,
             "purpose": purpose}
        )

    async def content(request: web.Request) -> web.StreamResponse:
        if not _authorised(server, request, _key(request)):
            return openai_error(401, "Incorrect API key provided.", {})
        entry = sim.files.get(request.match_info["file_id"])
        if entry is None:
            return openai_error(404, "No such File object", {})
        sim.downloads += 1
        return web.FileResponse(entry[0], headers={"Content-Type": "application/jsonl"})

    async def create(request: web.Request) -> web.StreamResponse:
        if not _authorised(server, request, _key(request)):
            return openai_error(401, "Incorrect API key provided.", {})
        if sim.fail_create > 0:
            sim.fail_create -= 1
            return openai_error(500, "The server had an error while creating the batch", {})
        payload = await server.read_json(request)
        if not isinstance(payload, dict) or payload.get("endpoint") != "/v1/chat/completions":
            return openai_error(400, "endpoint must be /v1/chat/completions", {})
        if payload.get("completion_window") != "24h":
            return openai_error(400, "completion_window must be 24h", {})
        entry = sim.files.get(str(payload.get("input_file_id")))
        if entry is None:
            return openai_error(404, "No such File object", {})
        path, size, _ = entry
        count = await asyncio.to_thread(_count_lines, path)
        batch = SimBatch(
            id=f"batch_{uuid.uuid4().hex[:20]}", kind="openai", input_path=path, count=count, created_at=time.time(),
            expires=len(sim.created) < sim.expire_batches, metadata=dict(payload.get("metadata") or {}),
            input_file_id=str(payload["input_file_id"]),
        )
        if count > OPENAI_MAX_REQUESTS:
            batch.errors = f"the file holds {count} requests, over the limit of {OPENAI_MAX_REQUESTS}"
            batch.phase = "failed"
        sim.created.append(batch.id)
        sim.requests_per_batch.append(count)
        sim.bytes_per_batch.append(size)
        sim.batches[batch.id] = batch
        return web.json_response(_openai_batch_json(batch))

    async def get(request: web.Request) -> web.StreamResponse:
        if not _authorised(server, request, _key(request)):
            return openai_error(401, "Incorrect API key provided.", {})
        batch = sim.batches.get(request.match_info["batch_id"])
        if batch is None or batch.kind != "openai":
            return openai_error(404, "No such batch", {})
        sim.polls += 1
        await asyncio.to_thread(advance, sim, batch, _openai_finish(server))
        return web.json_response(_openai_batch_json(batch))

    async def cancel(request: web.Request) -> web.StreamResponse:
        if not _authorised(server, request, _key(request)):
            return openai_error(401, "Incorrect API key provided.", {})
        batch = sim.batches.get(request.match_info["batch_id"])
        if batch is None or batch.kind != "openai":
            return openai_error(404, "No such batch", {})
        sim.cancels += 1
        if batch.phase in ("completed", "failed", "expired", "cancelled"):
            return openai_error(409, f"Cannot cancel a batch with status {batch.phase}", {})
        batch.cancelled = True
        batch.phase = "cancelling"
        return web.json_response(_openai_batch_json(batch))

    async def listing(request: web.Request) -> web.StreamResponse:
        if not _authorised(server, request, _key(request)):
            return openai_error(401, "Incorrect API key provided.", {})
        limit = int(request.query.get("limit", "20"))
        mine = [b for b in sim.batches.values() if b.kind == "openai"]
        mine.sort(key=lambda b: b.created_at, reverse=True)
        data = [_openai_batch_json(b) for b in mine[:limit]]
        return web.json_response({"object": "list", "data": data, "has_more": len(mine) > limit})

    app.router.add_post("/v1/files", upload)
    app.router.add_get("/v1/files/{file_id}/content", content)
    app.router.add_post("/v1/batches", create)
    app.router.add_get("/v1/batches", listing)
    app.router.add_get("/v1/batches/{batch_id}", get)
    app.router.add_post("/v1/batches/{batch_id}/cancel", cancel)

    async def cleanup(app: web.Application) -> None:
        if sim._workdir is not None:
            shutil.rmtree(sim._workdir, ignore_errors=True)
            sim._workdir = None

    app.on_cleanup.append(cleanup)


def _count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


FakeLLMServer.register(install)
