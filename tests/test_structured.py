"""Structured outputs: schema → Arrow type, validation, typed columns, and batch_complete over real HTTP."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nagents_frames import Provider, batch_complete
from nagents_frames.errors import ConfigurationError, ResponseValidationError
from nagents_frames.frames import CompletionOptions
from nagents_frames.structured import ResponseFormat, arrow_type_for_schema, response_format_from
from nagents_frames.testing import FakeLLMServer

from .conftest import frame_to_pydict

SENTIMENT = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["positive", "negative", "neutral"]},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["label", "score"],
}


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"type": "string"}, pa.string()),
        ({"type": "integer"}, pa.int64()),
        ({"type": "number"}, pa.float64()),
        ({"type": "boolean"}, pa.bool_()),
        ({"type": ["integer", "null"]}, pa.int64()),
        ({"anyOf": [{"type": "number"}, {"type": "null"}]}, pa.float64()),
        ({"enum": ["a", "b"]}, pa.string()),
        ({"enum": [1, 2, None]}, pa.int64()),
        ({"type": "object"}, pa.string()),  # free-form: kept as JSON text
        ({"type": ["string", "integer"]}, pa.string()),  # mixed union: JSON text
        ({"type": "array", "items": {"type": "integer"}}, pa.list_(pa.int64())),
        ({"type": "array"}, pa.string()),
        (
            {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "boolean"}}}}},
            pa.struct([("a", pa.struct([("b", pa.bool_())]))]),
        ),
    ],
)
def test_arrow_type_for_schema(schema: dict[str, Any], expected: pa.DataType) -> None:
    assert arrow_type_for_schema(schema) == expected


def test_refs_are_resolved() -> None:
    schema = {
        "type": "object",
        "properties": {"item": {"$ref": "#/$defs/Item"}, "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}}},
        "$defs": {"Item": {"type": "object", "properties": {"n": {"type": "integer"}}}},
    }
    item = pa.struct([("n", pa.int64())])
    assert arrow_type_for_schema(schema) == pa.struct([("item", item), ("items", pa.list_(item))])
    fmt = response_format_from(schema)
    assert fmt.validate('{"item": {"n": 1}, "items": [{"n": 2}, {"n": 3.0}]}') == {
        "item": {"n": 1}, "items": [{"n": 2}, {"n": 3}]
    }


def test_bad_refs_and_schemas_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="points nowhere"):
        response_format_from({"type": "object", "properties": {"a": {"$ref": "#/$defs/Missing"}}})
    with pytest.raises(ConfigurationError, match="only local"):
        response_format_from({"type": "object", "properties": {"a": {"$ref": "http://x/y.json"}}})
    with pytest.raises(ConfigurationError, match="not a valid JSON schema"):
        response_format_from({"type": "object", "properties": {"a": {"type": "no-such-type"}}})
    with pytest.raises(ConfigurationError, match="no schema"):
        response_format_from({"type": "json_object"})
    with pytest.raises(ConfigurationError, match="must be a JSON schema"):
        response_format_from(42)
    with pytest.raises(ConfigurationError, match="expand=True"):
        response_format_from({"type": "string"}, expand=True)


def test_forms_accepted(tmp_path: Path) -> None:
    wrapped = {"type": "json_schema", "json_schema": {"name": "sentiment", "schema": SENTIMENT, "strict": False}}
    a = response_format_from(wrapped)
    assert (a.name, a.strict, dict(a.schema)) == ("sentiment", False, SENTIMENT)
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SENTIMENT))
    b = response_format_from(str(path))
    assert b.schema == SENTIMENT and b.name == "response"
    assert response_format_from(b) is b
    assert response_format_from(b, expand=True).expand
    with pytest.raises(ConfigurationError, match="does not exist"):
        response_format_from(tmp_path / "missing.json")
    body = a.request_format()
    assert body == {"type": "json_schema", "json_schema": {"name": "sentiment", "schema": SENTIMENT, "strict": False}}


def test_strict_is_detected_from_the_schema() -> None:
    closed = {
        "type": "object",
        "properties": {"a": {"type": "string"}, "b": {"type": "object", "properties": {"c": {"type": "integer"}},
                                                      "required": ["c"], "additionalProperties": False}},
        "required": ["a", "b"],
        "additionalProperties": False,
    }
    assert response_format_from(closed).strict is True
    assert response_format_from(SENTIMENT).strict is False  # open object, optional 'tags'
    assert response_format_from(SENTIMENT, strict=True).strict is True


def test_validate_errors_are_row_errors() -> None:
    fmt = response_format_from(SENTIMENT)
    assert fmt.validate('{"label": "positive", "score": 1}') == {"label": "positive", "score": 1, "tags": None}
    assert fmt.validate('```json\n{"label": "neutral", "score": 0.5}\n```')["label"] == "neutral"
    cases = {
        "not json at all": "not JSON",
        '{"label": "positive"}': "'score' is a required property",
        '{"label": "great", "score": 1}': "is not one of",
        '{"label": "negative", "score": "high"}': "score",
        "[1, 2]": "is not of type 'object'",
    }
    for answer, needle in cases.items():
        with pytest.raises(ResponseValidationError, match=needle) as info:
            fmt.validate(answer)
        assert not info.value.retryable and not info.value.fatal
        assert info.value.cell().startswith("ResponseValidationError: ")


def test_values_that_do_not_fit_the_column_type_are_rejected() -> None:
    fmt = response_format_from({"type": "object", "properties": {"n": {"type": "integer"}}})
    with pytest.raises(ResponseValidationError, match="column type"):
        fmt.validate('{"n": 99999999999999999999999}')


def test_free_form_parts_become_json_text() -> None:
    fmt = response_format_from({"type": "object", "properties": {"meta": {"type": "object"}, "k": {"type": "string"}}})
    out = fmt.to_arrow(['{"meta": {"b": 1, "a": [true]}, "k": "x"}', None, "garbage"])
    assert out.type == pa.struct([("meta", pa.string()), ("k", pa.string())])
    assert out.to_pylist() == [{"meta": '{"a": [true], "b": 1}', "k": "x"}, None, None]


def test_expand_gives_null_fields_for_failed_rows() -> None:
    fmt = response_format_from(SENTIMENT, expand=True)
    cols = fmt.columns(['{"label": "positive", "score": 0.25, "tags": ["a"]}', None], "response")
    assert list(cols) == ["label", "score", "tags"]
    assert cols["label"].to_pylist() == ["positive", None]
    assert cols["score"].to_pylist() == [0.25, None]
    assert cols["tags"].to_pylist() == [["a"], None]


def test_convert_batch_replaces_the_text_column_in_place() -> None:
    fmt = response_format_from(SENTIMENT)
    batch = pa.record_batch({"x": [1], "response": ['{"label": "neutral", "score": 0}'], "error": pa.array([None], pa.string())})
    out = fmt.convert_batch(batch, "response")
    assert out.schema.names == ["x", "response", "error"]
    assert pa.types.is_struct(out.schema.field("response").type)
    assert fmt.convert_batch(out, "response") is out  # already structured: untouched
    expanded = response_format_from(SENTIMENT, expand=True).convert_batch(batch, "response")
    assert expanded.schema.names == ["x", "label", "score", "tags", "error"]


records = st.fixed_dictionaries(
    {
        "label": st.sampled_from(["positive", "negative", "neutral"]),
        "score": st.floats(allow_nan=False, allow_infinity=False, width=64),
    },
    optional={"tags": st.lists(st.text(max_size=8), max_size=3)},
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.none(), records), max_size=8))
def test_valid_answers_round_trip_into_typed_columns(rows: list[dict[str, Any] | None]) -> None:
    fmt = response_format_from(SENTIMENT)
    texts = [None if r is None else json.dumps(r) for r in rows]
    out = fmt.to_arrow(texts).to_pylist()
    for row, got in zip(rows, out):
        if row is None:
            assert got is None
            continue
        assert got is not None
        assert got["label"] == row["label"]
        assert got["score"] == row["score"] or (math.isclose(got["score"], row["score"]))
        assert got["tags"] == row.get("tags")


# --- through batch_complete and the fake server (real HTTP) ---------------------------------------------------


@pytest.fixture
def echo_server() -> Any:
    """The fake server answering exactly the last user message: a prompt that is JSON comes back as the answer."""
    with FakeLLMServer(echo_prefix="") as srv:
        yield srv


def _answers() -> list[str | None]:
    return [
        json.dumps({"label": "positive", "score": 0.9, "tags": ["good"]}),
        "Sure! Here is the JSON you asked for: {",  # not JSON
        json.dumps({"label": "positive"}),  # misses a required field
        json.dumps({"label": "negative", "score": 0.1}),
        None,  # no prompt at all: a PromptError, not a validation error
    ]


def test_batch_complete_struct_column(echo_server: FakeLLMServer, frame_factory: Callable[..., Any]) -> None:
    provider = Provider(provider_type="openai_compatible", model="echo", base_url=echo_server.base_url)
    frame = frame_factory({"j": _answers(), "id": [1, 2, 3, 4, 5]})
    out = batch_complete(frame, provider=provider, prompt="{j}", response_format=SENTIMENT, progress=False)
    assert type(out) is type(frame)
    cols = frame_to_pydict(out)
    assert list(cols) == ["j", "id", "response", "error"]
    assert cols["response"][0] == {"label": "positive", "score": 0.9, "tags": ["good"]}
    assert cols["response"][3] == {"label": "negative", "score": 0.1, "tags": None}
    assert cols["response"][1] is None and cols["response"][2] is None and cols["response"][4] is None
    errors = cols["error"]
    assert errors[0] is None and errors[3] is None
    assert errors[1].startswith("ResponseValidationError: the answer is not JSON")
    assert errors[2].startswith("ResponseValidationError: the answer does not match the schema")
    assert "'score' is a required property" in errors[2]
    assert errors[4].startswith("PromptError")
    if isinstance(out, pa.Table):
        assert out.schema.field("response").type == arrow_type_for_schema(SENTIMENT)
    # the provider's structured-output mode was asked for, with the schema
    sent = [b for b in echo_server.stats.bodies if "response_format" in b]
    assert len(sent) == 4
    assert sent[0]["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "response", "schema": SENTIMENT, "strict": False}
    }


def test_batch_complete_expand(echo_server: FakeLLMServer, frame_factory: Callable[..., Any]) -> None:
    provider = Provider(provider_type="openai_compatible", model="echo", base_url=echo_server.base_url)
    frame = frame_factory({"j": _answers()})
    out = batch_complete(frame, provider=provider, prompt="{j}", response_format=SENTIMENT, expand=True,
                         usage=True, progress=False)
    cols = frame_to_pydict(out)
    assert list(cols) == ["j", "label", "score", "tags", "error", "prompt_tokens", "completion_tokens",
                          "latency_s", "attempts"]
    assert cols["label"][:4] == ["positive", None, None, "negative"]
    assert cols["score"][0] == 0.9 and cols["score"][3] == 0.1
    assert cols["score"][1] is None or (isinstance(cols["score"][1], float) and math.isnan(cols["score"][1]))
    assert cols["attempts"][1] == 1  # an invalid answer is not retried automatically


def test_expand_field_clashing_with_an_input_column_is_refused(echo_server: FakeLLMServer) -> None:
    provider = Provider(provider_type="openai_compatible", model="echo", base_url=echo_server.base_url)
    with pytest.raises(ConfigurationError, match="label"):
        batch_complete(pa.table({"label": ["x"]}), provider=provider, prompt="{label}", response_format=SENTIMENT,
                       expand=True, progress=False)
    assert echo_server.stats.requests == 0
    with pytest.raises(ConfigurationError, match="needs a response_format"):
        CompletionOptions(provider=provider, prompt="{x}", expand=True)


def test_pydantic_model(echo_server: FakeLLMServer) -> None:
    import pydantic  # the structured extra

    class Review(pydantic.BaseModel):
        label: str
        stars: int
        words: list[str] = []

    provider = Provider(provider_type="openai_compatible", model="echo", base_url=echo_server.base_url)
    answers = [json.dumps({"label": "ok", "stars": 4, "words": ["fine"]}), json.dumps({"label": "bad", "stars": "many"})]
    out = batch_complete(pa.table({"j": answers}), provider=provider, prompt="{j}", response_format=Review,
                         progress=False)
    assert out.schema.field("response").type == pa.struct(
        [("label", pa.string()), ("stars", pa.int64()), ("words", pa.list_(pa.string()))]
    )
    assert out.column("response").to_pylist()[0] == {"label": "ok", "stars": 4, "words": ["fine"]}
    error = out.column("error").to_pylist()[1]
    assert error.startswith("ResponseValidationError: the answer does not match Review: stars")
    assert echo_server.stats.bodies[0]["response_format"]["json_schema"]["name"] == "Review"


def test_different_schemas_are_different_requests(echo_server: FakeLLMServer) -> None:
    provider = Provider(provider_type="openai_compatible", model="echo", base_url=echo_server.base_url)
    options_a = CompletionOptions(provider=provider, prompt="{j}", response_format=SENTIMENT)
    options_b = CompletionOptions(provider=provider, prompt="{j}", response_format={"type": "object"})
    plan = options_a.plan(["j"])
    key_a = plan.prepare({"j": ["x"]}, start=0, model="echo", params=options_a.executor().params)[0].key
    key_b = plan.prepare({"j": ["x"]}, start=0, model="echo", params=options_b.executor().params)[0].key
    assert key_a != key_b
    assert isinstance(options_a.response_format, ResponseFormat)


def test_invalid_answers_are_retried_by_a_rerun_with_the_store(tmp_path: Path,
                                                              frame_factory: Callable[..., Any]) -> None:
    answers = [json.dumps({"label": "positive", "score": i / 10}) for i in range(6)]
    frame = frame_factory({"j": answers})
    store = str(tmp_path / "jobs.duckdb")
    # first run: the "model" wraps its JSON in prose, so no answer validates
    with FakeLLMServer(echo_prefix="Sure! ") as chatty:
        provider = Provider(provider_type="openai_compatible", model="echo", base_url=chatty.base_url)
        out = batch_complete(frame, provider=provider, prompt="{j}", response_format=SENTIMENT, progress=False,
                             store=store)
        errors = frame_to_pydict(out)["error"]
        assert all(e.startswith("ResponseValidationError: the answer is not JSON") for e in errors)
    # the rerun sends those rows again (they are errors in the store) and now they validate
    with FakeLLMServer(echo_prefix="") as good:
        provider = Provider(provider_type="openai_compatible", model="echo", base_url=good.base_url)
        out = batch_complete(frame, provider=provider, prompt="{j}", response_format=SENTIMENT, progress=False,
                             store=store)
        assert good.stats.requests == 6
        cols = frame_to_pydict(out)
        assert cols["error"] == [None] * 6
        assert cols["response"][2] == {"label": "positive", "score": 0.2, "tags": None}
        # and a third run sends nothing: every row has a valid stored answer
        batch_complete(frame, provider=provider, prompt="{j}", response_format=SENTIMENT, progress=False, store=store)
        assert good.stats.requests == 6
