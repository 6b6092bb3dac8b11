"""Weight-only quantized matmul kernels against oneDNN's packed float path, on the default model's shapes.

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=server python bench/quant_kernels.py [--rows 1 16 64] [--repeat 5]

Each kernel computes y = x W^T for x [rows, in] and W [out, in]; the table gives microseconds per call
(the median of `--repeat` rounds, kernels interleaved within a round so a neighbour's load hits all of them
alike) and, per shape and row count, each kernel's time as a ratio to packed float32.

`--cold` cycles through copies of each weight (256 MiB of them in float32) so that every call reads its
weight from memory, as a decode step over 30 layers does; without it one weight stays in cache and the
figures measure compute. `--fast-only` leaves out the kernels measured 6-85x slower (float32 activations
into the int8/int4 kernels, and `_dyn_quant_matmul_4bit`, which has no fast x86 path).
"""

import argparse
import statistics
import time

import torch

from llamaserve.model.quantization import Int4Weight, Int8Weight

# SmolLM2-135M: (out, in) of every decoder projection, fused as the model runs them, and the separate ones.
SHAPES = {
    "qkv 960x576": (960, 576), "o 576x576": (576, 576), "gate_up 3072x576": (3072, 576),
    "down 576x1536": (576, 1536), "k/v 192x576": (192, 576), "gate 1536x576": (1536, 576),
}


def dyn_quant_4bit(weight: torch.Tensor, group_size: int):
    """`_dyn_quant_matmul_4bit` over symmetric 4-bit groups (activations quantized to int8 per step), as a
    callable of x [n, in] float32: compared here, not served (no fast x86 path)."""
    out_features, in_features = weight.shape
    groups = weight.float().view(out_features, -1, group_size)
    scales = (groups.abs().amax(-1) / 7).clamp_min(torch.finfo(torch.float32).tiny)
    q = (groups / scales.unsqueeze(-1) + 8).round_().clamp_(0, 15).to(torch.uint8).view(out_features, in_features)
    nibbles = (q[:, 1::2] << 4 | q[:, ::2]).contiguous()
    packed = torch.ops.aten._dyn_quant_pack_4bit_weight(nibbles, scales.reshape(-1).contiguous(), None, group_size,
                                                        in_features, out_features)
    return lambda x: torch.ops.aten._dyn_quant_matmul_4bit(x, packed, group_size, in_features, out_features)


def kernels(weight: torch.Tensor, fast_only: bool) -> dict:
    """name -> (callable of x, the activation dtype it takes)."""
    f32 = torch.ops.mkldnn._reorder_linear_weight(weight, 64)
    bf16 = torch.ops.mkldnn._reorder_linear_weight(weight.bfloat16(), 64)
    out = {
        "f32 onednn": (lambda x: torch.ops.mkldnn._linear_pointwise(x, f32, None, "none", [], ""), torch.float32),
        "bf16 onednn": (lambda x: torch.ops.mkldnn._linear_pointwise(x, bf16, None, "none", [], ""), torch.bfloat16),
    }
    # The served layers run bfloat16 activations; with float32 scales the same objects take the float32 path.
    for dtype, name in ((torch.bfloat16, "bf16"),) if fast_only else ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        int8 = Int8Weight.quantize(weight, dtype)
        int8.scales = int8.scales.to(dtype)
        out[f"int8 {name}"] = (int8.matmul, dtype)
        for group in (32, 64):
            int4 = Int4Weight.quantize(weight, group)
            int4.scale_zeros = int4.scale_zeros.to(dtype)
            out[f"int4 g{group} {name}"] = (int4.matmul, dtype)
    if not fast_only:
        out["dyn4 g32 f32"] = (dyn_quant_4bit(weight, 32), torch.float32)
    return out


def cycled(fns: list) -> callable:
    """One call runs every copy's kernel once."""
    def run(x):
        for fn in fns:
            fn(x)
    return run


def time_call(fn, x: torch.Tensor, copies: int, min_seconds: float = 0.05) -> float:
    fn(x)
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_seconds:
        fn(x)
        calls += 1
    return elapsed / calls / copies * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cold", action="store_true", help="every call reads its weight from memory")
    parser.add_argument("--fast-only", action="store_true", help="only the kernels fast enough to serve")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}, "
          f"weights {'cold (from memory)' if args.cold else 'hot (in cache)'}")
    for label, (out_features, in_features) in SHAPES.items():
        copies = -(-256 * 2**20 // (out_features * in_features * 4)) if args.cold else 1
        per_copy = [kernels(torch.randn(out_features, in_features) * 0.02, args.fast_only) for _ in range(copies)]
        fns = {name: (cycled([k[name][0] for k in per_copy]), dtype) for name, (_, dtype) in per_copy[0].items()}
        for rows in args.rows:
            x = torch.randn(rows, in_features)
            inputs = {dtype: x.to(dtype) for dtype in (torch.float32, torch.bfloat16)}
            rounds = {name: [] for name in fns}
            for _ in range(args.repeat):
                for name, (fn, dtype) in fns.items():
                    rounds[name].append(time_call(fn, inputs[dtype], copies))
            us = {name: statistics.median(t) for name, t in rounds.items()}
            base = us["f32 onednn"]
            cells = "  ".join(f"{name} {t:7.1f} ({t / base:4.2f})" for name, t in us.items())
            print(f"{label:17s} rows {rows:3d}: {cells}", flush=True)


if __name__ == "__main__":
    main()
