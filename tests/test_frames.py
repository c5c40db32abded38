"""batch_complete / abatch_complete over polars, pandas and pyarrow against the fake server over HTTP."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nagents_frames import (
    ConfigurationError,
    GenerationParams,
    Provider,
    abatch_complete,
    batch_complete,
)
from nagents_frames.errors import (
    ColumnNotFoundError,
    ColumnTypeError,
    TemplateError,
    UnsupportedFrameError,
)
from nagents_frames.frames import CompletionOptions, astream_complete
from nagents_frames.testing import FakeLLMServer
from tests.conftest import frame_to_pydict, make_frame


def _type_of(frame: Any) -> str:
    return type(frame).__module__.split(".")[0] + "." + type(frame).__name__


def test_same_type_back_input_unchanged_order_kept(frame_factory, provider, server):
    texts = [f"row {i}" for i in range(57)]
    frame = frame_factory({"id": list(range(57)), "text": texts})
    out = batch_complete(frame, provider=provider, prompt="Summarize: {text}", progress=False, chunk_size=10)
    assert _type_of(out) == _type_of(frame)
    cols = frame_to_pydict(out)
    assert list(cols)[:2] == ["id", "text"]
    assert list(cols)[2:] == ["response", "error"]
    assert cols["id"] == list(range(57))
    assert cols["text"] == texts
    assert cols["response"] == [f"echo: Summarize: {t}" for t in texts]
    assert cols["error"] == [None] * 57
    assert server.stats.requests == 57


def test_pipe_with_prompt_column(frame_factory, provider):
    frame = frame_factory({"prompt": ["a", "b"]})
    if isinstance(frame, pa.Table):  # Arrow tables have no .pipe; the plain call is the same thing
        out = batch_complete(frame, provider=provider, progress=False)
    else:
        out = frame.pipe(batch_complete, provider=provider, progress=False)
    assert frame_to_pydict(out)["response"] == ["echo: a", "echo: b"]


def test_error_column_is_string_even_when_all_succeed(provider):
    out = batch_complete(pa.table({"prompt": ["a"]}), provider=provider, progress=False)
    assert out.schema.field("error").type == pa.string()
    assert out.schema.field("response").type == pa.string()


def test_failing_row_is_its_error_not_the_tables(frame_factory, provider, server):
    server.configure(error_on_content={"poison": 400})
    frame = frame_factory({"prompt": ["fine", "poison pill", "also fine"]})
    out = frame_to_pydict(batch_complete(frame, provider=provider, progress=False))
    assert out["response"] == ["echo: fine", None, "echo: also fine"]
    assert out["error"][0] is None and out["error"][2] is None
    assert out["error"][1].startswith("BadRequestError 400:")
    assert "poison" in out["error"][1]


def test_null_and_empty_prompts_are_row_errors_and_not_sent(frame_factory, provider, server):
    frame = frame_factory({"text": ["x", None, "", "   ", "y"]})
    out = frame_to_pydict(batch_complete(frame, provider=provider, prompt="{text}", progress=False))
    assert out["response"][0] == "echo: x" and out["response"][4] == "echo: y"
    for i in (1, 2, 3):
        assert out["response"][i] is None
        assert out["error"][i].startswith("PromptError:")
    assert server.stats.requests == 2


def test_messages_column(provider, server):
    messages = [
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "first"}],
        [{"role": "user", "content": "second"}],
        [{"role": "wizard", "content": "third"}],
    ]
    table = pa.table({"conversation": messages})
    out = batch_complete(table, provider=provider, prompt_column="conversation", progress=False).to_pydict()
    assert out["response"][:2] == ["echo: first", "echo: second"]
    assert out["error"][2].startswith("PromptError:") and "role" in out["error"][2]
    assert server.stats.bodies[0]["messages"][0] == {"role": "system", "content": "be brief"}


def test_system_examples_and_params_reach_the_server(provider, server):
    table = pa.table({"q": ["2+2?"], "temp": [0.7]})
    batch_complete(
        table,
        provider=provider,
        prompt="Q: {q}",
        system="You are a calculator.",
        examples=[("Q: 1+1?", "2")],
        param_columns={"temperature": "temp"},
        max_tokens=7,
        seed=3,
        stop=["\n"],
        progress=False,
    )
    body = server.stats.bodies[0]
    assert body["messages"] == [
        {"role": "system", "content": "You are a calculator."},
        {"role": "user", "content": "Q: 1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "Q: 2+2?"},
    ]
    assert body["temperature"] == 0.7
    assert body["max_tokens"] == 7 and body["seed"] == 3 and body["stop"] == ["\n"]
    assert body["model"] == "echo"


def test_provider_defaults_overridden_per_call(server):
    p = Provider(provider_type="openai_compatible", model="echo", base_url=server.base_url, temperature=0.1, max_tokens=50)
    batch_complete(pa.table({"prompt": ["a"]}), provider=p, temperature=0.9, progress=False)
    batch_complete(pa.table({"prompt": ["b"]}), provider=p, progress=False)
    assert server.stats.bodies[0]["temperature"] == 0.9 and server.stats.bodies[0]["max_tokens"] == 50
    assert server.stats.bodies[1]["temperature"] == 0.1


def test_identical_requests_sent_once_and_fanned_out(frame_factory, provider, server):
    frame = frame_factory({"prompt": ["same", "other", "same", "same", "other"]})
    out = frame_to_pydict(batch_complete(frame, provider=provider, usage=True, progress=False, chunk_size=2))
    assert out["response"] == ["echo: same", "echo: other", "echo: same", "echo: same", "echo: other"]
    assert server.stats.prompts == {"same": 1, "other": 1}
    # only the rows that were really sent carry attempts and tokens: sums stay what was paid
    assert sorted(out["attempts"]) == [0, 0, 0, 1, 1]
    assert sum(out["completion_tokens"]) == 2 * 2


def test_usage_columns(frame_factory, provider):
    frame = frame_factory({"prompt": ["hello there", "x"]})
    out = frame_to_pydict(batch_complete(frame, provider=provider, usage=True, progress=False))
    assert list(out)[-4:] == ["prompt_tokens", "completion_tokens", "latency_s", "attempts"]
    assert all(t and t > 0 for t in out["prompt_tokens"])
    assert all(t and t > 0 for t in out["completion_tokens"])
    assert all(lat is not None and lat >= 0 for lat in out["latency_s"])
    assert out["attempts"] == [1, 1]


def test_retries_transient_errors(provider, server):
    server.configure(fail_first=2, fail_first_status=503)
    out = batch_complete(
        pa.table({"prompt": ["a", "b"]}),
        provider=provider,
        usage=True,
        progress=False,
        retry=__import__("nagents_frames").RetryPolicy(base_delay=0.01, max_delay=0.05),
    ).to_pydict()
    assert out["response"] == ["echo: a", "echo: b"]
    assert out["attempts"] == [3, 3]
    assert server.stats.by_status[503] == 4


def test_no_retry_for_other_4xx(provider, server):
    server.configure(error_on_content={"bad": 422})
    out = batch_complete(pa.table({"prompt": ["bad"]}), provider=provider, usage=True, progress=False).to_pydict()
    assert out["attempts"] == [1]
    assert out["error"][0].startswith("BadRequestError 422")
    assert server.stats.requests == 1


def test_record_batch_reader_in_reader_out(provider):
    table = pa.table({"prompt": [f"p{i}" for i in range(25)]})
    reader = pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=7))
    out = batch_complete(reader, provider=provider, progress=False, chunk_size=4)
    assert isinstance(out, pa.RecordBatchReader)
    result = out.read_all().to_pydict()
    assert result["prompt"] == table.column("prompt").to_pylist()
    assert result["response"] == [f"echo: p{i}" for i in range(25)]


def test_empty_table(frame_factory, provider, server):
    frame = frame_factory({"prompt": pa.array([], type=pa.string())})
    out = batch_complete(frame, provider=provider, progress=False)
    cols = frame_to_pydict(out)
    assert cols["response"] == [] and cols["error"] == []
    assert server.stats.requests == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"prompt": "Summarize: {txt}"}, ColumnNotFoundError, "'text'"),
        ({"prompt": ""}, TemplateError, "empty"),
        ({"prompt": "Summarize {"}, TemplateError, "malformed"),
        ({"prompt": "{0}"}, TemplateError, "positional"),
        ({}, ColumnNotFoundError, "prompt column 'prompt'"),
        ({"prompt": "{text}", "concurrency": 0}, ConfigurationError, "concurrency"),
        ({"prompt": "{text}", "concurrency": -3}, ConfigurationError, "concurrency"),
        ({"prompt_column": "n"}, ColumnTypeError, "int64"),
        ({"prompt": "{text}", "max_tokens": 0}, ConfigurationError, "max_tokens"),
        ({"prompt": "{text}", "response_column": "text"}, ConfigurationError, "already has"),
    ],
)
def test_bad_arguments_raise_typed_errors_before_sending(frame_factory, provider, server, kwargs, error, needle):
    frame = frame_factory({"text": ["a"], "n": [1]})
    with pytest.raises(error) as info:
        batch_complete(frame, provider=provider, progress=False, **kwargs)
    assert needle in str(info.value)
    assert server.stats.requests == 0


def test_missing_column_message_lists_available_columns(provider):
    with pytest.raises(ColumnNotFoundError, match=r"available columns: 'body', 'title'"):
        batch_complete(pa.table({"body": ["a"], "title": ["b"]}), provider=provider, prompt="{text}", progress=False)


def test_unknown_frame_type(provider):
    with pytest.raises(UnsupportedFrameError, match="list"):
        batch_complete([{"prompt": "a"}], provider=provider)
    with pytest.raises(TypeError):  # also a TypeError, for callers that catch that
        batch_complete({"prompt": ["a"]}, provider=provider)


def test_provider_must_be_a_provider():
    with pytest.raises(ConfigurationError, match="Provider"):
        batch_complete(pa.table({"prompt": ["a"]}), provider="openai")


async def test_async_twin(provider):
    out = await abatch_complete(pa.table({"prompt": ["a", "b"]}), provider=provider, progress=False)
    assert out.column("response").to_pylist() == ["echo: a", "echo: b"]


async def test_sync_call_inside_running_loop_like_jupyter(provider):
    # a notebook cell already runs an event loop: the sync call must still work (worker-thread loop)
    out = batch_complete(pa.table({"prompt": ["a"]}), provider=provider, progress=False)
    assert out.column("response").to_pylist() == ["echo: a"]
    assert threading.active_count() >= 1


async def test_stream_complete_yields_batches_in_order(provider):
    table = pa.table({"text": [f"t{i}" for i in range(30)]})
    options = CompletionOptions(provider=provider, prompt="{text}", chunk_size=8)
    batches = [b async for b in astream_complete(table.to_batches(max_chunksize=11), options=options)]
    assert sum(b.num_rows for b in batches) == 30
    got = pa.Table.from_batches(batches).to_pydict()
    assert got["response"] == [f"echo: t{i}" for i in range(30)]


def test_progress_bar_counts_rows(provider, capsys):
    batch_complete(pa.table({"prompt": ["a", "b", "c"]}), provider=provider, progress=True)
    err = capsys.readouterr().err
    assert "3/3" in err


def test_generation_params_merge():
    base = GenerationParams(temperature=0.1, max_tokens=10, extra={"a": 1})
    merged = base.merged(GenerationParams(temperature=0.5, extra={"b": 2}))
    assert merged.temperature == 0.5 and merged.max_tokens == 10
    assert merged.extra == {"a": 1, "b": 2}


def test_api_key_from_environment_and_never_in_repr(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env-secret")
    server.configure(api_key="sk-env-secret")
    p = Provider(provider_type="openai_compatible", model="echo", base_url=server.base_url)
    assert "sk-env-secret" not in repr(p)
    out = batch_complete(pa.table({"prompt": ["a"]}), provider=p, progress=False)
    assert out.column("response").to_pylist() == ["echo: a"]
    assert server.stats.headers[0]["Authorization"] == "Bearer sk-env-secret"


def test_no_key_for_local_servers(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    p = Provider(provider_type="openai_compatible", model="echo", base_url=server.base_url)
    batch_complete(pa.table({"prompt": ["a"]}), provider=p, progress=False)
    assert "Authorization" not in server.stats.headers[0]


def test_bad_key_raises_authentication_error_after_few_requests(server):
    from nagents_frames import AuthenticationError

    server.configure(api_key="right-key")
    p = Provider(provider_type="openai_compatible", model="echo", base_url=server.base_url, api_key="wrong-key-123")
    table = pa.table({"prompt": [f"p{i}" for i in range(500)]})
    with pytest.raises(AuthenticationError) as info:
        batch_complete(table, provider=p, concurrency=64, progress=False)
    assert "wrong-key-123" not in str(info.value)
    assert server.stats.requests <= 4


def test_importing_does_not_import_pandas_ray_matplotlib():
    code = "import sys, nagents_frames; print(sorted(m for m in ('pandas','ray','matplotlib','llama_cpp') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


_text = st.one_of(st.none(), st.text(max_size=40))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(_text, max_size=30), kind=st.sampled_from(["polars", "pandas", "pyarrow"]))
def test_random_tables_round_trip(values, kind):
    with FakeLLMServer() as srv:
        p = Provider(provider_type="openai_compatible", model="echo", base_url=srv.base_url)
        frame = make_frame(kind, {"text": pa.array(values, type=pa.string())})
        out = frame_to_pydict(batch_complete(frame, provider=p, prompt="{text}", progress=False, chunk_size=7))
    assert out["text"] == values
    assert len(out["response"]) == len(values) == len(out["error"])
    for value, response, error in zip(values, out["response"], out["error"]):
        # exactly one of answer / error per row
        assert (response is None) != (error is None)
        if value is None or not value.strip():
            assert error is not None and error.startswith("PromptError")
        else:
            assert response == f"echo: {value}"


def test_concurrency_is_bounded(server):
    server.configure(latency=0.05)
    p = Provider(provider_type="openai_compatible", model="echo", base_url=server.base_url)
    batch_complete(pa.table({"prompt": [f"p{i}" for i in range(60)]}), provider=p, concurrency=5, progress=False)
    assert 2 <= server.stats.max_in_flight <= 5


def test_run_sync_in_thread_propagates_errors():
    from nagents_frames.frames import run_sync

    async def boom() -> None:
        raise ValueError("inner")

    async def outer() -> None:
        with pytest.raises(ValueError, match="inner"):
            run_sync(boom())

    asyncio.run(outer())
