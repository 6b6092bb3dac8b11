"""Batched sampler: greedy, seeds, filters, penalties, bias and logprobs on CPU."""

import math

import pytest
import torch

from llamaserve.model.sampler import (CANDIDATES, Sampler, SamplingBatch, _sorted_top_k_top_p, forbidden_tokens,
                                      process_logits, top_k_top_p)
from llamaserve.sampling_params import SamplingParams

VOCAB = 8
# A fixed distribution, shuffled so that sorting and scattering back is exercised.
PROBS = torch.tensor([0.05, 0.40, 0.02, 0.15, 0.25, 0.10, 0.03, 0.00001])
LOGITS = PROBS.log()  # [VOCAB]


def batch_of(params, generators=None, prompts=None, outputs=None, vocab=VOCAB):
    n = len(params)
    return SamplingBatch.build(
        params, generators or [None] * n, prompts or [[] for _ in range(n)], outputs or [[] for _ in range(n)],
        vocab, "cpu",
    )


def sample(params, logits, **kw):
    return Sampler()(logits, batch_of(params, **kw))


def draw_many(params: SamplingParams, n=2000, logits=LOGITS):
    """Sampled token ids of one batch of n identical rows."""
    torch.manual_seed(0)  # unseeded rows share the global generator
    return sample([params] * n, logits.expand(n, -1)).token_ids


def frequencies(tokens, vocab=VOCAB):
    return torch.bincount(tokens, minlength=vocab).float() / len(tokens)


def test_greedy_equals_argmax_and_pays_for_nothing():
    logits = torch.randn(5, 100, dtype=torch.bfloat16)
    batch = batch_of([SamplingParams(temperature=0)] * 5, vocab=100)
    assert batch.all_greedy and not batch.needs_processing
    assert batch.temperature is None and batch.top_k is None and batch.penalty_rows is None
    out = Sampler()(logits, batch)
    assert torch.equal(out.token_ids, logits.argmax(-1)) and out.logprobs is None


def test_top_k_one_equals_greedy_at_high_temperature():
    torch.manual_seed(0)
    logits = torch.randn(64, 50)
    params = [SamplingParams(temperature=5.0, top_k=1), SamplingParams(temperature=1.5)] * 32
    out = sample(params, logits)
    assert torch.equal(out.token_ids[0::2], logits[0::2].argmax(-1))


def test_seeded_row_is_reproducible_alone_and_in_a_mixed_batch():
    vocab, steps = 1000, 20
    step_logits = torch.randn(steps, vocab, generator=torch.Generator().manual_seed(1))
    mine = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)

    def run(params, my_row):
        generators = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in params]
        tokens = []
        for step in range(steps):
            logits = torch.randn(len(params), vocab)  # the others' logits vary run to run
            logits[my_row] = step_logits[step]
            batch = batch_of(params, generators, outputs=[tokens[:] for _ in params], vocab=vocab)
            tokens.append(Sampler()(logits, batch).token_ids[my_row].item())
        return tokens

    alone = run([mine], 0)
    others = [
        SamplingParams(temperature=1.3, top_k=5, presence_penalty=0.5),
        SamplingParams(temperature=0),
        SamplingParams(seed=7, min_p=0.1),
        SamplingParams(temperature=0.7, logit_bias={3: 2.0}, logprobs=2),
    ]
    torch.manual_seed(99)
    mixed = run(others[:3] + [mine] + others[3:], 3)
    assert alone == mixed
    assert len(set(alone)) > 1  # it really sampled
    assert run([SamplingParams(temperature=0.9, top_p=0.95, seed=4321)], 0) != alone


def test_top_p_keeps_the_smallest_set_reaching_top_p():
    # Sorted: 0.40, 0.25, 0.15 | 0.10 ... -> 0.40 + 0.25 < 0.7 <= 0.80, so three tokens stay.
    freq = frequencies(draw_many(SamplingParams(top_p=0.7)))
    kept = torch.tensor([1, 4, 3])
    expected = torch.zeros(VOCAB)
    expected[kept] = PROBS[kept] / PROBS[kept].sum()
    assert torch.count_nonzero(freq).item() == 3 and (freq[kept] > 0).all()
    assert torch.allclose(freq, expected, atol=0.04)


def test_min_p_drops_tokens_below_min_p_times_max():
    # 0.2 * 0.40 = 0.08: tokens with 0.40, 0.25, 0.15, 0.10 stay.
    freq = frequencies(draw_many(SamplingParams(min_p=0.2)))
    kept = torch.tensor([1, 4, 3, 5])
    expected = torch.zeros(VOCAB)
    expected[kept] = PROBS[kept] / PROBS[kept].sum()
    assert torch.count_nonzero(freq).item() == 4
    assert torch.allclose(freq, expected, atol=0.04)


def test_top_k_keeps_exactly_k_candidates_even_with_ties():
    freq = frequencies(draw_many(SamplingParams(top_k=3)))
    assert set(freq.nonzero().flatten().tolist()) == {1, 4, 3}
    tied = torch.zeros(VOCAB)
    assert torch.count_nonzero(frequencies(draw_many(SamplingParams(top_k=4), logits=tied))).item() == 4


def test_lower_temperature_concentrates_mass():
    def entropy(temperature):
        freq = frequencies(draw_many(SamplingParams(temperature=temperature)))
        return -sum(p * math.log(p) for p in freq.tolist() if p > 0)

    assert entropy(0.3) < entropy(1.0) < entropy(2.0)


def test_penalties_transform_logits_exactly():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5]]).expand(4, -1)
    params = [
        SamplingParams(repetition_penalty=2.0),
        SamplingParams(),
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
    ]
    prompts, outputs = [[0]] * 4, [[1, 1, 3]] * 4  # token 0 seen in the prompt only, 1 twice, 3 once
    batch = batch_of(params, prompts=prompts, outputs=outputs, vocab=5)
    got = process_logits(logits, batch)
    expected = torch.tensor([
        [1.0, -4.0, 1.0, -2.0, 0.5],  # positive / 2, negative * 2, only for seen tokens
        [2.0, -2.0, 1.0, -1.0, 0.5],  # no penalties: untouched
        [2.0, -3.0, 1.0, -1.75, 0.5],  # -0.5 presence, -0.25 per output occurrence; prompt ignored
        [1.0, -5.0, 1.0, -2.75, 0.5],  # repetition first, then presence and frequency
    ])
    assert torch.equal(got, expected)
    assert torch.equal(logits[0], torch.tensor([2.0, -2.0, 1.0, -1.0, 0.5]))  # caller's logits intact
    # Greedy sees the penalized logits: repetition 2.5 turns token 0's 2.0 into 0.8, so token 2 (1.0) wins.
    greedy = sample([SamplingParams(temperature=0, repetition_penalty=2.5)], logits[:1], prompts=[[0]], vocab=5)
    assert greedy.token_ids.item() == 2


def test_logit_bias_forces_and_forbids():
    torch.manual_seed(0)
    logits = torch.randn(200, 50)
    forced = sample([SamplingParams(temperature=1.0, logit_bias={7: 100.0})] * 200, logits, vocab=50)
    assert (forced.token_ids == 7).all()
    top = int(LOGITS.argmax())
    assert sample([SamplingParams(temperature=0, logit_bias={top: -100.0})], LOGITS[None]).token_ids.item() != top
    assert (draw_many(SamplingParams(logit_bias={top: -100.0})) != top).all()


def test_logprobs_are_pre_temperature_log_softmax_and_sorted_top_k():
    torch.manual_seed(0)
    logits = torch.randn(4, 30, dtype=torch.bfloat16)
    params = [
        SamplingParams(temperature=0.5, top_k=5, logprobs=3),
        SamplingParams(temperature=0, logprobs=5, frequency_penalty=1.0),
        SamplingParams(top_p=0.5),
        SamplingParams(temperature=2.0, logit_bias={0: 3.0}, logprobs=0),
    ]
    batch = batch_of(params, outputs=[[1, 2, 2]] * 4, vocab=30)
    out = Sampler()(logits, batch)
    reference = process_logits(logits, batch).log_softmax(-1)  # [4, 30]
    assert torch.allclose(out.logprobs, reference.gather(-1, out.token_ids[:, None]).squeeze(-1))
    values, ids = out.top_logprobs
    assert values.shape == (4, 5)
    assert (values[:, :-1] >= values[:, 1:]).all()
    ref_values, ref_ids = reference.topk(5, dim=-1)
    assert torch.equal(values, ref_values) and torch.equal(ids, ref_ids)


@pytest.mark.parametrize("bad", [-1, VOCAB])
def test_out_of_range_logit_bias_is_rejected_before_the_device(bad):
    with pytest.raises(ValueError):
        batch_of([SamplingParams(logit_bias={bad: 1.0})])


@pytest.mark.parametrize("greedy", [dict(temperature=1e-7), dict(temperature=0.5, top_p=0), dict(top_k=1)])
def test_tiny_temperature_and_zero_top_p_are_greedy_beside_sampled_rows(greedy):
    torch.manual_seed(0)
    logits = torch.randn(64, 50) * 10
    params = [SamplingParams(**greedy), SamplingParams(temperature=1.5, top_p=0.9)] * 32
    out = sample(params, logits)
    assert SamplingParams(**greedy).greedy
    assert torch.equal(out.token_ids[0::2], logits[0::2].argmax(-1))


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_sampling_numbers_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={1: value})


# ---- grammar masks (structured output) ------------------------------------------------------------


def bitmask_of(allowed: list[set[int]], vocab: int) -> torch.Tensor:
    """[rows, ceil(vocab / 32)] int32 in xgrammar's layout: bit j of word i allows token 32 i + j."""
    words = [[0] * -(-vocab // 32) for _ in allowed]
    for row, tokens in zip(words, allowed):
        for t in tokens:
            row[t // 32] |= 1 << (t % 32)
    return torch.tensor([[w - 2**32 if w >= 2**31 else w for w in row] for row in words], dtype=torch.int32)


def constrained_batch(params, allowed: dict[int, set[int]], vocab, generators=None, outputs=None):
    rows = sorted(allowed)
    return SamplingBatch.build(
        params, generators or [None] * len(params), [[] for _ in params], outputs or [[] for _ in params],
        vocab, "cpu", rows, bitmask_of([allowed[r] for r in rows], vocab),
    )


def test_forbidden_tokens_reads_every_bit_of_a_ragged_vocab():
    vocab = 70  # three words, the last one partly used
    allowed = [{0, 31, 32, 63, 69}, set(), set(range(vocab))]
    got = forbidden_tokens(bitmask_of(allowed, vocab), vocab)
    assert got.shape == (3, vocab) and got.dtype == torch.bool
    for row, tokens in enumerate(allowed):
        assert set((~got[row]).nonzero().flatten().tolist()) == tokens


def test_grammar_mask_holds_constrained_rows_and_leaves_the_others_alone():
    torch.manual_seed(0)
    vocab = 70
    logits = torch.randn(4, vocab)
    allowed = {1: {5, 40, 69}, 3: {33}}
    greedy = [SamplingParams(temperature=0)] * 4
    out = Sampler()(logits, constrained_batch(greedy, allowed, vocab))
    assert out.token_ids[0] == logits[0].argmax() and out.token_ids[2] == logits[2].argmax()
    assert out.token_ids[1] == max(allowed[1], key=lambda t: logits[1, t]) and out.token_ids[3] == 33
    # Sampled rows at a high temperature, with every filter: only allowed tokens are ever drawn.
    params = [SamplingParams(temperature=2.0, top_k=50, top_p=0.99, min_p=0.001)] * 4
    batch = constrained_batch(params, allowed, vocab)
    draws = torch.stack([Sampler()(logits, batch).token_ids for _ in range(300)])  # [300, 4]
    assert set(draws[:, 1].tolist()) == allowed[1] and set(draws[:, 3].tolist()) == {33}
    assert len(set(draws[:, 0].tolist())) > 10  # the unconstrained rows still range over the vocabulary


def test_no_constrained_row_keeps_the_fast_path():
    batch = SamplingBatch.build([SamplingParams(temperature=0)] * 2, [None] * 2, [[], []], [[], []], 70, "cpu",
                                [], None)
    assert batch.grammar_rows is None and not batch.needs_processing
    batch = constrained_batch([SamplingParams(temperature=0)] * 2, {0: {1}}, 70)
    assert batch.needs_processing


def test_the_mask_comes_after_bias_and_penalties():
    vocab = 40
    logits = torch.zeros(1, vocab)
    params = SamplingParams(temperature=0, logit_bias={7: 100.0, 3: 3.0}, presence_penalty=2.0)
    batch = constrained_batch([params], {0: {3, 9}}, vocab, outputs=[[3, 3]])
    expected = torch.full((1, vocab), float("-inf"))
    expected[0, 3], expected[0, 9] = 1.0, 0.0  # 3: +3 bias -2 presence; 7: forbidden whatever its bias
    assert torch.equal(process_logits(logits, batch), expected)
    assert Sampler()(logits, batch).token_ids.item() == 3


def test_logprobs_describe_the_constrained_distribution():
    torch.manual_seed(1)
    vocab = 50
    logits = torch.randn(2, vocab)
    params = [SamplingParams(temperature=0.7, logprobs=5), SamplingParams(temperature=0, logprobs=5)]
    out = Sampler()(logits, constrained_batch(params, {0: {2, 4, 8}}, vocab))
    values, ids = out.top_logprobs
    assert set(ids[0, :3].tolist()) == {2, 4, 8} and (values[0, 3:] == float("-inf")).all()
    assert torch.isclose(values[0, :3].exp().sum(), torch.tensor(1.0))  # the mass of the allowed tokens
    assert torch.allclose(values[1], logits[1].log_softmax(-1).topk(5).values)  # the free row is untouched
    assert out.token_ids[0].item() in {2, 4, 8} and math.isfinite(out.logprobs[0])


def test_a_seeded_constrained_row_draws_the_same_tokens_alone_and_in_a_batch():
    vocab, steps = 200, 15
    allowed = set(range(0, vocab, 3))
    mine = SamplingParams(temperature=1.0, seed=5)
    step_logits = torch.randn(steps, vocab, generator=torch.Generator().manual_seed(2))

    def run(params, my_row):
        generators = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in params]
        tokens = []
        for step in range(steps):
            logits = torch.randn(len(params), vocab)
            logits[my_row] = step_logits[step]
            batch = constrained_batch(params, {my_row: allowed, 0: {1, 2}} if my_row else {0: allowed}, vocab,
                                      generators)
            tokens.append(Sampler()(logits, batch).token_ids[my_row].item())
        return tokens

    alone = run([mine], 0)
    assert set(alone) <= allowed and len(set(alone)) > 1
    assert run([SamplingParams(temperature=1.3), SamplingParams(top_k=3), mine], 2) == alone


def test_the_cut_from_candidates_keeps_what_a_full_sort_keeps():
    """Rows whose top k or nucleus lies among their most likely CANDIDATES, rows whose nucleus reaches past them (a
    flat distribution: sorted in full), one in between, a top k wider than the candidates, and rows with neither."""
    vocab = 20000
    torch.manual_seed(3)
    peaked, flat, between = torch.randn(vocab) * 4, torch.randn(vocab) * 0.01, torch.randn(vocab) * 2.5
    rows = [(peaked, None, 0.9), (flat, None, 0.9), (peaked, 40, None), (flat, 1000, 0.5), (peaked, 3, 0.9),
            (flat, None, None), (peaked, None, 0.99), (between, None, 0.9)]
    assert between.softmax(-1).topk(CANDIDATES[0]).values.sum() < 0.9 < between.softmax(-1).topk(
        CANDIDATES[1]).values.sum()
    logits = torch.stack([r[0] for r in rows])
    top_k = torch.tensor([[r[1] or vocab] for r in rows])
    top_p = torch.tensor([[r[2] or math.inf] for r in rows])
    mass = lambda logits, width: logits.softmax(-1).topk(width).values.sum()  # noqa: E731
    assert mass(flat, CANDIDATES[-1]) < 0.9 < mass(peaked, CANDIDATES[0])
    for k in (top_k, None):
        ours, theirs = top_k_top_p(logits.clone(), k, top_p), _sorted_top_k_top_p(logits.clone(), k, top_p)
        kept, kept_by_sort = torch.isfinite(ours), torch.isfinite(theirs)
        assert torch.equal(ours[kept], logits[kept])  # what survives is untouched
        for row in range(len(rows)):
            # The same most likely tokens, but for one where the mass crosses top_p within float32 rounding.
            assert abs(kept[row].sum() - kept_by_sort[row].sum()) <= 1
            assert (kept[row] & kept_by_sort[row]).sum() == min(kept[row].sum(), kept_by_sort[row].sum())
        fuzzy = 6  # 0.99 of the peaked row is crossed within rounding (a token more here); the rest are clear of it
        assert torch.equal(torch.cat([kept[:fuzzy], kept[fuzzy + 1:]]), torch.cat([kept_by_sort[:fuzzy],
                                                                                   kept_by_sort[fuzzy + 1:]]))
    assert kept_by_sort[5].all() and top_k_top_p(logits.clone(), top_k, top_p)[2].isfinite().sum() == 40


def test_a_top_p_below_float32s_range_keeps_the_top_token():
    """6.7e-59 is 0 in float32: the nucleus must still hold the most likely token (a fuzzer's find: every token
    masked, the draw ran past the vocabulary)."""
    logits = torch.randn(4, 5000) * 3
    params = [SamplingParams(temperature=0.7, top_p=6.7e-59)] * 4
    assert torch.equal(sample(params, logits.clone(), vocab=5000).token_ids, logits.argmax(-1))
