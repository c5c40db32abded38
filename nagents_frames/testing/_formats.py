"""Imports every route module of the fake server so that each registers its API format.

A route module defines ``def install(server: FakeLLMServer, app: web.Application) -> None`` and calls
``FakeLLMServer.register(install)`` at import time.
"""

from __future__ import annotations

import nagents_frames.testing._anthropic  # noqa: F401, RUF100  (Anthropic Messages API)
import nagents_frames.testing._anthropic_batch  # noqa: F401, RUF100  (Anthropic Message Batches)
import nagents_frames.testing._azure  # noqa: F401, RUF100  (Azure OpenAI chat completions)
import nagents_frames.testing._gemini  # noqa: F401, RUF100  (Gemini generateContent)
import nagents_frames.testing._openai_batch  # noqa: F401, RUF100  (OpenAI Batch: /files, /batches)
