//! Per-runtime resource figures that a load generator cannot see:
//!
//! 1. Heap operations per proxied keep-alive request in steady state: the proxy runs
//!    in this process (one worker) under a counting global allocator; the backend and the
//!    load threads here are allocation-free after set-up, so every count is the proxy's.
//!    The same with the cache on and every request a hit (answered from L1).
//! 2. Resident memory per idle client connection: the real binary, 10,000 keep-alive
//!    connections opened and left idle, VmRSS before and after.
//!
//!     cargo bench -p trireme --bench runtimes            (about 30 s)
//!
//! Prints a Markdown table. Sozu's published figures for comparison: 7.8 heap operations
//! per keep-alive request.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use trireme::runtimes::{Runtime, MIO, MONOIO, TOKIO};
use trireme_core::config::{resolve_literal, Config};
use trireme_core::shutdown::Shutdown;

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static FREES: AtomicU64 = AtomicU64::new(0);
/// Bytes allocated and not yet freed.
static LIVE: AtomicI64 = AtomicI64::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        LIVE.fetch_add(l.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc`, passed on unchanged.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        FREES.fetch_add(1, Ordering::Relaxed);
        LIVE.fetch_sub(l.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller's contract for `dealloc`, passed on unchanged.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        LIVE.fetch_add(l.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc_zeroed`, passed on unchanged.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        LIVE.fetch_add(n as i64 - l.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller's contract for `realloc`, passed on unchanged.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

const SMALL: usize = 100;
const LARGE: usize = 16 * 1024;
const CONNS: usize = 16;
const WARMUP: usize = 200; // requests per connection
const MEASURED: usize = 2000; // requests per connection

/// An allocation-free backend: one thread per connection, fixed buffers, a canned
/// 100-byte response per request head.
fn backend(cacheable: bool, body: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let cc = if cacheable {
        "Cache-Control: max-age=3600\r\n"
    } else {
        ""
    };
    let mut resp = format!("HTTP/1.1 200 OK\r\n{cc}Content-Length: {}\r\n\r\n", body).into_bytes();
    resp.resize(resp.len() + body, b'x');
    let resp: &'static [u8] = resp.leak();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let mut buf = [0u8; 8192];
                let mut have = 0;
                loop {
                    match s.read(&mut buf[have..]) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => have += n,
                    }
                    // Answer every complete head (GETs only, no bodies).
                    while let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
                        if s.write_all(resp).is_err() {
                            return;
                        }
                        buf.copy_within(end + 4..have, 0);
                        have -= end + 4;
                    }
                }
            });
        }
    });
    addr
}

/// One keep-alive request and its response (fixed-size: known length).
fn exchange(s: &mut TcpStream, buf: &mut [u8], body: usize) {
    s.write_all(b"GET /bench HTTP/1.1\r\nHost: bench\r\n\r\n")
        .unwrap();
    let mut have = 0;
    loop {
        let n = s.read(&mut buf[have..]).unwrap();
        assert!(n > 0, "proxy closed the connection");
        have += n;
        if let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
            if have >= end + 4 + body {
                assert!(buf.starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..have]);
                return;
            }
        }
    }
}

type Running = (
    SocketAddr,
    Arc<Shutdown>,
    std::thread::JoinHandle<std::io::Result<()>>,
);

/// The proxy on `rt` in this process (one worker), in front of `be`.
fn start_in_process(rt: &Runtime, be: SocketAddr, extra: &str, max_connections: usize) -> Running {
    let yaml = format!(
        "server:\n  listen: 127.0.0.1:0\n  workers: 1\n  max_connections: {max_connections}\n{extra}backends:\n  - url: http://{be}\n"
    );
    let cfg = Config::from_yaml(&yaml, "bench").unwrap();
    let ctx = cfg
        .build(
            Instant::now(),
            std::time::SystemTime::now(),
            &resolve_literal,
        )
        .unwrap();
    let opts = cfg.run_options(1, 1 << 16);
    let listeners = trireme::process::bind_listeners(cfg.listen, (rt.listeners)(&opts)).unwrap();
    let addr = listeners[0].local_addr().unwrap();
    let sd = Arc::new(Shutdown::new());
    let run = rt.run;
    let sd2 = sd.clone();
    let listeners = trireme::runtimes::Listeners::proxy(listeners);
    let proxy = std::thread::spawn(move || run(ctx, opts, listeners, sd2));
    (addr, sd, proxy)
}

/// Heap bytes held per idle keep-alive client connection (after one request each), by the
/// proxy in this process: what stays allocated while a connection waits for its next
/// request (buffers are meant to be back in the pool by then).
fn heap_per_idle_conn(rt: &Runtime) -> f64 {
    const N: usize = 2_000;
    let be = backend(false, SMALL);
    let (addr, sd, proxy) = start_in_process(rt, be, "", N + 100);
    let mut buf = vec![0u8; 4096];
    let mut first = TcpStream::connect(addr).unwrap();
    for _ in 0..WARMUP {
        exchange(&mut first, &mut buf, SMALL);
    }
    let mut conns: Vec<TcpStream> = Vec::with_capacity(N);
    std::thread::sleep(Duration::from_millis(300));
    let before = LIVE.load(Ordering::SeqCst);
    for _ in 0..N {
        let mut s = TcpStream::connect(addr).unwrap();
        exchange(&mut s, &mut buf, SMALL);
        conns.push(s);
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = LIVE.load(Ordering::SeqCst);
    drop(conns);
    drop(first);
    sd.request();
    proxy.join().unwrap().unwrap();
    (after - before) as f64 / N as f64
}

/// Heap operations (allocations + reallocations, frees) per request in steady state;
/// with `cache`, every measured request is a hit.
fn allocs_per_request(rt: &Runtime, cache: bool, body: usize) -> (f64, f64) {
    let be = backend(cache, body);
    let cache_cfg = if cache { "cache:\n  size: 16MB\n" } else { "" };
    let (addr, sd, proxy) = start_in_process(rt, be, cache_cfg, 1000);

    let go = Arc::new(AtomicBool::new(false));
    let warm = Arc::new(std::sync::Barrier::new(CONNS + 1));
    let done = Arc::new(std::sync::Barrier::new(CONNS + 1));
    let clients: Vec<_> = (0..CONNS)
        .map(|_| {
            let (go, warm, done) = (go.clone(), warm.clone(), done.clone());
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_nodelay(true).unwrap();
                let mut buf = vec![0u8; 4096 + body];
                for _ in 0..WARMUP {
                    exchange(&mut s, &mut buf, body);
                }
                warm.wait();
                while !go.load(Ordering::SeqCst) {
                    std::hint::spin_loop();
                }
                for _ in 0..MEASURED {
                    exchange(&mut s, &mut buf, body);
                }
                done.wait();
                drop(s);
            })
        })
        .collect();
    warm.wait();
    std::thread::sleep(Duration::from_millis(50));
    let (a0, f0) = (ALLOCS.load(Ordering::SeqCst), FREES.load(Ordering::SeqCst));
    go.store(true, Ordering::SeqCst);
    done.wait();
    let (a1, f1) = (ALLOCS.load(Ordering::SeqCst), FREES.load(Ordering::SeqCst));
    for c in clients {
        c.join().unwrap();
    }
    sd.request();
    proxy.join().unwrap().unwrap();
    let n = (CONNS * MEASURED) as f64;
    ((a1 - a0) as f64 / n, (f1 - f0) as f64 / n)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

const IDLE: usize = 10_000;

/// Bytes of RSS per idle client connection, on the real binary: never used (`request`
/// false), or kept alive after one request each.
fn idle_rss_per_conn(bin: &str, request: bool) -> Option<f64> {
    let be = backend(false, SMALL);
    let port = TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let mut child = Command::new(bin)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--backend",
            &format!("http://{be}"),
            "--workers",
            "1",
        ])
        .env("TRIREME_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let t0 = Instant::now();
    let mut first = loop {
        if let Ok(s) = TcpStream::connect(addr) {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut buf = vec![0u8; 4096];
    for _ in 0..100 {
        exchange(&mut first, &mut buf, SMALL);
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = rss_kib(child.id());
    let conns: Vec<TcpStream> = (0..IDLE)
        .filter_map(|_| {
            let mut s = TcpStream::connect(addr).ok()?;
            if request {
                exchange(&mut s, &mut buf, SMALL);
            }
            Some(s)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let after = rss_kib(child.id());
    let n = conns.len();
    drop(conns);
    let _ = child.kill();
    let _ = child.wait();
    (n == IDLE).then(|| (after.saturating_sub(before) * 1024) as f64 / n as f64)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing useful: either way run.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    let bins = [
        (&MIO, env!("CARGO_BIN_EXE_trireme-mio")),
        (&MONOIO, env!("CARGO_BIN_EXE_trireme-monoio")),
        (&TOKIO, env!("CARGO_BIN_EXE_trireme-tokio")),
    ];
    println!("| runtime | heap allocs / request | heap frees / request | allocs / 16 KiB request | allocs / cache hit | frees / cache hit | RSS per idle connection, never used (bytes, {IDLE} conns) | RSS per idle keep-alive connection, after a request | heap bytes per idle keep-alive connection |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (rt, bin) in bins {
        let (a, f) = allocs_per_request(rt, false, SMALL);
        let (la, _) = allocs_per_request(rt, false, LARGE);
        let (ha, hf) = allocs_per_request(rt, true, SMALL);
        let show = |b: Option<f64>| b.map_or("n/a".to_string(), |b| format!("{b:.0}"));
        let idle = show(idle_rss_per_conn(bin, false));
        let kept = show(idle_rss_per_conn(bin, true));
        let heap = heap_per_idle_conn(rt);
        println!(
            "| trireme-{} | {a:.3} | {f:.3} | {la:.3} | {ha:.3} | {hf:.3} | {idle} | {kept} | {heap:.0} |",
            rt.name
        );
    }
    println!();
    println!(
        "(the counter works: {} heap allocations in this process in all, mostly set-up)",
        ALLOCS.load(Ordering::SeqCst)
    );
    println!(
        "({CONNS} keep-alive connections x {MEASURED} requests after {WARMUP} each of warm-up; one worker; 100-byte responses unless said)"
    );
}
