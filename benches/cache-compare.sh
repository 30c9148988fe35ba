#!/usr/bin/env bash
# Cache hit path side by side: trireme (each binary, --cache), nginx proxy_cache and Varnish,
# all in front of the same local nginx backend, serving one URL that every candidate has
# cached (warmed first). Proxy pinned to CPU 0, wrk and the backend on CPU 1; interleaved
# rounds, medians. Prints req/s and proxy CPU µs per request, and checks that the backend
# saw (almost) no requests during the measured runs, i.e. they were hits.
#
#   benches/cache-compare.sh [ROUNDS] [SECONDS]       (default 3 rounds x 5 s)
#
# Needs wrk, nginx, varnish (installed when missing, as root). Everything runs on 127.0.0.1;
# every process started is killed by PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
secs=${2:-5}
for t in wrk nginx varnishd; do
  command -v $t >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk nginx varnish >/dev/null; break; }
done
cargo build --release --bins >/dev/null 2>&1 || cargo build --release --bins
work=$(mktemp -d)
chmod 755 "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
base=${BASE_PORT:-19600}
be=$((base + 1))

# Backend: 100 B and 16 KiB bodies, cacheable for an hour; access log counts requests.
head -c 16384 /dev/zero | tr '\0' 'x' > "$work/16k"
cat > "$work/backend.conf" <<EOF
worker_processes 1; daemon off; pid $work/backend.pid; error_log $work/backend.err;
events { worker_connections 4096; }
http { access_log $work/backend.access; keepalive_requests 1000000;
  server { listen 127.0.0.1:$be;
    location /small { add_header Cache-Control "max-age=3600"; return 200 "$(printf 'x%.0s' $(seq 100))"; }
    location /16k { add_header Cache-Control "max-age=3600"; alias $work/16k; } } }
EOF
taskset -c 1 nginx -c "$work/backend.conf" -p "$work" & pids+=($!)

start() { # name port -> pid in $pid
  local name=$1 port=$2
  case $name in
    nginx)
      mkdir -p "$work/ngx-cache"
      cat > "$work/nginx-$port.conf" <<EOF
worker_processes 1; daemon off; pid $work/nginx-$port.pid; error_log $work/nginx-$port.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  proxy_cache_path $work/ngx-cache keys_zone=c:16m max_size=256m inactive=1h;
  upstream be { server 127.0.0.1:$be; keepalive 64; }
  server { listen 127.0.0.1:$port;
    location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_cache c; proxy_cache_valid 200 1h; add_header X-Cache \$upstream_cache_status; } } }
EOF
      taskset -c 0 nginx -c "$work/nginx-$port.conf" -p "$work" & pid=$!;;
    varnish)
      taskset -c 0 varnishd -F -n "$work/varnish-$port" -a "127.0.0.1:$port" -b "127.0.0.1:$be" \
        -s malloc,256m -p thread_pools=1 -p thread_pool_min=10 >"$work/varnish-$port.log" 2>&1 & pid=$!;;
    *)
      cat > "$work/$name-$port.yaml" <<EOF
server:
  listen: 127.0.0.1:$port
cache:
  size: 256MB
backends:
  - url: http://127.0.0.1:$be
EOF
      TRIREME_LOG=warn taskset -c 0 ./target/release/$name --config "$work/$name-$port.yaml" \
        2>"$work/$name-$port.log" & pid=$!;;
  esac
  pids+=($pid)
  for _ in $(seq 200); do curl -s -o /dev/null "http://127.0.0.1:$port/small" && break; sleep 0.05; done
}

cpu_ticks() { # total utime+stime of a process and its children (threads included)
  local t=0 p
  for p in $1 $(pgrep -P "$1" || true); do
    t=$((t + $(awk '{print $14 + $15}' /proc/$p/stat 2>/dev/null || echo 0)))
  done
  echo $t
}

candidates=(trireme-mio trireme-monoio trireme-tokio nginx varnish)
declare -A port
i=0
for c in "${candidates[@]}"; do
  i=$((i + 1)); port[$c]=$((base + 10 + i))
  start "$c" "${port[$c]}"; eval "pid_$i=$pid"; port[$c.pid]=$pid
  for path in small 16k; do   # warm: the first request fills the cache
    curl -s -o /dev/null "http://127.0.0.1:${port[$c]}/$path"; curl -s -o /dev/null "http://127.0.0.1:${port[$c]}/$path"
  done
done
hz=$(getconf CLK_TCK)
results="$work/results"
: > "$results"
for path in small 16k; do
  for r in $(seq "$rounds"); do
    for c in "${candidates[@]}"; do
      p=${port[$c.pid]}
      before_be=$(wc -l < "$work/backend.access")
      t0=$(cpu_ticks "$p")
      out=$(taskset -c 1 wrk -t1 -c50 -d"${secs}"s --latency "http://127.0.0.1:${port[$c]}/$path")
      t1=$(cpu_ticks "$p")
      after_be=$(wc -l < "$work/backend.access")
      reqs=$(echo "$out" | awk '/requests in/ {print $1}')
      rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
      p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
      echo "$path $c $rps $(awk -v a="$t0" -v b="$t1" -v n="$reqs" -v hz="$hz" 'BEGIN {printf "%.2f", (b - a) / hz * 1e6 / n}') $((after_be - before_be)) $p99" >> "$results"
    done
  done
done

median() { sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
for path in small 16k; do
  label=$([ $path = small ] && echo "100 B" || echo "16 KiB")
  echo
  echo "### cache hit, $label body (keep-alive, wrk -t1 -c50, ${rounds} rounds x ${secs} s, medians)"
  echo
  echo "| candidate | req/s | CPU µs/req | CPU/req ÷ nginx | CPU/req ÷ varnish | backend requests during runs | p99 |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  ng=$(awk -v p=$path '$1 == p && $2 == "nginx" {print $4}' "$results" | median)
  va=$(awk -v p=$path '$1 == p && $2 == "varnish" {print $4}' "$results" | median)
  for c in "${candidates[@]}"; do
    rps=$(awk -v p=$path -v c=$c '$1 == p && $2 == c {print $3}' "$results" | median)
    cpu=$(awk -v p=$path -v c=$c '$1 == p && $2 == c {print $4}' "$results" | median)
    be=$(awk -v p=$path -v c=$c '$1 == p && $2 == c {s += $5} END {print s + 0}' "$results")
    p99=$(awk -v p=$path -v c=$c '$1 == p && $2 == c {print $6}' "$results" | tail -1)
    awk -v c="$c" -v r="$rps" -v u="$cpu" -v n="$ng" -v v="$va" -v be="$be" -v p99="$p99" \
      'BEGIN {printf "| %s | %.0f | %.2f | %.3f | %.3f | %d | %s |\n", c, r, u, u / n, u / v, be, p99}'
  done
done
echo
echo "($(nproc) CPUs, $(uname -r); nginx $(nginx -v 2>&1 | sed 's/.*\///'), varnish $(varnishd -V 2>&1 | head -1 | awk '{print $2}' | tr -d '(varnish-'))"
