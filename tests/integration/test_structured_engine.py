"""Structured output through the real engine: xgrammar grammars, compiled off the step loop, keep every
sampled token inside the constraint.

The model is a tiny random Llama with the default model's vocabulary (49,152 tokens) and its tokenizer
files copied in: steps cost milliseconds, and random weights sampled at temperature 1 favour no valid
output at all, so only the grammar keeps the text valid. The schemas bound every string, array and number,
so that each output ends well within max_tokens. Texts are decoded as the API decodes them.
"""

import asyncio
import json
import re
import shutil
import threading
from collections import defaultdict

import jsonschema
import pytest
import torch
from tokenizers import Tokenizer as Tokenizers

from llamaserve.config import EngineConfig
from llamaserve.engine.client import AsyncEngineClient
from llamaserve.engine.core import EngineCore
from llamaserve.engine.grammar import TokenBitmask
from llamaserve.engine.messages import AddRequest, RequestOutput
from llamaserve.model.sampler import forbidden_tokens
from llamaserve.sampling_params import SamplingParams, StructuredOutput
from llamaserve.tokenizer import Tokenizer
from tests.conftest import CACHE_DIR, make_tiny_checkpoint

OPTIONS = dict(num_blocks=1024, block_size=16, max_num_seqs=32, max_num_batched_tokens=1024, max_model_len=1024)

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": -1, "maximum": 1},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "minItems": 1, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address"],
}
JSON = StructuredOutput("json", json.dumps(SCHEMA))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-vocab"), vocab_size=49152, max_position_embeddings=1024,
                                seed=5)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(CACHE_DIR / "SmolLM2-135M-Instruct" / name, path / name)
    return path


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return Tokenizer.from_checkpoint(checkpoint)


def engine(checkpoint, **options) -> EngineCore:
    return EngineCore(EngineConfig.from_options(model=str(checkpoint), **{**OPTIONS, **options}))


@pytest.fixture(scope="module")
def core(checkpoint):
    """One engine for the tests that leave it idle (every request finished)."""
    return engine(checkpoint)


@pytest.fixture(scope="module")
def prompt(tokenizer):
    return tokenizer.encode("Give me a user as JSON:")


def drain(core: EngineCore) -> dict[str, list[RequestOutput]]:
    """Steps until every request, compiling ones included, has finished; each request's outputs."""
    outputs = defaultdict(list)
    while core.has_work() or core.num_compiling:
        if not core.has_work():
            assert core.wait_for_grammars(timeout=60)
        for out in core.step():
            outputs[out.request_id].append(out)
    return outputs


def generate(core: EngineCore, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[RequestOutput]]:
    for request_id, (prompt, params) in requests.items():
        assert core.add_request(AddRequest(request_id, prompt, params)) is None
    return drain(core)


def token_ids(outputs: list[RequestOutput]) -> list[int]:
    return [t for o in outputs for t in o.new_token_ids]


def texts_of(tokenizer, results: dict[str, list[RequestOutput]]) -> dict[str, str]:
    """Each finished request's text; every constrained one announced itself first and ended on its own."""
    texts = {}
    for request_id, outputs in results.items():
        notice, last = outputs[0], outputs[-1]
        assert (notice.new_token_ids, notice.finish_reason, notice.error) == ([], None, None), request_id
        assert last.finish_reason == "stop", (request_id, last)
        texts[request_id] = tokenizer.decode(token_ids(outputs))
    return texts


def sampled(structured: StructuredOutput, n: int, seed: int = 0, **params) -> list[SamplingParams]:
    params = {"temperature": 1.0, "max_tokens": 300, **params}
    return [SamplingParams(seed=seed + i, structured=structured, **params) for i in range(n)]


def test_json_schema_outputs_parse_and_validate(core, tokenizer, prompt):
    results = generate(core, {str(i): (prompt, p) for i, p in enumerate(sampled(JSON, 16))})
    texts = texts_of(tokenizer, results)
    for text in texts.values():
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts.values())) == 16  # they really sampled
    assert any("tags" in json.loads(t) for t in texts.values()) and any("score" in json.loads(t) for t in texts.values())


def test_regex_outputs_match(core, tokenizer, prompt):
    pattern = r"(cat|dog)-[0-9]{2,4}(\.[a-z]{1,3})?"
    results = generate(core, {str(i): (prompt, p) for i, p in enumerate(sampled(StructuredOutput("regex", pattern), 12))})
    texts = texts_of(tokenizer, results).values()
    assert all(re.fullmatch(pattern, t) for t in texts), texts
    assert len(set(texts)) > 6


def test_choice_outputs_are_one_of_the_choices(core, tokenizer, prompt):
    choices = ["yes", "no", 'say "hi"', "back\\slash", "naïve café", "a|b"]
    choice = StructuredOutput("choice", json.dumps(choices))
    texts = texts_of(tokenizer, generate(core, {str(i): (prompt, p) for i, p in enumerate(sampled(choice, 24))}))
    assert set(texts.values()) <= set(choices) and len(set(texts.values())) > 2


def test_ebnf_grammar_outputs_parse(core, tokenizer, prompt):
    grammar = StructuredOutput("grammar", "\n".join([
        'root ::= date (", " date){0,2}',
        'date ::= year "-" month "-" day',
        "year ::= [12] [0-9]{3}",
        'month ::= "0" [1-9] | "1" [0-2]',
        'day ::= [0-2] [0-9] | "3" [01]',
    ]))
    date = r"[12][0-9]{3}-(0[1-9]|1[0-2])-([0-2][0-9]|3[01])"
    texts = texts_of(tokenizer, generate(core, {str(i): (prompt, p) for i, p in enumerate(sampled(grammar, 12))}))
    assert all(re.fullmatch(f"{date}(, {date}){{0,2}}", t) for t in texts.values()), texts


def test_structural_tag_outputs_are_one_valid_tool_call(core, tokenizer, prompt):
    tools = {
        "get_weather": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                          "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"]},
        "get_time": {"type": "object", "properties": {"zone": {"type": "string", "pattern": "[A-Z]{3}"}},
                     "required": ["zone"]},
    }
    tags = [{"type": "tag", "begin": f"<function={name}>", "end": "</function>",
             "content": {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": 1}}
            for name, schema in tools.items()]
    tag = StructuredOutput("structural_tag", json.dumps({"type": "structural_tag", "format": {
        "type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True, "stop_after_first": True}}))
    texts = texts_of(tokenizer, generate(core, {str(i): (prompt, p) for i, p in enumerate(sampled(tag, 12))}))
    names = set()
    for text in texts.values():
        call = re.fullmatch(r"<function=(\w+)>(.*)</function>", text, re.DOTALL)
        assert call is not None, text
        names.add(call[1])
        jsonschema.validate(json.loads(call[2]), tools[call[1]])
    assert names == set(tools)


def test_a_structural_tag_can_name_a_special_token(core, tokenizer, prompt):
    """Tool-call formats are often made of special tokens: a tag may begin with one, by id or by string."""
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}
    for begin in ({"type": "token", "token": 1}, "<|im_start|>"):
        tag = StructuredOutput("structural_tag", json.dumps({"type": "structural_tag", "format": {
            "type": "tag", "begin": begin, "end": "</call>",
            "content": {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": 1}}}))
        matcher = core.grammars.matcher(core.grammars.compile(tag).result())
        vocab = core.runner.arch.vocab_size
        assert not forbidden_tokens(TokenBitmask(1, vocab, torch.device("cpu")).fill([matcher]).result(), vocab)[0, 1]
        results = generate(core, {str(i): (prompt, p) for i, p in enumerate(sampled(tag, 4))})
        for request_id, text in texts_of(tokenizer, results).items():
            if token_ids(results[request_id])[0] != 1:  # <|im_start|> itself, which the text drops
                # By string, the tag may also come spelled in ordinary tokens ("<", "|", "im", ...).
                assert begin == "<|im_start|>" and text.startswith(begin), text
                text = text.removeprefix(begin)
            assert re.fullmatch(r'\{\s?"n"\s?:\s?[0-9]\s?\}</call>', text), text  # one space at most


def test_special_and_control_tokens_never_enter_a_json_string(checkpoint, core):
    """Detokenization drops special tokens, and JSON refuses raw control characters: neither may be sampled
    inside a string (xgrammar alone allows both, control characters in length-bounded strings)."""
    special = [i for i, t in Tokenizers.from_file(str(checkpoint / "tokenizer.json")).get_added_tokens_decoder().items()
               if t.special]
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 8}}, "required": ["s"]}
    matcher = core.grammars.matcher(core.grammars.compile(StructuredOutput("json", json.dumps(schema))).result())
    assert matcher.accept_string('{"s": "ab')
    vocab = core.runner.arch.vocab_size
    allowed = ~forbidden_tokens(TokenBitmask(1, vocab, torch.device("cpu")).fill([matcher]).result(), vocab)[0]
    control = [192, 197, 198]  # "\x02", "\t", "\n"
    assert len(special) == 17 and not allowed[special].any() and not allowed[control].any()
    assert allowed.sum() > 20000  # every other token of up to 6 characters may go on


def test_unconstrained_requests_beside_constrained_ones_keep_their_solo_tokens(core, prompt):
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True)
    free = {"greedy": (prompt, greedy), "seeded": (prompt[2:], seeded), "short": (prompt[:3], greedy)}
    solo = {request_id: token_ids(generate(core, {request_id: request})[request_id])
            for request_id, request in free.items()}
    constrained = {f"json{i}": (prompt, p) for i, p in enumerate(sampled(JSON, 6))}
    mixed = generate(core, {**constrained, **free})
    assert {request_id: token_ids(mixed[request_id]) for request_id in free} == solo
    assert all(mixed[request_id][0].new_token_ids for request_id in free)  # no notice for free text


UNUSABLE = {  # kind, spec -> the start of the error the client gets
    ("json", '{"type": "integer", "minimum": 5, "maximum": 1}'):
        "the JSON schema cannot be used: Invalid range: minimum greater than maximum",
    ("json", "{not json"): "the JSON schema cannot be used: Failed to parse JSON: syntax error",
    ("regex", "a(b"): "the regex cannot be used: Regex parsing error at position 4: The parenthesis is not closed.",
    ("grammar", "root ::= foo"): 'the grammar cannot be used: EBNF parser error at line 1, column 10: Rule "foo" is',
    ("choice", '{"a": 1}'): "the choice list cannot be used: it must be a non-empty JSON list of strings",
    ("choice", "[]"): "the choice list cannot be used: it must be a non-empty JSON list of strings",
    ("structural_tag", '{"type": "structural_tag"}'): "the structural tag cannot be used: Invalid structural tag",
}


def test_constraints_that_cannot_be_used_are_refused_and_the_engine_serves_on(core, tokenizer, prompt):
    good = StructuredOutput("regex", "[0-9]{4}")
    for attempt in range(2):  # failures are cached: the second round compiles nothing
        misses = core.grammars.misses
        bad = {f"bad{i}": (prompt, SamplingParams(structured=StructuredOutput(*key))) for i, key in enumerate(UNUSABLE)}
        results = generate(core, {**bad, "good": (prompt, sampled(good, 1, seed=attempt)[0])})
        for request_id, error in zip(bad, UNUSABLE.values()):
            [refusal] = results[request_id]
            assert (refusal.new_token_ids, refusal.finish_reason, refusal.error_type) == ([], "error", "invalid_request")
            assert refusal.error.startswith(error) and "/project/" not in refusal.error, refusal.error
        assert re.fullmatch("[0-9]{4}", texts_of(tokenizer, {"good": results["good"]})["good"])
        assert core.grammars.misses == misses + (len(UNUSABLE) + 1 if attempt == 0 else 0)


def test_abort_while_compiling_leaves_nothing_behind(core, prompt):
    schema = StructuredOutput("json", json.dumps({"type": "array", "items": {"type": "integer"}, "maxItems": 4}))
    assert core.add_request(AddRequest("gone", prompt, SamplingParams(structured=schema))) is None
    assert core.num_compiling == 1
    core.abort(["gone"])
    assert core.num_compiling == 0 and core.has_work()  # the abort is reported at the next step
    [aborted] = core.step()
    assert (aborted.request_id, aborted.finish_reason, aborted.new_token_ids) == ("gone", "abort", [])
    assert not core.has_work() and core.stats.num_waiting == 0
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks
    hits = core.grammars.hits
    results = generate(core, {"again": (prompt, SamplingParams(structured=schema, max_tokens=100))})
    assert core.grammars.hits == hits + 1  # the aborted request's compile went on into the cache
    assert results["again"][-1].finish_reason == "stop"


def test_n_requests_of_one_constraint_compile_once_with_a_matcher_each(core, tokenizer, prompt):
    regex = StructuredOutput("regex", "[a-z]{3}-[0-9]{3}")
    misses, hits = core.grammars.misses, core.grammars.hits
    texts = texts_of(tokenizer, generate(core, {str(i): (prompt, p) for i, p in enumerate(sampled(regex, 8))}))
    assert (core.grammars.misses, core.grammars.hits) == (misses + 1, hits + 7)
    assert len(set(texts.values())) == 8 and all(re.fullmatch("[a-z]{3}-[0-9]{3}", t) for t in texts.values())


def test_preemption_keeps_constrained_output_valid_and_unchanged(checkpoint, core, tokenizer, prompt):
    greedy = SamplingParams(temperature=0, max_tokens=120, structured=JSON)
    requests = {str(i): (prompt[i:] + prompt[:i], greedy) for i in range(6)}
    # Batched, in a pool that never runs short (batching never changes greedy tokens: test_engine.py).
    alone = {request_id: token_ids(outputs) for request_id, outputs in generate(core, requests).items()}
    tight = engine(checkpoint, num_blocks=40, block_size=4)  # 160 slots for 6 requests of ~85 tokens
    results = generate(tight, requests)
    assert tight.stats.preemptions > 0
    assert {request_id: token_ids(outputs) for request_id, outputs in results.items()} == alone
    for text in texts_of(tokenizer, results).values():
        jsonschema.validate(json.loads(text), SCHEMA)
    tight.block_manager.check_integrity()


def test_constraints_compose_with_bias_penalties_and_logprobs(core, tokenizer, prompt):
    yes, maybe = tokenizer.encode("yes", add_special_tokens=False), tokenizer.encode("maybe", add_special_tokens=False)
    choice = StructuredOutput("choice", json.dumps(["yes", "no"]))
    # A bias beyond any logit forces an allowed token and cannot revive a forbidden one.
    biased = sampled(choice, 8, logit_bias={yes[0]: 50.0, maybe[0]: 100.0})
    penalized = sampled(JSON, 4, seed=100, repetition_penalty=1.5, frequency_penalty=1.0, presence_penalty=0.5)
    logprobs = sampled(JSON, 2, seed=200, logprobs=3)
    requests = {**{f"bias{i}": (prompt, p) for i, p in enumerate(biased)},
                **{f"pen{i}": (prompt, p) for i, p in enumerate(penalized)},
                **{f"lp{i}": (prompt, p) for i, p in enumerate(logprobs)}}
    results = generate(core, requests)
    texts = texts_of(tokenizer, results)
    assert {texts[f"bias{i}"] for i in range(8)} == {"yes"}
    for request_id, text in texts.items():
        if not request_id.startswith("bias"):
            jsonschema.validate(json.loads(text), SCHEMA)
    for i in range(2):
        outputs = results[f"lp{i}"][1:]
        assert all(len(o.logprobs) == 1 and len(o.logprobs[0].top) == 3 for o in outputs)
        # The last token is EOS, the only one a finished grammar allows: all the mass is on it.
        last = outputs[-1].logprobs[0]
        assert last.logprob == 0.0 and last.top[0] == (outputs[-1].new_token_ids[0], 0.0)
        assert [lp for _, lp in last.top[1:]] == [float("-inf")] * 2


def test_a_seeded_constrained_request_draws_the_same_tokens_whatever_the_batch(core, prompt):
    [mine] = sampled(JSON, 1, seed=1234)
    alone = token_ids(generate(core, {"mine": (prompt, mine)})["mine"])
    crowd = {f"c{i}": (prompt, p) for i, p in enumerate(sampled(JSON, 3, seed=50))}
    crowd["free"] = (prompt, SamplingParams(temperature=1.3, max_tokens=20, ignore_eos=True))
    assert token_ids(generate(core, {**crowd, "mine": (prompt, mine)})["mine"]) == alone


def test_a_finished_compile_wakes_the_engine(checkpoint, prompt):
    woken = threading.Event()
    core = EngineCore(EngineConfig.from_options(model=str(checkpoint), **OPTIONS), wake=woken.set)
    schema = StructuredOutput("json", json.dumps({"type": "array", "items": {"enum": [1, 2]}, "maxItems": 2}))
    assert core.add_request(AddRequest("a", prompt, SamplingParams(structured=schema))) is None
    assert woken.wait(timeout=60) and core.has_work()
    assert drain(core)["a"][-1].finish_reason == "stop"


def test_a_checkpoint_without_a_tokenizer_refuses_constraints_only(tmp_path):
    core = engine(make_tiny_checkpoint(tmp_path, max_position_embeddings=1024))
    free = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    results = generate(core, {"json": ([5, 6, 7], SamplingParams(structured=JSON)), "free": ([5, 6, 7], free)})
    [refusal] = results["json"]
    assert refusal.error_type == "invalid_request"
    assert refusal.error == f"structured output is unavailable: the checkpoint {tmp_path} has no tokenizer.json"
    assert len(token_ids(results["free"])) == 4


def test_the_engine_process_announces_a_compiled_grammar_before_its_tokens(checkpoint, tokenizer, prompt):
    """Through the real engine loop: it sleeps on its inbox while the grammar compiles, and the compile wakes
    it; the empty notice comes first (the API opens its stream on it), a refusal alone."""
    config = EngineConfig.from_options(model=str(checkpoint), **OPTIONS)

    async def main():
        client = await AsyncEngineClient.start(config)
        try:
            good = [o async for o in client.generate("good", prompt, sampled(JSON, 1)[0])]
            bad = [o async for o in client.generate("bad", prompt, SamplingParams(
                structured=StructuredOutput("regex", "(")))]
            return good, bad
        finally:
            client.shutdown()

    good, bad = asyncio.run(asyncio.wait_for(main(), timeout=120))
    jsonschema.validate(json.loads(texts_of(tokenizer, {"good": good})["good"]), SCHEMA)
    [refusal] = bad
    assert refusal.finish_reason == "error" and refusal.error_type == "invalid_request"
