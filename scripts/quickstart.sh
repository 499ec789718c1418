#!/usr/bin/env bash
# Runs the connector on the sample mappings, publishes the sample messages, waits until they are
# written, shows the Observations on the FHIR server, and stops the connector.
#   scripts/quickstart.sh            (runs scripts/setup.sh first when RabbitMQ or the FHIR server is missing)
set -euo pipefail
cd "$(dirname "$0")/.."

# One command on a fresh machine: install and start what is missing.
if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null || ! scripts/fhir-server.sh status > /dev/null 2>&1; then
    echo "RabbitMQ or the FHIR server is not running: scripts/setup.sh first"
    IOMT_SETUP_HELIOS=0 scripts/setup.sh
fi

BIN=target/release/iomt-connector
[[ -x $BIN ]] || cargo build --release
FHIR=${IOMT_FHIR__BASE_URL:-http://127.0.0.1:8090/fhir}
export IOMT_BROKER__QUEUE=${IOMT_BROKER__QUEUE:-iomt.quickstart}
export IOMT_HTTP__LISTEN=${IOMT_HTTP__LISTEN:-127.0.0.1:8080}
HTTP=http://$IOMT_HTTP__LISTEN

"$BIN" validate --device-mapping mappings/devicecontent.json --fhir-mapping mappings/fhirmapping.json
"$BIN" run > .quickstart.log 2>&1 &
PID=$!
trap 'kill -TERM $PID 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
    curl -fsS "$HTTP/health/ready" > /dev/null 2>&1 && break
    kill -0 $PID 2>/dev/null || { cat .quickstart.log; exit 1; }
    sleep 0.2
done
curl -fsS "$HTTP/health/ready"; echo

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
