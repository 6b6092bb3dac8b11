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
        graphs = engine.runner.graphs
        graph_gib = engine.runner.graph_memory_bytes / 2**30 if engine.runner.graph_memory_bytes else None
    finally:
        engine.shutdown()
    total = sum(map(len, tokens.values()))
    result = {"requests": len(prompts), "input_len": s.input_len, "output_len": s.output_len, "output_tokens": total,
              "seconds": seconds, "tok_per_s": total / seconds, "steps": steps, "mean_step_ms": seconds / steps * 1e3,
              "attention_backend": backend, "kv_blocks": num_blocks, "load_seconds": load_seconds,
              "cuda_graphs": graphs.sizes if graphs is not None else None, "graph_memory_gib": graph_gib}
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


def _engine(ctx, **options):
    from llamaserve.config import EngineConfig
    from llamaserve.engine.core import EngineCore

    options = dict(model=ctx.checkpoint, dtype=str(ctx.dtype).removeprefix("torch."), device=ctx.device.type,
                   enable_prefix_caching=False, block_size=BLOCK_SIZE, **options)
    if ctx.device.type != "cuda" and "num_blocks" not in options:
        options["kv_cache_gib"] = 0.25
    return EngineCore(EngineConfig.from_options(**options))


def _add(engine, prompts: list[list[int]], params, tag: str) -> dict[str, list[int]]:
    from llamaserve.engine.messages import AddRequest

    tokens = {}
    for i, prompt in enumerate(prompts):
        refused = engine.add_request(AddRequest(f"{tag}{i}", prompt, params))
        if refused is not None:
            raise RuntimeError(f"request refused: {refused.error}")
        tokens[f"{tag}{i}"] = []
    return tokens


def _step(engine, tokens: dict[str, list[int]]) -> None:
    for output in engine.step():
        if output.finish_reason == "error":
            raise RuntimeError(f"{output.request_id} failed: {output.error}")
        if output.request_id in tokens:
            tokens[output.request_id] += output.new_token_ids


def _decode_steps(ctx, engine, batch: int, seed: int) -> tuple[dict[str, list[int]], list[float]]:
    """`batch` greedy requests added at once, stepped to the end; the wall time of every step after the last
    request's first token (pure decode steps of `batch` sequences)."""
    from llamaserve.sampling_params import SamplingParams

    s = ctx.sizes
    prompts = ctx.w.random_prompts(batch, s.graph_input_len, engine.runner.arch.vocab_size, seed)
    tokens = _add(engine, prompts, SamplingParams(temperature=0, max_tokens=s.graph_output_len, ignore_eos=True),
                  f"b{batch}-")
    while not all(tokens.values()):
        _step(engine, tokens)
    times = []
    while engine.has_work():
        start = time.perf_counter()
        _step(engine, tokens)
        ctx.w.sync(ctx.device)
        times.append(time.perf_counter() - start)
    return tokens, times


def _sync_check(ctx, engine) -> dict:
    """One decode step of a batch that uses every sampler stage (seeds, penalties, bias, top-k/p, min-p,
    logprobs) under torch.cuda.set_sync_debug_mode("error"): anything in it that synchronises the host with the
    device raises, except the wait for the step's one copy of sampled tokens (an event, which the mode does not
    flag). Runs the runner's step directly: the engine would turn the error into failed requests."""
    from llamaserve.sampling_params import SamplingParams

    s, vocab = ctx.sizes, engine.runner.arch.vocab_size
    common = dict(max_tokens=s.graph_output_len, ignore_eos=True)  # >= 3: prefill, a decode, the checked decode
    params = [SamplingParams(temperature=0, **common),
              SamplingParams(temperature=0.8, top_p=0.9, seed=7, **common),
              SamplingParams(temperature=1.0, top_k=20, repetition_penalty=1.2, presence_penalty=0.3, logprobs=5,
                             **common),
              SamplingParams(temperature=0.7, min_p=0.1, frequency_penalty=0.5, logit_bias={5: 2.0}, **common)]
    tokens = {}
    for i, p in enumerate(params):  # prompts of different lengths: the decodes' contexts differ
        prompt = ctx.w.random_prompts(1, s.graph_input_len - 3 * i, vocab, 40 + i)
        tokens.update(_add(engine, prompt, p, f"sync{i}-"))
    while not all(tokens.values()):
        _step(engine, tokens)
    _step(engine, tokens)  # a decode step with every penalty row already built
    step = engine.scheduler.schedule()
    if ctx.device.type != "cuda":
        engine.runner.execute(step)
        return {"ok": None, "reason": "set_sync_debug_mode is CUDA only; the step ran without it"}
    torch.cuda.set_sync_debug_mode("error")
    try:
        engine.runner.execute(step)
        error = None
    except RuntimeError as e:
        error = f"{e}"[:2000]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.set_sync_debug_mode("error")  # the control: a plain .item() must raise
    try:
        torch.zeros(1, device=ctx.device).item()
        control = False
    except RuntimeError:
        control = True
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return {"ok": error is None and control, "error": error, "control_item_raises": control,
            "decodes": len(step.scheduled)}


def cuda_graphs(ctx) -> dict:
    """The engine on the saved checkpoint with CUDA graphs for decode steps (the default on CUDA) against
    --enforce-eager: the same greedy tokens, decode step times at a few batch sizes, and the sync-debug check
    of a decode step in each mode. The two engines run one after the other, each with a fixed cache."""
    s = ctx.sizes
    most = max(s.graph_batches)
    per_request = -(-(s.graph_input_len + s.graph_output_len) // BLOCK_SIZE)
    options = dict(max_num_seqs=most, max_num_batched_tokens=max(s.max_num_batched_tokens, most),
                   max_model_len=s.graph_input_len + s.graph_output_len + BLOCK_SIZE,
                   num_blocks=sum(s.graph_batches) * per_request + 64)
    out, tokens = {}, {}
    for mode, eager in (("eager", True), ("graphs", False)):
        began = time.perf_counter()
        engine = _engine(ctx, enforce_eager=eager, **options)
        result = {"load_seconds": time.perf_counter() - began, "graphs_captured": engine.runner.graphs is not None,
                  "decode": {}}
        if engine.runner.graphs is not None:
            result["graph_batch_sizes"] = engine.runner.graphs.sizes
        try:
            tokens[mode] = {}
            for b in s.graph_batches:
                got, times = _decode_steps(ctx, engine, b, seed=60 + b)
                tokens[mode].update(got)
                times = sorted(times)
                result["decode"][b] = {"steps": len(times), "median_step_ms": times[len(times) // 2] * 1e3,
                                       "mean_step_ms": sum(times) / len(times) * 1e3,
                                       "tok_per_s": b * len(times) / sum(times)}
            result["attention_backend"] = engine.runner.model.attn_backend.name
            result["sync_check"] = _sync_check(ctx, engine)
        finally:
            engine.shutdown()
            del engine
            ctx.w.free_device_memory(ctx.device)
        out[mode] = result
    equal = sum(a == b for rid in tokens["eager"] for a, b in zip(tokens["eager"][rid], tokens["graphs"][rid]))
    total = sum(len(t) for t in tokens["eager"].values())
    out["greedy_tokens_equal"] = equal
    out["greedy_tokens_compared"] = total
    out["first_divergence"] = {rid: next((i for i, (a, b) in enumerate(zip(t, tokens["graphs"][rid])) if a != b),
                                         None) for rid, t in tokens["eager"].items()}
    out["first_divergence"] = {k: v for k, v in out["first_divergence"].items() if v is not None}
    out["speedup"] = {b: out["eager"]["decode"][b]["median_step_ms"] / out["graphs"]["decode"][b]["median_step_ms"]
                      for b in s.graph_batches}
    out["note"] = (f"{ctx.dtype}: graphs run the same kernels, but the Triton decode split is planned for "
                   "max_model_len in a graph and per step eagerly, so bf16 sums may round apart late in a sequence")
    return out


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
