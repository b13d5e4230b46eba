"""A wrong clock grants nothing a correct clock would refuse, and the journal says why.

The real service over real stores (tests/test_intake_faults.py's ``home``), its clock a
:class:`~agent.state.clock.FixedClock` the test steps. What tests/test_intake_faults.py already covers is
not repeated here: a forward step then back (two hours) after a grant, and a step back of a minute after
a decision, across a restart. Added here:

- a clock the system reports as unsynchronized: ``clock_unsynced``, with the system's reason in the journal,
  and the request is not used up (granted once the clock is right);
- a step back of an hour while the agent was quiet (no decision for an hour, so no decision newer than the
  wrong time): a request that expired by the true time must not be granted. It was: the only marks of
  "a time already acted on" were decisions and replay-memory purges. The running service now also notes
  the time it has seen into the replay memory's high-water mark (at most once a minute, only while the
  clock is synchronized), so the step is noticed after a quiet hour and after a restart too;
- a step forward of a day: requests issued at the true time are refused as expired (fail closed), the
  replay memory is not purged of requests still valid at the true time, and when the clock comes back
  nothing is granted twice.

What no agent can notice by itself: a clock stepped forward by a time server the system calls
synchronized, before it comes back (docs/RELIABILITY.md says so).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import timedelta

import pytest

from agent.sharing.service import RequestService
from agent.timeutil import to_us
from tests.test_intake_faults import Home, _decide_only, _index_footage, home, outcomes  # noqa: F401 (home is a fixture)

WAIT = 30.0


@pytest.fixture
def service(home: Home) -> Iterator[RequestService]:  # noqa: F811
    svc = home.service()
    yield svc
    svc.stop()
    assert svc.wait(WAIT)


def _journal(caplog: pytest.LogCaptureFixture, words: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if words in r.getMessage()]


def test_an_unsynchronized_clock_grants_nothing_and_says_why(home: Home, service: RequestService,  # noqa: F811
                                                             caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    home.clock.set_synced(False, "no time server has answered since the power cut")
    payload = home.request()
    with caplog.at_level(logging.INFO, logger="agent"):
        d = service.handle(payload)
    assert d is not None and d.reason == "clock_unsynced" and d.request is not None
    assert outcomes(home, d.request.jti) == ["clock_unsynced"]
    assert any("no time server has answered" in line for line in _journal(caplog, "refused: clock_unsynced"))
    assert service.outbox.pending() == []
    # Refused before the replay check: the request is not used up, and is granted once the clock is right.
    home.clock.set_synced(True)
    again = service.handle(payload)
    assert again is not None and again.reason == "granted"


def test_a_clock_stepped_back_an_hour_while_the_agent_was_quiet_grants_nothing(home: Home, service: RequestService,  # noqa: F811
                                                                                caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    t0 = home.t0  # the true time
    _index_footage(home.cfg, to_us(t0) - 3 * 3600_000_000, to_us(t0) - 3600_000_000)  # footage from hours ago
    service.chores()  # the running agent's housekeeping, at the true time; no request for the last hour
    # Captured by someone an hour ago: issued then, expired 45 minutes ago by the true clock.
    old = home.request(issued=t0 - timedelta(minutes=61), window=(t0 - timedelta(minutes=100), t0 - timedelta(minutes=90)))
    assert _decide_only(service, old).reason == "expired"  # what a correct clock says (decided, not recorded)

    home.clock.set(t0 - timedelta(hours=1))  # a bad time server steps the clock back an hour
    with caplog.at_level(logging.INFO, logger="agent"):
        d = service.handle(old)
    assert d is not None and d.reason == "clock_unsynced", d
    assert "went back" in service.state.unsynced_why
    assert _journal(caplog, "went back")
    assert service.outbox.pending() == []

    service.stop()  # and after a restart the step is still noticed: the mark is durable
    assert service.wait(WAIT)
    restarted = home.service()
    try:
        d = restarted.handle(old)
        assert d is not None and d.reason == "clock_unsynced" and restarted.outbox.pending() == []
    finally:
        restarted.stop()
        assert restarted.wait(WAIT)


def test_the_time_mark_is_not_raised_by_an_unsynchronized_clock(home: Home, service: RequestService) -> None:  # noqa: F811
    """A Pi that booted years ahead without a time server must not block sharing until that year comes."""
    home.clock.set(home.t0 + timedelta(days=3650))
    home.clock.set_synced(False, "no network yet")
    service.chores()
    home.clock.set(home.t0)
    home.clock.set_synced(True)
    d = service.handle(home.request())
    assert d is not None and d.reason == "granted"


def test_a_clock_stepped_forward_a_day_refuses_and_grants_nothing_twice(home: Home, service: RequestService,  # noqa: F811
                                                                        caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    t0 = home.t0
    payload = home.request()
    first = service.handle(payload)
    assert first is not None and first.reason == "granted" and first.request is not None

    home.clock.set(t0 + timedelta(days=1))
    fresh = home.request(issued=t0 + timedelta(seconds=5))  # an agency with a correct clock
    d = service.handle(fresh)
    assert d is not None and d.reason == "expired"  # fail closed: a day "late"
    service.chores()  # housekeeping at the wrong time purges the replay memory

    home.clock.set(t0 + timedelta(seconds=20))  # the clock comes back
    with caplog.at_level(logging.INFO, logger="agent"):
        again = service.handle(payload)
        late = service.handle(fresh)
    assert again is not None and again.reason == "clock_unsynced"
    assert late is not None and late.reason == "clock_unsynced"
    assert _journal(caplog, "went back")
    assert service.counters.granted == 1 and len(service.outbox.pending()) == 1
    assert outcomes(home, first.request.jti) == ["granted", "clock_unsynced"]


def test_the_time_mark_is_written_at_most_once_a_minute(tmp_path) -> None:  # noqa: ANN001
    """One small write a minute at most: an SD card is not worn by the clock's bookkeeping."""
    from datetime import UTC, datetime

    from agent.state.replay import NOTE_EVERY_S, ReplayMemory

    t = datetime(2026, 12, 3, 18, 0, tzinfo=UTC)
    with ReplayMemory(tmp_path / "state.sqlite") as mem:
        assert mem.note_time(t) and mem.high_water() == t
        assert not mem.note_time(t + timedelta(seconds=NOTE_EVERY_S - 1))
        assert mem.note_time(t + timedelta(seconds=NOTE_EVERY_S))
        assert not mem.note_time(t)  # never lowered (and nothing written)
        assert mem.high_water() == t + timedelta(seconds=NOTE_EVERY_S)
