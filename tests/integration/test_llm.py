"""The offline API on the embedded default model."""

import json

import pytest

from llamaserve import LLM, SamplingParams
from llamaserve.sampling_params import StructuredOutput

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm(default_checkpoint):
    return LLM(max_num_seqs=8, kv_cache_gib=0.25)


def test_chat_answers_paris(llm):
    result = llm.chat(FRANCE, SamplingParams(temperature=0, max_tokens=32))[0]
    assert "Paris" in result.text
    assert result.finish_reason == "stop"  # the model ended its answer with EOS
    assert result.token_ids[-1] in llm.engine.runner.arch.eos_token_ids


def test_results_come_back_in_prompt_order(llm):
    prompts = ["The capital of France is", [504, 3575, 282], "One, two, three,"]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (5, 9, 3)]
    results = llm.generate(prompts, params)
    assert [len(r.token_ids) for r in results] == [5, 9, 3]
    assert results[1].prompt_token_ids == [504, 3575, 282] and results[1].prompt is None
    assert all(r.finish_reason == "length" for r in results)
    # Batched generation equals each prompt generated alone.
    alone = [llm.generate([p], q)[0].token_ids for p, q in zip(prompts, params)]
    assert [r.token_ids for r in results] == alone
    assert results[0].text == llm.tokenizer.decode(results[0].token_ids)


def test_stop_string_ends_the_text_before_it(llm):
    result = llm.chat(FRANCE, SamplingParams(temperature=0, max_tokens=32, stop=["Paris"]))[0]
    assert result.finish_reason == "stop"
    assert "Paris" not in result.text and result.text.startswith("The capital of France is")


def test_prefix_cache_serves_a_repeated_conversation(llm):
    long_chat = [{"role": "system", "content": "You answer questions about geography. " * 8}] + FRANCE
    first, second = llm.chat([long_chat, long_chat], SamplingParams(temperature=0, max_tokens=8))
    again = llm.chat(long_chat, SamplingParams(temperature=0, max_tokens=8))[0]
    assert again.num_cached_tokens >= 64
    assert again.token_ids == first.token_ids == second.token_ids


def test_bad_prompt_is_refused(llm):
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[1, 2, 10**6]])


def test_structured_output_follows_its_schema_and_a_bad_one_is_refused(llm):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"]}
    params = SamplingParams(temperature=0, max_tokens=40, structured=StructuredOutput("json", json.dumps(schema)))
    result = llm.chat(FRANCE, params)[0]
    assert result.finish_reason == "stop" and set(json.loads(result.text)) == {"city", "country"}
    bad = SamplingParams(structured=StructuredOutput("regex", "("))
    with pytest.raises(ValueError, match="prompt 1: the regex cannot be used"):
        llm.generate(["One", "Two"], [SamplingParams(max_tokens=4), bad])
