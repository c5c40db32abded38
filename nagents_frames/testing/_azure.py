"""Fake-server routes speaking Azure OpenAI chat completions.

- deployment style: ``POST /openai/deployments/{deployment}/chat/completions?api-version=...`` — point a
  provider at it with ``Provider(provider_type="azure_openai", model=DEPLOYMENT, base_url=server.url)``;
  a missing ``api-version`` is answered 404 like the real service;
- v1 style: ``POST /openai/v1/chat/completions`` — ``base_url=server.url + "/openai/v1"``.

The key goes in the ``api-key`` header (v1 also takes ``Authorization: Bearer``); the ``models`` knob lists
deployment names. Every knob of :class:`~nagents_frames.testing.ServerBehavior` applies; errors come as
``{"error": {"code", "message"}}`` with the ``x-ratelimit-*`` headers.

Extra behaviour through ``server.state``:
``server.state["azure_filter_on_content"] = {"needle": "prompt"}`` rejects prompts containing ``needle`` with
400 ``content_filter``; the value ``"completion"`` answers 200 with ``finish_reason: "content_filter"``.

>>> from nagents_frames.testing import FakeLLMServer
>>> from nagents_frames import Provider, batch_complete
>>> import polars as pl
>>> with FakeLLMServer() as s:
...     p = Provider(provider_type="azure_openai", model="my-gpt", api_key="k", base_url=s.url)
...     batch_complete(pl.DataFrame({"prompt": ["hi"]}), provider=p, progress=False)["response"].to_list()
['echo: hi']
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from aiohttp import web

from nagents_frames.testing._server import FakeLLMServer, content_text, count_tokens, last_user_text

__all__ = ["azure_error", "install"]


def azure_error(status: int, message: str, headers: Mapping[str, str]) -> web.StreamResponse:
    """An error response in the Azure OpenAI format."""
    return web.json_response({"error": {"code": str(status), "message": message}}, status=status, headers=headers)


def _content_filter_error() -> web.StreamResponse:
    return web.json_response(
        {
            "error": {
                "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management policy.",
                "type": None,
                "param": "prompt",
                "code": "content_filter",
                "status": 400,
                "innererror": {"code": "ResponsibleAIPolicyViolation"},
            }
        },
        status=400,
    )


async def _chat(server: FakeLLMServer, request: web.Request, deployment: str | None) -> web.StreamResponse:
    payload = await server.read_json(request)
    if deployment is not None and not request.query.get("api-version"):
        return azure_error(404, "Resource not found", {})
    if not isinstance(payload, dict) or not isinstance(payload.get("messages"), list):
        return azure_error(400, "'messages' is a required property", {})
    key = request.headers.get("api-key")
    auth = request.headers.get("Authorization", "")
    if key is None and deployment is None and auth.startswith("Bearer "):
        key = auth[7:]
    messages = payload["messages"]
    model = deployment if deployment is not None else str(payload.get("model"))
    prompt = last_user_text(messages)
    prompt_tokens = sum(count_tokens(content_text(m.get("content"))) for m in messages if isinstance(m, dict))
    filters: Mapping[str, str] = server.state.get("azure_filter_on_content") or {}
    for needle, where in filters.items():
        if needle in prompt and where == "prompt":
            return await server.handle(
                request, key=key, model=model, prompt=prompt,
                answer=lambda _t: _content_filter_error(), error=azure_error,
            )

    def answer(text: str) -> web.StreamResponse:
        max_tokens = payload.get("max_tokens") or payload.get("max_completion_tokens")
        finish = "stop"
        content: str | None = text
        if any(needle in prompt and where == "completion" for needle, where in filters.items()):
            finish, content = "content_filter", None
        elif isinstance(max_tokens, int) and count_tokens(text) > max_tokens:
            content, finish = text[: max_tokens * 4], "length"
        out_tokens = count_tokens(content or "")
        return web.json_response(
            {
                "id": f"chatcmpl-{server.stats.requests}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": out_tokens,
                    "total_tokens": prompt_tokens + out_tokens,
                },
            }
        )

    return await server.handle(request, key=key, model=model, prompt=prompt, answer=answer, error=azure_error)


def install(server: FakeLLMServer, app: web.Application) -> None:
    """Add the Azure OpenAI routes to a fake server's app."""

    async def deployment_chat(request: web.Request) -> web.StreamResponse:
        return await _chat(server, request, request.match_info["deployment"])

    async def v1_chat(request: web.Request) -> web.StreamResponse:
        return await _chat(server, request, None)

    app.router.add_post("/openai/deployments/{deployment}/chat/completions", deployment_chat)
    app.router.add_post("/openai/v1/chat/completions", v1_chat)


FakeLLMServer.register(install)
