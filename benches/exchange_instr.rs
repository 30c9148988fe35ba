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
use trireme_core::proxy::{Action, Session};

const REQ: &[u8] = b"GET /api/v1/users/12345?expand=profile HTTP/1.1\r\nHost: api.example.com\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36\r\nAccept: application/json\r\nAccept-Encoding: gzip, deflate, br\r\nAccept-Language: en-US,en;q=0.9\r\nCookie: session=abcdef0123456789; theme=dark\r\nX-Request-Id: 7f0c1e7a-4c1b-4f7e-9a56-1b2c3d4e5f60\r\nConnection: keep-alive\r\n\r\n";

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
        s.client_in.extend_from_slice(REQ);
        s.on_client_read(t0);
        while let Some(a) = s.poll_action() {
            if let Action::Connect { .. } = a {
                s.on_upstream_connected(true, t0);
            }
        }
        let k = s.up_out.len();
        s.on_upstream_written(k, t0);
        s.up_in.extend_from_slice(resp_head);
        s.up_in.extend_from_slice(&body);
        s.on_upstream_read(t0);
        while s.poll_action().is_some() {}
        let k = s.client_out.len();
        out += k;
        s.on_client_written(k, t0);
    }
    println!("{n} exchanges, {out} bytes to the client");
}
