"""The OpenAI Batch API as pure functions: JSONL request lines, the file upload, batch create / get /
cancel / list, and the lines of the output and error files.

Flow (driven by :class:`~nagents_frames.native_batch.NativeBatchRunner`)::

    POST {base}/files (multipart, purpose=batch)  ->  POST {base}/batches {input_file_id, endpoint, 24h}
    GET  {base}/batches/{id}  (poll)  ->  GET {base}/files/{output_file_id}/content + {error_file_id}/content

Lines come back in any order and are joined to requests by ``custom_id``.

>>> from nagents_frames import Provider
>>> from nagents_frames.types import GenerationParams
>>> p = Provider(provider_type="openai", model="gpt-4o-mini", api_key="k", base_url="http://127.0.0.1:9/v1")
>>> FORMAT.encode_item(p, "r0", [{"role": "user", "content": "hi"}], GenerationParams())[:40]
b'{"custom_id":"r0","method":"POST","url":'
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from nagents_frames.errors import BadRequestError, MalformedResponseError, RequestError
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
from nagents_frames.providers.openai import build_body, parse_chat_completion
from nagents_frames.types import GenerationParams, Message

if TYPE_CHECKING:
    from nagents_frames.providers import Provider

__all__ = ["ENDPOINT", "FORMAT", "LIMITS", "OpenAIBatchFormat", "parse_result_line"]

LIMITS = BatchLimits(max_requests=50_000, max_bytes=200_000_000)
"""OpenAI's limits per batch input file: 50,000 requests, 200 MB (decimal, the smaller reading)."""

ENDPOINT = "/v1/chat/completions"
"""The ``endpoint`` of every batch and the ``url`` of every line (a path, whatever the base URL)."""

_STATES = {
    "validating": NativeState.VALIDATING,
    "in_progress": NativeState.IN_PROGRESS,
    "finalizing": NativeState.FINALIZING,
    "completed": NativeState.COMPLETED,
    "failed": NativeState.FAILED,
    "expired": NativeState.EXPIRED,
    "cancelling": NativeState.CANCELLING,
    "cancelled": NativeState.CANCELLED,
}

# per-line error codes of requests the batch never ran: they may be sent again
_UNRUN_CODES = {"batch_expired": RowState.EXPIRED, "batch_cancelled": RowState.CANCELLED}


def _headers(provider: Provider, content_type: str | None = "application/json") -> dict[str, str]:
    headers: dict[str, str] = {}
    if content_type:
        headers["Content-Type"] = content_type
    if provider.api_key:
        headers["Authorization"] = f"Bearer {provider.api_key}"
    if provider.extra_headers:
        headers.update(provider.extra_headers)
    return headers


def _dumps(payload: Any) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")


def parse_result_line(line: bytes) -> RowResult:
    """One line of an output or error file.

    >>> body = {"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]}
    >>> line = json.dumps({"custom_id": "r3", "response": {"status_code": 200, "body": body}, "error": None})
    >>> r = parse_result_line(line.encode())
    >>> (r.custom_id, r.state.value, r.outcome.response)
    ('r3', 'succeeded', 'ok')
    """
    payload = decode_json(line)
    if not isinstance(payload, dict) or not isinstance(payload.get("custom_id"), str):
        raise MalformedResponseError(f"batch result line has no custom_id: {line[:80]!r}")
    custom_id: str = payload["custom_id"]
    error = payload.get("error")
    if isinstance(error, dict) and error:
        code = str(error.get("code") or "")
        state = _UNRUN_CODES.get(code)
        message = str(error.get("message") or code or "batch request failed")
        failure: RequestError = BadRequestError(f"{code}: {message}" if code else message)
        return RowResult(custom_id, state or RowState.FAILED, Outcome.failure(failure, attempts=0 if state else 1))
    response = payload.get("response")
    if not isinstance(response, dict):
        return RowResult(
            custom_id, RowState.FAILED, Outcome.failure(MalformedResponseError("batch result line has no response"), attempts=1)
        )
    status = int(response.get("status_code") or 0)
    body = response.get("body")
    try:
        if status >= 400 or status == 0:
            raise status_error(status or 500, {}, _dumps(body) if body is not None else b"")
        completion = parse_chat_completion(body)
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
            status_code=status,
        ),
    )


def parse_batch_object(payload: Any) -> BatchInfo:
    """A ``batch`` object of the API."""
    if not isinstance(payload, dict) or not isinstance(payload.get("id"), str):
        raise MalformedResponseError("batch object lacks an id")
    raw = str(payload.get("status") or "")
    state = _STATES.get(raw)
    if state is None:
        raise MalformedResponseError(f"unknown batch status {raw!r}")
    counts = payload.get("request_counts") or {}
    errors = payload.get("errors")
    text = None
    if isinstance(errors, dict) and errors.get("data"):
        text = "; ".join(
            f"{e.get('code')}: {e.get('message')}" + (f" (line {e['line']})" if e.get("line") else "")
            for e in errors["data"][:5]
            if isinstance(e, dict)
        )
    return BatchInfo(
        id=payload["id"],
        state=state,
        raw_status=raw,
        total=int(counts.get("total") or 0),
        succeeded=int(counts.get("completed") or 0),
        failed=int(counts.get("failed") or 0),
        output_ref=payload.get("output_file_id") or None,
        error_ref=payload.get("error_file_id") or None,
        errors=text,
    )


class OpenAIBatchFormat:
    """OpenAI Batch (and OpenAI-compatible servers that implement the same endpoints)."""

    name = "openai"
    limits = LIMITS
    body_prefix = b""
    separator = b""  # each line carries its own newline
    body_suffix = b""

    def encode_item(
        self, provider: Provider, custom_id: str, messages: Sequence[Message], params: GenerationParams
    ) -> bytes:
        """``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}`` and a newline."""
        line = {"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": build_body(provider.model, messages, params)}
        return _dumps(line) + b"\n"

    def upload_spec(self, provider: Provider, filename: str, size: int) -> UploadSpec | None:
        """A multipart ``POST /files`` with ``purpose=batch``; the file part is streamed by the runner."""
        boundary = f"nagents-{uuid.uuid4().hex}"
        prefix = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: application/jsonl\r\n\r\n"
        ).encode()
        suffix = f"\r\n--{boundary}--\r\n".encode()
        headers = _headers(provider, f"multipart/form-data; boundary={boundary}")
        headers["Content-Length"] = str(len(prefix) + size + len(suffix))
        return UploadSpec(HTTPRequest("POST", f"{provider.base_url}/files", headers, b""), prefix, suffix)

    def parse_upload(self, status: int, headers: Mapping[str, str], body: bytes) -> str:
        """The ``id`` of the uploaded file."""
        if status >= 400:
            raise status_error(status, headers, body)
        payload = decode_json(body)
        if not isinstance(payload, dict) or not isinstance(payload.get("id"), str):
            raise MalformedResponseError("file upload answer lacks an id")
        return str(payload["id"])

    def create_request(self, provider: Provider, file_id: str | None, metadata: Mapping[str, str]) -> HTTPRequest:
        """``POST /batches`` for an uploaded file."""
        body: dict[str, Any] = {"input_file_id": file_id, "endpoint": ENDPOINT, "completion_window": "24h"}
        if metadata:
            body["metadata"] = dict(metadata)
        return HTTPRequest("POST", f"{provider.base_url}/batches", _headers(provider), _dumps(body))

    def get_request(self, provider: Provider, batch_id: str) -> HTTPRequest:
        """``GET /batches/{id}``."""
        return HTTPRequest("GET", f"{provider.base_url}/batches/{batch_id}", _headers(provider, None), b"")

    def cancel_request(self, provider: Provider, batch_id: str) -> HTTPRequest:
        """``POST /batches/{id}/cancel``."""
        return HTTPRequest("POST", f"{provider.base_url}/batches/{batch_id}/cancel", _headers(provider), b"")

    def list_request(self, provider: Provider) -> HTTPRequest | None:
        """``GET /batches?limit=100`` (the most recent batches first)."""
        return HTTPRequest("GET", f"{provider.base_url}/batches?limit=100", _headers(provider, None), b"")

    def parse_list(
        self, status: int, headers: Mapping[str, str], body: bytes
    ) -> list[tuple[BatchInfo, Mapping[str, str]]]:
        """Batches with their ``metadata``."""
        if status >= 400:
            raise status_error(status, headers, body)
        payload = decode_json(body)
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, list):
            raise MalformedResponseError("batch list lacks data")
        return [(parse_batch_object(item), dict(item.get("metadata") or {})) for item in data if isinstance(item, dict)]

    def parse_batch(self, status: int, headers: Mapping[str, str], body: bytes) -> BatchInfo:
        """A batch object, or the typed error of an error status."""
        if status >= 400:
            raise status_error(status, headers, body)
        return parse_batch_object(decode_json(body))

    def result_requests(self, provider: Provider, info: BatchInfo) -> list[HTTPRequest]:
        """``GET /files/{id}/content`` of the output file and of the error file (when there are any)."""
        return [
            HTTPRequest("GET", f"{provider.base_url}/files/{ref}/content", _headers(provider, None), b"")
            for ref in (info.output_ref, info.error_ref)
            if ref
        ]

    def parse_result_line(self, line: bytes) -> RowResult:
        """See :func:`parse_result_line`."""
        return parse_result_line(line)


FORMAT = OpenAIBatchFormat()
