"""Start-up: `serve` runs the gateway under uvicorn. What can fail runs before uvicorn does,
each failure one line naming the key, file or address (`StartupError`): bind the port, load
the router, open the learner (its journal replayed), warm up the tagger; the descriptor limit
raised towards what the connection limits may use. Then uvicorn serves on the bound sockets
with the listening limits of `edge.listener`."""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from tagrouter_fast.core import TagRouterError
from tagrouter_fast.serve.config import Config
from tagrouter_fast.serve.edge.app import create_app
from tagrouter_fast.serve.edge.middleware import access_log

if TYPE_CHECKING:
    from tagrouter_fast.router import TagRouter
    from tagrouter_fast.serve.policy.gateway import Gateway

__all__ = ["StartupError", "configure_logging", "serve"]

log = logging.getLogger("tagrouter.serve")


class StartupError(ValueError):
    """`serve` could not start: the message names the config key, file or address. A
    ValueError, like `ConfigError`: a given value cannot be used (the CLI prints one line and
    exits 2)."""


def configure_logging(config: Config) -> None:
    """Access lines as bare JSON on stderr (one per request), other gateway logs plain."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_log.handlers[:] = [handler]
    access_log.propagate = False
    access_log.setLevel(logging.INFO if config.server.access_log else logging.WARNING)
    if not log.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        for name in ("tagrouter.serve", "tagrouter.outcomes"):
            lg = logging.getLogger(name)
            lg.addHandler(h)
            lg.setLevel(logging.INFO)


#: Descriptors kept beyond the connections (clients and backends): journal, snapshots,
#: registry, tagger files, the event loop's own.
FD_RESERVE = 64


def _listen(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets on every address ``host`` resolves to (as uvicorn would bind them),
    made before the slow part of start-up, so that a port in use is reported at once.

    Raises:
        StartupError: the host does not resolve, or an address cannot be bound.
    """
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise StartupError(f"cannot listen on {where}: {e.strerror} (server.host / --host)") \
            from None
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # "::" and "0.0.0.0" may both be bound, separately
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(backlog)
    except OSError as e:
        for sock in socks:
            sock.close()
        reason = "the port is in use" if e.errno == errno.EADDRINUSE else e.strerror or str(e)
        raise StartupError(f"cannot listen on {where}: {reason} (server.host, server.port / "
                           "--host, --port)") from None
    return socks


def _raise_fd_limit(config: Config) -> None:
    """Raises the soft descriptor limit towards what the connection limits may use (up to the
    hard limit, as Go's runtime does); warns when even that is short, since running out of
    descriptors stops accepting clients, connecting to backends and writing the journal."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return
    need = config.server.max_client_connections + config.limits.max_connections + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft < need:
        log.warning(
            "the descriptor limit (%d, ulimit -n) is below server.max_client_connections (%d) "
            "+ limits.max_connections (%d) + %d: lower those or raise the limit, or the gateway "
            "may run out of descriptors under load", soft,
            config.server.max_client_connections, config.limits.max_connections, FD_RESERVE)


def _start_error(config: Config, e: BaseException) -> StartupError:
    """One line for a start-up failure of the state directory, naming the key and the path."""
    state = config.feedback.state_dir
    if isinstance(e, OSError) and state is not None:
        if state.exists() and not state.is_dir():
            return StartupError(f"feedback.state_dir: {state} is not a directory")
        return StartupError(f"feedback.state_dir: cannot use {state}: {e}")
    return StartupError(" ".join(str(e).split()) or type(e).__name__)


def serve(
    config: Config, *, router: TagRouter | None = None, host: str | None = None,
    port: int | None = None, on_ready: Callable[[], None] | None = None,
) -> None:
    """Runs the gateway under uvicorn (one worker: the outcome store owns its state directory
    and the router lives in this process) until interrupted.

    The start-up that can fail runs before uvicorn does: bind the port, load the router, open
    the outcome store, warm up the tagger. Then uvicorn serves on the bound sockets with the
    listening limits of `edge.listener` (header timeout and size, connection bound).

    Args:
        on_ready: called once the gateway is listening and started, before it serves (the
            demo prints how to try it).

    Raises:
        StartupError: the port, the config, the bundle or the state directory cannot be used;
            the message names which (the CLI prints it as one line and exits 2).
    """
    import uvicorn

    from tagrouter_fast.serve.edge.listener import http_protocol
    from tagrouter_fast.serve.learn.shared_log import SharedStateError
    from tagrouter_fast.serve.learn.state import OutcomeStoreError

    configure_logging(config)
    host = config.server.host if host is None else host
    port = config.server.port if port is None else port
    backlog = 4096
    sockets = _listen(host, port, backlog)
    gw: Gateway | None = None
    try:
        try:
            app = create_app(config, router=router)
        except (ValueError, TagRouterError, OSError) as e:
            # The decision secret is kept in the state directory: its errors name that key.
            raise _start_error(config, e) from None
        gw = app.state.gateway
        try:
            gw.start()
        except (ValueError, TagRouterError, OSError, OutcomeStoreError, SharedStateError) as e:
            raise _start_error(config, e) from None
        _raise_fd_limit(config)
        server = uvicorn.Server(uvicorn.Config(
            app,
            http=http_protocol(config.server.header_timeout_s,
                               config.server.max_client_connections,
                               config.server.max_header_bytes),
            lifespan="on",  # opens the backend pool, and closes everything at the end
            access_log=False,  # ours is the structured one, with the decision id
            log_level="info",
            timeout_graceful_shutdown=10,
            timeout_keep_alive=config.server.keepalive_s,
            backlog=backlog,
        ))
        for sock in sockets:
            name = sock.getsockname()
            log.info("listening on http://%s:%d", *name[:2])
        if on_ready is not None:
            on_ready()
        with contextlib.suppress(KeyboardInterrupt):  # the SIGINT uvicorn stopped on, raised
            server.run(sockets=sockets)               # again for the caller: a clean stop
    finally:
        for sock in sockets:
            sock.close()
        if gw is not None:
            gw.stop()  # after a normal stop the lifespan did it already

