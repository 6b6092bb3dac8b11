"""GPU check: correctness and speed of llamaserve on one lent GPU, unattended, into one JSON file.

    bench/gpu_check.sh [--out gpu_check.json]      # on an H100/H200: at most ~8 minutes, no downloads
    bench/gpu_check.sh --dry-run                   # the same code paths at tiny shapes on the CPU

Each section is recorded with its status ("ok", "error", "skipped", "not yet") and its seconds; a failing
section does not stop the others, sections that no longer fit the time budget are skipped, and the JSON
is rewritten after every section, so a run cut short still leaves what it measured. bench/README.md
describes every figure.
"""

import argparse
import gc
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import torch
from gpu_speed import (  # beside this file; like every section, it imports llamaserve only when it runs
    BLOCK_SIZE, cuda_graphs, decode_speed, engine_end_to_end, prefill_speed, save_checkpoint, speed_13b,
    transformers_generate,
)


class Report:
    """The JSON file, rewritten after every section; sections run only while the budget lasts."""

    def __init__(self, path: Path, budget_s: float, header: dict):
        self.path, self.budget, self.start = path, budget_s, time.monotonic()
        self.data = {**header, "sections": {}}

    def remaining(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def run(self, name: str, fn, needs_s: float = 0.0, *args) -> dict:
        if self.remaining() < needs_s:
            left = self.remaining()
            result = {"status": "skipped", "reason": f"{left:.0f}s of the budget left, needs ~{needs_s:.0f}s"}
        else:
            began = time.monotonic()
            try:
                result = {"status": "ok", **(fn(*args) or {})}
            except Exception as e:
                result = {"status": "error", "error": f"{type(e).__name__}: {e}",
                          "traceback": traceback.format_exc()[-4000:]}
            result["section_seconds"] = round(time.monotonic() - began, 1)
        self.data["sections"][name] = result
        self.data["elapsed_s"] = round(time.monotonic() - self.start, 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.path)
        why = result.get("error", result.get("reason", ""))
        print(f"[{self.data['elapsed_s']:6.1f}s] {name}: {result['status']}{' - ' + why if why else ''}", flush=True)
        return result


def forbid_imports(names: list[str]) -> None:
    """Make these packages absent, as on the GPU machines (None in sys.modules: import fails, find_spec is None)."""
    for name in names:
        sys.modules[name] = None


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent)
        return done.stdout.strip() or None
    except OSError:
        return None


def free_memory(ctx) -> None:
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


# ---- sections --------------------------------------------------------------------------------------------


def environment(ctx) -> dict:
    import transformers

    from llamaserve.engine.core import EngineCore  # noqa: F401  the engine imports without the API's packages
    from llamaserve.model.attention import select_attention_backend

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "triton": None, "flashinfer": importlib.util.find_spec("flashinfer") is not None,
            "forbidden_imports": ctx.args.forbid_imports, "engine_importable": True}
    if importlib.util.find_spec("triton") is not None:
        import triton

        info["triton"] = triton.__version__
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        info.update(device=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        info["device"] = platform.processor() or "cpu"
    head_dim = ctx.config(ctx.main_shape).head_dim
    info["auto_backend"] = select_attention_backend("auto", ctx.device, ctx.dtype, 32, 32, head_dim).name
    info["backends_compared"] = ctx.backends
    return info


def bandwidth(ctx) -> dict:
    n = ctx.sizes.copy_bytes
    src = torch.empty(n, dtype=torch.uint8, device=ctx.device)
    dst = torch.empty_like(src)
    seconds = ctx.w.wall_seconds(lambda: dst.copy_(src), ctx.device, iters=10)
    ctx.bandwidth = 2 * n / seconds  # each byte read once and written once
    return {"bytes": n, "copy_ms": seconds * 1e3, "gb_per_s": ctx.bandwidth / 1e9}


def matmul_peak(ctx) -> dict:
    n = ctx.sizes.matmul
    a, b = (torch.randn(n, n, device=ctx.device).to(ctx.dtype) for _ in range(2))
    seconds = ctx.w.wall_seconds(lambda: a @ b, ctx.device, iters=10)
    ctx.peak_flops = 2 * n**3 / seconds
    return {"n": n, "dtype": str(ctx.dtype), "tflops": ctx.peak_flops / 1e12}


def compare_with_reference(ctx, ours, reference) -> dict:
    """A mixed batch (a chunked prompt, a late arrival, a long prompt whose decodes split the context), then
    greedy decodes; our logits at every sampled position against transformers' full forward of each sequence."""
    first, late, long = ctx.sizes.parity_prompts
    vocab = ours.arch.vocab_size
    prompts = dict(enumerate(ctx.w.random_prompts(1, first, vocab, 11) + ctx.w.random_prompts(1, late, vocab, 12)
                             + ctx.w.random_prompts(1, long, vocab, 13)))
    chunks = {0: [first * 2 // 3, first - first * 2 // 3], 1: [late], 2: [long]}
    joins, decodes = {0: 0, 1: 1, 2: 0}, 6
    blocks = sum(-(-(len(p) + decodes) // BLOCK_SIZE) for p in prompts.values()) * 2 + 8
    batch = ctx.w.PagedBatch(ours, blocks, BLOCK_SIZE, ours.model.norm.weight.dtype, ctx.device, seed=5)
    fed = {s: [] for s in prompts}
    rows = {s: [] for s in prompts}  # (position, our logits there)
    step = 0
    while any(len(rows[s]) < len(chunks[s]) + decodes for s in prompts):
        work = []
        for s in prompts:
            if step < joins[s] or len(rows[s]) >= len(chunks[s]) + decodes:
                continue
            done = len(rows[s])
            if done < len(chunks[s]):
                start = sum(chunks[s][:done])
                tokens = prompts[s][start : start + chunks[s][done]]
            else:
                tokens = [int(rows[s][-1][1].argmax())]
            fed[s] += tokens
            work.append((s, tokens))
        for (s, _), row in zip(work, batch.step(work)):
            rows[s].append((len(fed[s]) - 1, row))
        step += 1
    ours_all, ref_all = [], []
    with torch.no_grad():
        for s in prompts:
            ref = reference(torch.tensor([fed[s]], device=ctx.device)).logits[0].float()  # [len, vocab]
            ours_all += [r for _, r in rows[s]]
            ref_all += [ref[p] for p, _ in rows[s]]
    o, r = torch.stack(ours_all), torch.stack(ref_all)
    diff = (o - r).abs()
    return {"positions": len(ours_all), "max_abs": diff.max().item(), "mean_abs": diff.mean().item(),
            "reference_std": r.std().item(), "top1_agreement": (o.argmax(-1) == r.argmax(-1)).float().mean().item(),
            "backend": ours.attn_backend.name}


def parity_float32(ctx) -> dict:
    """Strict: float32 at real widths (2 layers), every backend that serves float32, against transformers."""
    out = {}
    for shape in ctx.sizes.parity_shapes:
        config = ctx.config(shape)
        reference = ctx.w.build_reference(config, torch.float32, ctx.device)
        weights = reference.state_dict()
        for backend in [b for b in ctx.backends if b != "flashinfer"]:
            ours = ctx.w.build_ours(config, torch.float32, ctx.device, backend, weights)
            result = compare_with_reference(ctx, ours, reference)
            result["ok"] = result["max_abs"] <= ctx.args.float32_tolerance
            out[f"{shape}/{backend}"] = result
            del ours
        del reference, weights
        free_memory(ctx)
    return {"tolerance": ctx.args.float32_tolerance, "ok": all(r["ok"] for r in out.values()), "cases": out}


def build_main(ctx) -> dict:
    config = ctx.config(ctx.main_shape)
    ctx.reference = ctx.w.build_reference(config, ctx.dtype, ctx.device)
    ctx.ours = ctx.w.build_ours(config, ctx.dtype, ctx.device, "auto", ctx.reference.state_dict())
    return {"shape": ctx.main_shape, "dtype": str(ctx.dtype), "weight_gib": ctx.w.weight_bytes(ctx.ours) / 2**30}


def parity_main(ctx) -> dict:
    """Every layer in the serving dtype: agreement, not equality (bfloat16 rounds differently per kernel)."""
    out = {}
    for backend in ctx.backends:
        ctx.ours.set_attention_backend(backend)
        out[backend] = compare_with_reference(ctx, ctx.ours, ctx.reference)
        out[backend]["ok"] = out[backend]["top1_agreement"] >= ctx.args.min_top1
    ctx.ours.set_attention_backend("auto")
    return {"min_top1": ctx.args.min_top1, "ok": all(r["ok"] for r in out.values()), "backends": out}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: code paths, not figures")
    parser.add_argument("--budget-s", type=float, default=450.0, help="sections that would not fit are skipped")
    parser.add_argument("--forbid-imports", default=None,
                        help="comma-separated packages made absent (default with --dry-run: "
                             "fastapi,uvicorn,flashinfer, as on the GPU machines; else none)")
    parser.add_argument("--float32-tolerance", type=float, default=1e-3, help="max |dlogit| of the float32 parity")
    parser.add_argument("--min-top1", type=float, default=0.9, help="least argmax agreement in the serving dtype")
    parser.add_argument("--workdir", default=None, help="where the checkpoint for the engine is written")
    parser.add_argument("--skip-13b", action="store_true")
    args = parser.parse_args()
    if args.forbid_imports is None:
        args.forbid_imports = "fastapi,uvicorn,flashinfer" if args.dry_run else ""
    args.forbid_imports = [n for n in args.forbid_imports.split(",") if n]
    forbid_imports(args.forbid_imports)
    import gpu_workloads  # imports llamaserve and transformers: only now that the forbidden packages are gone

    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --dry-run on a CPU")
    ctx = SimpleNamespace(args=args, device=device, w=gpu_workloads, bandwidth=None, peak_flops=None,
                          dtype=torch.float32 if args.dry_run else torch.bfloat16,
                          main_shape="tiny-gqa4" if args.dry_run else "7b", config=gpu_workloads.hf_config,
                          sizes=dry_run_sizes() if args.dry_run else gpu_sizes(), results={})
    ctx.backends = available_backends(device, args.dry_run)
    report = Report(args.out, args.budget_s, {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
        "dry_run": args.dry_run, "host": platform.node()})
    report.run("environment", environment, 0, ctx)
    report.run("bandwidth", bandwidth, 5, ctx)
    report.run("matmul_peak", matmul_peak, 5, ctx)
    report.run("parity_float32", parity_float32, 60, ctx)
    if report.run("build_7b", build_main, 30, ctx)["status"] == "ok":
        report.run("parity_7b", parity_main, 30, ctx)
        ctx.results["transformers"] = report.run("transformers_generate", transformers_generate, 60, ctx)
        ctx.checkpoint = report.run("save_checkpoint", save_checkpoint, 40, ctx).get("path")
        ctx.reference = None
        free_memory(ctx)
        ctx.results["decode"] = report.run("decode_7b", decode_speed, 60, ctx, ctx.ours)
        report.run("prefill_7b", prefill_speed, 30, ctx, ctx.ours)
        ctx.ours = None
        free_memory(ctx)
        if ctx.checkpoint:
            report.run("engine_7b", engine_end_to_end, 120, ctx)
            report.run("cuda_graphs", cuda_graphs, 60, ctx)
    if not args.skip_13b:
        report.run("speed_13b", speed_13b, 90, ctx)
    report.run("summary", summary, 0, report.data["sections"])
    print(f"wrote {args.out}")


def summary(sections: dict) -> dict:
    """The headline figures, for the auto backend (what the engine serves with), gathered from the sections."""
    def get(*path):
        value = sections
        for key in path:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return value

    auto = get("environment", "auto_backend")
    decode, prefill, engine = get("decode_7b", "backends", auto) or {}, get("prefill_7b", "backends", auto) or {}, \
        get("engine_7b") or {}
    return {
        "auto_backend": auto,
        "parity_float32_ok": get("parity_float32", "ok"), "parity_7b_ok": get("parity_7b", "ok"),
        "bandwidth_gb_per_s": get("bandwidth", "gb_per_s"), "matmul_tflops": get("matmul_peak", "tflops"),
        "decode_step_ms": {b: r.get("step_ms") for b, r in decode.items()},
        "decode_ratio_to_weight_bound": {b: r.get("ratio_to_weight_bound") for b, r in decode.items()},
        "prefill_tok_per_s": {n: r.get("tok_per_s") for n, r in prefill.items()},
        "prefill_ratio_to_matmul_peak": {n: r.get("ratio_to_matmul_peak") for n, r in prefill.items()},
        "engine_tok_per_s": engine.get("tok_per_s"),
        "engine_vs_transformers_one_at_a_time": engine.get("ratio_to_transformers_one_at_a_time"),
        "engine_vs_transformers_batched": engine.get("ratio_to_transformers_batched"),
        "engine_cuda_graphs": get("engine_7b", "cuda_graphs"),
        "cuda_graphs": get("cuda_graphs", "status"),
        "cuda_graphs_speedup": get("cuda_graphs", "speedup"),
        "cuda_graphs_greedy_equal": [get("cuda_graphs", "greedy_tokens_equal"),
                                     get("cuda_graphs", "greedy_tokens_compared")],
        "sync_free_decode_step": {mode: get("cuda_graphs", mode, "sync_check", "ok") for mode in ("eager", "graphs")},
    }


def gpu_sizes():
    return SimpleNamespace(copy_bytes=2 * 2**30, matmul=8192, parity_shapes=["7b-2l", "8b-gqa4-2l", "70b-gqa8-2l"],
                           parity_prompts=(300, 37, 1000), decode_batches=[1, 8, 32, 128, 256], context=512,
                           torch_decode_max_batch=32, prefill_len=2048, prefill_batches=[1, 4],
                           requests=256, input_len=512, output_len=256, hf_single=2, hf_batched=64, hf_batch=32,
                           max_num_batched_tokens=8192, shape_13b="13b",
                           graph_batches=[1, 8, 32], graph_input_len=256, graph_output_len=64)


def dry_run_sizes():
    return SimpleNamespace(copy_bytes=16 * 2**20, matmul=256, parity_shapes=["tiny", "tiny-gqa4"],
                           parity_prompts=(40, 7, 100), decode_batches=[1, 2, 4], context=32,
                           torch_decode_max_batch=4, prefill_len=64, prefill_batches=[1, 2],
                           requests=8, input_len=32, output_len=8, hf_single=2, hf_batched=4, hf_batch=2,
                           max_num_batched_tokens=256, shape_13b="tiny",
                           graph_batches=[1, 3], graph_input_len=16, graph_output_len=4)


def available_backends(device: torch.device, dry_run: bool) -> list[str]:
    """The backends this run compares: on CUDA the fast ones (and torch, the oracle); on the CPU torch, and
    Triton when its interpreter is on (gpu_check.sh --dry-run turns it on)."""
    triton = importlib.util.find_spec("triton") is not None
    if device.type != "cuda":
        return ["torch"] + (["triton"] if triton and os.environ.get("TRITON_INTERPRET") == "1" else [])
    return ([b for b in ("flashinfer",) if importlib.util.find_spec("flashinfer")] + (["triton"] if triton else [])
            + ["torch"])


if __name__ == "__main__":
    main()
