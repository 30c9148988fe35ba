//! Safe defaults and conformance (issue 10): the real binaries in front of real backends on
//! 127.0.0.1, every scenario on every runtime.

#[macro_use]
mod common;

use common::*;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn wait_exit(child: &mut std::process::Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(Instant::now() < deadline, "process did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

matrix!(
    only_backend_answering_500s_and_refusing_is_still_used,
    panic_mode_keeps_failing_backends_in_rotation,
    second_instance_on_a_busy_port_fails,
    sighup_is_logged_and_ignored,
    closed_stderr_never_kills_the_process,
    cli_rejects_a_bad_log_filter_and_names_its_build,
    every_response_carries_a_valid_date,
    http_versions_400_505_and_higher_minors,
    cache_follows_rfc_9111_and_9213,
);

fn only_backend_answering_500s_and_refusing_is_still_used(bin: &PathBuf) {
    // Defaults: an application's 500s are not a backend failure, and the only backend of
    // an upstream is never ejected (panic mode), so no request gets a made-up 503.
    let b = Backend::start("only").unwrap();
    let dead_port = free_port();
    let yaml = format!(
        "server:\n  listen: \"{{listen}}\"\nload_balancing:\n  retries: 0\n  passive_health:\n    fail_timeout: 300ms\nupstreams:\n  dead:\n    backends:\n      - url: http://127.0.0.1:{dead_port}\nroutes:\n  - path: /dead\n    upstream: dead\nbackends:\n  - url: http://{{b0}}\n"
    );
    let p = Proxy::with_config(bin, &yaml, &[&b]);
    for _ in 0..10 {
        assert_eq!(get(p.addr, "/status/500").status, 500);
    }
    assert_eq!(
        get(p.addr, "/").status,
        200,
        "500s ejected the only backend"
    );
    assert_eq!(b.requests().len(), 11);
    // Refused connections do count as failures, but the only backend stays in use.
    let codes: Vec<u16> = (0..8).map(|_| get(p.addr, "/dead").status).collect();
    assert_eq!(
        codes,
        vec![502; 8],
        "the only backend was ejected: {codes:?}"
    );
    // The ejection's end is logged like its start.
    std::thread::sleep(std::time::Duration::from_millis(400));
    assert_eq!(get(p.addr, "/dead").status, 502);
    let logs = p.logs();
    assert!(logs.contains("backend ejected"), "{logs}");
    assert!(logs.contains("panic mode"), "{logs}");
    assert!(logs.contains("backend ejection over"), "{logs}");
}

fn panic_mode_keeps_failing_backends_in_rotation(bin: &PathBuf) {
    let a = Backend::start("a").unwrap();
    let dead_port = free_port();
    let yaml = format!(
        "server:\n  listen: \"{{listen}}\"\nload_balancing:\n  retries: 0\n  passive_health:\n    max_fails: 1\n    on_5xx: true\n    fail_timeout: 60s\nbackends:\n  - url: http://{{b0}}\n  - url: http://127.0.0.1:{dead_port}\n"
    );
    let p = Proxy::with_config(bin, &yaml, &[&a]);
    // One of two failing: it is ejected (half the backends stay healthy), so at most the
    // first request to it fails.
    let codes: Vec<u16> = (0..10).map(|_| get(p.addr, "/").status).collect();
    assert_eq!(
        codes.iter().filter(|&&c| c == 502).count(),
        1,
        "the refusing backend was not ejected: {codes:?}"
    );
    assert_eq!(codes.iter().filter(|&&c| c == 200).count(), 9);
    // The other one fails too (on_5xx counts here): none healthy, so both stay in rotation.
    assert_eq!(get(p.addr, "/status/500").status, 500);
    let before = a.requests().len();
    let codes: Vec<u16> = (0..10).map(|_| get(p.addr, "/").status).collect();
    assert!(
        codes.contains(&200) && codes.contains(&502) && !codes.contains(&503),
        "both backends should be tried: {codes:?}"
    );
    assert_eq!(
        a.requests().len() - before,
        codes.iter().filter(|&&c| c == 200).count()
    );
    assert!(p.logs().contains("panic mode"), "{}", p.logs());
}

fn second_instance_on_a_busy_port_fails(bin: &PathBuf) {
    let b = Backend::start("b").unwrap();
    let url = format!("http://{}", b.addr);
    let first = Proxy::start(
        bin,
        &[
            "--listen".into(),
            "{listen}".into(),
            "--backend".into(),
            url.clone(),
            "--workers".into(),
            "2".into(),
        ],
    );
    // Several workers (SO_REUSEPORT within the instance) and one: both refuse the port.
    for workers in ["2", "1"] {
        let mut second = Command::new(bin)
            .args([
                "--listen",
                &first.addr.to_string(),
                "--backend",
                &url,
                "--workers",
                workers,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let st = wait_exit(&mut second, Duration::from_secs(10));
        let mut err = String::new();
        std::io::Read::read_to_string(second.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert!(
            !st.success(),
            "second instance ({workers} workers) started: {err}"
        );
        assert!(err.contains("in use"), "{err}");
        assert!(err.contains(&first.addr.to_string()), "{err}");
    }
    // All traffic still reaches the first instance.
    for _ in 0..6 {
        assert_eq!(get(first.addr, "/").status, 200);
    }
}

fn sighup_is_logged_and_ignored(bin: &PathBuf) {
    let b = Backend::start("b").unwrap();
    let p = Proxy::with_backends(bin, &[&b], &[]);
    let addr = p.addr;
    let slow = std::thread::spawn(move || get(addr, "/slow/600"));
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: kill(2) on the PID of the process this test started.
    assert_eq!(unsafe { libc::kill(p.pid() as i32, libc::SIGHUP) }, 0);
    assert_eq!(
        slow.join().unwrap().status,
        200,
        "the request in flight was cut"
    );
    assert_eq!(get(p.addr, "/").status, 200);
    let logs = p.logs();
    assert!(logs.contains("reload is not supported yet"), "{logs}");
}

fn closed_stderr_never_kills_the_process(bin: &PathBuf) {
    // A config error whose message is written to a closed pipe: exit 1, not SIGABRT.
    let dir = std::env::temp_dir().join(format!("trireme-stderr-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "server:\n  listen: nowhere\n  bogus: 1\nbackends: []\n",
    )
    .unwrap();
    for _ in 0..5 {
        let mut c = Command::new(bin)
            .args(["check", "--config", bad.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(c.stderr.take());
        drop(c.stdout.take());
        let st = wait_exit(&mut c, Duration::from_secs(10));
        assert_eq!(st.code(), Some(1), "{st:?}");
    }
    // A running proxy whose stderr closes keeps serving while it logs.
    let backend = Backend::start("b").unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut c = Command::new(bin)
        .args([
            "--listen",
            &listen,
            "--backend",
            &format!("http://{}", backend.addr),
            "--backend",
            &format!("http://127.0.0.1:{}", free_port()),
        ])
        .env("TRIREME_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(c.stderr.take());
    // Requests to the refusing backend log warnings into the closed pipe.
    for _ in 0..20 {
        let st = get(addr, "/").status;
        assert!(st == 200 || st == 502, "{st}");
    }
    assert!(c.try_wait().unwrap().is_none(), "the proxy died");
    assert_eq!(get(addr, "/").status, 200);
    let _ = c.kill();
    let _ = c.wait();
}

fn cli_rejects_a_bad_log_filter_and_names_its_build(bin: &PathBuf) {
    let out = Command::new(bin)
        .args(["--log", "nonsense=[[[", "--backend", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid log filter"), "{err}");
    let out = Command::new(bin).arg("--version").output().unwrap();
    let v = String::from_utf8_lossy(&out.stdout);
    let runtime = bin
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .trim_start_matches("trireme-");
    assert!(v.contains(&format!("runtime {runtime}")), "{v}");
    assert!(v.contains("commit "), "{v}");
    assert!(!v.contains("commit unknown"), "{v}");
}

fn assert_dated(r: &Response, what: &str) {
    let d = r
        .header("date")
        .unwrap_or_else(|| panic!("{what}: no Date (status {})", r.status));
    let t = trireme_core::cache::parse_date(d.as_bytes())
        .unwrap_or_else(|| panic!("{what}: invalid Date `{d}`"));
    assert_eq!(d.len(), 29, "{what}: not an IMF-fixdate: {d}");
    let now = std::time::SystemTime::now();
    let skew = now.duration_since(t).unwrap_or_else(|e| e.duration());
    assert!(
        skew < Duration::from_secs(5),
        "{what}: Date {d} is off by {skew:?}"
    );
    assert_eq!(
        r.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("date"))
            .count(),
        1,
        "{what}: one Date only"
    );
}

fn every_response_carries_a_valid_date(bin: &PathBuf) {
    let b = Backend::start("b").unwrap();
    let dead_port = free_port();
    let yaml = format!(
        "server:\n  listen: \"{{listen}}\"\n  header_timeout: 1s\n  max_body_size: 1KB\nload_balancing:\n  retries: 0\n  response_timeout: 1s\n  passive_health:\n    max_fails: 1\n    panic_threshold: 0\nupstreams:\n  dead:\n    backends:\n      - url: http://127.0.0.1:{dead_port}\nroutes:\n  - path: /dead\n    upstream: dead\nbackends:\n  - url: http://{{b0}}\ncache:\n  size: 1MB\n"
    );
    let p = Proxy::with_config(bin, &yaml, &[&b]);
    // Forwarded, from an origin that sends no Date; then a cache miss and hit of one.
    let r = get(p.addr, "/");
    assert_eq!(r.status, 200);
    assert_dated(&r, "forwarded");
    let miss = get(p.addr, "/c?cc=max-age=60");
    assert_dated(&miss, "cache miss");
    let hit = get(p.addr, "/c?cc=max-age=60");
    assert_eq!(hit.header("x-cache"), Some("HIT"));
    assert_dated(&hit, "cache hit");
    // Generated: 502, 503, 504, 400, 413, 405, 408.
    let r = get(p.addr, "/dead");
    assert_eq!(r.status, 502);
    assert_dated(&r, "502");
    let r = get(p.addr, "/dead");
    assert_eq!(r.status, 503);
    assert_dated(&r, "503");
    let r = get(p.addr, "/slow/3000");
    assert_eq!(r.status, 504);
    assert_dated(&r, "504");
    for (raw, want) in [
        (&b"GET / HTTP/1.1\r\n\r\n"[..], 400),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n",
            413,
        ),
        (b"TRACE / HTTP/1.1\r\nHost: a\r\n\r\n", 405),
        (b"GET / HTTP/1.1\r\nHost: a\r\n", 408),
    ] {
        let mut c = p.client();
        c.send(raw);
        let r = c.read_response(false).unwrap();
        assert_eq!(r.status, want);
        assert_dated(&r, &want.to_string());
    }
}

fn cache_follows_rfc_9111_and_9213(bin: &PathBuf) {
    let b = Backend::start("b").unwrap();
    let yaml =
        "server:\n  listen: \"{listen}\"\nbackends:\n  - url: http://{b0}\ncache:\n  size: 4MB\n";
    let p = Proxy::with_config(bin, yaml, &[&b]);
    let twice = |path: &str| {
        let first = get(p.addr, path);
        (first, get(p.addr, path))
    };
    // CDN-Cache-Control takes precedence over Cache-Control here (a CDN-style cache), and
    // is forwarded unless configured otherwise.
    let (first, second) = twice("/t1?cc=no-store&cdncc=max-age=60");
    assert_eq!(first.header("cdn-cache-control"), Some("max-age=60"));
    assert_eq!(
        second.header("x-cache"),
        Some("HIT"),
        "CDN-Cache-Control ignored"
    );
    let (_, second) = twice("/t2?cc=max-age=60&cdncc=no-store");
    assert_ne!(
        second.header("x-cache"),
        Some("HIT"),
        "CDN-Cache-Control: no-store ignored"
    );
    // A list-valued Age: the first value counts (7200 > max-age=100: stale on arrival).
    let (_, second) = twice("/age?cc=max-age=100&age=7200,%200");
    assert_ne!(second.header("x-cache"), Some("HIT"), "Age list read as 0");
    // An invalid Age is ignored: fresh.
    let (_, second) = twice("/age2?cc=max-age=100&age=soon");
    assert_eq!(second.header("x-cache"), Some("HIT"));
    // A chunked response is stored de-chunked and reused with its length.
    let (first, second) = twice("/chunked/3000?cc=max-age=60");
    assert_eq!(first.body, pattern(3000));
    assert_eq!(second.header("x-cache"), Some("HIT"));
    assert_eq!(second.header("content-length"), Some("3000"));
    assert!(second.header("transfer-encoding").is_none());
    assert_eq!(second.body, pattern(3000));
    // Vary: spellings of the same Accept-Language share one variant.
    let before = b.requests().len();
    let mut c = p.client();
    c.send(b"GET /v?cc=max-age=60&vary=Accept-Language HTTP/1.1\r\nHost: t\r\nAccept-Language: en-US, fr;q=0.5\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().status, 200);
    c.send(b"GET /v?cc=max-age=60&vary=Accept-Language HTTP/1.1\r\nHost: t\r\nAccept-Language: fr; q=0.5,EN-us\r\n\r\n");
    let r = c.read_response(false).unwrap();
    assert_eq!(r.header("x-cache"), Some("HIT"), "one variant per spelling");
    assert_eq!(b.requests().len() - before, 1);
    // must-understand with an understood status: stored despite no-store.
    let (_, second) = twice("/mu?cc=max-age=60,no-store,must-understand");
    assert_eq!(second.header("x-cache"), Some("HIT"));
    // Targeted fields stripped from what is forwarded when configured, still obeyed.
    let yaml = "server:\n  listen: \"{listen}\"\nbackends:\n  - url: http://{b0}\ncache:\n  size: 4MB\n  strip_targeted_fields: true\n  targeted_fields: [Edge-Control, CDN-Cache-Control]\n";
    let p2 = Proxy::with_config(bin, yaml, &[&b]);
    let first = get(p2.addr, "/t3?cc=no-store&cdncc=max-age=60");
    assert!(first.header("cdn-cache-control").is_none());
    assert_eq!(
        get(p2.addr, "/t3?cc=no-store&cdncc=max-age=60").header("x-cache"),
        Some("HIT")
    );
}

fn http_versions_400_505_and_higher_minors(bin: &PathBuf) {
    let b = Backend::start("b").unwrap();
    let p = Proxy::with_backends(bin, &[&b], &[]);
    for (raw, want) in [
        (&b"GET / http/1.1\r\nHost: a\r\n\r\n"[..], 400),
        (b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET / HTTP/1.1junk\r\nHost: a\r\n\r\n", 400),
        (b"GET / HTTP/3.0\r\nHost: a\r\n\r\n", 505),
        (b"GET /minor HTTP/1.2\r\nHost: a\r\n\r\n", 200),
    ] {
        let mut c = p.client();
        c.send(raw);
        let r = c.read_response(false).unwrap();
        assert_eq!(
            r.status,
            want,
            "{}",
            String::from_utf8_lossy(raw).escape_debug()
        );
    }
    let got = b.requests();
    assert_eq!(
        got.len(),
        1,
        "only the HTTP/1.2 request reaches the backend"
    );
    assert_eq!(got[0].target, "/minor");
}
