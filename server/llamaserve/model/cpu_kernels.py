"""llamaserve's own CPU kernels: C with AVX-512 intrinsics (csrc/), built by the system's C compiler on first use.

Each source compiles into `cache_dir/kernels/<key>/`, the key hashing the source (with the headers of csrc/), the
flags and the compiler's version (cpu_kernels.BUILDS says how each builds), so a changed kernel or compiler
builds again and a second process (another tensor-parallel rank, the next server) loads the built library.
Building takes about a second; the library is loaded with ctypes (no torch headers, no build step at install).
Where a kernel cannot run (no compiler, a CPU without the instructions, a build error) `bf16_gemm`, `int8_gemm`,
`int4_gemm`, `paged_attention`, `layer_ops`, `decoder_layers` and `lora_delta` return None, log why once, and the
layers keep torch's kernels (oneDNN, torch's int8 and int4 CPU kernels, the torch attention backend, torch's
elementwise operators, a call per kernel, LoRA's one-hot matmuls).

The libraries link libgomp.so.1, which the dynamic loader resolves to the copy torch has already loaded:
their OpenMP loops run on torch's own threads, `torch.get_num_threads()` of them.
"""

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = Path(__file__).with_name("csrc")
BF16_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fopenmp", "-fPIC",
              "-shared"]
BF16_CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}  # as /proc/cpuinfo spells them
LORA_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-fopenmp", "-fPIC", "-shared"]
LORA_CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl"}


@dataclass(frozen=True)
class Build:
    """How a csrc/ source compiles, and what the CPU needs to run it."""

    flags: list[str]
    cpu: set[str]
    libs: tuple[str, ...] = ()


BUILDS = {
    "gemm_bf16.c": Build(BF16_FLAGS, BF16_CPU_FLAGS),
    "gemm_int8.c": Build(BF16_FLAGS + ["-mavx512vnni"], BF16_CPU_FLAGS | {"avx512_vnni"}, ("-lm",)),
    "gemm_int4.c": Build(BF16_FLAGS, BF16_CPU_FLAGS),
    "attention.c": Build(BF16_FLAGS, BF16_CPU_FLAGS, ("-lm",)),
    "layer_ops.c": Build(BF16_FLAGS, BF16_CPU_FLAGS, ("-lm",)),
    "lora.c": Build(LORA_FLAGS, LORA_CPU_FLAGS),
    "decoder.c": Build(["-O2", "-fopenmp", "-fPIC", "-shared"], BF16_CPU_FLAGS),
}


class KernelUnavailable(RuntimeError):
    """Why a kernel cannot run on this machine."""


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def build(source: str, flags: list[str], cache_dir: Path, libs: tuple[str, ...] = ()) -> ctypes.CDLL:
    """csrc/`source` compiled with `flags` and linked with `libs` (once per cache key), and loaded."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise KernelUnavailable("no C compiler (cc or gcc) on PATH")
    # The headers every source may include (csrc/*.h) are part of its key: a changed header rebuilds.
    text = b"".join(path.read_bytes() for path in [SOURCES / source, *sorted(SOURCES.glob("*.h"))])
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(text + repr((flags, libs)).encode() + version.encode()).hexdigest()[:16]
    library = cache_dir / "kernels" / key / (Path(source).stem + ".so")
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        partial = library.with_suffix(f".{os.getpid()}.tmp")  # ranks building at once each rename a whole file
        result = subprocess.run([compiler, *flags, str(SOURCES / source), *libs, "-o", str(partial)],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            raise KernelUnavailable(f"{compiler} failed on {source}: {result.stderr.strip()[-2000:]}")
        os.replace(partial, library)
        log.info("built %s into %s", source, library)
    return ctypes.CDLL(str(library))


class Bf16Gemm:
    """y = x @ W^T for bfloat16 weights held in this kernel's packed layout (csrc/gemm_bf16.c): twice oneDNN's
    speed at one row of x on this project's EPYC, where a decode step at batch 1 is bound by reading weights."""

    def __init__(self, lib: ctypes.CDLL):
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.pack_bf16.argtypes = lib.unpack_bf16.argtypes = [ptr, ptr, i64, i64]
        lib.gemm_bf16.argtypes = [ptr, i64, ptr, ptr, i64, i64, i64, ctypes.c_int]
        lib.pack_bf16.restype = lib.unpack_bf16.restype = lib.gemm_bf16.restype = None
        self.lib = lib

    @staticmethod
    def supports(weight: torch.Tensor) -> bool:
        """Whether this kernel serves `weight` ([out, in]): bfloat16 on CPU, out % 16 == 0 and in even."""
        return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.dim() == 2
                and weight.shape[0] % 16 == 0 and weight.shape[1] % 2 == 0)

    def pack(self, weight: torch.Tensor) -> torch.Tensor:  # [out, in] -> [out, in] in the kernel's layout
        weight = weight.detach().contiguous()
        packed = torch.empty_like(weight)
        self.lib.pack_bf16(weight.data_ptr(), packed.data_ptr(), *weight.shape)
        return packed

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:  # the inverse of `pack`
        weight = torch.empty_like(packed)
        self.lib.unpack_bf16(packed.data_ptr(), weight.data_ptr(), *packed.shape)
        return weight

    def matmul(self, x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:  # [m, in] @ [out, in]^T -> [m, out]
        if x.dtype != torch.bfloat16 or x.stride(-1) != 1:
            x = x.to(torch.bfloat16).contiguous()
        (m, k), n = x.shape, packed.shape[0]
        y = torch.empty(m, n, dtype=torch.bfloat16)
        self.lib.gemm_bf16(x.data_ptr(), x.stride(0), packed.data_ptr(), y.data_ptr(), m, n, k,
                           torch.get_num_threads())
        return y


class Int4Gemm:
    """y = x @ W^T for 4-bit group-wise weights (w = q * scale + min) in this kernel's layout (csrc/gemm_int4.c),
    bfloat16 activations: reads the codes at up to 3x the speed of torch's int4 CPU kernel at decode sizes."""

    def __init__(self, lib: ctypes.CDLL):
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.pack_int4.argtypes = [ptr] * 5 + [i64] * 3
        lib.gemm_int4.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int]
        lib.pack_int4.restype = lib.gemm_int4.restype = None
        self.lib = lib

    @staticmethod
    def supports(shape: tuple[int, int], group_size: int) -> bool:
        return shape[0] % 16 == 0 and group_size % 2 == 0 and shape[1] % group_size == 0

    def pack(self, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
             group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q [out, in] codes 0..15, scales and mins [out, in / group_size] -> (codes [blocks of 64 outputs * 32 * in]
        uint8, bfloat16 scales and minimums [out * in / group_size * 2]) in the kernel's layout."""
        (n, k), groups = q.shape, q.shape[1] // group_size
        q, scales, mins = q.to(torch.uint8).contiguous(), scales.float().contiguous(), mins.float().contiguous()
        codes = torch.zeros(-(-n // 64) * 32 * k, dtype=torch.uint8)
        params = torch.empty(n * groups * 2, dtype=torch.bfloat16)
        self.lib.pack_int4(q.data_ptr(), scales.data_ptr(), mins.data_ptr(), codes.data_ptr(), params.data_ptr(),
                           n, k, group_size)
        return codes, params

    def matmul(self, x: torch.Tensor, codes: torch.Tensor, params: torch.Tensor, shape: tuple[int, int],
               group_size: int) -> torch.Tensor:  # [m, in] -> [m, out] bfloat16
        if x.dtype != torch.bfloat16 or x.stride(-1) != 1:
            x = x.to(torch.bfloat16).contiguous()
        (n, k), m = shape, x.shape[0]
        y = torch.empty(m, n, dtype=torch.bfloat16)
        sums = torch.empty(m, k // group_size)  # each row's sum over each group, float32
        self.lib.gemm_int4(x.data_ptr(), x.stride(0), codes.data_ptr(), params.data_ptr(), y.data_ptr(),
                           sums.data_ptr(), m, n, k, group_size, torch.get_num_threads())
        return y


class Int8Gemm:
    """y = (x @ q^T) * scales for int8 weights with a scale per output row, in this kernel's layout
    (csrc/gemm_int8.c), bfloat16 activations rounded to int16 in groups for VNNI's exact integer products:
    twice the speed of torch's `_weight_int8pack_mm` at one row."""

    def __init__(self, lib: ctypes.CDLL):
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.pack_int8.argtypes = lib.unpack_int8.argtypes = [ptr, ptr, i64, i64]
        lib.int8_scratch_bytes.argtypes = [i64, i64]
        lib.int8_scratch_bytes.restype = i64
        lib.gemm_int8.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
        lib.pack_int8.restype = lib.unpack_int8.restype = lib.gemm_int8.restype = None
        self.lib = lib

    @staticmethod
    def supports(shape: tuple[int, int]) -> bool:
        return shape[0] % 16 == 0

    def pack(self, q: torch.Tensor) -> torch.Tensor:  # [out, in] int8 -> codes [out * in rounded up to even]
        q = q.contiguous()
        n, k = q.shape
        codes = torch.empty(n * (k + k % 2), dtype=torch.int8)
        self.lib.pack_int8(q.data_ptr(), codes.data_ptr(), n, k)
        return codes

    def unpack(self, codes: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:  # the inverse of `pack`
        q = torch.empty(shape, dtype=torch.int8)
        self.lib.unpack_int8(codes.data_ptr(), q.data_ptr(), *shape)
        return q

    def matmul(self, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
               shape: tuple[int, int]) -> torch.Tensor:
        """x [m, in] -> [m, out] bfloat16; scales [out] float32."""
        if x.dtype != torch.bfloat16 or x.stride(-1) != 1:
            x = x.to(torch.bfloat16).contiguous()
        (n, k), m = shape, x.shape[0]
        y = torch.empty(m, n, dtype=torch.bfloat16)
        rounded = torch.empty(-(-self.lib.int8_scratch_bytes(m, k) // 4), dtype=torch.int32)  # x in int16, in groups
        self.lib.gemm_int8(x.data_ptr(), x.stride(0), codes.data_ptr(), scales.data_ptr(), y.data_ptr(),
                           rounded.data_ptr(), m, n, k, torch.get_num_threads())
        return y


@functools.cache
def int8_gemm(cache_dir: Path) -> Int8Gemm | None:
    """The int8 matmul kernel, built on first use; None (logged once) where it cannot run here."""
    return _load(Int8Gemm, "gemm_int8.c", "int8 layers", cache_dir)


class PagedAttention:
    """Decode tokens' attention over the paged KV cache, and the step's cache writes (csrc/attention.c), for
    model/attention.py's CpuAttentionBackend."""

    MAX_GROUP, MAX_HEAD_DIM = 8, 256  # query heads per KV head, and head_dim, the kernel holds in its registers

    def __init__(self, lib: ctypes.CDLL):
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.write_kv.argtypes = [ptr, i64, ptr, i64, ptr, i64, ptr, ptr, i64, i64, ctypes.c_int]
        lib.decode_attention.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, i64, ptr, i64, ptr, i64, i64, i64, i64,
                                         ctypes.c_float, ctypes.c_int, ctypes.c_int]
        lib.write_kv.restype = lib.decode_attention.restype = None
        self.lib = lib

    @classmethod
    def supports(cls, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
        return (dtype in (torch.float32, torch.bfloat16) and head_dim % 16 == 0 and head_dim <= cls.MAX_HEAD_DIM
                and num_heads % num_kv_heads == 0 and num_heads // num_kv_heads <= cls.MAX_GROUP)

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
                 cache: tuple[torch.Tensor, torch.Tensor]) -> None:
        """k, v: [tokens, kv_heads, head_dim] (rows may be strided) into their `slots` of the (K, V) cache."""
        _, _, kv_heads, head_dim = cache[0].shape
        bf16 = int(cache[0].dtype == torch.bfloat16)
        self.lib.write_kv(k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), slots.data_ptr(), slots.numel(),
                          cache[0].data_ptr(), cache[1].data_ptr(), kv_heads, head_dim, bf16)

    def decode(self, q: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor], tokens: torch.Tensor,
               tables: torch.Tensor, seq_lens: torch.Tensor, out: torch.Tensor) -> None:
        """out[tokens[s]] ([tokens, heads * head_dim], contiguous) = sequence s's query token q[tokens[s]]
        ([tokens, heads, head_dim], rows may be strided) attending over its seq_lens[s] cached tokens, whose
        blocks are tables[s] ([seqs, max_blocks] int64, contiguous)."""
        _, block_size, kv_heads, head_dim = cache[0].shape
        heads = q.shape[1]
        self.lib.decode_attention(q.data_ptr(), q.stride(0), cache[0].data_ptr(), cache[1].data_ptr(),
                                  tokens.data_ptr(), tables.data_ptr(), tables.shape[1], seq_lens.data_ptr(),
                                  tokens.numel(), out.data_ptr(), block_size, heads, kv_heads, head_dim,
                                  head_dim**-0.5, int(cache[0].dtype == torch.bfloat16), torch.get_num_threads())


@functools.cache
def paged_attention(cache_dir: Path) -> PagedAttention | None:
    """The CPU decode attention kernel, built on first use; None (logged once) where it cannot run here."""
    return _load(PagedAttention, "attention.c", "attention", cache_dir)


def _load(kernel: type, source: str, what: str, cache_dir: Path, fallback: str = "torch's kernels"):
    """`kernel` (a wrapper class) over csrc/`source` built for this machine (BUILDS[source]), or None, logged
    once, where it cannot run here (`what` names the layers that then run on `fallback`)."""
    how = BUILDS[source]
    try:
        _check_cpu(how.cpu)
        return kernel(build(source, how.flags, Path(cache_dir), how.libs))
    except (KernelUnavailable, OSError, subprocess.SubprocessError) as e:
        log.info("%s run on %s: llamaserve's own kernel is unavailable here (%s)", what, fallback, e)
        return None


@functools.cache
def int4_gemm(cache_dir: Path) -> Int4Gemm | None:
    """The int4 matmul kernel, built on first use; None (logged once) where it cannot run here."""
    return _load(Int4Gemm, "gemm_int4.c", "int4 layers", cache_dir)


def _check_cpu(flags: set[str]) -> None:
    missing = flags - cpu_flags()
    if missing:
        raise KernelUnavailable(f"the CPU lacks {', '.join(sorted(missing))}")


@functools.cache
def bf16_gemm(cache_dir: Path) -> Bf16Gemm | None:
    """The bfloat16 matmul kernel, built on first use; None (logged once) where it cannot run here."""
    return _load(Bf16Gemm, "gemm_bf16.c", "bfloat16 linear layers", cache_dir)


class LayerOps:
    """A decoder layer's elementwise steps fused (csrc/layer_ops.c), in float32 or bfloat16 with the roundings
    of the torch operators they replace: the residual add with the RMSNorm after it, SiLU(gate) * up, and
    rotary embedding of q and k in place."""

    def __init__(self, lib: ctypes.CDLL):
        i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.add_rms_norm.argtypes = [ptr, ptr, ptr, ptr, i64, i64, ctypes.c_float, i32, i32]
        lib.silu_mul.argtypes = [ptr, ptr, i64, i64, i32, i32]
        lib.rotary.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, i32, i32]
        lib.add_rms_norm.restype = lib.silu_mul.restype = lib.rotary.restype = None
        self.lib = lib

    @staticmethod
    def supports(x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.is_contiguous()

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> torch.Tensor:
        """x [rows, hidden] += delta (in place, when given), then rms_norm(x) * weight, a new tensor."""
        if delta is not None and (delta.dtype != x.dtype or not delta.is_contiguous()):
            delta = delta.to(x.dtype).contiguous()
        out = torch.empty_like(x)
        self.lib.add_rms_norm(x.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(),
                              out.data_ptr(), x.shape[0], x.shape[1], eps, int(x.dtype == torch.bfloat16),
                              torch.get_num_threads())
        return out

    def rotary(self, heads: torch.Tensor, rotated: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotate the first `rotated` heads of heads [tokens, heads, head_dim] (rows may be strided) in place;
        cos, sin: [tokens, 1, head_dim] contiguous, from model/rotary.py."""
        tokens, _, head_dim = heads.shape
        self.lib.rotary(heads.data_ptr(), tokens, heads.stride(0), rotated, head_dim, cos.data_ptr(), sin.data_ptr(),
                        int(heads.dtype == torch.bfloat16), torch.get_num_threads())

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:  # [rows, 2 * inter] -> [rows, inter]
        rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
        out = torch.empty(rows, inter, dtype=gate_up.dtype)
        self.lib.silu_mul(gate_up.data_ptr(), out.data_ptr(), rows, inter, int(gate_up.dtype == torch.bfloat16),
                          torch.get_num_threads())
        return out


@functools.cache
def layer_ops(cache_dir: Path) -> LayerOps | None:
    """The fused elementwise kernels, built on first use; None (logged once) where they cannot run here."""
    return _load(LayerOps, "layer_ops.c", "norms and activations", cache_dir)


class LoraDelta:
    """y[t] += B_s @ (A_s @ x[t]) for each token t with an adapter slot s, from that slot alone (csrc/lora.c): one
    call a projection, whatever mix of adapters and base tokens the batch holds, and a token's delta never
    depends on the tokens beside it. Stacks float32 or bfloat16, in this kernel's layout (`pack_b`), the rank a
    multiple of 16:

        a [slots, parts, in, rank]   A^T of each slot's parts (one part, or q/k/v, or gate/up)
        b [slots, rank * rows16]     B^T of each slot, in blocks of 64 output rows of a part (rows16: every
                                     part's rows, padded to a multiple of 16)"""

    DTYPES = (torch.float32, torch.bfloat16)
    BLOCK = 64  # output rows per block of b (csrc/lora.c)

    def __init__(self, lib: ctypes.CDLL):
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._functions = {torch.float32: lib.lora_delta_f32, torch.bfloat16: lib.lora_delta_bf16}
        for function in self._functions.values():
            function.argtypes = [ptr, i64, ptr, i64, ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int]
            function.restype = None

    @classmethod
    def pack_b(cls, bt: torch.Tensor) -> torch.Tensor:
        """One part's B^T ([rank, rows16], zero-padded rows) -> its run of b ([rank * rows16]): block after block
        of 64 rows (the last 16, 32 or 48), each block [rank, width] row-major."""
        rank, rows = bt.shape
        whole = rows // cls.BLOCK * cls.BLOCK
        blocks = bt[:, :whole].reshape(rank, whole // cls.BLOCK, cls.BLOCK).transpose(0, 1)
        return torch.cat([blocks.reshape(-1), bt[:, whole:].reshape(-1)])

    def add(self, y: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
            part_rows: torch.Tensor) -> torch.Tensor:
        """y [m, out] in place, for x [m, in] and slots [n] (int64, -1: the base model; m >= n, the rows past n
        untouched); part_rows [parts, 2] int64: each part's first output row and row count."""
        dtype = a.dtype
        if x.dtype != dtype or x.stride(-1) != 1:
            x = x.to(dtype).contiguous()
        assert y.dtype == dtype and y.stride(-1) == 1 and min(x.shape[0], y.shape[0]) >= slots.shape[0]
        num_slots, parts, in_features, rank = a.shape
        self._functions[dtype](x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), slots.data_ptr(),
                               slots.shape[0], a.data_ptr(), b.data_ptr(), part_rows.data_ptr(), parts, in_features,
                               rank, num_slots, torch.get_num_threads())
        return y


@functools.cache
def lora_delta(cache_dir: Path) -> LoraDelta | None:
    """The LoRA delta kernel, built on first use; None (logged once) where it cannot run here."""
    return _load(LoraDelta, "lora.c", "LoRA deltas", cache_dir)


@dataclass(frozen=True)
class LinearOperands:
    """A linear layer's weight as one of the matmul kernels above holds it (parallel.Linear.kernel_operands)."""

    kind: str  # "bf16" (Bf16Gemm), "int8" (Int8Gemm) or "int4" (Int4Gemm)
    weight: torch.Tensor  # the packed weight, or the codes
    params: torch.Tensor | None  # int8: float32 scales; int4: bfloat16 scales and minimums; bf16: None
    shape: tuple[int, int]  # (out, in)
    group_size: int = 0  # int4's


@dataclass(frozen=True)
class DecoderLayerOperands:
    """One decoder layer's weights, for DecoderLayers."""

    input_norm: torch.Tensor  # [hidden] bfloat16
    post_norm: torch.Tensor  # [hidden] bfloat16
    qkv: LinearOperands
    o: LinearOperands
    gate_up: LinearOperands
    down: LinearOperands


class _Kernels(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in (
        "gemm_bf16", "int8_prepare", "gemm_int8", "int4_prepare", "gemm_int4", "write_kv", "attention_item",
        "add_rms_norm", "silu_mul", "rotary")]


class _Linear(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int64), ("weight", ctypes.c_void_p), ("params", ctypes.c_void_p),
                ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("group", ctypes.c_int64)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("qkv", _Linear), ("o", _Linear),
                ("gate_up", _Linear), ("down", _Linear), ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p)]


class _Model(ctypes.Structure):
    _fields_ = [("fn", _Kernels), ("layers", ctypes.POINTER(_Layer))] + \
        [(name, ctypes.c_int64) for name in ("num_layers", "hidden", "heads", "kv_heads", "head_dim", "inter",
                                             "block_size", "max_k")] + \
        [("eps", ctypes.c_float), ("scale", ctypes.c_float), ("embedding", ctypes.c_void_p), ("vocab", ctypes.c_int64),
         ("final_norm", ctypes.c_void_p), ("head", _Linear)]


@dataclass(frozen=True)
class DecoderOperands:
    """A model's weights for DecoderLayers: its embedding, layers, final norm and LM head."""

    embedding: torch.Tensor  # [vocab, hidden] bfloat16
    layers: list[DecoderLayerOperands]
    final_norm: torch.Tensor  # [hidden] bfloat16
    head: LinearOperands | None  # None: the LM head is not on these kernels
    project: Callable[[torch.Tensor], torch.Tensor]  # the LM head module: [m, hidden] -> [m, vocab] logits


class DecoderLayers:
    """A decode-only step in one call (csrc/decoder.c): the embedding rows, then the kernels the layer-by-layer
    path calls one by one from Python (the matmuls, norms, rotary, cache writes and decode attention above) in
    the same order on the same values, then the final norm and the LM head, so the logits are bit-identical; at
    batch 1 their dispatch from Python cost as much as the kernels themselves. `program` binds a model's
    weights once; its `run` is one call."""

    KINDS = {"bf16": 0, "int8": 1, "int4": 2}

    def __init__(self, lib: ctypes.CDLL):
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.decoder_scratch_bytes.argtypes = [ptr, i64]
        lib.decoder_scratch_bytes.restype = ctypes.c_size_t
        lib.decode_step.argtypes = [ptr, ptr, i64, ptr, ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr, ptr, ctypes.c_int]
        lib.decode_step.restype = ctypes.c_int
        self.lib = lib

    def program(self, kernels: "CpuKernels", operands: DecoderOperands, heads: int, kv_heads: int, head_dim: int,
                eps: float) -> "DecoderProgram":
        return DecoderProgram(self.lib, kernels, operands, heads, kv_heads, head_dim, eps)


def _linear(linear: LinearOperands | None) -> _Linear:
    if linear is None:
        return _Linear()
    params = None if linear.params is None else linear.params.data_ptr()
    return _Linear(DecoderLayers.KINDS[linear.kind], linear.weight.data_ptr(), params, *linear.shape,
                   linear.group_size)


class DecoderProgram:
    """A model's weights bound to DecoderLayers' call (the tensors in `operands` must outlive it)."""

    def __init__(self, lib: ctypes.CDLL, kernels: "CpuKernels", operands: DecoderOperands, heads: int, kv_heads: int,
                 head_dim: int, eps: float):
        def address(kernel, name: str) -> int | None:
            return None if kernel is None else ctypes.cast(getattr(kernel.lib, name), ctypes.c_void_p).value

        fn = _Kernels(address(kernels.bf16, "gemm_bf16_blocks"), address(kernels.int8, "int8_prepare"),
                      address(kernels.int8, "gemm_int8_blocks"), address(kernels.int4, "int4_prepare"),
                      address(kernels.int4, "gemm_int4_blocks"), address(kernels.attention, "write_kv"),
                      address(kernels.attention, "decode_attention_item"), address(kernels.layer_ops, "add_rms_norm"),
                      address(kernels.layer_ops, "silu_mul"), address(kernels.layer_ops, "rotary"))
        layers = operands.layers
        linears = [linear for layer in layers for linear in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        for linear in linears + [operands.head] * (operands.head is not None):
            if getattr(fn, "gemm_" + linear.kind) is None:
                raise KernelUnavailable(f"no {linear.kind} matmul kernel for a {linear.shape} layer")
        self.lib, self.layers = lib, (_Layer * len(layers))()
        for struct, layer in zip(self.layers, layers):
            struct.input_norm, struct.post_norm = layer.input_norm.data_ptr(), layer.post_norm.data_ptr()
            for name in ("qkv", "o", "gate_up", "down"):
                setattr(struct, name, _linear(getattr(layer, name)))
        self.vocab, self.hidden = operands.embedding.shape
        self.head, self.project = operands.head, operands.project
        self.model = _Model(fn, self.layers, len(layers), self.hidden, heads, kv_heads, head_dim,
                            layers[0].gate_up.shape[0] // 2, 0, max(linear.shape[1] for linear in linears), eps,
                            head_dim**-0.5, operands.embedding.data_ptr(), self.vocab,
                            operands.final_norm.data_ptr(), _linear(operands.head))
        self._caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def run(self, ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            kv_caches: list[tuple[torch.Tensor, torch.Tensor]], slots: torch.Tensor, tables: torch.Tensor,
            seq_lens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The logits [m, vocab] float32 of m sequences' one new token each: ids [m] (token s of sequence s:
        tokens = arange(m)); cos, sin [m, 1, head_dim] from model/rotary.py; slots [m], tables [m, max_blocks],
        seq_lens [m] int64 as attention.py's. IndexError for an id outside the vocabulary, as the embedding's."""
        if self._caches is not kv_caches:
            self._bind(kv_caches)
        m = ids.shape[0]
        ids = ids.contiguous()
        logits = torch.empty(m, self.vocab if self.head is not None else 0)
        normed = torch.empty(m, self.hidden if self.head is None else 0, dtype=torch.bfloat16)
        scratch = torch.empty(self.lib.decoder_scratch_bytes(ctypes.byref(self.model), m), dtype=torch.uint8)
        if self.lib.decode_step(ctypes.byref(self.model), ids.data_ptr(), m, cos.data_ptr(), sin.data_ptr(),
                                slots.data_ptr(), tokens.data_ptr(), tables.data_ptr(), tables.shape[1],
                                seq_lens.data_ptr(), logits.data_ptr(), normed.data_ptr(), scratch.data_ptr(),
                                torch.get_num_threads()):
            raise IndexError(f"a token id outside the vocabulary of {self.vocab}")
        return logits if self.head is not None else self.project(normed).float()

    def _bind(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The layers' K/V caches: the engine allocates them once, so this runs once."""
        for struct, (k_cache, v_cache) in zip(self.layers, kv_caches, strict=True):
            struct.k_cache, struct.v_cache = k_cache.data_ptr(), v_cache.data_ptr()
        self.model.block_size = kv_caches[0][0].shape[1]
        self._caches = kv_caches


@functools.cache
def decoder_layers(cache_dir: Path) -> DecoderLayers | None:
    """The one-call decoder, built on first use; None (logged once) where it cannot run here."""
    return _load(DecoderLayers, "decoder.c", "decode steps", cache_dir, fallback="a call per kernel from Python")


@dataclass(frozen=True)
class CpuKernels:
    """Which of llamaserve's kernels run on this machine (None: torch's serves that kind of layer)."""

    bf16: Bf16Gemm | None = None
    int8: Int8Gemm | None = None
    int4: Int4Gemm | None = None
    attention: PagedAttention | None = None
    layer_ops: LayerOps | None = None
    decoder: DecoderLayers | None = None

    @classmethod
    def build(cls, cache_dir: Path, dtype: torch.dtype, kinds: set[str]) -> "CpuKernels":
        """The kernels a model in `dtype` with quantized layers of `kinds` ("int8", "int4") uses."""
        return cls(bf16_gemm(cache_dir) if dtype == torch.bfloat16 else None,
                   int8_gemm(cache_dir) if "int8" in kinds else None,
                   int4_gemm(cache_dir) if "int4" in kinds else None,
                   paged_attention(cache_dir), layer_ops(cache_dir), decoder_layers(cache_dir))
