"""Appending one access-log entry, synced to disk, beside a bare SQLite insert of the same size.

The access log's promise is that an entry is on disk (WAL fsync,
``synchronous=FULL``) before a grant's manifest is signed. The reference is a
plain ``INSERT`` + ``COMMIT`` of a row of the same size into another file in
the same directory with the same pragmas. The two are measured interleaved
(one append, one reference insert, ...) so that both meet the same disk and
the same load from other processes: the ratio is the price of the chain (the
head read, the hash, the JSON, three indexes, the checkpoint check and, every
100 entries, an Ed25519 signature), since both pay an fsync.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent.state.accesslog import AccessLog
from agent.state.devicekey import DeviceKey
from tests.bench.report import Report

N = 2000
UTC = UTC
NOW = datetime(2026, 12, 3, 18, 0, tzinfo=UTC)


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def run(report: Callable[[str, float, float, str, str], None]) -> None:
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        d = Path(tmp)
        log = AccessLog(d / "state.sqlite", device_key=DeviceKey.generate(), checkpoint_every=100)

        def append(i: int) -> None:
            log.append(
                jti=f"req-{i:08d}-bench-aaaa", iss="jackson-pd", sub="badge-4471", case="JPD-2026-001234",
                purpose="Burglary reported on the 1200 block of N State St; looking for a person leaving on foot.",
                area={"lat": 32.299839, "lon": -90.184, "radius_m": 300},
                requested=(NOW - timedelta(hours=2), NOW - timedelta(hours=1)), reason="granted",
                granted=(NOW - timedelta(minutes=90), NOW - timedelta(minutes=60)), bytes_shared=300800,
                delivery_id="Ojm5DLRgg9SKVkBaY4QfDA", kids=["jpd-2026a", "jxn-oversight-1"], at=NOW,
            )  # fmt: skip

        append(0)
        row_size = int(
            log._conn.execute("SELECT length(entry) + length(hash) + length(prev_hash) + length(jti) FROM access_log").fetchone()[0]
        )
        ref = sqlite3.connect(d / "ref.sqlite", isolation_level=None)
        ref.execute("PRAGMA journal_mode = WAL")
        ref.execute("PRAGMA synchronous = FULL")
        ref.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
        body = "x" * row_size

        ours: list[float] = []
        theirs: list[float] = []
        for i in range(1, N + 1):
            t0 = time.perf_counter()
            append(i)
            t1 = time.perf_counter()
            ref.execute("BEGIN IMMEDIATE")
            ref.execute("INSERT INTO t (body) VALUES (?)", (body,))
            ref.execute("COMMIT")
            t2 = time.perf_counter()
            ours.append(t1 - t0)
            theirs.append(t2 - t1)
        ref.close()

        # Verifying the whole log (what `doorbell-agent log verify` does) beside reading and hashing the same rows.
        t0 = time.perf_counter()
        assert log.verify().ok
        t_verify = time.perf_counter() - t0
        t0 = time.perf_counter()
        for (entry,) in log._conn.execute("SELECT entry FROM access_log ORDER BY seq"):
            hashlib.sha256(entry.encode("utf-8")).digest()
        t_hash = time.perf_counter() - t0
        log.close()
    for name, p in (("p50", 50), ("p99", 99)):
        report(
            f"access log: append 1 entry, fsync'd ({row_size} B), {name}",
            _pct(ours, p) * 1e3, _pct(theirs, p) * 1e3, "ms", "ratio <= 3 (both pay one fsync)",
        )  # fmt: skip
    report("access log: appends per second, fsync'd", N / sum(ours), N / sum(theirs), "1/s", "ratio >= 0.33")
    report(
        f"access log: verify {N + 1} entries (vs select + sha256 each)", t_verify * 1e3, t_hash * 1e3, "ms",
        "ratio <= 20 (JSON parse and column checks per entry)",
    )  # fmt: skip


if __name__ == "__main__":
    run(Report())
