"""``doorbell-agent web [--listen ADDR]`` and ``doorbell-agent web password [--stdin]``.

``web`` serves the local page alone (no recording, no sharing): for a look at the log or an
answer to a held request while ``run`` is stopped, or to try another address. ``run`` serves the
same page itself when ``web.enabled`` is true. ``web password`` sets the page's password, needed
to listen on anything but loopback; only its Argon2 hash is kept.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from agent.cli.common import config_from, log_to_stderr
from agent.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "web", help="serve the local page alone (without recording), or set its password",
        description="Serve the homeowner's local page until stopped (Ctrl-C). 'doorbell-agent run' serves it too "
                    "(web.enabled). To open it from a phone, set a password and listen on the home network, "
                    "e.g. --listen 0.0.0.0:8765.",
    )  # fmt: skip
    p.add_argument("--listen", metavar="ADDR", help="HOST:PORT to listen on instead of web.listen, e.g. 0.0.0.0:8765")
    wsub = p.add_subparsers(dest="web_command", metavar="password", title="set the password (optional)")
    pw = wsub.add_parser("password", help="set the local page's password (asked twice)")
    pw.add_argument("--stdin", action="store_true", help="read the password from the first line of standard input")
    pw.set_defaults(func=_password)
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from agent.runtime.supervisor import run_components
    from agent.web import WebServer, start_web

    cfg = config_from(args)
    if args.listen is not None:
        try:
            cfg = cfg.model_copy(update={"web": type(cfg.web)(**{**cfg.web.model_dump(), "listen": args.listen})})
        except ValueError as exc:
            raise UserError(f"--listen {args.listen!r} is not HOST:PORT; write e.g. 127.0.0.1:8765 or 0.0.0.0:8765"
                            ) from exc
    log_to_stderr()

    def start(c: object) -> WebServer:
        server = start_web(cfg)
        print(f"Serving the local page at {server.url} (not recording). Stop with Ctrl-C.", flush=True)
        return server

    return run_components(cfg, [start])


def _password(args: argparse.Namespace) -> int:
    from agent.web.auth import check_password_rules, read_password_twice, set_password

    cfg = config_from(args)
    if args.stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        check_password_rules(password)
    else:
        if not sys.stdin.isatty():
            raise UserError("no terminal to ask for the password on; use --stdin to read it from standard input")
        password = read_password_twice(getpass.getpass)
    set_password(cfg.paths.web_password_file, password)
    print(f"The local page's password is set (only its Argon2 hash is kept, in {cfg.paths.web_password_file}).")
    if cfg.web.loopback_only:
        print("To open the page from a phone on your home network, set web.listen to 0.0.0.0:8765 (or this "
              "device's address) and restart the agent.")
    return 0
