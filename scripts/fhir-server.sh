#!/usr/bin/env bash
# Start / stop / inspect the local FHIR R4 server used by the integration tests.
#
# The server is `sekmet-fhir` (PyPI, FastAPI + SQLite), installed into a project-local
# virtualenv and bound to 127.0.0.1 only.
#
#   scripts/fhir-server.sh start     install if needed, start, wait until /metadata answers (idempotent)
#   scripts/fhir-server.sh stop      stop the server started by this script
#   scripts/fhir-server.sh restart
#   scripts/fhir-server.sh status    exit 0 when the server answers, 1 otherwise
#   scripts/fhir-server.sh reset     wipe all stored resources (server keeps running / is restarted)
#   scripts/fhir-server.sh install   only create the virtualenv and install the package
#   scripts/fhir-server.sh logs      tail the server log
#   scripts/fhir-server.sh url       print the FHIR base URL
#
# Layout (all under $IOMT_SERVICES_DIR, default <repo>/.services, which ignores itself in git):
#   fhir-venv/           virtualenv with sekmet-fhir
#   fhir-data/           working dir of the server: sekmet.db (SQLite, WAL), keys/
#   fhir-settings.yaml   generated settings (passed with --config)
#   fhir.log, fhir.pid   server log and pid
# (with FHIR_PORT other than 8090 these names get a -PORT suffix, so two servers never share files)
#
# Environment knobs: FHIR_PORT (8090), FHIR_START_TIMEOUT (seconds, 90), FHIR_LOG_INBOUND (false;
# true records every request in the server's traffic table, viewable at http://127.0.0.1:PORT/ui/traffic),
# FHIR_PYTHON (python used to create the venv).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"

SEKMET_VERSION="0.1.1"
FHIR_HOST="127.0.0.1"                       # never 0.0.0.0
FHIR_PORT="${FHIR_PORT:-8090}"
FHIR_BASE_URL="http://${FHIR_HOST}:${FHIR_PORT}/fhir"
FHIR_START_TIMEOUT="${FHIR_START_TIMEOUT:-90}"
FHIR_LOG_INBOUND="${FHIR_LOG_INBOUND:-false}"

SERVICES_DIR="${IOMT_SERVICES_DIR:-$ROOT/.services}"
VENV="$SERVICES_DIR/fhir-venv"
# a server on another FHIR_PORT gets its own data, settings, log and pid file
SUFFIX=""
[[ "$FHIR_PORT" == 8090 ]] || SUFFIX="-$FHIR_PORT"
DATA_DIR="$SERVICES_DIR/fhir-data$SUFFIX"
CONF="$SERVICES_DIR/fhir-settings$SUFFIX.yaml"
LOG="$SERVICES_DIR/fhir$SUFFIX.log"
PIDFILE="$SERVICES_DIR/fhir$SUFFIX.pid"
SEKMET="$VENV/bin/sekmet"

# sekmet reads these and they would override the generated settings file
unset SEKMET_BASE_URL SEKMET_DB SEKMET_PUBLIC_URL SEKMET_PORT SEKMET_CONFIG
# plain Python tracebacks in the log instead of rich boxes
export TYPER_STANDARD_TRACEBACK=1

log()  { printf '[fhir-server] %s\n' "$*"; }
warn() { printf '[fhir-server] WARNING: %s\n' "$*" >&2; }
die()  { printf '[fhir-server] ERROR: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [[ $EUID -eq 0 ]]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else die "need root (or sudo) to run: $*"
    fi
}

apt_install() {
    log "apt-get install $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

ensure_services_dir() {
    mkdir -p "$SERVICES_DIR" "$DATA_DIR"
    # keep the whole directory out of git without touching the repository's .gitignore
    [[ -f "$SERVICES_DIR/.gitignore" ]] || printf '*\n' > "$SERVICES_DIR/.gitignore"
}

# HTTP status of GET <url> ("000" when nothing answers)
http_status() {
    local url=$1
    if command -v curl >/dev/null 2>&1; then
        curl -s -o /dev/null -m 3 -w '%{http_code}' "$url" 2>/dev/null || true
    else
        local py=python3
        [[ -x "$VENV/bin/python" ]] && py="$VENV/bin/python"
        "$py" - "$url" <<'EOF' 2>/dev/null || echo 000
import sys, urllib.request, urllib.error
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=3).status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("000")
EOF
    fi
}

is_up() { [[ "$(http_status "$FHIR_BASE_URL/metadata")" == "200" ]]; }

port_in_use() { (exec 3<>"/dev/tcp/$FHIR_HOST/$FHIR_PORT") 2>/dev/null; }

installed_version() {
    [[ -x "$SEKMET" ]] || return 1
    "$SEKMET" --version 2>/dev/null | awk '{print $2}'
}

cmd_install() {
    ensure_services_dir
    if [[ "$(installed_version || true)" == "$SEKMET_VERSION" ]]; then
        log "sekmet-fhir $SEKMET_VERSION already installed in $VENV"
        return 0
    fi
    local py="${FHIR_PYTHON:-}"
    if [[ -z "$py" ]]; then
        py="$(command -v python3 || true)"
        [[ -n "$py" ]] || { apt_install python3 python3-venv; py=/usr/bin/python3; }
    fi
    log "creating virtualenv $VENV (with $py: $("$py" --version 2>&1))"
    rm -rf "$VENV"
    if ! "$py" -m venv "$VENV" 2>/dev/null; then
        # Debian's python3 lacks ensurepip until python3-venv is installed
        rm -rf "$VENV"
        apt_install python3-venv
        py=/usr/bin/python3
        "$py" -m venv "$VENV" || die "could not create a virtualenv with $py"
    fi
    log "pip install sekmet-fhir==$SEKMET_VERSION (takes ~30 s)"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "sekmet-fhir==$SEKMET_VERSION" \
        || die "pip install sekmet-fhir==$SEKMET_VERSION failed"
    [[ "$(installed_version || true)" == "$SEKMET_VERSION" ]] || die "sekmet did not install correctly"
    log "installed $("$SEKMET" --version)"
}

write_settings() {
    # sekmet locates its settings as: --config PATH  >  $SEKMET_CONFIG  >  ./settings.yaml (cwd);
    # relative paths inside (data_dir, keys/) are relative to the cwd, so everything here is absolute.
    cat > "$CONF.tmp" <<EOF
# generated by scripts/fhir-server.sh - edits are overwritten on the next start
host: $FHIR_HOST
port: $FHIR_PORT
base_url: $FHIR_BASE_URL
data_dir: $DATA_DIR
db_path: $DATA_DIR/sekmet.db
own_private_key_path: $DATA_DIR/keys/sekmet_private.pem
log_inbound: $FHIR_LOG_INBOUND
server_auth:
  types: [none]
validation:
  inbound: strict
simulator:
  enabled: false
EOF
    mv "$CONF.tmp" "$CONF"
}

running_pid() {
    # pid from the pid file if that process is still a sekmet server
    [[ -f "$PIDFILE" ]] || return 1
    local pid
    pid="$(cat "$PIDFILE" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q 'sekmet' || return 1
    echo "$pid"
}

fail_with_log() {
    printf '[fhir-server] ERROR: %s\n' "$1" >&2
    if [[ -f "$LOG" ]]; then
        printf '[fhir-server] ---- last 40 lines of %s ----\n' "$LOG" >&2
        tail -n 40 "$LOG" >&2
        printf '[fhir-server] ----\n' >&2
    fi
    exit 1
}

cmd_start() {
    if is_up; then
        log "already answering at $FHIR_BASE_URL (nothing to do)"
        return 0
    fi
    if port_in_use; then
        die "something is listening on $FHIR_HOST:$FHIR_PORT but $FHIR_BASE_URL/metadata does not answer 200; \
stop it or set FHIR_PORT (ss -ltnp 'sport = :$FHIR_PORT')"
    fi
    cmd_install
    ensure_services_dir
    write_settings
    if pid="$(running_pid)"; then
        log "a sekmet process ($pid) exists but does not answer; stopping it first"
        cmd_stop
    fi
    log "starting sekmet-fhir on $FHIR_BASE_URL (log: $LOG)"
    printf '\n==== %s start ====\n' "$(date -u +%FT%TZ)" >> "$LOG"
    (
        cd "$DATA_DIR"
        # setsid: own session, so the server outlives the calling shell/job
        exec nohup setsid "$SEKMET" serve --config "$CONF" --host "$FHIR_HOST" --port "$FHIR_PORT" \
            >> "$LOG" 2>&1 < /dev/null
    ) &
    local pid=$!
    echo "$pid" > "$PIDFILE"

    local deadline=$((SECONDS + FHIR_START_TIMEOUT))
    until is_up; do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$PIDFILE"
            fail_with_log "sekmet exited during startup"
        fi
        if (( SECONDS >= deadline )); then
            warn "$FHIR_BASE_URL/metadata did not answer within ${FHIR_START_TIMEOUT}s; stopping pid $pid"
            cmd_stop >&2
            fail_with_log "FHIR server did not come up (raise FHIR_START_TIMEOUT if the machine is just slow)"
        fi
        sleep 0.5
    done
    log "up: $FHIR_BASE_URL (pid $pid)"
}

cmd_stop() {
    local pid=""
    pid="$(running_pid || true)"
    if [[ -z "$pid" ]] && command -v ss >/dev/null 2>&1; then
        # no pid file: only a sekmet process listening on our port is ours to stop
        local p
        for p in $(ss -Hltnp "sport = :$FHIR_PORT" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u); do
            if tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | grep -q 'sekmet'; then pid=$p; fi
        done
    fi
    if [[ -z "$pid" ]]; then
        log "not running (no sekmet process found)"
        rm -f "$PIDFILE"
        return 0
    fi
    log "stopping sekmet (pid $pid)"
    kill "$pid" 2>/dev/null || true
    local i
    for i in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        warn "pid $pid did not exit after SIGTERM; sending SIGKILL"
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$PIDFILE"
    log "stopped"
}

cmd_status() {
    local pid
    pid="$(running_pid || true)"
    if is_up; then
        log "up: $FHIR_BASE_URL${pid:+ (pid $pid)}"
        return 0
    fi
    log "down: $FHIR_BASE_URL does not answer${pid:+ (but pid $pid is alive)}"
    return 1
}

cmd_reset() {
    # Wipe resources, history, search index and traffic log. Works while the server runs:
    # `sekmet reset` deletes the rows through the same SQLite database (WAL mode).
    if is_up && [[ -x "$SEKMET" && -f "$CONF" ]]; then
        (cd "$DATA_DIR" && "$SEKMET" reset --yes --config "$CONF" >/dev/null)
        log "database cleared (server kept running)"
    else
        cmd_stop
        rm -f "$DATA_DIR"/sekmet.db "$DATA_DIR"/sekmet.db-wal "$DATA_DIR"/sekmet.db-shm
        log "database files removed; start with: $0 start"
    fi
}

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

case "${1:-}" in
    start)   cmd_start ;;
    stop)    cmd_stop ;;
    restart) cmd_stop; cmd_start ;;
    status)  cmd_status ;;
    reset)   cmd_reset ;;
    install) cmd_install ;;
    logs)    tail -n "${2:-50}" "$LOG" ;;
    url)     echo "$FHIR_BASE_URL" ;;
    -h|--help|help) usage ;;
    *) usage >&2; exit 2 ;;
esac
