"""Structured outputs: ask for JSON that matches a schema, check every answer, return typed columns.

``response_format=`` takes a JSON schema (a dict, or a ``.json`` file path), a pydantic model class
(with the ``structured`` extra), or an OpenAI ``{"type": "json_schema", "json_schema": {...}}`` dict.
It becomes a :class:`ResponseFormat`, which

- is sent with each request in the provider's structured-output mode (``GenerationParams.response_format``
  carries the OpenAI ``json_schema`` form; other adapters translate it to their own API),
- validates each answer (jsonschema, or the pydantic model itself); an answer that is not JSON or does not
  match becomes that row's :class:`~nagents_frames.errors.ResponseValidationError`, so the row keeps an
  ``error`` cell and can be retried (``retry_failed`` / ``nagents-frames retry JOB``),
- turns the answers into a typed Arrow struct column (or, with ``expand=True``, one column per field).

Example::

    >>> fmt = response_format_from({"type": "object", "properties": {"label": {"type": "string"},
    ...                             "score": {"type": "number"}}, "required": ["label", "score"]})
    >>> fmt.arrow_type
    StructType(struct<label: string, score: double>)
    >>> fmt.validate('{"label": "pos", "score": 0.9}')
    {'label': 'pos', 'score': 0.9}
    >>> fmt.to_arrow(['{"label": "neg", "score": 1}', None]).to_pylist()
    [{'label': 'neg', 'score': 1.0}, None]
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from nagents_frames.errors import ConfigurationError, ResponseValidationError

__all__ = ["ResponseFormat", "arrow_type_for_schema", "response_format_from"]

_NAME_OK = re.compile(r"[^a-zA-Z0-9_-]")
_FENCE = re.compile(r"^\s*```(?:json|JSON)?\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL)


@dataclass(frozen=True)
class ResponseFormat:
    """A compiled structured-output request: schema, name, strictness, and how to shape the result.

    Build it with :func:`response_format_from`; every entry point (``batch_complete``, the CLI, the job
    API) accepts the raw forms too.

    >>> ResponseFormat(name="r", schema={"type": "object", "properties": {"x": {"type": "integer"}}}).arrow_type
    StructType(struct<x: int64>)
    """

    name: str
    schema: Mapping[str, Any]
    strict: bool = False
    expand: bool = False
    model: Any = field(default=None, compare=False, repr=False)
    """The pydantic model class, when the format came from one (it then does the validation)."""

    def __post_init__(self) -> None:
        if not isinstance(self.schema, Mapping):
            raise ConfigurationError(f"response_format schema must be a JSON object, got {type(self.schema).__name__}")
        # fail at configuration time, not on the first answer
        object.__setattr__(self, "_arrow_type", arrow_type_for_schema(self.schema))
        if self.expand and not pa.types.is_struct(self.arrow_type):
            raise ConfigurationError("expand=True needs a response_format whose top level is an object with properties")
        object.__setattr__(self, "_validator", None if self.model is not None else _jsonschema_validator(self.schema))

    @property
    def arrow_type(self) -> pa.DataType:
        """The Arrow type of the parsed answers (a struct for an object schema)."""
        result: pa.DataType = self.__dict__["_arrow_type"]
        return result

    @property
    def field_names(self) -> tuple[str, ...]:
        """Top-level fields (the columns made by ``expand=True``)."""
        t = self.arrow_type
        return tuple(t.field(i).name for i in range(t.num_fields)) if pa.types.is_struct(t) else ()

    def request_format(self) -> dict[str, Any]:
        """The OpenAI ``response_format`` body field (adapters of other APIs translate this form).

        >>> ResponseFormat(name="r", schema={"type": "object"}).request_format()["type"]
        'json_schema'
        """
        return {
            "type": "json_schema",
            "json_schema": {"name": self.name, "schema": dict(self.schema), "strict": self.strict},
        }

    def validate(self, text: str) -> Any:
        """Parse and check one answer; returns the value shaped for :attr:`arrow_type`.

        Raises :class:`~nagents_frames.errors.ResponseValidationError` (the row's error) when the answer is
        not JSON, does not match the schema, or cannot be represented in the column type.
        """
        if not isinstance(text, str):
            raise ResponseValidationError(f"expected a JSON text answer, got {type(text).__name__}")
        body = _unfence(text)
        if self.model is not None:
            value = self._validate_pydantic(body, text)
        else:
            try:
                value = json.loads(body)
            except ValueError as exc:
                raise ResponseValidationError(f"the answer is not JSON ({exc}); answer: {_snippet(text)}") from None
            validator = self.__dict__["_validator"]
            error = _best_error(validator, value)
            if error is not None:
                raise ResponseValidationError(f"the answer does not match the schema: {error}; answer: {_snippet(text)}")
        try:
            shaped = _shape(value, self.schema, self.schema)
            pa.array([shaped], type=self.arrow_type)
        except (ValueError, TypeError, OverflowError, pa.ArrowException) as exc:
            raise ResponseValidationError(f"the answer does not fit the column type {self.arrow_type}: {exc}") from None
        return shaped

    def _validate_pydantic(self, body: str, text: str) -> Any:
        from pydantic import ValidationError

        try:
            obj = self.model.model_validate_json(body)
        except ValidationError as exc:
            details: list[Any] = list(exc.errors())
            first: Mapping[str, Any] = details[0] if details else {}
            where = ".".join(str(p) for p in first.get("loc", ())) or "(root)"
            raise ResponseValidationError(
                f"the answer does not match {self.model.__name__}: {where}: {first.get('msg', exc)}"
                f" ({exc.error_count()} error(s)); answer: {_snippet(text)}"
            ) from None
        return obj.model_dump(mode="json")

    def to_arrow(self, texts: Sequence[str | None]) -> pa.Array:
        """Answers (already validated, or null) as an array of :attr:`arrow_type`; unparsable ones are null."""
        values: list[Any] = []
        for text in texts:
            if text is None:
                values.append(None)
                continue
            try:
                values.append(self.validate(text))
            except ResponseValidationError:
                values.append(None)
        return pa.array(values, type=self.arrow_type)

    def columns(self, texts: Sequence[str | None], response_column: str) -> dict[str, pa.Array]:
        """The output column(s) for these answers: one struct column, or one column per field (``expand``)."""
        array = self.to_arrow(texts)
        if not self.expand:
            return {response_column: array}
        assert isinstance(array, pa.StructArray)
        # a null row must give null fields, not the struct's child default values
        validity = array.is_valid()
        return {
            name: pc.if_else(validity, array.field(name), pa.scalar(None, type=array.type.field(name).type))
            for name in self.field_names
        }

    def output_names(self, response_column: str) -> tuple[str, ...]:
        """The names :meth:`columns` produces."""
        return self.field_names if self.expand else (response_column,)

    def convert_batch(self, batch: pa.RecordBatch, response_column: str) -> pa.RecordBatch:
        """Replace a batch's text ``response_column`` with the structured column(s), in place of it."""
        index = batch.schema.get_field_index(response_column)
        if index < 0:
            return batch
        column = batch.column(index)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            return batch  # already converted
        added = self.columns(column.to_pylist(), response_column)
        arrays = list(batch.columns)
        names = list(batch.schema.names)
        arrays[index : index + 1] = list(added.values())
        names[index : index + 1] = list(added.keys())
        return pa.RecordBatch.from_arrays(arrays, names=names)


def response_format_from(
    value: Any, *, expand: bool = False, strict: bool | None = None, name: str | None = None
) -> ResponseFormat:
    """Compile a ``response_format=`` argument.

    Accepts a :class:`ResponseFormat`, a pydantic model class, a JSON schema dict, an OpenAI
    ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`` dict, or a path to a ``.json``
    file holding either dict. ``strict`` defaults to what the schema allows: the OpenAI strict mode needs
    every object to list all its properties as required and forbid additional ones.

    >>> response_format_from({"type": "object", "properties": {"a": {"type": "string"}},
    ...                       "required": ["a"], "additionalProperties": False}).strict
    True
    """
    if isinstance(value, ResponseFormat):
        if expand and not value.expand:
            return ResponseFormat(value.name, value.schema, value.strict, True, value.model)
        return value
    model = None
    if isinstance(value, (str, Path)):
        path = Path(value)
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigurationError(f"response format file {str(path)!r} does not exist") from None
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"response format file {str(path)!r} is not a JSON schema: {exc}") from None
    if isinstance(value, type) and hasattr(value, "model_json_schema"):
        model = value
        schema: Any = value.model_json_schema()
        name = name or value.__name__
    elif isinstance(value, Mapping):
        schema = value
        if value.get("type") == "json_schema" and isinstance(value.get("json_schema"), Mapping):
            inner = value["json_schema"]
            schema = inner.get("schema")
            name = name or inner.get("name")
            if strict is None and isinstance(inner.get("strict"), bool):
                strict = inner["strict"]
        elif value.get("type") == "json_object":
            raise ConfigurationError(
                "response_format {'type': 'json_object'} has no schema to check answers against; pass a JSON schema"
            )
    else:
        raise ConfigurationError(
            "response_format must be a JSON schema dict, a pydantic model class or a path to a .json schema; "
            f"got {type(value).__name__}"
        )
    if not isinstance(schema, Mapping):
        raise ConfigurationError("response_format holds no JSON schema object")
    schema = dict(schema)
    name = _NAME_OK.sub("_", str(name or schema.get("title") or "response"))[:64] or "response"
    if strict is None:
        strict = _strict_compatible(schema, schema)
    return ResponseFormat(name=name, schema=schema, strict=bool(strict), expand=expand, model=model)


def arrow_type_for_schema(schema: Mapping[str, Any], root: Mapping[str, Any] | None = None) -> pa.DataType:
    """The Arrow type for values of a JSON schema.

    Objects with properties become structs, arrays lists, ``integer`` int64, ``number`` float64,
    ``boolean`` bool; nullable types (``["string", "null"]``, ``anyOf`` with null) keep their base type;
    anything without one definite type (free-form objects, mixed unions) is kept as JSON text.

    >>> arrow_type_for_schema({"type": "array", "items": {"type": ["integer", "null"]}})
    ListType(list<item: int64>)
    """
    root = schema if root is None else root
    node = _resolve(schema, root)
    kind = _kind(node, root)
    if kind == "object":
        props = node.get("properties")
        if not isinstance(props, Mapping) or not props:
            return pa.string()
        return pa.struct([pa.field(str(k), arrow_type_for_schema(v, root)) for k, v in props.items()])
    if kind == "array":
        items = node.get("items")
        if not isinstance(items, Mapping):
            return pa.string()
        return pa.list_(arrow_type_for_schema(items, root))
    scalars: dict[str, pa.DataType] = {
        "string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()
    }
    return scalars.get(kind or "", pa.string())


# --- helpers ---------------------------------------------------------------------------------------------


def _resolve(schema: Any, root: Mapping[str, Any], depth: int = 0) -> Mapping[str, Any]:
    if not isinstance(schema, Mapping):
        return {}
    ref = schema.get("$ref")
    if isinstance(ref, str) and depth < 32:
        if not ref.startswith("#/"):
            raise ConfigurationError(f"response_format: only local $ref ('#/...') are supported, got {ref!r}")
        target: Any = root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, Mapping) or part not in target:
                raise ConfigurationError(f"response_format: $ref {ref!r} points nowhere")
            target = target[part]
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return _resolve(merged, root, depth + 1)
    if depth >= 32:
        raise ConfigurationError("response_format: $ref nesting too deep (recursive schemas are not supported)")
    return schema


def _kind(node: Mapping[str, Any], root: Mapping[str, Any]) -> str | None:
    """The one JSON type of a node, ignoring ``null``; None when there is not exactly one."""
    for key in ("anyOf", "oneOf"):
        options = node.get(key)
        if isinstance(options, list):
            kinds = {_kind(_resolve(o, root), root) for o in options} - {"null"}
            if len(kinds) == 1:
                return kinds.pop()
            return None
    t = node.get("type")
    if isinstance(t, list):
        named = {str(x) for x in t} - {"null"}
        return named.pop() if len(named) == 1 else None
    if isinstance(t, str):
        return t
    for key in ("enum", "const"):
        if key in node:
            values = node[key] if key == "enum" else [node[key]]
            seen = {_json_kind(v) for v in values} - {"null"}
            return seen.pop() if len(seen) == 1 else None
    if "properties" in node:
        return "object"
    return None


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _option_for(node: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    """For a nullable union, the non-null option (so nested shaping follows its properties)."""
    for key in ("anyOf", "oneOf"):
        options = node.get(key)
        if isinstance(options, list):
            rest = [_resolve(o, root) for o in options if _kind(_resolve(o, root), root) != "null"]
            if len(rest) == 1:
                return rest[0]
    return node


def _shape(value: Any, schema: Mapping[str, Any], root: Mapping[str, Any]) -> Any:
    """A JSON value rearranged to fit :func:`arrow_type_for_schema` (free-form parts become JSON text)."""
    if value is None:
        return None
    node = _option_for(_resolve(schema, root), root)
    target = arrow_type_for_schema(node, root)
    if pa.types.is_struct(target):
        if not isinstance(value, Mapping):
            raise TypeError(f"expected an object, got {_json_kind(value)}")
        props = node["properties"]
        return {k: _shape(value.get(k), props[k], root) for k in props}
    if pa.types.is_list(target):
        if not isinstance(value, list):
            raise TypeError(f"expected an array, got {_json_kind(value)}")
        return [_shape(v, node["items"], root) for v in value]
    if pa.types.is_string(target) and not isinstance(value, str):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    if pa.types.is_boolean(target) and not isinstance(value, bool):
        raise TypeError(f"expected a boolean, got {_json_kind(value)}")
    if pa.types.is_integer(target) and isinstance(value, float):
        if not value.is_integer():
            raise TypeError(f"expected an integer, got {value}")
        return int(value)
    return value


def _strict_compatible(schema: Any, root: Mapping[str, Any], depth: int = 0) -> bool:
    """Whether OpenAI's strict mode accepts the schema: closed objects, every property required."""
    if depth > 32:
        return False
    if isinstance(schema, list):
        return all(_strict_compatible(s, root, depth + 1) for s in schema)
    if not isinstance(schema, Mapping):
        return True
    node = _resolve(schema, root)
    props = node.get("properties")
    if isinstance(props, Mapping) or node.get("type") == "object":
        props = props if isinstance(props, Mapping) else {}
        if node.get("additionalProperties") is not False:
            return False
        if set(node.get("required") or ()) != set(props):
            return False
        if not all(_strict_compatible(v, root, depth + 1) for v in props.values()):
            return False
    for key in ("items", "anyOf", "oneOf"):
        if key in node and not _strict_compatible(node[key], root, depth + 1):
            return False
    return True


def _jsonschema_validator(schema: Mapping[str, Any]) -> Any:
    try:
        import jsonschema
    except ImportError:
        raise ConfigurationError(
            "validating answers against a JSON schema needs jsonschema: pip install 'nagents-frames[structured]'"
        ) from None
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ConfigurationError(f"response_format is not a valid JSON schema: {exc.message}") from None
    return cls(schema)


def _best_error(validator: Any, value: Any) -> str | None:
    import jsonschema

    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
    return f"{where}: {error.message[:300]}"


def _unfence(text: str) -> str:
    # models outside strict mode often wrap JSON in a markdown code fence
    match = _FENCE.match(text)
    return match.group(1) if match else text


def _snippet(text: str, limit: int = 120) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")
