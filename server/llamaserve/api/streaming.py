"""Stream plumbing: SSE on sse-starlette, errors inside a started stream, interleaving several streams.

A stream's headers go out as soon as it opens; from then on a keep-alive comment (`: ping`) every
`ping_interval` seconds keeps proxies from cutting a stream that waits in the queue or in a long
prefill. A client that stops reading makes a write wait; past `send_timeout` the stream is aborted,
which aborts its engine requests and frees their slots and KV blocks.
"""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing

from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import AppStatus, SendTimeoutError

from llamaserve.api.errors import as_api_error
from llamaserve.api.protocol import ErrorResponse

log = logging.getLogger(__name__)

SSE_DONE = "[DONE]"
SEPARATOR = "\n"  # what OpenAI sends; sse-starlette's default is \r\n
# sse-starlette ends every open stream (without a word) once uvicorn sees a signal; the drain
# (llamaserve.api.drain) decides instead when streams end, and ends them with an error event.
AppStatus.disable_automatic_graceful_drain()


def sse_event(payload: BaseModel) -> str:
    """The data of one event: sse-starlette frames it as `data: ...`."""
    return payload.model_dump_json()


async def error_events(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """The events, then [DONE]. An error once the stream has begun (the status line is sent) can
    only travel as an event: one `data: {"error": ...}`, then [DONE]."""
    try:
        async with aclosing(events):
            async for event in events:
                yield event
    except Exception as e:
        yield sse_event(ErrorResponse(error=as_api_error(e).info))
    yield SSE_DONE


class EventStreamResponse(EventSourceResponse):
    def __init__(self, content: AsyncIterator[str], ping_interval: float, send_timeout: float,
                 on_close: Callable[[], None] | None = None):
        super().__init__(content, headers={"Cache-Control": "no-cache"}, sep=SEPARATOR, ping=ping_interval,
                         ping_message_factory=lambda: ServerSentEvent(comment="ping", sep=SEPARATOR),
                         send_timeout=send_timeout)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            log.warning("a stream's client read nothing for %g s; the stream is aborted", self.send_timeout)
        finally:  # however the stream ended, even before its first event
            # A client gone mid-stream leaves the events suspended; closing them now aborts the engine
            # requests behind them at once, rather than when they are garbage-collected.
            await self.body_iterator.aclose()
            if self.on_close is not None:
                self.on_close()


def event_stream(events: AsyncIterator[str], ping_interval: float, send_timeout: float,
                 on_close: Callable[[], None] | None = None) -> EventStreamResponse:
    """An SSE response of `events`, ended by [DONE] (after an error event if one is raised); `on_close()`
    runs once the response is over."""
    return EventStreamResponse(error_events(events), ping_interval, send_timeout, on_close)


async def merge(iterators: Sequence[AsyncIterator]) -> AsyncIterator:
    """Items of several async iterators as they arrive. An error in one ends the merge with that
    error; leaving the merge early (a cancelled client) cancels every iterator, which in turn
    aborts their engine requests."""
    if len(iterators) == 1:  # the common case needs no tasks
        async with aclosing(iterators[0]) as iterator:
            async for item in iterator:
                yield item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def drain(iterator: AsyncIterator) -> None:
        try:
            async for item in iterator:
                queue.put_nowait((item, None))
            queue.put_nowait((done, None))
        except Exception as e:  # handed to the consumer, which raises it
            queue.put_nowait((done, e))

    tasks = [asyncio.create_task(drain(it)) for it in iterators]
    try:
        remaining = len(tasks)
        while remaining:
            item, error = await queue.get()
            if error is not None:
                raise error
            if item is done:
                remaining -= 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
