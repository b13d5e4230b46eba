"""Clock synchronization: the real kernel call, the timesyncd flag, the override, the fake."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.config import load_config
from agent.state.clock import (
    STA_UNSYNC,
    TIME_ERROR,
    ClockSource,
    FixedClock,
    SystemClock,
    kernel_sync_state,
    read_timex,
    timesyncd_sync_state,
)

UTC = UTC
NOW = datetime(2026, 12, 3, 18, 0, tzinfo=UTC)


def unsynced_kernel() -> tuple[bool, str]:
    return False, "kernel says unsynchronized"


def synced_kernel() -> tuple[bool, str]:
    return True, "kernel says synchronized"


def test_real_adjtimex_runs_and_explains() -> None:
    ok, why = kernel_sync_state()
    assert isinstance(ok, bool)
    assert "kernel" in why and "refused" not in why and "cannot" not in why


def test_real_adjtimex_struct_layout_matches_the_kernel() -> None:
    """Fields after ``status`` land where the kernel writes them: two kernel constants read back exactly
    (tick = 1e6 / USER_HZ = 10000 us, tolerance = 500 ppm << 16), so ``status`` is read from the right place."""
    ret, tx = read_timex()
    assert ret in range(0, 6)
    assert tx.tick == 10000
    assert tx.tolerance == 500 << 16
    ok, why = kernel_sync_state()
    assert ok == (ret != TIME_ERROR and not tx.status & STA_UNSYNC)
    assert ("STA_UNSYNC" in why or "TIME_ERROR" in why) != ok


def test_system_clock_now_is_aware_utc() -> None:
    now = SystemClock().now()
    assert now.tzinfo is not None and now.utcoffset() == timedelta(0)
    assert abs((now - datetime.now(UTC)).total_seconds()) < 5


def test_unsynced_everywhere_is_unsynced_with_both_reasons(tmp_path: Path) -> None:
    clock = SystemClock(kernel=unsynced_kernel, timesync_flag=tmp_path / "synchronized")
    ok, why = clock.synced()
    assert ok is False
    assert "kernel says unsynchronized" in why and "timesyncd" in why


def test_timesyncd_flag_alone_is_enough(tmp_path: Path) -> None:
    flag = tmp_path / "synchronized"
    flag.touch()
    ok, why = SystemClock(kernel=unsynced_kernel, timesync_flag=flag).synced()
    assert ok and "timesyncd" in why
    assert timesyncd_sync_state(flag)[0]


def test_kernel_alone_is_enough(tmp_path: Path) -> None:
    ok, why = SystemClock(kernel=synced_kernel, timesync_flag=tmp_path / "nope").synced()
    assert ok and why == "kernel says synchronized"


def test_assume_synced_override_says_so(tmp_path: Path) -> None:
    ok, why = SystemClock(kernel=unsynced_kernel, timesync_flag=tmp_path / "nope", assume_synced=True).synced()
    assert ok and "declared synchronized by the resident" in why


def test_override_from_config_file_and_env(write_config: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(write_config(""))
    assert SystemClock.from_config(cfg).assume_synced is False
    cfg = load_config(write_config("[clock]\nassume_synced = true\n"))
    assert SystemClock.from_config(cfg).assume_synced is True
    monkeypatch.setenv("DOORBELL_AGENT_CLOCK__ASSUME_SYNCED", "true")
    assert SystemClock.from_config(load_config(write_config(""))).assume_synced is True


def test_fixed_clock() -> None:
    clock = FixedClock(NOW)
    assert isinstance(clock, ClockSource) and isinstance(SystemClock(), ClockSource)
    assert clock.now() == NOW and clock.synced()[0]
    assert clock.advance(90) == NOW + timedelta(seconds=90)
    clock.set_synced(False, "power cut, no network")
    assert clock.synced() == (False, "power cut, no network")
    with pytest.raises(ValueError):
        FixedClock(datetime(2026, 1, 1))
