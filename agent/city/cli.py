"""``doorbell-city``: the agency's reference client for the footage-request protocol.

    doorbell-city keygen  --iss jackson-pd --kid jpd-2026a
    doorbell-city request --root civic/jackson-ms --host broker.example --ca-file ca.pem \\
        --signing-key jpd-2026a.private.jwk --program jackson-ms/camera-pilot-2026 \\
        --officer badge-4471 --case JPD-2026-001234 --purpose "..." --basis consent \\
        --lat 32.2998 --lon -90.1831 --radius 300 \\
        --from 2026-12-03T16:30:00Z --to 2026-12-03T17:00:00Z
    doorbell-city receive --root civic/jackson-ms --host broker.example --ca-file ca.pem --jti JTI

``request`` keeps what ``receive`` needs (the one-time recipient private key,
the MQTT session id) in ``--state-dir``, one 0600 file per request.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.city.keys import keygen, load_signing_key
from agent.city.mqtt import BrokerSettings, MqttSession
from agent.city.receive import DeliveryCollector, DeliveryRejected, open_delivery
from agent.city.requests import DEFAULT_LIFETIME_S, build_request, request_claims, request_topics
from agent.errors import UserError, glue_dash_values, run_command
from agent.fsutil import write_atomically
from agent.timeutil import UTC, format_utc

DEFAULT_STATE_DIR = Path(os.environ.get("DOORBELL_CITY_HOME", "~/.doorbell-city")).expanduser() / "requests"
DEFAULT_SESSION_EXPIRY_S = 86400
EXIT_NOTHING_RECEIVED = 1
EXIT_SOME_REJECTED = 4


# --- argument types: each names the flag and the fix ------------------------------------------


def _rfc3339(flag: str) -> Callable[[str], datetime]:
    def parse(text: str) -> datetime:
        try:
            dt = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is not an RFC 3339 time like 2026-12-03T16:30:00Z") from None
        if dt.tzinfo is None:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} has no zone; end it with Z or an offset like -06:00")
        return dt.astimezone(UTC)

    return parse


def _float(flag: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is not a number") from None

    return parse


def _positive_int(flag: str, lo: int = 1, hi: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is not a whole number") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{flag} must be between {lo} and {hi}" if hi else f"{flag} must be at least {lo}")
        return value

    return parse


def _add_broker_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("broker")
    g.add_argument("--root", required=True, help="topic prefix of the deployment, e.g. civic/jackson-ms")
    g.add_argument("--host", default="localhost", help="broker host name (default: localhost)")
    g.add_argument("--port", type=_positive_int("--port", 1, 65535), help="broker port (default 8883, or 1883 with --insecure-plaintext)")
    g.add_argument("--ca-file", type=Path, help="CA certificate(s) that sign the broker's certificate (default: the system's)")
    g.add_argument("--cert", type=Path, help="client certificate for TLS client authentication (with --key)")
    g.add_argument("--key", type=Path, help="private key of --cert")
    g.add_argument("--username", help="broker user name")
    g.add_argument("--password", help="broker password; write --password=VALUE if it starts with '-' (better: set DOORBELL_CITY_MQTT_PASSWORD)")
    g.add_argument("--insecure-plaintext", action="store_true", help="connect without TLS (test brokers only)")
    g.add_argument("--timeout", type=_float("--timeout"), default=15.0, help="seconds to wait for each broker answer (default 15)")


def _check_root(root: str) -> None:
    if not root or any(c in root for c in "#+\x00") or root.startswith("/") or root.endswith("/"):
        raise UserError(f"--root {root!r} is not a topic prefix; use levels like civic/jackson-ms without # + or a leading/trailing /")


def _broker(args: argparse.Namespace) -> BrokerSettings:
    _check_root(args.root)
    if (args.cert is None) != (args.key is None):
        raise UserError("--cert and --key go together; give both or neither")
    if args.insecure_plaintext and (args.ca_file or args.cert):
        raise UserError("--insecure-plaintext turns TLS off; drop it to use --ca-file/--cert")
    for flag, path in (("--ca-file", args.ca_file), ("--cert", args.cert), ("--key", args.key)):
        if path is not None and not path.is_file():
            raise UserError(f"{flag} {path} does not exist")
    if not args.timeout > 0:
        raise UserError("--timeout must be a positive number of seconds")
    password = args.password if args.password is not None else os.environ.get("DOORBELL_CITY_MQTT_PASSWORD")
    return BrokerSettings(
        host=args.host,
        port=args.port,
        ca_file=args.ca_file,
        cert_file=args.cert,
        key_file=args.key,
        username=args.username,
        password=password,
        insecure_plaintext=args.insecure_plaintext,
    )


# --- request state: what `receive` needs later ---------------------------------------------------


def _state_path(state_dir: Path, jti: str) -> Path:
    return state_dir / f"{jti}.json"


def save_request_state(state_dir: Path, state: dict[str, Any]) -> Path:
    """One 0600 file per request: it holds the recipient private key."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = _state_path(state_dir, state["jti"])
    if not write_atomically(path, (json.dumps(state, indent=2) + "\n").encode("utf-8"), 0o600, replace=False):
        raise UserError(f"{path} already exists: a request with this id was already saved; nothing was overwritten")
    return path


def load_request_state(state_dir: Path, jti: str) -> dict[str, Any]:
    path = _state_path(state_dir, jti)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"no saved request {jti!r} in {state_dir}; give the --state-dir that 'request' used") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"the saved request {path} cannot be read ({exc})") from None


# --- commands ------------------------------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    result = keygen(
        iss=args.iss,
        kid=args.kid,
        role=args.role,
        out_dir=args.out,
        nbf=int(args.nbf.timestamp()) if args.nbf else None,
        exp=int(args.exp.timestamp()) if args.exp else None,
    )
    print(f"private key (keep secret, mode 0600): {result.private_path}")
    print(f"public key set to give residents:     {result.public_path}")
    return 0


def cmd_request(args: argparse.Namespace) -> int:
    _check_root(args.root)
    broker = None if args.dry_run else _broker(args)
    requester = load_signing_key(args.signing_key)
    oversight = load_signing_key(args.oversight_key) if args.oversight_key else None
    built = build_request(
        requester=requester,
        oversight=oversight,
        program=args.program,
        officer=args.officer,
        case=args.case,
        purpose=args.purpose,
        basis=args.basis,
        warrant_ref=args.warrant_ref,
        court=args.court,
        lat=args.lat,
        lon=args.lon,
        radius_m=args.radius,
        window_start=args.from_,
        window_end=args.to,
        lifetime_s=args.lifetime,
    )
    claims = request_claims(built.message)
    topics = request_topics(args.root, args.lat, args.lon, args.radius)
    deliveries_filter = f"{args.root}/v1/deliveries/{built.jti}/#"
    client_id = f"doorbell-city-{built.jti}"
    state = {
        "jti": built.jti,
        "root": args.root,
        "client_id": client_id,
        "session_expiry_s": args.session_expiry,
        "iat": claims["iat"],
        "exp": claims["exp"],
        "topics": topics,
        "recipient_private_jwk": built.recipient_private,
        "message": built.message,
    }
    # Saved before anything is sent: if publishing fails half-way, `receive` still works.
    path = save_request_state(args.state_dir, state)

    if broker is not None:
        session = MqttSession(
            broker, client_id=client_id, clean_start=True, session_expiry_s=args.session_expiry, timeout_s=args.timeout
        )
        session.connect()
        try:
            # Subscribe first: a camera may answer before the last copy is out.
            session.subscribe(deliveries_filter)
            for topic in topics:
                expiry = claims["exp"] - int(time.time())
                if expiry <= 0:
                    raise UserError("the request expired while it was being published; send it again")
                session.publish(topic, built.message, expiry_s=expiry)
        finally:
            session.close()

    if args.json:
        print(json.dumps({"jti": built.jti, "exp": claims["exp"], "topics": topics, "state_file": str(path),
                          "published": broker is not None, "message": built.message}, indent=2))
    else:
        verb = "published to" if broker is not None else "built (not published, --dry-run) for"
        print(f"request {built.jti} {verb} {len(topics)} cell topic(s); it expires at {format_utc(datetime.fromtimestamp(claims['exp'], UTC))}")
        for t in topics:
            print(f"  {t}")
        print(f"recipient key saved in {path}")
        print(f"collect deliveries with: doorbell-city receive --root {args.root} --jti {built.jti} ...")
    return 0


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def cmd_receive(args: argparse.Namespace) -> int:
    broker = _broker(args)
    if not args.wait > 0:
        raise UserError("--wait must be a positive number of seconds")
    state = load_request_state(args.state_dir, args.jti)
    if state.get("root") != args.root:
        raise UserError(f"request {args.jti} was published under --root {state.get('root')!r}, not {args.root!r}")
    recipient = state["recipient_private_jwk"]
    out_dir = args.out / args.jti
    collector = DeliveryCollector(root=args.root, jti=args.jti)
    opened: list[str] = []
    rejected: dict[str, str] = {}
    finished: set[str] = set()

    session = MqttSession(
        broker,
        client_id=state["client_id"],
        clean_start=False,  # pick up what the broker queued since `request`
        session_expiry_s=state.get("session_expiry_s", DEFAULT_SESSION_EXPIRY_S),
        timeout_s=args.timeout,
    )
    session.connect()
    try:
        if not session.session_present:
            _progress("note: the broker kept no session for this request (it expired, or the broker restarted); "
                      "deliveries sent while nobody listened are lost. Waiting for new ones.")
        session.subscribe(f"{args.root}/v1/deliveries/{args.jti}/#")
        _progress(f"waiting up to {args.wait:g} s for deliveries for {args.jti} ...")
        deadline = time.monotonic() + args.wait
        while time.monotonic() < deadline and (args.count is None or len(opened) < args.count):
            msg = session.next_message(min(1.0, deadline - time.monotonic()))
            if msg is None:
                continue
            pend = collector.add(msg.topic, msg.payload)
            if pend is None or pend.delivery_id in finished:
                continue
            if pend.expected is not None:
                _progress(f"  delivery {pend.delivery_id}: {len(pend.chunks)}/{pend.expected} chunks")
            if not pend.complete:
                continue
            finished.add(pend.delivery_id)
            assert pend.manifest is not None
            try:
                delivery = open_delivery(pend.manifest, pend.chunks, recipient, args.jti, delivery_id=pend.delivery_id)
            except DeliveryRejected as exc:
                rejected[pend.delivery_id] = str(exc)
                _progress(f"  delivery {pend.delivery_id} REJECTED: {exc}")
                continue
            clip_path = write_delivery(out_dir, delivery.delivery_id, delivery.clip, delivery.manifest, delivery.claims)
            opened.append(delivery.delivery_id)
            g = delivery.claims["granted"]
            _progress(f"  delivery {delivery.delivery_id} verified from device {delivery.device_kid}: "
                      f"{g['start']} to {g['end']}, {len(delivery.clip)} bytes -> {clip_path}")
    finally:
        session.close()

    for did, pend in collector.pending.items():
        if did not in finished:
            have = f"{len(pend.chunks)} of {pend.expected}" if pend.expected is not None else f"{len(pend.chunks)} chunks, no manifest"
            _progress(f"  delivery {did} incomplete ({have}); discarded (cut off by the kill switch or the network)")
    print(f"{len(opened)} delivery(ies) verified and saved under {out_dir}" if opened else "no complete delivery arrived")
    if rejected:
        return EXIT_SOME_REJECTED
    return 0 if opened else EXIT_NOTHING_RECEIVED


def write_delivery(out_dir: Path, delivery_id: str, clip: bytes, manifest: str, claims: dict[str, Any]) -> Path:
    """The clip, the signed manifest (chain-of-custody record) and its readable claims."""
    out_dir.mkdir(parents=True, exist_ok=True)
    clip_path = out_dir / f"{delivery_id}.mp4"
    clip_path.write_bytes(clip)
    (out_dir / f"{delivery_id}.manifest.jws").write_text(manifest + "\n", encoding="ascii")
    (out_dir / f"{delivery_id}.manifest.json").write_text(json.dumps(claims, indent=2) + "\n", encoding="utf-8")
    return clip_path


# --- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="doorbell-city",
        description="Agency reference client: make signing keys, send signed footage requests, receive encrypted deliveries.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("keygen", help="make an Ed25519 signing key and the public key set for residents")
    p.add_argument("--iss", required=True, help="agency id, e.g. jackson-pd")
    p.add_argument("--kid", required=True, help="key id, e.g. jpd-2026a (names the files too)")
    p.add_argument("--role", choices=("requester", "oversight"), default="requester")
    p.add_argument("--out", type=Path, default=Path("."), help="directory for the key files (default: here)")
    p.add_argument("--nbf", type=_rfc3339("--nbf"), help="key valid from (RFC 3339)")
    p.add_argument("--exp", type=_rfc3339("--exp"), help="key valid until (RFC 3339)")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("request", help="sign a footage request and publish it to every cell the circle touches")
    p.add_argument("--signing-key", type=Path, required=True, help="requester private JWK from keygen")
    p.add_argument("--oversight-key", type=Path, help="oversight private JWK, to co-sign (general JSON serialization)")
    p.add_argument("--program", "--aud", dest="program", required=True, help="program id the residents enrolled in (aud)")
    p.add_argument("--officer", required=True, help="requesting officer (sub)")
    p.add_argument("--case", required=True, help="case or incident number")
    p.add_argument("--purpose", required=True, help="why, in words the resident will read (up to 280 characters)")
    p.add_argument("--basis", choices=("consent", "warrant"), required=True)
    p.add_argument("--warrant-ref", help="warrant reference (with --basis warrant)")
    p.add_argument("--court", help="issuing court (with --basis warrant)")
    p.add_argument("--lat", type=_float("--lat"), required=True, help="incident latitude, degrees")
    p.add_argument("--lon", type=_float("--lon"), required=True, help="incident longitude, degrees")
    p.add_argument("--radius", type=_float("--radius"), required=True, help="metres around the incident, at most 2000")
    p.add_argument("--from", dest="from_", type=_rfc3339("--from"), required=True, help="footage wanted from (RFC 3339)")
    p.add_argument("--to", type=_rfc3339("--to"), required=True, help="footage wanted until (RFC 3339)")
    p.add_argument("--lifetime", type=_positive_int("--lifetime", 1, 900), default=DEFAULT_LIFETIME_S,
                   help=f"seconds the request stays valid (default {DEFAULT_LIFETIME_S}, at most 900)")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help=f"where request state is kept (default {DEFAULT_STATE_DIR})")
    p.add_argument("--session-expiry", type=_positive_int("--session-expiry", 60, 7 * 86400), default=DEFAULT_SESSION_EXPIRY_S,
                   help="seconds the broker holds deliveries for this request while no receiver is connected (default 86400)")
    p.add_argument("--dry-run", action="store_true", help="build, sign and save, but do not publish")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    _add_broker_args(p)
    p.set_defaults(func=cmd_request)

    p = sub.add_parser("receive", help="collect, verify and decrypt the deliveries for a request")
    p.add_argument("--jti", required=True, help="the request id that 'request' printed")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="where 'request' kept its state")
    p.add_argument("--out", type=Path, default=Path("deliveries"), help="directory for clips and manifests (default ./deliveries)")
    p.add_argument("--wait", type=_float("--wait"), default=600.0, help="seconds to wait for deliveries (default 600)")
    p.add_argument("--count", type=_positive_int("--count"), help="stop after this many verified deliveries")
    _add_broker_args(p)
    p.set_defaults(func=cmd_receive)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # A jti is base64url: about one in 64 begins with '-', and must work as `request` printed it.
    args = build_parser().parse_args(glue_dash_values(list(sys.argv[1:] if argv is None else argv), ("--jti",)))
    return run_command(lambda: args.func(args), prog="doorbell-city", debug_env="DOORBELL_CITY_DEBUG")


if __name__ == "__main__":
    sys.exit(main())
