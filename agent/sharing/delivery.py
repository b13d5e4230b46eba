"""The delivery worker: decide again, cut, seal and publish granted clips, and stop them for good when told.

One thread, one delivery at a time, fed by :meth:`DeliveryWorker.submit` (a fresh grant, a
resident's approval, or a job resumed from the outbox at start-up). It works only through the
collaborators it is given: the outbox, the publish side of the transport, the access log, the
kill switch, the footage store, the device key, the clock, and a ``regrant`` function that decides
the stored request again against the rules and trust store of the moment.

What it guarantees, and how:

- **A grant is checked again whenever its delivery runs.** Before a delivery starts or resumes
  (after a restart, and after every reconnect while it runs, before anything is handed over
  again) the stored request is
  decided again (:class:`Regrant`). A refusal ends it (``delivery_refused``, naming the reason)
  and deletes the outbox copy. The delivery's window is the re-check's window, never wider than
  the one logged for the grant. A transient refusal (the clock not synchronized yet, the trust
  store unreadable) only postpones the delivery, within its deadline.
- **Every job has an absolute deadline**, stored with it when it is granted (one hour after the
  grant, and never later than the footage's own retention), so a restart never extends it. Past
  it, the delivery ends as ``delivery_failed`` and its clip is deleted, whether it is running,
  waiting behind another delivery, or found in the outbox at start-up.
- **Nothing goes out after the kill switch.** The switch is read right before every message is
  handed to the network and every ``POLL_S`` while waiting. Messages are handed to paho only
  while connected, never queued for a later connection, and when a connection drops paho lets go
  of them (the transport sees to it) rather than sending them again by itself after the
  reconnect; the worker hands them over again, in order, after deciding again. When the switch
  cuts a delivery (or it is given up or refused) the messages still in flight are withdrawn from
  paho (:meth:`~agent.sharing.transport.MqttTransport.withdraw`): paho forgets them and drops
  their packets if not a byte was written, so nothing of the delivery leaves later. At most
  ``DELIVERY_WINDOW`` chunks await their PUBACK at once, so a clip of more chunks than that can
  still be cut.
- **The log says what the requester can have received**: ``chunks`` (N), ``chunks_acked``,
  ``chunks_handed`` (may have reached the network: acknowledged, or written at least partly
  before it could be withdrawn), ``manifest_handed``, and the window. ``delivery_cut`` is logged
  only if something was withheld; a switch pressed after every chunk had left is ``delivered``.
  Before each chunk is first handed over, the job records it durably, so after a crash the
  count still covers what the previous run may have sent.
- **The manifest goes first.** Chunks are handed over only once the broker has acknowledged the
  manifest, on every attempt (a resumed delivery publishes its manifest again, identical).

A delivery whose window must shrink after part of it may already have reached the requester (the
rules narrowed it across a restart or an outage) is not resumed under the old manifest, which
describes the wider window, nor sealed again under the same ``delivery_id``, which would show the
requester two different manifests for one delivery. It starts again under a new ``delivery_id``
for the narrower window: the requester holds an incomplete delivery it must discard (its chunks'
AAD fixes the count, so it can never open as complete) and then one complete delivery. The
closing log event lists the abandoned delivery under ``superseded``, with what of it may have
left. If nothing of the old delivery was handed over, the same ``delivery_id`` is simply sealed
again for the narrower window.
"""

from __future__ import annotations

import logging
import mmap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from agent.buffer.clips import ClipError, NoFootageError, cut_clip
from agent.buffer.segments import SegmentStore
from agent.protocol.decision import MIN_SHARE
from agent.protocol.jose import JwsError, parse_compact
from agent.protocol.sealing import (
    MANIFEST_TYP,
    DeliveryError,
    DeviceIdentity,
    SealedDelivery,
    new_delivery_id,
    resume_delivery,
    seal_delivery,
)
from agent.sharing.outbox import DeliveryJob, Outbox
from agent.sharing.outgoing import Recall
from agent.sharing.transport import MqttTransport
from agent.state.accesslog import AccessLog
from agent.state.clock import ClockSource
from agent.state.killswitch import KillSwitch
from agent.timeutil import format_utc, to_us

log = logging.getLogger("agent.sharing.delivery")

DELIVERY_WINDOW = 2
"""Chunks of a delivery awaiting their PUBACK at once. Two keep a home uplink busy (a 256 KiB chunk
takes longer to send than most round trips), and are few enough that the switch still cuts a clip of
three chunks: at most 512 KiB is on its way when it is pressed."""
POLL_S = 0.02
"""How often a delivery that waits (for a PUBACK, or for the broker) reads the kill switch again.
Reading it costs microseconds; this bounds how long queued packets keep leaving after it is pressed."""
DELIVERY_GIVE_UP_S = 3600.0
"""A delivery not finished this long after its grant is given up (logged as failed, clip deleted)."""
REFUSED_RETRY_S = 1.0
"""Pause before handing over again a message the broker refused with a reason code."""
DEFERRED_RETRY_S = 5.0
"""Pause before trying again a delivery postponed for a transient reason (clock not synchronized)."""
SWEEP_S = 1.0
"""How often deadlines of deliveries waiting their turn are enforced."""
MAX_PASSES = 4
"""Re-windowed restarts of one delivery before it is given up (the rules would have to keep changing)."""

TRANSIENT_REFUSALS = frozenset({"clock_unsynced", "trust_store_unreadable"})
"""Re-check outcomes that say "not now" rather than "no": the delivery waits (within its deadline)."""


def deadline_for(granted_at: datetime, granted_start: datetime, *, give_up_s: float, retention_s: float) -> datetime:
    """When a grant's delivery is given up at the latest: ``give_up_s`` after the grant, and never later than
    the moment its earliest footage leaves the buffer, so that no clip in the outbox outlives the retention."""
    return min(granted_at + timedelta(seconds=give_up_s), granted_start + timedelta(seconds=retention_s))


def narrow(a: tuple[datetime, datetime], b: tuple[datetime, datetime]) -> tuple[datetime, datetime] | None:
    """The part of window ``a`` inside ``b``, or None if less than the protocol's one second (step 19) is left."""
    start, end = max(a[0], b[0]), min(a[1], b[1])
    return (start, end) if end - start >= MIN_SHARE else None


@dataclass(frozen=True)
class Regrant:
    """The stored request decided again: ``refused`` names why it may no longer be shared, else ``window``."""

    refused: str | None
    window: tuple[datetime, datetime] | None = None

    @property
    def transient(self) -> bool:
        return self.refused in TRANSIENT_REFUSALS


class DeliveryCounters(Protocol):
    delivered: int
    delivery_cut: int
    delivery_failed: int
    delivery_refused: int


@dataclass
class _Msg:
    index: int  # -1 for the manifest
    topic: str
    payload: bytes = field(repr=False)
    mid: int | None = None  # set while paho holds it
    retry_at: float = 0.0  # monotonic time before which it is not handed over (after a broker refusal)


@dataclass
class _Attempt:
    """One pass over one delivery id: what is in flight and what the broker has confirmed."""

    total: int
    prior_chunks: int  # chunks an earlier run may have handed over (from the job, before this pass)
    prior_manifest: bool
    inflight: list[_Msg] = field(default_factory=list)
    next_chunk: int = 0
    manifest_acked: bool = False
    manifest_queued: bool = False
    acked: set[int] = field(default_factory=set)
    left: set[int] = field(default_factory=set)  # chunks that may have reached the network on a connection since lost
    manifest_left: bool = False


class _Again(Exception):
    """The re-check after a reconnect changed the window: start the delivery again."""


class DeliveryWorker:
    """Delivers granted clips one at a time on its own thread (:meth:`run`); see the module docstring."""

    def __init__(
        self,
        *,
        outbox: Outbox,
        transport: MqttTransport,
        accesslog: AccessLog,
        killswitch: KillSwitch,
        store: SegmentStore,
        device_key: DeviceIdentity,
        clock: ClockSource,
        regrant: Callable[[DeliveryJob, datetime], Regrant],
        root: str,
        stop: threading.Event,
        counters: DeliveryCounters,
        events: Callable[[str, DeliveryJob, dict[str, Any]], None] | None = None,
        window: int = DELIVERY_WINDOW,
    ) -> None:
        self.outbox = outbox
        self.transport = transport
        self.accesslog = accesslog
        self.killswitch = killswitch
        self.store = store
        self.device_key = device_key
        self.clock = clock
        self.regrant = regrant
        self.root = root
        self.stop = stop
        self.counters = counters
        self.events = events
        self.window = window
        self._waiting: list[tuple[float, DeliveryJob]] = []  # (not before, monotonic), in arrival order
        self._cond = threading.Condition()
        self._next_sweep = 0.0

    # ---- the queue

    def submit(self, job: DeliveryJob, *, not_before: float = 0.0) -> None:
        """Queue a job (its outbox copy must already be on disk); any thread."""
        with self._cond:
            self._waiting.append((not_before, job))
            self._cond.notify_all()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._waiting)

    def _take(self, timeout: float) -> DeliveryJob | None:
        with self._cond:
            now = time.monotonic()
            for i, (not_before, job) in enumerate(self._waiting):
                if not_before <= now:
                    del self._waiting[i]
                    return job
            soonest = min((nb for nb, _ in self._waiting), default=now + timeout)
            self._cond.wait(timeout=max(0.0, min(timeout, soonest - now)))
            return None

    def run(self) -> None:
        """The worker thread: deliver queued jobs until ``stop`` is set."""
        while not self.stop.is_set():
            self._sweep()
            job = self._take(timeout=0.5)
            if job is None:
                continue
            try:
                self.deliver(job)
            except Exception:
                log.exception("delivery of request %s failed", job.jti)
                try:
                    self._finish(job, "delivery_failed", reason="internal error")
                except Exception:  # e.g. the disk is full: the job stays in the outbox for the next start
                    log.exception("could not record the failed delivery of %s", job.jti)

    def _sweep(self, *, force: bool = False) -> None:
        """Give up waiting jobs whose deadline has passed (their clips must not outlive it)."""
        if not force and time.monotonic() < self._next_sweep:
            return
        self._next_sweep = time.monotonic() + SWEEP_S
        now = self.clock.now()
        with self._cond:
            expired = [job for _, job in self._waiting if job.deadline is not None and now >= job.deadline]
            self._waiting = [(nb, job) for nb, job in self._waiting if job not in expired]
        for job in expired:
            self._finish(job, "delivery_failed", reason="its deadline passed while it waited its turn",
                         **self._left(job, None))

    # ---- one delivery

    def deliver(self, job: DeliveryJob) -> str:
        """Decide again, cut, seal and publish one granted clip; returns how it ended (or "interrupted"/"deferred")."""
        if job.raw is None or job.granted_at is None or job.deadline is None:
            return self._finish(job, "delivery_failed", reason="granted by an earlier version of the agent that did "
                                "not keep the request, so it cannot be checked again; nothing more is sent")
        for _ in range(MAX_PASSES):
            now = self.clock.now()
            if now >= job.deadline:
                return self._finish(job, "delivery_failed", reason="its deadline passed", **self._left(job, None))
            if self.killswitch.engaged:
                return self._finish(job, "delivery_cut", reason="kill switch engaged before it started",
                                    **self._left(job, None))
            verdict = self.regrant(job, now)
            if verdict.transient:
                log.info("delivery of %s postponed (%s); trying again in %g s", job.jti, verdict.refused, DEFERRED_RETRY_S)
                self.submit(job, not_before=time.monotonic() + DEFERRED_RETRY_S)
                return "deferred"
            ended = self._refused(job, verdict, None)
            if ended is not None:
                return ended
            assert verdict.window is not None
            window = narrow(job.window, verdict.window)
            if window is None:
                return self._finish(job, "delivery_refused", reason="outside_consent", **self._left(job, None))
            if window != job.window:
                self._start_over(job, window)
            try:
                with self._sealed(job) as sealed:
                    if isinstance(sealed, str):
                        return sealed
                    return self._publish(job, sealed)
            except _Again:
                continue
        return self._finish(job, "delivery_failed", reason="the rules kept changing its window", **self._left(job, None))

    def _refused(self, job: DeliveryJob, verdict: Regrant, attempt: _Attempt | None) -> str | None:
        if verdict.refused is None:
            return None
        event = "delivery_cut" if verdict.refused == "kill_switch" else "delivery_refused"
        log.warning("request %s may no longer be shared (%s): its delivery is stopped", job.jti, verdict.refused)
        return self._halt(job, attempt, event, reason=verdict.refused)

    def _start_over(self, job: DeliveryJob, window: tuple[datetime, datetime]) -> None:
        """Cut and seal again for ``window``: under a new delivery id if anything of the old one may have left."""
        if job.anything_handed:
            job.superseded.append({
                "delivery_id": job.delivery_id, "manifest_handed": job.manifest_handed,
                "chunks_handed": job.chunks_handed,
                "granted": {"start": format_utc(job.granted_start), "end": format_utc(job.granted_end)},
            })  # fmt: skip
            job.delivery_id, job.chunks_handed, job.manifest_handed = new_delivery_id(), 0, False
        log.info("request %s: the rules now allow %s to %s; the delivery is cut again (delivery %s)",
                 job.jti, format_utc(window[0]), format_utc(window[1]), job.delivery_id)
        job.granted_start, job.granted_end = window
        self.outbox.add(job)  # the job first: a crash before the clip goes still re-cuts (see _sealed)
        self.outbox.discard_clip(job.jti)

    @contextmanager
    def _sealed(self, job: DeliveryJob) -> Iterator[SealedDelivery | str]:
        """The job's sealed delivery, resumed byte for byte if the outbox holds it for this very window and id.

        The clip is mapped, not read: a long clip must not cost its size in memory. Yields a str (how the
        delivery ended) if there is nothing to send.
        """
        clip_path = self.outbox.clip_path(job.jti)
        state = self.outbox.sealed(job.jti)
        if state is not None and clip_path.exists() and not self._describes(state, job):
            if job.anything_handed:  # the saved manifest went out and does not match: never reseal under its id
                self._start_over(job, job.window)
            self.outbox.discard_clip(job.jti)
            state = None
        info = None
        if state is None or not clip_path.exists():
            s_us, e_us = to_us(job.granted_start), to_us(job.granted_end)
            try:
                info = cut_clip(self.store.overlapping(s_us, e_us), s_us, e_us, clip_path)
            except (NoFootageError, ClipError) as exc:
                yield self._finish(job, "delivery_failed", reason=f"footage no longer readable: {exc}",
                                   **self._left(job, None))
                return
        with open(clip_path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            clip = memoryview(mapped)
            sealed: SealedDelivery | None = None
            try:
                if info is None:
                    assert state is not None
                    try:
                        sealed = resume_delivery(clip, state)
                    except DeliveryError as exc:
                        log.warning("request %s: the saved delivery cannot be resumed (%s); cutting it again", job.jti, exc)
                        if job.anything_handed:
                            self._start_over(job, job.window)
                        self.outbox.discard_clip(job.jti)
                        raise _Again from None
                else:
                    sealed = seal_delivery(
                        clip, jti=job.jti, recipient_jwk=job.recipient, device_key=self.device_key,
                        granted=job.window, frames=info.frames, width=info.width, height=info.height,
                        log_seq=job.log_seq, log_hash=job.log_hash, now=self.clock.now(), delivery_id=job.delivery_id,
                    )  # fmt: skip
                    self.outbox.save_sealed(job.jti, sealed.resume_state())
                yield sealed
            finally:
                sealed = None  # drop every view of the mapping before it is closed
                clip.release()

    @staticmethod
    def _describes(state: dict[str, str], job: DeliveryJob) -> bool:
        """Whether a saved sealed state is this job's delivery id and window."""
        try:
            claims = parse_compact(state["manifest"], typ=MANIFEST_TYP).claims
            return (claims["delivery_id"] == job.delivery_id
                    and claims["granted"] == {"start": format_utc(job.granted_start), "end": format_utc(job.granted_end)})
        except (KeyError, TypeError, JwsError):
            return False

    # ---- publishing

    def _publish(self, job: DeliveryJob, sealed: SealedDelivery) -> str:
        """The manifest, then chunks with up to ``window`` awaiting their PUBACK; see the module docstring."""
        a = _Attempt(total=sealed.chunk_count, prior_chunks=job.chunks_handed, prior_manifest=job.manifest_handed)
        manifest = _Msg(-1, sealed.manifest_topic(self.root), sealed.manifest.encode("ascii"))
        deadline_mono = time.monotonic() + max(0.0, (job.deadline - self.clock.now()).total_seconds())  # type: ignore[operator]
        generation = self.transport.generation if self.transport.connected else None
        while True:
            if self.stop.is_set():
                log.info("stopping with delivery %s unfinished; it resumes at the next start", job.jti)
                return "interrupted"
            if self.killswitch.engaged:
                return self._halt(job, a, "delivery_cut", reason="kill switch engaged")
            if time.monotonic() >= deadline_mono or self.clock.now() >= job.deadline:  # type: ignore[operator]
                return self._halt(job, a, "delivery_failed", reason="the broker did not take the delivery before its deadline")
            self._sweep()
            if self.transport.connected and self.transport.generation != generation:
                if generation is not None:  # a reconnect: the rules may have changed while we were away
                    self._resync(a)
                    ended = self._recheck_midway(job, a)
                    if ended is not None:
                        return ended
                generation = self.transport.generation
            if self.transport.connected:
                self._fill(job, a, manifest, sealed)
            if a.manifest_acked and a.next_chunk == a.total and not a.inflight:
                size = self.outbox.clip_path(job.jti).stat().st_size
                return self._finish(job, "delivered", chunks=a.total, chunks_acked=len(a.acked), chunks_handed=a.total,
                                    manifest_handed=True, bytes=size, granted=job.window)
            self._wait(job, a)

    def _resync(self, a: _Attempt) -> None:
        """After a reconnect: what was in flight on the lost connection is handed over again, in order.

        The transport had paho let go of it when the connection dropped (so nothing goes out before
        the re-check); here each message learns whether its PUBACK came in first, and what of it may
        have left, for the log.
        """
        handed = [m for m in a.inflight if m.mid is not None]
        recalled = self.transport.withdraw([m.mid for m in handed if m.mid is not None])
        for m in handed:
            assert m.mid is not None
            what = recalled.get(m.mid, Recall.ON_WIRE)
            m.mid, m.retry_at = None, 0.0
            if what is Recall.ACKED:
                a.inflight.remove(m)
                if m.index < 0:
                    a.manifest_acked = True
                else:
                    a.acked.add(m.index)
            elif what.may_have_left:
                self._note_left(a, m)

    @staticmethod
    def _note_left(a: _Attempt, m: _Msg) -> None:
        if m.index < 0:
            a.manifest_left = True
        else:
            a.left.add(m.index)

    def _recheck_midway(self, job: DeliveryJob, a: _Attempt) -> str | None:
        """The grant decided again after a reconnect, before anything more is handed over."""
        verdict = self.regrant(job, self.clock.now())
        if verdict.transient:
            return None  # judged again at the next reconnect, or when it starts over
        ended = self._refused(job, verdict, a)
        if ended is not None:
            return ended
        assert verdict.window is not None
        window = narrow(job.window, verdict.window)
        if window is None:
            return self._halt(job, a, "delivery_refused", reason="outside_consent")
        if window == job.window:
            return None
        self._recall(job, a)
        self._start_over(job, window)
        raise _Again

    def _fill(self, job: DeliveryJob, a: _Attempt, manifest: _Msg, sealed: SealedDelivery) -> None:
        """Hand over what may go now: refused messages again, the manifest first, then chunks up to the window."""
        now = time.monotonic()
        for msg in a.inflight:
            if msg.mid is None and msg.retry_at <= now and not self._hand(job, msg):
                return  # in order: nothing after a message that could not be handed over
        if not a.manifest_acked:
            if not a.manifest_queued:
                a.manifest_queued = True
                a.inflight.append(manifest)
                self._hand(job, manifest)
            return  # chunks wait until the broker has the manifest
        while len(a.inflight) < self.window and a.next_chunk < a.total:
            n = a.next_chunk
            msg = _Msg(n, sealed.chunk_topic(self.root, n), sealed.chunk(n))  # sealed only now
            a.next_chunk += 1
            a.inflight.append(msg)
            if self.events:
                self.events("handing", job, {"chunk": n})
            if not self._hand(job, msg):
                return

    def _hand(self, job: DeliveryJob, msg: _Msg) -> bool:
        """Hand one message to the network, if connected and the switch is off; record it first."""
        if msg.index >= 0 and msg.index + 1 > job.chunks_handed:
            job.chunks_handed = msg.index + 1
            self.outbox.add(job)  # durable before it can leave: a crash after this still counts it
        elif msg.index < 0 and not job.manifest_handed:
            job.manifest_handed = True
            self.outbox.add(job)
        if self.stop.is_set() or self.killswitch.engaged:  # the last look, right before the hand-off
            return False
        handed = self.transport.publish_nowait(msg.topic, msg.payload, qos=1)
        if isinstance(handed, int):
            msg.mid = handed
            return True
        return False

    def _wait(self, job: DeliveryJob, a: _Attempt) -> None:
        """Wait up to POLL_S for the oldest handed message's PUBACK (or for the broker)."""
        msg = next((m for m in a.inflight if m.mid is not None), None)
        if msg is None:
            if not self.transport.connected:
                self.transport.wait_connected(POLL_S)
            else:
                self.stop.wait(POLL_S)
            return
        assert msg.mid is not None
        outcome = self.transport.wait_published(msg.mid, timeout=POLL_S, abandon=False)
        if outcome.ok:
            a.inflight.remove(msg)
            if msg.index < 0:
                a.manifest_acked = True
            else:
                a.acked.add(msg.index)
            if self.events:
                self.events("sent", job, {"topic": msg.topic, "chunks_acked": len(a.acked)})
        elif outcome.lost:  # the connection dropped first; paho let go of it: hand it over again once connected
            if outcome.may_have_left:
                self._note_left(a, msg)
            msg.mid, msg.retry_at = None, 0.0
        elif outcome.reason_code is not None:  # the broker refused it; paho has let go of it: hand it over again
            log.warning("the broker refused %s (%s); handing it over again in %g s", msg.topic, outcome.reason,
                        REFUSED_RETRY_S)
            msg.mid, msg.retry_at = None, time.monotonic() + REFUSED_RETRY_S

    # ---- ending

    def _recall(self, job: DeliveryJob, a: _Attempt) -> tuple[set[int], bool]:
        """Withdraw everything in flight; returns (chunks that may have reached the network, manifest too)."""
        handed = [m for m in a.inflight if m.mid is not None]
        recalled = self.transport.withdraw([m.mid for m in handed if m.mid is not None])
        left = a.acked | a.left
        manifest_left = a.manifest_acked or a.manifest_left
        for m in handed:
            what = recalled.get(m.mid, Recall.ON_WIRE) if m.mid is not None else Recall.WITHDRAWN
            if what is Recall.ACKED and m.index >= 0:
                a.acked.add(m.index)
            if what.may_have_left:
                if m.index >= 0:
                    left.add(m.index)
                else:
                    manifest_left = True
            m.mid = None
        a.inflight.clear()
        # Chunks leave in order, so what may have left is a prefix; what a previous run handed over counts too.
        job.chunks_handed = max(a.prior_chunks, max(left, default=-1) + 1)
        job.manifest_handed = a.prior_manifest or manifest_left
        return left, manifest_left

    def _halt(self, job: DeliveryJob, a: _Attempt | None, event: str, **details: Any) -> str:
        """End a delivery early: withdraw what is in flight, then log what the requester can have received."""
        if a is not None:
            self._recall(job, a)
        counts = self._left(job, a)
        if event == "delivery_cut" and a is not None and counts["chunks_handed"] >= a.total and counts["manifest_handed"]:
            # Nothing was withheld: every chunk may have reached the requester.
            event = "delivered"
            details = {"reason": f"{details.get('reason', 'stopped')} after every chunk had been handed over; "
                                 f"{len(a.acked)} of {a.total} acknowledged"}
        if event == "delivery_cut":
            log.warning("kill switch engaged: delivery of %s stopped; %d chunk(s) may have reached the requester",
                        job.jti, counts["chunks_handed"])
        return self._finish(job, event, **counts, **details)

    def _left(self, job: DeliveryJob, a: _Attempt | None) -> dict[str, Any]:
        """The log's account of what the requester can have received of this delivery."""
        out: dict[str, Any] = {"chunks_handed": job.chunks_handed, "manifest_handed": job.manifest_handed,
                               "granted": job.window}
        if a is not None:
            out["chunks"] = a.total
            out["chunks_acked"] = len(a.acked)
        return out

    def _finish(self, job: DeliveryJob, event: str, **details: Any) -> str:
        details = {"delivery_id": job.delivery_id, **details}
        if job.superseded:
            details["superseded"] = job.superseded
        self.accesslog.append_event(job.jti, event, **details)
        setattr(self.counters, event, getattr(self.counters, event) + 1)
        if event == "delivered":
            log.info("request %s: delivered %s bytes in %s chunks", job.jti, details.get("bytes"), details.get("chunks"))
        elif event in ("delivery_failed", "delivery_refused"):
            log.warning("request %s: %s (%s)", job.jti, event.replace("_", " "), details.get("reason"))
        self.outbox.remove(job.jti)
        if self.events:
            self.events(event, job, details)
        return event
