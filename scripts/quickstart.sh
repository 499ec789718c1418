#!/usr/bin/env bash
# Runs the connector on the sample mappings, publishes the sample messages, waits until they are
# written, shows the Observations on the FHIR server, and stops the connector.
#
#   scripts/quickstart.sh
#
# Prerequisites (Debian 12, as root or with sudo): curl, git, build-essential (a C compiler and
# linker for the build), and Rust stable 1.85 or later from rustup (https://rustup.rs): Debian's
# own rustc is too old for edition 2024.
# When RabbitMQ or the FHIR server is not running, it first runs `scripts/setup.sh --core`, which
# installs only RabbitMQ (Debian package), the FHIR server sekmet (PyPI) and builds the connector;
# not the other test services. Times are printed at the end (docs/testing.md has measured ones).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS

die() { printf 'quickstart: %s\n' "$*" >&2; exit 1; }

# What setup cannot install itself: say so before anything is installed.
command -v curl >/dev/null 2>&1 || die "curl is missing: apt-get install curl"
command -v cc >/dev/null 2>&1 || die "no C compiler: apt-get install build-essential"
command -v cargo >/dev/null 2>&1 \
    || die "cargo is missing: install Rust with rustup (https://rustup.rs); Debian's rustc is too old for edition 2024"
rust=$(rustc --version | awk '{print $2}')
if [[ "$(printf '%s\n1.85.0\n' "$rust" | sort -V | head -1)" != 1.85.0 ]]; then
    die "rustc $rust is older than 1.85 (edition 2024): rustup update stable"
fi

# One command on a fresh machine: install and start what is missing.
if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null || ! scripts/fhir-server.sh status > /dev/null 2>&1; then
    echo "RabbitMQ or the FHIR server is not running: scripts/setup.sh --core first"
    scripts/setup.sh --core
fi
setup_done=$SECONDS

BIN=${CARGO_TARGET_DIR:-target}/release/iomt-connector
cargo build --release
built=$SECONDS
FHIR=${IOMT_FHIR__BASE_URL:-http://127.0.0.1:8090/fhir}
export IOMT_BROKER__QUEUE=${IOMT_BROKER__QUEUE:-iomt.quickstart}
export IOMT_HTTP__LISTEN=${IOMT_HTTP__LISTEN:-127.0.0.1:8080}
HTTP=http://$IOMT_HTTP__LISTEN

"$BIN" validate --device-mapping mappings/devicecontent.json --fhir-mapping mappings/fhirmapping.json
"$BIN" run > .quickstart.log 2>&1 &
PID=$!
trap 'kill -TERM $PID 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
    "$BIN" health --url "$HTTP/health/ready" > /dev/null 2>&1 && break
    kill -0 $PID 2>/dev/null || { cat .quickstart.log; exit 1; }
    sleep 0.2
done
"$BIN" health --url "$HTTP/health/ready"

"$BIN" publish mappings/messages/*.json
n=$(ls mappings/messages/*.json | wc -l)
for _ in $(seq 1 100); do
    acked=$(curl -fsS "$HTTP/metrics" | awk '/^iomt_messages_acked_total/ {print $2}')
    [[ ${acked%.*} -ge $n ]] && break
    sleep 0.2
done
echo "connector metrics:"
curl -fsS "$HTTP/metrics" | grep -E '^iomt_(messages|observations|dead_lettered)' || true

echo
echo "Observations on $FHIR (patient-001's):"
patient=$(printf '_patient-001' | sha256sum | cut -d' ' -f1)
curl -fsS "$FHIR/Observation?subject=Patient/$patient&_count=50" | python3 -c '
import json, sys
b = json.load(sys.stdin)
entries = b.get("entry", [])
for e in entries:
    o = e["resource"]
    kind = next((k for k in o if k.startswith("value")), "component")
    print("  Observation/%s...  %-16s %s  %s" % (o["id"][:12], o["code"]["text"], o["effectivePeriod"]["start"], kind))
print("  (%d Observations)" % len(entries))'
echo "(browse: $FHIR/Observation?subject=Patient/$patient)"
kill -TERM $PID; wait $PID || true; trap - EXIT
tail -1 .quickstart.log
echo "quickstart took $((SECONDS - started)) s: set-up $((setup_done - started)) s, build $((built - setup_done)) s, the run $((SECONDS - built)) s"
