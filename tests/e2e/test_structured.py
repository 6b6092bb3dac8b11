"""Structured output against a real server: response_format (json_object, json_schema), vLLM's
structured_outputs and guided_* fields, the openai SDK's parse(), and what a constraint must not change."""

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import jsonschema
import pydantic
import pytest

from tests.e2e.checks import assert_error_shape, read_events

CHAT = "/v1/chat/completions"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
        "score": {"type": "number", "minimum": 0, "maximum": 10},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 16}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
        "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "address", "tags"],
}
ASK_PERSON = [{"role": "user", "content": "Describe a fictional person as JSON."}]


def chat(http, **body) -> dict:
    response = http.post(CHAT, json={"messages": ASK_PERSON, "max_tokens": 200, **body})
    assert response.status_code == 200, response.text
    return response.json()


def texts(response: dict) -> list[str]:
    choices = response["choices"]
    assert all(c["finish_reason"] == "stop" for c in choices), [c["finish_reason"] for c in choices]
    return [c["message"]["content"] if "message" in c else c["text"] for c in choices]


def test_fifty_sampled_answers_follow_a_nested_schema(http):
    body = {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
            "temperature": 1.0}
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda seed: texts(chat(http, seed=seed, **body))[0], range(50)))
    for text in answers:
        jsonschema.validate(json.loads(text), PERSON)
    assert len(set(answers)) > 25  # sampled, not one answer repeated


def test_json_object_always_parses(http):
    # An object's size has no bound, so a sampled answer may run into max_tokens ("length", as OpenAI's
    # may): every answer that ended by itself is one JSON object, and most do end.
    response = chat(http, response_format={"type": "json_object"}, temperature=0.7, frequency_penalty=0.3, n=6,
                    seed=1, max_tokens=160)
    ended = [c["message"]["content"] for c in response["choices"] if c["finish_reason"] == "stop"]
    assert len(ended) >= 4, response["choices"]
    assert all(isinstance(json.loads(text), dict) for text in ended)


@pytest.mark.parametrize("field", ["structured_outputs", "guided"])
def test_regex_and_choice_always_match(http, field):
    pattern = r"(yes|no), because [a-z ]{3,40}\."
    choices = ["Paris", "London", "Berlin", "Rome"]
    regex = {"structured_outputs": {"regex": pattern}} if field == "structured_outputs" else {"guided_regex": pattern}
    choice = {"structured_outputs": {"choice": choices}} if field == "structured_outputs" else {"guided_choice": choices}
    question = [{"role": "user", "content": "Is the sky blue?"}]
    for text in texts(chat(http, messages=question, temperature=1.0, n=8, seed=2, **regex)):
        assert re.fullmatch(pattern, text), text
    question = [{"role": "user", "content": "What is the capital of France?"}]
    for text in texts(chat(http, messages=question, temperature=1.0, n=8, seed=3, **choice)):
        assert text in choices


def test_ebnf_grammar_on_completions(http):
    grammar = 'root ::= "The answer is " digit digit? "."\ndigit ::= [0-9]'
    response = http.post("/v1/completions", json={"prompt": "2 + 3 =", "max_tokens": 20, "temperature": 1.0, "n": 4,
                                                   "seed": 4, "structured_outputs": {"grammar": grammar}})
    assert response.status_code == 200, response.text
    for text in texts(response.json()):
        assert re.fullmatch(r"The answer is [0-9][0-9]?\.", text), text


def test_completions_take_response_format(http):
    response = http.post("/v1/completions", json={"prompt": "A person as JSON:", "max_tokens": 200, "seed": 5,
                                                   "response_format": {"type": "json_schema",
                                                                       "json_schema": {"name": "p", "schema": PERSON}}})
    assert response.status_code == 200, response.text
    jsonschema.validate(json.loads(texts(response.json())[0]), PERSON)


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    country: str = pydantic.Field(max_length=20)
    population_millions: float
    continent: Literal["Europe", "Asia", "Africa", "America", "Oceania"]


def test_openai_sdk_parse_returns_the_pydantic_object(client, model):
    completion = client.chat.completions.parse(
        model=model, messages=[{"role": "user", "content": "Tell me about Paris."}], response_format=City,
        max_tokens=200, temperature=0)
    city = completion.choices[0].message.parsed
    assert isinstance(city, City) and city.name


def test_streamed_json_is_the_same_as_whole(http):
    body = {"messages": ASK_PERSON, "max_tokens": 200, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}}
    whole = texts(chat(http, **{k: v for k, v in body.items() if k != "messages"}))[0]
    with http.stream("POST", CHAT, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        events = read_events(response)
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
    assert streamed == whole
    jsonschema.validate(json.loads(streamed), PERSON)


def test_constraints_leave_the_rest_of_the_batch_alone(http):
    """Unconstrained requests sharing steps with constrained ones get exactly their solo greedy text."""
    questions = ["What is the capital of France?", "Name three colours.", "Why is the sea salty?", "Say hello."]

    solo = [free_text(http, q) for q in questions]
    constrained = {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
                   "temperature": 1.0}
    with ThreadPoolExecutor(8) as pool:
        busy = [pool.submit(chat, http, seed=s, **constrained) for s in range(4)]
        together = list(pool.map(lambda q: free_text(http, q), questions))
        for f in busy:
            jsonschema.validate(json.loads(texts(f.result())[0]), PERSON)
    assert together == solo


def free_text(http, question: str) -> str:
    response = http.post(CHAT, json={"messages": [{"role": "user", "content": question}], "temperature": 0,
                                     "max_tokens": 24})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_constraints_compose_with_sampling_options(http):
    body = {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
            "temperature": 0.9, "top_p": 0.9, "top_k": 40, "frequency_penalty": 0.5, "presence_penalty": 0.3,
            "repetition_penalty": 1.1, "logit_bias": {"90": 5}, "n": 2, "seed": 7, "logprobs": True,
            "top_logprobs": 2}
    first, again = chat(http, **body), chat(http, **body)
    assert texts(first) == texts(again)  # seeded: the same answers
    for choice in first["choices"]:
        jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)
        tokens = choice["logprobs"]["content"]
        assert tokens and all(t["logprob"] <= 0 and len(t["top_logprobs"]) == 2 for t in tokens)


def test_max_tokens_may_cut_the_json(http):
    response = chat(http, response_format={"type": "json_object"}, max_tokens=3, temperature=0)
    assert response["choices"][0]["finish_reason"] == "length"


def test_a_stop_string_still_stops(http):
    response = chat(http, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
                    stop=['"age"'], temperature=0)
    [choice] = response["choices"]
    assert choice["finish_reason"] == "stop" and '"age"' not in choice["message"]["content"]


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer",
                                                                                         "minimum": 5, "maximum": 3}}}},
     None, "minimum"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}},
     None, "frobnicate"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": []}}}}, None, "enum"),
    ({"structured_outputs": {"regex": "(unclosed"}}, None, "regex"),
    ({"structured_outputs": {"grammar": "root ::= undefined_rule"}}, None, "undefined_rule"),
    ({"guided_json": "{not json"}, "guided_json", "JSON"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type", None),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", None),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice", "one"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos", "ignore_eos"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("body,param,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_a_grammar_that_cannot_be_used_is_a_400(http, body, param, words, stream):
    response = http.post(CHAT, json={"messages": ASK_PERSON, "max_tokens": 8, "stream": stream, **body})
    error = assert_error_shape(response, 400, param)
    assert words is None or words.lower() in error["message"].lower(), error["message"]


def test_the_server_serves_on_after_bad_grammars(http):
    assert texts(chat(http, response_format={"type": "json_object"}, temperature=0))
