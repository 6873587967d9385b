"""A minimal JSON-schema checker for the subset our decoding schemas use.

Both engines use it to double-check what constrained decoding produced and redraw what fails
(a completion cut off by ``max_tokens`` is not valid JSON even under a grammar); without
xgrammar the transformers engine enforces a schema by this check and retries alone. Model output is data: it is parsed
with :func:`json.loads` only, never evaluated.

:func:`json_rejection` is total: any input gives a reason or None, never an exception. A
document nested deeper than :data:`MAX_JSON_DEPTH`, longer than :data:`MAX_JSON_CHARS`, with
a lone surrogate (not encodable as UTF-8), an integer beyond Python's digit limit, or a
non-finite number (``NaN``, ``Infinity``, ``1e999``) is rejected with its reason.

Supported keywords: ``type``, ``properties``, ``required``, ``additionalProperties``
(boolean or a schema), ``items``, ``minItems``, ``maxItems``, ``enum``, ``const``,
``minimum``, ``maximum``, ``minLength``, ``maxLength``. Annotations (``title``,
``description``, ``default``, ``examples``, ``$schema``) are ignored. Any other keyword is
refused by :func:`check_supported`, so that nothing is silently left unenforced.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects a document may have."""
MAX_JSON_CHARS = 1_000_000
"""Longest document (in characters) that is parsed at all."""

_VALIDATING = {
    "type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems",
    "enum", "const", "minimum", "maximum", "minLength", "maxLength",
}
_ANNOTATIONS = {"title", "description", "default", "examples", "$schema"}
_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


class UnsupportedSchemaError(ValueError):
    """The schema uses a keyword this checker cannot enforce."""


def check_supported(schema: Mapping[str, Any], path: str = "$") -> None:
    """Raise :class:`UnsupportedSchemaError` if ``schema`` uses an unsupported keyword.

    Args:
        schema: A JSON schema (a mapping).
        path: Where ``schema`` sits inside the root schema (for the message).
    """
    if not isinstance(schema, Mapping):
        raise UnsupportedSchemaError(f"schema at {path} must be an object, got {type(schema).__name__}")
    unknown = set(schema) - _VALIDATING - _ANNOTATIONS
    if unknown:
        raise UnsupportedSchemaError(
            f"schema at {path} uses unsupported keyword(s) {sorted(unknown)}; supported: {sorted(_VALIDATING)}"
        )
    types = schema.get("type")
    for t in [types] if isinstance(types, str) else (types or []):
        if t not in _TYPES:
            raise UnsupportedSchemaError(f"schema at {path}: unknown type {t!r}")
    for key, sub in (schema.get("properties") or {}).items():
        check_supported(sub, f"{path}.{key}")
    if isinstance(schema.get("items"), Mapping):
        check_supported(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), Mapping):
        check_supported(schema["additionalProperties"], f"{path}.*")


def schema_errors(value: Any, schema: Mapping[str, Any], path: str = "$") -> list[str]:
    """Return every way ``value`` violates ``schema`` (empty when it is valid)."""
    errs: list[str] = []
    types = schema.get("type")
    if types is not None:
        allowed = [types] if isinstance(types, str) else list(types)
        if not any(_TYPES[t](value) for t in allowed):
            return [f"{path}: expected {'/'.join(allowed)}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        shown = schema["enum"] if len(schema["enum"]) <= 8 else f"{len(schema['enum'])} allowed values"
        errs.append(f"{path}: {value!r:.60} is not one of {shown}")
    if "const" in schema and value != schema["const"]:
        errs.append(f"{path}: must be {schema['const']!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errs.append(f"{path}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errs.append(f"{path}: {value} > maximum {schema['maximum']}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            errs.append(f"{path}: string shorter than minLength {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errs.append(f"{path}: string longer than maxLength {schema['maxLength']}")
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            errs.append(f"{path}: {len(value)} items, fewer than minItems {schema['minItems']}")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errs.append(f"{path}: {len(value)} items, more than maxItems {schema['maxItems']}")
        if isinstance(schema.get("items"), Mapping):
            for i, item in enumerate(value):
                errs.extend(schema_errors(item, schema["items"], f"{path}[{i}]"))
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for key in schema.get("required") or []:
            if key not in value:
                errs.append(f"{path}: missing required property {key!r}")
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in props:
                errs.extend(schema_errors(item, props[key], f"{path}.{key}"))
            elif extra is False:
                errs.append(f"{path}: unexpected property {key!r}")
            elif isinstance(extra, Mapping):
                errs.extend(schema_errors(item, extra, f"{path}.{key}"))
    return errs


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _problem(value: Any) -> str | None:
    """Why a parsed document is unsafe to hand on (too deep, lone surrogate, non-finite), or None."""
    stack: list[tuple[Any, int, str]] = [(value, 1, "$")]
    while stack:
        v, depth, path = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                return f"nested deeper than {MAX_JSON_DEPTH} levels at {path}"
            items = v.items() if isinstance(v, dict) else enumerate(v)
            for k, item in items:
                if isinstance(k, str) and not _encodable(k):
                    return f"object key at {path} has a lone surrogate (not valid UTF-8)"
                stack.append((item, depth + 1, f"{path}[{k!r:.20}]"))
        elif isinstance(v, str) and not _encodable(v):
            return f"string at {path} has a lone surrogate (not valid UTF-8)"
        elif isinstance(v, float) and not math.isfinite(v):
            return f"number at {path} is not finite"
    return None


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _safe(reason: str) -> str:
    """A reason that is valid UTF-8 whatever the document contained."""
    return reason.encode("utf-8", "backslashreplace").decode("utf-8")


def json_rejection(text: Any, schema: Mapping[str, Any]) -> str | None:
    """Why ``text`` is not a JSON document valid for ``schema``, or None if it is.

    Total: any input (not only strings) gives a reason or None; it never raises.
    Surrounding whitespace is allowed; anything else around the document is a rejection.
    """
    try:
        if not isinstance(text, str):
            return f"not text (got {type(text).__name__})"
        if len(text) > MAX_JSON_CHARS:
            return f"document of {len(text)} characters is longer than {MAX_JSON_CHARS}"
        try:
            value = json.loads(text, parse_constant=_reject_constant)
        except json.JSONDecodeError as e:
            return _safe(f"not valid JSON ({e.msg} at char {e.pos})")
        except RecursionError:
            return f"not valid JSON (nested deeper than the parser allows; limit {MAX_JSON_DEPTH})"
        except ValueError as e:  # huge integers, NaN/Infinity
            return _safe(f"not valid JSON ({str(e)[:120]})")
        problem = _problem(value)
        if problem is not None:
            return _safe(f"unsafe JSON: {problem}")
        errs = schema_errors(value, schema)
        if errs:
            more = f" (+{len(errs) - 3} more)" if len(errs) > 3 else ""
            return _safe("schema violation: " + "; ".join(errs[:3]) + more)
        return None
    except Exception as e:  # a checker bug must still not end the caller's batch
        return _safe(f"document could not be checked ({type(e).__name__}: {str(e)[:120]})")
