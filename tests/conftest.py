"""Shared fixtures: a fake LLM server over real HTTP on 127.0.0.1, providers, and frame builders."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pytest

from nagents_frames import Provider
from nagents_frames.testing import FakeLLMServer

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

FRAME_KINDS = ("polars", "pandas", "pyarrow")


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    """A fake OpenAI-compatible server in its own thread (works for sync and async code under test)."""
    with FakeLLMServer() as srv:
        yield srv


@pytest.fixture
def provider(server: FakeLLMServer) -> Provider:
    """An OpenAI-compatible provider pointed at the fake server."""
    return Provider(provider_type="openai_compatible", model="echo", base_url=server.base_url)


def make_frame(kind: str, columns: dict[str, list[Any]]) -> Any:
    """A frame of the given kind from Python columns."""
    table = pa.table(columns)
    if kind == "pyarrow":
        return table
    if kind == "polars":
        import polars as pl

        return pl.from_arrow(table)
    if kind == "pandas":
        return table.to_pandas()
    raise ValueError(kind)


def frame_to_pydict(frame: Any) -> dict[str, list[Any]]:
    """Columns of any supported frame as Python lists (missing values as None)."""
    if isinstance(frame, pa.Table):
        return frame.to_pydict()
    module = type(frame).__module__.split(".")[0]
    if module == "polars":
        return frame.to_dict(as_series=False)
    if module == "pandas":
        import pandas as pd

        return {str(c): [None if _isna(pd, v) else v for v in frame[c].tolist()] for c in frame.columns}
    raise TypeError(type(frame))


def _isna(pd: Any, v: Any) -> bool:
    if isinstance(v, (list, tuple, dict, str, bytes)):
        return False
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


@pytest.fixture(params=FRAME_KINDS)
def frame_kind(request: pytest.FixtureRequest) -> str:
    """Each frame test runs over polars, pandas and pyarrow."""
    return str(request.param)


@pytest.fixture
def frame_factory(frame_kind: str) -> Callable[[dict[str, list[Any]]], Any]:
    """Build a frame of the current kind."""
    return lambda columns: make_frame(frame_kind, columns)
