"""LoRA adapters as PEFT saves them, and folding one into the base weights at load (`merge_and_unload`).

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors`, whose tensors are named
`base_model.model.<base module>.lora_A.weight` ([rank, in]) and `.lora_B.weight` ([out, rank]). The
adapted weight is W + scaling * B @ A, with scaling = lora_alpha / rank (lora_alpha / sqrt(rank) with
`use_rslora`). Adapters trained on a 4-bit (QLoRA) base have the same form and serve on the
full-precision base. What PEFT can save beyond that is refused at load, by name.
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .cpu_kernels import LoraDelta
from .loader import SafetensorsCheckpoint

# The base modules an adapter may target: every linear layer of a decoder layer.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_TENSOR = re.compile(r"base_model\.model\.(model\.layers\.\d+\.(?:self_attn|mlp)\.(\w+))\.lora_([AB])\.weight")


class AdapterError(ValueError):
    """An adapter that cannot be served, and why."""


@dataclass(frozen=True)
class LoraWeights:
    a: torch.Tensor  # [rank, in] float32
    b: torch.Tensor  # [out, rank] float32, already multiplied by the adapter's scaling


@dataclass(frozen=True)
class LoraAdapter:
    path: Path
    rank: int
    weights: dict[str, LoraWeights]  # base checkpoint tensor name ("model.layers.0.self_attn.q_proj.weight") ->

    @classmethod
    def load(cls, path: str | Path) -> "LoraAdapter":
        path = Path(path)
        config = _read_config(path)
        if not (path / "adapter_model.safetensors").is_file():
            if (path / "adapter_model.bin").is_file():
                raise AdapterError(f"{path}: adapter_model.bin is a pickle file, and loading one can run arbitrary "
                                   "code; save the adapter with safetensors (PEFT's default)")
            raise AdapterError(f"{path}: no adapter_model.safetensors")
        rank, alpha = config["r"], config.get("lora_alpha", config["r"])
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        try:
            tensors = SafetensorsCheckpoint(path)
        except ValueError as e:  # a corrupt file
            raise AdapterError(str(e)) from None
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for name in tensors.names():
            match = _TENSOR.fullmatch(name)
            if match is None:
                raise AdapterError(f"{path}: tensor {name} adapts something other than a decoder layer's linear "
                                   f"projections ({', '.join(TARGET_MODULES)}); it is not supported")
            module, projection, which = match.groups()
            if projection not in TARGET_MODULES:
                raise AdapterError(f"{path}: target module {projection} is not supported "
                                   f"(supported: {', '.join(TARGET_MODULES)})")
            pairs.setdefault(f"{module}.weight", {})[which] = tensors.read(name).float()
        weights = {}
        for name, pair in pairs.items():
            if set(pair) != {"A", "B"}:
                raise AdapterError(f"{path}: {name} has lora_{''.join(pair)} without its other half")
            a, b = pair["A"], pair["B"]
            if a.shape[0] != rank or b.shape[1] != rank:
                raise AdapterError(f"{path}: {name} has rank {a.shape[0]}, the config says r={rank}")
            weights[name] = LoraWeights(a, b * scaling)
        if not weights:
            raise AdapterError(f"{path}: the adapter holds no LoRA tensors")
        return cls(path, rank, weights)


def _read_config(path: Path) -> dict:
    file = path / "adapter_config.json"
    if not file.is_file():
        raise AdapterError(f"{path}: no adapter_config.json (a PEFT adapter folder, as save_pretrained writes it)")
    try:
        config = json.loads(file.read_text())
    except ValueError as e:
        raise AdapterError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{file}: not a JSON object")
    refusals = [
        (config.get("peft_type", "LORA") != "LORA", f"peft_type {config.get('peft_type')!r} (only LORA)"),
        (bool(config.get("use_dora")), "DoRA (use_dora)"),
        (bool(config.get("modules_to_save")), f"modules_to_save {config.get('modules_to_save')} (new or retrained "
                                               "whole modules, such as embeddings)"),
        (config.get("bias", "none") != "none", f"trained biases (bias {config.get('bias')!r})"),
        (bool(config.get("rank_pattern")) or bool(config.get("alpha_pattern")), "per-module rank_pattern or "
                                                                               "alpha_pattern"),
        (bool(config.get("fan_in_fan_out")), "fan_in_fan_out (GPT-2 style Conv1D layers)"),
        (not isinstance(config.get("r"), int) or config["r"] < 1, f"rank r={config.get('r')!r}"),
    ]
    for refused, what in refusals:
        if refused:
            raise AdapterError(f"{path}: {what} is not supported")
    return config


class MergedCheckpoint:
    """A base checkpoint with one adapter folded into its weights, read exactly as the base is: by name,
    whole or one rank's slice. So every tensor-parallel rank merges only its own slice."""

    def __init__(self, base: SafetensorsCheckpoint, adapter: LoraAdapter):
        for name, lora in adapter.weights.items():
            if name not in base.names():
                raise AdapterError(f"{adapter.path}: adapts {name}, which the base model does not have")
            expected = (lora.b.shape[0], lora.a.shape[1])
            if base.shape(name) != expected:
                raise AdapterError(f"{adapter.path}: {name} is {base.shape(name)} in the base model but the adapter "
                                   f"was trained on {expected}: an adapter for another base")
        self.base, self.adapter = base, adapter

    def names(self) -> list[str]:
        return self.base.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        weight = self.base.read(name, dim, start, stop)
        lora = self.adapter.weights.get(name)
        if lora is None:
            return weight
        a, b = lora.a, lora.b
        if dim == 0:
            b = b[start:stop]
        elif dim == 1:
            a = a[:, start:stop]
        return (weight.float() + b @ a).to(weight.dtype)  # W + scaling * B @ A, as merge_and_unload computes


class LoraContext:
    """What every LoRA layer reads in one step: which resident adapter each token uses."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype  # the stacks'
        self.token_slots: torch.Tensor | None = None  # [num_tokens] int64, -1: the base; None: no adapter
        self.active = 0  # slots 0 .. active-1 are in use this step
        self._onehot: torch.Tensor | None = None
        self._masks: dict[tuple[int, int], torch.Tensor] = {}  # (slots, columns per slot) -> mask, this step

    def set(self, token_slots: torch.Tensor | None, active: int) -> None:
        self.token_slots, self.active = token_slots, active
        self._onehot = None
        self._masks.clear()

    @property
    def onehot(self) -> torch.Tensor:
        """[num_tokens, active slots] in the stacks' dtype, made at first use in a step (LoraStack's; the CPU
        kernel reads token_slots). Only slots 0 .. active-1 are computed: slots are handed out lowest first,
        so a step with one adapter pays for one."""
        if self._onehot is None:
            self._onehot = F.one_hot(self.token_slots + 1, self.active + 1)[:, 1:].to(self.dtype)
        return self._onehot

    def mask(self, rows: int, slots: int, width: int) -> torch.Tensor:
        """[rows, slots * width]: each token's one-hot spread over its slot's `width` columns, over `slots`
        slots (at least the active ones), zero in the rows past the step's tokens (a packed matmul's padding)."""
        mask = self._masks.get((slots, width))
        if mask is None:
            onehot = self.onehot
            onehot = F.pad(onehot, (0, slots - onehot.shape[1], 0, rows - onehot.shape[0]))
            mask = self._masks[(slots, width)] = onehot.repeat_interleave(width, dim=1)
        return mask


class LoraStack:
    """The resident adapters' A and B for one linear layer, stacked so that one step's LoRA delta is two
    matmuls over the whole flat batch, whatever mix of adapters and base requests it holds (on GPU, and on a
    CPU where SegmentedLoraStack's kernel cannot run):

        delta = ((x @ A^T) * (one-hot of each token's slot, spread over its columns)) @ B^T

    Columns are (slot, part, rank) in that order: a fused layer (q/k/v, gate/up) has a block per part,
    its B block-diagonal over the parts' output rows. Scaling is folded into B."""

    def __init__(self, context: LoraContext, num_slots: int, rank: int, part_rows: list[tuple[int, int]],
                 in_features: int, out_features: int, dtype: torch.dtype, device: torch.device,
                 packed: bool = False):
        self.context = context
        self.num_slots, self.rank, self.part_rows = num_slots, rank, part_rows  # part -> (offset, rows) of output
        columns = num_slots * len(part_rows) * rank
        self.a = torch.zeros(columns, in_features, dtype=dtype, device=device)  # [slots * parts * rank, in]
        self.b = torch.zeros(out_features, columns, dtype=dtype, device=device)  # [out, slots * parts * rank]
        self.packed = packed  # on CPU, as the base layer's weight: the delta runs through oneDNN too
        self._packed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slots -> packed A and B of 0 .. slots-1

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.context.token_slots is None:
            return y
        onehot = self.context.onehot
        if self.packed:
            return self._add_packed(y, x)
        columns = onehot.shape[1] * len(self.part_rows) * self.rank  # the active slots' columns lead
        xa = x @ self.a[:columns].T  # [tokens, active slots * parts * rank]
        xa.view(x.shape[0], onehot.shape[1], -1).mul_(onehot.unsqueeze(-1))  # keep each token's own slot
        return y.addmm_(xa, self.b[:, :columns].T)  # in place: at decode sizes these matmuls are overhead-bound

    def _add_packed(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The delta as two oneDNN matmuls over weights packed as the base layer's are (see parallel.Linear),
        the mask fused into the first and the add into the second: at decode sizes each call is overhead-bound,
        and MKL's GEMM costs 2-3x oneDNN's there. x: [rows, in] and y: [rows, out], padded as the base matmul's."""
        slots = self.context.onehot.shape[1]
        slots = min(1 << (slots - 1).bit_length(), self.num_slots)  # 1, 2, 4, ...: few packed copies
        a, b = self._packed_stacks(slots)
        width = len(self.part_rows) * self.rank
        mask = self.context.mask(x.shape[0], slots, width)  # [rows, slots * width]
        xa = torch.ops.mkldnn._linear_pointwise.binary(x, mask, a, None, "mul")  # (x @ A^T) * mask
        return torch.ops.mkldnn._linear_pointwise.binary(xa, y, b, None, "add")  # xa @ B^T + y

    def _packed_stacks(self, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B of slots 0 .. slots-1, packed for oneDNN; packed again after a slot changes."""
        stacks = self._packed.get(slots)
        if stacks is None:
            from .parallel import Linear

            columns = slots * len(self.part_rows) * self.rank
            pack = Linear.pack_weight
            stacks = self._packed[slots] = (pack(self.a[:columns]), pack(self.b[:, :columns].contiguous()))
        return stacks

    def clear(self, slot: int) -> None:
        width = len(self.part_rows) * self.rank
        self.a[slot * width : (slot + 1) * width].zero_()
        self.b[:, slot * width : (slot + 1) * width].zero_()
        self._packed.clear()

    def set(self, slot: int, part: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """a: [r, in] and b: [rows of the part, r] (this rank's slices), r <= rank."""
        r = a.shape[0]
        start = (slot * len(self.part_rows) + part) * self.rank
        offset, rows = self.part_rows[part]
        self.a[start : start + r].copy_(a)
        self.b[offset : offset + rows, start : start + r].copy_(b)
        self._packed.clear()


class SegmentedLoraStack:
    """The resident adapters' A and B for one linear layer on CPU, for llamaserve's LoRA kernel
    (cpu_kernels.LoraDelta): one call a step adds each token's delta from its own slot alone, skipping base
    tokens and the other parts' rows, where LoraStack computes every active slot for every token and
    multiplies B's block-diagonal zeros. Transposed, B in the kernel's blocks; scaling folded into B. The
    rank is padded to a multiple of 16 (the kernel's vectors), with zeros."""

    def __init__(self, context: LoraContext, kernel: LoraDelta, num_slots: int, rank: int,
                 part_rows: list[tuple[int, int]], in_features: int, out_features: int, dtype: torch.dtype):
        self.context, self.kernel = context, kernel
        rank = -(-rank // 16) * 16
        self.part_rows = torch.tensor(part_rows, dtype=torch.int64)  # [parts, 2]: (offset, rows) of output
        rows16 = [-(-rows // 16) * 16 for _, rows in part_rows]
        self._runs = [(rank * sum(rows16[:p]), rows) for p, rows in enumerate(rows16)]  # part -> (start, rows16) in b
        self.a = torch.zeros(num_slots, len(part_rows), in_features, rank, dtype=dtype)  # [slots, parts, in, rank]
        self.b = torch.zeros(num_slots, rank * sum(rows16), dtype=dtype)  # [slots, rank * rows16], in blocks

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.context.token_slots is None:
            return y
        return self.kernel.add(y, x, self.context.token_slots, self.a, self.b, self.part_rows)

    def clear(self, slot: int) -> None:
        self.a[slot].zero_()
        self.b[slot].zero_()

    def set(self, slot: int, part: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """a: [r, in] and b: [rows of the part, r] (this rank's slices), r <= rank."""
        r, rows = a.shape[0], b.shape[0]
        start, rows16 = self._runs[part]
        self.a[slot, part, :, :r].copy_(a.T)
        bt = torch.zeros(self.a.shape[-1], rows16, dtype=self.b.dtype)  # [rank, rows16]
        bt[:r, :rows] = b.T
        self.b[slot, start : start + bt.numel()].copy_(self.kernel.pack_b(bt))


class LoraManager:
    """Adapter slots on one rank's model: every linear projection of every decoder layer gets a stack (a
    SegmentedLoraStack on `kernel` where it serves the layer, else a LoraStack), and `load(slot, adapter)`
    writes this rank's slices of an adapter into a slot."""

    def __init__(self, model, num_slots: int, max_rank: int, kernel: LoraDelta | None = None):
        from .parallel import ColumnParallelLinear, RowParallelLinear

        self.model, self.num_slots, self.max_rank = model, num_slots, max_rank
        self._cache: dict[str, LoraAdapter] = {}  # path -> adapter read from it
        self._stacks = {name: module for name, module in model.named_modules()
                        if isinstance(module, (ColumnParallelLinear, RowParallelLinear))}
        self.context = LoraContext(next(iter(self._stacks.values())).weight.dtype)
        for module in self._stacks.values():
            weight = module.weight  # packed on CPU, but its dtype and device are the layer's
            if isinstance(module, ColumnParallelLinear):
                offsets = [sum(module.part_sizes[:i]) for i in range(len(module.part_sizes))]
                part_rows = list(zip(offsets, module.part_sizes))
            else:
                part_rows = [(0, module.shape[0])]
            out_features, in_features = module.shape
            if kernel is not None and weight.device.type == "cpu" and weight.dtype in LoraDelta.DTYPES:
                module.lora = SegmentedLoraStack(self.context, kernel, num_slots, max_rank, part_rows, in_features,
                                                 out_features, weight.dtype)
            else:
                module.lora = LoraStack(self.context, num_slots, max_rank, part_rows, in_features, out_features,
                                        weight.dtype, weight.device, module.packed)

    def adapter(self, path: str) -> LoraAdapter:
        if path not in self._cache:
            self._cache[path] = LoraAdapter.load(path)
        return self._cache[path]

    def forget(self, path: str) -> None:
        """Drop an unloaded adapter's weights from the host (tensor-parallel workers keep theirs)."""
        self._cache.pop(path, None)

    def check(self, adapter: LoraAdapter) -> None:
        """Raises AdapterError unless the adapter fits this model and the slots' rank."""
        if adapter.rank > self.max_rank:
            raise AdapterError(f"{adapter.path}: rank {adapter.rank} exceeds --max-lora-rank {self.max_rank}")
        for name, lora in adapter.weights.items():
            module, part = self.model.target(name)
            if module not in self._stacks:
                raise AdapterError(f"{adapter.path}: adapts {name}, which the base model does not have")
            expected = self._stacks[module].checkpoint_shape(part)
            if (lora.b.shape[0], lora.a.shape[1]) != tuple(expected):
                raise AdapterError(f"{adapter.path}: {name} is {tuple(expected)} in the base model but the adapter "
                                   f"was trained on {(lora.b.shape[0], lora.a.shape[1])}: an adapter for another base")

    def load(self, slot: int, adapter: LoraAdapter) -> None:
        for module in self._stacks.values():
            module.lora.clear(slot)
        for name, lora in adapter.weights.items():
            module_name, part = self.model.target(name)
            module = self._stacks[module_name]
            a, b = lora.a, lora.b
            if part is None:  # row-parallel: this rank's input columns
                a = a[:, module.columns[0] : module.columns[1]]
                index = 0
            else:  # column-parallel part: this rank's output rows of it
                start, stop = module.slices[part]
                b = b[start:stop]
                index = list(module.slices).index(part)
            dtype = module.lora.a.dtype
            module.lora.set(slot, index, a.to(dtype), b.to(dtype))

    def set_step(self, token_slots: torch.Tensor | None, active: int = 0) -> None:
        """token_slots: [num_tokens] long, each token's slot or -1 for the base model, all below `active`
        (known on the host, so no device sync); None: no adapter in the step."""
        self.context.set(None if token_slots is None else token_slots.to(torch.int64).contiguous(), active)
