"""The app factory: `create_app` builds the `Gateway` (policy) for a config and the route
table that maps each endpoint to its edge handler, with the error shape for every status
(starlette's own 404 and 405, a bug's 500) and the guard in front."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tagrouter_fast.serve.config import Config, ConfigError
from tagrouter_fast.serve.edge.admin import admin, admin_remove
from tagrouter_fast.serve.edge.auth import authenticate
from tagrouter_fast.serve.edge.completions import completion
from tagrouter_fast.serve.edge.conversations import ResponseStore
from tagrouter_fast.serve.edge.errors import ApiError
from tagrouter_fast.serve.edge.feedback import feedback, route_only
from tagrouter_fast.serve.edge.middleware import Guard
from tagrouter_fast.serve.edge.protocol_routes import (
    count_tokens_endpoint,
    messages_endpoint,
    responses_endpoint,
)
from tagrouter_fast.serve.edge.shadow_admin import (
    admin_mode,
    admin_report,
    admin_traffic,
    dashboard,
)
from tagrouter_fast.serve.learn.keys import ROUTE
from tagrouter_fast.serve.metrics import CONTENT_TYPE_LATEST
from tagrouter_fast.serve.policy.gateway import Gateway

if TYPE_CHECKING:
    from tagrouter_fast.router import TagRouter

__all__ = ["create_app"]

Endpoint = Callable[[Request], Awaitable[Response]]


def create_app(config: Config, *, router: TagRouter | None = None) -> Starlette:
    """The gateway app for ``config``.

    Args:
        config: the checked config (`load_config`).
        router: route with this router instead of loading ``config.router.bundle`` (tests,
            embedding).

    Raises:
        ConfigError: no bundle and no router, a routed model without a backend, an API key or
            admin token environment variable that is not set.
    """
    if router is None:
        from tagrouter_fast.router import TagRouter

        if config.router.bundle is None:
            raise ConfigError("router.bundle", "missing")
        router = TagRouter.load(config.router.bundle)
    gw = Gateway(config, router)

    def on(handler: Callable[[Gateway, Request], Awaitable[Response]]) -> Endpoint:
        # An async function of the request alone: starlette runs anything else in a thread.
        async def endpoint(request: Request) -> Response:
            return await handler(gw, request)

        return endpoint

    # Responses API answers kept for previous_response_id (the gateway's, bounded).
    responses = ResponseStore(config.sessions.max_stored_responses,
                              config.sessions.stored_response_ttl_s)

    async def chat(request: Request) -> Response:
        return await completion(gw, request, chat=True)

    async def completions(request: Request) -> Response:
        return await completion(gw, request, chat=False)

    async def models(request: Request) -> Response:
        authenticate(gw, request, ROUTE, "GET /v1/models")
        now = int(time.time())
        ids = list(gw.config.router.aliases) + list(gw.backends)
        return JSONResponse({"object": "list", "data": [
            {"id": m, "object": "model", "created": now, "owned_by": "tagrouter"} for m in ids
        ]})

    async def metrics(request: Request) -> Response:
        return Response(gw.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if not gw.ready:
            return JSONResponse({"status": "starting"}, status_code=503)
        learner = gw.learner
        stats = learner.stats() if learner is not None else {}
        state = {
            "models": gw.router.decider.models,
            "store_version": learner.version if learner is not None else None,
            **({"shared": stats["shared"]} if "shared" in stats else {}),
        }
        failure = learner.failure if learner is not None else None
        if failure is not None:
            # Routing still works, but every feedback gets 503 until a restart: a replica that
            # cannot learn is taken out of rotation rather than silently dropping outcomes.
            return JSONResponse({
                "status": "degraded",
                "reason": f"feedback cannot be recorded: {failure}; restart the gateway once "
                          "its state directory is writable",
                **state,
            }, status_code=503)
        return JSONResponse({"status": "ready", **state})

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def on_http_error(request: Request, exc: Exception) -> Response:
        # Starlette's own 404 (no route) and 405 (route, other method), in our error shape.
        assert isinstance(exc, HTTPException)
        where = f"{request.method} {request.url.path[:200]}"
        if exc.status_code == 404:
            return ApiError(404, f"no endpoint {where} (see docs/serving.md)",
                            code="not_found").response()
        if exc.status_code == 405:
            allowed = next((v for k, v in (exc.headers or {}).items() if k.lower() == "allow"),
                           "")
            return ApiError(405, f"{where}: method not allowed (allowed: {allowed})",
                            code="method_not_allowed", headers=exc.headers).response()
        return ApiError(exc.status_code, f"{where}: {exc.detail}",
                        headers=exc.headers).response()

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        # A bug: the client gets the documented shape and nothing of the internals; starlette
        # re-raises after this answer, so the server logs the traceback once.
        return ApiError(500, "internal error in the gateway (logged on the server)",
                        kind="server_error", code="internal_error").response()

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/responses", responses_endpoint(gw, responses), methods=["POST"]),
            Route("/v1/messages", messages_endpoint(gw), methods=["POST"]),
            Route("/v1/messages/count_tokens", count_tokens_endpoint(gw), methods=["POST"]),
            Route("/v1/route", on(route_only), methods=["POST"]),
            Route("/v1/feedback", on(feedback), methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/admin/models/{name}", on(admin_remove), methods=["DELETE"]),
            Route("/admin/mode", on(admin_mode), methods=["POST"]),
            Route("/admin/report", on(admin_report), methods=["GET"]),
            Route("/admin/traffic", on(admin_traffic), methods=["GET"]),
            Route("/dashboard", on(dashboard), methods=["GET"]),
            Route("/admin/{action}", on(admin), methods=["POST"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
        ],
        exception_handlers={ApiError: on_api_error, HTTPException: on_http_error,
                            Exception: on_unexpected},
        lifespan=gw.lifespan,
    )
    app.state.gateway = gw
    app.add_middleware(Guard, gw=gw)  # type: ignore[arg-type]
    return app

