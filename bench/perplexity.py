"""Perplexity and top-1 agreement with float32 of the default model per precision, over the text the tests ship.

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=server python bench/perplexity.py [--window 1024]

The text (tests/data/perplexity.txt, written for this project) is cut into windows of `--window` tokens;
each is prefilled as one sequence and every token after a window's first is scored
(llamaserve.model.perplexity).
"""

import argparse
import time
from pathlib import Path

from llamaserve.model.loader import load_model, resolve_checkpoint
from llamaserve.model.perplexity import perplexity
from llamaserve.tokenizer import Tokenizer

TEXT = Path(__file__).parent.parent / "tests" / "data" / "perplexity.txt"
PRECISIONS = {  # name -> (dtype, quantization, int4 group size, LM head quantization)
    "float32": ("float32", "none", 32, "none"), "bfloat16": ("bfloat16", "none", 32, "none"),
    "int8": ("float32", "int8", 32, "none"), "int4 g32": ("float32", "int4", 32, "none"),
    "int4 g64": ("float32", "int4", 64, "none"), "gguf (auto), float head": ("float32", "auto", 32, "none"),
    "gguf (auto), int8 head": ("float32", "auto", 32, "auto"), "int8, bf16 model": ("bfloat16", "int8", 32, "none"),
    "gguf (auto), float head, bf16 model": ("bfloat16", "auto", 32, "none"),
    "gguf (auto), int8 head, bf16 model": ("bfloat16", "auto", 32, "auto"),
    "int4 g32, int8 LM head, bf16 model": ("bfloat16", "int4", 32, "int8"),
    "int4 g32, int4 LM head, bf16 model": ("bfloat16", "int4", 32, "int4"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS),
                        help="the first is the reference for agreement (default: all, float32 first)")
    args = parser.parse_args()
    cache = Path.home() / ".cache" / "llamaserve"
    checkpoint = resolve_checkpoint(None, cache, "none")
    ids = Tokenizer.from_checkpoint(checkpoint).encode(TEXT.read_text())
    print(f"{len(ids)} tokens, windows of {args.window}")
    print("| precision | perplexity | vs float32 | top-1 agreement with float32 | seconds |")
    print("|---|---|---|---|---|")
    reference = None
    for name in args.precisions:
        dtype, quantization, group_size, lm_head = PRECISIONS[name]
        model = load_model(checkpoint, dtype, quantization=quantization, quantization_group_size=group_size,
                           lm_head_quantization=lm_head)
        start = time.perf_counter()
        result = perplexity(model, ids, args.window)
        seconds = time.perf_counter() - start
        reference = reference or result
        print(f"| {name} | {result.perplexity:.3f} | {(result.perplexity / reference.perplexity - 1) * 100:+.2f}% | "
              f"{result.agreement(reference):.4f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
