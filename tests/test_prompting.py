"""Prompt templates, message columns, request keys and the documented examples of the core modules."""

from __future__ import annotations

import doctest
import importlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nagents_frames.errors import ColumnNotFoundError, PromptError, TemplateError
from nagents_frames.prompting import compile_prompt, request_key
from nagents_frames.types import GenerationParams


def test_template_over_several_columns_with_format_spec():
    plan = compile_prompt(["name", "price", "unused"], prompt="{name} costs {price:.2f} ({name!r})")
    assert plan.columns == ("name", "price")
    [req] = plan.prepare({"name": ["tea"], "price": [3.5]}, start=10, model="m")
    assert req.index == 10 and req.request_id == "10"
    assert req.messages == ({"role": "user", "content": "tea costs 3.50 ('tea')"},)


def test_literal_braces_and_column_names_with_spaces():
    plan = compile_prompt(["my col"], prompt='JSON like {{"a": 1}} for {my col}')
    [req] = plan.prepare({"my col": ["x"]}, start=0, model="m")
    assert req.messages[-1]["content"] == 'JSON like {"a": 1} for x'


def test_id_column_and_row_errors():
    plan = compile_prompt(["id", "prompt"], id_column="id")
    reqs = plan.prepare({"id": ["a", "b", "c"], "prompt": ["ok", None, "x" * 20]}, start=0, model="m")
    assert [r.request_id for r in reqs] == ["a", "b", "c"]
    assert reqs[0].error is None
    assert isinstance(reqs[1].error, PromptError)
    limited = compile_prompt(["prompt"], max_prompt_chars=10)
    [long] = limited.prepare({"prompt": ["x" * 11]}, start=0, model="m")
    assert isinstance(long.error, PromptError) and "limit" in str(long.error)


def test_invalid_unicode_is_a_row_error():
    plan = compile_prompt(["prompt"])
    reqs = plan.prepare({"prompt": ["bad \ud800 surrogate", b"\xff\xfe", b"fine bytes"]}, start=0, model="m")
    assert isinstance(reqs[0].error, PromptError)
    assert isinstance(reqs[1].error, PromptError) and "UTF-8" in str(reqs[1].error)
    assert reqs[2].error is None and reqs[2].messages[-1]["content"] == "fine bytes"


def test_unsupported_cell_type_is_a_row_error():
    plan = compile_prompt(["prompt"])
    [req] = plan.prepare({"prompt": [42]}, start=0, model="m")
    assert isinstance(req.error, PromptError) and "int" in str(req.error)


@pytest.mark.parametrize("bad", ["{", "}", "{a", "{}", "   "])
def test_bad_templates(bad):
    with pytest.raises(TemplateError):
        compile_prompt(["a"], prompt=bad)


def test_param_and_id_columns_must_exist():
    with pytest.raises(ColumnNotFoundError, match="temp"):
        compile_prompt(["prompt"], param_columns={"temperature": "temp"})
    with pytest.raises(ColumnNotFoundError, match="key"):
        compile_prompt(["prompt"], id_column="key")
    with pytest.raises(TemplateError, match="pair"):
        compile_prompt(["prompt"], examples=[("only question",)])  # type: ignore[list-item]


def test_request_key_depends_on_model_messages_and_params():
    msgs = [{"role": "user", "content": "hi"}]
    k = request_key("m", msgs, GenerationParams(temperature=0))
    assert k == request_key("m", msgs, {"temperature": 0})
    assert k != request_key("m2", msgs, {"temperature": 0})
    assert k != request_key("m", msgs, {"temperature": 1})
    assert k != request_key("m", [{"role": "user", "content": "hi!"}], {"temperature": 0})


@given(st.lists(st.text(max_size=20), min_size=1, max_size=20))
def test_same_content_same_key_different_content_different_key(texts):
    plan = compile_prompt(["prompt"])
    reqs = plan.prepare({"prompt": texts}, start=0, model="m")
    by_text: dict[str, str] = {}
    for text, req in zip(texts, reqs):
        if req.error is not None:
            continue
        assert by_text.setdefault(text, req.key) == req.key
    assert len(set(by_text.values())) == len(by_text)


@pytest.mark.parametrize(
    "module",
    [
        "nagents_frames.errors",
        "nagents_frames.types",
        "nagents_frames.ratelimit",
        "nagents_frames.prompting",
        "nagents_frames.providers",
        "nagents_frames.providers.openai",
        "nagents_frames.executor",
        "nagents_frames.frames",
        "nagents_frames.testing",
    ],
)
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
