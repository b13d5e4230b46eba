"""Shared fixtures. Each test area may add its own fixtures module beside its tests."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.protocol.conformance import BUNDLED_DELIVERY, BUNDLED_VECTORS
from tests.broker import broker, broker_session  # noqa: F401  (the real-Mosquitto fixtures, for every test module)

# Every test uses the repository's own copies; tests/test_upstream.py compares them with ../shared.
VECTORS = BUNDLED_VECTORS
DELIVERY_VECTOR = BUNDLED_DELIVERY


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[str], Path]:
    """Write an agent.toml whose data_dir is inside tmp_path; return its path."""

    def write(body: str = "") -> Path:
        data = tmp_path / "data"
        text = f'[paths]\ndata_dir = "{data}"\n\n' + textwrap.dedent(body)
        path = tmp_path / "agent.toml"
        path.write_text(text)
        return path

    return write
