"""/v1/completions with every prompt form, streaming, logprobs and stop strings."""

import pytest

from tests.e2e.checks import read_events

PROMPTS = ["The capital of France is", "中国的首都是"]
GREEDY = dict(temperature=0, max_tokens=6)


@pytest.fixture(scope="module")
def singles(client, model):
    """Each prompt's greedy completion on its own."""
    return [client.completions.create(model=model, prompt=p, **GREEDY).choices[0].text for p in PROMPTS]


def test_string_prompt(client, model, singles):
    response = client.completions.create(model=model, prompt=PROMPTS[0], **GREEDY)
    assert response.id.startswith("cmpl-") and response.object == "text_completion"
    assert response.system_fingerprint.startswith("fp_")
    [choice] = response.choices
    assert choice.text == singles[0] and choice.finish_reason == "length" and choice.index == 0
    assert response.usage.completion_tokens == 6
    assert response.usage.prompt_tokens + response.usage.completion_tokens == response.usage.total_tokens


def test_list_of_strings(client, model, singles):
    response = client.completions.create(model=model, prompt=PROMPTS, **GREEDY)
    assert [c.index for c in response.choices] == [0, 1]
    assert [c.text for c in response.choices] == singles
    assert response.usage.completion_tokens == 12


def test_token_ids(client, model, http, singles):
    ids = [http.post("/tokenize", json={"prompt": p}).json()["tokens"] for p in PROMPTS]
    one = client.completions.create(model=model, prompt=ids[0], **GREEDY)
    assert one.choices[0].text == singles[0] and one.usage.prompt_tokens == len(ids[0])
    both = client.completions.create(model=model, prompt=ids, **GREEDY)
    assert [c.text for c in both.choices] == singles


def test_streaming_with_usage_and_logprobs(http, singles):
    body = dict(prompt=PROMPTS[1], stream=True, stream_options={"include_usage": True}, logprobs=2, **GREEDY)
    with http.stream("POST", "/v1/completions", json=body) as response:
        *chunks, usage_chunk, _ = read_events(response)
    texts = [c["choices"][0]["text"] for c in chunks]
    assert "".join(texts) == singles[1] and not any("\ufffd" in t for t in texts)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert usage_chunk["choices"] == [] and usage_chunk["object"] == "text_completion"
    logprobs = [c["choices"][0]["logprobs"] for c in chunks]
    assert sum(len(lp["tokens"]) for lp in logprobs) == usage_chunk["usage"]["completion_tokens"] == 6
    assert all(len(top) <= 2 for lp in logprobs for top in lp["top_logprobs"])


def test_logprobs_shape(client, model, singles):
    choice = client.completions.create(model=model, prompt=PROMPTS[0], logprobs=2, **GREEDY).choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    assert all(lp.tokens[i] in lp.top_logprobs[i] for i in range(6))  # greedy: sampled is among the top


def test_stop_strings(client, model, singles):
    text = singles[0]
    stop = text[2:5]
    response = client.completions.create(model=model, prompt=PROMPTS[0], stop=["zzz", stop], **GREEDY)
    assert response.choices[0].text == text[: text.index(stop)] and response.choices[0].finish_reason == "stop"
