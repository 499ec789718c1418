#!/usr/bin/env bash
# The Event Hubs row of the benchmark: the same events read by a bare consumer (Microsoft's SDK,
# counting only: examples/eh_consumer.rs) and by the connector with --dry-run, from the repo's
# Event Hubs test peer (tests/eventhubs/peer.mjs) on this machine, with the checkpoint store on
# PostgreSQL. Prints one markdown table. Called by scripts/bench.sh; alone:
#   scripts/bench-eventhubs.sh        (after scripts/setup.sh; BENCH_EH_N events, default 200000:
#   fewer and the start-up and the last flush weigh on the rate)
set -euo pipefail
cd "$(dirname "$0")/.."

N=${BENCH_EH_N:-200000}
RUN=ehbench-$(date +%s)
cargo build --release --quiet --bin iomt-connector --example eh_consumer
BIN=target/release/iomt-connector
TICK=$(getconf CLK_TCK)
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cpu_secs() { awk -v t="$TICK" '{print ($14+$15)/t}' "/proc/$1/stat"; }

PEER_PORT=$(port)
DATA=$(mktemp -d)
PARTITIONS=4
node tests/eventhubs/peer.mjs --port "$PEER_PORT" --data "$DATA" --partitions $PARTITIONS > /dev/null &
PEER=$!
trap 'kill $PEER 2>/dev/null; rm -rf "$DATA"' EXIT
sleep 1
export IOMT_EVENTHUBS__CONNECTION_STRING="Endpoint=sb://127.0.0.1:$PEER_PORT;SharedAccessKeyName=bench;SharedAccessKey=YmVuY2g="
export IOMT_EVENTHUBS__CUSTOM_ENDPOINT="amqp://127.0.0.1:$PEER_PORT"

declare -A ROW
for profile in vitals spot; do
    hub=$RUN-$profile
    devices=$([[ $profile == vitals ]] && echo 100 || echo 5000)
    "$BIN" simulate --eventhub "$hub" --profile "$profile" --devices "$devices" --count "$N" --rate 0 > /dev/null 2>&1

    target/release/examples/eh_consumer "$hub" "$N" > /tmp/$hub.bare &
    pid=$!; wait $pid
    secs=$(awk '{print $4}' /tmp/$hub.bare)
    ROW[$profile,bare]=$(echo "$N / $secs" | bc)
    ROW[$profile,bare_cpu]=$(awk -v n="$N" '$(NF-1) ~ /^[0-9.]+$/ {printf "%.1f", $(NF-1) * 100000 / n; next} {print "n/a"}' /tmp/$hub.bare)

    HTTP=127.0.0.1:$(port)
    env IOMT_SOURCE__KIND=eventhubs IOMT_EVENTHUBS__HUB="$hub" IOMT_EVENTHUBS__DEAD_LETTER_HUB="$hub-dl" \
        IOMT_EVENTHUBS__CHECKPOINT_POSTGRES_URL="${IOMT_TEST_PG_URL:-host=127.0.0.1 user=postgres dbname=test}" \
        IOMT_EVENTHUBS__BALANCE_INTERVAL_SECS=1 IOMT_EVENTHUBS__OWNERSHIP_EXPIRY_SECS=6 IOMT_EVENTHUBS__MAX_IN_FLIGHT=5000 \
        IOMT_HTTP__LISTEN="$HTTP" IOMT_LOG__LEVEL=warn "$BIN" run --dry-run > /tmp/$hub.log 2>&1 &
    PID=$!
    c0=$(cpu_secs $PID)
    # t0: the first event acked. t_all: the connector owns every partition, as the bare consumer
    # does from its start (claiming is paced: one per round for the first balancing interval);
    # the steady rate counts the events acked after it.
    t0=0; t_all=0; acked_all=0
    while true; do
        m=$(curl -fsS "http://$HTTP/metrics" 2>/dev/null || true)
        got=$(echo "$m" | awk '$1=="iomt_messages_acked_total" {print int($2)}')
        owned=$(echo "$m" | awk '$1=="iomt_eventhubs_partitions_owned" {print int($2)}')
        got=${got:-0}
        now=$(date +%s%N)
        if [[ $t0 == 0 && $got -gt 0 ]]; then t0=$now; fi
        if [[ $t0 != 0 && $t_all == 0 && ${owned:-0} -ge $PARTITIONS ]]; then t_all=$now; acked_all=$got; fi
        [[ $got -ge $N ]] && break
        sleep 0.05
    done
    t1=$(date +%s%N)
    secs=$(echo "scale=3; ($t1 - $t0) / 1000000000" | bc)
    c1=$(cpu_secs $PID)
    kill -TERM $PID; wait $PID || true
    ROW[$profile,dry]=$(echo "$N / $secs" | bc)
    if [[ $t_all != 0 && $t1 -gt $t_all ]]; then
        ROW[$profile,steady]=$(echo "($N - $acked_all) * 1000000000 / ($t1 - $t_all)" | bc)
        ROW[$profile,all]=$(echo "scale=1; ($t_all - $t0) / 1000000000" | bc)
    else
        # Every event acked before the last partition was seen owned: no steady phase to time.
        ROW[$profile,steady]=0
        ROW[$profile,all]=n/a
    fi
    ROW[$profile,dry_cpu]=$(echo "scale=1; ($c1 - $c0) * 100000 / $N" | bc)
done

cat <<TABLE

Event Hubs ($N events per profile, $PARTITIONS partitions, the repo's test peer on this machine; one instance)

| | vitals | spot |
|---|---|---|
| bare consumer (SDK, count only) | ${ROW[vitals,bare]} events/s | ${ROW[spot,bare]} events/s |
| connector dry run, first event to last | ${ROW[vitals,dry]} events/s ($(echo "scale=2; ${ROW[vitals,dry]} / ${ROW[vitals,bare]}" | bc)x) | ${ROW[spot,dry]} events/s ($(echo "scale=2; ${ROW[spot,dry]} / ${ROW[spot,bare]}" | bc)x) |
| connector dry run, once it owns every partition | ${ROW[vitals,steady]} events/s ($(echo "scale=2; ${ROW[vitals,steady]} / ${ROW[vitals,bare]}" | bc)x) | ${ROW[spot,steady]} events/s ($(echo "scale=2; ${ROW[spot,steady]} / ${ROW[spot,bare]}" | bc)x) |
| every partition owned, seconds after the first event | ${ROW[vitals,all]} | ${ROW[spot,all]} |
| CPU seconds per 100k events: bare consumer (whole run) / connector dry run | ${ROW[vitals,bare_cpu]} / ${ROW[vitals,dry_cpu]} | ${ROW[spot,bare_cpu]} / ${ROW[spot,dry_cpu]} |
TABLE
