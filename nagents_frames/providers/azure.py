"""Azure OpenAI chat completions: the OpenAI body and answer, Azure's URLs, key header and errors.

Two documented URL styles, chosen from ``base_url``:

- **deployment style** (``base_url`` is the resource endpoint, ``https://RESOURCE.openai.azure.com``):
  ``POST {base_url}/openai/deployments/{deployment}/chat/completions?api-version={api_version}``.
  ``deployment`` is ``Provider.options["deployment"]``, else the model name; ``api_version`` is
  ``Provider.api_version``, else :data:`DEFAULT_API_VERSION`. The body is the OpenAI body without
  ``model`` (the deployment names the model).
- **v1 style** (``base_url`` ends in ``/openai/v1``): ``POST {base_url}/chat/completions`` with the model
  (the deployment name) in the body, like OpenAI; no ``api-version`` unless ``Provider.api_version`` is set.

Both send the key in the ``api-key`` header. Answers and errors are parsed as OpenAI's; in addition a
prompt rejected by Azure's content filter (HTTP 400 with the error code ``content_filter``) is a
:class:`~nagents_frames.errors.ContentFilteredError`, not a bad request.

>>> from nagents_frames import Provider
>>> from nagents_frames.types import GenerationParams
>>> p = Provider(provider_type="azure_openai", model="gpt-4o-mini", api_key="k",
...              base_url="https://res.openai.azure.com")
>>> ADAPTER.build_request(p, [{"role": "user", "content": "hi"}], GenerationParams()).url
'https://res.openai.azure.com/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21'
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING
from urllib.parse import quote, urlencode

from nagents_frames.errors import ContentFilteredError, RequestError
from nagents_frames.providers._base import Completion, HTTPRequest, decode_json, status_error
from nagents_frames.providers.openai import build_body, parse_chat_completion
from nagents_frames.types import GenerationParams, Message

if TYPE_CHECKING:
    from nagents_frames.providers import Provider

__all__ = ["ADAPTER", "DEFAULT_API_VERSION", "AzureOpenAIAdapter", "azure_error", "is_v1_base_url"]

DEFAULT_API_VERSION = "2024-10-21"
"""The ``api-version`` of deployment-style URLs unless ``Provider.api_version`` is set (the GA inference API)."""


def is_v1_base_url(base_url: str) -> bool:
    """Whether ``base_url`` is of the v1 style (``.../openai/v1``).

    >>> is_v1_base_url("https://res.openai.azure.com/openai/v1"), is_v1_base_url("https://res.openai.azure.com")
    (True, False)
    """
    return base_url.rstrip("/").endswith("/openai/v1")


def azure_error(status: int, headers: Mapping[str, str], body: bytes) -> RequestError:
    """The typed error of an Azure OpenAI error response (OpenAI's shape, plus the content-filter code)."""
    error = status_error(status, headers, body)
    if status == 400:
        try:
            payload = json.loads(body) if body else None
        except (ValueError, UnicodeDecodeError):
            payload = None
        err = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(err, dict) and err.get("code") == "content_filter":
            return ContentFilteredError(f"Azure's content filter rejected the prompt: {error.message}", status_code=400)
    return error


class AzureOpenAIAdapter:
    """Azure OpenAI chat completions (deployment-style or v1 URLs)."""

    def build_request(
        self, provider: Provider, messages: Sequence[Message], params: GenerationParams
    ) -> HTTPRequest:
        """``POST`` to the deployment's (or the v1) chat-completions URL with the ``api-key`` header."""
        headers = {"Content-Type": "application/json"}
        if provider.api_key:
            headers["api-key"] = provider.api_key
        if provider.extra_headers:
            headers.update(provider.extra_headers)
        base = str(provider.base_url)
        options = provider.options or {}
        deployment = str(options.get("deployment") or provider.model)
        body = build_body(deployment, messages, params)
        if is_v1_base_url(base):
            url = f"{base}/chat/completions"
            if provider.api_version:
                url += "?" + urlencode({"api-version": provider.api_version})
        else:
            body.pop("model", None)
            query = urlencode({"api-version": provider.api_version or DEFAULT_API_VERSION})
            url = f"{base}/openai/deployments/{quote(deployment, safe='-._~')}/chat/completions?{query}"
        return HTTPRequest("POST", url, headers, json.dumps(body, ensure_ascii=False).encode())

    def parse_response(self, status: int, headers: Mapping[str, str], body: bytes) -> Completion:
        """Parse a chat-completions response or raise the typed error for it."""
        if status >= 400:
            raise azure_error(status, headers, body)
        return parse_chat_completion(decode_json(body))


ADAPTER = AzureOpenAIAdapter()
