#!/usr/bin/env bash
# The three trireme binaries at an earlier commit and now, beside the floor relay
# (benches/floor_relay.rs: the socket calls alone), nginx and HAProxy, in one run of the shared
# harness: before and after figures that can be compared (ratios within one run only).
#
#   benches/before_after.sh REV [ROUNDS] [SECONDS]    (default 3 rounds x 5 s, ~10 minutes)
#
# REV is built in a git worktree under target/before/ (release, its own target directory).
# A candidate's own work per request is its CPU-us/req minus floor-relay's in the same table.
# Set SCENARIOS (default ka-small,ka-16k,close-small) or TRIREME_RUNTIMES (mio monoio tokio).
set -euo pipefail
rev=${1:?usage: benches/before_after.sh REV [ROUNDS] [SECONDS]}
shift
set -- "${1:-3}" "${2:-5}"
source "$(dirname "$0")/harness.sh" "$@"
root=$PWD
tree=$root/target/before/tree
short=$(git rev-parse --short=9 "$rev")
if [ ! -d "$tree" ]; then
  git worktree add --detach "$tree" "$rev" >/dev/null
else
  git -C "$tree" checkout --detach -q "$rev"
fi
rts=${TRIREME_RUNTIMES:-mio monoio tokio}
bins=()
for rt in $rts; do bins+=(--bin "trireme-$rt"); done
(cd "$tree" && cargo build --release --quiet "${bins[@]}" --target-dir "$root/target/before/target")
cargo build --release --quiet "${bins[@]}" --example floor-relay
cands=(--candidate "floor-relay=./target/release/examples/floor-relay --listen 127.0.0.1:{listen} {backend_args}")
for rt in $rts; do
  cands+=(--candidate "$rt-before=./target/before/target/release/trireme-$rt --listen 127.0.0.1:{listen} {backend_args}")
  cands+=(--candidate "trireme-$rt=./target/release/trireme-$rt --listen 127.0.0.1:{listen} {backend_args}")
done
echo "before: $short ($(git log -1 --format=%s "$rev" | cut -c1-70)); after: $(git rev-parse --short=9 HEAD)"
"$harness" --rounds "$rounds" --duration "$secs" --peers nginx,haproxy \
  --scenarios "${SCENARIOS:-ka-small,ka-16k,close-small}" "${cands[@]}"
