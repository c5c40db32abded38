"""``batch_complete``: a table of prompts in, the same table out with ``response`` and ``error`` columns.

Frame type in = frame type out (polars, pandas, pyarrow Table or RecordBatchReader). The input is read
chunk by chunk; only the columns the prompt needs are converted; the input columns come back unchanged,
rows in input order, followed by ``response`` and ``error`` (always string columns) and, with
``usage=True``, ``prompt_tokens``, ``completion_tokens``, ``latency_s`` and ``attempts``.

Example::

    >>> import polars as pl
    >>> from nagents_frames import Provider, batch_complete
    >>> from nagents_frames.testing import FakeLLMServer
    >>> with FakeLLMServer() as server:
    ...     p = Provider(provider_type="openai_compatible", model="echo", base_url=server.base_url)
    ...     out = pl.DataFrame({"text": ["a cat", "a dog"]}).pipe(
    ...         batch_complete, provider=p, prompt="Summarize: {text}", progress=False)
    >>> out["response"].to_list()
    ['echo: Summarize: a cat', 'echo: Summarize: a dog']
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from nagents_frames.errors import ColumnTypeError, ConfigurationError, UnsupportedFrameError
from nagents_frames.executor import Executor, Outcome, PreparedRequest, RetryPolicy, RunReport, Timeouts
from nagents_frames.prompting import DEFAULT_MAX_PROMPT_CHARS, PromptPlan, compile_prompt
from nagents_frames.providers import Provider
from nagents_frames.ratelimit import RateLimiter
from nagents_frames.types import GenerationParams

if TYPE_CHECKING:
    from nagents_frames.store import BatchStore

__all__ = ["CompletionOptions", "abatch_complete", "astream_complete", "batch_complete", "run_sync"]

USAGE_COLUMNS = ("prompt_tokens", "completion_tokens", "latency_s", "attempts")


@dataclass(frozen=True)
class CompletionOptions:
    """Everything about *how* to complete a table, gathered from ``batch_complete``'s keywords.

    The CLI, the job API and the Ray integration build one of these too, so every entry point
    validates the same way.
    """

    provider: Provider
    prompt: str | None = None
    prompt_column: str = "prompt"
    system: str | None = None
    examples: tuple[tuple[str, str], ...] | None = None
    param_columns: Mapping[str, str] | None = None
    id_column: str | None = None
    response_column: str = "response"
    error_column: str = "error"
    usage: bool = False
    concurrency: int = 64
    rpm: float | None = None
    tpm: float | None = None
    retry: RetryPolicy | None = None
    timeouts: Timeouts | None = None
    deadline: float | None = None
    params: GenerationParams | None = None
    chunk_size: int = 1000
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS
    progress: bool | None = None
    response_format: Any = None
    """Structured outputs: a JSON schema, pydantic model or :class:`~nagents_frames.structured.ResponseFormat`
    (compiled to the latter here)."""
    expand: bool = False
    """With ``response_format``: one column per top-level field instead of one struct column."""

    def __post_init__(self) -> None:
        if self.response_format is not None:
            from nagents_frames.structured import response_format_from

            object.__setattr__(self, "response_format", response_format_from(self.response_format, expand=self.expand))
        elif self.expand:
            raise ConfigurationError("expand=True needs a response_format")
        if not isinstance(self.provider, Provider):
            raise ConfigurationError(f"provider must be a nagents_frames.Provider, got {type(self.provider).__name__}")
        if not isinstance(self.concurrency, int) or isinstance(self.concurrency, bool) or self.concurrency < 1:
            raise ConfigurationError(f"concurrency must be a positive integer, got {self.concurrency!r}")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ConfigurationError(f"chunk_size must be a positive integer, got {self.chunk_size!r}")
        if self.response_column == self.error_column:
            raise ConfigurationError("response_column and error_column must differ")
        for name in (self.response_column, self.error_column):
            if not isinstance(name, str) or not name:
                raise ConfigurationError("response_column and error_column must be non-empty strings")

    def output_columns(self) -> tuple[str, ...]:
        """The columns added to the input."""
        answer: tuple[str, ...] = (self.response_column,)
        if self.response_format is not None:
            answer = self.response_format.output_names(self.response_column)
        return (*answer, self.error_column, *(USAGE_COLUMNS if self.usage else ()))

    def plan(self, columns: Sequence[str]) -> PromptPlan:
        """The prompt plan for a table with these columns (validates before anything is sent)."""
        clash = [c for c in self.output_columns() if c in columns]
        if clash:
            raise ConfigurationError(
                f"the input already has column(s) {clash}; choose other names with response_column= / error_column= "
                "or drop them first"
            )
        return compile_prompt(
            columns,
            prompt=self.prompt,
            prompt_column=self.prompt_column,
            system=self.system,
            examples=self.examples,
            param_columns=self.param_columns,
            id_column=self.id_column,
            max_prompt_chars=self.max_prompt_chars,
        )

    def executor(self, *, on_outcome: Callable[[Outcome], None] | None = None, limiter: RateLimiter | None = None) -> Executor:
        """An executor configured from these options."""
        params = self.params
        validate = None
        if self.response_format is not None:
            # the schema goes into the request (and so into the request key), answers are checked on arrival
            params = (params or GenerationParams()).merged(
                GenerationParams(response_format=self.response_format.request_format())
            )
            validate = self.response_format.validate
        return Executor(
            self.provider,
            concurrency=self.concurrency,
            retry=self.retry,
            timeouts=self.timeouts,
            rpm=self.rpm,
            tpm=self.tpm,
            limiter=limiter,
            deadline=self.deadline,
            params=params,
            on_outcome=on_outcome,
            validate=validate,
        )


# --- frame adapters: the only place that knows polars and pandas ------------------------------------------


class _Frame:
    """Reads chunks of the needed columns as Python values and builds the output of the same type."""

    kind = "arrow"

    def __init__(self, data: Any) -> None:
        self.data = data

    @property
    def columns(self) -> list[str]:
        return list(self.data.column_names)

    @property
    def num_rows(self) -> int | None:
        return int(self.data.num_rows)

    def arrow_type(self, column: str) -> pa.DataType | None:
        return self.data.schema.field(column).type

    def chunks(self, columns: Sequence[str], size: int) -> Iterator[tuple[int, dict[str, list[Any]]]]:
        table = self.data.select(list(columns))
        for start in range(0, table.num_rows, size):
            part = table.slice(start, size)
            yield start, {c: part.column(c).to_pylist() for c in columns}

    def finish(self, added: dict[str, pa.Array]) -> Any:
        out = self.data
        for name, array in added.items():
            out = out.append_column(name, array)
        return out


class _PolarsFrame(_Frame):
    kind = "polars"

    @property
    def columns(self) -> list[str]:
        return list(self.data.columns)

    @property
    def num_rows(self) -> int | None:
        return int(self.data.height)

    def arrow_type(self, column: str) -> pa.DataType | None:
        return self.data.select(column).head(0).to_arrow().schema.field(0).type

    def chunks(self, columns: Sequence[str], size: int) -> Iterator[tuple[int, dict[str, list[Any]]]]:
        df = self.data.select(list(columns))
        for start in range(0, df.height, size):
            part = df.slice(start, size)
            yield start, {c: part.get_column(c).to_list() for c in columns}

    def finish(self, added: dict[str, pa.Array]) -> Any:
        import polars as pl

        return self.data.hstack([pl.Series(name, array) for name, array in added.items()])


class _PandasFrame(_Frame):
    kind = "pandas"

    @property
    def columns(self) -> list[str]:
        return [str(c) for c in self.data.columns]

    @property
    def num_rows(self) -> int | None:
        return len(self.data)

    def arrow_type(self, column: str) -> pa.DataType | None:
        dtype = self.data[column].dtype
        if dtype.kind in "OSU" or str(dtype) in ("string", "str") or "string" in str(dtype):
            return None  # Python objects: checked row by row
        if dtype.kind in "iufcbmM":
            return pa.from_numpy_dtype(dtype) if dtype.kind != "M" else pa.timestamp("ns")
        return None

    def chunks(self, columns: Sequence[str], size: int) -> Iterator[tuple[int, dict[str, list[Any]]]]:
        import pandas as pd

        df = self.data
        for start in range(0, len(df), size):
            part = df.iloc[start : start + size]
            values: dict[str, list[Any]] = {}
            for c in columns:
                values[c] = [None if _pandas_missing(pd, v) else v for v in part[c].tolist()]
            yield start, values

    def finish(self, added: dict[str, pa.Array]) -> Any:
        import pandas as pd

        out = self.data.copy(deep=False)
        for name, array in added.items():
            if pa.types.is_string(array.type):
                out[name] = pd.Series(array.to_pylist(), index=out.index, dtype="str")
            else:
                out[name] = pd.Series(array.to_pandas(), index=out.index).to_numpy() if array.null_count == 0 else \
                    pd.Series(array.to_pylist(), index=out.index, dtype=_pandas_nullable(array.type))
        return out


def _pandas_missing(pd: Any, value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, (str, bytes, list, tuple, dict)):
        return False
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _pandas_nullable(dtype: pa.DataType) -> str:
    if pa.types.is_integer(dtype):
        return "Int64" if dtype.bit_width == 64 else "Int32"
    if pa.types.is_floating(dtype):
        return "Float64"
    if pa.types.is_boolean(dtype):
        return "boolean"
    return "object"  # structured outputs: dicts and lists


class _ReaderFrame(_Frame):
    kind = "reader"

    @property
    def columns(self) -> list[str]:
        return list(self.data.schema.names)

    @property
    def num_rows(self) -> int | None:
        return None

    def chunks(self, columns: Sequence[str], size: int) -> Iterator[tuple[int, dict[str, list[Any]]]]:
        self.batches: list[pa.RecordBatch] = []
        start = 0
        for batch in self.data:
            self.batches.append(batch)
            for offset in range(0, batch.num_rows, size):
                part = batch.slice(offset, size)
                yield start + offset, {c: part.column(c).to_pylist() for c in columns}
            start += batch.num_rows

    def finish(self, added: dict[str, pa.Array]) -> Any:
        table = pa.Table.from_batches(getattr(self, "batches", []), schema=self.data.schema)
        for name, array in added.items():
            table = table.append_column(name, array)
        return pa.RecordBatchReader.from_batches(table.schema, table.to_batches())


def _wrap(data: Any) -> _Frame:
    module = type(data).__module__.split(".")[0]
    if isinstance(data, pa.Table):
        return _Frame(data)
    if isinstance(data, pa.RecordBatch):
        return _Frame(pa.Table.from_batches([data]))
    if isinstance(data, pa.RecordBatchReader):
        return _ReaderFrame(data)
    if module == "polars" and type(data).__name__ == "DataFrame":
        return _PolarsFrame(data)
    if module == "polars" and type(data).__name__ == "LazyFrame":
        return _PolarsFrame(data.collect())
    if module == "pandas" and type(data).__name__ == "DataFrame":
        return _PandasFrame(data)
    raise UnsupportedFrameError(
        f"batch_complete takes a polars or pandas DataFrame, a pyarrow Table, RecordBatch or RecordBatchReader "
        f"(or a ray Dataset with the ray extra); got {type(data).__module__}.{type(data).__name__}"
    )


def _check_prompt_type(frame: _Frame, options: CompletionOptions) -> None:
    if options.prompt is not None:
        return
    dtype = frame.arrow_type(options.prompt_column)
    if dtype is None:
        return
    ok = (
        pa.types.is_string(dtype)
        or pa.types.is_large_string(dtype)
        or pa.types.is_binary(dtype)
        or pa.types.is_large_binary(dtype)
        or pa.types.is_list(dtype)
        or pa.types.is_large_list(dtype)
        or getattr(pa.types, "is_string_view", lambda _t: False)(dtype)
        or pa.types.is_null(dtype)
    )
    if not ok:
        raise ColumnTypeError(
            f"prompt column {options.prompt_column!r} has type {dtype}; it must hold text or chat messages "
            f"(list of {{role, content}}); use prompt='...{{{options.prompt_column}}}...' to format other types"
        )


# --- the pipeline ------------------------------------------------------------------------------------------


async def complete_chunks(
    chunks: Iterator[tuple[int, dict[str, list[Any]]]],
    plan: PromptPlan,
    options: CompletionOptions,
    executor: Executor,
) -> AsyncIterator[tuple[Sequence[PreparedRequest], list[Outcome]]]:
    """Render each chunk's prompts and run them; yields ``(requests, outcomes)`` per chunk in order."""
    model = options.provider.model

    def prepared() -> Iterator[list[PreparedRequest]]:
        for start, values in chunks:
            yield plan.prepare(values, start=start, model=model, params=executor.params)

    async for item in executor.run(prepared()):
        yield item


def outcome_arrays(outcomes: Sequence[Outcome], options: CompletionOptions) -> dict[str, pa.Array]:
    """The columns added to the input for these outcomes (in order)."""
    responses = [o.response for o in outcomes]
    if options.response_format is not None:
        arrays: dict[str, pa.Array] = options.response_format.columns(responses, options.response_column)
    else:
        arrays = {options.response_column: pa.array(responses, type=pa.string())}
    arrays[options.error_column] = pa.array([o.error for o in outcomes], type=pa.string())
    if options.usage:
        arrays["prompt_tokens"] = pa.array([o.prompt_tokens for o in outcomes], type=pa.int64())
        arrays["completion_tokens"] = pa.array([o.completion_tokens for o in outcomes], type=pa.int64())
        arrays["latency_s"] = pa.array([o.latency_s for o in outcomes], type=pa.float64())
        arrays["attempts"] = pa.array([o.attempts for o in outcomes], type=pa.int32())
    return arrays


class _Progress:
    """A tqdm bar (notebook-aware) or nothing."""

    def __init__(self, enabled: bool | None, total: int | None) -> None:
        if enabled is None:
            enabled = _interactive()
        self.bar: Any = None
        self.errors = 0
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="row", desc="batch_complete", dynamic_ncols=True)

    def __call__(self, outcome: Outcome) -> None:
        if self.bar is None:
            return
        if outcome.error is not None:
            self.errors += 1
            self.bar.set_postfix(errors=self.errors, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _interactive() -> bool:
    if "ipykernel" in sys.modules:
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


async def abatch_complete(
    data: Any,
    *,
    provider: Provider,
    prompt: str | None = None,
    prompt_column: str = "prompt",
    system: str | None = None,
    examples: Sequence[tuple[str, str]] | None = None,
    param_columns: Mapping[str, str] | None = None,
    id_column: str | None = None,
    response_column: str = "response",
    error_column: str = "error",
    usage: bool = False,
    concurrency: int = 64,
    rpm: float | None = None,
    tpm: float | None = None,
    retry: RetryPolicy | None = None,
    timeouts: Timeouts | None = None,
    deadline: float | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
    top_p: float | None = None,
    stop: Sequence[str] | str | None = None,
    seed: int | None = None,
    params: Mapping[str, Any] | GenerationParams | None = None,
    chunk_size: int = 1000,
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS,
    progress: bool | None = None,
    store: BatchStore | str | Any | None = None,
    job_name: str | None = None,
    response_format: Any = None,
    expand: bool = False,
) -> Any:
    """Async twin of :func:`batch_complete` (same arguments, awaited in a running event loop).

    >>> # in a notebook or an async app:
    >>> # out = await abatch_complete(df, provider=p, prompt="Summarize: {text}")
    """
    frame = _wrap(data)
    options = _options(
        provider, prompt, prompt_column, system, examples, param_columns, id_column, response_column,
        error_column, usage, concurrency, rpm, tpm, retry, timeouts, deadline, temperature, max_tokens,
        top_p, stop, seed, params, chunk_size, max_prompt_chars, progress, response_format, expand,
    )
    plan = options.plan(frame.columns)
    _check_prompt_type(frame, options)
    if store is not None:
        from nagents_frames.manager import complete_with_store

        outcomes = await complete_with_store(frame, plan, options, store=store, job_name=job_name)
        return frame.finish(outcome_arrays(outcomes, options))
    bar = _Progress(options.progress, frame.num_rows)
    outcomes = []
    try:
        async with options.executor(on_outcome=bar) as executor:
            async for _requests, chunk_outcomes in complete_chunks(
                frame.chunks(plan.columns, options.chunk_size), plan, options, executor
            ):
                outcomes.extend(chunk_outcomes)
    finally:
        bar.close()
    return frame.finish(outcome_arrays(outcomes, options))


async def astream_complete(
    batches: Iterable[pa.RecordBatch] | pa.RecordBatchReader,
    *,
    options: CompletionOptions,
    store: BatchStore | str | Any | None = None,
    job_name: str | None = None,
    input_fingerprint: str | None = None,
    on_outcome: Callable[[Outcome], None] | None = None,
    on_job: Callable[[str], None] | None = None,
) -> AsyncIterator[pa.RecordBatch]:
    """Stream record batches through the model: yields each input batch with the output columns added.

    Memory stays bounded by a few chunks whatever the input size (the CLI's Parquet-to-Parquet path).
    With a ``store`` the job is recorded and resumable; ``input_fingerprint`` identifies the input
    (e.g. file names, sizes and modification times) so that the same run resumes the same job;
    ``on_job`` is called with the job id as soon as the job is registered.

    >>> # async for batch in astream_complete(reader, options=CompletionOptions(provider=p, prompt="{text}")):
    >>> #     writer.write_batch(batch)
    """
    if isinstance(batches, pa.RecordBatchReader):
        schema = batches.schema
        source: Iterator[pa.RecordBatch] = iter(batches)
    else:
        source = iter(batches)
        first = next(source, None)
        if first is None:
            return
        schema = first.schema
        source = itertools.chain([first], source)
    plan = options.plan(schema.names)
    _check_prompt_type(_Frame(schema.empty_table()), options)
    if store is not None:
        from nagents_frames.manager import stream_with_store

        # aclosing: a caller that stops early marks the job cancelled at once, not at garbage collection
        async with contextlib.aclosing(
            stream_with_store(
                source, plan, options, store=store, job_name=job_name, input_fingerprint=input_fingerprint,
                on_outcome=on_outcome, on_job=on_job,
            )
        ) as stored:
            async for batch in stored:
                if options.response_format is not None:
                    batch = options.response_format.convert_batch(batch, options.response_column)
                yield batch
        return
    pending: collections.deque[pa.RecordBatch] = collections.deque()

    def chunks() -> Iterator[tuple[int, dict[str, list[Any]]]]:
        start = 0
        for batch in source:
            for offset in range(0, max(batch.num_rows, 1), options.chunk_size):
                part = batch.slice(offset, options.chunk_size)
                pending.append(part)
                yield start + offset, {c: part.column(c).to_pylist() for c in plan.columns}
            start += batch.num_rows

    async with options.executor(on_outcome=on_outcome) as executor:
        async for _requests, outcomes in complete_chunks(chunks(), plan, options, executor):
            part = pending.popleft()
            arrays = outcome_arrays(outcomes, options)
            yield pa.RecordBatch.from_arrays(
                [*part.columns, *arrays.values()], names=[*part.schema.names, *arrays.keys()]
            )


def _options(
    provider: Provider,
    prompt: str | None,
    prompt_column: str,
    system: str | None,
    examples: Sequence[tuple[str, str]] | None,
    param_columns: Mapping[str, str] | None,
    id_column: str | None,
    response_column: str,
    error_column: str,
    usage: bool,
    concurrency: int,
    rpm: float | None,
    tpm: float | None,
    retry: RetryPolicy | None,
    timeouts: Timeouts | None,
    deadline: float | None,
    temperature: float | None,
    max_tokens: int | None,
    top_p: float | None,
    stop: Sequence[str] | str | None,
    seed: int | None,
    params: Mapping[str, Any] | GenerationParams | None,
    chunk_size: int,
    max_prompt_chars: int,
    progress: bool | None,
    response_format: Any = None,
    expand: bool = False,
) -> CompletionOptions:
    if max_tokens is not None and max_tokens <= 0:
        raise ConfigurationError(f"max_tokens must be positive, got {max_tokens}")
    call = params if isinstance(params, GenerationParams) else GenerationParams.from_mapping(params)
    call = call.merged(
        GenerationParams.from_mapping(
            {
                k: v
                for k, v in {
                    "temperature": temperature, "max_tokens": max_tokens, "top_p": top_p, "stop": stop, "seed": seed,
                }.items()
                if v is not None
            }
        )
    )
    return CompletionOptions(
        provider=provider, prompt=prompt, prompt_column=prompt_column, system=system,
        examples=tuple(tuple(e) for e in examples) if examples else None,  # type: ignore[misc]
        param_columns=param_columns, id_column=id_column, response_column=response_column,
        error_column=error_column, usage=usage, concurrency=concurrency, rpm=rpm, tpm=tpm, retry=retry,
        timeouts=timeouts, deadline=deadline, params=call, chunk_size=chunk_size,
        max_prompt_chars=max_prompt_chars, progress=progress, response_format=response_format, expand=expand,
    )


def batch_complete(data: Any, **kwargs: Any) -> Any:
    """Complete every row of a table and return the same table with ``response`` and ``error`` columns.

    Args:
        data: a polars or pandas DataFrame, a pyarrow Table / RecordBatch / RecordBatchReader (or a
            ``ray.data.Dataset`` with the ray extra). The result has the same type.
        provider: the :class:`~nagents_frames.Provider` to call.
        prompt: a template over columns, ``"Summarize: {text}"``. Without it, ``prompt_column`` holds ready
            prompts, or chat messages (a list of ``{role, content}`` per row).
        system: a system prompt for every row. examples: few-shot ``(question, answer)`` pairs.
        param_columns: per-row generation parameters, ``{"temperature": "temp_col"}``.
        response_column, error_column: names of the added columns.
        usage: also add ``prompt_tokens``, ``completion_tokens``, ``latency_s`` and ``attempts``.
        concurrency, rpm, tpm: requests in flight; requests and tokens per minute.
        retry, timeouts, deadline: a :class:`RetryPolicy`, :class:`Timeouts`, a whole-run deadline (s).
        temperature, max_tokens, top_p, stop, seed, params: generation parameters for this call.
        progress: show a progress bar (default: when on a terminal or in a notebook).
        store, job_name: a :class:`~nagents_frames.BatchStore` (or path) that records the job; calling
            again with the same input, prompt and model resumes it without paying twice.
        response_format: structured outputs: a JSON schema dict or a pydantic model class. The provider's
            structured-output mode is used, each answer is validated (a mismatch is that row's
            ``ResponseValidationError``) and ``response`` becomes a typed struct column; with
            ``expand=True`` one column per top-level field instead (see :mod:`nagents_frames.structured`).

    A row that fails has its ``error`` cell set (error type, HTTP status, the server's message); the
    table never fails for one row. Bad arguments raise a typed
    :class:`~nagents_frames.errors.ConfigurationError` before anything is sent; a fatal provider error
    (bad key, unknown model) raises its typed error (e.g. ``AuthenticationError``).

    Works from scripts, with ``df.pipe(batch_complete, ...)``, and inside Jupyter, where an event loop
    is already running (the work then runs on a loop in a worker thread).

    >>> import pandas as pd
    >>> from nagents_frames import Provider
    >>> from nagents_frames.testing import FakeLLMServer
    >>> with FakeLLMServer() as server:
    ...     p = Provider(provider_type="openai_compatible", model="echo", base_url=server.base_url)
    ...     out = pd.DataFrame({"prompt": ["hi"]}).pipe(batch_complete, provider=p, progress=False)
    >>> out.loc[0, "response"]
    'echo: hi'
    """
    module = type(data).__module__.split(".")[0]
    if module == "ray":
        from nagents_frames.integrations.ray import batch_complete_dataset

        return batch_complete_dataset(data, **kwargs)
    return run_sync(abatch_complete(data, **kwargs))


def run_sync(coro: Any) -> Any:
    """Run a coroutine to completion from synchronous code, also where a loop already runs (Jupyter).

    With a running loop in this thread the coroutine runs on a fresh loop in a worker thread; an
    interrupt (Ctrl-C, the notebook's stop button) cancels it there, so no new request leaves.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _run_here(coro)
    return _run_in_thread(coro)


def _run_here(coro: Any) -> Any:
    return asyncio.run(coro)


def _run_in_thread(coro: Any) -> Any:
    result: dict[str, Any] = {}
    loop = asyncio.new_event_loop()
    task_box: dict[str, asyncio.Task[Any]] = {}

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            task = loop.create_task(coro)
            task_box["task"] = task
            result["value"] = loop.run_until_complete(task)
        except BaseException as exc:  # handed to the calling thread
            result["error"] = exc
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    thread = threading.Thread(target=main, name="nagents-frames-loop", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.1)
    except KeyboardInterrupt:
        task = task_box.get("task")
        if task is not None and not loop.is_closed():
            loop.call_soon_threadsafe(task.cancel)
        thread.join(30)
        raise
    if "error" in result:
        raise result["error"]
    return result["value"]


def last_report(executor: Executor) -> RunReport:
    """The run report of an executor (attempts, retries by cause, waits)."""
    return executor.stats.report()
