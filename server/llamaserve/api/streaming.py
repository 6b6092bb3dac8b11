"""Stream plumbing: SSE framing, errors inside a started stream, interleaving several streams."""

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing

from pydantic import BaseModel
from starlette.responses import StreamingResponse

from llamaserve.api.errors import as_api_error
from llamaserve.api.protocol import ErrorResponse

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream
SSE_DONE = "data: [DONE]\n\n"


def sse_event(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


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


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], headers: dict[str, str],
                 on_close: Callable[[], None] | None = None):
        super().__init__(content, headers=headers)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:  # however the stream ended, even before its first event
            if self.on_close is not None:
                self.on_close()

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            # Starlette drops a stream whose client left without closing it; close it now, so the
            # engine requests behind it are aborted at once rather than when it is garbage-collected.
            await self.body_iterator.aclose()


def event_stream(events: AsyncIterator[str], on_close: Callable[[], None] | None = None) -> EventStreamResponse:
    """An SSE response of `events`, ended by [DONE] (after an error event if one is raised); `on_close()`
    runs once the response is over."""
    return EventStreamResponse(error_events(events), SSE_HEADERS, on_close)


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
