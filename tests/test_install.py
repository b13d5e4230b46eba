"""install.sh: the whole system install into a scratch root (``--root DIR``), twice.

Every file it makes is checked with its owner and mode, the second run must change nothing, uninstall keeps
the resident's configuration and data unless ``--purge``, the checkout is left as it was, unsupported systems
are refused with the reason, and the script (and the scripts it writes) are ``shellcheck`` clean.

``shellcheck`` and ``useradd`` come from Debian packages ``./install.sh --dev`` installs (shellcheck, passwd).
The system install sets owners, so these tests run as root, as CI does.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
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
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    _need_root()
    base = tmp_path_factory.mktemp("install")
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


def test_wrapper_hands_trust_add_file_over_a_pipe(installed: dict[str, object], tmp_path: Path) -> None:
    """`trust add FILE` reads FILE as the person typing it; the service user gets its bytes on a pipe."""
    root = installed["root"]
    assert isinstance(root, Path)
    stub = tmp_path / "as-service"
    stub.write_text('#!/bin/sh\necho "args: $*"\nif [ "$3" = /dev/stdin ] || [ "$4" = /dev/stdin ]; then cat; fi\n')
    stub.chmod(0o755)
    wrapper = (root / "usr/local/bin/doorbell-agent").read_text()
    wrapper = wrapper.replace(f"as_service=/{PREFIX}/libexec/doorbell-agent-as-service", f"as_service={stub}")
    wrapper = wrapper.replace('[ "$(id -un)" = doorbell-agent ]', '[ "$(id -un)" = "$(id -un)" ]')
    test_wrapper = tmp_path / "doorbell-agent"
    test_wrapper.write_text(wrapper)
    test_wrapper.chmod(0o755)
    keys = tmp_path / "agency.jwks.json"
    keys.write_text('{"keys": []}')
    out = subprocess.run([str(test_wrapper), "trust", "add", "--force", str(keys)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout == 'args: trust add --force /dev/stdin\n{"keys": []}', out
    out = subprocess.run([str(test_wrapper), "status", "--json"], capture_output=True, text=True, timeout=30)
    assert out.stdout == "args: status --json\n", out
    out = subprocess.run([str(test_wrapper), "trust", "add", str(tmp_path / "nope")], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "cannot read" in out.stderr


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
