"""Test helpers: a fake LLM server speaking the providers' formats, with fault injection.

Use it in your own tests instead of mocking functions: it listens on 127.0.0.1 on a free port and
answers ``"echo: <last user message>"`` unless told to misbehave::

    >>> from nagents_frames import Provider, batch_complete
    >>> from nagents_frames.testing import FakeLLMServer
    >>> import polars as pl
    >>> with FakeLLMServer(error_on_content={"boom": 500}) as server:
    ...     p = Provider(provider_type="openai_compatible", model="echo", base_url=server.base_url)
    ...     out = batch_complete(pl.DataFrame({"prompt": ["hi", "boom"]}), provider=p, progress=False,
    ...                          retry=None)
    >>> out["response"].to_list()[0]
    'echo: hi'

Run it as a process: ``python -m nagents_frames.testing --port 8000 --latency 0.2``, or from Python with
``with server_process(latency=0.2) as base_url: ...``.
"""

from __future__ import annotations

from nagents_frames.testing._openai_batch import batch_stats, configure_batches
from nagents_frames.testing._process import server_process
from nagents_frames.testing._server import FakeLLMServer, ServerBehavior, ServerStats, answer_for

__all__ = ["FakeLLMServer", "ServerBehavior", "ServerStats", "answer_for", "batch_stats", "configure_batches", "server_process"]
