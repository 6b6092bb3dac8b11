"""Text-stream plumbing: stop strings with hold-back, SSE framing, interleaving several streams."""

import asyncio
from collections.abc import AsyncIterator, Sequence
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

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            # Starlette drops a stream whose client left without closing it; close it now, so the
            # engine requests behind it are aborted at once rather than when it is garbage-collected.
            await self.body_iterator.aclose()


def event_stream(events: AsyncIterator[str]) -> EventStreamResponse:
    """An SSE response of `events`, ended by [DONE] (after an error event if one is raised)."""
    return EventStreamResponse(error_events(events), headers=SSE_HEADERS)


class StopStringMatcher:
    """Cuts a streamed text at the first stop string. Text that could be the start of a stop string
    is held back until the next delta decides it, so a client never sees half of one."""

    def __init__(self, stop: Sequence[str]):
        self._stop = [s for s in stop if s]
        self._pending = ""  # received, not yet released: a possible beginning of a stop string
        self.stopped = False

    def push(self, delta: str) -> str:
        """The text that is safe to release. After a match it returns the text up to the stop string,
        sets `stopped`, and everything after is dropped."""
        if not self._stop or self.stopped:
            return "" if self.stopped else delta
        text = self._pending + delta  # released text ends before any possible match: search only this
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.stopped, self._pending = True, ""
            return text[: min(hits)]
        held = max((_overlap(text, s) for s in self._stop), default=0)
        self._pending = text[len(text) - held :]
        return text[: len(text) - held]

    def flush(self) -> str:
        """At the end of generation: a held-back partial match never completed, so it is text."""
        text, self._pending = self._pending, ""
        return text


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


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
