"""The fake server's fault knobs, checked with a plain aiohttp client (what users' tests will rely on)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any

import aiohttp
import pytest

from nagents_frames.testing import FakeLLMServer, ServerStats

pytestmark = pytest.mark.timeout(60)


async def post(session: aiohttp.ClientSession, server: FakeLLMServer, text: str = "hi", **kw: Any) -> tuple[int, Any, Any]:
    body = {"model": "echo", "messages": [{"role": "user", "content": text}]}
    async with session.post(f"{server.base_url}/chat/completions", json=body, **kw) as resp:
        raw = await resp.read()
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = raw
        return resp.status, resp.headers, payload


async def test_answers_echo_with_usage() -> None:
    async with FakeLLMServer() as server, aiohttp.ClientSession() as session:
        status, _headers, payload = await post(session, server, "hello")
    assert status == 200
    assert payload["choices"][0]["message"]["content"] == "echo: hello"
    assert payload["usage"]["total_tokens"] > 0
    assert server.stats.requests == 1 and server.stats.prompts["hello"] == 1


def test_unknown_knob_is_rejected() -> None:
    with pytest.raises(TypeError, match="unknown server knob"):
        FakeLLMServer(no_such_knob=1)


async def test_storm_seconds_is_time_bound_and_sends_retry_after() -> None:
    server = FakeLLMServer(storm_seconds=0.2, retry_after=1.5, burst_status=429)
    async with server, aiohttp.ClientSession() as session:
        status, headers, payload = await post(session, server)
        assert status == 429 and headers["retry-after"] == "1.5"
        assert payload["error"]["type"] == "rate_limit_exceeded"
        await asyncio.sleep(0.25)
        status, _, _ = await post(session, server)
        assert status == 200
        server.configure(storm_seconds=0.2, burst_status=503)
        status, _, _ = await post(session, server)
        assert status == 503


async def test_burst_counts_down() -> None:
    async with FakeLLMServer(burst_429=2, burst_status=503) as server, aiohttp.ClientSession() as session:
        statuses = [(await post(session, server))[0] for _ in range(3)]
    assert statuses == [503, 503, 200]
    assert server.stats.by_status == {503: 2, 200: 1}


async def test_rpm_limit_with_and_without_headers() -> None:
    async with FakeLLMServer(rpm_limit=2) as server, aiohttp.ClientSession() as session:
        first = await post(session, server)
        second = await post(session, server)
        third = await post(session, server)
    assert [first[0], second[0], third[0]] == [200, 200, 429]
    assert first[1]["x-ratelimit-limit-requests"] == "2"
    assert first[1]["x-ratelimit-remaining-requests"] == "1"
    assert second[1]["x-ratelimit-remaining-requests"] == "0"
    assert 59 < float(third[1]["retry-after"]) <= 60
    server = FakeLLMServer(rpm_limit=1, rate_limit_headers=False, retry_after_on_limit=False)
    async with server, aiohttp.ClientSession() as session:
        ok = await post(session, server)
        limited = await post(session, server)
    assert ok[0] == 200 and "x-ratelimit-limit-requests" not in ok[1]
    assert limited[0] == 429 and "retry-after" not in limited[1]


async def test_faults_reach_the_client_as_transport_failures() -> None:
    async with aiohttp.ClientSession() as session:
        async with FakeLLMServer(drop_rate=1.0) as server:
            with pytest.raises(aiohttp.ClientError):
                await post(session, server)
        async with FakeLLMServer(truncate_rate=1.0) as server:
            with pytest.raises(aiohttp.ClientPayloadError):
                await post(session, server)
        async with FakeLLMServer(malformed_rate=1.0) as server:
            status, _, payload = await post(session, server)
            assert status == 200 and isinstance(payload, bytes) and b"garbage" in payload
        async with FakeLLMServer(missing_fields_rate=1.0) as server:
            status, _, payload = await post(session, server)
            assert status == 200 and "choices" not in payload
        async with FakeLLMServer(hang_rate=1.0) as server:
            with pytest.raises(asyncio.TimeoutError):
                await post(session, server, timeout=aiohttp.ClientTimeout(total=0.2))


async def test_slow_body_dribbles_out() -> None:
    async with FakeLLMServer(slow_body=0.2) as server, aiohttp.ClientSession() as session:
        started = time.monotonic()
        status, _, payload = await post(session, server, "slow")
        assert status == 200 and payload["choices"][0]["message"]["content"] == "echo: slow"
        assert time.monotonic() - started >= 0.15  # the body really took its time


def test_stopping_does_not_wait_for_hung_requests() -> None:
    server = FakeLLMServer(hang_rate=1.0).start()

    async def fire() -> None:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(asyncio.TimeoutError):
                await post(session, server, timeout=aiohttp.ClientTimeout(total=0.1))

    asyncio.run(fire())
    started = time.monotonic()
    server.stop()
    # a hung handler is released at stop instead of holding the shutdown for aiohttp's default minute
    assert time.monotonic() - started < 10


async def test_auth_and_model_checks() -> None:
    async with FakeLLMServer(api_key="sk-good", models=["m1"]) as server, aiohttp.ClientSession() as session:
        status, _, _ = await post(session, server, headers={"Authorization": "Bearer sk-bad"})
        assert status == 401
        body = {"model": "nope", "messages": [{"role": "user", "content": "x"}]}
        async with session.post(
            f"{server.base_url}/chat/completions", json=body, headers={"Authorization": "Bearer sk-good"}
        ) as resp:
            assert resp.status == 404


def test_max_rate_counts_closed_windows() -> None:
    stats = ServerStats(arrivals=[0.0, 0.5, 1.0, 1.01, 3.0])
    assert stats.max_rate(window=1.0) == 3  # [0, 0.5, 1.0]: both ends count
    assert stats.max_rate(window=1.01) == 4
    assert stats.max_rate(window=0.1) == 2
    assert ServerStats().max_rate() == 0


def test_runs_as_a_process_and_prints_its_url() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "nagents_frames.testing", "--rpm-limit", "5", "--no-bodies"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert info["base_url"].startswith("http://127.0.0.1:")

        async def check() -> None:
            async with aiohttp.ClientSession() as session:
                body = {"model": "echo", "messages": [{"role": "user", "content": "x"}]}
                async with session.post(f"{info['base_url']}/chat/completions", json=body) as resp:
                    assert resp.status == 200
                    assert resp.headers["x-ratelimit-limit-requests"] == "5"

        asyncio.run(check())
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)
    assert proc.returncode == 0
