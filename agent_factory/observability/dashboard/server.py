"""Serving the dashboard: where it may listen, and uvicorn with a clean shutdown.

A dashboard can change which provider is the primary, so it listens on
loopback unless a token protects its actions: `check_bind()` refuses any
other address without one.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from ...errors import BindRefusedError

if TYPE_CHECKING:
    from starlette.applications import Starlette

__all__ = [
    "LOOPBACK_NAMES",
    "BackgroundServer",
    "bind",
    "check_bind",
    "is_loopback",
    "serve",
]

#: ``Host`` headers a loopback-bound dashboard answers (against DNS rebinding).
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def check_bind(host: str, token: str | None) -> None:
    """Raise `BindRefusedError` for a non-loopback ``host`` without a ``token``."""
    if not token and not is_loopback(host):
        raise BindRefusedError(
            f"refusing to listen on {host} without a token: anyone who can reach it could "
            "change the primary provider. Set AGENT_FACTORY_DASHBOARD_TOKEN (or --token), "
            "or listen on 127.0.0.1"
        )


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free port)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def _server(app: Starlette) -> Any:
    import uvicorn

    config = uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False,
                            timeout_graceful_shutdown=3)
    return uvicorn.Server(config)


def serve(app: Starlette, sock: socket.socket) -> None:
    """Run ``app`` on ``sock`` until Ctrl-C or SIGTERM, then shut down gracefully.

    uvicorn handles both signals (finishing requests and the app's lifespan)
    and raises the signal again once done; the caller's handler turns that
    into KeyboardInterrupt, which ends the serving here, normally.
    """
    server = _server(app)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()


class BackgroundServer:
    """``app`` served from a daemon thread, e.g. inside an application or a test.

    Listens on ``host:port`` (port 0: a free one) once the constructor
    returns; `close()` shuts it down gracefully, lifespan included.
    """

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int = 0,
                 *, timeout: float = 10.0) -> None:
        self._sock = bind(host, port)
        self._server = _server(app)
        self._thread = threading.Thread(target=self._server.run, args=([self._sock],),
                                        name="agent-factory-dashboard", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("the dashboard server did not start")
            time.sleep(0.01)
        host, port = self._sock.getsockname()[:2]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10.0)
        self._sock.close()
