"""The ``/admin`` endpoints: the admin check, the body parsed and checked here, then one named
mutator of `Gateway` (in a worker thread: they are blocking and take the admin lock) and its
errors as JSON, none with a traceback.

``POST /admin/models`` (`Gateway.add_model`), ``DELETE /admin/models/{name}``
(`Gateway.remove_model`), ``POST /admin/theta`` (`Gateway.set_theta` / `Gateway.set_share`),
``POST /admin/snapshot`` (`Gateway.snapshot`), ``POST /admin/reload`` (`Gateway.reload`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tagrouter_fast.core import TagRouterError, finite_for_json
from tagrouter_fast.serve.config import BackendConfig, ConfigError
from tagrouter_fast.serve.config_parse import backend_from_dict
from tagrouter_fast.serve.edge.auth import check_admin
from tagrouter_fast.serve.edge.bodies import read_json
from tagrouter_fast.serve.edge.errors import ApiError, bad
from tagrouter_fast.serve.learn.state import OutcomeStoreError

if TYPE_CHECKING:
    from tagrouter_fast.serve.policy.gateway import Gateway

__all__ = ["admin", "admin_remove"]

#: A parsed admin body: the mutator call it asks for, run in a worker thread.
Call = Callable[[], dict[str, Any]]


async def admin(gw: Gateway, request: Request) -> Response:
    check_admin(gw, request)
    action = request.path_params["action"]
    body = await read_json(request, gw.config.limits.max_body_bytes, allow_empty=True)
    parse = {
        ("POST", "models"): _add_model,
        ("POST", "theta"): _theta,
        ("POST", "snapshot"): lambda gw, body: gw.snapshot,
        ("POST", "reload"): lambda gw, body: gw.reload,
    }.get((request.method, action))
    if parse is None:
        raise ApiError(404, f"no admin endpoint {request.method} /admin/{action}",
                       code="not_found")
    try:
        call = parse(gw, body)
        result = await anyio.to_thread.run_sync(call)
    except ConfigError as e:
        raise ApiError(400, str(e), param=e.key) from None
    except KeyError as e:
        raise ApiError(400, str(e.args[0] if e.args else e)) from None
    except (ValueError, TagRouterError) as e:
        raise ApiError(400, str(e)) from None
    except OutcomeStoreError as e:
        raise ApiError(503, f"admin {action}: {e}", kind="server_error") from None
    except OSError as e:
        # A file of the gateway's own (a snapshot on a failing disk): the operator's to
        # fix, named in the answer; not a bug, so no traceback.
        raise ApiError(500, f"admin {action}: {e}", kind="server_error",
                       code="file_error") from None
    if action == "theta" and gw.shadow is not None:
        gw.shadow.note_theta()  # the report's mode history shows every theta change
    return JSONResponse(finite_for_json(result))


async def admin_remove(gw: Gateway, request: Request) -> Response:
    check_admin(gw, request)
    name = request.path_params["name"]
    result = await anyio.to_thread.run_sync(gw.remove_model, name)
    return JSONResponse(result)


def _add_model(gw: Gateway, body: dict[str, Any]) -> Call:
    raw = body.get("backend")
    if not isinstance(raw, dict):
        raise bad("backend", "missing (an object like a [[backends]] table)")
    cfg: BackendConfig = backend_from_dict(raw, "backend")
    like = body.get("like")
    if like is not None and like != "pool" and not (
        isinstance(like, str)
        or (isinstance(like, list) and like and all(isinstance(m, str) for m in like))
    ):
        raise bad("like", f"a model name, a list of names or \"pool\", got {like!r}")
    as_llm = body.get("as_llm", False)
    if not isinstance(as_llm, bool):
        raise bad("as_llm", f"true or false, got {as_llm!r}")
    judgments = body.get("judgments")
    if not isinstance(judgments, str) and not (judgments is None and like is not None):
        raise bad("judgments", "missing (a routing-table directory: queries.csv and "
                  "outcomes.csv; may be left out only with like=)")
    cost = body.get("cost", cfg.cost)
    if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not math.isfinite(
        cost
    ) or cost < 0:
        raise bad("cost", f"missing or not a finite number >= 0: {cost!r}")
    table_model = body.get("table_model", cfg.name)
    return lambda: gw.add_model(cfg, cost=float(cost), judgments=judgments, like=like,
                                as_llm=as_llm, table_model=table_model)


def _theta(gw: Gateway, body: dict[str, Any]) -> Call:
    extra = sorted(set(body) - {"theta", "llm_share", "queries"})
    if extra:
        raise bad(extra[0], "unknown field (known: theta, llm_share, queries)")
    if ("theta" in body) == ("llm_share" in body):
        raise bad("theta", "give exactly one of theta or llm_share")
    if "theta" in body:
        theta = body["theta"]
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) \
                or not math.isfinite(theta):
            raise bad("theta", f"must be a finite number, got {theta!r}")
        return lambda: gw.set_theta(float(theta))
    share = body["llm_share"]
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        raise bad("llm_share", f"must be a number in [0, 1], got {share!r}")
    queries = body.get("queries")
    if queries is not None and (
        not isinstance(queries, list) or not all(isinstance(q, str) for q in queries)
    ):
        raise bad("queries", "must be an array of strings")
    return lambda: gw.set_share(share, queries)

