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
from nagents_frames.cost import Estimate, Price, cost_of, estimate, price_for, set_price
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
from nagents_frames.manager import BatchManager
from nagents_frames.providers import Provider
from nagents_frames.ratelimit import RateLimiter
from nagents_frames.report import JobReport, write_report
from nagents_frames.store import BatchStore
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
    "BatchManager",
    "BatchRequest",
    "BatchResult",
    "BatchStatus",
    "BatchStore",
    "ConfigurationError",
    "Estimate",
    "Executor",
    "GenerationParams",
    "JobFailedError",
    "JobReport",
    "JobNotFinishedError",
    "NagentsFramesError",
    "Price",
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
    "cost_of",
    "estimate",
    "errors",
    "price_for",
    "set_price",
    "write_report",
]
