"""Which constraint a request carries: response_format, structured_outputs and guided_* mapped onto one
StructuredOutput (no engine: the shapes the API checks itself)."""

import json

import pytest

from llamaserve.api.errors import APIError
from llamaserve.api.protocol import ChatCompletionRequest, CompletionRequest
from llamaserve.api.structured import structured_output
from llamaserve.sampling_params import StructuredOutput

SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
MESSAGES = [{"role": "user", "content": "Hi"}]


def chat(**fields) -> StructuredOutput | None:
    return structured_output(ChatCompletionRequest.model_validate({"messages": MESSAGES, **fields}))


@pytest.mark.parametrize("fields,expected", [
    ({}, None),
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, StructuredOutput("json", '{"type":"object"}')),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
     StructuredOutput("json", json.dumps(SCHEMA, separators=(",", ":")))),
    ({"structured_outputs": {"json": json.dumps(SCHEMA, indent=2)}},
     StructuredOutput("json", json.dumps(SCHEMA, separators=(",", ":")))),
    ({"guided_json": SCHEMA}, StructuredOutput("json", json.dumps(SCHEMA, separators=(",", ":")))),
    ({"structured_outputs": {"regex": "a+b"}}, StructuredOutput("regex", "a+b")),
    ({"guided_regex": "a+b"}, StructuredOutput("regex", "a+b")),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, StructuredOutput("choice", '["yes", "no"]')),
    ({"guided_choice": ["ja"]}, StructuredOutput("choice", '["ja"]')),
    ({"structured_outputs": {"grammar": 'root ::= "x"'}}, StructuredOutput("grammar", 'root ::= "x"')),
    ({"guided_grammar": 'root ::= "x"', "guided_decoding_backend": "outlines"},
     StructuredOutput("grammar", 'root ::= "x"')),
    ({"structured_outputs": {"json_object": True}}, StructuredOutput("json", '{"type":"object"}')),
    ({"structured_outputs": {"json_object": False}}, None),
])
def test_each_field_maps_to_one_constraint(fields, expected):
    assert chat(**fields) == expected


def test_schema_key_order_is_kept():
    # Properties are generated in the schema's order: sorting the keys would reorder the output.
    spec = chat(guided_json=SCHEMA).spec
    assert spec.index('"b"') < spec.index('"a"')


def test_completions_take_the_same_fields():
    request = CompletionRequest.model_validate({"prompt": "Hi", "response_format": {"type": "json_object"}})
    assert structured_output(request) == StructuredOutput("json", '{"type":"object"}')


@pytest.mark.parametrize("fields,param", [
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs.choice"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"guided_json": "{nope"}, "guided_json"),
    ({"guided_json": "[1, 2]"}, "guided_json"),
    ({"structured_outputs": {"regex": "  "}}, "structured_outputs.regex"),
])
def test_what_the_api_can_check_is_a_400(fields, param):
    with pytest.raises(APIError) as raised:
        chat(**fields)
    assert raised.value.status == 400 and raised.value.param == param
