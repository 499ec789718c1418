#!/usr/bin/env bash
# End-to-end benchmark on this machine, against the real RabbitMQ and both FHIR servers (sekmet and
# helios-hfs), printed as one table (markdown). For the `vitals` profile (few devices, many readings)
# and `spot` (many devices, one reading each):
#   1. broker ceiling: the same messages consumed by a bare lapin consumer that only acks (its rate
#      and its CPU per message);
#   2. the connector with --dry-run (normalize, group, build Observations, count; no FHIR);
#   3. per FHIR server: the connector end to end, then the server's own write capacity measured by
#      a bare client (examples/fhir_capacity.rs) writing the Observations of the same messages, in
#      batch Bundles of the size the connector sent (with If-Match, as the connector's updates) and
#      as single PUTs; the ratio of the two. Twice: with every process sharing the machine's cores,
#      and with the FHIR server on a core of its own (taskset; the broker, the connector and the
#      bare client on the other), which shows whether the connector keeps the server busy when the
#      server does not lose CPU to the broker and the connector;
#   4. end to end at a steady rate below saturation (sekmet): delay from send to persisted
#      (p50/p99) and FHIR requests per 1,000 messages once warm;
# and peak RSS with 100,000 distinct devices in the shards; then the Event Hubs row
# (scripts/bench-eventhubs.sh).
#
#   scripts/bench.sh            (after scripts/setup.sh; sizes via BENCH_N, BENCH_N_E2E, ...)
set -euo pipefail
cd "$(dirname "$0")/.."

N=${BENCH_N:-100000}              # messages for the ceiling and dry-run phases
N_E2E=${BENCH_N_E2E:-100000}      # vitals messages for the end-to-end phase
N_E2E_SPOT=${BENCH_N_E2E_SPOT:-20000}   # spot messages for it (one write each: the slow part)
SPOT_E2E_DEVICES=${BENCH_SPOT_E2E_DEVICES:-2000}   # spot end to end: each new device costs 4 FHIR requests (Create identity)
STEADY_SECS=${BENCH_STEADY_SECS:-40}
MEM_DEVICES=${BENCH_MEM_DEVICES:-100000}
RUN=bench-$(date +%s)

scripts/setup.sh --no-build > /dev/null
cargo build --release --quiet --bin iomt-connector --example ack_consumer --example fhir_capacity
BIN=target/release/iomt-connector
ACK=target/release/examples/ack_consumer
CAP=target/release/examples/fhir_capacity
PREFETCH=$(awk -F' *= *' '/^prefetch/ {print $2; exit}' config/default.toml)   # the bare consumer's, as the connector's
TICK=$(getconf CLK_TCK)

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
metric() { curl -fsS "http://$HTTP/metrics" | awk -v m="$1" '$1==m {print $2; f=1} END {if(!f) print 0}'; }
metric_sum() { curl -fsS "http://$HTTP/metrics" | awk -v m="$1" 'index($1,m)==1 {s+=$2} END {print s+0}'; }
cpu_secs() { awk -v t="$TICK" '{print ($14+$15)/t}' "/proc/$1/stat"; }
peak_rss_mb() { awk '/VmHWM/ {print int($2/1024)}' "/proc/$1/status"; }

# Starts the connector on queue $1 with extra env; sets PID and HTTP.
start() {
    local queue=$1; shift
    HTTP=127.0.0.1:$(port)
    env IOMT_BROKER__QUEUE="$queue" IOMT_HTTP__LISTEN="$HTTP" IOMT_IDENTITY__DEVICE_IDENTIFIER_SYSTEM="urn:$RUN" \
        IOMT_LOG__LEVEL=warn "$@" $PIN "$BIN" run $DRY > "/tmp/$queue.log" 2>&1 &
    PID=$!
    for _ in $(seq 1 200); do
        curl -fsS "http://$HTTP/health/ready" > /dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "connector did not start:"; cat "/tmp/$queue.log"; exit 1
}

stop() { kill -TERM "$PID"; wait "$PID" || true; }

# Waits until $1 messages are acked; prints elapsed seconds since $2 (epoch ns).
wait_acked() {
    local want=$1 t0=$2
    while true; do
        local acked; acked=$(metric iomt_messages_acked_total)
        [[ ${acked%.*} -ge $want ]] && break
        sleep 0.05
    done
    echo "scale=3; ($(date +%s%N) - $t0) / 1000000000" | bc
}

# Percentile from the latency histogram (upper bound of the bucket that reaches it), over what was
# acked since the snapshot in $BASELINE (a file of `bucket count` lines; empty: since the start).
latency_buckets() {
    curl -fsS "http://$HTTP/metrics" | awk '/^iomt_end_to_end_latency_seconds_bucket/ { match($0, /le="[^"]+"/); print substr($0, RSTART+4, RLENGTH-5), $2 }'
}
percentile() {
    latency_buckets | awk -v p="$1" -v base="${BASELINE:-/dev/null}" '
        BEGIN { while ((getline line < base) > 0) { split(line, f, " "); b[f[1]] = f[2] } }
        { n++; les[n] = $1; cs[n] = $2 - b[$1] }
        END { total = cs[n]; for (i = 1; i <= n; i++) if (cs[i] >= p * total) { print les[i]; exit } }'
}

declare -A ROW
SERVERS=(sekmet helios)
declare -A SERVER_URL=([sekmet]=$(scripts/fhir-server.sh url) [helios]=$(scripts/helios-server.sh url))
declare -A SERVER_PID=([sekmet]=.services/fhir.pid [helios]=.services/helios.pid)
WRITERS=4                          # pipeline.writers (the default): requests in flight at once

phase() {   # profile devices e2e_devices e2e_messages
    local profile=$1 devices=$2 e2e_devices=$3 e2e_n=$4 q
    echo "== $profile: $devices devices" >&2

    q=$RUN.$profile.ceiling
    $BIN simulate --queue "$q" --profile "$profile" --devices "$devices" --count "$N" --rate 0 --prefix "$RUN-c" > /dev/null
    # The bare consumer's CPU (user + system, from bash's `time`) beside its rate.
    local out; out=$( { TIMEFORMAT='%U %S'; time $ACK "$q" "$N" "$PREFETCH"; } 2>&1 )
    read -r _ secs ceiling <<<"$(head -1 <<<"$out")"
    read -r u s <<<"$(tail -1 <<<"$out")"
    ROW[$profile,ceiling]=$ceiling
    ROW[$profile,ceiling_cpu]=$(echo "scale=1; ($u + $s) * 100000 / $N" | bc)

    q=$RUN.$profile.dry
    $BIN simulate --queue "$q" --profile "$profile" --devices "$devices" --count "$N" --rate 0 --prefix "$RUN-d" > /dev/null
    DRY=--dry-run start "$q"
    local t0 c0; t0=$(date +%s%N); c0=$(cpu_secs "$PID")
    secs=$(wait_acked "$N" "$t0")
    local c1; c1=$(cpu_secs "$PID")
    ROW[$profile,dry]=$(echo "$N / $secs" | bc)
    ROW[$profile,dry_cpu]=$(echo "scale=1; ($c1 - $c0) * 100000 / $N" | bc)
    ROW[$profile,dry_rss]=$(peak_rss_mb "$PID")
    stop

    for server in "${SERVERS[@]}"; do
        for mode in shared pinned; do e2e "$profile" "$e2e_devices" "$e2e_n" "$server" "$mode"; done
    done
}

# Pins the FHIR server to the first core and the broker to the others, and sets PIN (the prefix
# that puts a command there too); `pin shared SERVER` undoes it.
PIN=
pin() {     # pinned|shared server
    local last=$(( $(nproc) - 1 )) server_pid beam
    server_pid=$(cat "${SERVER_PID[$2]}" 2>/dev/null || true)
    beam=$(pgrep -f beam.smp | head -1 || true)
    if [[ $1 == pinned ]]; then
        [[ -n $server_pid && -n $beam ]] || { echo "cannot pin: no pid for the $2 server or RabbitMQ" >&2; exit 1; }
        taskset -a -p -c 0 "$server_pid" > /dev/null
        taskset -a -p -c "1-$last" "$beam" > /dev/null
        PIN="taskset -c 1-$last"
    else
        [[ -n $server_pid ]] && taskset -a -p -c "0-$last" "$server_pid" > /dev/null || true
        [[ -n $beam ]] && taskset -a -p -c "0-$last" "$beam" > /dev/null || true
        PIN=
    fi
}
unpin_all() { for s in "${SERVERS[@]}"; do pin shared "$s"; done; }
trap unpin_all EXIT

# End to end on one FHIR server, then that server's own capacity for the same Observations.
e2e() {     # profile devices messages server shared|pinned
    local profile=$1 devices=$2 n=$3 server=$4 mode=$5 url=${SERVER_URL[$4]} q=$RUN.$1.e2e.$4.$5 prefix=$RUN-e-$4-$5
    echo "== $profile end to end on $server ($url), $mode cores" >&2
    pin "$mode" "$server"
    DRY= start "$q" IOMT_FHIR__BASE_URL="$url"
    # Every device once first, so that Create identity (4 requests per new device, once in its life)
    # is not counted: what is measured is the steady work of writing Observations.
    $PIN $BIN simulate --queue "$q" --profile "$profile" --devices "$devices" --count "$devices" --rate 0 --prefix "$prefix" > /dev/null
    wait_acked "$devices" "$(date +%s%N)" > /dev/null
    $PIN $BIN simulate --queue "$q" --profile "$profile" --devices "$devices" --count "$n" --rate 0 --prefix "$prefix" > /dev/null
    # Timed from when the last message is published: the simulator and the broker taking the
    # messages in are not the connector's work, and on two cores they would take the FHIR
    # server's CPU. What is timed is the connector draining the backlog into the server.
    local a0 w0 r0 c0 t0; a0=$(metric iomt_messages_acked_total | cut -d. -f1); w0=$(writes)
    r0=$(metric_sum iomt_fhir_requests_total); c0=$(cpu_secs "$PID"); t0=$(date +%s%N)
    local secs; secs=$(wait_acked $((devices + n)) "$t0")
    local c1 w m=$((devices + n - a0)); c1=$(cpu_secs "$PID"); w=$(( $(writes) - w0 ))
    local k=$profile,$server,$mode
    ROW[$k,e2e]=$(echo "$m / $secs" | bc)
    ROW[$k,e2e_wps]=$(echo "$w / $secs" | bc)
    ROW[$k,e2e_cpu]=$(echo "scale=1; ($c1 - $c0) * 100000 / $m" | bc)
    ROW[$k,e2e_req]=$(echo "scale=1; ($(metric_sum iomt_fhir_requests_total) - $r0) * 1000 / $m" | bc)
    ROW[$k,e2e_rss]=$(peak_rss_mb "$PID")
    local batch; batch=$(batch_size write)
    ROW[$k,batch]=$batch
    stop
    # The bare client: the Observations of the same messages, in batches of the connector's mean
    # write-batch size, as many in flight as the connector's writers, as many writes as it made.
    read -r _ _ bare _ <<<"$($PIN $CAP "$url" "$profile" "$n" "$devices" batch "$batch" "$WRITERS" "$w" "$RUN-b-$server-$profile-$mode")"
    ROW[$k,bare]=$bare
    if [[ $mode == shared ]]; then
        read -r _ _ single _ <<<"$($CAP "$url" "$profile" "$n" "$devices" single 1 "$WRITERS" $(( w < 3000 ? w : 3000 )) "$RUN-s-$server-$profile")"
        ROW[$profile,$server,single]=$single
    fi
    pin shared "$server"
}

writes() { echo $(( $(metric 'iomt_observations_total{outcome="created"}' | cut -d. -f1) + $(metric 'iomt_observations_total{outcome="updated"}' | cut -d. -f1) )); }
# Mean entries per batch Bundle of one op (read, write).
batch_size() {
    local sum count
    sum=$(metric "iomt_fhir_batch_entries_sum{op=\"$1\"}"); count=$(metric "iomt_fhir_batch_entries_count{op=\"$1\"}")
    echo "$sum $count" | awk '{ if ($2 > 0) printf "%d", $1 / $2 + 0.5; else print 1 }'
}

steady() {  # profile devices rate
    local profile=$1 devices=$2 rate=$3 q=$RUN.$1.steady
    echo "== $profile steady: $devices devices at $rate msg/s for ${STEADY_SECS}s" >&2
    DRY= start "$q"
    # Warm-up: every device once (Create identity makes its Patient and Device), until written.
    $BIN simulate --queue "$q" --profile "$profile" --devices "$devices" --count "$devices" --rate 0 --prefix "$RUN-s-$profile" > /dev/null
    wait_acked "$devices" "$(date +%s%N)" > /dev/null
    local warm_req warm_acked; warm_req=$(metric_sum iomt_fhir_requests_total); warm_acked=$(metric iomt_messages_acked_total)
    # The delays are those of the steady phase only, not of the warm-up's burst of new devices.
    BASELINE=$(mktemp); latency_buckets > "$BASELINE"
    $BIN simulate --queue "$q" --profile "$profile" --devices "$devices" --rate "$rate" --duration "$STEADY_SECS" --prefix "$RUN-s-$profile" > /dev/null
    sleep 2
    local req acked; req=$(metric_sum iomt_fhir_requests_total); acked=$(metric iomt_messages_acked_total)
    ROW[$profile,steady]="$devices dev, $rate msg/s"
    ROW[$profile,steady_req]=$(echo "scale=1; ($req - $warm_req) * 1000 / ($acked - $warm_acked)" | bc)
    ROW[$profile,p50]=$(percentile 0.50)
    ROW[$profile,p99]=$(percentile 0.99)
    rm -f "$BASELINE"; BASELINE=
    stop
}

phase vitals 100 100 "$N_E2E"
phase spot 20000 "$SPOT_E2E_DEVICES" "$N_E2E_SPOT"
steady vitals 100 200
steady spot 2000 200

echo "== memory: $MEM_DEVICES distinct devices (spot, dry-run)" >&2
q=$RUN.mem
$BIN simulate --queue "$q" --profile spot --devices "$MEM_DEVICES" --count "$MEM_DEVICES" --rate 0 --prefix "$RUN-m" > /dev/null
DRY=--dry-run start "$q" IOMT_BROKER__PREFETCH=20000 IOMT_PIPELINE__FLUSH_MAX_MEASUREMENTS=50000
t0=$(date +%s%N)
wait_acked "$MEM_DEVICES" "$t0" > /dev/null
MEM_RSS=$(peak_rss_mb "$PID")
stop

ratio() { echo "scale=2; $1 / $2" | bc | sed 's/^\./0./'; }
{
cat <<EOF

Machine: $(nproc) cores ($(lscpu | sed -n 's/^Model name: *//p')), $(free -g | awk '/Mem:/ {print $2}') GiB; RabbitMQ $(rabbitmqctl version 2>/dev/null || echo '?') and both FHIR servers on the same machine
(sekmet-fhir: Python, SQLite; helios-hfs $(grep -m1 '^HELIOS_VERSION' scripts/helios-server.sh | cut -d'"' -f2): Rust debug build, SQLite).
Ceiling and dry run: $N messages per profile, pre-published. End to end: every device once (identity created), then
$N_E2E vitals or $N_E2E_SPOT spot messages (spot over $SPOT_E2E_DEVICES devices), published as fast as the broker confirms and
consumed at once; timed from the end of publishing to the last ack. "A core of its own": the FHIR server pinned to
core 0, RabbitMQ, the connector and the bare client to the others (taskset), for both the connector and the bare client.

| | vitals (100 devices) | spot (20,000 devices) |
|---|---|---|
| broker ceiling (bare consumer, ack only) | ${ROW[vitals,ceiling]} msg/s | ${ROW[spot,ceiling]} msg/s |
| dry-run pipeline | ${ROW[vitals,dry]} msg/s ($(ratio "${ROW[vitals,dry]}" "${ROW[vitals,ceiling]}")x ceiling) | ${ROW[spot,dry]} msg/s ($(ratio "${ROW[spot,dry]}" "${ROW[spot,ceiling]}")x ceiling) |
| CPU seconds per 100k messages: bare consumer / connector dry run | ${ROW[vitals,ceiling_cpu]} / ${ROW[vitals,dry_cpu]} ($(ratio "${ROW[vitals,dry_cpu]}" "${ROW[vitals,ceiling_cpu]}")x) | ${ROW[spot,ceiling_cpu]} / ${ROW[spot,dry_cpu]} ($(ratio "${ROW[spot,dry_cpu]}" "${ROW[spot,ceiling_cpu]}")x) |
| dry-run peak RSS | ${ROW[vitals,dry_rss]} MB | ${ROW[spot,dry_rss]} MB |
EOF
for server in "${SERVERS[@]}"; do
    v=vitals,$server,shared; p=spot,$server,shared; vp=vitals,$server,pinned; pp=spot,$server,pinned
    cat <<EOF
| **end to end on $server, all processes sharing the cores** | | |
| server's own capacity: bare client, batch Bundles of the connector's mean size (vitals ${ROW[$v,batch]}, spot ${ROW[$p,batch]}), $WRITERS in flight | ${ROW[$v,bare]} writes/s | ${ROW[$p,bare]} writes/s |
| server's own capacity: bare client, single PUTs, $WRITERS in flight | ${ROW[vitals,$server,single]} writes/s | ${ROW[spot,$server,single]} writes/s |
| connector: Observation writes | ${ROW[$v,e2e_wps]} writes/s (**$(ratio "${ROW[$v,e2e_wps]}" "${ROW[$v,bare]}")x** capacity) | ${ROW[$p,e2e_wps]} writes/s (**$(ratio "${ROW[$p,e2e_wps]}" "${ROW[$p,bare]}")x** capacity) |
| connector: messages | ${ROW[$v,e2e]} msg/s | ${ROW[$p,e2e]} msg/s |
| connector: FHIR requests per 1,000 messages | ${ROW[$v,e2e_req]} | ${ROW[$p,e2e_req]} |
| connector: CPU seconds per 100k messages / peak RSS | ${ROW[$v,e2e_cpu]} / ${ROW[$v,e2e_rss]} MB | ${ROW[$p,e2e_cpu]} / ${ROW[$p,e2e_rss]} MB |
| **end to end on $server, the server on a core of its own** | | |
| server's own capacity: bare client as above (vitals ${ROW[$vp,batch]}, spot ${ROW[$pp,batch]} per Bundle) | ${ROW[$vp,bare]} writes/s | ${ROW[$pp,bare]} writes/s |
| connector: Observation writes | ${ROW[$vp,e2e_wps]} writes/s (**$(ratio "${ROW[$vp,e2e_wps]}" "${ROW[$vp,bare]}")x** capacity) | ${ROW[$pp,e2e_wps]} writes/s (**$(ratio "${ROW[$pp,e2e_wps]}" "${ROW[$pp,bare]}")x** capacity) |
| connector: messages | ${ROW[$vp,e2e]} msg/s | ${ROW[$pp,e2e]} msg/s |
EOF
done
cat <<EOF
| **steady rate below saturation (sekmet)** | ${ROW[vitals,steady]} | ${ROW[spot,steady]} |
| steady: FHIR requests per 1,000 messages (warm) | ${ROW[vitals,steady_req]} | ${ROW[spot,steady_req]} |
| steady: send-to-persisted delay p50 / p99 (histogram bucket) | ≤ ${ROW[vitals,p50]} s / ≤ ${ROW[vitals,p99]} s | ≤ ${ROW[spot,p50]} s / ≤ ${ROW[spot,p99]} s |

Peak RSS with $MEM_DEVICES distinct devices (spot, dry-run, all in flight at once): $MEM_RSS MB.
EOF
}

# The Event Hubs row: the same comparison (bare consumer vs connector dry run) on the test peer.
scripts/bench-eventhubs.sh
