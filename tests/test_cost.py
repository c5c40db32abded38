"""Prices, cost_of and estimate (the dry run): arithmetic, lookups, overrides, and counting real tables."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nagents_frames import Provider, batch_complete
from nagents_frames import cost as cost_module
from nagents_frames.cost import (
    CHARS_PER_TOKEN,
    DEFAULT_COMPLETION_TOKENS,
    DEFAULT_PRICES,
    Estimate,
    Price,
    cost_of,
    estimate,
    get_tokenizer,
    message_tokens,
    price_for,
    set_price,
)
from nagents_frames.errors import ColumnNotFoundError, ConfigurationError, TemplateError
from nagents_frames.executor import Executor
from nagents_frames.testing import FakeLLMServer
from nagents_frames.types import BatchJob, Usage
from tests.conftest import frame_to_pydict


@pytest.fixture(autouse=True)
def _no_user_prices(monkeypatch):
    # set_price changes a process-wide table: every test starts from the built-in prices only
    monkeypatch.setattr(cost_module, "_user_prices", {})


def approx_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def prompt_tokens(*texts: str) -> int:
    """What the approximation counts for one request with these message texts."""
    return 3 + sum(4 + approx_tokens(t) for t in texts)


# --- prices and cost_of -----------------------------------------------------------------------------------


def test_price_arithmetic_and_batch_discount():
    p = Price(input=2.5, output=10.0)
    assert p.cost(1_000_000, 0) == 2.5
    assert p.cost(0, 1_000_000) == 10.0
    assert p.cost(1_000, 500) == pytest.approx(0.0075)
    assert p.cost(1_000, 500, batch=True) == pytest.approx(0.00375)
    assert Price(1.0, 1.0, batch_discount=0.0).cost(10, 10, batch=True) == Price(1.0, 1.0).cost(10, 10)
    with pytest.raises(ConfigurationError):
        Price(input=-1.0, output=1.0)
    with pytest.raises(ConfigurationError):
        Price(input=1.0, output=1.0, batch_discount=1.5)


def test_cost_of_usage_job_and_report():
    usage = Usage(prompt_tokens=10_000, completion_tokens=2_000)
    expected = (10_000 * 0.15 + 2_000 * 0.60) / 1e6
    assert cost_of(usage, "gpt-4o-mini") == pytest.approx(expected)
    assert cost_of(usage, "gpt-4o-mini", batch=True) == pytest.approx(expected / 2)
    assert cost_of(BatchJob(id="j", usage=usage), "gpt-4o-mini") == pytest.approx(expected)
    assert cost_of(usage, "unknown-model-x") is None
    with pytest.raises(ConfigurationError):
        cost_of(42, "gpt-4o-mini")


def test_lookup_by_prefix_version_and_vendor():
    assert price_for("gpt-4o-mini-2024-07-18") == DEFAULT_PRICES["gpt-4o-mini"]  # longest prefix, not gpt-4o
    assert price_for("gpt-4o-2024-08-06") == DEFAULT_PRICES["gpt-4o"]
    assert price_for("claude-3-5-haiku-20241022") == DEFAULT_PRICES["claude-3-5-haiku"]
    assert price_for("claude-sonnet-4-5@20250929") == DEFAULT_PRICES["claude-sonnet-4-5"]
    assert price_for("models/gemini-2.5-flash") == DEFAULT_PRICES["gemini-2.5-flash"]
    assert price_for("gemini-2.5-flash-lite-preview-06-17") == DEFAULT_PRICES["gemini-2.5-flash-lite"]
    assert price_for("openrouter/openai/GPT-4o") == DEFAULT_PRICES["gpt-4o"]
    assert price_for("o3-pro-2025-06-10") == DEFAULT_PRICES["o3-pro"]
    assert price_for("gpt-4") is None  # "gpt-4o" is not a prefix match for "gpt-4"
    assert price_for("gpt-4ox") is None  # a prefix must end at a separator
    for name, price in DEFAULT_PRICES.items():
        assert price_for(name) == price


def test_overrides_per_call_and_per_process():
    usage = Usage(1_000_000, 1_000_000)
    assert cost_of(usage, "gpt-4o-mini", prices={"gpt-4o-mini": (1.0, 2.0)}) == 3.0
    assert cost_of(usage, "mine", prices={"mine": {"input": 1.0, "output": 1.0, "batch_discount": 0.25}}, batch=True) == 1.5
    assert cost_of(usage, "mine", prices={"mine": Price(0.5, 0.5)}) == 1.0
    with pytest.raises(ConfigurationError):
        cost_of(usage, "mine", prices={"mine": "cheap"})  # type: ignore[dict-item]
    assert cost_of(usage, "llama-3.1-8b-instruct") is None
    set_price("llama-3.1-8b-instruct", input=0.02, output=0.05)
    assert cost_of(usage, "llama-3.1-8b-instruct") == pytest.approx(0.07)
    assert cost_of(usage, "llama-3.1-8b-instruct:q4") == pytest.approx(0.07)  # Ollama-style tag
    set_price("gpt-4o", input=100.0, output=100.0)  # users may override built-in prices too
    assert cost_of(usage, "gpt-4o") == 200.0
    assert cost_of(usage, "gpt-4o", prices={"gpt-4o": (1.0, 1.0)}) == 2.0  # a call's prices win


@settings(max_examples=100, deadline=None)
@given(
    st.integers(0, 10**8), st.integers(0, 10**8), st.integers(0, 10**8), st.integers(0, 10**8),
    st.sampled_from(sorted(DEFAULT_PRICES)),
)
def test_cost_is_additive_and_batch_is_half(a, b, c, d, model):
    one, two = Usage(a, b), Usage(c, d)
    assert cost_of(one + two, model) == pytest.approx(cost_of(one, model) + cost_of(two, model), rel=1e-9, abs=1e-8)
    assert cost_of(one, model, batch=True) == pytest.approx(cost_of(one, model) / 2, rel=1e-9, abs=1e-8)
    assert cost_of(one, model) >= 0


async def test_cost_of_a_real_run_equals_the_sum_of_its_rows():
    async with FakeLLMServer() as s:
        p = Provider(provider_type="anthropic", model="claude-haiku-4-5", api_key="k", base_url=s.base_url)
        async with Executor(p) as ex:
            outs = [await ex.complete([{"role": "user", "content": f"question number {i} " * (i + 1)}]) for i in range(5)]
            report = ex.stats.report()
    per_row = sum(cost_of(Usage(o.prompt_tokens or 0, o.completion_tokens or 0), p.model) or 0 for o in outs)
    assert report.prompt_tokens > 0 and report.completion_tokens > 0
    assert cost_of(report, p.model) == pytest.approx(per_row)


# --- tokens -----------------------------------------------------------------------------------------------


def test_token_counting_approximation():
    count, name = get_tokenizer("gpt-4o-mini")
    if name.startswith("approx:"):
        assert count("x" * 9) == 3 and count("") == 0
    else:  # tiktoken installed and usable: a real tokenizer
        assert name.startswith("tiktoken:") and count("hello world") == 2
    messages = [{"role": "system", "content": "abcd" * 3}, {"role": "user", "content": [{"type": "text", "text": "abcdefgh"}]}]
    assert message_tokens(messages, len) == 3 + (4 + 12) + (4 + 8)


# --- estimate: the dry run --------------------------------------------------------------------------------


def test_estimate_counts_what_would_be_sent(frame_factory):
    texts = ["a cat sat on the mat", "dogs bark", "a cat sat on the mat", None, "birds"]
    frame = frame_factory({"text": texts, "n": [1, 2, 3, 4, 5]})
    with FakeLLMServer() as s:
        p = Provider(provider_type="openai", model="gpt-4o-mini", api_key="k", base_url=s.base_url)
        est = estimate(frame, provider=p, prompt="Classify: {text}", system="Be brief.", tokenizer=lambda t: len(t))
        assert s.stats.requests == 0  # a dry run sends nothing
    rendered = [f"Classify: {t}" for t in ("a cat sat on the mat", "dogs bark", "birds")]
    assert (est.rows, est.requests, est.unique_requests, est.skipped) == (5, 4, 3, 1)
    assert est.prompt_tokens == sum(3 + (4 + len("Be brief.")) + (4 + len(r)) for r in rendered)
    assert est.max_prompt_tokens == 3 + 4 + len("Be brief.") + 4 + len(rendered[0])
    assert est.completion_tokens == 3 * DEFAULT_COMPLETION_TOKENS and est.completion_basis == "default"
    price = DEFAULT_PRICES["gpt-4o-mini"]
    assert est.price == price
    assert est.cost == pytest.approx(price.cost(est.prompt_tokens, est.completion_tokens))
    assert est.cost == pytest.approx((est.input_cost or 0) + (est.output_cost or 0))
    assert est.usage == Usage(est.prompt_tokens, est.completion_tokens) and est.total_tokens == est.usage.total_tokens


def test_estimate_completion_tokens_sources(frame_factory):
    frame = frame_factory({"prompt": ["one", "two", "three"], "mt": [10, None, 30]})
    p = Provider(provider_type="anthropic", model="claude-sonnet-4-5", api_key="k")
    assert estimate(frame, provider=p, max_tokens=50).completion_tokens == 150
    assert estimate(frame, provider=p, max_tokens=50).completion_basis == "max_tokens"
    assert estimate(frame, provider=p.with_options(max_tokens=20)).completion_tokens == 60
    assert estimate(frame, provider=p, params={"max_tokens": 7}).completion_tokens == 21
    mixed = estimate(frame, provider=p, param_columns={"max_tokens": "mt"})
    assert mixed.completion_tokens == 10 + DEFAULT_COMPLETION_TOKENS + 30 and mixed.completion_basis == "mixed"
    given_ = estimate(frame, provider=p, max_tokens=50, completion_tokens=5)
    assert given_.completion_tokens == 15 and given_.completion_basis == "completion_tokens"


def test_estimate_prices_batch_unknown_and_overrides(frame_factory):
    frame = frame_factory({"prompt": ["x" * 400] * 1 + ["y" * 400]})
    p = Provider(provider_type="gemini_native", model="gemini-2.5-flash", api_key="k")
    full = estimate(frame, provider=p, completion_tokens=100)
    half = estimate(frame, provider=p, completion_tokens=100, batch=True)
    assert half.cost == pytest.approx((full.cost or 0) / 2) and half.batch
    assert full.prompt_tokens == 2 * prompt_tokens("x" * 400)
    unknown = estimate(frame, provider=p.with_options(model="my-own-model"), completion_tokens=100)
    assert unknown.cost is None and unknown.price is None and "no known price" in str(unknown)
    priced = estimate(frame, provider=p.with_options(model="my-own-model"), completion_tokens=100, prices={"my-own-model": (1.0, 1.0)})
    assert priced.cost == pytest.approx((priced.prompt_tokens + 200) / 1e6)


def test_estimate_str_is_a_readable_summary():
    import pyarrow as pa

    p = Provider(provider_type="openai", model="gpt-4o", api_key="k")
    est = estimate(pa.table({"prompt": ["hello", "hello", None]}), provider=p, max_tokens=10)
    text = str(est)
    assert isinstance(est, Estimate)
    assert text.startswith("3 rows → 2 requests, 1 distinct (1 without a usable prompt)")
    assert "≤ 10 completion" in text and "$" in text and "gpt-4o" in text and est.tokenizer in text


def test_estimate_validates_before_counting():
    import pyarrow as pa

    p = Provider(provider_type="openai", model="gpt-4o", api_key="k")
    table = pa.table({"text": ["a"]})
    with pytest.raises(ColumnNotFoundError):
        estimate(table, provider=p, prompt="{missing}")
    with pytest.raises(TemplateError):
        estimate(table, provider=p, prompt="{")
    with pytest.raises(ColumnNotFoundError):
        estimate(table, provider=p)  # no template and no "prompt" column
    with pytest.raises(ConfigurationError):
        estimate(table, provider=p, prompt="{text}", max_tokens=0)
    with pytest.raises(ConfigurationError):
        estimate(table, provider=p, prompt="{text}", completion_tokens=-1)


def test_estimate_matches_the_run_it_predicts(frame_factory):
    # same rows, same prompt: the estimate's request count is what the run then sends
    frame = frame_factory({"text": ["a", "b", "a", "c"]})
    with FakeLLMServer() as s:
        p = Provider(provider_type="anthropic", model="claude-haiku-4-5", api_key="k", base_url=s.base_url)
        est = estimate(frame, provider=p, prompt="Say {text}")
        out = batch_complete(frame, provider=p, prompt="Say {text}", progress=False, usage=True)
        sent = s.stats.requests
    assert sent == est.unique_requests == 3
    cols = frame_to_pydict(out)
    assert sum(cols["prompt_tokens"]) > 0
