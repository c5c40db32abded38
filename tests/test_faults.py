"""Fault injection: the executor and batch_complete against a misbehaving fake server, and bad input.

Every scenario checks the same promises: every row ends with a response or an error, the job ends, no
request is tried more often than the retry budget allows (counted by the server), and the requests per
time window the server saw stay within the configured budget (plus the limiter's documented burst).
"""

from __future__ import annotations

import _thread
import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pytest

from nagents_frames import AuthenticationError, Provider, batch_complete
from nagents_frames.errors import ColumnTypeError
from nagents_frames.executor import Executor, Outcome, PreparedRequest, RetryPolicy, Timeouts
from nagents_frames.frames import abatch_complete
from nagents_frames.ratelimit import DEFAULT_BURST_S
from nagents_frames.testing import FakeLLMServer
from tests.conftest import frame_to_pydict

pytestmark = pytest.mark.timeout(60)

RPM = 3000
POLICY = RetryPolicy(max_attempts=4, base_delay=0.02, max_delay=0.2, max_retry_after=0.5)
RETRYABLE_TYPES = {
    "RateLimitError",
    "ServerError",
    "APITimeoutError",
    "APIConnectionError",
    "MalformedResponseError",
}


def assert_within_rpm(arrivals: list[float], rpm: float) -> None:
    """Server-side arrivals never beat the budget: in any window of W seconds at most rate*W plus the
    bucket's burst (a quarter second of budget), plus a small margin (10% of the window's budget and
    three requests) because the server stamps arrivals when its loop gets to them, which on a busy
    machine bunches requests the client sent apart. The strict client-side invariant is checked on a
    fake clock in test_ratelimit.py."""
    rate = rpm / 60.0
    capacity = max(rate * DEFAULT_BURST_S, 1.0)
    stamps = sorted(arrivals)
    for window in (0.5, 1.0, 2.0):
        start = 0
        worst = 0
        for end, t in enumerate(stamps):
            while t - stamps[start] > window:
                start += 1
            worst = max(worst, end - start + 1)
        assert worst <= 1.1 * rate * window + capacity + 3, f"{worst} requests within {window}s at rpm={rpm}"


SCENARIOS: dict[str, dict[str, Any]] = {
    "429 storm with retry-after": {"storm_seconds": 0.4, "retry_after": 0.1},
    "429 storm without retry-after": {"storm_seconds": 0.4},
    "random 429s with retry-after": {"rate_limit_rate": 0.3, "retry_after": 0.05},
    "20% 500s": {"error_rate": 0.2},
    "503 burst": {"burst_429": 30, "burst_status": 503},
    "529 overloaded burst": {"burst_429": 20, "burst_status": 529, "retry_after": 0.05},
    "timeouts": {"hang_rate": 0.1},
    "connection resets": {"drop_rate": 0.2},
    "garbage bodies": {"malformed_rate": 0.2},
    "missing fields": {"missing_fields_rate": 0.2},
    "truncated bodies": {"truncate_rate": 0.2},
    "slow bodies": {"slow_body": 0.1},
    "slow bodies past the timeout": {"slow_body": 1.0, "latency_jitter": 0.0},
    "everything at once": {
        "error_rate": 0.05,
        "rate_limit_rate": 0.05,
        "retry_after": 0.05,
        "drop_rate": 0.05,
        "malformed_rate": 0.05,
        "truncate_rate": 0.05,
        "hang_rate": 0.03,
        "latency_jitter": 0.02,
    },
}


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_fault_scenario(name: str) -> None:
    knobs = SCENARIOS[name]
    n = 16 if name == "slow bodies past the timeout" else 60  # every row burns four timeouts
    requests = [
        PreparedRequest(i, str(i), f"k{i}", ({"role": "user", "content": f"row {i}"},)) for i in range(n)
    ]
    async with FakeLLMServer(seed=7, **knobs) as server:
        provider = Provider(provider_type="openai_compatible", model="echo", base_url=server.base_url)
        timeouts = Timeouts(connect=1.0, request=0.3)
        outcomes: list[tuple[PreparedRequest, Outcome]] = []
        async with Executor(provider, concurrency=16, rpm=RPM, retry=POLICY, timeouts=timeouts) as ex:
            async for chunk, chunk_outcomes in ex.run([requests[i : i + 15] for i in range(0, n, 15)]):
                outcomes.extend(zip(chunk, chunk_outcomes))
        stats = server.stats
        report = ex.stats.report()

        # every row ends with exactly one of response / error, in input order
        assert [r.index for r, _ in outcomes] == list(range(n))
        for request, outcome in outcomes:
            assert (outcome.response is None) != (outcome.error is None)
            if outcome.response is not None:
                assert outcome.response == f"echo: row {request.index}"
            else:
                assert outcome.error_type in RETRYABLE_TYPES, outcome.error
                assert outcome.attempts == POLICY.max_attempts
        # no request retried past its budget, counted where it matters: at the server
        assert max(stats.prompts.values()) <= POLICY.max_attempts
        assert report.requests_sent == stats.requests == sum(o.attempts for _, o in outcomes)
        assert report.total_retries == report.requests_sent - n
        assert report.succeeded + report.failed == n
        # the budget held, retries included
        assert_within_rpm(stats.arrivals, RPM)
    if name == "slow bodies past the timeout":
        assert report.failed == n and report.errors == {"APITimeoutError": n}
    else:
        # with four attempts against these fault rates nearly every row gets through
        assert report.succeeded >= 0.85 * n, report


async def test_429_storm_slows_the_whole_executor() -> None:
    """A storm shrinks the requests in flight and pauses every worker, and recovers afterwards."""
    async with FakeLLMServer(storm_seconds=0.3) as server:
        provider = Provider(provider_type="openai_compatible", model="echo", base_url=server.base_url)
        requests = [PreparedRequest(i, str(i), f"k{i}", ({"role": "user", "content": f"r{i}"},)) for i in range(300)]
        policy = RetryPolicy(max_attempts=10, base_delay=0.02, max_delay=0.2)
        async with Executor(provider, concurrency=32, retry=policy) as ex:
            out = [o async for _, chunk in ex.run([requests]) for o in chunk]
        report = ex.stats.report()
        storm_hits = server.stats.by_status[429]
    assert all(o.error is None for o in out)
    assert report.slowdowns >= 1 and report.min_concurrency is not None and report.min_concurrency < 32
    assert report.pauses >= 1
    # without a slowdown, 32 workers hammering a 0.3 s storm with ~20 ms backoffs send about 170
    assert storm_hits < 100, storm_hits  # typically 20-40; without AIMD and the pauses about 170
    assert report.rate_limited == storm_hits


async def test_no_thundering_herd_after_retry_after() -> None:
    """When a retry-after pause ends, the waiting requests leave spread out, not in one burst."""
    async with FakeLLMServer(burst_429=1, retry_after=0.3, latency=0.05) as server:
        provider = Provider(provider_type="openai_compatible", model="echo", base_url=server.base_url)
        requests = [PreparedRequest(i, str(i), f"k{i}", ({"role": "user", "content": f"r{i}"},)) for i in range(64)]
        async with Executor(provider, concurrency=32, retry=POLICY) as ex:
            out = [o async for _, chunk in ex.run([requests]) for o in chunk]
        arrivals = sorted(server.stats.arrivals)
    assert all(o.error is None for o in out)
    after = [t for t in arrivals if t - arrivals[0] >= 0.25]
    assert len(after) >= 30
    # 31 requests were waiting; when the pause ends only a few go first, the rest as answers come back
    first_50ms = sum(1 for t in after if t - after[0] <= 0.05)
    assert first_50ms <= 8, f"{first_50ms} requests left in the first 50 ms after the pause"
    first_100ms = sum(1 for t in after if t - after[0] <= 0.1)
    assert first_100ms <= 16, f"{first_100ms} requests left in the first 100 ms after the pause"


async def test_learned_limit_keeps_under_a_server_rpm_limit() -> None:
    """No rpm given: the limiter adopts the server's announced limit and never gets a 429."""
    async with FakeLLMServer(rpm_limit=1200) as server:
        provider = Provider(provider_type="openai_compatible", model="echo", base_url=server.base_url)
        requests = [PreparedRequest(i, str(i), f"k{i}", ({"role": "user", "content": f"r{i}"},)) for i in range(25)]
        async with Executor(provider, concurrency=16) as ex:
            out = [o async for _, chunk in ex.run([requests]) for o in chunk]
        assert server.stats.by_status[429] == 0
        assert ex.limiter.learned_rpm == 1200
        assert_within_rpm(server.stats.arrivals, 1200)
    assert all(o.error is None for o in out)


async def test_server_limit_without_headers_ends_every_row_within_budget() -> None:
    """Only 429 + a long retry-after to go by (capped by the policy): the rows beyond the server's limit
    end as RateLimitError after exactly their attempts, the others are answered, and the job ends."""
    async with FakeLLMServer(rpm_limit=10, rate_limit_headers=False) as server:
        provider = Provider(provider_type="openai_compatible", model="echo", base_url=server.base_url)
        requests = [PreparedRequest(i, str(i), f"k{i}", ({"role": "user", "content": f"r{i}"},)) for i in range(12)]
        policy = RetryPolicy(max_attempts=3, base_delay=0.01, max_retry_after=0.05)
        async with Executor(provider, concurrency=4, retry=policy) as ex:
            out = [o async for _, chunk in ex.run([requests]) for o in chunk]
        assert server.stats.answered == 10
        assert max(server.stats.prompts.values()) <= policy.max_attempts
    failed = [o for o in out if o.error is not None]
    assert len(failed) == 2
    assert all(o.error_type == "RateLimitError" and o.status_code == 429 and o.attempts == 3 for o in failed)
    report = ex.stats.report()
    assert report.errors == {"RateLimitError": 2} and report.retries == {"RateLimitError": 4}
    assert report.pauses >= 1  # the server's retry-after (capped) paused everyone


# --- bad input through batch_complete, over polars, pandas and pyarrow --------------------------------------------


def test_nulls_oversized_and_empty_prompts_are_row_errors(
    frame_factory: Callable[[dict[str, list[Any]]], Any], server: FakeLLMServer, provider: Provider
) -> None:
    frame = frame_factory({"prompt": ["fine", None, "x" * 50, "   ", "also fine"]})
    out = frame_to_pydict(batch_complete(frame, provider=provider, max_prompt_chars=20, progress=False))
    assert out["response"] == ["echo: fine", None, None, None, "echo: also fine"]
    errors = out["error"]
    assert errors[0] is None and errors[4] is None
    assert all(e is not None and e.startswith("PromptError") for e in errors[1:4])
    assert server.stats.requests == 2


def test_empty_table_gives_empty_output_without_requests(
    frame_factory: Callable[[dict[str, list[Any]]], Any], server: FakeLLMServer, provider: Provider
) -> None:
    frame = frame_factory({"prompt": pa.array([], type=pa.string())})
    out = batch_complete(frame, provider=provider, progress=False)
    cols = frame_to_pydict(out)
    assert cols == {"prompt": [], "response": [], "error": []}
    assert server.stats.requests == 0


def test_wrong_prompt_column_type_is_a_typed_error(
    frame_factory: Callable[[dict[str, list[Any]]], Any], server: FakeLLMServer, provider: Provider
) -> None:
    frame = frame_factory({"prompt": [1, 2, 3]})
    with pytest.raises(ColumnTypeError, match="prompt"):
        batch_complete(frame, provider=provider, progress=False)
    assert server.stats.requests == 0
    # formatting the numbers through a template is the documented way out
    out = frame_to_pydict(batch_complete(frame, provider=provider, prompt="n={prompt}", progress=False))
    assert out["response"] == ["echo: n=1", "echo: n=2", "echo: n=3"]


def test_all_null_column_fails_every_row_not_the_table(
    frame_factory: Callable[[dict[str, list[Any]]], Any], server: FakeLLMServer, provider: Provider
) -> None:
    frame = frame_factory({"prompt": pa.array([None, None], type=pa.string())})
    out = frame_to_pydict(batch_complete(frame, provider=provider, progress=False))
    assert out["response"] == [None, None]
    assert all(e.startswith("PromptError") for e in out["error"])
    assert server.stats.requests == 0


def test_invalid_utf8_bytes_are_a_row_error(
    frame_factory: Callable[[dict[str, list[Any]]], Any], server: FakeLLMServer, provider: Provider
) -> None:
    frame = frame_factory({"prompt": pa.array([b"ok bytes", b"\xff\xfe bad"], type=pa.binary())})
    out = frame_to_pydict(batch_complete(frame, provider=provider, progress=False))
    assert out["response"][0] == "echo: ok bytes"
    assert out["response"][1] is None and out["error"][1].startswith("PromptError")


def test_lone_surrogates_are_row_errors(server: FakeLLMServer, provider: Provider) -> None:
    import pandas as pd

    # only object columns can hold lone surrogates (Arrow-backed strings refuse them)
    frame = pd.DataFrame(
        {
            "prompt": pd.Series(["good", "bad \ud800"], dtype=object),
            "messages": pd.Series(
                [[{"role": "user", "content": "good"}], [{"role": "user", "content": "bad \udfff"}]], dtype=object
            ),
        }
    )
    out = batch_complete(frame, provider=provider, progress=False)
    assert out["response"].tolist()[0] == "echo: good"
    assert out["error"].tolist()[1].startswith("PromptError")
    out = batch_complete(frame[["messages"]], provider=provider, prompt_column="messages", progress=False)
    assert out["response"].tolist()[0] == "echo: good"
    assert out["error"].tolist()[1].startswith("PromptError")


def test_bad_key_raises_typed_error_after_a_handful_of_requests(
    frame_factory: Callable[[dict[str, list[Any]]], Any],
) -> None:
    secret = "sk-very-SECRET-key-000"
    with FakeLLMServer(api_key="sk-the-right-one") as server:
        provider = Provider(provider_type="openai_compatible", model="echo", base_url=server.base_url, api_key=secret)
        frame = frame_factory({"prompt": [f"row {i}" for i in range(500)]})
        with pytest.raises(AuthenticationError) as info:
            batch_complete(frame, provider=provider, concurrency=64, progress=False)
        assert server.stats.requests <= 4
    assert secret not in str(info.value)


def test_deadline_through_batch_complete(
    frame_factory: Callable[[dict[str, list[Any]]], Any],
) -> None:
    with FakeLLMServer(hang_rate=1.0) as server:
        provider = Provider(provider_type="openai_compatible", model="echo", base_url=server.base_url)
        frame = frame_factory({"prompt": [f"row {i}" for i in range(30)]})
        out = frame_to_pydict(batch_complete(frame, provider=provider, deadline=0.3, concurrency=4, progress=False))
    assert out["response"] == [None] * 30
    assert all(e.startswith("DeadlineExceededError") for e in out["error"])


# --- interrupts -------------------------------------------------------------------------------------------------------


def _interrupt_when(server: FakeLLMServer, requests: int) -> threading.Thread:
    def watch() -> None:
        deadline = time.monotonic() + 20
        while server.stats.requests < requests and time.monotonic() < deadline:
            time.sleep(0.005)
        _thread.interrupt_main()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_ctrl_c_in_a_script_stops_sending() -> None:
    with FakeLLMServer(latency=0.02) as server:
        provider = Provider(provider_type="openai_compatible", model="echo", base_url=server.base_url)
        frame = pa.table({"prompt": [f"row {i}" for i in range(3000)]})
        watcher = _interrupt_when(server, 20)
        with pytest.raises(KeyboardInterrupt):
            batch_complete(frame, provider=provider, concurrency=8, progress=False)
        watcher.join()
        seen = server.stats.requests
        time.sleep(0.2)
        assert server.stats.requests <= seen + 8  # only what was already on the wire
        assert seen < 3000


def test_notebook_interrupt_stops_sending() -> None:
    """Inside a running loop (Jupyter) the work runs on a worker thread; an interrupt cancels it there."""
    with FakeLLMServer(latency=0.02) as server:
        provider = Provider(provider_type="openai_compatible", model="echo", base_url=server.base_url)
        frame = pa.table({"prompt": [f"row {i}" for i in range(3000)]})

        async def cell() -> None:
            batch_complete(frame, provider=provider, concurrency=8, progress=False)

        watcher = _interrupt_when(server, 20)
        loop = asyncio.new_event_loop()
        try:
            with pytest.raises(KeyboardInterrupt):
                loop.run_until_complete(cell())
        finally:
            loop.close()
        watcher.join()
        seen = server.stats.requests
        time.sleep(0.2)
        assert server.stats.requests <= seen + 8
        assert seen < 3000


async def test_task_cancellation_of_abatch_complete_stops_sending() -> None:
    async with FakeLLMServer(latency=0.02) as server:
        provider = Provider(provider_type="openai_compatible", model="echo", base_url=server.base_url)
        frame = pa.table({"prompt": [f"row {i}" for i in range(3000)]})
        task = asyncio.create_task(abatch_complete(frame, provider=provider, concurrency=8, progress=False))
        while server.stats.requests < 20:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        seen = server.stats.requests
        await asyncio.sleep(0.2)
        assert server.stats.requests <= seen + 8
