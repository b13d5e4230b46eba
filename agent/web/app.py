"""The Flask application behind the local page: routes, the login gate, CSRF and security headers.

Rules every route follows:

* GET only reads. Everything that changes something (kill switch, approve, decline, log in and out)
  is a POST form that carries the session's CSRF token and comes from a page of this same server
  (its Origin, or failing that its Referer, names this host).
* A password is needed whenever one is set, and always off loopback (the server refuses to start
  off loopback without one: :func:`agent.web.start_web`). On loopback without a password, the
  Host header must name loopback too, so a web site that rebinds its DNS name to 127.0.0.1 cannot
  read the page through the resident's browser.
* No inline script or style: the Content-Security-Policy allows only this server's own CSS file.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, Response, abort, g, redirect, render_template, request, send_file, url_for
from werkzeug.wrappers import Response as BaseResponse

from agent.config import AgentConfig, is_loopback_host
from agent.display import safe_text
from agent.errors import UserError
from agent.web import views
from agent.web.auth import (
    LoginLimiter,
    Session,
    Sessions,
    csrf_matches,
    password_is_set,
    password_stamp,
    verify_password,
)

log = logging.getLogger("agent.web")

COOKIE = "doorbell_session"
CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; media-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
OPEN_PATHS = ("login", "login_post", "static")  # what a visitor who has not logged in may see


@dataclass
class WebState:
    cfg: AgentConfig
    sessions: Sessions
    limiter: LoginLimiter
    clips_dir: Path
    clip_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def login_required(self) -> bool:
        return password_is_set(self.cfg.paths.web_password_file) or not self.cfg.web.loopback_only


def _state() -> WebState:
    st: WebState = g.web_state
    return st


def _client() -> str:
    return request.remote_addr or "unknown address"


def _host_is_loopback(host_header: str) -> bool:
    return is_loopback_host(urlsplit(f"//{host_header}").hostname or "")


def _same_origin() -> bool:
    """The form was sent from a page this server served (not a form on another site posting here)."""
    origin = request.headers.get("Origin")
    if origin is not None:
        return origin != "null" and urlsplit(origin).netloc == request.host
    referer = request.headers.get("Referer")
    if referer:
        return urlsplit(referer).netloc == request.host
    return False


def _refuse(status: int, title: str, text: str) -> Response:
    return Response(render_template("message.html", title=title, text=text, session=None), status=status)


def create_app(cfg: AgentConfig, *, clock: Callable[[], float] = time.monotonic) -> Flask:
    """The local page for ``cfg``. ``clock`` (seconds, monotonic) lets tests move session time on."""
    app = Flask("agent.web", static_folder="static", template_folder="templates")
    app.config.update(MAX_CONTENT_LENGTH=64 * 1024, SESSION_COOKIE_NAME="doorbell_unused")
    clips_dir = cfg.paths.data_dir / f"web-clips-{os.getpid()}"  # `run` and `web` may both serve a page
    remove_stale_clips(cfg.paths.data_dir)
    state = WebState(cfg, Sessions(cfg.web.session_minutes * 60.0, clock), LoginLimiter(clock=clock), clips_dir)
    app.extensions["doorbell"] = state

    @app.before_request
    def gate() -> BaseResponse | None:
        g.web_state = state
        g.new_cookie = None
        if request.endpoint == "static":
            return None
        if state.cfg.web.loopback_only and not _host_is_loopback(request.host):
            log.warning("local page: refused a request from %s for host %r (this page answers only to loopback names)",
                        _client(), request.host[:80])
            return _refuse(421, "Wrong address", "This page answers only at 127.0.0.1 or localhost.")
        session = state.sessions.get(request.cookies.get(COOKIE))
        stamp = password_stamp(state.cfg.paths.web_password_file)
        if session is not None and (session.client != _client() or session.password_stamp != stamp):
            state.sessions.end(session.token)  # another address, or the password was set, changed or removed
            session = None
        if session is None:
            session = state.sessions.new(_client(), authenticated=not state.login_required, password_stamp=stamp)
            g.new_cookie = session.token
        g.session = session
        if request.method == "POST":
            if not _same_origin():
                log.warning("local page: refused a form from %s that did not come from this page (Origin %r)",
                            _client(), (request.headers.get("Origin") or "")[:80])
                return _refuse(403, "Refused", "This form did not come from this page. Nothing was changed.")
            if not csrf_matches(session, request.form.get("csrf")):
                log.warning("local page: refused a form from %s with a missing or wrong form token", _client())
                return _refuse(403, "Refused", "The form was out of date or not from this page. Nothing was "
                               "changed; go back, reload and try again.")
        if not session.authenticated and request.endpoint not in OPEN_PATHS:
            return redirect(url_for("login"))
        return None

    @app.after_request
    def headers(resp: BaseResponse) -> BaseResponse:
        resp.headers["Content-Security-Policy"] = CSP
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "same-origin"
        if request.endpoint != "static":
            resp.headers["Cache-Control"] = "no-store"  # the log, the requests, the footage: never cached
        token = g.get("new_cookie")
        if token:
            # HttpOnly: no script can read it. SameSite=Strict: no other site's page sends it. Not Secure:
            # the page is plain http on the home network (a browser would never send a Secure cookie back).
            resp.set_cookie(COOKIE, token, httponly=True, samesite="Strict", secure=False, path="/")
        return resp

    def page(template: str, status: int = 200, **kw: Any) -> Response:
        session: Session = g.session
        messages, session.messages = session.messages, []
        body = render_template(template, session=session, messages=messages, login_required=state.login_required,
                               now=views.local_now(state.cfg), **kw)
        return Response(body, status=status)

    def say(kind: str, text: str) -> None:
        g.session.messages.append((kind, text))

    # -- logging in and out --------------------------------------------------------------------

    @app.get("/login")
    def login() -> BaseResponse:
        if g.session.authenticated:
            return redirect(url_for("home"))
        return page("login.html")

    @app.post("/login")
    def login_post() -> BaseResponse:
        client = _client()
        wait = state.limiter.wait_s(client)
        if wait > 0:
            log.warning("local page: login from %s refused without checking: too many wrong passwords "
                        "(%d s to wait)", client, wait)
            say("error", f"Too many wrong passwords from this device. Try again in {views.duration_words(wait)}.")
            return page("login.html", status=429)
        ok, problem = verify_password(state.cfg.paths.web_password_file, request.form.get("password", ""))
        if problem is not None:
            log.error("local page: cannot check a password: %s", problem)
            say("error", "The password cannot be checked on this device; see the agent's log.")
            return page("login.html", status=503)
        if not ok:
            n = state.limiter.failed(client)
            log.warning("local page: wrong password from %s (%d in the last %d minutes)", client, n,
                        state.limiter.window_s // 60)
            say("error", "Wrong password.")
            return page("login.html", status=403)
        state.limiter.succeeded(client)
        state.sessions.end(g.session.token)
        g.session = state.sessions.new(client, authenticated=True,
                                       password_stamp=password_stamp(state.cfg.paths.web_password_file))
        g.new_cookie = g.session.token
        log.info("local page: logged in from %s", client)
        return redirect(url_for("home"))

    @app.post("/logout")
    def logout() -> BaseResponse:
        state.sessions.end(g.session.token)
        g.session = state.sessions.new(_client(), authenticated=not state.login_required,
                                       password_stamp=password_stamp(state.cfg.paths.web_password_file))
        g.new_cookie = g.session.token
        return redirect(url_for("login") if state.login_required else url_for("home"))

    # -- reading ----------------------------------------------------------------------------------

    @app.get("/")
    def home() -> BaseResponse:
        now = datetime.now(UTC)
        info = views.overview(state.cfg, now)
        try:
            waiting = views.pending(state.cfg, now)
        except UserError as exc:
            info["problems"].append(str(exc))
            waiting = []
        return page("home.html", info=info, pending=waiting, withdraw=_withdraw_function() is not None)

    @app.get("/log")
    def access_log() -> BaseResponse:
        flt = views.LogFilter.from_query(request.args)
        try:
            data = views.access_log(state.cfg, flt, datetime.now(UTC))
        except Exception as exc:  # a damaged log: say so rather than show nothing
            log.warning("local page: cannot read the access log: %s: %s", type(exc).__name__, exc)
            flt.errors.append(f"cannot read the access log: {type(exc).__name__}: {exc}")
            data = {"rows": [], "agencies": [], "head": None, "checkpoint": None, "more": 0}
        return page("log.html", status=400 if flt.errors else 200, flt=flt, data=data,
                    decisions=views.DECISION_FILTERS)

    @app.get("/shared/<int:seq>")
    def shared(seq: int) -> BaseResponse:
        try:
            entry, window, same = views.delivered_entry(state.cfg, seq)
        except UserError as exc:  # a damaged access log (StateCorrupt): the sentence with the fix, not a 500
            return _refuse(503, "The access log cannot be read", str(exc))
        if entry is None:
            abort(404)
        from agent.state.logtext import entry_lines  # loads the log's crypto: only when a page needs it

        tz = views.zone(state.cfg)
        lines = [safe_text(line.strip()) for e in same for line in entry_lines(e, tz)]
        holds = window is not None and views.buffer_holds(state.cfg, window)
        return page("shared.html", seq=seq, lines=lines, holds=holds,
                    window=views.window_words(window, tz) if window else None,
                    retention=f"{state.cfg.buffer.retention_hours:g} hours")

    @app.get("/shared/<int:seq>.mp4")
    def shared_video(seq: int) -> BaseResponse:
        try:
            entry, window, _ = views.delivered_entry(state.cfg, seq)
        except UserError as exc:
            return _refuse(503, "The access log cannot be read", str(exc))
        if entry is None or window is None:
            abort(404)
        path = state.clips_dir / f"{seq}.mp4"
        with state.clip_lock:
            if not path.exists():
                state.clips_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                for old in state.clips_dir.glob("*.mp4"):  # one clip kept at a time: footage is not copied around
                    old.unlink(missing_ok=True)
                try:
                    views.cut_shared(state.cfg, window, path)
                except UserError as exc:
                    return _refuse(410, "Footage gone", str(exc))
        return send_file(path, mimetype="video/mp4", conditional=True, max_age=0)

    # -- changing ---------------------------------------------------------------------------------

    def by() -> str:
        return f"homeowner (local page, from {_client()})"

    @app.post("/killswitch")
    def killswitch() -> BaseResponse:
        from agent.runtime.controls import set_kill_switch

        want = request.form.get("state")
        if want not in ("on", "off"):
            say("error", "Choose on or off.")
            return redirect(url_for("home"))
        try:
            change = set_kill_switch(state.cfg, want == "on", by=by())
        except UserError as exc:
            say("error", str(exc))
            return redirect(url_for("home"))
        log.info("local page: kill switch turned %s from %s", want.upper(), _client())
        if want == "on":
            say("ok", "The kill switch is ON: nothing is shared, and a delivery under way stops.")
        else:
            say("ok", "The kill switch is off: requests follow your rules again.")
        if change.error:
            say("error", f"The change could not be written to the access log: {change.error}")
        return redirect(url_for("home"))

    @app.post("/approvals/<int:approval_id>")
    def answer(approval_id: int) -> BaseResponse:
        from agent.state.approvals import ApprovalQueue

        choice = request.form.get("answer")
        if choice not in ("approve", "decline"):
            say("error", "Choose approve or decline.")
            return redirect(url_for("home"))
        queue = ApprovalQueue(state.cfg.paths.state_db)
        tz = views.zone(state.cfg)
        try:
            if choice == "approve":
                item = queue.approve(approval_id, datetime.now(UTC), tz)
            else:
                item = queue.decline(approval_id, datetime.now(UTC), tz)
        except UserError as exc:
            say("error", str(exc))
            return redirect(url_for("home"))
        log.info("local page: request %s %s from %s", item.jti, "approved" if choice == "approve" else "declined",
                 _client())
        if choice == "approve":
            say("ok", f"Approved request {item.id} from {safe_text(item.iss)}. The agent sends the footage, encrypted "
                      "to the agency, within a few seconds while it runs.")
        else:
            say("ok", f"Declined request {item.id} from {safe_text(item.iss)}. Nothing was shared; the agency is not told.")
        return redirect(url_for("home"))

    @app.post("/consent/withdraw")
    def withdraw() -> BaseResponse:
        func = _withdraw_function()
        if func is None:
            abort(404)
        try:
            func(state.cfg, by=by())
        except UserError as exc:
            say("error", str(exc))
            return redirect(url_for("home"))
        log.info("local page: consent withdrawn from %s", _client())
        say("ok", "You withdrew your consent: nothing is shared until you give it again.")
        return redirect(url_for("home"))

    @app.errorhandler(404)
    def not_found(_exc: Exception) -> BaseResponse:
        return _refuse(404, "Not found", "There is nothing at this address.")

    @app.errorhandler(413)
    def too_large(_exc: Exception) -> BaseResponse:
        return _refuse(413, "Too large", "That form was far larger than any form of this page.")

    return app


def remove_stale_clips(data_dir: Path, *, also: Path | None = None) -> None:
    """Footage cut for a page of a process that has ended (or for ``also``) is not kept around."""
    for d in data_dir.glob("web-clips-*"):
        pid = d.name.removeprefix("web-clips-")
        alive = False
        if pid.isdigit() and d != also:
            try:
                os.kill(int(pid), 0)
                alive = True
            except ProcessLookupError:
                alive = False
            except PermissionError:
                alive = True
        if not alive:
            shutil.rmtree(d, ignore_errors=True)


def _withdraw_function() -> Callable[..., Any] | None:
    """``agent.state.consent.withdraw_consent(cfg, *, by)`` once it exists; until then no form is shown."""
    try:
        from agent.state import consent  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return None
    func = getattr(consent, "withdraw_consent", None)
    return func if callable(func) else None
