"""TGI's native routes on the session's real server, through the real clients: huggingface_hub's
InferenceClient (text_generation plain, with details, streamed; chat_completion) and, from a venv of its own,
the `text-generation` package's Client and AsyncClient. Greedy TGI answers equal the OpenAI routes' answers
to the same prompt: one engine path."""

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import huggingface_hub
import httpx
import pytest
from huggingface_hub import InferenceClient

from tests.e2e.scrape import scrape

PROMPT = "The capital of France is"
# In the default model's chat format; its greedy answer, "2 + 2 = 4", ends with EOS after 8 tokens.
CHAT_PROMPT = "<|im_start|>user\nWhat is 2+2? Answer with a number only.<|im_end|>\n<|im_start|>assistant\n"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
TOKENS = 12


@pytest.fixture(scope="module")
def hf(server) -> InferenceClient:
    return InferenceClient(base_url=server.url, timeout=120)


@pytest.fixture(scope="module")
def greedy(client, model) -> str:
    """The /v1/completions greedy text of PROMPT."""
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=TOKENS, temperature=0).choices[0].text


@pytest.fixture(scope="module")
def detailed(hf):
    return hf.text_generation(PROMPT, max_new_tokens=TOKENS, details=True, decoder_input_details=True, top_n_tokens=2)


def assert_tgi_error(response: httpx.Response, status: int, error_type: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"} and isinstance(body["error"], str) and body["error"]
    assert body["error_type"] == error_type and "Traceback" not in body["error"]
    return body["error"]


def tgi_events(response: httpx.Response) -> list[dict]:
    """The payloads of a TGI stream: `data: {json}` events, keep-alive comments skipped, no [DONE]."""
    assert response.headers["content-type"].startswith("text/event-stream")
    body = response.read().decode()
    events = [e for e in body.strip("\n").split("\n\n") if e != ": ping"]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), body[-300:]
    assert "[DONE]" not in body
    return [json.loads(e.removeprefix("data: ")) for e in events]


def test_info_describes_the_model_and_the_limits(http, model):
    info = http.get("/info").json()
    assert info["model_id"] == model and info["model_dtype"] == "torch.float32" and info["model_device_type"] == "cpu"
    assert info["max_total_tokens"] == 2048 and info["max_input_tokens"] == 2047
    assert info["max_concurrent_requests"] == 256 and info["max_best_of"] == 128 and info["max_stop_sequences"] == 16
    assert info["version"] and info["router"] == "llamaserve" and info["model_pipeline_tag"] == "text-generation"


def test_text_generation_gives_the_completions_routes_greedy_text(hf, greedy):
    assert hf.text_generation(PROMPT, max_new_tokens=TOKENS) == greedy


def test_details_describe_every_token(detailed, greedy, http):
    assert detailed.generated_text == greedy
    details = detailed.details
    assert details.finish_reason == "length" and details.generated_tokens == len(details.tokens) == TOKENS
    assert details.seed is None  # greedy
    assert "".join(t.text for t in details.tokens if not t.special) == greedy
    assert all(t.logprob <= 0 and not t.special for t in details.tokens)
    prompt_ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    assert [t.id for t in details.prefill] == prompt_ids and "".join(t.text for t in details.prefill) == PROMPT
    assert all(t.logprob is None for t in details.prefill)  # the engine computes no prompt logprobs
    # top_n_tokens: the greedy token leads each step's alternatives, with its own logprob.
    assert len(details.top_tokens) == TOKENS and all(len(top) == 2 for top in details.top_tokens)
    for token, top in zip(details.tokens, details.top_tokens):  # huggingface_hub leaves them as dicts
        assert top[0]["id"] == token.id and top[0]["logprob"] == pytest.approx(token.logprob)
        assert top[1]["logprob"] <= top[0]["logprob"] and top[1]["id"] != token.id


def test_a_stream_gives_the_same_tokens_one_event_each(hf, detailed):
    texts = list(hf.text_generation(PROMPT, max_new_tokens=TOKENS, stream=True))
    assert texts == [t.text for t in detailed.details.tokens]

    *events, last = hf.text_generation(PROMPT, max_new_tokens=TOKENS, stream=True, details=True)
    assert [e.index for e in events + [last]] == list(range(1, TOKENS + 1))
    assert all(e.generated_text is None and e.details is None for e in events)
    assert [e.token.id for e in events + [last]] == [t.id for t in detailed.details.tokens]
    assert last.generated_text == detailed.generated_text
    assert last.details.finish_reason == "length" and last.details.generated_tokens == TOKENS
    assert last.details.input_length == len(detailed.details.prefill)


def test_eos_ends_with_eos_token_and_is_sent_as_a_special_token(hf):
    *events, last = hf.text_generation(CHAT_PROMPT, max_new_tokens=16, stream=True, details=True)
    assert last.details.finish_reason == "eos_token" and last.token.special and last.token.text == "<|im_end|>"
    assert not any(e.token.special for e in events)
    assert last.generated_text == "".join(e.token.text for e in events) and last.generated_text


def test_the_raw_stream_is_tgi_sse_and_the_compat_route_switches_on_stream(http, greedy):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}
    with http.stream("POST", "/generate_stream", json=body) as response:
        assert response.status_code == 200
        events = tgi_events(response)
    assert len(events) == 3 and set(events[0]) == {"index", "token", "top_tokens", "generated_text", "details"}
    assert set(events[0]["token"]) == {"id", "text", "logprob", "special"} and events[0]["top_tokens"] == []
    with http.stream("POST", "/", json={**body, "stream": True}) as response:
        assert [e["token"]["id"] for e in tgi_events(response)] == [e["token"]["id"] for e in events]

    answer = http.post("/", json=body).json()
    assert isinstance(answer, list) and answer == [{"generated_text": events[-1]["generated_text"]}]
    generated = http.post("/generate", json=body)
    assert generated.json() == answer[0]  # no details unless asked
    assert generated.headers["x-generated-tokens"] == "3" and int(generated.headers["x-prompt-tokens"]) == 5
    assert greedy.startswith(answer[0]["generated_text"])


def test_a_stop_sequence_ends_the_text_and_stays_in_it(hf, greedy):
    paris = greedy.index("Paris")
    stop = greedy[paris + 3: paris + 6]  # "is.": from within the token " Paris" into the next one
    answer = hf.text_generation(PROMPT, max_new_tokens=TOKENS, stop=[stop, "never"], details=True)
    assert answer.details.finish_reason == "stop_sequence"
    assert answer.generated_text == greedy[: greedy.index(stop) + len(stop)]


def test_return_full_text_and_truncate(hf, http):
    full = hf.text_generation(PROMPT, max_new_tokens=3, return_full_text=True)
    assert full == PROMPT + hf.text_generation(PROMPT, max_new_tokens=3)

    answer = hf.text_generation(PROMPT, max_new_tokens=1, truncate=2, details=True, decoder_input_details=True)
    prompt_ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    assert [t.id for t in answer.details.prefill] == prompt_ids[-2:]


def test_sampling_is_seeded_reproducibly_and_reports_its_seed(hf):
    sample = dict(max_new_tokens=4, do_sample=True, temperature=0.9, details=True)
    first, again = (hf.text_generation(PROMPT, seed=42, **sample) for _ in range(2))
    assert first.generated_text == again.generated_text and first.details.seed == 42
    drawn = hf.text_generation(PROMPT, **sample).details.seed  # TGI draws one and says which
    assert isinstance(drawn, int)
    assert hf.text_generation(PROMPT, seed=drawn, **sample).details.seed == drawn


def test_best_of_answers_with_the_likeliest_sequence(hf):
    answer = hf.text_generation(PROMPT, max_new_tokens=4, best_of=2, do_sample=True, details=True)
    [other] = answer.details.best_of_sequences

    def mean_logprob(tokens):
        return sum(t.logprob for t in tokens) / len(tokens)

    assert mean_logprob(answer.details.tokens) >= mean_logprob(other.tokens)
    assert other.seed == answer.details.seed + 1 or answer.details.seed == other.seed + 1


@pytest.mark.parametrize("parameters,says", [
    ({"temperature": 0}, "temperature"),
    ({"top_p": 1.0}, "top_p"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 5000}, "`inputs` tokens + `max_new_tokens` must be <= 2048"),
    ({"typical_p": 0.5}, "typical_p"),
    ({"watermark": True}, "watermark"),
    ({"best_of": 2}, "sampling"),
    ({"best_of": 2, "do_sample": True, "seed": 1}, "seed"),
    ({"grammar": {"type": "json", "value": "not json"}}, "JSON"),
    ({"stop": ["a"] * 17}, "stop"),
])
def test_bad_parameters_are_422_validation_errors(http, parameters, says):
    response = http.post("/generate", json={"inputs": PROMPT, "parameters": parameters})
    assert says in assert_tgi_error(response, 422, "validation")


def test_bad_requests_in_tgi_shape_on_every_tgi_route(http):
    assert_tgi_error(http.post("/generate", json={"inputs": ""}), 422, "validation")
    assert_tgi_error(http.post("/generate_stream", json={"parameters": {}}), 422, "validation")
    assert_tgi_error(http.post("/", content=b"{", headers={"content-type": "application/json"}), 422, "validation")
    body = {"inputs": PROMPT, "stream": True, "parameters": {"best_of": 2, "do_sample": True}}
    assert "stream" in assert_tgi_error(http.post("/", json=body), 422, "validation")
    assert_tgi_error(http.get("/generate"), 405, "method_not_allowed")
    error = assert_tgi_error(http.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "nope"}}),
                             404, "model_not_found")
    assert "nope" in error
    # The OpenAI routes keep OpenAI's shape.
    assert set(http.post("/v1/completions", json={"prompt": ""}).json()) == {"error"}


def test_huggingface_hub_raises_its_tgi_errors(hf):
    with pytest.raises(huggingface_hub.errors.ValidationError, match="max_new_tokens"):
        hf.text_generation(PROMPT, max_new_tokens=5000)


def test_a_deadline_is_a_408_or_ends_a_stream_with_one_tgi_error_event(http):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 1000}}
    headers = {"x-request-timeout": "0.5"}
    assert_tgi_error(http.post("/generate", json=body, headers=headers), 408, "request_timeout")
    with http.stream("POST", "/generate_stream", json=body, headers=headers) as response:
        assert response.status_code == 200
        *tokens, error = tgi_events(response)
    assert set(error) == {"error", "error_type"} and error["error_type"] == "request_timeout"
    assert all("token" in t for t in tokens) and len(tokens) < 1000


def test_chat_completion_through_huggingface_hub(hf, client, model):
    openai_answer = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=6, temperature=0)
    answer = hf.chat_completion(QUESTION, model=model, max_tokens=6, temperature=0)
    assert answer.choices[0].message.content == openai_answer.choices[0].message.content
    assert answer.usage.completion_tokens == openai_answer.usage.completion_tokens
    chunks = hf.chat_completion(QUESTION, model=model, max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer.choices[0].message.content


def test_tgi_requests_are_measured_like_the_others(http):
    before = scrape(http)
    http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}})
    after = scrape(http)
    route = {"route": "/generate", "status": "200", "method": "POST"}
    assert after.value("llamaserve_http_requests_total", **route) == before.get("llamaserve_http_requests_total",
                                                                                 **route) + 1
    assert (after.value("llamaserve_request_success_total", finished_reason="length")
            == before.get("llamaserve_request_success_total", finished_reason="length") + 1)
    assert (after.value("llamaserve_generation_tokens_total")
            == before.value("llamaserve_generation_tokens_total") + 2)


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "country": {"type": "string"}},
          "required": ["name", "country"]}


def test_a_grammar_constrains_the_text(hf):
    city = hf.text_generation("Describe Paris as JSON:", max_new_tokens=24,
                              grammar={"type": "json", "value": SCHEMA})
    assert set(json.loads(city)) == {"name", "country"}
    regex = {"type": "regex", "value": "(yes|no)"}
    answer = hf.text_generation("Is the sky blue?", max_new_tokens=3, grammar=regex, details=True)
    assert answer.generated_text in ("yes", "no") and answer.details.finish_reason == "eos_token"
    *_, last = hf.text_generation("Is the sky blue?", max_new_tokens=3, grammar=regex, stream=True, details=True)
    assert last.generated_text == answer.generated_text  # the stream opens once the grammar is accepted


def test_a_grammar_the_engine_cannot_use_is_a_422_before_any_stream(http):
    impossible = {"type": "json", "value": {"type": "integer", "minimum": 5, "maximum": 1}}
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 4, "grammar": impossible}}
    assert_tgi_error(http.post("/generate", json=body), 422, "validation")
    assert_tgi_error(http.post("/generate_stream", json=body), 422, "validation")


# ---- the `text-generation` package, from a venv of its own -----------------------------------------

CLIENT_SCRIPT = textwrap.dedent("""
    import asyncio, json, sys
    from text_generation import AsyncClient, Client
    from text_generation.errors import ValidationError

    url, prompt, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    client, out = Client(url, timeout=120), {}
    answer = client.generate(prompt, max_new_tokens=tokens)
    out["generate"] = [answer.generated_text, answer.details.finish_reason.value, len(answer.details.tokens)]
    out["stream"] = [[r.token.text, r.generated_text] for r in client.generate_stream(prompt, max_new_tokens=tokens)]
    try:
        client.generate(prompt, max_new_tokens=5000)
    except ValidationError as e:
        out["validation_error"] = str(e)

    async def with_async_client():
        client = AsyncClient(url, timeout=120)
        answer = await client.generate(prompt, max_new_tokens=tokens)
        stream = [r.token.text async for r in client.generate_stream(prompt, max_new_tokens=tokens)]
        return answer.generated_text, stream

    out["async_generate"], out["async_stream"] = asyncio.run(with_async_client())
    print(json.dumps(out))
""")
NETWORK_TROUBLE = ("No matching distribution", "Could not find a version", "Failed to establish", "Network is unreachable",
                   "Temporary failure in name resolution", "Max retries exceeded", "Connection refused")


@pytest.fixture(scope="session")
def text_generation_python(tmp_path_factory) -> Path:
    """A venv holding the `text-generation` client from PyPI: it pins huggingface_hub below 1.0, which the
    project's transformers refuses, so it cannot live beside the project."""
    venv = tmp_path_factory.mktemp("text-generation-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "text-generation"],
                             capture_output=True, text=True, timeout=600)
    if install.returncode != 0:
        if any(sign in install.stdout + install.stderr for sign in NETWORK_TROUBLE):
            pytest.skip(f"PyPI is unreachable, so the text-generation client cannot be installed: "
                        f"{(install.stderr or install.stdout).strip().splitlines()[-1]}")
        pytest.fail(f"pip install text-generation failed:\n{install.stdout}\n{install.stderr}")
    return python


def test_the_text_generation_package_clients(text_generation_python, server, greedy, tmp_path):
    script = tmp_path / "client.py"
    script.write_text(CLIENT_SCRIPT)
    tokens = 6
    started = time.monotonic()
    run = subprocess.run([str(text_generation_python), str(script), server.url, PROMPT, str(tokens)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    text, finish_reason, num_tokens = out["generate"]
    assert greedy.startswith(text) and finish_reason == "length" and num_tokens == tokens
    assert "".join(t for t, _ in out["stream"]) == text and out["stream"][-1][1] == text
    assert [g for _, g in out["stream"][:-1]] == [None] * (tokens - 1)
    assert "max_new_tokens" in out["validation_error"]
    assert out["async_generate"] == text and "".join(out["async_stream"]) == text
    assert time.monotonic() - started < 120
