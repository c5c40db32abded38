"""The one place where native batches touch the network: small JSON calls with retries, streamed uploads
from a file on disk, and streamed downloads split into lines (never a whole file in memory).

aiohttp's exceptions are turned into the library's exception tree exactly as
:class:`nagents_frames.executor.HTTPTransport` does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import IO

import aiohttp

from nagents_frames.errors import APIConnectionError, APITimeoutError, MalformedResponseError, RequestError
from nagents_frames.executor import RetryPolicy, Timeouts
from nagents_frames.providers import Provider
from nagents_frames.providers._base import HTTPRequest, RawResponse, status_error

__all__ = ["BatchHTTP"]

_READ_SIZE = 256 * 1024
_MAX_LINE = 64 * 1024 * 1024  # a single result line larger than this is not a line but a broken file


def _wrapped(exc: BaseException, what: str) -> RequestError:
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return APITimeoutError(f"{what}: no answer in time")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return MalformedResponseError(f"{what}: response body was cut off ({type(exc).__name__})")
    if isinstance(exc, aiohttp.ClientResponseError):
        return MalformedResponseError(f"{what}: unreadable HTTP response: {exc.message}")
    return APIConnectionError(f"{what}: {type(exc).__name__}: {exc}")


def _file_chunks(handle: IO[bytes], prefix: bytes, suffix: bytes) -> Callable[[], AsyncIterator[bytes]]:
    """A factory of body iterators (one per attempt) over ``prefix`` + the file + ``suffix``."""

    async def body() -> AsyncIterator[bytes]:
        handle.seek(0)
        if prefix:
            yield prefix
        while True:
            block = handle.read(_READ_SIZE)
            if not block:
                break
            yield block
        if suffix:
            yield suffix

    return body


class BatchHTTP:
    """An aiohttp session for one provider's batch endpoints, with retries from a :class:`RetryPolicy`.

    Use as ``async with BatchHTTP(provider) as http:``.
    """

    def __init__(self, provider: Provider, *, retry: RetryPolicy | None = None, timeouts: Timeouts | None = None) -> None:
        self.provider = provider
        self.retry = retry or RetryPolicy()
        self.timeouts = timeouts or Timeouts()
        self._session: aiohttp.ClientSession | None = None
        self.calls = 0
        self.bytes_sent = 0
        self.bytes_received = 0

    async def __aenter__(self) -> BatchHTTP:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=8),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeouts.connect, sock_read=self.timeouts.request),
            skip_auto_headers=("User-Agent",),
            headers={"User-Agent": "nagents-frames"},
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The open session."""
        if self._session is None:
            raise RuntimeError("use 'async with BatchHTTP(...)'")
        return self._session

    def _redacted(self, error: RequestError) -> RequestError:
        clean = self.provider.redact(error.message)
        if clean != error.message:
            error.message = clean
            error.args = (clean,)
        return error

    async def _retrying(self, attempt_once: Callable[[], object], what: str) -> RawResponse:
        attempt = 0
        while True:
            attempt += 1
            try:
                raw = await attempt_once()  # type: ignore[misc]
                assert isinstance(raw, RawResponse)
                if raw.status >= 400:
                    raise status_error(raw.status, raw.headers, raw.body)
                return raw
            except RequestError as error:
                if self.retry.should_retry(error, attempt):
                    await asyncio.sleep(self.retry.delay(attempt, error))
                    continue
                raise self._redacted(error) from None

    async def call(self, request: HTTPRequest) -> RawResponse:
        """Send a small request (create, get, cancel, list); retry what the policy says; raise typed errors."""

        async def once() -> RawResponse:
            self.calls += 1
            try:
                async with self.session.request(
                    request.method,
                    request.url,
                    data=request.body or None,
                    headers=dict(request.headers),
                    timeout=aiohttp.ClientTimeout(total=self.timeouts.request, sock_connect=self.timeouts.connect),
                ) as resp:
                    return RawResponse(resp.status, resp.headers, await resp.read())
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise _wrapped(exc, f"{request.method} {request.url}") from exc

        return await self._retrying(once, f"{request.method} {request.url}")

    async def send_file(self, head: HTTPRequest, handle: IO[bytes], *, prefix: bytes = b"", suffix: bytes = b"") -> RawResponse:
        """Send ``prefix`` + the file + ``suffix`` as the body of ``head``, streamed from disk."""
        body = _file_chunks(handle, prefix, suffix)
        headers = dict(head.headers)
        if "Content-Length" not in headers:
            handle.seek(0, 2)
            headers["Content-Length"] = str(len(prefix) + handle.tell() + len(suffix))

        async def once() -> RawResponse:
            self.calls += 1
            self.bytes_sent += int(headers["Content-Length"])
            try:
                async with self.session.request(head.method, head.url, data=body(), headers=headers) as resp:
                    return RawResponse(resp.status, resp.headers, await resp.read())
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise _wrapped(exc, f"{head.method} {head.url}") from exc

        return await self._retrying(once, f"{head.method} {head.url}")

    async def lines(self, request: HTTPRequest) -> AsyncIterator[bytes]:
        """The non-empty lines of a download, streamed. Retried from the start while nothing was read;
        a failure after that is raised (the runner then downloads again and skips rows it already has)."""
        attempt = 0
        while True:
            attempt += 1
            started = False
            try:
                self.calls += 1
                async with self.session.request(request.method, request.url, headers=dict(request.headers)) as resp:
                    if resp.status >= 400:
                        raise status_error(resp.status, resp.headers, await resp.read())
                    buffer = b""
                    async for block in resp.content.iter_chunked(_READ_SIZE):
                        started = True
                        self.bytes_received += len(block)
                        buffer += block
                        if b"\n" not in block:
                            if len(buffer) > _MAX_LINE:
                                raise MalformedResponseError("a result line is larger than 64 MiB")
                            continue
                        *complete, buffer = buffer.split(b"\n")
                        for line in complete:
                            if line.strip():
                                yield line
                    if buffer.strip():
                        yield buffer
                    return
            except RequestError as error:
                if not started and self.retry.should_retry(error, attempt):
                    await asyncio.sleep(self.retry.delay(attempt, error))
                    continue
                raise self._redacted(error) from None
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                wrapped = _wrapped(exc, f"download {request.url}")
                if not started and self.retry.should_retry(wrapped, attempt):
                    await asyncio.sleep(self.retry.delay(attempt, wrapped))
                    continue
                raise self._redacted(wrapped) from exc
