"""How one request wants its tokens chosen and when it stops (the engine sees token ids only)."""

import math
from dataclasses import dataclass, field
from typing import Literal

# Dividing logits by a smaller temperature overflows float32 or divides by a denormal; the
# distribution is a one-hot at the argmax long before, so such requests are served greedily.
GREEDY_TEMPERATURE = 1e-5


StructuredKind = Literal["json", "regex", "choice", "grammar", "structural_tag"]


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the generated text; the engine compiles it to a grammar (xgrammar) and masks every
    token that would break it. Equal constraints are one cache entry, so `spec` is canonical text."""

    kind: StructuredKind
    # json: a JSON Schema, as JSON text; regex: the pattern; choice: a JSON list of the allowed strings;
    # grammar: EBNF (GBNF) text; structural_tag: xgrammar's structural tag, as JSON text
    spec: str

    def __post_init__(self):
        if self.kind not in ("json", "regex", "choice", "grammar", "structural_tag"):
            raise ValueError(f"structured output kind {self.kind!r} is not one of json, regex, choice, grammar, "
                             "structural_tag")
        if not isinstance(self.spec, str):
            raise ValueError("a structured output's spec must be text")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # below GREEDY_TEMPERATURE (0 included) means greedy
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p; 0: greedy
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 keeps all
    min_p: float = 0.0  # drop tokens whose probability is below min_p x the top token's
    repetition_penalty: float = 1.0  # >1 discourages tokens already in the prompt or output (CTRL style)
    presence_penalty: float = 0.0  # subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence of a token already generated
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    seed: int | None = None  # the same seed gives the same tokens whatever else shares the batch
    max_tokens: int | None = 16  # None: until EOS or the model's context is full
    stop: tuple[str, ...] = ()  # stop strings, matched on the detokenized text (API side)
    stop_token_ids: frozenset[int] = frozenset()  # generation ends when one of these is sampled (a set: O(1) a token)
    ignore_eos: bool = False  # keep generating past the model's EOS token
    logprobs: int | None = None  # return the sampled token's logprob and this many top alternatives
    skip_special_tokens: bool = True  # detokenization drops special tokens
    structured: StructuredOutput | None = None  # a grammar the output must follow; None: free text

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", frozenset(self.stop_token_ids))
        object.__setattr__(self, "logit_bias", {int(k): float(v) for k, v in self.logit_bias.items()})
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        floats = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
        for name in floats:
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number")
        if not all(math.isfinite(v) for v in self.logit_bias.values()):
            raise ValueError("logit_bias values must be finite numbers")
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 <= self.top_p <= 1, "top_p must be in [0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (or -1 to disable)"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be >= 1"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
        ]
        if self.structured is not None and self.ignore_eos:
            # A finished grammar allows only EOS: ignoring it would leave nothing to sample.
            checks.append((False, "ignore_eos cannot be combined with structured output"))
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1 or self.top_p == 0

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0
