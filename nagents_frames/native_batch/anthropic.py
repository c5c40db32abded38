"""Anthropic Message Batches as pure functions: the create body, get / cancel / list, and the lines of
the results stream.

Flow (driven by :class:`~nagents_frames.native_batch.NativeBatchRunner`)::

    POST {base}/messages/batches {"requests": [{"custom_id", "params"}, ...]}   (body streamed from disk)
    GET  {base}/messages/batches/{id}  (poll until processing_status == "ended")
    GET  results_url  ->  one JSON line per request: succeeded / errored / canceled / expired

``params`` are built by :func:`nagents_frames.providers.anthropic.build_body`, so a batch sends exactly
what the real-time adapter would.

>>> from nagents_frames import Provider
>>> from nagents_frames.types import GenerationParams
>>> p = Provider(provider_type="anthropic", model="claude-haiku-4-5", api_key="k", base_url="http://127.0.0.1:9/v1")
>>> json.loads(FORMAT.encode_item(p, "r0", [{"role": "user", "content": "hi"}], GenerationParams()))["params"]["max_tokens"]
1024
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from nagents_frames.errors import MalformedResponseError, RequestError, error_for_status
from nagents_frames.executor import Outcome
from nagents_frames.native_batch._base import (
    BatchInfo,
    BatchLimits,
    NativeState,
    RowResult,
    RowState,
    UploadSpec,
)
from nagents_frames.providers._base import HTTPRequest, decode_json, status_error
from nagents_frames.providers.anthropic import DEFAULT_API_VERSION, DEFAULT_MAX_TOKENS, build_body, parse_message
from nagents_frames.types import GenerationParams, Message

if TYPE_CHECKING:
    from nagents_frames.providers import Provider

__all__ = ["FORMAT", "LIMITS", "AnthropicBatchFormat", "parse_result_line"]

LIMITS = BatchLimits(max_requests=100_000, max_bytes=256_000_000)
"""Anthropic's limits per Message Batch: 100,000 requests, 256 MB (decimal, the smaller reading)."""

# the error "type" inside an errored result, as the HTTP status the same error has in real time
_ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}


def _headers(provider: Provider, content_type: str | None = "application/json") -> dict[str, str]:
    headers = {"anthropic-version": provider.api_version or DEFAULT_API_VERSION}
    if content_type:
        headers["Content-Type"] = content_type
    if provider.api_key:
        headers["x-api-key"] = provider.api_key
    if provider.extra_headers:
        headers.update(provider.extra_headers)
    return headers


def parse_result_line(line: bytes) -> RowResult:
    """One line of the results stream.

    >>> line = b'{"custom_id": "r1", "result": {"type": "expired"}}'
    >>> parse_result_line(line).state.value
    'expired'
    """
    payload = decode_json(line)
    if not isinstance(payload, dict) or not isinstance(payload.get("custom_id"), str):
        raise MalformedResponseError(f"batch result line has no custom_id: {line[:80]!r}")
    custom_id: str = payload["custom_id"]
    result = payload.get("result")
    kind = result.get("type") if isinstance(result, dict) else None
    if kind == "expired" or kind == "canceled":
        state = RowState.EXPIRED if kind == "expired" else RowState.CANCELLED
        error = error_for_status(408, f"the batch request was {kind} before it ran")
        return RowResult(custom_id, state, Outcome.failure(error, attempts=0))
    try:
        if kind == "errored":
            assert isinstance(result, dict)
            outer = result.get("error")
            inner = outer.get("error") if isinstance(outer, dict) and isinstance(outer.get("error"), dict) else outer
            etype = str(inner.get("type") if isinstance(inner, dict) else "api_error")
            message = str(inner.get("message") if isinstance(inner, dict) else "") or etype
            raise error_for_status(_ERROR_STATUS.get(etype, 500), f"{etype}: {message}")
        if kind != "succeeded":
            raise MalformedResponseError(f"unknown batch result type {kind!r}")
        assert isinstance(result, dict)
        completion = parse_message(result.get("message"))
    except RequestError as err:
        return RowResult(custom_id, RowState.FAILED, Outcome.failure(err, attempts=1))
    usage = completion.usage
    return RowResult(
        custom_id,
        RowState.SUCCEEDED,
        Outcome(
            response=completion.text,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
            attempts=1,
            finish_reason=completion.finish_reason,
            status_code=200,
        ),
    )


def parse_batch_object(payload: Any) -> BatchInfo:
    """A ``message_batch`` object.

    ``ended`` becomes CANCELLED when a cancel was asked, EXPIRED when requests expired, else COMPLETED.
    """
    if not isinstance(payload, dict) or not isinstance(payload.get("id"), str):
        raise MalformedResponseError("message batch lacks an id")
    raw = str(payload.get("processing_status") or "")
    counts = payload.get("request_counts") or {}
    n = {k: int(counts.get(k) or 0) for k in ("processing", "succeeded", "errored", "canceled", "expired")}
    if raw == "in_progress":
        state = NativeState.IN_PROGRESS
    elif raw == "canceling":
        state = NativeState.CANCELLING
    elif raw == "ended":
        if payload.get("cancel_initiated_at"):
            state = NativeState.CANCELLED
        elif n["expired"]:
            state = NativeState.EXPIRED
        else:
            state = NativeState.COMPLETED
    else:
        raise MalformedResponseError(f"unknown processing_status {raw!r}")
    return BatchInfo(
        id=payload["id"],
        state=state,
        raw_status=raw,
        total=sum(n.values()),
        succeeded=n["succeeded"],
        failed=n["errored"],
        output_ref=payload.get("results_url") or None,
    )


class AnthropicBatchFormat:
    """Anthropic Message Batches."""

    name = "anthropic"
    limits = LIMITS
    body_prefix = b'{"requests":['
    separator = b","
    body_suffix = b"]}"

    def encode_item(
        self, provider: Provider, custom_id: str, messages: Sequence[Message], params: GenerationParams
    ) -> bytes:
        """``{"custom_id", "params"}`` with the Messages API body as ``params``."""
        options = provider.options or {}
        default_max = int(options.get("default_max_tokens", DEFAULT_MAX_TOKENS))
        body = build_body(provider.model, messages, params, default_max_tokens=default_max)
        item = {"custom_id": custom_id, "params": body}
        return json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")

    def upload_spec(self, provider: Provider, filename: str, size: int) -> UploadSpec | None:
        """No upload: the create call carries the requests."""
        return None

    def parse_upload(self, status: int, headers: Mapping[str, str], body: bytes) -> str:
        """Not used (no upload step)."""
        raise NotImplementedError("Anthropic Message Batches have no file upload")

    def create_request(self, provider: Provider, file_id: str | None, metadata: Mapping[str, str]) -> HTTPRequest:
        """``POST /messages/batches``; the body is streamed by the runner."""
        return HTTPRequest("POST", f"{provider.base_url}/messages/batches", _headers(provider), b"")

    def get_request(self, provider: Provider, batch_id: str) -> HTTPRequest:
        """``GET /messages/batches/{id}``."""
        return HTTPRequest("GET", f"{provider.base_url}/messages/batches/{batch_id}", _headers(provider, None), b"")

    def cancel_request(self, provider: Provider, batch_id: str) -> HTTPRequest:
        """``POST /messages/batches/{id}/cancel``."""
        return HTTPRequest(
            "POST", f"{provider.base_url}/messages/batches/{batch_id}/cancel", _headers(provider, None), b""
        )

    def list_request(self, provider: Provider) -> HTTPRequest | None:
        """Message batches carry no metadata to recognise ours by: not used."""
        return None

    def parse_list(
        self, status: int, headers: Mapping[str, str], body: bytes
    ) -> list[tuple[BatchInfo, Mapping[str, str]]]:
        """Not used (see :meth:`list_request`)."""
        return []

    def parse_batch(self, status: int, headers: Mapping[str, str], body: bytes) -> BatchInfo:
        """A message batch object, or the typed error of an error status."""
        if status >= 400:
            raise status_error(status, headers, body)
        return parse_batch_object(decode_json(body))

    def result_requests(self, provider: Provider, info: BatchInfo) -> list[HTTPRequest]:
        """``GET results_url`` (with the API key headers)."""
        if not info.output_ref:
            return []
        return [HTTPRequest("GET", info.output_ref, _headers(provider, None), b"")]

    def parse_result_line(self, line: bytes) -> RowResult:
        """See :func:`parse_result_line`."""
        return parse_result_line(line)


FORMAT = AnthropicBatchFormat()
