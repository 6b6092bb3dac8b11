"""Writes the prompt set `llamaserve bench` ships with (server/llamaserve/bench/prompts.jsonl.gz).

    .venv/bin/python bench/make_prompt_set.py

Each entry is one request: an excerpt of real English prose (the Python language reference that CPython
ships as pydoc_data: technical text with code, like the documents people paste into a chat), an instruction
about it, and the output length the load generator asks for. Lengths follow the long-tailed spread of chat
traffic (ShareGPT-like): input tokens log-normal around a median of 200 (24 to 2,000), output tokens
log-normal around 128 (8 to 1,024), drawn independently. Token counts are the default model's
(SmolLM2-135M-Instruct's tokenizer); other tokenizers give similar counts for English. Prompts start with
their excerpt, at a random paragraph, so a prefix cache makes them little cheaper than real traffic.
Seeded: running it again writes the same file.
"""

import argparse
import gzip
import json
import math
import random
from pathlib import Path

from pydoc_data.topics import topics
from tokenizers import Tokenizer

from llamaserve.model.loader import resolve_checkpoint

OUT = Path(__file__).resolve().parent.parent / "server" / "llamaserve" / "bench" / "prompts.jsonl.gz"
CACHE_DIR = Path.home() / ".cache" / "llamaserve"
INSTRUCTIONS = [
    "Summarize the documentation above in about {words} words.",
    "Explain this text to a programmer new to Python, in about {words} words.",
    "Write about {words} words of study notes on this passage.",
    "What are the key rules described here? Answer in about {words} words.",
    "Rewrite this section as a short tutorial of about {words} words.",
    "List the main points of this reference text, about {words} words in all.",
    "I am reading this part of the Python reference. Help me understand it (about {words} words).",
    "Turn the passage into questions and answers, about {words} words in total.",
]


def lognormal(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return int(min(max(round(median * math.exp(rng.gauss(0, sigma))), low), high))


def excerpt(rng: random.Random, tokenizer: Tokenizer, budget: int) -> str:
    """About `budget` tokens of consecutive paragraphs from a random paragraph of a random topic on (into
    further topics when one ends), the last one cut at a word to fit."""
    def count(text: str) -> int:
        return len(tokenizer.encode(text).ids)

    text = ""
    while True:
        paragraphs = [p.strip() for p in topics[rng.choice(sorted(topics))].split("\n\n") if p.strip()]
        for paragraph in paragraphs[rng.randrange(len(paragraphs)):] if not text else paragraphs:
            candidate = f"{text}\n\n{paragraph}" if text else paragraph
            if count(candidate) <= budget:
                text = candidate
                continue
            words = paragraph.split(" ")
            while words and count(f"{text}\n\n{' '.join(words)}") > budget:
                words = words[: min(len(words) - 1, len(words) * 9 // 10)]
            return f"{text}\n\n{' '.join(words)}".strip() if words else text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    tokenizer = Tokenizer.from_file(str(resolve_checkpoint(None, CACHE_DIR) / "tokenizer.json"))
    rng = random.Random(args.seed)
    entries = []
    for _ in range(args.count):
        input_tokens = lognormal(rng, 200, 0.9, 24, 2000)
        output_tokens = lognormal(rng, 128, 0.8, 8, 1024)
        instruction = rng.choice(INSTRUCTIONS).format(words=max(5, int(round(output_tokens * 0.7, -1))))
        budget = input_tokens - len(tokenizer.encode(instruction).ids) - 2
        prompt = f"{excerpt(rng, tokenizer, budget)}\n\n{instruction}" if budget > 8 else instruction
        entries.append({"prompt": prompt, "input_tokens": len(tokenizer.encode(prompt).ids),
                        "output_tokens": output_tokens})
    text = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries)
    with open(args.out, "wb") as raw, gzip.GzipFile("", "wb", 9, raw, mtime=0) as f:  # the same bytes each run
        f.write(text.encode())
    ins = sorted(e["input_tokens"] for e in entries)
    outs = sorted(e["output_tokens"] for e in entries)
    print(f"{args.out}: {len(entries)} prompts, {args.out.stat().st_size // 1024} KiB; input tokens p10/p50/p90 "
          f"{ins[len(ins) // 10]}/{ins[len(ins) // 2]}/{ins[len(ins) * 9 // 10]}, output tokens "
          f"{outs[len(outs) // 10]}/{outs[len(outs) // 2]}/{outs[len(outs) * 9 // 10]}")


if __name__ == "__main__":
    main()
