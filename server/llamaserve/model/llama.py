"""Llama decoder over a flat batch of tokens and a paged KV cache, split across tensor-parallel ranks.

Projections are fused (QKV, gate/up) so each layer runs three matmuls on its input; the parallel layers
(llamaserve.model.parallel) load their own slices of the checkpoint's separate q/k/v and gate/up tensors.
With one rank the same code runs with no communication. Attention goes through one backend
(llamaserve.model.attention), chosen at the first forward, when the device and dtype are known.
"""

import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .architecture import ModelArchitecture
from .attention import ATTENTION_BACKENDS, AttentionBackend, AttentionMetadata, select_attention_backend
from .cpu_kernels import Bf16Gemm, CpuKernels, DecoderLayerOperands, DecoderOperands, DecoderProgram, LayerOps
from .parallel import ColumnParallelLinear, Linear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from .rotary import RotaryEmbedding, apply_rotary
from .sharding import TensorParallel, heads_per_rank

log = logging.getLogger(__name__)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)  # replicated on every rank
        self.eps = eps
        self.ops: LayerOps | None = None  # llamaserve's fused CPU kernels, given at load

    def checkpoint_shape(self, part: None = None) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    def load_weight(self, checkpoint, name: str, part: None = None) -> None:
        self.weight.data.copy_(checkpoint.read(name))

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
        """rms_norm(x) * weight; with `delta`, x += delta first, in place (x is the residual stream, delta
        what the last block adds to it): one fused call on CPU where llamaserve's kernel runs."""
        if self.ops is not None and self.ops.supports(x):
            return self.ops.add_rms_norm(x, delta, self.weight, self.eps)
        if delta is not None:
            x.add_(delta)
        # torch's rms_norm normalises in float32 whatever the input's dtype and rounds to it, as the reference
        # does before its multiply by the weight (bit-identical, in one call instead of seven).
        return F.rms_norm(x, self.weight.shape, None, self.eps) * self.weight


class LlamaAttention(nn.Module):
    def __init__(self, arch: ModelArchitecture, tp: TensorParallel):
        super().__init__()
        self.num_heads, self.num_kv_heads = heads_per_rank(arch, tp.size)
        self.head_dim = arch.head_dim
        kv_shards = min(arch.num_key_value_heads, tp.size)  # fewer KV heads than ranks: replicated
        self.qkv_proj = ColumnParallelLinear(
            arch.hidden_size, {"q": (arch.q_size, tp.size), "k": (arch.kv_size, kv_shards),
                               "v": (arch.kv_size, kv_shards)}, tp,
        )
        self.o_proj = RowParallelLinear(arch.q_size, arch.hidden_size, tp)
        self.ops: LayerOps | None = None  # llamaserve's fused CPU kernels, given at load
        self.backend: AttentionBackend | None = None  # shared by every layer; LlamaForCausalLM sets it

    def forward(self, x, cos, sin, kv_cache, meta, plan):
        n = x.shape[0]
        heads = self.qkv_proj(x).view(n, -1, self.head_dim)  # [n, num_heads + 2 * num_kv_heads, head_dim]
        rotated = self.num_heads + self.num_kv_heads  # q and k, in one rotation
        if self.ops is not None and self.ops.supports(heads) and self.head_dim <= 512:
            self.ops.rotary(heads, rotated, cos, sin)
            qk = heads
        else:
            qk = apply_rotary(heads[:, :rotated], cos, sin)
        q, k, v = qk[:, : self.num_heads], qk[:, self.num_heads : rotated], heads[:, rotated:]
        return self.o_proj(self.backend.forward(q, k, v, kv_cache, meta, plan))


class LlamaMLP(nn.Module):
    def __init__(self, arch: ModelArchitecture, tp: TensorParallel):
        super().__init__()
        size = arch.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(arch.hidden_size, {"gate": (size, tp.size), "up": (size, tp.size)}, tp)
        self.down_proj = RowParallelLinear(size, arch.hidden_size, tp)
        self.ops: LayerOps | None = None  # llamaserve's fused CPU kernels, given at load

    def forward(self, x):
        gate_up = self.gate_up_proj(x)
        if self.ops is not None and self.ops.supports(gate_up):
            return self.down_proj(self.ops.silu_mul(gate_up))
        gate, up = gate_up.split(self.gate_up_proj.part_sizes, dim=-1)
        return self.down_proj(F.silu(gate).mul_(up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ModelArchitecture, tp: TensorParallel):
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = LlamaAttention(arch, tp)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = LlamaMLP(arch, tp)

    def forward(self, x, delta, cos, sin, kv_cache, meta, plan):
        """x: the residual stream, this forward's own tensor (the embedding's output, then the sums), updated in
        place; delta: what the layer before adds to it, added here with the norm (None for the first layer).
        Returns x and this layer's MLP output, for the next norm to add."""
        h = self.self_attn(self.input_layernorm(x, delta), cos, sin, kv_cache, meta, plan)
        return x, self.mlp(self.post_attention_layernorm(x, h))

    def kernel_operands(self) -> DecoderLayerOperands | None:
        """This layer's weights for cpu_kernels.DecoderLayers, or None unless llamaserve's kernels hold them all."""
        attn, mlp = self.self_attn, self.mlp
        linears = [m.kernel_operands() for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
        norms = [self.input_layernorm.weight, self.post_attention_layernorm.weight]
        if None in linears or any(norm.dtype != torch.bfloat16 for norm in norms):
            return None
        return DecoderLayerOperands(*norms, *linears)


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArchitecture, tp: TensorParallel):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, tp)
        self.layers = nn.ModuleList(LlamaDecoderLayer(arch, tp) for _ in range(arch.num_hidden_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    # Checkpoint tensors that load into one part of a fused weight: suffix -> (our module suffix, part).
    FUSED_PARTS = {
        "self_attn.q_proj.weight": ("self_attn.qkv_proj", "q"),
        "self_attn.k_proj.weight": ("self_attn.qkv_proj", "k"),
        "self_attn.v_proj.weight": ("self_attn.qkv_proj", "v"),
        "mlp.gate_proj.weight": ("mlp.gate_up_proj", "gate"),
        "mlp.up_proj.weight": ("mlp.gate_up_proj", "up"),
    }

    def __init__(self, arch: ModelArchitecture, tp: TensorParallel = TensorParallel(), attention_backend: str = "auto"):
        """`attention_backend`: "auto" (by device and what is installed), "torch", "triton" or "flashinfer"."""
        super().__init__()
        self.arch = arch
        self.model = LlamaModel(arch, tp)
        self.rotary = RotaryEmbedding(arch)
        self.heads = heads_per_rank(arch, tp.size)  # (query heads, KV heads) on this rank
        self.cpu_attention_kernel = None  # a cpu_kernels.PagedAttention the loader gives on CPU, for "auto"
        self.decoder: DecoderProgram | None = None  # a decode-only step in one call (CPU)
        self.set_attention_backend(attention_backend)
        self.lm_head = ParallelLMHead(arch.hidden_size, arch.vocab_size, tp)
        self.tie_weights()

    def set_attention_backend(self, name: str) -> None:
        """Serve attention with backend `name` (one of ATTENTION_BACKENDS) from the next forward on."""
        if name not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, not {name!r}")
        self.attention_backend = name
        self.attn_backend: AttentionBackend | None = None
        self._attn_serves = None  # the (device, dtype) attn_backend was chosen for

    def attention_for(self, device: torch.device, dtype: torch.dtype) -> AttentionBackend:
        """The backend serving attention on `device` in `dtype`, chosen the first time it is asked for."""
        device = torch.device(device)
        if self._attn_serves != (device, dtype):
            backend = select_attention_backend(self.attention_backend, device, dtype, *self.heads, self.arch.head_dim,
                                               self.cpu_attention_kernel)
            for layer in self.model.layers:
                layer.self_attn.backend = backend
            self.attn_backend, self._attn_serves = backend, (device, dtype)
            log.info("attention backend: %s (asked: %s) on %s", backend.name, self.attention_backend, device)
        return self.attn_backend

    def tie_weights(self) -> None:
        """Share the embedding with the output head when the checkpoint does (again after `to_empty`).
        Both hold the same vocabulary shard."""
        if self.arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        attention_plan: Any = None,
    ) -> torch.Tensor | None:  # [num_sampled, vocab_size] float32 in meta.logits_indices order; None off rank 0
        """`attention_plan`: the backend's plan for `meta`, made by the caller (a CUDA graph's, which serves
        every replay); None: planned here."""
        dtype = self.model.embed_tokens.weight.dtype
        backend = self.attention_for(input_ids.device, dtype)
        plan = backend.plan(meta) if attention_plan is None else attention_plan
        cos, sin = self.rotary(positions, meta.token_seq_lens, dtype)
        rows = meta.logits_indices  # the positions that are sampled
        if self._decodes_in_one_call(backend, plan):
            logits = self.decoder.run(input_ids, cos, sin, kv_caches, meta.slot_mapping, plan.decode_tables,
                                      plan.decode_lens, plan.decode_tokens)
            # One row a sequence, in order: all of them but where a one-token prompt chunk samples nothing.
            return logits if rows.numel() == logits.shape[0] else logits[rows]
        x, delta = self.model.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            x, delta = layer(x, delta, cos, sin, kv_cache, meta, plan)
        # Only the sampled positions go through the final norm and the vocabulary projection.
        logits = self.lm_head(self.model.norm(x[rows], delta[rows]))
        return None if logits is None else logits.float()

    def _decodes_in_one_call(self, backend: AttentionBackend, plan) -> bool:
        """Whether this step runs through `decoder`: every token a decode on the CPU attention kernel, and no
        adapters (LoRA stacks, once served, sit on every projection)."""
        return (self.decoder is not None and backend.name == "cpu" and not plan.prefills
                and self.model.layers[0].self_attn.qkv_proj.lora is None)

    def use_decoder_kernel(self, kernels: CpuKernels) -> None:
        """Run decode-only steps in one call of `kernels.decoder` where it can: every layer's weights on
        llamaserve's matmul kernels (so bfloat16 activations), its norms, rotary and attention kernels built,
        and one rank (the layer-by-layer path all-reduces between them). The LM head joins the call where it
        is on those kernels too."""
        layers = [layer.kernel_operands() for layer in self.model.layers]
        one_rank = self.model.layers[0].mlp.down_proj.tp.size == 1
        if None in (kernels.decoder, kernels.attention, kernels.layer_ops) or None in layers or not one_rank:
            self.decoder = None
            return
        operands = DecoderOperands(self.model.embed_tokens.weight, layers, self.model.norm.weight,
                                   self.lm_head.kernel_operands(), self.lm_head)
        self.decoder = kernels.decoder.program(kernels, operands, *self.heads, self.arch.head_dim,
                                               self.arch.rms_norm_eps)
        log.info("decode steps: the embedding, every layer, the final norm%s in one call of llamaserve's CPU "
                 "kernels", " and the LM head" if operands.head is not None else "")

    def use_layer_ops(self, ops: LayerOps | None) -> None:
        """Fuse every norm's residual add, every MLP's SiLU * up and every attention's rotary embedding through
        `ops` (None: torch's operators)."""
        for module in self.modules():
            if isinstance(module, (RMSNorm, LlamaMLP, LlamaAttention)):
                module.ops = ops

    def pack_for_cpu(self, gemm: Bf16Gemm | None = None) -> None:
        """Hand every float linear layer's weight to a CPU kernel (see parallel.Linear): `gemm` where it serves
        the layer, else oneDNN, where that serves the dtype."""
        for module in self.modules():
            if isinstance(module, Linear) and module.quantized is None and \
                    module.weight.dtype in (torch.float32, torch.bfloat16):
                module.pack_for_cpu(gemm)

    def quantization_plan(self, quantization: str, checkpoint) -> dict[str, str]:
        """Decoder linear layer -> "int8" or "int4", for the layers `quantization` (one of QUANTIZATIONS)
        quantizes; the LM head and the embeddings are never among them. "auto": the kind the checkpoint
        stores all of a layer's tensors in (a GGUF file's `kind`); a layer whose parts differ stays float."""
        linears = [name for name, module in self.named_modules()
                   if isinstance(module, (ColumnParallelLinear, RowParallelLinear))]
        if quantization in ("int8", "int4"):
            return dict.fromkeys(linears, quantization)
        if quantization != "auto" or not hasattr(checkpoint, "kind"):
            return {}
        kinds: dict[str, set[str | None]] = {}
        for name in checkpoint.names():
            kinds.setdefault(self.target(name)[0], set()).add(checkpoint.kind(name))
        return {name: next(iter(kinds[name])) for name in linears if len(kinds.get(name, ())) == 1
                and None not in kinds[name]}

    def lm_head_quantization(self, lm_head: str, quantization: str, checkpoint) -> str | None:
        """"int8", "int4" or None (float) for the LM head: `lm_head` (one of LM_HEAD_QUANTIZATIONS) as asked, and
        "auto": int8 under `quantization` "auto" when the checkpoint (a GGUF file) stores the head, or the
        embedding it is tied to, quantized (llama.cpp multiplies by those codes; int8 per row costs the default
        model 0.1% perplexity, int4 from float 5.7%: bench/RESULTS.md)."""
        if lm_head != "auto":
            return None if lm_head == "none" else lm_head
        name = "model.embed_tokens.weight" if self.arch.tie_word_embeddings else "lm_head.weight"
        if quantization == "auto" and hasattr(checkpoint, "kind") and checkpoint.kind(name) is not None:
            return "int8"
        return None

    def quantize(self, plan: dict[str, str], group_size: int, kernels: CpuKernels | None = None) -> None:
        """Quantize the layers of `plan` (from `quantization_plan`), once their weights are loaded; on
        llamaserve's CPU kernels (of `kernels`) where they serve a layer."""
        modules = dict(self.named_modules())
        for name, kind in plan.items():
            modules[name].quantize(kind, group_size, kernels)

    def load_weights(self, checkpoint, names: Iterable[str] | None = None) -> None:
        """Load this rank's slice of every checkpoint tensor (transformers' names) into our layers;
        `names` defaults to all of `checkpoint.names()` (a progress bar may wrap it)."""
        modules = dict(self.named_modules())
        loaded = set()
        for name in checkpoint.names() if names is None else names:
            if name == "lm_head.weight" and self.arch.tie_word_embeddings:
                continue
            if name.endswith("rotary_emb.inv_freq"):
                continue  # older checkpoints carry a buffer we compute ourselves
            module_name, part = self.target(name)
            module = modules.get(module_name)
            if module is None or not hasattr(module, "load_weight") or not name.endswith(".weight"):
                raise ValueError(f"unexpected tensor in checkpoint: {name}")
            expected = module.checkpoint_shape(part)
            if checkpoint.shape(name) != expected:
                raise ValueError(f"{name}: checkpoint shape {checkpoint.shape(name)} != model {expected}")
            module.load_weight(checkpoint, name, part)
            loaded.add((module_name, part))
        missing = self._expected_loads() - loaded
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing, key=str)[:3]}")

    def target(self, name: str) -> tuple[str, str | None]:
        """The module (and part of a fused one) that a checkpoint tensor loads into."""
        suffix = next((s for s in self.FUSED_PARTS if name.endswith(s)), None)
        if suffix is None:
            return name.removesuffix(".weight"), None
        module_suffix, part = self.FUSED_PARTS[suffix]
        return name[: -len(suffix)] + module_suffix, part

    def _expected_loads(self) -> set[tuple[str, str | None]]:
        loads = set()
        for name, module in self.named_modules():
            if name == "lm_head" and self.arch.tie_word_embeddings:
                continue
            if isinstance(module, ColumnParallelLinear):
                loads.update((name, part) for part in module.slices)
            elif hasattr(module, "load_weight"):
                loads.add((name, None))
        return loads
