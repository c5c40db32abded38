"""Fake-server routes speaking the Anthropic Messages API: ``POST /v1/messages``.

Point a provider at it with ``Provider(provider_type="anthropic", model=..., base_url=server.base_url)``.
The route checks the request the way the real API does (``anthropic-version`` header, ``max_tokens``
present, only ``user`` / ``assistant`` roles, the key in ``x-api-key``) and answers 400 otherwise; every
knob of :class:`~nagents_frames.testing.ServerBehavior` applies. Errors come as
``{"type": "error", "error": {"type", "message"}}`` (529 is ``overloaded_error``) and the rate-limit headers
as ``anthropic-ratelimit-requests-*``.

Extra behaviour through ``server.state``:
``server.state["anthropic_refuse_on_content"] = {"needle": True}`` answers prompts containing ``needle``
with ``stop_reason: "refusal"`` and no text.

>>> from nagents_frames.testing import FakeLLMServer
>>> from nagents_frames import Provider, batch_complete
>>> import polars as pl
>>> with FakeLLMServer() as s:
...     p = Provider(provider_type="anthropic", model="claude-haiku-4-5", api_key="k", base_url=s.base_url)
...     batch_complete(pl.DataFrame({"prompt": ["hi"]}), provider=p, progress=False)["response"].to_list()
['echo: hi']
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from nagents_frames.testing._server import FakeLLMServer, content_text, count_tokens

__all__ = ["anthropic_error", "install"]

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def anthropic_error(status: int, message: str, headers: Mapping[str, str]) -> web.StreamResponse:
    """An error response in the Anthropic format."""
    kind = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return web.json_response(
        {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_fake"},
        status=status,
        headers=headers,
    )


def _rate_limit_headers(response: web.StreamResponse) -> web.StreamResponse:
    """Rename the shared ``x-ratelimit-*`` headers to Anthropic's (the reset is an RFC 3339 time)."""
    if response.prepared:
        return response
    h = response.headers
    limit = h.pop("x-ratelimit-limit-requests", None)
    remaining = h.pop("x-ratelimit-remaining-requests", None)
    reset = h.pop("x-ratelimit-reset-requests", None)
    if limit is not None:
        h["anthropic-ratelimit-requests-limit"] = limit
    if remaining is not None:
        h["anthropic-ratelimit-requests-remaining"] = remaining
    if reset is not None:
        seconds = float(reset.rstrip("s") or 0)
        when = datetime.now(UTC) + timedelta(seconds=seconds)
        h["anthropic-ratelimit-requests-reset"] = when.isoformat().replace("+00:00", "Z")
    return response


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return content_text(message.get("content"))
    return ""


async def _messages(server: FakeLLMServer, request: web.Request) -> web.StreamResponse:
    payload = await server.read_json(request)
    if not request.headers.get("anthropic-version"):
        return anthropic_error(400, "anthropic-version: header is required", {})
    if not isinstance(payload, dict) or not isinstance(payload.get("messages"), list):
        return anthropic_error(400, "messages: Field required", {})
    max_tokens = payload.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return anthropic_error(400, "max_tokens: Field required", {})
    messages = payload["messages"]
    for m in messages:
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant"):
            return anthropic_error(400, f'messages: Unexpected role "{role}". Use the top-level system parameter.', {})
    model = str(payload.get("model"))
    prompt = _last_user_text(messages)
    system = payload.get("system")
    input_tokens = sum(count_tokens(content_text(m.get("content"))) for m in messages)
    if system:
        input_tokens += count_tokens(content_text(system))
    stops = [s for s in payload.get("stop_sequences") or () if isinstance(s, str) and s]
    refusals: Mapping[str, Any] = server.state.get("anthropic_refuse_on_content") or {}

    def answer(text: str) -> web.StreamResponse:
        stop_reason = "end_turn"
        stop_sequence = None
        content: list[dict[str, Any]] = [{"type": "text", "text": text}]
        if any(needle in prompt for needle in refusals):
            stop_reason, content = "refusal", []
        else:
            for seq in stops:
                if seq in text:
                    text, stop_reason, stop_sequence = text[: text.index(seq)], "stop_sequence", seq
                    break
            if count_tokens(text) > max_tokens:
                text, stop_reason = text[: max_tokens * 4], "max_tokens"
            content = [{"type": "text", "text": text}]
        return web.json_response(
            {
                "id": f"msg_{server.stats.requests}_{int(time.time())}",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": content,
                "stop_reason": stop_reason,
                "stop_sequence": stop_sequence,
                "usage": {"input_tokens": input_tokens, "output_tokens": count_tokens(text) if content else 0},
            }
        )

    response = await server.handle(
        request, key=request.headers.get("x-api-key"), model=model, prompt=prompt, answer=answer, error=anthropic_error
    )
    return _rate_limit_headers(response)


def install(server: FakeLLMServer, app: web.Application) -> None:
    """Add the Anthropic routes to a fake server's app."""

    async def messages(request: web.Request) -> web.StreamResponse:
        return await _messages(server, request)

    app.router.add_post("/v1/messages", messages)


FakeLLMServer.register(install)
