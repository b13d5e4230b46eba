"""Intake under a flood: no request lost, no frame dropped, memory bounded.

One run, on the Mosquitto that ``install.sh`` installs (Debian 12's 2.0.11 here, the one that
overshoots Receive Maximum), with the real service, the real recorder and the agency's
reference client, all on this machine over TLS on 127.0.0.1:

1. **Reference, no flood.** The realtime synthetic 720p/15 camera records for a while (the
   dropped-frames and memory reference); then one valid request for footage recorded in that
   time is published once: PUBLISH -> granted, and PUBLISH -> the agency holds the complete,
   verified delivery.
2. **Flood.** 5,000 invalid messages per second for 10 s (random bytes, a trusted key's
   signature broken, an unknown key; a third each) at QoS 1 from a separate process (the raw
   asyncio MQTT 5 publisher of ``bench_wire``), while the camera keeps recording; a second valid
   request is published **once**, in the middle. Reported beside the reference: how long after
   its PUBLISH it was granted and delivered, dropped frames, peak memory (RSS of this process,
   which holds the agent and the recorder), the inbox's peak depth against its bound, what was
   lost (dropped by the inbox, or by the broker: publisher PUBACKs vs messages the agent
   stored), and how many messages each inbox commit carried (group commit).

Every figure is printed beside a reference measured in the same run, as a ratio.

Run: ``.venv/bin/python -m tests.bench intake``.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.bench.report import Report

FPS = 15
RES = (1280, 720)
REFERENCE_S = 12.0  # recording before anything else: footage for the requests, and the no-flood reference
FLOOD_RATE = 5000
FLOOD_S = 10.0
WAIT = 60.0
SAMPLE_S = 0.05


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@dataclass
class _Sampler:
    """Peak RSS and inbox depth, sampled on a thread of its own (reading /proc and a counter: nothing heavy)."""

    agent: Any
    rss_peak_kib: int = 0
    depth_peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> _Sampler:
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.rss_peak_kib = max(self.rss_peak_kib, _rss_kib())
            self.depth_peak = max(self.depth_peak, self.agent.transport.queued)

    def stop(self) -> _Sampler:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        return self


def _mosquitto_version() -> str:
    from tests.broker import MOSQUITTO

    out = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True, timeout=10).stdout
    return out.splitlines()[0].strip() if out else "unknown"


def _valid_request(env: Any, agency: Any, rec_start: datetime) -> Any:
    """A request for 4 s of footage recorded in the reference phase."""
    return agency.build((rec_start + timedelta(seconds=2), rec_start + timedelta(seconds=6)))


def _one_request(agent: Any, agency: Any, built: Any) -> dict[str, float | str]:
    """Publish once; time to the decision, to the agent's last PUBACK, and to the agency's verified clip."""
    from agent.city import open_delivery

    t0 = time.perf_counter()
    agency.publish(built.message)  # returns at the broker's PUBACK
    reason, t_decided = agent.hooks.decision_for(built.jti, timeout=WAIT)
    out: dict[str, float | str] = {"reason": reason, "decided_s": t_decided - t0}
    if reason != "granted":
        return out
    ended, _, details = agent.hooks.delivery_of(built.jti, timeout=WAIT)
    t_sent = time.perf_counter()
    pending = agency.collect(built.jti, timeout=WAIT)
    opened = open_delivery(pending.manifest, pending.chunks, built.recipient_private, built.jti)
    out.update(ended=ended, sent_s=t_sent - t0, collected_s=time.perf_counter() - t0,
               bytes=float(len(opened.clip)), chunks=float(details.get("chunks", 0)))
    return out


def bench_flood(report: Report, env: Any, agent: Any, agency: Any) -> None:
    from agent.buffer.capture.synthetic import SyntheticSource
    from agent.runtime.supervisor import start_recording
    from tests.bench.bench_wire import _flood_pool, _readline, _start_flood

    pool = _flood_pool(env, agency)
    rec_start = datetime.now(UTC)
    handle = start_recording(env.cfg, source=SyntheticSource(*RES, FPS, realtime=True))
    rec = handle.recorder
    try:
        time.sleep(2.0)  # the camera settles; frames before the reference window are not counted
        s0, t_s0 = rec.snapshot(), time.monotonic()
        ref_sampler = _Sampler(agent).start()
        time.sleep(REFERENCE_S - 2.0)  # the no-flood reference: same recorder, same run
        reference = _one_request(agent, agency, _valid_request(env, agency, rec_start))
        ref_sampler.stop()
        s1, t_s1 = rec.snapshot(), time.monotonic()

        c0 = agent.transport.counters()
        commits0 = agent.transport.status()["inbox"]["commits"]
        with ExitStack() as stack:
            proc = _start_flood(env, pool, agency.topic, stack)
            sampler = _Sampler(agent).start()
            assert proc.stdin is not None
            t_go = time.monotonic()
            proc.stdin.write("go\n")
            proc.stdin.flush()
            time.sleep(FLOOD_S / 2)
            flooded = _one_request(agent, agency, _valid_request(env, agency, rec_start))
            result = json.loads(_readline(proc, 60))
            t_flood_end = time.monotonic()
        s2, t_s2 = rec.snapshot(), time.monotonic()
        drain_deadline = time.monotonic() + 120
        while agent.transport.queued and time.monotonic() < drain_deadline:
            time.sleep(0.1)  # the inbox empties at the worker's pace; nothing to wait on but its depth
        t_drained = time.monotonic()
        sampler.stop()
        c1 = agent.transport.counters()
        commits1 = agent.transport.status()["inbox"]["commits"]
        inbox_max = agent.transport.status()["inbox"]["max_messages"]
    finally:
        handle.stop()
        if not handle.wait(30):
            print("  (warning: the recorder did not stop within 30 s)", flush=True)

    d = {k: c1[k] - c0.get(k, 0) for k in c1}
    stored = d["received"]
    lost = d["inbox_full"] + d["inbox_unwritable"]
    mib = 1 / 1024
    print(f"    broker: {_mosquitto_version()}; publisher: {result['sent']} sent, {result['acked']} PUBACKs "
          f"({result['failed']} refused) in {result['ack_s']:.1f} s; agent: stored {stored}, inbox_full "
          f"{d['inbox_full']}, inbox_unwritable {d['inbox_unwritable']}, packet_too_large {d['packet_too_large']}, "
          f"ack_skipped {d['ack_skipped']}; inbox drained {t_drained - t_flood_end:+.1f} s after the publisher "
          f"finished", flush=True)
    print(f"    reference request: {reference}; request mid-flood: {flooded}", flush=True)

    report("intake: achieved invalid-message rate (QoS 1, 2 connections)",
           result["acked"] / result["ack_s"] if result["ack_s"] else 0.0, FLOOD_RATE, "msg/s",
           f"target {FLOOD_RATE}/s for {FLOOD_S:g} s")
    report(f"intake: valid request mid-flood ({flooded['reason']}): PUBLISH -> decision",
           float(flooded["decided_s"]) * 1000, float(reference["decided_s"]) * 1000, "ms",
           "granted, one PUBLISH; ref = same, no flood")
    if "collected_s" in flooded and "collected_s" in reference:
        report(f"intake: valid request mid-flood ({flooded.get('ended')}): PUBLISH -> agency holds clip",
               float(flooded["collected_s"]) * 1000, float(reference["collected_s"]) * 1000, "ms",
               "delivered; ref = same, no flood")
    report("intake: messages lost (inbox full or unwritable) / broker PUBACKs", lost, result["acked"], "msgs", "0")
    report("intake: messages the agent stored / broker PUBACKed to the publisher", stored, result["acked"] + 1,
           "msgs", "ratio 1.0 (the broker dropped none)")
    report(f"intake: dropped frames during flood, realtime {RES[0]}x{RES[1]}/{FPS}", s2.frames_dropped - s1.frames_dropped,
           s2.frames_captured - s1.frames_captured, "frames", "0 (ref = frames captured meanwhile)")
    report("intake: dropped frames, same recorder, no flood", s1.frames_dropped - s0.frames_dropped,
           s1.frames_captured - s0.frames_captured, "frames", "0 (ref = frames captured meanwhile)")
    report("intake: frames captured during flood vs 15 fps x wall time", s2.frames_captured - s1.frames_captured,
           (t_s2 - t_s1) * FPS, "frames", "ratio ~1")
    report("intake: frames captured before the flood vs 15 fps x wall time", s1.frames_captured - s0.frames_captured,
           (t_s1 - t_s0) * FPS, "frames", "ratio ~1")
    report("intake: peak RSS during flood (agent + recorder, this process)", sampler.rss_peak_kib * mib,
           ref_sampler.rss_peak_kib * mib, "MiB", "bounded; ref = peak without flood")
    report("intake: peak inbox depth / inbox bound", sampler.depth_peak, inbox_max, "msgs", "< 1 (nothing dropped)")
    report("intake: messages per inbox commit (group commit)", stored / max(1, commits1 - commits0), 1.0, "msgs",
           "ref = one commit per message")
    report("intake: agent's decision rate, flood start until the inbox drained", stored / max(1e-9, t_drained - t_go),
           FLOOD_RATE, "msg/s", "report")


def run(report: Report) -> None:
    from tests.bench.bench_wire import _Agency, _Agent, _setup

    with tempfile.TemporaryDirectory(prefix="bench-intake-") as tmp, ExitStack() as stack:
        env = _setup(Path(tmp), stack)
        agent = _Agent(env)
        stack.callback(agent.stop)
        agency = _Agency(env)
        stack.callback(agency.close)
        bench_flood(report, env, agent, agency)


if __name__ == "__main__":
    run(Report())
