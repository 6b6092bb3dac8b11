"""The engine core in its own process, and the asyncio client the API process talks to it through.

IPC is a multiprocessing pipe with a reader and a writer thread at each end (llamaserve.engine.channel):
request adds and aborts one way, one message per engine step (every request's news and the engine's
stats) the other. When the engine process dies the pipe closes, and every waiting stream raises
EngineDeadError at once. The client also enforces deadlines, and watches the engine's progress: an
engine that holds work but finishes no step for `stall_timeout` seconds is reported stalled, and its
requests fail instead of waiting forever.
"""

import asyncio
import atexit
import copy
import logging
import multiprocessing as mp
import os
import itertools
import queue
import signal
import threading
import time
from collections.abc import AsyncIterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from llamaserve.config import EngineConfig
from llamaserve.engine.channel import Channel
from llamaserve.engine.messages import (
    AbortRequests,
    AddRequest,
    CommandResult,
    EngineStats,
    LoadAdapter,
    RequestOutput,
    StepOutputs,
    UnloadAdapter,
)
from llamaserve.logs import configure_process
from llamaserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)

WATCH_INTERVAL = 1.0  # seconds between the stall watchdog's looks (at most: a fraction of the timeout)
# While grammars compile and nothing else runs, the engine says it is alive this often: a long compile
# is progress, which the stall watchdog must not take for a wedged engine.
COMPILE_HEARTBEAT = 5.0


class EngineDeadError(RuntimeError):
    """The engine process is gone; no request can complete."""


class EngineStalledError(EngineDeadError):
    """The engine holds work but has finished no step for longer than the stall timeout."""


class RequestTimeoutError(RuntimeError):
    """The request passed its deadline; it was aborted in the engine."""


@dataclass
class EngineReady:
    num_kv_blocks: int
    block_size: int
    max_model_len: int
    vocab_size: int
    checkpoint: str  # the resolved checkpoint directory (tokenizer files live there)
    dtype: str  # of the weights and the KV cache
    tensor_parallel_size: int
    lora_enabled: bool = False
    adapters: dict[str, str] = field(default_factory=dict)  # LoRA adapters registered at start: name -> folder


@dataclass
class EngineFailed:
    error: str


class Shutdown:
    pass


class GrammarCompiled:
    """Put in the engine's inbox by a grammar thread: a compile finished, so the idle loop steps again
    (and admits the request that waited for it)."""


def _exit_engine(reason: str) -> None:
    """A tensor-parallel worker died: the model cannot run another step. Exiting at once closes the
    pipe, so the API process fails every pending request and reports the engine dead."""
    log.error("%s; the engine exits", reason)
    os._exit(1)


@contextmanager
def _shutdown_signals_ignored():
    """Processes started inside ignore SIGINT and SIGTERM (the dispositions survive exec; Python keeps an
    ignored SIGINT ignored), and so do the workers they start: Ctrl+C or a control group's SIGTERM reaches
    every process, and only the API process may act on it, by draining, then stopping the engine. Here the
    signals are blocked meanwhile, so one that arrives is delivered to the restored handler, not lost."""
    signals = {signal.SIGINT, signal.SIGTERM}
    if threading.current_thread() is not threading.main_thread():  # handlers can only change there
        yield
        return
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _next_messages(inbox: queue.SimpleQueue, wait: float) -> list:
    """Whatever has arrived, after waiting up to `wait` seconds for the first message (0: don't wait)."""
    messages = []
    try:
        messages.append(inbox.get(timeout=wait) if wait else inbox.get_nowait())
        while True:
            messages.append(inbox.get_nowait())
    except queue.Empty:
        return messages


def run_engine_core(config: EngineConfig, conn, log_format: str = "text") -> None:
    """Entry point of the engine process: step while there is work, wait for messages when idle."""
    from llamaserve.engine.core import EngineCore  # torch is imported in this process only

    configure_process("engine", log_format)
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    try:
        core = EngineCore(config, on_worker_death=_exit_engine, wake=lambda: inbox.put(GrammarCompiled()))
    except Exception as e:  # report why startup failed instead of dying silently
        conn.send(EngineFailed(f"{type(e).__name__}: {e}"))
        raise
    conn.send(EngineReady(core.runner.num_blocks, config.cache.block_size, config.scheduler.max_model_len,
                          core.runner.arch.vocab_size, str(core.runner.checkpoint), config.model.dtype,
                          config.parallel.tensor_parallel_size, config.lora.enabled, dict(core.runner.adapters)))
    channel = Channel(conn, inbox.put, "engine")
    idle_wait = config.parallel.distributed_timeout / 4  # tensor-parallel workers hear from rank 0 this often
    try:
        while True:
            refused = []  # outputs for requests the engine cannot run
            wait = idle_wait
            if core.has_work():
                wait = 0
            elif core.num_compiling:  # a finished compile puts GrammarCompiled in the inbox, ending the wait
                wait = min(idle_wait, COMPILE_HEARTBEAT)
            messages = _next_messages(inbox, wait)
            for message in messages:
                if message is None or isinstance(message, Shutdown):  # None: the API process has gone
                    return
                if isinstance(message, AddRequest):
                    error = core.add_request(message)
                    if error is not None:
                        refused.append(error)
                elif isinstance(message, AbortRequests):
                    core.abort(message.request_ids)
                elif isinstance(message, LoadAdapter | UnloadAdapter):
                    channel.send(core.run_command(message))
            if core.has_work() or refused:
                # Every step sends a message, outputs or not: the API's stall watchdog counts on it.
                outputs = refused + (core.step() if core.has_work() else [])
                channel.send(StepOutputs(outputs, copy.copy(core.stats)))
            elif not messages:
                core.runner.keepalive()
                if core.num_compiling:
                    channel.send(StepOutputs([], copy.copy(core.stats)))  # the compile heartbeat
    except Exception:  # a fault no request owns (see llamaserve.engine.faults): the server must restart
        log.exception("the engine cannot go on")
        os._exit(1)
    finally:
        channel.close()
        core.shutdown()


class AsyncEngineClient:
    """Owned by the API process. `generate` yields a request's outputs as its engine steps finish."""

    def __init__(self, process, conn, ready: EngineReady, stall_timeout: float | None = None):
        self.process = process
        self.ready = ready
        self.stall_timeout = stall_timeout  # None: no watchdog
        self._conn = conn
        self._streams: dict[str, asyncio.Queue] = {}  # outputs, or an exception to raise, per request
        self._unfinished: set[str] = set()  # sent to the engine, its end not heard of yet
        self._progress_time = time.monotonic()  # of the engine's latest step, or since it had work
        self._dead: EngineDeadError | None = None
        self._stalled = False
        self._closed = False
        self.stats = EngineStats()  # as of the latest step
        self._loop: asyncio.AbstractEventLoop | None = None
        self._channel: Channel | None = None
        self._commands: dict[int, asyncio.Future] = {}  # command id -> its CommandResult's error
        self._command_ids = itertools.count()

    @classmethod
    async def start(cls, config: EngineConfig, log_format: str = "text",
                    stall_timeout: float | None = None) -> "AsyncEngineClient":
        """Start the engine process (it logs in `log_format`, text or json) and wait until it is ready."""
        ctx = mp.get_context("spawn")  # a clean interpreter: no inherited event loop or threads
        conn, child_conn = ctx.Pipe()
        # Not a daemon: it starts tensor-parallel workers. It exits by itself when this process goes (EOF).
        process = ctx.Process(target=run_engine_core, args=(config, child_conn, log_format), name="llamaserve-engine")
        with _shutdown_signals_ignored():
            process.start()
        child_conn.close()  # so the pipe reports EOF when the engine process dies
        try:
            ready = await asyncio.to_thread(conn.recv)
        except EOFError:
            ready = EngineFailed(f"engine process exited with code {process.exitcode} while starting")
        if isinstance(ready, EngineFailed):
            process.join(timeout=5)
            raise EngineDeadError(f"engine failed to start: {ready.error}")
        client = cls(process, conn, ready, stall_timeout)
        client._attach(asyncio.get_running_loop())
        # At interpreter exit multiprocessing joins the (non-daemon) engine: stop it first (atexit runs
        # this before multiprocessing's own hook, registered earlier).
        atexit.register(client.shutdown)
        return client

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._channel = Channel(self._conn, self._deliver, "engine-client")
        if self.stall_timeout is not None:
            loop.call_later(min(WATCH_INTERVAL, self.stall_timeout / 4), self._watch)

    @property
    def is_alive(self) -> bool:
        return self._dead is None and self.process.is_alive()

    @property
    def is_stalled(self) -> bool:
        """The watchdog found the engine wedged; it clears when a step completes again."""
        return self._stalled

    def _deliver(self, message: StepOutputs | None) -> None:
        """On the channel's reader thread: hand the message to the event loop."""
        try:
            self._loop.call_soon_threadsafe(self._on_message, message)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            pass

    def _on_message(self, message: StepOutputs | CommandResult | None) -> None:
        if message is None:  # the pipe closed: the engine process is gone
            self.engine_exited()
            return
        if isinstance(message, CommandResult):
            future = self._commands.pop(message.command_id, None)
            if future is not None and not future.done():
                future.set_result(message.error)
            return
        self._progress_time = time.monotonic()
        if self._stalled:
            log.warning("the engine completes steps again")
            self._stalled = False
        self.stats = message.stats
        for output in message.outputs:
            if output.finished:
                self._unfinished.discard(output.request_id)
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.put_nowait(output)

    def _watch(self) -> None:
        """The stall watchdog, every few seconds while the engine lives."""
        if self._dead is not None or self._closed:
            return
        waited = time.monotonic() - self._progress_time
        if self._unfinished and not self._stalled and waited > self.stall_timeout:
            self._stalled = True
            log.error("the engine has finished no step for %.0f s while holding %d requests; they fail",
                      waited, len(self._unfinished))
            self.interrupt(EngineStalledError(f"the engine has made no progress for {waited:.0f} s"))
        self._loop.call_later(min(WATCH_INTERVAL, self.stall_timeout / 4), self._watch)

    def interrupt(self, error: Exception) -> None:
        """Every request waiting on the engine raises `error` and is aborted (a drain's deadline)."""
        for stream in self._streams.values():
            stream.put_nowait(error)

    def engine_exited(self) -> None:
        """The engine process is gone (its pipe closed, or its sentinel says so): every waiting request and
        command fails with EngineDeadError. Idempotent."""
        if self._dead is not None or self._closed:  # closed: it exited because it was told to
            return
        self.process.join(timeout=1)
        self._dead = EngineDeadError(f"the engine process died (exit code {self.process.exitcode})")
        log.error("%s", self._dead)
        for stream in self._streams.values():
            stream.put_nowait(self._dead)
        for future in self._commands.values():
            if not future.done():
                future.set_exception(self._dead)

    def _send(self, message) -> None:
        if self._dead is not None:
            raise self._dead
        self._channel.send(message)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams, priority: int = 0,
        deadline: float | None = None, lora: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request until it finishes. Leaving the loop early (a client that went away, a
        cancelled task) aborts the request in the engine, freeing its KV blocks. Past `deadline` (a
        time.monotonic() time) the request is aborted and RequestTimeoutError raised."""
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        if self._stalled:
            raise EngineStalledError("the engine is stalled")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        timer = None
        if deadline is not None:
            timer = self._loop.call_later(max(0.0, deadline - time.monotonic()), stream.put_nowait,
                                          RequestTimeoutError(f"request {request_id} passed its deadline"))
        finished = False
        try:
            self._send(AddRequest(request_id, list(prompt_token_ids), sampling_params, priority, lora=lora))
            if not self._unfinished:  # the engine had nothing to do: the watchdog counts from now
                self._progress_time = time.monotonic()
            self._unfinished.add(request_id)
            while not finished:
                output = await stream.get()
                if isinstance(output, Exception):
                    raise output
                finished = output.finished
                yield output
        finally:
            if timer is not None:
                timer.cancel()
            del self._streams[request_id]
            if not finished and self._dead is None:
                self.abort(request_id)

    async def load_adapter(self, name: str, path: str) -> None:
        """Registers a LoRA adapter folder in the engine; ValueError with the reason when it cannot."""
        await self._command(LoadAdapter(next(self._command_ids), name, path))

    async def unload_adapter(self, name: str) -> None:
        await self._command(UnloadAdapter(next(self._command_ids), name))

    async def _command(self, command: LoadAdapter | UnloadAdapter) -> None:
        future = self._loop.create_future()
        self._commands[command.command_id] = future
        self._send(command)
        error = await future
        if error is not None:
            raise ValueError(error)

    def abort(self, request_id: str) -> None:
        self._unfinished.discard(request_id)
        try:
            self._send(AbortRequests([request_id]))
        except EngineDeadError:
            pass

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the engine process: asked to, then killed after `timeout` seconds. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._channel is not None:
            self._channel.send(Shutdown())
            self._channel.close()
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._conn.close()
