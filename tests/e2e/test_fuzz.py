"""Hostile request bodies against the real server: whatever a client sends, the answer is never a 5xx
and the server keeps serving, with the same greedy output as before.

Bodies are property-based (hypothesis, derandomized so CI sees the same ones every run, no shrinking,
no example database): any JSON value, the routes' field names holding anything, valid requests, and
valid requests with one hostile value put in a field or inside one (a message's content or role, a
text part, a stop string, a logit_bias key, a prompt in a batch, ...), so validation past the first
field is exercised. Bodies are written as raw JSON text, so NaN, Infinity, lone surrogates
("\\ud800"), integers beyond Python's parsing limit and nesting deeper than its parser recurses reach
the server as a client could send them. Requests that pass validation generate at most 4 tokens; the
module takes about two minutes on two cores. `pytest -s` prints the requests sent and statuses seen.
"""

import json
from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

CHAT, COMPLETIONS, TOKENIZE, DETOKENIZE = "/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"
MAX_TOKENS = 4
GREEDY = {"messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 8, "temperature": 0}
EXAMPLES = {CHAT: 500, COMPLETIONS: 400, TOKENIZE: 150, DETOKENIZE: 100}


class Raw(str):
    """JSON text sent as it is: what json.dumps cannot write (a 5000-digit integer) or would recurse on."""


def encode(value) -> str:
    """JSON text for `value`, with NaN/Infinity as Python writes them and strings ASCII-escaped, so a
    lone surrogate travels as "\\ud800"."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {encode(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(encode(v) for v in value) + "]"
    return json.dumps(value)


# ---- hostile values ---------------------------------------------------------------------------

surrogate = st.integers(0xD800, 0xDFFF).map(chr)
texts = st.one_of(
    st.text(max_size=12),
    st.tuples(st.text(max_size=4), surrogate, st.text(max_size=4)).map("".join),
    st.sampled_from(["", " ", "\x00", "\ufffd", "<|im_start|>", "{{ messages }}", "</s>", "\U0010ffff"]),
)
numbers = st.one_of(
    st.integers(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 2, 4, 129, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**4000, 49151, 49152]),
    st.just(Raw("9" * 5000)), st.just(Raw("-" + "9" * 5000)),  # beyond Python's 4300-digit int parsing
    st.floats(),  # NaN and infinities included
    st.sampled_from([0.0, -0.0, 1e-300, 1e308, 2.0000001, -2.5, 100.5]),
)
giants = st.sampled_from([
    Raw("[" * 100_000 + "]" * 100_000),  # deeper than the JSON parser recurses
    Raw('{"a": ' * 3000 + "1" + "}" * 3000),
    Raw("[" * 900 + "]" * 900),  # parses, but deep
    "x" * 1_000_000,
    "\ud800" * 10_000,
    list(range(100_000)),
    [{"role": "user", "content": "a"}] * 5000,
    ["s"] * 1000,
    {str(i): 1 for i in range(5000)},
])
# Each known way to break a parser, a validator or an encoder, drawn often rather than by luck.
specials = st.sampled_from([
    float("nan"), float("inf"), float("-inf"), 2**63, 2**64, -(2**63) - 1, 10**4000, Raw("9" * 5000),
    -1, 0, 1e308, "\ud800", "a\udfffb", "\udbff\udc00\ud800", "", None, True, [], {}, [None], ["\ud800"],
])
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
values = st.one_of(
    specials,
    st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
                 max_leaves=8),
    giants,
)

# ---- the routes' fields: plausible values and hostile ones --------------------------------------

ROLES = ["system", "developer", "user", "assistant", "tool"]
message = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": st.text(max_size=20)})
token_ids = st.lists(st.integers(0, 49151), min_size=1, max_size=8)
hostile = st.one_of(specials, specials, values)  # mostly the known breakers, in new places

# Values a valid request could carry (with max_tokens and n kept small), by field.
PLAUSIBLE = {
    "model": st.none(),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1),
    "n": st.integers(1, 2),
    "stop": st.none() | st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=3),
    "seed": st.none() | st.integers(-(2**63), 2**63 - 2),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "logit_bias": st.dictionaries(st.integers(0, 49151).map(str), st.floats(-100, 100), max_size=3),
    "stream": st.booleans(),
    "stream_options": st.none() | st.fixed_dictionaries({"include_usage": st.booleans()}),
    "user": st.text(max_size=8),
    "top_k": st.integers(-1, 100),
    "min_p": st.floats(0, 1),
    "repetition_penalty": st.floats(0.5, 2),
    "ignore_eos": st.booleans(),
    "stop_token_ids": st.lists(st.integers(0, 49151), max_size=3),
    "priority": st.integers(-10, 10),
}
CHAT_FIELDS = {**PLAUSIBLE, "messages": st.lists(message, min_size=1, max_size=4),
               "logprobs": st.booleans(), "top_logprobs": st.none() | st.integers(0, 5),
               "tool_choice": st.just("none"), "response_format": st.just({"type": "text"})}
COMPLETION_FIELDS = {**PLAUSIBLE, "prompt": st.text(min_size=1, max_size=20) | token_ids | st.lists(
    st.text(min_size=1, max_size=10), min_size=1, max_size=3) | st.lists(token_ids, min_size=1, max_size=3),
    "logprobs": st.none() | st.integers(0, 5), "echo": st.just(False), "best_of": st.just(1)}
TOKENIZE_FIELDS = {"model": st.none(), "prompt": st.text(max_size=20), "messages": st.lists(message, min_size=1,
                   max_size=3), "add_special_tokens": st.booleans(), "add_generation_prompt": st.booleans()}
SAMPLING_EXTRAS = ["max_tokens", "max_completion_tokens"]


def key(value) -> str:
    """A hostile value as a JSON object key (keys are strings)."""
    return value if isinstance(value, str) else encode(value)


# Where a hostile value goes inside an otherwise valid request, beyond any top-level field.
INSIDE = {
    CHAT: [
        lambda v: {"messages": [{"role": "user", "content": v}]},
        lambda v: {"messages": [{"role": v, "content": "Hi"}]},
        lambda v: {"messages": [{"role": "user", "content": "Hi", "name": v}]},
        lambda v: {"messages": [{"role": "user", "content": [{"type": "text", "text": v}]}]},
        lambda v: {"messages": [{"role": "user", "content": [{"type": v, "text": "Hi"}]}]},
        lambda v: {"messages": [{"role": "system", "content": "Be brief."}, v]},
        lambda v: {"stop": [v]},
        lambda v: {"logit_bias": {"1": v}},
        lambda v: {"logit_bias": {key(v): 1}},
        lambda v: {"stop_token_ids": [v]},
        lambda v: {"stream_options": {"include_usage": v}, "stream": True},
        lambda v: {"response_format": {"type": v}},
    ],
    COMPLETIONS: [
        lambda v: {"prompt": [v]},
        lambda v: {"prompt": ["ok", v]},
        lambda v: {"prompt": [1, v]},
        lambda v: {"prompt": [[1, 2], [v]]},
        lambda v: {"stop": [v]},
        lambda v: {"logit_bias": {key(v): 1}},
        lambda v: {"logprobs": v, "stream": True},
    ],
    TOKENIZE: [
        lambda v: {"prompt": None, "messages": [{"role": "user", "content": v}]},
        lambda v: {"prompt": None, "messages": [{"role": v, "content": "Hi"}]},
        lambda v: {"prompt": None, "messages": [{"role": "user", "content": [{"type": "text", "text": v}]}]},
    ],
    DETOKENIZE: [lambda v: {"tokens": [v]}, lambda v: {"tokens": [1, v]}],
}
ROUTES = {  # a minimal valid body, the fields a valid one may add, and every field name to attack
    CHAT: ({"messages": [{"role": "user", "content": "Hi"}]}, CHAT_FIELDS,
           sorted(CHAT_FIELDS) + SAMPLING_EXTRAS + ["tools", "functions", "function_call", "modalities", "audio"]),
    COMPLETIONS: ({"prompt": "Hello"}, COMPLETION_FIELDS, sorted(COMPLETION_FIELDS) + SAMPLING_EXTRAS + ["suffix"]),
    TOKENIZE: ({"prompt": "Hello"}, TOKENIZE_FIELDS, sorted(TOKENIZE_FIELDS)),
    DETOKENIZE: ({"tokens": [1, 2, 3]}, {"model": st.none(), "tokens": token_ids}, ["model", "tokens"]),
}


@st.composite
def bodies(draw, route: str) -> object:
    base, fields, names = ROUTES[route]
    kind = draw(st.sampled_from(["value", "fields", "valid", "mutation", "mutation", "mutation", "mutation"]))
    if kind == "value":  # any JSON value at all
        return draw(values)
    if kind == "fields":  # some of the route's field names, holding anything
        return keep_short({name: draw(values) for name in draw(st.lists(st.sampled_from(names), max_size=6,
                                                                         unique=True))}, route)
    # A valid request with some plausible fields; a mutation then puts one hostile value in it.
    body = {**base, **{name: draw(fields[name])
                       for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=5, unique=True))}}
    if kind == "mutation":
        value = draw(hostile)
        if draw(st.booleans()):
            body[draw(st.sampled_from(names))] = value
        else:
            body.update(draw(st.sampled_from(INSIDE[route]))(value))
    return keep_short(body, route)


def keep_short(body: dict, route: str) -> dict:
    """Caps what a request that passes validation could generate: hostile values stay as they are."""
    if route not in (CHAT, COMPLETIONS):
        return body
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if name == "max_tokens" and value is None or _small_int(value, MAX_TOKENS, 10**6):
            body[name] = MAX_TOKENS
    if _small_int(body.get("n"), 2, 10**6):
        body["n"] = 2
    return body


def _small_int(value, low: int, high: int) -> bool:
    return type(value) is int and low < value <= high


# ---- the test ---------------------------------------------------------------------------------


def greedy_text(http: httpx.Client) -> str:
    response = http.post(CHAT, json=GREEDY)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def reference(http) -> str:
    return greedy_text(http)


@pytest.fixture(scope="module")
def statuses() -> Counter:
    """Statuses seen over the whole module, printed at its end (pytest -s)."""
    seen = Counter()
    yield seen
    print(f"\nfuzz: {sum(seen.values())} requests, statuses {dict(sorted(seen.items()))}")


@pytest.mark.parametrize("route", list(ROUTES))
def test_hostile_bodies_never_get_a_5xx(server, http, reference, statuses, route):
    seen = Counter()

    # No shrinking: a body that kills the server would shrink to nonsense against a dead one.
    @settings(max_examples=EXAMPLES[route], deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], report_multiple_bugs=False,
              suppress_health_check=list(HealthCheck))
    @given(body=bodies(route))
    def send(body):
        text = encode(body)
        try:
            response = http.post(route, content=text.encode(), headers={"content-type": "application/json"})
        except httpx.TransportError as e:
            pytest.fail(f"{route}: {type(e).__name__} ({server.process.poll()=}) for {text[:600]!r}\n{server.log()}")
        seen[response.status_code] += 1
        failed = response.status_code >= 500 or '"server_error"' in response.text
        assert not failed, f"{route}: {response.status_code} {response.text[:300]!r} for {text[:600]!r}"

    send()
    statuses.update(seen)
    print(f"\n{route}: {sum(seen.values())} requests, statuses {dict(sorted(seen.items()))}")
    assert server.process.poll() is None, server.log()
    assert http.get("/health").status_code == 200
    assert greedy_text(http) == reference, f"the greedy output changed after fuzzing {route}; statuses {seen}"
