"""Weight-only quantized linear weights, run through torch's own kernels (no extension to build).

- int8: one scale per output row (symmetric, q in -127..127): w = q * scale. `torch._weight_int8pack_mm`
  takes float32 or bfloat16 activations with the int8 weight as it is.
- On CPU both run with bfloat16 activations (and scales), whatever the model's dtype: their float32 paths
  are scalar loops, 6-85x slower than oneDNN's packed float32 matmul (bench/RESULTS.md), the bfloat16
  ones vectorised. A float32 model casts a quantized layer's input to bfloat16 and its output back.
- int4: groups of `group_size` consecutive input features, each with a scale and a minimum (asymmetric,
  q in 0..15): w = q * scale + min. On CPU `_convert_weight_to_int4pack_for_cpu` packs two codes a byte
  and `_weight_int4pack_mm_for_cpu` multiplies (float32 or bfloat16 activations); on CUDA the tinygemm
  pair `_convert_weight_to_int4pack` / `_weight_int4pack_mm` (bfloat16 activations). Both kernels take
  (scale, zero) per group with w = (q - 8) * scale + zero, so zero = min + 8 * scale.

GGUF's Q4_0 (w = d * (q - 8)) and Q4_1 (w = d * q + m) blocks of 32 are exactly this int4 form with
group 32 (`GroupCodes`); llamaserve.model.gguf reads them into it. Measured on this project's CPU
(bench/quant_kernels.py, bench/RESULTS.md) before choosing these kernels over `_dyn_quant_matmul_4bit`,
which also quantizes the activations and, without KleidiAI (Arm), runs a slow reference loop.

On CPUs with AVX-512 BF16, int4 runs llamaserve's own kernel instead (`Int4KernelWeight`, cpu_kernels.Int4Gemm):
the same codes, scales and minimums, read at up to 3x the speed of torch's int4 CPU kernel at decode sizes.

The CUDA paths are written from the kernels' documented contracts and are not tested on this project's
CPU-only machines; int8 on CUDA multiplies by the weight cast to the activations' dtype (correct, not fast).
"""

from dataclasses import dataclass

import torch

from ..config import INT4_GROUP_SIZES
from .cpu_kernels import CpuKernels, Int4Gemm, Int8Gemm


def kernel_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The activations' dtype the quantized kernels run in on `device` for a model in `dtype`."""
    return torch.bfloat16 if device.type == "cpu" else dtype


@dataclass
class GroupCodes:
    """4-bit weights before packing: w = q * scale + min, per group of `group_size` input features."""

    q: torch.Tensor  # [out, in] uint8 in 0..15
    scales: torch.Tensor  # [out, in / group_size] float32
    mins: torch.Tensor  # [out, in / group_size] float32
    group_size: int

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int) -> "GroupCodes":
        """Round-to-nearest over each group's [min, max] (what GGUF's Q4_1 does, and torchao's int4)."""
        out_features, in_features = weight.shape
        if in_features % group_size:
            raise ValueError(f"int4 group size {group_size} does not divide {in_features} input features")
        groups = weight.float().view(out_features, in_features // group_size, group_size)
        low, high = groups.amin(-1), groups.amax(-1)  # [out, groups]
        scales = ((high - low) / 15).clamp_min(torch.finfo(torch.float32).tiny)
        q = ((groups - low.unsqueeze(-1)) / scales.unsqueeze(-1)).round_().clamp_(0, 15)
        return cls(q.to(torch.uint8).view(out_features, in_features), scales, low, group_size)

    def dequantize(self) -> torch.Tensor:  # [out, in] float32
        out_features, in_features = self.q.shape
        q = self.q.float().view(out_features, -1, self.group_size)
        return (q * self.scales.unsqueeze(-1) + self.mins.unsqueeze(-1)).view(out_features, in_features)


class Int8Weight:
    """int8 per output row: y = (x @ q^T) * scales. `matmul` takes and returns the model's dtype."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor):
        self.q = q  # [out, in] int8
        self.scales = scales  # [out] in the kernel's activation dtype
        self.shape = tuple(q.shape)

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype: torch.dtype) -> "Int8Weight":
        w = weight.float()
        scales = (w.abs().amax(1) / 127).clamp_min(torch.finfo(torch.float32).tiny)  # [out]
        q = (w / scales.unsqueeze(1)).round_().clamp_(-127, 127).to(torch.int8)
        return cls(q.contiguous(), scales.to(kernel_dtype(dtype, weight.device)))

    def dequantize(self) -> torch.Tensor:  # [out, in] float32, with the scales the kernel uses
        return self.q.float() * self.scales.float().unsqueeze(1)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # [n, in] -> [n, out]
        xq = x.to(self.scales.dtype).contiguous()
        if x.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(xq, self.q, self.scales)
        else:
            y = torch.nn.functional.linear(xq, self.q.to(xq.dtype)) * self.scales
        return y.to(x.dtype)


class Int4Weight:
    """int4 group-wise, packed for the device's kernel."""

    def __init__(self, packed: torch.Tensor, scale_zeros: torch.Tensor, group_size: int, shape: tuple[int, int]):
        self.packed = packed  # CPU: [out, in / 2] uint8; CUDA: tinygemm's int32 tiles
        self.scale_zeros = scale_zeros  # [in / group_size, out, 2] (scale, zero) in the activations' dtype
        self.group_size = group_size
        self.shape = shape  # (out, in)

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int) -> "Int4Weight":
        return cls.from_codes(GroupCodes.from_float(weight, group_size), weight.device)

    @classmethod
    def from_codes(cls, codes: GroupCodes, device: torch.device | str) -> "Int4Weight":
        """Packed for `device`'s kernel, with bfloat16 scales and activations on every device (tinygemm's only
        dtype on CUDA; on CPU the vectorised one)."""
        if codes.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES}, not {codes.group_size}")
        device = torch.device(device)
        zeros = codes.mins + 8 * codes.scales  # the kernels dequantize (q - 8) * scale + zero
        scale_zeros = torch.stack([codes.scales, zeros], -1).transpose(0, 1).contiguous()  # [groups, out, 2]
        q = codes.q.to(device)
        if device.type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        else:  # tinygemm: two codes a byte, the even one in the high nibble; tiles of 16 * inner_k input features
            inner_k = next(k for k in (8, 4, 2) if q.shape[1] % (16 * k) == 0)
            packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).contiguous(), inner_k)
        return cls(packed, scale_zeros.to(device, torch.bfloat16), codes.group_size, tuple(codes.q.shape))

    def dequantize(self, codes: GroupCodes) -> torch.Tensor:  # [out, in] float32, as the kernel sees `codes`
        """`codes` dequantized with this weight's (rounded) scales and zeros: the reference tests compare to."""
        scales, zeros = self.scale_zeros.float().cpu().transpose(0, 1).unbind(-1)  # [out, groups] each
        q = codes.q.float().view(*self.shape[:1], -1, self.group_size)
        return ((q - 8) * scales.unsqueeze(-1) + zeros.unsqueeze(-1)).view(self.shape)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # [n, in] -> [n, out]
        xq = x.to(self.scale_zeros.dtype).contiguous()
        if x.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xq, self.packed, self.group_size, self.scale_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm(xq, self.packed, self.group_size, self.scale_zeros)
        return y.to(x.dtype)



class Int4KernelWeight:
    """int4 group-wise in llamaserve's CPU kernel's layout (csrc/gemm_int4.c): w = q * scale + min with bfloat16
    scales and minimums, bfloat16 activations. `matmul` takes and returns the model's dtype."""

    def __init__(self, gemm: Int4Gemm, codes: GroupCodes):
        self.gemm, self.group_size, self.shape = gemm, codes.group_size, tuple(codes.q.shape)
        self.codes, self.params = gemm.pack(codes.q, codes.scales, codes.mins, codes.group_size)

    def dequantize(self, codes: GroupCodes) -> torch.Tensor:  # [out, in] float32, as the kernel sees `codes`
        scales, mins = codes.scales.bfloat16().float(), codes.mins.bfloat16().float()
        q = codes.q.float().view(*self.shape[:1], -1, self.group_size)
        return (q * scales.unsqueeze(-1) + mins.unsqueeze(-1)).view(self.shape)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # [n, in] -> [n, out]
        y = self.gemm.matmul(x, self.codes, self.params, self.shape, self.group_size)
        return y if y.dtype == x.dtype else y.to(x.dtype)


class Int8KernelWeight:
    """int8 per output row in llamaserve's CPU kernel's layout (csrc/gemm_int8.c), with Int8Weight's codes and
    scales. `matmul` takes and returns the model's dtype."""

    def __init__(self, gemm: Int8Gemm, weight: Int8Weight):
        self.gemm, self.shape = gemm, weight.shape
        self.codes = gemm.pack(weight.q)  # int8, blocks of 64 rows stored by input pair
        self.scales = weight.scales.float()  # [out]: the rounded scales Int8Weight's kernel uses

    def dequantize(self) -> torch.Tensor:  # [out, in] float32, as the kernel sees the weight
        return self.gemm.unpack(self.codes, self.shape).float() * self.scales.unsqueeze(1)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # [n, in] -> [n, out]
        y = self.gemm.matmul(x, self.codes, self.scales, self.shape)
        return y if y.dtype == x.dtype else y.to(x.dtype)


def quantized_weight(kind: str, weight: torch.Tensor | None, codes: GroupCodes | None, group_size: int,
                     kernels: CpuKernels | None = None):
    """A layer's weight in `kind` ("int8" or "int4"), from its 4-bit `codes` when it loaded some, else from its
    float `weight`, on the fastest kernel that serves it on the weight's device: llamaserve's CPU kernels (of
    `kernels`) where they take its shape, else torch's."""
    device = weight.device if codes is None else codes.q.device
    on_cpu = kernels is not None and torch.device(device).type == "cpu"
    if kind == "int8" and codes is None:
        int8 = Int8Weight.quantize(weight, weight.dtype)
        if on_cpu and kernels.int8 is not None and kernels.int8.supports(int8.shape):
            return Int8KernelWeight(kernels.int8, int8)
        return int8
    codes = codes if codes is not None else GroupCodes.from_float(weight, group_size)
    if on_cpu and kernels.int4 is not None and kernels.int4.supports(tuple(codes.q.shape), codes.group_size):
        return Int4KernelWeight(kernels.int4, codes)
    return Int4Weight.from_codes(codes, device)
