"""Random LoRA adapters for a checkpoint, written by PEFT itself, for the LoRA cost benchmark.

    .venv/bin/python bench/make_lora_adapters.py --out /tmp/adapters --count 4 --rank 16

With no --model, the embedded default model's converted checkpoint. Every decoder projection is adapted
and B is random (init_lora_weights=False), so the adapters change the output as trained ones do.
"""

import argparse
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from llamaserve.config import ModelConfig
from llamaserve.model.loader import resolve_checkpoint

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory (default: the embedded default model)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    checkpoint = Path(args.model) if args.model else resolve_checkpoint(None, ModelConfig().cache_dir)
    for i in range(args.count):
        torch.manual_seed(i)
        model = get_peft_model(LlamaForCausalLM.from_pretrained(checkpoint),
                               LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=MODULES,
                                          init_lora_weights=False))
        for name, p in model.named_parameters():
            if "lora_B" in name:  # small, as trained deltas are: the text stays text
                p.data.mul_(0.01)
        model.save_pretrained(Path(args.out) / f"lora{i}")
        print(Path(args.out) / f"lora{i}")
