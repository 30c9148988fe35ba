//! Black-box scenarios: the real binary in front of real backend servers on 127.0.0.1.
//! Every scenario runs once per runtime binary (each module's `matrix!` list); a new
//! runtime is one more line in `tests/common`'s `matrix!`. One module per concern:
//! `proxy` (framing, pooling, balancing, health, errors), `cache` (L1, refreshes, warming,
//! admin), `l2` (Redis tier), `runtime` (limits, many connections, shutdown, CLI, flavours);
//! helpers they share live here.

#[macro_use]
#[path = "../common/mod.rs"]
mod common;

use common::*;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod cache;
mod l2;
mod proxy;
mod runtime;
mod tls;

/// A complete response of its own, sent where no response was asked for.
const INJECTED: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Injected: yes\r\nCache-Control: max-age=600\r\n\r\nINJECTED";

fn ok_answer(target: &str) -> Vec<u8> {
    let body = format!("answer to {target}");
    format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nCache-Control: max-age=600\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A backend that breaks framing in every way the outside probe found: bytes after a HEAD
/// answer, past Content-Length, after the last chunk, a body on 204 and 304, and a whole
/// unsolicited response on an idle connection; each arrives 30 ms after the answer, while
/// the connection sits in the pool. Anything else is answered `answer to TARGET`.
fn stray_bytes_backend() -> Rogue {
    Rogue::start(|r| {
        let late = |answer: &[u8]| {
            vec![
                Step::Send(answer.to_vec()),
                Step::Sleep(Duration::from_millis(30)),
                Step::Send(INJECTED.to_vec()),
            ]
        };
        match r.target.as_str() {
            "/head-extra" => late(b"HTTP/1.1 200 OK\r\nContent-Length: 102\r\n\r\n"),
            "/length-extra" => {
                // The extra bytes in the same write as the body.
                let mut a = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".to_vec();
                a.extend_from_slice(INJECTED);
                vec![Step::Send(a)]
            }
            "/chunk-extra" => late(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            ),
            "/204-body" => late(b"HTTP/1.1 204 No Content\r\n\r\n"),
            "/304-body" => late(b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n"),
            "/unsolicited" => late(&ok_answer("/unsolicited")),
            t => vec![Step::Send(ok_answer(t))],
        }
    })
}

use std::sync::Mutex;

/// Resident memory of a process now, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Raise this test process's open-files limit (10,000 client sockets).
fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_cur < want {
            let r = libc::rlimit {
                rlim_cur: want.max(lim.rlim_cur),
                rlim_max: lim.rlim_max.max(want),
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                let r = libc::rlimit {
                    rlim_cur: lim.rlim_max,
                    rlim_max: lim.rlim_max,
                };
                libc::setrlimit(libc::RLIMIT_NOFILE, &r);
            }
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

const MANY: usize = 10_000;

/// The 10,000-connection scenarios run one at a time (file descriptors, backlog).
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The names of process `pid`'s threads.
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .collect()
        })
        .unwrap_or_default()
}

fn threads_of(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Two proxies (`--cache-l2`) sharing one Redis, each with its own admin listener.
fn l2_proxy(
    bin: &PathBuf,
    b: &Backend,
    redis: std::net::SocketAddr,
) -> (Proxy, std::net::SocketAddr) {
    let admin: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let p = Proxy::with_backends(
        bin,
        &[b],
        &[
            "--cache",
            "4MB",
            "--cache-l2",
            &redis.to_string(),
            "--admin",
            &admin.to_string(),
        ],
    );
    (p, admin)
}

/// The admin metrics once `name` reaches `n` (bounded wait).
fn wait_metric(admin: std::net::SocketAddr, name: &str, n: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = admin_metrics(admin);
        if metric(&m, name) >= n || Instant::now() > deadline {
            return m;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Read from `s` into `buf` until `done(buf)` (bounded by the socket's read timeout).
fn read_until(s: &mut std::net::TcpStream, buf: &mut Vec<u8>, done: impl Fn(&[u8]) -> bool) {
    use std::io::Read;
    let mut chunk = [0u8; 65536];
    while !done(buf) {
        let n = s.read(&mut chunk).expect("read");
        assert!(n > 0, "closed early after {} bytes", buf.len());
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn head_end(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}
