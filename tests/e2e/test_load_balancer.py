"""nginx, from docker/nginx.conf, on loopback in front of two real servers under mixed load: a replica
SIGKILLed mid-run costs only the streams it was sending, and a rolling restart costs nothing.

nginx comes from Debian's package (.ci/run installs it); without it these tests skip."""

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import psutil
import pytest

from tests.e2e.conftest import Server, free_port
from tests.e2e.mixed_load import SLEEPING_OPENMP, Load, Outcome, mixed_request

NGINX_CONF = Path(__file__).parents[2] / "docker" / "nginx.conf"
CONCURRENCY = 16


def short_request(i: int) -> tuple[str, dict]:
    """Short, so the tests stay quick, yet long enough that a stream spans several engine steps."""
    return mixed_request(i, min_tokens=4, max_tokens=16, max_words=40)


def nginx_binary() -> str | None:
    found = shutil.which("nginx")  # a user's PATH may lack the sbin directories
    return found or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)


def replace_once(pattern: str, replacement: str, text: str) -> str:
    text, n = re.subn(pattern, replacement, text, count=1, flags=re.M)
    assert n == 1, f"docker/nginx.conf has no line matching {pattern!r}"
    return text


def loopback_config(text: str, replica_ports: list[int], port: int, run_dir: Path) -> str:
    """The shipped config with only its replicas, its port and its files moved: to loopback and run_dir."""
    assert len(re.findall(r"^\s*server llamaserve-\d+:8000 ", text, flags=re.M)) == len(replica_ports)
    for replica in replica_ports:
        text = replace_once(r"^(\s*)server llamaserve-\d+:8000 ", rf"\g<1>server 127.0.0.1:{replica} ", text)
    text = replace_once(r"^(\s*)listen 8000;", rf"\g<1>listen 127.0.0.1:{port};", text)
    text = replace_once(r"^pid .*;$", f"pid {run_dir}/nginx.pid;", text)
    text = replace_once(r"^error_log \S+", f"error_log {run_dir}/error.log", text)
    text = replace_once(r"^(\s*)access_log \S+", rf"\g<1>access_log {run_dir}/access.log", text)
    temp_paths = "".join(f"    {kind}_temp_path {run_dir}/{kind};\n"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return replace_once(r"^http \{\n", "http {\n" + temp_paths, text)


class Nginx:
    """nginx in the foreground, run from run_dir, in front of the replicas on replica_ports."""

    def __init__(self, binary: str, run_dir: Path, replica_ports: list[int]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.run_dir = run_dir
        config = run_dir / "nginx.conf"
        config.write_text(loopback_config(NGINX_CONF.read_text(), replica_ports, self.port, run_dir))
        command = [binary, "-p", str(run_dir), "-c", str(config)]
        check = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, f"nginx refuses the config:\n{check.stderr}"
        with open(run_dir / "nginx.out", "w") as out:
            self.process = subprocess.Popen([*command, "-g", "daemon off;"], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            assert self.process.poll() is None, f"nginx exited:\n{self.log()}"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, f"nginx not listening after 10 s:\n{self.log()}"
                time.sleep(0.05)

    def log(self) -> str:
        return "".join((self.run_dir / name).read_text()[-3000:] for name in ("nginx.out", "error.log")
                       if (self.run_dir / name).exists())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # fast shutdown
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Replica:
    """A server on a fixed port, so that it can be restarted where nginx expects it."""

    def __init__(self, root: Path, model: Path, port: int):
        self.root, self.model, self.port = root, model, port
        self.address = f"127.0.0.1:{port}"
        self.starts = 0
        self.server: Server | None = None

    def start(self) -> "Replica":
        self.starts += 1
        log_dir = self.root / f"replica-{self.port}-{self.starts}"
        log_dir.mkdir(parents=True)
        self.server = Server(log_dir, "--model", str(self.model), env=SLEEPING_OPENMP, port=self.port)
        return self

    def kill_all(self) -> None:
        """SIGKILL to the API process and everything it started (the engine), all at once."""
        children = psutil.Process(self.server.process.pid).children(recursive=True)
        self.server.process.kill()
        for p in children:
            p.kill()
        self.server.process.wait(timeout=10)  # Popen reaps its own child, to keep its exit status
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, alive

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM, as an orchestrator sends it; returns the exit status once the process tree is gone."""
        api = psutil.Process(self.server.process.pid)
        children = api.children(recursive=True)
        self.server.process.send_signal(signal.SIGTERM)
        status = self.server.process.wait(timeout=timeout)
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"{alive} outlived the server"
        return status

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


@contextmanager
def cluster(tmp_path: Path, model: Path) -> Iterator[tuple[Nginx, list[Replica]]]:
    binary = nginx_binary()
    if binary is None:
        pytest.skip("nginx not found: install Debian's package (`apt-get install nginx`; .ci/run does it)")
    replicas = [Replica(tmp_path, model, free_port()) for _ in range(2)]
    nginx = None
    try:
        with ThreadPoolExecutor(len(replicas)) as pool:
            for start in [pool.submit(r.start) for r in replicas]:
                start.result()
        run_dir = tmp_path / "nginx"
        run_dir.mkdir()
        nginx = Nginx(binary, run_dir, [r.port for r in replicas])
        yield nginx, replicas
    finally:
        if nginx is not None:
            nginx.stop()
        for r in replicas:
            r.stop()


def describe(load: Load) -> str:
    return ", ".join(f"{kind} {outcome}: {n}" for (kind, outcome), n in sorted(load.counts().items()))


def failures(results: list[Outcome]) -> list[Outcome]:
    return [o for o in results if o.kind != "ok"]


def served_since(load: Load, address: str, since: float) -> bool:
    """Whether a request sent after `since` was answered by the replica at `address`."""
    return any(o.upstream == address and o.started > since for o in list(load.results))


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not after {timeout} s"
        time.sleep(0.02)


def test_a_replica_killed_mid_run_costs_only_the_streams_it_was_sending(tmp_path, tiny_model):
    with cluster(tmp_path, tiny_model) as (nginx, (victim, survivor)):
        began = time.monotonic()
        load = Load(nginx.url, CONCURRENCY, total=300, request=short_request).start()
        try:
            # Mid-run, with streams under way on the victim, so that some are cut.
            wait_for(lambda: len(load.results) >= 100 and
                     sum(r == victim.address for r in list(load.streams_open.values())) >= 2,
                     timeout=60, what="two streams running on the victim after 100 requests")
            victim.kill_all()
            killed = time.monotonic()
        finally:
            load.join()
        ran = time.monotonic()
        after = Load(nginx.url, CONCURRENCY, total=64, first=300, request=short_request).run()  # the victim is gone

    results = load.results
    print(f"\nreplica SIGKILLed after {killed - began:.1f} s, {sum(o.ended < killed for o in results)} of 300 "
          f"requests done; the 300 took {ran - began:.1f} s: {describe(load)}; "
          f"retried on the survivor: {sum(len(o.upstreams) > 1 for o in results)}; the 64 sent after: "
          f"{sum(o.kind == 'ok' for o in after)} ok, {sum(o.upstream == survivor.address for o in after)} "
          f"served by the survivor")
    cut = failures([o for o in results if o.stream])
    print(f"a cut stream's end: {cut[0].detail if cut else None}")
    assert len(results) == 300
    assert not [o for o in results if o.kind == "hung"]
    assert not failures([o for o in results if not o.stream]), "every non-streaming request is retried"
    for o in cut:  # only streams the victim was sending when it died: the connection closes before [DONE]
        assert o.kind == "cut" and o.upstream == victim.address and o.started < killed, o
    assert cut, "the victim was sending streams when it died"
    started_after = [o for o in results if o.started > killed] + after
    assert not failures(started_after)
    assert all(o.upstream == survivor.address for o in started_after), "traffic goes to the survivor only"
    assert victim.server.process.returncode == -signal.SIGKILL


def test_a_rolling_restart_under_load_fails_no_request(tmp_path, tiny_model):
    """SIGTERM one replica, start it again, wait until nginx sends it traffic; then the other. A stopping
    replica lets its requests finish, streams included; nginx sends the new ones elsewhere, whether the
    replica refuses their connections or answers them 503."""
    with cluster(tmp_path, tiny_model) as (nginx, replicas):
        began = time.monotonic()
        load = Load(nginx.url, CONCURRENCY, request=short_request).start()
        statuses, phases = [], []
        try:
            wait_for(lambda: len(load.results) >= 50, timeout=60, what="50 requests")
            for replica in replicas:
                phase = time.monotonic()
                statuses.append(replica.terminate())
                stopped = time.monotonic()
                replica.start()
                back = time.monotonic()
                # nginx marked the replica down (passive health): wait until it sends requests there again
                wait_for(partial(served_since, load, replica.address, back),
                         timeout=60, what=f"nginx sends requests to the restarted {replica.address}")
                phases.append(f"{stopped - phase:.1f} s to stop, {back - stopped:.1f} s to start, "
                              f"{time.monotonic() - back:.1f} s until nginx sends it requests")
            done = len(load.results)
            wait_for(lambda: len(load.results) >= done + 50, timeout=60, what="50 more requests")
        finally:
            load.stop()

    results = load.results
    print(f"\nrolling restart of 2 replicas under load, {time.monotonic() - began:.1f} s: {len(results)} requests, "
          f"{describe(load)}; retried on another replica: {sum(len(o.upstreams) > 1 for o in results)}; "
          f"served by each replica: {[sum(o.upstream == r.address for o in results) for r in replicas]}; "
          f"exit statuses {statuses}; each replica: {'; '.join(phases)}")
    assert statuses == [0, 0]
    assert not failures(results), failures(results)[:5]
