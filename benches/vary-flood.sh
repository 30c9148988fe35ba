#!/usr/bin/env bash
# Cost of a Vary flood: N requests for one URL, each with a distinct Accept-Encoding, to a
# backend answering `Vary: Accept-Encoding` (cacheable), then the time of a lookup that
# misses every stored variant. Reports the proxy's CPU for the flood (utime+stime from
# /proc) and the median wall time of 200 such misses, against N plain distinct URLs.
#
#   benches/vary-flood.sh [N] [BINARY ...]     (default 8000, ./target/release/trireme-mio)
#
# The backend is a one-worker nginx on 127.0.0.1; every process started is killed by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-8000}
shift || true
bins=("$@")
[ ${#bins[@]} -gt 0 ] || { cargo build --release --bin trireme-mio >/dev/null; bins=(./target/release/trireme-mio); }
command -v nginx >/dev/null || { apt-get update -qq && apt-get install -y -qq nginx >/dev/null; }
work=$(mktemp -d)
chmod 755 "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
base=${BASE_PORT:-19600}
be=$((base + 1))
cat > "$work/nginx.conf" <<EOF
worker_processes 1; daemon off; pid $work/nginx.pid; error_log $work/nginx.err;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$be;
    location / { add_header Vary Accept-Encoding; add_header Cache-Control "max-age=600"; return 200 "hello"; } } }
EOF
nginx -c "$work/nginx.conf" -p "$work" & pids+=($!)
sleep 0.5
port=$((base + 10))
for bin in "${bins[@]}"; do
  port=$((port + 1))
  "$bin" --listen 127.0.0.1:$port --backend http://127.0.0.1:$be --cache 512MB --workers 1 \
    2>"$work/proxy.log" & pid=$!
  pids+=($pid)
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.05; done
  python3 - "$port" "$pid" "$n" "$bin" <<'PY'
import socket, sys, time
port, pid, n, name = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
tick = 100.0  # USER_HZ
def cpu():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / tick
s = rf = None
def connect():
    # A connection per phase: each stays under max_requests_per_connection.
    global s, rf
    s = socket.create_connection(("127.0.0.1", port))
    rf = s.makefile("rb")
def req(path, ae):
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nAccept-Encoding: {ae}\r\n\r\n".encode())
    length = 0
    while True:
        line = rf.readline()
        if line in (b"\r\n", b""):
            break
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    rf.read(length)
def flood(paths_and_aes):
    connect()
    c0 = cpu()
    for p, a in paths_and_aes:
        req(p, a)
    return cpu() - c0
def misses(path, tag):
    connect()
    ts = []
    for i in range(200):
        t = time.perf_counter()
        req(path, f"{tag}-{i}")
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2] * 1e3
plain = flood((f"/plain/{i}", "gzip") for i in range(n))
miss_before = misses("/vary", "before")
vary = flood(("/vary", f"x-{i}") for i in range(n))
miss_after = misses("/vary", "after")
print(f"{name}: {n} plain URLs {plain:.2f} s CPU; {n} variants of one URL {vary:.2f} s CPU; "
      f"a missing variant: median {miss_before:.3f} ms before the flood, {miss_after:.3f} ms after")
PY
  kill "$pid" 2>/dev/null || true
done
