"""The agency reference client: keys, requests, the geohash cover, the command line, and the wire."""

from __future__ import annotations

import base64
import json
import math
import stat
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from joserfc import jws as jose_jws
from joserfc.jwk import OKPKey

from agent.city import build_request, cover_cells, keygen, load_signing_key
from agent.city.cli import main
from agent.city.requests import distance_to_cell_m
from agent.errors import UserError
from agent.protocol import geohash
from agent.protocol.geo import EARTH_RADIUS_M, haversine_m
from agent.timeutil import UTC
from tests.conftest import VECTORS

REQUEST_MEMBERS = ["v", "jti", "iss", "aud", "sub", "iat", "exp", "case", "purpose", "basis", "area", "window", "recipient"]
NOW = datetime(2026, 12, 3, 18, 0, 0, tzinfo=UTC)
START, END = datetime(2026, 12, 3, 16, 30, tzinfo=UTC), datetime(2026, 12, 3, 17, 0, tzinfo=UTC)
PROGRAM = "jackson-ms/camera-pilot-2026"


def _b64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _strict(data: bytes) -> dict[str, Any]:
    def no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        assert len({k for k, _ in pairs}) == len(pairs), "duplicate member"
        return dict(pairs)

    return json.loads(data, object_pairs_hook=no_dupes)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Any]:
    req = keygen(iss="jackson-pd", kid="jpd-test-1", out_dir=tmp_path / "keys")
    ovs = keygen(iss="jackson-oversight", kid="jxn-ovs-1", role="oversight", out_dir=tmp_path / "keys")
    return {
        "requester": load_signing_key(req.private_path),
        "oversight": load_signing_key(ovs.private_path),
        "jwks": {"keys": req.public_jwks["keys"] + ovs.public_jwks["keys"]},
        "paths": (req, ovs),
    }


def _request_args(keys: dict[str, Any], **over: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(
        requester=keys["requester"], program=PROGRAM, officer="badge-4471", case="JPD-2026-001234",
        purpose="Burglary reported on the 1200 block of N State St.", basis="consent",
        lat=32.299839, lon=-90.183108, radius_m=300, window_start=START, window_end=END, now=NOW - timedelta(seconds=30),
    )
    args.update(over)
    return args


# --- keygen ------------------------------------------------------------------------------------


def test_keygen_writes_a_0600_private_jwk_and_a_public_set(tmp_path: Path) -> None:
    result = keygen(iss="jackson-pd", kid="jpd-2026a", out_dir=tmp_path, nbf=1735689600, exp=1798761600)
    assert stat.S_IMODE(result.private_path.stat().st_mode) == 0o600
    private = json.loads(result.private_path.read_text())
    jwks = json.loads(result.public_path.read_text())
    assert jwks == result.public_jwks
    (key,) = jwks["keys"]
    assert key == {"kty": "OKP", "crv": "Ed25519", "x": private["x"], "kid": "jpd-2026a", "use": "sig",
                   "iss": "jackson-pd", "role": "requester", "nbf": 1735689600, "exp": 1798761600}
    assert "d" not in key
    # the private key really is the public key's other half
    signing = load_signing_key(result.private_path)
    Ed25519PublicKey.from_public_bytes(_b64(key["x"])).verify(signing.sign(b"m"), b"m")


def test_keygen_public_set_loads_into_the_agents_trust_store(tmp_path: Path) -> None:
    from agent.protocol.trust import TrustStore

    result = keygen(iss="jackson-oversight", kid="ovs-1", role="oversight", out_dir=tmp_path)
    store = TrustStore.from_jwks(json.loads(result.public_path.read_text()))
    got = store.get("ovs-1")
    assert got is not None and got.role == "oversight" and got.iss == "jackson-oversight"


def test_keygen_refuses_to_overwrite_and_bad_names(tmp_path: Path) -> None:
    keygen(iss="jackson-pd", kid="k1", out_dir=tmp_path)
    with pytest.raises(UserError, match="already exists"):
        keygen(iss="jackson-pd", kid="k1", out_dir=tmp_path)
    with pytest.raises(UserError, match="--iss"):
        keygen(iss="Jackson PD", kid="k2", out_dir=tmp_path)
    with pytest.raises(UserError, match="--kid"):
        keygen(iss="jackson-pd", kid="../evil", out_dir=tmp_path)
    with pytest.raises(UserError, match="--role"):
        keygen(iss="jackson-pd", kid="k3", role="admin", out_dir=tmp_path)


# --- build_request -------------------------------------------------------------------------


def test_compact_request_has_exactly_the_section_3_members_and_verifies(keys: dict[str, Any]) -> None:
    built = build_request(**_request_args(keys))
    h, p, s = built.message.split(".")
    assert all("=" not in part for part in (h, p, s))
    assert _strict(_b64(h)) == {"alg": "Ed25519", "kid": "jpd-test-1", "typ": "footage-request+jwt"}
    claims = _strict(_b64(p))
    assert list(claims) == REQUEST_MEMBERS
    assert claims["v"] == 1 and claims["jti"] == built.jti and 16 <= len(built.jti) <= 64
    assert claims["iss"] == "jackson-pd" and claims["aud"] == PROGRAM and claims["sub"] == "badge-4471"
    assert claims["exp"] - claims["iat"] == 600 and claims["iat"] == int((NOW - timedelta(seconds=30)).timestamp())
    assert claims["area"] == {"lat": 32.299839, "lon": -90.183108, "radius_m": 300}
    assert type(claims["area"]["radius_m"]) is int
    assert claims["window"] == {"start": "2026-12-03T16:30:00Z", "end": "2026-12-03T17:00:00Z"}
    assert set(claims["recipient"]) == {"kty", "crv", "x"}
    # the recipient private key we keep belongs to the public key we sent
    priv = X25519PrivateKey.from_private_bytes(_b64(built.recipient_private["d"]))
    raw = priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert _b64(claims["recipient"]["x"]) == raw
    # an independent JOSE library agrees the signature is good
    pub = next(k for k in keys["jwks"]["keys"] if k["kid"] == "jpd-test-1")
    okp = OKPKey.import_key({k: pub[k] for k in ("kty", "crv", "x")})
    obj = jose_jws.deserialize_compact(built.message, okp, algorithms=["Ed25519"])
    assert json.loads(obj.payload) == claims


def test_warrant_request_carries_the_warrant_object(keys: dict[str, Any]) -> None:
    built = build_request(**_request_args(keys, basis="warrant", warrant_ref="SW-2026-88", court="Hinds County Court"))
    claims = _strict(_b64(built.message.split(".")[1]))
    assert list(claims) == REQUEST_MEMBERS[:10] + ["warrant", "area", "window", "recipient"]
    assert claims["warrant"] == {"ref": "SW-2026-88", "court": "Hinds County Court"}


def test_cosigned_request_is_general_json_with_two_verifying_signatures(keys: dict[str, Any]) -> None:
    built = build_request(**_request_args(keys, oversight=keys["oversight"]))
    doc = _strict(built.message.encode())
    assert set(doc) == {"payload", "signatures"}
    assert len(doc["signatures"]) == 2
    by_kid = {k["kid"]: k for k in keys["jwks"]["keys"]}
    for sig in doc["signatures"]:
        assert set(sig) == {"protected", "signature"}
        header = _strict(_b64(sig["protected"]))
        assert set(header) == {"alg", "kid", "typ"} and header["alg"] == "Ed25519"
        Ed25519PublicKey.from_public_bytes(_b64(by_kid[header["kid"]]["x"])).verify(
            _b64(sig["signature"]), f"{sig['protected']}.{doc['payload']}".encode()
        )
    assert [_strict(_b64(s["protected"]))["kid"] for s in doc["signatures"]] == ["jpd-test-1", "jxn-ovs-1"]


def test_each_request_gets_a_fresh_jti_and_recipient_key(keys: dict[str, Any]) -> None:
    a, b = build_request(**_request_args(keys)), build_request(**_request_args(keys))
    assert a.jti != b.jti and a.recipient_private["d"] != b.recipient_private["d"]


@pytest.mark.parametrize(
    "over, message",
    [
        ({"radius_m": 0}, "--radius"),
        ({"radius_m": 2000.5}, "--radius"),
        ({"lat": 91}, "--lat"),
        ({"lon": float("nan")}, "--lon"),
        ({"officer": ""}, "--officer"),
        ({"purpose": "x" * 281}, "--purpose.*280"),
        ({"case": "A\nB"}, "--case.*control character"),
        ({"purpose": "bad \udcff byte"}, "--purpose is not valid Unicode"),
        ({"basis": "hunch"}, "--basis"),
        ({"basis": "warrant"}, "--warrant-ref and --court"),
        ({"warrant_ref": "SW-1", "court": "X"}, "go with --basis warrant"),
        ({"window_start": END, "window_end": START}, "--from must be before --to"),
        ({"window_end": START + timedelta(hours=12, seconds=1)}, "12 hours"),
        ({"window_start": datetime(2026, 12, 3, 16, 30)}, "--from.*zone"),
        ({"lifetime_s": 901}, "--lifetime"),
        ({"program": "caf\u00e9"}, "--program"),
        ({"jti": "too-short"}, "jti"),
    ],
)
def test_build_request_names_the_bad_field(keys: dict[str, Any], over: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=message):
        build_request(**_request_args(keys, **over))


def test_build_request_refuses_keys_in_the_wrong_role(keys: dict[str, Any]) -> None:
    with pytest.raises(UserError, match="requester key"):
        build_request(**_request_args(keys, requester=keys["oversight"]))
    with pytest.raises(UserError, match="oversight key"):
        build_request(**_request_args(keys, oversight=keys["requester"]))


def test_request_is_granted_by_the_agents_own_decision(keys: dict[str, Any]) -> None:
    """End to end through engineer C's decide(): what we build is what an agent accepts."""
    from agent.protocol.conformance import STATE_MEMBERS, VectorState
    from agent.protocol.decision import Policy, Reason, decide
    from agent.protocol.trust import TrustStore

    agent = json.loads(VECTORS.read_text())["agent"]
    policy = Policy.from_mapping({k: v for k, v in agent.items() if k not in STATE_MEMBERS})
    state = VectorState.from_vector(agent)
    trust = TrustStore.from_jwks(keys["jwks"])
    for oversight, purpose in ((None, "Burglary"), (keys["oversight"], "Robo en la calle Ñ — testigo 🚲")):
        built = build_request(**_request_args(keys, oversight=oversight, purpose=purpose))
        decision = decide(built.message.encode(), trust=trust, policy=policy, state=state, now=NOW)
        assert decision.reason is Reason.GRANTED, decision.detail
        assert decision.granted == (START, END)
    strict = Policy.from_mapping({**{k: v for k, v in agent.items() if k not in STATE_MEMBERS}, "require_oversight": True})
    lone = build_request(**_request_args(keys))
    assert decide(lone.message.encode(), trust=trust, policy=strict, state=state, now=NOW).reason is Reason.OVERSIGHT_REQUIRED


# --- the geohash cover -------------------------------------------------------------------------


def _offset(lat: float, lon: float, dist_m: float, bearing_deg: float) -> tuple[float, float]:
    """The point dist_m from (lat, lon) along bearing (great circle, the protocol's sphere)."""
    d = dist_m / EARTH_RADIUS_M
    b = math.radians(bearing_deg)
    p1, l1 = math.radians(lat), math.radians(lon)
    p2 = math.asin(math.sin(p1) * math.cos(d) + math.cos(p1) * math.sin(d) * math.cos(b))
    l2 = l1 + math.atan2(math.sin(b) * math.sin(d) * math.cos(p1), math.cos(d) - math.sin(p1) * math.sin(p2))
    return math.degrees(p2), (math.degrees(l2) + 540) % 360 - 180


def _cells_touched_by_sampling(lat: float, lon: float, radius_m: float) -> set[str]:
    """Every cell some point of the disc lies in: rings every 25 m, points every 0.5 degrees, and the rim."""
    cells = {geohash.encode(lat, lon, 5)}
    rings = [r for r in range(25, int(radius_m), 25)] + [radius_m]
    for r in rings:
        for i in range(720):
            cells.add(geohash.encode(*_offset(lat, lon, r, i * 0.5), 5))
    return cells


def test_circle_at_a_cell_corner_touches_four_cells() -> None:
    lat_lo, lat_hi, lon_lo, lon_hi = geohash.bounds("9vk1d")
    cells = cover_cells(lat_hi, lon_hi, 100)
    assert len(cells) == 4
    assert "9vk1d" in cells
    assert cells == sorted(_cells_touched_by_sampling(lat_hi, lon_hi, 100))


def test_two_km_circle_near_the_middle_of_a_cell_touches_one() -> None:
    lat_lo, lat_hi, lon_lo, lon_hi = geohash.bounds("s0000")  # at the equator: 4.9 km x 4.9 km
    lat, lon = (lat_lo + lat_hi) / 2, (lon_lo + lon_hi) / 2
    assert cover_cells(lat, lon, 2000) == ["s0000"]


def test_circle_just_over_an_edge_includes_the_neighbour() -> None:
    lat_lo, lat_hi, lon_lo, lon_hi = geohash.bounds("9vk1d")
    mid_lat = (lat_lo + lat_hi) / 2
    edge_distance = haversine_m(mid_lat, lon_hi - 0.001, mid_lat, lon_hi)
    east = geohash.encode(mid_lat, lon_hi + 0.001, 5)
    assert east not in cover_cells(mid_lat, lon_hi - 0.001, edge_distance * 0.9)
    assert east in cover_cells(mid_lat, lon_hi - 0.001, edge_distance * 1.05)


@pytest.mark.parametrize(
    "lat, lon, radius",
    [
        (32.29876, -90.18481, 2000),  # Jackson, a circle spanning several cells
        (32.299839, -90.183108, 300),
        (0.0, 0.0, 2000),  # four quadrants of the globe meet
        (-33.8688, 151.2093, 1500),
        (64.1466, -21.9426, 2000),  # high latitude: narrow cells
        (10.0, 179.99, 2000),  # across the antimeridian
    ],
)
def test_cover_includes_every_cell_the_circle_truly_touches(lat: float, lon: float, radius: float) -> None:
    cover = set(cover_cells(lat, lon, radius))
    sampled = _cells_touched_by_sampling(lat, lon, radius)
    assert geohash.encode(lat, lon, 5) in cover
    assert sampled <= cover, f"missed {sorted(sampled - cover)}"
    # and nothing far away: every extra cell is within the 1 % margin of the circle
    for cell in cover:
        assert distance_to_cell_m(lat, lon, cell) <= radius * 1.01


def test_distance_to_cell_matches_dense_sampling_of_its_edges() -> None:
    cell = "9vk1d"
    lat_lo, lat_hi, lon_lo, lon_hi = geohash.bounds(cell)
    for lat, lon in [(lat_hi + 0.02, lon_hi + 0.03), (lat_lo - 0.01, (lon_lo + lon_hi) / 2), (lat_lo + 0.01, lon_lo - 0.05)]:
        steps = 400
        edge = [(lat_lo + (lat_hi - lat_lo) * i / steps, x) for i in range(steps + 1) for x in (lon_lo, lon_hi)]
        edge += [(y, lon_lo + (lon_hi - lon_lo) * i / steps) for i in range(steps + 1) for y in (lat_lo, lat_hi)]
        sampled = min(haversine_m(lat, lon, a, b) for a, b in edge)
        exact = distance_to_cell_m(lat, lon, cell)
        assert exact <= sampled + 1e-6 and sampled - exact < 10  # sampling is at most ~7 m off at this spacing
    assert distance_to_cell_m((lat_lo + lat_hi) / 2, (lon_lo + lon_hi) / 2, cell) == 0


# --- the command line ------------------------------------------------------------------------


def test_cli_keygen_then_dry_run_request(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen", "--iss", "jackson-pd", "--kid", "jpd-cli", "--out", str(tmp_path / "k")]) == 0
    assert stat.S_IMODE((tmp_path / "k" / "jpd-cli.private.jwk").stat().st_mode) == 0o600
    capsys.readouterr()
    code = main([
        "request", "--dry-run", "--json", "--root", "civic/jackson-ms", "--state-dir", str(tmp_path / "state"),
        "--signing-key", str(tmp_path / "k" / "jpd-cli.private.jwk"), "--program", PROGRAM,
        "--officer", "badge-4471", "--case", "JPD-1", "--purpose", "Burglary", "--basis", "consent",
        "--lat", "32.29876", "--lon", "-90.18481", "--radius", "300",
        "--from", "2026-12-03T10:30:00-06:00", "--to", "2026-12-03T17:00:00Z",
    ])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["published"] is False
    assert out["topics"] == [geohash.request_topic("civic/jackson-ms", c) for c in cover_cells(32.29876, -90.18481, 300)]
    claims = json.loads(_b64(out["message"].split(".")[1]))
    assert claims["window"] == {"start": "2026-12-03T16:30:00Z", "end": "2026-12-03T17:00:00Z"}
    state_file = Path(out["state_file"])
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    state = json.loads(state_file.read_text())
    assert state["jti"] == claims["jti"] and state["recipient_private_jwk"]["x"] == claims["recipient"]["x"]


def _base_request(tmp_path: Path) -> list[str]:
    keygen(iss="jackson-pd", kid="cli-k", out_dir=tmp_path)
    return [
        "request", "--dry-run", "--root", "civic/x", "--state-dir", str(tmp_path / "s"),
        "--signing-key", str(tmp_path / "cli-k.private.jwk"), "--program", PROGRAM, "--officer", "o",
        "--case", "c", "--purpose", "p", "--basis", "consent", "--lat", "32.3", "--lon", "-90.2", "--radius", "300",
        "--from", "2026-12-03T16:30:00Z", "--to", "2026-12-03T17:00:00Z",
    ]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--radius": "0"}, "--radius 0"),
        ({"--radius": "wide"}, "--radius 'wide' is not a number"),
        ({"--from": "2026-12-03 16:30"}, "--from .* has no zone"),
        ({"--from": "yesterday"}, "--from 'yesterday' is not an RFC 3339 time"),
        ({"--to": "2026-12-03T16:00:00Z"}, "--from must be before --to"),
        ({"--basis": "warrant"}, "--warrant-ref and --court"),
        ({"--root": "civic/#"}, "--root"),
        ({"--signing-key": "/nonexistent/key.jwk"}, "does not exist"),
        ({"--lifetime": "1200"}, "--lifetime must be between 1 and 900"),
    ],
)
def test_cli_argument_errors_are_sentences(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict[str, str], message: str
) -> None:
    argv = _base_request(tmp_path)
    for flag, value in change.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert __import__("re").search(message, err), err


def test_cli_receive_without_saved_request_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["receive", "--jti", "req-nothing-here-000", "--root", "civic/x", "--insecure-plaintext",
                 "--state-dir", str(tmp_path)])
    assert code == 2
    assert "no saved request" in capsys.readouterr().err


def test_cli_receive_takes_a_jti_that_starts_with_a_dash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """About one random jti in 64 begins with '-': `receive --jti` must take it as `request` printed it."""
    code = main(["receive", "--jti", "-req-nothing-here-00", "--root", "civic/x", "--insecure-plaintext",
                 "--state-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "expected one argument" not in err and "no saved request" in err


def test_cli_refuses_half_a_client_certificate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = _base_request(tmp_path)
    argv.remove("--dry-run")
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    assert main(argv + ["--cert", str(cert)]) == 2
    assert "--cert and --key go together" in capsys.readouterr().err


# --- over a real broker (tests/broker.py: Mosquitto with TLS, client certificates and ACLs) -----

from tests.broker import Broker, PeerClient  # noqa: E402


def _broker_flags(b: Broker) -> list[str]:
    cred = b.credentials["agency"]
    return ["--root", b.root, "--host", b.host, "--port", str(b.port), "--ca-file", str(b.ca_file),
            "--cert", str(cred.cert_file), "--key", str(cred.key_file),
            "--username", cred.username, f"--password={cred.password}", "--timeout", "10"]  # = form: it may start with -


def _publish_request(tmp_path: Path, b: Broker, capsys: pytest.CaptureFixture[str], lat: float, lon: float) -> dict[str, Any]:
    keygen(iss="jackson-pd", kid="wire-k", out_dir=tmp_path)
    capsys.readouterr()
    code = main([
        "request", "--json", "--state-dir", str(tmp_path / "state"), "--signing-key", str(tmp_path / "wire-k.private.jwk"),
        "--program", PROGRAM, "--officer", "badge-4471", "--case", "JPD-9", "--purpose", "Test", "--basis", "consent",
        "--lat", str(lat), "--lon", str(lon), "--radius", "500",
        "--from", "2026-12-03T16:30:00Z", "--to", "2026-12-03T17:00:00Z", *_broker_flags(b),
    ])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def _seal_for(claims: dict[str, Any], clip: bytes) -> Any:
    from agent.protocol.sealing import seal_delivery
    from agent.state.devicekey import DeviceKey

    return seal_delivery(
        clip, jti=claims["jti"], recipient_jwk=claims["recipient"], device_key=DeviceKey.generate(),
        granted=(START, END), frames=10, width=64, height=48, log_seq=7, log_hash="ab" * 32, now=NOW,
    )


@pytest.mark.slow
def test_request_reaches_every_cell_and_receive_opens_a_delivery(
    tmp_path: Path, broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    import os

    lat_lo, lat_hi, lon_lo, lon_hi = geohash.bounds("9vk1d")
    lat, lon = lat_hi - 0.001, lon_hi - 0.001  # near a corner: several cells
    with PeerClient(broker, "agent") as camera:
        camera.subscribe(f"{broker.root}/v1/requests/#")
        out = _publish_request(tmp_path, broker, capsys, lat, lon)
        assert len(out["topics"]) >= 2
        got = {}
        for _ in out["topics"]:
            msg = camera.messages.get(timeout=10)
            got[msg.topic] = msg
        assert set(got) == set(out["topics"])
        for msg in got.values():
            assert msg.payload.decode() == out["message"]
            assert msg.qos == 1
            assert 0 < msg.properties.MessageExpiryInterval <= 600  # Message Expiry = exp - now
        claims = json.loads(_b64(out["message"].split(".")[1]))

        # The request command has disconnected; its session holds the deliveries until receive comes.
        clip = os.urandom(2 * 262144 + 99)
        sealed = _seal_for(claims, clip)
        assert not camera.publish(sealed.manifest_topic(broker.root), sealed.manifest.encode()).is_failure
        for n, payload in enumerate(sealed.chunks):
            assert not camera.publish(sealed.chunk_topic(broker.root, n), payload).is_failure

    code = main(["receive", "--jti", claims["jti"], "--state-dir", str(tmp_path / "state"), "--out", str(tmp_path / "out"),
                 "--wait", "20", "--count", "1", *_broker_flags(broker)])
    err = capsys.readouterr().err
    assert code == 0, err
    folder = tmp_path / "out" / claims["jti"]
    assert (folder / f"{sealed.delivery_id}.mp4").read_bytes() == clip
    assert (folder / f"{sealed.delivery_id}.manifest.jws").read_text().strip() == sealed.manifest
    assert "3/3 chunks" in err


@pytest.mark.slow
def test_receive_discards_a_delivery_cut_off_by_the_kill_switch(
    tmp_path: Path, broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _publish_request(tmp_path, broker, capsys, 32.29876, -90.18481)
    claims = json.loads(_b64(out["message"].split(".")[1]))
    sealed = _seal_for(claims, bytes(3 * 262144))
    with PeerClient(broker, "agent") as camera:
        camera.publish(sealed.manifest_topic(broker.root), sealed.manifest.encode())
        camera.publish(sealed.chunk_topic(broker.root, 0), sealed.chunk(0))  # then the kill switch
    code = main(["receive", "--jti", claims["jti"], "--state-dir", str(tmp_path / "state"), "--out", str(tmp_path / "out"),
                 "--wait", "2", *_broker_flags(broker)])
    err = capsys.readouterr().err
    assert code == 1
    assert f"delivery {sealed.delivery_id} incomplete (1 of 3)" in err
    assert not (tmp_path / "out" / claims["jti"] / f"{sealed.delivery_id}.mp4").exists()


@pytest.mark.slow
def test_request_refuses_a_broker_it_cannot_verify(tmp_path: Path, broker: Broker, capsys: pytest.CaptureFixture[str]) -> None:
    keygen(iss="jackson-pd", kid="tls-k", out_dir=tmp_path)
    flags = _broker_flags(broker)
    flags[flags.index("--ca-file") + 1] = str(broker.wrong_ca_file)
    code = main([
        "request", "--state-dir", str(tmp_path / "s"), "--signing-key", str(tmp_path / "tls-k.private.jwk"),
        "--program", PROGRAM, "--officer", "o", "--case", "c", "--purpose", "p", "--basis", "consent",
        "--lat", "32.3", "--lon", "-90.2", "--radius", "300",
        "--from", "2026-12-03T16:30:00Z", "--to", "2026-12-03T17:00:00Z", *flags,
    ])
    err = capsys.readouterr().err
    assert code == 2
    assert "not trusted" in err and "--ca-file" in err
