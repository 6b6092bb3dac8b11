"""Penalty counts kept on the device and advanced by each step's sampled tokens give what counting the token
lists afresh every step gives, through admissions, preemptions, releases and more penalized requests than
rows; and the sampling state's tokens and logprobs match the sampler on a batch built from the lists."""

import random

import pytest
import torch

from llamaserve.engine.request import Request
from llamaserve.engine.runner.sampling import SamplingState
from llamaserve.model.sampler import Sampler, SamplingBatch, _token_counts
from llamaserve.model.staging import StagingBuffer
from llamaserve.sampling_params import SamplingParams

VOCAB = 40
PENALIZED = [
    SamplingParams(temperature=0, repetition_penalty=1.8),
    SamplingParams(temperature=0, presence_penalty=1.5),
    SamplingParams(temperature=0, frequency_penalty=0.7, logit_bias={3: 2.0}),
    SamplingParams(temperature=0, repetition_penalty=1.3, presence_penalty=-0.5, frequency_penalty=1.0),
]


def step(state: SamplingState, staging: StagingBuffer, requests: list[Request], logits: torch.Tensor):
    staged = state.stage(requests, [], staging.begin())
    staging.send()
    return state.sample(logits, staged, None)


def from_lists(requests: list[Request], logits: torch.Tensor) -> list[int]:
    batch = SamplingBatch.build([r.sampling_params for r in requests], [None] * len(requests),
                                [r.prompt_token_ids for r in requests], [r.output_token_ids for r in requests],
                                VOCAB, "cpu")
    return Sampler()(logits, batch).token_ids.tolist()


@pytest.mark.parametrize("seed", range(4))
def test_incremental_counts_equal_a_rebuild_every_step(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    state = SamplingState(VOCAB, max_num_seqs=3, device=torch.device("cpu"))  # fewer rows than requests
    staging = StagingBuffer("cpu")
    running: list[Request] = []
    waiting: list[Request] = []
    for n in range(80):
        if rng.random() < 0.3 or not running:
            params = rng.choice(PENALIZED + [SamplingParams(temperature=0)])
            prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 30))]
            running.append(Request(f"r{n}", prompt, params))
        if waiting and rng.random() < 0.3:  # a preempted request is admitted again
            running.append(waiting.pop())
        if len(running) > 1 and rng.random() < 0.15:  # preempted: its row goes, its tokens stay
            victim = running.pop(rng.randrange(len(running)))
            state.preempted([victim.request_id])
            waiting.append(victim)
        if len(running) > 1 and rng.random() < 0.15:  # finished
            state.release(running.pop(rng.randrange(len(running))).request_id)
        batch = rng.sample(running, rng.randrange(1, len(running) + 1))  # some are not scheduled this step
        logits = torch.randn(len(batch), VOCAB)
        tokens, _ = step(state, staging, batch, logits)
        assert tokens == from_lists(batch, logits), f"step {n}"
        for request, token in zip(batch, tokens):
            request.append_output_token(token)
        for request in batch:
            row = state.penalties.row_of.get(request.request_id)
            if request.sampling_params.needs_penalties:
                expected = _token_counts([request.output_token_ids], VOCAB, "cpu")[0]
                assert torch.equal(state.penalties.counts[row], expected)
                assert state.penalties.in_prompt[row].nonzero().flatten().tolist() == sorted(set(request.prompt_token_ids))
            else:
                assert row is None  # only penalized requests hold rows
    assert len(state.penalties.counts) > 3  # more penalized requests at once than rows: the pool grew


def test_a_preempted_request_is_rebuilt_from_its_tokens():
    state = SamplingState(VOCAB, max_num_seqs=2, device=torch.device("cpu"))
    staging = StagingBuffer("cpu")
    request = Request("a", [1, 2, 2], SamplingParams(temperature=0, frequency_penalty=2.0))
    for _ in range(5):
        tokens, _ = step(state, staging, [request], torch.randn(1, VOCAB))
        request.append_output_token(tokens[0])
    state.preempted(["a"])
    assert "a" not in state.penalties.row_of
    other = Request("b", [5], SamplingParams(temperature=0, presence_penalty=1.0))
    step(state, staging, [other], torch.randn(1, VOCAB))  # takes the freed row
    logits = torch.randn(2, VOCAB)
    tokens, _ = step(state, staging, [request, other], logits)
    assert tokens == from_lists([request, other], logits)
    row = state.penalties.row_of["a"]
    expected = _token_counts([request.output_token_ids + tokens[:1]], VOCAB, "cpu")[0]
    assert torch.equal(state.penalties.counts[row], expected)  # five outputs counted again, then the new one


def test_logprobs_come_back_with_the_tokens_in_one_copy():
    torch.manual_seed(3)
    state = SamplingState(VOCAB, max_num_seqs=4, device=torch.device("cpu"))
    staging = StagingBuffer("cpu")
    params = [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0),
              SamplingParams(temperature=0, logprobs=0)]
    requests = [Request(str(i), [1], p) for i, p in enumerate(params)]
    logits = torch.randn(3, VOCAB)
    tokens, logprobs = step(state, staging, requests, logits)
    reference = logits.log_softmax(-1)
    assert tokens == logits.argmax(-1).tolist()
    assert logprobs[1] is None and logprobs[2].top == []
    assert logprobs[0].logprob == pytest.approx(reference[0, tokens[0]].item())
    top = reference[0].topk(3)
    assert [t for t, _ in logprobs[0].top] == top.indices.tolist()
    assert [v for _, v in logprobs[0].top] == pytest.approx(top.values.tolist())
