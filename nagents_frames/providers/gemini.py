"""Google Gemini API (``generateContent``, the native format).

``POST {base_url}/models/{model}:generateContent`` with the key in the ``x-goog-api-key`` header — never in
the URL, so it cannot reach a log or an error message. ``base_url`` defaults to
``https://generativelanguage.googleapis.com/v1beta``. Following the documented format:

- system (and ``developer``) messages become ``systemInstruction``; the other messages become ``contents``
  with the roles ``user`` and ``model`` (for ``assistant``);
- ``generationConfig`` holds ``temperature``, ``topP``, ``maxOutputTokens``, ``stopSequences`` and ``seed``;
  a ``response_format`` of type ``json_object`` sets ``responseMimeType: application/json``, one of type
  ``json_schema`` also sends its schema as ``responseJsonSchema`` (the field that takes JSON Schema; set
  ``Provider.options["schema_field"] = "responseSchema"`` for the older OpenAPI-subset field);
- ``extra_body`` keys go to the top level of the body (``safetySettings``, ``cachedContent`` ...), except
  ``generationConfig``, whose keys are merged into the generated one (``topK``, ``thinkingConfig`` ...);
- the answer is the text of the first candidate's parts (thought parts left out); ``finishReason`` is
  reported OpenAI-style (``STOP`` → ``stop``, ``MAX_TOKENS`` → ``length``, others lower-cased);
- ``promptFeedback.blockReason`` and the finish reasons ``SAFETY``, ``RECITATION``, ``PROHIBITED_CONTENT``,
  ``BLOCKLIST``, ``SPII`` and ``IMAGE_SAFETY`` are :class:`~nagents_frames.errors.ContentFilteredError`;
- usage from ``usageMetadata``: ``promptTokenCount``, and ``candidatesTokenCount`` plus ``thoughtsTokenCount``
  (thinking is billed as output);
- errors ``{"error": {"code", "message", "status", "details"}}`` map by HTTP status; an invalid key (a 400
  whose details give the reason ``API_KEY_INVALID``) is an :class:`~nagents_frames.errors.AuthenticationError`;
  a ``RetryInfo.retryDelay`` in a 429's details is honoured like ``Retry-After``.

>>> from nagents_frames import Provider
>>> from nagents_frames.types import GenerationParams
>>> p = Provider(provider_type="gemini_native", model="gemini-2.5-flash", api_key="k")
>>> req = ADAPTER.build_request(p, [{"role": "user", "content": "hi"}], GenerationParams(temperature=0))
>>> req.url
'https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent'
>>> json.loads(req.body)
{'contents': [{'role': 'user', 'parts': [{'text': 'hi'}]}], 'generationConfig': {'temperature': 0}}
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from nagents_frames.errors import (
    AuthenticationError,
    ContentFilteredError,
    MalformedResponseError,
    RequestError,
    error_for_status,
)
from nagents_frames.providers._base import Completion, HTTPRequest, decode_json, parse_retry_after
from nagents_frames.types import GenerationParams, Message, Usage

if TYPE_CHECKING:
    from nagents_frames.providers import Provider

__all__ = ["ADAPTER", "BLOCKED_FINISH_REASONS", "GeminiAdapter", "build_body", "gemini_error", "parse_generate_content"]

BLOCKED_FINISH_REASONS = frozenset({"SAFETY", "RECITATION", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII", "IMAGE_SAFETY"})
"""Finish reasons that mean the answer was withheld: reported as ContentFilteredError."""

_SYSTEM_ROLES = frozenset({"system", "developer"})
_FINISH_REASONS = {"STOP": "stop", "MAX_TOKENS": "length"}


def _part(part: Any) -> dict[str, Any]:
    """One OpenAI-style content part as a Gemini part."""
    if not isinstance(part, Mapping):
        return {"text": str(part)}
    kind = part.get("type")
    if kind == "text":
        return {"text": str(part.get("text", ""))}
    if kind == "image_url":
        image = part.get("image_url")
        url = str(image.get("url") if isinstance(image, Mapping) else image)
        if url.startswith("data:") and ";base64," in url:
            mime, data = url[5:].split(";base64,", 1)
            return {"inlineData": {"mimeType": mime, "data": data}}
        return {"fileData": {"fileUri": url}}
    return dict(part)  # already a Gemini part ({"text"}, {"inlineData"}, ...): sent as given


def _parts(content: Any) -> list[dict[str, Any]]:
    if content is None:
        return [{"text": ""}]
    if isinstance(content, str):
        return [{"text": content}]
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        return [_part(p) for p in content] or [{"text": ""}]
    return [{"text": str(content)}]


def _response_config(response_format: Mapping[str, Any], schema_field: str) -> dict[str, Any]:
    kind = response_format.get("type")
    if kind == "json_object":
        return {"responseMimeType": "application/json"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else response_format.get("schema")
        out: dict[str, Any] = {"responseMimeType": "application/json"}
        if schema is not None:
            out[schema_field] = schema
        return out
    return {}


def build_body(
    messages: Sequence[Message], params: GenerationParams, *, schema_field: str = "responseJsonSchema"
) -> dict[str, Any]:
    """The JSON body of a ``generateContent`` request.

    >>> build_body([{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "ok"}],
    ...            GenerationParams(max_tokens=5))["systemInstruction"]
    {'parts': [{'text': 'Be brief.'}]}
    """
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    for m in messages:
        role = str(m.get("role", "user"))
        if role in _SYSTEM_ROLES:
            system.extend(_parts(m.get("content")))
            continue
        contents.append({"role": "model" if role == "assistant" else "user", "parts": _parts(m.get("content"))})
    body: dict[str, Any] = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": system}
    config: dict[str, Any] = {}
    if params.temperature is not None:
        config["temperature"] = params.temperature
    if params.top_p is not None:
        config["topP"] = params.top_p
    if params.max_tokens is not None:
        config["maxOutputTokens"] = params.max_tokens
    if params.stop:
        config["stopSequences"] = list(params.stop)
    if params.seed is not None:
        config["seed"] = params.seed
    if params.response_format is not None:
        config.update(_response_config(params.response_format, schema_field))
    extra = dict(params.extra or {})
    extra_config = extra.pop("generationConfig", None)
    if isinstance(extra_config, Mapping):
        config.update(extra_config)
    if config:
        body["generationConfig"] = config
    body.update(extra)
    return body


def parse_generate_content(payload: Any) -> Completion:
    """Parse a ``GenerateContentResponse``; blocked prompts and answers raise ContentFilteredError."""
    if not isinstance(payload, dict):
        raise MalformedResponseError("Gemini response is not a JSON object")
    feedback = payload.get("promptFeedback")
    if isinstance(feedback, dict) and feedback.get("blockReason"):
        raise ContentFilteredError(f"Gemini blocked the prompt (blockReason {feedback['blockReason']})")
    candidates = payload.get("candidates")
    if not isinstance(candidates, list) or not candidates or not isinstance(candidates[0], dict):
        raise MalformedResponseError("Gemini response has no candidates")
    candidate = candidates[0]
    finish = candidate.get("finishReason")
    if finish in BLOCKED_FINISH_REASONS:
        raise ContentFilteredError(f"Gemini withheld the answer (finishReason {finish})")
    content = candidate.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    texts: list[str] = []
    calls: list[Any] = []
    for part in parts if isinstance(parts, list) else ():
        if not isinstance(part, dict) or part.get("thought"):
            continue
        if "text" in part:
            texts.append(str(part["text"]))
        elif "functionCall" in part:
            calls.append(part["functionCall"])
    if texts:
        text = "".join(texts)
    elif calls:
        text = json.dumps(calls, ensure_ascii=False)
    elif finish == "MAX_TOKENS":
        text = ""  # the budget ran out before any text (e.g. while thinking): an empty, truncated answer
    else:
        raise MalformedResponseError(f"Gemini candidate has no text (finishReason {finish})")
    usage = None
    meta = payload.get("usageMetadata")
    if isinstance(meta, dict):
        usage = Usage(
            prompt_tokens=int(meta.get("promptTokenCount") or 0),
            completion_tokens=int(meta.get("candidatesTokenCount") or 0) + int(meta.get("thoughtsTokenCount") or 0),
        )
    reason = _FINISH_REASONS.get(str(finish), str(finish).lower()) if finish is not None else None
    return Completion(text=text, usage=usage, finish_reason=reason)


def _duration(value: Any) -> float | None:
    """Protobuf durations in JSON look like ``"30s"`` or ``"1.5s"``."""
    if isinstance(value, str) and value.endswith("s"):
        try:
            return max(float(value[:-1]), 0.0)
        except ValueError:
            return None
    return None


def gemini_error(status: int, headers: Mapping[str, str], body: bytes) -> RequestError:
    """The typed error of a Gemini error response (``{"error": {"code", "message", "status", "details"}}``)."""
    message = ""
    reason = None
    retry_after = parse_retry_after(headers)
    try:
        payload = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        payload = None
    err = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(err, dict):
        message = str(err.get("message") or err.get("status") or "")
        if err.get("status"):
            message = f"{err['status']}: {message}" if message != err["status"] else message
        for detail in err.get("details") or ():
            if not isinstance(detail, dict):
                continue
            kind = str(detail.get("@type", ""))
            if kind.endswith("google.rpc.ErrorInfo"):
                reason = detail.get("reason")
            elif kind.endswith("google.rpc.RetryInfo") and retry_after is None:
                retry_after = _duration(detail.get("retryDelay"))
    if not message:
        message = body[:200].decode("utf-8", "replace").strip() or "(empty body)"
    if reason == "API_KEY_INVALID":
        # Gemini answers a bad key with 400 INVALID_ARGUMENT; the structured reason says what it is
        return AuthenticationError(message, status_code=status)
    return error_for_status(status, message, retry_after=retry_after)


class GeminiAdapter:
    """The Gemini ``generateContent`` format."""

    def build_request(
        self, provider: Provider, messages: Sequence[Message], params: GenerationParams
    ) -> HTTPRequest:
        """``POST {base_url}/models/{model}:generateContent`` with ``x-goog-api-key``."""
        headers = {"Content-Type": "application/json"}
        if provider.api_key:
            headers["x-goog-api-key"] = provider.api_key
        if provider.extra_headers:
            headers.update(provider.extra_headers)
        options = provider.options or {}
        model = provider.model.removeprefix("models/")
        body = build_body(messages, params, schema_field=str(options.get("schema_field", "responseJsonSchema")))
        url = f"{provider.base_url}/models/{quote(model, safe='-._~')}:generateContent"
        return HTTPRequest("POST", url, headers, json.dumps(body, ensure_ascii=False).encode())

    def parse_response(self, status: int, headers: Mapping[str, str], body: bytes) -> Completion:
        """Parse a ``generateContent`` response or raise the typed error for it."""
        if status >= 400:
            raise gemini_error(status, headers, body)
        return parse_generate_content(decode_json(body))


ADAPTER = GeminiAdapter()
