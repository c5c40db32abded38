"""What every provider adapter is: pure functions from a request to an HTTP request, and from an HTTP
response to a :class:`Completion` (or a typed :class:`~nagents_frames.errors.RequestError`).

Adapters never open sockets, sleep or retry: the executor does all of that. That keeps each adapter a
small, fully testable translation of one API's documented format.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from typing import TYPE_CHECKING, Any, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from nagents_frames.errors import MalformedResponseError, RequestError, error_for_status
from nagents_frames.types import GenerationParams, Message, Usage

if TYPE_CHECKING:
    from nagents_frames.providers import Provider

__all__ = [
    "Adapter",
    "Completion",
    "HTTPRequest",
    "RawResponse",
    "decode_json",
    "get_header",
    "parse_retry_after",
    "status_error",
]


@dataclass(frozen=True, slots=True)
class HTTPRequest:
    """A request ready to send. ``headers`` may hold the API key: never log or store them."""

    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes

    def __repr__(self) -> str:  # the headers may carry a key
        return f"HTTPRequest(method={self.method!r}, url={self.url!r}, body={len(self.body)} bytes)"


@dataclass(frozen=True, slots=True)
class RawResponse:
    """What came back over the wire (or from an in-process runtime speaking the same format)."""

    status: int
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class Completion:
    """A parsed successful answer."""

    text: str
    usage: Usage | None = None
    finish_reason: str | None = None


class Adapter(Protocol):
    """One API's request format and response format."""

    def build_request(
        self, provider: Provider, messages: Sequence[Message], params: GenerationParams
    ) -> HTTPRequest:
        """Translate messages and parameters into this API's HTTP request."""
        ...

    def parse_response(self, status: int, headers: Mapping[str, str], body: bytes) -> Completion:
        """Parse a response; raise a :class:`RequestError` subclass for anything but a good answer."""
        ...


def decode_json(body: bytes) -> Any:
    """Decode a JSON body, turning every decoding failure into :class:`MalformedResponseError`."""
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        snippet = body[:80].decode("utf-8", "replace")
        raise MalformedResponseError(f"response body is not JSON ({len(body)} bytes): {snippet!r}") from exc


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from ``retry-after-ms`` / ``retry-after`` (seconds or an HTTP date)."""
    ms = get_header(headers, "retry-after-ms")
    if ms is not None:
        try:
            return max(float(ms) / 1000.0, 0.0)
        except ValueError:
            pass
    value = get_header(headers, "retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    from datetime import datetime
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


def get_header(headers: Mapping[str, str], name: str) -> str | None:
    """A header by lower-case ``name``, case-insensitively also in plain dicts (tests, in-process runtimes).

    aiohttp's headers are already case-insensitive: no scan for them (this runs on every response).

    >>> get_header({"Retry-After": "2"}, "retry-after")
    '2'
    """
    value = headers.get(name)
    if value is None and not isinstance(headers, CIMultiDictProxy | CIMultiDict):
        for key, candidate in headers.items():
            if key.lower() == name:
                return candidate
    return value


def status_error(status: int, headers: Mapping[str, str], body: bytes) -> RequestError:
    """The typed error for an HTTP error response, with the server's own message when it sent one.

    Understands the error bodies of OpenAI (``{"error": {"message"}}``), Anthropic
    (``{"type": "error", "error": {"message"}}``) and Gemini (``{"error": {"message", "status"}}``).
    """
    message = ""
    try:
        payload = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        payload = None
    if isinstance(payload, dict):
        err = payload.get("error")
        if isinstance(err, dict):
            message = str(err.get("message") or err.get("status") or err.get("type") or "")
        elif isinstance(err, str):
            message = err
        elif isinstance(payload.get("message"), str):
            message = payload["message"]
    if not message:
        message = body[:200].decode("utf-8", "replace").strip() or "(empty body)"
    return error_for_status(status, message, retry_after=parse_retry_after(headers))
