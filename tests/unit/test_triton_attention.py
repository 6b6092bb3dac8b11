"""The Triton attention kernels against the torch reference backend, on the CPU through Triton's interpreter.

TRITON_INTERPRET=1 must be set before triton is first imported, and another test may already have imported
it in this process; so the kernel checks run in one child process (this module run as a script), which
reports a JSON line per case, and the tests here read their case from it. A second child, without the
interpreter, compiles every kernel for sm_90 and sm_80 (no GPU needed). Shapes are small: the interpreter
runs every program of a grid one after another in numpy.
"""

import importlib.util
import json
import random
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import pytest
import torch

from llamaserve.model.attention import AttentionMetadata, TorchAttentionBackend, select_attention_backend
from tests.unit.child import run_child as run_module

ROOT = Path(__file__).resolve().parents[2]
NUM_KV_HEADS = 2
HEAD_DIM = 32
# (query_len, seq_len) per sequence: decodes of a 1-token, a mid-block and a many-partition context; a chunk
# over a cached context, a fresh prompt, and a short chunk right after a full block.
BATCH = [(1, 1), (1, 37), (20, 49), (1, 100), (23, 23), (2, 66)]
KERNEL_CASES = {
    **{f"gqa{g}-block{bs}": dict(queries_per_kv=g, block_size=bs) for g in (1, 4, 8) for bs in (16, 32)},
    "gqa3-block16": dict(queries_per_kv=3, block_size=16),  # a group that is no power of two (SmolLM2: 9 / 3)
    "gqa4-block16-bfloat16": dict(queries_per_kv=4, block_size=16, dtype="bfloat16"),
}
SPLITS = {"whole": None, "split": 32}  # decode partition: chosen per step (one here) / forced split-K
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}
MODEL_TOLERANCE = 1e-4


# ---- in this process: what needs no kernel launch ------------------------------------------------------


def test_auto_serves_cpu_with_the_torch_backend():
    backend = select_attention_backend("auto", torch.device("cpu"), torch.float32, 4, 2, 16)
    assert isinstance(backend, TorchAttentionBackend)


def test_unknown_or_unservable_backends_are_refused():
    with pytest.raises(ValueError, match="must be one of"):
        select_attention_backend("flash", torch.device("cpu"), torch.float32, 4, 2, 16)
    with pytest.raises(ValueError, match="CUDA"):
        select_attention_backend("flashinfer", torch.device("cpu"), torch.bfloat16, 4, 2, 128)


def test_metadata_device_layout():
    meta = AttentionMetadata.build([3, 1, 5], [10, 7, 5], [[4, 2, 9], [1, 6], [3, 8, 11]], 4, [True, False, True])
    assert meta.slot_mapping.tolist() == [11, 36, 37, 26, 12, 13, 14, 15, 32]
    assert meta.token_seq_lens.tolist() == [10, 10, 10, 7, 5, 5, 5, 5, 5]
    assert meta.logits_indices.tolist() == [2, 8]
    assert meta.query_start_loc.tolist() == [0, 3, 4, 9]
    assert meta.block_table.tolist() == [[4, 2, 9], [1, 6, 0], [3, 8, 0]]
    assert (meta.decode_seqs.tolist(), meta.prefill_seqs.tolist()) == ([1], [0, 2])


def test_engine_and_model_import_without_the_api_packages():
    """The GPU machines have torch, triton and transformers but no fastapi, uvicorn or flashinfer."""
    code = ("import sys\n"
            "for name in ('fastapi', 'uvicorn', 'sse_starlette', 'flashinfer'): sys.modules[name] = None\n"
            "import llamaserve.engine.core, llamaserve.model.triton_attention, llamaserve.model.flashinfer_attention\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


# ---- in the child process: the kernels ---------------------------------------------------------------


def run_child(what: str, interpret: bool) -> dict:
    """This module as a script in a fresh process; its JSON lines merged into one dict."""
    return run_module("tests.unit.test_triton_attention", what, interpret=interpret)


@pytest.fixture(scope="module")
def kernel_results() -> dict:
    return run_child("kernels", interpret=True)


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_kernels_match_the_torch_backend(kernel_results, case, split):
    result = kernel_results[f"{case}/{split}"]
    assert "error" not in result, result.get("error")
    assert result["cache_equal"], "the fused cache write differs from index_copy_"
    assert result["max_diff"] <= result["tolerance"], result
    if split == "split":
        assert result["num_splits"] > 1  # the split-K path and its reduce really ran


def test_cache_write_skips_padded_tokens(kernel_results):
    assert kernel_results["cache-write-padding"] == {"untouched": True, "written": True}


def test_kernels_compile_for_the_gpus():
    """The interpreter runs kernels without compiling them; this compiles each one (Triton to cubin, with the
    wheel's ptxas, no GPU needed) for Hopper and Ampere, in the serving dtype and in float32. Its own child:
    under the interpreter @triton.jit makes no compilable function."""
    result = run_child("compile", interpret=False)["compile"]
    if "skipped" in result:
        pytest.skip(result["skipped"])
    assert "error" not in result, result.get("error")
    assert result["compiled"] == result["expected"]


def test_model_forward_matches_with_the_triton_backend(kernel_results):
    result = kernel_results["model"]
    assert "error" not in result, result.get("error")
    assert result["backend"] == "triton"
    assert result["max_diff"] <= MODEL_TOLERANCE, result


# ---- the child process --------------------------------------------------------------------------------


def scattered_tables(seq_lens: list[int], block_size: int, seed: int) -> tuple[list[list[int]], int]:
    """Shuffled, non-contiguous block tables; returns them and the pool size."""
    needed = [-(-s // block_size) for s in seq_lens]
    num_blocks = 2 * sum(needed) + 3
    pool = list(range(num_blocks))
    random.Random(seed).shuffle(pool)
    tables = [[pool.pop() for _ in range(n)] for n in needed]
    return tables, num_blocks


def kernel_case(queries_per_kv: int, block_size: int, partition: int | None, dtype: str = "float32") -> dict:
    from llamaserve.model.triton_attention import TritonAttentionBackend

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    num_heads = NUM_KV_HEADS * queries_per_kv
    query_lens, seq_lens = [q for q, _ in BATCH], [s for _, s in BATCH]
    tables, num_blocks = scattered_tables(seq_lens, block_size, seed=queries_per_kv * 100 + block_size)
    shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    # Earlier steps' K/V everywhere (what the new tokens overwrite, too: the write must land on top).
    cache = (torch.randn(shape).to(dt), torch.randn(shape).to(dt))
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, block_size)
    n = meta.num_tokens
    # q, k, v as the model has them: views into one fused projection (strided rows).
    qkv = torch.randn(n, (num_heads + 2 * NUM_KV_HEADS) * HEAD_DIM).to(dt)
    q, k, v = qkv.split([num_heads * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM], dim=-1)
    q = q.reshape(n, num_heads, HEAD_DIM)
    k, v = k.view(n, NUM_KV_HEADS, HEAD_DIM), v.view(n, NUM_KV_HEADS, HEAD_DIM)
    reference = TorchAttentionBackend(num_heads, NUM_KV_HEADS, HEAD_DIM)
    ref_cache = tuple(c.clone() for c in cache)
    expected = reference.forward(q, k, v, ref_cache, meta, reference.plan(meta))
    triton_backend = TritonAttentionBackend(num_heads, NUM_KV_HEADS, HEAD_DIM, "cpu", partition_size=partition)
    plan = triton_backend.plan(meta)
    ours = triton_backend.forward(q, k, v, cache, meta, plan)
    return {
        "max_diff": (ours.float() - expected.float()).abs().max().item(),
        "tolerance": TOLERANCE[dtype],
        "cache_equal": all(torch.equal(a, b) for a, b in zip(cache, ref_cache)),
        "num_splits": plan.num_splits,
    }


def cache_write_padding() -> dict:
    from llamaserve.model.triton_attention import TritonAttentionBackend

    backend = TritonAttentionBackend(4, NUM_KV_HEADS, HEAD_DIM, "cpu")
    k_cache, v_cache = torch.zeros(2, 4, 16, NUM_KV_HEADS, HEAD_DIM)
    k, v = torch.randn(2, 3, NUM_KV_HEADS, HEAD_DIM)
    backend.write_cache(k, v, k_cache, v_cache, torch.tensor([5, -1, 40]))
    flat_k = k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)
    written = torch.equal(flat_k[5], k[0]) and torch.equal(flat_k[40], k[2])
    untouched = int((flat_k.abs().sum((1, 2)) != 0).sum()) == 2
    return {"untouched": untouched, "written": written}


def compile_for_gpus() -> dict:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from llamaserve.model import triton_kernels as kernels

    if importlib.util.find_spec("triton.backends.nvidia") is None:
        return {"skipped": "this Triton has no NVIDIA backend"}
    int_tensors = {"slot_ptr", "block_table_ptr", "seq_lens_ptr", "query_start_ptr", "decode_seqs_ptr",
                   "prefill_seqs_ptr"}

    def signature(fn, dtype: str, constexprs: dict) -> dict:
        def kind(name):
            if name in constexprs:
                return "constexpr"
            if name in int_tensors:
                return "*i64"
            if name.endswith("_ptr"):
                return "*fp32" if name.startswith("part_") else f"*{dtype}"
            return "fp32" if name == "scale" else "i32"
        return {name: kind(name) for name in fn.arg_names}

    head = dict(HEAD_DIM=128, HEAD_DIM_P2=128)
    compiled = 0
    builds = []
    for dtype, dot in (("bf16", tl.bfloat16), ("fp32", tl.float32)):
        precision = "ieee" if dtype == "fp32" else "tf32"
        attend = dict(**head, BLOCK_SIZE=16, BLOCK_N=32, DOT_DTYPE=dot, DOT_PRECISION=precision)
        builds += [
            (kernels.cache_write_kernel, dtype, dict(NUM_KV_HEADS=8, HEADS_P2=8, **head)),
            (kernels.decode_kernel, dtype, dict(NUM_HEADS=32, QUERIES_PER_KV=4, GROUP_P2=16, SPLIT=True, **attend)),
            (kernels.decode_kernel, dtype, dict(NUM_HEADS=32, QUERIES_PER_KV=4, GROUP_P2=16, SPLIT=False, **attend)),
            (kernels.decode_reduce_kernel, dtype, dict(NUM_HEADS=32, SPLITS_P2=4, **head)),
            (kernels.prefill_kernel, dtype, dict(QUERIES_PER_KV=4, GROUP_P2=4, BLOCK_Q=16, **attend)),
        ]
    targets = [GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32)]
    for target in targets:
        for fn, dtype, constexprs in builds:
            triton.compile(ASTSource(fn, signature(fn, dtype, constexprs), constexprs), target=target)
            compiled += 1
    return {"compiled": compiled, "expected": len(targets) * len(builds)}


def model_case() -> dict:
    """Whole forwards of a tiny checkpoint, torch backend against triton, over mixed prefill/decode steps."""
    from llamaserve.model.attention import allocate_kv_cache
    from llamaserve.model.loader import load_model
    from tests.conftest import make_tiny_checkpoint

    block_size = 16
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(make_tiny_checkpoint(Path(tmp)), "float32")
    arch = model.arch
    prompts = {0: list(range(3, 33)), 1: list(range(40, 45)), 2: list(range(50, 69))}
    # Per step: (sequence, new tokens); None = decode the greedy token of its last step.
    steps = [[(0, prompts[0][:13]), (1, prompts[1])],
             [(0, prompts[0][13:]), (1, None), (2, prompts[2])],
             [(0, None), (1, None), (2, None)], [(0, None), (1, None), (2, None)]]
    tables, num_blocks = scattered_tables([48, 48, 48], block_size, seed=7)
    caches = {name: allocate_kv_cache(arch.num_hidden_layers, num_blocks, block_size, arch.num_key_value_heads,
                                      arch.head_dim, torch.float32, "cpu") for name in ("torch", "triton")}
    lengths, last, worst = {}, {}, 0.0
    for work in steps:
        ids, positions, query_lens, lens = [], [], [], []
        for seq, tokens in work:
            tokens = tokens if tokens is not None else [last[seq]]
            start = lengths.get(seq, 0)
            ids += tokens
            positions += range(start, start + len(tokens))
            query_lens.append(len(tokens))
            lengths[seq] = start + len(tokens)
            lens.append(lengths[seq])
        meta = AttentionMetadata.build(query_lens, lens, [tables[seq] for seq, _ in work], block_size)
        logits = {}
        for name in ("torch", "triton"):
            model.set_attention_backend(name)
            logits[name] = model(torch.tensor(ids), torch.tensor(positions), caches[name], meta)
        worst = max(worst, (logits["torch"] - logits["triton"]).abs().max().item())
        for (seq, _), row in zip(work, logits["torch"]):
            last[seq] = int(row.argmax())
    return {"max_diff": worst, "backend": model.attn_backend.name}


def child(what: str) -> None:
    def report(name, check, **kwargs):
        try:
            result = check(**kwargs)
        except Exception:
            result = {"error": traceback.format_exc()}
        print(json.dumps({name: result}), flush=True)

    if what == "compile":
        report("compile", compile_for_gpus)
        return
    for case, options in KERNEL_CASES.items():
        for split, partition in SPLITS.items():
            report(f"{case}/{split}", kernel_case, **options, partition=partition)
    report("cache-write-padding", cache_write_padding)
    report("model", model_case)


if __name__ == "__main__":
    child(sys.argv[1])
