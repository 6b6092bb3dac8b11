"""Runs one scheduled step on the model: flat inputs in, one sampled token per sampling request out.

Requests with structured output carry a grammar matcher: rank 0 fills their token bitmasks on a worker
thread while the forward pass runs, the sampler masks their logits, and each sampled token is then
accepted into its request's matcher.

With tensor parallelism every rank holds a ModelRunner over its shard of the model: rank 0 (in the
engine core) builds each step's inputs, broadcasts them, runs its shard and samples; the other ranks
(llamaserve.engine.workers) run their shards on the same inputs in `follow`.
"""

import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from llamaserve.config import EngineConfig
from llamaserve.engine.messages import TokenLogprobs
from llamaserve.engine.faults import FatalEngineError, FaultInjector, describe
from llamaserve.engine.grammar import TokenBitmask
from llamaserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from llamaserve.engine.workers import WorkerGroup, init_process_group
from llamaserve.model.architecture import ModelArchitecture
from llamaserve.model.attention import AttentionMetadata, allocate_kv_cache
from llamaserve.model.loader import load_model, parse_dtype, resolve_checkpoint
from llamaserve.model.lora import AdapterError, LoraManager
from llamaserve.model.sampler import Sampler, SamplingBatch
from llamaserve.model.sharding import TensorParallel, heads_per_rank

log = logging.getLogger(__name__)


@dataclass
class RunnerOutput:
    token_ids: dict[str, int]  # request id -> sampled token, for every request that sampled
    logprobs: dict[str, TokenLogprobs]  # only for requests that asked
    errors: dict[str, str] = field(default_factory=dict)  # request id -> why it failed this step
    completed: set[str] = field(default_factory=set)  # requests whose grammar the sampled token ended


@dataclass
class StepInputs:
    """Everything a rank needs to run one step: what rank 0 broadcasts to the others."""

    token_ids: list[int]  # flat, every scheduled request's new tokens in order
    positions: list[int]
    query_lens: list[int]  # new tokens per request
    seq_lens: list[int]  # tokens per request once this step's are cached
    block_tables: list[list[int]]
    sample: list[bool]  # whether each request samples a token after this step
    lora_slots: list[int] = field(default_factory=list)  # each request's adapter slot, -1 for the base; [] none
    lora_loads: list[tuple[int, str]] = field(default_factory=list)  # (slot, adapter folder) to load first

    @classmethod
    def from_step(cls, scheduled: list[ScheduledRequest]) -> "StepInputs":
        inputs = cls([], [], [], [], [], [])
        for item in scheduled:
            end = item.start + item.num_new_tokens
            inputs.token_ids.extend(item.request.all_token_ids[item.start : end])
            inputs.positions.extend(range(item.start, end))
            inputs.query_lens.append(item.num_new_tokens)
            inputs.seq_lens.append(end)
            inputs.block_tables.append(item.block_table)
            inputs.sample.append(item.sample)
        return inputs


class ModelRunner:
    def __init__(self, config: EngineConfig, rank: int = 0, on_worker_death: Callable[[str], None] | None = None):
        """Rank 0 starts the other ranks' worker processes; `on_worker_death(reason)` runs (on a watcher
        thread) when one exits unasked, by default logging it and failing every later step."""
        self.tp = TensorParallel(rank, config.parallel.tensor_parallel_size)
        self.device = torch.device(config.model.device)
        if self.device.type == "cuda" and self.device.index is None:  # one GPU per rank on its host
            self.device = torch.device("cuda", config.parallel.local_rank(rank))
        self.dtype = parse_dtype(config.model.dtype)
        # Rank 0 resolves (and converts, once) the checkpoint and checks it splits before any worker starts.
        self.checkpoint = resolve_checkpoint(config.model.model, config.model.cache_dir)
        self.arch = ModelArchitecture.from_checkpoint(self.checkpoint)
        self.num_kv_heads = heads_per_rank(self.arch, self.tp.size)[1]
        self.workers, self.worker_failure = None, None
        self._threads_before = torch.get_num_threads()
        if self.tp.size > 1:
            config = self._join_group(config, on_worker_death)
        self.config = config
        self.model = load_model(self.checkpoint, self.dtype, self.device, tp=self.tp,
                                progress=config.model.show_progress and rank == 0, merge_lora=config.model.merge_lora,
                                attention_backend=config.model.attention_backend)
        self.block_size = config.cache.block_size
        self.num_blocks = self._num_kv_blocks()
        self.kv_caches = allocate_kv_cache(
            self.arch.num_hidden_layers, self.num_blocks, self.block_size, self.num_kv_heads,
            self.arch.head_dim, self.dtype, self.device,
        )
        log.info(
            "KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB%s)", self.num_blocks, self.block_size,
            self.num_blocks * self.block_size, self.num_blocks * self._kv_bytes_per_block() / 2**30,
            f" on rank {rank} of {self.tp.size}" if self.tp.size > 1 else "",
        )
        self.sampler = Sampler()
        self.generators: dict[str, torch.Generator] = {}  # seeded requests' own random streams
        self.bitmask: TokenBitmask | None = None  # rank 0, from the first step with a constrained request
        self.faults = FaultInjector(config.faults) if config.faults.inject_fault else None
        lora = config.lora
        self.lora = LoraManager(self.model, lora.max_loras, lora.max_lora_rank) if lora.enabled else None
        self.adapters: dict[str, str] = {}  # rank 0: registered adapter name -> folder
        self._resident: OrderedDict[str, int] = OrderedDict()  # rank 0: adapter -> slot, least recently used first
        for name, path in lora.modules.items():
            self.register_adapter(name, path)

    def _join_group(self, config: EngineConfig, on_worker_death: Callable[[str], None] | None) -> EngineConfig:
        """Rank 0 starts node 0's other ranks (fixing the rendezvous port); every rank then joins the group.
        Returns the config with the port fixed."""
        if self.tp.rank == 0:
            self.workers, config = WorkerGroup.start(config, on_worker_death or self._worker_died)
        if self.device.type == "cpu":  # the ranks on a host share its cores instead of each taking all
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // config.parallel.ranks_per_node))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.step_group = init_process_group(config, self.tp.rank, self.device)
        return config

    def _kv_bytes_per_block(self) -> int:
        """K and V, every layer, this rank's KV heads: 2 x layers x block_size x kv_heads x head_dim x element."""
        element = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.arch.num_hidden_layers * self.block_size * self.num_kv_heads * self.arch.head_dim * element

    def _num_kv_blocks(self) -> int:
        """Each rank sizes its cache for its own KV heads; with several ranks all take the smallest count,
        since one block table addresses every rank's cache."""
        blocks = self._kv_blocks_that_fit()
        if self.tp.size > 1:
            count = torch.tensor([blocks])
            dist.all_reduce(count, op=dist.ReduceOp.MIN, group=self.step_group)
            blocks = int(count)
        return blocks

    def _kv_blocks_that_fit(self) -> int:
        cache = self.config.cache
        per_block = self._kv_bytes_per_block()
        if cache.num_blocks is not None:
            return cache.num_blocks
        if self.device.type != "cuda":
            return max(1, int(cache.kv_cache_gib * 2**30) // per_block)
        # GPU: what is left of the allowed fraction after the weights and the activations of the
        # largest step the scheduler can build.
        torch.cuda.reset_peak_memory_stats(self.device)
        self._profile_forward()
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        available = total * cache.gpu_memory_utilization - used_by_others - torch.cuda.max_memory_allocated(self.device)
        if available < per_block:
            raise RuntimeError("no GPU memory left for the KV cache; lower max_num_batched_tokens or use more GPUs")
        return int(available // per_block)

    def _profile_forward(self) -> None:
        tokens = min(self.config.scheduler.max_num_batched_tokens, self.config.scheduler.max_model_len)
        blocks = -(-tokens // self.block_size)
        kv = allocate_kv_cache(self.arch.num_hidden_layers, blocks, self.block_size, self.num_kv_heads,
                               self.arch.head_dim, self.dtype, self.device)
        self._forward(StepInputs([0] * tokens, list(range(tokens)), [tokens], [tokens], [list(range(blocks))],
                                 [True]), kv)
        del kv
        torch.cuda.synchronize(self.device)

    def release(self, request_id: str) -> None:
        """Forget a finished request's generator."""
        self.generators.pop(request_id, None)

    def _forward(self, inputs: StepInputs, kv_caches) -> torch.Tensor | None:
        """Every rank runs this on the same inputs; logits ([num_sampling, vocab]) come back on rank 0."""
        if self.lora is not None:
            self._set_adapters(inputs)
        meta = AttentionMetadata.build(inputs.query_lens, inputs.seq_lens, inputs.block_tables, self.block_size,
                                       inputs.sample, self.device)
        return self.model(
            torch.tensor(inputs.token_ids, dtype=torch.long).to(self.device, non_blocking=True),
            torch.tensor(inputs.positions, dtype=torch.long).to(self.device, non_blocking=True),
            kv_caches,
            meta,
        )

    # ---- LoRA adapters ----------------------------------------------------------------------

    def has_adapter(self, name: str) -> bool:
        return name in self.adapters

    def register_adapter(self, name: str, path: str) -> None:
        """Rank 0 (and every rank for the adapters of the config): check the adapter, then serve it by name.
        Raises AdapterError (a ValueError) with the reason when it cannot be served."""
        if self.lora is None:
            raise AdapterError("LoRA adapters are off: start the server with --enable-lora or --lora-modules")
        if name in self.adapters:
            raise AdapterError(f"an adapter named {name!r} is already loaded")
        self.lora.check(self.lora.adapter(path))
        self.adapters[name] = path

    def unregister_adapter(self, name: str) -> None:
        """Requests still running on it fail at their next step; its slot is free for another."""
        path = self.adapters.pop(name, None)
        if path is None:
            raise AdapterError(f"no adapter named {name!r} is loaded")
        self._resident.pop(name, None)
        if path not in self.adapters.values():
            self.lora.forget(path)

    def _place_adapters(self, scheduled: list[ScheduledRequest], inputs: StepInputs) -> None:
        """Rank 0: a slot for every adapter of the step (the scheduler admits at most max_loras of them),
        loading the ones not resident over the least recently used others."""
        names = {item.request.lora for item in scheduled} - {None}
        if not names:
            return
        for name in names:
            if name in self._resident:
                self._resident.move_to_end(name)
                continue
            free = set(range(self.lora.num_slots)) - set(self._resident.values())
            if free:
                slot = min(free)
            else:
                victim = next(n for n in self._resident if n not in names)
                slot = self._resident.pop(victim)
            self._resident[name] = slot
            inputs.lora_loads.append((slot, self.adapters[name]))
        inputs.lora_slots = [-1 if item.request.lora is None else self._resident[item.request.lora]
                             for item in scheduled]

    def _set_adapters(self, inputs: StepInputs) -> None:
        """Every rank: load what rank 0 placed, and tell the layers each token's slot."""
        for slot, path in inputs.lora_loads:
            self.lora.load(slot, self.lora.adapter(path))
        active = max(inputs.lora_slots, default=-1) + 1
        if not active:
            self.lora.set_step(None)
            return
        slots = torch.tensor(inputs.lora_slots).repeat_interleave(torch.tensor(inputs.query_lens))
        self.lora.set_step(slots.to(self.device, non_blocking=True), active)

    def _broadcast(self, inputs: StepInputs | None) -> StepInputs | None:
        """From rank 0 to every other rank; None tells them to stop."""
        message = [inputs]
        dist.broadcast_object_list(message, src=0, group=self.step_group)
        return message[0]

    def follow(self) -> None:
        """Ranks other than 0: run every step rank 0 broadcasts, until it says stop."""
        while (inputs := self._broadcast(None)) is not None:
            if inputs.token_ids:  # empty: rank 0's keepalive
                self._forward(inputs, self.kv_caches)
        dist.destroy_process_group()

    def shutdown(self) -> None:
        """Rank 0: stop the workers and leave the group (a no-op with one rank)."""
        if self.workers is None:
            return
        if self.worker_failure is None:
            try:
                self._broadcast(None)
            except RuntimeError as e:  # a remote rank already gone: nobody left to tell
                log.warning("could not tell every rank to stop: %s", describe(e))
        self.workers.join()
        self.workers = None
        dist.destroy_process_group()
        torch.set_num_threads(self._threads_before)

    def _worker_died(self, reason: str) -> None:
        log.error("%s", reason)
        self.worker_failure = reason

    def run_model(self, inputs: StepInputs) -> torch.Tensor:
        """Rank 0: one step on every rank; the logits of the sampling requests, [num_sampling, vocab]."""
        if self.tp.size == 1:
            return self._forward(inputs, self.kv_caches)
        if self.worker_failure is not None:
            raise FatalEngineError(self.worker_failure)
        try:
            self._broadcast(inputs)
            return self._forward(inputs, self.kv_caches)
        except Exception as e:  # a rank gone (a failed collective), or others wait in one this rank never reaches
            raise FatalEngineError(f"the step failed on rank 0 of {self.tp.size}: {describe(e)}") from e

    def keepalive(self) -> None:
        """Rank 0, while idle: an empty step, so that the workers' wait for the next one never times out."""
        if self.tp.size > 1 and self.worker_failure is None:
            self._broadcast(StepInputs([], [], [], [], [], []))

    def recover(self) -> None:
        """After a failed step: give back the memory its activations held, and trust no adapter slot
        that the step may have been loading (each is loaded again when next used)."""
        self._resident.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def execute(self, step: SchedulerOutput) -> RunnerOutput:
        """One step. A request whose preparation fails is left out of it and reported in `errors`; a
        fault in the forward pass or in sampling raises (the caller fails the whole step)."""
        errors = {}
        for item in step.scheduled:
            try:
                self._prepare(item)
            except Exception as e:
                errors[item.request.request_id] = describe(e)
        scheduled = [item for item in step.scheduled if item.request.request_id not in errors]
        if not scheduled:
            return RunnerOutput({}, {}, errors)
        if self.faults is not None:
            self.faults.before_forward([item.request.prompt_token_ids for item in scheduled])
        inputs = StepInputs.from_step(scheduled)
        if self.lora is not None:
            self._place_adapters(scheduled, inputs)
        sampling = [item.request for item in scheduled if item.sample]
        constrained = [row for row, r in enumerate(sampling) if r.matcher is not None]
        masks = self._fill_bitmask([sampling[row].matcher for row in constrained]) if constrained else None
        logits = self.run_model(inputs)  # the bitmasks fill meanwhile, on their own thread
        bitmask = masks.result() if masks is not None else None  # [len(constrained), ceil(vocab / 32)]
        result = self._sample(logits, sampling, constrained, bitmask)
        result.errors.update(errors)
        return result

    def _fill_bitmask(self, matchers: list):
        if self.bitmask is None:
            self.bitmask = TokenBitmask(self.config.scheduler.max_num_seqs, self.arch.vocab_size, self.device)
        return self.bitmask.fill(matchers)

    def _prepare(self, item: ScheduledRequest) -> None:
        """What one request needs of its own before the step runs (its random generator)."""
        request = item.request
        if self.faults is not None:
            self.faults.before_request(request.request_id, request.prompt_token_ids)
        if request.lora is not None and request.lora not in self.adapters:
            raise AdapterError(f"the LoRA adapter {request.lora!r} was unloaded")
        if item.sample:
            self._generator(request)

    def _sample(self, logits: torch.Tensor, requests: list, constrained: list[int],
                bitmask: torch.Tensor | None) -> RunnerOutput:
        """`constrained`: the rows of `requests` with a grammar, whose allowed tokens are `bitmask`'s rows."""
        if not requests:
            return RunnerOutput({}, {})
        batch = SamplingBatch.build(
            [r.sampling_params for r in requests],
            [self._generator(r) for r in requests],
            [r.prompt_token_ids for r in requests],
            [r.output_token_ids for r in requests],
            self.arch.vocab_size,
            self.device,
            constrained,
            bitmask,
        )
        out = self.sampler(logits, batch)
        token_ids = out.token_ids.tolist()  # the step's one device-to-host sync
        result = RunnerOutput({r.request_id: t for r, t in zip(requests, token_ids)}, {})
        if out.logprobs is not None:
            logprobs = out.logprobs.tolist()
            top_values, top_ids = (t.tolist() for t in out.top_logprobs)
            for row, r in enumerate(requests):
                k = r.sampling_params.logprobs
                if k is not None:
                    result.logprobs[r.request_id] = TokenLogprobs(
                        logprobs[row], list(zip(top_ids[row][:k], top_values[row][:k]))
                    )
        for row in constrained:
            self._accept(requests[row], token_ids[row], result)
        return result

    @staticmethod
    def _accept(request, token_id: int, result: RunnerOutput) -> None:
        """A constrained request's token into its matcher. A token the grammar refuses (the mask and the
        matcher disagree: it should never happen) fails that request alone; a token that ends the grammar
        ends the request."""
        if not request.matcher.accept_token(token_id):
            result.errors[request.request_id] = f"the sampled token {token_id} does not follow the request's grammar"
        elif request.matcher.is_terminated():
            result.completed.add(request.request_id)

    def _generator(self, request) -> torch.Generator | None:
        seed = request.sampling_params.seed
        if seed is None:
            return None
        generator = self.generators.get(request.request_id)
        if generator is None:
            generator = torch.Generator(self.device).manual_seed(seed)
            self.generators[request.request_id] = generator
        return generator
