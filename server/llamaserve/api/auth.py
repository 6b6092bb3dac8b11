"""API keys: `Authorization: Bearer KEY` on every route but the open ones, compared in constant time.

Deny by default: a route added later (a new generation route) needs a key without anyone remembering
to ask for one. Open: the probes a load balancer or orchestrator polls, /metrics unless protected, and
the OpenAPI documentation. The check runs before the body is read, so an unauthenticated client learns
nothing about what its request would have done.
"""

import hashlib
import hmac
from collections.abc import Callable, Iterable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from llamaserve.api.errors import APIError

OPEN = frozenset({"/health", "/ready", "/docs", "/docs/oauth2-redirect", "/openapi.json"})


def unauthorized() -> APIError:
    return APIError(401, "Incorrect or missing API key: send it as `Authorization: Bearer KEY`",
                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class APIKeys:
    """The accepted keys, held as SHA-256 digests: comparing equal-length digests with compare_digest,
    against every key, takes the same time whatever the key sent."""

    def __init__(self, keys: Iterable[str]):
        self._digests = [hashlib.sha256(key.encode()).digest() for key in keys]

    def accepts(self, authorization: str | None) -> bool:
        scheme, _, key = (authorization or "").partition(" ")
        sent = hashlib.sha256(key.strip().encode(errors="surrogatepass")).digest()
        matches = [hmac.compare_digest(sent, digest) for digest in self._digests]
        return scheme.lower() == "bearer" and any(matches)


class AuthMiddleware:
    def __init__(self, app: ASGIApp, keys: APIKeys, protect_metrics: bool,
                 on_refused: Callable[[Scope, APIError], None]):
        self.app = app
        self.keys = keys
        self.open = OPEN if protect_metrics else OPEN | {"/metrics"}
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        if not self.keys.accepts(Headers(scope=scope).get("authorization")):
            error = unauthorized()
            self.on_refused(scope, error)
            return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)
