"""The homeowner's local page: status, the access log, held requests, the kill switch, in a browser.

:func:`start_web` serves it in background threads as a ``run`` component (or alone, for
``doorbell-agent web``); :func:`create_app` builds the Flask application (tests use it directly).
The page reads the same files every command reads and changes things only through the same
functions the commands use (:func:`agent.runtime.controls.set_kill_switch`,
:class:`agent.state.approvals.ApprovalQueue`), so it can never do what the command line cannot.

Importing this package loads neither Flask nor any video library: both are loaded when the
page starts (Flask) or when the resident plays shared footage (PyAV).
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
from typing import TYPE_CHECKING, Any

from agent.config import AgentConfig
from agent.errors import UserError

if TYPE_CHECKING:
    from flask import Flask

log = logging.getLogger("agent.web")


def create_app(cfg: AgentConfig, **kw: Any) -> Flask:
    from agent.web.app import create_app as _create

    return _create(cfg, **kw)


def check_can_serve(cfg: AgentConfig, listen: str | None = None) -> None:
    """Refuse an address off loopback while no password is set: the page controls the kill switch."""
    from agent.web.auth import password_is_set

    web = cfg.web if listen is None else cfg.web.model_copy(update={"listen": listen})
    if not web.loopback_only and not password_is_set(cfg.paths.web_password_file):
        raise UserError(
            f"the local page would listen on {web.listen}, which other devices can reach, and no password is set. "
            "Set one first with 'doorbell-agent web password' (run it as the agent's user, e.g. "
            "'sudo -u doorbell-agent doorbell-agent web password'), or listen on 127.0.0.1 only (web.listen)"
        )


class WebServer:
    """The page served by werkzeug in a background thread; a ``run`` component (``stop()``, ``wait()``)."""

    name = "local page"

    def __init__(self, cfg: AgentConfig, listen: str | None = None) -> None:
        from werkzeug.serving import WSGIRequestHandler, make_server

        class _Quiet(WSGIRequestHandler):
            def log(self, type: str, message: str, *args: Any) -> None:  # noqa: A002  (werkzeug's signature)
                log.debug("local page %s: " + message, type, *args)

        check_can_serve(cfg, listen)
        web = cfg.web if listen is None else cfg.web.model_copy(update={"listen": listen})
        cfg = cfg.model_copy(update={"web": web})
        app = self._app = create_app(cfg)
        # Bound here rather than by werkzeug, which on a taken port prints and exits the whole process.
        family = socket.AF_INET6 if ":" in web.host else socket.AF_INET
        try:
            sock = socket.create_server((web.host, web.port), family=family)
        except OSError as exc:
            raise UserError(
                f"the local page cannot listen on {web.listen}: {exc.strerror or exc}. "
                + ("Another program uses that port; pick another in web.listen (e.g. 127.0.0.1:8766) or stop it"
                   if exc.errno == errno.EADDRINUSE else "Check web.listen: the address must belong to this device")
            ) from None
        try:
            self._server = make_server(web.host, web.port, app, threaded=True, request_handler=_Quiet,
                                       fd=sock.fileno())
        finally:
            sock.close()  # werkzeug holds its own duplicate of the socket
        self.port: int = int(self._server.server_address[1])
        host = f"[{web.host}]" if ":" in web.host else web.host
        self.url = f"http://{host}:{self.port}/"
        self._started = False
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="web", daemon=True)

    def start(self) -> WebServer:
        self._thread.start()
        self._started = True
        return self

    def stop(self) -> None:
        from agent.web.app import WebState, remove_stale_clips

        if self._started:
            self._server.shutdown()
        self._server.server_close()
        state: WebState = self._app.extensions["doorbell"]
        remove_stale_clips(state.cfg.paths.data_dir, also=state.clips_dir)

    def wait(self, timeout: float | None = None) -> bool:
        if not self._started:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()


def start_web(cfg: AgentConfig, listen: str | None = None) -> WebServer:
    """Serve the page now; raises :class:`UserError` if it cannot (no password off loopback, port taken)."""
    server = WebServer(cfg, listen).start()
    from agent.web.auth import password_is_set

    log.info("local page: %s%s", server.url,
             " (log in with your password)" if password_is_set(cfg.paths.web_password_file) else "")
    return server


class _NotServing:
    """Stands in for a page that could not start, so ``run`` keeps recording and sharing without it."""

    name = "local page (not serving)"

    def __init__(self) -> None:
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)


def start_web_in_run(cfg: AgentConfig) -> WebServer | _NotServing:
    """The ``run`` component: the page is secondary, so a page that cannot start only logs an error."""
    try:
        return start_web(cfg)
    except UserError as exc:
        log.error("the local page is NOT served: %s. Recording and sharing go on without it.", exc)
    except Exception as exc:  # never let the page stop the recorder
        log.error("the local page is NOT served: %s: %s. Recording and sharing go on without it.",
                  type(exc).__name__, exc)
    return _NotServing()
