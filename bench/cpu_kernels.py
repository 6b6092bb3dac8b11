"""llamaserve's CPU matmul and decode-attention kernels against torch's on the default model's shapes, weights
and KV caches cold (read from memory).

    PYTHONPATH=server python bench/cpu_kernels.py [--rows 1 16 64] [--contexts 128 1024] [--threads 2]
                                                  [--rounds 5] [--shapes qkv ...]  (--shapes alone: attention only)

Per shape (out x in) and row count: oneDNN's packed bfloat16 matmul vs llamaserve's bfloat16 kernel, torch's
`_weight_int8pack_mm` vs llamaserve's int8 kernel, torch's `_weight_int4pack_mm_for_cpu` vs llamaserve's int4
kernel (group 32). Each call reads a different copy of its weight (copies cycled, ~200 MB of them), as a decode
step over 30 layers does; the kinds alternate within each round, and the figures are medians over the rounds:
microseconds a call and the weight bytes read per second. Then, per context and batch (a row a sequence), one
layer's decode attention in bfloat16 (9 query heads, 3 KV heads, head_dim 64; blocks of 16, scattered): the
torch attention backend vs the CPU backend on llamaserve's kernel (cache writes included), each call on another
copy of the cache.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from llamaserve.model.attention import AttentionMetadata, CpuAttentionBackend, TorchAttentionBackend
from llamaserve.model.cpu_kernels import CpuKernels
from llamaserve.model.quantization import GroupCodes, Int4KernelWeight, Int4Weight, Int8KernelWeight, Int8Weight

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}
HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels = CpuKernels.build(Path.home() / ".cache" / "llamaserve", torch.bfloat16, {"int8", "int4"})
    print(f"torch {torch.__version__}, {args.threads} threads")
    print("| shape | rows | bf16 oneDNN / ours | int8 torch / ours | int4 torch / ours |")
    print("|---|---|---|---|---|")
    for name in args.shapes:
        n, k = SHAPES[name]
        copies = max(2, (200 << 20) // (n * k * 2))
        weights = [torch.randn(n, k).bfloat16() * 0.05 for _ in range(copies)]
        int8 = [Int8Weight.quantize(w, torch.bfloat16) for w in weights]
        codes = [GroupCodes.from_float(w, 32) for w in weights]
        kinds = {  # name -> (the weights' bytes, one call per weight copy)
            "bf16 oneDNN": (2, [lambda x, w=torch.ops.mkldnn._reorder_linear_weight(w, 64): torch.ops.mkldnn
                                ._linear_pointwise(x, w, None, "none", [], "") for w in weights]),
            "bf16 ours": (2, [lambda x, w=kernels.bf16.pack(w): kernels.bf16.matmul(x, w) for w in weights]),
            "int8 torch": (1, [q.matmul for q in int8]),
            "int8 ours": (1, [Int8KernelWeight(kernels.int8, q).matmul for q in int8]),
            "int4 torch": (0.625, [Int4Weight.from_codes(c, "cpu").matmul for c in codes]),
            "int4 ours": (0.625, [Int4KernelWeight(kernels.int4, c).matmul for c in codes]),
        }
        del weights, int8, codes
        for rows in args.rows:
            x = torch.randn(rows, k).bfloat16()
            times = {kind: [] for kind in kinds}
            for _ in range(args.rounds):
                for kind, (_, calls) in kinds.items():
                    start = time.perf_counter()
                    for call in calls:
                        call(x)
                    times[kind].append((time.perf_counter() - start) / len(calls))
            cells = []
            for theirs, ours in (("bf16 oneDNN", "bf16 ours"), ("int8 torch", "int8 ours"), ("int4 torch", "int4 ours")):
                t, o = statistics.median(times[theirs]), statistics.median(times[ours])
                gb = n * k * kinds[ours][0] / 1e9
                cells.append(f"{t * 1e6:.0f} / {o * 1e6:.0f} us ({gb / t:.1f} / {gb / o:.1f} GB/s, {t / o:.2f}x)")
            print(f"| {name} {n}x{k} | {rows} | " + " | ".join(cells) + " |", flush=True)
    attention(kernels, args.contexts, args.rows, args.rounds)


def attention(kernels: CpuKernels, contexts: list[int], batches: list[int], rounds: int) -> None:
    backends = {"torch": TorchAttentionBackend(HEADS, KV_HEADS, HEAD_DIM),
                "ours": CpuAttentionBackend(kernels.attention, HEADS, KV_HEADS, HEAD_DIM)}
    print("\n| attention | context | batch | torch backend / ours |")
    print("|---|---|---|---|")
    for context in contexts:
        for batch in batches:
            per_seq = -(-(context + 1) // BLOCK)
            shape = (batch * per_seq, BLOCK, KV_HEADS, HEAD_DIM)  # a cache: [blocks, block_size, kv_heads, head_dim]
            copies = max(2, (200 << 20) // (2 * 2 * shape[0] * BLOCK * KV_HEADS * HEAD_DIM))
            caches = [tuple(torch.randn(shape).bfloat16() for _ in range(2)) for _ in range(copies)]
            tables = torch.randperm(shape[0]).view(batch, per_seq).tolist()
            meta = AttentionMetadata.build([1] * batch, [context + 1] * batch, tables, BLOCK)
            fused = torch.randn(batch, HEADS + 2 * KV_HEADS, HEAD_DIM).bfloat16()  # the QKV projection's rows
            q, k, v = fused[:, :HEADS], fused[:, HEADS : HEADS + KV_HEADS], fused[:, HEADS + KV_HEADS :]
            plans = {name: backend.plan(meta) for name, backend in backends.items()}
            times = {name: [] for name in backends}
            for _ in range(rounds):
                for name, backend in backends.items():
                    start = time.perf_counter()
                    for cache in caches:
                        backend.forward(q, k, v, cache, meta, plans[name])
                    times[name].append((time.perf_counter() - start) / len(caches))
            t, o = statistics.median(times["torch"]), statistics.median(times["ours"])
            print(f"| 9/3 heads x 64 | {context} | {batch} | {t * 1e6:.0f} / {o * 1e6:.0f} us ({t / o:.1f}x) |",
                  flush=True)


if __name__ == "__main__":
    main()
