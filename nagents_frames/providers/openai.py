"""OpenAI chat completions (and every OpenAI-compatible server: vLLM, Ollama, llama.cpp, OpenRouter).

``POST {base_url}/chat/completions`` with ``Authorization: Bearer <key>`` (omitted when there is no key).

>>> from nagents_frames import Provider
>>> from nagents_frames.types import GenerationParams
>>> p = Provider(provider_type="openai_compatible", model="m", base_url="http://127.0.0.1:9/v1")
>>> ADAPTER.build_request(p, [{"role": "user", "content": "hi"}], GenerationParams()).url
'http://127.0.0.1:9/v1/chat/completions'
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from nagents_frames.errors import ContentFilteredError, MalformedResponseError
from nagents_frames.providers._base import Completion, HTTPRequest, decode_json, status_error
from nagents_frames.types import GenerationParams, Message, Usage

if TYPE_CHECKING:
    from nagents_frames.providers import Provider

__all__ = ["ADAPTER", "OpenAIAdapter", "build_body"]


def build_body(model: str, messages: Sequence[Message], params: GenerationParams) -> dict[str, Any]:
    """The JSON body of a chat-completions request."""
    body: dict[str, Any] = {"model": model, "messages": [dict(m) for m in messages]}
    if params.temperature is not None:
        body["temperature"] = params.temperature
    if params.max_tokens is not None:
        body["max_tokens"] = params.max_tokens
    if params.top_p is not None:
        body["top_p"] = params.top_p
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    if params.response_format is not None:
        body["response_format"] = dict(params.response_format)
    if params.extra:
        body.update(params.extra)
    return body


def parse_chat_completion(payload: Any) -> Completion:
    """Parse a chat-completion JSON object."""
    try:
        choice = payload["choices"][0]
        message = choice["message"]
        content = message.get("content")
        finish = choice.get("finish_reason")
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise MalformedResponseError(f"chat completion lacks choices[0].message: {exc!r}") from exc
    if finish == "content_filter":
        raise ContentFilteredError("the provider's content filter blocked this answer")
    if content is None:
        refusal = message.get("refusal") if isinstance(message, dict) else None
        if refusal:
            raise ContentFilteredError(f"the model refused: {refusal}")
        if message.get("tool_calls"):
            content = json.dumps(message["tool_calls"])
        else:
            raise MalformedResponseError("chat completion has no content")
    if not isinstance(content, str):
        raise MalformedResponseError(f"chat completion content is {type(content).__name__}, not a string")
    usage = None
    raw_usage = payload.get("usage") if isinstance(payload, dict) else None
    if isinstance(raw_usage, dict):
        usage = Usage(
            prompt_tokens=int(raw_usage.get("prompt_tokens") or 0),
            completion_tokens=int(raw_usage.get("completion_tokens") or 0),
        )
    return Completion(text=content, usage=usage, finish_reason=finish)


class OpenAIAdapter:
    """Chat completions in the OpenAI format."""

    def build_request(
        self, provider: Provider, messages: Sequence[Message], params: GenerationParams
    ) -> HTTPRequest:
        """``POST {base_url}/chat/completions``."""
        headers = {"Content-Type": "application/json"}
        if provider.api_key:
            headers["Authorization"] = f"Bearer {provider.api_key}"
        if provider.extra_headers:
            headers.update(provider.extra_headers)
        body = build_body(provider.model, messages, params)
        return HTTPRequest("POST", provider.chat_url, headers, json.dumps(body, ensure_ascii=False).encode())

    def parse_response(self, status: int, headers: Mapping[str, str], body: bytes) -> Completion:
        """Parse a chat-completions response or raise the typed error for it."""
        if status >= 400:
            raise status_error(status, headers, body)
        return parse_chat_completion(decode_json(body))


ADAPTER = OpenAIAdapter()
