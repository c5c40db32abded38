"""Token prices, the cost of what was used, and an estimate (dry run) of what a table would cost.

Prices are USD per million tokens, input and output, per model, with a batch discount (50% on the
providers' batch APIs). The built-in table holds list prices as of :data:`PRICES_AS_OF`; prices change, so
check your provider's pricing page and override or extend the table — for one call with ``prices=``, or
for the process with :func:`set_price`.

Model names are matched exactly, else by the longest known name that is a prefix followed by ``-``, ``@``,
``:`` or ``.`` (so ``claude-3-5-haiku-20241022`` is priced as ``claude-3-5-haiku``); a ``models/`` or
``vendor/`` prefix (OpenRouter style) is ignored. Unknown models cost ``None``, never a guess.

>>> from nagents_frames.types import Usage
>>> cost_of(Usage(prompt_tokens=1_000_000, completion_tokens=100_000), "gpt-4o-mini")
0.21
>>> cost_of(Usage(1_000_000, 100_000), "gpt-4o-mini", batch=True)
0.105
>>> cost_of(Usage(1_000, 1_000), "my-finetune", prices={"my-finetune": (1.0, 2.0)})
0.003

:func:`estimate` renders a table's prompts exactly as :func:`~nagents_frames.batch_complete` would,
counts their tokens and prices them, without sending anything::

    >>> import polars as pl
    >>> from nagents_frames import Provider
    >>> p = Provider(provider_type="openai", model="gpt-4o-mini", api_key="sk-...")
    >>> df = pl.DataFrame({"text": ["a" * 388, "b" * 388, "b" * 388]})
    >>> est = estimate(df, provider=p, prompt="Summarize: {text}", max_tokens=100)
    >>> est.rows, est.unique_requests, est.prompt_tokens, est.completion_tokens
    (3, 2, 214, 200)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from nagents_frames.errors import ConfigurationError
from nagents_frames.types import GenerationParams, Message, Usage

if TYPE_CHECKING:
    from nagents_frames.providers import Provider

__all__ = [
    "CHARS_PER_TOKEN",
    "DEFAULT_COMPLETION_TOKENS",
    "DEFAULT_PRICES",
    "PRICES_AS_OF",
    "Estimate",
    "Price",
    "Tokenizer",
    "cost_of",
    "estimate",
    "get_tokenizer",
    "message_tokens",
    "price_for",
    "set_price",
]

PRICES_AS_OF = "2025-11"
"""When the built-in list prices were taken from the providers' pricing pages."""

CHARS_PER_TOKEN = 4
"""The approximation used when no tokenizer is installed: about four characters a token (English text)."""

DEFAULT_COMPLETION_TOKENS = 256
"""Completion tokens expected per request when neither ``max_tokens`` nor ``completion_tokens`` is given."""

_PER_MESSAGE_TOKENS = 4
_PER_REQUEST_TOKENS = 3

Tokenizer = Callable[[str], int]
"""Counts the tokens of a text."""


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens for input and output; ``batch_discount`` is the fraction taken off on batch APIs.

    >>> Price(input=3.0, output=15.0).cost(1_000_000, 1_000_000)
    18.0
    >>> Price(input=3.0, output=15.0).cost(1_000_000, 1_000_000, batch=True)
    9.0
    """

    input: float
    output: float
    batch_discount: float = 0.5

    def __post_init__(self) -> None:
        if self.input < 0 or self.output < 0:
            raise ConfigurationError(f"prices must not be negative, got input={self.input} output={self.output}")
        if not 0.0 <= self.batch_discount <= 1.0:
            raise ConfigurationError(f"batch_discount is a fraction between 0 and 1, got {self.batch_discount}")

    def cost(self, prompt_tokens: int, completion_tokens: int, *, batch: bool = False) -> float:
        """The cost in USD of these tokens (rounded to 1e-9 so sums of small requests stay readable)."""
        full = (prompt_tokens * self.input + completion_tokens * self.output) / 1_000_000
        return round(full * (1.0 - self.batch_discount) if batch else full, 9)


def _p(i: float, o: float) -> Price:
    return Price(input=i, output=o)


DEFAULT_PRICES: Mapping[str, Price] = MappingProxyType(
    {
        # OpenAI (also used for Azure OpenAI deployments named after the model)
        "gpt-5": _p(1.25, 10.0),
        "gpt-5-mini": _p(0.25, 2.0),
        "gpt-5-nano": _p(0.05, 0.40),
        "gpt-4.1": _p(2.0, 8.0),
        "gpt-4.1-mini": _p(0.40, 1.60),
        "gpt-4.1-nano": _p(0.10, 0.40),
        "gpt-4o": _p(2.50, 10.0),
        "gpt-4o-mini": _p(0.15, 0.60),
        "gpt-4-turbo": _p(10.0, 30.0),
        "gpt-3.5-turbo": _p(0.50, 1.50),
        "o1": _p(15.0, 60.0),
        "o1-mini": _p(1.10, 4.40),
        "o3": _p(2.0, 8.0),
        "o3-pro": _p(20.0, 80.0),
        "o3-mini": _p(1.10, 4.40),
        "o4-mini": _p(1.10, 4.40),
        # Anthropic
        "claude-opus-4-5": _p(5.0, 25.0),
        "claude-opus-4-1": _p(15.0, 75.0),
        "claude-opus-4": _p(15.0, 75.0),
        "claude-sonnet-4-5": _p(3.0, 15.0),
        "claude-sonnet-4": _p(3.0, 15.0),
        "claude-3-7-sonnet": _p(3.0, 15.0),
        "claude-3-5-sonnet": _p(3.0, 15.0),
        "claude-haiku-4-5": _p(1.0, 5.0),
        "claude-3-5-haiku": _p(0.80, 4.0),
        "claude-3-haiku": _p(0.25, 1.25),
        "claude-3-opus": _p(15.0, 75.0),
        # Google Gemini (prompts up to 200k tokens where the price depends on the length)
        "gemini-2.5-pro": _p(1.25, 10.0),
        "gemini-2.5-flash": _p(0.30, 2.50),
        "gemini-2.5-flash-lite": _p(0.10, 0.40),
        "gemini-2.0-flash": _p(0.10, 0.40),
        "gemini-2.0-flash-lite": _p(0.075, 0.30),
        "gemini-1.5-pro": _p(1.25, 5.0),
        "gemini-1.5-flash": _p(0.075, 0.30),
    }
)
"""List prices (USD per 1M tokens) as of :data:`PRICES_AS_OF`. Override with ``prices=`` or :func:`set_price`."""

_user_prices: dict[str, Price] = {}

PriceSpec = Price | tuple[float, float] | Mapping[str, float]
"""A price as a :class:`Price`, an ``(input, output)`` pair or ``{"input": .., "output": .., "batch_discount": ..}``."""


def _as_price(spec: PriceSpec) -> Price:
    if isinstance(spec, Price):
        return spec
    if isinstance(spec, Mapping):
        return Price(**{k: float(v) for k, v in spec.items()})
    if isinstance(spec, Sequence) and len(spec) == 2:
        return Price(input=float(spec[0]), output=float(spec[1]))
    raise ConfigurationError(f"a price is a Price, an (input, output) pair or a mapping; got {spec!r}")


def set_price(model: str, *, input: float, output: float, batch_discount: float = 0.5) -> None:
    """Set (or override) a model's price for this process: USD per million input and output tokens.

    >>> set_price("my-finetune-v2", input=0.3, output=1.2)
    >>> price_for("my-finetune-v2")
    Price(input=0.3, output=1.2, batch_discount=0.5)
    """
    _user_prices[model.lower()] = Price(input=input, output=output, batch_discount=batch_discount)


def _normalise(model: str) -> str:
    name = model.strip().lower().removeprefix("models/")
    return name.rsplit("/", 1)[-1]


def price_for(model: str, prices: Mapping[str, PriceSpec] | None = None) -> Price | None:
    """The price of ``model``: from ``prices``, then :func:`set_price`, then :data:`DEFAULT_PRICES`; or None.

    >>> price_for("claude-3-5-haiku-20241022") == price_for("claude-3-5-haiku")
    True
    >>> price_for("openrouter/anthropic/claude-sonnet-4-5") == price_for("claude-sonnet-4-5")
    True
    >>> price_for("no-such-model") is None
    True
    """
    table: dict[str, Price] = dict(DEFAULT_PRICES)
    table.update(_user_prices)
    if prices:
        table.update({k.lower(): _as_price(v) for k, v in prices.items()})
    for candidate in dict.fromkeys((model.strip().lower(), _normalise(model))):
        if candidate in table:
            return table[candidate]
    name = _normalise(model)
    best: str | None = None
    for key in table:
        if len(name) > len(key) and name.startswith(key) and name[len(key)] in "-@:." and (
            best is None or len(key) > len(best)
        ):
            best = key
    return table[best] if best is not None else None


def cost_of(
    usage: Any, model: str, *, batch: bool = False, prices: Mapping[str, PriceSpec] | None = None
) -> float | None:
    """USD cost of ``usage`` on ``model``, or None when the model has no known price.

    ``usage`` is a :class:`~nagents_frames.Usage`, or anything with ``prompt_tokens`` and ``completion_tokens``
    (a :class:`~nagents_frames.RunReport`) or with a ``usage`` (a :class:`~nagents_frames.BatchJob`).
    ``batch=True`` applies the batch discount.

    >>> cost_of(Usage(2_000, 1_000), "claude-sonnet-4-5")
    0.021
    """
    if not hasattr(usage, "prompt_tokens") and hasattr(usage, "usage"):
        usage = usage.usage
    try:
        prompt = int(usage.prompt_tokens or 0)
        completion = int(usage.completion_tokens or 0)
    except AttributeError:
        raise ConfigurationError(
            f"cost_of needs a Usage (prompt_tokens, completion_tokens), got {type(usage).__name__}"
        ) from None
    price = price_for(model, prices)
    return None if price is None else price.cost(prompt, completion, batch=batch)


# --- counting tokens -------------------------------------------------------------------------------------


def _approximate(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def get_tokenizer(model: str | None = None) -> tuple[Tokenizer, str]:
    """A token counter and its name: tiktoken's encoding when tiktoken is installed and usable, else the
    documented approximation of :data:`CHARS_PER_TOKEN` characters a token.

    tiktoken is exact for OpenAI models and a close approximation for the others (their tokenizers are
    not public); it may need to download its encoding once, and if that fails the approximation is used.

    >>> count, name = get_tokenizer("my-model")
    >>> name.startswith(("tiktoken:", "approx:"))
    True
    """
    try:
        import tiktoken  # type: ignore[import-not-found,unused-ignore]  # optional, not a dependency
    except ImportError:
        return _approximate, f"approx:{CHARS_PER_TOKEN}-chars-per-token"
    try:
        try:
            encoding = tiktoken.encoding_for_model(_normalise(model or ""))
        except KeyError:
            encoding = tiktoken.get_encoding("o200k_base")
    except Exception:  # offline machines cannot fetch the encoding file: fall back, never fail a dry run
        return _approximate, f"approx:{CHARS_PER_TOKEN}-chars-per-token"

    def count(text: str) -> int:
        return len(encoding.encode(text, disallowed_special=()))

    return count, f"tiktoken:{encoding.name}"


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        return "".join(str(p.get("text", "")) if isinstance(p, Mapping) else str(p) for p in content)
    return "" if content is None else str(content)


def message_tokens(messages: Sequence[Message], tokenizer: Tokenizer | None = None) -> int:
    """Prompt tokens of a request: each message's text, plus a few tokens of framing per message.

    >>> message_tokens([{"role": "user", "content": "x" * 400}])
    107
    """
    count = tokenizer or _approximate
    return _PER_REQUEST_TOKENS + sum(_PER_MESSAGE_TOKENS + count(_content_text(m.get("content"))) for m in messages)


# --- estimate (dry run) -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """What a run would send and cost; made by :func:`estimate` without sending anything.

    ``requests`` rows have a usable prompt (``skipped`` do not and would get a ``PromptError``);
    ``unique_requests`` of them differ (identical requests are sent once), and the token counts and cost
    are over those. ``completion_basis`` says where ``completion_tokens`` comes from: ``"max_tokens"`` (an
    upper bound), ``"completion_tokens"`` (your expectation), ``"default"``
    (:data:`DEFAULT_COMPLETION_TOKENS` a request) or ``"mixed"`` (rows with and without ``max_tokens``). ``cost`` is None when the model has no known price.
    """

    rows: int
    requests: int
    unique_requests: int
    skipped: int
    prompt_tokens: int
    completion_tokens: int
    max_prompt_tokens: int
    model: str
    provider_type: str
    tokenizer: str
    completion_basis: str
    batch: bool = False
    price: Price | None = None
    input_cost: float | None = None
    output_cost: float | None = None
    cost: float | None = None

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    @property
    def usage(self) -> Usage:
        """The estimated tokens as a :class:`~nagents_frames.Usage`."""
        return Usage(self.prompt_tokens, self.completion_tokens)

    def __str__(self) -> str:
        skipped = f" ({self.skipped} without a usable prompt)" if self.skipped else ""
        shared = f", {self.unique_requests:,} distinct" if self.unique_requests != self.requests else ""
        bound = "≤ " if self.completion_basis == "max_tokens" else "~"
        tokens = (
            f"~{self.prompt_tokens:,} prompt + {bound}{self.completion_tokens:,} completion tokens "
            f"[{self.tokenizer}]"
        )
        if self.cost is None:
            money = f"no known price for {self.model!r} (pass prices= or use set_price)"
        else:
            kind = " at batch prices" if self.batch else ""
            amount = f"{self.cost:,.2f}" if self.cost >= 1 else f"{self.cost:.4f}" if self.cost >= 0.01 else f"{self.cost:.6f}"
            money = f"expected cost {bound}${amount} for {self.model}{kind} (list prices as of {PRICES_AS_OF})"
        return f"{self.rows:,} rows → {self.requests:,} requests{shared}{skipped}; {tokens}; {money}"


def estimate(
    data: Any,
    *,
    provider: Provider,
    prompt: str | None = None,
    prompt_column: str = "prompt",
    system: str | None = None,
    examples: Sequence[tuple[str, str]] | None = None,
    param_columns: Mapping[str, str] | None = None,
    id_column: str | None = None,
    max_tokens: int | None = None,
    params: Mapping[str, Any] | GenerationParams | None = None,
    completion_tokens: int | None = None,
    batch: bool = False,
    prices: Mapping[str, PriceSpec] | None = None,
    tokenizer: Tokenizer | None = None,
    chunk_size: int = 10_000,
) -> Estimate:
    """Dry run: render every row's prompt as ``batch_complete`` would, count tokens and price them.

    Nothing is sent. The prompt arguments are those of :func:`~nagents_frames.batch_complete`; bad ones
    raise the same :class:`~nagents_frames.errors.ConfigurationError`. Completion tokens per request come
    from ``completion_tokens`` (what you expect), else the effective ``max_tokens`` (call, row or provider:
    an upper bound), else :data:`DEFAULT_COMPLETION_TOKENS`. ``tokenizer`` overrides the token counter
    (see :func:`get_tokenizer`). ``batch=True`` prices at the batch discount.

    >>> import pandas as pd
    >>> from nagents_frames import Provider
    >>> p = Provider(provider_type="anthropic", model="claude-haiku-4-5", api_key="k")
    >>> est = estimate(pd.DataFrame({"prompt": ["hello there", None]}), provider=p, completion_tokens=10)
    >>> (est.requests, est.skipped, est.completion_tokens, est.completion_basis)
    (1, 1, 10, 'completion_tokens')
    """
    from nagents_frames.frames import _wrap
    from nagents_frames.prompting import compile_prompt

    if completion_tokens is not None and completion_tokens < 0:
        raise ConfigurationError(f"completion_tokens must not be negative, got {completion_tokens}")
    if max_tokens is not None and max_tokens <= 0:
        raise ConfigurationError(f"max_tokens must be positive, got {max_tokens}")
    if chunk_size < 1:
        raise ConfigurationError(f"chunk_size must be a positive integer, got {chunk_size}")
    call = params if isinstance(params, GenerationParams) else GenerationParams.from_mapping(params)
    if max_tokens is not None:
        call = call.merged(GenerationParams(max_tokens=max_tokens))
    base = provider.params.merged(call)
    frame = _wrap(data)
    plan = compile_prompt(
        frame.columns,
        prompt=prompt,
        prompt_column=prompt_column,
        system=system,
        examples=examples,
        param_columns=param_columns,
        id_column=id_column,
    )
    if tokenizer is not None:
        count, tokenizer_name = tokenizer, getattr(tokenizer, "__name__", "custom")
    else:
        count, tokenizer_name = get_tokenizer(provider.model)
    rows = requests = skipped = prompt_total = completion_total = max_prompt = 0
    seen: set[str] = set()
    used_max = used_default = False
    for start, values in frame.chunks(plan.columns, chunk_size):
        for req in plan.prepare(values, start=start, model=provider.model, params=base):
            rows += 1
            if req.error is not None or req.messages is None:
                skipped += 1
                continue
            requests += 1
            if req.key in seen:
                continue
            seen.add(req.key)
            tokens = message_tokens(req.messages, count)
            prompt_total += tokens
            max_prompt = max(max_prompt, tokens)
            if completion_tokens is not None:
                completion_total += completion_tokens
                continue
            effective = base if req.params is None else base.merged(req.params)
            if effective.max_tokens is not None:
                completion_total += int(effective.max_tokens)
                used_max = True
            else:
                completion_total += DEFAULT_COMPLETION_TOKENS
                used_default = True
    if completion_tokens is not None:
        basis = "completion_tokens"
    elif used_max:
        basis = "mixed" if used_default else "max_tokens"
    else:
        basis = "default"
    price = price_for(provider.model, prices)
    input_cost = output_cost = total = None
    if price is not None:
        input_cost = price.cost(prompt_total, 0, batch=batch)
        output_cost = price.cost(0, completion_total, batch=batch)
        total = round(input_cost + output_cost, 9)
    return Estimate(
        rows=rows,
        requests=requests,
        unique_requests=len(seen),
        skipped=skipped,
        prompt_tokens=prompt_total,
        completion_tokens=completion_total,
        max_prompt_tokens=max_prompt,
        model=provider.model,
        provider_type=provider.type.value,
        tokenizer=tokenizer_name,
        completion_basis=basis,
        batch=batch,
        price=price,
        input_cost=input_cost,
        output_cost=output_cost,
        cost=total,
    )
