"""The tensors of a GGUF file read at their own precision: a checkpoint reader with transformers' tensor names.

`read` gives float32 (every type the `gguf` package de-quantizes, exactly as it does); `read_codes` gives a
Q4_0 or Q4_1 tensor's 4-bit codes with their per-32 scales and minimums, which is exactly the int4
group-wise form of llamaserve.model.quantization with group 32:

    Q4_0: w = d * (q - 8)   ->  scale d, min -8 d      Q4_1: w = d * q + m  ->  scale d, min m

(d and m are float16 in the file and float32 here: exact.) Q8_0 (w = d * q, a scale per 32) has no exact
home in the int8 kernel, which takes one scale per output row: `kind` says int8 and the layer re-quantizes
the exact float32 values per row.

llama.cpp stores the rows of q_proj and k_proj permuted for its rotary layout; reads undo it as
transformers does. A row permutation moves whole rows, so the codes stay exact.
"""

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from .architecture import ModelArchitecture
from .quantization import GroupCodes

BLOCK = 32  # weights per Q4_0 / Q4_1 / Q8_0 block
KINDS = {GGMLQuantizationType.Q4_0: "int4", GGMLQuantizationType.Q4_1: "int4", GGMLQuantizationType.Q8_0: "int8"}

# GGUF tensor names -> transformers' (the layer index stays where {} is).
NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}
SKIPPED = ("rope_freqs.weight",)  # computed from the config, as for safetensors checkpoints


def hf_name(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] == "blk":
        template, layer = ".".join(["blk", "{}", *parts[2:]]), parts[1]
        return NAMES[template].format(layer) if template in NAMES else None
    return NAMES.get(name)


class GGUFCheckpoint:
    """The reader `LlamaForCausalLM.load_weights` takes (`names`, `shape`, `read`), plus `kind` and
    `read_codes` for the tensors that load quantized. The file is memory-mapped by the `gguf` package;
    a read copies only the rows it asks for."""

    group_size = BLOCK  # of the codes `read_codes` gives

    def __init__(self, path, arch: ModelArchitecture):
        self.path = path
        self._tensors = {}
        for tensor in GGUFReader(path).tensors:
            name = hf_name(tensor.name)
            if name is None:
                if tensor.name in SKIPPED:
                    continue
                raise ValueError(f"{path}: unexpected tensor {tensor.name}")
            self._tensors[name] = tensor
        self._heads = {"q_proj": arch.num_attention_heads, "k_proj": arch.num_key_value_heads}

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self._tensors[name].shape))  # GGUF lists the fastest dim first

    def kind(self, name: str) -> str | None:
        """"int4" or "int8" for a tensor stored in Q4_0/Q4_1 or Q8_0; None for any other type."""
        return KINDS.get(self._tensors[name].tensor_type)

    def _rows(self, name: str, dim: int | None, start: int, stop: int | None) -> np.ndarray:
        """The file's rows holding checkpoint rows [start, stop) (all rows unless dim is 0), un-permuted."""
        rows = self.shape(name)[0]
        order = np.arange(rows)
        heads = self._heads.get(name.split(".")[-2])
        if heads is not None:  # llama.cpp's rotary permutation of q and k, undone as transformers does
            order = order.reshape(heads, rows // heads // 2, 2).swapaxes(2, 1).reshape(rows)
        return order[start:stop] if dim == 0 else order

    def _blocks(self, name: str, dim: int | None, start: int, stop: int | None) -> tuple[np.ndarray, slice]:
        """Raw rows of the tensor and, for a slice along dim 1, the columns within them still to cut."""
        tensor = self._tensors[name]
        data = tensor.data.reshape(self.shape(name)[0], -1) if len(self.shape(name)) == 2 else tensor.data
        if len(self.shape(name)) == 1:
            return np.asarray(data[start:stop] if dim == 0 else data), slice(None)
        raw = data[self._rows(name, dim, start, stop)]
        if dim != 1:
            return raw, slice(None)
        block_size, block_bytes = GGML_QUANT_SIZES[tensor.tensor_type]
        if start % block_size or stop % block_size:
            return raw, slice(start, stop)  # de-quantize whole rows, then cut
        return raw[:, start // block_size * block_bytes : stop // block_size * block_bytes], slice(None)

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """float32: the whole tensor, or rows [start, stop) along `dim` (0, or 1 of a 2-D tensor)."""
        raw, columns = self._blocks(name, dim, start, stop)
        values = dequantize(raw, self._tensors[name].tensor_type).astype(np.float32, copy=False)
        return torch.from_numpy(np.array(values[..., columns], dtype=np.float32))  # a copy: the file is read-only

    def read_codes(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> GroupCodes:
        """A Q4_0 or Q4_1 tensor's codes as they are (whole, or rows [start, stop) along `dim`)."""
        kind = self._tensors[name].tensor_type
        if kind not in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1):
            raise ValueError(f"{name} is {kind.name}, not Q4_0 or Q4_1")
        raw, columns = self._blocks(name, dim, start, stop)
        if columns != slice(None):
            raise ValueError(f"{name}: columns [{start}:{stop}] do not fall on its {BLOCK}-weight blocks")
        rows = raw.shape[0]
        blocks = torch.from_numpy(np.ascontiguousarray(raw)).view(rows, -1, GGML_QUANT_SIZES[kind][1])
        scales = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()  # [rows, blocks]
        if kind == GGMLQuantizationType.Q4_1:
            mins = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float()
            packed = blocks[..., 4:]
        else:
            mins = -8 * scales
            packed = blocks[..., 2:]
        q = torch.cat([packed & 0x0F, packed >> 4], dim=-1)  # a block's low nibbles are its first 16 weights
        return GroupCodes(q.reshape(rows, -1).contiguous(), scales, mins, BLOCK)
