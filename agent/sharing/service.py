"""The request side of ``doorbell-agent run``: hear a request, decide, record, deliver.

Three threads, so that nothing slow sits in front of anything urgent:

- paho's network thread (inside :class:`~agent.sharing.transport.MqttTransport`) only
  checks sizes and enqueues;
- the **decision worker** takes one message at a time, runs the pure decision
  (:func:`agent.protocol.decision.decide`), records it durably (replay memory, access
  log, a delivery job or a pending approval) and only then acknowledges the
  message to the broker, so a crash never loses a request it has not
  recorded;
- the **delivery worker** cuts the clip, seals it and publishes it chunk by
  chunk, checking the kill switch before every chunk. A flood of requests
  never waits behind a 12-hour clip, and a clip never waits behind a flood.

Delivery jobs live in ``<data_dir>/outbox`` (mode 0600) from the moment a
grant is logged until the delivery is finished or cut. A job carries the
``delivery_id`` chosen at grant time; once sealed, it also keeps the sealed
manifest and content key beside the clip, so a delivery interrupted by a
broker outage or an agent restart resumes with byte-identical chunks. One
grant therefore produces exactly one delivery.
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import os
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from agent.buffer.clips import ClipError, NoFootageError, cut_clip
from agent.buffer.segments import SegmentStore
from agent.config import AgentConfig
from agent.protocol.decision import BEFORE_REPLAY_REASONS, Decision, Policy, Reason, decide
from agent.protocol.geohash import subscription_filter
from agent.protocol.sealing import SealedDelivery, new_delivery_id, resume_delivery, seal_delivery
from agent.protocol.trust import TrustStore, TrustStoreError
from agent.fsutil import write_json_atomic
from agent.sharing.outbox import DeliveryJob, Outbox
from agent.sharing.transport import MqttTransport, default_client_id
from agent.state.accesslog import AccessLog
from agent.state.approvals import ApprovalQueue, PendingApproval
from agent.state.clock import ClockSource, SystemClock
from agent.state.devicekey import DeviceKey
from agent.state.killswitch import KillSwitch
from agent.state.replay import ReplayMemory
from agent.state.truststore import load_trust_store
from agent.timeutil import format_utc, from_us, to_us

log = logging.getLogger("agent.sharing.service")

_BEFORE_REPLAY = frozenset(str(r) for r in BEFORE_REPLAY_REASONS)  # as the access log spells outcomes

UTC = timezone.utc
HOUSEKEEPING_S = 1.0
STATUS_INTERVAL_S = 5.0
MQTT_SESSION_FILE = "mqtt-session.json"
"""Which filters the broker's session for our client id holds (see ``MqttTransport(session_file=...)``)."""
DELIVERY_WINDOW = 4
"""Messages of a delivery awaiting their PUBACK at once: enough to fill the link, few enough that
little is already on its way when the kill switch is pressed (at most 4 x 256 KiB)."""
ACK_POLL_S = 2.0
"""How often a delivery waiting for a PUBACK looks at the kill switch and the stop flag."""
DELIVERY_GIVE_UP_S = 3600.0
"""A delivery the broker will not take for this long is abandoned (and logged as failed)."""


# -- what the decision reads ------------------------------------------------------


@dataclass
class LiveState:
    """The agent's state as the pure decision sees it; every read is fresh."""

    clock: ClockSource
    killswitch: KillSwitch
    replay: ReplayMemory
    accesslog: AccessLog
    store: SegmentStore
    unsynced_why: str = ""
    forget_jti: str | None = None  # see RequestService.handle: a jti remembered but never logged

    @property
    def clock_synced(self) -> bool:
        ok, why = self.clock.synced()
        self.unsynced_why = "" if ok else why
        return ok

    @property
    def kill_switch(self) -> bool:
        return self.killswitch.engaged

    def seen(self, jti: str) -> str | None:
        return None if jti == self.forget_jti else self.replay.seen(jti)

    def grants_since(self, iss: str, since: datetime) -> int:
        return self.accesslog.grants_since(iss, since)

    def recorded(self, start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
        return [(from_us(a), from_us(b)) for a, b in self.store.spans(to_us(start), to_us(end))]


class _IgnoreSeen:
    """The live state, minus the replay memory: for re-checking a request already remembered."""

    def __init__(self, state: LiveState) -> None:
        self._state = state

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)

    def seen(self, jti: str) -> str | None:
        return None


class TrustCache:
    """The trust store, re-read when its file changes; unreadable means nothing verifies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._store: TrustStore | None = None
        self.error: str | None = None

    def get(self) -> TrustStore | None:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = (0, 0)
        except OSError as exc:
            self._fail(f"cannot read the trust store {self.path}: {exc}")
            return None
        if stamp != self._stamp:
            try:
                self._store = load_trust_store(self.path, missing_ok=True)
            except TrustStoreError as exc:
                self._fail(str(exc))  # tried again on the next message, changed file or not
            else:
                self._stamp = stamp
                self.error = None
                log.info("trust store loaded: %d key(s)", len(self._store))
        return None if self.error else self._store

    def _fail(self, why: str) -> None:
        if why != self.error:
            log.error("%s; no request can be verified, so nothing will be shared until it is fixed "
                      "(doorbell-agent trust list shows the problem)", why)
        self.error = why
        self._store = None


# -- delivery messages in flight ----------------------------------------------------


@dataclass
class _InFlight:
    topic: str
    payload: bytes
    mid: int | None = None

    @property
    def is_chunk(self) -> bool:
        return not self.topic.endswith("/manifest")


# -- the service --------------------------------------------------------------------


@dataclass
class ServiceCounters:
    decided: int = 0
    preauth_rejected: int = 0
    duplicates: int = 0
    granted: int = 0
    held_for_approval: int = 0
    refused: int = 0
    delivered: int = 0
    delivery_cut: int = 0
    delivery_failed: int = 0
    trust_store_unreadable: int = 0
    handler_errors: int = 0
    last_decision: dict[str, Any] = field(default_factory=dict)


class RequestService:
    """Decides and delivers: requests come in, and deliveries go out, through ``transport``."""

    name = "requests"

    def __init__(
        self,
        cfg: AgentConfig,
        *,
        transport: MqttTransport,
        device_key: DeviceKey,
        clock: ClockSource | None = None,
        delivery_give_up_s: float = DELIVERY_GIVE_UP_S,
    ) -> None:
        self.cfg = cfg
        self.policy = Policy.from_config(cfg.require_policy())
        self.root = cfg.mqtt.root if cfg.mqtt else "local"
        self.transport = transport
        self.device_key = device_key
        self.clock = clock or SystemClock.from_config(cfg)
        paths = cfg.paths
        self.killswitch = KillSwitch(paths.killswitch_file)
        # Every remember() is followed by an access-log append on the same database, whose
        # synchronous=FULL commit fsyncs the shared WAL and so makes the replay entry durable too.
        self.replay = ReplayMemory(paths.state_db, synchronous="NORMAL")
        self.accesslog = AccessLog(paths.state_db, device_key=device_key, clock=self.clock.now)
        self.approvals = ApprovalQueue(paths.state_db)
        self.store = SegmentStore.from_config(cfg)
        self.trust = TrustCache(paths.trust_file)
        self.outbox = Outbox(paths.data_dir / "outbox")
        self.state = LiveState(self.clock, self.killswitch, self.replay, self.accesslog, self.store)
        self.counters = ServiceCounters()
        self.delivery_give_up_s = delivery_give_up_s
        self._deliveries: queue.Queue[DeliveryJob] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._lock = threading.Lock()
        self._rejections: Counter[tuple[str, datetime]] = Counter()
        # Hooks for tests and status displays; they run on the worker threads, so keep them short.
        self.on_decision: Callable[[Decision | None], None] | None = None
        self.delivery_events: Callable[[str, DeliveryJob, dict[str, Any]], None] | None = None
        transport.on_dropped = self._dropped_by_transport

    # ---- lifecycle

    def start(self) -> None:
        for job in self.outbox.pending():
            if job.log_seq == 0:  # stopped between writing the job and logging the grant
                grant = [e for e in self.accesslog.entries(jti=job.jti) if e.outcome == "granted"]
                if not grant:
                    self.outbox.remove(job.jti)  # never granted on the record: never delivered
                    continue
                job.log_seq, job.log_hash = grant[0].seq, grant[0].hash
                self.outbox.add(job)
            if self._closing_event(job.jti) is not None:  # stopped between logging the end and tidying up
                self.outbox.remove(job.jti)
                continue
            log.info("resuming the delivery for request %s (delivery %s)", job.jti, job.delivery_id)
            self._deliveries.put(job)
        self.transport.start()
        self._spawn(self._decision_loop, "decisions")
        self._spawn(self._delivery_loop, "deliveries")

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=f"doorbell-{name}", daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        done = not any(t.is_alive() for t in self._threads)
        if done and self._stop.is_set() and not self._closed:
            self._closed = True
            self.transport.stop()
            self.flush_rejections()
            for closer in (self.replay.close, self.accesslog.close, self.store.close):
                closer()
        return done

    # ---- deciding

    def handle(self, payload: bytes) -> Decision | None:
        """Decide one message and record the decision durably. Never raises on message content.

        Returns None when the trust store is unreadable (nothing can be verified).
        """
        now = self.clock.now()
        trust = self.trust.get()
        if trust is None:
            self.counters.trust_store_unreadable += 1
            return None
        d = decide(payload, trust=trust, policy=self.policy, state=self.state, now=now)
        c = self.counters
        if d.pre_auth:
            # Counted in memory and written once a second by chores(): a flood costs no disk write per message.
            c.preauth_rejected += 1
            with self._lock:
                self._rejections[(str(d.reason), now.replace(minute=0, second=0, microsecond=0))] += 1
            log.debug("dropped a message: %s (%s)", d.reason, d.detail)
            return d
        if d.reason is Reason.DUPLICATE:
            assert d.request is not None
            if self._logged(d.request.jti):
                c.duplicates += 1
                return d
            # Remembered, but the agent stopped before logging a decision: decide it now.
            self.state.forget_jti = d.request.jti
            try:
                d = decide(payload, trust=trust, policy=self.policy, state=self.state, now=now)
            finally:
                self.state.forget_jti = None
        req = d.request
        assert req is not None
        if d.uses_jti:
            self.replay.remember(req.jti, d.payload_sha256, req.exp, now=now)
        c.decided += 1
        c.last_decision = {"jti": req.jti, "iss": req.iss, "reason": str(d.reason), "at": format_utc(now)}
        if d.reason is Reason.GRANTED:
            assert d.granted is not None
            # The job is on disk before the grant is logged, so a grant in the log always has its job;
            # a job whose grant never got logged is dropped at the next start.
            job = DeliveryJob(req.jti, new_delivery_id(), req.iss, req.recipient.to_jwk(),
                              d.granted[0], d.granted[1], 0, "")
            self.outbox.add(job)
            job.log_seq, job.log_hash = self.accesslog.append_decision(d, at=now, delivery_id=job.delivery_id)
            self.outbox.add(job)
            c.granted += 1
            log.info("request %s from %s (case %s) granted: %s to %s", req.jti, req.iss, req.case,
                     format_utc(d.granted[0]), format_utc(d.granted[1]))
            self._deliveries.put(job)
        elif d.reason is Reason.AWAITING_RESIDENT:
            assert d.granted is not None
            # Held before it is logged (holding again is harmless), so a logged request is always held.
            self.approvals.hold(
                raw=payload, jti=req.jti, iss=req.iss, sub=req.sub, case=req.case, purpose=req.purpose,
                granted_start=d.granted[0], granted_end=d.granted[1], exp=req.exp, now=now,
                extra={"recipient": req.recipient.to_jwk()},
            )  # fmt: skip
            self.accesslog.append_decision(d, at=now)
            c.held_for_approval += 1
            log.info("request %s from %s (case %s) is waiting for your approval: doorbell-agent pending",
                     req.jti, req.iss, req.case)
        else:
            self.accesslog.append_decision(d, at=now)
            c.refused += 1
            why = f" ({self.state.unsynced_why})" if d.reason is Reason.CLOCK_UNSYNCED else ""
            log.info("request %s from %s refused: %s%s", req.jti, req.iss, d.reason, why)
        return d

    def _decision_loop(self) -> None:
        next_chores = next_status = 0.0
        while not self._stop.is_set():
            msg = self.transport.get(timeout=0.5)
            if msg is not None:
                decision = None
                try:
                    decision = self.handle(msg.payload)
                except Exception:  # a bug or a full disk must not stop the agent from hearing the next request
                    self.counters.handler_errors += 1
                    log.exception("error while handling a request; nothing was shared, the broker will offer it again")
                else:
                    self.transport.ack(msg)  # only once the outcome is on disk
                if self.on_decision:
                    self.on_decision(decision)
            if time.monotonic() >= next_chores:
                next_chores = time.monotonic() + HOUSEKEEPING_S
                self.chores()
            if time.monotonic() >= next_status:
                next_status = time.monotonic() + STATUS_INTERVAL_S
                self.write_status()

    def chores(self) -> None:
        """Approvals the homeowner answered, expired approvals, log checkpoints, old replay entries."""
        now = self.clock.now()
        try:
            for item in self.approvals.approved():
                self._deliver_approved(item, now)
            for item in self.approvals.take_refusals(now):
                self.accesslog.append_event(item.jti, item.state, at=now)
                if item.state == "approval_expired":
                    log.info("request %s expired before you answered it; nothing was shared", item.jti)
            self.flush_rejections()
            self.accesslog.checkpoint_if_due(now)
            if self.clock.synced()[0]:  # a clock jumping ahead must not empty the replay memory
                self.replay.purge(now)
        except Exception:
            log.exception("housekeeping failed; it will be tried again")

    def _deliver_approved(self, item: PendingApproval, now: datetime) -> None:
        """The homeowner said yes: check the rules again, then deliver. Safe to repeat after a crash."""
        if not self.outbox.has(item.jti) and self._closing_event(item.jti) is None:
            again = self._recheck(item.raw, now)
            if again is not None:
                seq, digest = self.accesslog.append_event(item.jti, "delivery_failed", at=now,
                                                          reason=f"approved, but no longer allowed: {again}")
                log.info("request %s was approved but is no longer allowed (%s); nothing was shared", item.jti, again)
            else:
                approved = [e for e in self.accesslog.entries(jti=item.jti) if e.outcome == "approved"]
                seq, digest = ((approved[0].seq, approved[0].hash) if approved
                               else self.accesslog.append_event(item.jti, "approved", at=now))
                job = DeliveryJob(item.jti, new_delivery_id(), item.iss, item.extra["recipient"],
                                  item.granted_start, item.granted_end, seq, digest)
                self.outbox.add(job)
                log.info("request %s approved by you: delivering", item.jti)
                self._deliveries.put(job)
        self.approvals.mark_granted(item.id, now)

    def _recheck(self, raw: bytes, now: datetime) -> str | None:
        """Why an approved request may no longer be shared (key revoked, consent withdrawn, limit reached), or None."""
        trust = self.trust.get()
        if trust is None:
            return "the trust store cannot be read"
        policy = dataclasses.replace(self.policy, approval="auto")
        d = decide(raw, trust=trust, policy=policy, state=_IgnoreSeen(self.state), now=now)
        return None if d.reason is Reason.GRANTED else str(d.reason)

    def _logged(self, jti: str) -> bool:
        """Whether a decision that used up ``jti`` is on the record (step 12: refusals by checks 1-11 do not)."""
        return any(e.type == "decision" and e.outcome not in _BEFORE_REPLAY for e in self.accesslog.entries(jti=jti))

    def _closing_event(self, jti: str) -> str | None:
        for e in self.accesslog.entries(jti=jti):
            if e.outcome in ("delivered", "delivery_cut", "delivery_failed"):
                return e.outcome
        return None

    def _dropped_by_transport(self, reason: str, _msg: object) -> None:
        """Runs on paho's thread: an oversize payload is counted like any other unauthenticated message."""
        if reason == "oversize":
            now = datetime.now(UTC)
            with self._lock:
                self._rejections[("oversize", now.replace(minute=0, second=0, microsecond=0))] += 1

    def flush_rejections(self) -> None:
        with self._lock:
            pending, self._rejections = self._rejections, Counter()
        for (reason, hour), n in pending.items():
            self.accesslog.count_rejection(reason, hour, count=n)

    # ---- delivering

    def _delivery_loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._deliveries.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self.deliver(job)
            except Exception:
                log.exception("delivery of request %s failed", job.jti)
                try:
                    self._finish(job, "delivery_failed", reason="internal error")
                except Exception:  # e.g. the disk is full: the job stays in the outbox for the next start
                    log.exception("could not record the failed delivery of %s", job.jti)

    def deliver(self, job: DeliveryJob) -> str:
        """Cut, seal and publish one granted clip; returns how it ended."""
        if self.killswitch.engaged:
            return self._finish(job, "delivery_cut", chunks_sent=0, reason="kill switch engaged before the first chunk")
        if not self.policy.consents_at(self.clock.now()):
            return self._finish(job, "delivery_cut", chunks_sent=0, reason="consent withdrawn or ended")
        sealed_state = self.outbox.sealed(job.jti)
        clip_path = self.outbox.clip_path(job.jti)
        info = None
        if sealed_state is None or not clip_path.exists():
            s_us, e_us = to_us(job.granted_start), to_us(job.granted_end)
            try:
                info = cut_clip(self.store.overlapping(s_us, e_us), s_us, e_us, clip_path)
            except (NoFootageError, ClipError) as exc:
                return self._finish(job, "delivery_failed", reason=f"footage no longer readable: {exc}")
        # The clip is mapped, not read: a long clip must not cost its size in memory.
        with open(clip_path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            clip = memoryview(mapped)
            try:
                if info is not None:
                    sealed = seal_delivery(
                        clip, jti=job.jti, recipient_jwk=job.recipient, device_key=self.device_key,
                        granted=(job.granted_start, job.granted_end), frames=info.frames, width=info.width,
                        height=info.height, log_seq=job.log_seq, log_hash=job.log_hash, now=self.clock.now(),
                        delivery_id=job.delivery_id,
                    )  # fmt: skip
                    self.outbox.save_sealed(job.jti, sealed.resume_state())
                else:
                    assert sealed_state is not None
                    sealed = resume_delivery(clip, sealed_state)
                return self._publish(job, sealed)
            finally:
                sealed = None  # noqa: F841 - drop every view of the mapping before it is closed
                clip.release()

    def _publish(self, job: DeliveryJob, sealed: SealedDelivery) -> str:
        """Publish the manifest and chunks with up to DELIVERY_WINDOW messages awaiting their PUBACK.

        The kill switch is read before each chunk is handed to the network: once it is on, no
        further chunk leaves. On a broker outage the unacknowledged messages are handed over
        again, byte for byte, after reconnecting.
        """
        total = sealed.chunk_count
        items = sealed.publications(self.root)
        inflight: deque[_InFlight] = deque()
        handed = acked = 0  # chunks (the manifest not counted)
        deadline = time.monotonic() + self.delivery_give_up_s
        exhausted = False
        while True:
            while not exhausted and len(inflight) < DELIVERY_WINDOW:
                nxt = next(items, None)
                if nxt is None:
                    exhausted = True
                    break
                msg = _InFlight(*nxt)
                if msg.is_chunk and self.delivery_events:
                    self.delivery_events("handing", job, {"chunk": handed})
                halted = self._halted(job, handed, total)
                if halted:
                    return halted
                self._hand(msg)
                inflight.append(msg)
                if msg.is_chunk:
                    handed += 1
            if not inflight:
                break
            msg = inflight[0]
            if self._acked(msg):
                inflight.popleft()
                if msg.is_chunk:
                    acked += 1
                if self.delivery_events:
                    self.delivery_events("sent", job, {"topic": msg.topic, "chunks_sent": acked})
                continue
            # Not acknowledged yet: paho resends its in-flight messages itself after a reconnect,
            # so keep waiting for the same message (never hand it over again: copies would pile up).
            if msg.mid is None:
                self._hand(msg)  # paho refused it outright (not connected at all): try again
            halted = self._halted(job, handed, total)
            if halted:
                return halted
            if time.monotonic() > deadline:
                return self._finish(job, "delivery_failed", chunks_sent=acked, chunks=total,
                                    reason="the broker did not accept the delivery")
        size = self.outbox.clip_path(job.jti).stat().st_size
        return self._finish(job, "delivered", chunks=total, bytes=size)

    def _halted(self, job: DeliveryJob, handed: int, total: int) -> str | None:
        """How the delivery ends here if the agent is stopping or the kill switch is on, else None."""
        if self._stop.is_set():
            log.info("stopping with delivery %s unfinished; it resumes at the next start", job.jti)
            return "interrupted"
        if self.killswitch.engaged:
            log.warning("kill switch engaged: delivery of %s stopped after %d of %d chunks", job.jti, handed, total)
            return self._finish(job, "delivery_cut", chunks_sent=handed, chunks=total)
        return None

    def _hand(self, msg: _InFlight) -> None:
        handed = self.transport.publish_nowait(msg.topic, msg.payload, qos=1)
        msg.mid = handed if isinstance(handed, int) else None

    def _acked(self, msg: _InFlight) -> bool:
        if msg.mid is None:
            self.transport.wait_ready(timeout=ACK_POLL_S)
            return False
        outcome = self.transport.wait_published(msg.mid, timeout=ACK_POLL_S, abandon=False)
        if not outcome.ok and outcome.reason_code is not None:  # the broker refused it: hand it over again
            msg.mid = None
        return outcome.ok

    def _finish(self, job: DeliveryJob, event: str, **details: Any) -> str:
        self.accesslog.append_event(job.jti, event, delivery_id=job.delivery_id, **details)
        counter = {"delivered": "delivered", "delivery_cut": "delivery_cut"}.get(event, "delivery_failed")
        setattr(self.counters, counter, getattr(self.counters, counter) + 1)
        if event == "delivered":
            log.info("request %s: delivered %s bytes in %s chunks", job.jti, details.get("bytes"), details.get("chunks"))
        elif event == "delivery_failed":
            log.warning("request %s: delivery failed (%s)", job.jti, details.get("reason"))
        self.outbox.remove(job.jti)
        if self.delivery_events:
            self.delivery_events(event, job, details)
        return event

    # ---- status

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"counters": self.counters.__dict__.copy(), "pending_deliveries": self._deliveries.qsize(),
                               "transport": self.transport.status()}
        out["trust_store_error"] = self.trust.error
        return out

    def write_status(self) -> None:
        try:
            write_json_atomic(self.cfg.paths.service_status_file,
                              {**self.status(), "pid": os.getpid(), "updated_us": to_us(datetime.now(UTC)),
                               "status_interval_s": STATUS_INTERVAL_S})
        except OSError as exc:
            log.warning("cannot write the service status file: %s", exc)


def start_service(cfg: AgentConfig) -> RequestService:
    """The ``run`` component: connect to the broker and serve requests."""
    policy = cfg.require_policy()
    mqtt_cfg = cfg.require_mqtt()
    key = DeviceKey.load_or_create(cfg.paths.device_key_file)
    subscription = subscription_filter(mqtt_cfg.root, policy.location.lat, policy.location.lon, mqtt_cfg.precision)
    # The session hangs on the client id; a new filter (moved camera, new precision) gets a fresh session.
    # The session file lets a fixed mqtt.client_id drop the old filter after a move (see MqttTransport).
    transport = MqttTransport(mqtt_cfg, lat=policy.location.lat, lon=policy.location.lon,
                              client_id=default_client_id(key.kid, subscription),
                              session_file=cfg.paths.data_dir / MQTT_SESSION_FILE)
    log.info("listening for requests on %s:%d, topic %s", mqtt_cfg.host, mqtt_cfg.port, transport.subscription)
    svc = RequestService(cfg, transport=transport, device_key=key)
    svc.start()
    return svc
