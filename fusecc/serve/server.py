"""Running the app: :class:`FleetServer` serves a fleet with uvicorn, in the foreground (the command line: SIGTERM
or Ctrl-C drains the requests in flight, then exits) or in a background thread (tests, notebooks)."""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from typing import Any, Optional

import uvicorn

from .app import build_app
from .fleet import ServedFleet

__all__ = ["FleetServer"]

log = logging.getLogger("fusecc.serve")


class FleetServer:
    """Serve ``fleet`` over HTTP on ``host:port`` (port 0: any free port; see ``url``).

    Args:
        fleet: the :class:`ServedFleet`.
        host, port: where to listen (default 127.0.0.1, a free port).
        max_batch, max_delay_ms, max_queue, max_body_bytes: the batcher and request limits (see ``build_app``).
        drain_timeout: seconds a shutdown waits for the requests in flight.
    """

    def __init__(self, fleet: ServedFleet, host: str = "127.0.0.1", port: int = 0, *, max_batch: Optional[int] = None,
                 max_delay_ms: float = 5.0, max_queue: int = 1024, max_body_bytes: int = 64 << 20,
                 drain_timeout: float = 30.0, log_level: str = "warning") -> None:
        self.fleet = fleet
        self.app = build_app(fleet, max_batch=max_batch or fleet.max_batch, max_delay_ms=max_delay_ms,
                             max_queue=max_queue, max_body_bytes=max_body_bytes)
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = host, self._sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level=log_level, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=drain_timeout, timeout_keep_alive=30)
        self.server = uvicorn.Server(config)
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def serve_forever(self) -> None:
        """Serve in this thread until SIGTERM / SIGINT (uvicorn's handlers: stop accepting, answer the requests in
        flight, then the batcher drains what is queued). A drained SIGTERM exits normally (status 0): uvicorn raises
        the signal again once it is done, and finds this handler, which does nothing, in place of the default."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: None)
        self.server.run(sockets=[self._sock])

    def start(self, timeout: float = 60.0) -> "FleetServer":
        """Serve in a background thread; returns once the server accepts connections."""
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name="fusecc-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("fusecc serve: the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Stop a background server: stop accepting, answer what is in flight, drain, join."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> "FleetServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
