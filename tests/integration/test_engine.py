"""The engine on a tiny random checkpoint: batching, chunking, preemption and prefix caching never
change greedy output; aborts free everything; seeds are batch-independent."""

import random

import pytest

from llamaserve.config import EngineConfig
from llamaserve.engine.core import EngineCore
from llamaserve.engine.messages import AddRequest
from llamaserve.sampling_params import SamplingParams
from tests.conftest import make_tiny_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), max_position_embeddings=512, seed=3)


def engine(checkpoint, **options) -> EngineCore:
    options = {"num_blocks": 256, "block_size": 4, "max_num_seqs": 16, "max_num_batched_tokens": 128,
               "max_model_len": 512, **options}
    return EngineCore(EngineConfig.from_options(model=str(checkpoint), **options))


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 256) for _ in range(rng.randrange(3, 90))] for _ in range(n)]


def run(core: EngineCore, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]]) -> dict[str, list[int]]:
    """Steps the engine, adding each request at its arrival step; returns generated tokens by id."""
    tokens, step = {}, 0
    while step <= max(arrivals) or core.has_work():
        for request_id, prompt, params in arrivals.get(step, []):
            assert core.add_request(AddRequest(request_id, prompt, params)) is None
            tokens[request_id] = []
        for out in core.step() if core.has_work() else []:
            tokens[out.request_id] += out.new_token_ids
        step += 1
    return tokens


def alone(checkpoint, prompt_list, params=GREEDY) -> list[list[int]]:
    core = engine(checkpoint, enable_prefix_caching=False)
    return [run(core, {0: [("r", p, params)]})["r"] for p in prompt_list]


@pytest.fixture(scope="module")
def reference(checkpoint):
    return alone(checkpoint, prompts(32))


def staggered(prompt_list, params=GREEDY):
    """Four new requests every third step, so most arrive while others decode."""
    return {3 * (i // 4): [(str(j), prompt_list[j], params) for j in range(i, i + 4)]
            for i in range(0, len(prompt_list), 4)}


def test_batching_does_not_change_greedy_output(checkpoint, reference):
    core = engine(checkpoint)
    out = run(core, staggered(prompts(32)))
    assert [out[str(i)] for i in range(32)] == reference
    assert core.stats.preemptions == 0


def test_preemption_does_not_change_greedy_output(checkpoint, reference):
    core = engine(checkpoint, num_blocks=40)  # 160 token slots for 32 requests of up to 100 tokens
    out = run(core, staggered(prompts(32)))
    assert core.stats.preemptions > 0
    assert [out[str(i)] for i in range(32)] == reference
    core.block_manager.check_integrity()


def test_chunked_prefill_does_not_change_greedy_output(checkpoint, reference):
    core = engine(checkpoint, max_num_batched_tokens=16)  # every prompt over 16 tokens is chunked
    out = run(core, staggered(prompts(32)))
    assert [out[str(i)] for i in range(32)] == reference
    assert core.stats.steps > 32 * 12 / 16


def test_penalties_kept_on_the_device_survive_batching_and_preemption(checkpoint):
    """Penalty counts live on the device, advanced by each step's tokens and built again after a preemption:
    a penalized greedy request gives its solo tokens whatever shares its steps and however often it is
    preempted."""
    penalized = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.4,
                               presence_penalty=0.6, frequency_penalty=0.5)
    prompt_list = prompts(16, seed=6)
    expected = alone(checkpoint, prompt_list, penalized)
    core = engine(checkpoint, num_blocks=24)  # 96 token slots for 16 requests of up to 100 tokens
    mixed = {3 * (i // 4): [(str(j), prompt_list[j], penalized if j % 2 == 0 else GREEDY) for j in range(i, i + 4)]
             for i in range(0, 16, 4)}
    out = run(core, mixed)
    assert core.stats.preemptions > 0
    assert [out[str(i)] for i in range(0, 16, 2)] == expected[::2]
    assert not core.runner.sampling.penalties.row_of  # every finished request gave its row back


def test_prefix_cache_computes_only_new_tokens(checkpoint):
    rng = random.Random(7)
    prefix = [rng.randrange(3, 256) for _ in range(200)]
    first, second = prefix + [5, 6, 7], prefix + [9, 10, 11, 12]
    core = engine(checkpoint, block_size=16)
    run(core, {0: [("a", first, GREEDY)]})
    computed_before = core.stats.computed_tokens
    hits = {}
    core.add_request(AddRequest("b", second, GREEDY))
    out = []
    while core.has_work():
        for o in core.step():
            out += o.new_token_ids
            hits[o.request_id] = o.num_cached_tokens
    assert hits["b"] == 192  # the 12 full blocks of 16 tokens inside the shared 200-token prefix
    # Only the 204 - 192 = 12 uncached prompt tokens and the decodes were computed.
    assert core.stats.computed_tokens - computed_before == (len(second) - 192) + (GREEDY.max_tokens - 1)
    assert out == alone(checkpoint, [second])[0]


def test_prefix_cache_survives_abort(checkpoint):
    rng = random.Random(8)
    prefix = [rng.randrange(3, 256) for _ in range(200)]
    core = engine(checkpoint)
    core.add_request(AddRequest("a", prefix + [1, 2, 3], SamplingParams(temperature=0, max_tokens=50)))
    for _ in range(4):  # two prefill chunks, then a few decodes
        core.step()
    core.abort(["a"])
    core.step()
    core.block_manager.check_integrity()
    out = run(core, {0: [("b", prefix + [4, 5], GREEDY)]})
    assert core.block_manager.prefix_hits_tokens >= 196
    assert out["b"] == alone(checkpoint, [prefix + [4, 5]])[0]


def test_random_aborts_free_everything(checkpoint):
    rng = random.Random(11)
    core = engine(checkpoint, num_blocks=64)
    live, aborted, step = set(), 0, 0
    pending = [(str(i), p) for i, p in enumerate(prompts(80, seed=2))]
    while pending or core.has_work():
        for _ in range(rng.randrange(0, 4)):
            if pending:
                request_id, prompt = pending.pop()
                core.add_request(AddRequest(request_id, prompt, SamplingParams(temperature=0, max_tokens=20)))
                live.add(request_id)
        if aborted < 50 and live and rng.random() < 0.6:
            victim = rng.choice(sorted(live))
            core.abort([victim])
            live.discard(victim)
            aborted += 1
        for out in core.step() if core.has_work() else []:
            if out.finished:
                live.discard(out.request_id)
        core.block_manager.check_integrity()
        step += 1
    assert aborted == 50
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks  # free or cached, none owned


def test_seed_gives_same_tokens_alone_and_in_a_batch(checkpoint):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    noisy = SamplingParams(temperature=1.2, max_tokens=16, ignore_eos=True)
    prompt_list = prompts(6, seed=4)
    lone = run(engine(checkpoint), {0: [("s", prompt_list[0], seeded)]})["s"]
    batch = {0: [(f"n{i}", p, noisy) for i, p in enumerate(prompt_list[1:4])],
             2: [("s", prompt_list[0], seeded)] + [(f"m{i}", p, noisy) for i, p in enumerate(prompt_list[4:])]}
    assert run(engine(checkpoint), batch)["s"] == lone


def test_requests_that_cannot_run_are_refused(checkpoint):
    core = engine(checkpoint, num_blocks=8)
    too_long = core.add_request(AddRequest("x", list(range(3, 200)), GREEDY))
    assert too_long.finish_reason == "error" and "KV blocks" in too_long.error
    bad_token = core.add_request(AddRequest("y", [1, 2, 999], GREEDY))
    assert bad_token.finish_reason == "error" and "token ids" in bad_token.error
    assert not core.has_work()


def test_a_fault_in_the_schedulers_bookkeeping_fails_every_request_and_the_engine_serves_on(checkpoint, monkeypatch):
    core = engine(checkpoint)
    requests = {str(i): p for i, p in enumerate(prompts(4, seed=9))}
    expected = run(core, {0: [(i, p, GREEDY) for i, p in requests.items()]})
    for i, p in requests.items():
        assert core.add_request(AddRequest(f"again-{i}", p, GREEDY)) is None
    core.step()  # under way
    update = core.scheduler.update

    def broken(*args):
        monkeypatch.setattr(core.scheduler, "update", update)  # once
        raise KeyError("a bookkeeping bug")

    monkeypatch.setattr(core.scheduler, "update", broken)
    outputs = core.step()
    assert sorted(o.request_id for o in outputs) == sorted(f"again-{i}" for i in requests)
    assert all(o.finish_reason == "error" and "KeyError" in o.error for o in outputs)
    assert not core.has_work() and core.block_manager.usage == 0
    assert run(core, {0: [(f"after-{i}", p, GREEDY) for i, p in requests.items()]}) == {
        f"after-{i}": tokens for i, tokens in expected.items()}


def test_a_seed_the_generator_refuses_fails_that_request_alone(checkpoint):
    """The first bug of issue 10: a seed of 2**64 killed the engine. Past the API's check it fails alone."""
    core = engine(checkpoint)
    ps = prompts(3, seed=11)
    expected = run(core, {0: [(str(i), p, GREEDY) for i, p in enumerate(ps)]})
    assert core.add_request(AddRequest("bad", ps[0], SamplingParams(temperature=0.8, seed=2**64))) is None
    for i, p in enumerate(ps):
        assert core.add_request(AddRequest(str(i), p, GREEDY)) is None
    tokens, bad = {str(i): [] for i in range(len(ps))}, []
    while core.has_work():
        for out in core.step():
            (bad if out.request_id == "bad" else tokens[out.request_id]).append(out)
    assert [(o.finish_reason, o.new_token_ids) for o in bad] == [("error", [])] and "Overflow" in bad[0].error
    assert {i: [t for o in outs for t in o.new_token_ids] for i, outs in tokens.items()} == expected
