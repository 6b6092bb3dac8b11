"""Memory plan of a tensor-parallel deployment: what each rank holds and how much KV cache fits.

`llamaserve plan --config configs/llama-2-70b-chat.yaml --gpu-memory-gib 80` prints it. The plan is
arithmetic on the deployment YAML's `architecture:` section; nothing is downloaded or allocated. With
`tp` the tensor-parallel size, `d` the dtype's bytes per element (float16/bfloat16: 2, float32: 4),
`H` hidden_size, `I` intermediate_size, `L` num_hidden_layers, `V` vocab_size, `h` head_dim:

Heads per rank (llamaserve.model.sharding, the rule the server loads by)
    q_heads = num_attention_heads / tp (tp must divide it).
    kv_heads = num_key_value_heads / tp when tp divides num_key_value_heads; when tp exceeds them
    (tp a multiple of num_key_value_heads) each KV head is replicated on tp / num_key_value_heads
    ranks and every rank holds kv_heads = 1. Any other tp is an error.

Weight bytes per rank = d × params per rank, where every weight is sharded except the RMSNorm weights:
    embedding      = ceil(V / tp) × H   (the vocabulary is padded up to a multiple of tp)
    lm_head        = ceil(V / tp) × H   (0 when tied to the embedding)
    per layer      = q_proj  q_heads × h × H
                   + k_proj, v_proj  2 × kv_heads × h × H
                   + o_proj  q_heads × h × H
                   + gate_proj, up_proj, down_proj  3 × H × I / tp   (tp must divide I)
                   + input and post-attention norms  2 × H   (replicated)
    params/rank    = embedding + lm_head + L × per layer + H (final norm, replicated)

With weight-only quantization (`quantization`, for the decoder's linear projections, and
`lm_head_quantization`, for the output head; llamaserve.model.quantization), a projection of `out × in`
parameters holds instead
    int8           out × in + 4 × out              (one code a weight, a float32 scale per output row)
    int4           out × in / 2 + 4 × out × in / G (two codes a byte, a bfloat16 scale and minimum per
                                                    group of G = quantization_group_size inputs)
and a quantized head tied to the embedding is a copy beside it (the embedding keeps the dtype). "auto"
quantizes what a GGUF file stores quantized, which the plan does not read: it counts as "none", an upper
bound.

KV bytes per token per rank = 2 (K and V) × L × kv_heads × h × d.

Activation reserve per rank = max_num_batched_tokens × (2 × H + 3 × I / tp) × d: the widest point of a
step is the MLP, where the residual stream and its normed copy (2 × H), the fused gate/up output
(2 × I / tp) and silu(gate) × up (I / tp) are alive at once for every token in the step. Logits are
computed only for sampled tokens and are small beside it. Allocator fragmentation and workspace are
left to the headroom of gpu_memory_utilization.

KV cache
    usable bytes   = gpu_memory_gib × 2^30 × gpu_memory_utilization − weight bytes − activation reserve
    kv_tokens      = usable bytes // KV bytes per token
    max_sequences  = kv_tokens // max_model_len   (sequences at full length resident at once)
Every rank holds the same shapes, so all ranks get the same plan.
"""

from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import DTYPES, INT4_GROUP_SIZES, ModelConfig, SchedulerConfig
from .model.architecture import ModelArchitecture
from .model.sharding import heads_per_rank

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PLANNED_QUANTIZATIONS = ("none", "int8", "int4")
GIB = 2**30


@dataclass(frozen=True)
class RankPlan:
    """What one tensor-parallel rank holds; every rank holds the same."""

    tensor_parallel_size: int  # ranks the model is split across
    dtype: str  # weight and KV dtype
    quantization: str  # the decoder's linear projections: "none", "int8" or "int4"
    lm_head_quantization: str  # the output head's: "none", "int8" or "int4"
    q_heads: int  # query heads on this rank
    kv_heads: int  # KV heads on this rank (replicated when tp exceeds num_key_value_heads)
    weight_params: int  # parameters on this rank
    weight_bytes: int  # weight_params × dtype bytes, quantized projections at their own sizes
    kv_bytes_per_token: int  # K and V of one token, all layers, this rank's KV heads
    activation_bytes: int  # reserve for one step's activations (see the module docstring)
    memory_bytes: int  # gpu_memory_gib × 2^30 × gpu_memory_utilization
    usable_bytes: int  # memory_bytes − weights − activations; negative when the weights do not fit
    kv_tokens: int  # tokens whose KV fits in usable_bytes (0 when nothing fits)
    max_model_len: int  # tokens of one full-length sequence
    max_sequences: int  # full-length sequences whose KV fits at once

    @property
    def fits(self) -> bool:
        return self.usable_bytes > 0


def layer_projections(arch: ModelArchitecture, tp: int) -> list[tuple[int, int]]:
    """(out, in) of each linear projection of one decoder layer on a rank: qkv, o, gate/up, down."""
    q_heads, kv_heads = heads_per_rank(arch, tp)
    hidden, head_dim, inter = arch.hidden_size, arch.head_dim, arch.intermediate_size // tp
    return [((q_heads + 2 * kv_heads) * head_dim, hidden), (hidden, q_heads * head_dim), (2 * inter, hidden),
            (hidden, inter)]


def vocab_rows_per_rank(arch: ModelArchitecture, tp: int) -> int:
    return -(-arch.vocab_size // tp)  # padded up to a multiple of tp


def weight_params_per_rank(arch: ModelArchitecture, tp: int) -> int:
    embedding = vocab_rows_per_rank(arch, tp) * arch.hidden_size
    lm_head = 0 if arch.tie_word_embeddings else embedding
    projections = sum(out * inp for out, inp in layer_projections(arch, tp))
    norms = 2 * arch.hidden_size  # replicated
    return embedding + lm_head + arch.num_hidden_layers * (projections + norms) + arch.hidden_size


def projection_bytes(out: int, inp: int, dtype: str, quantization: str, group_size: int) -> int:
    if quantization == "int8":
        return out * inp + 4 * out
    if quantization == "int4":
        return out * inp // 2 + 4 * out * (inp // group_size)
    return out * inp * DTYPE_BYTES[dtype]


def weight_bytes_per_rank(arch: ModelArchitecture, tp: int, dtype: str, quantization: str = "none",
                          lm_head_quantization: str = "none", group_size: int = ModelConfig.quantization_group_size
                          ) -> int:
    """What a rank's weights take, the projections in `quantization` and the head in `lm_head_quantization`."""
    d, hidden = DTYPE_BYTES[dtype], arch.hidden_size
    vocab = vocab_rows_per_rank(arch, tp)
    projections = sum(projection_bytes(out, inp, dtype, quantization, group_size)
                      for out, inp in layer_projections(arch, tp))
    if lm_head_quantization != "none":  # a copy of its own, beside a tied embedding
        lm_head = projection_bytes(vocab, hidden, dtype, lm_head_quantization, group_size)
    else:
        lm_head = 0 if arch.tie_word_embeddings else vocab * hidden * d
    norms = (2 * arch.num_hidden_layers + 1) * hidden * d
    return vocab * hidden * d + lm_head + arch.num_hidden_layers * projections + norms


def kv_bytes_per_token(arch: ModelArchitecture, tp: int, dtype: str) -> int:
    _, kv_heads = heads_per_rank(arch, tp)
    return 2 * arch.num_hidden_layers * kv_heads * arch.head_dim * DTYPE_BYTES[dtype]


def activation_bytes(arch: ModelArchitecture, tp: int, dtype: str, max_num_batched_tokens: int) -> int:
    return max_num_batched_tokens * (2 * arch.hidden_size + 3 * (arch.intermediate_size // tp)) * DTYPE_BYTES[dtype]


def plan_rank(
    arch: ModelArchitecture,
    *,
    tensor_parallel_size: int,
    dtype: str,
    gpu_memory_gib: float,
    gpu_memory_utilization: float = 0.9,
    max_model_len: int = 4096,
    max_num_batched_tokens: int = SchedulerConfig.max_num_batched_tokens,
    quantization: str = "none",
    lm_head_quantization: str = "none",
    quantization_group_size: int = ModelConfig.quantization_group_size,
) -> RankPlan:
    """`quantization`, `lm_head_quantization`: "none", "int8" or "int4" ("auto" counts as "none": the module
    docstring says why)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    quantization, lm_head_quantization = (q if q != "auto" else "none" for q in (quantization, lm_head_quantization))
    for name, value in (("quantization", quantization), ("lm_head_quantization", lm_head_quantization)):
        if value not in PLANNED_QUANTIZATIONS:
            raise ValueError(f"{name} must be one of {', '.join(PLANNED_QUANTIZATIONS)} or auto, not {value!r}")
    if quantization_group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"quantization_group_size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}")
    if gpu_memory_gib <= 0:
        raise ValueError("gpu_memory_gib must be > 0")
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError("gpu_memory_utilization must be in (0, 1]")
    if max_model_len < 1:
        raise ValueError("max_model_len must be >= 1")
    tp = tensor_parallel_size
    q_heads, kv_heads = heads_per_rank(arch, tp)
    params = weight_params_per_rank(arch, tp)
    weight_bytes = weight_bytes_per_rank(arch, tp, dtype, quantization, lm_head_quantization, quantization_group_size)
    per_token = kv_bytes_per_token(arch, tp, dtype)
    activations = activation_bytes(arch, tp, dtype, max_num_batched_tokens)
    memory = int(gpu_memory_gib * GIB * gpu_memory_utilization)
    usable = memory - weight_bytes - activations
    kv_tokens = max(usable, 0) // per_token
    return RankPlan(
        tensor_parallel_size=tp,
        dtype=dtype,
        quantization=quantization,
        lm_head_quantization=lm_head_quantization,
        q_heads=q_heads,
        kv_heads=kv_heads,
        weight_params=params,
        weight_bytes=weight_bytes,
        kv_bytes_per_token=per_token,
        activation_bytes=activations,
        memory_bytes=memory,
        usable_bytes=usable,
        kv_tokens=kv_tokens,
        max_model_len=max_model_len,
        max_sequences=kv_tokens // max_model_len,
    )


def plan_deployment(
    config: str | Path,
    *,
    gpu_memory_gib: float,
    gpu_memory_utilization: float = 0.9,
    tensor_parallel_size: int | None = None,
    dtype: str | None = None,
    max_model_len: int | None = None,
    quantization: str | None = None,
    lm_head_quantization: str | None = None,
) -> RankPlan:
    """The plan for a deployment YAML (configs/*.yaml); arguments left as None come from the YAML."""
    options = yaml.safe_load(Path(config).read_text()) or {}
    return plan_rank(
        ModelArchitecture.from_yaml(config),
        tensor_parallel_size=tensor_parallel_size or options.get("tensor_parallel_size", 1),
        dtype=dtype or options.get("dtype", "float32"),
        gpu_memory_gib=gpu_memory_gib,
        gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len or options.get("max_model_len", 4096),
        max_num_batched_tokens=options.get("max_num_batched_tokens", SchedulerConfig.max_num_batched_tokens),
        quantization=quantization or options.get("quantization", "none"),
        lm_head_quantization=lm_head_quantization or options.get("lm_head_quantization", "none"),
        quantization_group_size=options.get("quantization_group_size", ModelConfig.quantization_group_size),
    )


def format_plan(plan: RankPlan, gpu_memory_gib: float) -> str:
    def gib(n: int) -> str:
        return f"{n / GIB:.2f} GiB"

    tp = plan.tensor_parallel_size
    quantized = "".join(f", {kind} {what}" for kind, what in ((plan.quantization, "projections"),
                                                             (plan.lm_head_quantization, "LM head")) if kind != "none")
    lines = [
        f"{f'each of {tp} ranks' if tp > 1 else '1 rank'} ({plan.dtype}{quantized}, {gpu_memory_gib:g} GiB GPU, "
        f"{plan.q_heads} query / {plan.kv_heads} KV heads per rank):",
        f"  weights              {plan.weight_bytes:,} bytes ({gib(plan.weight_bytes)}, "
        f"{plan.weight_params:,} params)",
        f"  KV per token         {plan.kv_bytes_per_token:,} bytes",
        f"  memory budget        {plan.memory_bytes:,} bytes ({gib(plan.memory_bytes)})",
        f"  activation reserve   {plan.activation_bytes:,} bytes ({gib(plan.activation_bytes)})",
    ]
    if not plan.fits:
        lines.append(
            f"  the weights and activations do not fit: {gib(-plan.usable_bytes)} over the budget; "
            "raise --tensor-parallel-size or --gpu-memory-gib"
        )
        return "\n".join(lines)
    lines += [
        f"  KV cache             {plan.usable_bytes:,} bytes ({gib(plan.usable_bytes)})",
        f"  KV tokens            {plan.kv_tokens:,}",
        f"  {f'{plan.max_model_len}-token sequences':<21}{plan.max_sequences:,}",
    ]
    return "\n".join(lines)
