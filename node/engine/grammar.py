"""JSON Schema → GBNF: grammars that make the sampler emit only JSON a schema accepts.

The grammar of a schema accepts a *subset* of the documents the schema accepts (compact
JSON, declared properties only, numbers of at most 16 integral digits), so every sampled
document that completes is valid. A keyword the grammar cannot honour raises
:class:`SchemaError` naming it: the caller answers 400 instead of producing output that
might not validate.

Supported (OpenAI's strict-mode subset and a bit more): ``type`` (one or a list),
``enum``, ``const``, ``anyOf``, a single-entry ``allOf``, local ``$ref`` into
``$defs``/``definitions`` (recursion included); objects: ``properties``, ``required``,
``additionalProperties``; arrays: ``items``, ``minItems``, ``maxItems``; strings:
``minLength``, ``maxLength``, ``pattern`` (anchored ``^…$``, translated by
llama-cpp-python's converter), ``format`` date, time, date-time, uuid; numbers and
integers: ``minimum``, ``maximum``, ``exclusiveMinimum``, ``exclusiveMaximum``.
Annotations (``title``, ``description``, ``default``, ``examples``…) are ignored.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from ..constants import GRAMMAR_MAX_DIGITS as MAX_DIGITS
from ..constants import GRAMMAR_MAX_FRACTION_DIGITS as MAX_FRACTION_DIGITS
from ..constants import GRAMMAR_MAX_ITEMS_EXPANDED as MAX_ITEMS_EXPANDED
from ..constants import GRAMMAR_MAX_RULES as MAX_RULES
from ..constants import GRAMMAR_MAX_SCHEMA_DEPTH as MAX_SCHEMA_DEPTH

__all__ = ["GrammarBuilder", "SchemaError", "JSON_OBJECT_GRAMMAR", "schema_to_grammar", "gbnf_literal"]


_ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
    "readOnly", "writeOnly", "$defs", "definitions", "strict", "nullable",
})
_COMMON = frozenset({"type", "enum", "const", "anyOf", "allOf", "$ref"})
_BY_TYPE: dict[str, frozenset[str]] = {
    "object": frozenset({"properties", "required", "additionalProperties"}),
    "array": frozenset({"items", "minItems", "maxItems"}),
    "string": frozenset({"minLength", "maxLength", "pattern", "format"}),
    "number": frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}),
    "integer": frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}),
    "boolean": frozenset(),
    "null": frozenset(),
}
_KNOWN = frozenset().union(_ANNOTATIONS, _COMMON, *_BY_TYPE.values())
_FORMATS = {
    "date": r'[0-9]{4} "-" ("0" [1-9] | "1" [0-2]) "-" ("0" [1-9] | [12] [0-9] | "3" [01])',
    "time": r'([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9]{3})? ("Z" | [+-] ([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9])',
    "uuid": r'[0-9a-f]{8} "-" [0-9a-f]{4} "-" [0-9a-f]{4} "-" [0-9a-f]{4} "-" [0-9a-f]{12}',
}
_FORMATS["date-time"] = f'({_FORMATS["date"]}) "T" ({_FORMATS["time"]})'

_BASE_RULES = {
    "char": r'[^"\\\x00-\x1F\x7F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})',
    "string": r'"\"" char* "\""',
    "digits": "[0-9]{1," + str(MAX_DIGITS - 1) + "}",
    "integral": f'"0" | [1-9] [0-9]{{0,{MAX_DIGITS - 1}}}',
    "integer": '"-"? integral',
    "number": f'"-"? integral ("." [0-9]{{1,{MAX_FRACTION_DIGITS}}})? ([eE] [-+]? [0-9]{{1,3}})?',
    "boolean": '"true" | "false"',
    "null": '"null"',
    "value": "object | array | string | number | boolean | null",
    "object": r'"{" (string ":" value ("," string ":" value)*)? "}"',
    "array": r'"[" (value ("," value)*)? "]"',
}
_DEPENDENCIES = {
    "string": ("char",), "integer": ("integral",), "number": ("integral",),
    "value": ("object", "array", "string", "number", "boolean", "null"),
    "object": ("string", "value"), "array": ("value",),
}


class SchemaError(ValueError):
    """A schema the grammar cannot honour; ``path`` names the keyword (``properties.age.minimum``)."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.message = message
        self.path = path


def gbnf_literal(text: str) -> str:
    """``text`` as a GBNF string literal."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\r":
            out.append("\\r")
        elif char == "\t":
            out.append("\\t")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\x{ord(char):02X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def compact_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class GrammarBuilder:
    """Collects named GBNF rules; several schemas can share one grammar (tool calls)."""

    def __init__(self) -> None:
        self._rules: dict[str, str] = {}
        self._refs: dict[str, str] = {}
        self._counter = 0

    def add_rule(self, name: str, body: str) -> str:
        if name in self._rules and self._rules[name] != body:
            raise ValueError(f"rule {name} defined twice")
        self._rules[name] = body
        if len(self._rules) > MAX_RULES:
            raise SchemaError(f"the schema needs more than {MAX_RULES} grammar rules", "")
        return name

    def fresh(self, hint: str) -> str:
        self._counter += 1
        clean = re.sub(r"[^a-zA-Z0-9]+", "-", hint).strip("-").lower()[:24] or "r"
        return f"{clean}-{self._counter}"

    def base(self, name: str) -> str:
        """A built-in rule (``string``, ``number``, ``value``…), added with its dependencies."""
        if name not in self._rules:
            self._rules[name] = _BASE_RULES[name]
            for dependency in _DEPENDENCIES.get(name, ()):
                self.base(dependency)
        return name

    def add_schema(self, schema: Any, path: str = "") -> str:
        """The name of a rule matching ``schema`` (whose ``$ref`` resolve against itself)."""
        return _SchemaVisitor(self, schema, path).visit(schema, path, 0)

    def render(self, root: str) -> str:
        lines = [f"root ::= {root}"]
        lines += [f"{name} ::= {body}" for name, body in self._rules.items()]
        return "\n".join(lines) + "\n"


def schema_to_grammar(schema: Any, path: str = "") -> str:
    """GBNF for one JSON document matching ``schema``; raises :class:`SchemaError`."""
    builder = GrammarBuilder()
    return builder.render(builder.add_schema(schema, path))


def _any_object_grammar() -> str:
    builder = GrammarBuilder()
    return builder.render(builder.base("object"))


JSON_OBJECT_GRAMMAR = _any_object_grammar()
"""``response_format: {"type": "json_object"}``: any JSON object."""


class _SchemaVisitor:
    def __init__(self, builder: GrammarBuilder, root: Any, root_path: str) -> None:
        self.builder = builder
        self.root = root
        self.root_path = root_path

    def visit(self, schema: Any, path: str, depth: int) -> str:
        if depth > MAX_SCHEMA_DEPTH:
            raise SchemaError(f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels", path)
        if schema is True or (isinstance(schema, Mapping) and not _structural(schema)):
            return self.builder.base("value")
        if not isinstance(schema, Mapping):
            raise SchemaError("a schema must be an object", path)
        unknown = sorted(k for k in schema if k not in _KNOWN)
        if unknown:
            raise SchemaError(f"the JSON schema keyword '{unknown[0]}' is not supported", _join(path, unknown[0]))
        if "$ref" in schema:
            return self._ref(schema, path, depth)
        if "allOf" in schema:
            return self._all_of(schema, path, depth)
        if "const" in schema:
            return self.builder.add_rule(self.builder.fresh(path or "const"), gbnf_literal(compact_json(schema["const"])))
        if "enum" in schema:
            return self._enum(schema, path)
        if "anyOf" in schema:
            options = schema["anyOf"]
            if not isinstance(options, list) or not options:
                raise SchemaError("'anyOf' must be a non-empty list", _join(path, "anyOf"))
            names = [self.visit(_merged(schema, option, "anyOf"), _join(path, f"anyOf[{i}]"), depth + 1)
                     for i, option in enumerate(options)]
            return self.builder.add_rule(self.builder.fresh(path or "any-of"), " | ".join(names))
        kind = schema.get("type")
        if isinstance(kind, list):
            if not kind or not all(isinstance(k, str) for k in kind):
                raise SchemaError("'type' must be a string or a non-empty list of strings", _join(path, "type"))
            names = [self._typed(schema, k, path, depth) for k in dict.fromkeys(kind)]
            return names[0] if len(names) == 1 else self.builder.add_rule(self.builder.fresh(path or "types"), " | ".join(names))
        if kind is None:
            kind = _implied_type(schema)
            if kind is None:
                return self.builder.base("value")
        return self._typed(schema, kind, path, depth)

    # -- combinators ---------------------------------------------------------------
    def _ref(self, schema: Mapping[str, Any], path: str, depth: int) -> str:
        ref = schema["$ref"]
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise SchemaError("only local '$ref' values (\"#/$defs/…\") are supported", _join(path, "$ref"))
        if ref in self.builder._refs:
            return self.builder._refs[ref]
        target: Any = self.root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, Mapping) or part not in target:
                raise SchemaError(f"'$ref' {ref!r} does not resolve", _join(path, "$ref"))
            target = target[part]
        name = self.builder.fresh("ref-" + ref.rsplit("/", 1)[-1])
        self.builder._refs[ref] = name
        body = self.visit(target, _join(self.root_path, ref[2:].replace("/", ".")), depth + 1)
        self.builder.add_rule(name, body)
        return name

    def _all_of(self, schema: Mapping[str, Any], path: str, depth: int) -> str:
        parts = schema["allOf"]
        if not isinstance(parts, list) or len(parts) != 1:
            raise SchemaError("'allOf' is supported with a single entry only", _join(path, "allOf"))
        return self.visit(_merged(schema, parts[0], "allOf"), _join(path, "allOf[0]"), depth + 1)

    def _enum(self, schema: Mapping[str, Any], path: str) -> str:
        values = schema["enum"]
        if not isinstance(values, list) or not values:
            raise SchemaError("'enum' must be a non-empty list", _join(path, "enum"))
        body = " | ".join(gbnf_literal(compact_json(v)) for v in values)
        return self.builder.add_rule(self.builder.fresh(path or "enum"), body)

    # -- types ---------------------------------------------------------------------
    def _typed(self, schema: Mapping[str, Any], kind: str, path: str, depth: int) -> str:
        if kind not in _BY_TYPE:
            raise SchemaError(f"unknown type {kind!r}", _join(path, "type"))
        for key in schema:
            owner = next((t for t, keys in _BY_TYPE.items() if key in keys), None)
            if owner is not None and owner != kind and not (
                    {owner, kind} <= {"number", "integer"}) and not _multi_typed(schema, owner):
                raise SchemaError(f"'{key}' does not apply to type {kind!r}", _join(path, key))
        if kind == "object":
            return self._object(schema, path, depth)
        if kind == "array":
            return self._array(schema, path, depth)
        if kind == "string":
            return self._string(schema, path)
        if kind in ("number", "integer"):
            return self._number(schema, kind, path)
        return self.builder.base(kind)

    def _object(self, schema: Mapping[str, Any], path: str, depth: int) -> str:
        properties = schema.get("properties", {})
        if not isinstance(properties, Mapping):
            raise SchemaError("'properties' must be an object", _join(path, "properties"))
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise SchemaError("'required' must be a list of property names", _join(path, "required"))
        missing = [r for r in required if r not in properties]
        additional = schema.get("additionalProperties", True)
        if missing and additional is False:
            raise SchemaError(f"required property '{missing[0]}' is not in 'properties'", _join(path, "required"))
        if not properties:
            if isinstance(additional, Mapping) and _structural(additional):
                value = self.visit(additional, _join(path, "additionalProperties"), depth + 1)
                key = self.builder.base("string")
                body = rf'"{{" ({key} ":" {value} ("," {key} ":" {value})*)? "}}"'
                return self.builder.add_rule(self.builder.fresh(path or "map"), body)
            if additional is False:
                return self.builder.add_rule(self.builder.fresh(path or "empty"), r'"{" "}"')
            return self.builder.base("object")
        if missing:
            raise SchemaError(f"required property '{missing[0]}' is not in 'properties'", _join(path, "required"))
        pairs = []
        for key, sub in properties.items():
            value = self.visit(sub, _join(path, f"properties.{key}"), depth + 1)
            pairs.append((gbnf_literal(compact_json(str(key)) + ":") + " " + value, key in required))
        # tail(i, first): properties i… in declared order, each optional one may be left out;
        # ``first`` says whether nothing has been written yet (no leading comma).
        base = self.builder.fresh(path or "obj")
        names: dict[tuple[int, bool], str] = {}

        def tail(index: int, first: bool) -> str:
            if index == len(pairs):
                return ""
            key = (index, first)
            if key in names:
                return names[key]
            pair, needed = pairs[index]
            written = (pair if first else f'"," {pair}') + " " + tail(index + 1, False)
            if needed:
                body = written.strip()
            else:
                rest = tail(index + 1, first)
                body = f"({written.strip()}) | {rest}" if rest else f"({written.strip()})?"
            names[key] = self.builder.add_rule(f"{base}-{index}{'f' if first else 'n'}", body)
            return names[key]

        return self.builder.add_rule(base, f'"{{" {tail(0, True)} "}}"')

    def _array(self, schema: Mapping[str, Any], path: str, depth: int) -> str:
        items = schema.get("items", True)
        if isinstance(items, list):
            raise SchemaError("tuple 'items' (a list) is not supported", _join(path, "items"))
        item = self.visit(items, _join(path, "items"), depth + 1)
        low = _count(schema, "minItems", path, 0) or 0
        high = _count(schema, "maxItems", path, None)
        if high is not None and high < low:
            raise SchemaError("'maxItems' is below 'minItems'", _join(path, "maxItems"))
        if low > MAX_ITEMS_EXPANDED or (high or 0) > MAX_ITEMS_EXPANDED:
            raise SchemaError(f"'minItems'/'maxItems' above {MAX_ITEMS_EXPANDED} are not supported",
                              _join(path, "maxItems" if (high or 0) > MAX_ITEMS_EXPANDED else "minItems"))
        body = f'"[" {_repeat(item, low, high, separator=chr(34) + "," + chr(34))} "]"'
        return self.builder.add_rule(self.builder.fresh(path or "array"), body)

    def _string(self, schema: Mapping[str, Any], path: str) -> str:
        fmt = schema.get("format")
        pattern = schema.get("pattern")
        bounded = "minLength" in schema or "maxLength" in schema
        if sum(x is not None and x is not False for x in (fmt, pattern, bounded or None)) > 1:
            raise SchemaError("combine at most one of 'format', 'pattern' and a length bound", path)
        if fmt is not None:
            if fmt not in _FORMATS:
                raise SchemaError(f"string format {fmt!r} is not supported (supported: {', '.join(_FORMATS)})",
                                  _join(path, "format"))
            return self.builder.add_rule(self.builder.fresh(fmt), rf'"\"" {_FORMATS[fmt]} "\""')
        if pattern is not None:
            return self._pattern(pattern, _join(path, "pattern"))
        if bounded:
            low = _count(schema, "minLength", path, 0) or 0
            high = _count(schema, "maxLength", path, None)
            if high is not None and high < low:
                raise SchemaError("'maxLength' is below 'minLength'", _join(path, "maxLength"))
            char = self.builder.base("char")
            repeat = f"{char}{{{low},{'' if high is None else high}}}"
            return self.builder.add_rule(self.builder.fresh(path or "text"), rf'"\"" {repeat} "\""')
        return self.builder.base("string")

    def _pattern(self, pattern: Any, path: str) -> str:
        if not isinstance(pattern, str) or not pattern.startswith("^") or not pattern.endswith("$"):
            raise SchemaError("'pattern' must be a regular expression anchored with ^ and $", path)
        if re.search(r"\(\?[=!<]|\\[bBkpP]|\\[1-9]", pattern):
            raise SchemaError("lookarounds, backreferences and \\b/\\p classes are not supported in 'pattern'", path)
        from llama_cpp.llama_grammar import SchemaConverter

        factory: Any = SchemaConverter  # untyped upstream code
        converter = factory(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        converter._rules["space"] = '""'
        name = self.builder.fresh("pattern")
        try:
            converter._visit_pattern(pattern, name)
        except Exception as exc:  # noqa: BLE001 - the converter raises bare assertions and ValueErrors
            raise SchemaError(f"'pattern' cannot be turned into a grammar: {exc}", path) from exc
        for rule, body in converter._rules.items():
            self.builder.add_rule(rule, body)
        return name

    def _number(self, schema: Mapping[str, Any], kind: str, path: str) -> str:
        low, low_open = _bound(schema, "minimum", "exclusiveMinimum", path, max)
        high, high_open = _bound(schema, "maximum", "exclusiveMaximum", path, min)
        if low is None and high is None:
            return self.builder.base(kind)
        cap = 10 ** MAX_DIGITS - 1
        # Integers: the smallest and largest integral values inside the bounds.
        int_low = -cap if low is None else (math.floor(low) + 1 if low_open and low == math.floor(low) else math.ceil(low))
        int_high = cap if high is None else (math.ceil(high) - 1 if high_open and high == math.ceil(high) else math.floor(high))
        options = []
        if int_low <= int_high:
            options.append(_int_range(max(int_low, -cap), min(int_high, cap)))
        if kind == "number":
            # k.f with a non-zero fraction lies strictly between k and k + 1 (or −k − 1 and −k).
            fraction = f'"." [0-9]{{0,{MAX_FRACTION_DIGITS - 1}}} [1-9]'
            positive = (max(-cap if low is None else math.ceil(low), 0), cap if high is None else math.floor(high) - 1)
            if positive[0] <= positive[1]:
                options.append(f"({_nonnegative_range(*positive)}) {fraction}")
            negative = (max(-cap if high is None else math.ceil(-high), 0), cap if low is None else math.floor(-low) - 1)
            if negative[0] <= negative[1]:
                options.append(f'"-" ({_nonnegative_range(*negative)}) {fraction}')
        if not options:
            raise SchemaError("no number the grammar can write lies within these bounds", _join(path, "minimum"))
        return self.builder.add_rule(self.builder.fresh(path or kind), " | ".join(f"({o})" for o in options))


# -- helpers -------------------------------------------------------------------------


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _structural(schema: Mapping[str, Any]) -> bool:
    return any(k not in _ANNOTATIONS for k in schema)


def _implied_type(schema: Mapping[str, Any]) -> str | None:
    for kind, keys in _BY_TYPE.items():
        if any(k in schema for k in keys):
            return kind
    return None


def _multi_typed(schema: Mapping[str, Any], owner: str) -> bool:
    kind = schema.get("type")
    return isinstance(kind, list) and owner in kind


def _merged(parent: Mapping[str, Any], child: Any, combinator: str) -> Any:
    """``child`` with the parent's other keywords (``{"type": "object", "anyOf": […]}``)."""
    rest = {k: v for k, v in parent.items() if k != combinator and k not in _ANNOTATIONS}
    if not rest or not isinstance(child, Mapping):
        return child
    clash = sorted(set(rest) & set(child))
    if clash:
        raise SchemaError(f"'{clash[0]}' beside '{combinator}' and inside it is not supported", combinator)
    return {**rest, **child}


def _count(schema: Mapping[str, Any], key: str, path: str, default: int | None) -> int | None:
    value = schema.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SchemaError(f"'{key}' must be a non-negative integer", _join(path, key))
    return value


def _bound(schema: Mapping[str, Any], closed: str, opened: str, path: str, pick: Any) -> tuple[float | None, bool]:
    found: list[tuple[float, bool]] = []
    for key, is_open in ((closed, False), (opened, True)):
        value = schema.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SchemaError(f"'{key}' must be a number", _join(path, key))
        found.append((float(value), is_open))
    if not found:
        return None, False
    best = pick(v for v, _ in found)
    return best, any(v == best and o for v, o in found)


def _repeat(item: str, low: int, high: int | None, *, separator: str) -> str:
    """``low``…``high`` copies of ``item`` separated by ``separator`` (GBNF has no separated repeat)."""
    if high == 0:
        return ""
    if low == 0:
        rest = "*" if high is None else f"{{0,{high - 1}}}"
        return f"({item} ({separator} {item}){rest})?"
    rest = "*" if high is None else f"{{{low - 1},{high - 1}}}"
    return f"{item} ({separator} {item}){rest}"


def _int_range(low: int, high: int) -> str:
    """A GBNF expression for the decimal integers low…high (no leading zeros, "-" for negatives)."""
    options = []
    if high >= 0:
        options.append(_nonnegative_range(max(low, 0), high))
    if low < 0:
        options.append(f'"-" ({_nonnegative_range(max(1, -high if high < 0 else 1), -low)})')
    return " | ".join(f"({o})" for o in options)


def _nonnegative_range(low: int, high: int) -> str:
    options = []
    for length in range(len(str(low)), len(str(high)) + 1):
        start = max(low, 0 if length == 1 else 10 ** (length - 1))
        end = min(high, 10 ** length - 1)
        if start <= end:
            options.append(_same_length(str(start), str(end)))
    return " | ".join(f"({o})" for o in options)


def _same_length(low: str, high: str) -> str:
    """Digit strings of one length from ``low`` to ``high`` (low ≤ high)."""
    if low == high:
        return f'"{low}"'
    if len(low) == 1:
        return f"[{low}-{high}]"
    rest = len(low) - 1
    if low[1:] == "0" * rest and high[1:] == "9" * rest:
        return f"[{low[0]}-{high[0]}] [0-9]{{{rest}}}"
    if low[0] == high[0]:
        return f'"{low[0]}" ({_same_length(low[1:], high[1:])})'
    options = [f'"{low[0]}" ({_same_length(low[1:], "9" * rest)})']
    first, last = int(low[0]) + 1, int(high[0]) - 1
    if first <= last:
        options.append(f"[{first}-{last}] [0-9]{{{rest}}}")
    options.append(f'"{high[0]}" ({_same_length("0" * rest, high[1:])})')
    return " | ".join(f"({o})" for o in options)
