"""The standard serving scenarios per precision, each against the previous release in the same run.

    git worktree add /tmp/release 7007bbd~1      # the release before weight-only quantization and the CPU kernels
    .venv/bin/python bench/precision_release.py --baseline /tmp/release [--precisions float32 bfloat16 int8 int4]

One server at a time on 127.0.0.1, from this tree or the baseline tree (the same venv, PYTHONPATH=TREE/server),
each through bench/serve_load.py's three scenarios: c1 (8 requests at concurrency 1, 128 output tokens), c16
(64 at 16, 128 tokens) and c64 (128 at 64, 64 tokens), streamed, ignore_eos, temperature 0. The baseline has no
weight-only quantization: int8 and int4 compare with its bfloat16, the dtype they run in. Each round runs the
baseline servers, then ours, then (the next round) the other way round. Prints a markdown table: output tokens/s
and inter-token p50 per scenario, and ours : baseline.
"""

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
SCENARIOS = {"c1": (8, 1, 128), "c16": (64, 16, 128), "c64": (128, 64, 64)}  # requests, concurrency, tokens
PRECISIONS = {  # name -> (server flags, the baseline server it compares with)
    "float32": (["--dtype", "float32"], "float32"),
    "bfloat16": (["--dtype", "bfloat16"], "bfloat16"),
    "int8": (["--dtype", "bfloat16", "--quantization", "int8"], "bfloat16"),
    "int4": (["--dtype", "bfloat16", "--quantization", "int4"], "bfloat16"),
}
BASELINE = {"float32": ["--dtype", "float32"], "bfloat16": ["--dtype", "bfloat16"]}


def serve(tree: Path, flags: list[str], port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(tree / "server")}
    server = subprocess.Popen([sys.executable, "-m", "llamaserve.cli", "serve", "--port", str(port),
                               "--log-level", "warning", *flags], env=env, cwd=tree, start_new_session=True)
    return healthy(server, port, f"server {flags} from {tree}")


def healthy(server: subprocess.Popen, port: int, what: str, timeout: float = 600) -> subprocess.Popen:
    """`server` once its /health answers 200; raises if it exits or does not within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"{what} exited with {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{what} did not start")


def stop(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def measure(tree: Path, flags: list[str], port: int) -> dict[str, tuple[float, float]]:
    """scenario -> (output tok/s, inter-token p50 ms) for one server."""
    server = serve(tree, flags, port)
    try:
        figures = {}
        for name, (requests, concurrency, tokens) in SCENARIOS.items():
            out = subprocess.run([sys.executable, str(HERE / "serve_load.py"), "--url", f"http://127.0.0.1:{port}",
                                  "--requests", str(requests), "--concurrency", str(concurrency),
                                  "--max-tokens", str(tokens)], capture_output=True, text=True, check=True).stdout
            rate = float(re.search(r"= ([\d.]+) output tok/s", out).group(1))
            itl = float(re.search(r"inter-token p50 ([\d.]+) ms", out).group(1))
            figures[name] = (rate, itl)
            print(f"  {name}: {rate:.1f} tok/s, inter-token p50 {itl:.1f} ms", flush=True)
        return figures
    finally:
        stop(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="a worktree of the previous release")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--port", type=int, default=8771)
    args = parser.parse_args()
    ours_tree = HERE.parent
    wanted_baselines = sorted({PRECISIONS[p][1] for p in args.precisions})
    results: dict[tuple[str, str], list[dict]] = {}
    for round_ in range(args.rounds):
        runs = [("baseline", b, args.baseline, BASELINE[b]) for b in wanted_baselines]
        runs += [("ours", p, ours_tree, PRECISIONS[p][0]) for p in args.precisions]
        for side, name, tree, flags in runs if round_ % 2 == 0 else runs[::-1]:
            load = os.getloadavg()[0]
            print(f"round {round_ + 1}: {side} {name} (load {load:.1f})", flush=True)
            results.setdefault((side, name), []).append(measure(tree, flags, args.port))
    print("\n| precision | " + " | ".join(f"{s} tok/s ours / release (ratio) | {s} ITL p50 ms ours / release"
                                          for s in SCENARIOS) + " |")
    print("|---|" + "---|---|" * len(SCENARIOS))
    for name in args.precisions:
        cells = []
        for scenario in SCENARIOS:
            ours = statistics.median(r[scenario][0] for r in results[("ours", name)])
            base = statistics.median(r[scenario][0] for r in results[("baseline", PRECISIONS[name][1])])
            ours_itl = statistics.median(r[scenario][1] for r in results[("ours", name)])
            base_itl = statistics.median(r[scenario][1] for r in results[("baseline", PRECISIONS[name][1])])
            cells += [f"{ours:.1f} / {base:.1f} ({ours / base:.2f}x)", f"{ours_itl:.1f} / {base_itl:.1f}"]
        print(f"| {name} (release: {PRECISIONS[name][1]}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
