"""Shadow mode's endpoints (docs/shadow.md): the mode switch, the report, the traffic summary
and the dashboard page.

``POST /admin/mode`` ``{"mode"?, "theta"?, "share"?}`` switches at once and durably
(`ShadowService.switch`); ``GET /admin/report`` is `build_report` of the state directory
(``?target=0.98``); ``GET /admin/traffic`` is the mode, theta and the routed requests per model
and reason; all three need the admin token. ``GET /dashboard`` is the page itself, a package
asset holding no data: it asks for the token and reads the two GET endpoints with it.
"""

from __future__ import annotations

import math
from importlib import resources
from typing import TYPE_CHECKING, Any

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tagrouter_fast.core import finite_for_json
from tagrouter_fast.serve.config import ConfigError
from tagrouter_fast.serve.edge.auth import check_admin
from tagrouter_fast.serve.edge.bodies import read_json
from tagrouter_fast.serve.edge.errors import ApiError, bad

if TYPE_CHECKING:
    from tagrouter_fast.serve.policy.gateway import Gateway

__all__ = ["admin_mode", "admin_report", "admin_traffic", "dashboard"]

#: The page may run its own inline script and style and call this origin, nothing else.
_PAGE_HEADERS = {
    "cache-control": "no-store",
    "content-security-policy": "default-src 'none'; script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'; connect-src 'self'; img-src data:; form-action 'none'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def _page() -> bytes:
    return (resources.files("tagrouter_fast.serve.shadow") / "assets" / "dashboard.html"
            ).read_bytes()


async def dashboard(gw: Gateway, request: Request) -> Response:
    return Response(_page(), media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)


def _number(body: dict[str, Any], key: str, lo: float = -math.inf,
            hi: float = math.inf) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or not lo <= v <= hi:
        raise bad(key, f"must be a finite number in [{lo:g}, {hi:g}], got {v!r}")
    return float(v)


async def admin_mode(gw: Gateway, request: Request) -> Response:
    check_admin(gw, request)
    shadow = gw.shadow
    if shadow is None:
        raise ApiError(409, "shadow mode is off: add a [shadow] table to the config",
                       code="shadow_off")
    body = await read_json(request, gw.config.limits.max_body_bytes, allow_empty=True)
    extra = sorted(set(body) - {"mode", "theta", "share"})
    if extra:
        raise bad(extra[0], "unknown field (known: mode, theta, share)")
    if not body:
        return JSONResponse(finite_for_json(shadow.state()))
    mode = body.get("mode")
    if mode is not None and not isinstance(mode, str):
        raise bad("mode", f"must be a string, got {mode!r}")
    theta, share = _number(body, "theta"), _number(body, "share", 0.0, 1.0)
    try:
        result = await anyio.to_thread.run_sync(lambda: shadow.switch(mode, theta, share))
    except ConfigError as e:
        raise ApiError(400, str(e), param=e.key.removeprefix("shadow.")) from None
    except OSError as e:
        raise ApiError(500, f"admin mode: {e} (nothing changed)", kind="server_error",
                       code="file_error") from None
    return JSONResponse(finite_for_json(result))


async def admin_report(gw: Gateway, request: Request) -> Response:
    check_admin(gw, request)
    from tagrouter_fast.serve.shadow.report import build_report

    state_dir = gw.config.feedback.state_dir
    if state_dir is None:
        raise ApiError(409, "no state directory: set [feedback] state_dir (and [shadow])",
                       code="shadow_off")
    raw = request.query_params.get("target", "0.98")
    try:
        target = float(raw)
    except ValueError:
        raise bad("target", f"not a number: {raw!r}") from None
    try:
        report = await anyio.to_thread.run_sync(lambda: build_report(state_dir, target=target))
    except ValueError as e:
        raise ApiError(400, str(e), param="target") from None
    except OSError as e:
        raise ApiError(500, f"admin report: {e}", kind="server_error",
                       code="file_error") from None
    return JSONResponse(report)


async def admin_traffic(gw: Gateway, request: Request) -> Response:
    check_admin(gw, request)
    if gw.shadow is not None:
        out = gw.shadow.traffic()
    else:
        from tagrouter_fast.serve.shadow.service import routed_counts

        out = {"mode": "route", "theta": gw.router.decider.theta, "share": None,
               "default_model": None, "decisions": routed_counts(gw.metrics)}
    return JSONResponse(finite_for_json(out))
