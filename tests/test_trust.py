"""The trust store (PROTOCOL.md section 1): strict loading, validity, atomic saving, merging."""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.protocol.trust import ImportWidensError, KeyChange, TrustedKey, TrustStore, TrustStoreError, mixed_role_agencies
from agent.state.truststore import load_trust_store, save_trust_store
from tests import protocol_signing as ps

UTC = UTC


def jwks() -> dict[str, Any]:
    return ps.vectors()["trust"]


def test_vectors_trust_store_loads() -> None:
    store = TrustStore.from_jwks(jwks())
    assert len(store) == len(jwks()["keys"]) == 7  # jpd-internal-affairs joined in the 2026-11-29 vectors
    k = store.get("jxn-oversight-1")
    assert k is not None and k.role == "oversight" and k.iss == "jackson-oversight"
    assert store.get("nobody") is None and "jpd-2026a" in store
    assert store.to_jwks() == jwks()  # round trip keeps every member


def test_valid_at_period_ends() -> None:
    store = TrustStore.from_jwks(jwks())
    old, future, revoked = store.get("jpd-old"), store.get("jpd-2027"), store.get("jpd-2025")
    assert old and future and revoked
    assert old.valid_at(datetime(2025, 1, 1, tzinfo=UTC))  # nbf itself is inside
    assert not old.valid_at(datetime(2024, 12, 31, 23, 59, 59, tzinfo=UTC))
    assert old.valid_at(datetime(2026, 5, 31, 23, 59, 59, tzinfo=UTC))
    assert not old.valid_at(datetime(2026, 6, 1, tzinfo=UTC))  # exp itself is outside
    assert not future.valid_at(datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC))
    assert future.valid_at(datetime(2027, 1, 1, tzinfo=UTC))
    assert not revoked.valid_at(datetime(2026, 12, 3, tzinfo=UTC))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x": "fZC02SOUC_nQFljf6U-oE0leRWQ9n8UyjpzUIVtvbO"}, "key 0 .*32-byte"),
        ({"x": "fZC02SOUC_nQFljf6U-oE0leRWQ9n8UyjpzUIVtvbO8="}, "32-byte"),
        ({"role": "admin"}, "key 0 \\(kid 'jpd-2026a'\\).*role 'admin'"),
        ({"iss": "Jackson PD"}, "iss 'Jackson PD'"),
        ({"crv": "X25519"}, "OKP/Ed25519"),
        ({"d": "9C6RNPgD6Am6iiupVw8MoB_IPXEAgPygpwER4uerI-A"}, "private key"),
        ({"x5u": "https://example.org/cert"}, "unknown member.*x5u"),
        ({"revoked": "yes"}, "revoked must be true or false"),
        ({"exp": 1.5}, "exp must be whole seconds"),
        ({"nbf": 1780272000, "exp": 1735689600}, "nbf must be before exp"),
        ({"use": "enc"}, "use must be 'sig'"),
        ({"kid": "has space"}, "kid must be"),
        ({"x": "dSwmguqe-LBS9snRv0UL7L45Y3yUxaojcWL80QEvQmw"}, "key 1 \\(kid 'hcso-2026'\\): the same public key .*'jpd-2026a'"),
    ],
)
def test_invalid_key_is_refused_with_a_clear_error(change: dict[str, Any], message: str) -> None:
    doc = jwks()
    doc["keys"][0].update(change)
    with pytest.raises(TrustStoreError, match=message):
        TrustStore.from_jwks(doc)


def test_duplicate_kid_is_named() -> None:
    doc = jwks()
    doc["keys"][1]["kid"] = "jpd-2026a"
    with pytest.raises(TrustStoreError, match="key 1 \\(kid 'jpd-2026a'\\).*appears twice"):
        TrustStore.from_jwks(doc)


def test_missing_member_is_named() -> None:
    doc = jwks()
    del doc["keys"][2]["role"]
    with pytest.raises(TrustStoreError, match="key 2 .*no 'role'"):
        TrustStore.from_jwks(doc)


@pytest.mark.parametrize("doc", [[], {"keys": {}}, {"keys": [], "extra": 1}, {"key": []}, "keys"])
def test_not_a_jwk_set(doc: Any) -> None:
    with pytest.raises(TrustStoreError):
        TrustStore.from_jwks(doc)


def test_empty_set_trusts_nobody() -> None:
    assert len(TrustStore.from_jwks({"keys": []})) == 0


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "trust.jwks.json"
    store = TrustStore.from_jwks(jwks())
    save_trust_store(store, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["trust.jwks.json"]  # no temp file left behind
    again = load_trust_store(path)
    assert again.to_jwks() == store.to_jwks()


def test_save_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "trust.jwks.json"
    save_trust_store(TrustStore.from_jwks({"keys": []}), path)
    inode = path.stat().st_ino
    save_trust_store(TrustStore.from_jwks(jwks()), path)
    assert path.stat().st_ino != inode  # a new file renamed over the old one, not rewritten in place
    assert len(load_trust_store(path)) == len(jwks()["keys"])


def test_missing_store_fails_closed_unless_allowed(tmp_path: Path) -> None:
    with pytest.raises(TrustStoreError, match="does not exist"):
        load_trust_store(tmp_path / "none.json")
    assert len(load_trust_store(tmp_path / "none.json", missing_ok=True)) == 0


@pytest.mark.parametrize(
    "content",
    [b"", b"{not json", b'{"keys": [], "keys": []}', b'{"keys": [{"kty": "OKP"}]}', b"\xff\xfe"],
)
def test_corrupt_store_raises(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "trust.jwks.json"
    path.write_bytes(content)
    with pytest.raises(TrustStoreError, match=str(path)):
        load_trust_store(path)


def test_unreadable_store_raises(tmp_path: Path) -> None:
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(TrustStoreError, match="cannot read"):
        load_trust_store(tmp_path / "dir.json")


def test_add_merges_and_never_unrevokes() -> None:
    doc = jwks()
    store = TrustStore.from_jwks({"keys": doc["keys"][:2]})
    store.revoke("hcso-2026")
    incoming = TrustStore.from_jwks({"keys": doc["keys"][:3]})  # hcso-2026 not revoked in this copy
    result = store.add(incoming)
    assert result.changed == ["jxn-oversight-1"]
    assert result.kept_revoked == ("hcso-2026",) and result.unchanged == ("jpd-2026a",)
    hcso = store.get("hcso-2026")
    assert hcso is not None and hcso.revoked
    doc["keys"][0]["exp"] = 1900000000
    doc["keys"][0]["revoked"] = True
    result = store.add(TrustStore.from_jwks({"keys": doc["keys"][:1]}))
    assert result.changed == ["jpd-2026a"]
    assert {(c.field, c.old, c.new, c.widens) for c in result.changes} == {("exp", None, 1900000000, False), ("revoked", False, True, False)}
    k = store.get("jpd-2026a")
    assert k is not None and k.exp == 1900000000 and k.revoked


def _one(**members: Any) -> TrustStore:
    """jpd-old (nbf 2025-01-01, exp 2026-06-01) with some members changed or removed (value None)."""
    jwk = dict(jwks()["keys"][5])
    for name, value in members.items():
        if value is None:
            jwk.pop(name, None)
        else:
            jwk[name] = value
    return TrustStore.from_jwks({"keys": [jwk]})


NBF, EXP = 1735689600, 1780272000  # jpd-old's period in the vectors


@pytest.mark.parametrize(
    ("members", "field", "new"),
    [
        ({"exp": EXP - 86400}, "exp", EXP - 86400),  # an earlier end
        ({"nbf": NBF + 86400}, "nbf", NBF + 86400),  # a later start
        ({"revoked": True}, "revoked", True),
    ],
    ids=["lower-exp", "raise-nbf", "revoke"],
)
def test_import_may_narrow_a_known_key(members: dict[str, Any], field: str, new: Any) -> None:
    store = _one()
    result = store.add(_one(**members))
    assert [(c.kid, c.field, c.new, c.widens) for c in result.changes] == [("jpd-old", field, new, False)]
    assert getattr(store.get("jpd-old"), field) == new


def test_import_may_set_an_end_or_start_on_a_key_without_one() -> None:
    store = _one(nbf=None, exp=None)
    result = store.add(_one())
    assert [(c.field, c.old, c.new, c.widens) for c in result.changes] == [("nbf", None, NBF, False), ("exp", None, EXP, False)]


@pytest.mark.parametrize(
    ("members", "words"),
    [
        ({"exp": None}, "jpd-old: valid until 2026-06-01T00:00:00Z → no end date"),
        ({"exp": EXP + 86400}, "jpd-old: valid until 2026-06-01T00:00:00Z → 2026-06-02T00:00:00Z"),
        ({"nbf": None}, "jpd-old: valid from 2025-01-01T00:00:00Z → no start date"),
        ({"nbf": NBF - 86400}, "jpd-old: valid from 2025-01-01T00:00:00Z → 2024-12-31T00:00:00Z"),
    ],
    ids=["remove-exp", "raise-exp", "remove-nbf", "lower-nbf"],
)
def test_import_that_widens_is_refused_unless_forced(members: dict[str, Any], words: str) -> None:
    store = _one()
    before = store.to_jwks()
    with pytest.raises(ImportWidensError) as caught:
        store.add(_one(**members))
    assert [c.words() for c in caught.value.widenings] == [words]
    assert words in str(caught.value)
    assert store.to_jwks() == before  # nothing changed

    result = store.add(_one(**members), force=True)
    assert result.forced and [c.words() for c in result.changes] == [words] and result.changes[0].widens
    assert store.get("jpd-old") == _one(**members).get("jpd-old")


def test_a_refused_widening_keeps_out_the_rest_of_the_file() -> None:
    doc = jwks()
    store = TrustStore.from_jwks({"keys": doc["keys"][5:6]})
    newcomer = doc["keys"][0]
    older_copy = {k: v for k, v in doc["keys"][5].items() if k != "exp"}
    with pytest.raises(ImportWidensError):
        store.add(TrustStore.from_jwks({"keys": [newcomer, older_copy]}))
    assert [k.kid for k in store] == ["jpd-old"]


def test_every_widening_is_listed_at_once() -> None:
    doc = jwks()
    store = TrustStore.from_jwks({"keys": doc["keys"][5:7]})
    wider = [{k: v for k, v in key.items() if k not in ("nbf", "exp")} for key in doc["keys"][5:7]]
    with pytest.raises(ImportWidensError) as caught:
        store.add(TrustStore.from_jwks({"keys": wider}))
    assert [(c.kid, c.field) for c in caught.value.widenings] == [("jpd-old", "nbf"), ("jpd-old", "exp"), ("jpd-2027", "nbf")]


def test_force_never_unrevokes() -> None:
    store = _one(revoked=True)
    result = store.add(_one(exp=None), force=True)
    k = store.get("jpd-old")
    assert k is not None and k.revoked and k.exp is None
    assert result.kept_revoked == ("jpd-old",)


def test_restore_is_the_only_way_back() -> None:
    store = TrustStore.from_jwks({"keys": jwks()["keys"][:2]})
    store.revoke("jpd-2026a")
    now = datetime(2026, 12, 3, tzinfo=UTC)
    assert not store.get("jpd-2026a").valid_at(now)  # type: ignore[union-attr]
    restored = store.restore("jpd-2026a")
    assert not restored.revoked and restored.valid_at(now) and store.get("jpd-2026a") == restored
    assert store.restore("jpd-2026a") == restored  # not revoked: nothing to do
    with pytest.raises(TrustStoreError, match="no key with kid 'nope'.*known kids: hcso-2026, jpd-2026a"):
        store.restore("nope")


def test_restore_keeps_the_validity_period() -> None:
    store = _one(revoked=True)
    k = store.restore("jpd-old")
    assert (k.nbf, k.exp, k.revoked) == (NBF, EXP, False)
    assert k.status_at(datetime(2026, 12, 3, tzinfo=UTC)) == "expired"


def test_change_words_in_local_time() -> None:
    from zoneinfo import ZoneInfo

    change = KeyChange("jpd-2026a", "exp", 1798761600, None, True)
    assert change.words(ZoneInfo("America/Chicago")) == "jpd-2026a: valid until 2026-12-31 18:00 CST → no end date"
    assert change.to_json() == {"kid": "jpd-2026a", "field": "exp", "from": "2027-01-01T00:00:00Z", "to": None, "widens": True}


def test_independent_oversight_is_another_agency() -> None:
    store = TrustStore.from_jwks(jwks())
    ia, board = store.get("jpd-internal-affairs"), store.get("jxn-oversight-1")
    assert ia is not None and board is not None
    assert not ia.counts_as_oversight_for("jackson-pd") and ia.counts_as_oversight_for("hinds-so")
    assert board.counts_as_oversight_for("jackson-pd")
    assert not store.get("jpd-2026a").counts_as_oversight_for("hinds-so")  # type: ignore[union-attr]  # a requester key
    assert [k.kid for k in store.independent_oversight("jackson-pd")] == ["jxn-oversight-1"]
    assert sorted(k.kid for k in store.independent_oversight("hinds-so")) == ["jpd-internal-affairs", "jxn-oversight-1"]
    store.revoke("jxn-oversight-1")
    assert store.independent_oversight("jackson-pd") == []


def test_mixed_role_agencies() -> None:
    store = TrustStore.from_jwks(jwks())
    assert mixed_role_agencies(store) == {
        "jackson-pd": (["jpd-2026a", "jpd-2025", "jpd-old", "jpd-2027"], ["jpd-internal-affairs"])
    }
    assert mixed_role_agencies(k for k in store if k.iss != "jackson-pd" or k.role == "requester") == {}


def test_add_refuses_a_known_kid_with_a_different_key_and_changes_nothing() -> None:
    doc = jwks()
    store = TrustStore.from_jwks({"keys": doc["keys"][:1]})
    impostor = dict(doc["keys"][5], kid="jpd-2026a")
    newcomer = doc["keys"][1]
    with pytest.raises(TrustStoreError, match="different key"):
        store.add([TrustedKey.from_jwk(newcomer), TrustedKey.from_jwk(impostor)])
    assert len(store) == 1


def test_revoke_unknown_kid_names_the_known_ones() -> None:
    store = TrustStore.from_jwks({"keys": jwks()["keys"][:1]})
    with pytest.raises(TrustStoreError, match="known kids: jpd-2026a"):
        store.revoke("jpd-9999")


def test_saved_store_is_plain_public_jwks(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    save_trust_store(TrustStore.from_jwks(jwks()), path)
    doc = json.loads(path.read_text())
    assert all("d" not in k for k in doc["keys"])
    assert os.access(path, os.R_OK)
