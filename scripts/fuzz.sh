#!/usr/bin/env bash
# Coverage-guided fuzzing of the mapping engine: runs each cargo-fuzz target in fuzz/ for a
# bounded time and exits nonzero when one crashes (a panic, a stack overflow, a timeout, running
# out of memory). docs/fuzzing.md says what each target does and how to turn a crash into a
# regression test.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]   SECONDS per target (default 60);
#                                           targets: normalize load_mapping (default both)
#
# Needs cargo-fuzz (installed here with `cargo install cargo-fuzz --locked` when missing) and no
# nightly: the targets build on stable without a sanitizer (`-s none`); libFuzzer still finds
# panics, overflows, hangs and memory blow-ups, and debug assertions and overflow checks are on.
# Inputs that found new coverage go to fuzz/corpus/TARGET (kept between runs, not committed);
# each run also starts from fuzz/seeds/TARGET and the repository's mappings, messages and
# conformance vectors. A crash is written to fuzz/artifacts/TARGET/. FUZZ_TARGET_DIR sets the
# build directory (default fuzz/target), FUZZ_JOBS runs that many workers per target.
#
# Not part of scripts/test.sh: a run short enough for CI finds nothing the unit tests don't.
set -euo pipefail

seconds=${1:-60}
[ $# -gt 0 ] && shift
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(normalize load_mapping)
case $seconds in '' | *[!0-9]*) echo "usage: $0 [SECONDS] [TARGET...]" >&2; exit 2 ;; esac

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo/fuzz"
target_dir=${FUZZ_TARGET_DIR:-$repo/fuzz/target}
jobs=${FUZZ_JOBS:-1}
# One worker runs in this process; more are libFuzzer's -jobs, each logging to fuzz-N.log.
parallel=()
[ "$jobs" -gt 1 ] && parallel=(-jobs="$jobs" -workers="$jobs")

if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked
fi
cargo fuzz build -s none --target-dir "$target_dir" "${targets[@]}"

# The repository's own inputs, in the form each target reads. normalize: byte 0 picks the mapping
# pair (0: the sample pair, k: the k-th conformance vector in name order), byte 1 how the rest is
# read (1: a whole envelope, 0: a body).
seed() {
    local target=$1 dir=$repo/fuzz/corpus/$1
    mkdir -p "$dir"
    case $target in
        normalize)
            local k=0 f
            for f in "$repo"/mappings/messages/*.json; do
                { printf '\x00\x00'; cat "$f"; } >"$dir/seed-sample-$(basename "$f")"
            done
            for d in $(cd "$repo/tests/conformance" && LC_ALL=C ls -d */); do
                k=$((k + 1))
                f=$repo/tests/conformance/${d%/}/input.json
                [ -f "$f" ] || continue
                local how='\x00'
                grep -q '"Body"' "$f" && how='\x01'
                # shellcheck disable=SC2059
                { printf "\\x$(printf %02x "$k")$how"; cat "$f"; } >"$dir/seed-${d%/}"
            done
            ;;
        load_mapping)
            cp "$repo"/mappings/*.json "$dir/"
            for f in "$repo"/tests/conformance/*/*template*.json; do
                cp "$f" "$dir/seed-$(basename "$(dirname "$f")")-$(basename "$f")"
            done
            ;;
    esac
}

status=0
for target in "${targets[@]}"; do
    seed "$target"
    mkdir -p "$repo/fuzz/artifacts/$target"
    echo "== $target: ${seconds}s" >&2
    # -timeout: one input taking 10 s is a hang; -rss_limit_mb: 2 GiB is a blow-up (the machine is
    # shared); -malloc_limit_mb: so is any single allocation that large.
    if ! cargo fuzz run -s none --target-dir "$target_dir" "$target" \
        "$repo/fuzz/corpus/$target" "$repo/fuzz/seeds/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=2048 \
        -dict="$repo/fuzz/dict/mapping.dict" -print_final_stats=1 "${parallel[@]}" \
        -artifact_prefix="$repo/fuzz/artifacts/$target/"; then
        echo "== $target found a crash: see fuzz/artifacts/$target/ and docs/fuzzing.md" >&2
        status=1
    fi
done
exit $status
