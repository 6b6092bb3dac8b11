"""Tool calling in the API: the prompt (the default rendering, and a template that renders tools itself), the
parser on every token-boundary split of sample outputs, and the structural tags compiled by xgrammar."""

import itertools
import json
import random
import re

import pytest

from llamaserve.api.protocol import ChatCompletionRequest
from llamaserve.api.tools import (
    DEFAULT_TOOLS_PROMPT,
    HERMES,
    LLAMA,
    ToolCallDelta,
    ToolCallParser,
    call_format,
    chat_inputs,
    template_renders_tools,
    tool_calling,
)
from llamaserve.sampling_params import StructuredOutput
from llamaserve.tokenizer import BUILTIN_TEMPLATES, Tokenizer, render_chat_template

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
CALL_ID = re.compile(r"call_[0-9a-f]{24}")
CONVERSATION = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}},
    ]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "21 C"},
]

# A tools-aware template in Llama 3.1's manner: tools as JSON in the system turn, past calls as
# {"name", "parameters"} objects written with tojson, results in an "ipython" turn.
TOOLS_TEMPLATE = r"""
{%- if not tools is defined %}{% set tools = none %}{% endif -%}
{%- if tools is not none -%}
<|system|>You may call these functions:
{% for t in tools %}{{ t | tojson }}
{% endfor %}Answer with {"name": <name>, "parameters": <arguments>}.<|end|>
{% endif -%}
{%- for m in messages -%}
{%- if m.role == 'assistant' and m.tool_calls is defined -%}
<|assistant|>{% for c in m.tool_calls %}{"name": "{{ c.function.name }}", "parameters": {{ c.function.arguments | tojson }}}{% endfor %}<|end|>
{% elif m.role == 'tool' -%}
<|ipython|>{{ m.content }}<|end|>
{% else -%}
<|{{ m.role }}|>{{ m.content }}<|end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}<|assistant|>{% endif -%}
"""


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "Hi"}], **fields})


def dumped(messages):
    """Messages as serving hands them to the renderer: validated, then dumped without nulls."""
    return [m.model_dump(exclude_none=True) for m in request(messages=messages).messages]


# ---- the prompt ---------------------------------------------------------------------------------


def test_default_rendering_lists_the_tools_in_a_new_system_message():
    messages, template_tools = chat_inputs(dumped([{"role": "user", "content": "Weather?"}]), [WEATHER], None)
    assert template_tools is None
    assert messages == [
        {"role": "system", "content": DEFAULT_TOOLS_PROMPT.format(tools=json.dumps(WEATHER))},
        {"role": "user", "content": "Weather?"},
    ]
    system = messages[0]["content"]
    assert "<tools>\n" + json.dumps(WEATHER) + "\n</tools>" in system
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' in system


def test_default_rendering_merges_the_tools_into_the_system_message():
    system = {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    messages, _ = chat_inputs(dumped([system, {"role": "user", "content": "Hi"}]), [WEATHER, TIME], None)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == "Be brief.\n\n" + DEFAULT_TOOLS_PROMPT.format(
        tools=json.dumps(WEATHER) + "\n" + json.dumps(TIME))


def test_default_rendering_of_calls_and_results():
    messages, _ = chat_inputs(dumped(CONVERSATION), None, None)  # tool_choice "none": history only
    assert messages == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content":
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'},
        {"role": "user", "content": "<tool_response>\n18 C\n</tool_response>\n<tool_response>\n21 C\n</tool_response>"},
    ]
    with_text = [{**CONVERSATION[1], "content": "Checking."}]
    assert chat_inputs(dumped(with_text), None, None)[0][0]["content"].startswith("Checking.\n<tool_call>\n")


def test_llama_2_renders_a_tool_conversation():
    messages, _ = chat_inputs(dumped(CONVERSATION), [WEATHER], BUILTIN_TEMPLATES["llama-2"])
    prompt = render_chat_template(BUILTIN_TEMPLATES["llama-2"], messages)
    assert prompt.startswith("<s>[INST] <<SYS>>\n# Tools\n")
    assert '[/INST] <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert prompt.endswith("<s>[INST] <tool_response>\n18 C\n</tool_response>\n<tool_response>\n21 C\n"
                           "</tool_response> [/INST]")


def test_the_default_model_gets_the_default_rendering(default_checkpoint):
    tokenizer = Tokenizer.from_checkpoint(default_checkpoint)
    assert not template_renders_tools(tokenizer.chat_template) and call_format(tokenizer.chat_template) is HERMES
    messages, template_tools = chat_inputs(dumped(CONVERSATION), [WEATHER], tokenizer.chat_template)
    prompt = tokenizer.render_chat(messages, tools=template_tools)
    assert prompt.startswith("<|im_start|>system\n# Tools\n")
    assert "<|im_start|>user\n<tool_response>\n18 C\n</tool_response>\n<tool_response>\n21 C" in prompt
    assert "<|im_start|>tool" not in prompt


def test_a_template_that_renders_tools_gets_them_and_parsed_arguments():
    assert template_renders_tools(TOOLS_TEMPLATE) and call_format(TOOLS_TEMPLATE) is LLAMA
    messages, template_tools = chat_inputs(dumped(CONVERSATION), [WEATHER], TOOLS_TEMPLATE)
    assert template_tools == [WEATHER]
    assert messages[1]["tool_calls"][1]["function"]["arguments"] == {"city": "Rome"}  # a mapping, not text
    assert messages[2] == {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}
    prompt = render_chat_template(TOOLS_TEMPLATE, messages, tools=template_tools)
    assert prompt == (
        f"<|system|>You may call these functions:\n{json.dumps(WEATHER)}\n"
        'Answer with {"name": <name>, "parameters": <arguments>}.<|end|>\n'
        "<|user|>Weather in Paris and Rome?<|end|>\n"
        '<|assistant|>{"name": "get_weather", "parameters": {"city": "Paris"}}'
        '{"name": "get_weather", "parameters": {"city": "Rome"}}<|end|>\n'
        "<|ipython|>18 C<|end|>\n<|ipython|>21 C<|end|>\n<|assistant|>"
    )
    # tool_choice "none": the tools are not passed, and the template leaves them out
    messages, template_tools = chat_inputs(dumped(CONVERSATION), None, TOOLS_TEMPLATE)
    assert template_tools is None
    assert render_chat_template(TOOLS_TEMPLATE, messages).startswith("<|user|>")


def test_a_tools_template_writing_hermes_blocks_gets_the_hermes_format():
    assert call_format("{% for t in tools %}{{ t | tojson }}{% endfor %} answer in <tool_call></tool_call>") is HERMES
    assert call_format(None) is HERMES


def test_tool_choice_none_and_no_tools_mean_plain_text():
    assert tool_calling(request(tools=[WEATHER], tool_choice="none"), None) is None
    assert tool_calling(request(tools=[]), None) is None
    assert tool_calling(request(), None) is None
    calling = tool_calling(request(tools=[WEATHER, TIME], parallel_tool_calls=False), None)
    assert calling.choice == "auto" and not calling.parallel and calling.format is HERMES
    assert calling.tools == (WEATHER, TIME)
    named = tool_calling(request(tools=[WEATHER, TIME], tool_choice={"type": "function",
                                                                      "function": {"name": "get_time"}}), None)
    assert named.choice == "named" and named.named == "get_time" and named.parallel


# ---- the parser -----------------------------------------------------------------------------------

HERMES_SAMPLES = [
    # (generated text, content, [(name, arguments)])
    ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
     '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n',
     "Let me check.", [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {})]),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "S\\u00e3o \\"Paulo\\" }"}}\n</tool_call>',
     "", [("get_weather", {"city": 'São "Paulo" }'})]),
    # keys in another order, nested values, no whitespace, text after the call
    ('<tool_call>{"arguments":{"a":[1,{"b":"]}"}],"c":null},"name":"f"}</tool_call> Done.',
     "Done.", [("f", {"a": [1, {"b": "]}"}], "c": None})]),
    ("No call here: 1 < 2 and <tool call> is not one.\n", "No call here: 1 < 2 and <tool call> is not one.\n", []),
    ('<tool_call>\nnot JSON</tool_call> then <tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>',
     "<tool_call>\nnot JSON</tool_call> then", [("f", {})]),
    ('<tool_call>\n{"name": "f"}\n</tool_call>', "", [("f", {})]),  # no arguments: none taken
]
LLAMA_SAMPLES = [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}', "",
     [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    ('A key: {"name" is not a call.', 'A key: {"name" is not a call.', []),
]


def parse(fmt, pieces: list[str]) -> tuple[ToolCallParser, list]:
    parser = ToolCallParser(fmt)
    released = [parser.push(p) for p in pieces] + [parser.flush()]
    return parser, [item for items in released for item in items]


def check_stream(items: list, content: str, calls: list[tuple[str, dict]]) -> None:
    """What a client accumulating the stream gets, and the shape of every piece."""
    texts, streamed = [], {}
    for item in items:
        if isinstance(item, str):
            assert item, "an empty content piece"
            texts.append(item)
            continue
        assert isinstance(item, ToolCallDelta)
        if item.index not in streamed:  # the first delta names the call and carries no arguments
            assert item.index == len(streamed) and CALL_ID.fullmatch(item.id) and item.name and item.arguments == ""
            streamed[item.index] = [item.name, ""]
        else:
            assert item.id is None and item.name is None and item.arguments
            assert item.index == max(streamed)  # calls stream one after the other
            streamed[item.index][1] += item.arguments
    assert "".join(texts) == content
    assert [(name, json.loads(arguments)) for name, arguments in streamed.values()] == calls


@pytest.fixture(scope="module")
def tokenizer(default_checkpoint):
    return Tokenizer.from_checkpoint(default_checkpoint)


def token_boundaries(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    boundaries = [len(tokenizer.decode(ids[:k])) for k in range(1, len(ids))]
    assert tokenizer.decode(ids) == text and boundaries == sorted(boundaries)
    return boundaries


def pieces_at(text: str, cuts) -> list[str]:
    edges = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(edges, edges[1:])]


@pytest.mark.parametrize("fmt,sample", [(HERMES, s) for s in HERMES_SAMPLES] + [(LLAMA, s) for s in LLAMA_SAMPLES])
def test_parser_on_every_token_boundary_split(tokenizer, fmt, sample):
    text, content, calls = sample
    whole, items = parse(fmt, [text])
    assert whole.content == content
    assert [(c.name, json.loads(c.arguments)) for c in whole.calls] == calls
    check_stream(items, content, calls)
    boundaries = token_boundaries(tokenizer, text)
    splits = [list(range(1, len(text)))]  # a character at a time
    splits += [[b] for b in boundaries] + [list(pair) for pair in itertools.combinations(boundaries, 2)]
    splits += [boundaries]  # a token at a time
    rng = random.Random(0)
    splits += [sorted(rng.sample(boundaries, min(len(boundaries), rng.randint(3, 8)))) for _ in range(200)]
    for cuts in splits:
        parser, items = parse(fmt, pieces_at(text, cuts))
        check_stream(items, content, calls)
        assert [(c.name, c.arguments) for c in parser.calls] == [(c.name, c.arguments) for c in whole.calls]


def test_content_waits_only_for_what_may_start_a_call():
    parser = ToolCallParser(HERMES)
    assert parser.push("It is") == ["It is"]
    assert parser.push(" sunny <tool") == [" sunny"]  # " <tool" may open a call
    assert parser.push("s> today") == [" <tools> today"]
    assert parser.push("\n") == []  # trailing whitespace waits: it is dropped before a call
    assert parser.push("<tool_call>\n{") == []
    assert parser.push('"name": "f", "argu') == [ToolCallDelta(0, "", parser.calls[0].id, "f")]
    assert parser.push('ments": {"x": 1') == [ToolCallDelta(0, '{"x": 1')]
    assert parser.push("}}\n</tool_call>") == [ToolCallDelta(0, "}")]
    assert parser.flush() == [] and parser.content == "It is sunny <tools> today"


def test_a_call_cut_short_keeps_what_it_has():
    parser, items = parse(HERMES, ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa'])
    assert [(c.name, c.arguments) for c in parser.calls] == [("get_weather", '{"city": "Pa')]
    assert parser.finish_reason("length") == "length"
    parser, items = parse(HERMES, ['Well <tool_call>\n{"na'])  # no name yet: it was text
    assert not parser.calls and parser.content == 'Well <tool_call>\n{"na'
    assert "".join(items) == parser.content and parser.finish_reason("stop") == "stop"


def test_finish_reason_says_tool_calls_when_calls_were_made():
    parser, _ = parse(HERMES, ['<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'])
    assert parser.finish_reason("stop") == "tool_calls" and parser.finish_reason("length") == "length"
    assert len({c.id for c in parse(HERMES, [HERMES_SAMPLES[0][0]])[0].calls}) == 2  # ids are distinct


# ---- the grammar ----------------------------------------------------------------------------------


VOCAB = [chr(c) for c in range(32, 127)] + ["\n", "</s>"]  # a character a token, and a stop token


@pytest.fixture(scope="module")
def compiler():
    xgr = pytest.importorskip("xgrammar")
    return xgr.GrammarCompiler(xgr.TokenizerInfo(VOCAB, stop_token_ids=[len(VOCAB) - 1]))


def accepts(compiler, structured: StructuredOutput, text: str) -> bool:
    """Whether the grammar takes `text` whole: every character, then the stop token."""
    import xgrammar as xgr

    assert structured.kind == "structural_tag"
    matcher = xgr.GrammarMatcher(compiler.compile_structural_tag(structured.spec))
    return matcher.accept_string(text) and matcher.accept_token(len(VOCAB) - 1) and matcher.is_terminated()


def grammar(template: str | None = None, **fields) -> StructuredOutput:
    return tool_calling(request(tools=[WEATHER, TIME], **fields), template).structured_output()


def hermes_call(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


PARIS = hermes_call("get_weather", '{"city": "Paris"}')
TIME_CALL = hermes_call("get_time", "{}")


def test_the_grammar_is_plain_json_text():
    structured = grammar(tool_choice="required")
    tag = json.loads(structured.spec)
    assert tag["type"] == "structural_tag" and tag["format"]["type"] == "tags_with_separator"
    assert grammar(tool_choice="required") == structured  # canonical: one cache entry in the engine


def test_required_grammar(compiler):
    required = grammar(tool_choice="required")
    assert accepts(compiler, required, PARIS)
    assert accepts(compiler, required, PARIS + "\n" + TIME_CALL)
    assert not accepts(compiler, required, "")  # at least one call
    assert not accepts(compiler, required, "Sure. " + PARIS)  # calls only
    assert not accepts(compiler, required, hermes_call("get_wether", '{"city": "Paris"}'))
    assert not accepts(compiler, required, hermes_call("get_weather", '{"city": 7}'))
    assert not accepts(compiler, required, hermes_call("get_weather", '{"unit": "celsius"}'))  # city is required
    assert not accepts(compiler, required, hermes_call("get_weather", '{"city": "Paris"'))
    single = grammar(tool_choice="required", parallel_tool_calls=False)
    assert accepts(compiler, single, TIME_CALL)
    assert not accepts(compiler, single, PARIS + "\n" + TIME_CALL)


def test_named_grammar(compiler):
    named = grammar(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert accepts(compiler, named, hermes_call("get_weather", '{"city": "Paris", "unit": "fahrenheit"}'))
    assert not accepts(compiler, named, TIME_CALL)
    assert not accepts(compiler, named, PARIS + "\n" + PARIS)  # exactly one call
    assert not accepts(compiler, named, hermes_call("get_weather", '{"city": "Paris", "unit": "kelvin"}'))


def test_auto_grammar(compiler):
    auto = grammar()
    assert accepts(compiler, auto, "It is sunny in Paris.")
    assert accepts(compiler, auto, "Let me check.\n" + PARIS + "\n" + TIME_CALL)
    assert not accepts(compiler, auto, "Let me check.\n<tool_call>\n{\"name\": \"get_wether\"")  # a call that starts
    assert not accepts(compiler, auto, hermes_call("get_weather", '{"town": "Paris"}'))  # ... follows its schema
    assert not accepts(compiler, grammar(parallel_tool_calls=False), PARIS + "\n" + TIME_CALL)


def test_auto_with_a_response_format(compiler):
    calling = tool_calling(request(tools=[WEATHER]), None)
    answer = StructuredOutput("json", json.dumps({"type": "object", "properties": {"answer": {"type": "string"}},
                                                  "required": ["answer"]}))
    structured = calling.structured_output(answer)
    assert accepts(compiler, structured, '{"answer": "sunny"}')
    assert accepts(compiler, structured, PARIS)
    assert not accepts(compiler, structured, "It is sunny.")
    assert accepts(compiler, calling.structured_output(StructuredOutput("choice", '["yes", "no"]')), "no")


def test_llama_grammar(compiler):
    required = grammar(template=TOOLS_TEMPLATE, tool_choice="required")
    assert accepts(compiler, required, '{"name": "get_weather", "parameters": {"city": "Paris"}}')
    assert accepts(compiler, required, '{"name": "get_time", "parameters": {}}; {"name": "get_time", "parameters": {}}')
    assert not accepts(compiler, required, '{"name": "get_weather", "arguments": {"city": "Paris"}}')
    auto = grammar(template=TOOLS_TEMPLATE)
    assert accepts(compiler, auto, 'Hello {"name": "get_time", "parameters": {}}')
    assert not accepts(compiler, auto, '{"name": "get_time", "parameters": []}')


def test_strict_false_and_missing_parameters_take_any_object(compiler):
    loose = {"type": "function", "function": {**WEATHER["function"], "strict": False}}
    bare = {"type": "function", "function": {"name": "ping"}}
    structured = tool_calling(request(tools=[loose, bare], tool_choice="required"), None).structured_output()
    assert accepts(compiler, structured, hermes_call("get_weather", '{"town": ["any", "object"]}'))
    assert accepts(compiler, structured, hermes_call("ping", '{"x": 1}'))
    assert not accepts(compiler, structured, hermes_call("ping", "[1]"))


def test_what_the_grammar_allows_the_parser_reads(compiler):
    required = grammar(tool_choice="required")
    text = hermes_call("get_weather", '{ "city" : "Paris" ,"unit":"celsius"}') + "\n" + TIME_CALL
    assert accepts(compiler, required, text)
    parser, items = parse(HERMES, [text])
    check_stream(items, "", [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {})])
