"""The batch-1 decode step per precision against the weight-read bound, on the default model.

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=server python bench/decode_step.py [--context 128] [--steps 200] [--batch 1]

A decode step at batch 1 reads every weight once, so it can take no less than (bytes of the weights it
reads) / (memory bandwidth). The bandwidth is measured here, as the copy of a 1 GiB tensor (2 bytes moved
per byte copied, the best of 3), in every round, since a neighbour's load on this shared machine moves it by a
third within minutes; the step is the model's forward for one new token after `--context` tokens, through
the paged KV cache (no sampling, no engine). The precisions run in rounds, interleaved, so that load hits
all of them alike. Each round's step is set against the bound at that round's bandwidth; the figures are
medians over the rounds.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from llamaserve.model.attention import AttentionMetadata, allocate_kv_cache
from llamaserve.model.loader import load_model, resolve_checkpoint
from llamaserve.model.parallel import Linear

PRECISIONS = {  # name -> load_model's dtype, quantization, kernel choice (and LM head quantization)
    "float32": ("float32", "none", True), "bfloat16": ("bfloat16", "none", True),
    "bfloat16 (oneDNN)": ("bfloat16", "none", False),
    "int8 (bf16)": ("bfloat16", "int8", True), "int4 (bf16)": ("bfloat16", "int4", True),
    "int4 (bf16, torch's kernels)": ("bfloat16", "int4", False),
    "int4 + int8 LM head (bf16)": ("bfloat16", "int4", True, "int8"),
    "int4 gguf (bf16)": ("bfloat16", "auto", True), "int4 gguf (f32)": ("float32", "auto", True),
}
CACHE = Path.home() / ".cache" / "llamaserve"


def load(precision: str):
    """The default model at one of PRECISIONS, on llamaserve's own CPU kernels (bf16 and int4 matmuls, decode
    attention) where this CPU runs them; "(oneDNN)" and "(torch's kernels)" on torch's only (the code before
    those kernels)."""
    dtype, quantization, cpu_kernels, *lm_head = PRECISIONS[precision]
    return load_model(resolve_checkpoint(None, CACHE, quantization), dtype, quantization=quantization,
                      cpu_kernels=cpu_kernels, lm_head_quantization=(lm_head or ["auto"])[0])


def bandwidth_gb_s(gib: float = 1.0, repeat: int = 3) -> float:
    src = torch.ones(int(gib * 2**30) // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeat))
    return 2 * src.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def weight_bytes(model) -> int:
    """What a batch-1 step reads: every linear weight as stored (packed or quantized) and the norms; of the
    embedding only one row (its table is the LM head's weight when tied, counted there)."""
    total = 0
    for module in model.modules():
        if isinstance(module, Linear):
            if module.quantized is not None:
                total += sum(t.numel() * t.element_size() for t in vars(module.quantized).values()
                             if isinstance(t, torch.Tensor))
            else:
                total += module.weight.numel() * module.weight.element_size()
    norms = [p for name, p in model.named_parameters() if "norm" in name]
    return total + sum(p.numel() * p.element_size() for p in norms)


class DecodeStep:
    def __init__(self, model, context: int, batch: int = 1, block_size: int = 16):
        arch = model.arch
        self.model = model
        contexts = [context + 4 * (i % 8) for i in range(batch)]  # one decode bucket, not in context order
        blocks = max(contexts) // block_size + 2  # per sequence
        dtype = model.model.embed_tokens.weight.dtype
        self.kv = allocate_kv_cache(arch.num_hidden_layers, blocks * batch, block_size, arch.num_key_value_heads,
                                    arch.head_dim, dtype, "cpu")
        tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(batch)]
        self.meta = AttentionMetadata.build([1] * batch, [c + 1 for c in contexts], tables, block_size)
        self.ids, self.positions = torch.tensor([42] * batch), torch.tensor(contexts)

    def __call__(self):
        return self.model(self.ids, self.positions, self.kv, self.meta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=128, help="tokens already in the cache")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded per step")
    parser.add_argument("--steps", type=int, default=100, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; context {args.context}, batch {args.batch}")
    steps, sizes = {}, {}
    for name in args.precisions:
        model = load(name)
        steps[name], sizes[name] = DecodeStep(model, args.context, args.batch), weight_bytes(model)
        steps[name]()
    times = {name: [] for name in steps}  # ms a step, a round each
    bandwidths = []  # GB/s, a round each
    for _ in range(args.rounds):
        bandwidths.append(bandwidth_gb_s())
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - start) / args.steps * 1e3)
    print(f"memory bandwidth (1 GiB copy) by round: {', '.join(f'{b:.1f}' for b in bandwidths)} GB/s")
    print("| precision | weights read per step | bound (median) | decode step (median) | step / bound (median of "
          "rounds) |")
    print("|---|---|---|---|---|")
    for name in steps:
        bounds = [sizes[name] / bandwidth / 1e6 for bandwidth in bandwidths]  # ms
        ratios = [t / b for t, b in zip(times[name], bounds)]
        print(f"| {name} | {sizes[name] / 1e6:.0f} MB | {statistics.median(bounds):.2f} ms | "
              f"{statistics.median(times[name]):.2f} ms | {statistics.median(ratios):.2f}x |")


if __name__ == "__main__":
    main()
