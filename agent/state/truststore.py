"""The trust store's file: where the resident's imported agency keys live between runs.

The rules for what a trust store may hold are in :mod:`agent.protocol.trust`; this module only
reads and writes the file. A store that cannot be read raises :class:`TrustStoreError` so the
caller shares nothing (fail closed) instead of falling back to an empty or partial store.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from agent.fsutil import write_atomically
from agent.protocol.trust import TrustStore, TrustStoreError


def load_trust_store(path: str | os.PathLike[str], *, missing_ok: bool = False) -> TrustStore:
    """Read the store; ``missing_ok`` gives an empty store (trusting nobody) for a missing file."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return TrustStore()
        raise TrustStoreError(f"trust store {p} does not exist; import an agency's public keys first") from None
    except OSError as exc:
        raise TrustStoreError(f"cannot read trust store {p}: {exc.strerror or exc}") from None
    return TrustStore.from_json(data, str(p))


def save_trust_store(store: TrustStore, path: str | os.PathLike[str]) -> None:
    """Write atomically (temp file, fsync, rename, fsync of the directory): a crash leaves the old or the new store."""
    text = json.dumps(store.to_jwks(), indent=2) + "\n"
    write_atomically(Path(path), text.encode("utf-8"), 0o644)  # public keys: readable by the resident's tools
