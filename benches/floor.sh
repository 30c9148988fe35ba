#!/usr/bin/env bash
# How close trireme is to the floor: the shared harness with a do-nothing byte relay
# (benches/floor_relay.rs: the four socket calls of a keep-alive request and nothing else)
# beside trireme-mio, nginx and HAProxy. The relay's CPU per request is what the kernel
# charges any proxy's core for a request on this harness; a proxy can only add to it.
#
#   benches/floor.sh [ROUNDS] [SECONDS]      (default 5 rounds x 6 s, keep-alive scenarios)
source "$(dirname "$0")/harness.sh"
cargo build --release --bin trireme-mio --example floor-relay
"$harness" --rounds "$rounds" --duration "$secs" --scenarios "${SCENARIOS:-ka-small,ka-16k}" \
  --peers nginx,haproxy \
  --candidate 'floor-relay=./target/release/examples/floor-relay --listen 127.0.0.1:{listen} {backend_args}' \
  --candidate 'trireme-mio=./target/release/trireme-mio --listen 127.0.0.1:{listen} {backend_args}'
