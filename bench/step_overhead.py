"""The model runner's own cost per step, the forward pass left out: building the step's inputs and sampling
tensors, sampling, and bringing the tokens back, on the default model's vocabulary (49,152) for decode batches.

    PYTHONPATH=server .venv/bin/python bench/step_overhead.py [--label after]

The model is replaced by a stub that returns fixed logits, so what is timed is everything `ModelRunner.execute`
does around the forward (the same call on any revision of the runner: run it from each tree to compare).
Workloads: greedy; temperature + top-p; the same with repetition/presence/frequency penalties (counted from
Python lists every step before the lean step, kept on the device after); with logprobs (k = 5).
"""

import argparse
import statistics
import time

import torch

from llamaserve.config import EngineConfig
from llamaserve.engine.core import EngineCore
from llamaserve.engine.messages import AddRequest
from llamaserve.sampling_params import SamplingParams

WORKLOADS = {
    "greedy": SamplingParams(temperature=0, max_tokens=None, ignore_eos=True),
    "top_p": SamplingParams(temperature=0.8, top_p=0.9, max_tokens=None, ignore_eos=True),
    "penalties": SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.2, presence_penalty=0.5,
                                frequency_penalty=0.3, max_tokens=None, ignore_eos=True),
    "logprobs": SamplingParams(temperature=0, logprobs=5, max_tokens=None, ignore_eos=True),
}


class StubModel:
    """Fixed logits for the sampled rows, no forward pass: standard normal times `scale` (1: a flat distribution,
    whose top-p nucleus spans most of the vocabulary; 4: peaked like a language model's, 97% of the probability
    in the 256 most likely tokens)."""

    def __init__(self, vocab: int, rows: int, scale: float = 1.0):
        self.logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * scale

    def __call__(self, input_ids, positions, kv_caches, meta, **_):
        return self.logits[: meta.logits_indices.numel()]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", default="")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--prompt-len", type=int, default=200)
    parser.add_argument("--logit-scale", type=float, default=1.0, help="the stub's logits: N(0, 1) times this")
    args = parser.parse_args()
    core = EngineCore(EngineConfig.from_options(max_num_seqs=64, max_num_batched_tokens=16384,
                                                max_model_len=4096, kv_cache_gib=1))
    vocab = core.runner.arch.vocab_size
    core.runner.model = StubModel(vocab, 64, args.logit_scale)
    for name, params in WORKLOADS.items():
        for batch in map(int, args.batches.split(",")):
            for i in range(batch):
                prompt = [(7 * i + j) % 4000 + 100 for j in range(args.prompt_len)]
                assert core.add_request(AddRequest(f"{name}-{batch}-{i}", prompt, params)) is None
            core.step()  # the prefill
            times = []
            for _ in range(args.steps):
                start = time.perf_counter()
                core.step()
                times.append(time.perf_counter() - start)
            core.abort([f"{name}-{batch}-{i}" for i in range(batch)])
            core.step()
            print(f"{args.label} {name:9s} batch {batch:3d}: median {statistics.median(times) * 1e3:7.3f} ms, "
                  f"p90 {sorted(times)[int(0.9 * len(times))] * 1e3:7.3f} ms per step", flush=True)


if __name__ == "__main__":
    main()
