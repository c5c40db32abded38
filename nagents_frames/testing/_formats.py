"""Imports every route module of the fake server so that each registers its API format.

A route module defines ``def install(server: FakeLLMServer, app: web.Application) -> None`` and calls
``FakeLLMServer.register(install)`` at import time.
"""

from __future__ import annotations
