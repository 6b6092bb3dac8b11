"""llamaserve's own CPU kernels: C with AVX-512 intrinsics (csrc/), built by the system's C compiler on first use.

Each source compiles into `cache_dir/kernels/<key>/`, the key hashing the source, the flags and the compiler's
version, so a changed kernel or compiler builds again and a second process (another tensor-parallel rank, the
next server) loads the built library. Building takes about a second; the library is loaded with ctypes (no
torch headers, no build step at install). Where a kernel cannot run (no compiler, a CPU without the
instructions, a build error) `bf16_gemm` and `lora_delta` return None, log why once, and the layers keep
oneDNN (or torch's LoRA matmuls).

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
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = Path(__file__).with_name("csrc")
BF16_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fopenmp", "-fPIC",
              "-shared"]
BF16_CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}  # as /proc/cpuinfo spells them
LORA_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-fopenmp", "-fPIC", "-shared"]
LORA_CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl"}


class KernelUnavailable(RuntimeError):
    """Why a kernel cannot run on this machine."""


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def build(source: str, flags: list[str], cache_dir: Path) -> ctypes.CDLL:
    """csrc/`source` compiled with `flags` (once per cache key) and loaded."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise KernelUnavailable("no C compiler (cc or gcc) on PATH")
    text = (SOURCES / source).read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(text + repr(flags).encode() + version.encode()).hexdigest()[:16]
    library = cache_dir / "kernels" / key / (Path(source).stem + ".so")
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        partial = library.with_suffix(f".{os.getpid()}.tmp")  # ranks building at once each rename a whole file
        result = subprocess.run([compiler, *flags, str(SOURCES / source), "-o", str(partial)],
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


def _available(source: str, flags: list[str], cpu_needs: set[str], cache_dir: Path) -> ctypes.CDLL:
    missing = cpu_needs - cpu_flags()
    if missing:
        raise KernelUnavailable(f"the CPU lacks {', '.join(sorted(missing))}")
    return build(source, flags, Path(cache_dir))


UNAVAILABLE = (KernelUnavailable, OSError, subprocess.SubprocessError)


@functools.cache
def bf16_gemm(cache_dir: Path) -> Bf16Gemm | None:
    """The bfloat16 matmul kernel, built on first use; None (logged once) where it cannot run here."""
    try:
        return Bf16Gemm(_available("gemm_bf16.c", BF16_FLAGS, BF16_CPU_FLAGS, cache_dir))
    except UNAVAILABLE as e:
        log.info("bfloat16 linear layers run on oneDNN: llamaserve's kernel is unavailable (%s)", e)
        return None


@functools.cache
def lora_delta(cache_dir: Path) -> LoraDelta | None:
    """The LoRA delta kernel, built on first use; None (logged once) where it cannot run here."""
    try:
        return LoraDelta(_available("lora.c", LORA_FLAGS, LORA_CPU_FLAGS, cache_dir))
    except UNAVAILABLE as e:
        log.info("LoRA deltas run on torch's matmuls: llamaserve's kernel is unavailable (%s)", e)
        return None
