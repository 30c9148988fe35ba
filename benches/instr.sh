#!/usr/bin/env bash
# User-space instructions per keep-alive request through a real proxy process, counted by
# valgrind's callgrind (exact and repeatable, whatever the machine's load; wall-clock and CPU
# figures on these shared machines are not).
#
#   benches/instr.sh [CANDIDATE] [REQUESTS] [PATH]
#     CANDIDATE  trireme-mio (default), trireme-monoio, trireme-tokio or nginx
#     REQUESTS   measured requests (default 20000), after 2000 unmeasured ones
#     PATH       /small (default: 100 B body) or /16k
#   env HDR='Connection: close' sends that header with every request (a new client
#   connection per request: what a new connection costs).
#
# An nginx origin (one worker, the shared harness's /small and /16k) serves 127.0.0.1:18301;
# the candidate runs under callgrind with one worker on 127.0.0.1:18300, instrumentation off.
# wrk (1 thread, 10 connections) sends warm-up requests, callgrind_control zeroes the
# counters, a bounded wrk run sends the measured requests, and the dump's total over the
# requests nginx served in that window is the figure. The top functions (inclusive of
# nothing: self cost) go to stdout with their share. Needs valgrind, wrk and nginx (installed
# from Debian when missing). Every process started is killed by PID on exit. CG_OUT=FILE keeps
# the callgrind dump (for `callgrind_annotate --inclusive=yes FILE`); BIN_DIR=DIR runs DIR's
# binary as built (e.g. one built with CARGO_PROFILE_RELEASE_DEBUG=line-tables-only, for
# `callgrind_annotate --auto=yes`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cand=${1:-trireme-mio}
reqs=${2:-20000}
path=${3:-/small}
if ! command -v valgrind >/dev/null || ! command -v wrk >/dev/null || ! command -v nginx >/dev/null; then
  apt-get update -qq && apt-get install -y -qq valgrind wrk nginx >/dev/null
fi
source benches/procs.sh instr

small=$(printf '%099d' 0 | tr 0 b)
mkdir -p "$work/www" "$work/origin" "$work/proxy"
head -c 16383 /dev/zero | tr '\0' 'k' > "$work/www/16k"; echo >> "$work/www/16k"
chmod 644 "$work/www/16k"
cat > "$work/origin/nginx.conf" <<EOF
worker_processes 1;
pid $work/origin/nginx.pid;
error_log $work/origin/error.log error;
events { worker_connections 1024; }
http {
  access_log off; server_tokens off; default_type text/plain;
  keepalive_requests 100000000; keepalive_timeout 300s;
  sendfile on; tcp_nodelay on; etag off;
  server {
    listen 127.0.0.1:18301;
    location = /small { return 200 "$small\n"; }
    location = /16k { root $work/www; }
    location = /be-status { stub_status; }
  }
}
EOF
nginx -p "$work/origin" -e "$work/origin/error.log" -c "$work/origin/nginx.conf" -g 'daemon off;' &
pids+=($!)
wait_port 18301

case $cand in
  trireme-*)
    if [ -z "${BIN_DIR:-}" ]; then cargo build --release --quiet --bin "$cand"; fi
    cmd=("${BIN_DIR:-./target/release}/$cand" --listen 127.0.0.1:18300 --workers 1 --backend http://127.0.0.1:18301)
    ;;
  nginx)
    cat > "$work/proxy/nginx.conf" <<EOF
worker_processes 1;
master_process off;
pid $work/proxy/nginx.pid;
error_log $work/proxy/error.log error;
events { worker_connections 1024; }
http {
  access_log off; server_tokens off;
  keepalive_requests 100000000; keepalive_timeout 300s;
  upstream be { server 127.0.0.1:18301; keepalive 64; }
  server {
    listen 127.0.0.1:18300;
    location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
EOF
    cmd=(nginx -p "$work/proxy" -e "$work/proxy/error.log" -c "$work/proxy/nginx.conf" -g 'daemon off;')
    ;;
  *) echo "unknown candidate $cand" >&2; exit 2;;
esac
out=$work/cg.out
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" "${cmd[@]}" \
  >"$work/proxy.log" 2>&1 &
vg=$!
pids+=($vg)
wait_port 18300
served() { curl -s http://127.0.0.1:18301/be-status | awk 'NR==3 {print $3}'; }
# warm-up: pools, buffers and caches filled; then count from zero
hdr=(); [ -n "${HDR:-}" ] && hdr=(-H "$HDR")
timeout 60 wrk -t1 -c10 -d5s "${hdr[@]}" "http://127.0.0.1:18300$path" >/dev/null
callgrind_control -i on "$vg" >/dev/null
callgrind_control -z "$vg" >/dev/null
before=$(served)
# measured: wrk is time-bounded; stop it once the origin has served enough requests
timeout 600 wrk -t1 -c10 -d600s "${hdr[@]}" "http://127.0.0.1:18300$path" >/dev/null &
w=$!
pids+=($w)
while :; do
  n=$(( $(served) - before - 1 ))
  [ "$n" -ge "$reqs" ] && break
  kill -0 $w 2>/dev/null || break
  sleep 0.5
done
kill $w 2>/dev/null || true
wait $w 2>/dev/null || true
sleep 0.5
n=$(( $(served) - before - 2 ))
callgrind_control -d "$vg" >/dev/null
dump=
for _ in $(seq 120); do
  dump=$(ls -t "$out".* 2>/dev/null | head -1 || true)
  [ -n "$dump" ] && break
  sleep 0.5
done
[ -n "$dump" ] || { echo "callgrind wrote no dump" >&2; exit 1; }
sleep 1
total=$(callgrind_annotate "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/ && !t {gsub(",","",$1); t=$1} END {print t}')
if [ -n "${CG_OUT:-}" ]; then cp "$dump" "$CG_OUT"; fi
echo "candidate: $cand   path: $path   requests: $n   instructions: $total"
echo "instructions per request: $(( total / n ))"
callgrind_annotate --threshold=95 "$dump" 2>/dev/null | awk '/file:function/ {on=1; next} on && NF' | head -25 || true
