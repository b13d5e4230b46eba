#!/usr/bin/env bash
# doorbell-agent installer.
#
#   ./install.sh --dev               development setup in this checkout: the Debian packages the tests need,
#                                    ./.venv, the package with its test extras.
#   sudo ./install.sh                system install (Raspberry Pi OS or Debian, bookworm or later, 64-bit):
#                                    a service user, /opt/doorbell-agent, /etc/doorbell-agent, the systemd unit.
#                                    Asks the first-install questions (program, location, ...) on a terminal.
#                                    Re-running it upgrades in place: new code, same configuration and data
#                                    (its databases upgraded to the new format: doorbell-agent migrate),
#                                    the service restarted if it was running.
#   sudo ./install.sh --unattended [--program ID --lat LAT --lon LON --timezone TZ --broker HOST[:PORT]
#                     --agency-keys FILE --consent-start DATE --consent-end DATE]
#                                    the same without questions; answers from these flags or from
#                                    DOORBELL_INSTALL_PROGRAM, _LAT, _LON, _TIMEZONE, _BROKER, _AGENCY_KEYS,
#                                    _CONSENT_START, _CONSENT_END. Without a program: records only.
#   sudo ./install.sh --uninstall [--purge]
#                                    remove the service, the code and the commands; keep /etc/doorbell-agent and
#                                    /var/lib/doorbell-agent (footage, device key, trust store, log) unless --purge.
#   sudo ./install.sh --root DIR     install into DIR as if it were / (an image, or the tests): no apt, no systemctl,
#                                    the service user is added to DIR/etc/passwd.
#
# Every mode is idempotent: running it twice changes nothing the second time.
set -euo pipefail
umask 022

here="$(cd "$(dirname "$0")" && pwd)"
mode=system
unattended=0
purge=0
root=
declare -A answer=(
  [program]="${DOORBELL_INSTALL_PROGRAM:-}" [lat]="${DOORBELL_INSTALL_LAT:-}" [lon]="${DOORBELL_INSTALL_LON:-}"
  [timezone]="${DOORBELL_INSTALL_TIMEZONE:-}" [broker]="${DOORBELL_INSTALL_BROKER:-}"
  [agency_keys]="${DOORBELL_INSTALL_AGENCY_KEYS:-}" [consent_start]="${DOORBELL_INSTALL_CONSENT_START:-}"
  [consent_end]="${DOORBELL_INSTALL_CONSENT_END:-}"
)

die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }
say() { printf '==> %s\n' "$*"; }
usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --dev) mode=dev ;;
    --uninstall) mode=uninstall ;;
    --purge) purge=1 ;;
    --unattended) unattended=1 ;;
    --root) [ $# -ge 2 ] || die "--root needs a directory"; root="$2"; shift ;;
    --root=*) root="${1#--root=}" ;;
    --program|--lat|--lon|--timezone|--broker|--agency-keys|--consent-start|--consent-end)
      [ $# -ge 2 ] || die "$1 needs a value"
      key="${1#--}"; answer[${key//-/_}]="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option '$1' (see ./install.sh --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$purge" = 1 ] && [ "$mode" != uninstall ]; then die "--purge goes with --uninstall"; fi
if [ -n "$root" ]; then
  [ "$mode" != dev ] || die "--root is for the system install, not --dev"
  mkdir -p "$root" && root="$(cd "$root" && pwd)"
  [ "$root" != / ] || root=
fi

SUDO=
need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
      die "this step needs root; run it as root or install sudo"
    fi
  fi
}

# Debian packages for --dev: mosquitto (the tests' real broker), ffmpeg (benchmark references), python3-venv
# (Debian splits venv out of python3), systemd (systemd-analyze: tests/test_systemd_unit.py checks the unit),
# the shellcheck linter (tests/test_install.py checks this script), passwd (useradd --root, tests/test_install.py),
# chromium (the browser tests of the local page drive it with Playwright; Playwright's own download is not used),
# GStreamer's RTSP server with its Python bindings for Debian's /usr/bin/python3 (tests/rtsp_server.py is the real
# RTSP camera of tests/test_rtsp_camera.py: x264enc is in plugins-ugly, videoconvert/appsrc in plugins-base),
# ejabberd (the clustered MQTT 5 broker of tests/test_ejabberd.py; the tests run their own node on free ports, never
# the system service, which may stay stopped).
apt_packages=(mosquitto ejabberd ffmpeg python3-venv ca-certificates systemd shellcheck passwd chromium
  python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good
  gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly)

install_apt() {
  need_root
  local missing=() p
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
  command -v "$py" >/dev/null 2>&1 || die "no Python found at '$py'; install python3 (3.11 or later: sudo apt install python3 python3-venv)"
  if ! "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
    die "$py is Python $("$py" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo '?'), older than 3.11, which the agent needs; use Raspberry Pi OS or Debian bookworm or later, or set PYTHON=/path/to/python3.11"
  fi
  "$py" -c 'import venv, ensurepip' 2>/dev/null || die "$py cannot make virtual environments; install python3-venv (sudo apt install python3-venv)"
  echo "$py"
}

# Raspberry Pi OS (64-bit images say ID=debian, 32-bit ones ID=raspbian) or Debian, bookworm (12) or later,
# on a 64-bit ARM or x86 processor. Anything else is refused with the reason, unless
# DOORBELL_INSTALL_ANY_OS=1 (then only a warning: you are on your own).
check_platform() {
  local os_release=/etc/os-release problems=() id="" version_id="" codename="" pretty="" arch
  if [ -n "$root" ] && [ -r "$root/etc/os-release" ]; then os_release="$root/etc/os-release"; fi
  if [ -r "$os_release" ]; then
    # Read, not sourced: the file may come from --root DIR.
    osr() { sed -n "s/^$1=//p" "$os_release" | head -n 1 | sed -e 's/^"\(.*\)"$/\1/' -e "s/^'\(.*\)'\$/\1/"; }
    id="$(osr ID)"; version_id="$(osr VERSION_ID)"; codename="$(osr VERSION_CODENAME)"; pretty="$(osr PRETTY_NAME)"
    pretty="${pretty:-$id}"
  fi
  case "$id" in
    debian|raspbian)
      if [[ "$version_id" =~ ^[0-9]+$ ]]; then
        [ "$version_id" -ge 12 ] || problems+=("$pretty is older than bookworm (12); upgrade to Raspberry Pi OS or Debian bookworm or later")
      else
        case "$codename" in trixie|forky|duke|sid) ;; *) problems+=("cannot tell which release $pretty is; bookworm (12) or later is needed") ;; esac
      fi ;;
    *) problems+=("${pretty:-this system} is not Debian or Raspberry Pi OS; the installer supports Raspberry Pi OS and Debian, bookworm (12) or later") ;;
  esac
  arch="$(uname -m)"
  # A 32-bit Raspberry Pi OS on a Pi 4 or 5 runs a 64-bit kernel (uname says aarch64) under 32-bit programs.
  if [ "$arch" = aarch64 ] && [ "$(getconf LONG_BIT 2>/dev/null || echo 64)" = 32 ]; then arch=armhf; fi
  case "$arch" in
    aarch64|x86_64) ;;
    armv7l|armv6l|armhf)
      problems+=("this is a 32-bit ARM system ($arch); the agent's video libraries (PyAV, OpenCV, numpy) have no 32-bit ARM builds it can use (requirements.lock pins 64-bit wheels only): install the 64-bit Raspberry Pi OS (Pi 3, 4, 5, Zero 2 W)") ;;
    *) problems+=("processor architecture $arch is not supported (64-bit ARM, aarch64, or x86_64 only)") ;;
  esac
  if [ ${#problems[@]} -gt 0 ]; then
    local p
    for p in "${problems[@]}"; do printf 'install.sh: unsupported: %s\n' "$p" >&2; done
    if [ "${DOORBELL_INSTALL_ANY_OS:-}" = 1 ]; then
      echo "install.sh: DOORBELL_INSTALL_ANY_OS=1: going on anyway, unsupported" >&2
    else
      die "stopping (set DOORBELL_INSTALL_ANY_OS=1 to try anyway, unsupported)"
    fi
  fi
}

systemd_running() { [ -z "$root" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; }

# ---- development setup ----------------------------------------------------------------------------
if [ "$mode" = dev ]; then
  install_apt "${apt_packages[@]}"
  py="$(python_bin)"
  if [ ! -x "$here/.venv/bin/python" ]; then
    say "creating $here/.venv"
    "$py" -m venv "$here/.venv"
  fi
  say "installing doorbell-agent (editable) with test extras"
  "$here/.venv/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$here/.venv/bin/python" -m pip install -q -e "${here}[test]"
  say "done. Run the tests with: .venv/bin/python -m pytest"
  exit 0
fi

# ---- system install, upgrade and uninstall ------------------------------------------------------
need_root
[ -z "$SUDO" ] || die "the system install must run as root: sudo ./install.sh $*"
user=doorbell-agent
prefix=/opt/doorbell-agent
etc=/etc/doorbell-agent
data=/var/lib/doorbell-agent
unit=/etc/systemd/system/doorbell-agent.service
bindir=/usr/local/bin
sudoers_example="$prefix/share/doorbell-agent.sudoers"
R="$root"  # every path below is "$R$path": the real one, or the one inside --root DIR

if [ "$mode" = uninstall ]; then
  if systemd_running; then
    systemctl disable --now doorbell-agent.service >/dev/null 2>&1 || true
  fi
  rm -f "$R$unit" "$R$bindir/doorbell-agent" "$R$bindir/doorbell-city"
  rm -rf "$R$prefix"
  if systemd_running; then systemctl daemon-reload; fi
  say "removed the service, $prefix and the doorbell-agent and doorbell-city commands"
  if [ "$purge" = 1 ]; then
    rm -rf "$R$etc" "$R$data"
    if [ -n "$R" ]; then
      if grep -q "^$user:" "$R/etc/passwd" 2>/dev/null; then userdel --root "$R" "$user" 2>/dev/null || true; fi
    elif id "$user" >/dev/null 2>&1; then
      userdel "$user" 2>/dev/null || true
    fi
    say "purged $etc, $data (footage, device key, trust store, access log) and the user $user"
  else
    say "kept your configuration $etc and your data $data (footage, device key, trust store, access log)"
    say "to delete them too: sudo ./install.sh --uninstall --purge (back up $data/device-key.pem first: it is the camera's identity)"
  fi
  exit 0
fi

check_platform
py_default=/usr/bin/python3
PYTHON="${PYTHON:-$py_default}"  # the system's own Python: the one apt's picamera2 and lgpio are built for
py="$(python_bin)"

if [ -z "$R" ]; then
  pi_packages=()
  if [ -r /proc/device-tree/model ] && grep -qi "raspberry pi" /proc/device-tree/model; then
    # picamera2 and lgpio are built for the Pi's kernel and camera stack by Raspberry Pi OS;
    # the venv sees them through --system-site-packages.
    pi_packages=(python3-picamera2 python3-lgpio)
    # Pi camera: numpy < 2 (and an OpenCV that accepts it) in the venv, or picamera2 cannot load
    # Raspberry Pi OS's simplejpeg. Applies to every pip install below; see the file for why.
    export PIP_CONSTRAINT="$here/hardware/pi-constraints.txt"
  fi
  install_apt ffmpeg python3-venv ca-certificates "${pi_packages[@]}"
else
  say "installing into $R (no apt packages, no systemd)"
  mkdir -p "$R/etc"
  for f in passwd group shadow gshadow; do
    if [ ! -e "$R/etc/$f" ]; then
      case "$f" in
        passwd) echo 'root:x:0:0:root:/root:/bin/sh' ;;
        group) printf 'root:x:0:\nvideo:x:44:\n' ;;
        shadow) echo 'root:*:19000:0:99999:7:::' ;;
        gshadow) printf 'root:*::\nvideo:*::\n' ;;
      esac > "$R/etc/$f"
      case "$f" in shadow|gshadow) chmod 0640 "$R/etc/$f" ;; *) chmod 0644 "$R/etc/$f" ;; esac
    fi
  done
fi

# -- the service user -----------------------------------------------------------------------------
user_exists() {
  if [ -n "$R" ]; then grep -q "^$user:" "$R/etc/passwd"; else id "$user" >/dev/null 2>&1; fi
}
group_exists() {
  if [ -n "$R" ]; then grep -q "^$1:" "$R/etc/group"; else getent group "$1" >/dev/null; fi
}
rootopt=()
if [ -n "$R" ]; then rootopt=(--root "$R"); fi
if ! user_exists; then
  say "creating service user $user"
  groups=()
  for g in video gpio; do if group_exists "$g"; then groups+=("$g"); fi; done
  extra=()
  if [ ${#groups[@]} -gt 0 ]; then extra=(--groups "$(IFS=,; echo "${groups[*]}")"); fi
  useradd "${rootopt[@]}" --system --user-group --home-dir "$data" --no-create-home --shell /usr/sbin/nologin \
    "${extra[@]}" "$user" 2> >(grep -v "missing or non-executable shell" >&2)
fi
if [ -n "$R" ]; then
  uid="$(awk -F: -v u="$user" '$1 == u { print $3 }' "$R/etc/passwd")"
  gid="$(awk -F: -v u="$user" '$1 == u { print $4 }' "$R/etc/passwd")"
else
  uid="$(id -u "$user")"
  gid="$(id -g "$user")"
fi

toml_str() { local s="${1//\\/\\\\}"; printf '"%s"' "${s//\"/\\\"}"; }
ask() {  # ask KEY QUESTION: fill answer[KEY] from the terminal unless given or unattended
  local reply
  if [ -z "${answer[$1]}" ] && [ "$unattended" = 0 ] && [ -t 0 ]; then
    read -r -p "$2: " reply
    answer[$1]="$reply"
  fi
}
collect_answers() {  # the first-install questions, checked before anything is built
  ask program "Program id from your city (e.g. jackson-ms/camera-pilot-2026; empty: record only, never share)"
  if [ -n "${answer[program]}" ]; then
    ask lat "Camera latitude (e.g. 32.29876)"
    ask lon "Camera longitude (e.g. -90.18481)"
    ask timezone "Time zone (e.g. America/Chicago)"
    ask broker "The program's broker, HOST or HOST:PORT"
    ask consent_start "Consent starts (UTC, e.g. 2026-12-01T00:00:00Z)"
    ask consent_end "Consent ends (UTC, e.g. 2027-03-01T00:00:00Z)"
    local k
    for k in lat lon timezone broker consent_start consent_end; do
      [ -n "${answer[$k]}" ] || die "a program needs --${k//_/-} (or DOORBELL_INSTALL_${k^^})"
    done
    [[ "${answer[lat]}" =~ ^-?[0-9]+(\.[0-9]+)?$ && "${answer[lon]}" =~ ^-?[0-9]+(\.[0-9]+)?$ ]] ||
      die "latitude and longitude are decimal degrees, e.g. --lat 32.29876 --lon -90.18481"
    local rfc='^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(Z|[+-][0-9]{2}:[0-9]{2})$'
    [[ "${answer[consent_start]}" =~ $rfc && "${answer[consent_end]}" =~ $rfc ]] ||
      die "consent start and end are times with a zone, e.g. --consent-start 2026-12-01T00:00:00Z"
    broker_host="${answer[broker]%:*}"
    broker_port=8883
    if [ "$broker_host" != "${answer[broker]}" ]; then broker_port="${answer[broker]##*:}"; fi
    [[ "$broker_port" =~ ^[0-9]+$ ]] || die "the broker's port must be a number: $broker_port"
  fi
  ask agency_keys "The agency's key file from your program (a .jwks.json; empty: add it later with 'doorbell-agent trust add FILE')"
  if [ -n "${answer[agency_keys]}" ] && [ ! -r "${answer[agency_keys]}" ]; then
    die "cannot read the agency key file ${answer[agency_keys]}"
  fi
}
write_config() {
  local out="$1"
  cp "$here/agent/example-agent.toml" "$out"
  [ -n "${answer[program]}" ] || return 0
  cat >> "$out" <<EOF

# Written by install.sh from the first-install answers.
[policy]
program = $(toml_str "${answer[program]}")
location = { lat = ${answer[lat]}, lon = ${answer[lon]} }
timezone = $(toml_str "${answer[timezone]}")
approval = "ask"

[policy.consent]
start = ${answer[consent_start]}
end = ${answer[consent_end]}

[mqtt]
host = $(toml_str "$broker_host")
port = $broker_port
EOF
}
first_install=0
if [ ! -e "$R$etc/agent.toml" ]; then
  first_install=1
  collect_answers
fi

# -- the code: a venv in $prefix, the package built outside the checkout -----------------------
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if [ -x "$R$prefix/bin/python" ] && [ "$(readlink -f "$R$prefix/bin/python")" != "$(readlink -f "$(command -v "$py")")" ]; then
  say "rebuilding $prefix for $py"
  rm -rf "${R:?}$prefix"
fi
if [ ! -x "$R$prefix/bin/python" ]; then
  say "creating $prefix (venv with system site packages)"
  "$py" -m venv --system-site-packages "$R$prefix"
fi
pip=("$R$prefix/bin/python" -m pip --disable-pip-version-check --no-input -q)
# The wheel is built in a scratch directory: nothing (build/, *.egg-info) is left in the checkout, which
# may belong to the resident. Its RECORD lists every file with its hash: the same RECORD is the same code.
(cd "$work" && "${pip[@]}" wheel --no-deps -w "$work/wheel" "$here" >/dev/null)
wheel="$(echo "$work"/wheel/doorbell_agent-*.whl)"
[ -f "$wheel" ] || die "building the doorbell-agent wheel failed"
record="$("$py" -c 'import hashlib, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
print(hashlib.sha256(b"".join(z.read(n) for n in sorted(z.namelist()) if n.endswith(".dist-info/RECORD"))).hexdigest())' "$wheel")"
stamp="$R$prefix/.installed-record-sha256"
upgraded=0
if [ ! -r "$stamp" ] || [ "$(cat "$stamp")" != "$record" ] || ! "${pip[@]}" show doorbell-agent >/dev/null 2>&1; then
  say "installing doorbell-agent $(basename "$wheel" | cut -d- -f2) into $prefix"
  lock="$here/requirements.lock"
  if [ -r "$lock" ]; then
    # Pinned, hash-checked dependencies; then the agent itself without resolving anything more.
    "${pip[@]}" install --root-user-action=ignore --require-hashes --only-binary=:all: -r "$lock"
    "${pip[@]}" install --root-user-action=ignore --no-deps --force-reinstall "$wheel"
  else
    "${pip[@]}" install --root-user-action=ignore "$wheel"
    "${pip[@]}" install --root-user-action=ignore --no-deps --force-reinstall "$wheel"
  fi
  if [ -n "$R" ]; then
    # The venv's scripts name the Python they run with: make that $prefix, where it is once DIR is /.
    for f in "$R$prefix"/bin/*; do
      if [ -f "$f" ] && [ ! -L "$f" ] && grep -qF "$R$prefix" "$f"; then sed -i "s|$R$prefix|$prefix|g" "$f"; fi
    done
  fi
  echo "$record" > "$stamp"
  chmod 0644 "$stamp"
  upgraded=1
else
  say "doorbell-agent in $prefix is already this version"
fi
install -m 0644 "$here/README.md" "$R$prefix/README.md"

# -- the commands people type -------------------------------------------------------------------
# `doorbell-agent` runs the agent as the service user, so files it creates under $data keep the owner
# the service needs (a root-owned SQLite journal would lock the service out of its own log). It goes
# through one fixed program, $prefix/libexec/doorbell-agent-as-service, so a sudoers rule can allow
# exactly that and nothing else (example: $sudoers_example).
install -d -m 0755 "$R$prefix/libexec" "$R$prefix/share"
cat > "$work/as-service" <<EOF
#!/bin/sh
# Installed by doorbell-agent's install.sh: the agent with the service's environment.
# Run as the service user: sudo -u $user $prefix/libexec/doorbell-agent-as-service ARGS
exec env PYTHONNOUSERSITE=1 DOORBELL_AGENT_CONFIG="\${DOORBELL_AGENT_CONFIG:-$etc/agent.toml}" \\
  $prefix/bin/doorbell-agent "\$@"
EOF
install -m 0755 "$work/as-service" "$R$prefix/libexec/doorbell-agent-as-service"
cat > "$work/wrapper" <<'EOF'
#!/bin/bash
# Installed by doorbell-agent's install.sh: runs doorbell-agent as its service user, @USER@.
# Files you name are opened by this script, as you, so they may stay in your home:
#   trust add FILE and log verify --bundle FILE: FILE is handed to the agent on standard input;
#   clip -o FILE and log export -o FILE: the agent writes to standard output (-o -), this script to FILE.part,
#   renamed to FILE once the agent has finished (removed if it failed);
#   conformance FILE: needs none of the agent's data, so it runs as you.
set -u
prefix=@PREFIX@
as_service=$prefix/libexec/doorbell-agent-as-service
if [ "$(id -un)" = @USER@ ]; then
  agent=("$as_service")
elif [ "$(id -u)" -eq 0 ]; then
  agent=(runuser -u @USER@ -- "$as_service")
else
  agent=(sudo -u @USER@ "$as_service")
fi
fail() { printf 'doorbell-agent: %s\n' "$*" >&2; exit 2; }

pre=()  # --config PATH, the only option that comes before the command
while [ $# -gt 0 ]; do
  case "$1" in
    --config) [ $# -ge 2 ] || break; pre+=("$1" "$2"); shift 2 ;;
    --config=*) pre+=("$1"); shift ;;
    *) break ;;
  esac
done
cmd=("${1:-}")
case "${1:-}" in log|trust) cmd+=("${2:-}") ;; esac
case "${cmd[*]}" in
  clip|"log export"|"trust add"|"log verify") shift "${#cmd[@]}" ;;
  conformance) exec env PYTHONNOUSERSITE=1 "$prefix/bin/doorbell-agent" "${pre[@]}" "$@" ;;
  *) exec "${agent[@]}" "${pre[@]}" "$@" ;;
esac

args=() input='' output='' force=0 json=0
while [ $# -gt 0 ]; do
  a=$1
  shift
  case "${cmd[*]} $a" in
    "clip -o"|"clip --output"|"log export -o"|"log export --output")
      [ $# -ge 1 ] || { args+=("$a"); continue; }
      v=$1; shift ;;
    "clip -o"?*|"log export -o"?*) v=${a#-o} ;;
    "clip --output="*|"log export --output="*) v=${a#--output=} ;;
    "log verify --bundle")
      [ $# -ge 1 ] || { args+=("$a"); continue; }
      if [ "$1" = - ]; then args+=("$a" -); else input=$1; args+=(--bundle -); fi
      shift; continue ;;
    "log verify --bundle="*)
      if [ "${a#--bundle=}" = - ]; then args+=("$a"); else input=${a#--bundle=}; args+=(--bundle -); fi
      continue ;;
    "trust add -"?*) args+=("$a"); continue ;;
    "trust add "*)
      if [ -z "$input" ] && [ "$a" != - ]; then input=$a; args+=(-); else args+=("$a"); fi
      continue ;;
    *" --force") force=1; args+=("$a"); continue ;;
    *" --json") json=1; args+=("$a"); continue ;;
    *) args+=("$a"); continue ;;
  esac
  if [ "$v" = - ]; then args+=(-o -); else output=$v; fi
done

if [ -n "$input" ]; then
  if [ ! -f "$input" ] || [ ! -r "$input" ]; then fail "cannot read $input; give the path of a file you may read"; fi
  exec "${agent[@]}" "${pre[@]}" "${cmd[@]}" "${args[@]}" < "$input"
fi
if [ -z "$output" ]; then
  exec "${agent[@]}" "${pre[@]}" "${cmd[@]}" "${args[@]}"
fi

# Writing FILE as you. The agent's own checks, made here because only you can make them.
[ ! -d "$output" ] || fail "-o $output is a folder; give a file name inside it, such as ${output%/}/clip.mp4"
dir=$(dirname -- "$output")
[ -d "$dir" ] || fail "-o $output: the folder $dir does not exist; create it or pick another file"
if [ -e "$output" ] && [ "$force" = 0 ]; then
  fail "-o $output already exists; pick another name or add --force to replace it"
fi
[ -w "$dir" ] || fail "-o $output: $(id -un) cannot write in $dir; pick a folder you may write to"
abs="$(cd -- "$dir" && pwd)/$(basename -- "$output")"
part="$output.part"
report=
cleanup() { rm -f -- "$part" ${report:+"$report"}; }
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
if [ -e "$part" ] || [ -L "$part" ]; then
  part=$(mktemp -- "$output.XXXXXX") || fail "-o $output: cannot write in $dir"
else
  (umask 077 && set -o noclobber && : > "$part") || fail "-o $output: cannot write $part"
fi
chmod "$(printf '%o' $((0666 & ~$(umask))))" -- "$part"
args+=(-o - --output-name "$abs")
if [ "$json" = 1 ]; then
  # The agent reports on standard error when standard output carries the file: put the report back on yours.
  report=$(mktemp) || fail "cannot make a temporary file"
  if "${agent[@]}" "${pre[@]}" "${cmd[@]}" "${args[@]}" > "$part" 2> "$report"; then
    mv -f -- "$part" "$output" && cat -- "$report"
    exit
  else
    status=$?
    cat -- "$report" >&2
    exit "$status"
  fi
fi
if "${agent[@]}" "${pre[@]}" "${cmd[@]}" "${args[@]}" > "$part"; then
  mv -f -- "$part" "$output"
else
  exit
fi
EOF
sed -i -e "s|@USER@|$user|g" -e "s|@PREFIX@|$prefix|g" "$work/wrapper"
install -m 0755 "$work/wrapper" "$R$bindir/doorbell-agent" 2>/dev/null || {
  install -d -m 0755 "$R$bindir"; install -m 0755 "$work/wrapper" "$R$bindir/doorbell-agent"; }
ln -sfn "$prefix/bin/doorbell-city" "$R$bindir/doorbell-city"
cat > "$work/sudoers" <<EOF
# Example sudoers rule for doorbell-agent. Copy it into place with visudo, e.g.
#   sudo visudo -f /etc/sudoers.d/doorbell-agent
# and replace "alice" with the resident's login. It allows running the agent's commands as the service
# user, and nothing else: not a shell, not other programs, not other users.
alice ALL=($user) $prefix/libexec/doorbell-agent-as-service
EOF
install -m 0644 "$work/sudoers" "$R$sudoers_example"

# -- configuration and data ---------------------------------------------------------------------
install -d -m 0750 -o 0 -g "$gid" "$R$etc"
install -d -m 0755 "$(dirname "$R$data")"
install -d -m 0700 -o "$uid" -g "$gid" "$R$data"

if [ "$first_install" = 1 ] && [ ! -e "$R$etc/agent.toml" ]; then
  write_config "$work/agent.toml"
  say "writing your configuration to $etc/agent.toml (check it with: doorbell-agent config check)"
  install -m 0640 -o 0 -g "$gid" "$work/agent.toml" "$R$etc/agent.toml"
else
  say "keeping your configuration $etc/agent.toml"
fi
if [ "$first_install" = 1 ] && [ -n "${answer[agency_keys]}" ]; then
  if [ -z "$R" ]; then
    say "trusting the agency keys in ${answer[agency_keys]}"
    "$bindir/doorbell-agent" trust add "${answer[agency_keys]}"
  else
    install -m 0600 -o "$uid" -g "$gid" "${answer[agency_keys]}" "$R$data/agency-keys.pending.jwks.json"
    say "agency keys copied to $data/agency-keys.pending.jwks.json: run 'doorbell-agent trust add' on it on the device"
  fi
fi

# -- stored data: in this version's format before the service starts again ------------------------
# `doorbell-agent migrate` upgrades databases an older version wrote, in place, and refuses (changing
# nothing) ones a newer version wrote. The service is stopped meanwhile: it runs the old code until then.
was_active=0
if [ "$upgraded" = 1 ] && systemd_running && systemctl is-active --quiet doorbell-agent.service; then
  say "stopping the service to bring it to the new version"
  systemctl stop doorbell-agent.service
  was_active=1
fi
migrate_data() {
  if [ -z "$R" ]; then
    runuser -u "$user" -- "$prefix/libexec/doorbell-agent-as-service" migrate
    return
  fi
  # In DIR the service user has no name this system knows: migrate as root, then give the files back.
  local status=0
  env PYTHONNOUSERSITE=1 DOORBELL_AGENT_CONFIG="$R$etc/agent.toml" DOORBELL_AGENT_PATHS__DATA_DIR="$R$data" \
    "$R$prefix/bin/python" -m agent migrate || status=$?
  find "$R$data" -maxdepth 1 -name '*.sqlite*' -exec chown "$uid:$gid" {} +
  return "$status"
}
if [ -n "$(find "$R$data" -maxdepth 1 -name '*.sqlite' -print -quit)" ]; then
  say "bringing your stored data in $data to this version's format"
  if ! migrate_data; then
    stopped=""
    if [ "$was_active" = 1 ]; then stopped=" The service was stopped and stays stopped until this is solved."; fi
    die "your stored data in $data is not in a format this version can use (see above), so it was left as it was.$stopped"
  fi
fi

# -- the service --------------------------------------------------------------------------------
install -d -m 0755 "$R/etc/systemd/system"
install -m 0644 "$here/systemd/doorbell-agent.service" "$R$unit"
if systemd_running; then
  systemctl daemon-reload
  if [ "$was_active" = 1 ]; then
    say "starting the service with the new version"
    systemctl start doorbell-agent.service
  elif systemctl is-active --quiet doorbell-agent.service; then
    say "the service is running this version"
  else
    say "service installed. Start it with: sudo systemctl enable --now doorbell-agent"
  fi
  say "done. Its log: journalctl -u doorbell-agent"
elif [ -n "$R" ]; then
  say "done: installed into $R (nothing was started)"
else
  pid1="$(ps -o comm= -p 1 2>/dev/null || echo unknown)"
  say "done, but systemd is not running on this machine (process 1 is '$pid1'), so the service was NOT started"
  say "the unit is in $unit for a machine that boots with systemd (Raspberry Pi OS does)."
  say "to record here anyway: sudo -u $user $prefix/libexec/doorbell-agent-as-service run"
fi
