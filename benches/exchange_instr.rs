//! Instructions per keep-alive exchange through a core session, for callgrind (exact and
//! repeatable where wall-clock benchmarks on a shared machine are not):
//!
//!     cargo build --release -p trireme-core --example exchange-instr
//!     valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \
//!         target/release/examples/exchange-instr 20000 [nodate]
//!     # instructions per exchange: the "summary:" / "totals:" Ir of /tmp/cg.out over N,
//!     # less the same run with N = 0 (set-up)
//!
//! `nodate`: the origin sends no `Date` (trireme adds one).
use std::time::Instant;
use trireme_core::config::{resolve_literal, Config};
use trireme_core::proxy::Session;

#[path = "exchange.rs"]
mod exchange;

#[allow(clippy::disallowed_methods)]
fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let nodate = args.next().as_deref() == Some("nodate");
    let t0 = Instant::now();
    let cfg = Config::from_yaml(
        "backends:\n  - url: http://127.0.0.1:9001\n  - url: http://127.0.0.1:9002\n",
        "bench",
    )
    .unwrap();
    let wall = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
    let ctx = cfg.build(t0, wall, &resolve_literal).unwrap();
    let resp_head: &[u8] = if nodate {
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\n"
    } else {
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\nDate: Mon, 23 Nov 2026 02:00:00 GMT\r\n\r\n"
    };
    let body = [b'x'; 100];
    let mut s = Session::new(ctx, "10.0.0.1:40000".parse().unwrap(), t0);
    let mut out = 0usize;
    for _ in 0..n {
        out += exchange::exchange(&mut s, resp_head, &body, t0);
    }
    println!("{n} exchanges, {out} bytes to the client");
}
