"""Every error comes back with its status in OpenAI's shape, naming the parameter at fault."""

import socket

import httpx
import openai
import pytest

from tests.e2e.checks import assert_error_shape

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "Hi"}]
RAW_CHAT = b'{"messages": [{"role": "user", "content": "Hi"}], '  # + the rest of a body as raw JSON text

CASES = [
    # (path, body, status, param)
    (CHAT, b"{not json", 400, None),
    (CHAT, b"[1, 2]", 400, None),
    (CHAT, {}, 400, "messages"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": "Hi"}, 400, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "Hi"}]}, 400, "messages.0.role"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400,
     "messages.0.content"),
    (CHAT, {"messages": MESSAGES, "temperature": "hot"}, 400, "temperature"),
    (CHAT, {"messages": MESSAGES, "temperature": -0.5}, 400, "temperature"),
    (CHAT, {"messages": MESSAGES, "top_p": -0.1}, 400, "top_p"),
    (CHAT, {"messages": MESSAGES, "top_p": 1.5}, 400, "top_p"),
    (CHAT, {"messages": MESSAGES, "n": 0}, 400, "n"),
    (CHAT, {"messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens"),
    (CHAT, {"messages": MESSAGES, "max_tokens": 2.5}, 400, "max_tokens"),
    (CHAT, {"messages": MESSAGES, "stream": "yes"}, 400, "stream"),
    (CHAT, {"messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs"),
    (CHAT, {"messages": MESSAGES, "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    (CHAT, {"messages": MESSAGES, "model": "gpt-4"}, 404, "model"),
    # numbers out of range, NaN and infinities (Python's JSON parser takes them: sent as raw text)
    (CHAT, {"messages": MESSAGES, "seed": 2**64}, 400, "seed"),
    (CHAT, {"messages": MESSAGES, "seed": -(2**63) - 1}, 400, "seed"),
    (CHAT, {"messages": MESSAGES, "seed": 2**63 - 1, "n": 2}, 400, "seed"),  # the second choice's seed overflows
    (CHAT, RAW_CHAT + b'"temperature": NaN}', 400, "temperature"),
    (CHAT, RAW_CHAT + b'"top_p": -Infinity}', 400, "top_p"),
    (CHAT, RAW_CHAT + b'"logit_bias": {"1": Infinity}}', 400, "logit_bias.1"),
    (CHAT, RAW_CHAT + b'"repetition_penalty": Infinity}', 400, "repetition_penalty"),
    (CHAT, {"messages": MESSAGES, "repetition_penalty": 0}, 400, "repetition_penalty"),
    (CHAT, RAW_CHAT + b'"max_tokens": ' + b"9" * 5000 + b"}", 400, None),  # beyond Python's int parsing limit
    (CHAT, b"[" * 100_000 + b"]" * 100_000, 400, None),  # deeper than the JSON parser recurses
    (CHAT, b'{"messages": "\xff"}', 400, None),  # not UTF-8
    # lone surrogates: not text the tokenizer (or a JSON response) can take
    (CHAT, b'{"messages": [{"role": "user", "content": "a\\ud800"}]}', 400, "messages.0.content"),
    (CHAT, b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}', 400,
     "messages.0.content"),
    (CHAT, RAW_CHAT + b'"model": "\\ud800"}', 400, "model"),
    (CHAT, RAW_CHAT + b'"stop": ["\\ud800"]}', 400, "stop"),
    (CHAT, RAW_CHAT + b'"logit_bias": {"\\ud800": 1}}', 400, "logit_bias"),
    (COMPLETIONS, b'{"prompt": "\\ud800", "max_tokens": 1}', 400, "prompt"),
    (COMPLETIONS, b'{"prompt": ["ok", "\\ud800"], "max_tokens": 1}', 400, "prompt"),
    ("/tokenize", b'{"prompt": "\\ud83d"}', 400, "prompt"),
    ("/tokenize", b'{"messages": [{"role": "user", "content": "\\ud83d"}]}', 400, "messages.0.content"),
    ("/detokenize", b'{"tokens": [1], "model": "\\ud800"}', 400, "model"),
    # ... where an error message quotes the value back
    (CHAT, RAW_CHAT + b'"tool_choice": "\\udbff\\udc00\\ud800"}', 400, "tool_choice"),
    (CHAT, RAW_CHAT + b'"tools": [{"type": "function", "function": {"name": "f\\ud800"}}]}', 400,
     "tools.0.function.name"),
    (CHAT, RAW_CHAT + b'"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": '
     b'{"type": "function", "function": {"name": "\\udfff"}}}', 400, "tool_choice"),
    # content parts: text only
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, 400,
     "messages.0.content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                       {"type": "file", "file": {}}]}]}, 400, "messages.0.content"),
    # the server's per-request limits
    (CHAT, {"messages": MESSAGES, "n": 129}, 400, "n"),
    (CHAT, {"messages": MESSAGES, "stop": ["x"] * 17}, 400, "stop"),
    (CHAT, {"messages": MESSAGES, "stop": "x" * 1001}, 400, "stop"),
    (CHAT, {"messages": MESSAGES, "logit_bias": {str(i): 1 for i in range(1025)}}, 400, "logit_bias"),
    (CHAT, {"messages": MESSAGES * 1025}, 400, "messages"),
    ("/tokenize", {"messages": MESSAGES * 1025}, 400, "messages"),
    (COMPLETIONS, {"prompt": ["Hi"] * 65, "max_tokens": 1}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [[1, 2]] * 65, "max_tokens": 1}, 400, "prompt"),
    (CHAT, {"messages": [{"role": "user", "content": "x" * (16 * 2**20)}]}, 413, None),
    # what the server cannot do yet is refused, not silently dropped
    (CHAT, {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f g"}}]}, 400,
     "tools.0.function.name"),
    (CHAT, {"messages": MESSAGES, "tool_choice": "required"}, 400, "tool_choice"),
    (CHAT, {"messages": MESSAGES, "functions": [{"name": "f"}]}, 400, "functions"),
    (CHAT, {"messages": MESSAGES, "function_call": {"name": "f"}}, 400, "function_call"),
    (CHAT, {"messages": MESSAGES, "response_format": {"type": "yaml"}}, 400, "response_format.type"),
    (CHAT, {"messages": MESSAGES, "modalities": ["text", "audio"]}, 400, "modalities"),
    (CHAT, {"messages": MESSAGES, "audio": {"voice": "alloy", "format": "wav"}}, 400, "audio"),
    (COMPLETIONS, {"prompt": "Hi", "echo": True}, 400, "echo"),
    (COMPLETIONS, {"prompt": "Hi", "suffix": "end"}, 400, "suffix"),
    (COMPLETIONS, {"prompt": "Hi", "best_of": 2}, 400, "best_of"),
    (COMPLETIONS, {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 10**9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 50}, 400, "logprobs"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    (CHAT, {"messages": MESSAGES, "stop_token_ids": [10**9]}, 400, "stop_token_ids"),
    ("/v1/nothing-here", {}, 404, None),
]


@pytest.mark.parametrize("path,body,status,param", CASES, ids=[f"{c[0]}-{c[2]}-{c[3]}" for c in CASES])
def test_error_status_and_shape(http, path, body, status, param):
    if isinstance(body, bytes):
        response = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = http.post(path, json=body)
    error = assert_error_shape(response, status, param)
    error["message"].encode()  # UTF-8 text: no lone surrogate echoed back


def test_context_overflow_names_both_numbers(http):
    prompt_tokens = http.post("/tokenize", json={"messages": MESSAGES}).json()["count"]
    for stream in (False, True):
        response = http.post(CHAT, json={"messages": MESSAGES, "max_tokens": 2040, "stream": stream})
        error = assert_error_shape(response, 400, "max_tokens")
        assert str(prompt_tokens) in error["message"] and "2040" in error["message"]
        assert error["code"] == "context_length_exceeded"
    long_prompt = {"prompt": "hello " * 2100, "max_tokens": 1}
    assert_error_shape(http.post("/v1/completions", json=long_prompt), 400, "max_tokens")


def test_unknown_fields_are_ignored(http):
    response = http.post(CHAT, json={"messages": MESSAGES, "max_tokens": 1, "frobnicate": True, "tools_x": [1]})
    assert response.status_code == 200


def test_unsupported_fields_at_their_neutral_values_are_accepted(http):
    neutral = {"tools": [], "tool_choice": "none", "functions": [], "function_call": "none",
               "response_format": {"type": "text"}, "modalities": ["text"], "audio": None}
    assert http.post(CHAT, json={"messages": MESSAGES, "max_tokens": 1, **neutral}).status_code == 200
    neutral = {"echo": False, "suffix": "", "best_of": 1, "response_format": None}
    assert http.post(COMPLETIONS, json={"prompt": "Hi", "max_tokens": 1, **neutral}).status_code == 200
    parts = [{"type": "text", "text": "Hi"}, {"type": "text", "text": " there"}]
    assert http.post(CHAT, json={"messages": [{"role": "user", "content": parts}], "max_tokens": 1}).status_code == 200


def test_errors_say_what_is_refused(http):
    def message(path: str, body: dict) -> str:
        return http.post(path, json=body).json()["error"]["message"]

    image = [{"type": "image_url", "image_url": {"url": "data:,"}}]
    assert "text only" in message(CHAT, {"messages": [{"role": "user", "content": image}]})
    assert "not supported yet" in message(CHAT, {"messages": MESSAGES, "functions": [{"name": "f"}]})
    assert "--max-stop-strings" in message(CHAT, {"messages": MESSAGES, "stop": ["x"] * 17})
    assert "--max-n" in message(CHAT, {"messages": MESSAGES, "n": 1000})
    assert "--max-prompts-per-request" in message(COMPLETIONS, {"prompt": ["a"] * 100})


def test_body_limit_counts_bytes_as_they_arrive(server):
    """A chunked body has no Content-Length: it is refused once its bytes pass the limit; a declared
    Content-Length beyond the limit is refused before any byte of the body is read."""
    with httpx.Client(base_url=server.url, timeout=60) as http:
        def chunks():
            yield RAW_CHAT + b'"user": "'
            for _ in range(17):
                yield b"x" * 2**20
            yield b'"}'

        response = http.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
        assert assert_error_shape(response, 413)["code"] == "request_too_large"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000000000\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 413 ")


def test_sdk_raises_typed_errors(client, model):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=model, messages=MESSAGES, temperature=-1)
    assert bad.value.status_code == 400 and bad.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
