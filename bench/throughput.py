"""Offline throughput: the llamaserve engine against transformers `generate` on the same weights.

    .venv/bin/python bench/throughput.py [--dtype bfloat16] [--baseline-requests 8] [--json out.json]

Every system gets the same prompts as token ids (slices of a fixed paragraph at distinct offsets,
lengths 16-512 from a fixed seed) and greedily generates exactly `--output-len` tokens each.
Output tokens/s = generated tokens / wall seconds, prefill included.
"""

import argparse
import json
import os
import platform
import random
import subprocess
import time
from datetime import datetime, timezone

import torch
from transformers import LlamaForCausalLM

from llamaserve import LLM, SamplingParams

PARAGRAPH = (
    "The lighthouse keeper climbed the spiral stairs each evening at dusk, carrying a tin of oil and a "
    "notebook in which he recorded the wind, the colour of the sea and the names of passing ships. Over "
    "forty years the notebooks filled a whole shelf in the cottage below. Scientists from the university "
    "later discovered that his careful observations, written in pencil by the light of the lamp, formed "
    "one of the longest continuous weather records on the northern coast. They used the data to study "
    "how storms had changed, how the fishing seasons had shifted and why certain winters brought ice to "
    "the harbour while others stayed mild. The keeper never thought of himself as a scientist; he simply "
    "believed that anything worth watching was worth writing down, and that the sea, like people, "
    "revealed its habits only to those who paid attention for a very long time."
)


def make_prompts(tokenizer, num_prompts: int, min_len: int, max_len: int, seed: int) -> list[list[int]]:
    """Slices of the repeated paragraph; distinct start offsets so no two prompts share a prefix."""
    rng = random.Random(seed)
    period = tokenizer.encode(" " + PARAGRAPH, add_special_tokens=False)
    stream = period * (max_len // len(period) + 2)
    offsets = rng.sample(range(len(period)), num_prompts)
    return [stream[o : o + rng.randint(min_len, max_len)] for o in offsets]


class Timer:
    """Wall seconds, and this process's CPU seconds: cpu/wall well under the thread count means
    something else was competing for the cores (the figures are then not trustworthy)."""

    def __enter__(self):
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        self.cpu_seconds = time.process_time() - self.cpu_start


def run_engine(llm: LLM, prompts: list[list[int]], output_len: int) -> tuple[list[list[int]], Timer]:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    with Timer() as timer:
        results = llm.generate(prompts, params)
    return [r.token_ids for r in results], timer


@torch.inference_mode()
def hf_generate(model, batch: list[list[int]], output_len: int, pad_id: int) -> list[list[int]]:
    """One padded batch through transformers `generate`: left padding, greedy. No EOS stops it
    (eos_token_id=None): EOS is chosen like any other token, as the engine's ignore_eos does;
    min_new_tokens would instead forbid EOS and change the greedy tokens."""
    width = max(map(len, batch))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])  # [batch, width]
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    out = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=output_len,
        pad_token_id=pad_id, eos_token_id=None,
    )
    return out[:, width:].tolist()


def run_hf(model, prompts: list[list[int]], batch_size: int, output_len: int, pad_id: int) -> tuple[list, Timer]:
    hf_generate(model, [prompts[0][:16]] * batch_size, 4, pad_id)  # warm-up
    tokens = []
    with Timer() as timer:
        for i in range(0, len(prompts), batch_size):
            tokens += hf_generate(model, prompts[i : i + batch_size], output_len, pad_id)
    return tokens, timer


def compare(engine_tokens: list[list[int]], hf_tokens: list[list[int]]) -> dict:
    """Greedy agreement: positions equal, and where each sequence first diverges (None: never)."""
    equal = sum(a == b for e, h in zip(engine_tokens, hf_tokens) for a, b in zip(e, h))
    total = sum(min(len(e), len(h)) for e, h in zip(engine_tokens, hf_tokens))
    first = [next((i for i, (a, b) in enumerate(zip(e, h)) if a != b), None) for e, h in zip(engine_tokens, hf_tokens)]
    return {"prompts": len(hf_tokens), "tokens_equal": equal, "tokens_compared": total, "first_divergence": first}


def git_commit() -> str | None:
    """Short hash of HEAD: which engine code was measured (uncommitted edits are not captured)."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    except OSError:
        return None
    return done.stdout.strip() or None


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else platform.processor()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--baseline-requests", type=int, default=8, help="prompts run one at a time (slow)")
    parser.add_argument("--static-batch-size", type=int, default=16)
    parser.add_argument("--static-batches", type=int, default=None, help="default: enough for every prompt")
    parser.add_argument("--max-num-batched-tokens", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    # Prefix caching off: the baselines cannot reuse prompt KV, so the engine should not either.
    llm = LLM(dtype=args.dtype, max_num_seqs=args.num_prompts, max_num_batched_tokens=args.max_num_batched_tokens,
              kv_cache_gib=4.0, enable_prefix_caching=False)
    checkpoint = llm.engine.runner.checkpoint
    hf = LlamaForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, args.dtype)).eval()
    pad_id = llm.tokenizer.eos_token_id
    prompts = make_prompts(llm.tokenizer, args.num_prompts, 16, 512, args.seed)
    lengths = [len(p) for p in prompts]
    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": git_commit(),
        "cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "dtype": args.dtype, "checkpoint": str(checkpoint), "output_len": args.output_len,
        "prompt_tokens": {"total": sum(lengths), "min": min(lengths), "max": max(lengths)},
        "max_num_batched_tokens": args.max_num_batched_tokens,
    }
    print(" ".join(f"{k}={v}" for k, v in meta.items()))

    runs = {}
    engine_tokens, timer = run_engine(llm, prompts, args.output_len)
    runs["llamaserve engine"] = (len(prompts), engine_tokens, timer)
    print(f"engine done in {timer.seconds:.1f}s", flush=True)
    single = prompts[: args.baseline_requests]
    single_tokens, timer = run_hf(hf, single, 1, args.output_len, pad_id)
    runs["transformers one-at-a-time"] = (len(single), single_tokens, timer)
    print(f"one-at-a-time done in {timer.seconds:.1f}s", flush=True)
    num_static = len(prompts) if args.static_batches is None else args.static_batches * args.static_batch_size
    static = prompts[:num_static]
    tokens, timer = run_hf(hf, static, args.static_batch_size, args.output_len, pad_id)
    runs[f"transformers static batch {args.static_batch_size}"] = (len(static), tokens, timer)

    systems = [
        {"system": name, "requests": n, "output_tokens": sum(map(len, t)), "seconds": timer.seconds,
         "tok_per_s": sum(map(len, t)) / timer.seconds, "cpu_per_wall": timer.cpu_seconds / timer.seconds}
        for name, (n, t, timer) in runs.items()
    ]
    engine, single_rate, static_rate = (s["tok_per_s"] for s in systems)
    ratios = {"engine/one-at-a-time": engine / single_rate, "engine/static-batch": engine / static_rate}
    correctness = compare(engine_tokens[:2], single_tokens[:2])

    print(f"\n{'system':<30} {'requests':>8} {'out tokens':>10} {'seconds':>8} {'tok/s':>8} {'cpu/wall':>8}")
    for s in systems:
        print(f"{s['system']:<30} {s['requests']:>8} {s['output_tokens']:>10} {s['seconds']:>8.1f} "
              f"{s['tok_per_s']:>8.1f} {s['cpu_per_wall']:>8.2f}")
    print(f"(one-at-a-time ran the first {len(single)} of {len(prompts)} prompts; its rate is from those)")
    contended = [s["system"] for s in systems if s["cpu_per_wall"] < 0.85 * meta["threads"]]
    if contended:
        print(f"WARNING: cpu/wall well below {meta['threads']} threads for {', '.join(contended)}: "
              "other processes shared the cores; rerun on a quiet machine")
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    print(f"greedy agreement engine vs transformers, first {correctness['prompts']} prompts: "
          f"{correctness['tokens_equal']}/{correctness['tokens_compared']} tokens equal, "
          f"first divergence per prompt: {correctness['first_divergence']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "systems": systems, "ratios": ratios, "correctness": correctness}, f, indent=2)


if __name__ == "__main__":
    main()
