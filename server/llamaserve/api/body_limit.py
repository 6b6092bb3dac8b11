"""The request body size limit, enforced as the bytes arrive, before FastAPI buffers and parses them."""

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llamaserve.api.errors import body_too_large


class BodyLimitMiddleware:
    """Refuses with 413 a body declared (Content-Length) or found, while being received, to be larger
    than `max_bytes`, so a client cannot make the server hold an unbounded body in memory."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await body_too_large(self.max_bytes).response()(scope, receive, send)
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                # An HTTPException passes through FastAPI's body parsing to the app's handler (errors.py).
                raise HTTPException(413, body_too_large(self.max_bytes).message)
            return message

        await self.app(scope, counting_receive, send)
