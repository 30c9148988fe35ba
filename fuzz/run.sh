#!/usr/bin/env bash
# Run every cargo-fuzz target for a bounded time: fuzz/run.sh [SECONDS_PER_TARGET]
# Starts from the committed seeds/ (real requests and responses) plus the local corpus/.
# Installs cargo-fuzz when missing. Uses the nightly toolchain when installed, else the
# stable one with RUSTC_BOOTSTRAP=1 (cargo-fuzz needs -Z flags for its sanitizers).
# Debug assertions and overflow checks are on: the session API's misuse and timer checks
# fire here too. Exits non-zero, naming the target and the crash file, if any target finds a crash.
set -uo pipefail
cd "$(dirname "$0")"
secs=${1:-20}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked || exit 1
if cargo +nightly --version >/dev/null 2>&1; then
  fuzz=(cargo +nightly fuzz)
else
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz)
fi
failed=0
for t in $("${fuzz[@]}" list); do
  mkdir -p "corpus/$t" "seeds/$t"
  echo "== fuzz $t for ${secs}s"
  if ! "${fuzz[@]}" run --debug-assertions "$t" "corpus/$t" "seeds/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 > "/tmp/fuzz-$t.log" 2>&1; then
    grep -E "panicked|ERROR|SUMMARY|Reproduce|cargo fuzz run" "/tmp/fuzz-$t.log" | head -20
    echo "!! fuzz target $t failed (full log: /tmp/fuzz-$t.log)"
    failed=1
  else
    grep -E "^Done" "/tmp/fuzz-$t.log"
  fi
done
exit $failed
