"""The resident's trust store (PROTOCOL.md section 1): which keys may sign requests.

It is a JWK Set of Ed25519 public keys, each tagged with the agency it speaks
for (``iss``) and its ``role`` (``requester`` or ``oversight``), optionally
with a validity period and a ``revoked`` flag. The file is public-key material
only; a private key (``d``) is refused so that it never sits where it need not.

Everything is checked on load. A store that cannot be read or does not
validate raises :class:`TrustStoreError`: the caller must then share nothing
(fail closed), never fall back to an empty or partial store silently.

Changing the store follows one rule: **an import only narrows**. Re-importing a
set may add keys, shorten a known key's validity or revoke it, but it may not
lengthen a validity period or bring a revoked key back, because the file being
imported may simply be an older copy of the agency's set (one from before a key
was given an end date). Lengthening needs the resident's explicit ``--force``
(:meth:`TrustStore.add` with ``force=True``); un-revoking a key needs
:meth:`TrustStore.restore` by its kid and is never done by an import.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, tzinfo
from typing import Any, Literal, TypeGuard

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.errors import UserError
from agent.protocol.jose import JwsError, b64url_decode, strict_json
from agent.timeutil import format_local, format_utc, from_epoch

Role = Literal["requester", "oversight"]
KeyStatus = Literal["valid", "revoked", "not yet valid", "expired"]
ROLES: tuple[Role, ...] = ("requester", "oversight")
_ISS = re.compile(r"[a-z0-9._-]{1,64}")
_KID = re.compile(r"[\x21-\x7e]{1,256}")  # printable ASCII without space: safe to show and to log
_MEMBERS = frozenset({"kty", "crv", "x", "kid", "iss", "role", "nbf", "exp", "revoked", "use", "alg"})
_REQUIRED = ("kty", "crv", "x", "kid", "iss", "role")


def _is_role(value: object) -> TypeGuard[Role]:
    return value in ROLES and isinstance(value, str)


class TrustStoreError(UserError):
    """The trust store is missing, unreadable or invalid; nothing may be shared until it is fixed."""


@dataclass(frozen=True, slots=True)
class TrustedKey:
    kid: str
    iss: str
    role: Role
    x: str
    nbf: int | None = None
    exp: int | None = None
    revoked: bool = False
    use: str | None = None
    alg: str | None = None
    public_key: Ed25519PublicKey = field(default=None, compare=False, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.public_key is None:
            object.__setattr__(self, "public_key", Ed25519PublicKey.from_public_bytes(b64url_decode(self.x, "x")))

    def valid_at(self, now: datetime) -> bool:
        """Not revoked, and ``nbf <= now < exp`` (JWT semantics for the period's ends)."""
        if self.revoked:
            return False
        t = now.timestamp()
        return (self.nbf is None or t >= self.nbf) and (self.exp is None or t < self.exp)

    def status_at(self, now: datetime) -> KeyStatus:
        """Why the key is or is not usable at ``now``, in one word-group a resident can read."""
        if self.revoked:
            return "revoked"
        t = now.timestamp()
        if self.nbf is not None and t < self.nbf:
            return "not yet valid"
        if self.exp is not None and t >= self.exp:
            return "expired"
        return "valid"

    def counts_as_oversight_for(self, iss: str) -> bool:
        """Section 1, independent oversight: an oversight key of *another* agency than the request's ``iss``.

        An agency cannot oversee itself, even with a key it labelled ``oversight``. Whether the key
        is valid at a given time is a separate question (:meth:`valid_at`).
        """
        return self.role == "oversight" and self.iss != iss

    def to_jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = {"kty": "OKP", "crv": "Ed25519", "x": self.x, "kid": self.kid}
        if self.use is not None:
            jwk["use"] = self.use
        if self.alg is not None:
            jwk["alg"] = self.alg
        jwk["iss"] = self.iss
        jwk["role"] = self.role
        if self.nbf is not None:
            jwk["nbf"] = self.nbf
        if self.exp is not None:
            jwk["exp"] = self.exp
        if self.revoked:
            jwk["revoked"] = True
        return jwk

    @classmethod
    def from_jwk(cls, jwk: Any, where: str = "key") -> TrustedKey:
        """One JWK, checked member by member; errors name ``where`` and the member."""
        if not isinstance(jwk, dict):
            raise TrustStoreError(f"{where} is not a JSON object")
        kid = jwk.get("kid")
        if isinstance(kid, str):
            where = f"{where} (kid {kid!r})"
        if "d" in jwk:
            raise TrustStoreError(f"{where} contains a private key ('d'); import the agency's public key only")
        unknown = sorted(jwk.keys() - _MEMBERS)
        if unknown:
            raise TrustStoreError(f"{where} has unknown member(s) {unknown}; a trust-store key has only {sorted(_MEMBERS)}")
        for name in _REQUIRED:
            if name not in jwk:
                raise TrustStoreError(f"{where} has no {name!r}")
        if jwk["kty"] != "OKP" or jwk["crv"] != "Ed25519":
            raise TrustStoreError(f"{where}: kty/crv must be OKP/Ed25519, not {jwk['kty']!r}/{jwk['crv']!r}")
        if not isinstance(kid, str) or not _KID.fullmatch(kid):
            raise TrustStoreError(f"{where}: kid must be 1..256 printable ASCII characters without spaces")
        iss = jwk["iss"]
        if not isinstance(iss, str) or not _ISS.fullmatch(iss):
            raise TrustStoreError(f"{where}: iss {iss!r} must be 1..64 of a-z 0-9 . _ -")
        role = jwk["role"]
        if not _is_role(role):
            raise TrustStoreError(f"{where}: role {role!r} must be 'requester' or 'oversight'")
        x = jwk["x"]
        try:
            raw = b64url_decode(x, "x") if isinstance(x, str) else b""
        except JwsError:
            raw = b""
        if len(raw) != 32:
            raise TrustStoreError(f"{where}: x must be a 32-byte Ed25519 public key in unpadded base64url")
        period: dict[str, int | None] = {}
        for name in ("nbf", "exp"):
            v = jwk.get(name)
            if v is not None and (type(v) is not int or v < 0):
                raise TrustStoreError(f"{where}: {name} must be whole seconds since the epoch, not {v!r}")
            period[name] = v
        if period["nbf"] is not None and period["exp"] is not None and period["nbf"] >= period["exp"]:
            raise TrustStoreError(f"{where}: nbf must be before exp")
        revoked = jwk.get("revoked", False)
        if type(revoked) is not bool:
            raise TrustStoreError(f"{where}: revoked must be true or false, not {revoked!r}")
        use = jwk.get("use")
        if use is not None and use != "sig":
            raise TrustStoreError(f"{where}: use must be 'sig' for a signing key, not {use!r}")
        alg = jwk.get("alg")
        if alg is not None and alg not in ("Ed25519", "EdDSA"):
            raise TrustStoreError(f"{where}: alg must be Ed25519 or EdDSA, not {alg!r}")
        try:
            public_key = Ed25519PublicKey.from_public_bytes(raw)
        except ValueError:
            raise TrustStoreError(f"{where}: x is not an Ed25519 public key") from None
        return cls(
            kid=kid, iss=iss, role=role, x=x, nbf=period["nbf"], exp=period["exp"], revoked=revoked,
            use=use, alg=alg, public_key=public_key,
        )  # fmt: skip


def _when(epoch: object, tz: tzinfo | None, none: str) -> str:
    """An ``nbf``/``exp`` for people: local time in ``tz`` (RFC 3339 UTC when there is none), or ``none``."""
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        return none
    return format_local(from_epoch(epoch), tz, seconds=False) if tz is not None else format_utc(from_epoch(epoch))


@dataclass(frozen=True, slots=True)
class KeyChange:
    """One change an import makes (or would make) to a key already in the store.

    ``widens`` is true when the change makes the key usable at more instants than before (a later
    or removed ``exp``, an earlier or removed ``nbf``): only a forced import may make it.
    """

    kid: str
    field: Literal["nbf", "exp", "revoked", "use", "alg"]
    old: int | bool | str | None
    new: int | bool | str | None
    widens: bool

    def words(self, tz: tzinfo | None = None) -> str:
        """``jpd-2026a: valid until 2027-01-01 00:00 CST → no end date``; times in ``tz`` (UTC if None)."""
        if self.field == "exp":
            what = f"valid until {_when(self.old, tz, 'no end date')} → {_when(self.new, tz, 'no end date')}"
        elif self.field == "nbf":
            what = f"valid from {_when(self.old, tz, 'no start date')} → {_when(self.new, tz, 'no start date')}"
        elif self.field == "revoked":
            what = "revoked" if self.new else "no longer revoked"
        else:
            what = f"{self.field} {self.old or 'not set'} → {self.new or 'not set'}"
        return f"{self.kid}: {what}"

    def to_json(self) -> dict[str, Any]:
        def value(v: int | bool | str | None) -> int | bool | str | None:
            return format_utc(from_epoch(v)) if self.field in ("nbf", "exp") and isinstance(v, int) else v

        return {"kid": self.kid, "field": self.field, "from": value(self.old), "to": value(self.new), "widens": self.widens}


def _changes(old: TrustedKey, new: TrustedKey) -> list[KeyChange]:
    """What replacing ``old`` by ``new`` (same kid, key, issuer and role) changes, field by field."""
    out: list[KeyChange] = []
    if old.nbf != new.nbf:
        out.append(KeyChange(old.kid, "nbf", old.nbf, new.nbf, old.nbf is not None and (new.nbf is None or new.nbf < old.nbf)))
    if old.exp != new.exp:
        out.append(KeyChange(old.kid, "exp", old.exp, new.exp, old.exp is not None and (new.exp is None or new.exp > old.exp)))
    if old.revoked != new.revoked:
        out.append(KeyChange(old.kid, "revoked", old.revoked, new.revoked, old.revoked))
    for name in ("use", "alg"):
        a, b = getattr(old, name), getattr(new, name)
        if a != b:
            out.append(KeyChange(old.kid, name, a, b, False))
    return out


@dataclass(frozen=True, slots=True)
class ImportResult:
    """What :meth:`TrustStore.add` did, so the resident can be told exactly that."""

    added: tuple[TrustedKey, ...] = ()
    changes: tuple[KeyChange, ...] = ()
    kept_revoked: tuple[str, ...] = ()  # revoked here, not in the file: they stay revoked (see TrustStore.restore)
    unchanged: tuple[str, ...] = ()
    forced: bool = False

    @property
    def changed(self) -> list[str]:
        """The kids added (in the file's order), then those updated."""
        kids = [k.kid for k in self.added]
        for c in self.changes:
            if c.kid not in kids:
                kids.append(c.kid)
        return kids


class ImportWidensError(TrustStoreError):
    """An import would lengthen the validity of keys already trusted; nothing was changed.

    The file may be an old copy of the agency's set. ``widenings`` lists every such change so the
    resident can see them and decide whether to import again with ``force``.
    """

    def __init__(self, widenings: list[KeyChange]) -> None:
        self.widenings = widenings
        super().__init__(
            "the file would lengthen the validity of key(s) you already trust ("
            + "; ".join(c.words() for c in widenings) + ")"
        )


def mixed_role_agencies(keys: Iterable[TrustedKey]) -> dict[str, tuple[list[str], list[str]]]:
    """Agencies (``iss``) with both requester and oversight keys among ``keys``: {iss: (requester kids, oversight kids)}.

    Such an agency's oversight keys never count as independent oversight for its own requests
    (section 1), which a resident importing one file from that agency may not expect.
    """
    by_iss: dict[str, tuple[list[str], list[str]]] = {}
    for k in keys:
        by_iss.setdefault(k.iss, ([], []))[0 if k.role == "requester" else 1].append(k.kid)
    return {iss: kids for iss, kids in by_iss.items() if kids[0] and kids[1]}


class TrustStore:
    """The keys the resident trusts, by kid. Mutated only through :meth:`add`, :meth:`revoke` and :meth:`restore`."""

    def __init__(self, keys: Iterable[TrustedKey] = ()) -> None:
        self._keys: dict[str, TrustedKey] = {}
        for key in keys:
            self._insert(key, f"key {key.kid!r}")

    def _insert(self, key: TrustedKey, where: str) -> None:
        if key.kid in self._keys:
            raise TrustStoreError(f"{where}: kid {key.kid!r} appears twice; every kid must be unique")
        for other in self._keys.values():
            if other.x == key.x:
                raise TrustStoreError(
                    f"{where}: the same public key is already listed as kid {other.kid!r}; "
                    "one key must speak for one agency in one role"
                )
        self._keys[key.kid] = key

    # --- reading ---

    def get(self, kid: str) -> TrustedKey | None:
        return self._keys.get(kid)

    def public_key(self, kid: str) -> Ed25519PublicKey | None:
        """For :func:`agent.protocol.jose.verify_signatures`: the key named by a header, revoked or not.

        A revoked or out-of-period key still verifies cryptographically here;
        the decision procedure refuses it at its own step (``key_not_valid``).
        """
        key = self._keys.get(kid)
        return key.public_key if key is not None else None

    def __iter__(self) -> Iterator[TrustedKey]:
        return iter(self._keys.values())

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys

    def to_jwks(self) -> dict[str, Any]:
        return {"keys": [k.to_jwk() for k in self._keys.values()]}

    # --- building ---

    @classmethod
    def from_jwks(cls, obj: Any) -> TrustStore:
        """A JWK Set object (``{"keys": [...]}``), checked strictly."""
        if not isinstance(obj, dict) or "keys" not in obj:
            raise TrustStoreError("a trust store is a JWK Set: a JSON object with a 'keys' list")
        if obj.keys() != {"keys"}:
            raise TrustStoreError(f"the JWK Set has unknown member(s) {sorted(obj.keys() - {'keys'})}; only 'keys' is allowed")
        if not isinstance(obj["keys"], list):
            raise TrustStoreError("the JWK Set's 'keys' must be a list")
        store = cls()
        for i, jwk in enumerate(obj["keys"]):
            key = TrustedKey.from_jwk(jwk, f"key {i}")
            store._insert(key, f"key {i} (kid {key.kid!r})")
        return store

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "trust store") -> TrustStore:
        try:
            obj = strict_json(text, source)
        except JwsError as exc:
            raise TrustStoreError(f"{source} is not valid JSON: {exc}") from None
        try:
            return cls.from_jwks(obj)
        except TrustStoreError as exc:
            raise TrustStoreError(f"{source}: {exc}") from None

    # --- changing ---

    def independent_oversight(self, iss: str) -> list[TrustedKey]:
        """The keys whose co-signature counts as oversight for requests of agency ``iss`` (revoked ones left out)."""
        return [k for k in self._keys.values() if k.counts_as_oversight_for(iss) and not k.revoked]

    def add(self, other: TrustStore | Iterable[TrustedKey], *, force: bool = False) -> ImportResult:
        """Merge keys in place, only narrowing what is already trusted unless ``force``; say what changed.

        A new kid is added. A kid already present with the same key material takes the file's
        validity period, ``use`` and ``alg``, provided that only narrows it: a later or removed
        ``exp``, or an earlier or removed ``nbf``, raises :class:`ImportWidensError` listing every
        such change, unless ``force``. A key revoked here stays revoked whatever the file says,
        forced or not (un-revoking is :meth:`restore`, one kid at a time, never a side effect of a
        bulk import); the file can revoke a key. The same kid with a different key, issuer or role
        is refused: that is a different key wearing a known name. Nothing changes if anything is
        refused.
        """
        incoming = list(other)
        merged = dict(self._keys)
        added: list[TrustedKey] = []
        changes: list[KeyChange] = []
        kept_revoked: list[str] = []
        unchanged: list[str] = []
        for key in incoming:
            old = merged.get(key.kid)
            if old is None:
                for existing in merged.values():
                    if existing.x == key.x:
                        raise TrustStoreError(
                            f"key {key.kid!r} is the same public key as kid {existing.kid!r} already in the store"
                        )
                merged[key.kid] = key
                added.append(key)
                continue
            if (old.x, old.iss, old.role) != (key.x, key.iss, key.role):
                raise TrustStoreError(
                    f"kid {key.kid!r} is already in the store with a different key, issuer or role; "
                    "revoke the old key and import the new one under a new kid"
                )
            if old.revoked and not key.revoked:
                kept_revoked.append(key.kid)
            new = replace(key, revoked=old.revoked or key.revoked, public_key=old.public_key)
            diff = _changes(old, new)
            if diff:
                merged[key.kid] = new
                changes.extend(diff)
            elif key.kid not in kept_revoked:
                unchanged.append(key.kid)
        widenings = [c for c in changes if c.widens]
        if widenings and not force:
            raise ImportWidensError(widenings)
        self._keys = merged
        return ImportResult(tuple(added), tuple(changes), tuple(kept_revoked), tuple(unchanged), force)

    def revoke(self, kid: str) -> TrustedKey:
        """Mark a key revoked (kept in the store, so that a later import cannot bring it back)."""
        key = self._known(kid)
        revoked = replace(key, revoked=True)
        self._keys = {**self._keys, kid: revoked}
        return revoked

    def restore(self, kid: str) -> TrustedKey:
        """Trust a revoked key again: the only way to clear ``revoked`` (an import never does).

        The key keeps its validity period; whether it is usable now is :meth:`TrustedKey.valid_at`.
        Restoring a key that is not revoked changes nothing.
        """
        key = self._known(kid)
        restored = replace(key, revoked=False)
        self._keys = {**self._keys, kid: restored}
        return restored

    def _known(self, kid: str) -> TrustedKey:
        key = self._keys.get(kid)
        if key is None:
            known = ", ".join(sorted(self._keys)) or "none"
            raise TrustStoreError(f"no key with kid {kid!r} in the trust store (known kids: {known})")
        return key
