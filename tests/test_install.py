"""install.sh: the whole system install into a scratch root (``--root DIR``), twice.

Every file it makes is checked with its owner and mode, the second run must change nothing, uninstall keeps
the resident's configuration and data unless ``--purge``, the checkout is left as it was, unsupported systems
are refused with the reason, and the script (and the scripts it writes) are ``shellcheck`` clean.

``shellcheck`` and ``useradd`` come from Debian packages ``./install.sh --dev`` installs (shellcheck, passwd).
The system install sets owners, so these tests run as root, as CI does.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / "install.sh"
PREFIX = "opt/doorbell-agent"

pytestmark = pytest.mark.slow

ANSWERS = ["--unattended", "--program", "jackson-ms/camera-pilot-2026", "--lat", "32.29876", "--lon", "-90.18481",
           "--timezone", "America/Chicago", "--broker", "broker.example.org:8883",
           "--consent-start", "2026-11-20T00:00:00Z", "--consent-end", "2027-01-04T00:00:00Z"]

# Everything outside the venv's own files: (kind, mode, owner, group); owner names from DIR/etc/passwd.
EXPECTED = {
    "etc/doorbell-agent": ("d", 0o750, "root", "doorbell-agent"),
    "etc/doorbell-agent/agent.toml": ("f", 0o640, "root", "doorbell-agent"),
    "var/lib/doorbell-agent": ("d", 0o700, "doorbell-agent", "doorbell-agent"),
    "etc/systemd/system/doorbell-agent.service": ("f", 0o644, "root", "root"),
    "usr/local/bin/doorbell-agent": ("f", 0o755, "root", "root"),
    "usr/local/bin/doorbell-city": ("l", None, "root", "root"),
    f"{PREFIX}": ("d", 0o755, "root", "root"),
    f"{PREFIX}/README.md": ("f", 0o644, "root", "root"),
    f"{PREFIX}/.installed-record-sha256": ("f", 0o644, "root", "root"),
    f"{PREFIX}/libexec": ("d", 0o755, "root", "root"),
    f"{PREFIX}/libexec/doorbell-agent-as-service": ("f", 0o755, "root", "root"),
    f"{PREFIX}/share": ("d", 0o755, "root", "root"),
    f"{PREFIX}/share/doorbell-agent.sudoers": ("f", 0o644, "root", "root"),
}
VENV_PARTS = {"bin", "lib", "lib64", "include", "pyvenv.cfg", "share/man"}
SEEDED = {"etc", "etc/passwd", "etc/group", "etc/shadow", "etc/gshadow", "etc/passwd-", "etc/group-", "etc/shadow-",
          "etc/gshadow-", "etc/.pwd.lock", "etc/os-release", "etc/systemd", "etc/systemd/system", "usr", "usr/local",
          "usr/local/bin", "var", "var/lib", "opt"}


def _need_root() -> None:
    assert os.geteuid() == 0, "the system install sets owners: run these tests as root (CI does)"
    assert shutil.which("shellcheck") and shutil.which("useradd"), "run ./install.sh --dev (shellcheck, passwd)"


def _install(root: Path, *args: str, env: dict[str, str] | None = None,
             checkout: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(checkout / "install.sh"), "--root", str(root), *args], capture_output=True,
                          text=True, timeout=900, env={**os.environ, **(env or {})})


def _copy_checkout(dest: Path) -> Path:
    """A still copy of the checkout (others may edit the real one while the install runs)."""
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(".git", ".venv", "*_cache", "__pycache__", "tests"))
    return dest


def _seed(root: Path, os_release: str = 'ID=debian\nVERSION_ID="12"\nVERSION_CODENAME=bookworm\n') -> None:
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc/os-release").write_text(os_release)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\nvideo:x:44:\ngpio:x:997:\n")
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    (root / "etc/gshadow").write_text("root:*::\nvideo:*::\ngpio:*::\n")


def _names(root: Path, file: str) -> dict[int, str]:
    return {int(f[2]): f[0] for f in (line.split(":") for line in (root / "etc" / file).read_text().splitlines())}


def _snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Every path: kind, mode, owner, group and content (or link target)."""
    out: dict[str, tuple[object, ...]] = {}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        rel = str(path.relative_to(root))
        if stat.S_ISLNK(st.st_mode):
            what: object = os.readlink(path)
        elif stat.S_ISREG(st.st_mode):
            what = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            what = None
        out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, what)
    return out


def _checkout_state(checkout: Path) -> set[str]:
    return {str(p.relative_to(checkout)) for p in checkout.rglob("*")}


@pytest.fixture(scope="module")
def installed() -> Iterator[dict[str, object]]:
    _need_root()
    # Not under pytest's own temporary folder, which it keeps private to root: the installed venv must be
    # reachable by another user (test_installed_command_writes_and_reads_files_as_the_resident).
    base = Path(tempfile.mkdtemp(prefix="doorbell-install-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield _install_twice(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _install_twice(base: Path) -> dict[str, object]:
    root, checkout = base / "root", _copy_checkout(base / "checkout")
    _seed(root)
    before = _checkout_state(checkout)
    first = _install(root, *ANSWERS, checkout=checkout)
    assert first.returncode == 0, first.stdout + first.stderr
    snap1 = _snapshot(root)
    second = _install(root, *ANSWERS, checkout=checkout)
    assert second.returncode == 0, second.stdout + second.stderr
    return {"root": root, "first": first, "second": second, "snap1": snap1, "snap2": _snapshot(root),
            "checkout_before": before, "checkout_after": _checkout_state(checkout)}


def test_every_file_owner_and_mode(installed: dict[str, object]) -> None:
    root = installed["root"]
    assert isinstance(root, Path)
    users, groups = _names(root, "passwd"), _names(root, "group")
    seen = set()
    for path in [root, *root.rglob("*")]:
        rel = str(path.relative_to(root)) if path != root else ""
        if rel in ("", *SEEDED) or any(rel == f"{PREFIX}/{p}" or rel.startswith(f"{PREFIX}/{p}/") for p in VENV_PARTS):
            continue
        assert rel in EXPECTED, f"install.sh made {rel}, which this test does not know: add it to EXPECTED"
        kind, mode, owner, group = EXPECTED[rel]
        st = path.lstat()
        assert {"d": stat.S_ISDIR, "f": stat.S_ISREG, "l": stat.S_ISLNK}[kind](st.st_mode), rel
        if mode is not None:
            assert stat.S_IMODE(st.st_mode) == mode, f"{rel}: mode {stat.S_IMODE(st.st_mode):o}, expected {mode:o}"
        assert (users.get(st.st_uid), groups.get(st.st_gid)) == (owner, group), rel
        seen.add(rel)
    assert seen == set(EXPECTED)
    assert os.readlink(root / "usr/local/bin/doorbell-city") == f"/{PREFIX}/bin/doorbell-city"


def test_service_user(installed: dict[str, object]) -> None:
    root = installed["root"]
    assert isinstance(root, Path)
    entry = next(line for line in (root / "etc/passwd").read_text().splitlines() if line.startswith("doorbell-agent:"))
    name, _, uid, _, _, home, shell = entry.split(":")
    assert int(uid) < 1000 and home == "/var/lib/doorbell-agent" and shell == "/usr/sbin/nologin"
    groups = {g.split(":")[0] for g in (root / "etc/group").read_text().splitlines()
              if "doorbell-agent" in g.split(":")[3].split(",")}
    assert {"video", "gpio"} <= groups


def test_venv_is_root_owned_and_not_writable_by_others(installed: dict[str, object]) -> None:
    root = installed["root"]
    assert isinstance(root, Path)
    for path in [root / PREFIX, *(root / PREFIX).rglob("*")]:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        assert st.st_uid == 0 and st.st_gid == 0, path
        assert not st.st_mode & 0o022, f"{path} is writable by group or others"
    # Its scripts name the Python where it will be once DIR is /, not the scratch directory.
    assert (root / PREFIX / "bin/doorbell-agent").read_text().startswith(f"#!/{PREFIX}/bin/python")


def test_second_run_changes_nothing(installed: dict[str, object]) -> None:
    assert installed["snap1"] == installed["snap2"]
    second = installed["second"]
    assert isinstance(second, subprocess.CompletedProcess)
    assert "already this version" in second.stdout
    assert "keeping your configuration" in second.stdout


def test_builds_outside_the_checkout(installed: dict[str, object]) -> None:
    new = set(installed["checkout_after"]) - set(installed["checkout_before"])  # type: ignore[call-overload]
    assert not new, f"install.sh left {new} in the checkout"


def test_installed_agent_runs_and_accepts_the_answers(installed: dict[str, object]) -> None:
    root = installed["root"]
    assert isinstance(root, Path)
    py = root / PREFIX / "bin/python"
    version = subprocess.run([str(py), "-m", "agent", "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and "doorbell-agent" in version.stdout, version.stderr
    cfg = root / "etc/doorbell-agent/agent.toml"
    data = root / "var/lib/doorbell-agent"
    check = subprocess.run([str(py), "-m", "agent", "--config", str(cfg), "config", "check", "--json"],
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, "DOORBELL_AGENT_PATHS__DATA_DIR": str(data)})
    assert check.returncode == 0, check.stdout + check.stderr
    assert '"program": "jackson-ms/camera-pilot-2026"' in check.stdout
    assert '"host": "broker.example.org"' in check.stdout


def test_shellcheck_clean(installed: dict[str, object]) -> None:
    root = installed["root"]
    assert isinstance(root, Path)
    scripts = [INSTALL, root / "usr/local/bin/doorbell-agent", root / PREFIX / "libexec/doorbell-agent-as-service"]
    proc = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_uninstall_keeps_configuration_and_data_unless_purge(installed: dict[str, object], tmp_path: Path) -> None:
    root = tmp_path / "root"
    src = installed["root"]
    assert isinstance(src, Path)
    venv = str(src / PREFIX)
    shutil.copytree(src, root, symlinks=True,  # the venv's libraries are large and play no part here
                    ignore=lambda d, names: {"lib", "lib64"} & set(names) if d == venv else set())
    (root / "var/lib/doorbell-agent/device-key.pem").write_text("key")
    out = _install(root, "--uninstall")
    assert out.returncode == 0, out.stderr
    for gone in (PREFIX, "usr/local/bin/doorbell-agent", "usr/local/bin/doorbell-city",
                 "etc/systemd/system/doorbell-agent.service"):
        assert not (root / gone).exists() and not (root / gone).is_symlink(), gone
    assert (root / "etc/doorbell-agent/agent.toml").exists()
    assert (root / "var/lib/doorbell-agent/device-key.pem").read_text() == "key"
    assert "kept your configuration" in out.stdout
    again = _install(root, "--uninstall")
    assert again.returncode == 0, again.stderr
    purge = _install(root, "--uninstall", "--purge")
    assert purge.returncode == 0, purge.stderr
    assert not (root / "etc/doorbell-agent").exists() and not (root / "var/lib/doorbell-agent").exists()
    assert "doorbell-agent:" not in (root / "etc/passwd").read_text()


@pytest.mark.parametrize(("os_release", "words"), [
    ('ID=ubuntu\nVERSION_ID="24.04"\nPRETTY_NAME="Ubuntu 24.04 LTS"\n', "is not Debian or Raspberry Pi OS"),
    ('ID=debian\nVERSION_ID="11"\nPRETTY_NAME="Debian GNU/Linux 11 (bullseye)"\n', "older than bookworm"),
    ('ID=raspbian\nVERSION_ID="11"\nPRETTY_NAME="Raspbian GNU/Linux 11 (bullseye)"\n', "older than bookworm"),
])
def test_unsupported_os_is_refused_with_the_reason(tmp_path: Path, os_release: str, words: str) -> None:
    _need_root()
    _seed(tmp_path, os_release)
    out = _install(tmp_path, "--unattended")
    assert out.returncode != 0 and words in out.stderr and "unsupported" in out.stderr, out.stderr
    assert not (tmp_path / PREFIX).exists()


def test_supported_os_variants_pass_the_check(tmp_path: Path) -> None:
    """Raspberry Pi OS and trixie are accepted (the check fails later, on the Python we give it)."""
    _need_root()
    fake = tmp_path / "python3"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    for release in ('ID=raspbian\nVERSION_ID="12"\n', 'ID=debian\nVERSION_ID="13"\n', "ID=debian\nVERSION_CODENAME=trixie\n"):
        root = tmp_path / "root"
        shutil.rmtree(root, ignore_errors=True)
        _seed(root, release)
        out = _install(root, "--unattended", env={"PYTHON": str(fake)})
        assert "unsupported" not in out.stderr, out.stderr
        assert out.returncode != 0 and "older than 3.11" in out.stderr, out.stderr


def test_32_bit_arm_is_refused(tmp_path: Path) -> None:
    _need_root()
    _seed(tmp_path / "root")
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    (fakebin / "uname").write_text("#!/bin/sh\necho armv7l\n")
    (fakebin / "uname").chmod(0o755)
    out = _install(tmp_path / "root", "--unattended", env={"PATH": f"{fakebin}:{os.environ['PATH']}"})
    assert out.returncode != 0 and "32-bit ARM" in out.stderr and "64-bit Raspberry Pi OS" in out.stderr, out.stderr


def test_unattended_program_needs_every_answer(tmp_path: Path) -> None:
    _need_root()
    _seed(tmp_path)
    env = {"PYTHON": "/usr/bin/python3"}
    out = _install(tmp_path, "--unattended", "--program", "x/y", "--lat", "1", env=env)
    # The checks before the code is built are cheap; the answers are checked when the configuration is written.
    assert out.returncode != 0 and "a program needs --lon" in out.stderr, out.stderr


def test_unknown_option_and_purge_without_uninstall() -> None:
    bad = subprocess.run(["bash", str(INSTALL), "--bogus"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown option '--bogus'" in bad.stderr
    purge = subprocess.run(["bash", str(INSTALL), "--purge"], capture_output=True, text=True, timeout=30)
    assert purge.returncode != 0 and "--purge goes with --uninstall" in purge.stderr


STUB = """#!/bin/sh
# Stands in for libexec/doorbell-agent-as-service: records what it was given, acts like the agent with -o -.
printf '%s\\n' "$@" > "$STUB_LOG"
cat > "$STUB_LOG.stdin"
case " $* " in
  *" -o - "*)
    printf 'VIDEO'
    if [ -n "${STUB_FAIL:-}" ]; then echo "doorbell-agent: no footage was recorded then" >&2; exit 2; fi
    echo '{"frames": 3}' >&2 ;;
esac
"""


def _test_wrapper(root: Path, tmp_path: Path, as_service: Path, user: str) -> Path:
    """The installed wrapper, with its service program and user swapped for the test's."""
    wrapper = (root / "usr/local/bin/doorbell-agent").read_text()
    for old, new in (("as_service=$prefix/libexec/doorbell-agent-as-service", f"as_service={as_service}"),
                     ('[ "$(id -un)" = doorbell-agent ]', f'[ "$(id -un)" = {user} ]'),
                     ("runuser -u doorbell-agent --", f"runuser -u {user} --")):
        assert old in wrapper, old
        wrapper = wrapper.replace(old, new)
    path = tmp_path / "doorbell-agent"
    path.write_text(wrapper)
    path.chmod(0o755)
    return path


def test_wrapper_rewrites_file_arguments(installed: dict[str, object], tmp_path: Path) -> None:
    """Files the resident names are opened by the wrapper: inputs go over standard input, outputs come from `-o -`
    into FILE.part, renamed to FILE only on success. (The stub stands in for the agent, run as this same user.)"""
    root = installed["root"]
    assert isinstance(root, Path)
    stub = tmp_path / "as-service"
    stub.write_text(STUB)
    stub.chmod(0o755)
    wrapper = _test_wrapper(root, tmp_path, stub, "$(id -un)")
    log = tmp_path / "stub.log"

    def run(*args: str, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str], str]:
        log.unlink(missing_ok=True)
        out = subprocess.run([str(wrapper), *args], capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL, env={**os.environ, "STUB_LOG": str(log), **env})
        seen = log.read_text().splitlines() if log.exists() else []
        fed = (tmp_path / "stub.log.stdin").read_text() if log.exists() else ""
        return out, seen, fed

    home = tmp_path / "home"
    home.mkdir()
    keys = home / "agency.jwks.json"
    keys.write_text('{"keys": []}')
    out, seen, fed = run("trust", "add", "--force", str(keys))
    assert out.returncode == 0 and seen == ["trust", "add", "--force", "-"] and fed == '{"keys": []}', out
    out, seen, _ = run("status", "--json")
    assert seen == ["status", "--json"]
    out, seen, _ = run("trust", "add", str(home / "nope"))
    assert out.returncode == 2 and "cannot read" in out.stderr and seen == []
    out, seen, fed = run("--config", "/etc/x.toml", "log", "verify", "--bundle", str(keys), "--device-key", "K")
    assert seen == ["--config", "/etc/x.toml", "log", "verify", "--bundle", "-", "--device-key", "K"] and fed == '{"keys": []}'

    window = ["--from", "10:00", "--to", "10:05"]
    for i, form in enumerate((["-o", "porch{}.mp4"], ["--output", "porch{}.mp4"], ["--output=porch{}.mp4"], ["-oporch{}.mp4"])):
        name = f"porch{i}.mp4"
        args = [a.format(i) for a in form]
        out = subprocess.run([str(wrapper), "clip", *window, *args], capture_output=True, text=True, timeout=30,
                             cwd=home, env={**os.environ, "STUB_LOG": str(log)})
        assert out.returncode == 0, out
        assert log.read_text().splitlines() == ["clip", *window, "-o", "-", "--output-name", str(home / name)]
        assert (home / name).read_text() == "VIDEO"
    assert sorted(p.name for p in home.iterdir()) == ["agency.jwks.json", *(f"porch{i}.mp4" for i in range(4))]

    target = home / "porch0.mp4"
    out, seen, _ = run("clip", *window, "-o", str(target))
    assert out.returncode == 2 and "already exists" in out.stderr and seen == []
    out, seen, _ = run("clip", *window, "-o", str(target), "--force", STUB_FAIL="1")
    assert out.returncode == 2 and "no footage" in out.stderr
    assert target.read_text() == "VIDEO" and not list(home.glob("*.part"))  # the old file kept, no half file
    out, _, _ = run("clip", *window, "-o", str(home / "new.mp4"), STUB_FAIL="1")
    assert out.returncode == 2 and not (home / "new.mp4").exists() and not list(home.glob("*.part"))
    out, _, _ = run("clip", *window, "-o", str(home / "j.mp4"), "--json")
    assert out.returncode == 0 and out.stdout == '{"frames": 3}\n' and (home / "j.mp4").read_text() == "VIDEO"
    out, seen, _ = run("clip", *window, "-o", "-")
    assert seen == ["clip", *window, "-o", "-"] and out.stdout == "VIDEO"
    out, seen, _ = run("clip", *window, "-o", str(home / "missing" / "x.mp4"))
    assert out.returncode == 2 and "does not exist" in out.stderr and seen == []
    out, seen, _ = run("log", "export", "-o", str(home / "log.jsonl"))
    assert seen == ["log", "export", "-o", "-", "--output-name", str(home / "log.jsonl")]
    assert (home / "log.jsonl").read_text() == "VIDEO"


def test_installed_command_writes_and_reads_files_as_the_resident(installed: dict[str, object], tmp_path: Path) -> None:
    """Across a real user boundary: the resident (root here) runs the installed wrapper; the agent runs, from the
    installed venv, as another user (nobody, standing in for doorbell-agent) who cannot open the resident's home.
    The clip and the trusted keys still arrive, and the clip belongs to the resident."""
    from tests import protocol_signing as ps
    from tests.clipfixtures import BASE_US, decode_clip, record_buffer, stamp

    _need_root()
    root = installed["root"]
    assert isinstance(root, Path)
    import pwd

    nobody = pwd.getpwnam("nobody")
    shared = root / "var/lib/test-service"  # the service's side: its data, its configuration, its program
    data = shared / "data"
    buf = record_buffer(data, seconds=8, gap_s=None)
    cfg = shared / "agent.toml"
    cfg.write_text(f'[paths]\ndata_dir = "{data}"\n\n[camera]\nsource = "synthetic"\nwidth = 320\nheight = 240\nfps = 15\n')
    as_service = shared / "as-service"
    # From /, so that `-m agent` finds the installed package, not a checkout in the working directory.
    as_service.write_text(f'#!/bin/sh\ncd / && exec env PYTHONNOUSERSITE=1 DOORBELL_AGENT_CONFIG={cfg} '
                          f'{root / PREFIX}/bin/python -m agent "$@"\n')
    for p in [shared, *shared.rglob("*")]:
        os.chown(p, nobody.pw_uid, nobody.pw_gid)
    as_service.chmod(0o755)
    home = tmp_path / "home"  # the resident's, private (and under pytest's folder, which only root may enter)
    home.mkdir(mode=0o700)
    wrapper = _test_wrapper(root, tmp_path, as_service, "nobody")
    try:
        window = ["--from", "2026-11-20T14:00:02Z", "--to", "2026-11-20T14:00:05Z"]
        # The agent's user cannot write into the home by itself...
        direct = subprocess.run(["runuser", "-u", "nobody", "--", str(as_service), "clip", *window, "-o", str(home / "x.mp4")],
                                capture_output=True, text=True, timeout=120)
        assert direct.returncode == 2 and "cannot write there" in direct.stderr and not (home / "x.mp4").exists(), direct
        # ...through the installed command it can.
        out = subprocess.run([str(wrapper), "clip", *window, "-o", str(home / "porch.mp4")], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert f"Wrote {home / 'porch.mp4'}: 45 frames" in out.stderr
        clip = home / "porch.mp4"
        assert clip.stat().st_uid == os.getuid() and sorted(p.name for p in home.iterdir()) == ["porch.mp4"]
        decoded = decode_clip(clip)
        expected = buf.inside(BASE_US + 2_000_000, BASE_US + 5_000_000)
        assert len(decoded.qr) == 45 and [q for q in decoded.qr if q] == [stamp(t) for t, q in zip(expected, decoded.qr) if q]
        keys = home / "agency.jwks.json"
        keys.write_text(json.dumps(ps.vectors()["trust"]))
        keys.chmod(0o600)
        out = subprocess.run([str(wrapper), "trust", "add", str(keys)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        from agent.state.truststore import load_trust_store

        assert load_trust_store(data / "trust.jwks.json").to_jwks() == ps.vectors()["trust"]
        assert (data / "trust.jwks.json").stat().st_uid == nobody.pw_uid
    finally:
        shutil.rmtree(shared)


def test_upgrade_migrates_stored_data_and_refuses_a_newer_format(installed: dict[str, object]) -> None:
    """Re-running the installer brings the databases to this version's format, as the service user's files;
    a database from a newer version stops the install with the reason, and is left as it was."""
    import sqlite3

    root = installed["root"]
    assert isinstance(root, Path)
    data = root / "var/lib/doorbell-agent"
    uid, gid = data.stat().st_uid, data.stat().st_gid
    state = data / "state.sqlite"
    conn = sqlite3.connect(state)
    conn.execute("CREATE TABLE replay_memory (jti TEXT PRIMARY KEY, payload_sha256 TEXT NOT NULL, exp INTEGER NOT NULL)")
    conn.execute("INSERT INTO replay_memory VALUES ('a', 'b', 1)")
    conn.commit()
    conn.close()
    os.chown(state, uid, gid)
    try:
        out = _install(root, *ANSWERS)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "state.sqlite: upgraded from format 0 to 1" in out.stdout
        with sqlite3.connect(state) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
            assert conn.execute("SELECT * FROM replay_memory").fetchall() == [("a", "b", 1)]
        assert {(p.stat().st_uid, p.stat().st_gid) for p in data.glob("state.sqlite*")} == {(uid, gid)}
        conn = sqlite3.connect(state)
        conn.execute("PRAGMA user_version = 9")
        conn.close()
        out = _install(root, *ANSWERS)
        assert out.returncode != 0 and "written by a newer doorbell-agent" in out.stderr, out.stdout + out.stderr
        assert "not in a format this version can use" in out.stderr
        with sqlite3.connect(state) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == 9
    finally:
        for p in data.glob("state.sqlite*"):
            p.unlink()


def test_dependencies_come_from_the_lock_file(installed: dict[str, object]) -> None:
    """Every dependency is the version requirements.lock pins (installed with --require-hashes)."""
    import json
    import re

    root = installed["root"]
    assert isinstance(root, Path)
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "requirements.lock").read_text(), re.M))
    assert "numpy" in pins and all("--hash=sha256:" in block for block in
                                   (ROOT / "requirements.lock").read_text().split("==")[1:])
    listed = subprocess.run([str(root / PREFIX / "bin/python"), "-m", "pip", "list", "--local", "--format=json"],
                            capture_output=True, text=True, timeout=120)
    have = {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(listed.stdout)}
    wrong = {n: (v, have.get(n.lower().replace("_", "-"))) for n, v in pins.items()
             if have.get(n.lower().replace("_", "-")) != v}
    assert not wrong, f"installed versions differ from requirements.lock: {wrong}"
