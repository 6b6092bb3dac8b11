"""Tool calling through the openai SDK: a call forced by tool_choice, its result sent back, a final answer;
the same streamed, delta by delta; parallel_tool_calls; the requests refused.

The calls are the grammar's doing (the default model does not call tools by itself), so the tests that
expect calls need an engine that enforces structured output."""

import json
import re

import jsonschema
import openai
import pytest

from tests.e2e.checks import assert_error_shape, read_events

CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
                                      "parameters": CITY}},
    {"type": "function", "function": {"name": "get_time", "description": "The local time in a city",
                                      "parameters": CITY}},
]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather"}}
CALLING = dict(tools=TOOLS, temperature=0, max_tokens=64)  # a call with these arguments takes about 40 tokens
ANSWERING = dict(tools=TOOLS, tool_choice="none", temperature=0, max_tokens=8)
CALL_ID = re.compile(r"call_[0-9a-f]{24}")
RESULT = "18 degrees and sunny"
TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
CHAT = "/v1/chat/completions"


def check_call(call, name: str = "get_weather") -> dict:
    assert CALL_ID.fullmatch(call.id) and call.type == "function" and call.function.name == name
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, CITY)
    return arguments


def answer_to(call) -> dict:
    return {"role": "tool", "tool_call_id": call.id, "content": RESULT}


@pytest.fixture(scope="module")
def named_call(client, model):
    """The non-streaming answer to QUESTION with get_weather forced."""
    return client.chat.completions.create(model=model, messages=QUESTION, tool_choice=WEATHER, **CALLING)


def test_named_tool_choice_round_trip(client, model, named_call):
    [choice] = named_call.choices
    assert choice.finish_reason == "tool_calls" and choice.message.role == "assistant"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    check_call(call)
    # The assistant's message goes back as the SDK returned it, then the tool's result; the answer is text.
    messages = QUESTION + [choice.message, answer_to(call)]
    final = client.chat.completions.create(model=model, messages=messages, **ANSWERING)
    assert final.choices[0].message.content and final.choices[0].message.tool_calls is None
    assert final.choices[0].finish_reason in ("stop", "length")


def test_tool_conversation_prompt(http):
    """The default model's template knows no tools: they, the call and its result are rendered the default way."""
    messages = QUESTION + [{"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
                           {"role": "tool", "tool_call_id": "call_1", "content": RESULT}]
    ids = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    prompt = http.post("/detokenize", json={"tokens": ids}).json()["prompt"]
    assert prompt.endswith(
        "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        "<|im_end|>\n<|im_start|>user\n<tool_response>\n18 degrees and sunny\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n")


def test_streamed_round_trip(client, model, named_call):
    chunks = list(client.chat.completions.create(model=model, messages=QUESTION, tool_choice=WEATHER, stream=True,
                                                 **CALLING))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)
    first, *rest = pieces
    assert first.index == 0 and CALL_ID.fullmatch(first.id) and first.type == "function"
    assert first.function.name == "get_weather" and first.function.arguments == ""
    assert rest and all(p.index == 0 and p.id is None and p.type is None and p.function.name is None
                        and p.function.arguments for p in rest)
    arguments = "".join(p.function.arguments for p in rest)
    [expected] = named_call.choices[0].message.tool_calls
    assert arguments == expected.function.arguments  # greedy: the same call, streamed
    assert [c.choices[0].finish_reason for c in chunks][-1] == "tool_calls"
    assert not any(c.choices[0].finish_reason for c in chunks[:-1])

    call = {"id": first.id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    messages = QUESTION + [{"role": "assistant", "content": None, "tool_calls": [call]}, answer_to(first)]
    final = client.chat.completions.create(model=model, messages=messages, stream=True, **ANSWERING)
    assert "".join(c.choices[0].delta.content or "" for c in final if c.choices)


def test_one_call_without_parallel_calls_streamed_as_openai_sends_it(http):
    body = dict(messages=[{"role": "user", "content": "What are the weather and the time in Tokyo?"}],
                tool_choice="required", parallel_tool_calls=False, stream=True, **CALLING)
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        chunks = read_events(response)[:-1]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert not "".join(d.get("content") or "" for d in deltas)
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert all(len(c) == 1 for c in calls)
    first, *rest = [c[0] for c in calls]
    assert list(first) == ["index", "id", "type", "function"] and first["index"] == 0  # no nulls sent
    assert CALL_ID.fullmatch(first["id"]) and first["type"] == "function"
    assert first["function"]["name"] in ("get_weather", "get_time") and first["function"]["arguments"] == ""
    # one call: every later piece is its arguments
    assert rest and all(p == {"index": 0, "function": {"arguments": p["function"]["arguments"]}} for p in rest)
    jsonschema.validate(json.loads("".join(p["function"]["arguments"] for p in rest)), CITY)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert not any(c["choices"][0]["finish_reason"] for c in chunks[:-1])


def test_auto_answers_text_or_calls(client, model):
    response = client.chat.completions.create(model=model, messages=QUESTION, tools=TOOLS, temperature=0,
                                              max_tokens=8)
    [choice] = response.choices
    for call in choice.message.tool_calls or []:  # a call that starts follows its schema
        check_call(call, call.function.name)
    assert choice.message.content or choice.message.tool_calls
    assert choice.finish_reason in ("stop", "length", "tool_calls")


BAD_REQUESTS = [
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools.0.function.name"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "object"}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_news"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": WEATHER}, "tool_choice"),
    ({"messages": QUESTION + [{"role": "assistant", "tool_calls": [TOOL_CALL]}, {"role": "tool", "content": RESULT}]},
     "messages.2.tool_call_id"),
    ({"messages": QUESTION + [{"role": "assistant", "tool_calls": [
        {**TOOL_CALL, "function": {"name": "get_weather", "arguments": "{city: Paris}"}}]}]},
     "messages.1.tool_calls.0.function.arguments"),
    ({"messages": [{"role": "user", "content": "Hi", "tool_calls": [TOOL_CALL]}]}, "messages.0.tool_calls"),
    ({"tools": TOOLS, "tool_choice": "required", "ignore_eos": True}, "ignore_eos"),
    ({"functions": [{"name": "get_weather"}]}, "functions"),  # the deprecated form stays refused
]


@pytest.mark.parametrize("fields,param", BAD_REQUESTS, ids=[p for _, p in BAD_REQUESTS])
def test_bad_tool_requests(http, fields, param):
    error = assert_error_shape(http.post(CHAT, json={"messages": QUESTION, "max_tokens": 1, **fields}), 400, param)
    assert error["type"] == "invalid_request_error"


def test_bad_tool_requests_through_the_sdk(client, model):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=model, messages=QUESTION, tool_choice="required", max_tokens=1)
    assert refused.value.body["param"] == "tool_choice" and "needs tools" in refused.value.body["message"]
