"""Chat templates: Meta's Llama 2 format byte for byte, the sandbox, the checkpoint's own template against
transformers, and the BOS rule."""

import datetime
import json
import shutil

import pytest

from llamaserve.tokenizer import BUILTIN_TEMPLATES, ChatTemplateError, Tokenizer, render_chat_template

from .test_detokenizer import make_sentencepiece_checkpoint

LLAMA_2 = BUILTIN_TEMPLATES["llama-2"]
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
THREE_TURNS = [
    SYSTEM,
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": " Hello! How can I help?  "},
    {"role": "user", "content": "What is a llama?\n"},
    {"role": "assistant", "content": "A South American camelid."},
    {"role": "user", "content": "  Thanks!"},
]


@pytest.fixture(scope="module")
def sentencepiece_checkpoint(tmp_path_factory):
    return make_sentencepiece_checkpoint(tmp_path_factory.mktemp("sp"))


def test_llama_2_one_turn():
    rendered = render_chat_template(LLAMA_2, [{"role": "user", "content": " What is the capital of France? "}])
    assert rendered == "<s>[INST] What is the capital of France? [/INST]"


def test_llama_2_system_and_one_turn():
    rendered = render_chat_template(LLAMA_2, [SYSTEM, {"role": "user", "content": "What is the capital of France?"}])
    assert rendered == (
        "<s>[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nWhat is the capital of France? [/INST]"
    )


def test_llama_2_three_turns():
    assert render_chat_template(LLAMA_2, THREE_TURNS) == (
        "<s>[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nHi there! [/INST] Hello! How can I help? </s>"
        "<s>[INST] What is a llama? [/INST] A South American camelid. </s>"
        "<s>[INST] Thanks! [/INST]"
    )


def test_text_parts_equal_string_content():
    as_parts = [
        {**m, "content": [{"type": "text", "text": m["content"][:3]}, {"type": "text", "text": m["content"][3:]}]}
        for m in THREE_TURNS
    ]
    assert render_chat_template(LLAMA_2, as_parts) == render_chat_template(LLAMA_2, THREE_TURNS)
    assert as_parts[1]["content"][0] == {"type": "text", "text": "Hi "}  # the caller's messages are not modified


def test_non_text_parts_are_rejected():
    image = {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}
    with pytest.raises(ValueError, match="image_url"):
        render_chat_template(LLAMA_2, [{"role": "user", "content": [image]}])


@pytest.mark.parametrize(
    "roles",
    [
        ["assistant"],
        ["user", "user"],
        ["system", "assistant", "user"],
        ["user", "assistant", "assistant"],
        ["user", "tool"],
        ["system"],
        [],
    ],
)
def test_llama_2_wrong_role_order(roles):
    with pytest.raises(ChatTemplateError, match="llama-2"):
        render_chat_template(LLAMA_2, [{"role": r, "content": "x"} for r in roles])


def test_llama_2_generation_needs_a_final_user_message():
    messages = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(ChatTemplateError, match="last message"):
        render_chat_template(LLAMA_2, messages)
    assert render_chat_template(LLAMA_2, messages, add_generation_prompt=False) == "<s>[INST] u [/INST] a </s>"


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ messages.__class__ }}",
        "{{ messages['__class__'] }}",
        "{{ raise_exception.__globals__ }}",
        "{{ '{0.__class__}'.format(messages) }}",
        "{% set _ = messages.append(1) %}",
        "{{ lipsum.__globals__['os'].system('echo pwned') }}",
    ],
)
def test_template_cannot_reach_python_internals(template):
    with pytest.raises(ChatTemplateError):
        render_chat_template(template, [{"role": "user", "content": "hi"}])


def test_template_errors_become_chat_template_errors():
    with pytest.raises(ChatTemplateError, match="custom failure"):
        render_chat_template("{{ raise_exception('custom failure') }}", [])
    with pytest.raises(ChatTemplateError, match="compile"):
        render_chat_template("{% for %}", [])


def test_template_helpers():
    template = "{{ strftime_now('%Y') }} {{ messages[0] | tojson }}"
    rendered = render_chat_template(template, [{"role": "user", "content": "<é>"}])
    assert rendered == f'{datetime.date.today().year} {{"role": "user", "content": "<é>"}}'


def test_default_checkpoint_template_matches_transformers(default_checkpoint):
    from transformers import AutoTokenizer

    tokenizer = Tokenizer.from_checkpoint(default_checkpoint)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert tokenizer.render_chat(messages) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    reference = AutoTokenizer.from_pretrained(default_checkpoint)
    for conversation in (messages, THREE_TURNS):
        expected = reference.apply_chat_template(
            conversation, tokenize=True, add_generation_prompt=True, return_dict=False
        )
        assert tokenizer.apply_chat_template(conversation) == list(expected)
    assert tokenizer.eos_token_ids == {tokenizer.eos_token_id} == {reference.eos_token_id}
    assert tokenizer.vocab_size == len(reference)


def test_llama_2_template_gives_one_bos_per_turn(sentencepiece_checkpoint):
    tokenizer = Tokenizer.from_checkpoint(sentencepiece_checkpoint, chat_template="llama-2")
    assert tokenizer.encode("hi")[0] == tokenizer.bos_token_id  # this tokenizer adds BOS by itself
    ids = tokenizer.apply_chat_template(THREE_TURNS)
    bos = tokenizer.bos_token_id
    assert ids[0] == bos and ids[1] != bos
    assert ids.count(bos) == 3  # one per user turn, from the template's "<s>"
    assert ids.count(tokenizer.eos_token_id) == 2  # one per completed answer
    assert tokenizer.decode(ids, skip_special_tokens=False).startswith("<s> [INST] <<SYS>>")


def test_template_without_bos_keeps_the_tokenizers_bos(sentencepiece_checkpoint, tmp_path):
    (tmp_path / "plain.jinja").write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    tokenizer = Tokenizer.from_checkpoint(sentencepiece_checkpoint, chat_template=tmp_path / "plain.jinja")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hello world"}])
    assert ids == tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": "Hello world"}]))
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def test_missing_template_fails_only_when_chat_is_requested(sentencepiece_checkpoint):
    tokenizer = Tokenizer.from_checkpoint(sentencepiece_checkpoint)  # this checkpoint has no template
    assert tokenizer.decode(tokenizer.encode("Hello world")) == "Hello world"
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_unknown_template_name(sentencepiece_checkpoint):
    with pytest.raises(ValueError, match="llama-2"):
        Tokenizer.from_checkpoint(sentencepiece_checkpoint, chat_template="llama-7")


def test_generation_eos_ids_are_included(sentencepiece_checkpoint, tmp_path):
    checkpoint = shutil.copytree(sentencepiece_checkpoint, tmp_path / "ckpt")
    (checkpoint / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    tokenizer = Tokenizer.from_checkpoint(checkpoint)
    assert tokenizer.eos_token_id == 2
    assert tokenizer.eos_token_ids == {2, 7}
