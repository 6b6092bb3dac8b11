"""Our paged, flat-batch Llama against transformers' LlamaForCausalLM on the same files."""

import random

import pytest
import torch
from transformers import DynamicCache
from transformers import LlamaForCausalLM as ReferenceLlama

from llamaserve.model.attention import AttentionMetadata, allocate_kv_cache
from llamaserve.model.loader import load_model
from tests.conftest import make_tiny_checkpoint

TOL = 1e-4
BLOCK_SIZE = 4

CASES = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "mqa-tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "linear": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    "dynamic": dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
    "llama3": dict(
        rope_parameters={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
            "rope_theta": 500000.0,
        }
    ),
}


class PagedSequences:
    """Drives our model the way an engine would: scattered block tables, chunks and decodes mixed."""

    def __init__(self, model, num_blocks=128, seed=0):
        arch = model.arch
        self.model = model
        self.kv = allocate_kv_cache(
            arch.num_hidden_layers, num_blocks, BLOCK_SIZE, arch.num_key_value_heads, arch.head_dim,
            torch.float32, "cpu",
        )
        self.free_blocks = list(range(num_blocks))
        random.Random(seed).shuffle(self.free_blocks)  # non-contiguous, out-of-order tables
        self.tables: dict[int, list[int]] = {}
        self.computed: dict[int, int] = {}

    def step(self, work: list[tuple[int, list[int]]]) -> torch.Tensor:
        """work: (sequence id, new token ids) per sequence. Returns logits of each one's last token."""
        ids, positions, query_lens, seq_lens, tables = [], [], [], [], []
        for seq, tokens in work:
            start = self.computed.get(seq, 0)
            table = self.tables.setdefault(seq, [])
            while len(table) * BLOCK_SIZE < start + len(tokens):
                table.append(self.free_blocks.pop())
            ids += tokens
            positions += range(start, start + len(tokens))
            query_lens.append(len(tokens))
            seq_lens.append(start + len(tokens))
            tables.append(table)
            self.computed[seq] = start + len(tokens)
        meta = AttentionMetadata.build(query_lens, seq_lens, tables, BLOCK_SIZE)
        return self.model(torch.tensor(ids), torch.tensor(positions), self.kv, meta)


def reference_run(path, chunks: list[list[int]], num_decode: int):
    """transformers with its own KV cache, fed the same chunks, then greedy decodes.
    A fresh model per sequence: dynamic RoPE keeps per-module state across calls."""
    ref = ReferenceLlama.from_pretrained(path, dtype=torch.float32).eval()
    logits, cache, tokens = [], DynamicCache(config=ref.config), []
    with torch.no_grad():
        for chunk in chunks:
            logits.append(ref(torch.tensor([chunk]), cache=cache, use_cache=True).logits[0, -1])
        for _ in range(num_decode):
            tokens.append(int(logits[-1].argmax()))
            logits.append(ref(torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True).logits[0, -1])
    return torch.stack(logits), tokens


def prompt(seed: int, length: int) -> list[int]:
    return torch.randint(3, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), **CASES[request.param])
    return path


def test_whole_prompt_prefill(checkpoint):
    model = load_model(checkpoint, "float32")
    tokens = prompt(1, 40)  # longer than max_position_embeddings (32): scaling is exercised
    ours = PagedSequences(model).step([(0, tokens)])[0]
    ref_logits, _ = reference_run(checkpoint, [tokens], 0)
    diff = (ours - ref_logits[0]).abs().max().item()
    print(f"{checkpoint.name} prefill max|dlogit|={diff:.2e}")
    assert diff < TOL


def test_chunked_prefill_then_decode(checkpoint):
    model = load_model(checkpoint, "float32")
    tokens = prompt(2, 37)
    chunks = [tokens[:5], tokens[5:16], tokens[16:17], tokens[17:]]
    ref_logits, ref_tokens = reference_run(checkpoint, chunks, 20)
    seqs = PagedSequences(model, seed=3)
    ours, generated = [], []
    for chunk in chunks:
        ours.append(seqs.step([(0, chunk)])[0])
    for _ in range(20):
        generated.append(int(ours[-1].argmax()))
        ours.append(seqs.step([(0, [generated[-1]])])[0])
    diff = (torch.stack(ours) - ref_logits).abs().max().item()
    print(f"{checkpoint.name} chunked+decode max|dlogit|={diff:.2e}")
    assert generated == ref_tokens
    assert diff < TOL


def test_mixed_batch_of_prefills_and_decodes(checkpoint):
    """Four sequences of different lengths in one flat forward per step: some prefill in chunks
    while others decode."""
    model = load_model(checkpoint, "float32")
    prompts = {0: prompt(10, 3), 1: prompt(11, 29), 2: prompt(12, 41), 3: prompt(13, 12)}
    chunk_plans = {0: [3], 1: [10, 19], 2: [7, 30, 4], 3: [12]}
    num_decode = 8
    seqs = PagedSequences(model, seed=5)
    logits = {s: [] for s in prompts}
    generated = {s: [] for s in prompts}
    offsets = {s: 0 for s in prompts}
    pending = {s: list(plan) for s, plan in chunk_plans.items()}
    start_step = {0: 0, 1: 0, 2: 1, 3: 3}  # later arrivals join a running batch
    step = 0
    while any(len(generated[s]) < num_decode for s in prompts):
        work = []
        for s in prompts:
            if step < start_step[s] or len(generated[s]) >= num_decode:
                continue
            if pending[s]:
                n = pending[s].pop(0)
                work.append((s, prompts[s][offsets[s] : offsets[s] + n]))
                offsets[s] += n
            else:
                generated[s].append(int(logits[s][-1].argmax()))
                work.append((s, [generated[s][-1]]))
        out = seqs.step(work)
        for (s, _), row in zip(work, out):
            logits[s].append(row)
        step += 1
    worst = 0.0
    for s in prompts:
        plan = chunk_plans[s]
        chunks, off = [], 0
        for n in plan:
            chunks.append(prompts[s][off : off + n])
            off += n
        ref_logits, ref_tokens = reference_run(checkpoint, chunks, num_decode)
        # Our last row is the logits after the final decode input; compare all rows we have.
        ours = torch.stack(logits[s])
        worst = max(worst, (ours - ref_logits[: len(ours)]).abs().max().item())
        assert generated[s] == ref_tokens[: len(generated[s])]
    print(f"{checkpoint.name} mixed max|dlogit|={worst:.2e}")
    assert worst < TOL
