# Sourced by the load benchmarks: go to the repository root, find the shared side-by-side
# harness beside it, install its Debian peers (wrk, nginx, haproxy) when missing, and read
# ROUNDS and SECONDS from the script's arguments.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rounds=${1:-5}
secs=${2:-6}
harness=../shared/bench/proxy-compare.sh
[ -x "$harness" ] || { echo "missing $harness (the shared bench harness beside this repo)" >&2; exit 1; }
if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null || ! command -v haproxy >/dev/null; then
  apt-get update -qq && apt-get install -y -qq wrk nginx haproxy >/dev/null
fi
