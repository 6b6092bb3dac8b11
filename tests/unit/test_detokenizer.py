"""Streaming detokenization equals a full decode: byte-level BPE (the default model) and a Llama 2 style
SentencePiece tokenizer whose Chinese and emoji go through byte fallback."""

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from llamaserve.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = {
    "english": "Hello world! The quick brown fox jumps over the lazy dog.\nTwo  spaces,\ttab and 3.14 numbers.",
    "chinese": "你好，世界！今天天气很好。",
    "emoji": "I ❤️ 🦙 and 👨‍👩‍👧 families 🎉",
}
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today? I am fine, thank you.",
    "Llamas are friendly animals and they live in families in the mountains.",
]


def make_sentencepiece_checkpoint(path: Path) -> Path:
    """A tokenizer laid out like Llama 2's tokenizer.json: BPE with byte fallback over <0x00>..<0xFF>,
    "▁" for spaces with one prepended, a decoder that strips the first space, BOS added by encode."""
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    # Learn merges on a small English corpus, then rebuild the vocab in Llama's order: specials, bytes, merges.
    trained = BackendTokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = metaspace
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    trained.train_from_iterator(CORPUS * 10, trainer)
    model = json.loads(trained.to_str())["model"]
    learned = [t for t in sorted(model["vocab"], key=model["vocab"].get) if t not in specials]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)] + learned)}
    merges = [tuple(m) for m in model["merges"]]

    backend = BackendTokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    backend.add_special_tokens(specials)
    backend.pre_tokenizer = metaspace
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["byte-level-bpe", "sentencepiece"])
def tokenizer(request, default_checkpoint, tmp_path_factory) -> Tokenizer:
    if request.param == "byte-level-bpe":
        return Tokenizer.from_checkpoint(default_checkpoint)
    return Tokenizer.from_checkpoint(make_sentencepiece_checkpoint(tmp_path_factory.mktemp("sp")))


def stream(detokenizer: IncrementalDetokenizer, ids: list[int], group_sizes=None) -> list[str]:
    deltas, i = [], 0
    while i < len(ids):
        n = next(group_sizes) if group_sizes else 1
        deltas.append(detokenizer.push(ids[i : i + n]))
        i += n
    return deltas


def assert_clean(deltas: list[str], expected: str):
    assert "".join(deltas) == expected
    assert not any("\ufffd" in d for d in deltas), deltas


@pytest.mark.parametrize("name", TEXTS)
def test_one_token_at_a_time(tokenizer, name):
    ids = tokenizer.encode(TEXTS[name], add_special_tokens=False)
    deltas = stream(IncrementalDetokenizer(tokenizer), ids)
    assert_clean(deltas, tokenizer.decode(ids))
    assert tokenizer.decode(ids) == TEXTS[name]


@pytest.mark.parametrize("name", TEXTS)
@pytest.mark.parametrize("seed", range(5))
def test_random_groups(tokenizer, name, seed):
    rng = random.Random(seed)
    ids = tokenizer.encode(TEXTS[name], add_special_tokens=False)
    deltas = stream(IncrementalDetokenizer(tokenizer), ids, iter(lambda: rng.randint(1, 4), None))
    assert_clean(deltas, tokenizer.decode(ids))


@pytest.mark.parametrize("name", ["chinese", "emoji"])
def test_texts_split_characters_across_tokens(tokenizer, name):
    """The hard case is really exercised: some single tokens are partial UTF-8 characters."""
    ids = tokenizer.encode(TEXTS[name], add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_tokens(tokenizer, skip_special_tokens):
    text_ids = tokenizer.encode(TEXTS["emoji"] + " " + TEXTS["chinese"], add_special_tokens=False)
    half = len(text_ids) // 2
    ids = [tokenizer.bos_token_id, *text_ids[:half], tokenizer.eos_token_id, *text_ids[half:], tokenizer.eos_token_id]
    deltas = stream(IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens), ids)
    assert_clean(deltas, tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))


@pytest.mark.parametrize("name", TEXTS)
def test_after_prompt(tokenizer, name):
    """Deltas after a prompt are exactly the text the output adds to the prompt's decode."""
    ids = tokenizer.encode("Hello there, how are you? " + TEXTS[name])
    prompt, output = ids[:6], ids[6:]
    deltas = stream(IncrementalDetokenizer(tokenizer, prompt_token_ids=prompt), output)
    full, prompt_text = tokenizer.decode(ids), tokenizer.decode(prompt)
    assert full.startswith(prompt_text)
    assert_clean(deltas, full[len(prompt_text) :])


def test_after_prompt_keeps_leading_space_sentencepiece(tmp_path):
    tokenizer = Tokenizer.from_checkpoint(make_sentencepiece_checkpoint(tmp_path))
    prompt = tokenizer.encode("Hello there,")
    output = tokenizer.encode("Hello there, how are you?")[len(prompt) :]
    assert tokenizer.decode(output) == "how are you?"  # decoded alone, SentencePiece drops the space
    deltas = stream(IncrementalDetokenizer(tokenizer, prompt_token_ids=prompt), output)
    assert deltas[0].startswith(" ")
    assert "".join(deltas) == " how are you?"


class RecordingTokenizer:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def decode(self, ids, skip_special_tokens=True):
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_cost_per_token_is_bounded_by_the_window(tokenizer):
    prompt = tokenizer.encode("Hello there, how are you?")
    output = tokenizer.encode(" ".join(TEXTS.values()) * 20, add_special_tokens=False)
    recorder = RecordingTokenizer(tokenizer)
    deltas = stream(IncrementalDetokenizer(recorder, prompt_token_ids=prompt), output)
    assert "".join(deltas) == tokenizer.decode(prompt + output)[len(tokenizer.decode(prompt)) :]
    assert max(recorder.lengths) <= 8  # a character is at most 4 byte tokens, plus the previous chunk
