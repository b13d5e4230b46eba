"""The repository's copies of the protocol's vector files against the upstream contract.

Every other test uses the copies inside the package, so a clone of the repository is complete. Where
the upstream folder sits beside the checkout (``../shared/protocol``), this test fails as soon as the
upstream files change: follow the change in the code, in ``docs/protocol.md`` and in the copies.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.protocol.conformance import BUNDLED_DELIVERY, BUNDLED_VECTORS

UPSTREAM = Path(__file__).resolve().parents[2] / "shared" / "protocol"


@pytest.mark.parametrize("ours", [BUNDLED_VECTORS, BUNDLED_DELIVERY], ids=lambda p: p.name)
def test_bundled_vectors_are_the_upstream_ones(ours: Path) -> None:
    upstream = UPSTREAM / ours.name
    if not upstream.is_file():
        pytest.skip(f"no upstream copy at {upstream} (a standalone clone); nothing to compare")
    assert ours.read_bytes() == upstream.read_bytes(), (
        f"{ours} differs from {upstream}: the protocol changed upstream. Read 'Changes' at the end of "
        f"{UPSTREAM / 'PROTOCOL.md'}, follow it in the code and docs/protocol.md, then copy the file."
    )
