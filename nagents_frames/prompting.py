"""Prompts from table columns: templates, chat-message columns, system prompts, few-shot examples,
per-row parameters, and the request key (a content hash) that identifies what is sent.

Everything that can be checked against the table's columns is checked in :func:`compile_prompt`,
before any request leaves; what can only be seen row by row (a null, an empty prompt, one over the
size limit) becomes that row's :class:`~nagents_frames.errors.PromptError`.

Example::

    >>> plan = compile_prompt(["text", "lang"], prompt="Translate to {lang}: {text}")
    >>> reqs = plan.prepare({"text": ["hi"], "lang": ["fr"]}, start=0, model="m")
    >>> reqs[0].messages
    ({'role': 'user', 'content': 'Translate to fr: hi'},)
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nagents_frames.errors import ColumnNotFoundError, PromptError, TemplateError
from nagents_frames.executor import PreparedRequest
from nagents_frames.types import GenerationParams, Message

__all__ = ["DEFAULT_MAX_PROMPT_CHARS", "PromptPlan", "compile_prompt", "request_key"]

DEFAULT_MAX_PROMPT_CHARS = 1_000_000
"""Rows whose messages hold more characters than this get a PromptError instead of being sent."""

_VALID_ROLES = frozenset({"system", "user", "assistant", "developer", "tool"})


def request_key(model: str, messages: Sequence[Message], params: GenerationParams | Mapping[str, Any] | None) -> str:
    """A stable content hash of what a request sends: same model, messages and parameters, same key.

    >>> request_key("m", [{"role": "user", "content": "hi"}], None) == request_key("m", [{"role": "user", "content": "hi"}], {})
    True
    """
    if isinstance(params, GenerationParams):
        params = params.as_dict()
    payload = json.dumps([model, [dict(m) for m in messages], params or {}], sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.blake2b(payload.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def _columns_message(name: str, columns: Sequence[str]) -> str:
    shown = ", ".join(repr(c) for c in list(columns)[:50])
    more = f" (+{len(columns) - 50} more)" if len(columns) > 50 else ""
    return f"{name}; available columns: {shown}{more}"


@dataclass(frozen=True)
class _Piece:
    literal: str
    column: str | None
    spec: str
    conversion: str | None


def _parse_template(template: str, columns: Sequence[str]) -> tuple[_Piece, ...]:
    if not isinstance(template, str):
        raise TemplateError(f"prompt template must be a string, got {type(template).__name__}")
    if not template.strip():
        raise TemplateError("prompt template is empty")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise TemplateError(f"malformed prompt template {template!r}: {exc} (write '{{{{' for a literal brace)") from exc
    pieces = []
    available = set(columns)
    for literal, name, spec, conversion in parsed:
        if name is None:
            pieces.append(_Piece(literal, None, "", None))
            continue
        if name == "" or name.isdigit():
            raise TemplateError(
                _columns_message(f"prompt template {template!r} has a positional field {{{name}}}; name a column", columns)
            )
        if name not in available:
            raise ColumnNotFoundError(_columns_message(f"prompt template names column {name!r}, which the table lacks", columns))
        pieces.append(_Piece(literal, name, spec or "", conversion))
    return tuple(pieces)


@dataclass(frozen=True)
class PromptPlan:
    """How to turn the rows of a table into requests; made by :func:`compile_prompt`."""

    columns: tuple[str, ...]
    """The input columns the plan reads."""
    template: tuple[_Piece, ...] | None = None
    prompt_column: str | None = None
    messages_column: bool = False
    system: str | None = None
    examples: tuple[tuple[str, str], ...] = ()
    param_columns: Mapping[str, str] = field(default_factory=dict)
    id_column: str | None = None
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS

    def prepare(
        self,
        values: Mapping[str, Sequence[Any]],
        *,
        start: int,
        model: str,
        params: GenerationParams | None = None,
    ) -> list[PreparedRequest]:
        """Requests for one chunk. ``values`` maps each of :attr:`columns` to that chunk's Python values."""
        n = len(values[self.columns[0]]) if self.columns else 0
        base = params or GenerationParams()
        prefix: list[Message] = []
        if self.system:
            prefix.append({"role": "system", "content": self.system})
        for question, answer in self.examples:
            prefix.append({"role": "user", "content": question})
            prefix.append({"role": "assistant", "content": answer})
        base_dict = base.as_dict()
        out: list[PreparedRequest] = []
        ids = values[self.id_column] if self.id_column else None
        for i in range(n):
            index = start + i
            request_id = str(ids[i]) if ids is not None and ids[i] is not None else str(index)
            try:
                messages = self._messages(values, i, prefix)
                row_params = self._row_params(values, i)
            except PromptError as err:
                out.append(PreparedRequest(index, request_id, "", None, None, err))
                continue
            effective = base_dict if row_params is None else base.merged(row_params).as_dict()
            key = request_key(model, messages, effective)
            out.append(PreparedRequest(index, request_id, key, messages, row_params))
        return out

    def _messages(self, values: Mapping[str, Sequence[Any]], i: int, prefix: list[Message]) -> tuple[Message, ...]:
        if self.template is not None:
            parts = []
            for piece in self.template:
                parts.append(piece.literal)
                if piece.column is None:
                    continue
                value = values[piece.column][i]
                if value is None or (isinstance(value, float) and value != value):
                    raise PromptError(f"column {piece.column!r} is null in this row")
                if piece.conversion == "r":
                    value = repr(value)
                elif piece.conversion == "a":
                    value = ascii(value)
                elif piece.conversion == "s":
                    value = str(value)
                try:
                    parts.append(format(value, piece.spec))
                except (ValueError, TypeError) as exc:
                    raise PromptError(f"cannot format column {piece.column!r} with {piece.spec!r}: {exc}") from exc
            text = "".join(parts)
            return (*prefix, self._checked({"role": "user", "content": text}))
        assert self.prompt_column is not None
        value = values[self.prompt_column][i]
        if value is None or (isinstance(value, float) and value != value):
            raise PromptError(f"prompt column {self.prompt_column!r} is null in this row")
        if isinstance(value, str):
            return (*prefix, self._checked({"role": "user", "content": value}))
        if isinstance(value, bytes):
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PromptError(f"prompt in column {self.prompt_column!r} is not valid UTF-8") from exc
            return (*prefix, self._checked({"role": "user", "content": text}))
        if isinstance(value, Sequence) or hasattr(value, "tolist"):
            items = value.tolist() if hasattr(value, "tolist") else list(value)
            if not items:
                raise PromptError(f"messages in column {self.prompt_column!r} are empty in this row")
            messages = []
            for m in items:
                if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or m.get("role") not in _VALID_ROLES:
                    raise PromptError(
                        f"column {self.prompt_column!r} holds a message without a valid role "
                        f"(one of {sorted(_VALID_ROLES)}): {m!r:.80}"
                    )
                messages.append({"role": m["role"], "content": m.get("content")})
            total = sum(len(str(m["content"] or "")) for m in messages)
            if total > self.max_prompt_chars:
                raise PromptError(f"messages hold {total} characters, over the limit of {self.max_prompt_chars}")
            return (*prefix, *messages)
        raise PromptError(f"prompt column {self.prompt_column!r} holds a {type(value).__name__}, not text or messages")

    def _checked(self, message: dict[str, Any]) -> Message:
        text = message["content"]
        if not text.strip():
            raise PromptError("the prompt is empty in this row")
        if len(text) > self.max_prompt_chars:
            raise PromptError(f"the prompt has {len(text)} characters, over the limit of {self.max_prompt_chars}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PromptError(f"the prompt is not valid Unicode text: {exc.reason}") from exc
        return message

    def _row_params(self, values: Mapping[str, Sequence[Any]], i: int) -> GenerationParams | None:
        if not self.param_columns:
            return None
        row = {}
        for param, column in self.param_columns.items():
            value = values[column][i]
            if value is not None and not (isinstance(value, float) and value != value):
                row[param] = value
        return GenerationParams.from_mapping(row) if row else None


def compile_prompt(
    columns: Sequence[str],
    *,
    prompt: str | None = None,
    prompt_column: str = "prompt",
    system: str | None = None,
    examples: Sequence[tuple[str, str]] | None = None,
    param_columns: Mapping[str, str] | None = None,
    id_column: str | None = None,
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS,
) -> PromptPlan:
    """Check a prompt specification against the table's column names and return the plan.

    Raises :class:`TemplateError` / :class:`ColumnNotFoundError` (naming the available columns) for
    anything that would fail every row.
    """
    columns = list(columns)
    available = set(columns)
    if system is not None and not isinstance(system, str):
        raise TemplateError(f"system must be a string, got {type(system).__name__}")
    if max_prompt_chars <= 0:
        raise TemplateError(f"max_prompt_chars must be positive, got {max_prompt_chars}")
    shots: list[tuple[str, str]] = []
    for example in examples or ():
        if not (isinstance(example, Sequence) and len(example) == 2 and all(isinstance(x, str) for x in example)):
            raise TemplateError(f"each few-shot example must be a (question, answer) pair of strings, got {example!r}")
        shots.append((example[0], example[1]))
    params = dict(param_columns or {})
    for param, column in params.items():
        if column not in available:
            raise ColumnNotFoundError(_columns_message(f"parameter {param!r} reads column {column!r}, which the table lacks", columns))
    if id_column is not None and id_column not in available:
        raise ColumnNotFoundError(_columns_message(f"id column {id_column!r} is not in the table", columns))
    if prompt is not None:
        pieces = _parse_template(prompt, columns)
        used = tuple(dict.fromkeys(p.column for p in pieces if p.column is not None))
        read = tuple(dict.fromkeys((*used, *params.values(), *((id_column,) if id_column else ()))))
        if not read:
            # a template without fields still needs a column to know how many rows there are
            read = (columns[0],) if columns else ()
        return PromptPlan(
            columns=read, template=pieces, system=system, examples=tuple(shots), param_columns=params,
            id_column=id_column, max_prompt_chars=max_prompt_chars,
        )
    if prompt_column not in available:
        raise ColumnNotFoundError(
            _columns_message(f"no prompt template given and the prompt column {prompt_column!r} is missing", columns)
        )
    read = tuple(dict.fromkeys((prompt_column, *params.values(), *((id_column,) if id_column else ()))))
    return PromptPlan(
        columns=read, prompt_column=prompt_column, system=system, examples=tuple(shots), param_columns=params,
        id_column=id_column, max_prompt_chars=max_prompt_chars,
    )
