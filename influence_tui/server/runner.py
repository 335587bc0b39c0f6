"""Serve the API from a background thread of this process: what the app's toggle and `influence serve` use.

    runner = ServerRunner(engine, settings)      # host/port/api key from settings unless given
    runner.start()                                # returns once the socket accepts connections
    runner.status()                               # RunnerStatus(running, url, model, requests_served, in_flight)
    runner.stop()

The socket is bound here, in the caller's thread, so "address in use" is an exception the caller
sees (uvicorn would `sys.exit` inside its thread), and port 0 picks a free port.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from influence_tui.config import Settings
    from influence_tui.engine import Engine


@dataclass
class RunnerStatus:
    running: bool
    url: str | None
    model: str | None
    requests_served: int
    in_flight: int


class ServerError(RuntimeError):
    """The server could not start (message is one user-facing line)."""


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = "address already in use" if exc.errno in (98, 48, 10048) else (exc.strerror or str(exc))
        raise ServerError(f"cannot listen on {host}:{port}: {reason}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def url_for(host: str, port: int) -> str:
    shown = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, f"[{host}]" if ":" in host else host)
    return f"http://{shown}:{port}"


class ServerRunner:
    def __init__(self, engine: "Engine", settings: "Settings", *, host: str | None = None, port: int | None = None,
                 api_key: str | None = None, cors_origins: Sequence[str] | None = None,
                 log_level: str = "warning", access_log: bool = False, log_config: Any = None,
                 max_body: int | None = None) -> None:
        self.engine, self.settings = engine, settings
        self.host = host or settings.host
        self.port = settings.port if port is None else port
        self.api_key = api_key if api_key is not None else settings.api_key
        self.cors_origins = list(cors_origins or [])
        self.log_level, self.access_log, self.log_config = log_level, access_log, log_config
        self.max_body = max_body
        self.app: Any = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._server is not None and self._server.started

    @property
    def url(self) -> str | None:
        return url_for(self.host, self.port) if self.running else None

    def start(self, timeout: float = 30.0) -> str:
        """Start serving; returns the URL. Raises ServerError if the address is taken or startup fails."""
        import uvicorn

        from influence_tui.server.app import create_app

        with self._lock:
            if self.running:
                return self.url or ""
            sock = _bind(self.host, self.port)
            self.port = sock.getsockname()[1]
            limits = {"max_body": self.max_body} if self.max_body else {}
            self.app = create_app(self.engine, self.settings, api_key=self.api_key, cors_origins=self.cors_origins,
                                  **limits)
            if self.log_config is None:
                # inside the TUI nothing may write to the terminal: keep uvicorn's loggers quiet
                quiet = logging.getLogger("uvicorn")
                if not quiet.handlers:
                    quiet.addHandler(logging.NullHandler())
            config = uvicorn.Config(self.app, log_level=self.log_level, access_log=self.access_log,
                                    log_config=self.log_config, lifespan="off", timeout_graceful_shutdown=3,
                                    timeout_keep_alive=5, loop="asyncio", http="h11", ws="none")
            server = uvicorn.Server(config)
            self._server, self._error = server, None
            self._thread = threading.Thread(target=self._run, args=(server, sock), name="influence-api", daemon=True)
            self._thread.start()
            deadline = time.monotonic() + timeout
            while not server.started:
                if not self._thread.is_alive() or time.monotonic() > deadline:
                    server.should_exit = True
                    raise ServerError(f"the API server did not start: {self._error or 'timed out'}")
                time.sleep(0.01)
            return self.url or ""

    def _run(self, server: Any, sock: socket.socket) -> None:
        # uvicorn skips signal handlers outside the main thread, so Ctrl+C stays with the app
        try:
            asyncio.run(server.serve(sockets=[sock]))
        except BaseException as exc:  # SystemExit from uvicorn's startup included: report, don't kill
            self._error = exc
        finally:
            sock.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, let open answers finish for a few seconds, then close them."""
        with self._lock:
            server, thread = self._server, self._thread
            if server is None or thread is None:
                return
            server.should_exit = True
            thread.join(timeout)
            if thread.is_alive():
                server.force_exit = True
                thread.join(5)
            self._server = self._thread = None

    def status(self) -> RunnerStatus:
        ctx = getattr(getattr(self.app, "state", None), "ctx", None) if self.app is not None else None
        model = None
        try:
            st = self.engine.status()
            model = st.model.name if st.model else None
        except Exception:  # status is for display: never let it raise into the UI
            pass
        return RunnerStatus(running=self.running, url=self.url, model=model,
                            requests_served=ctx.served if ctx else 0, in_flight=ctx.active if ctx else 0)

    def wait(self) -> None:
        """Block until the server thread ends (used by `influence serve` in the foreground)."""
        if self._thread is not None:
            self._thread.join()
