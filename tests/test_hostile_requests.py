"""Hostile input, property-based: mutated signed requests never crash the decision and are never granted.

Every test starts from a request the agent grants (the vectors' ``base-compact`` message, and the same
claims as a general JSON serialization signed by the requester and an oversight key) and changes it.

What may legitimately still be granted after a change, and why nothing else may:

- **Compact serialization: nothing.** The signature covers the exact base64url text of the header and
  payload, and the agent accepts one spelling only (unpadded, URL alphabet, canonical trailing bits,
  no whitespace, exactly the header members ``alg``, ``kid``, ``typ``). Any other byte string is refused
  before trust (``malformed``, ``unknown_key`` or ``bad_signature``).
- **General JSON serialization: re-encodings of the envelope only.** RFC 7515 signs the protected header
  and the payload, not the JSON around them, so the same ``payload`` string with a non-empty subset of
  the original (``protected``, ``signature``) pairs, in any member order, with any JSON whitespace or
  string escapes, still verifies. That is the definition of *neutral* used here (:func:`_neutral`,
  written independently of the agent's parser). A neutral copy carries the same claims and the same
  ``jti``; the replay memory then calls it ``replayed`` (different bytes), so it can never be granted
  a second time (tests/test_policy.py ``test_duplicate_and_replay_use_the_whole_message_hash``).
  A captured compact request rewritten as general JSON is neutral in the same sense.
- **Claims changed and properly re-signed** (as a buggy or hostile agency would): every value of the
  wrong JSON type, out of range, a member removed, an unknown member, a duplicated member name, or a
  control character is ``malformed``; a look-alike issuer or audience is refused; free text keeps
  exactly the characters that were signed.

Differential check: for every mutated message, if joserfc (an independent JOSE implementation, pinned
to the agent's algorithms) refuses it as a JWS, the agent refuses it before trust as well.

Run lengths: the ``ci`` hypothesis profile (the default) runs 5,400 sampled cases plus 3,966 exhaustive single-byte changes (about 30 s); the long run is
``DOORBELL_HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest -q tests/test_hostile_requests.py``
(108,000 sampled cases). The example database is off and hypothesis's caches go to the temp folder, so
nothing is written into the checkout.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import tempfile
import unicodedata
from datetime import UTC, datetime
from functools import cache
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.control import currently_in_test_context
from joserfc import jws as jose_jws
from joserfc.jwk import KeySet

from agent.protocol.conformance import STATE_MEMBERS, VectorState
from agent.protocol.decision import PRE_AUTH_REASONS, Decision, Policy, Reason, decide
from agent.protocol.jose import b64url_decode, b64url_encode
from agent.protocol.request import CLAIMS
from agent.protocol.trust import TrustStore
from tests import protocol_signing as ps

# Nothing of hypothesis is written into the checkout: no example database, and its caches go to the temp folder.
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "doorbell-agent-hypothesis"))
PER_TEST = {"ci": 600, "long": 12_000}  # nine sampled property tests: 5,400 cases in CI, 108,000 in the long run
for _name, _n in PER_TEST.items():
    settings.register_profile(
        _name, max_examples=_n, database=None, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )  # fmt: skip
PROFILE = os.environ.get("DOORBELL_HYPOTHESIS_PROFILE", "ci")
if PROFILE not in PER_TEST:
    raise RuntimeError(f"DOORBELL_HYPOTHESIS_PROFILE must be one of {sorted(PER_TEST)}, not {PROFILE!r}")
settings.load_profile(PROFILE)
pytestmark = pytest.mark.timeout(0 if PROFILE == "long" else 300)  # the long run takes minutes per test

NOW = datetime(2026, 12, 3, 18, 0, tzinfo=UTC)
COMPACT = ps.case("base-compact")["message"].encode()
GENERAL = ps.general(ps.base_claims(), ["jpd-2026a", "jxn-oversight-1"])
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# Bytes that sit at the edges of base64url and JSON: the standard alphabet, padding, whitespace,
# separators, quotes and escapes, NUL, a non-breaking space and a BOM in UTF-8, a stray UTF-8 lead byte.
EDGE = [b"=", b"==", b"+", b"/", b" ", b"\n", b"\r\n", b"\t", b".", b"..", b'"', b"\\", b"\\u0041", b"\x00",
        b"%3D", "\u00a0".encode(), "\ufeff".encode(), b"\xc3", b"\xff", b"-", b"_", b"A", b"{", b"}", b",", b"[]"]  # fmt: skip


@cache
def _trust() -> TrustStore:
    return TrustStore.from_jwks(ps.vectors()["trust"])


@cache
def _policy() -> Policy:
    return Policy.from_mapping({k: v for k, v in ps.vectors()["agent"].items() if k not in STATE_MEMBERS})


def _decide(message: bytes) -> Decision:
    state = VectorState.from_vector(ps.vectors()["agent"])
    return decide(message, trust=_trust(), policy=_policy(), state=state, now=NOW)


@cache
def _joserfc_keys() -> KeySet:
    keys = [{m: k[m] for m in ("kty", "crv", "x", "kid")} for k in ps.vectors()["trust"]["keys"]]
    return KeySet.import_key_set({"keys": keys})


def _joserfc_verifies(message: bytes) -> bool:
    """Whether joserfc, pinned to the agent's two names for Ed25519, accepts ``message`` as a JWS."""
    algorithms = ["Ed25519", "EdDSA"]
    try:
        text = message.decode("utf-8")
        if text.lstrip(" \t\r\n").startswith("{"):
            jose_jws.deserialize_json(json.loads(text), _joserfc_keys(), algorithms=algorithms)
        else:
            jose_jws.deserialize_compact(text, _joserfc_keys(), algorithms=algorithms)
    except Exception:  # noqa: BLE001 - any refusal by joserfc counts as a refusal
        return False
    return True


def _no_dups(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len({k for k, _ in pairs}) != len(pairs):
        raise ValueError("duplicate member")
    return dict(pairs)


def _signed_parts(message: bytes) -> tuple[str, frozenset[tuple[str, str]]] | None:
    """(payload, {(protected, signature)}) of a JWS in either serialization; None if it is neither.

    A reference reading of RFC 7515 that knows nothing of the agent's parser.
    """
    try:
        text = message.decode("utf-8")
    except UnicodeDecodeError:
        return None
    try:
        obj = json.loads(text, object_pairs_hook=_no_dups)
    except (ValueError, RecursionError):
        obj = None
    if isinstance(obj, dict):
        sigs = obj.get("signatures")
        if obj.keys() != {"payload", "signatures"} or not isinstance(obj["payload"], str):
            return None
        if not isinstance(sigs, list) or not 1 <= len(sigs) <= 4:
            return None
        pairs = []
        for s in sigs:
            if not isinstance(s, dict) or s.keys() != {"protected", "signature"}:
                return None
            pairs.append((s["protected"], s["signature"]))
        return obj["payload"], frozenset(pairs)
    if obj is not None:
        return None
    parts = text.split(".")
    if len(parts) != 3:
        return None
    return parts[1], frozenset({(parts[0], parts[2])})


def _neutral(message: bytes, original: bytes) -> bool:
    """Same payload text, and only signatures the original carried: a re-encoding that may verify."""
    got, orig = _signed_parts(message), _signed_parts(original)
    assert orig is not None
    return got is not None and got[0] == orig[0] and got[1] <= orig[1]


def _check_mutant(message: bytes, original: bytes) -> Decision:
    """The invariants every changed message must keep; returns the decision for further checks."""
    d = _decide(message)  # raising here fails the test: the decision must return for any bytes
    assert isinstance(d, Decision)
    if currently_in_test_context():  # (the exhaustive test below is not a hypothesis test)
        event(f"{'neutral' if _neutral(message, original) else 'altered'}: {d.reason}")  # --hypothesis-show-statistics
    if _neutral(message, original):
        assert d.reason not in PRE_AUTH_REASONS, ("a neutral re-encoding should still verify", message, d)
    else:
        assert d.reason in PRE_AUTH_REASONS, ("an altered message passed the signature checks", message, d)
        assert d.request is None and d.issuer is None  # nothing from an unauthenticated message is carried
    if not _joserfc_verifies(message):
        assert d.reason in PRE_AUTH_REASONS, ("joserfc refuses this JWS but the agent verified it", message, d)
    return d


def test_the_originals_are_granted() -> None:
    """Without this the properties below would hold vacuously."""
    for original in (COMPACT, GENERAL):
        assert _decide(original).reason is Reason.GRANTED
        assert _joserfc_verifies(original)
    assert _decide(ps.reserialized(COMPACT.decode(), 2)).reason is Reason.GRANTED


# --- byte-level mutations ----------------------------------------------------------------


@st.composite
def byte_mutants(draw: st.DrawFn, original: bytes) -> bytes:
    """One to four flips, overwrites, insertions (of any byte or an edge byte string) and deletions."""
    m = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "edge", "delete", "cut"]))
        i = draw(st.integers(0, max(len(m) - 1, 0)))
        if op == "flip" and m:
            m[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and m:
            m[i] = draw(st.integers(0, 255))
        elif op == "insert":
            m.insert(i, draw(st.integers(0, 255)))
        elif op == "edge":
            m[i:i] = draw(st.sampled_from(EDGE))
        elif op == "delete" and m:
            del m[i : i + draw(st.integers(1, 8))]
        elif op == "cut":
            m = m[:i] if draw(st.booleans()) else m[i:]
    return bytes(m)


@given(byte_mutants(COMPACT))
def test_compact_byte_mutations_are_refused_before_trust(message: bytes) -> None:
    if message != COMPACT:
        d = _check_mutant(message, COMPACT)
        assert d.reason in PRE_AUTH_REASONS  # no other spelling of a compact JWS exists


@given(byte_mutants(GENERAL))
def test_general_json_byte_mutations_are_refused_unless_neutral(message: bytes) -> None:
    if message != GENERAL:
        _check_mutant(message, GENERAL)


# --- base64url segment mutations ----------------------------------------------------------


@st.composite
def segment_edit(draw: st.DrawFn, seg: str) -> str:
    """One base64url-aware change to a segment: each a way a lenient decoder would accept other text."""
    if not seg:  # an earlier edit emptied it
        return draw(st.sampled_from(["", "=", "A", "e30"]))
    op = draw(st.sampled_from(["pad", "std-alphabet", "whitespace", "sibling", "truncate", "extend", "case",
                               "empty", "std-padded", "percent", "quote", "char"]))  # fmt: skip
    if op == "pad":
        return seg + "=" * draw(st.integers(1, 3))
    if op == "std-alphabet":
        return seg.replace("-", "+").replace("_", "/") if ("-" in seg or "_" in seg) else seg + "+"
    if op == "whitespace":
        i = draw(st.integers(0, len(seg)))
        return seg[:i] + draw(st.sampled_from([" ", "\n", "\t", "\r\n", "\u00a0", "\u200b"])) + seg[i:]
    if op == "sibling":  # same decoded bytes, non-zero trailing bits: a second spelling
        spare = {2: 0b1111, 3: 0b11}.get(len(seg) % 4)
        if not spare or seg[-1] not in B64URL:
            return seg + "A"
        v = B64URL.index(seg[-1])
        return seg[:-1] + B64URL[(v & ~spare) | draw(st.integers(1, spare))]
    if op == "truncate":
        return seg[: -draw(st.integers(1, 4))]
    if op == "extend":
        return seg + draw(st.text(alphabet=B64URL, min_size=1, max_size=4))
    if op == "case":
        i = draw(st.integers(0, len(seg) - 1))
        return seg[:i] + seg[i].swapcase() + seg[i + 1 :] if seg[i].isalpha() else seg[:i] + seg[i + 1 :]
    if op == "empty":
        return ""
    if op == "std-padded":
        try:  # the same bytes in standard base64 with padding
            return base64.b64encode(b64url_decode(seg)).decode()
        except ValueError:  # an earlier edit already broke the segment
            return seg + "=="
    if op == "percent":
        return seg.replace("-", "%2D") if "-" in seg else seg + "%3D"
    if op == "quote":
        return f'"{seg}"'
    i = draw(st.integers(0, len(seg) - 1))
    return seg[:i] + draw(st.sampled_from(B64URL.replace(seg[i], ""))) + seg[i + 1 :]


@st.composite
def compact_mutants(draw: st.DrawFn) -> bytes:
    parts = COMPACT.decode().split(".")
    for _ in range(draw(st.integers(1, 3))):
        which = draw(st.integers(0, 2))
        parts[which] = draw(segment_edit(parts[which]))
    text = ".".join(parts)
    shape = draw(st.sampled_from(["as-is", "swap", "extra-part", "surround", "reserialize"]))
    if shape == "swap":
        a, b = draw(st.permutations([0, 1, 2]))[:2]
        parts[a], parts[b] = parts[b], parts[a]
        text = ".".join(parts)
    elif shape == "extra-part":
        text = draw(st.sampled_from([".", "..", ".e30"])) + text if draw(st.booleans()) else text + "."
    elif shape == "surround":
        text = draw(st.sampled_from([" ", "\n", "\ufeff", "\t"])) + text + draw(st.sampled_from(["", "\n", " "]))
    elif shape == "reserialize":  # general JSON around the edited parts: still refused, since they are edited
        text = ps.reserialized(text, draw(st.integers(0, 2))).decode() if text.count(".") == 2 else text
    return text.encode("utf-8", "surrogatepass")


@given(compact_mutants())
def test_compact_segment_mutations_are_refused_before_trust(message: bytes) -> None:
    if message != COMPACT:
        _check_mutant(message, COMPACT)


# --- general JSON envelope mutations ----------------------------------------------------------


def _json_text(obj: Any, draw: st.DrawFn) -> str:
    """``obj`` as JSON in one of many equivalent spellings: whitespace, member order, string escapes."""
    sep = draw(st.sampled_from([(",", ":"), (", ", ": "), (",\n  ", " :\t")]))
    text = json.dumps(obj, separators=sep, sort_keys=draw(st.booleans()), indent=draw(st.sampled_from([None, 2])))
    if draw(st.booleans()):  # escape one character of a string value as \\uXXXX: the same JSON string
        i = draw(st.integers(0, len(text) - 1))
        if text[i].isalnum() and text.count('"', 0, i) % 2 == 1:
            text = text[:i] + f"\\u{ord(text[i]):04x}" + text[i + 1 :]
    return text


@st.composite
def general_mutants(draw: st.DrawFn) -> bytes:
    obj = json.loads(GENERAL)
    sigs = obj["signatures"]
    for _ in range(draw(st.integers(0, 2))):  # edit base64url strings inside the envelope
        target = draw(st.sampled_from(["payload", "protected", "signature"]))
        if target == "payload":
            obj["payload"] = draw(segment_edit(obj["payload"]))
        else:
            s = sigs[draw(st.integers(0, len(sigs) - 1))]
            s[target] = draw(segment_edit(s[target]))
    op = draw(st.sampled_from(["none", "drop", "duplicate", "reorder", "five", "empty", "unprotected", "flattened",
                               "dup-member", "extra-member", "swap-payload", "null", "foreign-sig", "nested"]))  # fmt: skip
    if op == "drop":
        del sigs[draw(st.integers(0, len(sigs) - 1))]
    elif op == "duplicate":
        sigs.append(copy.deepcopy(sigs[draw(st.integers(0, len(sigs) - 1))]))
    elif op == "reorder":
        sigs.reverse()
    elif op == "five":
        sigs.extend(copy.deepcopy(sigs[0]) for _ in range(3))
    elif op == "empty":
        sigs.clear()
    elif op == "unprotected":
        sigs[0]["header"] = {"kid": "jpd-2026a"}
    elif op == "flattened":
        obj = {"payload": obj["payload"], **sigs[0]}
    elif op == "extra-member":
        obj[draw(st.sampled_from(["header", "protected", "Payload", "signature"]))] = "e30"
    elif op == "swap-payload":
        obj["payload"] = b64url_encode(json.dumps({**ps.base_claims(), "jti": "X" * 20}).encode())
    elif op == "null":
        obj[draw(st.sampled_from(["payload", "signatures"]))] = None
    elif op == "foreign-sig":  # a signature by another trusted key over a different payload
        other = json.loads(ps.general({**ps.base_claims(), "jti": "Y" * 20}, ["hcso-2026"]))
        sigs.append(other["signatures"][0])
    elif op == "nested":
        obj["signatures"] = [sigs]
    text = _json_text(obj, draw)
    if op == "dup-member":  # the same member twice: a strict parser refuses, a lenient one keeps the last
        key = draw(st.sampled_from(['"payload"', '"signatures"', '"protected"', '"signature"']))
        i = text.find(key)
        j = text.find(",", i)
        if i >= 0 and j > i:
            text = text[:i] + text[i:j] + ", " + text[i:]
    if draw(st.booleans()):
        text = draw(st.sampled_from(["", " ", "\n", "\r\n\t"])) + text + draw(st.sampled_from(["", "\n", " "]))
    return text.encode()


@given(general_mutants())
def test_general_json_envelope_mutations_are_refused_unless_neutral(message: bytes) -> None:
    d = _check_mutant(message, GENERAL)
    if _neutral(message, GENERAL):
        parts = _signed_parts(message)
        assert parts is not None
        requester = json.loads(GENERAL)["signatures"][0]
        requester_signed = (requester["protected"], requester["signature"]) in parts[1]
        # The same claims, signed by the requester: granted (nothing was altered); without it, wrong_issuer.
        assert d.reason is (Reason.GRANTED if requester_signed else Reason.WRONG_ISSUER), d


@given(st.one_of(st.binary(max_size=2048), st.text(max_size=512).map(lambda t: t.encode("utf-8", "surrogatepass")),
                 st.text(alphabet=B64URL + ".", max_size=900).map(str.encode)))  # fmt: skip
def test_arbitrary_bytes_never_raise_and_never_share(message: bytes) -> None:
    d = _decide(message)
    assert d.reason in PRE_AUTH_REASONS


# --- claims changed and properly re-signed ----------------------------------------------------

TYPES: dict[str, str] = {
    "v": "int", "jti": "str", "iss": "str", "aud": "str", "sub": "str", "iat": "int", "exp": "int", "nbf": "int",
    "case": "str", "purpose": "str", "basis": "str", "area": "obj", "window": "obj", "recipient": "obj",
    "warrant": "obj", "area.lat": "num", "area.lon": "num", "area.radius_m": "num", "window.start": "str",
    "window.end": "str", "recipient.kty": "str", "recipient.crv": "str", "recipient.x": "str",
}  # fmt: skip
_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                  st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))  # fmt: skip
_json_value = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                           max_leaves=8)  # fmt: skip


def _of_wrong_type(kind: str, value: Any) -> bool:
    if kind == "int":
        return type(value) is not int
    if kind == "num":
        return type(value) not in (int, float)
    if kind == "str":
        return not isinstance(value, str)
    return not isinstance(value, dict)


def _set(claims: dict[str, Any], path: str, value: Any) -> None:
    obj = claims
    *parents, last = path.split(".")
    for p in parents:
        obj = obj[p]
    if value is ...:
        del obj[last]
    else:
        obj[last] = value


def _sign(claims: dict[str, Any] | bytes, general: bool) -> bytes:
    return ps.general(claims, ["jpd-2026a"]) if general else ps.compact(claims)


@given(st.sampled_from(sorted(TYPES)), _json_value, st.booleans())
def test_a_value_of_the_wrong_type_is_malformed(path: str, value: Any, general: bool) -> None:
    if not _of_wrong_type(TYPES[path], value) or path == "warrant":  # warrant with basis consent: see below
        return
    claims = ps.base_claims()
    _set(claims, path, value)
    d = _decide(_sign(claims, general))
    assert d.reason is Reason.MALFORMED, (path, value, d)


_BAD_VALUES: dict[str, list[Any]] = {
    "v": [0, 2, -1, 1.0, True, "1"],
    "jti": ["A" * 15, "A" * 65, "req-0001/../../etc", "req 0001 base aaaa", "req-0001-base-aaaaaa\u0430", "ＡＡＡＡＡＡＡＡＡＡＡＡＡＡＡＡ",
            "req-0001-base-aaaaaaaa\n", ""],
    "iss": ["Jackson-pd", "jackson pd", "x" * 65, "", "jackson-p\u0501", "jackson-pd\u200b"],
    "aud": ["", "x" * 129, "jackson-ms/camera-pilot-2026\n", "jackson-ms/camera-pilot-2026\u00a0", "jackson-ms/camera-pilot-\u0662\u0660\u0662\u0666"],
    "sub": ["", "x" * 65, "a\x00b", "a\x7fb", "a\u0085b", "\ud800", "a\x1b[31mred"],
    "case": ["", "x" * 65, "\t"],
    "purpose": ["", "x" * 281, "line\nbreak"],
    "iat": [-1, 253402300800, 10**30, 1796320770.0, 1796321670],
    "exp": [-1, 1796320770, 1796320769, 1796321671, 10**30],
    "nbf": [-1, 253402300800, 0.5],
    "basis": ["Consent", "warrant", "", "consent "],
    "area.lat": [90.000001, -91, 1e308, True],
    "area.lon": [180.5, -181],
    "area.radius_m": [0, -1, 2000.0001, 0.0, -0.0],
    "window.start": ["2026-12-03T16:30:00+00:00", "2026-12-03 16:30:00Z", "2026-12-03T16:30:00z", "2026-12-03T17:00:00Z",
                     "2026-12-03T04:59:59Z", "2026-02-30T16:30:00Z", "2026-12-03T16:30:00.1234567890Z", "0000-01-01T00:00:00Z"],
    "window.end": ["2026-12-03T16:30:00Z", "2026-12-03T16:29:59.999999999Z", "2026-12-04T04:30:00.000000001Z", "2026-12-03T24:00:00Z"],
    "recipient.kty": ["EC", "okp"],
    "recipient.crv": ["Ed25519", "x25519"],
    "recipient.x": ["", "AAAA", "A" * 44, "A" * 43 + "B", "A" * 42 + "A=", "A" * 42 + "+A"],
}  # fmt: skip
_UNKNOWN_MEMBERS = ["JTI", "jti ", "alg", "kid", "cnf", "nonce", "x5u", "\u0000", "", "typ", "jku"]


@st.composite
def malformed_claims(draw: st.DrawFn) -> bytes | dict[str, Any]:
    """Claims that break exactly one rule of section 3, or raw payload bytes with a duplicated member."""
    claims = ps.base_claims()
    kind = draw(st.sampled_from(["value", "remove", "unknown", "duplicate", "huge-number", "deep", "warrant"]))
    if kind == "value":
        path = draw(st.sampled_from(sorted(_BAD_VALUES)))
        _set(claims, path, draw(st.sampled_from(_BAD_VALUES[path])))
    elif kind == "remove":
        path = draw(st.sampled_from(sorted(CLAIMS) + ["area.lat", "area.lon", "area.radius_m", "window.start", "window.end",
                                                      "recipient.kty", "recipient.crv", "recipient.x"]))  # fmt: skip
        _set(claims, path, ...)
    elif kind == "unknown":
        where = draw(st.sampled_from(["", "area.", "window.", "recipient."]))
        _set(claims, where + draw(st.sampled_from(_UNKNOWN_MEMBERS)), draw(_json_value))
    elif kind == "duplicate":  # raw JSON: the member again, with the same or another value
        name = draw(st.sampled_from(sorted(CLAIMS)))
        text = json.dumps(claims)
        again = json.dumps(draw(st.sampled_from([claims[name], "other", 1796320770])))
        i = text.find(f'"{name}":')
        return (text[:i] + f'"{name}": {again}, ' + text[i:]).encode()
    elif kind == "huge-number":  # 5,000 digits: past Python's int-from-text limit; and a float overflowing to inf
        name = draw(st.sampled_from(["iat", "exp", "v"]))
        text = json.dumps(claims).replace(f'"{name}": {json.dumps(claims[name])}', f'"{name}": {draw(st.sampled_from(["1" * 5000, "1e400", "-1e400"]))}')
        return text.encode()
    elif kind == "deep":  # nesting deep enough to exhaust a recursive parser, inside the size cap
        depth = draw(st.integers(1000, 5000))
        text = json.dumps(claims).replace('"area": {', '"area": ' + "[" * depth + "{", 1)
        return text.replace('"window": {', "]" * depth + ', "window": {', 1).encode()
    else:  # warrant member with basis consent, or basis warrant with a bad warrant
        if draw(st.booleans()):
            claims["warrant"] = {"ref": "W-1", "court": "Hinds County"}
        else:
            claims["basis"] = "warrant"
            claims["warrant"] = draw(st.sampled_from([{"ref": "W-1"}, {"ref": "", "court": "c"}, {"ref": "W", "court": "c", "x": 1},
                                                      {"ref": "W\x00", "court": "c"}, ["W-1", "c"]]))  # fmt: skip
    return claims


@given(malformed_claims(), st.booleans())
def test_claims_that_break_a_rule_are_malformed_even_when_signed(claims: bytes | dict[str, Any], general: bool) -> None:
    d = _decide(_sign(claims, general))
    assert d.reason is Reason.MALFORMED, (claims, d)
    assert d.request is None


_PLAUSIBLE = [("window.start", "2026-12-03T16:00:00Z"), ("window.end", "2026-12-03T17:30:00Z"), ("area.radius_m", 999),
              ("area.lat", 32.3), ("area.lon", -90.18), ("exp", 1796321000), ("iat", 1796320700), ("jti", "req-0002-base-bbbbbbbb"),
              ("iss", "hinds-so"), ("purpose", "x"), ("basis", "consent"), ("recipient.x", b64url_encode(bytes(32))), ("sub", "Det. B")]  # fmt: skip


@given(st.tuples(st.sampled_from(sorted(TYPES)), _json_value) | st.sampled_from(_PLAUSIBLE), st.booleans())
def test_claims_changed_under_the_original_signature_are_refused(change: tuple[str, Any], general: bool) -> None:
    """The classic tampering: widen the window or move the area, keep the agency's signature."""
    path, value = change
    claims = ps.base_claims()
    if path == "warrant":
        return
    _set(claims, path, value)
    payload = b64url_encode(json.dumps(claims, separators=(",", ":")).encode())
    original = GENERAL if general else COMPACT
    if general:
        obj = json.loads(GENERAL)
        obj["payload"] = payload
        message = json.dumps(obj).encode()
    else:
        protected, _, sig = COMPACT.decode().split(".")
        message = f"{protected}.{payload}.{sig}".encode()
    if message != original:
        d = _check_mutant(message, original)
        assert d.reason in (Reason.MALFORMED, Reason.BAD_SIGNATURE), d


_LOOK_ALIKE = {
    "iss": ["hinds-so", "jackson-pd.", "jackson-pd-", "jackson_pd", "jacks0n-pd", "jackson-oversight"],
    "aud": ["jackson-ms/camera-pilot-2027", "Jackson-ms/camera-pilot-2026", "jackson-ms/camera-pilot-2026 ", "*", "jackson-ms/"],
}  # fmt: skip


@given(st.sampled_from([(k, v) for k, vs in _LOOK_ALIKE.items() for v in vs]), st.booleans())
def test_a_look_alike_issuer_or_audience_is_refused(change: tuple[str, str], general: bool) -> None:
    claims = ps.base_claims()
    claims[change[0]] = change[1]
    d = _decide(_sign(claims, general))
    assert d.reason is (Reason.WRONG_ISSUER if change[0] == "iss" else Reason.WRONG_AUDIENCE), d


def _is_text(value: str, max_len: int) -> bool:
    """Section 3's text rule, restated with unicodedata: 1..max characters, no Cc, no lone surrogates."""
    return 1 <= len(value) <= max_len and not any(unicodedata.category(c) in ("Cc", "Cs") for c in value)


_TRICKS = ["\u202e", "\u200b", "\u200d", "\ufeff", "\u2028", "e\u0301", "\u00e9", "\U0001f46e", "\u0000", "\u0085", "\ud800",
           "\udfff", "\x1b", "\u061c", "\ufffd", "\U000e0041"]  # fmt: skip


@given(st.sampled_from([("sub", 64), ("case", 64), ("purpose", 280)]),
       st.text(max_size=300) | st.lists(st.sampled_from(_TRICKS), min_size=1, max_size=70).map("".join), st.booleans())  # fmt: skip
def test_free_text_is_kept_exactly_or_refused(member: tuple[str, int], value: str, general: bool) -> None:
    name, max_len = member
    claims = ps.base_claims()
    claims[name] = value
    d = _decide(_sign(claims, general))
    value = json.loads(json.dumps(value))  # what was signed: JSON joins an escaped high+low surrogate into one character
    if _is_text(value, max_len):
        assert d.reason is Reason.GRANTED, (value, d)
        assert d.request is not None and getattr(d.request, name) == value  # no normalisation, no trimming
    else:
        assert d.reason is Reason.MALFORMED, (value, d)


@pytest.mark.parametrize("message", [COMPACT, GENERAL])
def test_every_single_byte_change_is_refused(message: bytes) -> None:
    """Exhaustive, not sampled: each position of each original, set to a neighbouring value."""
    for i in range(len(message)):
        for delta in (1, -1):
            m = bytearray(message)
            m[i] = (m[i] + delta) % 256
            _check_mutant(bytes(m), message)
