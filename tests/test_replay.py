"""Replay memory (PROTOCOL.md section 4, step 12): durable across restarts, kept until exp + 60 s."""

from __future__ import annotations

import hashlib
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.state.replay import ReplayMemory
from tests import protocol_signing as ps


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_unknown_jti_is_not_seen(tmp_path: Path) -> None:
    with ReplayMemory(tmp_path / "state.sqlite") as mem:
        assert mem.seen("req-never-seen-000000") is None


def test_remembered_jti_survives_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite"
    with ReplayMemory(db) as mem:
        assert mem.remember("req-0001-base-aaaaaaaa", sha("a"), 1796321370) == sha("a")
    with ReplayMemory(db) as mem:  # a new process would do exactly this
        assert mem.seen("req-0001-base-aaaaaaaa") == sha("a")
        assert mem.seen("req-0002-other-bbbbbbb") is None


def test_first_payload_wins(tmp_path: Path) -> None:
    with ReplayMemory(tmp_path / "state.sqlite") as mem:
        mem.remember("req-0001-base-aaaaaaaa", sha("a"), 1796321370)
        assert mem.remember("req-0001-base-aaaaaaaa", sha("b"), 1796321999) == sha("a")
        assert mem.seen("req-0001-base-aaaaaaaa") == sha("a")


def test_kept_until_exp_plus_60s_then_purged(tmp_path: Path) -> None:
    exp = 1796321370
    with ReplayMemory(tmp_path / "state.sqlite") as mem:
        mem.remember("req-0001-base-aaaaaaaa", sha("a"), exp)
        mem.remember("req-0002-later-aaaaaaa", sha("b"), exp + 600)
        assert mem.purge(exp + 60) == 0  # exactly exp + 60 s: still kept
        assert mem.seen("req-0001-base-aaaaaaaa") == sha("a")
        assert mem.purge(datetime.fromtimestamp(exp + 61, UTC)) == 1
        assert mem.seen("req-0001-base-aaaaaaaa") is None
        assert mem.seen("req-0002-later-aaaaaaa") == sha("b")
        assert len(mem) == 1


def test_two_connections_share_memory(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite"
    with ReplayMemory(db) as service, ReplayMemory(db) as other:
        service.remember("req-0001-base-aaaaaaaa", sha("a"), 1796321370)
        assert other.seen("req-0001-base-aaaaaaaa") == sha("a")


def test_database_is_wal_with_full_sync(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite"
    with ReplayMemory(db) as mem:
        assert mem._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


@pytest.mark.parametrize("bad", ["", "ABC", "0" * 63, "G" * 64, sha("x").upper()])
def test_rejects_a_malformed_hash(tmp_path: Path, bad: str) -> None:
    with ReplayMemory(tmp_path / "state.sqlite") as mem:
        with pytest.raises(ValueError, match="sha256"):
            mem.remember("req-0001-base-aaaaaaaa", bad, 1796321370)


def test_vector_seen_entries_round_trip(tmp_path: Path) -> None:
    """The vectors' `seen` state, loaded into the durable memory, answers as the vectors expect."""
    case = ps.case("replayed-jti-different-payload")
    db = tmp_path / "state.sqlite"
    with ReplayMemory(db) as mem:
        for s in case["agent"]["seen"]:
            mem.remember(s["jti"], s["payload_sha256"], s["exp"])
    with ReplayMemory(db) as mem:
        for s in case["agent"]["seen"]:
            assert mem.seen(s["jti"]) == s["payload_sha256"]


# ----- the high-water mark: a clock that goes back must be noticed (see agent.sharing.service.LiveState)


def at(epoch: int) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def test_remembering_at_a_time_raises_the_high_water_mark_durably(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite"
    with ReplayMemory(db) as mem:
        assert mem.high_water() is None
        mem.remember("req-0001-base-aaaaaaaa", sha("a"), 1796321370, now=at(1796320800))
        mem.remember("req-0002-other-bbbbbbb", sha("b"), 1796321370, now=at(1796320700))  # an earlier reading
        assert mem.high_water() == at(1796320800)  # never lowered
        mem.remember("req-0003-third-ccccccc", sha("c"), 1796321370)  # no time given: the mark is left alone
        assert mem.high_water() == at(1796320800)
    with ReplayMemory(db) as mem:  # a restart
        assert mem.high_water() == at(1796320800)


def test_a_purge_that_forgets_raises_the_mark_and_keeps_a_margin(tmp_path: Path) -> None:
    """The forward clock step of the report: a purge at a future time is remembered, so when the clock
    comes back it is seen to be behind. A purge that forgets nothing writes nothing."""
    exp = 1796321370
    with ReplayMemory(tmp_path / "state.sqlite") as mem:
        mem.remember("req-0001-base-aaaaaaaa", sha("a"), exp)
        assert mem.purge(exp + 60) == 0 and mem.high_water() is None
        assert mem.purge(exp + 64, margin_s=5) == 0  # exp + 60 is not before (exp + 64) - 5: kept
        assert mem.seen("req-0001-base-aaaaaaaa") == sha("a") and mem.high_water() is None
        assert mem.purge(exp + 7200, margin_s=5) == 1
        assert mem.high_water() == at(exp + 7200)
