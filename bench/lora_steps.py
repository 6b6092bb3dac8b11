"""Decode step time at 16 rows, a base engine and a LoRA engine in one process, their steps interleaved so
that a busy machine slows both alike; medians of wall and process CPU time, and their ratios.

    bench/make_lora_adapters.py --out /tmp/adapters --count 4 --rank 16
    PYTHONPATH=server .venv/bin/python bench/lora_steps.py [--loras a0,a1,a2,a3 | a0 | -] [--dtype bfloat16]

`--loras`: the adapters the LoRA engine's requests take in turn ("-": the base model on the LoRA engine).
OMP_WAIT_POLICY=PASSIVE would add a thread wake-up to every small call (the LoRA kernel's, oneDNN's) and
distort the ratio.
"""
import argparse
import statistics
import time

from llamaserve.config import EngineConfig
from llamaserve.engine.core import EngineCore
from llamaserve.engine.messages import AddRequest
from llamaserve.sampling_params import SamplingParams

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=150)
p.add_argument("--batch", type=int, default=16)
p.add_argument("--loras", default="a0,a1,a2,a3")
p.add_argument("--adapters", default="/tmp/adapters")
p.add_argument("--dtype", default="float32")
args = p.parse_args()
mods = [f"a{i}={args.adapters}/lora{i}" for i in range(4)]
base = EngineCore(EngineConfig.from_options(max_num_seqs=16, kv_cache_gib=1, dtype=args.dtype))
lora = EngineCore(EngineConfig.from_options(max_num_seqs=16, kv_cache_gib=1, dtype=args.dtype, lora_modules=tuple(mods)))
params = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
loras = [None if l == "-" else l for l in args.loras.split(",")]
for core, ls in ((base, [None]), (lora, loras)):
    for i in range(args.batch):
        prompt = [(7 * i + j) % 4000 + 100 for j in range(64)]
        core.add_request(AddRequest(f"r{i}", prompt, params, lora=ls[i % len(ls)]))
    for _ in range(3): core.step()
tb, tl, cb, cl = [], [], [], []
for s in range(args.steps):
    t, c = time.perf_counter(), time.process_time(); base.step(); tb.append(time.perf_counter() - t); cb.append(time.process_time() - c)
    t, c = time.perf_counter(), time.process_time(); lora.step(); tl.append(time.perf_counter() - t); cl.append(time.process_time() - c)
    if s % 50 == 49:
        b, l = statistics.median(tb[-50:]) * 1e3, statistics.median(tl[-50:]) * 1e3
        print(f"steps {s-49}-{s}: base {b:.1f} ms, lora {l:.1f} ms, ratio {b/l:.3f}", flush=True)
b, l = statistics.median(tb) * 1e3, statistics.median(tl) * 1e3
print(f"all: base {b:.1f} ms, lora {l:.1f} ms, ratio {b/l:.3f}", end="; ")
b, l = statistics.median(cb) * 1e3, statistics.median(cl) * 1e3
print(f"cpu: base {b:.1f} ms, lora {l:.1f} ms, ratio {b/l:.3f}")
