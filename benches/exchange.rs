//! One keep-alive exchange through a core session, buffers reused: shared by the criterion
//! benchmark (`core.rs`) and the callgrind counter (`exchange_instr.rs`).
use std::time::Instant;
use trireme_core::buf::BufPool;
use trireme_core::proxy::{Action, Session};

pub const REQ: &[u8] = b"GET /api/v1/users/12345?expand=profile HTTP/1.1\r\nHost: api.example.com\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36\r\nAccept: application/json\r\nAccept-Encoding: gzip, deflate, br\r\nAccept-Language: en-US,en;q=0.9\r\nCookie: session=abcdef0123456789; theme=dark\r\nX-Request-Id: 7f0c1e7a-4c1b-4f7e-9a56-1b2c3d4e5f60\r\nConnection: keep-alive\r\n\r\n";

/// Request in, backend answers `resp_head` + `body`, response out; the bytes written to the
/// client.
pub fn exchange(s: &mut Session, resp_head: &[u8], body: &[u8], t0: Instant) -> usize {
    // Never parked here, so the pool is never asked for a buffer (and allocates none).
    let mut pool = BufPool::new(0);
    s.reserve_client_in(&mut pool).extend_from_slice(REQ);
    s.on_client_read(t0);
    let mut up = None;
    while let Some(a) = s.poll_action() {
        if let Action::Connect { io, .. } = a {
            s.on_upstream_connected(io, true, t0);
            up = Some(io);
        }
    }
    let io = up.expect("the request went to a backend");
    let n = s.upstream_output().len();
    s.on_upstream_written(io, n, t0);
    let up_in = s.reserve_up_in(&mut pool);
    up_in.extend_from_slice(resp_head);
    up_in.extend_from_slice(body);
    s.on_upstream_read(io, t0);
    while s.poll_action().is_some() {}
    let n = s.client_output().len();
    std::hint::black_box(s.client_output().pending());
    s.on_client_written(n, t0);
    n
}
