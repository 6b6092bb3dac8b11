"""The prompt set shipped with the package (written by bench/make_prompt_set.py): 384 requests of real prose,
input lengths log-normal around 200 tokens (24 to 2,000), output lengths log-normal around 128 (8 to 1,024)."""

import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path

PROMPT_SET = Path(__file__).with_name("prompts.jsonl.gz")


@dataclass(frozen=True)
class PromptSpec:
    prompt: str
    input_tokens: int  # by the default model's tokenizer, as the set was written
    output_tokens: int  # what the request asks for (max_tokens)


def load_prompts(path: Path = PROMPT_SET) -> list[PromptSpec]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [PromptSpec(**json.loads(line)) for line in f]


def sample_prompts(prompts: list[PromptSpec], count: int, seed: int, max_input_tokens: int | None = None,
                   max_output_tokens: int | None = None) -> list[PromptSpec]:
    """`count` requests drawn from the set (without replacement while it lasts), the same ones for the same
    seed, so every server compared gets the same requests. Prompts longer than `max_input_tokens` are left
    out; outputs are capped at `max_output_tokens`."""
    pool = [p for p in prompts if max_input_tokens is None or p.input_tokens <= max_input_tokens]
    if not pool:
        raise ValueError(f"no prompt of the set has at most {max_input_tokens} input tokens")
    rng = random.Random(seed)
    chosen: list[PromptSpec] = []
    while len(chosen) < count:
        chosen += rng.sample(pool, min(len(pool), count - len(chosen)))
    if max_output_tokens is not None:
        chosen = [PromptSpec(p.prompt, p.input_tokens, min(p.output_tokens, max_output_tokens)) for p in chosen]
    return chosen
