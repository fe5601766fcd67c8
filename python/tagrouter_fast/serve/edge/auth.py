"""Who is calling: the client key of a request, checked at the edge before anything else reads
the request (401 without a valid key, 403 without the scope), and the admin check."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request

from tagrouter_fast.serve.edge.errors import ApiError
from tagrouter_fast.serve.learn.keys import ADMIN, OVERRIDE, ClientKey, Forbidden, Unauthenticated

if TYPE_CHECKING:
    from tagrouter_fast.serve.policy.gateway import Gateway

__all__ = ["authenticate", "check_admin", "check_override"]


def authenticate(gw: Gateway, request: Request, scope: str, what: str) -> ClientKey:
    """The caller's key, which must hold ``scope`` (401 / 403 otherwise): the bearer token of
    ``Authorization``, else ``x-api-key`` (where Anthropic clients send their key)."""
    auth = request.headers.get("authorization")
    if auth is None:
        api_key = request.headers.get("x-api-key")
        auth = f"Bearer {api_key}" if api_key else None
    try:
        key = gw.keyring.authenticate(auth)
        gw.keyring.require(key, scope, what)
    except Unauthenticated as e:
        gw.metrics.rejected.labels("unauthenticated").inc()
        raise ApiError(401, str(e), kind="authentication_error", code=e.code,
                       headers={"www-authenticate": "Bearer"}) from None
    except Forbidden as e:
        gw.metrics.rejected.labels("forbidden").inc()
        raise ApiError(403, str(e), kind="permission_error", code=e.code) from None
    return key


def check_override(gw: Gateway, key: ClientKey, theta: float | None,
                   share: float | None) -> None:
    """A request's own operating point needs the ``override`` scope (403 naming the field)."""
    if theta is not None or share is not None:
        try:
            gw.keyring.require(key, OVERRIDE, "a per-request theta or llm_share")
        except Forbidden as e:
            gw.metrics.rejected.labels("forbidden").inc()
            raise ApiError(403, str(e), kind="permission_error", code=e.code,
                           param="tagrouter.theta" if theta is not None
                           else "tagrouter.llm_share") from None


def check_admin(gw: Gateway, request: Request) -> None:
    """The admin token (``[admin] token_env``) or a client key with the ``admin`` scope;
    never an anonymous caller. Hashes are compared in constant time (`Keyring`)."""
    if not gw.keyring.any_with(ADMIN):
        raise ApiError(403, "admin endpoints are off: set [admin] token_env in the config "
                       "and that environment variable, or give a key the admin scope",
                       kind="permission_error")
    try:
        key = gw.keyring.authenticate(request.headers.get("authorization"), anonymous=False)
    except Unauthenticated:
        raise ApiError(401, "admin: missing or wrong bearer token",
                       kind="authentication_error",
                       headers={"www-authenticate": "Bearer"}) from None
    try:
        gw.keyring.require(key, ADMIN, "an admin endpoint")
    except Forbidden as e:
        raise ApiError(403, str(e), kind="permission_error", code=e.code) from None
