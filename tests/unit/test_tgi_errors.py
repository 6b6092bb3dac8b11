"""TGI's error shape and status codes: the mapping from the server's errors, and the middleware that gives TGI's
routes that shape whoever refuses the request (a route, a middleware, Starlette itself)."""

import asyncio

import httpx
import pytest
from fastapi import FastAPI

from llamaserve.api.auth import APIKeys, AuthMiddleware
from llamaserve.api.errors import APIError, install_error_handlers, overloaded
from llamaserve.api.tgi import TGIErrorMiddleware, tgi_error


@pytest.mark.parametrize("status,code,expected", [
    (400, None, (422, "validation")),
    (413, "request_too_large", (413, "validation")),
    (429, "overloaded", (429, "overloaded")),
    (500, "engine_error", (424, "generation")),
    (500, "internal_error", (500, "internal_error")),
    (503, "server_shutting_down", (503, "server_shutting_down")),
    (408, "request_timeout", (408, "request_timeout")),
    (401, "invalid_api_key", (401, "invalid_api_key")),
    (405, None, (405, "method_not_allowed")),
    (499, None, (499, "error")),
])
def test_status_and_error_type(status, code, expected):
    new_status, error = tgi_error(status, code, "why")
    assert (new_status, error.error_type) == expected and error.error == "why"


@pytest.fixture(scope="module")
def app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/generate")
    async def generate(body: dict) -> dict:
        if body.get("busy"):
            raise overloaded(4)
        raise APIError(500, "boom", code="engine_error")

    @app.post("/v1/completions")
    async def completions() -> dict:
        raise overloaded(4)

    @app.get("/info")
    async def info() -> dict:
        return {"model_id": "m"}

    app.add_middleware(AuthMiddleware, keys=APIKeys(["key"]), protect_metrics=False, on_refused=lambda *_: None)
    app.add_middleware(TGIErrorMiddleware)
    return app


def request(app: FastAPI, method: str, path: str, **kwargs) -> httpx.Response:
    async def send() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(send())


def test_route_and_middleware_refusals_take_tgi_shape(app):
    key = {"Authorization": "Bearer key"}
    busy = request(app, "POST", "/generate", json={"busy": True}, headers=key)
    assert busy.status_code == 429 and busy.json() == {"error": busy.json()["error"], "error_type": "overloaded"}
    assert busy.headers["retry-after"] == "1" and int(busy.headers["content-length"]) == len(busy.content)

    failed = request(app, "POST", "/generate", json={}, headers=key)
    assert failed.status_code == 424 and failed.json() == {"error": "boom", "error_type": "generation"}

    invalid = request(app, "POST", "/generate", content=b"[", headers=key)
    assert invalid.status_code == 422 and invalid.json()["error_type"] == "validation"

    unauthorized = request(app, "POST", "/generate", json={})  # refused by a middleware, before routing
    assert unauthorized.status_code == 401 and unauthorized.json()["error_type"] == "invalid_api_key"
    assert unauthorized.headers["www-authenticate"] == "Bearer"


def test_other_routes_and_successes_pass_untouched(app):
    key = {"Authorization": "Bearer key"}
    openai = request(app, "POST", "/v1/completions", headers=key)
    assert openai.status_code == 429 and set(openai.json()["error"]) == {"message", "type", "param", "code"}
    assert request(app, "GET", "/info", headers=key).json() == {"model_id": "m"}
