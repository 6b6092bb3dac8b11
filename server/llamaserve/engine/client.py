"""The engine core in its own process, and the asyncio client the API process talks to it through.

IPC is a multiprocessing pipe: request adds and aborts one way, one message per engine step (every
request's new tokens) the other. The client watches the pipe from the event loop; when the engine
process dies the pipe closes, and every waiting stream raises EngineDeadError at once.
"""

import asyncio
import atexit
import copy
import logging
import multiprocessing as mp
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

from llamaserve.config import EngineConfig
from llamaserve.engine.messages import AbortRequests, AddRequest, EngineStats, RequestOutput, StepOutputs
from llamaserve.logs import configure_process
from llamaserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine process is gone; no request can complete."""


@dataclass
class EngineReady:
    num_kv_blocks: int
    block_size: int
    max_model_len: int
    vocab_size: int
    checkpoint: str  # the resolved checkpoint directory (tokenizer files live there)
    dtype: str  # of the weights and the KV cache
    tensor_parallel_size: int


@dataclass
class EngineFailed:
    error: str


class Shutdown:
    pass


def _exit_engine(reason: str) -> None:
    """A tensor-parallel worker died: the model cannot run another step. Exiting at once closes the
    pipe, so the API process fails every pending request and reports the engine dead."""
    log.error("%s; the engine exits", reason)
    os._exit(1)


def run_engine_core(config: EngineConfig, conn, log_format: str = "text") -> None:
    """Entry point of the engine process: step while there is work, block on the pipe when idle."""
    from llamaserve.engine.core import EngineCore  # torch is imported in this process only

    configure_process("engine", log_format)
    try:
        core = EngineCore(config, on_worker_death=_exit_engine)
    except Exception as e:  # report why startup failed instead of dying silently
        conn.send(EngineFailed(f"{type(e).__name__}: {e}"))
        raise
    conn.send(EngineReady(core.runner.num_blocks, config.cache.block_size, config.scheduler.max_model_len,
                          core.runner.arch.vocab_size, str(core.runner.checkpoint), config.model.dtype,
                          config.parallel.tensor_parallel_size))
    try:
        while True:
            refused = []  # outputs for requests the engine cannot run
            # Block while there is nothing to do; otherwise take whatever arrived and step at once.
            while conn.poll(0 if core.has_work() or refused else None):
                message = conn.recv()
                if isinstance(message, AddRequest):
                    error = core.add_request(message)
                    if error is not None:
                        refused.append(error)
                elif isinstance(message, AbortRequests):
                    core.abort(message.request_ids)
                elif isinstance(message, Shutdown):
                    return
            outputs = refused + (core.step() if core.has_work() else [])
            if outputs:
                conn.send(StepOutputs(outputs, copy.copy(core.stats)))
    except (EOFError, BrokenPipeError):
        pass  # the client went away: nothing left to serve
    finally:
        core.shutdown()


class AsyncEngineClient:
    """Owned by the API process. `generate` yields a request's outputs as its engine steps finish."""

    def __init__(self, process, conn, ready: EngineReady):
        self.process = process
        self.ready = ready
        self._conn = conn
        self._streams: dict[str, asyncio.Queue] = {}
        self._dead: EngineDeadError | None = None
        self.stats = EngineStats()  # as of the latest step
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    async def start(cls, config: EngineConfig, log_format: str = "text") -> "AsyncEngineClient":
        """Start the engine process (it logs in `log_format`, text or json) and wait until it is ready."""
        ctx = mp.get_context("spawn")  # a clean interpreter: no inherited event loop or threads
        conn, child_conn = ctx.Pipe()
        # Not a daemon: it starts tensor-parallel workers. It exits by itself when this process goes (EOF).
        process = ctx.Process(target=run_engine_core, args=(config, child_conn, log_format), name="llamaserve-engine")
        process.start()
        child_conn.close()  # so the pipe reports EOF when the engine process dies
        # At interpreter exit multiprocessing joins the (non-daemon) engine, which exits on EOF: close
        # our end first (atexit runs this before multiprocessing's own hook, registered earlier).
        atexit.register(conn.close)
        try:
            ready = await asyncio.to_thread(conn.recv)
        except EOFError:
            ready = EngineFailed(f"engine process exited with code {process.exitcode} while starting")
        if isinstance(ready, EngineFailed):
            process.join(timeout=5)
            raise EngineDeadError(f"engine failed to start: {ready.error}")
        client = cls(process, conn, ready)
        client._attach(asyncio.get_running_loop())
        return client

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self._conn.fileno(), self._on_readable)

    @property
    def num_requests(self) -> int:
        """Requests generating now (running or queued in the engine)."""
        return len(self._streams)

    @property
    def is_alive(self) -> bool:
        return self._dead is None and self.process.is_alive()

    def _on_readable(self) -> None:
        try:
            while self._conn.poll():
                message: StepOutputs = self._conn.recv()
                self.stats = message.stats
                for output in message.outputs:
                    stream = self._streams.get(output.request_id)
                    if stream is not None:
                        stream.put_nowait(output)
        except (EOFError, OSError):
            self._engine_died()

    def _engine_died(self) -> None:
        if self._dead is not None:
            return
        self.process.join(timeout=1)
        self._dead = EngineDeadError(f"the engine process died (exit code {self.process.exitcode})")
        log.error("%s", self._dead)
        self._loop.remove_reader(self._conn.fileno())
        for stream in self._streams.values():
            stream.put_nowait(self._dead)

    def _send(self, message) -> None:
        if self._dead is not None:
            raise self._dead
        try:
            self._conn.send(message)
        except (BrokenPipeError, OSError) as e:
            self._engine_died()
            raise self._dead from e

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request until it finishes. Leaving the loop early (a client that went
        away, a cancelled task) aborts the request in the engine, freeing its KV blocks."""
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        finished = False
        try:
            self._send(AddRequest(request_id, list(prompt_token_ids), sampling_params, priority))
            while not finished:
                output = await stream.get()
                if isinstance(output, EngineDeadError):
                    raise output
                finished = output.finished
                yield output
        finally:
            del self._streams[request_id]
            if not finished and self._dead is None:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        try:
            self._send(AbortRequests([request_id]))
        except EngineDeadError:
            pass

    def shutdown(self, timeout: float = 5.0) -> None:
        if self._loop is not None and self._dead is None:
            self._loop.remove_reader(self._conn.fileno())
        try:
            self._conn.send(Shutdown())
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._conn.close()
