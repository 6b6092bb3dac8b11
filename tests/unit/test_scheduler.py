"""Scheduler on CPU, driven by a fake model that keeps a pretend KV cache of token ids.

The fake model writes each computed token into its slot (block table + position) and, for every
chunk, reads the whole sequence back from those slots: a wrong block table, a reused block that
was still cached, or a bad prefix hit shows up as a mismatch. Its next token is a deterministic
function of the sequence read back, so every finished request must produce exactly the tokens
`expected_output` predicts, preempted or not.
"""

import random

import pytest

from llamaserve.config import SchedulerConfig
from llamaserve.engine.block_manager import BlockManager
from llamaserve.engine.request import Request, RequestStatus
from llamaserve.engine.scheduler import Scheduler, SchedulerOutput
from llamaserve.sampling_params import SamplingParams

NEVER = 1000  # default EOS id: the fake model only produces tokens 0..999


def next_token(tokens: list[int]) -> int:
    return (31 * tokens[-1] + len(tokens)) % 1000


def expected_output(prompt: list[int], params: SamplingParams, max_model_len: int, eos=(NEVER,)) -> list[int]:
    tokens, output = list(prompt), []
    while True:
        token = next_token(tokens)
        tokens.append(token)
        output.append(token)
        if token in params.stop_token_ids or (token in eos and not params.ignore_eos):
            return output
        if len(output) == params.max_tokens or len(tokens) == max_model_len:
            return output


class FakeModel:
    def __init__(self, block_size: int):
        self.block_size = block_size
        self.kv: dict[int, list[int | None]] = {}  # block id -> token id held in each slot
        self.decoding: list[Request] = []  # harness bookkeeping: sampled last step, must decode next

    def execute(self, output: SchedulerOutput) -> dict[str, int]:
        sampled = {}
        for item in output.scheduled:
            request, end = item.request, item.start + item.num_new_tokens
            assert item.num_new_tokens >= 1 and len(item.block_table) * self.block_size >= end
            for position in range(item.start, end):
                slots = self.kv.setdefault(item.block_table[position // self.block_size], [None] * self.block_size)
                slots[position % self.block_size] = request.all_token_ids[position]
            seen = [self.kv[item.block_table[p // self.block_size]][p % self.block_size] for p in range(end)]
            assert seen == request.all_token_ids[:end], f"{request.request_id} read a wrong KV cache"
            assert item.sample == (end == request.num_tokens)
            if item.sample:
                sampled[request.request_id] = next_token(seen)
        return sampled


def make_scheduler(
    num_blocks=64,
    block_size=4,
    max_num_seqs=4,
    max_num_batched_tokens=32,
    max_model_len=256,
    policy="fcfs",
    eos=(NEVER,),
) -> Scheduler:
    config = SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len, policy)
    return Scheduler(config, BlockManager(num_blocks, block_size), eos)


def make_request(request_id: str, prompt: list[int], max_tokens=8, priority=0, **params) -> Request:
    return Request(request_id, prompt, SamplingParams(max_tokens=max_tokens, **params), priority=priority)


def check_output(scheduler: Scheduler, model: FakeModel, output: SchedulerOutput) -> None:
    """The step's limits hold, and every request that sampled last step decodes now (or was preempted)."""
    config = scheduler.config
    assert output.num_batched_tokens == sum(item.num_new_tokens for item in output.scheduled)
    assert output.num_batched_tokens <= config.max_num_batched_tokens
    assert len(output.scheduled) <= config.max_num_seqs and scheduler.num_running <= config.max_num_seqs
    decodes = {item.request.request_id for item in output.scheduled if item.num_new_tokens == 1}
    for request in model.decoding:
        assert request.request_id in decodes | set(output.preempted_ids) or request.status.finished


def apply(scheduler: Scheduler, model: FakeModel, output: SchedulerOutput, sampled: dict[str, int]) -> None:
    updated = scheduler.update(output, sampled)
    model.decoding = [request for request in updated if not request.status.finished]
    scheduler.block_manager.check_integrity()


def step(scheduler: Scheduler, model: FakeModel) -> SchedulerOutput:
    output = scheduler.schedule()
    check_output(scheduler, model, output)
    apply(scheduler, model, output, model.execute(output))
    return output


def run(scheduler: Scheduler, model: FakeModel | None = None, max_steps=5000) -> list[SchedulerOutput]:
    """Steps until every request finished; pass the model of earlier steps, its KV cache matters."""
    model = model or FakeModel(scheduler.block_manager.block_size)
    outputs = []
    while scheduler.has_unfinished_requests():
        outputs.append(step(scheduler, model))
        assert len(outputs) < max_steps, "scheduler made no progress"
    return outputs


def assert_exact(scheduler: Scheduler, requests: list[Request]) -> None:
    for request in requests:
        assert request.status.finished and request.status is not RequestStatus.FINISHED_ABORTED
        expected = expected_output(request.prompt_token_ids, request.sampling_params, scheduler.config.max_model_len)
        assert request.output_token_ids == expected, request.request_id


def test_limits_hold_every_step_and_outputs_are_exact():
    rng = random.Random(1)
    scheduler = make_scheduler()
    requests = [
        make_request(f"r{i}", [rng.randrange(1000) for _ in range(rng.randint(1, 60))], rng.randint(1, 20))
        for i in range(20)
    ]
    for request in requests:
        scheduler.add_request(request)
    run(scheduler)
    assert_exact(scheduler, requests)
    assert scheduler.block_manager.num_free_blocks == 64


def test_long_prompt_is_chunked_and_never_starves_decodes():
    scheduler = make_scheduler(
        num_blocks=400, block_size=16, max_num_seqs=8, max_num_batched_tokens=256, max_model_len=8192
    )
    model = FakeModel(16)
    decoders = [make_request(f"d{i}", [i + 1] * 10, max_tokens=200) for i in range(4)]
    for request in decoders:
        scheduler.add_request(request)
    step(scheduler, model)  # prefills all four; each has its first token
    long = make_request("long", [i % 1000 for i in range(4000)], max_tokens=4)
    scheduler.add_request(long)
    chunks = []
    while long.num_output_tokens == 0:
        before = [request.num_output_tokens for request in decoders]
        output = step(scheduler, model)
        assert [request.num_output_tokens for request in decoders] == [n + 1 for n in before]
        chunks += [item.num_new_tokens for item in output.scheduled if item.request is long]
    assert chunks == [252] * 15 + [4000 - 15 * 252]  # the budget left after four decodes
    run(scheduler, model)
    assert_exact(scheduler, decoders + [long])


def test_chunked_prefill_samples_only_after_the_last_chunk():
    scheduler = make_scheduler(max_num_batched_tokens=32)
    request = make_request("a", list(range(100)), max_tokens=3)
    scheduler.add_request(request)
    chunks = [(item.start, item.num_new_tokens, item.sample) for output in run(scheduler) for item in output.scheduled]
    assert chunks == [(0, 32, False), (32, 32, False), (64, 32, False), (96, 4, True), (100, 1, True), (101, 1, True)]
    assert_exact(scheduler, [request])


@pytest.mark.parametrize("policy, order", [("fcfs", ["a", "b", "c"]), ("priority", ["b", "c", "a"])])
def test_admission_order_follows_policy(policy, order):
    scheduler = make_scheduler(max_num_seqs=1, policy=policy)
    for request_id, priority in [("a", 3), ("b", 1), ("c", 2)]:
        scheduler.add_request(make_request(request_id, [1, 2, 3, 4], max_tokens=2, priority=priority))
    admitted = []
    for output in run(scheduler):
        admitted += [item.request.request_id for item in output.scheduled if item.start == 0]
    assert admitted == order


@pytest.mark.parametrize("policy, scheduled, victim", [("fcfs", ["b", "a"], "c"), ("priority", ["a", "c"], "b")])
def test_preemption_picks_newest_or_lowest_priority_and_recomputes_exactly(policy, scheduled, victim):
    # Five 4-token blocks. b (lowest priority) runs first; a and c join a step later. In the third
    # step b still fits its 2 blocks, a takes the last free block and c finds none.
    scheduler = make_scheduler(num_blocks=5, block_size=4, policy=policy)
    model = FakeModel(4)
    a, b, c = [
        make_request(request_id, [10 * i + k for k in range(4)], max_tokens=12, priority=priority)
        for i, (request_id, priority) in enumerate([("a", 0), ("b", 5), ("c", 1)])
    ]
    scheduler.add_request(b)
    step(scheduler, model)
    scheduler.add_request(a)
    scheduler.add_request(c)
    assert len(step(scheduler, model).scheduled) == 3
    small = make_request("small", [99], max_tokens=2)  # would fit, but not in a step short of blocks
    scheduler.add_request(small)
    output = step(scheduler, model)
    assert [item.request.request_id for item in output.scheduled] == scheduled
    assert output.preempted_ids == [victim]
    preempted = {"a": a, "b": b, "c": c}[victim]
    assert preempted.status is RequestStatus.WAITING and preempted.num_computed_tokens == 0
    assert preempted.num_preemptions == 1 and scheduler.num_waiting == 2
    run(scheduler, model)
    assert_exact(scheduler, [a, b, c, small])
    assert scheduler.block_manager.num_free_blocks == 5


def test_second_request_with_shared_prefix_schedules_only_the_rest():
    scheduler = make_scheduler(num_blocks=64, block_size=16, max_num_batched_tokens=512, max_model_len=1024)
    prefix = [(7 * i) % 1000 for i in range(200)]
    model = FakeModel(16)
    first = make_request("a", prefix + [1] * 10)
    scheduler.add_request(first)
    first_table = list(run(scheduler, model)[0].scheduled[0].block_table)
    second = make_request("b", prefix + [2] * 30)
    scheduler.add_request(second)
    outputs = run(scheduler, model)
    item = outputs[0].scheduled[0]
    assert (item.start, item.num_new_tokens) == (192, 230 - 192)
    assert second.num_cached_prompt_tokens == 192 and second.num_computed_tokens > 192
    assert item.block_table[:12] == first_table[:12]  # the first request's freed blocks, reused
    assert scheduler.block_manager.prefix_hits_tokens == 192
    assert_exact(scheduler, [first, second])


def test_abort_mid_prefill_frees_blocks_and_keeps_computed_prefix():
    scheduler = make_scheduler(num_blocks=32, block_size=4, max_num_batched_tokens=16)
    model = FakeModel(4)
    prompt = list(range(60))
    request = make_request("a", prompt)
    scheduler.add_request(request)
    step(scheduler, model)
    assert request.num_computed_tokens == 16
    scheduler.abort_requests("a")
    scheduler.block_manager.check_integrity()
    assert scheduler.block_manager.num_free_blocks == 32
    assert request.status.finish_reason == "abort" and request.finished_time is not None
    assert scheduler.has_unfinished_requests()  # until the abort is reported
    assert step(scheduler, model).finished == [request]
    assert not scheduler.has_unfinished_requests()
    retry = make_request("b", prompt)
    scheduler.add_request(retry)
    run(scheduler, model)
    assert retry.num_cached_prompt_tokens == 16
    assert_exact(scheduler, [retry])


def test_abort_while_step_is_in_flight_is_skipped_by_update():
    scheduler = make_scheduler()
    model = FakeModel(4)
    requests = [make_request(name, [1, 2, 3, 4, 5]) for name in ("a", "b")]
    for request in requests:
        scheduler.add_request(request)
    output = scheduler.schedule()
    sampled = model.execute(output)
    scheduler.abort_requests(["a", "unknown"])
    assert scheduler.update(output, sampled) == [requests[1]]
    scheduler.block_manager.check_integrity()
    assert requests[0].num_output_tokens == 0
    run(scheduler, model)
    assert_exact(scheduler, requests[1:])


def test_random_aborts_keep_the_cache_consistent():
    rng = random.Random(0)
    scheduler = make_scheduler(
        num_blocks=48, block_size=4, max_num_seqs=6, max_num_batched_tokens=24, max_model_len=128
    )
    model = FakeModel(4)
    prefixes = [[rng.randrange(1000) for _ in range(rng.randint(8, 30))] for _ in range(3)]
    pending = []
    for i in range(90):  # prompts share prefixes so the prefix cache is busy too
        suffix = [rng.randrange(1000) for _ in range(rng.randint(1, 30))]
        pending.append(make_request(f"r{i}", rng.choice(prefixes) + suffix, max_tokens=rng.randint(1, 40)))
    added, aborted, reported = [], set(), []

    def abort_one():
        live = [request for request in added if not request.status.finished]
        if live and len(aborted) < 50 and rng.random() < 0.2:
            request = rng.choice(live)
            scheduler.abort_requests([request.request_id])
            aborted.add(request.request_id)
            scheduler.block_manager.check_integrity()

    while pending or scheduler.has_unfinished_requests():
        for _ in range(rng.randint(0, 2)):
            if pending:
                added.append(pending.pop(0))
                scheduler.add_request(added[-1])
        abort_one()
        output = scheduler.schedule()
        check_output(scheduler, model, output)
        reported += [request.request_id for request in output.finished]
        sampled = model.execute(output)
        abort_one()  # between schedule and update, as if the step were still running
        apply(scheduler, model, output, sampled)

    assert len(aborted) == 50 and sorted(reported) == sorted(aborted)
    assert_exact(scheduler, [request for request in added if request.request_id not in aborted])
    assert sum(request.num_preemptions for request in added) > 0
    assert scheduler.block_manager.prefix_hits_tokens > 0
    assert scheduler.block_manager.num_free_blocks == 48  # every block free or cached


@pytest.mark.parametrize("case", ["stop_token", "eos", "ignore_eos", "max_model_len"])
def test_stop_conditions(case):
    prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    tokens = expected_output(prompt, SamplingParams(max_tokens=20), 256)
    stop = tokens[2]
    assert stop not in tokens[:2]
    params, eos, max_model_len, expected = {
        "stop_token": (dict(max_tokens=20, stop_token_ids=(stop,)), (NEVER,), 256, (tokens[:3], "stop")),
        "eos": (dict(max_tokens=20), (stop,), 256, (tokens[:3], "stop")),
        "ignore_eos": (dict(max_tokens=20, ignore_eos=True), (stop,), 256, (tokens, "length")),
        "max_model_len": (dict(max_tokens=None), (NEVER,), 16, (tokens[:6], "length")),
    }[case]
    scheduler = make_scheduler(max_model_len=max_model_len, eos=eos)
    request = Request("a", prompt, SamplingParams(**params))
    scheduler.add_request(request)
    run(scheduler)
    assert (request.output_token_ids, request.status.finish_reason) == expected
    assert request.first_scheduled_time <= request.first_token_time <= request.finished_time
    assert len(request.token_times) == request.num_output_tokens


def test_a_completed_grammar_stops_its_request_on_any_token():
    """Structured output: the runner names the requests whose grammar the sampled token ended."""
    scheduler = make_scheduler()
    model = FakeModel(4)
    done, other = make_request("done", [5, 6, 7], max_tokens=20), make_request("other", [5, 6, 7], max_tokens=20)
    for request in (done, other):
        scheduler.add_request(request)
    output = scheduler.schedule()
    scheduler.update(output, model.execute(output), completed={"done"})
    assert done.status.finish_reason == "stop" and done.num_output_tokens == 1
    assert not other.status.finished
    scheduler.block_manager.check_integrity()


def test_add_request_rejects_requests_that_can_never_fit():
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_model_len=64)
    with pytest.raises(ValueError):
        scheduler.add_request(make_request("empty", []))
    with pytest.raises(ValueError):
        scheduler.add_request(make_request("too long", [1] * 64))
    with pytest.raises(ValueError):  # 10 + 10 tokens: 19 in the cache need 5 blocks of 4
        scheduler.add_request(make_request("too big", [1] * 10, max_tokens=10))
    fits = make_request("fits", [1] * 10, max_tokens=7)  # 16 tokens: 15 in the cache, the whole pool
    scheduler.add_request(fits)
    with pytest.raises(ValueError):
        scheduler.add_request(make_request("fits", [2] * 4))
    run(scheduler)
    assert_exact(scheduler, [fits])
    with pytest.raises(ValueError):
        make_scheduler(max_num_seqs=8, max_num_batched_tokens=4)


def test_failed_requests_free_their_blocks_and_the_rest_run_on():
    scheduler = make_scheduler()
    model = FakeModel(4)
    requests = [make_request(name, list(range(1, 9))) for name in ("a", "b", "c")]
    for request in requests:
        scheduler.add_request(request)
    output = scheduler.schedule()
    sampled = model.execute(output)
    [failed] = scheduler.fail_requests({"b": "a fault", "unknown": "ignored"})
    assert failed is requests[1] and failed.status.finish_reason == "error" and failed.error == "a fault"
    assert [r.request_id for r in scheduler.update(output, sampled)] == ["a", "c"]
    scheduler.block_manager.check_integrity()
    run(scheduler, model)
    assert_exact(scheduler, [requests[0], requests[2]])


def test_fail_all_leaves_an_empty_consistent_scheduler():
    scheduler = make_scheduler(num_blocks=8)
    for i in range(6):
        scheduler.add_request(make_request(str(i), list(range(1, 10))))
    step(scheduler, FakeModel(4))
    scheduler.abort_requests(["0"])
    failed = scheduler.fail_all("the scheduler broke")
    assert sorted(r.request_id for r in failed) == [str(i) for i in range(6)]
    assert {r.status.finish_reason for r in failed if r.request_id != "0"} == {"error"}
    assert not scheduler.has_unfinished_requests() and scheduler.block_manager.usage == 0
    scheduler.block_manager.check_integrity()
