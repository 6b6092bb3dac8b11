"""Typed, frozen configuration: one dataclass per concern, validated on construction.

The CLI and YAML files map onto these; nothing writes back into them at runtime.
"""

from dataclasses import dataclass, field
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")
# "auto": FlashInfer where installed, else the Triton kernels, on CUDA; the torch reference elsewhere.
ATTENTION_BACKENDS = ("auto", "torch", "triton", "flashinfer")
# Weight-only quantization of the decoder layers' linear weights (llamaserve.model.quantization); "auto": a
# GGUF file's Q4_0/Q4_1/Q8_0 tensors at their own precision, anything else unquantized.
QUANTIZATIONS = ("none", "int8", "int4", "auto")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 kernels accept
# The output projection's own choice (it is the largest layer); "auto": int8 when `quantization` is "auto" and the
# GGUF file stores it (or the embedding it is tied to) quantized, as llama.cpp serves it; else none.
LM_HEAD_QUANTIZATIONS = ("auto", "none", "int8", "int4")


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = None  # checkpoint directory or .gguf file; None: the embedded default model
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "cpu"  # torch device of the weights and the KV cache; tp ranks on cuda:N get GPUs N, N+1, ...
    chat_template: str | None = None  # built-in name (e.g. "llama-2") or .jinja file; None: the checkpoint's
    cache_dir: Path = Path.home() / ".cache" / "llamaserve"  # converted GGUF checkpoints live here
    show_progress: bool = False  # a progress bar while the weights load (the server turns it on)
    merge_lora: str | None = None  # a PEFT LoRA adapter folder folded into the weights at load
    attention_backend: str = "auto"  # one of ATTENTION_BACKENDS
    enforce_eager: bool = False  # on CUDA: no CUDA graphs for decode steps (every step runs eagerly)
    quantization: str = "none"  # one of QUANTIZATIONS, for the decoder layers (the LM head: lm_head_quantization)
    lm_head_quantization: str = "auto"  # one of LM_HEAD_QUANTIZATIONS: the LM head too (the embeddings keep `dtype`)
    quantization_group_size: int = 32  # int4: input features per scale and minimum (GGUF's Q4 blocks are 32)
    cpu_kernels: bool = True  # on CPU: llamaserve's own AVX-512 kernels where they run (model/cpu_kernels.py), not torch's

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {self.quantization!r}")
        if self.lm_head_quantization not in LM_HEAD_QUANTIZATIONS:
            raise ValueError(f"lm_head_quantization must be one of {', '.join(LM_HEAD_QUANTIZATIONS)}, "
                             f"not {self.lm_head_quantization!r}")
        if self.quantization_group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"quantization_group_size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, "
                             f"not {self.quantization_group_size!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                             f"not {self.attention_backend!r}")
        object.__setattr__(self, "cache_dir", Path(self.cache_dir).expanduser())


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    kv_cache_gib: float = 1.0  # KV cache size on CPU (all layers, K and V), per tensor-parallel rank
    gpu_memory_utilization: float = 0.9  # on GPU: fraction of device memory the server may use
    enable_prefix_caching: bool = True  # reuse full blocks whose token prefix was computed before
    num_blocks: int | None = None  # fixed block count (tests, benchmarks); overrides the sizing above

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.kv_cache_gib <= 0:
            raise ValueError("kv_cache_gib must be > 0")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # requests in one step
    max_num_batched_tokens: int = 512  # tokens (prefill chunks + decodes) in one step
    max_model_len: int = 2048  # prompt + output tokens of one request
    policy: str = "fcfs"  # "fcfs" or "priority" (lower priority value runs first, then arrival)

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.max_model_len < 1:
            raise ValueError("max_model_len must be >= 1")
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"policy must be 'fcfs' or 'priority', not {self.policy!r}")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1  # ranks every layer is split across, one process (and device) each
    master_addr: str = "127.0.0.1"  # rendezvous address of rank 0 (the standard MASTER_ADDR)
    master_port: int | None = None  # rendezvous port (MASTER_PORT); None: a free port on this host
    # A collective that waits longer than this fails, and the engine with it (a wedged or vanished rank).
    distributed_timeout: float = 600.0
    nnodes: int = 1  # hosts the ranks are spread over, tensor_parallel_size / nnodes consecutive ranks on each
    node_rank: int = 0  # this host: node 0 serves the API and holds rank 0; the others only run their ranks
    gloo_socket_ifname: str | None = None  # interface gloo binds to; None: the one with our address toward master_addr

    def __post_init__(self):
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be >= 1")
        if not 0 < self.distributed_timeout < float("inf"):
            raise ValueError("distributed_timeout must be a positive number of seconds")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise ValueError("master_port must be in 1..65535")
        if self.nnodes < 1 or self.tensor_parallel_size % self.nnodes:
            raise ValueError(f"nnodes must be >= 1 and divide tensor_parallel_size ({self.tensor_parallel_size})")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in 0..{self.nnodes - 1} (nnodes - 1)")
        if self.nnodes > 1 and self.master_port is None:
            raise ValueError("master_port must be set when nnodes > 1: every node dials it")

    @property
    def ranks_per_node(self) -> int:
        return self.tensor_parallel_size // self.nnodes

    @property
    def node_ranks(self) -> range:
        """The global ranks this node runs."""
        return range(self.node_rank * self.ranks_per_node, (self.node_rank + 1) * self.ranks_per_node)

    def local_rank(self, rank: int) -> int:
        """A rank's index on its own node (its GPU there)."""
        return rank % self.ranks_per_node


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters served beside the base model, chosen per request by its `model` field."""

    lora_modules: tuple[str, ...] = ()  # "name=path" adapters registered at start (YAML: a list, or name: path)
    enable_lora: bool = False  # adapter slots even with none registered at start (runtime loading); implied
    max_loras: int = 4  # adapters resident at once: the most one engine step mixes
    max_lora_rank: int = 16  # the largest adapter rank the slots hold

    def __post_init__(self):
        modules = self.lora_modules
        if isinstance(modules, dict):
            modules = [f"{name}={path}" for name, path in modules.items()]
        modules = (modules,) if isinstance(modules, str) else tuple(modules)
        object.__setattr__(self, "lora_modules", modules)
        if any("=" not in m or not m.split("=", 1)[0] or not m.split("=", 1)[1] for m in modules):
            raise ValueError("lora_modules entries must be NAME=PATH")
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise ValueError("max_loras and max_lora_rank must be >= 1")

    @property
    def enabled(self) -> bool:
        return self.enable_lora or bool(self.lora_modules)

    @property
    def modules(self) -> dict[str, str]:
        """name -> adapter folder."""
        return dict(m.split("=", 1) for m in self.lora_modules)


FAULT_KINDS = ("request", "step", "hang")


@dataclass(frozen=True)
class FaultConfig:
    """Faults on demand, for tests of fault isolation (a hidden flag; off, it costs one check per step)."""

    # "KIND:TOKEN_ID": a request whose prompt holds TOKEN_ID makes the engine fail it alone (request),
    # fail the whole step it is in as an out-of-memory would (step), or hang in that step (hang).
    inject_fault: str | None = None

    def __post_init__(self):
        if self.inject_fault is not None:
            kind, _, token = self.inject_fault.partition(":")
            if kind not in FAULT_KINDS or not token.isdigit():
                raise ValueError(f"inject_fault must be KIND:TOKEN_ID with KIND one of {', '.join(FAULT_KINDS)}")

    @property
    def kind(self) -> str | None:
        return self.inject_fault.partition(":")[0] if self.inject_fault else None

    @property
    def marker(self) -> int | None:
        return int(self.inject_fault.partition(":")[2]) if self.inject_fault else None


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # address to listen on
    port: int = 8000  # TCP port
    served_model_name: str | None = None  # the `model` name clients use; None: the checkpoint's name
    log_level: str = "info"  # debug | info | warning | error
    max_concurrent_requests: int = 256  # engine requests (one per choice) in flight; beyond: 429 + Retry-After
    log_format: str = "text"  # text | json (one JSON object per log line)
    log_requests: bool = False  # request log lines carry the prompt and the output text
    otlp_traces_endpoint: str | None = None  # OTLP/HTTP URL spans are sent to (.../v1/traces); None: no tracing
    # What one request may ask for: beyond these it is refused (400; 413 for the body) before any work.
    max_request_body_bytes: int = 16 * 2**20  # request body size, counted as it arrives
    max_prompts_per_request: int = 64  # prompts in one completions request (each is n choices)
    max_n: int = 128  # choices per prompt
    max_stop_strings: int = 16  # stop strings in `stop`
    max_stop_string_length: int = 1000  # characters in each stop string
    max_logit_bias: int = 1024  # entries in `logit_bias`
    max_messages: int = 1024  # messages in one chat (or /tokenize) request
    request_timeout: float | None = None  # seconds a generation may take, queueing included; None: no limit
    # Seconds the engine may hold work without finishing a step before /health turns 503 and its
    # requests fail: a wedged engine, not a slow one.
    engine_stall_timeout: float = 120.0
    # Graceful drain on SIGTERM or SIGINT: /ready says 503 at once while requests are still served for
    # drain_grace seconds (a balancer moves traffic away), then new requests get 503 and in-flight ones
    # have drain_timeout seconds to finish before they are cut with an error.
    drain_grace: float = 5.0
    drain_timeout: float = 30.0
    sse_ping_interval: float = 15.0  # seconds between keep-alive comments on an open stream; 0: none
    sse_send_timeout: float = 30.0  # seconds one write to a stream may wait on a client that stopped reading
    # Seconds an idle HTTP/1.1 connection is kept open between requests. Longer than a balancer's or a
    # client pool's idle timeout (nginx and ALB: 60), so the client, never the server, closes an idle
    # connection: a server closing it while a request is on its way resets that request.
    keep_alive_timeout: float = 75.0
    api_keys: tuple[str, ...] = ()  # bearer keys accepted on the API; none: no authentication
    api_key_file: str | None = None  # a file of more keys, one a line (blank lines and # comments skipped)
    protect_metrics: bool = False  # /metrics needs a key too (/health and /ready never do)
    allowed_origins: tuple[str, ...] = ()  # CORS origins ("*": any); none: CORS off

    def __post_init__(self):
        keys = (self.api_keys,) if isinstance(self.api_keys, str) else tuple(self.api_keys)
        if self.api_key_file is not None:
            lines = Path(self.api_key_file).read_text().splitlines()
            from_file = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
            if not from_file:
                raise ValueError(f"api_key_file {self.api_key_file} holds no key")
            keys += from_file
        if any(not key or any(c.isspace() for c in key) for key in keys):
            raise ValueError("an API key must be a non-empty string without whitespace")
        object.__setattr__(self, "api_keys", keys)
        origins = self.allowed_origins
        object.__setattr__(self, "allowed_origins", (origins,) if isinstance(origins, str) else tuple(origins))
        if not 0 < self.port < 65536:
            raise ValueError("port must be in 1..65535")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ValueError(f"log_level must be debug, info, warning or error, not {self.log_level!r}")
        if self.max_concurrent_requests < 1:
            raise ValueError("max_concurrent_requests must be >= 1")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be text or json, not {self.log_format!r}")
        if self.request_timeout is not None and not 0 < self.request_timeout < float("inf"):
            raise ValueError("request_timeout must be a positive number of seconds")
        if not 0 < self.engine_stall_timeout < float("inf"):
            raise ValueError("engine_stall_timeout must be a positive number of seconds")
        for seconds in ("drain_grace", "drain_timeout", "sse_ping_interval"):
            if not 0 <= getattr(self, seconds) < float("inf"):
                raise ValueError(f"{seconds} must be a number of seconds >= 0")
        for seconds in ("sse_send_timeout", "keep_alive_timeout"):
            if not 0 < getattr(self, seconds) < float("inf"):
                raise ValueError(f"{seconds} must be a positive number of seconds")
        if self.otlp_traces_endpoint is not None and not self.otlp_traces_endpoint.startswith(("http://", "https://")):
            raise ValueError(f"otlp_traces_endpoint must be an http:// or https:// URL, not {self.otlp_traces_endpoint!r}")
        for limit in ("max_request_body_bytes", "max_prompts_per_request", "max_n", "max_stop_strings",
                      "max_stop_string_length", "max_logit_bias", "max_messages"):
            if getattr(self, limit) < 1:
                raise ValueError(f"{limit} must be >= 1")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    @classmethod
    def from_options(cls, **options) -> "EngineConfig":
        """Flat keyword options (as `LLM(...)` and the CLI take them) sorted into their sections."""
        sections = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig, "parallel": ParallelConfig,
                    "faults": FaultConfig, "lora": LoraConfig}
        fields = {name: {} for name in sections}
        for key, value in options.items():
            owner = next((name for name, kind in sections.items() if key in kind.__dataclass_fields__), None)
            if owner is None:
                raise TypeError(f"unknown engine option {key!r}")
            fields[owner][key] = value
        return cls(**{name: kind(**fields[name]) for name, kind in sections.items()})


def load_config(yaml_path: str | Path | None = None, **overrides) -> tuple[EngineConfig, ServerConfig]:
    """Defaults, then the YAML file's keys, then `overrides` (the CLI's flags; None means unset).

    YAML keys are the configuration fields by name (model, dtype, max_num_seqs, kv_cache_gib, port, ...),
    with `tp` short for tensor_parallel_size; an `architecture:` section documents the model's shape for
    planning and is not needed to serve.
    """
    import yaml

    options = {}
    if yaml_path is not None:
        options = yaml.safe_load(Path(yaml_path).read_text()) or {}
        if not isinstance(options, dict):
            raise ValueError(f"{yaml_path}: expected a mapping of option: value")
        options.pop("architecture", None)
        if "tp" in options:
            options["tensor_parallel_size"] = options.pop("tp")
    options.update({k: v for k, v in overrides.items() if v is not None})
    server_fields = {k: options.pop(k) for k in list(options) if k in ServerConfig.__dataclass_fields__}
    return EngineConfig.from_options(**options), ServerConfig(**server_fields)
