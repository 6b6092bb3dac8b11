"""Runs one scheduled step on the model: flat inputs in, one sampled token per sampling request out.

The runner coordinates the pieces of llamaserve.engine.runner:
- inputs: the step as flat lists (StepInputs), then its device tensors, every flat index computed once on the
  host and written with the sampling tensors into one persistent buffer (pinned on CUDA), sent in one
  non-blocking copy before the forward pass is launched;
- sampling: seeded generators, penalty counts kept on the device, and the step's one device-to-host copy;
- adapters: which LoRA adapters sit in which slots;
- graphs: CUDA graphs for decode-only steps (CUDA only, unless enforce_eager);
- memory: how many KV blocks fit;
- group: the tensor-parallel group and the step channel to the other ranks.

Requests with structured output carry a grammar matcher: rank 0 fills their token bitmasks on a worker
thread while the forward pass runs, the sampler masks their logits, and each sampled token is then
accepted into its request's matcher.

With tensor parallelism every rank holds a ModelRunner over its shard of the model: rank 0 (in the
engine core) builds each step's inputs, sends them, runs its shard and samples; the other ranks
(llamaserve.engine.workers) run their shards on the same inputs in `follow`.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llamaserve.config import EngineConfig
from llamaserve.engine.faults import FatalEngineError, FaultInjector, describe
from llamaserve.engine.grammar import TokenBitmask
from llamaserve.engine.messages import TokenLogprobs
from llamaserve.engine.runner.adapters import AdapterSlots
from llamaserve.engine.runner.graphs import DecodeGraphs, graph_memory, serves_graphs
from llamaserve.engine.runner.group import StepGroup, rank_device
from llamaserve.engine.runner.inputs import ModelInputs, StagedInputs, StepInputs
from llamaserve.engine.runner.memory import kv_blocks_that_fit, kv_bytes_per_block
from llamaserve.engine.runner.sampling import SamplingState
from llamaserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from llamaserve.model.architecture import ModelArchitecture
from llamaserve.model.attention import allocate_kv_cache
from llamaserve.model.cpu_kernels import lora_delta
from llamaserve.model.loader import load_model, parse_dtype, resolve_checkpoint
from llamaserve.model.lora import LoraManager
from llamaserve.model.sampler import SamplingBatch
from llamaserve.model.sharding import TensorParallel, heads_per_rank
from llamaserve.model.staging import StagingBuffer
from llamaserve.sampling_params import SamplingParams

__all__ = ["ModelRunner", "RunnerOutput", "StepInputs"]

log = logging.getLogger(__name__)

# What the profile samples the largest decode step with: every sampler stage on.
PROFILE_SAMPLING = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, min_p=0.05, repetition_penalty=1.1,
                                  presence_penalty=0.5, logit_bias={0: 1.0}, logprobs=20)


@dataclass
class RunnerOutput:
    token_ids: dict[str, int]  # request id -> sampled token, for every request that sampled
    logprobs: dict[str, TokenLogprobs]  # only for requests that asked
    errors: dict[str, str] = field(default_factory=dict)  # request id -> why it failed this step
    completed: set[str] = field(default_factory=set)  # requests whose grammar the sampled token ended


class ModelRunner:
    def __init__(self, config: EngineConfig, rank: int = 0, on_worker_death: Callable[[str], None] | None = None):
        """Rank 0 starts the other ranks' worker processes; `on_worker_death(reason)` runs (on a watcher
        thread) when one exits unasked, by default logging it and failing every later step."""
        self.tp = TensorParallel(rank, config.parallel.tensor_parallel_size)
        self.device = rank_device(config.model.device, self.tp.size, config.parallel.local_rank(rank))
        self.dtype = parse_dtype(config.model.dtype)
        # Rank 0 resolves (and converts, once) the checkpoint and checks it splits before any worker starts.
        self.checkpoint = resolve_checkpoint(config.model.model, config.model.cache_dir, config.model.quantization)
        self.arch = ModelArchitecture.from_checkpoint(self.checkpoint)
        self.num_kv_heads = heads_per_rank(self.arch, self.tp.size)[1]
        self.group: StepGroup | None = None
        if self.tp.size > 1:
            self.group = StepGroup(config, rank, self.device, on_worker_death)
            config = self.group.config  # with the rendezvous port fixed
        self.config = config
        self.model = load_model(self.checkpoint, self.dtype, self.device, tp=self.tp,
                                progress=config.model.show_progress and rank == 0, merge_lora=config.model.merge_lora,
                                attention_backend=config.model.attention_backend,
                                quantization=config.model.quantization,
                                lm_head_quantization=config.model.lm_head_quantization,
                                quantization_group_size=config.model.quantization_group_size,
                                cpu_kernels=config.model.cpu_kernels, cache_dir=config.model.cache_dir)
        self.block_size = config.cache.block_size
        self.staging = StagingBuffer(self.device)
        self.sampling = SamplingState(self.arch.vocab_size, config.scheduler.max_num_seqs, self.device) \
            if rank == 0 else None
        lora = config.lora
        kernel = lora_delta(config.model.cache_dir) if config.model.cpu_kernels and self.device.type == "cpu" else None
        self.lora = LoraManager(self.model, lora.max_loras, lora.max_lora_rank, kernel) if lora.enabled else None
        self.slots = AdapterSlots(self.lora)
        self.graphs: DecodeGraphs | None = None  # captured once the KV cache exists
        self.graph_memory_bytes: int | None = None  # what the graphs hold, as measured for the KV sizing
        use_graphs = self._graphs_wanted()
        self.num_blocks = self._num_kv_blocks(use_graphs)
        self.kv_caches = self._allocate_kv(self.num_blocks)
        log.info(
            "KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB%s)", self.num_blocks, self.block_size,
            self.num_blocks * self.block_size, self.num_blocks * self._kv_bytes_per_block() / 2**30,
            f" on rank {rank} of {self.tp.size}" if self.tp.size > 1 else "",
        )
        if use_graphs:
            self.graphs = self._capture_graphs()
        self.bitmask: TokenBitmask | None = None  # rank 0, from the first step with a constrained request
        self.faults = FaultInjector(config.faults) if config.faults.inject_fault else None
        for name, path in lora.modules.items():
            self.register_adapter(name, path)

    # ---- memory and CUDA graphs ---------------------------------------------------------------------

    def _kv_bytes_per_block(self) -> int:
        return kv_bytes_per_block(self.arch.num_hidden_layers, self.block_size, self.num_kv_heads, self.arch.head_dim,
                                  self.dtype)

    def _allocate_kv(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return allocate_kv_cache(self.arch.num_hidden_layers, num_blocks, self.block_size, self.num_kv_heads,
                                 self.arch.head_dim, self.dtype, self.device)

    def _num_kv_blocks(self, use_graphs: bool) -> int:
        """Each rank sizes its cache for its own KV heads; with several ranks all take the smallest count,
        since one block table addresses every rank's cache."""
        scheduler = self.config.scheduler
        graph_bytes = None
        if use_graphs:
            def graph_bytes():
                self.graph_memory_bytes = graph_memory(self.model, self._allocate_kv, self.block_size,
                                                       scheduler.max_num_seqs, scheduler.max_model_len)
                return self.graph_memory_bytes
        blocks = kv_blocks_that_fit(self.config.cache, self._kv_bytes_per_block(), self.device,
                                    self._run_largest_steps, graph_bytes)
        return self.group.min(blocks) if self.group is not None else blocks

    def _run_largest_steps(self) -> None:
        """On every rank alike: the longest prefill chunk the scheduler can build, then the most decodes at the
        longest context, which hold the largest attention workspace (split-K partials, the torch backend's
        gathered K/V) and the most logits, sampled with every sampler stage on. Block tables point at a small
        scratch cache (a decode's every block is block 0)."""
        scheduler = self.config.scheduler
        tokens = min(scheduler.max_num_batched_tokens, scheduler.max_model_len)
        blocks = -(-tokens // self.block_size)
        width = -(-scheduler.max_model_len // self.block_size)
        decodes = min(scheduler.max_num_seqs, scheduler.max_num_batched_tokens)
        kv = self._allocate_kv(blocks)
        steps = [
            StepInputs([0] * tokens, [tokens], [tokens], [list(range(blocks))], [True]),
            StepInputs([0] * decodes, [1] * decodes, [scheduler.max_model_len] * decodes, [[0] * width] * decodes,
                       [True] * decodes),
        ]
        for inputs in steps:
            logits = self._forward(inputs, self._staged(inputs), kv)
            if logits is not None:
                n = len(logits)
                batch = SamplingBatch.build([PROFILE_SAMPLING] * n, [None] * n, [[1]] * n, [[2]] * n,
                                            self.arch.vocab_size, self.device)
                self.sampling.sampler(logits, batch)
            del logits
        del kv

    def _graphs_wanted(self) -> bool:
        if self.device.type != "cuda" or self.config.model.enforce_eager:
            return False
        if self.tp.size > 1:
            log.info("decode steps run eagerly: CUDA graphs are not captured across tensor-parallel ranks")
            return False
        backend = self.model.attention_for(self.device, self.dtype)
        if not serves_graphs(backend):
            log.info("decode steps run eagerly: the %s attention backend has no CUDA graph plan", backend.name)
            return False
        return True

    def _capture_graphs(self) -> DecodeGraphs | None:
        scheduler = self.config.scheduler
        began = time.perf_counter()
        graphs = DecodeGraphs(self.model, self.kv_caches, self.block_size, scheduler.max_num_seqs,
                              scheduler.max_model_len)
        try:
            graphs.capture()
        except Exception as e:  # a backend that cannot be captured (a FlashInfer build without graph support)
            log.warning("CUDA graph capture failed (%s); decode steps run eagerly", describe(e))
            return None
        log.info("CUDA graphs: decode batch sizes %s captured in %.1f s", graphs.sizes, time.perf_counter() - began)
        return graphs

    # ---- one step on every rank -------------------------------------------------------------------

    def _staged(self, inputs: StepInputs) -> ModelInputs:
        """The inputs alone (no sampling) through the staging buffer."""
        staging = self.staging.begin()
        staged = StagedInputs(inputs, self.block_size, staging)
        staging.send()
        return staged.on_device()

    def _forward(self, inputs: StepInputs, step: ModelInputs, kv_caches=None) -> torch.Tensor | None:
        """Every rank runs this on the same inputs; logits ([num_sampling, vocab]) come back on rank 0."""
        kv_caches = self.kv_caches if kv_caches is None else kv_caches
        if self.lora is not None:
            for slot, path in inputs.lora_loads:
                self.lora.load(slot, self.lora.adapter(path))
            self.lora.set_step(step.lora_slots, step.lora_active)
        if self.graphs is not None and kv_caches is self.kv_caches and self.graphs.serves(inputs):
            return self.graphs.run(inputs, step)
        return self.model(step.input_ids, step.positions, kv_caches, step.meta)

    def run_model(self, inputs: StepInputs, staging: StagingBuffer | None = None) -> torch.Tensor:
        """Rank 0: one step on every rank; the logits of the sampling requests, [num_sampling, vocab].
        `staging`: the step's buffer, begun, when the caller has staged more into it (the sampling tensors)."""
        if self.group is not None and self.group.failure is not None:
            raise FatalEngineError(self.group.failure)
        try:
            if self.group is not None:  # first, so that the other ranks start while this one stages
                self.group.send(inputs)
            staging = self.staging.begin() if staging is None else staging
            staged = StagedInputs(inputs, self.block_size, staging)
            staging.send()
            return self._forward(inputs, staged.on_device())
        except Exception as e:  # a rank gone (a failed collective), or others wait in one this rank never reaches
            if self.group is None:
                raise
            raise FatalEngineError(f"the step failed on rank 0 of {self.tp.size}: {describe(e)}") from e

    def follow(self) -> None:
        """Ranks other than 0: run every step rank 0 sends, until it says stop."""
        while (inputs := self.group.receive()) is not None:
            if inputs.num_tokens:  # empty: rank 0's keepalive
                self._forward(inputs, self._staged(inputs))
        self.group.shutdown()

    def keepalive(self) -> None:
        """Rank 0, while idle: an empty step, so that the workers' wait for the next one never times out."""
        if self.group is not None and self.group.failure is None:
            self.group.send(StepInputs([], [], [], [], []))

    def shutdown(self) -> None:
        """Rank 0: stop the workers and leave the group (a no-op with one rank)."""
        if self.group is not None:
            self.group.shutdown()
            self.group = None

    def recover(self) -> None:
        """After a failed step: give back the memory its activations held, and trust no adapter slot
        that the step may have been loading (each is loaded again when next used)."""
        self.slots.forget_slots()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def release(self, request_id: str) -> None:
        """Forget a finished request's generator and penalty counts."""
        self.sampling.release(request_id)

    # ---- LoRA adapters ----------------------------------------------------------------------

    @property
    def adapters(self) -> dict[str, str]:
        """Registered adapter name -> folder."""
        return self.slots.adapters

    def has_adapter(self, name: str) -> bool:
        return name in self.slots.adapters

    def register_adapter(self, name: str, path: str) -> None:
        """Rank 0 (and every rank for the adapters of the config): check the adapter, then serve it by name.
        Raises AdapterError (a ValueError) with the reason when it cannot be served."""
        self.slots.register(name, path)

    def unregister_adapter(self, name: str) -> None:
        """Requests still running on it fail at their next step; its slot is free for another."""
        self.slots.unregister(name)

    # ---- rank 0's step ------------------------------------------------------------------------

    def execute(self, step: SchedulerOutput) -> RunnerOutput:
        """One step. A request whose preparation fails is left out of it and reported in `errors`; a
        fault in the forward pass or in sampling raises (the caller fails the whole step)."""
        self.sampling.preempted(step.preempted_ids)
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
            self.slots.place(scheduled, inputs)
        requests = [item.request for item in scheduled if item.sample]
        constrained = [row for row, r in enumerate(requests) if r.matcher is not None]
        masks = self._fill_bitmask([requests[row].matcher for row in constrained]) if constrained else None
        staging = self.staging.begin()
        sampling = self.sampling.stage(requests, constrained, staging) if requests else None
        logits = self.run_model(inputs, staging)  # the bitmasks fill meanwhile, on their own thread
        bitmask = masks.result() if masks is not None else None  # [len(constrained), ceil(vocab / 32)]
        if not requests:
            return RunnerOutput({}, {}, errors)
        token_ids, logprobs = self.sampling.sample(logits, sampling, bitmask)
        result = RunnerOutput({r.request_id: t for r, t in zip(requests, token_ids)},
                              {r.request_id: lp for r, lp in zip(requests, logprobs) if lp is not None}, errors)
        for row in constrained:
            self._accept(requests[row], token_ids[row], result)
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
        self.slots.check(request.lora)
        if item.sample:
            self.sampling.generator(request)

    @staticmethod
    def _accept(request, token_id: int, result: RunnerOutput) -> None:
        """A constrained request's token into its matcher. A token the grammar refuses (the mask and the
        matcher disagree: it should never happen) fails that request alone; a token that ends the grammar
        ends the request."""
        if not request.matcher.accept_token(token_id):
            result.errors[request.request_id] = f"the sampled token {token_id} does not follow the request's grammar"
        elif request.matcher.is_terminated():
            result.completed.add(request.request_id)
