#!/usr/bin/env bash
# doorbell-agent installer.
#
#   ./install.sh --dev   development setup in this checkout: system packages the
#                        tests need, ./.venv, the package with its test extras.
#   sudo ./install.sh    system install on a Raspberry Pi (or any Debian host):
#                        a service user, /opt/doorbell-agent, /etc/doorbell-agent,
#                        the systemd unit. Re-running it upgrades in place.
#
# Both modes are idempotent: running them twice changes nothing the second time.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
mode=system
for arg in "$@"; do
  case "$arg" in
    --dev) mode=dev ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option '$arg' (use --dev, or no option for the system install)" >&2; exit 2 ;;
  esac
done

say() { printf '==> %s\n' "$*"; }

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
      echo "install.sh: this step needs root; run it as root or install sudo" >&2; exit 1
    fi
  else
    SUDO=
  fi
}

# Debian packages: mosquitto (the tests' real broker), ffmpeg (benchmark
# references), python3-venv (Debian splits venv out of python3).
apt_packages=(mosquitto ffmpeg python3-venv ca-certificates)

install_apt() {
  need_root
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing system packages: ${missing[*]}"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    say "system packages already present"
  fi
}

python_bin() {
  # Bookworm's python3 is 3.11; anything older cannot run the agent.
  local py="${PYTHON:-python3}"
  if ! "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
    echo "install.sh: $py is older than Python 3.11; install Python 3.11+ or set PYTHON=/path/to/python3.11" >&2
    exit 1
  fi
  echo "$py"
}

if [ "$mode" = dev ]; then
  install_apt "${apt_packages[@]}"
  py="$(python_bin)"
  if [ ! -x "$here/.venv/bin/python" ]; then
    say "creating $here/.venv"
    "$py" -m venv "$here/.venv"
  fi
  say "installing doorbell-agent (editable) with test extras"
  "$here/.venv/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$here/.venv/bin/python" -m pip install -q -e "$here[test]"
  say "done. Run the tests with: .venv/bin/python -m pytest"
  exit 0
fi

# ---- system install ---------------------------------------------------------
need_root
prefix=/opt/doorbell-agent
etc=/etc/doorbell-agent
data=/var/lib/doorbell-agent

pi_packages=()
if [ -r /proc/device-tree/model ] && grep -qi "raspberry pi" /proc/device-tree/model; then
  # picamera2 and lgpio are built for the Pi's kernel and camera stack by
  # Raspberry Pi OS; the venv sees them through --system-site-packages.
  pi_packages=(python3-picamera2 python3-lgpio)
fi
install_apt ffmpeg python3-venv ca-certificates "${pi_packages[@]}"
# The system's own Python: the one apt's python3-picamera2 and python3-lgpio are built for, and one
# the service user can run (a Python under a home directory may not be readable to it).
PYTHON="${PYTHON:-/usr/bin/python3}"
py="$(python_bin)"

if ! id doorbell-agent >/dev/null 2>&1; then
  say "creating service user doorbell-agent"
  $SUDO useradd --system --home-dir "$data" --shell /usr/sbin/nologin \
    --groups video doorbell-agent 2>/dev/null || $SUDO useradd --system --home-dir "$data" --shell /usr/sbin/nologin doorbell-agent
  getent group gpio >/dev/null && $SUDO usermod -aG gpio doorbell-agent || true
fi

if [ -x "$prefix/bin/python" ] && [ "$(readlink -f "$prefix/bin/python")" != "$(readlink -f "$py")" ]; then
  say "rebuilding $prefix for $py"
  $SUDO rm -rf "$prefix"
fi
if [ ! -x "$prefix/bin/python" ]; then
  say "creating $prefix (venv with system site packages)"
  $SUDO "$py" -m venv --system-site-packages "$prefix"
fi
say "installing doorbell-agent into $prefix"
$SUDO "$prefix/bin/python" -m pip install -q --upgrade "$here"
# The command people type runs as the service user, so files it creates under $data keep the
# owner the service needs (a root-owned SQLite journal would lock the service out of its own log).
$SUDO tee /usr/local/bin/doorbell-agent >/dev/null <<'WRAPPER'
#!/bin/sh
# Installed by doorbell-agent's install.sh: runs doorbell-agent as its service user.
config="${DOORBELL_AGENT_CONFIG:-/etc/doorbell-agent/agent.toml}"
agent=/opt/doorbell-agent/bin/doorbell-agent
if [ "$(id -un)" = doorbell-agent ]; then
  exec env PYTHONNOUSERSITE=1 DOORBELL_AGENT_CONFIG="$config" "$agent" "$@"
elif [ "$(id -u)" -eq 0 ]; then
  exec runuser -u doorbell-agent -- env PYTHONNOUSERSITE=1 DOORBELL_AGENT_CONFIG="$config" "$agent" "$@"
else
  exec sudo -u doorbell-agent env PYTHONNOUSERSITE=1 DOORBELL_AGENT_CONFIG="$config" "$agent" "$@"
fi
WRAPPER
$SUDO chmod 0755 /usr/local/bin/doorbell-agent
$SUDO ln -sf "$prefix/bin/doorbell-city" /usr/local/bin/doorbell-city

$SUDO install -d -m 0750 -o root -g doorbell-agent "$etc"
$SUDO install -d -m 0700 -o doorbell-agent -g doorbell-agent "$data"
if [ ! -e "$etc/agent.toml" ]; then
  say "writing a starting configuration to $etc/agent.toml (edit it, then: doorbell-agent config check)"
  $SUDO install -m 0640 -o root -g doorbell-agent "$here/agent/example-agent.toml" "$etc/agent.toml"
else
  say "keeping your configuration $etc/agent.toml"
fi

$SUDO install -m 0644 "$here/README.md" "$prefix/README.md"
$SUDO install -m 0644 "$here/systemd/doorbell-agent.service" /etc/systemd/system/doorbell-agent.service
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  $SUDO systemctl daemon-reload
  say "service installed. Start it with: sudo systemctl enable --now doorbell-agent"
fi
say "done"
