"""The FastAPI app: lifespan (engine process, tokenizer), thin routes (the OpenAI ones here, TGI's in
llamaserve.api.tgi), health and readiness, and the middleware every request passes: telemetry, TGI's error
shape on its routes, CORS (when origins are allowed), the drain, API keys, the body limit.

Shutting down is the drain's (llamaserve.api.drain): a signal starts it, `DrainingServer` stops uvicorn
when it is over. If the engine process dies while serving, /health and /ready turn 503, in-flight
requests end with an error, and the drain ends at once with `app.state.exit_code` set to 1, which the
CLI exits with.
"""

import asyncio
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from importlib.metadata import version
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import PlainTextResponse
from opentelemetry.trace import TracerProvider

from llamaserve.api.auth import APIKeys, AuthMiddleware
from llamaserve.api.body_limit import BodyLimitMiddleware
from llamaserve.api.drain import Drain, DrainMiddleware, cut_short
from llamaserve.api.errors import APIError, engine_dead, engine_stalled, install_error_handlers
from llamaserve.api.metrics import CONTENT_TYPE, Metrics, rejection_reason
from llamaserve.api.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    Health,
    LoadLoraAdapterRequest,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    UnloadLoraAdapterRequest,
)
from llamaserve.api.serving import OpenAIServing
from llamaserve.api.telemetry import Telemetry, TelemetryMiddleware
from llamaserve.api.tgi import TGIErrorMiddleware, TGIServing
from llamaserve.api.tgi import router as tgi_router
from llamaserve.api.tracing import RequestTracer, otlp_tracer_provider
from llamaserve.config import EngineConfig, ServerConfig
from llamaserve.engine.client import AsyncEngineClient
from llamaserve.tokenizer import Tokenizer

log = logging.getLogger(__name__)

ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 404, 413, 500, 503)}
STREAM_RESPONSE = {"description": "a JSON object, or with `stream: true` server-sent events of chunks",
                   "content": {"text/event-stream": {}}}

router = APIRouter()


async def get_serving(raw: Request) -> OpenAIServing:
    # async: FastAPI would run a plain function on its thread pool, a thread hop per request
    return raw.app.state.serving


@router.post("/v1/chat/completions", response_model=ChatCompletion,
             responses={**ERROR_RESPONSES, 200: STREAM_RESPONSE})
async def chat_completions(request: ChatCompletionRequest, raw: Request,
                           serving: OpenAIServing = Depends(get_serving)) -> Response:
    return await serving.chat(request, raw)


router.add_api_route("/v1/chat", chat_completions, methods=["POST"], include_in_schema=False)  # alias


@router.post("/v1/completions", response_model=Completion, responses={**ERROR_RESPONSES, 200: STREAM_RESPONSE})
async def completions(request: CompletionRequest, raw: Request,
                      serving: OpenAIServing = Depends(get_serving)) -> Response:
    return await serving.completions(request, raw)


@router.get("/v1/models")
async def models(serving: OpenAIServing = Depends(get_serving)) -> ModelList:
    return serving.models()


@router.post("/v1/load_lora_adapter", responses=ERROR_RESPONSES, response_class=PlainTextResponse)
async def load_lora_adapter(request: LoadLoraAdapterRequest, serving: OpenAIServing = Depends(get_serving)) -> str:
    """Serve a PEFT LoRA adapter folder under `lora_name` (vLLM's route)."""
    return await serving.load_adapter(request)


@router.post("/v1/unload_lora_adapter", responses=ERROR_RESPONSES, response_class=PlainTextResponse)
async def unload_lora_adapter(request: UnloadLoraAdapterRequest,
                              serving: OpenAIServing = Depends(get_serving)) -> str:
    """Stop serving an adapter; requests still running on it fail."""
    return await serving.unload_adapter(request)


@router.post("/tokenize", responses=ERROR_RESPONSES)
async def tokenize(request: TokenizeRequest, serving: OpenAIServing = Depends(get_serving)) -> TokenizeResponse:
    return await serving.tokenize(request)


@router.post("/detokenize", responses=ERROR_RESPONSES)
async def detokenize(request: DetokenizeRequest, serving: OpenAIServing = Depends(get_serving)) -> DetokenizeResponse:
    return serving.detokenize(request)


@router.get("/health", responses={503: {"model": ErrorResponse}})
async def health(serving: OpenAIServing = Depends(get_serving)) -> Health:
    """Liveness: the server and its engine process are alive and the engine makes progress; with its load."""
    if not serving.client.is_alive:
        raise engine_dead()
    if serving.client.is_stalled:
        raise engine_stalled()
    stats = serving.client.stats
    return Health(num_running=stats.num_running, num_waiting=stats.num_waiting, kv_cache_usage=stats.kv_cache_usage)


@router.get("/ready", responses={503: {"model": ErrorResponse}})
async def ready(raw: Request) -> dict[str, str]:
    """Readiness: the model is loaded, the engine alive, and the server not shutting down."""
    state = raw.app.state
    if not state.drain.ready or not state.serving.client.is_alive:
        raise APIError(503, "the server is not ready", code="not_ready")
    return {"status": "ready"}


@router.get("/metrics", include_in_schema=False)
async def metrics(raw: Request) -> Response:
    """Prometheus text format; the names are listed in the README."""
    telemetry = raw.app.state.telemetry
    if telemetry is None:
        raise APIError(503, "the server is not ready", code="not_ready")
    return Response(telemetry.metrics.render(), media_type=CONTENT_TYPE)


def create_app(engine_config: EngineConfig, server_config: ServerConfig,
               on_ready: Callable[[str], None] | None = None,
               tracer_provider: TracerProvider | None = None) -> FastAPI:
    """The app; its lifespan starts the engine process and calls `on_ready(model_name)` once serving.

    Spans go to `tracer_provider` when one is given (tests pass an in-memory exporter's), else to the
    configured OTLP endpoint; with neither, tracing is off."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        client = await AsyncEngineClient.start(engine_config, server_config.log_format,
                                               server_config.engine_stall_timeout)
        loop = asyncio.get_running_loop()
        provider, owns_provider = tracer_provider, False
        if provider is None and server_config.otlp_traces_endpoint is not None:
            provider, owns_provider = otlp_tracer_provider(server_config.otlp_traces_endpoint), True
        try:
            tokenizer = Tokenizer.from_checkpoint(client.ready.checkpoint, engine_config.model.chat_template)
            name = server_config.served_model_name or Path(client.ready.checkpoint).name
            app.state.telemetry = Telemetry(Metrics(name, client.ready, lambda: client.stats),
                                            RequestTracer(provider) if provider is not None else None,
                                            server_config.log_requests)
            app.state.serving = OpenAIServing(client, tokenizer, name, app.state.telemetry, server_config)
            app.state.tgi = TGIServing(app.state.serving, engine_config.model.device)
            # The process sentinel becomes readable when the engine process ends, for whatever reason.
            loop.add_reader(client.process.sentinel, _on_engine_exit, app, loop, client)
            drain.on_cut = lambda: client.interrupt(cut_short())
            drain.ready = True
            if on_ready is not None:
                on_ready(name)
            yield
        finally:
            drain.ready = False
            loop.remove_reader(client.process.sentinel)
            client.shutdown()
            if owns_provider:
                provider.shutdown()  # exports the spans still batched

    app = FastAPI(title="llamaserve", version=version("llamaserve"), lifespan=lifespan,
                  description="OpenAI-compatible inference server for Llama-family models")
    app.state.serving = None
    app.state.tgi = None
    app.state.telemetry = None
    app.state.drain = drain = Drain(server_config.drain_grace, server_config.drain_timeout)
    app.state.exit_code = 0  # 1 once the engine died: see the module docstring
    install_error_handlers(app, on_rejected=lambda raw, error: _count_rejection(raw.app, error))
    app.include_router(router)
    app.include_router(tgi_router)  # TGI's native routes: llamaserve.api.tgi

    def refused(scope, error: APIError) -> None:  # by a middleware, before any route
        _count_rejection(scope["app"], error)

    # Added innermost first. The drain counts whole responses, streams included; keys are checked before
    # a body is read; CORS answers preflights, which carry no key.
    app.add_middleware(BodyLimitMiddleware, max_bytes=server_config.max_request_body_bytes)
    if server_config.api_keys:
        app.add_middleware(AuthMiddleware, keys=APIKeys(server_config.api_keys),
                           protect_metrics=server_config.protect_metrics, on_refused=refused)
    app.add_middleware(DrainMiddleware, drain=drain, on_refused=refused)
    if server_config.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(server_config.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["x-request-id", "traceparent"])
    app.add_middleware(TGIErrorMiddleware)  # TGI's error shape on its routes, for every refusal above
    app.add_middleware(TelemetryMiddleware)  # outermost: it sees every refusal too
    return app


def _count_rejection(app: FastAPI, error: APIError) -> None:
    telemetry, reason = app.state.telemetry, rejection_reason(error)
    if telemetry is not None and reason is not None:
        telemetry.metrics.rejected[reason].inc()


def _on_engine_exit(app: FastAPI, loop: asyncio.AbstractEventLoop, client: AsyncEngineClient) -> None:
    loop.remove_reader(client.process.sentinel)
    log.error("the engine process died (exit code %s); shutting the server down", client.process.exitcode)
    client.engine_exited()  # its requests fail as engine_dead now, before the drain could cut them otherwise
    app.state.exit_code = 1
    app.state.drain.end_now()
