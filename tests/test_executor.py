"""The executor against the fake server over real sockets: order, retries, fatal errors, deadlines,
cancellation, and the accuracy of its run report."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nagents_frames import Provider
from nagents_frames.errors import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    JobCancelledError,
    MalformedResponseError,
    NotFoundError,
    PermissionDeniedError,
    PromptError,
    RateLimitError,
    error_for_status,
)
from nagents_frames.executor import Executor, Outcome, PreparedRequest, RetryPolicy, Timeouts, outcomes_to_arrow
from nagents_frames.testing import FakeLLMServer

pytestmark = pytest.mark.timeout(60)

FAST = RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=0.05)


def make_requests(n: int, tag: str = "p", start: int = 0) -> list[PreparedRequest]:
    return [
        PreparedRequest(i, str(i), f"{tag}-{i}", ({"role": "user", "content": f"{tag} {i}"},))
        for i in range(start, start + n)
    ]


def chunked(requests: list[PreparedRequest], size: int) -> list[list[PreparedRequest]]:
    return [requests[i : i + size] for i in range(0, len(requests), size)]


def provider_for(server: FakeLLMServer, **kwargs: object) -> Provider:
    return Provider(provider_type="openai_compatible", model="echo", base_url=server.base_url, **kwargs)  # type: ignore[arg-type]


async def collect(ex: Executor, chunks: object, **kwargs: object) -> list[tuple[PreparedRequest, Outcome]]:
    out: list[tuple[PreparedRequest, Outcome]] = []
    async for requests, outcomes in ex.run(chunks, **kwargs):  # type: ignore[arg-type]
        assert len(requests) == len(outcomes)
        out.extend(zip(requests, outcomes))
    return out


# --- RetryPolicy -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (error_for_status(429, "x"), True),
        (error_for_status(500, "x"), True),
        (error_for_status(503, "x"), True),
        (error_for_status(529, "x"), True),
        (error_for_status(408, "x"), True),
        (error_for_status(400, "x"), False),
        (error_for_status(422, "x"), False),
        (error_for_status(401, "x"), False),
        (error_for_status(403, "x"), False),
        (error_for_status(404, "x"), False),
        (APIConnectionError("x"), True),
        (APITimeoutError("x"), True),
        (MalformedResponseError("x"), True),
        (PromptError("x"), False),
    ],
)
def test_retry_classification_by_type_and_status(error: object, retried: bool) -> None:
    policy = RetryPolicy(max_attempts=3)
    assert policy.should_retry(error, 1) is retried  # type: ignore[arg-type]
    assert policy.should_retry(error, 3) is False  # type: ignore[arg-type]


def test_retry_decision_ignores_message_text() -> None:
    policy = RetryPolicy()
    assert policy.should_retry(error_for_status(400, "rate limit exceeded, retry later"), 1) is False
    assert policy.should_retry(error_for_status(503, "fatal: invalid api key"), 1) is True


def test_retry_statuses_and_kinds_are_configurable() -> None:
    policy = RetryPolicy(retry_statuses=frozenset({500}), retry_connection_errors=False, retry_malformed=False)
    assert policy.should_retry(error_for_status(500, ""), 1)
    assert not policy.should_retry(error_for_status(429, ""), 1)
    assert not policy.should_retry(APIConnectionError("x"), 1)
    assert not policy.should_retry(MalformedResponseError("x"), 1)


@given(
    attempt=st.integers(min_value=1, max_value=40),
    base=st.floats(min_value=0, max_value=5),
    cap=st.floats(min_value=0, max_value=60),
    draw=st.floats(min_value=0, max_value=1),
)
def test_backoff_is_bounded_and_jittered(attempt: int, base: float, cap: float, draw: float) -> None:
    policy = RetryPolicy(base_delay=base, max_delay=cap)
    ceiling = min(cap, base * 2 ** (attempt - 1))
    assert 0 <= policy.backoff(attempt, rng=lambda: draw) <= ceiling + 1e-9
    assert RetryPolicy(base_delay=base, max_delay=cap, jitter=False).backoff(attempt) == pytest.approx(ceiling)


def test_retry_after_wins_but_is_capped() -> None:
    policy = RetryPolicy(max_retry_after=5.0)
    assert policy.delay(1, error_for_status(429, "", retry_after=2.0)) == 2.0
    assert policy.delay(1, error_for_status(429, "", retry_after=500.0)) == 5.0


@pytest.mark.parametrize("kwargs", [{"max_attempts": 0}, {"base_delay": -1}, {"max_delay": -1}])
def test_bad_retry_policy_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs", [{"concurrency": 0}, {"concurrency": True}, {"deadline": 0}, {"deadline": -1}])
def test_bad_executor_arguments_rejected(kwargs: dict[str, object]) -> None:
    provider = Provider(provider_type="openai_compatible", model="m", base_url="http://127.0.0.1:9/v1")
    with pytest.raises(ConfigurationError):
        Executor(provider, **kwargs)  # type: ignore[arg-type]


def test_bad_timeouts_rejected() -> None:
    with pytest.raises(ConfigurationError):
        Timeouts(connect=0)


# --- the run loop ------------------------------------------------------------------------------------------------


async def test_outcomes_in_input_order_across_chunks() -> None:
    async with FakeLLMServer(latency_jitter=0.01) as server:
        requests = make_requests(230)
        async with Executor(provider_for(server), concurrency=16) as ex:
            out = await collect(ex, chunked(requests, 37))
    assert [r.index for r, _ in out] == list(range(230))
    assert all(o.response == f"echo: p {r.index}" for r, o in out)
    table = outcomes_to_arrow([r for r, _ in out], [o for _, o in out])
    assert table.num_rows == 230 and table.column("error").null_count == 230


async def test_async_chunk_source_and_empty_chunks() -> None:
    async def source() -> AsyncIterator[list[PreparedRequest]]:
        yield []
        yield make_requests(5)
        yield []
        yield make_requests(5, start=5)

    async with FakeLLMServer() as server, Executor(provider_for(server), concurrency=4) as ex:
        out = await collect(ex, source())
        assert await collect(ex, []) == []
    assert [r.index for r, _ in out] == list(range(10))


async def test_identical_requests_sent_once() -> None:
    async with FakeLLMServer(latency=0.02) as server:
        same = [PreparedRequest(i, str(i), "k", ({"role": "user", "content": "same"},)) for i in range(20)]
        async with Executor(provider_for(server), concurrency=8) as ex:
            out = await collect(ex, chunked(same, 7))
        assert server.stats.requests == 1
    assert all(o.response == "echo: same" for _, o in out)
    assert sum(o.attempts for _, o in out) == 1
    assert ex.stats.shared == 19 and ex.stats.report().succeeded == 20


async def test_unsendable_rows_become_row_errors() -> None:
    async with FakeLLMServer() as server:
        bad = PreparedRequest(1, "1", "", None, error=PromptError("the prompt is empty in this row"))
        surrogate = PreparedRequest(2, "2", "s", ({"role": "user", "content": "bad \ud800 text"},))
        requests = [*make_requests(1), bad, surrogate, *make_requests(1, start=3)]
        async with Executor(provider_for(server)) as ex:
            out = await collect(ex, [requests])
        assert server.stats.requests == 2
    assert [o.error_type for _, o in out] == [None, "PromptError", "PromptError", None]
    assert ex.stats.report().errors == {"PromptError": 2}


async def test_chunk_source_error_propagates_instead_of_hanging() -> None:
    def source() -> Iterator[list[PreparedRequest]]:
        yield make_requests(3)
        raise RuntimeError("the input file is corrupt")

    async with FakeLLMServer() as server, Executor(provider_for(server), concurrency=2) as ex:
        with pytest.raises(RuntimeError, match="corrupt"):
            await collect(ex, source())


# --- fatal errors ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("knobs", "error_type"),
    [
        ({"api_key": "sk-right-one"}, AuthenticationError),
        ({"error_on_content": {"p": 403}}, PermissionDeniedError),
        ({"models": ["other-model"]}, NotFoundError),
    ],
)
async def test_fatal_errors_stop_after_a_handful_of_requests(knobs: dict[str, object], error_type: type) -> None:
    secret = "sk-wrong-SECRET-1234567890"
    async with FakeLLMServer(**knobs) as server:
        provider = provider_for(server, api_key=secret)
        async with Executor(provider, concurrency=64) as ex:
            with pytest.raises(error_type) as info:
                await collect(ex, chunked(make_requests(2000), 100))
        assert server.stats.requests <= 4
    assert secret not in str(info.value) and secret not in repr(info.value)


async def test_key_echoed_by_the_server_is_redacted() -> None:
    secret = "sk-echo-SECRET-0987654321"
    async with FakeLLMServer(error_on_content={secret: 400}) as server:
        provider = provider_for(server, api_key=secret)
        async with Executor(provider, retry=FAST) as ex:
            outcome = await ex.complete([{"role": "user", "content": f"my key is {secret}"}])
    assert outcome.error_type == "BadRequestError"
    assert outcome.error is not None and secret not in outcome.error and "***" in outcome.error


async def test_complete_raises_fatal_error() -> None:
    async with FakeLLMServer(api_key="right") as server, Executor(provider_for(server, api_key="wrong")) as ex:
        with pytest.raises(AuthenticationError):
            await ex.complete([{"role": "user", "content": "hi"}])


# --- retries and the report --------------------------------------------------------------------------------------------


async def test_report_counts_match_what_the_server_saw() -> None:
    async with FakeLLMServer(fail_first=2, fail_first_status=503) as server:
        async with Executor(provider_for(server), concurrency=8, retry=FAST) as ex:
            out = await collect(ex, chunked(make_requests(40), 10))
        report = ex.stats.report()
        assert report.requests_sent == server.stats.requests == 120
        assert report.statuses == {503: 80} and server.stats.by_status[503] == 80
    assert report.retries == {"ServerError": 80} and report.total_retries == 80
    assert report.rate_limited == 80  # 503 is an overload signal
    assert report.succeeded == 40 and report.failed == 0
    assert all(o.attempts == 3 for _, o in out)
    assert report.prompt_tokens == sum(o.prompt_tokens or 0 for _, o in out) > 0
    data = report.as_dict()
    assert data["retries"] == {"ServerError": 80} and data["statuses"] == {"503": 80}


async def test_retry_budget_exhausted_gives_the_last_error() -> None:
    async with FakeLLMServer(error_on_content={"doomed": 500}) as server:
        requests = [PreparedRequest(0, "0", "d", ({"role": "user", "content": "doomed"},)), *make_requests(3, start=1)]
        async with Executor(provider_for(server), retry=FAST) as ex:
            out = await collect(ex, [requests])
        assert server.stats.prompts["doomed"] == FAST.max_attempts
    first = out[0][1]
    assert first.error_type == "ServerError" and first.status_code == 500 and first.attempts == 4
    assert all(o.error is None for _, o in out[1:])
    assert ex.stats.report().errors == {"ServerError": 1}


async def test_non_retryable_status_is_not_retried() -> None:
    async with FakeLLMServer(error_on_content={"bad": 400}) as server:
        async with Executor(provider_for(server), retry=FAST) as ex:
            outcome = await ex.complete([{"role": "user", "content": "bad"}])
        assert server.stats.requests == 1
    assert outcome.error_type == BadRequestError.__name__ and outcome.attempts == 1


async def test_retry_after_pauses_every_worker() -> None:
    async with FakeLLMServer(burst_429=1, retry_after=0.3) as server:
        async with Executor(provider_for(server), concurrency=8, retry=FAST) as ex:
            out = await collect(ex, [make_requests(20)])
        arrivals = server.stats.arrivals
    assert all(o.error is None for _, o in out)
    first_429 = arrivals[0]
    # every request after the 429 waited out the server's retry-after, not just the one that got it
    assert all(t - first_429 >= 0.25 for t in arrivals[2:])
    report = ex.stats.report()
    assert report.pauses >= 1 and report.retries == {RateLimitError.__name__: 1}
    assert report.rate_limit_wait_s >= 0.25


async def test_rate_limit_wait_is_reported() -> None:
    async with FakeLLMServer() as server, Executor(provider_for(server), concurrency=1, rpm=1200) as ex:
        await collect(ex, [make_requests(20)])
    report = ex.stats.report()
    assert 0 < report.rate_limit_wait_s <= report.elapsed_s
    assert report.backoff_wait_s == 0


async def test_token_budget_uses_estimates_and_usage() -> None:
    async with FakeLLMServer() as server, Executor(provider_for(server), concurrency=4, tpm=600_000) as ex:
        out = await collect(ex, [make_requests(10)])
    assert ex.limiter.counts_tokens
    assert all(o.error is None for _, o in out)
    assert ex.stats.report().prompt_tokens == sum(o.prompt_tokens or 0 for _, o in out)


# --- timeouts and deadlines --------------------------------------------------------------------------------------------


async def test_hanging_request_times_out_and_is_retried() -> None:
    async with FakeLLMServer(hang_rate=1.0) as server:
        async with Executor(provider_for(server), timeouts=Timeouts(request=0.2), retry=FAST) as ex:
            outcome = await ex.complete([{"role": "user", "content": "hi"}])
        assert server.stats.requests == FAST.max_attempts
    assert outcome.error_type == "APITimeoutError" and outcome.attempts == FAST.max_attempts


async def test_deadline_gives_every_unanswered_row_an_error() -> None:
    async with FakeLLMServer(hang_rate=1.0) as server:
        async with Executor(provider_for(server), concurrency=8, deadline=0.4) as ex:
            out = await collect(ex, chunked(make_requests(100), 25))
        assert server.stats.requests <= 8 * 2
    assert len(out) == 100
    assert {o.error_type for _, o in out} == {"DeadlineExceededError"}
    assert ex.stats.report().deadline_exceeded == 100


async def test_deadline_does_not_wait_on_the_rate_limiter() -> None:
    async with FakeLLMServer() as server:
        # one request a second: most rows could not leave before the deadline, so they fail at once
        async with Executor(provider_for(server), concurrency=4, rpm=60, deadline=1.5) as ex:
            out = await collect(ex, [make_requests(50)])
        sent = server.stats.requests
    answered = [o for _, o in out if o.error is None]
    assert 1 <= len(answered) == sent <= 3
    assert sum(o.error_type == "DeadlineExceededError" for _, o in out) == 50 - sent


async def test_connection_refused_is_a_retried_row_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    provider = Provider(provider_type="openai_compatible", model="echo", base_url=f"http://127.0.0.1:{port}/v1")
    async with Executor(provider, retry=FAST) as ex:
        outcome = await ex.complete([{"role": "user", "content": "hi"}])
    assert outcome.error_type == "APIConnectionError" and outcome.attempts == FAST.max_attempts


# --- cancellation ----------------------------------------------------------------------------------------------------------


async def test_cancel_stops_sending_and_keeps_what_was_yielded() -> None:
    async with FakeLLMServer(latency=0.02) as server, Executor(provider_for(server), concurrency=4) as ex:
        out: list[Outcome] = []
        sent_at_cancel = -1
        async for _requests, outcomes in ex.run(chunked(make_requests(400), 10)):
            out.extend(outcomes)
            if len(out) >= 40 and not ex.cancelled:
                ex.cancel()
                sent_at_cancel = ex.stats.requests_sent
        await asyncio.sleep(0.2)
        assert ex.stats.requests_sent == sent_at_cancel, "no request may leave after cancel()"
        assert server.stats.requests <= sent_at_cancel
    assert 40 <= len(out) < 400 and all(o.error is None for o in out)
    assert ex.cancelled and ex.stats.report().cancelled
    with pytest.raises(JobCancelledError):
        async with Executor(provider_for(server)) as again:
            again.cancel()
            await again.complete([{"role": "user", "content": "hi"}])


async def test_cancel_with_keep_partial_yields_settled_rows() -> None:
    server = FakeLLMServer(latency=0.01, error_on_content={"p 5": 599})
    async with server, Executor(provider_for(server), concurrency=4, retry=RetryPolicy(max_attempts=1)) as ex:
        got: list[tuple[PreparedRequest, Outcome]] = []

        async def cancel_soon() -> None:
            while server.stats.requests < 30:
                await asyncio.sleep(0.005)
            ex.cancel()

        canceller = asyncio.create_task(cancel_soon())
        async for requests, outcomes in ex.run([make_requests(1000)], keep_partial=True):
            got.extend(zip(requests, outcomes))
        await canceller
    # a single 1000-row chunk never completed, yet the rows answered before cancel() are kept
    assert 20 <= len(got) < 1000
    assert all(o.response == f"echo: p {r.index}" or o.error is not None for r, o in got)


async def test_cancel_from_another_thread_wakes_the_run() -> None:
    async with FakeLLMServer(latency=0.05) as server, Executor(provider_for(server), concurrency=2) as ex:
        timer = threading.Timer(0.2, ex.cancel)
        timer.start()
        out = await asyncio.wait_for(collect(ex, chunked(make_requests(1000), 5)), 10)
        timer.join()
    assert len(out) < 1000 and ex.cancelled


async def test_closing_the_iterator_early_cancels_the_workers() -> None:
    async with FakeLLMServer(latency=0.02) as server, Executor(provider_for(server), concurrency=8) as ex:
        tasks_before = len(asyncio.all_tasks())
        agen = ex.run(chunked(make_requests(500), 10))
        await agen.__anext__()
        await agen.aclose()
        seen = server.stats.requests
        await asyncio.sleep(0.15)
        assert server.stats.requests <= seen + 8  # at most those already on the wire
        assert len(asyncio.all_tasks()) <= tasks_before


async def test_cancelling_the_task_stops_the_run() -> None:
    async with FakeLLMServer(latency=0.02) as server, Executor(provider_for(server), concurrency=8) as ex:
        task = asyncio.create_task(collect(ex, chunked(make_requests(2000), 20)))
        while server.stats.requests < 20:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        seen = server.stats.requests
        await asyncio.sleep(0.15)
        assert server.stats.requests <= seen + 8
        assert server.stats.requests < 2000


async def test_run_does_not_busy_loop_while_waiting() -> None:
    """While every request hangs, the run must sleep, not spin: the loop stays free for others."""
    async with FakeLLMServer(latency=0.5) as server, Executor(provider_for(server), concurrency=4) as ex:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        t = asyncio.create_task(ticker())
        started = time.process_time()
        await collect(ex, [make_requests(4)])
        cpu = time.process_time() - started
        t.cancel()
    assert ticks >= 10
    assert cpu < 0.4, f"the run burnt {cpu:.2f}s of CPU while waiting half a second"


async def test_a_failing_progress_callback_surfaces_instead_of_hanging() -> None:
    def broken(_outcome: Outcome) -> None:
        raise ValueError("progress bar broke")

    async with FakeLLMServer() as server, Executor(provider_for(server), on_outcome=broken) as ex:
        with pytest.raises(ValueError, match="progress bar broke"):
            await collect(ex, [make_requests(5)])
