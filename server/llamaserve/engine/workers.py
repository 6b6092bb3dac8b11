"""Tensor-parallel worker processes: every rank but 0 (rank 0 is the engine core's own model runner).

Every rank joins one torch.distributed group (NCCL on GPUs, gloo on CPU) by TCP rendezvous at
MASTER_ADDR:MASTER_PORT, so the same code spans hosts: node 0 runs the engine (rank 0) and its other
local ranks, a headless node (`run_node`) only its own ranks. A worker runs each step that rank 0
broadcasts and never samples. Failure is loud on every side: rank 0 watches its local workers and calls
`on_death` when one exits (the engine process then exits, which the API process sees at once); a remote
rank's death fails rank 0's next collective, which is fatal to the engine; a worker whose parent has
gone exits, and one whose collective fails (rank 0 gone) exits non-zero.
"""

import fcntl
import logging
import multiprocessing as mp
import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from multiprocessing.connection import wait

import torch
import torch.distributed as dist

from llamaserve.config import EngineConfig
from llamaserve.logs import configure_process, process_format

log = logging.getLogger(__name__)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


def interface_toward(address: str, port: int) -> str | None:
    """The network interface that holds this host's address toward `address` (the kernel's route choice;
    connecting a UDP socket sends nothing), or None when no IPv4 interface holds it."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((address, port))
            local = s.getsockname()[0]
            for _, name in socket.if_nameindex():
                try:
                    packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
                except OSError:  # no IPv4 address on it
                    continue
                if socket.inet_ntoa(packed[20:24]) == local:
                    return name
    except OSError:  # an IPv6 or unresolvable master_addr: gloo's own choice stands
        pass
    return None


def init_process_group(config: EngineConfig, rank: int, device: torch.device) -> dist.ProcessGroup:
    """Join the tensor-parallel group; returns the gloo group that step metadata travels on (on CPU
    the group itself; on GPUs a second, CPU-side group beside the NCCL one)."""
    parallel = config.parallel
    # Gloo otherwise binds to the address the host name resolves to, often loopback, which ranks on other
    # hosts cannot reach; it takes its interface from this variable only.
    interface = parallel.gloo_socket_ifname or interface_toward(parallel.master_addr, parallel.master_port)
    if interface is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = interface
    # Workers wait in a broadcast while the engine is idle: rank 0 sends keepalives well within this.
    timeout = timedelta(seconds=parallel.distributed_timeout)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://{parallel.master_addr}:{parallel.master_port}",
        rank=rank,
        world_size=parallel.tensor_parallel_size,
        timeout=timeout,
        **({"device_id": device} if device.type == "cuda" else {}),
    )
    if device.type == "cuda":
        return dist.new_group(backend="gloo", timeout=timeout)
    return dist.group.WORLD


class WorkerGroup:
    """Some of this host's ranks as spawned processes: node 0's ranks but 0 (for the engine), or a headless
    node's ranks (for `run_node`)."""

    def __init__(self, config: EngineConfig, ranks: range):
        ctx = mp.get_context("spawn")
        self.config = config
        self.processes = [
            ctx.Process(target=run_worker, args=(config, rank, process_format()), name=f"llamaserve-tp{rank}",
                        daemon=True)
            for rank in ranks
        ]
        for process in self.processes:
            process.start()
        self._stopping = False

    @classmethod
    def start(cls, config: EngineConfig, on_death: Callable[[str], None]) -> tuple["WorkerGroup", EngineConfig]:
        """Rank 0: start node 0's other ranks, and a thread that reports the first one to exit. Returns them
        and the config with the rendezvous port fixed."""
        if config.parallel.master_port is None:
            port = free_port(config.parallel.master_addr)
            config = replace(config, parallel=replace(config.parallel, master_port=port))
        group = cls(config, config.parallel.node_ranks[1:])
        if group.processes:  # with one rank per node, remote deaths show as failed collectives instead
            threading.Thread(target=group._watch, args=(on_death,), name="llamaserve-worker-watch",
                             daemon=True).start()
        return group, config

    def _watch(self, on_death: Callable[[str], None]) -> None:
        ready = wait([p.sentinel for p in self.processes])
        if self._stopping:
            return
        dead = next(p for p in self.processes if p.sentinel in ready)
        dead.join()
        on_death(f"tensor-parallel worker {dead.name} died (exit code {dead.exitcode})")

    def wait(self) -> int:
        """A headless node: until every rank has exited. The first to fail ends the others (their group is
        broken); returns 0 when all stopped because rank 0 said so, else 1."""
        pending = list(self.processes)
        while pending:
            ready = wait([p.sentinel for p in pending])
            for process in [p for p in pending if p.sentinel in ready]:
                process.join()
                pending.remove(process)
                if process.exitcode != 0:
                    log.error("tensor-parallel worker %s exited with code %s; this node stops", process.name,
                              process.exitcode)
                    for other in pending:
                        other.kill()
                        other.join()
                    return 1
        return 0

    def join(self, timeout: float = 10.0) -> None:
        """After rank 0 has told the workers to stop: wait for them, kill any that hang."""
        self._stopping = True
        for process in self.processes:
            process.join(timeout)
            if process.is_alive():
                process.kill()
                process.join()


def _exit_with_parent() -> None:
    parent = mp.parent_process()
    if parent is not None:
        parent.join()
        os._exit(1)


def run_worker(config: EngineConfig, rank: int, log_format: str = "text") -> None:
    """Entry point of a worker process: load this rank's shard, then run every step rank 0 broadcasts."""
    from llamaserve.engine.model_runner import ModelRunner

    configure_process(f"tp{rank}", log_format)
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    runner = ModelRunner(config, rank)
    runner.follow()


def run_node(config: EngineConfig, log_format: str = "text") -> int:
    """A headless node (node_rank > 0): no API and no engine, only this host's ranks, which follow rank 0
    until it stops them. Returns the exit code: 0 when rank 0 shut down cleanly, 1 when a rank failed
    (rank 0 went away, a collective timed out) or the checkpoint cannot be served."""
    from llamaserve.model.architecture import ModelArchitecture
    from llamaserve.model.loader import resolve_checkpoint
    from llamaserve.model.sharding import heads_per_rank

    parallel = config.parallel
    configure_process(f"node{parallel.node_rank}", log_format)
    try:  # as rank 0 does: convert the checkpoint once and check that it splits before any rank starts
        checkpoint = resolve_checkpoint(config.model.model, config.model.cache_dir, config.model.quantization)
        heads_per_rank(ModelArchitecture.from_checkpoint(checkpoint), parallel.tensor_parallel_size)
    except (ValueError, OSError) as e:
        log.error("cannot serve this checkpoint: %s", e)
        return 1
    ranks = parallel.node_ranks
    log.info("node %d of %d: ranks %d..%d of %d join the rendezvous at %s:%d", parallel.node_rank, parallel.nnodes,
             ranks[0], ranks[-1], parallel.tensor_parallel_size, parallel.master_addr, parallel.master_port)
    code = WorkerGroup(config, ranks).wait()
    if code == 0:
        log.info("rank 0 stopped the group; node %d exits", parallel.node_rank)
    return code
