"""Deciding a request with 500,000 entries in the access log, beside a bare Ed25519 verify of the same message.

Why this exists: the decision reads the agent's state as it goes (step 8: the log's newest time;
step 12: the replay memory, then the log; step 20: the footage index; step 21: the log's grants to
the agency in the last 24 hours). On an empty log those reads cost next to nothing. Before the log
kept one entry per request and reason, anyone who could publish on the request topics could grow it
with copies of a captured request, and the rate-limit query (and the clock check's query of the
newest entry) then read every row: hundreds of milliseconds per decision at 500,000 rows. This
measures the decision the service runs on a log of 500,000 real entries, all from the requesting
agency within the last 24 hours: the worst case for those queries (such a log can no longer be
grown by a flood, but an old one may hold it). The same service first decides on its empty log.

- The log is built fresh in every run, nothing cached between runs: the writer's own entry code
  (:func:`~agent.state.accesslog.decision_body`) and chain insert, in one transaction, with a signed
  checkpoint every 100 entries as the service writes them. About a minute.
- **decide**: what ``RequestService.handle`` runs before it records anything, on the service's own
  live state: the trust store read and :func:`~agent.protocol.decision.decide`. Every message is a
  fresh, valid request with its own jti, so every one goes through all 22 steps (granted); the
  same is measured on the empty log before it is filled, so the last ratio is the price of its size.
- **a flood copy**: ``RequestService.handle`` of a re-serialized copy of a request the log already
  lists as ``replayed``: decided, then counted on that entry (no log entry, no fsync).
- The reference for both is an Ed25519 verify of the same message's signature, measured
  interleaved with ours so that both meet the same load from other processes.
"""

from __future__ import annotations

import os
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.bench.report import Report
from tests.protocol_signing import reserialized

ROWS = 500_000
N = 2000
PROGRAM = "jackson-ms/camera-pilot-2026"
HOME = (32.29876, -90.18481)
FOOTAGE_S = 40


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def _fill(path: Path, key: object, now: datetime, rows: int) -> float:
    """``rows`` real entries from jackson-pd over the last 24 hours (5 of them grants), signed every 100."""
    from agent.state.accesslog import AccessLog, decision_body
    from agent.state.db import transaction

    reasons = ("outside_geofence", "replayed", "expired", "no_footage", "kill_switch")
    t0 = time.perf_counter()
    log = AccessLog(path, device_key=key)  # type: ignore[arg-type]
    start = now - timedelta(hours=23, minutes=59)
    step = (timedelta(hours=23, minutes=58)) / rows
    with log._lock, transaction(log._conn):
        seq, digest = log._head_locked()
        for i in range(rows):
            reason = "granted" if i % (rows // 5) == rows // 10 else reasons[i % len(reasons)]
            granted = (now - timedelta(hours=2), now - timedelta(hours=1)) if reason == "granted" else None
            body = decision_body(
                jti=f"req-{i:010d}-filler-aaaa", iss="jackson-pd", sub="badge-4471", case="JPD-2026-001234",
                purpose="Burglary reported on the 1200 block of N State St; looking for a person leaving on foot.",
                area={"lat": 32.299839, "lon": -90.183108, "radius_m": 300},
                requested=(now - timedelta(hours=2), now - timedelta(hours=1)), reason=reason, granted=granted,
                kids=["jpd-bench"], payload_sha256=f"{i:064x}",
            )  # fmt: skip
            when = start + step * i
            seq, digest = log._insert_locked(body, when.replace(microsecond=when.microsecond // 1000 * 1000),
                                             reason, seq, digest)
            if seq % 100 == 0:
                log._write_checkpoint_locked(when, seq, digest, "count")
    log.close()
    return time.perf_counter() - t0


def run(report: Callable[[str, float, float, str, str], None]) -> None:
    from agent.buffer.segments import SegmentStore
    from agent.city import build_request, keygen, load_signing_key
    from agent.config import load_config
    from agent.protocol.decision import Reason, decide
    from agent.protocol.jose import parse_unverified
    from agent.protocol.trust import TrustStore
    from agent.sharing.service import RequestService
    from agent.sharing.transport import MqttTransport
    from agent.state.accesslog import AccessLog
    from agent.state.clock import FixedClock
    from agent.state.devicekey import DeviceKey
    from agent.state.truststore import save_trust_store
    from agent.timeutil import to_us
    from tests.buffer_helpers import FPS, write_segment

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp_name:
        tmp = Path(tmp_name)
        conf = tmp / "agent.toml"
        conf.write_text(textwrap.dedent(f"""\
            [paths]
            data_dir = "{tmp / 'data'}"

            [buffer]
            segment_seconds = 4

            [clock]
            assume_synced = true

            [policy]
            program = "{PROGRAM}"
            location = {{ lat = {HOME[0]}, lon = {HOME[1]} }}
            timezone = "America/Chicago"
            max_radius_m = 1000

            [policy.consent]
            start = 2026-01-01T00:00:00Z
            end = 2030-01-01T00:00:00Z

            [mqtt]
            host = "localhost"
            port = 1
            tls = false
            allow_plaintext = true
            client_id = "bench-decide-log"
            """))
        cfg = load_config(conf)
        now = datetime.now(UTC).replace(microsecond=0)
        keys = keygen(iss="jackson-pd", kid="jpd-bench", out_dir=tmp / "city")
        save_trust_store(TrustStore.from_jwks(keys.public_jwks), cfg.paths.trust_file)
        requester = load_signing_key(keys.private_path)
        store = SegmentStore.from_config(cfg)
        start_us = to_us(now) - (FOOTAGE_S + 5) * 1_000_000
        for i in range(FOOTAGE_S // 4):
            seg = start_us + i * 4_000_000
            store.add(write_segment(store.new_segment_path(seg), seg, 4 * FPS))
        store.close()
        device_key = DeviceKey.load_or_create(cfg.paths.device_key_file)

        def request(jti: str | None = None) -> str:
            return build_request(
                requester=requester, program=PROGRAM, officer="badge-4471", case="JPD-2026-001234",
                purpose="Burglary reported on this block.", basis="consent", lat=HOME[0] + 0.001, lon=HOME[1] + 0.001,
                radius_m=300, window_start=now - timedelta(seconds=40), window_end=now - timedelta(seconds=30),
                now=now, jti=jti,
            ).message  # fmt: skip

        loc = cfg.require_policy().location
        svc = RequestService(cfg, transport=MqttTransport(cfg.require_mqtt(), lat=loc.lat, lon=loc.lon),
                             device_key=device_key, clock=FixedClock(now))
        try:
            trust = svc.trust.get()
            assert trust is not None

            def bare(message: bytes) -> Callable[[], None]:
                sig = parse_unverified(message).signatures[0]
                key = trust.public_key(sig.kid)
                assert key is not None
                return lambda: key.verify(sig.signature, sig.signing_input)

            def decide_as_the_service(message: bytes) -> Reason:
                t = svc.trust.get()  # as RequestService.handle: the trust store's file is checked each time
                assert t is not None
                return decide(message, trust=t, policy=svc.policy, state=svc.state, now=svc.clock.now()).reason

            def decisions() -> tuple[list[float], list[float]]:
                """N fresh requests decided in full (granted), each beside a bare verify of its signature."""
                ours: list[float] = []
                theirs: list[float] = []
                for message in [request().encode() for _ in range(N)]:
                    verify = bare(message)
                    t0 = time.perf_counter()
                    reason = decide_as_the_service(message)
                    t1 = time.perf_counter()
                    verify()
                    t2 = time.perf_counter()
                    assert reason is Reason.GRANTED, reason
                    ours.append(t1 - t0)
                    theirs.append(t2 - t1)
                return ours, theirs

            empty, theirs_empty = decisions()  # the same service, before its log holds anything
            fill_s = _fill(cfg.paths.state_db, device_key, now, ROWS)
            assert svc.accesslog.head()[0] == ROWS
            ours, theirs = decisions()

            # The flood: copies of one captured, granted request, each re-serialized (other bytes, valid signature).
            genuine = request()
            d = svc.handle(genuine.encode())
            assert d is not None and d.reason is Reason.GRANTED and d.request is not None
            jti = d.request.jti
            first = svc.handle(reserialized(genuine, 0))
            assert first is not None and first.reason is Reason.REPLAYED
            head = svc.accesslog.head()[0]
            copies = [reserialized(genuine, i) for i in range(1, N + 1)]
            ours_copy: list[float] = []
            theirs_copy: list[float] = []
            verify = bare(copies[0])
            for copy in copies:
                t0 = time.perf_counter()
                d = svc.handle(copy)
                t1 = time.perf_counter()
                verify()
                t2 = time.perf_counter()
                assert d is not None and d.reason is Reason.REPLAYED
                ours_copy.append(t1 - t0)
                theirs_copy.append(t2 - t1)
            grown = svc.accesslog.head()[0] - head
        finally:
            svc.stop()
            svc.wait(30)
        with AccessLog(cfg.paths.state_db) as alog:
            listed = alog.entries(jti=jti)
            more = alog.more_copies(listed)
        outcomes = Counter(e.outcome for e in listed)
        print(f"  built a log of {ROWS:,} entries in {fill_s:.0f} s; {N + 1:,} re-serialized copies of one request added "
              f"{grown + 1} entries (its entries: {dict(outcomes)}; copies counted on them: {sum(more.values()):,})",
              flush=True)
    report("decide, empty log, p50 (vs bare Ed25519 verify)", _pct(empty, 50) * 1e6, _pct(theirs_empty, 50) * 1e6, "us",
           "report only")
    for name, p in (("p50", 50), ("p99", 99)):
        report(f"decide, log of {ROWS:,} rows, {name} (vs bare Ed25519 verify)", _pct(ours, p) * 1e6,
               _pct(theirs, p) * 1e6, "us", "p50 ratio <= 3")
    report(f"decide p50: log of {ROWS:,} rows (vs the same on the empty log)", _pct(ours, 50) * 1e6,
           _pct(empty, 50) * 1e6, "us", "ratio ~1: the log's size does not matter")
    for name, p in (("p50", 50), ("p99", 99)):
        report(f"handle a re-serialized flood copy (counted), {name} (vs verify)", _pct(ours_copy, p) * 1e6,
               _pct(theirs_copy, p) * 1e6, "us", "report only")


if __name__ == "__main__":
    run(Report())
