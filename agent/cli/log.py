"""``doorbell-agent log show|verify|checkpoint|export|summary``: read, check and hand over the access log.

``verify`` never takes the device key from the log: it checks signatures against the thumbprint
pinned beside the database (``device-key.thumbprint``), or the one given with ``--device-key``, and
fails when it has neither. With ``--bundle`` it reads an exported file and needs no device, no
configuration and no state: an auditor runs it on their own machine.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any

from agent.cli.common import add_json_flag, config_from, print_json
from agent.config import AgentConfig
from agent.display import safe_text
from agent.errors import UserError
from agent.fsutil import read_status, write_atomically
from agent.state.accesslog import REFUSALS_LISTED_PER_AGENCY_PER_HOUR, AccessLog, AccessLogError
from agent.state.devicekey import DeviceKey, DeviceKeyError
from agent.state.logtext import CHANGE_WORDS as _CHANGE_WORDS
from agent.state.logtext import REFUSAL_WORDS as _REFUSAL_WORDS
from agent.state.logtext import entry_lines as _entry_lines
from agent.state.logtext import entry_words as _entry_words
from agent.state.logverify import Problem, TailRules, VerifyReport, is_thumbprint, verify_bundle, verify_rows
from agent.state.pin import PinError, pin_path, read_pin, signing_key
from agent.timeutil import (
    format_local,
    local_zone,
    parse_user_time,
    parse_utc_z,
)


def register(sub: argparse._SubParsersAction) -> None:
    log = sub.add_parser("log", help="see, check and export the access log of every request")
    lsub = log.add_subparsers(dest="log_command", metavar="ACTION", required=True)
    show = lsub.add_parser("show", help="list the requests, what happened to them, and your own changes")
    show.add_argument("--since", metavar="TIME", help="only entries from this local time on, e.g. '2026-12-03 10:00' or '10:00'")
    add_json_flag(show)
    show.set_defaults(func=_log_show)
    ver = lsub.add_parser(
        "verify", help="check that no entry or checkpoint was changed, removed, inserted or reordered",
        description="Exit 0: the log checks out. Exit 1: a problem was found (each is named). Exit 2: the check could not run.",
    )  # fmt: skip
    ver.add_argument("--bundle", metavar="FILE", type=Path,
                     help="check an exported bundle (from 'log export') instead of this device's log; needs --device-key")
    ver.add_argument("--device-key", metavar="THUMBPRINT",
                     help="the device's thumbprint as you know it (from 'status', or the kid of a manifest), "
                          "instead of the one pinned on this device")
    ver.add_argument("--witness", metavar="MANIFEST", type=Path, nargs="+", default=[],
                     help="delivery manifests (the .manifest.jws files agencies keep): the log must match what the "
                          "device signed in each")
    add_json_flag(ver)
    ver.set_defaults(func=_log_verify)
    cp = lsub.add_parser("checkpoint", help="have the device sign the log's current end now")
    add_json_flag(cp)
    cp.set_defaults(func=_log_checkpoint)
    exp = lsub.add_parser("export", help="write the whole log to one file an auditor can check anywhere")
    exp.add_argument("-o", "--output", required=True, metavar="FILE", help="file to write, or - for standard output")
    exp.add_argument("--output-name", help=argparse.SUPPRESS)  # the installed command's FILE, written from -o -
    exp.add_argument("--format", choices=("jsonl", "csv"), default="jsonl",
                     help="jsonl (default): the verifiable bundle; csv: a spreadsheet copy, NOT verifiable")
    exp.add_argument("--force", action="store_true", help="replace FILE if it already exists")
    exp.set_defaults(func=_log_export)
    summ = lsub.add_parser("summary", help="a transparency report: requests by agency, grants, refusals, minutes shared")
    summ.add_argument("--days", type=int, default=30, metavar="N", help="the last N days (default 30)")
    add_json_flag(summ)
    summ.set_defaults(func=_log_summary)


def _open_log(cfg: AgentConfig, device_key: DeviceKey | None = None) -> AccessLog | None:
    if not cfg.paths.state_db.exists():
        return None
    try:
        return AccessLog(cfg.paths.state_db, device_key=device_key)
    except OSError as exc:
        raise UserError(f"cannot open the access log {cfg.paths.state_db} ({exc}); run as the agent's user or with sudo") from None
    except Exception as exc:  # sqlite3.Error: a damaged or foreign file
        raise UserError(f"cannot open the access log {cfg.paths.state_db}: {exc}") from None


def _log_show(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    tz = local_zone()
    since = parse_user_time(args.since, field="--since", tz=tz) if args.since else None
    log = _open_log(cfg)
    entries = log.entries(since) if log else []
    counts = log.rejection_counts(since) if log else []
    # Counted, not listed (AccessLog.record_refusal): copies of a listed request, and refusals beyond the hourly limit.
    copies = log.more_copies(entries) if log else {}
    not_listed = log.refusals_not_listed(since) if log else []
    if log:
        log.close()
    if args.json:
        print_json({
            "entries": [{**e.to_json(), "more_copies": copies.get(e.seq, 0)} if e.type == "decision" else e.to_json()
                        for e in entries],
            "rejected_before_authentication": counts,
            "refused_not_listed": not_listed,
            "refusals_listed_per_agency_per_hour": REFUSALS_LISTED_PER_AGENCY_PER_HOUR,
        })  # fmt: skip
        return 0
    if not entries:
        print("No requests in the access log" + (f" since {format_local(since, tz)}." if since else " yet."))
    for e in entries:
        lines = _entry_lines(e, tz)
        if copies.get(e.seq):
            n = copies[e.seq]
            lines.append(f"      and {n:,} more cop{'y' if n == 1 else 'ies'} of this request, refused the same way "
                         "(counted, not listed)")
        print("\n".join(safe_text(line) for line in lines))  # agency text cannot reorder or split a line
    if not_listed:
        print(f"Refusals counted, not listed (beyond {REFUSALS_LISTED_PER_AGENCY_PER_HOUR} per agency in an hour):")
        for line in _not_listed_lines(not_listed, tz):
            print(safe_text(line))
    if counts:
        totals: dict[str, int] = {}
        for c in counts:
            totals[c["reason"]] = totals.get(c["reason"], 0) + c["count"]
        parts = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in sorted(totals.items()))
        print(f"Messages ignored before any signature check (counted, not listed): {parts}.")
    return 0


def _not_listed_lines(rows: list[dict[str, Any]], tz: tzinfo) -> list[str]:
    """One line per hour and agency: how many refusals were only counted, and why."""
    grouped: dict[tuple[str, str], dict[str, int]] = {}
    for r in rows:
        by_reason = grouped.setdefault((r["hour"], r["iss"]), {})
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + int(r["count"])
    out = []
    for (hour, iss), by_reason in grouped.items():
        start = parse_utc_z(hour)
        total = sum(by_reason.values())
        why = ", ".join(f"{n:,} x {_REFUSAL_WORDS.get(reason, reason)}"
                        for reason, n in sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0])))
        out.append(f"  {format_local(start, tz)} to {format_local(start + timedelta(hours=1), tz)}: {iss}, "
                   f"{total:,} more ({why})")
    return out


# ------------------------------------------------------------------------------ verify


def _thumbprint_arg(value: str) -> str:
    value = value.strip()
    if not is_thumbprint(value):
        raise UserError(
            f"--device-key {value!r} is not a device thumbprint: it is 43 characters of letters, digits, - and _ "
            "(shown by 'doorbell-agent status' on the device, and the kid of every delivery manifest)"
        )
    return value


def _read_witnesses(paths: list[Path]) -> list[tuple[str, str]]:
    out = []
    for p in paths:
        try:
            out.append((str(p), p.read_text(encoding="ascii", errors="replace")))
        except OSError as exc:
            raise UserError(f"--witness {p}: cannot read it ({exc.strerror or exc}); give the .manifest.jws file an agency kept") from None
    return out


def _agent_running(cfg: AgentConfig) -> bool:
    """Whether the sharing service is alive now: its status file is fresh and its process exists."""
    st = read_status(cfg.paths.service_status_file)
    if st is None:
        return False
    try:
        age_s = datetime.now(UTC).timestamp() - int(st.get("updated_us", 0)) / 1e6
        fresh = age_s <= 3 * float(st.get("status_interval_s") or 5.0) + 5
        pid = int(st.get("pid", 0))
    except (TypeError, ValueError):
        return False
    if not fresh or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _device_thumbprint(cfg: AgentConfig, given: str | None) -> tuple[str | None, str, list[str], list[str]]:
    """(thumbprint to check against, where it came from, problems, notes): the pin, the key file and ``--device-key``."""
    pin_file = pin_path(cfg.paths.data_dir)
    key_file = cfg.paths.device_key_file
    problems: list[str] = []
    notes: list[str] = []
    try:
        pinned = read_pin(pin_file)
    except PinError as exc:
        pinned = None
        problems.append(str(exc))
    key_kid = None
    if key_file.exists():
        try:
            key_kid = DeviceKey.load(key_file).kid
        except DeviceKeyError as exc:
            notes.append(f"the device key cannot be used ({exc})")
    if given is not None:
        if pinned is not None and pinned != given:
            problems.append(f"the thumbprint you gave ({given}) is not the one pinned on this device ({pinned}, in {pin_file}): "
                            "the pin was changed, or the thumbprint you have is another device's")
        if key_kid is not None and key_kid != given:
            problems.append(f"the device key file {key_file} (thumbprint {key_kid}) is not the key you gave ({given}): "
                            "it was replaced; restore the original from your backup")
        return given, "given with --device-key", problems, notes
    if pinned is not None:
        if key_kid is not None and key_kid != pinned:
            problems.append(f"the device key file {key_file} (thumbprint {key_kid}) is not the pinned key ({pinned}, in "
                            f"{pin_file}): it was replaced or the pin was edited; signatures were checked against the pin. "
                            "Restore the original device-key.pem from your backup")
        if not key_file.exists():
            notes.append(f"the device key {key_file} is missing: signatures were checked against the pinned thumbprint, "
                         "and nothing can be signed or shared until the key is restored")
        return pinned, f"pinned in {pin_file}", problems, notes
    if not problems:
        if key_kid is not None:
            problems.append(
                f"the device's thumbprint is not pinned ({pin_file} is missing), so its signatures cannot be checked "
                "against a key from outside the log. If you know this device's thumbprint (status showed it, or an "
                "agency's manifest names it as kid), run: doorbell-agent log verify --device-key THUMBPRINT. "
                f"The key file now on the device has thumbprint {key_kid}; starting the agent pins it"
            )
        else:
            problems.append(
                f"neither the device's pinned thumbprint ({pin_file}) nor its key ({key_file}) is there, so the log's "
                "signatures cannot be checked. Give the thumbprint you know (from status, or the kid of a manifest): "
                "doorbell-agent log verify --device-key THUMBPRINT"
            )
    return None, "none", problems, notes


def _log_verify(args: argparse.Namespace) -> int:
    witnesses = _read_witnesses(args.witness)
    if args.bundle is not None:
        return _verify_bundle(args, witnesses)
    cfg = config_from(args)
    tz = local_zone()
    given = _thumbprint_arg(args.device_key) if args.device_key else None
    kid, source, key_problems, key_notes = _device_thumbprint(cfg, given)
    running = _agent_running(cfg)
    tail: TailRules | None = TailRules("running" if running else "stopped", now=datetime.now(UTC))
    log = _open_log(cfg)
    try:
        counts = log.counts_by_type() if log else {}
        checkpoints = len(log.checkpoints()) if log else 0
        pinned = pin_path(cfg.paths.data_dir).exists()
        never_shared = (kid is None and not pinned and checkpoints == 0
                        and not counts.get("decision") and not counts.get("event"))
        if never_shared:
            # A fresh or recording-only install: the sharing service never ran, so nothing is pinned and nothing
            # signed; nothing was decided or shared. The resident's own changes are signed once it first starts.
            key_problems, tail = [], None
            if counts.get("resident"):
                key_notes.append(f"the sharing service has never run here, so nothing is signed yet: your "
                                 f"{counts['resident']} change(s) are recorded and are signed when it first starts")
        elif pinned and checkpoints == 0 and kid is not None and tail is not None and tail.mode == "stopped":
            key_problems.append(
                "this device's key was pinned, so the device has signed this log before, but the log holds no signed "
                "checkpoint at all: the log was deleted or replaced (or its checkpoints were)"
            )
        if log is not None:
            report = log.verify(kid, tail=tail, witnesses=witnesses, tz=tz)
        else:
            report = verify_rows(iter(()), [], kid, tail=tail, witnesses=witnesses, tz=tz)
    finally:
        if log is not None:
            log.close()
    if key_problems:
        report.problems = [p for p in report.problems if p.kind != "device_key"]
        report.problems[:0] = [Problem(None, "device_key", why.rstrip(".") + ".") for why in key_problems]
    report.notes.extend(key_notes)
    if tail is not None and tail.mode == "running":
        report.notes.append("the agent is running")
    return _print_report(report, args, source, tz)


def _verify_bundle(args: argparse.Namespace, witnesses: list[tuple[str, str]]) -> int:
    if not args.device_key:
        raise UserError(
            "--bundle needs --device-key THUMBPRINT: the device's thumbprint as you know it from outside the bundle "
            "(the homeowner's 'doorbell-agent status', or the kid of a delivery manifest); the key inside the bundle "
            "proves nothing by itself"
        )
    kid = _thumbprint_arg(args.device_key)
    try:
        data = sys.stdin.buffer.read() if str(args.bundle) == "-" else args.bundle.read_bytes()
    except OSError as exc:
        raise UserError(f"--bundle {args.bundle}: cannot read it ({exc.strerror or exc})") from None
    tz = local_zone()
    report = verify_bundle(data, kid, witnesses=witnesses, tz=tz)
    return _print_report(report, args, "given with --device-key", tz, bundle=args.bundle)


def _print_report(report: VerifyReport, args: argparse.Namespace, source: str, tz: tzinfo, *, bundle: Path | None = None) -> int:
    what = f"The bundle {bundle}" if bundle is not None else "The access log"
    if args.json:
        print_json({**report.to_json(), "device_key_source": source, "bundle": str(bundle) if bundle else None})
        return 0 if report.ok else 1
    if report.ok:
        if report.entries == 0 and report.checkpoints == 0:
            print(f"{what} is empty: no request has been decided yet.")
        else:
            last = report.last_checkpoint
            newest = ""
            if last and last.get("at"):
                newest = f", the newest on {format_local(parse_utc_z(last['at']), tz)} covering entry {last['seq']}"
            cps = f"{report.checkpoints} signed checkpoint(s){newest}" if report.checkpoints else "no signed checkpoint"
            print(f"{what} is intact: {report.entries} entries, {cps}.")
            if report.device_key:
                print(f"Checked against the device key {report.device_key} ({source}).")
        for w in report.witnesses:
            print(f"Manifest {w['file']} matches entry {w['seq']} (request {w['jti']}).")
    else:
        problems = report.sorted_problems()
        first = problems[0]
        headline = "has been tampered with" if first.tampering else "cannot be vouched for"
        print(f"{what} {headline}: {first.message}")
        for p in problems[1:6]:
            print(f"Also: {p.message}")
        if len(problems) > 6:
            print(f"({len(problems) - 6} further problem(s); see --json.)")
        if report.device_key is not None and report.first_bad_seq is not None:
            good = report.first_bad_seq - 1
            if good > 1:
                print(f"Entries 1 to {good} check out.")
            elif good == 1:
                print("Entry 1 checks out.")
            else:
                print("No entry before it can be vouched for.")
    for note in report.notes:
        print(f"Note: {note}.")
    return 0 if report.ok else 1


# ------------------------------------------------------------------ checkpoint, export


def _log_checkpoint(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    if not cfg.paths.state_db.exists():
        raise UserError("there is no access log yet; nothing to sign")
    key, why = signing_key(cfg.paths.data_dir, cfg.paths.device_key_file)
    if key is None:
        raise UserError(f"signing a checkpoint needs the device key: {why}")
    log = _open_log(cfg, key)
    if log is None:
        raise UserError("there is no access log yet; nothing to sign")
    try:
        cp = log.checkpoint()
    finally:
        log.close()
    if args.json:
        print_json(cp.to_json())
        return 0
    print(f"The device signed the access log up to entry {cp.seq} at {format_local(cp.at, local_zone())}.")
    return 0


def _output_path(args: argparse.Namespace) -> Path | None:
    if args.output == "-":
        return None
    out = Path(args.output).expanduser()
    if out.is_dir():
        raise UserError(f"-o {args.output} is a folder; give a file name such as {out / 'access-log.jsonl'}")
    if not out.parent.is_dir():
        raise UserError(f"-o {args.output}: the folder {out.parent} does not exist; create it or pick another file")
    if out.exists() and not args.force:
        raise UserError(f"-o {args.output} already exists; pick another name or add --force to replace it")
    return out


def _write_output(out: Path | None, data: bytes, args: argparse.Namespace) -> None:
    if out is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    try:
        write_atomically(out, data, 0o644)
    except OSError as exc:
        raise UserError(f"-o {args.output}: cannot write there ({exc.strerror or exc}); pick a folder you may write to") from None


def _log_export(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    tz = local_zone()
    out = _output_path(args)
    say = sys.stderr if out is None else sys.stdout  # with -o -, standard output is the file
    if args.format == "csv":
        log = _open_log(cfg)
        if log is None:
            raise UserError("there is no access log yet; nothing to export")
        try:
            text = log.export_csv(lambda e: (format_local(e.at, tz), _entry_words(e)))
        finally:
            log.close()
        _write_output(out, text.encode("utf-8"), args)
        print(f"Wrote a spreadsheet copy of the access log to {args.output_name or args.output}. It is for reading only and cannot be "
              "verified; for an auditor, export the bundle (without --format csv).", file=say)
        return 0
    if not cfg.paths.state_db.exists():
        raise UserError("there is no access log yet; nothing to export")
    key, why = signing_key(cfg.paths.data_dir, cfg.paths.device_key_file)
    if key is None:
        raise UserError(f"exporting a verifiable bundle needs the device key: {why}. Run it as the agent's user (the "
                        "installed doorbell-agent command does), or use --format csv for a copy you can read but not verify")
    log = _open_log(cfg, key)
    if log is None:
        raise UserError("there is no access log yet; nothing to export")
    try:
        data = log.export_bundle()
    except AccessLogError as exc:
        raise UserError(f"cannot export the access log: {exc}") from None
    finally:
        log.close()
    _write_output(out, data, args)
    lines = data.count(b"\n")
    print(f"Wrote the access log bundle ({lines} lines) to {args.output_name or args.output}, signed by this device "
          f"(thumbprint {key.kid}).", file=say)
    print(f"To check it on any computer: doorbell-agent log verify --bundle {args.output_name or args.output} --device-key {key.kid}", file=say)
    return 0


# ------------------------------------------------------------------------------ summary


def _log_summary(args: argparse.Namespace) -> int:
    if args.days < 1:
        raise UserError(f"--days {args.days}: give a number of days, 1 or more")
    cfg = config_from(args)
    tz = local_zone()
    until = datetime.now(UTC)
    since = until - timedelta(days=args.days)
    log = _open_log(cfg)
    if log is None:
        s: dict[str, Any] = {"since": None, "until": None, "requests": 0, "agencies": {}, "granted": 0,
                             "granted_by_rules": 0, "approved_by_you": 0, "waiting_or_held": 0, "refused": 0,
                             "refused_by_reason": {}, "deliveries": 0, "deliveries_cut": 0, "deliveries_failed": 0,
                             "minutes_shared": 0.0, "your_changes": {}, "ignored_before_authentication": 0,
                             "more_copies": 0, "refused_not_listed": 0, "refused_not_listed_by_reason": {},
                             "refused_not_listed_by_agency": {},
                             "refusals_listed_per_agency_per_hour": REFUSALS_LISTED_PER_AGENCY_PER_HOUR}
    else:
        try:
            s = log.summary(since, until)
        finally:
            log.close()
    s["days"] = args.days
    if args.json:
        print_json(s)
        return 0
    print(f"Transparency report for the last {args.days} day(s): {format_local(since, tz, seconds=False)} "
          f"to {format_local(until, tz, seconds=False)}.")
    n_agencies = len([a for a in s["agencies"].values() if a["requests"]])
    if not s["requests"]:
        print("No agency asked for footage in this period.")
    else:
        print(f"Requests: {s['requests']} from {n_agencies} agenc{'y' if n_agencies == 1 else 'ies'}.")
        for iss, a in sorted(s["agencies"].items(), key=lambda kv: (-kv[1]["requests"], kv[0])):
            print(f"  {iss}: {a['requests']} request(s), {a['granted']} granted, {a['refused']} refused")
    print(f"Granted: {s['granted']} ({s['granted_by_rules']} by your rules at once, {s['approved_by_you']} approved by you).")
    if s["refused"]:
        print(f"Refused: {s['refused']}.")
        for reason, n in sorted(s["refused_by_reason"].items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"  {n} x {_REFUSAL_WORDS.get(reason, reason)}")
    else:
        print("Refused: none.")
    counted = []
    if s["more_copies"]:
        counted.append(f"{s['more_copies']:,} more cop{'y' if s['more_copies'] == 1 else 'ies'} of requests listed above, "
                       "refused the same way")
    if s["refused_not_listed"]:
        agencies = ", ".join(f"{iss} {n:,}" for iss, n in sorted(s["refused_not_listed_by_agency"].items()))
        counted.append(f"{s['refused_not_listed']:,} refusals beyond {s['refusals_listed_per_agency_per_hour']} per agency "
                       f"in an hour ({agencies})")
    if counted:
        print(safe_text("Also refused, counted but not listed one by one: " + "; ".join(counted) + "."))
    minutes = s["minutes_shared"]
    print(f"Footage shared: {minutes:g} minute(s) in {s['deliveries']} completed deliver{'y' if s['deliveries'] == 1 else 'ies'}"
          + (f"; {s['deliveries_cut']} stopped by your kill switch" if s["deliveries_cut"] else "")
          + (f"; {s['deliveries_failed']} failed or no longer allowed" if s["deliveries_failed"] else "") + ".")
    if s["your_changes"]:
        words = ", ".join(f"{_CHANGE_WORDS.get(k, k)} ({n}x)" for k, n in sorted(s["your_changes"].items()))
        print(f"Your changes: {words}.")
    if s["ignored_before_authentication"]:
        print(f"Messages ignored before any signature check: {s['ignored_before_authentication']}.")
    print("Check that the log behind these figures is intact: doorbell-agent log verify")
    return 0
