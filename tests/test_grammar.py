"""JSON schema → GBNF, checked by llama.cpp itself: the grammars are compiled by llama.cpp's own
grammar sampler and asked, token by token, whether they accept a document."""

from __future__ import annotations

import ctypes
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.engine.grammar import JSON_OBJECT_GRAMMAR, SchemaError, compact_json, schema_to_grammar
from node.engine.tools import FunctionTool, ToolChoice, call_grammar


class GrammarChecker:
    """Compiles GBNF with llama.cpp and tells whether it accepts a whole text."""

    def __init__(self, model_path: Path) -> None:
        import llama_cpp

        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
        self.vocab = self.llm._model.vocab
        self.eos = self.llm.token_eos()

    def compiles(self, grammar: str) -> bool:
        sampler = self.lib.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        if not sampler:
            return False
        self.lib.llama_sampler_free(sampler)
        return True

    def accepts(self, grammar: str, text: str) -> bool:
        lib = self.lib
        sampler = lib.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        assert sampler, "grammar did not compile:\n" + grammar
        try:
            for token in [*self.llm.tokenize(text.encode(), add_bos=False, special=False), self.eos]:
                data = (lib.llama_token_data * 1)(lib.llama_token_data(token, 0.0, 0.0))
                array = lib.llama_token_data_array(data, 1, -1, False)
                lib.llama_sampler_apply(sampler, ctypes.byref(array))
                if math.isinf(data[0].logit):
                    return False
                if token != self.eos:
                    lib.llama_sampler_accept(sampler, token)
            return True
        finally:
            lib.llama_sampler_free(sampler)


@pytest.fixture(scope="module")
def checker(default_model: Path) -> Iterator[GrammarChecker]:
    checker = GrammarChecker(default_model)
    yield checker
    checker.llm.close()


# -- numbers -------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(low=st.integers(-3000, 3000), span=st.integers(0, 2500))
def test_integer_bounds_accept_exactly_the_range(checker: GrammarChecker, low: int, span: int) -> None:
    high = low + span
    grammar = schema_to_grammar({"type": "integer", "minimum": low, "maximum": high})
    probes = {low - 1, low, low + 1, high - 1, high, high + 1, (low + high) // 2, 0, -1, 10 * high + 7}
    for value in probes:
        assert checker.accepts(grammar, str(value)) == (low <= value <= high), (low, high, value)
    assert not checker.accepts(grammar, "0" + str(abs(high)))  # no leading zeros


@pytest.mark.parametrize(
    ("schema", "inside", "outside"),
    [
        ({"type": "number", "minimum": 0, "maximum": 1}, ["0", "1", "0.5", "0.0001"], ["1.5", "-0.1", "2", "1.01"]),
        ({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 100}, ["1", "99", "0.5", "99.9"],
         ["0", "100", "100.5", "-1"]),
        ({"type": "number", "minimum": -5.5, "maximum": 12.25}, ["-5", "12", "-4.9", "11.99", "0"],
         ["-6", "13", "-5.1", "12.5"]),
        ({"type": "number", "maximum": -2}, ["-2", "-3.5", "-1000"], ["-1.5", "0", "5"]),
        ({"type": "integer", "exclusiveMinimum": 9}, ["10", "12345"], ["9", "-3", "1.5"]),
        ({"type": "number"}, ["0", "-1.25", "3e5", "12"], ["01", "1.", "+1", "--1"]),
    ],
)
def test_number_bounds(checker: GrammarChecker, schema: dict[str, Any], inside: list[str], outside: list[str]) -> None:
    grammar = schema_to_grammar(schema)
    for text in inside:
        assert checker.accepts(grammar, text), text
    for text in outside:
        assert not checker.accepts(grammar, text), text


# -- documents -----------------------------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        "nick": {"type": ["string", "null"]},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    ("schema", "good", "bad"),
    [
        (PERSON, [{"name": "Ann", "age": 3}, {"name": "", "age": 120, "tags": ["a", "b"], "zip": "12345"},
                  {"name": "Bo", "age": 1, "nick": None}, {"name": "Bo", "age": 1, "zip": "00000", "nick": "x"}],
         [{"name": "Ann"}, {"name": "Ann", "age": 121}, {"name": "Ann", "age": 1, "tags": ["c"]},
          {"name": "Annabelle!", "age": 1}, {"name": "A", "age": 1, "zip": "1234"},
          {"name": "A", "age": 1, "tags": ["a", "a", "a"]}, {"age": 1, "name": "A"}]),
        ({"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"}, "kids": {
            "type": "array", "items": {"$ref": "#/$defs/node"}}}, "required": ["v"]}}, "$ref": "#/$defs/node"},
         [{"v": 1}, {"v": 1, "kids": [{"v": 2, "kids": [{"v": 3}]}]}], [{"kids": []}, {"v": 1, "kids": [{}]}]),
        ({"anyOf": [{"type": "string", "format": "date"}, {"type": "boolean"}]},
         ["2024-02-29", True], ["2024-13-01", "yes", 1]),
        ({"type": "object", "properties": {"id": {"type": "string", "format": "uuid"}}, "required": ["id"]},
         [{"id": "123e4567-e89b-12d3-a456-426614174000"}], [{"id": "123e4567"}]),
        ({"type": "object", "additionalProperties": {"type": "integer"}}, [{}, {"a": 1, "b": -2}], [{"a": "x"}]),
        ({"type": "array", "items": {"type": "string", "minLength": 2, "maxLength": 3}, "minItems": 1},
         [["ab"], ["abc", "de"]], [[], ["a"], ["abcd"]]),
        ({"const": {"k": [1, 2]}}, [{"k": [1, 2]}], [{"k": [1]}]),
    ],
)
def test_documents(checker: GrammarChecker, schema: dict[str, Any], good: list[Any], bad: list[Any]) -> None:
    grammar = schema_to_grammar(schema)
    for document in good:
        assert checker.accepts(grammar, compact_json(document)), document
    for document in bad:
        assert not checker.accepts(grammar, compact_json(document)), document


def test_json_object_grammar(checker: GrammarChecker) -> None:
    for text in ['{}', '{"a":[1,{"b":null}],"c":"\\n"}']:
        assert checker.accepts(JSON_OBJECT_GRAMMAR, text)
    for text in ['[]', '"x"', '{"a":1', '{a:1}']:
        assert not checker.accepts(JSON_OBJECT_GRAMMAR, text)


def test_call_grammar(checker: GrammarChecker) -> None:
    tools = (FunctionTool("get_weather", None, {"type": "object", "properties": {"city": {"type": "string"}},
                                                "required": ["city"]}),
             FunctionTool("get_time", None, {"type": "object", "properties": {}}))
    call = '<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>'
    other = '<tool_call>{"name":"get_time","arguments":{}}</tool_call>'
    required = call_grammar(tools, ToolChoice("required"), parallel=True)
    assert checker.accepts(required, call) and checker.accepts(required, f"{call}\n{other}")
    assert not checker.accepts(required, "Hello") and not checker.accepts(required, call.replace("city", "town"))
    named = call_grammar(tools, ToolChoice("function", "get_time"), parallel=False)
    assert checker.accepts(named, other) and not checker.accepts(named, call)
    assert not checker.accepts(named, f"{other}\n{other}")


# -- refusals --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "path"),
    [
        ({"type": "object", "properties": {"a": {"type": "integer", "multipleOf": 2}}}, "properties.a.multipleOf"),
        ({"oneOf": [{"type": "string"}]}, "oneOf"),
        ({"type": "object", "patternProperties": {"^x": {}}}, "patternProperties"),
        ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems"),
        ({"type": "string", "format": "email"}, "format"),
        ({"type": "string", "pattern": "abc"}, "pattern"),
        ({"type": "string", "pattern": "^(?=a)b$"}, "pattern"),
        ({"$ref": "https://example.com/schema"}, "$ref"),
        ({"$ref": "#/$defs/missing"}, "$ref"),
        ({"type": "strin"}, "type"),
        ({"type": "integer", "minimum": 0.2, "maximum": 0.8}, "minimum"),
        ({"type": "string", "minimum": 3}, "minimum"),
        ({"type": "object", "properties": {"a": {}}, "required": ["b"], "additionalProperties": False}, "required"),
        ({"type": "array", "maxItems": 1000}, "maxItems"),
        ({"allOf": [{"type": "string"}, {"maxLength": 3}]}, "allOf"),
        ({"not": {"type": "string"}}, "not"),
    ],
)
def test_unsupported_schemas_name_the_keyword(schema: dict[str, Any], path: str) -> None:
    with pytest.raises(SchemaError) as caught:
        schema_to_grammar(schema)
    assert caught.value.path == path


def test_every_refusal_free_grammar_compiles(checker: GrammarChecker) -> None:
    from .test_agent_api_e2e import STRUCTURED

    for schema in STRUCTURED:
        assert checker.compiles(schema_to_grammar(schema)), json.dumps(schema)
