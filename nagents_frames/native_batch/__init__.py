"""The providers' own batch APIs (OpenAI Batch, Anthropic Message Batches) behind the same job API.

Half the price of real-time calls, answers within 24 hours. :class:`NativeBatchRunner` splits a job's
requests to the provider's limits (OpenAI 50,000 requests / 200 MB per batch, Anthropic 100,000 /
256 MB), streams each part from a temp file, keeps every provider batch id in a :class:`BatchLedger`
(the DuckDB store) so that a restart polls the same batches, polls with backoff, and streams the result
files back as ``(requests, outcomes)`` chunks — the same chunks the real-time executor yields, written
to the same result rows.

The translation of each API is pure (:mod:`.openai`, :mod:`.anthropic`); the network is touched only by
:mod:`._http`. The batch discount is priced by :mod:`nagents_frames.cost` for jobs whose mode is ``native``.

Example::

    >>> import asyncio
    >>> from nagents_frames import Provider
    >>> from nagents_frames.executor import PreparedRequest
    >>> from nagents_frames.testing import FakeLLMServer
    >>> async def main():
    ...     async with FakeLLMServer() as server:
    ...         p = Provider(provider_type="openai", model="echo", api_key="k", base_url=server.base_url)
    ...         reqs = [PreparedRequest(i, str(i), "", ({"role": "user", "content": f"q{i}"},)) for i in range(3)]
    ...         async with NativeBatchRunner(p, poll_interval=0.01) as runner:
    ...             return sorted(o.response for _, outs in [c async for c in runner.run("job-1", reqs)] for o in outs)
    >>> asyncio.run(main())
    ['echo: q0', 'echo: q1', 'echo: q2']
"""

from __future__ import annotations

from nagents_frames.native_batch._base import (
    BatchInfo,
    BatchLedger,
    BatchLimits,
    MemoryLedger,
    NativeBatchRecord,
    NativeFormat,
    NativeState,
    RecordPhase,
    RowResult,
    RowState,
    custom_id_for,
    index_of_custom_id,
)
from nagents_frames.native_batch._runner import CANCEL_REQUESTED, NativeBatchRunner, format_for, job_status

__all__ = [
    "CANCEL_REQUESTED",
    "BatchInfo",
    "BatchLedger",
    "BatchLimits",
    "MemoryLedger",
    "NativeBatchRecord",
    "NativeBatchRunner",
    "NativeFormat",
    "NativeState",
    "RecordPhase",
    "RowResult",
    "RowState",
    "custom_id_for",
    "format_for",
    "index_of_custom_id",
    "job_status",
]
