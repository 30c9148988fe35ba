#!/usr/bin/env bash
# Side-by-side load benchmark: every trireme binary against nginx and HAProxy (and the backend
# directly), proxy pinned to one core, via the shared harness next to this repository; then
# syscalls, io_uring submissions and peak RSS per candidate (benches/syscalls.sh), and heap
# allocations per request and RSS per idle connection per runtime (benches/runtimes.rs).
#
#   benches/compare.sh [ROUNDS] [SECONDS]       (default 5 rounds x 6 s, ~8 minutes)
#
# Needs Debian's wrk, nginx and haproxy (installed here if missing, when run as root).
# Prints the harness's full report, then the condensed table used in docs/benchmarks.md.
source "$(dirname "$0")/harness.sh"
cargo build --release --bins
cands=()
for rt in ${TRIREME_RUNTIMES:-mio monoio tokio}; do
  [ -x "./target/release/trireme-$rt" ] || continue
  cands+=(--candidate "trireme-$rt=./target/release/trireme-$rt --listen 127.0.0.1:{listen} {backend_args}")
done
out=$(mktemp -d)
"$harness" --rounds "$rounds" --duration "$secs" --out "$out/summary.tsv" "${cands[@]}" \
  | tee "$out/report.md"
echo
echo "## condensed ($(nproc) CPUs, $(uname -r), $(date -u +%Y-%m-%dT%H:%MZ))"
sed -n '/^### ka-small/,/^spread =/p' "$out/report.md" | grep -E "^\||^###" | awk -F'|' '
/^###/ {print ""; print; print ""; print "| candidate | req/s | p50 ms | p99 ms | CPU µs/req | CPU/req ÷ nginx | CPU/req ÷ haproxy | backend conns/req | errors |"; print "|---|---:|---:|---:|---:|---:|---:|---:|---:|"; next}
$2 ~ /candidate|---/ {next}
{gsub(/ /,"",$2); gsub(/ /,"",$4); gsub(/ /,"",$6); gsub(/ /,"",$7); gsub(/ /,"",$8); gsub(/ /,"",$19); gsub(/ /,"",$20); gsub(/ /,"",$14); gsub(/ /,"",$15);
 printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", $2,$4,$6,$7,$8,$19,$20,$14,$15}'

echo
echo "## syscalls and peak RSS (benches/syscalls.sh)"
benches/syscalls.sh 3
echo
echo "## heap operations per request, RSS per idle connection (cargo bench --bench runtimes)"
cargo bench -q -p trireme --bench runtimes 2>/dev/null | grep -E '^\||^\('
