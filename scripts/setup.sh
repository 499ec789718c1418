#!/usr/bin/env bash
# Install and start the services the integration tests need, then build the connector.
#
#   scripts/setup.sh              RabbitMQ + FHIR server, then `cargo build --release`
#   scripts/setup.sh --no-build   services only
#
# Safe to re-run: each step checks first and does nothing when its service already answers.
#   RabbitMQ     amqp://guest:guest@127.0.0.1:5672/%2f   (Debian package rabbitmq-server)
#   FHIR R4      http://127.0.0.1:8090/fhir               (sekmet-fhir from PyPI, see scripts/fhir-server.sh)
# Runs as root on Debian 12; uses sudo when not root and sudo exists.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"

AMQP_HOST=127.0.0.1
AMQP_PORT=5672
RABBIT_START_TIMEOUT="${RABBIT_START_TIMEOUT:-90}"
RABBIT_PLUGINS=(rabbitmq_consistent_hash_exchange)

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

    # optional plugins: never fatal
    local p
    for p in "${RABBIT_PLUGINS[@]}"; do
        if grep -qs "$p" /etc/rabbitmq/enabled_plugins; then
            log "RabbitMQ plugin $p already enabled"
        elif as_root rabbitmq-plugins -q enable "$p" >/dev/null 2>&1 \
            || as_root rabbitmq-plugins -q enable --offline "$p" >/dev/null 2>&1; then
            log "RabbitMQ plugin $p enabled"
        else
            warn "could not enable RabbitMQ plugin $p (optional)"
        fi
    done
}

# ---------------------------------------------------------------- run
setup_rabbitmq
"$SCRIPT_DIR/fhir-server.sh" start

if [[ $BUILD -eq 1 ]]; then
    command -v cargo >/dev/null 2>&1 || die "cargo not found (install a Rust toolchain, or pass --no-build)"
    log "cargo build --release"
    (cd "$ROOT" && cargo build --release)
else
    log "skipping cargo build (--no-build)"
fi

log "ready:"
log "  AMQP  amqp://guest:guest@$AMQP_HOST:$AMQP_PORT/%2f"
log "  FHIR  $("$SCRIPT_DIR/fhir-server.sh" url)"
