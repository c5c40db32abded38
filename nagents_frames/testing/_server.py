"""A fake LLM server on aiohttp.web with fault injection, for our tests and for users' tests."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import random
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from aiohttp import web

__all__ = ["FakeLLMServer", "ServerBehavior", "ServerStats", "answer_for"]

Handler = Callable[["FakeLLMServer", web.Request], Awaitable[web.StreamResponse]]


@dataclass
class ServerBehavior:
    """The knobs of the fake server. Change them at any time with :meth:`FakeLLMServer.configure`.

    Rates are probabilities per request (0..1), drawn from a seeded generator.

    Attributes:
        latency: seconds before answering (plus up to ``latency_jitter`` more).
        error_rate / error_status: answer ``error_status`` (500) with this probability.
        rate_limit_rate: answer 429 with this probability; ``retry_after`` (seconds) is sent with every 429
            when set.
        rpm_limit: a real limit: more than this many requests in any 60 s window get 429 (with a
            ``retry-after`` saying when a slot frees and ``x-ratelimit-*`` headers on every answer).
        malformed_rate: answer 200 with a body that is not JSON.
        missing_fields_rate: answer 200 with JSON lacking ``choices``.
        drop_rate: close the connection without answering.
        truncate_rate: promise a longer body than is sent, then close.
        hang_rate: never answer (until the client gives up).
        slow_body: seconds to dribble the body out over (in pieces).
        fail_first: the first N attempts of each distinct prompt get ``fail_first_status``.
        error_on_content: a prompt containing the key is always answered with the status value.
        api_key: when set, requests without this key get 401.
        models: when set, other model names get 404.
        echo_prefix: the answer is ``echo_prefix + last user message``.
        burst_429: the next N requests get ``burst_status`` (429: a storm; 503: an outage), then normal
            service resumes; ``retry_after`` is sent with them when set.
        burst_status: the status of ``burst_429`` and ``storm_seconds`` answers.
        storm_seconds: for this many seconds from when it is set, every request gets ``burst_status``
            (with ``retry_after`` when set): a time-bound 429 storm or 503 outage.
        rate_limit_headers: send ``x-ratelimit-*`` headers with ``rpm_limit`` (off: the client only sees 429s).
        retry_after_on_limit: send ``retry-after`` with the 429s of ``rpm_limit``.

    >>> ServerBehavior(error_rate=0.2).error_status
    500
    """

    latency: float = 0.0
    latency_jitter: float = 0.0
    error_rate: float = 0.0
    error_status: int = 500
    rate_limit_rate: float = 0.0
    retry_after: float | None = None
    rpm_limit: int | None = None
    malformed_rate: float = 0.0
    missing_fields_rate: float = 0.0
    drop_rate: float = 0.0
    truncate_rate: float = 0.0
    hang_rate: float = 0.0
    slow_body: float = 0.0
    fail_first: int = 0
    fail_first_status: int = 503
    error_on_content: Mapping[str, int] = field(default_factory=dict)
    api_key: str | None = None
    models: frozenset[str] | None = None
    echo_prefix: str = "echo: "
    burst_429: int = 0
    burst_status: int = 429
    storm_seconds: float = 0.0
    rate_limit_headers: bool = True
    retry_after_on_limit: bool = True


@dataclass
class ServerStats:
    """What the server saw. ``prompts`` counts requests per last user message (attempts included);
    ``arrivals`` are ``time.monotonic()`` stamps of every request, in arrival order.

    >>> ServerStats(arrivals=[0.0, 0.1, 0.2, 5.0]).max_rate(window=1.0)
    3
    """

    requests: int = 0
    answered: int = 0
    by_status: collections.Counter[int] = field(default_factory=collections.Counter)
    prompts: collections.Counter[str] = field(default_factory=collections.Counter)
    arrivals: list[float] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    keep_bodies: bool = True

    def max_rate(self, window: float = 60.0) -> int:
        """The most requests that arrived within any ``window`` seconds (a closed interval)."""
        best = 0
        start = 0
        times = sorted(self.arrivals)
        for end, t in enumerate(times):
            while t - times[start] > window:
                start += 1
            best = max(best, end - start + 1)
        return best


def answer_for(messages: list[dict[str, Any]], prefix: str = "echo: ") -> str:
    """The fake server's deterministic answer: the prefix and the last user message's text."""
    return prefix + last_user_text(messages)


def last_user_text(messages: Any) -> str:
    """The text of the last user message (content parts joined)."""
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role", "user") == "user":
            return content_text(message.get("content"))
    return ""


def content_text(content: Any) -> str:
    """Plain text of a message content (a string or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", "")) if isinstance(part, dict) else str(part) for part in content
        )
    return "" if content is None else str(content)


def count_tokens(text: str) -> int:
    """The fake tokenizer: about four characters a token, at least one."""
    return max(1, len(text) // 4)


class FakeLLMServer:
    """An OpenAI-compatible chat server on 127.0.0.1 with knobs for faults and limits.

    Run it in the test's event loop (``async with FakeLLMServer() as server``) or in a thread of its own
    (``with FakeLLMServer() as server``, or ``server.start()`` / ``server.stop()``) when the code under
    test blocks, like :func:`~nagents_frames.batch_complete`.

    ``server.base_url`` is ``http://127.0.0.1:PORT/v1``: pass it to a
    :class:`~nagents_frames.Provider`. Other API formats (Anthropic, Gemini, batch endpoints) are
    registered with :meth:`add_route` by their own modules.

    >>> with FakeLLMServer(latency=0.0) as server:
    ...     server.base_url.startswith("http://127.0.0.1:")
    True
    """

    _extensions: ClassVar[list[Callable[[FakeLLMServer, web.Application], None]]] = []

    def __init__(self, *, port: int = 0, seed: int = 0, **behavior: Any) -> None:
        self._storm_until = 0.0
        self.behavior = ServerBehavior()
        self.configure(**behavior)
        self.stats = ServerStats()
        self.port = port
        self.seed = seed
        self._rng = random.Random(seed)
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._window: collections.deque[float] = collections.deque()
        self._hangs_released: asyncio.Event | None = None
        self._attempts: collections.Counter[str] = collections.Counter()
        self.state: dict[str, Any] = {}
        """Room for route modules (batch endpoints) to keep their data."""

    # --- configuration -------------------------------------------------------------------------------

    def configure(self, **behavior: Any) -> FakeLLMServer:
        """Change knobs of :class:`ServerBehavior` (unknown names raise ``TypeError``)."""
        known = {f.name for f in fields(ServerBehavior)}
        for name, value in behavior.items():
            if name not in known:
                raise TypeError(f"unknown server knob {name!r}; known: {', '.join(sorted(known))}")
            if name == "models" and value is not None:
                value = frozenset(value)
            if name == "storm_seconds":
                self._storm_until = time.monotonic() + float(value or 0.0)
            setattr(self.behavior, name, value)
        return self

    def reset_stats(self) -> None:
        """Forget what the server saw so far."""
        self.stats = ServerStats(keep_bodies=self.stats.keep_bodies)
        self._attempts.clear()

    @classmethod
    def register(cls, extension: Callable[[FakeLLMServer, web.Application], None]) -> None:
        """Add routes of another API format to every server created afterwards."""
        if extension not in cls._extensions:
            cls._extensions.append(extension)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (no version path)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``, the base URL of OpenAI-compatible and Anthropic providers."""
        return f"{self.url}/v1"

    # --- lifecycle -------------------------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        # route modules of the other formats register themselves on import
        from nagents_frames.testing import _formats  # noqa: F401

        for extension in self._extensions:
            extension(self, app)
        return app

    async def astart(self) -> FakeLLMServer:
        """Start serving in the running event loop."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(1024)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self._hangs_released = asyncio.Event()
        # hung and slow handlers must not hold a test's teardown for aiohttp's default minute
        self._runner = web.AppRunner(self._app(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.SockSite(self._runner, sock, backlog=1024)
        await site.start()
        return self

    async def astop(self) -> None:
        """Stop serving (in the loop that started it)."""
        if self._hangs_released is not None:
            self._hangs_released.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeLLMServer:
        return await self.astart()

    async def __aexit__(self, *exc: object) -> None:
        await self.astop()

    def start(self) -> FakeLLMServer:
        """Start serving in a background thread with its own event loop."""
        started = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.astart())
                self._stopping = asyncio.Event()
            except BaseException as exc:  # report to the starting thread
                failure.append(exc)
                started.set()
                return
            started.set()
            try:
                loop.run_until_complete(self._stopping.wait())
                loop.run_until_complete(self.astop())
            finally:
                loop.close()

        self._thread = threading.Thread(target=main, name="fake-llm-server", daemon=True)
        self._thread.start()
        started.wait(30)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        """Stop the background thread started by :meth:`start`."""
        if self._thread is None or self._loop is None or self._stopping is None:
            return
        self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(30)
        self._thread = None

    def __enter__(self) -> FakeLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- shared request handling ----------------------------------------------------------------------

    async def handle(
        self,
        request: web.Request,
        *,
        key: str | None,
        model: str | None,
        prompt: str,
        answer: Callable[[str], web.StreamResponse],
        error: Callable[[int, str, Mapping[str, str]], web.StreamResponse],
    ) -> web.StreamResponse:
        """Apply every knob to one request, then answer with ``answer(text)`` or ``error(status, msg, hdrs)``.

        Route modules of other formats call this with their own body builders so that faults, limits and
        statistics behave the same in every format.
        """
        b = self.behavior
        stats = self.stats
        now = time.monotonic()
        stats.requests += 1
        stats.arrivals.append(now)
        stats.prompts[prompt] += 1
        stats.paths.append(request.path)
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            headers: dict[str, str] = {}
            if b.api_key is not None and key != b.api_key:
                return self._count(error(401, "Incorrect API key provided.", headers))
            if b.models is not None and model not in b.models:
                return self._count(error(404, f"The model '{model}' does not exist", headers))
            if b.rpm_limit is not None:
                window = self._window
                while window and now - window[0] >= 60.0:
                    window.popleft()
                remaining = b.rpm_limit - len(window)
                reset = 60.0 - (now - window[0]) if window else 0.0
                if b.rate_limit_headers:
                    headers["x-ratelimit-limit-requests"] = str(b.rpm_limit)
                    headers["x-ratelimit-remaining-requests"] = str(max(remaining - 1, 0))
                    headers["x-ratelimit-reset-requests"] = f"{reset:.3f}s"
                if remaining <= 0:
                    if b.retry_after_on_limit:
                        headers["retry-after"] = f"{max(reset, 0.05):.3f}"
                    return self._count(error(429, "Rate limit reached for requests", headers))
                window.append(now)
            if b.burst_429 > 0 or now < self._storm_until:
                if b.burst_429 > 0:
                    b.burst_429 -= 1
                if b.retry_after is not None:
                    headers["retry-after"] = f"{b.retry_after:g}"
                return self._count(error(b.burst_status, f"burst of {b.burst_status} answers", headers))
            for needle, status in b.error_on_content.items():
                if needle in prompt:
                    return self._count(error(status, f"content rule {needle!r} answered {status}", headers))
            if b.fail_first:
                self._attempts[prompt] += 1
                if self._attempts[prompt] <= b.fail_first:
                    return self._count(error(b.fail_first_status, "transient failure (fail_first)", headers))
            rng = self._rng
            if b.latency or b.latency_jitter:
                await asyncio.sleep(b.latency + (rng.random() * b.latency_jitter if b.latency_jitter else 0.0))
            if b.hang_rate and rng.random() < b.hang_rate:
                # hang until the client gives up (then drop), or until the server stops
                released = self._hangs_released
                if released is not None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(released.wait(), 3600)
                self._drop(request)
                return self._count(web.Response(status=599))
            if b.rate_limit_rate and rng.random() < b.rate_limit_rate:
                if b.retry_after is not None:
                    headers["retry-after"] = f"{b.retry_after:g}"
                return self._count(error(429, "Rate limit reached", headers))
            if b.error_rate and rng.random() < b.error_rate:
                return self._count(error(b.error_status, "The server had an error", headers))
            if b.drop_rate and rng.random() < b.drop_rate:
                self._drop(request)
                return self._count(web.Response(status=599))
            if b.malformed_rate and rng.random() < b.malformed_rate:
                return self._count(web.Response(status=200, text="<html>garbage{", content_type="text/html"))
            if b.missing_fields_rate and rng.random() < b.missing_fields_rate:
                return self._count(web.json_response({"id": "x", "object": "chat.completion"}))
            if b.truncate_rate and rng.random() < b.truncate_rate:
                return self._count(await self._truncated(request))
            response = answer(b.echo_prefix + prompt)
            response.headers.update(headers)
            if b.slow_body and isinstance(response, web.Response) and response.body is not None:
                return self._count(await self._dribble(request, response))
            return self._count(response)
        finally:
            stats.in_flight -= 1

    def _count(self, response: web.StreamResponse) -> web.StreamResponse:
        self.stats.by_status[response.status] += 1
        if response.status < 400:
            self.stats.answered += 1
        return response

    @staticmethod
    def _drop(request: web.Request) -> None:
        transport = request.transport
        if transport is not None:
            transport.abort()

    @staticmethod
    async def _truncated(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.content_length = 500
        await response.prepare(request)
        await response.write(b'{"id": "trunc", "choices": [')
        FakeLLMServer._drop(request)
        return response

    async def _dribble(self, request: web.Request, full: web.Response) -> web.StreamResponse:
        body = bytes(full.body) if isinstance(full.body, bytes | bytearray) else b""
        response = web.StreamResponse(status=full.status, headers=full.headers)
        response.content_length = len(body)
        await response.prepare(request)
        pieces = 4
        step = max(1, len(body) // pieces)
        try:
            for start in range(0, len(body), step):
                await asyncio.sleep(self.behavior.slow_body / pieces)
                await response.write(body[start : start + step])
            await response.write_eof()
        except ConnectionError:
            pass  # the client gave up (its timeout) while the body was dribbling out
        return response

    async def read_json(self, request: web.Request) -> Any:
        """The request body as JSON (kept in ``stats.bodies`` / ``stats.headers`` when ``keep_bodies``)."""
        raw = await request.read()
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = None
        if self.stats.keep_bodies:
            self.stats.bodies.append(payload if isinstance(payload, dict) else {"_raw": raw[:200].decode("utf-8", "replace")})
            self.stats.headers.append(dict(request.headers))
        return payload

    # --- OpenAI chat completions ----------------------------------------------------------------------

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        payload = await self.read_json(request)
        if not isinstance(payload, dict) or not isinstance(payload.get("messages"), list):
            return openai_error(400, "Invalid request: 'messages' must be a list", {})
        auth = request.headers.get("Authorization", "")
        key = auth[7:] if auth.startswith("Bearer ") else None
        messages = payload["messages"]
        prompt = last_user_text(messages)
        model = str(payload.get("model"))
        prompt_tokens = sum(count_tokens(content_text(m.get("content"))) for m in messages if isinstance(m, dict))

        def answer(text: str) -> web.StreamResponse:
            max_tokens = payload.get("max_tokens") or payload.get("max_completion_tokens")
            finish = "stop"
            if isinstance(max_tokens, int) and count_tokens(text) > max_tokens:
                text = text[: max_tokens * 4]
                finish = "length"
            return web.json_response(
                {
                    "id": f"chatcmpl-{self.stats.requests}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                    ],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": count_tokens(text),
                        "total_tokens": prompt_tokens + count_tokens(text),
                    },
                }
            )

        return await self.handle(request, key=key, model=model, prompt=prompt, answer=answer, error=openai_error)

    async def _models(self, request: web.Request) -> web.StreamResponse:
        names = sorted(self.behavior.models or {"echo"})
        return web.json_response({"object": "list", "data": [{"id": n, "object": "model"} for n in names]})

    async def _health(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"ok": True})


def openai_error(status: int, message: str, headers: Mapping[str, str]) -> web.StreamResponse:
    """An error response in the OpenAI format."""
    kind = {401: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_exceeded"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error"
    )
    return web.json_response(
        {"error": {"message": message, "type": kind, "param": None, "code": None}}, status=status, headers=headers
    )
