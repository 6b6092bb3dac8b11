"""What structured output costs on the default model: grammar compiles, and the per-step price of
bitmask filling and masking for a batch of constrained decode rows.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/structured_overhead.py [--rows 16] [--steps 20] [--repeats 4]

On a shared machine run it with OMP_WAIT_POLICY=PASSIVE: spinning OpenMP threads that lose their core to
another process make step times swing by 5x either way, far more than what is measured here.

1. Compiles: a nested JSON schema (first seen, then the cache's answer), median of several distinct
   schemas of the same shape (a renamed field each, so each one is compiled anew).
2. Steps: `--rows` decode rows at temperature 1, with a JSON constraint that keeps them decoding
   (an array of at least 100 strings) and without one (EOS ignored); the median and mean wall and the
   median CPU milliseconds of `--steps` decode steps per run, runs alternating so drift hits both alike. The
   parts are timed on their own too: the bitmask fill (on its thread, overlapping the forward pass),
   the sampler's mask stage, and accepting the tokens into the matchers.
"""

import argparse
import json
import statistics
import time

import torch

from llamaserve.config import EngineConfig
from llamaserve.engine.core import EngineCore
from llamaserve.engine.grammar import TokenBitmask
from llamaserve.engine.messages import AddRequest
from llamaserve.model.sampler import forbidden_tokens
from llamaserve.sampling_params import SamplingParams, StructuredOutput


def nested_schema(field: str = "name") -> dict:
    address = {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                                "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
               "required": ["city"]}
    item = {"type": "object", "properties": {"sku": {"type": "string", "maxLength": 12},
                                             "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                                             "price": {"type": "number", "minimum": 0}},
            "required": ["sku", "quantity"]}
    return {"type": "object", "properties": {
        field: {"type": "string", "minLength": 1, "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": address,
        "orders": {"type": "array", "items": {"type": "object", "properties": {
            "id": {"type": "string", "format": "uuid"}, "items": {"type": "array", "items": item, "maxItems": 20},
            "shipping": address}, "required": ["id", "items"]}},
        "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
    }, "required": [field, "age", "address"]}


def compile_seconds(core: EngineCore, structured: StructuredOutput) -> float:
    start = time.perf_counter()
    core.grammars.compile(structured).result()
    return time.perf_counter() - start


def bench_compiles(core: EngineCore, samples: int) -> dict:
    core.grammars.compile(StructuredOutput("regex", "warm")).result()  # the vocabulary is loaded by now
    nested = StructuredOutput("json", json.dumps(nested_schema()))
    first, cached = compile_seconds(core, nested), compile_seconds(core, nested)
    fresh = [compile_seconds(core, StructuredOutput("json", json.dumps(nested_schema(f"name{i}"))))
             for i in range(samples)]
    return {"first_ms": first * 1e3, "cached_ms": cached * 1e3, "fresh_median_ms": statistics.median(fresh) * 1e3,
            "bytes": core.grammars.compile(nested).result().memory_size_bytes}


def decode_steps(core: EngineCore, rows: int, steps: int, structured: StructuredOutput | None) -> tuple[list, list]:
    """Wall and CPU seconds of `steps` decode steps of `rows` requests (after their prefill)."""
    params = SamplingParams(temperature=1.0, max_tokens=steps + 10, ignore_eos=structured is None,
                            structured=structured)
    for i in range(rows):
        assert core.add_request(AddRequest(f"r{i}", [1, 504, 3156, 30, 100 + i], params)) is None
    core.wait_for_grammars()
    core.step()  # admission and prefill
    wall, cpu = [], []
    for _ in range(steps):
        w, c = time.perf_counter(), time.process_time()
        outputs = core.step()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
        assert len(outputs) == rows and not any(o.finished for o in outputs), "a row finished early"
    core.abort([f"r{i}" for i in range(rows)])
    core.step()
    return wall, cpu


def bench_parts(core: EngineCore, rows: int, structured: StructuredOutput, repeats: int = 50) -> dict:
    """The fill, the mask stage and the accepts on their own, for `rows` matchers a few tokens in."""
    compiled = core.grammars.compile(structured).result()
    matchers = [core.grammars.matcher(compiled) for _ in range(rows)]
    for m in matchers:
        assert m.accept_string('["ab", "c')  # inside a string: the state most of the output is in
    vocab = core.runner.arch.vocab_size
    bitmask = TokenBitmask(rows, vocab, torch.device("cpu"))
    logits = torch.randn(rows, vocab)
    fill, mask, accept = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        words = bitmask.fill(matchers).result()
        fill.append(time.perf_counter() - start)
        start = time.perf_counter()
        logits.masked_fill_(forbidden_tokens(words, vocab), float("-inf"))
        mask.append(time.perf_counter() - start)
        token = int(logits[0].argmax())
        start = time.perf_counter()
        for m in matchers:
            assert m.accept_token(token)
            m.rollback(1)
        accept.append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in
            (("fill_ms", fill), ("mask_ms", mask), ("accept_and_rollback_ms", accept))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--compile-samples", type=int, default=5)
    args = parser.parse_args()

    start = time.perf_counter()
    core = EngineCore(EngineConfig.from_options(model=None, num_blocks=512, max_num_seqs=args.rows))
    print(f"engine ready in {time.perf_counter() - start:.2f} s (the vocabulary loads in the background)")
    start = time.perf_counter()
    core.grammars.compile(StructuredOutput("regex", "x")).result()
    print(f"grammar compiler ready {time.perf_counter() - start:.2f} s later")
    print("compiles:", {k: round(v, 2) for k, v in bench_compiles(core, args.compile_samples).items()})

    long_json = StructuredOutput("json", json.dumps({"type": "array", "items": {"type": "string"}, "minItems": 100}))
    print("parts:", {k: round(v, 3) for k, v in bench_parts(core, args.rows, long_json).items()})
    runs = {"free": ([], []), "json": ([], [])}
    for _ in range(args.repeats):
        for name, structured in (("free", None), ("json", long_json)):
            wall, cpu = decode_steps(core, args.rows, args.steps, structured)
            runs[name][0].extend(wall)
            runs[name][1].extend(cpu)
    for name, (wall, cpu) in runs.items():
        print(f"{name}: {args.rows} decode rows, step {statistics.median(wall) * 1e3:.1f} ms wall median "
              f"({statistics.mean(wall) * 1e3:.1f} mean), {statistics.median(cpu) * 1e3:.1f} ms CPU median "
              f"({len(wall)} steps)")
    core.shutdown()


if __name__ == "__main__":
    main()
