"""Fake-server routes speaking the Gemini API: ``POST /v1beta/models/{model}:generateContent`` (and ``/v1/...``).

Point a provider at it with ``Provider(provider_type="gemini_native", model=..., base_url=server.url + "/v1beta")``.
The route checks the request the way the real API does (``contents`` with roles ``user`` / ``model`` only,
the key in ``x-goog-api-key``) and refuses any key sent in the URL (``?key=``) with a 400 so that tests notice
it. Every knob of :class:`~nagents_frames.testing.ServerBehavior` applies. Errors come as
``{"error": {"code", "message", "status", "details"}}``; a wrong key is answered like the real API, 400
``INVALID_ARGUMENT`` with the reason ``API_KEY_INVALID``; a 429 carries its wait as ``RetryInfo.retryDelay``.

Extra behaviour through ``server.state``:

- ``server.state["gemini_block_on_content"] = {"needle": "SAFETY"}``: prompts containing ``needle`` get
  ``promptFeedback.blockReason`` and no candidates;
- ``server.state["gemini_finish_on_content"] = {"needle": "RECITATION"}``: prompts containing ``needle`` get
  a candidate without content and that ``finishReason``.

>>> from nagents_frames.testing import FakeLLMServer
>>> from nagents_frames import Provider, batch_complete
>>> import polars as pl
>>> with FakeLLMServer() as s:
...     p = Provider(provider_type="gemini_native", model="gemini-2.5-flash", api_key="k", base_url=s.url + "/v1beta")
...     batch_complete(pl.DataFrame({"prompt": ["hi"]}), provider=p, progress=False)["response"].to_list()
['echo: hi']
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from nagents_frames.testing._server import FakeLLMServer, count_tokens

__all__ = ["gemini_error", "install"]

_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def gemini_error(status: int, message: str, headers: Mapping[str, str]) -> web.StreamResponse:
    """An error response in the Gemini (Google RPC) format."""
    out = {k: v for k, v in headers.items() if not k.lower().startswith("x-ratelimit-")}
    details: list[dict[str, Any]] = []
    if status == 401:
        # the real API answers a bad key with 400 INVALID_ARGUMENT and a structured reason
        status, message = 400, "API key not valid. Please pass a valid API key."
        details.append(
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID", "domain": "googleapis.com"}
        )
    retry_after = out.pop("retry-after", None)
    if status == 429 and retry_after is not None:
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{float(retry_after):g}s"})
    error: dict[str, Any] = {
        "code": status,
        "message": message,
        "status": _STATUS_NAMES.get(status, "INTERNAL" if status >= 500 else "FAILED_PRECONDITION"),
    }
    if details:
        error["details"] = details
    return web.json_response({"error": error}, status=status, headers=out)


def _text(parts: Any) -> str:
    if not isinstance(parts, list):
        return ""
    return "".join(str(p.get("text", "")) for p in parts if isinstance(p, dict))


async def _generate(server: FakeLLMServer, request: web.Request) -> web.StreamResponse:
    target = request.match_info["target"]
    payload = await server.read_json(request)
    if "key" in request.query:
        return gemini_error(400, "this fake server refuses API keys in the URL; send x-goog-api-key", {})
    model, _, method = target.partition(":")
    if method != "generateContent":
        return gemini_error(404, f"method {method!r} is not served here", {})
    if not isinstance(payload, dict) or not isinstance(payload.get("contents"), list) or not payload["contents"]:
        return gemini_error(400, "* GenerateContentRequest.contents: contents is not specified", {})
    contents = payload["contents"]
    for c in contents:
        if not isinstance(c, dict) or c.get("role", "user") not in ("user", "model") or not isinstance(c.get("parts"), list):
            return gemini_error(400, "Please use a valid role: user, model.", {})
    prompt = next((_text(c["parts"]) for c in reversed(contents) if c.get("role", "user") == "user"), "")
    prompt_tokens = sum(count_tokens(_text(c["parts"])) for c in contents)
    system = payload.get("systemInstruction")
    if isinstance(system, dict):
        prompt_tokens += count_tokens(_text(system.get("parts")))
    raw_config = payload.get("generationConfig")
    config: dict[str, Any] = raw_config if isinstance(raw_config, dict) else {}
    max_tokens = config.get("maxOutputTokens")
    stops = [s for s in config.get("stopSequences") or () if isinstance(s, str) and s]
    blocks: Mapping[str, str] = server.state.get("gemini_block_on_content") or {}
    finishes: Mapping[str, str] = server.state.get("gemini_finish_on_content") or {}

    def answer(text: str) -> web.StreamResponse:
        usage = {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens}
        for needle, reason in blocks.items():
            if needle in prompt:
                return web.json_response({"promptFeedback": {"blockReason": reason}, "usageMetadata": usage})
        for needle, reason in finishes.items():
            if needle in prompt:
                candidate = {"finishReason": reason, "index": 0}
                return web.json_response({"candidates": [candidate], "usageMetadata": usage, "modelVersion": model})
        finish = "STOP"
        for seq in stops:
            if seq in text:
                text = text[: text.index(seq)]
                break
        if isinstance(max_tokens, int) and count_tokens(text) > max_tokens:
            text, finish = text[: max_tokens * 4], "MAX_TOKENS"
        out_tokens = count_tokens(text)
        return web.json_response(
            {
                "candidates": [
                    {"content": {"parts": [{"text": text}], "role": "model"}, "finishReason": finish, "index": 0}
                ],
                "usageMetadata": {
                    "promptTokenCount": prompt_tokens,
                    "candidatesTokenCount": out_tokens,
                    "totalTokenCount": prompt_tokens + out_tokens,
                },
                "modelVersion": model,
            }
        )

    return await server.handle(
        request,
        key=request.headers.get("x-goog-api-key"),
        model=model,
        prompt=prompt,
        answer=answer,
        error=gemini_error,
    )


def install(server: FakeLLMServer, app: web.Application) -> None:
    """Add the Gemini routes to a fake server's app."""

    async def generate(request: web.Request) -> web.StreamResponse:
        return await _generate(server, request)

    app.router.add_post("/v1beta/models/{target}", generate)
    app.router.add_post("/v1/models/{target}", generate)


FakeLLMServer.register(install)
