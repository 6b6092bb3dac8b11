"""Every error comes back with its status in OpenAI's shape, naming the parameter at fault."""

import openai
import pytest

from tests.e2e.checks import assert_error_shape

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hi"}]

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
    (CHAT, {"messages": MESSAGES, "top_p": 0}, 400, "top_p"),
    (CHAT, {"messages": MESSAGES, "top_p": 1.5}, 400, "top_p"),
    (CHAT, {"messages": MESSAGES, "n": 0}, 400, "n"),
    (CHAT, {"messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens"),
    (CHAT, {"messages": MESSAGES, "max_tokens": 2.5}, 400, "max_tokens"),
    (CHAT, {"messages": MESSAGES, "stream": "yes"}, 400, "stream"),
    (CHAT, {"messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs"),
    (CHAT, {"messages": MESSAGES, "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    (CHAT, {"messages": MESSAGES, "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 10**9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 50}, 400, "logprobs"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/v1/nothing-here", {}, 404, None),
]


@pytest.mark.parametrize("path,body,status,param", CASES)
def test_error_status_and_shape(http, path, body, status, param):
    if isinstance(body, bytes):
        response = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = http.post(path, json=body)
    assert_error_shape(response, status, param)


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


def test_sdk_raises_typed_errors(client, model):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=model, messages=MESSAGES, temperature=-1)
    assert bad.value.status_code == 400 and bad.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
