//! Runtime behaviour: connection limits, many connections, shutdown and drain, CLI checks, runtime flavours.

use super::*;

matrix!(
    slow_client_head_is_cut_off,
    graceful_shutdown_finishes_in_flight,
    check_command_reports_errors,
    clients_vanishing_mid_response_leave_no_work_behind,
    ten_thousand_keep_alive_connections,
    graceful_shutdown_under_load_loses_nothing,
    max_connections_enforced_at_accept,
    connections_per_client_address_are_limited,
);

fn slow_client_head_is_cut_off(bin: &PathBuf) {
    let b = Backend::start("b1").unwrap();
    let yaml =
        "server:\n  listen: \"{listen}\"\n  header_timeout: 2s\nbackends:\n  - url: http://{b0}\n";
    let p = Proxy::with_config(bin, yaml, &[&b]);
    let mut c = p.client();
    let start = Instant::now();
    // One byte a second: every byte is progress, so only the head timeout can stop it.
    let req = b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: 1\r\n\r\n";
    let mut cut = false;
    for byte in req {
        if c.w.write_all(&[*byte]).is_err() {
            cut = true;
            break;
        }
        if start.elapsed() > Duration::from_secs(6) {
            break;
        }
        // Stop writing once the proxy has answered or closed.
        c.w.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut peek = [0u8; 1];
        match c.w.peek(&mut peek) {
            Ok(_) => {
                cut = true;
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => {
                cut = true;
                break;
            }
        }
    }
    let took = start.elapsed();
    c.w.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let r = c.read_response(false);
    assert!(cut, "slow client was not cut off after {took:?}");
    assert!(
        r.as_ref().is_none_or(|r| r.status == 408),
        "expected 408 or a close: {r:?}"
    );
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
        "cut off after {took:?}, header_timeout is 2s"
    );
    assert_eq!(b.requests().len(), 0);
}

fn graceful_shutdown_finishes_in_flight(bin: &PathBuf) {
    let b = Backend::start("b1").unwrap();
    let mut p = Proxy::with_backends(bin, &[&b], &[]);
    let addr = p.addr;
    let inflight: Vec<_> = (0..5)
        .map(|_| std::thread::spawn(move || get(addr, "/slow/800")))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut idle = Client::connect(addr);
    p.sigterm();
    for h in inflight {
        let r = h.join().unwrap();
        assert_eq!(r.status, 200, "in-flight request lost in shutdown");
        assert_eq!(r.header("connection"), Some("close"));
    }
    assert!(
        idle.closed_within(Duration::from_secs(3)),
        "idle keep-alive connection not closed on shutdown"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = p.child.try_wait().unwrap() {
            assert!(st.success(), "exit status {st:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "proxy did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "still accepting after shutdown"
    );
}

fn check_command_reports_errors(bin: &PathBuf) {
    let dir = std::env::temp_dir();
    let tag = format!(
        "{}-{}",
        std::process::id(),
        bin.file_name().unwrap().to_string_lossy()
    );
    let good = dir.join(format!("trireme-check-good-{tag}.yaml"));
    let bad = dir.join(format!("trireme-check-bad-{tag}.yaml"));
    std::fs::write(&good, "server:\n  listen: 127.0.0.1:8080\nbackends:\n  - url: http://127.0.0.1:9000\n    weight: 2\n").unwrap();
    std::fs::write(&bad, "server:\n  listen: 127.0.0.1:8080\n  keep_alive_timeout: forever\nbackends:\n  - url: http://127.0.0.1:9000\n").unwrap();
    let out = std::process::Command::new(bin)
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(bin)
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&bad.display().to_string())
            && err.contains(":3:")
            && err.contains("server.keep_alive_timeout")
            && err.contains("forever"),
        "{err}"
    );
    let out = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    let _ = std::fs::remove_file(good);
    let _ = std::fs::remove_file(bad);
}

fn clients_vanishing_mid_response_leave_no_work_behind(bin: &PathBuf) {
    let b = Backend::start("b1").unwrap();
    let p = Proxy::with_backends(bin, &[&b], &["--workers", "1"]);
    // Clients that ask for large bodies and go away after a few bytes, or right after
    // sending; with one worker thread a session that kept retrying would starve the rest.
    for i in 0..30 {
        let mut c = p.client();
        c.send(b"GET /bytes/4000000 HTTP/1.1\r\nHost: t\r\n\r\n");
        if i % 2 == 0 {
            let mut buf = [0u8; 100];
            let _ = std::io::Read::read(&mut c.rd, &mut buf);
        }
        drop(c);
    }
    std::thread::sleep(Duration::from_millis(500));
    let ticks = |pid: u32| -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<&str> = s.rsplit(") ").next().unwrap().split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    let before = ticks(p.pid());
    std::thread::sleep(Duration::from_secs(1));
    let used = ticks(p.pid()) - before;
    assert!(
        used < 20,
        "proxy used {used} CPU ticks in 1 s with no clients (spinning)"
    );
    assert_eq!(get(p.addr, "/").status, 200);
}

fn ten_thousand_keep_alive_connections(bin: &PathBuf) {
    let _one_at_a_time = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let limit = raise_nofile(MANY as u64 + 4096);
    assert!(
        limit >= MANY as u64 + 1024,
        "open files limit {limit} too low for {MANY} connections (run as root or raise ulimit -n)"
    );
    let b = Backend::start("b1").unwrap();
    let yaml = "server:\n  listen: \"{listen}\"\n  workers: 2\n  max_connections: 15000\n  keep_alive_timeout: 60s\n  header_timeout: 60s\n  connection_pool:\n    max_idle: 256\nbackends:\n  - url: http://{b0}\n";
    let p = Proxy::with_config(bin, yaml, &[&b]);
    // Warm up: one request per worker so buffers, pools and runtime structures exist.
    for _ in 0..20 {
        assert_eq!(get(p.addr, "/").status, 200);
    }
    std::thread::sleep(Duration::from_millis(200));
    let before = rss_kib(p.pid());
    // Plain sockets (one descriptor each); a wave wraps its 200 in test clients.
    let conns: Vec<std::net::TcpStream> = (0..MANY)
        .map(|_| std::net::TcpStream::connect(p.addr).expect("connect"))
        .collect();
    // Let the proxy accept the backlog, then measure.
    std::thread::sleep(Duration::from_millis(1500));
    let idle = rss_kib(p.pid());
    let per_conn = (idle.saturating_sub(before) * 1024) as f64 / MANY as f64;
    eprintln!(
        "{}: {MANY} idle connections: RSS {before} KiB -> {idle} KiB, {per_conn:.0} bytes each",
        bin.display()
    );
    // Then use them all, 100 at a time, each with two requests (keep-alive held).
    for (w, wave) in conns.chunks(100).enumerate() {
        let mut clients: Vec<Client> = wave
            .iter()
            .map(|s| {
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                Client {
                    w: s.try_clone().unwrap(),
                    rd: std::io::BufReader::new(s.try_clone().unwrap()),
                }
            })
            .collect();
        for round in 0..2 {
            for c in clients.iter_mut() {
                c.send(format!("GET /r{round} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes());
            }
            for c in clients.iter_mut() {
                let r = c.read_response(false).unwrap_or_else(|| {
                    panic!(
                        "no response on held connection (wave {w}, round {round}): {}",
                        p.logs()
                    )
                });
                assert_eq!(r.status, 200);
                assert_eq!(r.header("connection"), None, "connection kept alive");
            }
        }
    }
    assert_eq!(b.requests().len(), 20 + 2 * MANY);
    // Now every connection has served two requests and waits idle (its buffers parked).
    std::thread::sleep(Duration::from_millis(500));
    let kept = rss_kib(p.pid());
    let per_kept = (kept.saturating_sub(before) * 1024) as f64 / MANY as f64;
    eprintln!(
        "{}: {MANY} idle keep-alive connections after requests: RSS {kept} KiB, {per_kept:.0} bytes each",
        bin.display()
    );
    assert!(
        per_conn < 4096.0,
        "an idle connection costs {per_conn:.0} bytes of RSS"
    );
    // (A debug build: the release figures are in benches/runtimes.rs.)
    assert!(
        per_kept < 6144.0,
        "an idle keep-alive connection costs {per_kept:.0} bytes of RSS"
    );
}

fn graceful_shutdown_under_load_loses_nothing(bin: &PathBuf) {
    let b = Backend::start("b1").unwrap();
    let mut p = Proxy::with_backends(bin, &[&b], &[]);
    let addr = p.addr;
    let stop = Arc::new(AtomicBool::new(false));
    // 64 keep-alive clients in a tight loop: small GETs, slow GETs and 64 KiB POSTs.
    let clients: Vec<_> = (0..64)
        .map(|i| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut ok, mut unanswered) = (0usize, 0usize);
                let body = pattern(64 * 1024);
                let Ok(s) = std::net::TcpStream::connect(addr) else {
                    return (ok, unanswered);
                };
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let mut c = Client {
                    w: s.try_clone().unwrap(),
                    rd: std::io::BufReader::new(s),
                };
                for n in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let req = match (i + n) % 3 {
                        0 => b"GET /bytes/100 HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
                        1 => b"GET /slow/30 HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
                        _ => {
                            let mut r = format!(
                                "POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
                                body.len()
                            )
                            .into_bytes();
                            r.extend_from_slice(&body);
                            r
                        }
                    };
                    if c.w.write_all(&req).is_err() {
                        unanswered += 1; // closed before the request went out
                        break;
                    }
                    match c.read_response(false) {
                        None => {
                            // Closed before any response byte: the proxy never took it
                            // (an idle connection closed by the drain); safe to retry.
                            unanswered += 1;
                            break;
                        }
                        Some(r) => {
                            assert_eq!(r.status, 200, "request failed during shutdown");
                            if (i + n) % 3 == 2 {
                                assert_eq!(r.body, body, "echoed body intact");
                            }
                            ok += 1;
                            if r.header("connection") == Some("close") {
                                break;
                            }
                        }
                    }
                }
                (ok, unanswered)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    p.sigterm();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(st) = p.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "proxy did not exit under load");
        std::thread::sleep(Duration::from_millis(20));
    };
    stop.store(true, Ordering::SeqCst);
    let (mut ok, mut unanswered) = (0, 0);
    for c in clients {
        let (o, u) = c.join().unwrap();
        ok += o;
        unanswered += u;
    }
    assert!(status.success(), "exit status {status:?}");
    assert!(ok > 64, "load was running ({ok} responses)");
    // Every request the backend served reached its client, complete.
    assert_eq!(
        b.requests().len(),
        ok,
        "backend served {} requests, clients got {ok} responses ({unanswered} closed before a response)",
        b.requests().len()
    );
}

fn max_connections_enforced_at_accept(bin: &PathBuf) {
    let b = Backend::start("b1").unwrap();
    let yaml = "server:\n  listen: \"{listen}\"\n  workers: 1\n  max_connections: 4\nbackends:\n  - url: http://{b0}\n";
    let p = Proxy::with_config(bin, yaml, &[&b]);
    // The start-up probe's connection must be gone before the slots are counted.
    std::thread::sleep(Duration::from_millis(300));
    let logs = |what: &str| format!("{what}: {}", p.logs());
    // Four clients in the middle of sending a request: none is idle.
    let mut held: Vec<Client> = (0..4)
        .map(|_| {
            let mut c = p.client();
            c.send(b"GET / HTTP/1.1\r\n");
            c
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    // The fifth is accepted by the kernel and closed by the proxy at once: not left hanging.
    let mut extra = p.client();
    assert!(
        extra.closed_within(Duration::from_secs(3)),
        "connection past max_connections was not closed"
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    while !p.logs().contains("max_connections reached and none idle") {
        assert!(Instant::now() < deadline, "no log line: {}", p.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    // They finish their requests, one after another, and wait idle (oldest first: 0).
    for c in held.iter_mut() {
        c.send(b"Host: a\r\n\r\n");
        let r = c
            .read_response(false)
            .unwrap_or_else(|| panic!("{}", logs("held")));
        assert_eq!(r.status, 200);
        std::thread::sleep(Duration::from_millis(30));
    }
    // Now a new client gets in: the connection idle the longest makes room.
    let mut c = p.client();
    c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    let r = c
        .read_response(false)
        .unwrap_or_else(|| panic!("{}", logs("new client at the limit")));
    assert_eq!(r.status, 200);
    assert!(
        held[0].closed_within(Duration::from_secs(3)),
        "the oldest idle one was closed"
    );
    for c in held[1..].iter_mut() {
        assert_eq!(c.get("/").status, 200, "the others are kept");
    }
}

fn connections_per_client_address_are_limited(bin: &PathBuf) {
    let b = Backend::start("b1").unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let yaml = format!("server:\n  listen: \"{{listen}}\"\n  max_connections_per_ip: 2\nadmin:\n  listen: \"{admin}\"\nbackends:\n  - url: http://{{b0}}\n");
    let p = Proxy::with_config(bin, &yaml, &[&b]);
    std::thread::sleep(Duration::from_millis(300));
    let mut a = p.client();
    let mut b2 = p.client();
    assert_eq!(a.get("/").status, 200);
    assert_eq!(b2.get("/").status, 200);
    let mut third = p.client();
    assert!(
        third.closed_within(Duration::from_secs(3)),
        "a third from 127.0.0.1 is refused"
    );
    drop(a);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(p.client().get("/").status, 200, "room again");
    let m = admin_metrics(admin.parse().unwrap());
    assert!(
        metric(&m, "trireme_connections_rejected_per_ip_total") >= 1,
        "{m}"
    );
}

#[test]
fn tokio_current_thread_flavour_serves_on_every_worker() {
    let b = Backend::start("b1").unwrap();
    let yaml = "server:\n  listen: \"{listen}\"\n  workers: 2\n  tokio_flavor: current_thread\nbackends:\n  - url: http://{b0}\n";
    let p = Proxy::with_config(&bin("trireme-tokio"), yaml, &[&b]);
    let addr = p.addr;
    let threads: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                (0..50)
                    .map(|_| get(addr, "/").status)
                    .filter(|&s| s == 200)
                    .count()
            })
        })
        .collect();
    let ok: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(ok, 400);
    // Both worker threads accepted connections (SO_REUSEPORT spreads them).
    let task = std::fs::read_dir(format!("/proc/{}/task", p.pid())).unwrap();
    let names: Vec<String> = task
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .collect();
    assert!(
        names
            .iter()
            .filter(|n| n.starts_with("trireme-worker"))
            .count()
            >= 2,
        "{names:?}"
    );
}

#[test]
fn monoio_epoll_fallback_serves_and_says_so() {
    let b = Backend::start("b1").unwrap();
    let args: Vec<String> = [
        "--listen",
        "{listen}",
        "--backend",
        &format!("http://{}", b.addr),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let p = Proxy::start_with_env(
        &bin("trireme-monoio"),
        &args,
        &[("TRIREME_MONOIO_DRIVER", "legacy")],
    );
    let mut c = p.client();
    for _ in 0..20 {
        assert_eq!(c.get("/").status, 200);
    }
    let body = pattern(1 << 20);
    // Write from another thread: the echo streams back while the body goes out.
    let mut w = c.w.try_clone().unwrap();
    let sent = body.clone();
    let writer = std::thread::spawn(move || {
        let head = format!(
            "POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
            sent.len()
        );
        w.write_all(head.as_bytes()).unwrap();
        w.write_all(&sent).unwrap();
    });
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body == body, "1 MiB echoed intact");
    writer.join().unwrap();
    assert!(
        p.logs().contains("falls back to its epoll driver"),
        "{}",
        p.logs()
    );
    assert_eq!(b.connections.load(Ordering::SeqCst), 1);
}
