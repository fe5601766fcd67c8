"""The gateway app, by its public names: `create_app` (`edge.app`), `serve` and `StartupError`
(`edge.startup`), `Gateway` (`policy.gateway`), `ApiError` (`edge.errors`).

The gateway is laid out in the shape of its flows (docs/serving.md, "Layout"): `edge` (request
bodies, client keys, errors, the app and its start-up) -> `policy` (the gateway's state, routing
and named mutators) -> `forward` (the one HTTP client, faults, the fallback chain), with the
learning state in `learn`.
"""

from __future__ import annotations

from tagrouter_fast.serve.edge.app import create_app
from tagrouter_fast.serve.edge.errors import ApiError
from tagrouter_fast.serve.edge.startup import StartupError, serve
from tagrouter_fast.serve.policy.gateway import Gateway

__all__ = ["ApiError", "Gateway", "StartupError", "create_app", "serve"]
