"""The batch-1 decode step's top operators under torch.profiler, per precision (what bench/decode_step.py times).

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=server python bench/step_profile.py [--precision "int4 (bf16)"] [--context 128]

Prints the profiled step (the profiler adds about a microsecond an operator call), the operator calls a step
makes, and the operators with the most self time per step. llamaserve's own bf16 kernel is called through ctypes,
not as a torch operator: its time is the step's less the operators' (compare with "bfloat16 (oneDNN)"). Run it from each tree to compare.
"""

import argparse
import time

from torch.profiler import ProfilerActivity, profile

from decode_step import PRECISIONS, DecodeStep, load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", nargs="+", default=["bfloat16", "int4 (bf16)"], choices=list(PRECISIONS))
    parser.add_argument("--context", type=int, default=128, help="tokens already in the cache")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    for name in args.precision:
        model = load(name)
        step = DecodeStep(model, args.context)
        for _ in range(10):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            wall = (time.perf_counter() - start) / args.steps * 1e3
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in ops) / args.steps / 1e3
        calls = sum(e.count for e in ops) / args.steps
        print(f"{name}, context {args.context}: profiled step {wall:.1f} ms wall, {total:.1f} ms in torch operators, "
              f"{calls:.0f} operator calls")
        for e in ops[: args.top]:
            print(f"  {e.key[:48]:48s} {e.self_cpu_time_total / args.steps / 1e3:6.2f} ms {e.count / args.steps:5.0f} calls")


if __name__ == "__main__":
    main()
