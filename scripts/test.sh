#!/usr/bin/env bash
# The one test command: start (or install) RabbitMQ (with its consistent-hash and management
# plugins), the two FHIR servers and the other services (scripts/setup.sh), test the alert rules
# with promtool, then run every test against sekmet, and the pipeline tests (tests/pipeline.rs)
# once more against helios-hfs.
#   scripts/test.sh [cargo test args...]
# The pipeline tests talk to RabbitMQ at IOMT_TEST_AMQP_URL (default 127.0.0.1:5672) and the FHIR
# server at IOMT_TEST_FHIR_URL (default http://127.0.0.1:8090/fhir); they fail when either is absent.
# IOMT_TEST_TIME_LIMIT (seconds, default 2700) bounds the whole run, so a hang fails instead of
# running on.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --no-build

# Every test names its queues `<test>-<pid>-<nanos>...`; those of earlier runs are left on the broker
# (a failed test does not clean up) and, as quorum queues, each keeps a Raft member and a WAL share.
# Remove them through the management API so runs do not pile up on a long-lived broker.
MGMT="${IOMT_TEST_MANAGEMENT_URL:-http://guest:guest@127.0.0.1:15672}"
stale=$(curl -fsS "$MGMT/api/queues/%2f?columns=name" | python3 -c '
import json, re, sys
for q in json.load(sys.stdin):
    if re.match(r"^[a-z0-9]+-[0-9]+-[0-9]+([.]|$)", q["name"]):
        print(q["name"])')
n=0
for q in $stale; do
    curl -fsS -X DELETE "$MGMT/api/queues/%2f/$q" && n=$((n + 1))
done
echo "[test] removed $n queue(s) left by earlier test runs"
alarms=$(rabbitmq-diagnostics -q alarms 2>&1 || true)
if ! grep -qi "no alarms" <<<"$alarms" && [[ -n "$alarms" ]]; then
    echo "[test] WARNING: RabbitMQ reports resource alarms (publishers will block): $alarms" >&2
fi

# The alert rules' unit tests (ops/alerts.test.yml); a failure fails the run, before the long part.
echo "[test] promtool test rules ops/alerts.test.yml"
promtool check rules ops/alerts.yml
promtool test rules ops/alerts.test.yml

# Show what the tests print (outage recovery times, failover times) even when they pass.
export RUST_TEST_NOCAPTURE=1
limit="${IOMT_TEST_TIME_LIMIT:-2700}"
deadline=$((SECONDS + limit))
status=0
timeout --kill-after=30 "$limit" cargo test "$@" || status=$?
# The second FHIR server: the pipeline tests again (only for the full run; with arguments the
# caller chose what to run).
if [[ $status -eq 0 && $# -eq 0 ]]; then
    helios=$(scripts/helios-server.sh url)
    echo "[test] the pipeline tests against the second FHIR server, helios-hfs at $helios"
    left=$((deadline - SECONDS)); (( left > 60 )) || left=60
    IOMT_TEST_FHIR_URL="$helios" timeout --kill-after=30 "$left" cargo test --test pipeline || status=$?
fi
if [[ $status -eq 124 || $status -eq 137 ]]; then
    echo "[test] ERROR: the tests did not finish within $limit s (IOMT_TEST_TIME_LIMIT); broker alarms: $alarms" >&2
fi
exit $status
