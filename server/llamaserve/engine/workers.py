"""Tensor-parallel worker processes: ranks 1 .. tp-1 (rank 0 is the engine core's own model runner).

Every rank joins one torch.distributed group (NCCL on GPUs, gloo on CPU) by TCP rendezvous at
MASTER_ADDR:MASTER_PORT, so the same code spans hosts. A worker runs each step that rank 0 broadcasts
and never samples. Failure is loud on both sides: rank 0 watches its workers and calls `on_death`
when one exits (the engine process then exits, which the API process sees at once), and a worker
whose parent has gone exits too.
"""

import logging
import multiprocessing as mp
import os
import socket
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


def init_process_group(config: EngineConfig, rank: int, device: torch.device) -> dist.ProcessGroup:
    """Join the tensor-parallel group; returns the gloo group that step metadata travels on (on CPU
    the group itself; on GPUs a second, CPU-side group beside the NCCL one)."""
    parallel = config.parallel
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
    """Ranks 1 .. tp-1 as spawned processes, and a thread that reports the first one to exit."""

    def __init__(self, config: EngineConfig, on_death: Callable[[str], None]):
        ctx = mp.get_context("spawn")
        self.config = config
        self.processes = [
            ctx.Process(target=run_worker, args=(config, rank, process_format()), name=f"llamaserve-tp{rank}",
                        daemon=True)
            for rank in range(1, config.parallel.tensor_parallel_size)
        ]
        for process in self.processes:
            process.start()
        self._stopping = False
        self._on_death = on_death
        threading.Thread(target=self._watch, name="llamaserve-worker-watch", daemon=True).start()

    @classmethod
    def start(cls, config: EngineConfig, on_death: Callable[[str], None]) -> tuple["WorkerGroup", EngineConfig]:
        """Start the workers; returns them and the config with the rendezvous port fixed, for rank 0."""
        if config.parallel.master_port is None:
            port = free_port(config.parallel.master_addr)
            config = replace(config, parallel=replace(config.parallel, master_port=port))
        return cls(config, on_death), config

    def _watch(self) -> None:
        ready = wait([p.sentinel for p in self.processes])
        if self._stopping:
            return
        dead = next(p for p in self.processes if p.sentinel in ready)
        dead.join()
        self._on_death(f"tensor-parallel worker {dead.name} died (exit code {dead.exitcode})")

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
