"""Providers: which API to call, with which model, key and defaults.

``Provider`` has the constructor of the nagents library::

    >>> from nagents_frames import Provider, ProviderType
    >>> p = Provider(provider_type=ProviderType.OPENAI_COMPATIBLE, model="m", base_url="http://127.0.0.1:8000/v1")
    >>> p.chat_url
    'http://127.0.0.1:8000/v1/chat/completions'

Each :class:`~nagents_frames.ProviderType` has an adapter module in this package (``openai``,
``anthropic``, ``gemini``, ``azure``, ``local``) exposing ``ADAPTER``: pure request builders and response
parsers, loaded on first use.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from nagents_frames.errors import ConfigurationError
from nagents_frames.providers._base import Adapter, Completion, HTTPRequest, RawResponse
from nagents_frames.types import GenerationParams, ProviderType

__all__ = ["Adapter", "Completion", "HTTPRequest", "Provider", "RawResponse", "get_adapter"]

_DEFAULT_BASE_URLS: dict[ProviderType, str] = {
    ProviderType.OPENAI: "https://api.openai.com/v1",
    ProviderType.OPENAI_COMPATIBLE: "https://api.openai.com/v1",
    ProviderType.ANTHROPIC: "https://api.anthropic.com/v1",
    ProviderType.GEMINI_NATIVE: "https://generativelanguage.googleapis.com/v1beta",
}

_KEY_ENV: dict[ProviderType, tuple[str, ...]] = {
    ProviderType.OPENAI: ("OPENAI_API_KEY",),
    ProviderType.OPENAI_COMPATIBLE: ("OPENAI_API_KEY",),
    ProviderType.AZURE_OPENAI: ("AZURE_OPENAI_API_KEY",),
    ProviderType.ANTHROPIC: ("ANTHROPIC_API_KEY",),
    ProviderType.GEMINI_NATIVE: ("GEMINI_API_KEY", "GOOGLE_API_KEY"),
}

_ADAPTER_MODULES: dict[ProviderType, str] = {
    ProviderType.OPENAI: "openai",
    ProviderType.OPENAI_COMPATIBLE: "openai",
    ProviderType.AZURE_OPENAI: "azure",
    ProviderType.ANTHROPIC: "anthropic",
    ProviderType.GEMINI_NATIVE: "gemini",
    ProviderType.LOCAL: "local",
}


@dataclass(frozen=True)
class Provider:
    """An LLM endpoint: API type, model, key, base URL and default generation parameters.

    ``api_key`` may be omitted: it is then read from the environment (``OPENAI_API_KEY``,
    ``ANTHROPIC_API_KEY``, ``GEMINI_API_KEY``/``GOOGLE_API_KEY``, ``AZURE_OPENAI_API_KEY``), and may be absent
    altogether for local servers (vLLM, Ollama, llama.cpp) that need none. The key never appears in
    ``repr``, in the store, in Parquet output or in error messages.

    >>> p = Provider(provider_type="openai_compatible", model="gpt-4o-mini", api_key="sk-x", temperature=0)
    >>> "sk-x" in repr(p)
    False
    """

    provider_type: ProviderType | str
    model: str
    api_key: str | None = field(default=None, repr=False)
    base_url: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    stop: Sequence[str] | str | None = None
    seed: int | None = None
    api_version: str | None = None
    extra_headers: Mapping[str, str] | None = field(default=None, repr=False)
    extra_body: Mapping[str, Any] | None = None
    options: Mapping[str, Any] | None = None
    """Adapter-specific settings (e.g. the local runtime's ``n_ctx`` or ``mode``)."""

    def __post_init__(self) -> None:
        try:
            ptype = ProviderType(self.provider_type)
        except ValueError:
            known = ", ".join(t.value for t in ProviderType)
            raise ConfigurationError(f"unknown provider_type {self.provider_type!r}; known: {known}") from None
        object.__setattr__(self, "provider_type", ptype)
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigurationError("Provider needs a non-empty model name")
        if self.api_key is None:
            for name in _KEY_ENV.get(ptype, ()):
                if os.environ.get(name):
                    object.__setattr__(self, "api_key", os.environ[name])
                    break
        base = self.base_url or _DEFAULT_BASE_URLS.get(ptype)
        if ptype not in (ProviderType.LOCAL,) and not base:
            raise ConfigurationError(f"Provider of type {ptype.value} needs a base_url")
        object.__setattr__(self, "base_url", base.rstrip("/") if base else None)
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ConfigurationError(f"max_tokens must be positive, got {self.max_tokens}")

    @property
    def type(self) -> ProviderType:
        """The provider type as an enum."""
        return ProviderType(self.provider_type)

    @property
    def chat_url(self) -> str:
        """``{base_url}/chat/completions`` (OpenAI-compatible servers)."""
        return f"{self.base_url}/chat/completions"

    @property
    def params(self) -> GenerationParams:
        """The provider's default generation parameters."""
        stop = (self.stop,) if isinstance(self.stop, str) else (tuple(self.stop) if self.stop else None)
        return GenerationParams(
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            top_p=self.top_p,
            stop=stop,
            seed=self.seed,
            extra=dict(self.extra_body) if self.extra_body else None,
        )

    @property
    def adapter(self) -> Adapter:
        """The adapter for this provider type."""
        return get_adapter(self.type)

    def with_options(self, **changes: Any) -> Provider:
        """A copy with some fields changed.

        >>> Provider(provider_type="openai", model="a").with_options(model="b").model
        'b'
        """
        return replace(self, **changes)

    def redact(self, text: str) -> str:
        """``text`` with the API key (if any) replaced by ``***``."""
        if self.api_key and self.api_key in text:
            return text.replace(self.api_key, "***")
        return text

    def describe(self) -> dict[str, Any]:
        """What may be stored about this provider: everything but secrets."""
        out: dict[str, Any] = {"provider_type": self.type.value, "model": self.model, "base_url": self.base_url}
        out.update(self.params.as_dict())
        if self.api_version:
            out["api_version"] = self.api_version
        return out


def get_adapter(provider_type: ProviderType | str) -> Adapter:
    """The adapter of a provider type (its module is imported on first use)."""
    ptype = ProviderType(provider_type)
    module_name = _ADAPTER_MODULES[ptype]
    try:
        module = importlib.import_module(f"nagents_frames.providers.{module_name}")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("nagents_frames"):
            raise ConfigurationError(f"provider type {ptype.value} is not available in this build") from exc
        raise
    adapter: Adapter = module.ADAPTER
    return adapter
