#!/usr/bin/env bash
# Install and start the services the integration tests need, then build the connector.
#
#   scripts/setup.sh              RabbitMQ + FHIR server, then `cargo build --release`
#   scripts/setup.sh --no-build   services only
#
# Safe to re-run: each step checks first and does nothing when its service already answers.
#   RabbitMQ     amqp://guest:guest@127.0.0.1:5672/%2f   (Debian package rabbitmq-server)
#   FHIR R4      http://127.0.0.1:8090/fhir               (sekmet-fhir from PyPI, see scripts/fhir-server.sh)
#   FHIR R4      http://127.0.0.1:8092                    (helios-hfs from crates.io, see scripts/helios-server.sh;
#                                                          built once per machine, about 5 to 9 minutes;
#                                                          IOMT_SETUP_HELIOS=0 leaves it out)
#   mitmproxy    .services/mitm-venv/bin/mitmdump         (PyPI; the outage tests' fault-injecting proxy)
#   Chromium     /usr/bin/chromium + tests/browser/node_modules (Debian package; playwright-core from npm)
#   PostgreSQL   127.0.0.1:5432, database test (the Event Hubs checkpoint store)
#   Event Hubs   tests/eventhubs (rhea test peer, proven against @azure/event-hubs; npm)
# Runs as root on Debian 12; uses sudo when not root and sudo exists.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"

AMQP_HOST=127.0.0.1
AMQP_PORT=5672
RABBIT_START_TIMEOUT="${RABBIT_START_TIMEOUT:-90}"
# consistent-hash exchange: broker.topology = "sharded"; management: which instance is a shard
# queue's active consumer (broker.management_url), used by the scale-out tests.
RABBIT_PLUGINS=(rabbitmq_consistent_hash_exchange rabbitmq_management)
MANAGEMENT_PORT=15672

BUILD=1
for arg in "$@"; do
    case "$arg" in
        --no-build) BUILD=0 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

log()  { printf '[setup] %s\n' "$*"; }
warn() { printf '[setup] WARNING: %s\n' "$*" >&2; }
die()  { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [[ $EUID -eq 0 ]]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else die "need root (or sudo) to run: $*"
    fi
}

APT_UPDATED=0
apt_install() {
    if [[ $APT_UPDATED -eq 0 ]]; then
        log "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        APT_UPDATED=1
    fi
    log "apt-get install $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed'; }

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# ---------------------------------------------------------------- base tools
need_pkgs=()
command -v curl >/dev/null 2>&1 || need_pkgs+=(curl ca-certificates)
command -v python3 >/dev/null 2>&1 || need_pkgs+=(python3 python3-venv)
command -v ss >/dev/null 2>&1 || need_pkgs+=(iproute2)
if ((${#need_pkgs[@]})); then apt_install "${need_pkgs[@]}"; fi

# ---------------------------------------------------------------- RabbitMQ
rabbit_log_tail() {
    local f
    for f in /var/log/rabbitmq/startup_err /var/log/rabbitmq/startup_log /var/log/rabbitmq/rabbit@*.log; do
        [[ -s "$f" ]] || continue
        printf '[setup] ---- tail %s ----\n' "$f" >&2
        tail -n 25 "$f" >&2
    done
}

write_rabbit_config() {
    # Only create missing files: never overwrite an operator's configuration.
    as_root mkdir -p /etc/rabbitmq
    if [[ ! -f /etc/rabbitmq/rabbitmq-env.conf ]]; then
        log "writing /etc/rabbitmq/rabbitmq-env.conf (node rabbit@localhost, epmd/distribution on loopback)"
        as_root tee /etc/rabbitmq/rabbitmq-env.conf >/dev/null <<'EOF'
NODENAME=rabbit@localhost
ERL_EPMD_ADDRESS=127.0.0.1
export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
EOF
    fi
    if [[ ! -f /etc/rabbitmq/rabbitmq.conf ]]; then
        log "writing /etc/rabbitmq/rabbitmq.conf (AMQP on 127.0.0.1:5672 only)"
        as_root tee /etc/rabbitmq/rabbitmq.conf >/dev/null <<'EOF'
listeners.tcp.local = 127.0.0.1:5672
management.tcp.ip = 127.0.0.1
EOF
    fi
}

setup_rabbitmq() {
    if port_open "$AMQP_HOST" "$AMQP_PORT"; then
        log "RabbitMQ already listening on $AMQP_HOST:$AMQP_PORT"
    else
        if ! pkg_installed rabbitmq-server; then
            # write the loopback-only config first; policy-rc.d (if any) keeps apt from starting it
            write_rabbit_config
            apt_install rabbitmq-server
        fi
        write_rabbit_config
        if port_open "$AMQP_HOST" "$AMQP_PORT"; then
            log "RabbitMQ came up during installation"
        else
            log "starting RabbitMQ (rabbitmq-server -detached)"
            as_root rabbitmq-server -detached || { rabbit_log_tail; die "rabbitmq-server -detached failed"; }
            local deadline=$((SECONDS + RABBIT_START_TIMEOUT))
            until port_open "$AMQP_HOST" "$AMQP_PORT"; do
                if (( SECONDS >= deadline )); then
                    rabbit_log_tail
                    die "RabbitMQ did not listen on $AMQP_HOST:$AMQP_PORT within ${RABBIT_START_TIMEOUT}s"
                fi
                sleep 1
            done
            log "RabbitMQ listening on $AMQP_HOST:$AMQP_PORT"
        fi
    fi
    if as_root rabbitmqctl -q await_startup --timeout 60 >/dev/null 2>&1; then
        if as_root rabbitmqctl -q authenticate_user guest guest >/dev/null 2>&1; then
            log "RabbitMQ user guest/guest OK"
        else
            warn "rabbitmqctl authenticate_user guest guest failed: the tests expect guest/guest"
        fi
    else
        warn "rabbitmqctl cannot reach the node (port is open, continuing)"
    fi

    # the tests need both plugins: a failure stops the setup
    local p
    for p in "${RABBIT_PLUGINS[@]}"; do
        if grep -qs "$p" /etc/rabbitmq/enabled_plugins && as_root rabbitmq-plugins -q is_enabled "$p" >/dev/null 2>&1; then
            log "RabbitMQ plugin $p already enabled"
        elif as_root rabbitmq-plugins -q enable "$p" >/dev/null 2>&1; then
            log "RabbitMQ plugin $p enabled"
        else
            rabbit_log_tail
            die "could not enable RabbitMQ plugin $p"
        fi
    done
    local deadline=$((SECONDS + 60))
    until port_open 127.0.0.1 "$MANAGEMENT_PORT"; do
        (( SECONDS < deadline )) || die "RabbitMQ management API not listening on 127.0.0.1:$MANAGEMENT_PORT"
        sleep 1
    done
    log "RabbitMQ management API on http://127.0.0.1:$MANAGEMENT_PORT"
}

# ---------------------------------------------------------------- fault proxy
# The outage tests put mitmproxy (with tests/support/fault_proxy.py) between the connector and the
# FHIR server to make it hang or answer 429/503 with Retry-After. Installed once, kept in .services/.
MITM_VERSION="11.0.2"   # the newest release that runs on Python 3.11
MITM_VENV="${IOMT_SERVICES_DIR:-$ROOT/.services}/mitm-venv"
setup_fault_proxy() {
    if [[ -x "$MITM_VENV/bin/mitmdump" ]] && "$MITM_VENV/bin/mitmdump" --version 2>/dev/null | grep -q "Mitmproxy: $MITM_VERSION"; then
        log "mitmproxy $MITM_VERSION already installed in $MITM_VENV"
        return 0
    fi
    local py
    py="$(command -v python3 || true)"
    [[ -n "$py" ]] || die "python3 not found (needed for mitmproxy)"
    log "installing mitmproxy $MITM_VERSION into $MITM_VENV (takes ~30 s)"
    mkdir -p "$(dirname "$MITM_VENV")"
    [[ -f "$(dirname "$MITM_VENV")/.gitignore" ]] || printf '*\n' > "$(dirname "$MITM_VENV")/.gitignore"
    rm -rf "$MITM_VENV"
    if ! "$py" -m venv "$MITM_VENV" 2>/dev/null; then
        rm -rf "$MITM_VENV"
        apt_install python3-venv
        /usr/bin/python3 -m venv "$MITM_VENV" || die "could not create a virtualenv for mitmproxy"
    fi
    "$MITM_VENV/bin/python" -m pip install -q --disable-pip-version-check "mitmproxy==$MITM_VERSION" \
        || die "pip install mitmproxy==$MITM_VERSION failed"
    log "installed $("$MITM_VENV/bin/mitmdump" --version | head -1)"
}

# ---------------------------------------------------------------- browser tests
# The mapping debugger's end-to-end test drives Debian's Chromium with playwright-core (its own
# browser download is not used: executablePath is /usr/bin/chromium).
setup_browser() {
    local need=()
    [[ -x /usr/bin/chromium ]] || need+=(chromium)
    command -v node >/dev/null 2>&1 || need+=(nodejs)
    command -v npm >/dev/null 2>&1 || need+=(npm)
    if ((${#need[@]})); then apt_install "${need[@]}"; fi
    if [[ -d "$ROOT/tests/browser/node_modules/playwright-core" ]]; then
        log "playwright-core already installed in tests/browser"
    else
        log "npm ci in tests/browser (playwright-core)"
        (cd "$ROOT/tests/browser" && npm ci --silent --no-audit --no-fund) || die "npm ci in tests/browser failed"
    fi
    log "browser: $(/usr/bin/chromium --version 2>/dev/null | head -1)"
}

# ---------------------------------------------------------------- Event Hubs tests
# The Event Hubs source keeps ownership and checkpoints in PostgreSQL; its tests talk AMQP 1.0 to the
# repo's Event Hubs-shaped test peer (tests/eventhubs/peer.mjs, on rhea from npm), which CI first
# proves against Microsoft's own client (@azure/event-hubs, tests/eventhubs/prove.mjs).
PG_HOST=127.0.0.1
PG_PORT=5432
setup_postgres() {
    if port_open "$PG_HOST" "$PG_PORT"; then
        log "PostgreSQL already answering on $PG_HOST:$PG_PORT"
    else
        pkg_installed postgresql || apt_install postgresql
        log "starting PostgreSQL"
        as_root service postgresql start >/dev/null 2>&1 || as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start || true
        for _ in $(seq 1 30); do port_open "$PG_HOST" "$PG_PORT" && break; sleep 1; done
        port_open "$PG_HOST" "$PG_PORT" || die "PostgreSQL did not start on $PG_HOST:$PG_PORT"
    fi
    # The tests connect as postgres to database test without a password (trust on loopback, as on
    # this project's machines); say so plainly when that is not the case.
    if command -v psql >/dev/null 2>&1; then
        psql -h "$PG_HOST" -U postgres -d test -Atc 'select 1' >/dev/null 2>&1 \
            || as_root su postgres -c "createdb test" >/dev/null 2>&1 || true
        psql -h "$PG_HOST" -U postgres -d test -Atc 'select 1' >/dev/null 2>&1 \
            || die "cannot connect as postgres to database test on $PG_HOST:$PG_PORT without a password (set IOMT_TEST_PG_URL for the tests)"
    fi
}

setup_eventhubs_peer() {
    command -v node >/dev/null 2>&1 || apt_install nodejs npm
    if [[ -d "$ROOT/tests/eventhubs/node_modules/rhea" && -d "$ROOT/tests/eventhubs/node_modules/@azure/event-hubs" ]]; then
        log "Event Hubs test peer's packages already installed"
    else
        log "npm ci in tests/eventhubs (rhea, @azure/event-hubs)"
        (cd "$ROOT/tests/eventhubs" && npm ci --silent --no-audit --no-fund) || die "npm ci in tests/eventhubs failed"
    fi
    log "proving the Event Hubs test peer against @azure/event-hubs"
    (cd "$ROOT" && node tests/eventhubs/prove.mjs) || die "the Event Hubs test peer failed against Microsoft's client (tests/eventhubs/prove.mjs)"
}

# ---------------------------------------------------------------- run
setup_rabbitmq
"$SCRIPT_DIR/fhir-server.sh" start
# The second FHIR server is for the tests and the bench; IOMT_SETUP_HELIOS=0 leaves it out
# (scripts/quickstart.sh does: a first run should not wait for its build).
[[ "${IOMT_SETUP_HELIOS:-1}" == 0 ]] || "$SCRIPT_DIR/helios-server.sh" start
setup_fault_proxy
setup_browser
setup_postgres
setup_eventhubs_peer

if [[ $BUILD -eq 1 ]]; then
    command -v cargo >/dev/null 2>&1 || die "cargo not found (install a Rust toolchain, or pass --no-build)"
    log "cargo build --release"
    (cd "$ROOT" && cargo build --release)
else
    log "skipping cargo build (--no-build)"
fi

log "ready:"
log "  AMQP  amqp://guest:guest@$AMQP_HOST:$AMQP_PORT/%2f"
log "  FHIR  $("$SCRIPT_DIR/fhir-server.sh" url) (sekmet)"
[[ "${IOMT_SETUP_HELIOS:-1}" == 0 ]] || log "  FHIR  $("$SCRIPT_DIR/helios-server.sh" url) (helios-hfs)"
