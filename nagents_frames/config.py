"""Settings of a ``nagents-frames`` pipeline step, from a TOML file and from command-line flags.

A config file makes a step repeatable: commit it next to the pipeline, pass ``--config step.toml``, and
override single values with flags (flags win over the file, the file wins over defaults). Keys may sit at
the top level or under ``[run]``; paths in the file (``store``, ``api_key_file``, ``response_format``) are
relative to the file. API keys never go in the file: use the environment or ``api_key_file``.

Example file::

    provider = "openai"
    model = "gpt-4o-mini"
    store = "jobs.duckdb"

    [run]
    prompt = "Classify the sentiment of: {review}"
    system = "Answer with one word."
    concurrency = 32
    rpm = 500
    max_tokens = 16
    examples = [["I loved it", "positive"], ["Awful.", "negative"]]
    param_columns = { temperature = "temp" }

Example::

    >>> cfg = RunConfig.from_sources({"model": "m", "concurrency": 8}, {"concurrency": 4})
    >>> cfg.model, cfg.concurrency
    ('m', 4)
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from nagents_frames.errors import ConfigurationError

__all__ = ["PATH_KEYS", "RunConfig", "load_config"]

PATH_KEYS = frozenset({"store", "api_key_file", "response_format"})
"""Keys whose string values are paths (made relative to the config file's directory)."""

_FORBIDDEN = {"api_key", "key", "openai_api_key", "anthropic_api_key", "gemini_api_key", "token"}


@dataclass(frozen=True)
class RunConfig:
    """Every setting of ``nagents-frames run`` (and the ``store`` of the other subcommands).

    ``None`` means "not set": the library default applies.

    >>> RunConfig(model="m").with_overrides({"rpm": 60}).rpm
    60.0
    """

    provider: str = "openai"
    model: str | None = None
    base_url: str | None = None
    api_key_file: str | None = None
    prompt: str | None = None
    prompt_column: str | None = None
    system: str | None = None
    examples: tuple[tuple[str, str], ...] | None = None
    param_columns: Mapping[str, str] | None = None
    id_column: str | None = None
    response_column: str = "response"
    error_column: str = "error"
    usage: bool = False
    concurrency: int = 64
    rpm: float | None = None
    tpm: float | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    max_attempts: int | None = None
    request_timeout: float | None = None
    deadline: float | None = None
    chunk_size: int = 1000
    batch_rows: int | None = None
    """Rows per input batch; ``None``: about 4 MiB a batch (from the Parquet footers), at most 8192 rows."""
    store: str | None = None
    job_name: str | None = None
    response_format: str | Mapping[str, Any] | None = None
    expand: bool = False
    fail_on_errors: float | None = None
    input_format: str | None = None
    compression: str = "zstd"
    json: bool = False
    progress_interval: float = 1.0

    @classmethod
    def from_sources(cls, file_values: Mapping[str, Any] | None, flag_values: Mapping[str, Any] | None) -> RunConfig:
        """Defaults, then the config file's values, then flags (``None`` flags are "not given")."""
        return cls().with_overrides(file_values or {}).with_overrides(flag_values or {})

    def with_overrides(self, values: Mapping[str, Any]) -> RunConfig:
        """A copy with the given (non-None) values, checked and normalised."""
        known = {f.name: f for f in fields(self)}
        changes: dict[str, Any] = {}
        for key, value in values.items():
            if value is None:
                continue
            if key not in known:
                raise ConfigurationError(f"unknown setting {key!r}; known: {', '.join(sorted(known))}")
            changes[key] = _check(key, value)
        return replace(self, **changes) if changes else self


def _check(key: str, value: Any) -> Any:
    """One value, checked against the type its key needs."""
    ints = {"concurrency", "max_tokens", "seed", "max_attempts", "chunk_size", "batch_rows"}
    floats = {"rpm", "tpm", "temperature", "top_p", "request_timeout", "deadline", "progress_interval"}
    bools = {"usage", "expand", "json"}
    if key in ints:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigurationError(f"setting {key!r} must be an integer, got {value!r}")
        if key != "seed" and value < 1:
            raise ConfigurationError(f"setting {key!r} must be positive, got {value}")
        return value
    if key in floats:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigurationError(f"setting {key!r} must be a number, got {value!r}")
        if key not in ("temperature",) and value <= 0:
            raise ConfigurationError(f"setting {key!r} must be positive, got {value}")
        return float(value)
    if key in bools:
        if not isinstance(value, bool):
            raise ConfigurationError(f"setting {key!r} must be true or false, got {value!r}")
        return value
    if key == "fail_on_errors":
        # true: any error row fails the step; a number in [0, 1): fail above that share of error rows
        if value is True:
            return 0.0
        if value is False:
            return None
        if isinstance(value, (int, float)) and 0 <= value < 1:
            return float(value)
        raise ConfigurationError(f"setting 'fail_on_errors' must be true/false or a fraction in [0, 1), got {value!r}")
    if key == "examples":
        if not isinstance(value, (list, tuple)):
            raise ConfigurationError("setting 'examples' must be a list of [question, answer] pairs")
        pairs = []
        for item in value:
            if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, str) for x in item)):
                raise ConfigurationError(f"each example must be a [question, answer] pair of strings, got {item!r}")
            pairs.append((item[0], item[1]))
        return tuple(pairs)
    if key == "param_columns":
        if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise ConfigurationError("setting 'param_columns' must map parameter names to column names")
        return dict(value)
    if key == "stop":
        if isinstance(value, str):
            return (value,)
        if isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value):
            return tuple(value)
        raise ConfigurationError("setting 'stop' must be a string or a list of strings")
    if key == "response_format":
        if isinstance(value, (str, Mapping)):
            return value
        raise ConfigurationError("setting 'response_format' must be a path to a JSON schema or an inline table")
    if not isinstance(value, str):
        raise ConfigurationError(f"setting {key!r} must be a string, got {value!r}")
    return value


def load_config(path: str | Path, *, section: str = "run") -> dict[str, Any]:
    """Read a TOML config file: top-level keys, then those of ``[section]`` on top.

    Relative paths are resolved against the file's directory. A key that looks like a secret is refused.

    >>> load_config("/nonexistent.toml")
    Traceback (most recent call last):
    ...
    nagents_frames.errors.ConfigurationError: config file '/nonexistent.toml' does not exist
    """
    file = Path(path)
    try:
        with open(file, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigurationError(f"config file {str(file)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"config file {str(file)!r} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigurationError(f"cannot read config file {str(file)!r}: {exc.strerror}") from None
    values: dict[str, Any] = {k: v for k, v in data.items() if k != section}
    nested = data.get(section)
    if isinstance(nested, dict):
        values.update(nested)
    for key in values:
        if key.lower() in _FORBIDDEN or key.lower().endswith("_api_key"):
            raise ConfigurationError(
                f"config file {str(file)!r} holds {key!r}: API keys are read only from the environment "
                "(OPENAI_API_KEY, ANTHROPIC_API_KEY, GEMINI_API_KEY ...) or from api_key_file"
            )
    base = file.resolve().parent
    for key in PATH_KEYS:
        value = values.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            values[key] = str(base / value)
    # validate eagerly so a typo fails before any request (and names the file)
    try:
        RunConfig().with_overrides(values)
    except ConfigurationError as exc:
        raise ConfigurationError(f"config file {str(file)!r}: {exc}") from None
    return values
