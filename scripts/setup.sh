#!/usr/bin/env bash
# Install and start the services the integration tests need, then build the connector.
#
#   scripts/setup.sh              everything below, then `cargo build --release`
#   scripts/setup.sh --no-build   services only
#   scripts/setup.sh --core       only RabbitMQ (with its plugins) and sekmet, then the build:
#                                 what scripts/quickstart.sh needs, not what the tests need
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
#   Event Hubs   tests/eventhubs (rhea test peer, proven against @azure/event-hubs; npm) and
#                .services/eventhub-venv (azure-eventhub from PyPI: the peer proven against it too)
#   promtool     /usr/bin/promtool (Debian package prometheus; tests ops/alerts.yml and the dashboard)
#   TLS          a test CA and certificates in /var/lib/iomt-connector-test/tls (openssl; IOMT_TEST_TLS_DIR); RabbitMQ's TLS listener
#                amqps://127.0.0.1:5671; stunnel4 on 127.0.0.2:5671 for the Event Hubs test peer,
#                reached as iomt-test.servicebus.windows.net (/etc/hosts). See docs/tls.md.
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
CORE=0
for arg in "$@"; do
    case "$arg" in
        --no-build) BUILD=0 ;;
        --core) CORE=1 ;;
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

# pip_venv DIR REQUIREMENT: a fresh virtualenv at DIR (in a git-ignored folder) holding REQUIREMENT;
# python3-venv is installed when the interpreter cannot make one.
pip_venv() {
    local dir="$1" req="$2" py
    py="$(command -v python3 || true)"
    [[ -n "$py" ]] || die "python3 not found (needed for $req)"
    mkdir -p "$(dirname "$dir")"
    [[ -f "$(dirname "$dir")/.gitignore" ]] || printf '*\n' > "$(dirname "$dir")/.gitignore"
    rm -rf "$dir"
    if ! "$py" -m venv "$dir" 2>/dev/null; then
        rm -rf "$dir"
        apt_install python3-venv
        /usr/bin/python3 -m venv "$dir" || die "could not create a virtualenv for $req"
    fi
    "$dir/bin/python" -m pip install -q --disable-pip-version-check "$req" || die "pip install $req failed"
}

# The outage tests put mitmproxy (with tests/support/fault_proxy.py) between the connector and the
# FHIR server to make it hang or answer 429/503 with Retry-After. Installed once, kept in .services/.
MITM_VERSION="11.0.2"   # the newest release that runs on Python 3.11
MITM_VENV="${IOMT_SERVICES_DIR:-$ROOT/.services}/mitm-venv"
setup_fault_proxy() {
    if [[ -x "$MITM_VENV/bin/mitmdump" ]] && "$MITM_VENV/bin/mitmdump" --version 2>/dev/null | grep -q "Mitmproxy: $MITM_VERSION"; then
        log "mitmproxy $MITM_VERSION already installed in $MITM_VENV"
        return 0
    fi
    log "installing mitmproxy $MITM_VERSION into $MITM_VENV (takes ~30 s)"
    pip_venv "$MITM_VENV" "mitmproxy==$MITM_VERSION"
    log "installed $("$MITM_VENV/bin/mitmdump" --version | head -1)"
}

# ---------------------------------------------------------------- browser tests
# The mapping debugger's end-to-end test drives Debian's Chromium with playwright-core (its own
# browser download is not used: executablePath is /usr/bin/chromium), and checks the page with
# axe-core (@axe-core/playwright, which works on playwright-core).
setup_browser() {
    local need=()
    [[ -x /usr/bin/chromium ]] || need+=(chromium)
    command -v node >/dev/null 2>&1 || need+=(nodejs)
    command -v npm >/dev/null 2>&1 || need+=(npm)
    if ((${#need[@]})); then apt_install "${need[@]}"; fi
    # Every package of package.json, not only the first: a dependency added later (axe-core)
    # must reach clones that already ran setup.
    if (cd "$ROOT/tests/browser" && npm ls --all >/dev/null 2>&1); then
        log "tests/browser's npm packages already installed (playwright-core, @axe-core/playwright)"
    else
        log "npm ci in tests/browser (playwright-core, @axe-core/playwright)"
        (cd "$ROOT/tests/browser" && npm ci --silent --no-audit --no-fund) || die "npm ci in tests/browser failed"
    fi
    log "browser: $(/usr/bin/chromium --version 2>/dev/null | head -1)"
}

# ---------------------------------------------------------------- Event Hubs tests
# The Event Hubs source keeps ownership and checkpoints in PostgreSQL; its tests talk AMQP 1.0 to the
# repo's Event Hubs-shaped test peer (tests/eventhubs/peer.mjs, on rhea from npm), which CI first
# proves against Microsoft's own clients: @azure/event-hubs (tests/eventhubs/prove.mjs; rhea too)
# and azure-eventhub (tests/eventhubs/prove.py; its own pure-Python AMQP stack), so that the peer
# is not only what rhea accepts.
EVENTHUB_PY_VERSION="5.15.1"
EVENTHUB_VENV="${IOMT_SERVICES_DIR:-$ROOT/.services}/eventhub-venv"
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
    local m="$ROOT/tests/eventhubs/node_modules"
    if [[ -d "$m/rhea" && -d "$m/@azure/event-hubs" && -d "$m/@azure/eventhubs-checkpointstore-blob" && -d "$m/azurite" ]]; then
        log "Event Hubs test peer's packages already installed"
    else
        log "npm ci in tests/eventhubs (rhea, @azure/event-hubs, @azure/eventhubs-checkpointstore-blob, azurite)"
        (cd "$ROOT/tests/eventhubs" && npm ci --silent --no-audit --no-fund) || die "npm ci in tests/eventhubs failed"
    fi
    log "proving the Event Hubs test peer against @azure/event-hubs"
    (cd "$ROOT" && node tests/eventhubs/prove.mjs) || die "the Event Hubs test peer failed against Microsoft's client (tests/eventhubs/prove.mjs)"
    setup_eventhub_venv
    log "proving the Event Hubs test peer against azure-eventhub $EVENTHUB_PY_VERSION (Python)"
    (cd "$ROOT" && "$EVENTHUB_VENV/bin/python" tests/eventhubs/prove.py) \
        || die "the Event Hubs test peer failed against Microsoft's Python client (tests/eventhubs/prove.py)"
}

# azure-eventhub (PyPI) in its own virtualenv, as mitmproxy is: only prove.py uses it.
setup_eventhub_venv() {
    if [[ -x "$EVENTHUB_VENV/bin/python" ]] && "$EVENTHUB_VENV/bin/python" -c \
        "import sys, azure.eventhub as e; sys.exit(e.__version__ != '$EVENTHUB_PY_VERSION')" 2>/dev/null; then
        log "azure-eventhub $EVENTHUB_PY_VERSION already installed in $EVENTHUB_VENV"
        return 0
    fi
    log "installing azure-eventhub $EVENTHUB_PY_VERSION into $EVENTHUB_VENV"
    pip_venv "$EVENTHUB_VENV" "azure-eventhub==$EVENTHUB_PY_VERSION"
}


# ---------------------------------------------------------------- Azurite
# The Blob checkpoint store's tests (tests/eventhubs.rs, blob_*) run against Azurite, Microsoft's
# Storage emulator (npm azurite, installed with the test peer's packages), as two blob services:
# plain HTTP with Shared Key on 127.0.0.1:10000 (the well-known development account), and HTTPS
# with the test CA's server certificate and bearer tokens (--oauth basic: Azurite checks a token's
# issuer, audience and times, not its signature) on 127.0.0.1:10100, for managed identity and a
# custom CA. Like stunnel, one per machine (fixed ports), kept in $AZURITE_DIR.
AZURITE_DIR="${IOMT_TEST_AZURITE_DIR:-/var/lib/iomt-connector-test/azurite}"
AZURITE_PORT=10000
AZURITE_TLS_PORT=10100

# azurite_is_up PORT SCHEME: Azurite's blob service answers there (its Server header says so).
azurite_is_up() {
    curl -s -o /dev/null -D - --max-time 5 ${3:-} "$2://127.0.0.1:$1/devstoreaccount1?comp=list" 2>/dev/null \
        | grep -qi '^server: Azurite-Blob'
}

# start_azurite NAME PORT SCHEME [azurite-blob options]: one blob service, unless it answers.
start_azurite() {
    local name="$1" port="$2" scheme="$3"; shift 3
    local curl_ca=""
    [[ "$scheme" == https ]] && curl_ca="--cacert $TLS_DIR/ca.pem"
    if azurite_is_up "$port" "$scheme" "$curl_ca"; then
        log "Azurite ($name) already answering on $scheme://127.0.0.1:$port"
        return 0
    fi
    port_open 127.0.0.1 "$port" && die "127.0.0.1:$port is taken by something that is not Azurite's blob service over $scheme"
    local dir="$AZURITE_DIR/$name"
    mkdir -p "$dir"
    log "starting Azurite ($name) on $scheme://127.0.0.1:$port"
    # setsid: it outlives this script (and a CI run's shell), as the other test services do.
    setsid "$ROOT/tests/eventhubs/node_modules/.bin/azurite-blob" --blobHost 127.0.0.1 --blobPort "$port" \
        --location "$dir" --skipApiVersionCheck --loose --silent "$@" >"$dir/azurite.log" 2>&1 < /dev/null &
    local deadline=$((SECONDS + 30))
    until azurite_is_up "$port" "$scheme" "$curl_ca"; do
        (( SECONDS < deadline )) || { tail -n 20 "$dir/azurite.log" >&2; die "Azurite ($name) did not answer on $scheme://127.0.0.1:$port"; }
        sleep 0.5
    done
}

setup_azurite() {
    command -v curl >/dev/null 2>&1 || apt_install curl
    [[ -x "$ROOT/tests/eventhubs/node_modules/.bin/azurite-blob" ]] || die "azurite is not installed in tests/eventhubs (npm ci there)"
    start_azurite http "$AZURITE_PORT" http
    start_azurite https "$AZURITE_TLS_PORT" https --oauth basic --cert "$TLS_DIR/server.pem" --key "$TLS_DIR/server.key"
}

# ---------------------------------------------------------------- TLS
# The TLS tests (tests/tls.rs) need a CA of their own: RabbitMQ's TLS listener and the Event Hubs
# test peer's TLS terminator present certificates it signed, and the connector is told to trust it.
# A second, unrelated CA is what a wrong broker.tls_ca_file looks like. Made once; kept in
# /var/lib/iomt-connector-test/tls (outside the checkout). The test CA is not added to the system trust store: the tests must
# show that broker.tls_ca_file is what makes the broker trusted, and a wrong one must fail, which
# a system-wide trusted test CA would hide (the connector's rustls also trusts the system roots).
# It is name-constrained to loopback names all the same: its key lies on disk unprotected.
# One per machine, not per checkout: every clone on it (a CI run's among them) uses the same CA, so
# RabbitMQ's listener and stunnel are set up once rather than restarted for each clone.
TLS_DIR="${IOMT_TEST_TLS_DIR:-/var/lib/iomt-connector-test/tls}"
AMQPS_PORT=5671
# The namespace the Event Hubs TLS test connects to, as the connector would a real one (port 5671,
# TLS, the name checked against the certificate). 127.0.0.1:5671 is RabbitMQ's, so stunnel takes
# another loopback address and /etc/hosts points the name there.
EH_TLS_HOST=iomt-test.servicebus.windows.net
EH_TLS_ADDR=127.0.0.2
# Where stunnel forwards to: the test starts its Event Hubs test peer on this port.
EH_TLS_BACKEND_PORT=5680

# make_ca NAME SUBJECT [EXTRA-EXTENSIONS]: a self-signed CA, unless NAME.pem exists.
make_ca() {
    local name="$1" subject="$2" extra="${3:-}"
    [[ -s "$TLS_DIR/$name.pem" && -s "$TLS_DIR/$name.key" ]] && return 0
    log "making test CA $TLS_DIR/$name.pem ($subject)"
    openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 -subj "$subject" \
        -keyout "$TLS_DIR/$name.key" -out "$TLS_DIR/$name.pem" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        ${extra:+-addext "$extra"} 2>/dev/null || die "openssl could not make the test CA $name"
    # A new CA invalidates everything signed by the old one.
    [[ "$name" == ca ]] && rm -f "$TLS_DIR"/server.pem "$TLS_DIR"/client.pem
    return 0
}

# make_cert NAME SUBJECT EXTENSIONS: a key and a certificate signed by the test CA, unless
# NAME.pem exists and the CA verifies it.
make_cert() {
    local name="$1" subject="$2" ext="$3"
    if [[ -s "$TLS_DIR/$name.pem" && -s "$TLS_DIR/$name.key" ]] \
        && openssl verify -CAfile "$TLS_DIR/ca.pem" "$TLS_DIR/$name.pem" >/dev/null 2>&1; then
        return 0
    fi
    log "making test certificate $TLS_DIR/$name.pem ($subject)"
    openssl req -new -newkey rsa:2048 -nodes -sha256 -subj "$subject" \
        -keyout "$TLS_DIR/$name.key" -out "$TLS_DIR/$name.csr" 2>/dev/null \
        || die "openssl could not make the key for $name"
    printf '%s\n' "$ext" > "$TLS_DIR/$name.ext"
    openssl x509 -req -sha256 -days 3650 -in "$TLS_DIR/$name.csr" -CA "$TLS_DIR/ca.pem" -CAkey "$TLS_DIR/ca.key" \
        -CAcreateserial -CAserial "$TLS_DIR/ca.srl" -extfile "$TLS_DIR/$name.ext" -out "$TLS_DIR/$name.pem" 2>/dev/null \
        || die "openssl could not sign the certificate $name"
    rm -f "$TLS_DIR/$name.csr" "$TLS_DIR/$name.ext"
}

setup_tls_certs() {
    command -v openssl >/dev/null 2>&1 || apt_install openssl
    [[ -d "$TLS_DIR" ]] || { as_root mkdir -p "$TLS_DIR" && as_root chown "$(id -u):$(id -g)" "$TLS_DIR"; }
    chmod 700 "$TLS_DIR"
    make_ca ca "/CN=iomt-connector test CA" \
        "nameConstraints=critical,permitted;DNS:localhost,permitted;DNS:$EH_TLS_HOST,permitted;IP:127.0.0.0/255.0.0.0"
    make_ca other-ca "/CN=iomt-connector unrelated test CA"
    make_cert server "/CN=localhost" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1,DNS:$EH_TLS_HOST,IP:$EH_TLS_ADDR"
    make_cert client "/CN=iomt-connector test client" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth
subjectAltName=DNS:client.localhost"
    # A client certificate from the unrelated CA: what a TLS listener with verify_peer must refuse.
    if [[ ! -s "$TLS_DIR/other-client.pem" || ! -s "$TLS_DIR/other-client.key" ]] \
        || ! openssl verify -CAfile "$TLS_DIR/other-ca.pem" "$TLS_DIR/other-client.pem" >/dev/null 2>&1; then
        log "making $TLS_DIR/other-client.pem (signed by the unrelated CA)"
        openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 -subj "/CN=iomt-connector stranger" \
            -CA "$TLS_DIR/other-ca.pem" -CAkey "$TLS_DIR/other-ca.key" \
            -addext "basicConstraints=critical,CA:FALSE" -addext "extendedKeyUsage=clientAuth" \
            -keyout "$TLS_DIR/other-client.key" -out "$TLS_DIR/other-client.pem" 2>/dev/null \
            || die "openssl could not make other-client.pem"
    fi
    chmod 600 "$TLS_DIR"/*.key
    log "test CA and certificates in $TLS_DIR"
}

# tls_verifies ADDRESS NAME [s_client options]: the handshake at ADDRESS presents a certificate
# valid for NAME. Read from s_client's verdict rather than its exit status, which also reflects
# what happens after the handshake (stunnel closes at once while no test peer is behind it).
tls_verifies() {
    local addr="$1" name="$2"
    shift 2
    # Read whole before it is searched: `grep -q` leaving early would end s_client with SIGPIPE,
    # which pipefail reports as a failed check.
    local out
    out="$(openssl s_client -connect "$addr" -servername "$name" -verify_hostname "$name" "$@" </dev/null 2>&1 || true)"
    grep -q 'Verify return code: 0 (ok)' <<<"$out"
}

# The marked block setup.sh keeps in rabbitmq.conf; everything outside it is the operator's.
RABBIT_TLS_BEGIN="# BEGIN iomt-connector test TLS listener (scripts/setup.sh; docs/tls.md)"
RABBIT_TLS_END="# END iomt-connector test TLS listener"

# rabbit_block FILE BEGIN END print|drop: the block marked BEGIN ... END alone, or the file without
# it (lines compared whole, so the markers need no escaping).
rabbit_block() {
    as_root awk -v b="$2" -v e="$3" -v mode="$4" '
        $0 == b { inblock = 1 }
        (mode == "print") == (inblock == 1) { print }
        $0 == e { inblock = 0 }' "$1" 2>/dev/null || true
}

# rabbit_tls_block FILE print|drop: the TLS block.
rabbit_tls_block() { rabbit_block "$1" "$RABBIT_TLS_BEGIN" "$RABBIT_TLS_END" "$2"; }

# rabbit_restart [WHY]: restarts the node and waits for its AMQP, AMQPS (and, once configured, MQTT)
# listeners.
rabbit_restart() {
    log "restarting RabbitMQ to load ${1:-its TLS listener}"
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet rabbitmq-server 2>/dev/null; then
        as_root systemctl restart rabbitmq-server || { rabbit_log_tail; die "systemctl restart rabbitmq-server failed"; }
    else
        as_root rabbitmqctl -q shutdown >/dev/null 2>&1 || as_root rabbitmqctl -q stop >/dev/null 2>&1 || true
        local deadline=$((SECONDS + 60))
        while port_open "$AMQP_HOST" "$AMQP_PORT"; do
            (( SECONDS < deadline )) || die "RabbitMQ did not stop within 60 s"
            sleep 1
        done
        as_root rabbitmq-server -detached || { rabbit_log_tail; die "rabbitmq-server -detached failed"; }
    fi
    local deadline=$((SECONDS + RABBIT_START_TIMEOUT))
    until port_open "$AMQP_HOST" "$AMQP_PORT" && port_open "$AMQP_HOST" "$AMQPS_PORT"; do
        if (( SECONDS >= deadline )); then
            rabbit_log_tail
            die "RabbitMQ did not listen on $AMQP_HOST:$AMQP_PORT and :$AMQPS_PORT within ${RABBIT_START_TIMEOUT}s after its restart"
        fi
        sleep 1
    done
    as_root rabbitmqctl -q await_startup --timeout 60 >/dev/null 2>&1 || warn "rabbitmqctl await_startup failed after the restart"
    if rabbit_block /etc/rabbitmq/rabbitmq.conf "$RABBIT_MQTT_BEGIN" "$RABBIT_MQTT_END" print | grep -q listeners; then
        deadline=$((SECONDS + 60))
        until port_open "$AMQP_HOST" "$MQTT_PORT"; do
            (( SECONDS < deadline )) || { rabbit_log_tail; die "RabbitMQ's MQTT listener is not on $AMQP_HOST:$MQTT_PORT after its restart"; }
            sleep 1
        done
    fi
}

# RabbitMQ's MQTT plugin (docs/mqtt.md) on a port of its own, 127.0.0.1:1884 (1883 is often
# Mosquitto's), publishing into amq.topic; MQTT clients sign in as guest/guest (no anonymous
# access; guest is let in from loopback only, as over AMQP). tests/mqtt.rs publishes with
# mosquitto_pub and bridges a Mosquitto of its own to it, so both are installed.
MQTT_PORT="${IOMT_MQTT_PORT:-1884}"
RABBIT_MQTT_BEGIN="# BEGIN iomt-connector test MQTT listener (scripts/setup.sh; docs/mqtt.md)"
RABBIT_MQTT_END="# END iomt-connector test MQTT listener"
setup_rabbitmq_mqtt() {
    local changed=0 conf=/etc/rabbitmq/rabbitmq.conf block current
    command -v mosquitto_pub >/dev/null 2>&1 || apt_install mosquitto-clients
    # The broker itself, for the bridge test; Debian's package starts it on 1883 where it can.
    command -v mosquitto >/dev/null 2>&1 || [[ -x /usr/sbin/mosquitto ]] || apt_install mosquitto
    # Enabled offline, then loaded by the restart below: enabled on the running node it would
    # start its listener on 1883 before the port below is read. Enabled before its keys are
    # written: a node refuses to boot on keys of a plugin that is not enabled.
    if ! grep -qs rabbitmq_mqtt /etc/rabbitmq/enabled_plugins; then
        as_root rabbitmq-plugins -q enable --offline rabbitmq_mqtt >/dev/null || die "could not enable RabbitMQ plugin rabbitmq_mqtt"
        log "RabbitMQ plugin rabbitmq_mqtt enabled"
        changed=1
    fi
    block="$RABBIT_MQTT_BEGIN
mqtt.listeners.tcp.default = $AMQP_HOST:$MQTT_PORT
mqtt.allow_anonymous = false
mqtt.vhost = /
mqtt.exchange = amq.topic
$RABBIT_MQTT_END"
    current="$(rabbit_block "$conf" "$RABBIT_MQTT_BEGIN" "$RABBIT_MQTT_END" print)"
    if [[ "$current" != "$block" ]]; then
        if rabbit_block "$conf" "$RABBIT_MQTT_BEGIN" "$RABBIT_MQTT_END" drop | grep -qE '^[[:space:]]*mqtt\.'; then
            die "$conf already configures MQTT (mqtt.*) outside setup.sh's block: the tests need the listener described in docs/mqtt.md on $AMQP_HOST:$MQTT_PORT; remove those lines or adapt them"
        fi
        log "writing RabbitMQ's MQTT listener ($AMQP_HOST:$MQTT_PORT) into $conf"
        local tmp
        tmp="$(mktemp)"
        { rabbit_block "$conf" "$RABBIT_MQTT_BEGIN" "$RABBIT_MQTT_END" drop; printf '%s\n' "$block"; } > "$tmp"
        as_root install -m 0644 "$tmp" "$conf"
        rm -f "$tmp"
        changed=1
    fi
    if (( changed )) || ! port_open "$AMQP_HOST" "$MQTT_PORT"; then
        rabbit_restart "its MQTT listener"
    else
        log "RabbitMQ MQTT listener already on $AMQP_HOST:$MQTT_PORT"
    fi
    mosquitto_pub -h "$AMQP_HOST" -p "$MQTT_PORT" -u guest -P guest -q 1 -t iomt/setup/probe -m '{}' \
        || die "mosquitto_pub as guest to RabbitMQ's MQTT listener on $AMQP_HOST:$MQTT_PORT failed"
}

# RabbitMQ's TLS listener on 127.0.0.1:5671 next to the plain one. verify_peer with
# fail_if_no_peer_cert = false: a client without a certificate is let in (it signs in with its
# user and password, as on 5672), one with a certificate is let in only if the test CA signed it;
# so one listener serves both the plain-TLS and the mutual-TLS tests.
setup_rabbitmq_tls() {
    local dest=/etc/rabbitmq/tls f changed=0
    # Copies, owned by the broker's user: the node must not depend on this checkout's path or its
    # permissions (the test CA folder is private to root).
    as_root mkdir -p "$dest"
    for f in ca.pem server.pem server.key; do
        if ! as_root cmp -s "$TLS_DIR/$f" "$dest/$f"; then
            as_root install -m 0640 "$TLS_DIR/$f" "$dest/$f"
            changed=1
        fi
    done
    if id rabbitmq >/dev/null 2>&1; then as_root chown -R root:rabbitmq "$dest"; as_root chmod 0750 "$dest"; fi
    local block
    block="$RABBIT_TLS_BEGIN
listeners.ssl.default = $AMQP_HOST:$AMQPS_PORT
ssl_options.cacertfile = $dest/ca.pem
ssl_options.certfile = $dest/server.pem
ssl_options.keyfile = $dest/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
$RABBIT_TLS_END"
    local conf=/etc/rabbitmq/rabbitmq.conf current
    current="$(rabbit_tls_block "$conf" print)"
    if [[ "$current" != "$block" ]]; then
        if rabbit_tls_block "$conf" drop | grep -qE '^[[:space:]]*(listeners\.ssl|ssl_options)\.'; then
            die "$conf already configures TLS (listeners.ssl / ssl_options) outside setup.sh's block: the tests need the listener described in docs/tls.md on $AMQP_HOST:$AMQPS_PORT; remove those lines or adapt them"
        fi
        log "writing RabbitMQ's TLS listener ($AMQP_HOST:$AMQPS_PORT) into $conf"
        { rabbit_tls_block "$conf" drop; printf '%s\n' "$block"; } > "$TLS_DIR/rabbitmq.conf.new"
        as_root install -m 0644 "$TLS_DIR/rabbitmq.conf.new" "$conf"
        rm -f "$TLS_DIR/rabbitmq.conf.new"
        changed=1
    fi
    # A node started before the listener was configured (or that failed to open it) needs the
    # restart as well; an unchanged configuration with the listener up needs nothing.
    if (( changed )) || ! port_open "$AMQP_HOST" "$AMQPS_PORT"; then
        rabbit_restart
    else
        log "RabbitMQ TLS listener already on $AMQP_HOST:$AMQPS_PORT"
    fi
    tls_verifies "$AMQP_HOST:$AMQPS_PORT" localhost -CAfile "$TLS_DIR/ca.pem" \
        || die "the TLS listener on $AMQP_HOST:$AMQPS_PORT does not present a certificate the test CA verifies for localhost"
}

# The Event Hubs test peer speaks plain AMQP; Event Hubs itself is TLS on 5671. stunnel (Debian's
# stunnel4) terminates TLS for the namespace name and forwards to the peer the TLS test starts on
# 127.0.0.1:$EH_TLS_BACKEND_PORT, so the connector goes through its ordinary namespace code path
# (no custom_endpoint).
setup_eventhubs_tls() {
    pkg_installed stunnel4 || apt_install stunnel4
    # The SDK's AMQP TLS (azure_core_amqp: rustls with rustls-platform-verifier) takes no CA of its
    # own; on Linux it reads the system store, or SSL_CERT_FILE when set. The TLS test sets that for
    # the connector it starts, so the test CA stays out of this machine's trust store.
    if ! grep -qE "^$EH_TLS_ADDR[[:space:]]+$EH_TLS_HOST([[:space:]]|\$)" /etc/hosts; then
        log "mapping $EH_TLS_HOST to $EH_TLS_ADDR in /etc/hosts"
        printf '%s %s  # iomt-connector Event Hubs TLS test (scripts/setup.sh)\n' "$EH_TLS_ADDR" "$EH_TLS_HOST" \
            | as_root tee -a /etc/hosts >/dev/null
    fi
    local dir="$TLS_DIR/stunnel" conf
    mkdir -p "$dir"
    conf="pid = $dir/stunnel.pid
output = $dir/stunnel.log
foreground = no
[eventhubs-test]
accept = $EH_TLS_ADDR:$AMQPS_PORT
connect = 127.0.0.1:$EH_TLS_BACKEND_PORT
cert = $TLS_DIR/server.pem
key = $TLS_DIR/server.key"
    local running=0 pid
    if [[ -s "$dir/stunnel.pid" ]] && kill -0 "$(cat "$dir/stunnel.pid")" 2>/dev/null; then running=1; fi
    # A stunnel started from elsewhere (an older set-up, another test CA) holding the address: stop it.
    for pid in $(ss -ltnpH "sport = :$AMQPS_PORT" 2>/dev/null | grep -F "$EH_TLS_ADDR:" | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u); do
        if (( running )) && [[ "$pid" == "$(cat "$dir/stunnel.pid")" ]]; then continue; fi
        if [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == stunnel* ]]; then
            log "stopping a stunnel (pid $pid) that is not this set-up's, on $EH_TLS_ADDR:$AMQPS_PORT"
            as_root kill "$pid" 2>/dev/null || true
            sleep 1
        fi
    done
    if (( running )) && [[ "$(cat "$dir/stunnel.conf" 2>/dev/null)" == "$conf" ]] && port_open "$EH_TLS_ADDR" "$AMQPS_PORT"; then
        log "stunnel already terminating TLS on $EH_TLS_ADDR:$AMQPS_PORT"
    else
        if (( running )); then
            log "restarting stunnel (its configuration changed)"
            kill "$(cat "$dir/stunnel.pid")" 2>/dev/null || true
            sleep 1
        fi
        printf '%s\n' "$conf" > "$dir/stunnel.conf"
        log "starting stunnel: TLS on $EH_TLS_ADDR:$AMQPS_PORT -> 127.0.0.1:$EH_TLS_BACKEND_PORT"
        local bin
        bin="$(command -v stunnel4 || command -v stunnel)" || die "stunnel4 is installed but neither stunnel4 nor stunnel is on PATH"
        "$bin" "$dir/stunnel.conf" \
            || { tail -n 20 "$dir/stunnel.log" >&2 2>/dev/null; die "stunnel did not start ($dir/stunnel.conf)"; }
        local deadline=$((SECONDS + 15))
        until port_open "$EH_TLS_ADDR" "$AMQPS_PORT"; do
            (( SECONDS < deadline )) || { tail -n 20 "$dir/stunnel.log" >&2 2>/dev/null; die "stunnel is not listening on $EH_TLS_ADDR:$AMQPS_PORT"; }
            sleep 0.5
        done
    fi
    # By name, so that the /etc/hosts line is checked too.
    tls_verifies "$EH_TLS_HOST:$AMQPS_PORT" "$EH_TLS_HOST" -CAfile "$TLS_DIR/ca.pem" \
        || die "stunnel on $EH_TLS_ADDR:$AMQPS_PORT does not present a certificate the test CA verifies for $EH_TLS_HOST, or $EH_TLS_HOST does not resolve to $EH_TLS_ADDR (getent hosts $EH_TLS_HOST)"
}

# ---------------------------------------------------------------- promtool
# The alert rules (ops/alerts.yml) are unit-tested with `promtool test rules` (scripts/test.sh), and
# tests/ops.rs lints a live /metrics and parses the dashboard's queries with it. Debian's
# prometheus package carries promtool; policy-rc.d or the lack of systemd keeps its server from
# starting in CI containers, and where it does start nothing here uses it.
setup_promtool() {
    if command -v promtool >/dev/null 2>&1; then
        log "promtool already installed ($(promtool --version 2>&1 | head -1))"
        return 0
    fi
    apt_install prometheus
    command -v promtool >/dev/null 2>&1 || die "the prometheus package is installed but promtool is not on PATH"
    log "installed $(promtool --version 2>&1 | head -1)"
}

# ---------------------------------------------------------------- run
# Each step's wall time goes to the log, so that what a set-up costs can be read from it later.
timed() {
    local start=$SECONDS
    "$@"
    log "step '$*' took $((SECONDS - start)) s"
}

timed setup_rabbitmq
if [[ $CORE -eq 0 ]]; then
    timed setup_tls_certs
    timed setup_rabbitmq_tls
    timed setup_rabbitmq_mqtt
fi
timed "$SCRIPT_DIR/fhir-server.sh" start
if [[ $CORE -eq 0 ]]; then
    # The second FHIR server is for the tests and the bench; IOMT_SETUP_HELIOS=0 leaves it out.
    [[ "${IOMT_SETUP_HELIOS:-1}" == 0 ]] || timed "$SCRIPT_DIR/helios-server.sh" start
    timed setup_fault_proxy
    timed setup_browser
    timed setup_postgres
    timed setup_eventhubs_peer
    timed setup_eventhubs_tls
    timed setup_azurite
    timed setup_promtool
fi

if [[ $BUILD -eq 1 ]]; then
    command -v cargo >/dev/null 2>&1 || die "cargo not found (install a Rust toolchain, or pass --no-build)"
    log "cargo build --release"
    build_release() { (cd "$ROOT" && cargo build --release); }
    timed build_release
else
    log "skipping cargo build (--no-build)"
fi

log "ready:"
log "  AMQP  amqp://guest:guest@$AMQP_HOST:$AMQP_PORT/%2f"
[[ $CORE -eq 1 ]] || log "  AMQPS amqps://guest:guest@localhost:$AMQPS_PORT/%2f (CA $TLS_DIR/ca.pem)"
log "  FHIR  $("$SCRIPT_DIR/fhir-server.sh" url) (sekmet)"
[[ $CORE -eq 1 || "${IOMT_SETUP_HELIOS:-1}" == 0 ]] || log "  FHIR  $("$SCRIPT_DIR/helios-server.sh" url) (helios-hfs)"
