"""Values of nagents_frames: requests, results, jobs, statuses, usage (frozen dataclasses and enums).

Example::

    >>> from nagents_frames import BatchRequest, BatchStatus
    >>> r = BatchRequest(id="req-1", messages=[{"role": "user", "content": "Hi"}])
    >>> BatchStatus("completed") is BatchStatus.COMPLETED
    True
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from typing import Any

__all__ = [
    "BatchJob",
    "BatchRequest",
    "BatchResult",
    "BatchStatus",
    "GenerationParams",
    "Message",
    "ProviderType",
    "Usage",
]

Message = Mapping[str, Any]
"""A chat message: ``{"role": "user" | "system" | "assistant", "content": "..."}``."""


class ProviderType(enum.StrEnum):
    """Which API a :class:`~nagents_frames.Provider` speaks.

    >>> ProviderType("openai_compatible") is ProviderType.OPENAI_COMPATIBLE
    True
    """

    OPENAI_COMPATIBLE = "openai_compatible"
    OPENAI = "openai"
    AZURE_OPENAI = "azure_openai"
    ANTHROPIC = "anthropic"
    GEMINI_NATIVE = "gemini_native"
    LOCAL = "local"


class BatchStatus(enum.StrEnum):
    """The life of a job: pending → processing → completed | failed | cancelled.

    The values are the lowercase strings of the nagents documentation, so both
    ``status == "completed"`` and ``match status: case BatchStatus.COMPLETED:`` work.
    """

    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """True for completed, failed and cancelled."""
        return self in (BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.CANCELLED)


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage of one request or a whole job.

    >>> Usage(prompt_tokens=10, completion_tokens=5).total_tokens
    15
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.prompt_tokens + other.prompt_tokens, self.completion_tokens + other.completion_tokens)


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """Sampling parameters; set on the provider, overridden per call or per row.

    ``None`` means "not set here" so that :meth:`merged` can layer call over provider defaults.
    ``extra`` is passed through to the request body untouched (provider-specific fields).

    >>> GenerationParams(temperature=0.0).merged(GenerationParams(max_tokens=5))
    GenerationParams(temperature=0.0, max_tokens=5, top_p=None, stop=None, seed=None, response_format=None, extra=None)
    """

    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    stop: tuple[str, ...] | None = None
    seed: int | None = None
    response_format: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] | None = None

    def merged(self, override: GenerationParams | None) -> GenerationParams:
        """Return these parameters with every field set in ``override`` replacing ours."""
        if override is None:
            return self
        changes = {f.name: getattr(override, f.name) for f in fields(override) if getattr(override, f.name) is not None}
        if "extra" in changes and self.extra:
            changes["extra"] = {**self.extra, **changes["extra"]}
        return replace(self, **changes) if changes else self

    def as_dict(self) -> dict[str, Any]:
        """The fields that are set, for hashing and for the store (never holds secrets)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> GenerationParams:
        """Build from a plain mapping; unknown keys go to ``extra``.

        >>> GenerationParams.from_mapping({"temperature": 0, "logprobs": True}).extra
        {'logprobs': True}
        """
        if not values:
            return cls()
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in values.items():
            if key in known and key != "extra":
                kwargs[key] = value
            elif key == "extra" and isinstance(value, Mapping):
                extra.update(value)
            else:
                extra[key] = value
        stop = kwargs.get("stop")
        if isinstance(stop, str):
            kwargs["stop"] = (stop,)
        elif stop is not None:
            kwargs["stop"] = tuple(stop)
        if extra:
            kwargs["extra"] = extra
        return cls(**kwargs)


@dataclass(frozen=True)
class BatchRequest:
    """One request of a batch job, as in the nagents job API.

    >>> BatchRequest(id="req-1", messages=[{"role": "user", "content": "Summarize: ..."}]).id
    'req-1'
    """

    id: str
    messages: Sequence[Message]
    params: GenerationParams | None = None
    metadata: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class BatchResult:
    """The final result of one request: ``response`` when it succeeded, ``error`` when it did not.

    >>> BatchResult(id="req-1", response="ok").ok
    True
    """

    id: str
    response: str | None = None
    error: str | None = None
    error_type: str | None = None
    status_code: int | None = None
    usage: Usage | None = None
    attempts: int = 0
    latency_s: float | None = None
    finish_reason: str | None = None
    row_index: int | None = None

    @property
    def ok(self) -> bool:
        """True when the request has an answer and no error."""
        return self.error is None and self.response is not None


@dataclass(frozen=True)
class BatchJob:
    """A job as the manager and the store know it.

    ``succeeded + failed`` is how many requests have a final result; ``total`` how many were submitted.
    """

    id: str
    status: BatchStatus = BatchStatus.PENDING
    total: int = 0
    succeeded: int = 0
    failed: int = 0
    name: str | None = None
    provider: str | None = None
    model: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    usage: Usage = field(default_factory=Usage)
    mode: str = "realtime"

    @property
    def done(self) -> int:
        """Requests with a final result (answered or failed)."""
        return self.succeeded + self.failed

    @property
    def pending(self) -> int:
        """Requests still without a final result."""
        return max(self.total - self.done, 0)

    def _repr_html_(self) -> str:
        # Notebook display lives in display.py, imported only when a notebook asks for it.
        from nagents_frames.display import job_html

        return job_html(self)
