"""Native batch APIs (OpenAI Batch, Anthropic Message Batches) end to end over real HTTP, plus the pure
translation functions."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nagents_frames import BatchManager, BatchRequest, BatchStore, Provider
from nagents_frames.errors import AuthenticationError, ConfigurationError
from nagents_frames.executor import Outcome, PreparedRequest, RetryPolicy
from nagents_frames.native_batch import (
    BatchLimits,
    MemoryLedger,
    NativeBatchRecord,
    NativeBatchRunner,
    NativeState,
    RecordPhase,
    RowState,
    custom_id_for,
    format_for,
    index_of_custom_id,
    job_status,
)
from nagents_frames.native_batch import anthropic as nb_anthropic
from nagents_frames.native_batch import openai as nb_openai
from nagents_frames.native_batch._base import indices_of, ranges_of
from nagents_frames.testing import FakeLLMServer
from nagents_frames.testing._anthropic_batch import iter_json_array_items
from nagents_frames.testing._openai_batch import batch_stats, configure_batches
from nagents_frames.types import BatchStatus, GenerationParams

KINDS = ("openai", "anthropic")
FAST_RETRY = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05)


def prepared(n: int, *, start: int = 0, text: str = "q") -> list[PreparedRequest]:
    return [
        PreparedRequest(i, f"id-{i}", f"key-{i}", ({"role": "user", "content": f"{text}{i}"},)) for i in range(start, start + n)
    ]


def provider_for(kind: str, server: FakeLLMServer, key: str = "sk-test") -> Provider:
    return Provider(provider_type=kind, model="echo", api_key=key, base_url=server.base_url, max_tokens=4000)


def runner_for(kind: str, server: FakeLLMServer, ledger: MemoryLedger | None = None, **kw: object) -> NativeBatchRunner:
    return NativeBatchRunner(
        provider_for(kind, server), ledger=ledger, poll_interval=0.005, max_poll_interval=0.02, retry=FAST_RETRY, **kw  # type: ignore[arg-type]
    )


async def collect(chunks: AsyncIterator[tuple[list[PreparedRequest], list[Outcome]]]) -> dict[int, Outcome]:
    out: dict[int, Outcome] = {}
    async for requests, outcomes in chunks:
        assert len(requests) == len(outcomes)
        for r, o in zip(requests, outcomes, strict=True):
            assert r.index not in out, "a row was yielded twice"
            out[r.index] = o
    return out


# --- pure translation -------------------------------------------------------------------------------------


def test_openai_line_is_the_chat_body_with_custom_id() -> None:
    p = Provider(provider_type="openai", model="gpt-4o-mini", api_key="sk-secret", base_url="http://x/v1")
    line = nb_openai.FORMAT.encode_item(p, "r7", [{"role": "user", "content": "héllo"}], GenerationParams(temperature=0))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    payload = json.loads(line)
    assert payload == {
        "custom_id": "r7",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "héllo"}], "temperature": 0},
    }
    assert b"sk-secret" not in line


def test_openai_result_lines_map_to_row_states() -> None:
    ok = {"custom_id": "r1", "response": {"status_code": 200, "body": {
        "choices": [{"message": {"content": "yes"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1}}}, "error": None}
    bad = {"custom_id": "r2", "response": {"status_code": 429, "body": {"error": {"message": "slow down"}}}, "error": None}
    expired = {"custom_id": "r3", "response": None, "error": {"code": "batch_expired", "message": "too late"}}
    cancelled = {"custom_id": "r4", "response": None, "error": {"code": "batch_cancelled", "message": "stop"}}
    rows = [nb_openai.parse_result_line(json.dumps(x).encode()) for x in (ok, bad, expired, cancelled)]
    assert [r.state for r in rows] == [RowState.SUCCEEDED, RowState.FAILED, RowState.EXPIRED, RowState.CANCELLED]
    assert rows[0].outcome.response == "yes" and rows[0].outcome.prompt_tokens == 3
    assert rows[1].outcome.error_type == "RateLimitError" and rows[1].outcome.status_code == 429
    assert "slow down" in (rows[1].outcome.error or "")


def test_anthropic_result_lines_map_to_row_states() -> None:
    ok = {"custom_id": "r1", "result": {"type": "succeeded", "message": {
        "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn", "usage": {"input_tokens": 4, "output_tokens": 2}}}}
    err = {"custom_id": "r2", "result": {"type": "errored", "error": {"type": "error", "error": {
        "type": "invalid_request_error", "message": "bad params"}}}}
    rows = [
        nb_anthropic.parse_result_line(json.dumps(x).encode())
        for x in (ok, err, {"custom_id": "r3", "result": {"type": "canceled"}}, {"custom_id": "r4", "result": {"type": "expired"}})
    ]
    assert [r.state for r in rows] == [RowState.SUCCEEDED, RowState.FAILED, RowState.CANCELLED, RowState.EXPIRED]
    assert (rows[0].outcome.response, rows[0].outcome.completion_tokens, rows[0].outcome.finish_reason) == ("hi", 2, "stop")
    assert rows[1].outcome.error_type == "BadRequestError" and rows[1].outcome.status_code == 400


@pytest.mark.parametrize(
    ("payload", "state"),
    [
        ({"id": "b", "processing_status": "in_progress"}, NativeState.IN_PROGRESS),
        ({"id": "b", "processing_status": "canceling"}, NativeState.CANCELLING),
        ({"id": "b", "processing_status": "ended", "request_counts": {"succeeded": 2}}, NativeState.COMPLETED),
        ({"id": "b", "processing_status": "ended", "request_counts": {"expired": 1}}, NativeState.EXPIRED),
        ({"id": "b", "processing_status": "ended", "cancel_initiated_at": "2024-01-01T00:00:00Z"}, NativeState.CANCELLED),
    ],
)
def test_anthropic_batch_states(payload: dict[str, object], state: NativeState) -> None:
    assert nb_anthropic.parse_batch_object(payload).state is state


def test_openai_batch_states_and_status_mapping() -> None:
    expected = {
        "validating": BatchStatus.PENDING, "in_progress": BatchStatus.PROCESSING, "finalizing": BatchStatus.PROCESSING,
        "cancelling": BatchStatus.PROCESSING, "completed": BatchStatus.COMPLETED, "failed": BatchStatus.FAILED,
        "expired": BatchStatus.FAILED, "cancelled": BatchStatus.CANCELLED,
    }
    for raw, status in expected.items():
        info = nb_openai.parse_batch_object({"id": "b", "status": raw, "request_counts": {"total": 3, "completed": 1}})
        assert info.state.batch_status is status
        assert info.total == 3 and info.succeeded == 1


def test_job_status_from_records() -> None:
    base = NativeBatchRecord("j", 0, "openai", ((0, 5),), 5)
    assert job_status([]) is BatchStatus.PENDING
    assert job_status([base]) is BatchStatus.PENDING
    running = base.evolve(phase=RecordPhase.SUBMITTED, batch_id="b", state="in_progress")
    assert job_status([running]) is BatchStatus.PROCESSING
    done = running.evolve(phase=RecordPhase.COLLECTED, state="completed")
    assert job_status([done]) is BatchStatus.COMPLETED
    assert job_status([done.evolve(error="cancel requested")]) is BatchStatus.CANCELLED
    resumed = NativeBatchRecord("j", 1, "openai", ((3, 5),), 2, phase=RecordPhase.COLLECTED, state="completed")
    assert job_status([done.evolve(error="cancel requested"), resumed]) is BatchStatus.COMPLETED
    assert job_status([base.evolve(phase=RecordPhase.ABANDONED)]) is BatchStatus.FAILED


@given(st.sets(st.integers(min_value=0, max_value=10_000), max_size=300))
def test_ranges_round_trip(indices: set[int]) -> None:
    ranges = ranges_of(indices)
    assert list(indices_of(ranges)) == sorted(indices)
    assert NativeBatchRecord.parse_ranges(json.dumps([list(r) for r in ranges])) == ranges


@given(st.integers(min_value=0, max_value=2**62))
def test_custom_ids_round_trip(index: int) -> None:
    cid = custom_id_for(index)
    assert index_of_custom_id(cid) == index
    assert len(cid) <= 64 and cid.replace("_", "").replace("-", "").isalnum()


def test_iter_json_array_items_streams_items(tmp_path: pytest.TempPathFactory) -> None:
    path = tmp_path / "body.json"  # type: ignore[operator]
    items = [{"custom_id": f"r{i}", "params": {"x": "]," * (i % 5), "n": i}} for i in range(3000)]
    path.write_text(json.dumps({"requests": items}))
    assert list(iter_json_array_items(path)) == items


def test_format_for_rejects_providers_without_batch_api() -> None:
    for kind in ("gemini_native", "azure_openai"):
        with pytest.raises(ConfigurationError):
            format_for(Provider(provider_type=kind, model="m", api_key="k", base_url="http://127.0.0.1:9"))
    with pytest.raises(ConfigurationError):
        NativeBatchRunner(
            Provider(provider_type="openai", model="m", api_key="k"), limits=BatchLimits(60_000, 1000)
        )


# --- end to end over HTTP ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_submit_poll_results_joined_by_custom_id(kind: str) -> None:
    async with FakeLLMServer(api_key="sk-test", error_on_content={"boom": 500}) as server:
        configure_batches(server, in_progress_polls=2, finalizing_polls=2, shuffle=True)
        requests = prepared(30)
        requests[4] = PreparedRequest(4, "id-4", "key-4", ({"role": "user", "content": "boom 4"},))
        async with runner_for(kind, server) as runner:
            out = await collect(runner.run("job", requests))
            assert runner.status("job") is BatchStatus.COMPLETED
        assert sorted(out) == list(range(30))
        for i, o in out.items():
            if i == 4:
                assert o.response is None and o.error_type == "ServerError" and o.status_code == 500
            else:
                assert o.response == f"echo: q{i}" and o.error is None and o.attempts == 1
                assert o.prompt_tokens is not None and o.completion_tokens is not None
        sim = batch_stats(server)
        assert len(sim.created) == 1 and sim.requests_per_batch == [30]
        assert sim.polls >= 3  # slow finalisation took several polls
        # every prompt ran exactly once server-side
        assert all(count == 1 for count in server.stats.prompts.values())


async def test_openai_status_goes_pending_processing_completed() -> None:
    async with FakeLLMServer() as server:
        configure_batches(server, validating_polls=2, in_progress_polls=2, finalizing_polls=2)
        async with runner_for("openai", server) as runner:
            await runner.submit("job", prepared(5))
            seen = [runner.status("job")]
            for _ in range(10):
                await runner.poll("job")
                seen.append(runner.status("job"))
            states = [r.state for r in runner.records("job")]
            assert states == ["completed"]
            assert seen[0] is BatchStatus.PENDING and BatchStatus.PROCESSING in seen
            out = await collect(runner.run("job", prepared(5)))
            assert len(out) == 5 and runner.status("job") is BatchStatus.COMPLETED
            assert len(batch_stats(server).created) == 1


@pytest.mark.parametrize("kind", KINDS)
async def test_cancel_keeps_partial_results_and_sends_nothing_more(kind: str) -> None:
    async with FakeLLMServer() as server:
        configure_batches(server, in_progress_polls=1000, keep_fraction=0.4)
        requests = prepared(20)
        async with runner_for(kind, server) as runner:
            await runner.submit("job", requests)
            await runner.poll("job")
            await runner.cancel("job")
            out = await collect(runner.run("job", requests))
            assert runner.status("job") is BatchStatus.CANCELLED
        sim = batch_stats(server)
        assert len(sim.created) == 1 and sim.cancels == 1
        assert len(out) == 8  # the 40% the provider answered before the cancel
        assert all(o.response == f"echo: q{i}" for i, o in out.items())


@pytest.mark.parametrize("kind", KINDS)
async def test_expired_batch_keeps_partial_results_and_the_rest_is_resubmitted(kind: str) -> None:
    async with FakeLLMServer() as server:
        configure_batches(server, expire_batches=1, keep_fraction=0.5)
        async with runner_for(kind, server) as runner:
            out = await collect(runner.run("job", prepared(40)))
            records = runner.records("job")
        sim = batch_stats(server)
        assert sim.requests_per_batch == [40, 20]
        assert [r.state for r in records] == ["expired", "completed"]
        assert sorted(out) == list(range(40)) and all(o.error is None for o in out.values())
        assert all(o.response == f"echo: q{i}" for i, o in out.items())


@pytest.mark.parametrize("kind", KINDS)
async def test_expired_rows_fail_when_no_resubmits_are_allowed(kind: str) -> None:
    async with FakeLLMServer() as server:
        configure_batches(server, expire_batches=5, keep_fraction=0.5)
        async with runner_for(kind, server, max_resubmits=0) as runner:
            out = await collect(runner.run("job", prepared(10)))
        assert len(batch_stats(server).created) == 1
        assert sum(o.error is None for o in out.values()) == 5
        failed = [o for o in out.values() if o.error is not None]
        assert len(failed) == 5 and all(o.attempts == 0 for o in failed)


@pytest.mark.parametrize("kind", KINDS)
async def test_failed_rows_can_be_resubmitted(kind: str) -> None:
    async with FakeLLMServer(error_on_content={"q1": 503}) as server:
        requests = prepared(15)  # q1, q10..q14 fail
        async with runner_for(kind, server) as runner:
            first = await collect(runner.run("job", requests))
            failed = [r for r in requests if first[r.index].error is not None]
            assert sorted(r.index for r in failed) == [1, 10, 11, 12, 13, 14]
            server.configure(error_on_content={})
            second = await collect(runner.run("job", failed))
        assert sorted(second) == [1, 10, 11, 12, 13, 14]
        assert all(o.response == f"echo: q{i}" for i, o in second.items())
        assert batch_stats(server).requests_per_batch == [15, 6]


@pytest.mark.parametrize("kind", KINDS)
async def test_restart_mid_batch_resumes_polling_without_a_second_batch(kind: str) -> None:
    ledger = MemoryLedger()
    async with FakeLLMServer() as server:
        configure_batches(server, in_progress_polls=4)
        requests = prepared(25)
        async with runner_for(kind, server, ledger) as first:
            out1 = await collect(first.run("job", requests, wait=False))  # one round, then the "process dies"
        assert out1 == {}
        assert [r.phase for r in ledger.native_batches("job")] == [RecordPhase.SUBMITTED]
        async with runner_for(kind, server, ledger) as second:
            assert second.status("job") is BatchStatus.PROCESSING
            out2 = await collect(second.run("job", requests))
            assert second.batches_created == 0
        assert len(batch_stats(server).created) == 1
        assert sorted(out2) == list(range(25))


@pytest.mark.parametrize("kind", KINDS)
async def test_restart_after_results_were_partly_stored_yields_only_the_rest(kind: str) -> None:
    ledger = MemoryLedger()
    async with FakeLLMServer() as server:
        requests = prepared(12)
        async with runner_for(kind, server, ledger, chunk_size=5) as first:
            chunks = first.run("job", requests)
            stored: dict[int, Outcome] = {}
            async for reqs, outs in chunks:
                stored.update({r.index: o for r, o in zip(reqs, outs, strict=True)})
                break  # crash after the first chunk reached the store
            await chunks.aclose()
        assert len(stored) == 5
        rest = [r for r in requests if r.index not in stored]
        async with runner_for(kind, server, ledger) as second:
            out = await collect(second.run("job", rest))
        assert sorted(out) == sorted(r.index for r in rest)
        assert len(batch_stats(server).created) == 1


async def test_openai_crash_between_create_and_ledger_write_adopts_the_batch() -> None:
    ledger = MemoryLedger()
    async with FakeLLMServer() as server:
        requests = prepared(6)
        async with runner_for("openai", server, ledger) as first:
            await first.submit("job", requests)
        (record,) = ledger.native_batches("job")
        # as if the process died after the create call but before the batch id was written
        ledger.save_native_batch(record.evolve(phase=RecordPhase.SUBMITTING, batch_id=None, state=None))
        async with runner_for("openai", server, ledger) as second:
            out = await collect(second.run("job", requests))
        assert len(batch_stats(server).created) == 1
        assert sorted(out) == list(range(6))
        assert ledger.native_batches("job")[0].batch_id == record.batch_id


@pytest.mark.parametrize("kind", KINDS)
async def test_bad_key_is_fatal_and_key_never_leaks(kind: str) -> None:
    async with FakeLLMServer(api_key="right") as server:
        runner = NativeBatchRunner(provider_for(kind, server, key="sk-wrong-secret"), poll_interval=0.01, retry=FAST_RETRY)
        async with runner:
            with pytest.raises(AuthenticationError) as info:
                await collect(runner.run("job", prepared(3)))
        assert "sk-wrong-secret" not in str(info.value)
        assert batch_stats(server).created == []
        assert all(r.phase is RecordPhase.ABANDONED for r in runner.records("job"))
        assert "sk-wrong-secret" not in repr(runner.records("job"))


@pytest.mark.parametrize("kind", KINDS)
async def test_create_failure_is_retried(kind: str) -> None:
    async with FakeLLMServer() as server:
        configure_batches(server, fail_create=1)
        async with runner_for(kind, server) as runner:
            out = await collect(runner.run("job", prepared(4)))
        assert len(out) == 4 and len(batch_stats(server).created) == 1


async def test_openai_batch_failing_validation_fails_its_rows() -> None:
    async with FakeLLMServer() as server:
        configure_batches(server, fail_validation="model not allowed in batches")
        async with runner_for("openai", server) as runner:
            out = await collect(runner.run("job", prepared(3)))
        assert len(out) == 3
        assert all(o.error_type == "BadRequestError" and "model not allowed" in (o.error or "") for o in out.values())


@pytest.mark.parametrize("kind", KINDS)
async def test_unsendable_rows_fail_without_a_request(kind: str) -> None:
    from nagents_frames.errors import PromptError

    async with FakeLLMServer() as server:
        requests = [*prepared(2), PreparedRequest(2, "id-2", "", None, None, PromptError("prompt column is null"))]
        async with runner_for(kind, server) as runner:
            out = await collect(runner.run("job", requests))
        assert out[2].error_type == "PromptError" and out[2].attempts == 0
        assert batch_stats(server).requests_per_batch == [2]


@pytest.mark.parametrize("kind", KINDS)
async def test_split_by_request_count_and_bytes(kind: str) -> None:
    async with FakeLLMServer() as server:
        async with runner_for(kind, server, limits=BatchLimits(max_requests=7, max_bytes=10_000)) as runner:
            out = await collect(runner.run("job", prepared(30, text="x" * 500)))
        sim = batch_stats(server)
        assert sum(sim.requests_per_batch) == 30 and len(out) == 30
        assert max(sim.requests_per_batch) <= 7
        assert max(sim.bytes_per_batch) <= 10_000
        assert len(sim.created) > 30 // 7  # the byte limit split further than the count limit alone


@pytest.mark.parametrize("kind", KINDS)
async def test_cancel_before_any_batch_sends_nothing(kind: str) -> None:
    async with FakeLLMServer() as server:
        async with runner_for(kind, server) as runner:
            assert await runner.cancel("job") == []
            out = await collect(runner.run("job", prepared(3)))
        assert out == {} and batch_stats(server).created == []


@pytest.mark.parametrize("kind", KINDS)
async def test_resume_after_cancel_sends_only_the_unanswered_rows(kind: str) -> None:
    ledger = MemoryLedger()
    async with FakeLLMServer() as server:
        configure_batches(server, in_progress_polls=1000, keep_fraction=0.5)
        requests = prepared(10)
        async with runner_for(kind, server, ledger) as first:
            await first.submit("job", requests)
            await first.cancel("job")
            partial = await collect(first.run("job", requests))
            assert first.status("job") is BatchStatus.CANCELLED
        assert len(partial) == 5
        configure_batches(server, in_progress_polls=1)
        rest = [r for r in requests if r.index not in partial]
        async with runner_for(kind, server, ledger) as second:
            out = await collect(second.run("job", rest))
            assert second.status("job") is BatchStatus.COMPLETED
        assert sorted(out) == sorted(r.index for r in rest)
        assert batch_stats(server).requests_per_batch == [10, 5]


# --- through the job API: BatchManager(mode="native") with the DuckDB store -------------------------------


def native_provider(kind: str, server: FakeLLMServer) -> Provider:
    # the manager builds its runner itself: poll settings travel in Provider.options
    return Provider(
        provider_type=kind, model="echo", api_key="sk-test", base_url=server.base_url,
        options={"batch_poll_interval": 0.01, "batch_max_poll_interval": 0.05},
    )


def sql_rows(store: BatchStore, query: str, *params: object) -> list[dict[str, Any]]:
    table = store.sql(query, params=list(params), arrow=True)
    assert isinstance(table, pa.Table)
    return table.to_pylist()


async def wait_for_batch(store: BatchStore, job_id: str) -> None:
    for _ in range(500):
        if any(r.phase is RecordPhase.SUBMITTED for r in store.native_batches(job_id)):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no provider batch was created")


@pytest.mark.parametrize("kind", KINDS)
async def test_manager_native_mode_same_results_rows_and_half_price(kind: str, tmp_path: Path) -> None:
    async with FakeLLMServer(error_on_content={"boom": 400}) as server:
        configure_batches(server, in_progress_polls=2, finalizing_polls=1)
        store = await BatchStore(tmp_path / "jobs.duckdb").initialize()
        requests = [BatchRequest(id=f"req-{i}", messages=[{"role": "user", "content": f"item {i}"}]) for i in range(8)]
        requests.append(BatchRequest(id="req-bad", messages=[{"role": "user", "content": "boom"}]))
        async with BatchManager(provider=native_provider(kind, server), store=store, mode="native", retry=FAST_RETRY) as m:
            job = await m.submit(requests)
            done = await m.wait(job.id, timeout=60)
            assert done.status is BatchStatus.COMPLETED and done.mode == "native"
            assert (done.succeeded, done.failed) == (8, 1)
            results = {r.id: r for r in await m.get_results(job.id)}
        assert results["req-3"].response == "echo: item 3" and results["req-3"].usage is not None
        assert results["req-bad"].error is not None and results["req-bad"].status_code == 400
        (batch,) = store.native_batches(job.id)
        assert batch.phase is RecordPhase.COLLECTED and batch.batch_id == batch_stats(server).created[0]
        assert sql_rows(store, "SELECT count(*) AS n FROM results WHERE job_id = ?", job.id) == [{"n": 9}]
        ids = sql_rows(store, "SELECT batch_id FROM native_batches WHERE job_id = ?", job.id)
        assert ids == [{"batch_id": batch.batch_id}]
        # the cost report prices a native job at the batch discount
        from nagents_frames.report import report

        prices = {"echo": (1.0, 2.0)}
        rep = report(store, job.id, prices=prices)
        (tokens,) = sql_rows(
            store, "SELECT sum(prompt_tokens)::BIGINT AS p, sum(completion_tokens)::BIGINT AS c FROM results WHERE job_id = ?",
            job.id,
        )
        full = (tokens["p"] * 1.0 + tokens["c"] * 2.0) / 1e6
        assert rep.stats.cost_usd == pytest.approx(full / 2)
        await store.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_manager_native_cancel_keeps_partial_results(kind: str, tmp_path: Path) -> None:
    async with FakeLLMServer() as server:
        configure_batches(server, in_progress_polls=10_000, keep_fraction=0.5)
        store = await BatchStore(tmp_path / "jobs.duckdb").initialize()
        async with BatchManager(provider=native_provider(kind, server), store=store, mode="native") as m:
            job = await m.submit([BatchRequest(id=f"r{i}", messages=[{"role": "user", "content": f"c {i}"}]) for i in range(6)])
            await wait_for_batch(store, job.id)
            assert await m.get_status(job.id) is BatchStatus.PROCESSING
            await m.cancel(job.id)
            done = await m.wait(job.id, timeout=60)
            assert done.status is BatchStatus.CANCELLED
            partial = await m.get_results(job.id, partial=True)
        assert batch_stats(server).cancels == 1 and len(batch_stats(server).created) == 1
        answered = [r for r in partial if r.response is not None]
        assert len(answered) == 3 and all(r.response == f"echo: c {r.id[1:]}" for r in answered)
        await store.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_manager_native_restart_resumes_polling_without_a_second_batch(kind: str, tmp_path: Path) -> None:
    async with FakeLLMServer() as server:
        configure_batches(server, in_progress_polls=10_000)
        path = tmp_path / "jobs.duckdb"
        store = await BatchStore(path).initialize()
        first = BatchManager(provider=native_provider(kind, server), store=store, mode="native", heartbeat_interval=0.05)
        job = await first.submit([BatchRequest(id=f"r{i}", messages=[{"role": "user", "content": f"x {i}"}]) for i in range(7)])
        await wait_for_batch(store, job.id)
        await first.close()  # the process "dies" with the batch still running at the provider
        await store.close()
        configure_batches(server, in_progress_polls=1)
        store = await BatchStore(path).initialize()
        async with BatchManager(provider=native_provider(kind, server), store=store, mode="native") as second:
            await second.resume(job.id)
            done = await second.wait(job.id, timeout=60)
            results = await second.get_results(job.id)
        assert done.status is BatchStatus.COMPLETED and len(results) == 7
        assert all(r.response == f"echo: x {r.id[1:]}" for r in results)
        assert len(batch_stats(server).created) == 1
        await store.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_manager_native_retry_failed_resubmits_only_failed_rows(kind: str, tmp_path: Path) -> None:
    async with FakeLLMServer(error_on_content={"flaky": 503}) as server:
        store = await BatchStore(tmp_path / "jobs.duckdb").initialize()
        requests = [
            BatchRequest(id=f"r{i}", messages=[{"role": "user", "content": f"{'flaky' if i % 3 == 0 else 'fine'} {i}"}])
            for i in range(9)
        ]
        async with BatchManager(provider=native_provider(kind, server), store=store, mode="native") as m:
            job = await m.submit(requests)
            first = await m.wait(job.id, timeout=60)
            assert (first.succeeded, first.failed) == (6, 3)
            server.configure(error_on_content={})
            await m.retry_failed(job.id)
            second = await m.wait(job.id, timeout=60)
            results = await m.get_results(job.id)
        assert second.status is BatchStatus.COMPLETED and (second.succeeded, second.failed) == (9, 0)
        assert all(r.ok for r in results)
        assert batch_stats(server).requests_per_batch == [9, 3]
        await store.close()


# --- 120,000 requests: split to the real limits, bounded memory ---------------------------------------------


@pytest.fixture
def server_process() -> Iterator[str]:
    """The fake server in a process of its own, so that tracemalloc measures the client alone."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "nagents_frames.testing", "--no-bodies"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        yield str(json.loads(line)["base_url"])
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _big_job(n: int) -> tuple[str, list[PreparedRequest]]:
    filler = "lorem ipsum dolor sit amet " * 20  # about 540 bytes a prompt
    return filler, [PreparedRequest(i, str(i), "", ({"role": "user", "content": f"{i} {filler}"},)) for i in range(n)]


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_120k_requests_openai_split_upload_and_download_in_bounded_memory(server_process: str) -> None:
    n = 120_000
    filler, requests = _big_job(n)
    provider = Provider(provider_type="openai", model="echo", api_key="k", base_url=server_process)
    ledger = MemoryLedger()
    async with NativeBatchRunner(provider, ledger=ledger, poll_interval=0.01, max_poll_interval=0.05) as runner:
        answered = 0
        tracemalloc.start()
        try:
            async for reqs, outs in runner.run("big", requests):
                answered += sum(o.error is None for o in outs)
                r, o = reqs[-1], outs[-1]
                assert o.response == f"echo: {r.index} {filler}"
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        sent, received = runner.http.bytes_sent, runner.http.bytes_received
    records = ledger.native_batches("big")
    assert answered == n
    # the fake server refuses files over 50,000 requests or 200 MB, as OpenAI does
    assert [r.request_count for r in records] == [50_000, 50_000, 20_000]
    assert all(r.bytes <= 200_000_000 for r in records) and all(r.state == "completed" for r in records)
    assert sent > n * 500 and received > sent
    # ~200 MB went up and came down through the client; its memory stayed a small fraction of that
    assert peak < (sent + received) / 10, f"peak {peak / 1e6:.1f} MB for {(sent + received) / 1e6:.1f} MB moved"


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_120k_requests_anthropic_split_and_streamed_body_in_bounded_memory(server_process: str) -> None:
    n = 120_000
    _, requests = _big_job(n)
    provider = Provider(provider_type="anthropic", model="echo", api_key="k", base_url=server_process)
    ledger = MemoryLedger()
    async with NativeBatchRunner(provider, ledger=ledger, poll_interval=0.01) as runner:
        tracemalloc.start()
        try:
            created, unsendable = await runner.submit("big", requests)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        sent = runner.http.bytes_sent
        # the download path is the same streamed line reader as OpenAI's (tested above); cancel, don't pay
        await runner.cancel("big")
    assert unsendable == ([], [])
    # the fake server refuses bodies over 100,000 requests or 256 MB, as Anthropic does
    assert [r.request_count for r in created] == [100_000, 20_000]
    assert all(r.phase is RecordPhase.SUBMITTED and r.batch_id for r in created)
    assert sent > n * 500
    assert peak < sent / 10, f"peak {peak / 1e6:.1f} MB for {sent / 1e6:.1f} MB sent"
