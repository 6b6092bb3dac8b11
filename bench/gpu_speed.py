"""The speed sections of bench/gpu_check.py: transformers `generate`, decode and prefill steps of our model,
the engine end to end, and the 13B shape. Each takes the run's context (`ctx`, built in gpu_check.main) and
returns its figures; llamaserve is imported inside them, after gpu_check has made the forbidden packages
absent. Ratios to a bound are bound / measured: 1.0 would be the bound itself.
"""

import atexit
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

BLOCK_SIZE = 16


def transformers_generate(ctx) -> dict:
    """The workload's first requests through `generate`, one at a time and in batches (equal prompt lengths,
    so no padding); EOS stops nothing (eos_token_id=None), like the engine's ignore_eos."""
    s, model = ctx.sizes, ctx.reference
    ctx.prompts = ctx.w.random_prompts(s.requests, s.input_len, model.config.vocab_size, seed=1)

    @torch.inference_mode()
    def generate(batch: list[list[int]], new_tokens: int) -> list[list[int]]:
        ids = torch.tensor(batch, device=ctx.device)  # [batch, input_len]
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
        return out[:, ids.shape[1]:].tolist()

    def timed(prompts: list[list[int]], batch_size: int) -> tuple[list[list[int]], dict]:
        ctx.w.sync(ctx.device)
        start = time.perf_counter()
        tokens = []
        for i in range(0, len(prompts), batch_size):
            tokens += generate(prompts[i:i + batch_size], s.output_len)
        ctx.w.sync(ctx.device)
        seconds = time.perf_counter() - start
        total = sum(map(len, tokens))
        return tokens, {"requests": len(prompts), "batch_size": batch_size, "output_tokens": total, "seconds": seconds,
                        "tok_per_s": total / seconds, "all_full_length": all(len(t) == s.output_len for t in tokens)}

    generate([ctx.prompts[0][:16]], 4)  # warm-up
    ctx.hf_tokens, single = timed(ctx.prompts[: s.hf_single], 1)
    _, batched = timed(ctx.prompts[: s.hf_batched], s.hf_batch)
    return {"input_len": s.input_len, "output_len": s.output_len, "one_at_a_time": single, "batched": batched,
            "note": f"rates from the first requests of the {s.requests}; the engine runs all of them"}


def save_checkpoint(ctx) -> dict:
    """transformers writes the weights it was built with, for the engine to load like any checkpoint."""
    path = Path(tempfile.mkdtemp(prefix="gpu_check_", dir=ctx.args.workdir))
    atexit.register(shutil.rmtree, path, True)
    ctx.reference.save_pretrained(path)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return {"path": str(path), "gib": size / 2**30}


def _kv_room(ctx, model, blocks_per_seq: int, batches: list[int]) -> int:
    """The largest of `batches` whose KV cache fits in 80% of the free device memory."""
    arch = model.arch
    per_block = 2 * arch.num_hidden_layers * BLOCK_SIZE * model.heads[1] * arch.head_dim * 2
    if ctx.device.type != "cuda":
        return max(batches)
    fit = int(torch.cuda.mem_get_info(ctx.device)[0] * 0.8) // (per_block * blocks_per_seq)
    return max([b for b in batches if b <= fit], default=0)


def decode_speed(ctx, model) -> dict:
    """One decode step for B sequences of `context` cached tokens: wall time, and the ratio to the time it
    would take just to read the weights (and the weights + the K/V it attends over) at the measured bandwidth."""
    from llamaserve.model.attention import AttentionMetadata, allocate_kv_cache

    s, arch, dtype = ctx.sizes, model.arch, model.model.norm.weight.dtype
    seq_len = s.context + 1
    per_seq = -(-seq_len // BLOCK_SIZE)
    room = _kv_room(ctx, model, per_seq, s.decode_batches)
    if room == 0:
        raise RuntimeError("not even one sequence's KV cache fits beside the weights")
    kv = allocate_kv_cache(arch.num_hidden_layers, room * per_seq, BLOCK_SIZE, model.heads[1], arch.head_dim, dtype,
                           ctx.device)
    pool = list(range(room * per_seq))
    random.Random(0).shuffle(pool)  # scattered blocks, as a long-running server has them
    weights = ctx.w.weight_bytes(model)
    kv_per_token = 2 * arch.num_hidden_layers * model.heads[1] * arch.head_dim * kv[0][0].element_size()
    out = {}
    for backend in ctx.backends:
        model.set_attention_backend(backend)
        rows = {}
        for b in s.decode_batches:
            if b > room:
                rows[b] = {"skipped": "its KV cache does not fit"}
                continue
            if backend == "torch" and b > s.torch_decode_max_batch:
                continue  # the reference gathers K/V per step: slow at large batches, and not the fast path
            tables = [pool[i * per_seq:(i + 1) * per_seq] for i in range(b)]
            def build(b=b, tables=tables):
                return AttentionMetadata.build([1] * b, [seq_len] * b, tables, BLOCK_SIZE, device=ctx.device)

            meta = build()
            ids = torch.randint(3, arch.vocab_size, (b,), device=ctx.device)
            positions = torch.full((b,), s.context, device=ctx.device)
            step = lambda: model(ids, positions, kv, meta)  # noqa: E731,B023  (called before the loop moves on)
            seconds = ctx.w.wall_seconds(step, ctx.device, iters=10, warmup=3)
            row = {"step_ms": seconds * 1e3, "tok_per_s": b / seconds,
                   "metadata_ms": ctx.w.wall_seconds(build, ctx.device, iters=5, warmup=1) * 1e3}
            if ctx.bandwidth:
                bound, bound_kv = weights / ctx.bandwidth, (weights + b * seq_len * kv_per_token) / ctx.bandwidth
                row.update(weight_bound_ms=bound * 1e3, ratio_to_weight_bound=bound / seconds,
                           weight_kv_bound_ms=bound_kv * 1e3, ratio_to_weight_kv_bound=bound_kv / seconds)
            rows[b] = row
        out[backend] = rows
    model.set_attention_backend("auto")
    return {"context": s.context, "weight_gib": weights / 2**30, "backends": out}


def prefill_speed(ctx, model) -> dict:
    """Fresh prompts of prefill_len tokens, n of them in one step: tokens/s, and model FLOP/s (matmuls +
    causal attention) against the matmul peak measured by the matmul_peak section."""
    from llamaserve.model.attention import AttentionMetadata, allocate_kv_cache

    s, arch, dtype, length = ctx.sizes, model.arch, model.model.norm.weight.dtype, ctx.sizes.prefill_len
    per_seq = -(-length // BLOCK_SIZE)
    most = max(s.prefill_batches)
    kv = allocate_kv_cache(arch.num_hidden_layers, most * per_seq, BLOCK_SIZE, model.heads[1], arch.head_dim, dtype,
                           ctx.device)
    linear = sum(p.numel() for p in model.model.layers.parameters() if p.dim() == 2)
    out = {}
    for backend in ctx.backends:
        model.set_attention_backend(backend)
        rows = {}
        for n in s.prefill_batches:
            tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(n)]
            meta = AttentionMetadata.build([length] * n, [length] * n, tables, BLOCK_SIZE, device=ctx.device)
            ids = torch.randint(3, arch.vocab_size, (n * length,), device=ctx.device)
            positions = torch.arange(length, device=ctx.device).repeat(n)
            step = lambda: model(ids, positions, kv, meta)  # noqa: E731,B023  (called before the loop moves on)
            seconds = ctx.w.wall_seconds(step, ctx.device, iters=5, warmup=2)
            flops = n * (2 * length * linear + 2 * arch.num_hidden_layers * length**2 * arch.q_size
                         + 2 * arch.hidden_size * arch.vocab_size)
            row = {"tokens": n * length, "ms": seconds * 1e3, "tok_per_s": n * length / seconds,
                   "tflops": flops / seconds / 1e12}
            if ctx.peak_flops:
                row["ratio_to_matmul_peak"] = flops / seconds / ctx.peak_flops
            rows[n] = row
        out[backend] = rows
    model.set_attention_backend("auto")
    return {"prompt_len": length, "backends": out}


def engine_end_to_end(ctx) -> dict:
    """The engine core (no API process) on the saved checkpoint: every request added at once, stepped until
    done; output tokens / wall seconds, prefill included."""
    from llamaserve.config import EngineConfig
    from llamaserve.engine.core import EngineCore
    from llamaserve.engine.messages import AddRequest
    from llamaserve.sampling_params import SamplingParams

    s = ctx.sizes
    options = dict(model=ctx.checkpoint, dtype=str(ctx.dtype).removeprefix("torch."), device=ctx.device.type,
                   max_num_seqs=s.requests, max_num_batched_tokens=s.max_num_batched_tokens,
                   max_model_len=s.input_len + s.output_len + BLOCK_SIZE, enable_prefix_caching=False, block_size=BLOCK_SIZE)
    if ctx.device.type != "cuda":
        options["kv_cache_gib"] = 0.25
    began = time.perf_counter()
    engine = EngineCore(EngineConfig.from_options(**options))
    load_seconds = time.perf_counter() - began
    prompts = getattr(ctx, "prompts", None) or ctx.w.random_prompts(s.requests, s.input_len, 32000, seed=1)

    def run(batch: list[list[int]], new_tokens: int, tag: str) -> tuple[dict, float, int]:
        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        tokens = {f"{tag}{i}": [] for i in range(len(batch))}
        start = time.perf_counter()
        for (rid, _), prompt in zip(tokens.items(), batch):
            refused = engine.add_request(AddRequest(rid, prompt, params))
            if refused is not None:
                raise RuntimeError(f"request refused: {refused.error}")
        steps = 0
        while engine.has_work():
            for output in engine.step():
                if output.finish_reason == "error":
                    raise RuntimeError(f"{output.request_id} failed: {output.error}")
                tokens[output.request_id] += output.new_token_ids
            steps += 1
        ctx.w.sync(ctx.device)
        return tokens, time.perf_counter() - start, steps

    try:
        # Warm-up: enough requests that decodes run both with and without split-K (each compiles once).
        run(prompts[:24], 4, "warm")
        tokens, seconds, steps = run(prompts, s.output_len, "r")
        backend = engine.runner.model.attn_backend.name
        num_blocks = engine.runner.num_blocks
    finally:
        engine.shutdown()
    total = sum(map(len, tokens.values()))
    result = {"requests": len(prompts), "input_len": s.input_len, "output_len": s.output_len, "output_tokens": total,
              "seconds": seconds, "tok_per_s": total / seconds, "steps": steps, "mean_step_ms": seconds / steps * 1e3,
              "attention_backend": backend, "kv_blocks": num_blocks, "load_seconds": load_seconds}
    hf = ctx.results.get("transformers", {})
    for name in ("one_at_a_time", "batched"):
        if name in hf:
            result[f"ratio_to_transformers_{name}"] = result["tok_per_s"] / hf[name]["tok_per_s"]
    if getattr(ctx, "hf_tokens", None):
        ours = [tokens[f"r{i}"] for i in range(len(ctx.hf_tokens))]
        result["greedy_vs_transformers"] = {
            "tokens_equal": sum(a == b for o, h in zip(ours, ctx.hf_tokens) for a, b in zip(o, h)),
            "tokens_compared": sum(map(len, ctx.hf_tokens)),
            "first_divergence": [next((i for i, (a, b) in enumerate(zip(o, h)) if a != b), None)
                                 for o, h in zip(ours, ctx.hf_tokens)],
        }
    return result


def cuda_graphs(ctx) -> dict:
    return {"status": "not yet", "reason": "CUDA graphs for decode come after the ModelRunner split (issue "
            "'GPU speed'); then this section compares eager and graph greedy tokens and step times"}


def speed_13b(ctx) -> dict:
    """Decode and prefill of the 13B shape with random weights (no transformers copy: speed only)."""
    model = ctx.w.build_ours(ctx.config(ctx.sizes.shape_13b), ctx.dtype, ctx.device, "auto")
    compared = ctx.backends
    ctx.backends = [b for b in compared if b != "torch"] or compared
    try:
        return {"shape": ctx.sizes.shape_13b, "decode": decode_speed(ctx, model), "prefill": prefill_speed(ctx, model)}
    finally:
        ctx.backends = compared
        del model
