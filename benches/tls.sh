#!/usr/bin/env bash
# TLS termination side by side: trireme (mio, monoio, tokio) against nginx (OpenSSL) with the
# same certificate, in front of the same nginx origin, on the same machine, in one run.
#
#   benches/tls.sh [ROUNDS] [SECONDS]        (default 3 rounds x 5 s)
#   env KEYS="ecdsa rsa" SCENARIOS="ka-small ka-16k resumed full" CANDIDATES="nginx trireme-mio ..."
#
# Scenarios: ka-small / ka-16k (keep-alive requests over TLS, 100 B / 16 KiB bodies);
# resumed (wrk sends `Connection: close`: a new TLS connection per request, and wrk resumes
# its TLS 1.2 session each time: an abbreviated handshake); full (`openssl s_time -new
# -tls1_3`: a new connection and a full TLS 1.3 handshake per request, one at a time, so the
# client is the bound and only the CPU per handshake counts).
# The proxy runs on CPU 0, wrk (1 thread, 50 connections) and the origin on CPU 1; CPU per
# request is the proxy process's utime+stime (/proc/PID/stat) over the run, divided by the
# requests wrk completed; the median of the rounds is reported. Rounds interleave candidates.
# Needs nginx, wrk (Debian's links OpenSSL: https works) and openssl; installs them if missing.
# Only 127.0.0.1 is used; every process started is killed by PID on exit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rounds=${1:-3}
secs=${2:-5}
keys=${KEYS:-ecdsa rsa}
scenarios=${SCENARIOS:-ka-small ka-16k resumed full}
candidates=${CANDIDATES:-nginx trireme-mio trireme-monoio trireme-tokio}
for t in nginx wrk openssl taskset; do
  command -v $t >/dev/null || { apt-get update -qq && apt-get install -y -qq nginx wrk openssl util-linux >/dev/null; }
done
cargo build --release --quiet --bin trireme-mio --bin trireme-monoio --bin trireme-tokio
source benches/procs.sh tls

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
  -addext subjectAltName=IP:127.0.0.1,DNS:localhost -keyout "$work/ecdsa.key" -out "$work/ecdsa.pem" 2>/dev/null
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost \
  -addext subjectAltName=IP:127.0.0.1,DNS:localhost -keyout "$work/rsa.key" -out "$work/rsa.pem" 2>/dev/null

# The origin: one nginx worker on CPU 1.
mkdir -p "$work/origin/www"
head -c 16383 /dev/zero | tr '\0' 'k' > "$work/origin/www/16k"; echo >> "$work/origin/www/16k"
small=$(printf '%099d' 0 | tr 0 b)
cat > "$work/origin/nginx.conf" <<EOF
worker_processes 1;
pid $work/origin/nginx.pid;
error_log $work/origin/error.log error;
events { worker_connections 4096; }
http {
  access_log off; server_tokens off; default_type text/plain;
  keepalive_requests 100000000; keepalive_timeout 300s; sendfile on; tcp_nodelay on; etag off;
  server { listen 127.0.0.1:18401 backlog=4096;
    location = /small { return 200 "$small\n"; }
    location = /16k { root $work/origin/www; } }
}
EOF
taskset -c 1 nginx -p "$work/origin" -c "$work/origin/nginx.conf" -g 'daemon off;' >/dev/null 2>&1 &
pids+=($!)
wait_port 18401

start() { # candidate key -> pid of the proxy (listening on 18400)
  local c=$1 k=$2
  case $c in
    nginx)
      mkdir -p "$work/nginx"
      cat > "$work/nginx/nginx.conf" <<EOF
worker_processes 1;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log error;
events { worker_connections 4096; }
http {
  access_log off; server_tokens off;
  keepalive_requests 100000000; keepalive_timeout 300s; tcp_nodelay on;
  ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:SSL:10m;
  upstream be { server 127.0.0.1:18401; keepalive 128; }
  server {
    listen 127.0.0.1:18400 ssl backlog=4096;
    ssl_certificate $work/$k.pem; ssl_certificate_key $work/$k.key;
    location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
EOF
      taskset -c 0 nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" -g 'daemon off; master_process off;' \
        >"$work/nginx.log" 2>&1 &
      ;;
    trireme-*)
      taskset -c 0 "./target/release/$c" --listen 127.0.0.1:18400 --workers 1 \
        --backend http://127.0.0.1:18401 --tls-cert "$work/$k.pem" --tls-key "$work/$k.key" \
        >"$work/$c.log" 2>&1 &
      ;;
  esac
  echo $!
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

results="$work/results.tsv"
: > "$results"
for k in $keys; do
  for s in $scenarios; do
    case $s in
      ka-small) path=/small hdr=() ;;
      ka-16k) path=/16k hdr=() ;;
      resumed | full) path=/small hdr=(-H "Connection: close") ;;
    esac
    for r in $(seq "$rounds"); do
      for c in $candidates; do
        pid=$(start "$c" "$k")
        pids+=("$pid")
        wait_port 18400
        timeout 30 taskset -c 1 wrk -t1 -c50 -d1s "${hdr[@]}" "https://127.0.0.1:18400$path" >/dev/null 2>&1 || true
        t0=$(cpu_ticks "$pid")
        if [ "$s" = full ]; then
          out=$(timeout $((secs + 20)) taskset -c 1 openssl s_time -connect 127.0.0.1:18400 -new \
            -tls1_3 -www "$path" -time "$secs" 2>&1)
          t1=$(cpu_ticks "$pid")
          n=$(echo "$out" | awk '/connections in .* real seconds/ {print $1}')
        else
          out=$(timeout $((secs + 20)) taskset -c 1 wrk -t1 -c50 -d"${secs}s" "${hdr[@]}" "https://127.0.0.1:18400$path" 2>&1)
          t1=$(cpu_ticks "$pid")
          n=$(echo "$out" | awk '/requests in/ {print $1}')
        fi
        errs=$(echo "$out" | awk '/Non-2xx|Socket errors/ {print}' | tr '\n' ' ')
        us=$(awk -v a="$t0" -v b="$t1" -v n="${n:-0}" -v hz="$hz" 'BEGIN { if (n > 0) printf "%.2f", (b - a) / hz * 1e6 / n; else print "nan" }')
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$k" "$s" "$c" "$r" "$us" "$n" >> "$results"
        echo "[$(date +%H:%M:%S)] $k $s r$r $c: $us us/req ($n requests) $errs" >&2
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        sleep 0.3
      done
    done
  done
done

echo
echo "| key | scenario | candidate | CPU-us/req (median) | req/s per core | ÷ nginx |"
echo "|---|---|---|---:|---:|---:|"
python3 - "$results" <<'EOF'
import sys, statistics, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    k, s, c, r, us, n = line.rstrip("\n").split("\t")
    if us != "nan":
        rows[(k, s, c)].append(float(us))
med = {key: statistics.median(v) for key, v in rows.items()}
for (k, s, c), m in med.items():
    base = med.get((k, s, "nginx"))
    ratio = f"{m / base:.3f}" if base else "-"
    print(f"| {k} | {s} | {c} | {m:.2f} | {1e6 / m:.0f} | {ratio} |")
EOF
