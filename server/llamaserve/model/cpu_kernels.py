"""llamaserve's own CPU kernels: C with AVX-512 intrinsics (csrc/), built by the system's C compiler on first use.

Each source compiles into `cache_dir/kernels/<key>/`, the key hashing the source, the flags and the compiler's
version, so a changed kernel or compiler builds again and a second process (another tensor-parallel rank, the
next server) loads the built library. Building takes about a second; the library is loaded with ctypes (no
torch headers, no build step at install). Where a kernel cannot run (no compiler, a CPU without the
instructions, a build error) `bf16_gemm` returns None, logs why once, and the layers keep oneDNN.

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


@functools.cache
def bf16_gemm(cache_dir: Path) -> Bf16Gemm | None:
    """The bfloat16 matmul kernel, built on first use; None (logged once) where it cannot run here."""
    try:
        missing = BF16_CPU_FLAGS - cpu_flags()
        if missing:
            raise KernelUnavailable(f"the CPU lacks {', '.join(sorted(missing))}")
        return Bf16Gemm(build("gemm_bf16.c", BF16_FLAGS, Path(cache_dir)))
    except (KernelUnavailable, OSError, subprocess.SubprocessError) as e:
        log.info("bfloat16 linear layers run on oneDNN: llamaserve's kernel is unavailable (%s)", e)
        return None
