"""Every provider adapter: the exact request it builds (and the fake server receives over real HTTP), the
documented success and error responses it parses, end-to-end batch_complete, and keeping the key secret."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nagents_frames import Provider, RetryPolicy, batch_complete
from nagents_frames.errors import (
    AuthenticationError,
    BadRequestError,
    ContentFilteredError,
    MalformedResponseError,
    NotFoundError,
    RateLimitError,
    RequestError,
    ServerError,
)
from nagents_frames.executor import Executor
from nagents_frames.providers import anthropic, azure, gemini, get_adapter, openai
from nagents_frames.ratelimit import parse_rate_limit_headers
from nagents_frames.testing import FakeLLMServer
from nagents_frames.types import GenerationParams, ProviderType, Usage
from tests.conftest import frame_to_pydict

SECRET = "sk-test-SECRET-0123456789"
FAST_RETRY = RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=0.05)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "system", "content": "Answer in French."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Bonjour"},
    {"role": "user", "content": "How are you?"},
]

PROVIDER_KINDS = ("openai", "anthropic", "gemini", "azure", "azure_v1")


def make_provider(kind: str, server: FakeLLMServer, *, key: str = SECRET, **kw: Any) -> Provider:
    """A provider of each kind pointed at the fake server."""
    if kind == "openai":
        return Provider(provider_type="openai", model="gpt-4o-mini", api_key=key, base_url=server.base_url, **kw)
    if kind == "anthropic":
        return Provider(provider_type="anthropic", model="claude-haiku-4-5", api_key=key, base_url=server.base_url, **kw)
    if kind == "gemini":
        return Provider(
            provider_type="gemini_native", model="gemini-2.5-flash", api_key=key, base_url=server.url + "/v1beta", **kw
        )
    if kind == "azure":
        return Provider(provider_type="azure_openai", model="my-gpt4o", api_key=key, base_url=server.url, **kw)
    if kind == "azure_v1":
        return Provider(
            provider_type="azure_openai", model="my-gpt4o", api_key=key, base_url=server.url + "/openai/v1", **kw
        )
    raise ValueError(kind)


def lower_keys(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


# --- requests as built: exact URL, headers and body ---------------------------------------------------------


def test_openai_request_exact():
    p = Provider(provider_type="openai", model="gpt-4o-mini", api_key=SECRET, base_url="https://api.openai.com/v1")
    req = p.adapter.build_request(p, CONVERSATION[2:3], GenerationParams(temperature=0.2, max_tokens=7, stop=("X",), seed=3))
    assert (req.method, req.url) == ("POST", "https://api.openai.com/v1/chat/completions")
    assert req.headers == {"Content-Type": "application/json", "Authorization": f"Bearer {SECRET}"}
    assert json.loads(req.body) == {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Hi"}],
        "temperature": 0.2,
        "max_tokens": 7,
        "stop": ["X"],
        "seed": 3,
    }


def test_anthropic_request_exact():
    p = Provider(provider_type="anthropic", model="claude-sonnet-4-5", api_key=SECRET)
    assert p.base_url == "https://api.anthropic.com/v1"
    params = GenerationParams(temperature=0.5, top_p=0.9, stop=("END", "STOP"), seed=7, extra={"top_k": 5})
    req = p.adapter.build_request(p, CONVERSATION, params)
    assert (req.method, req.url) == ("POST", "https://api.anthropic.com/v1/messages")
    assert req.headers == {"Content-Type": "application/json", "anthropic-version": "2023-06-01", "x-api-key": SECRET}
    assert json.loads(req.body) == {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,  # required by the API: the documented default when nothing sets it
        "system": "Be brief.\n\nAnswer in French.",
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Bonjour"},
            {"role": "user", "content": "How are you?"},
        ],
        "temperature": 0.5,
        "top_p": 0.9,
        "stop_sequences": ["END", "STOP"],
        "top_k": 5,
    }  # no "seed": the Messages API has none


def test_anthropic_request_version_max_tokens_and_json_mode():
    p = Provider(
        provider_type="anthropic", model="claude-haiku-4-5", api_key=SECRET, api_version="2024-01-01",
        options={"default_max_tokens": 64},
    )
    req = p.adapter.build_request(p, [{"role": "user", "content": "hi"}], GenerationParams())
    assert req.headers["anthropic-version"] == "2024-01-01"
    assert json.loads(req.body)["max_tokens"] == 64
    assert json.loads(p.adapter.build_request(p, CONVERSATION[2:3], GenerationParams(max_tokens=9)).body)["max_tokens"] == 9
    schema = {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    body = json.loads(p.adapter.build_request(p, CONVERSATION[2:3], GenerationParams(response_format=fmt)).body)
    assert "JSON" in body["system"] and json.dumps(schema, sort_keys=True) in body["system"]
    assert "response_format" not in body and "output_format" not in body
    native = p.with_options(options={"structured_outputs": "native"})
    req = native.adapter.build_request(native, CONVERSATION[2:3], GenerationParams(response_format=fmt))
    assert json.loads(req.body)["output_format"] == {"type": "json_schema", "schema": schema}
    assert "system" not in json.loads(req.body)
    assert req.headers["anthropic-beta"] == anthropic.STRUCTURED_OUTPUTS_BETA
    plain = native.adapter.build_request(native, CONVERSATION[2:3], GenerationParams())
    assert "anthropic-beta" not in plain.headers


def test_anthropic_request_content_parts():
    p = Provider(provider_type="anthropic", model="claude-haiku-4-5", api_key=SECRET)
    parts = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "image_url", "image_url": {"url": "https://example.org/cat.png"}},
    ]
    body = json.loads(p.adapter.build_request(p, [{"role": "user", "content": parts}], GenerationParams()).body)
    assert body["messages"][0]["content"] == [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
        {"type": "image", "source": {"type": "url", "url": "https://example.org/cat.png"}},
    ]


def test_gemini_request_exact():
    p = Provider(provider_type="gemini_native", model="models/gemini-2.5-flash", api_key=SECRET)
    params = GenerationParams(temperature=0.1, top_p=0.8, max_tokens=50, stop=("\n\n",), seed=11)
    req = p.adapter.build_request(p, CONVERSATION, params)
    assert req.url == "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent"
    assert SECRET not in req.url and "key=" not in req.url
    assert req.headers == {"Content-Type": "application/json", "x-goog-api-key": SECRET}
    assert json.loads(req.body) == {
        "systemInstruction": {"parts": [{"text": "Be brief."}, {"text": "Answer in French."}]},
        "contents": [
            {"role": "user", "parts": [{"text": "Hi"}]},
            {"role": "model", "parts": [{"text": "Bonjour"}]},
            {"role": "user", "parts": [{"text": "How are you?"}]},
        ],
        "generationConfig": {
            "temperature": 0.1,
            "topP": 0.8,
            "maxOutputTokens": 50,
            "stopSequences": ["\n\n"],
            "seed": 11,
        },
    }


def test_gemini_request_structured_output_and_extra():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    extra = {"generationConfig": {"topK": 3}, "safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT"}]}
    p = Provider(provider_type="gemini_native", model="gemini-2.5-pro", api_key=SECRET)
    body = json.loads(p.adapter.build_request(p, CONVERSATION[2:3], GenerationParams(response_format=fmt, extra=extra)).body)
    assert body["generationConfig"] == {"responseMimeType": "application/json", "responseJsonSchema": schema, "topK": 3}
    assert body["safetySettings"] == [{"category": "HARM_CATEGORY_HARASSMENT"}]
    older = p.with_options(options={"schema_field": "responseSchema"})
    body = json.loads(older.adapter.build_request(older, CONVERSATION[2:3], GenerationParams(response_format=fmt)).body)
    assert body["generationConfig"] == {"responseMimeType": "application/json", "responseSchema": schema}
    body = json.loads(p.adapter.build_request(p, CONVERSATION[2:3], GenerationParams(response_format={"type": "json_object"})).body)
    assert body["generationConfig"] == {"responseMimeType": "application/json"}


def test_azure_deployment_request_exact():
    p = Provider(provider_type="azure_openai", model="gpt-4o", api_key=SECRET, base_url="https://res.openai.azure.com/")
    req = p.adapter.build_request(p, CONVERSATION[2:3], GenerationParams(temperature=0, max_tokens=5))
    assert req.url == "https://res.openai.azure.com/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    assert req.headers == {"Content-Type": "application/json", "api-key": SECRET}
    assert json.loads(req.body) == {"messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "max_tokens": 5}
    q = p.with_options(api_version="2025-01-01-preview", options={"deployment": "prod-4o"})
    assert q.adapter.build_request(q, CONVERSATION[2:3], GenerationParams()).url == (
        "https://res.openai.azure.com/openai/deployments/prod-4o/chat/completions?api-version=2025-01-01-preview"
    )


def test_azure_v1_request_exact():
    p = Provider(provider_type="azure_openai", model="gpt-4o", api_key=SECRET, base_url="https://res.openai.azure.com/openai/v1")
    req = p.adapter.build_request(p, CONVERSATION[2:3], GenerationParams())
    assert req.url == "https://res.openai.azure.com/openai/v1/chat/completions"
    assert req.headers == {"Content-Type": "application/json", "api-key": SECRET}
    assert json.loads(req.body) == {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}
    q = p.with_options(api_version="preview")
    assert q.adapter.build_request(q, CONVERSATION[2:3], GenerationParams()).url.endswith("/chat/completions?api-version=preview")


def test_registry_maps_every_remote_type_to_its_adapter():
    assert get_adapter(ProviderType.ANTHROPIC) is anthropic.ADAPTER
    assert get_adapter(ProviderType.GEMINI_NATIVE) is gemini.ADAPTER
    assert get_adapter(ProviderType.AZURE_OPENAI) is azure.ADAPTER
    assert get_adapter(ProviderType.OPENAI) is openai.ADAPTER


def test_keys_from_the_environment(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "env-anthropic")
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.setenv("GOOGLE_API_KEY", "env-google")
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "env-azure")
    a = Provider(provider_type="anthropic", model="claude-haiku-4-5")
    g = Provider(provider_type="gemini_native", model="gemini-2.5-flash")
    z = Provider(provider_type="azure_openai", model="d", base_url="https://r.openai.azure.com")
    assert a.adapter.build_request(a, CONVERSATION[2:3], GenerationParams()).headers["x-api-key"] == "env-anthropic"
    assert g.adapter.build_request(g, CONVERSATION[2:3], GenerationParams()).headers["x-goog-api-key"] == "env-google"
    assert z.adapter.build_request(z, CONVERSATION[2:3], GenerationParams()).headers["api-key"] == "env-azure"


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["system", "user", "assistant", "developer"]), st.text(max_size=20)),
        min_size=1,
        max_size=8,
    )
)
def test_system_messages_are_always_lifted(turns):
    messages = [{"role": r, "content": t} for r, t in turns]
    system_texts = [t for r, t in turns if r in ("system", "developer")]
    others = [(r, t) for r, t in turns if r not in ("system", "developer")]
    a = anthropic.build_body("m", messages, GenerationParams())
    assert [(m["role"], m["content"]) for m in a["messages"]] == others
    assert a.get("system", "") == "\n\n".join(t for t in system_texts if t)
    g = gemini.build_body(messages, GenerationParams())
    assert [(c["role"], c["parts"][0]["text"]) for c in g["contents"]] == [
        ("model" if r == "assistant" else "user", t) for r, t in others
    ]
    assert [p["text"] for p in g.get("systemInstruction", {}).get("parts", [])] == system_texts


# --- what the fake server receives over real HTTP is exactly what build_request built ------------------------


@pytest.mark.parametrize("kind", PROVIDER_KINDS)
async def test_server_receives_exactly_the_built_request(kind):
    async with FakeLLMServer(api_key=SECRET) as s:
        p = make_provider(kind, s)
        params = GenerationParams(temperature=0.3, max_tokens=40, stop=("ZZZ",))
        built = p.adapter.build_request(p, CONVERSATION, params)
        async with Executor(p, retry=FAST_RETRY, params=params) as ex:
            out = await ex.complete(CONVERSATION)
        assert out.error is None and out.response == "echo: How are you?"
        assert out.prompt_tokens and out.prompt_tokens > 0 and out.completion_tokens and out.completion_tokens > 0
        assert out.finish_reason == "stop"
        assert s.stats.bodies == [json.loads(built.body)]
        received = lower_keys(s.stats.headers[0])
        for name, value in built.headers.items():
            assert received[name.lower()] == value
        expected_path = built.url.split("://", 1)[1].split("/", 1)[1].split("?", 1)[0]
        assert s.stats.paths == ["/" + expected_path]
        assert SECRET not in built.url and SECRET not in repr(built) and SECRET not in repr(p)


# --- documented responses -----------------------------------------------------------------------------------


def test_anthropic_parses_documented_message():
    body = {
        "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": "Hi! My name is "}, {"type": "text", "text": "Claude."}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 2095, "output_tokens": 503, "cache_read_input_tokens": 5, "cache_creation_input_tokens": 0},
    }
    c = anthropic.ADAPTER.parse_response(200, {}, json.dumps(body).encode())
    assert c.text == "Hi! My name is Claude."
    assert c.usage == Usage(prompt_tokens=2100, completion_tokens=503)
    assert c.finish_reason == "stop"
    for reason, finish in [("max_tokens", "length"), ("stop_sequence", "stop"), ("pause_turn", "pause_turn")]:
        assert anthropic.parse_message({**body, "stop_reason": reason}).finish_reason == finish
    tool = {**body, "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}], "stop_reason": "tool_use"}
    parsed = anthropic.parse_message(tool)
    assert json.loads(parsed.text) == [{"id": "t1", "name": "f", "input": {"a": 1}}] and parsed.finish_reason == "tool_calls"
    with pytest.raises(ContentFilteredError):
        anthropic.parse_message({**body, "content": [], "stop_reason": "refusal"})
    with pytest.raises(MalformedResponseError):
        anthropic.ADAPTER.parse_response(200, {}, b'{"id": "x", "object": "chat.completion"}')
    with pytest.raises(MalformedResponseError):
        anthropic.ADAPTER.parse_response(200, {}, b"<html>")


@pytest.mark.parametrize(
    ("status", "kind", "cls", "retryable"),
    [
        (400, "invalid_request_error", BadRequestError, False),
        (401, "authentication_error", AuthenticationError, False),
        (403, "permission_error", RequestError, False),
        (404, "not_found_error", NotFoundError, False),
        (413, "request_too_large", BadRequestError, False),
        (429, "rate_limit_error", RateLimitError, True),
        (500, "api_error", ServerError, True),
        (529, "overloaded_error", ServerError, True),
    ],
)
def test_anthropic_documented_errors(status, kind, cls, retryable):
    body = json.dumps({"type": "error", "error": {"type": kind, "message": f"the {kind}"}, "request_id": "req_1"})
    with pytest.raises(cls) as info:
        anthropic.ADAPTER.parse_response(status, {"retry-after": "7"}, body.encode())
    err = info.value
    assert err.status_code == status and err.message == f"the {kind}"
    assert RetryPolicy().should_retry(err, 1) is retryable
    if status == 429:
        assert err.retry_after == 7.0  # type: ignore[attr-defined]
    if status in (401, 403, 404):
        assert err.fatal


def test_gemini_parses_documented_response():
    body = {
        "candidates": [
            {
                "content": {"parts": [{"text": "thinking...", "thought": True}, {"text": "AI learns "}, {"text": "patterns."}], "role": "model"},
                "finishReason": "STOP",
                "index": 0,
            }
        ],
        "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 4, "thoughtsTokenCount": 10, "totalTokenCount": 22},
        "modelVersion": "gemini-2.5-flash",
    }
    c = gemini.ADAPTER.parse_response(200, {}, json.dumps(body).encode())
    assert c.text == "AI learns patterns."
    assert c.usage == Usage(prompt_tokens=8, completion_tokens=14)
    assert c.finish_reason == "stop"
    truncated = {**body, "candidates": [{"content": {"role": "model"}, "finishReason": "MAX_TOKENS"}]}
    assert gemini.parse_generate_content(truncated).text == "" and gemini.parse_generate_content(truncated).finish_reason == "length"
    call = {"candidates": [{"content": {"parts": [{"functionCall": {"name": "f", "args": {}}}]}, "finishReason": "STOP"}]}
    assert json.loads(gemini.parse_generate_content(call).text) == [{"name": "f", "args": {}}]
    with pytest.raises(MalformedResponseError):
        gemini.parse_generate_content({"candidates": []})
    with pytest.raises(MalformedResponseError):
        gemini.ADAPTER.parse_response(200, {}, b"not json")


@pytest.mark.parametrize("reason", sorted(gemini.BLOCKED_FINISH_REASONS))
def test_gemini_blocked_answers_are_content_filtered(reason):
    body = {"candidates": [{"finishReason": reason, "index": 0, "safetyRatings": []}]}
    with pytest.raises(ContentFilteredError, match=reason):
        gemini.ADAPTER.parse_response(200, {}, json.dumps(body).encode())


def test_gemini_blocked_prompt_is_content_filtered():
    body = {"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": []}, "usageMetadata": {"promptTokenCount": 3}}
    with pytest.raises(ContentFilteredError, match="SAFETY") as info:
        gemini.ADAPTER.parse_response(200, {}, json.dumps(body).encode())
    assert not info.value.retryable


def test_gemini_documented_errors():
    bad_key = {
        "error": {
            "code": 400,
            "message": "API key not valid. Please pass a valid API key.",
            "status": "INVALID_ARGUMENT",
            "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}],
        }
    }
    with pytest.raises(AuthenticationError) as info:
        gemini.ADAPTER.parse_response(400, {}, json.dumps(bad_key).encode())
    assert info.value.fatal and info.value.status_code == 400
    quota = {
        "error": {
            "code": 429,
            "message": "You exceeded your current quota",
            "status": "RESOURCE_EXHAUSTED",
            "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "30s"}],
        }
    }
    with pytest.raises(RateLimitError) as rl:
        gemini.ADAPTER.parse_response(429, {}, json.dumps(quota).encode())
    assert rl.value.retry_after == 30.0 and "RESOURCE_EXHAUSTED" in rl.value.message
    invalid = {"error": {"code": 400, "message": "Invalid JSON payload", "status": "INVALID_ARGUMENT"}}
    with pytest.raises(BadRequestError):
        gemini.ADAPTER.parse_response(400, {}, json.dumps(invalid).encode())
    for status, cls in [(404, NotFoundError), (500, ServerError), (503, ServerError)]:
        body = {"error": {"code": status, "message": "m", "status": "X"}}
        with pytest.raises(cls):
            gemini.ADAPTER.parse_response(status, {}, json.dumps(body).encode())


def test_azure_parses_openai_shape_and_content_filter():
    ok = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
    }
    c = azure.ADAPTER.parse_response(200, {}, json.dumps(ok).encode())
    assert (c.text, c.usage, c.finish_reason) == ("Hello", Usage(9, 1), "stop")
    filtered = {
        "error": {
            "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management policy.",
            "type": None,
            "param": "prompt",
            "code": "content_filter",
            "status": 400,
            "innererror": {"code": "ResponsibleAIPolicyViolation"},
        }
    }
    with pytest.raises(ContentFilteredError) as info:
        azure.ADAPTER.parse_response(400, {}, json.dumps(filtered).encode())
    assert info.value.status_code == 400 and not RetryPolicy().should_retry(info.value, 1)
    with pytest.raises(BadRequestError):
        azure.ADAPTER.parse_response(400, {}, b'{"error": {"code": "BadRequest", "message": "bad"}}')
    with pytest.raises(RateLimitError) as rl:
        azure.ADAPTER.parse_response(429, {"retry-after": "2"}, b'{"error": {"code": "429", "message": "slow down"}}')
    assert rl.value.retry_after == 2.0
    cut = {**ok, "choices": [{"index": 0, "message": {"role": "assistant", "content": None}, "finish_reason": "content_filter"}]}
    with pytest.raises(ContentFilteredError):
        azure.ADAPTER.parse_response(200, {}, json.dumps(cut).encode())


# --- end to end over the fake server, over polars / pandas / pyarrow -----------------------------------------


@pytest.mark.parametrize("kind", PROVIDER_KINDS)
def test_batch_complete_over_each_provider(kind, frame_factory):
    with FakeLLMServer(api_key=SECRET) as s:
        p = make_provider(kind, s)
        frame = frame_factory({"text": ["a cat", "a dog", "boom now"]})
        s.configure(error_on_content={"boom": 400})
        out = batch_complete(
            frame, provider=p, prompt="Describe {text}", system="Be brief.", usage=True, progress=False, retry=FAST_RETRY
        )
    cols = frame_to_pydict(out)
    assert cols["response"][:2] == ["echo: Describe a cat", "echo: Describe a dog"]
    assert cols["response"][2] is None and cols["error"][2].startswith("BadRequestError 400")
    assert all(t and t > 0 for t in cols["prompt_tokens"][:2]) and all(t and t > 0 for t in cols["completion_tokens"][:2])
    assert all(SECRET not in (e or "") for e in cols["error"])
    assert len(s.stats.bodies) == 3


@pytest.mark.parametrize("kind", PROVIDER_KINDS)
def test_wrong_key_is_fatal_and_never_shown(kind, frame_factory):
    with FakeLLMServer(api_key="the-right-key") as s:
        p = make_provider(kind, s)
        with pytest.raises(AuthenticationError) as info:
            batch_complete(frame_factory({"prompt": ["a", "b", "c", "d"]}), provider=p, progress=False)
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)
    assert s.stats.requests <= 2  # fatal: the run stops after the probing requests


def test_anthropic_529_overloaded_is_retried(frame_factory):
    with FakeLLMServer(fail_first=1, fail_first_status=529) as s:
        p = make_provider("anthropic", s)
        out = batch_complete(frame_factory({"prompt": ["x", "y"]}), provider=p, progress=False, retry=FAST_RETRY, usage=True)
    assert frame_to_pydict(out)["response"] == ["echo: x", "echo: y"]
    assert frame_to_pydict(out)["attempts"] == [2, 2]
    assert s.stats.by_status[529] == 2


def test_anthropic_529_exhausted_is_a_server_error_cell(frame_factory):
    with FakeLLMServer(error_on_content={"busy": 529}) as s:
        p = make_provider("anthropic", s)
        out = batch_complete(frame_factory({"prompt": ["busy"]}), provider=p, progress=False, retry=RetryPolicy(max_attempts=2, base_delay=0.01))
    assert frame_to_pydict(out)["error"][0].startswith("ServerError 529")
    assert s.stats.by_status[529] == 2


def test_anthropic_refusal_and_stop_sequence_end_to_end(frame_factory):
    with FakeLLMServer() as s:
        s.state["anthropic_refuse_on_content"] = {"forbidden": True}
        p = make_provider("anthropic", s, stop=["dog"])
        out = batch_complete(frame_factory({"prompt": ["forbidden topic", "a dog barks"]}), provider=p, progress=False, retry=FAST_RETRY)
    assert frame_to_pydict(out)["error"][0].startswith("ContentFilteredError")
    assert frame_to_pydict(out)["response"] == [None, "echo: a "]
    assert s.stats.bodies[0]["stop_sequences"] == ["dog"]


async def test_anthropic_rate_limit_headers_feed_the_limiter():
    async with FakeLLMServer(rpm_limit=50) as s:
        p = make_provider("anthropic", s)
        req = p.adapter.build_request(p, [{"role": "user", "content": "hi"}], GenerationParams())
        async with aiohttp.ClientSession() as session, session.post(req.url, data=req.body, headers=dict(req.headers)) as resp:
            assert resp.status == 200
            headers = dict(resp.headers)
    assert not any(k.lower().startswith("x-ratelimit") for k in headers)
    snap = parse_rate_limit_headers(headers)
    assert snap is not None and snap.limit_requests == 50 and snap.remaining_requests == 49


async def test_fake_anthropic_rejects_what_the_real_api_rejects():
    async with FakeLLMServer() as s, aiohttp.ClientSession() as session:
        url = s.base_url + "/messages"
        ok_headers = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
        cases = [
            ({"x-api-key": "k"}, {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
            (ok_headers, {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
            (ok_headers, {"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}),
        ]
        for headers, body in cases:
            async with session.post(url, json=body, headers=headers) as resp:
                assert resp.status == 400
                payload = await resp.json()
                assert payload["type"] == "error" and payload["error"]["type"] == "invalid_request_error"


def test_gemini_blocked_and_safety_rows_end_to_end(frame_factory):
    with FakeLLMServer() as s:
        s.state["gemini_block_on_content"] = {"bad prompt": "PROHIBITED_CONTENT"}
        s.state["gemini_finish_on_content"] = {"quote": "RECITATION"}
        p = make_provider("gemini", s)
        out = batch_complete(
            frame_factory({"prompt": ["fine", "bad prompt", "quote a book"]}), provider=p, progress=False, retry=FAST_RETRY
        )
    cols = frame_to_pydict(out)
    assert cols["response"] == ["echo: fine", None, None]
    assert cols["error"][0] is None
    assert cols["error"][1].startswith("ContentFilteredError") and "PROHIBITED_CONTENT" in cols["error"][1]
    assert cols["error"][2].startswith("ContentFilteredError") and "RECITATION" in cols["error"][2]
    assert s.stats.requests == 3  # not retried


def test_gemini_retry_delay_is_honoured(frame_factory):
    with FakeLLMServer(burst_429=1, retry_after=0.05) as s:
        p = make_provider("gemini", s)
        out = batch_complete(frame_factory({"prompt": ["x"]}), provider=p, progress=False, retry=FAST_RETRY, usage=True)
    assert frame_to_pydict(out)["response"] == ["echo: x"] and frame_to_pydict(out)["attempts"] == [2]
    assert s.stats.by_status[429] == 1


async def test_fake_gemini_refuses_keys_in_urls_and_wrong_roles():
    async with FakeLLMServer() as s, aiohttp.ClientSession() as session:
        url = s.url + "/v1beta/models/gemini-2.5-flash:generateContent"
        body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
        async with session.post(url + "?key=abc", json=body) as resp:
            assert resp.status == 400
        async with session.post(url, json={"contents": [{"role": "system", "parts": [{"text": "x"}]}]}) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["status"] == "INVALID_ARGUMENT"


def test_azure_content_filter_rows_end_to_end(frame_factory):
    with FakeLLMServer(models={"my-gpt4o"}) as s:
        s.state["azure_filter_on_content"] = {"violent": "prompt", "spicy": "completion"}
        p = make_provider("azure", s)
        out = batch_complete(frame_factory({"prompt": ["calm", "violent words", "spicy story"]}), provider=p, progress=False, retry=FAST_RETRY)
    errors = frame_to_pydict(out)["error"]
    assert frame_to_pydict(out)["response"][0] == "echo: calm" and errors[0] is None
    assert errors[1].startswith("ContentFilteredError 400") and errors[2].startswith("ContentFilteredError")
    assert s.stats.requests == 3


def test_azure_unknown_deployment_is_fatal(frame_factory):
    with FakeLLMServer(models={"prod"}) as s:
        p = make_provider("azure", s)
        with pytest.raises(NotFoundError):
            batch_complete(frame_factory({"prompt": ["x", "y", "z"]}), provider=p, progress=False)


async def test_fake_azure_requires_api_version():
    async with FakeLLMServer() as s, aiohttp.ClientSession() as session:
        body = {"messages": [{"role": "user", "content": "hi"}]}
        async with session.post(s.url + "/openai/deployments/d/chat/completions", json=body) as resp:
            assert resp.status == 404
        async with session.post(s.url + "/openai/deployments/d/chat/completions?api-version=2024-10-21", json=body) as resp:
            assert resp.status == 200 and (await resp.json())["model"] == "d"


@pytest.mark.parametrize("kind", PROVIDER_KINDS)
def test_rate_limited_provider_recovers(kind, frame_factory):
    # every provider's 429 carries its wait in its own way (header or RetryInfo); all end up answered
    with FakeLLMServer(burst_429=2, retry_after=0.02) as s:
        p = make_provider(kind, s)
        out = batch_complete(frame_factory({"prompt": ["p1", "p2", "p3"]}), provider=p, progress=False, retry=FAST_RETRY, concurrency=1)
    assert frame_to_pydict(out)["response"] == ["echo: p1", "echo: p2", "echo: p3"]
    assert s.stats.by_status[429] == 2


def test_server_echoing_the_key_is_redacted(frame_factory):
    # a server that quotes the key it was sent: the executor scrubs it from the error cell
    with FakeLLMServer() as s:
        p = make_provider("anthropic", s)
        s.configure(error_on_content={SECRET: 400})
        out = batch_complete(frame_factory({"prompt": [f"my key is {SECRET}"]}), provider=p, progress=False, retry=FAST_RETRY)
    cell = frame_to_pydict(out)["error"][0]
    assert cell.startswith("BadRequestError 400") and SECRET not in cell
