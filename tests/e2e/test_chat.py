"""Chat completions through the openai SDK and raw HTTP: text, streaming, usage, stops, choices."""

import pytest

from tests.e2e.checks import read_events

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = dict(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def greedy(client, model):
    """The non-streaming greedy answer to QUESTION, which several tests compare against."""
    return client.chat.completions.create(model=model, messages=QUESTION, **GREEDY)


def test_non_streaming_response_shape(greedy, model):
    assert greedy.id.startswith("chatcmpl-") and greedy.object == "chat.completion"
    assert greedy.model == model and greedy.system_fingerprint.startswith("fp_") and greedy.created > 0
    [choice] = greedy.choices
    assert choice.index == 0 and choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length") and choice.logprobs is None


def test_streaming_gives_the_same_greedy_text(client, model, greedy):
    stream = client.chat.completions.create(model=model, messages=QUESTION, stream=True, **GREEDY)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == greedy.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == greedy.choices[0].finish_reason
    assert len({c.id for c in chunks}) == 1 and chunks[0].id != greedy.id  # ids: per request


def test_sse_framing_event_by_event(http):
    body = dict(messages=QUESTION, stream=True, stream_options={"include_usage": True}, logprobs=True, **GREEDY)
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        events = read_events(response)
    *chunks, usage_chunk, done = events
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks + [usage_chunk])
    assert len({c["system_fingerprint"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    finish_reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    assert finish_reasons[-1] in ("stop", "length") and not any(finish_reasons[:-1])
    assert all(c["usage"] is None for c in chunks)
    # The usage chunk comes last, with no choices; its token count is the streamed token count.
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    streamed_tokens = sum(len(c["choices"][0]["logprobs"]["content"]) for c in chunks[1:])
    assert usage["completion_tokens"] == streamed_tokens > 0
    assert usage["prompt_tokens"] + usage["completion_tokens"] == usage["total_tokens"]


def test_usage_adds_up(greedy, http):
    usage = greedy.usage
    prompt = http.post("/tokenize", json={"messages": QUESTION}).json()
    assert usage.prompt_tokens == prompt["count"]
    assert usage.prompt_tokens + usage.completion_tokens == usage.total_tokens
    assert 0 < usage.completion_tokens <= GREEDY["max_tokens"]


def test_max_tokens_gives_finish_reason_length(client, model, greedy):
    for limit in ({"max_tokens": 3}, {"max_completion_tokens": 3}):
        response = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, **limit)
        assert response.choices[0].finish_reason == "length" and response.usage.completion_tokens == 3
        assert greedy.choices[0].message.content.startswith(response.choices[0].message.content)


def test_stop_string_is_cut_and_never_streamed(client, model, greedy):
    text = greedy.choices[0].message.content
    # A stop string that starts inside one token and ends in a later one ("...of" | " France" | ...).
    stop = text[text.index(" of") + 2 : text.index(" of") + 6]
    expected = text[: text.index(stop)]
    response = client.chat.completions.create(model=model, messages=QUESTION, stop=[stop, "never"], **GREEDY)
    assert response.choices[0].message.content == expected and response.choices[0].finish_reason == "stop"

    stream = client.chat.completions.create(model=model, messages=QUESTION, stop=stop, stream=True, **GREEDY)
    deltas = [(c.choices[0].delta.content or "", c.choices[0].finish_reason) for c in stream]
    assert "".join(d for d, _ in deltas) == expected  # so no delta carried the stop string or its beginning
    assert [f for _, f in deltas if f] == ["stop"] and deltas[-1][1] == "stop"


def test_n_choices_with_seeds(client, model, http):
    sampling = dict(messages=QUESTION, n=2, max_tokens=6, temperature=1, seed=1234)
    response = client.chat.completions.create(model=model, **sampling)
    texts = [c.message.content for c in response.choices]
    assert [c.index for c in response.choices] == [0, 1]
    assert texts[0] != texts[1]  # choice i samples with seed + i

    # Streamed, the same seed gives the same choices, interleaved and told apart by index.
    with http.stream("POST", "/v1/chat/completions", json={**sampling, "stream": True}) as response:
        chunks = read_events(response)[:-1]
    streamed = {0: "", 1: ""}
    finishes = {0: [], 1: []}
    for chunk in chunks:
        [choice] = chunk["choices"]
        streamed[choice["index"]] += choice["delta"].get("content") or ""
        finishes[choice["index"]].append(choice["finish_reason"])
    assert [streamed[0], streamed[1]] == texts
    assert all(f[-1] and not any(f[:-1]) for f in finishes.values())


def test_logprobs(client, model):
    response = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=3,
                                              logprobs=True, top_logprobs=2)
    content = response.choices[0].logprobs.content
    assert len(content) == 3 and "".join(t.token for t in content) == response.choices[0].message.content
    for token in content:
        assert token.logprob <= 0 and token.bytes == list(token.token.encode())
        assert len(token.top_logprobs) == 2 and token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob
        assert token.top_logprobs[0].token == token.token  # greedy: the sampled token is the top one


def test_chinese_and_emoji_stream_without_replacement_characters(client, model):
    # This prompt's greedy answer is emoji: 4 bytes each, split over several byte-level tokens.
    messages = [{"role": "user", "content": "请用中文回答：你好吗？😀"}]
    stream = client.chat.completions.create(model=model, messages=messages, stream=True, temperature=0, max_tokens=12)
    deltas = [c.choices[0].delta.content or "" for c in stream]
    assert not any("\ufffd" in d for d in deltas), deltas
    assert any(ord(ch) > 0x2E80 for ch in "".join(deltas)), deltas  # CJK or emoji came back


def test_chat_alias(http, greedy):
    response = http.post("/v1/chat", json=dict(messages=QUESTION, **GREEDY))
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == greedy.choices[0].message.content


def test_content_as_text_parts(client, model, greedy):
    parts = [{"type": "text", "text": "What is the capital "}, {"type": "text", "text": "of France?"}]
    response = client.chat.completions.create(model=model, messages=[{"role": "user", "content": parts}], **GREEDY)
    assert response.choices[0].message.content == greedy.choices[0].message.content
