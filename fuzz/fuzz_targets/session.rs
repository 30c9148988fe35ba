#![no_main]
//! A whole proxy session fed arbitrary client and backend bytes in arbitrary splits, with
//! the runtime's side of the contract played faithfully. Must never panic: the release
//! build aborts on panic, which would kill every connection of the process.
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use trireme_core::config::{resolve_literal, Config};
use trireme_core::proxy::{Action, ProxyContext, Session};

type Ctx = (std::sync::Arc<ProxyContext>, std::sync::Arc<ProxyContext>, Instant);
static CTX: OnceLock<Ctx> = OnceLock::new();

const CONFIG: &str = "server:\n  max_body_size: 64KB\n  max_header_size: 4KB\ncache:\n  size: 1MB\nbackends:\n  - url: http://127.0.0.1:9001\n  - url: http://127.0.0.1:9002\n";

fuzz_target!(|data: &[u8]| {
    let (plain, with_l2, t0) = CTX.get_or_init(|| {
        #[allow(clippy::disallowed_methods)]
        let t0 = Instant::now();
        let build = |yaml: &str| {
            Config::from_yaml(yaml, "fuzz")
                .unwrap()
                .build(t0, std::time::SystemTime::now(), &resolve_literal)
                .unwrap()
        };
        // With L2 the backend bytes first answer the Redis lookup (arbitrary RESP).
        let l2 = CONFIG.replace(
            "  size: 1MB\n",
            "  size: 1MB\n  l2:\n    host: 127.0.0.1\n    port: 6379\n",
        );
        (build(CONFIG), build(&l2), t0)
    });
    if data.len() < 3 {
        return;
    }
    let split = 1 + data[0] as usize;
    let mode = data[1];
    let rest = &data[2..];
    let mid = rest.len() / 2;
    let (client, backend) = rest.split_at(mid);
    let mut now = *t0;
    let ctx = if mode & 64 != 0 { with_l2 } else { plain };
    let mut s = Session::new(ctx.clone(), "127.0.0.1:1".parse().unwrap(), now);
    // The upstream I/O the session holds (connected), by the id its Connect named.
    let mut up = None;
    let mut backend_pos = 0;
    for piece in client.chunks(split) {
        if s.wants_close() {
            break;
        }
        if s.wants_client_read() {
            s.feed_client(piece, now);
        }
        while let Some(a) = s.poll_action() {
            match a {
                Action::Connect { io, .. } => {
                    if mode & 1 == 0 {
                        s.on_upstream_connected(io, mode & 2 == 0, now);
                        up = Some(io);
                    } else {
                        s.on_upstream_connect_failed(io, now);
                    }
                }
                Action::ReleaseUpstream { io, .. } => {
                    // A release names the I/O it ends (one whose connect failed, too).
                    if let Some(held) = up.take() {
                        assert_eq!(held, io, "a release names the I/O connected");
                    }
                }
            }
        }
        let n = s.client_output().len();
        s.on_client_written(n, now);
        if let Some(io) = up {
            let n = s.upstream_output().len();
            s.on_upstream_written(io, n, now);
            let end = (backend_pos + split).min(backend.len());
            if backend_pos < end && s.wants_upstream_read() {
                s.feed_upstream(io, &backend[backend_pos..end], now);
                backend_pos = end;
            } else if backend_pos >= backend.len() && mode & 4 != 0 {
                s.on_upstream_eof(io, mode & 8 != 0, now);
            }
        }
        if mode & 16 != 0 {
            now += Duration::from_secs(7);
            s.on_timeout(now);
        }
    }
    if mode & 32 != 0 {
        s.begin_drain(now);
    }
    s.on_client_eof(now);
    let _ = s.deadline();
});
