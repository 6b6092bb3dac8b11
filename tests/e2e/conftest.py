"""A real server process on 127.0.0.1 with the default model, shared by the whole e2e session."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import make_tiny_checkpoint

STARTUP_TIMEOUT = 180  # seconds; the machine may be busy


def server_command(port: int, *flags: str) -> list[str]:
    """`llamaserve serve` with small settings."""
    return [sys.executable, "-m", "llamaserve.cli", "serve", "--port", str(port), "--kv-cache-gib", "0.25",
            "--max-num-seqs", "16", "--max-model-len", "2048", "--drain-grace", "0", *flags]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess; its output goes to a log file, shown when it fails to start."""

    def __init__(self, log_dir: Path, *flags: str, env: dict[str, str] | None = None, new_session: bool = False,
                 port: int | None = None):
        """`env`: more environment variables; `new_session`: the server leads a process group of its own
        (with its engine), as under a terminal or a systemd unit, so a test can signal the group;
        `port`: a given one, for a replica restarted where its balancer expects it."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{self.port}.log"
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(server_command(self.port, *flags), stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, **(env or {})}, start_new_session=new_session)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"server exited with {self.process.returncode} while starting:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"server not ready after {STARTUP_TIMEOUT} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()[-5000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    server = Server(tmp_path_factory.mktemp("server"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=120) as http:
        yield http


@pytest.fixture(scope="session")
def model(client) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, default_checkpoint) -> Path:
    """A tiny random Llama with the default model's tokenizer: a real server whose steps cost almost
    nothing, for tests that need many long prompts."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-model"), vocab_size=49152, max_position_embeddings=8192)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (default_checkpoint / name).exists():
            shutil.copy(default_checkpoint / name, path / name)
    return path
