"""``nagents-frames``: the command line, a pipeline step from Parquet (or CSV / NDJSON) to Parquet.

::

    nagents-frames run reviews.parquet labelled.parquet --model gpt-4o-mini \\
        --prompt "Classify the sentiment of: {review}" --store jobs.duckdb
    nagents-frames estimate reviews.parquet --model gpt-4o-mini --prompt "Classify: {review}"
    nagents-frames jobs --store jobs.duckdb
    nagents-frames sql --store jobs.duckdb "select status, count(*) from jobs group by 1"
    nagents-frames report JOB -o report.html --store jobs.duckdb
    nagents-frames run reviews.parquet labelled.parquet ... --mode native      # the provider's batch API
    nagents-frames run reviews/ labelled/ ... --engine ray --address auto     # Ray Data; OUT is a directory

The input is streamed record batch by record batch and the output written atomically, so memory stays
bounded however many rows there are and a crash never leaves a half-written file. API keys come only
from the environment (``OPENAI_API_KEY`` ...) or ``--api-key-file``; no flag takes a key.

Exit codes (:class:`ExitCode`): 0 done; 1 the run failed (bad key, unknown model, store or I/O error);
2 bad arguments, configuration or input; 3 finished but too many rows have errors (``--fail-on-errors``);
4 no such job; 130 interrupted (Ctrl-C / SIGTERM; rerun with the same ``--store`` to resume).

Example::

    >>> main(["--version"])  # doctest: +ELLIPSIS
    nagents-frames ...
    0
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import date, datetime
from pathlib import Path
from typing import IO, Any, NoReturn

import pyarrow as pa

from nagents_frames.config import RunConfig, load_config
from nagents_frames.errors import (
    ConfigurationError,
    JobNotFoundError,
    NagentsFramesError,
    PromptError,
    RequestError,
)

__all__ = ["ExitCode", "build_parser", "main"]

PROG = "nagents-frames"


class ExitCode(enum.IntEnum):
    """What the process exit status means (for schedulers).

    >>> int(ExitCode.ROW_ERRORS)
    3
    """

    OK = 0
    """Done: every row has a result (rows may still hold errors unless ``--fail-on-errors``)."""
    FAILED = 1
    """The run or command failed: bad credentials, unknown model, store or I/O error."""
    USAGE = 2
    """Bad arguments, configuration, template or input (nothing was sent)."""
    ROW_ERRORS = 3
    """The job finished and the output was written, but the share of error rows is over ``--fail-on-errors``."""
    NOT_FOUND = 4
    """No job with that id in the store."""
    INTERRUPTED = 130
    """Stopped by Ctrl-C or SIGTERM; with ``--store`` the job resumes when the same command runs again."""


_PROVIDER_ALIASES = {
    "openai": "openai",
    "openai_compatible": "openai_compatible",
    "openai-compatible": "openai_compatible",
    "vllm": "openai_compatible",
    "ollama": "openai_compatible",
    "anthropic": "anthropic",
    "claude": "anthropic",
    "gemini": "gemini_native",
    "gemini_native": "gemini_native",
    "google": "gemini_native",
    "azure": "azure_openai",
    "azure_openai": "azure_openai",
    "local": "local",
}


# --- argument parsing -----------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (a scheduler's log shows the reason, not a usage screen)."""

    def error(self, message: str) -> NoReturn:
        self.exit(int(ExitCode.USAGE), f"{PROG}: error: {message} (see {self.prog} --help)\n")


def _pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected PARAM=COLUMN, got {text!r}")
    return name.strip(), value.strip()


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


def _store_args(p: argparse.ArgumentParser, *, config: bool = True) -> None:
    p.add_argument("--store", metavar="PATH", help="the DuckDB job store (default: from --config)")
    if config:
        p.add_argument("--config", metavar="FILE", help="TOML settings (flags win over the file)")
    p.add_argument("--json", action="store_true", default=None, help="machine-readable output on stdout")


def _prompt_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prompt")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--prompt", metavar="TEMPLATE", help='template over columns, e.g. "Summarize: {text}"')
    x.add_argument("--prompt-file", metavar="FILE", help="read the template from a file")
    x.add_argument("--prompt-column", metavar="COL", help="column holding ready prompts or chat messages")
    g.add_argument("--system", metavar="TEXT", help="system prompt for every row")
    g.add_argument("--example", nargs=2, action="append", metavar=("QUESTION", "ANSWER"), dest="examples",
                   help="a few-shot example (repeat for more)")
    g.add_argument("--param-column", action="append", type=_pair, metavar="PARAM=COLUMN", dest="param_columns",
                   help="per-row generation parameter from a column, e.g. temperature=temp (repeatable)")
    g.add_argument("--id-column", metavar="COL", help="column with request ids (default: the row number)")
    m = p.add_argument_group("model")
    m.add_argument("--model", "-m", help="model name")
    m.add_argument("--provider", help="openai (default), anthropic, gemini, azure, openai_compatible, local")
    m.add_argument("--base-url", metavar="URL", help="API base URL (local servers: http://127.0.0.1:8000/v1)")
    m.add_argument("--api-key-file", metavar="PATH",
                   help="read the API key from this file (else from OPENAI_API_KEY / ANTHROPIC_API_KEY / ...)")
    m.add_argument("--max-tokens", type=int)
    m.add_argument("--temperature", type=float)
    m.add_argument("--top-p", type=float)
    m.add_argument("--seed", type=int)
    m.add_argument("--stop", action="append", metavar="TEXT", help="stop sequence (repeatable)")
    m.add_argument("--input-format", choices=["parquet", "csv", "ndjson"], help="default: from the file suffix")


def build_parser() -> argparse.ArgumentParser:
    """The ``nagents-frames`` argument parser (all subcommands).

    >>> build_parser().parse_args(["jobs", "--store", "jobs.duckdb"]).store
    'jobs.duckdb'
    """
    from nagents_frames import __version__

    parser = _Parser(prog=PROG, allow_abbrev=False, description="Run large batches of LLM requests over tables; jobs kept in DuckDB.",
                     epilog="exit codes: 0 done, 1 failed, 2 bad arguments/input, 3 rows with errors "
                            "(--fail-on-errors), 4 no such job, 130 interrupted")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name: str, **kw: Any) -> argparse.ArgumentParser:
        # no abbreviations: "--api-key" must never be taken for "--api-key-file"
        return sub.add_parser(name, allow_abbrev=False, **kw)

    sub.required = True

    run = add("run", help="complete every row of IN and write OUT (Parquet)",
                         description="Read IN (Parquet file/dir/glob, CSV, NDJSON) batch by batch, ask the model "
                                     "for each row, write IN's columns plus response and error to OUT (Parquet).")
    run.add_argument("input", metavar="IN")
    run.add_argument("output", metavar="OUT")
    _prompt_args(run)
    r = run.add_argument_group("run")
    r.add_argument("--concurrency", type=int, help="requests in flight (default 64)")
    r.add_argument("--rpm", type=float, help="requests per minute budget")
    r.add_argument("--tpm", type=float, help="tokens per minute budget")
    r.add_argument("--max-attempts", type=int, help="attempts per request, retries included (default 6)")
    r.add_argument("--request-timeout", type=float, metavar="S", help="seconds per request attempt (default 300)")
    r.add_argument("--deadline", type=float, metavar="S", help="seconds for the whole run")
    r.add_argument("--chunk-size", type=int, help="rows per chunk sent to the engine / stored (default 1000)")
    r.add_argument("--batch-rows", type=int, help="rows read per input batch (default: ~4 MiB, at most 8192)")
    r.add_argument("--usage", action="store_true", default=None,
                   help="add prompt_tokens, completion_tokens, latency_s, attempts columns")
    r.add_argument("--response-column", metavar="NAME")
    r.add_argument("--error-column", metavar="NAME")
    r.add_argument("--response-format", metavar="SCHEMA.json",
                   help="structured output: a JSON schema; response becomes a typed struct column")
    r.add_argument("--expand", action="store_true", default=None,
                   help="with --response-format: one column per field instead of a struct column")
    r.add_argument("--job-name", metavar="NAME", help="name of the job in the store")
    r.add_argument("--fail-on-errors", nargs="?", const=0.0, type=_fraction, metavar="FRACTION",
                   help="exit 3 when more than FRACTION of the rows (default: any) have errors")
    r.add_argument("--compression", choices=["zstd", "snappy", "gzip", "lz4", "brotli", "none"])
    r.add_argument("--progress-interval", type=float, metavar="S", help="seconds between progress updates")
    r.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary line")
    _mode_args(r)
    e = run.add_argument_group("engine")
    e.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local (default): this process; ray: Ray Data, Parquet in, a directory of Parquet parts out")
    e.add_argument("--address", metavar="ADDR",
                   help="with --engine ray: the Ray cluster (auto, ray://head:10001; default: start a local one)")
    e.add_argument("--num-actors", type=int, metavar="N", help="with --engine ray: actors (default 4)")
    e.add_argument("--actor-cpus", type=float, metavar="F",
                   help="with --engine ray: CPUs reserved per actor (default 0.25: actors wait on the network)")
    e.add_argument("--rows-per-file", type=int, metavar="N",
                   help="with --engine ray: rows per task and output part file (default 10 x --chunk-size)")
    e.add_argument("--local-cpus", type=int, metavar="N",
                   help="with --engine ray and no --address: CPUs of the local Ray cluster (default: all)")
    _store_args(run)

    est = add("estimate", help="count tokens and estimate the cost of a run, sending nothing")
    est.add_argument("input", metavar="IN")
    _prompt_args(est)
    est.add_argument("--completion-tokens", type=int, metavar="N", help="expected completion tokens per request")
    est.add_argument("--batch", action="store_true", help="price at the provider's batch discount")
    est.add_argument("--config", metavar="FILE")
    est.add_argument("--json", action="store_true", default=None)

    jobs = add("jobs", help="list the jobs in a store")
    jobs.add_argument("--status", help="only jobs with this status")
    jobs.add_argument("--limit", type=int, default=50)
    jobs.add_argument("--format", choices=["table", "csv", "json"], default=None)
    _store_args(jobs)

    for name, text in (("status", "show one job"), ("cancel", "cancel a job"),
                       ("retry", "re-run the failed rows of a job"), ("resume", "finish an interrupted job")):
        sp = add(name, help=text)
        sp.add_argument("job", metavar="JOB")
        _store_args(sp)
        if name in ("retry", "resume"):
            _prompt_free_model_args(sp)
            _mode_args(sp, default_help="default: as recorded in the job")

    res = add("results", help="write a job's results to Parquet")
    res.add_argument("job", metavar="JOB")
    res.add_argument("-o", "--output", required=True, metavar="OUT.parquet")
    _store_args(res)

    rep = add("report", help="draw a job's report (throughput, latency, errors, tokens) to HTML or PNG")
    rep.add_argument("job", metavar="JOB")
    rep.add_argument("-o", "--output", required=True, metavar="OUT.html|OUT.png",
                     help=".html: a self-contained page with the figure embedded; .png: the figure")
    _store_args(rep)

    sql = add("sql", help="query the store with SQL (read-only)")
    sql.add_argument("query", metavar="QUERY")
    sql.add_argument("--format", choices=["table", "csv", "json", "parquet"], default=None)
    sql.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout (required for parquet)")
    _store_args(sql)
    return parser


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _mode_args(p: argparse.ArgumentParser | Any, default_help: str = "default realtime") -> None:
    p.add_argument("--mode", choices=["realtime", "native"], default=None,
                   help=f"realtime: concurrent calls now; native: the provider's batch API at half price, "
                        f"answers within 24 h (openai, openai_compatible, anthropic) ({default_help})")
    p.add_argument("--poll-interval", type=_positive_float, metavar="S",
                   help="with --mode native: seconds between polls of the provider batch at first "
                        "(default 5, growing 1.5x per poll up to 60)")


def _prompt_free_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (defaults: as recorded in the job)")
    g.add_argument("--base-url", metavar="URL")
    g.add_argument("--api-key-file", metavar="PATH")
    g.add_argument("--provider")
    g.add_argument("--concurrency", type=int)


# --- output helpers ---------------------------------------------------------------------------------------


class _Out:
    """Where messages go: JSON events on stdout with ``--json``; human text on stderr."""

    def __init__(self, json_mode: bool, quiet: bool = False) -> None:
        self.json = json_mode
        self.quiet = quiet

    def event(self, name: str, /, **fields: Any) -> None:
        if self.json:
            line = json.dumps({"event": name, **fields}, default=_json_default, ensure_ascii=False)
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def say(self, text: str) -> None:
        if not self.quiet:
            sys.stderr.write(f"{PROG}: {text}\n")
            sys.stderr.flush()

    def fail(self, code: ExitCode, error: BaseException | str) -> int:
        if isinstance(error, RequestError):
            message = error.cell()
            kind = error.type_name
        elif isinstance(error, BaseException):
            kind = type(error).__name__
            message = _one_line(error)
        else:
            kind, message = "InternalError", error
        sys.stderr.write(f"{PROG}: error: {message if isinstance(error, RequestError) else f'{kind}: {message}'}\n")
        sys.stderr.flush()
        self.event("error", error_type=kind, message=message, exit_code=int(code))
        return int(code)


def _json_default(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", "replace")
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    if isinstance(error, OSError) and error.strerror:
        text = f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    line = text.splitlines()[0] if text else type(error).__name__
    return line[:500]


# --- progress -----------------------------------------------------------------------------------------------


@dataclass
class _Counters:
    """Live counts of a run (mutable accumulator, updated from the engine's callbacks)."""

    started: float = field(default_factory=time.monotonic)
    outcomes: int = 0
    outcome_errors: int = 0
    written: int = 0
    written_errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def done(self) -> int:
        # rows resumed from the store produce no outcome, written rows cover them
        return max(self.outcomes, self.written)

    @property
    def errors(self) -> int:
        return max(self.outcome_errors, self.written_errors)

    def snapshot(self, total: int | None) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        eta = (total - self.done) / rate if total is not None and rate > 0 else None
        return {
            "rows_done": self.done,
            "rows_total": total,
            "rows_written": self.written,
            "errors": self.errors,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "rows_per_s": round(rate, 2),
            "elapsed_s": round(elapsed, 3),
            "eta_s": round(max(eta, 0.0), 1) if eta is not None else None,
        }


class _Progress:
    """A bar on a terminal, JSON lines with ``--json``, nothing otherwise; refreshed by a ticker task."""

    def __init__(self, out: _Out, total: int | None, interval: float, enabled: bool) -> None:
        self.out = out
        self.total = total
        self.interval = interval
        self.counters = _Counters()
        self.bar: Any = None
        if enabled and not out.json and not out.quiet and _stderr_tty():
            from tqdm import tqdm

            try:
                sized = os.get_terminal_size(sys.stderr.fileno()).columns > 0
            except (OSError, ValueError):
                sized = False
            # a terminal that reports no width (some CI ptys) would get an empty bar: use 100 columns then
            self.bar = tqdm(total=total, unit="row", desc=PROG, dynamic_ncols=sized, ncols=None if sized else 100,
                            file=sys.stderr, mininterval=0.2, smoothing=0.1)

    def on_outcome(self, outcome: Any) -> None:
        c = self.counters
        c.outcomes += 1
        if outcome.error is not None:
            c.outcome_errors += 1
        if outcome.prompt_tokens:
            c.prompt_tokens += outcome.prompt_tokens
        if outcome.completion_tokens:
            c.completion_tokens += outcome.completion_tokens

    def on_batch(self, batch: pa.RecordBatch, error_column: str) -> None:
        c = self.counters
        c.written += batch.num_rows
        errors = batch.column(error_column)
        c.written_errors += len(errors) - errors.null_count

    def tick(self) -> None:
        snap = self.counters.snapshot(self.total)
        if self.bar is not None:
            self.bar.n = snap["rows_done"]
            self.bar.set_postfix(errors=snap["errors"], tokens=snap["prompt_tokens"] + snap["completion_tokens"],
                                 refresh=False)
            self.bar.refresh()
        self.out.event("progress", **snap)

    async def ticker(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.tick()

    def close(self) -> None:
        if self.bar is not None:
            self.tick()
            self.bar.close()
            self.bar = None


def _stderr_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


# --- settings -------------------------------------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> RunConfig:
    file_values = load_config(args.config) if getattr(args, "config", None) else {}
    flags: dict[str, Any] = {}
    names = {f for f in RunConfig.__dataclass_fields__}
    for key, value in vars(args).items():
        if key in names and value is not None:
            flags[key] = value
    if getattr(args, "prompt_file", None):
        try:
            flags["prompt"] = Path(args.prompt_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigurationError(f"cannot read --prompt-file {args.prompt_file!r}: {exc.strerror}") from None
    if flags.get("prompt") is not None or flags.get("prompt_column") is not None:
        # a prompt given on the command line replaces the file's, whichever kind it is
        file_values = {k: v for k, v in file_values.items() if k not in ("prompt", "prompt_column")}
    if isinstance(flags.get("examples"), list):
        flags["examples"] = [tuple(e) for e in flags["examples"]]
    if isinstance(flags.get("param_columns"), list):
        flags["param_columns"] = dict(flags["param_columns"])
    return RunConfig.from_sources(file_values, flags)


def _read_key_file(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ConfigurationError(f"API key file {path!r} does not exist") from None
    except OSError as exc:
        raise ConfigurationError(f"cannot read API key file {path!r}: {exc.strerror}") from None
    if not text or "\n" in text:
        # never echo the content: it is a secret
        raise ConfigurationError(f"API key file {path!r} must hold the key on one line")
    return text


def _provider(cfg: RunConfig, *, poll_interval: float | None = None) -> Any:
    from nagents_frames.providers import Provider

    if not cfg.model:
        raise ConfigurationError("--model is required (or model = ... in the config file)")
    kind = _PROVIDER_ALIASES.get(cfg.provider.lower().replace(" ", ""))
    if kind is None:
        raise ConfigurationError(f"unknown provider {cfg.provider!r}; known: {', '.join(sorted(_PROVIDER_ALIASES))}")
    if kind == "openai" and cfg.base_url:
        kind = "openai_compatible"
    key = _read_key_file(cfg.api_key_file) if cfg.api_key_file else None
    return Provider(provider_type=kind, model=cfg.model, api_key=key, base_url=cfg.base_url,
                    options=_poll_options(poll_interval))


def _poll_options(poll_interval: float | None) -> dict[str, Any] | None:
    """Provider options for native batches: the first poll interval; the cap grows with it."""
    if poll_interval is None:
        return None
    return {"batch_poll_interval": poll_interval, "batch_max_poll_interval": max(60.0, poll_interval)}


def _options(cfg: RunConfig, provider: Any, *, progress: bool = False) -> Any:
    from nagents_frames.executor import RetryPolicy, Timeouts
    from nagents_frames.frames import CompletionOptions
    from nagents_frames.types import GenerationParams

    if cfg.prompt is None and cfg.prompt_column is None:
        raise ConfigurationError("give --prompt TEMPLATE, --prompt-file FILE or --prompt-column COL")
    if cfg.max_tokens is not None and cfg.max_tokens <= 0:
        raise ConfigurationError(f"--max-tokens must be positive, got {cfg.max_tokens}")
    params = GenerationParams(
        temperature=cfg.temperature, max_tokens=cfg.max_tokens, top_p=cfg.top_p, stop=cfg.stop, seed=cfg.seed
    )
    return CompletionOptions(
        provider=provider,
        prompt=cfg.prompt,
        prompt_column=cfg.prompt_column or "prompt",
        system=cfg.system,
        examples=cfg.examples,
        param_columns=cfg.param_columns,
        id_column=cfg.id_column,
        response_column=cfg.response_column,
        error_column=cfg.error_column,
        usage=cfg.usage,
        concurrency=cfg.concurrency,
        rpm=cfg.rpm,
        tpm=cfg.tpm,
        retry=RetryPolicy(max_attempts=cfg.max_attempts) if cfg.max_attempts else None,
        timeouts=Timeouts(request=cfg.request_timeout) if cfg.request_timeout else None,
        deadline=cfg.deadline,
        params=params,
        chunk_size=cfg.chunk_size,
        progress=progress,
        response_format=cfg.response_format,
        expand=cfg.expand,
    )


# --- run ------------------------------------------------------------------------------------------------------


class _Interrupted(Exception):
    """Internal: the run was stopped by a signal."""


async def _run(args: argparse.Namespace, cfg: RunConfig, out: _Out) -> int:
    from nagents_frames.frames import astream_complete, outcome_arrays
    from nagents_frames.io import ParquetSink, open_input

    source = open_input(args.input, format=cfg.input_format)
    target = _check_output(Path(args.output), source.paths)
    provider = _provider(cfg, poll_interval=args.poll_interval)
    options = _options(cfg, provider)
    plan = options.plan(source.schema.names)  # every column / template check, before anything is sent
    if args.mode == "native":
        return await _run_native(args, cfg, out, source, target, options, plan)
    empty = outcome_arrays([], options)
    schema = pa.schema([*source.schema, *(pa.field(n, a.type) for n, a in empty.items())])
    compression = "none" if cfg.compression == "none" else cfg.compression
    sink = ParquetSink(target, schema=schema, compression=compression)
    progress = _Progress(out, source.num_rows, cfg.progress_interval, enabled=not args.quiet)
    out.event("start", input=[str(p) for p in source.paths], output=str(target), rows_total=source.num_rows,
              model=provider.model, provider=provider.type.value, store=cfg.store)
    ticker = asyncio.create_task(progress.ticker())
    job_ids: list[str] = []

    def on_job(job_id: str) -> None:
        job_ids.append(job_id)
        out.event("job", id=job_id, mode="realtime", store=cfg.store)

    try:
        stream = astream_complete(
            source.batches(cfg.batch_rows or source.batch_rows()),
            options=options,
            store=cfg.store,
            job_name=cfg.job_name,
            input_fingerprint=source.fingerprint() if cfg.store else None,
            on_outcome=progress.on_outcome,
            on_job=on_job,
        )
        async for batch in stream:
            sink.write(batch)
            progress.on_batch(batch, options.error_column)
        path = sink.commit()
    except BaseException:
        sink.abort()
        raise
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        progress.close()
    snap = progress.counters.snapshot(source.num_rows)
    rows, errors = progress.counters.written, progress.counters.written_errors
    job_id = job_ids[0] if job_ids else None
    return _finish(cfg, out, path=path, rows=rows, errors=errors, prompt_tokens=snap["prompt_tokens"],
                   completion_tokens=snap["completion_tokens"], elapsed_s=snap["elapsed_s"], job_id=job_id)


def _finish(cfg: RunConfig, out: _Out, *, path: Path | str, rows: int, errors: int, prompt_tokens: int,
            completion_tokens: int, elapsed_s: float, job_id: str | None, **extra: Any) -> int:
    """The ``done`` event / summary line of every ``run`` flavour, and its exit code."""
    code = ExitCode.OK
    if cfg.fail_on_errors is not None and rows and errors / rows > cfg.fail_on_errors:
        code = ExitCode.ROW_ERRORS
    ids = {"job_id": job_id} if job_id else {}
    out.event("done", output=str(path), rows=rows, errors=errors, prompt_tokens=prompt_tokens,
              completion_tokens=completion_tokens, elapsed_s=round(elapsed_s, 3), exit_code=int(code),
              peak_rss_mb=_peak_rss_mb(), **ids, **extra)
    if not out.json:
        tokens = prompt_tokens + completion_tokens
        job = f"; job {job_id} in {cfg.store}" if job_id else ""
        out.say(f"wrote {rows:,} rows to {path} ({errors:,} with errors, {tokens:,} tokens) in {elapsed_s:.1f}s{job}")
        if code is ExitCode.ROW_ERRORS:
            share = f"over {cfg.fail_on_errors:.1%}" if cfg.fail_on_errors else "some"
            out.say(f"error: {errors:,} of {rows:,} rows have errors ({share}); exit {int(code)}")
    return int(code)


_RAY_FLAGS = ("address", "num_actors", "actor_cpus", "rows_per_file", "local_cpus")


def _check_run_flags(args: argparse.Namespace) -> None:
    """Flags that only mean something together are refused apart (exit 2, nothing sent)."""
    if args.engine != "ray":
        given = [f"--{n.replace('_', '-')}" for n in _RAY_FLAGS if getattr(args, n) is not None]
        if given:
            raise ConfigurationError(f"{', '.join(given)} only apply with --engine ray")
    elif args.mode == "native":
        raise ConfigurationError("--mode native runs on the provider's servers; it does not combine with --engine ray")
    if args.poll_interval is not None and args.mode != "native":
        raise ConfigurationError("--poll-interval only applies with --mode native")
    for name in ("num_actors", "rows_per_file", "local_cpus"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigurationError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


async def _run_native(args: argparse.Namespace, cfg: RunConfig, out: _Out, source: Any, target: Path,
                      options: Any, plan: Any) -> int:
    """``run --mode native``: one job of the job API through the provider's batch endpoints; OUT is written
    once the job has ended, the input read a second time batch by batch and joined with the stored results
    (request ``i`` of the job is input row ``i``, so each batch is one range query)."""
    from nagents_frames.executor import Outcome
    from nagents_frames.frames import outcome_arrays
    from nagents_frames.io import ParquetSink
    from nagents_frames.manager import BatchManager, _outcomes_from_table
    from nagents_frames.store import BatchStore
    from nagents_frames.types import BatchRequest, BatchStatus

    if options.response_format is not None:
        raise ConfigurationError("--response-format is not supported with --mode native yet; use --mode realtime")
    provider = options.provider
    started = time.monotonic()
    batch_rows = cfg.batch_rows or source.batch_rows()
    requests: list[BatchRequest] = []
    unsent: dict[int, Outcome] = {}  # rows without a usable prompt: their own error (the job records a generic one)
    for batch in source.batches(batch_rows, columns=plan.columns):
        values = {c: batch.column(c).to_pylist() for c in plan.columns}
        for prepared in plan.prepare(values, start=len(requests), model=provider.model):
            if prepared.error is not None or prepared.messages is None:
                # kept as a request without messages, so that request i stays row i: the job counts it as
                # failed (never sent) and its metadata says why
                error = prepared.error or PromptError("the row has no messages")
                unsent[prepared.index] = Outcome.failure(error)
                requests.append(BatchRequest(id=prepared.request_id, messages=[],
                                             metadata={"prompt_error": error.cell()}))
            else:
                requests.append(BatchRequest(id=prepared.request_id, messages=list(prepared.messages),
                                             params=prepared.params))
    total_rows = len(requests)
    store = await BatchStore(cfg.store).initialize() if cfg.store else None
    manager = BatchManager(
        provider=provider, store=store, mode="native", concurrency=options.concurrency, rpm=options.rpm,
        tpm=options.tpm, retry=options.retry, timeouts=options.timeouts, chunk_size=options.chunk_size,
        params=options.params,
    )
    out.event("start", input=[str(p) for p in source.paths], output=str(target), rows_total=total_rows,
              model=provider.model, provider=provider.type.value, store=cfg.store, mode="native")
    job_id: str | None = None
    try:
        status = BatchStatus.COMPLETED
        if total_rows > len(unsent):
            job = await manager.submit(requests, name=cfg.job_name)
            job_id = job.id
            requests = []  # the manager holds its own prepared copy
            out.event("job", id=job_id, mode="native", requests=total_rows - len(unsent), store=cfg.store)
            resume = f", `nagents-frames resume {job_id} --store {cfg.store}` picks them up" if cfg.store else ""
            out.say(f"job {job_id}{f' in {cfg.store}' if cfg.store else ''}: {total_rows - len(unsent):,} "
                    f"requests sent to the {provider.type.value} batch API; waiting for the provider "
                    f"(Ctrl-C stops waiting; the batches keep running{resume})")
            job = await manager.wait(job_id)
            status = job.status
            if status is BatchStatus.FAILED:
                raise _JobFailed(f"job {job_id} failed: {job.error or 'see the store'}")
        bound = manager.store
        empty = outcome_arrays([], options)
        schema = pa.schema([*source.schema, *(pa.field(n, a.type) for n, a in empty.items())])
        sink = ParquetSink(target, schema=schema, compression="none" if cfg.compression == "none" else cfg.compression)
        rows = errors = prompt_tokens = completion_tokens = 0
        missing = Outcome(error="JobError: the provider batch ended without an answer for this row "
                                f"(job {status.value})", error_type="JobError")
        try:
            for batch in source.batches(batch_rows):
                first, stop = rows, rows + batch.num_rows
                stored: dict[int, Outcome] = {}
                if job_id is not None and bound is not None:
                    stored = _outcomes_from_table(await bound.results(job_id, start=first, stop=stop))
                outcomes = [unsent.get(row) or stored.get(row) or missing for row in range(first, stop)]
                arrays = outcome_arrays(outcomes, options)
                sink.write(pa.RecordBatch.from_arrays([*batch.columns, *arrays.values()],
                                                      names=[*batch.schema.names, *arrays.keys()]))
                rows = stop
                errors += sum(1 for o in outcomes if o.error is not None)
                prompt_tokens += sum(o.prompt_tokens or 0 for o in outcomes)
                completion_tokens += sum(o.completion_tokens or 0 for o in outcomes)
            path = sink.commit()
        except BaseException:
            sink.abort()
            raise
    except asyncio.CancelledError:
        if store is None and job_id is not None:
            # nothing remembers these batches: stop them at the provider rather than pay for unread answers.
            # The cancel request leaves from the job's own task, so wait (bounded) for the job to see it through.
            with contextlib.suppress(Exception):
                if await asyncio.wait_for(manager.cancel(job_id), timeout=30):
                    await manager.wait(job_id, timeout=30)
        raise
    finally:
        await manager.close()
        if store is not None:
            await store.close()
    return _finish(cfg, out, path=path, rows=rows, errors=errors, prompt_tokens=prompt_tokens,
                   completion_tokens=completion_tokens, elapsed_s=time.monotonic() - started, job_id=job_id,
                   mode="native", status=status.value)


class _JobFailed(NagentsFramesError):
    """Internal: a job of the job API ended FAILED (bad key, unknown model ...): exit 1 with its reason."""


def _run_ray(args: argparse.Namespace, cfg: RunConfig, out: _Out) -> int:
    """``run --engine ray``: Parquet in, a directory of Parquet part files out, on Ray Data."""
    from nagents_frames.integrations import ray as nf_ray

    if cfg.input_format not in (None, "parquet") or any(
        str(args.input).lower().endswith(s) for s in (".csv", ".tsv", ".csv.gz", ".ndjson", ".jsonl", ".json")
    ):
        raise ConfigurationError("--engine ray reads Parquet only (a file, a directory or a glob)")
    target = Path(args.output)
    if target.exists() and not target.is_dir():
        raise ConfigurationError(f"with --engine ray OUT is a directory of Parquet part files; {str(target)!r} is a file")
    provider = _provider(cfg)
    options = _options(cfg, provider, progress=not args.quiet and not out.json and _stderr_tty())
    rows_total = None
    if "://" not in str(args.input):
        # local input: check files, columns and template here, before a cluster takes seconds to start
        from nagents_frames.io import open_input

        source = open_input(args.input, format="parquet")
        _check_output(target, source.paths)
        options.plan(source.schema.names)
        rows_total = source.num_rows
    ray = nf_ray._require_ray()
    started_here = False
    if args.address is None and not ray.is_initialized():
        # a local cluster: few CPUs is plenty (actors wait on the network), and no dashboard or usage report
        ray.init(num_cpus=args.local_cpus, include_dashboard=False, log_to_driver=False)
        started_here = True
    counters = _Counters()
    out.event("start", input=[str(args.input)], output=str(target), rows_total=rows_total, model=provider.model,
              provider=provider.type.value, store=cfg.store, engine="ray", address=args.address)

    def on_chunk(report: Any) -> None:
        counters.written += report.rows
        counters.written_errors += report.failed
        counters.prompt_tokens += report.prompt_tokens
        counters.completion_tokens += report.completion_tokens
        out.event("progress", **counters.snapshot(rows_total), chunk=report.file_name, skipped=report.skipped)

    try:
        kwargs: dict[str, Any] = {}
        if args.num_actors is not None:
            kwargs["num_actors"] = args.num_actors
        if args.actor_cpus is not None:
            kwargs["num_cpus"] = args.actor_cpus
        result = nf_ray.run_parquet(args.input, target, options=options, address=args.address, store=cfg.store,
                                    job_name=cfg.job_name, rows_per_file=args.rows_per_file, on_chunk=on_chunk,
                                    **kwargs)
    finally:
        if started_here:
            ray.shutdown()
    return _finish(cfg, out, path=result.out_dir, rows=result.total_rows, errors=result.failed,
                   prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                   elapsed_s=result.elapsed_s, job_id=result.job_id, engine="ray", files=len(result.files),
                   chunks_skipped=result.chunks_skipped, glob=result.glob)


def _report(args: argparse.Namespace, cfg: RunConfig, out: _Out) -> int:
    """``report JOB -o report.html|report.png``: the job's picture from the store (read-only)."""
    from nagents_frames.report import write_report

    path = write_report(_store_path(cfg), args.job, args.output)
    out.event("report", id=args.job, output=str(path), bytes=path.stat().st_size)
    if not out.json:
        out.say(f"wrote the report of job {args.job} to {path}")
    return int(ExitCode.OK)


def _check_output(target: Path, inputs: Sequence[Path]) -> Path:
    if any(target.resolve() == p.resolve() for p in inputs):
        raise ConfigurationError("OUT must not be one of the input files")
    return target


def _peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


def _use_jemalloc() -> None:
    """Arrow's jemalloc pool hands freed batch memory back to the OS sooner than the default mimalloc
    pool: a measurably lower, flatter peak RSS for a long streaming run (this process is ours to tune)."""
    if os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        return  # the user chose
    with contextlib.suppress(NotImplementedError, AttributeError, pa.ArrowException):
        pa.set_memory_pool(pa.jemalloc_memory_pool())


def _run_with_signals(coro_factory: Callable[[], Any]) -> Any:
    """Run a coroutine; SIGINT / SIGTERM cancel it (no new request leaves) and raise :class:`_Interrupted`."""

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        hit: list[int] = []

        def stop(signum: int) -> None:
            if hit:  # a second Ctrl-C: stop waiting for clean-up
                os._exit(int(ExitCode.INTERRUPTED))
            hit.append(signum)
            sys.stderr.write(f"\n{PROG}: stopping (no new requests); a rerun with the same --store resumes\n")
            task.cancel()

        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop, sig)
                installed.append(sig)
        try:
            return await coro_factory()
        except asyncio.CancelledError:
            if hit:
                raise _Interrupted() from None
            raise
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    return asyncio.run(main())


# --- estimate -------------------------------------------------------------------------------------------------


def _estimate(args: argparse.Namespace, cfg: RunConfig, out: _Out) -> int:
    from nagents_frames.io import open_input
    from nagents_frames.prompting import compile_prompt

    source = open_input(args.input, format=cfg.input_format)
    provider = _provider(cfg)
    if cfg.prompt is None and cfg.prompt_column is None:
        raise ConfigurationError("give --prompt TEMPLATE, --prompt-file FILE or --prompt-column COL")
    plan = compile_prompt(source.schema.names, prompt=cfg.prompt, prompt_column=cfg.prompt_column or "prompt",
                          system=cfg.system, examples=cfg.examples, param_columns=cfg.param_columns,
                          id_column=cfg.id_column)
    # read only the columns the prompt needs
    reader = pa.RecordBatchReader.from_batches(
        pa.schema([source.schema.field(c) for c in plan.columns]),
        source.batches(cfg.batch_rows or 8192, columns=plan.columns),
    )
    from nagents_frames.cost import estimate

    est = estimate(reader, provider=provider, prompt=cfg.prompt, prompt_column=cfg.prompt_column or "prompt",
                   system=cfg.system, examples=cfg.examples, param_columns=cfg.param_columns, id_column=cfg.id_column,
                   max_tokens=cfg.max_tokens, completion_tokens=args.completion_tokens, batch=args.batch)
    if out.json:
        out.event("estimate", rows=est.rows, requests=est.requests, unique_requests=est.unique_requests,
                  skipped=est.skipped, prompt_tokens=est.prompt_tokens, completion_tokens=est.completion_tokens,
                  total_tokens=est.total_tokens, completion_basis=est.completion_basis, model=est.model,
                  provider=est.provider_type, tokenizer=est.tokenizer, batch=est.batch, input_cost=est.input_cost,
                  output_cost=est.output_cost, cost=est.cost)
    else:
        print(str(est))
    return int(ExitCode.OK)


# --- store-bound subcommands --------------------------------------------------------------------------------


def _store_path(cfg: RunConfig) -> str:
    if not cfg.store:
        raise ConfigurationError("--store PATH is required (or store = ... in the config file)")
    if not Path(cfg.store).exists():
        raise ConfigurationError(f"store {cfg.store!r} does not exist")
    return cfg.store


def _print_table(table: pa.Table, fmt: str, stream: IO[str] | None = None) -> None:
    stream = stream or sys.stdout
    if fmt == "json":
        for row in table.to_pylist():
            stream.write(json.dumps(row, default=_json_default, ensure_ascii=False) + "\n")
        return
    if fmt == "csv":
        import csv

        writer = csv.writer(stream)
        writer.writerow(table.column_names)
        for row in table.to_pylist():
            writer.writerow(["" if v is None else _cell(v) for v in row.values()])
        return
    stream.write(_text_table(table) + "\n")


def _cell(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=_json_default, ensure_ascii=False)
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="seconds")
    return str(value)


def _text_table(table: pa.Table, max_width: int = 60) -> str:
    names = table.column_names
    rows = [["" if v is None else _cell(v).replace("\n", " ") for v in row.values()] for row in table.to_pylist()]
    rows = [[c if len(c) <= max_width else c[: max_width - 1] + "…" for c in row] for row in rows]
    widths = [max([len(n), *(len(r[i]) for r in rows)]) for i, n in enumerate(names)]
    line = "  ".join(n.ljust(w) for n, w in zip(names, widths))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([line, rule, *body, f"({len(rows)} row{'s' if len(rows) != 1 else ''})"])


_JOB_FIELDS = ("id", "name", "kind", "status", "total", "succeeded", "failed", "model", "prompt_tokens",
               "completion_tokens", "created_at", "finished_at", "error")


def _job_row(record: Any) -> dict[str, Any]:
    return {name: getattr(record, name) for name in _JOB_FIELDS}


def _store_command(args: argparse.Namespace, cfg: RunConfig, out: _Out) -> int:
    from nagents_frames.store import BatchStore

    path = _store_path(cfg)
    command = args.command
    if command == "sql":
        return _sql(args, BatchStore(path, read_only=True), out)
    writes = command in ("cancel", "retry", "resume")
    store = BatchStore(path, read_only=not writes)
    if command in ("retry", "resume"):
        return int(_run_with_signals(lambda: _manage(args, cfg, store, out)))
    return int(asyncio.run(_inspect(args, store, out)))


async def _inspect(args: argparse.Namespace, store: Any, out: _Out) -> int:
    from nagents_frames.types import BatchStatus

    await store.initialize()
    try:
        command = args.command
        if command == "jobs":
            records = await store.list_jobs()
            if args.status:
                records = [r for r in records if r.status.value == args.status.lower()]
            records = records[-args.limit:] if args.limit > 0 else records
            rows = [_job_row(r) for r in records]
            table = pa.Table.from_pylist(rows) if rows else pa.table({n: pa.array([], pa.string()) for n in _JOB_FIELDS})
            _print_table(table, args.format or ("json" if out.json else "table"))
            return int(ExitCode.OK)
        if command == "status":
            record = await store.get_job(args.job)
            row = _job_row(record)
            row.update(done=record.succeeded + record.failed, runs=record.runs, updated_at=record.updated_at,
                       error_type=record.error_type, parameters=dict(record.parameters))
            if out.json:
                out.event("status", **row)
            else:
                width = max(len(k) for k in row)
                for key, value in row.items():
                    shown = json.dumps(value, default=_json_default) if isinstance(value, dict) else value
                    print(f"{key.ljust(width)}  {'' if shown is None else shown}")
            return int(ExitCode.OK)
        if command == "results":
            return await _results(args, store, out)
        if command == "cancel":
            record = await store.get_job(args.job)
            moved = await store.set_status(args.job, BatchStatus.CANCELLED,
                                           from_statuses=(BatchStatus.PENDING, BatchStatus.PROCESSING))
            status = BatchStatus.CANCELLED if moved else record.status
            out.event("cancel", id=args.job, cancelled=moved, status=status.value)
            if not out.json:
                out.say(f"job {args.job} cancelled" if moved else f"job {args.job} had already ended ({status.value})")
            return int(ExitCode.OK)
        raise ConfigurationError(f"unknown command {command!r}")
    finally:
        await store.close()


async def _results(args: argparse.Namespace, store: Any, out: _Out) -> int:
    from nagents_frames.executor import OUTCOME_SCHEMA
    from nagents_frames.io import ParquetSink

    record = await store.get_job(args.job)
    sink = ParquetSink(args.output, schema=OUTCOME_SCHEMA)
    page = 100_000  # rows per read from the store: bounded memory for any job size
    try:
        if record.total > 0:
            for start in range(0, record.total, page):
                table = await store.results(args.job, start=start, stop=start + page)
                for batch in table.to_batches():
                    sink.write(batch)
        else:
            for batch in (await store.results(args.job)).to_batches():
                sink.write(batch)
        path = sink.commit()
    except BaseException:
        sink.abort()
        raise
    out.event("results", id=args.job, output=str(path), rows=sink.rows, status=record.status.value)
    if not out.json:
        out.say(f"wrote {sink.rows:,} results of job {args.job} ({record.status.value}) to {path}")
    return int(ExitCode.OK)


def _sql(args: argparse.Namespace, store: Any, out: _Out) -> int:
    fmt = args.format or ("json" if out.json else "table")
    if fmt == "parquet" and not args.output:
        raise ConfigurationError("--format parquet needs -o FILE")
    try:
        import duckdb

        try:
            table = store.sql(args.query, arrow=True)
        except NagentsFramesError as exc:
            cause = exc.__cause__
            if isinstance(cause, duckdb.Error):
                # a mistake in the user's SQL is a usage error, not a failed store
                raise ConfigurationError(f"SQL error: {_one_line(cause)}") from None
            raise
    finally:
        asyncio.run(store.close())
    if fmt == "parquet":
        from nagents_frames.io import ParquetSink

        with ParquetSink(args.output, schema=table.schema) as sink:
            for batch in table.to_batches():
                sink.write(batch)
        out.say(f"wrote {table.num_rows:,} rows to {args.output}")
        return int(ExitCode.OK)
    if args.output:
        with open(args.output, "w", encoding="utf-8", newline="") as f:
            _print_table(table, fmt, f)
    else:
        _print_table(table, fmt)
    return int(ExitCode.OK)


async def _manage(args: argparse.Namespace, cfg: RunConfig, store: Any, out: _Out) -> int:
    """``retry`` / ``resume`` a job of the job API with a manager, and wait for it."""
    from nagents_frames.manager import BatchManager
    from nagents_frames.providers import Provider
    from nagents_frames.types import BatchStatus

    await store.initialize()
    try:
        record = await store.get_job(args.job)
        if record.kind != "requests":
            raise ConfigurationError(
                f"job {args.job} was made by 'nagents-frames run' (or batch_complete): run the same command again "
                f"with the same --store; rows with a stored answer are skipped and rows with errors are sent again"
            )
        recorded = dict(record.parameters)
        kind = _PROVIDER_ALIASES.get((cfg.provider if args.provider else "").lower()) or recorded.get(
            "provider_type", record.provider or "openai")
        key = _read_key_file(cfg.api_key_file) if cfg.api_key_file else None
        mode = args.mode or record.mode or "realtime"
        if args.poll_interval is not None and mode != "native":
            raise ConfigurationError("--poll-interval only applies to native jobs (--mode native)")
        provider = Provider(provider_type=kind, model=record.model or str(recorded.get("model")), api_key=key,
                            base_url=cfg.base_url or recorded.get("base_url"),
                            options=_poll_options(args.poll_interval))
        manager = BatchManager(provider=provider, store=store, concurrency=cfg.concurrency, mode=mode)
        try:
            if args.command == "retry":
                job = await manager.retry_failed(args.job)
            else:
                job = await manager.resume(args.job)
            job = await manager.wait(args.job)
        finally:
            await manager.close()
        out.event(args.command, id=job.id, status=job.status.value, total=job.total, succeeded=job.succeeded,
                  failed=job.failed)
        if not out.json:
            out.say(f"job {job.id} {job.status.value}: {job.succeeded:,} succeeded, {job.failed:,} failed "
                    f"of {job.total:,}")
        return int(ExitCode.OK if job.status is BatchStatus.COMPLETED else ExitCode.FAILED)
    finally:
        await store.close()


# --- entry point ----------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``nagents-frames`` command; returns the exit code (see :class:`ExitCode`).

    >>> main(["run", "missing.parquet", "out.parquet", "--model", "m", "--prompt", "{text}"])
    2
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    for token in argv:
        name = token.split("=", 1)[0]
        if name.startswith("--") and "key" in name and name != "--api-key-file":
            # refuse without echoing the value: it may be a secret, and argparse would print it
            sys.stderr.write(f"{PROG}: error: there is no {name} flag; API keys come from the environment "
                             "(OPENAI_API_KEY, ANTHROPIC_API_KEY, GEMINI_API_KEY ...) or --api-key-file PATH\n")
            return int(ExitCode.USAGE)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else int(ExitCode.USAGE)
    out = _Out(bool(getattr(args, "json", False)), quiet=bool(getattr(args, "quiet", False)))
    debug = bool(os.environ.get("NAGENTS_FRAMES_DEBUG"))
    try:
        cfg = _settings(args)
        out.json = cfg.json
        if args.command == "run":
            _check_run_flags(args)
            if args.engine == "ray":
                return _run_ray(args, cfg, out)
            _use_jemalloc()
            return int(_run_with_signals(lambda: _run(args, cfg, out)))
        if args.command == "report":
            return _report(args, cfg, out)
        if args.command == "estimate":
            return _estimate(args, cfg, out)
        return _store_command(args, cfg, out)
    except _Interrupted:
        out.event("interrupted", exit_code=int(ExitCode.INTERRUPTED))
        return int(ExitCode.INTERRUPTED)
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{PROG}: interrupted\n")
        out.event("interrupted", exit_code=int(ExitCode.INTERRUPTED))
        return int(ExitCode.INTERRUPTED)
    except JobNotFoundError as exc:
        return out.fail(ExitCode.NOT_FOUND, exc)
    except ConfigurationError as exc:
        return out.fail(ExitCode.USAGE, exc)
    except (NagentsFramesError, OSError) as exc:
        if debug:
            raise
        return out.fail(ExitCode.FAILED, exc)
    except Exception as exc:  # an unexpected failure still gets one line and a non-zero code
        if debug:
            raise
        return out.fail(ExitCode.FAILED, f"{type(exc).__name__}: {_one_line(exc)} "
                                         "(set NAGENTS_FRAMES_DEBUG=1 for a traceback)")


if __name__ == "__main__":
    raise SystemExit(main())
