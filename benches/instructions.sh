#!/usr/bin/env bash
# Instructions per request of the fast-path rows, counted by valgrind's callgrind: the same
# count run after run, whatever else the machine is doing, unlike criterion's times.
#
#   benches/instructions.sh                     every fast-path row
#   benches/instructions.sh backoff_no_retry/   the rows whose `group/row` contains this
#   FEATURES=redis benches/instructions.sh      built with these features
#
# Only the sending loop is counted, and each row runs N and 2N requests (N = 10000, or $N): the
# difference over N is its cost per request, with first-call costs cancelled out.
# Needs valgrind (`apt-get install -y valgrind`).
set -euo pipefail
cd "$(dirname "$0")/.."
n=${N:-10000}
# One codegen unit: with the default 16, how functions are split into units (and so what is
# inlined where) shifts with changes elsewhere in the crate, and rows that do not touch it
# moved by up to 90 instructions between two builds. With one, the anchors hold still.
export CARGO_PROFILE_BENCH_CODEGEN_UNITS=${CARGO_PROFILE_BENCH_CODEGEN_UNITS:-1}
bin=$(cargo bench --bench main --no-run --message-format=json ${FEATURES:+--features "$FEATURES"} 2>/dev/null |
    grep -o '"executable":"[^"]*"' | tail -1 | cut -d'"' -f4)
rows=$(TOWER_QUOTA_LIST=1 "$bin" | grep -F -- "${1:-/}")
count() {
    TOWER_QUOTA_COUNT=$1 valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        --toggle-collect='*harness::send_many*' "$bin" "$2" 2>&1 | grep -o 'Collected : [0-9]*' | grep -o '[0-9]*$'
}
while IFS= read -r row; do
    one=$(count "$n" "$row")
    two=$(count $((2 * n)) "$row")
    printf '%6d  %s\n' $(((two - one) / n)) "$row"
done <<<"$rows"
