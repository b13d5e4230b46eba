"""The request side of ``doorbell-agent run``: hear a request, decide, record, deliver.

Three threads, so that nothing slow sits in front of anything urgent:

- paho's network thread (inside :class:`~agent.sharing.transport.MqttTransport`) only
  checks sizes and enqueues;
- the **decision worker** takes one message at a time, runs the pure decision
  (:func:`agent.protocol.decision.decide`), records it durably (replay memory, access
  log, a delivery job or a pending approval) and only then acknowledges the
  message to the broker, so a crash never loses a request it has not
  recorded;
- the **delivery worker** (:class:`~agent.sharing.delivery.DeliveryWorker`, its
  own module) decides the stored request again, cuts the clip, seals it and
  publishes it chunk by chunk, checking the kill switch before every chunk. A
  flood of requests never waits behind a 12-hour clip, and a clip never waits
  behind a flood.

This module is the request side: it owns the rules, the trust store and the
live state, so it gives the delivery worker the one thing that needs them, the
re-check of a grant (:meth:`RequestService.regrant`).

Delivery jobs live in ``<data_dir>/outbox`` (mode 0600) from the moment a
grant is logged until the delivery is finished or cut. A job carries the
``delivery_id`` chosen at grant time, the request exactly as it was signed (to
decide it again) and an absolute deadline; once sealed, it also keeps the
sealed manifest and content key beside the clip, so a delivery interrupted by
a broker outage or an agent restart resumes with byte-identical chunks. One
grant therefore produces one delivery (see the delivery module for the one
exception: rules that narrow the window after part of it left).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from agent.buffer.segments import SegmentStore
from agent.config import AgentConfig, PolicyConfig
from agent.fsutil import is_disk_full, write_json_atomic
from agent.protocol.decision import BEFORE_REPLAY_REASONS, Decision, Policy, Reason, decide
from agent.protocol.geohash import subscription_filter
from agent.protocol.sealing import new_delivery_id
from agent.protocol.trust import TrustStore, TrustStoreError
from agent.sharing.delivery import DELIVERY_GIVE_UP_S, DeliveryWorker, Regrant, deadline_for, narrow
from agent.sharing.outbox import DeliveryJob, Outbox
from agent.sharing.transport import MqttTransport, default_client_id
from agent.state.accesslog import AccessLog
from agent.state.approvals import ApprovalQueue, PendingApproval
from agent.state.clock import ClockSource, SystemClock
from agent.state.consent import PolicyReloader
from agent.state.devicekey import DeviceKey
from agent.state.killswitch import KillSwitch
from agent.state.replay import CLOCK_BACK_TOLERANCE_S, ReplayMemory
from agent.state.truststore import load_trust_store
from agent.timeutil import format_utc, from_us, parse_utc_z, to_us

log = logging.getLogger("agent.sharing.service")

_BEFORE_REPLAY = frozenset(str(r) for r in BEFORE_REPLAY_REASONS)  # as the access log spells outcomes

UTC = UTC
HOUSEKEEPING_S = 1.0
STATUS_INTERVAL_S = 5.0
MQTT_SESSION_FILE = "mqtt-session.json"
INBOX_FILE = "inbox.sqlite"
"""Received requests waiting for their decision (see :mod:`agent.state.inbox`)."""
"""Which filters the broker's session for our client id holds (see ``MqttTransport(session_file=...)``)."""


# -- pacing the decision worker during a flood -------------------------------------

UNREAD_BYTES_YIELD = 16384
"""Bytes waiting unread on the broker connection above which the worker steps aside: paho is behind."""
STEP_ASIDE_S = 0.001
STEP_ASIDE_MAX_S = 0.05
"""How long the worker sleeps at a time while paho catches up, and at most per message (it still makes progress)."""


class _Pacer:
    """Keeps the decision worker from starving paho's thread (and the recorder) of the GIL.

    Deciding is pure Python (parsing, signature checks). A CPU-bound thread keeps the GIL for the
    whole switch interval (5 ms) while others wait for it, and paho's thread needs it for every
    packet: during a flood of thousands of messages a second it then reads too slowly, the
    broker's queue for us overflows and the broker drops messages (a real request may be among
    them), and the camera drops frames. Reading the wire comes first: the inbox keeps what the
    worker has not decided yet, in order. So after each message the worker looks at how many bytes
    wait unread on the connection; while paho is behind it sleeps in short steps, otherwise it only
    lets a waiting thread in, and a backlog in the inbox drains at full speed.
    """

    def __init__(self, unread_bytes: Callable[[], int]) -> None:
        self._unread_bytes = unread_bytes

    def after_message(self) -> None:
        waited = 0.0
        while waited < STEP_ASIDE_MAX_S and self._unread_bytes() > UNREAD_BYTES_YIELD:
            time.sleep(STEP_ASIDE_S)
            waited += STEP_ASIDE_S
        if not waited:
            time.sleep(0)  # lets a waiting thread take the GIL now, not at the end of the switch interval


# -- what the decision reads ------------------------------------------------------


UNKNOWN_PAYLOAD = "unknown: logged before the access log recorded payload hashes"
"""What :meth:`LiveState.seen` answers for a jti used up by a log entry that has no payload hash:
equal to no message's sha256, so any copy is refused as ``replayed`` (never shared twice)."""


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
    went_back: bool = False  # the clock read earlier than a time already acted on (logged once per episode)

    @property
    def clock_synced(self) -> bool:
        """The system says the clock is synchronized, and it has not gone back behind a time the agent already used.

        A clock stepped forward and then back (a bad time server, a Pi that booted with a wrong time)
        would otherwise let housekeeping purge replay entries at the future time and then accept their
        requests again at the real one. So a clock reading more than ``CLOCK_BACK_TOLERANCE_S`` before
        the latest time the agent acted on (the replay memory's high-water mark, the access log's newest
        entry) is not trusted, fail closed, until real time passes that mark again.
        """
        ok, why = self.clock.synced()
        if ok:
            ok, why = self._not_gone_back()
        self.unsynced_why = "" if ok else why
        return ok

    def _not_gone_back(self) -> tuple[bool, str]:
        now = self.clock.now()
        marks = [m for m in (self.replay.high_water(), self.accesslog.last_at()) if m is not None]
        mark = max(marks) if marks else None
        behind = (mark - now).total_seconds() if mark is not None else 0.0
        if mark is None or behind <= CLOCK_BACK_TOLERANCE_S:
            if self.went_back:
                self.went_back = False
                log.warning("the clock has caught up with the latest time this agent acted on; sharing is possible again")
            return True, ""
        why = (f"the clock reads {format_utc(now)}, {behind:.0f} s before {format_utc(mark)}, a time this agent has "
               f"already acted on: it went back, so it is not trusted until it passes that time again")
        if not self.went_back:
            self.went_back = True
            log.warning("%s; nothing is shared until then", why)
        return False, why

    @property
    def kill_switch(self) -> bool:
        return self.killswitch.engaged

    def seen(self, jti: str) -> str | None:
        """Step 12: the sha256 of the message that used up ``jti``, from the replay memory or else the access log.

        The access log is the record that outlives any purge of the replay memory: a decision on
        ``jti`` past checks 1 to 11 (not a refusal in ``BEFORE_REPLAY_REASONS``) means it is used up,
        whatever the replay memory still holds.
        """
        if jti == self.forget_jti:
            return None
        remembered = self.replay.seen(jti)
        if remembered is not None:
            return remembered
        for e in self.accesslog.entries(jti=jti):
            if e.type == "decision" and e.outcome not in _BEFORE_REPLAY:
                sha = e.data.get("payload_sha256")
                return sha if isinstance(sha, str) else UNKNOWN_PAYLOAD
        return None

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


class _Regranting(_IgnoreSeen):
    """The live state for deciding again a request already granted: its own grant is not counted.

    Step 21 counts grants to the issuer in the last 24 hours; the grant being re-checked (its
    ``granted`` decision or the resident's ``approved`` event) is one of them and must not count
    against itself, or a resident allowing one grant a day could never receive it.
    """

    def __init__(self, state: LiveState, jti: str) -> None:
        super().__init__(state)
        self._jti = jti

    def grants_since(self, iss: str, since: datetime) -> int:
        own = sum(1 for e in self._state.accesslog.entries(jti=self._jti)
                  if e.iss == iss and e.at > since and e.outcome in ("granted", "approved"))
        return max(0, self._state.grants_since(iss, since) - own)


def _signing_agency(d: Decision, trust: TrustStore) -> str:
    """The agency a refusal counts against for the log's hourly limit: the one whose key signed.

    That is the claim ``iss`` (step 5 checked a requester key of it signed), except when the refusal
    is ``wrong_issuer``: then the claim is exactly what is wrong, and a key holder could otherwise
    spread refusals over invented agency names. The signers' own ``iss`` (the first, in order) counts.
    """
    assert d.request is not None
    if d.reason is Reason.WRONG_ISSUER:
        signers = sorted({k.iss for k in (trust.get(kid) for kid in d.kids) if k is not None})
        if signers:
            return signers[0]
    return d.request.iss


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


# -- the service --------------------------------------------------------------------


@dataclass
class ServiceCounters:
    decided: int = 0
    preauth_rejected: int = 0
    duplicates: int = 0
    granted: int = 0
    held_for_approval: int = 0
    refused: int = 0
    refusals_counted: int = 0  # refused, and counted rather than listed (a copy already listed, or over the hourly limit)
    delivered: int = 0
    delivery_cut: int = 0
    delivery_failed: int = 0
    delivery_refused: int = 0
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
        # The rules of each moment: the resident's consent file is re-read when it changes, no restart needed.
        self.rules = PolicyReloader(cfg)
        self._policy_of: tuple[PolicyConfig, Policy] | None = None
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
        self._stop = threading.Event()
        self.delivery = DeliveryWorker(
            outbox=self.outbox, transport=transport, accesslog=self.accesslog, killswitch=self.killswitch,
            store=self.store, device_key=device_key, clock=self.clock, regrant=self.regrant, root=self.root,
            stop=self._stop, counters=self.counters, events=self._delivery_event,
        )  # fmt: skip
        self._threads: list[threading.Thread] = []
        self._closed = False
        self.started_at: datetime | None = None
        self._lock = threading.Lock()
        self._rejections: Counter[tuple[str, datetime]] = Counter()
        # Hooks for tests and status displays; they run on the worker threads, so keep them short.
        self.on_decision: Callable[[Decision | None], None] | None = None
        self.delivery_events: Callable[[str, DeliveryJob, dict[str, Any]], None] | None = None
        transport.on_dropped = self._dropped_by_transport
        transport.use_inbox(paths.data_dir / INBOX_FILE)  # what the broker handed over survives a restart

    @property
    def policy(self) -> Policy:
        """The rules in force now (:class:`agent.state.consent.PolicyReloader`: fail closed on a bad consent file)."""
        rules = self.rules.get()
        cached = self._policy_of
        if cached is None or cached[0] is not rules:
            cached = self._policy_of = (rules, Policy.from_config(rules))
        return cached[1]

    # ---- lifecycle

    def start(self) -> None:
        # Pins the device key (a replaced key stops here), records changed rules, signs a start-up checkpoint.
        self.accesslog.service_started(self.cfg.paths.data_dir,
                                       rules=self.rules.get().model_dump(mode="json", by_alias=True))
        self.started_at = datetime.now(UTC)
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
            # Decided again before anything is sent (DeliveryWorker.deliver), like every start of a delivery.
            log.info("resuming the delivery for request %s (delivery %s)", job.jti, job.delivery_id)
            self.delivery.submit(job)
        self.transport.start()
        self._spawn(self._decision_loop, "decisions")
        self._spawn(self.delivery.run, "deliveries")

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
            self.write_status(stopped=True)  # so `status` says stopped at once, not "connected" until it goes stale
            self.accesslog.service_stopping()  # the shutdown checkpoint: the next start knows this stop was clean
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
        assert req is not None and d.payload_sha256 is not None  # authenticated from here on
        if d.uses_jti:
            self.replay.remember(req.jti, d.payload_sha256, req.exp, now=now)
        c.decided += 1
        c.last_decision = {"jti": req.jti, "iss": req.iss, "reason": str(d.reason), "at": format_utc(now)}
        if d.reason is Reason.GRANTED:
            assert d.granted is not None
            # The job is on disk before the grant is logged, so a grant in the log always has its job;
            # a job whose grant never got logged is dropped at the next start.
            job = self._new_job(d, payload, now)
            self.outbox.add(job)
            job.log_seq, job.log_hash = self.accesslog.append_decision(d, at=now, delivery_id=job.delivery_id)
            self.outbox.add(job)
            c.granted += 1
            log.info("request %s from %s (case %s) granted: %s to %s", req.jti, req.iss, req.case,
                     format_utc(d.granted[0]), format_utc(d.granted[1]))
            self.delivery.submit(job)
        elif d.reason is Reason.AWAITING_RESIDENT:
            assert d.granted is not None
            # Held before it is logged (holding again is harmless), so a logged request is always held.
            self.approvals.hold(
                raw=payload, jti=req.jti, iss=req.iss, sub=req.sub, case=req.case, purpose=req.purpose,
                granted_start=d.granted[0], granted_end=d.granted[1], exp=req.exp, now=now,
                extra={"recipient": req.recipient.to_jwk(), "kids": list(d.kids)},
            )  # fmt: skip
            self.accesslog.append_decision(d, at=now)
            c.held_for_approval += 1
            log.info("request %s from %s (case %s) is waiting for your approval: doorbell-agent pending",
                     req.jti, req.iss, req.case)
        else:
            # One entry per request and reason, and a limit per agency and hour: copies of a captured request
            # (re-serialized, or sent after it expired) and a key holder's flood are counted, not listed.
            listed = self.accesslog.record_refusal(d, at=now, agency=_signing_agency(d, trust))
            c.refused += 1
            why = f" ({self.state.unsynced_why})" if d.reason is Reason.CLOCK_UNSYNCED else ""
            if d.reason is Reason.NO_CONSENT and self.rules.error:
                why = f" ({self.rules.error}; doorbell-agent consent show says how to fix it)"
            if listed is not None:
                log.info("request %s from %s refused: %s%s", req.jti, req.iss, d.reason, why)
            else:  # not one journal line per copy either
                c.refusals_counted += 1
                log.debug("request %s from %s refused: %s%s (counted, not listed)", req.jti, req.iss, d.reason, why)
        return d

    def _decision_loop(self) -> None:
        next_chores = next_status = 0.0
        pace = _Pacer(self.transport.unread_bytes)
        while not self._stop.is_set():
            msg = self.transport.get(timeout=0.5)
            if msg is not None:
                decision = None
                try:
                    decision = self.handle(msg.payload)
                except Exception as exc:  # a bug or a full disk must not stop the agent from hearing the next request
                    self.counters.handler_errors += 1
                    if is_disk_full(exc):
                        log.error("THE DISK IS FULL: a request could not be written to the access log or the replay "
                                  "memory (%s), so nothing was shared; it stays in the inbox and is decided again "
                                  "at the next start. Free some space on the disk.", exc)
                    else:
                        log.exception("error while handling a request; nothing was shared, it stays in the inbox "
                                      "and is decided again at the next start")
                else:
                    self.transport.ack(msg)  # only once the outcome is on disk: the inbox may forget it
                if self.on_decision:
                    self.on_decision(decision)
                pace.after_message()
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
            # Not while the clock is unsynced or behind a time already acted on; and with a margin, so nothing
            # purged can be valid again at a time the decision accepts. A purge raises the replay memory's
            # high-water mark: a clock stepped forward and then back is noticed (LiveState.clock_synced).
            if self.state.clock_synced:
                self.replay.purge(now, margin_s=CLOCK_BACK_TOLERANCE_S)
                self.replay.note_time(now)  # a later step back is noticed even if no request comes meanwhile
        except Exception:
            log.exception("housekeeping failed; it will be tried again")

    def _deliver_approved(self, item: PendingApproval, now: datetime) -> None:
        """The homeowner said yes: check the rules again, then deliver. Safe to repeat after a crash.

        The window delivered is the re-check's at approval time (footage that aged past ``max_age_s``
        while the request waited is no longer shared), never more than the window the resident saw
        and approved; it is recorded in the ``approved`` event the manifest points to.
        """
        if not self.outbox.has(item.jti) and self._closing_event(item.jti) is None:
            again = self._recheck(item.raw, now, jti=item.jti)
            if again.transient:
                log.info("request %s was approved; waiting to check it again (%s)", item.jti, again.refused)
                return  # not claimed: tried again at the next chores()
            approved = [e for e in self.accesslog.entries(jti=item.jti) if e.outcome == "approved"]
            held = (item.granted_start, item.granted_end)
            window = narrow(held, again.window) if again.window is not None else None
            if window is not None and approved and isinstance(approved[0].data.get("granted"), dict):
                logged = approved[0].data["granted"]  # a crash after logging the approval: not beyond what it says
                window = narrow(window, (parse_utc_z(logged["start"]), parse_utc_z(logged["end"])))
            if again.refused is not None or window is None:
                reason = again.refused or "outside_consent"
                self.accesslog.append_event(item.jti, "delivery_refused", at=now, reason=reason,
                                            detail="approved, but no longer allowed")
                self.counters.delivery_refused += 1
                log.info("request %s was approved but is no longer allowed (%s); nothing was shared", item.jti, reason)
            else:
                seq, digest = ((approved[0].seq, approved[0].hash) if approved
                               else self.accesslog.append_event(item.jti, "approved", at=now, granted=window))
                job = DeliveryJob(item.jti, new_delivery_id(), item.iss, item.extra["recipient"], window[0], window[1],
                                  seq, digest, raw=bytes(item.raw), granted_at=now, deadline=self._deadline(now, window[0]),
                                  approved=True)
                self.outbox.add(job)
                log.info("request %s approved by you: delivering", item.jti)
                self.delivery.submit(job)
        self.approvals.mark_granted(item.id, now)

    def _new_job(self, d: Decision, payload: bytes, now: datetime) -> DeliveryJob:
        """The outbox job for an immediate grant, written before the grant is logged.

        It keeps the signed request (to decide it again whenever its delivery runs), the grant's
        instant and an absolute deadline that a restart never extends.
        """
        req = d.request
        assert req is not None and d.granted is not None
        return DeliveryJob(req.jti, new_delivery_id(), req.iss, req.recipient.to_jwk(), d.granted[0], d.granted[1],
                           0, "", raw=bytes(payload), granted_at=now, deadline=self._deadline(now, d.granted[0]))

    def _deadline(self, granted_at: datetime, granted_start: datetime) -> datetime:
        return deadline_for(granted_at, granted_start, give_up_s=self.delivery_give_up_s,
                            retention_s=self.cfg.buffer.retention_hours * 3600.0)

    def regrant(self, job: DeliveryJob, now: datetime) -> Regrant:
        """The delivery worker's re-check: the stored request decided again against the rules of ``now``.

        The whole decision runs again on the signed bytes, without the replay check (the jti is used
        up by this very grant), with the trust store, kill switch, consent, limits and footage of this
        moment. The request's own lifetime (``iat``/``exp``) is judged at the grant's instant: it was
        acted on in time, and a delivery delayed by an outage or a restart is bounded by the job's
        deadline instead. A grant the resident approved is not put to the resident again
        (``approval = "auto"``); an immediate grant meets the approval rule of the moment, so a
        resident who now approves each request stops it (``awaiting_resident``: by then the request
        has usually expired, so it is refused rather than held).
        """
        assert job.raw is not None and job.granted_at is not None
        return self._recheck(job.raw, now, jti=job.jti, request_time=job.granted_at,
                             approval="auto" if job.approved else self.policy.approval)

    def _recheck(self, raw: bytes, now: datetime, *, jti: str, request_time: datetime | None = None,
                 approval: Literal["auto", "ask"] = "auto") -> Regrant:
        """Decide ``raw`` again; refused (key revoked, consent withdrawn, limit reached, footage gone...) or a window."""
        trust = self.trust.get()
        if trust is None:
            return Regrant("trust_store_unreadable")
        policy = dataclasses.replace(self.policy, approval=approval)
        d = decide(raw, trust=trust, policy=policy, state=_Regranting(self.state, jti), now=now, request_time=request_time)
        if d.reason is not Reason.GRANTED or d.granted is None:
            return Regrant(str(d.reason))
        return Regrant(None, d.granted)

    def _delivery_event(self, event: str, job: DeliveryJob, details: dict[str, Any]) -> None:
        if self.delivery_events is not None:
            self.delivery_events(event, job, details)

    def _logged(self, jti: str) -> bool:
        """Whether a decision that used up ``jti`` is on the record (step 12: refusals by checks 1-11 do not).

        On the record means an entry, or a refusal over the hourly limit that was counted instead
        (``AccessLog.record_refusal``): either way an identical copy is a duplicate, never decided afresh,
        or a request refused while the kill switch was on could be granted once it is off.
        """
        return (any(e.type == "decision" and e.outcome not in _BEFORE_REPLAY for e in self.accesslog.entries(jti=jti))
                or self.accesslog.decided_unlisted(jti))

    def _closing_event(self, jti: str) -> str | None:
        for e in self.accesslog.entries(jti=jti):
            if e.outcome in ("delivered", "delivery_cut", "delivery_failed", "delivery_refused"):
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

    # ---- status

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"counters": self.counters.__dict__.copy(), "pending_deliveries": self.delivery.pending,
                               "transport": self.transport.status()}
        out["trust_store_error"] = self.trust.error
        out["consent_file_error"] = self.rules.error
        return out

    def write_status(self, *, stopped: bool = False) -> None:
        try:
            write_json_atomic(self.cfg.paths.service_status_file,
                              {**self.status(), "pid": os.getpid(), "updated_us": to_us(datetime.now(UTC)),
                               "status_interval_s": STATUS_INTERVAL_S, "stopped": stopped,
                               "started_us": to_us(self.started_at) if self.started_at else None})
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
                              client_id=default_client_id(key.kid, subscription, key.client_id_secret()),
                              session_file=cfg.paths.data_dir / MQTT_SESSION_FILE)
    log.info("listening for requests on %s:%d, topic %s", mqtt_cfg.host, mqtt_cfg.port, transport.subscription)
    svc = RequestService(cfg, transport=transport, device_key=key)
    svc.start()
    return svc
