#!/usr/bin/env bash
# Syscalls per proxied keep-alive request, counted with `strace -c -f` on a short wrk run,
# and peak resident memory (VmHWM, all of the proxy's processes) after a 50-connection run,
# for every trireme binary and (when installed) nginx and HAProxy configured the same way:
# one worker, upstream keep-alive, a 100-byte response from a local nginx backend.
# For trireme-monoio it also reports io_uring_enter calls (ring submissions) per request.
#
#   benches/syscalls.sh [SECONDS]        (default 3 s per candidate)
#
# strace slows every process it traces, so this is a count, not a speed. Everything runs
# on 127.0.0.1; every process started is killed by PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-3}
for t in wrk strace nginx; do
  command -v $t >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk strace nginx >/dev/null; break; }
done
cargo build --release --bins >/dev/null 2>&1 || cargo build --release --bins
work=$(mktemp -d)
chmod 755 "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
base=${BASE_PORT:-19400}
be=$((base + 1))

cat > "$work/backend.conf" <<EOF
worker_processes 1; daemon off; pid $work/backend.pid; error_log $work/backend.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$be; location / { return 200 "$(printf 'x%.0s' $(seq 100))"; } } }
EOF
taskset -c 1 nginx -c "$work/backend.conf" -p "$work" & pids+=($!)

cat > "$work/nginx.conf" <<EOF
worker_processes 1; daemon off; pid $work/nginx.pid; error_log $work/nginx.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream be { server 127.0.0.1:$be; keepalive 64; }
  server { listen 127.0.0.1:PORT; location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
EOF
cat > "$work/haproxy.cfg" <<EOF
global
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend f
  bind 127.0.0.1:PORT
  default_backend b
backend b
  server s1 127.0.0.1:$be
EOF

candidates=(mio monoio tokio)
command -v nginx >/dev/null && candidates+=(nginx)
command -v haproxy >/dev/null && candidates+=(haproxy)

echo "| candidate | requests | syscalls / request | io_uring_enter / request | top syscalls (calls / request) | peak RSS KiB |"
echo "|---|---:|---:|---:|---|---:|"
port=$((base + 10))
for c in "${candidates[@]}"; do
  port=$((port + 1))
  case $c in
    nginx) sed "s/PORT/$port/" "$work/nginx.conf" > "$work/n-$port.conf"
           taskset -c 0 nginx -c "$work/n-$port.conf" -p "$work" & pid=$!;;
    haproxy) sed "s/PORT/$port/" "$work/haproxy.cfg" > "$work/h-$port.cfg"
             taskset -c 0 haproxy -db -f "$work/h-$port.cfg" & pid=$!;;
    *) TRIREME_LOG=warn taskset -c 0 ./target/release/trireme-$c --workers 1 \
         --listen 127.0.0.1:$port --backend http://127.0.0.1:$be 2>"$work/$c.log" & pid=$!;;
  esac
  pids+=($pid)
  for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.05; done
  taskset -c 1 wrk -t1 -c50 -d1s "http://127.0.0.1:$port/" >/dev/null   # warm-up: pools filled
  tpid=$pid
  # nginx serves from its worker process, a child of the master.
  if [ "$c" = nginx ]; then tpid=$(pgrep -P "$pid" | head -1); fi
  timeout $((secs + 20)) strace -c -f -p "$tpid" -o "$work/$c.strace" 2>/dev/null & spid=$!
  sleep 0.5
  out=$(taskset -c 1 wrk -t1 -c50 -d${secs}s "http://127.0.0.1:$port/")
  sleep 0.3
  kill -INT $spid 2>/dev/null || true; wait $spid 2>/dev/null || true
  hwm=0
  for p in $pid $(pgrep -P "$pid" || true); do
    h=$(awk '/^VmHWM:/ {print $2}' /proc/$p/status 2>/dev/null || echo 0)
    hwm=$((hwm + ${h:-0}))
  done
  kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true
  reqs=$(echo "$out" | awk '/requests in/ {print $1}')
  name=$c; case $c in nginx|haproxy) ;; *) name=trireme-$c;; esac
  # strace -c rows: % time, seconds, usecs/call, calls, [errors], syscall
  rows=$(awk '$1 ~ /^[0-9.]+$/ && $NF != "total" && NF >= 5 {print $4, $NF}' "$work/$c.strace" | sort -rn)
  tot=$(echo "$rows" | awk '{t += $1} END {print t + 0}')
  ur=$(echo "$rows" | awk -v n="$reqs" '$2 == "io_uring_enter" {printf "%.3f", $1 / n; f = 1} END {if (!f) printf "-"}')
  top=$(echo "$rows" | head -4 | awk -v n="$reqs" '{printf "%s%s %.2f", (NR > 1 ? ", " : ""), $2, $1 / n}')
  awk -v n="$reqs" -v t="$tot" -v name="$name" -v ur="$ur" -v top="$top" -v hwm="$hwm" \
    'BEGIN {printf "| %s | %d | %.2f | %s | %s | %d |\n", name, n, t / n, ur, top, hwm}'
done
echo
echo "(strace -c -f on the proxy, wrk -t1 -c50 -d${secs}s keep-alive GETs of 100 B; $(nproc) CPUs, $(uname -r))"
