"""nagents_frames: run large batches of LLM requests over dataframes.

Tables in, tables out::

    >>> import polars as pl
    >>> from nagents_frames import Provider, ProviderType, batch_complete
    >>> p = Provider(provider_type=ProviderType.OPENAI_COMPATIBLE, model="gpt-4o-mini")
    >>> # pl.DataFrame({"text": [...]}).pipe(batch_complete, provider=p, prompt="Summarize: {text}")

Jobs that last (the nagents job API)::

    >>> from nagents_frames import BatchManager, BatchRequest, BatchStore  # doctest: +SKIP
"""

from __future__ import annotations

from nagents_frames import errors
from nagents_frames.errors import (
    AuthenticationError,
    ConfigurationError,
    JobFailedError,
    JobNotFinishedError,
    NagentsFramesError,
    RateLimitError,
    RequestError,
)
from nagents_frames.executor import Executor, RetryPolicy, RunReport, Timeouts
from nagents_frames.frames import abatch_complete, batch_complete
from nagents_frames.providers import Provider
from nagents_frames.ratelimit import RateLimiter
from nagents_frames.types import (
    BatchJob,
    BatchRequest,
    BatchResult,
    BatchStatus,
    GenerationParams,
    ProviderType,
    Usage,
)

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "BatchJob",
    "BatchRequest",
    "BatchResult",
    "BatchStatus",
    "ConfigurationError",
    "Executor",
    "GenerationParams",
    "JobFailedError",
    "JobNotFinishedError",
    "NagentsFramesError",
    "Provider",
    "ProviderType",
    "RateLimitError",
    "RateLimiter",
    "RequestError",
    "RetryPolicy",
    "RunReport",
    "Timeouts",
    "Usage",
    "__version__",
    "abatch_complete",
    "batch_complete",
    "errors",
]
