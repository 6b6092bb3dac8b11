"""A test module run again as a script in a fresh process, for checks that need a setting made before an
import: TRITON_INTERPRET=1 must be set before triton is first imported, and another test may already have
imported it in this process. The child prints JSON lines; the parent gets them merged into one dict."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_child(module: str, *args: str, interpret: bool, timeout: float = 600) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    results = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            results.update(json.loads(line))
    assert results, f"{module} {' '.join(args)} reported nothing (exit {done.returncode}):\n{done.stderr[-3000:]}"
    return results
