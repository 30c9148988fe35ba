# Sourced by benchmarks that start their own processes: `source benches/procs.sh NAME`.
# Makes a scratch directory ($work, /tmp/trireme-NAME.XXXXXX, readable by nginx's workers),
# an array `pids` for every process started (add each with `pids+=($!)`), a cleanup on exit
# that kills those by PID (TERM, then KILL) and removes $work, and `wait_port PORT` (up to
# 30 s on 127.0.0.1, else exit 1).
work=$(mktemp -d "/tmp/trireme-${1:-bench}.XXXXXX")
chmod 755 "$work"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.2
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
wait_port() { for _ in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }
