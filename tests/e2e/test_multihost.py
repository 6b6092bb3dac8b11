"""Tensor parallelism across hosts: two network namespaces joined by a veth pair stand for two hosts.
Node 0 (`--node-rank 0`: the API, the engine, rank 0) runs in one, the headless node 1 (rank 1) in the
other, and the split model gives one rank's greedy answers. Stopping node 0 ends node 1 cleanly; killing
node 1 under a stream fails the stream and ends node 0 non-zero.

Needs root (CAP_NET_ADMIN) on Linux; skips, saying so, where `ip netns add` fails. Traffic goes only to
the two addresses below, which exist only inside the namespaces this test makes.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.e2e.checks import assert_ends_engine_dead
from tests.e2e.conftest import STARTUP_TIMEOUT, server_command

NODE_0, NODE_1 = "10.213.0.1", "10.213.0.2"  # a private /30, inside the namespaces only
RENDEZVOUS_PORT = 29500  # on NODE_0; the namespaces are fresh, so any port is free
API_PORT = 8000  # inside node 0's namespace, on 127.0.0.1
TIMEOUT = 30  # seconds: --distributed-timeout, and the bound on every lifecycle step
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "1, 2, 3, 4,"]
MAX_TOKENS = 20

# Run inside node 0's namespace (the test process is in another one): wait for /ready, then either
# complete every prompt greedily or kill the given pids once a long stream is under way.
CLIENT = """
import json, os, signal, sys, time
import httpx, openai
port, mode, arg = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
base = f"http://127.0.0.1:{port}"
deadline = time.monotonic() + float(sys.argv[4])
while True:
    try:
        if httpx.get(base + "/ready", timeout=1).status_code == 200:
            break
    except httpx.TransportError:
        pass
    if time.monotonic() > deadline:
        sys.exit("the server was not ready in time")
    time.sleep(0.2)
if mode == "complete":
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    answers = [client.completions.create(model=model, prompt=p, temperature=0, max_tokens=%d).choices[0].text
               for p in arg]
    print(json.dumps(answers))
else:
    body = {"messages": [{"role": "user", "content": "Count to a thousand."}], "max_tokens": 1000,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        while '"delta":{"content"' not in next(lines):
            pass
        for pid in arg:
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        events = [line.removeprefix("data: ") for line in lines if line]
    print(json.dumps({"events": events, "failed_after": time.monotonic() - killed}))
""" % MAX_TOKENS


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@pytest.fixture
def hosts():
    """Two namespaces, A (NODE_0) and B (NODE_1), joined by a veth pair; removed afterwards."""
    a, b = f"llamaserve-{os.getpid()}-a", f"llamaserve-{os.getpid()}-b"
    try:
        ip("netns", "add", a)
    except (OSError, subprocess.CalledProcessError) as e:
        reason = getattr(e, "stderr", None) or str(e)
        message = f"cannot create network namespaces (needs root with CAP_NET_ADMIN on Linux): {reason.strip()}"
        print(message)
        pytest.skip(message)
    try:
        ip("netns", "add", b)
        veth_a, veth_b = f"lsa{os.getpid()}"[:15], f"lsb{os.getpid()}"[:15]
        ip("link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
        for namespace, veth, address in ((a, veth_a, NODE_0), (b, veth_b, NODE_1)):
            ip("link", "set", veth, "netns", namespace)
            ip("-n", namespace, "addr", "add", f"{address}/30", "dev", veth)
            ip("-n", namespace, "link", "set", veth, "up")
            ip("-n", namespace, "link", "set", "lo", "up")
        yield a, b
    finally:
        for namespace in (a, b):  # takes the veth pair with it
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=10)


class Node:
    """`llamaserve serve` in a namespace; its output goes to a log file."""

    def __init__(self, namespace: str, log_path: Path, *flags: str):
        self.log_path = log_path
        with open(log_path, "w") as log:  # `ip netns exec` execs the command: the pid is the server's
            self.process = subprocess.Popen(["ip", "netns", "exec", namespace, *server_command(API_PORT, *flags)],
                                            stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return f"--- {self.log_path.name}:\n{self.log_path.read_text()[-4000:]}"

    def wait(self, timeout: float) -> tuple[int, float]:
        """Its exit code and how long it took to exit."""
        start = time.monotonic()
        code = self.process.wait(timeout)
        return code, time.monotonic() - start

    def kill(self) -> None:
        if self.process.poll() is None:
            for process in psutil.Process(self.process.pid).children(recursive=True):
                process.kill()
            self.process.kill()
            self.process.wait()


def run_client(namespace: str, nodes: list[Node], mode: str, arg) -> dict | list:
    """CLIENT in `namespace`, failing at once (with the logs) when a node exits before it is done."""
    command = ["ip", "netns", "exec", namespace, sys.executable, "-c", CLIENT, str(API_PORT), mode, json.dumps(arg),
               str(STARTUP_TIMEOUT)]
    client = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + STARTUP_TIMEOUT + 120
    while client.poll() is None:
        exited = [n for n in nodes if n.process.poll() is not None]
        if (mode == "complete" and exited) or time.monotonic() > deadline:
            client.kill()
            client.wait()
            pytest.fail(f"client did not finish ({[n.process.returncode for n in nodes]}):\n"
                        + "\n".join(n.log() for n in nodes))
        time.sleep(0.2)
    out, err = client.communicate()
    assert client.returncode == 0, err + "\n".join(n.log() for n in nodes)
    return json.loads(out)


def split_flags(model: Path, node_rank: int) -> list[str]:
    return ["--model", str(model), "--dtype", "float32", "--tensor-parallel-size", "2", "--nnodes", "2",
            "--node-rank", str(node_rank), "--master-addr", NODE_0, "--master-port", str(RENDEZVOUS_PORT),
            "--distributed-timeout", str(TIMEOUT)]


def start_two_hosts(hosts, tmp_path: Path, model: Path, run: str) -> tuple[Node, Node]:
    a, b = hosts
    node_0 = Node(a, tmp_path / f"{run}-node0.log", *split_flags(model, 0))
    node_1 = Node(b, tmp_path / f"{run}-node1.log", *split_flags(model, 1), "--headless")
    return node_0, node_1


def test_two_hosts_answer_like_one_rank_and_each_end_ends_the_other(hosts, tmp_path, request):
    a, _ = hosts
    tiny_model = request.getfixturevalue("tiny_model")  # after `hosts`, which may skip: not built for nothing
    single = Node(a, tmp_path / "tp1.log", "--model", str(tiny_model), "--dtype", "float32")
    try:
        expected = run_client(a, [single], "complete", PROMPTS)
    finally:
        single.process.terminate()
        single.wait(TIMEOUT)

    node_0, node_1 = start_two_hosts(hosts, tmp_path, tiny_model, "stop")
    try:
        answers = run_client(a, [node_0, node_1], "complete", PROMPTS)
        print(f"two hosts vs one rank, {len(PROMPTS)} greedy prompts of {MAX_TOKENS} tokens:",
              "same" if answers == expected else "DIFFERENT")
        assert answers == expected
        assert all(answers)
        # Node 0's clean shutdown tells rank 1 to stop: the headless node exits 0 too.
        node_0.process.send_signal(signal.SIGTERM)
        code_0, took_0 = node_0.wait(TIMEOUT)
        code_1, took_1 = node_1.wait(TIMEOUT)
        print(f"SIGTERM to node 0: it exited {code_0} after {took_0:.1f} s, the headless node exited {code_1} "
              f"{took_1:.1f} s after that")
        assert (code_0, code_1) == (0, 0), node_0.log() + node_1.log()
        assert "rank 0 stopped the group" in node_1.log()
    finally:
        node_0.kill()
        node_1.kill()

    node_0, node_1 = start_two_hosts(hosts, tmp_path, tiny_model, "kill")
    try:
        run_client(a, [node_0, node_1], "complete", PROMPTS[:1])  # both up and serving
        victims = [p.pid for p in psutil.Process(node_1.process.pid).children(recursive=True)] + [node_1.process.pid]
        result = run_client(a, [node_0, node_1], "kill", victims)  # the whole of node 1, as a host that died
        code_0, took_0 = node_0.wait(TIMEOUT)
        print(f"node 1 killed under a stream: the stream failed {result['failed_after']:.2f} s later, node 0 "
              f"exited {code_0} {took_0:.1f} s after that")
        assert result["failed_after"] < TIMEOUT
        assert_ends_engine_dead(result["events"])
        assert code_0 != 0
        assert "the step failed on rank 0 of 2" in node_0.log_path.read_text()
    finally:
        node_0.kill()
        node_1.kill()
