"""Anthropic Messages API.

``POST {base_url}/messages`` (``base_url`` includes the version: ``https://api.anthropic.com/v1``) with the
headers ``x-api-key`` and ``anthropic-version`` (``"2023-06-01"`` unless ``Provider.api_version`` says
otherwise). Following the documented format:

- system messages are lifted out of ``messages`` into the top-level ``system`` field (several are joined
  with a blank line); ``developer`` messages count as system messages;
- ``max_tokens`` is required by the API: when neither the call nor the provider sets it,
  :data:`DEFAULT_MAX_TOKENS` is sent (or ``Provider.options["default_max_tokens"]``);
- ``stop`` becomes ``stop_sequences``; ``temperature`` and ``top_p`` are passed through; ``seed`` is not
  part of the API and is not sent;
- a ``response_format`` (JSON mode / JSON schema) is turned into a system instruction asking for JSON that
  matches the schema, which every model follows; with ``Provider.options["structured_outputs"] = "native"`` a
  JSON schema is sent instead as the ``output_format`` field of Anthropic's structured outputs (a beta at the
  time of writing, enabled with the ``anthropic-beta`` header :data:`STRUCTURED_OUTPUTS_BETA`);
- the answer is the concatenation of the text blocks; ``stop_reason`` is reported as an OpenAI-style
  ``finish_reason`` (``end_turn``/``stop_sequence`` → ``stop``, ``max_tokens`` → ``length``,
  ``tool_use`` → ``tool_calls``); ``refusal`` is a :class:`~nagents_frames.errors.ContentFilteredError`;
- usage: ``prompt_tokens`` = ``input_tokens`` plus cache-creation and cache-read input tokens,
  ``completion_tokens`` = ``output_tokens``;
- errors ``{"type": "error", "error": {"type", "message"}}`` map by HTTP status; 529 ``overloaded_error``
  is a retryable :class:`~nagents_frames.errors.ServerError` like a 503.

>>> from nagents_frames import Provider
>>> from nagents_frames.types import GenerationParams
>>> p = Provider(provider_type="anthropic", model="claude-haiku-4-5", api_key="k", base_url="http://127.0.0.1:9/v1")
>>> req = ADAPTER.build_request(p, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
...                             GenerationParams())
>>> req.url, json.loads(req.body)["system"], json.loads(req.body)["max_tokens"]
('http://127.0.0.1:9/v1/messages', 'Be brief.', 1024)
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

__all__ = [
    "ADAPTER",
    "DEFAULT_API_VERSION",
    "DEFAULT_MAX_TOKENS",
    "STRUCTURED_OUTPUTS_BETA",
    "AnthropicAdapter",
    "build_body",
    "parse_message",
]

DEFAULT_API_VERSION = "2023-06-01"
"""The ``anthropic-version`` header sent unless ``Provider.api_version`` is set."""

DEFAULT_MAX_TOKENS = 1024
"""``max_tokens`` sent when neither the call nor the provider sets one (the API requires it)."""

STRUCTURED_OUTPUTS_BETA = "structured-outputs-2025-11-13"
"""The ``anthropic-beta`` header value that enables ``output_format`` (``options={"structured_outputs": "native"}``)."""

_SYSTEM_ROLES = frozenset({"system", "developer"})

_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
}


def _image_block(url: str) -> dict[str, Any]:
    """An OpenAI-style ``image_url`` as an Anthropic image block (base64 data URL or plain URL)."""
    if url.startswith("data:") and ";base64," in url:
        media_type, data = url[5:].split(";base64,", 1)
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _content(content: Any) -> Any:
    """Message content in Anthropic's shape: strings stay strings; OpenAI-style parts become blocks."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        blocks: list[Any] = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "image_url":
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, Mapping) else image
                blocks.append(_image_block(str(url)))
            elif isinstance(part, Mapping):
                blocks.append(dict(part))  # text blocks share the OpenAI shape; others go as given
            else:
                blocks.append({"type": "text", "text": str(part)})
        return blocks
    return str(content)


def _text(content: Any) -> str:
    """Plain text of a (system) message content."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        return "".join(str(p.get("text", "")) if isinstance(p, Mapping) else str(p) for p in content)
    return "" if content is None else str(content)


def _schema(response_format: Mapping[str, Any]) -> Any:
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, Mapping) else None
    return response_format.get("schema") if schema is None else schema


def _json_instruction(response_format: Mapping[str, Any]) -> str | None:
    kind = response_format.get("type")
    if kind == "json_schema":
        schema = _schema(response_format)
        return (
            "Answer with one JSON value only, no prose and no code fences. It must validate against this "
            f"JSON Schema: {json.dumps(schema, ensure_ascii=False, sort_keys=True)}"
        )
    if kind == "json_object":
        return "Answer with one JSON object only, no prose and no code fences."
    return None


def build_body(
    model: str,
    messages: Sequence[Message],
    params: GenerationParams,
    *,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    native_structured_outputs: bool = False,
) -> dict[str, Any]:
    """The JSON body of a Messages API request.

    >>> build_body("m", [{"role": "user", "content": "hi"}], GenerationParams(stop=("END",), max_tokens=5))
    {'model': 'm', 'max_tokens': 5, 'messages': [{'role': 'user', 'content': 'hi'}], 'stop_sequences': ['END']}
    """
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for m in messages:
        role = str(m.get("role", "user"))
        if role in _SYSTEM_ROLES:
            system.append(_text(m.get("content")))
            continue
        # the API knows only user and assistant turns; tool results and the like are sent as user text
        turns.append({"role": "assistant" if role == "assistant" else "user", "content": _content(m.get("content"))})
    output_format = None
    if params.response_format is not None:
        if native_structured_outputs and params.response_format.get("type") == "json_schema":
            output_format = {"type": "json_schema", "schema": _schema(params.response_format)}
        else:
            instruction = _json_instruction(params.response_format)
            if instruction:
                system.append(instruction)
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": params.max_tokens if params.max_tokens is not None else default_max_tokens,
        "messages": turns,
    }
    joined = "\n\n".join(s for s in system if s)
    if joined:
        body["system"] = joined
    if params.temperature is not None:
        body["temperature"] = params.temperature
    if params.top_p is not None:
        body["top_p"] = params.top_p
    if params.stop:
        body["stop_sequences"] = list(params.stop)
    if output_format is not None:
        body["output_format"] = output_format
    if params.extra:
        body.update(params.extra)
    return body


def parse_message(payload: Any) -> Completion:
    """Parse a Messages API response object (``{"type": "message", "content": [...], ...}``)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("content"), list):
        raise MalformedResponseError("Anthropic message lacks a content list")
    stop_reason = payload.get("stop_reason")
    if stop_reason == "refusal":
        raise ContentFilteredError("the model refused to answer (stop_reason 'refusal')")
    texts: list[str] = []
    tool_calls: list[Any] = []
    for block in payload["content"]:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            texts.append(str(block.get("text", "")))
        elif block.get("type") == "tool_use":
            tool_calls.append({"id": block.get("id"), "name": block.get("name"), "input": block.get("input")})
    if texts:
        text = "".join(texts)
    elif tool_calls:
        text = json.dumps(tool_calls, ensure_ascii=False)
    elif stop_reason == "max_tokens":
        text = ""  # the budget ran out before any text (e.g. while thinking): an empty, truncated answer
    else:
        raise MalformedResponseError("Anthropic message has no text or tool_use block")
    usage = None
    raw = payload.get("usage")
    if isinstance(raw, dict):
        prompt = sum(
            int(raw.get(k) or 0) for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
        )
        usage = Usage(prompt_tokens=prompt, completion_tokens=int(raw.get("output_tokens") or 0))
    finish = _FINISH_REASONS.get(str(stop_reason), stop_reason) if stop_reason is not None else None
    return Completion(text=text, usage=usage, finish_reason=finish)


class AnthropicAdapter:
    """The Anthropic Messages API format."""

    def build_request(
        self, provider: Provider, messages: Sequence[Message], params: GenerationParams
    ) -> HTTPRequest:
        """``POST {base_url}/messages`` with ``x-api-key`` and ``anthropic-version``."""
        headers = {"Content-Type": "application/json", "anthropic-version": provider.api_version or DEFAULT_API_VERSION}
        if provider.api_key:
            headers["x-api-key"] = provider.api_key
        if provider.extra_headers:
            headers.update(provider.extra_headers)
        options = provider.options or {}
        default_max = int(options.get("default_max_tokens", DEFAULT_MAX_TOKENS))
        native = options.get("structured_outputs") == "native"
        body = build_body(
            provider.model, messages, params, default_max_tokens=default_max, native_structured_outputs=native
        )
        if "output_format" in body and "anthropic-beta" not in headers:
            headers["anthropic-beta"] = STRUCTURED_OUTPUTS_BETA
        return HTTPRequest("POST", f"{provider.base_url}/messages", headers, json.dumps(body, ensure_ascii=False).encode())

    def parse_response(self, status: int, headers: Mapping[str, str], body: bytes) -> Completion:
        """Parse a Messages API response or raise the typed error for it."""
        if status >= 400:
            raise status_error(status, headers, body)
        return parse_message(decode_json(body))


ADAPTER = AnthropicAdapter()
