"""Graceful drain: what SIGTERM (or Ctrl+C) starts, so that a rolling restart behind a load balancer
loses no request.

    signal --> /ready 503, requests still served --(drain_grace)--> new requests refused: 503 + Retry-After
           --> in-flight requests (streams too) finish --(drain_timeout at most)--> leftovers cut with an
               error (in a stream: an error event, then [DONE]) --> the HTTP server stops; exit 0

The grace lets a balancer that polls /ready move traffic away before anything is refused; a balancer
that retries on 503 (nginx's `proxy_next_upstream http_503`) hides the refusals too. A second signal
skips to the cut. /health, /ready and /metrics answer throughout, so liveness never kills a draining
server. The engine processes ignore the signals: the API process owns their lifecycle (see
llamaserve.engine.client), so a signal to the whole process group drains like one to this process.
"""

import asyncio
import logging
from collections.abc import Callable

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from llamaserve.api.errors import APIError

log = logging.getLogger(__name__)

PROBES = frozenset({"/health", "/ready", "/metrics"})  # answered while draining; not counted as in flight
CUT_WAIT = 5.0  # seconds the cut requests get to send their error before the server stops regardless
RETRY_AFTER = "1"


def shutting_down() -> APIError:
    """A new request refused while draining."""
    return APIError(503, "the server is shutting down; retry on another replica", code="server_shutting_down",
                    headers={"Retry-After": RETRY_AFTER})


def cut_short() -> APIError:
    """A request still running at the drain's deadline."""
    return APIError(503, "the server shut down before the request finished (--drain-timeout)",
                    code="server_shutting_down")


class Drain:
    """The server's shutdown state, and the drain's timeline once `begin()` is called (on the event loop).

    `on_cut()` fails the requests still running at the deadline; `on_done()` stops the HTTP server. Both
    are set by their owners (the app's lifespan, the uvicorn server) before a drain can begin."""

    def __init__(self, grace: float, timeout: float):
        self.grace = grace
        self.timeout = timeout
        self.ready = False  # serving normally; the lifespan sets it once the model is loaded
        self.refusing = False  # new requests get 503
        self.in_flight = 0  # requests being answered, probes aside
        self.on_cut: Callable[[], None] = lambda: None
        self.on_done: Callable[[], None] = lambda: None
        self._task: asyncio.Task | None = None
        self._hurry: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None

    @property
    def started(self) -> bool:
        return self._task is not None

    def begin(self) -> None:
        """A shutdown signal: starts the drain, or (a second one) ends it at once."""
        if self._task is None:
            self._hurry, self._idle = asyncio.Event(), asyncio.Event()
            if self.in_flight == 0:
                self._idle.set()
            self._task = asyncio.create_task(self._run(), name="llamaserve-drain")
        else:
            log.warning("a second shutdown signal: ending the drain now")
            self._hurry.set()

    def end_now(self) -> None:
        """No drain worth having (the engine died): refuse, cut and stop without waiting."""
        self.begin()
        self._hurry.set()

    async def _run(self) -> None:
        was_ready, self.ready = self.ready, False
        if was_ready and not self._hurry.is_set():
            log.info("draining: /ready says 503; serving new requests for %g s more", self.grace)
            await self._wait(self._hurry, self.grace)
        self.refusing = True
        if self.in_flight:
            log.info("draining: refusing new requests; %d in flight, given up to %g s", self.in_flight, self.timeout)
            await self._wait(self._idle, self.timeout, or_hurry=True)
        if self.in_flight:
            log.warning("draining: %d requests still in flight; cutting them", self.in_flight)
            self.on_cut()
            await self._wait(self._idle, CUT_WAIT)
        log.info("drained; stopping")
        self.on_done()

    async def _wait(self, event: asyncio.Event, seconds: float, or_hurry: bool = False) -> None:
        waiters = [asyncio.ensure_future(event.wait())]
        if or_hurry:
            waiters.append(asyncio.ensure_future(self._hurry.wait()))
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    def enter(self) -> None:
        self.in_flight += 1
        if self._idle is not None:
            self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()


class DrainMiddleware:
    """Counts the requests in flight (the drain waits for them) and refuses new ones once it refuses."""

    def __init__(self, app: ASGIApp, drain: Drain, on_refused: Callable[[Scope, APIError], None]):
        self.app = app
        self.drain = drain
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBES:
            return await self.app(scope, receive, send)
        if self.drain.refusing:
            error = shutting_down()
            self.on_refused(scope, error)
            return await error.response()(scope, receive, send)
        self.drain.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.leave()


class DrainingServer(uvicorn.Server):
    """uvicorn, with shutdown signals handed to the drain instead of stopping the server at once; the
    server stops when the drain is over (uvicorn then closes the listener and ends the lifespan)."""

    def __init__(self, config: uvicorn.Config, drain: Drain):
        super().__init__(config)
        self.drain = drain
        drain.on_done = self._stop
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig, frame) -> None:
        # A signal handler interrupts the loop's own thread: hand the work to the loop.
        if self._loop is None:  # not serving yet
            self.should_exit = True
        else:
            self._loop.call_soon_threadsafe(self.drain.begin)

    def _stop(self) -> None:
        self.should_exit = True
