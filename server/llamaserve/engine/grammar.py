"""Structured output: constraints compiled to xgrammar grammars, and the token bitmasks that keep each
constrained request inside its grammar.

Rank 0 only: EngineCore owns the GrammarManager and ModelRunner the TokenBitmask; tensor-parallel workers
never see a grammar. Nothing slow runs on the engine's step loop: xgrammar is imported and the
tokenizer's vocabulary read on a worker thread at engine start (done 1-3 s after the engine is ready on
the default model; readiness does not wait for it), every grammar is compiled on a worker thread, and
each step's bitmasks are filled on another while the forward pass runs. xgrammar releases the GIL in both.

xgrammar is imported inside the functions that need it, never at module level: importing this module
costs nothing, and an engine that never sees a constraint never loads it on its step loop.
"""

import json
import logging
import re
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from llamaserve.sampling_params import StructuredOutput

log = logging.getLogger(__name__)

# Compiled grammars kept (least recently used out first). One holds 4 KB (a one-property schema) to
# 0.5 MB (bench/structured_overhead.py's nested schema) or 1.7 MB (twenty nested objects with patterns)
# on a 49k vocabulary. Failed compiles are kept too.
DEFAULT_CACHE_SIZE = 128
# Compiles run side by side, so that one slow schema does not hold up every other constrained request.
COMPILE_THREADS = 2

_WHAT = {
    "json": "the JSON schema",
    "regex": "the regex",
    "choice": "the choice list",
    "grammar": "the grammar",
    "structural_tag": "the structural tag",
}
# xgrammar's errors read "[14:44:53] /project/cpp/json_schema_converter.cc:5082: Invalid range: ...",
# sometimes with "Check failed: (cond) is false: " next, and its JSON errors end by echoing the input.
_LOG_PREFIX = re.compile(r"^\[[\d:.]+\] \S+:\d+: ")
_CHECK_PREFIX = re.compile(r"^Check failed: .*? is false: ")
_ECHOED_INPUT = re.compile(r"\.? The JSON string is:.*$", re.DOTALL)
MAX_ERROR_CHARS = 500


class GrammarError(ValueError):
    """A constraint that cannot be used; the message says why, for the client."""


def describe_compile_error(kind: str, error: BaseException) -> str:
    """What failed and why, without xgrammar's time and source location: "the JSON schema cannot be used:
    Invalid range: minimum greater than maximum"."""
    if isinstance(error, GrammarError):
        return str(error)
    text = _LOG_PREFIX.sub("", str(error).strip())
    text = _ECHOED_INPUT.sub("", _CHECK_PREFIX.sub("", text)).strip() or type(error).__name__
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 3] + "..."
    return f"{_WHAT.get(kind, 'the constraint')} cannot be used: {text}"


def choice_grammar(spec: str) -> str:
    """EBNF that matches exactly one of the strings of a JSON list: root ::= "a" | "b"."""
    try:
        choices = json.loads(spec)
    except json.JSONDecodeError as e:
        raise GrammarError(f"the choice list cannot be used: it is not JSON ({e})") from None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise GrammarError("the choice list cannot be used: it must be a non-empty JSON list of strings")
    # JSON string literals are EBNF string literals: quotes, backslashes and control characters escaped,
    # other characters (non-ASCII included) as they are.
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in dict.fromkeys(choices))


# The vocabulary view each kind of constraint compiles against (see load_tokenizer_infos).
VIEW_OF_KIND = {"json": "json", "regex": "text", "choice": "text", "grammar": "text", "structural_tag": "tags"}


def load_tokenizer_infos(checkpoint: Path, vocab_size: int, stop_token_ids: Sequence[int]) -> dict:
    """xgrammar's views of the checkpoint's vocabulary (tokenizer.json), sized to the model's logits, by name.

    A blank token is never allowed (the stop tokens still end a finished grammar), which each view uses:
    - "text" (regex, choice, EBNF) blanks the tokenizer's special tokens. xgrammar would otherwise take
      "<|im_start|>" for text that can stand inside a match, but detokenization drops special tokens, so
      the text the client gets would break the constraint;
    - "json" also blanks every token with a control character (bytes 0x00-0x1f) in it. JSON without free
      whitespace never holds one raw (strings escape them), but xgrammar 0.2.9 lets a string with
      minLength/maxLength take any character but quote, backslash, CR and LF: "\x02" came out, which JSON
      parsers refuse;
    - "tags" (structural tags) keeps every token as the tokenizer has it: tool-call formats are often made
      of special tokens (Llama 3.1's <|python_tag|>), which a structural tag names by string or by id.
    """
    path = Path(checkpoint) / "tokenizer.json"
    if not path.is_file():
        raise GrammarError(f"structured output is unavailable: the checkpoint {checkpoint} has no tokenizer.json")
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
    stop = list(stop_token_ids) or None  # None: xgrammar finds the tokenizer's EOS itself
    tags = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop)
    encoded = [""] * vocab_size  # ids the tokenizer lacks (a padded lm_head) stay blank: never allowed
    for token, token_id in tokenizer.get_vocab().items():
        if token_id < vocab_size:
            encoded[token_id] = token
    for token_id, added in tokenizer.added_tokens_decoder.items():
        if added.special and token_id < vocab_size:
            encoded[token_id] = ""
    json_encoded = ["" if any(b < 0x20 for b in text) else token for token, text in zip(encoded, tags.decoded_vocab)]

    def info(vocab: list[str]):
        return xgr.TokenizerInfo(vocab, tags.vocab_type, vocab_size=vocab_size, stop_token_ids=tags.stop_token_ids,
                                 add_prefix_space=tags.add_prefix_space)

    return {"text": info(encoded), "json": info(json_encoded), "tags": tags}


class GrammarManager:
    """Compiles constraints on worker threads, with a bounded cache of the results keyed by the constraint.

    `compile` is called from the engine loop only (the cache needs no lock) and returns a Future at once;
    equal constraints share one Future, so n choices of a request compile once.
    """

    def __init__(self, checkpoint: Path, vocab_size: int, stop_token_ids: Sequence[int],
                 cache_size: int = DEFAULT_CACHE_SIZE):
        self._executor = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="llamaserve-grammar")
        # Started now, so that the first constrained request does not pay for it; its failure (no
        # tokenizer.json) fails every compile with its message, never the engine.
        self._compilers: Future = self._executor.submit(self._make_compilers, checkpoint, vocab_size, stop_token_ids)
        self._cache: OrderedDict[StructuredOutput, Future] = OrderedDict()
        self.cache_size = cache_size
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _make_compilers(checkpoint: Path, vocab_size: int, stop_token_ids: Sequence[int]) -> dict:
        """A compiler per vocabulary view (see load_tokenizer_infos), by view name."""
        try:
            infos = load_tokenizer_infos(checkpoint, vocab_size, stop_token_ids)
            import xgrammar as xgr
        except GrammarError:
            raise
        except Exception as e:  # a tokenizer.json that cannot be read: logged once, then every compile says so
            log.exception("structured output is unavailable")
            raise GrammarError(f"structured output is unavailable: the checkpoint's tokenizer cannot be read "
                               f"({type(e).__name__}: {e})") from e
        # xgrammar's own cache is unbounded: ours (bounded, failures included) replaces it.
        return {name: xgr.GrammarCompiler(info, max_threads=COMPILE_THREADS, cache_enabled=False)
                for name, info in infos.items()}

    def compile(self, structured: StructuredOutput) -> Future:
        """The compiled grammar of a constraint, as a Future; it raises GrammarError when the constraint
        cannot be used."""
        future = self._cache.get(structured)
        if future is not None:
            self.hits += 1
            self._cache.move_to_end(structured)
            return future
        self.misses += 1
        future = self._executor.submit(self._compile, structured)
        self._cache[structured] = future
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)  # requests still waiting on it hold their own reference
        return future

    def _compile(self, structured: StructuredOutput):
        kind, spec = structured.kind, structured.spec
        compiler = self._compilers.result()[VIEW_OF_KIND[kind]]  # raises the GrammarError of a missing tokenizer
        try:
            if kind == "json":
                # No free whitespace: a small model sampled at temperature 1 otherwise emits it forever.
                # Strict: no properties or items the schema does not name, so outputs validate.
                return compiler.compile_json_schema(spec, any_whitespace=False, strict_mode=True)
            if kind == "regex":
                return compiler.compile_regex(spec)
            if kind == "choice":
                return compiler.compile_grammar(choice_grammar(spec))
            if kind == "grammar":
                return compiler.compile_grammar(spec)
            return compiler.compile_structural_tag(spec)
        except Exception as e:
            raise GrammarError(describe_compile_error(kind, e)) from e

    @staticmethod
    def matcher(compiled):
        """A fresh matcher (one per request) over a compiled grammar; cheap, so it runs on the engine loop."""
        import xgrammar as xgr

        return xgr.GrammarMatcher(compiled)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class TokenBitmask:
    """Each step's token bitmasks for its constrained rows, filled on a worker thread while the forward
    pass runs, into one preallocated buffer (pinned on GPU, so the copy to the device is asynchronous).

    The single worker thread also keeps a step's fill from overlapping the next one's: the buffer is
    written by one fill at a time, and read by the sampler after `fill(...).result()`.
    """

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device):
        words = -(-vocab_size // 32)
        # [max_num_seqs, ceil(vocab / 32)] int32: bit j of word i set = token 32 i + j allowed
        self.buffer = torch.full((max_rows, words), -1, dtype=torch.int32, pin_memory=device.type == "cuda")
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="llamaserve-bitmask")
        self._batch = None  # xgrammar's BatchGrammarMatcher, made at the first fill (xgrammar is loaded then)

    def fill(self, matchers: list) -> Future:
        """Starts filling rows 0..len(matchers)-1; the Future's result is that view of the buffer."""
        if len(matchers) > len(self.buffer):
            raise ValueError(f"{len(matchers)} constrained rows but the bitmask holds {len(self.buffer)}")
        return self._thread.submit(self._fill, matchers)

    def _fill(self, matchers: list) -> torch.Tensor:
        if self._batch is None:
            import xgrammar as xgr

            self._batch = xgr.BatchGrammarMatcher(max_threads="auto")
        self._batch.batch_fill_next_token_bitmask(matchers, self.buffer)  # rows 0..len(matchers)-1
        return self.buffer[: len(matchers)]  # [num_constrained, ceil(vocab / 32)]
