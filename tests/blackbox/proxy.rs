//! Proxying: framing, pooling, balancing, retries, health, errors, forwarded fields, pipelining.

use super::*;

matrix!(
    stray_backend_bytes_never_reach_another_request,
    broken_backend_answers_and_trace_get_clean_errors,
    slow_request_bodies_hold_no_backend_connection,
    max_conns_caps_requests_in_flight_per_backend,
    idle_pooled_connection_that_receives_bytes_is_closed,
    backend_closing_idle_connections_fails_no_post,
    round_robin_and_weights,
    keep_alive_reuses_backend_connections,
    failover_with_zero_failed_gets,
    streaming_large_bodies_with_bounded_memory,
    slow_reader_streaming_keeps_memory_bounded,
    rejected_requests_reach_no_backend,
    proxy_errors_502_503_504,
    headers_forwarded_and_hop_by_hop_removed,
    active_health_checks_eject_and_readmit,
    health_probes_run_on_the_workers_without_threads_of_their_own,
    pipelined_requests_in_order,
    routes_match_the_normalised_path_and_host,
);

fn stray_backend_bytes_never_reach_another_request(bin: &PathBuf) {
    let rogue = stray_bytes_backend();
    for cache in [false, true] {
        let admin = format!("127.0.0.1:{}", free_port());
        // One worker: the poisoned connection is in the pool the next client draws from.
        let mut args = vec!["--workers", "1", "--admin", &admin];
        if cache {
            args.extend(["--cache", "1MB"]);
        }
        let p = Proxy::in_front_of(bin, rogue.addr, &args);
        let mut n = 0;
        for (method, trigger) in [
            ("HEAD", "/head-extra"),
            ("GET", "/length-extra"),
            ("GET", "/chunk-extra"),
            ("GET", "/204-body"),
            ("GET", "/304-body"),
            ("GET", "/unsolicited"),
        ] {
            let mut c = p.client();
            c.send(format!("{method} {trigger} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
            let r = c
                .read_response(method == "HEAD")
                .expect("an answer to the trigger");
            assert!(r.header("x-injected").is_none(), "{trigger}: {r:?}");
            // The stray bytes reach the pooled connection meanwhile (well under 500 ms).
            std::thread::sleep(Duration::from_millis(100));
            // Other clients, each on a new connection, then again on the same one.
            for _ in 0..2 {
                let mut c = p.client();
                for _ in 0..2 {
                    n += 1;
                    let target = format!("/victim/{n}");
                    let r = c.get(&target);
                    assert_eq!(
                        (r.status, r.text()),
                        (200, format!("answer to {target}")),
                        "after {trigger} (cache: {cache}): a response went to the wrong request: {r:?}"
                    );
                    assert!(r.header("x-injected").is_none());
                }
            }
        }
        if cache {
            // Nothing injected was stored under a victim's URL: hits serve the real answers.
            let r = get(p.addr, "/victim/1");
            assert_eq!(r.header("x-cache"), Some("HIT"));
            assert_eq!(r.text(), "answer to /victim/1");
        }
        // Every connection that received stray bytes was closed, and counted.
        let m = admin_metrics(admin.parse().unwrap());
        assert!(
            metric(&m, "trireme_upstream_idle_unread_total") >= 4,
            "late stray bytes on idle connections are counted:\n{m}"
        );
    }
}

fn broken_backend_answers_and_trace_get_clean_errors(bin: &PathBuf) {
    let rogue = Rogue::start(|r| {
        let raw: &[u8] = match r.target.as_str() {
            "/status-000" => b"HTTP/1.1 000 Zero\r\nContent-Length: 2\r\n\r\nok",
            "/status-099" => b"HTTP/1.1 099 Low\r\nContent-Length: 2\r\n\r\nok",
            "/gzip-chunked" => {
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
            }
            // The malformed chunk arrives with the head, in one write.
            "/bad-chunk" => {
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n"
            }
            _ => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        };
        vec![Step::Send(raw.to_vec())]
    });
    // Passive ejection off: four 502s in a row would eject the only backend.
    let yaml = format!(
        "server:\n  listen: \"{{listen}}\"\nload_balancing:\n  passive_health:\n    max_fails: 0\nbackends:\n  - url: http://{}\n",
        rogue.addr
    );
    let p = Proxy::with_config(bin, &yaml, &[]);
    for path in ["/status-000", "/status-099", "/gzip-chunked", "/bad-chunk"] {
        let r = get(p.addr, path);
        assert_eq!(r.status, 502, "{path}: {r:?}");
    }
    let mut c = p.client();
    c.send(b"TRACE / HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 405);
    assert!(
        r.header("allow").is_some_and(|a| a.contains("GET")),
        "{r:?}"
    );
    assert_eq!(c.get("/fine").status, 200, "the connection goes on");
    assert!(rogue.requests().iter().all(|r| r.method != "TRACE"));
}

fn slow_request_bodies_hold_no_backend_connection(bin: &PathBuf) {
    let b = Backend::start("b1").unwrap();
    let yaml = "server:\n  listen: \"{listen}\"\n  client_body_timeout: 2s\nbackends:\n  - url: http://{b0}\n";
    let p = Proxy::with_config(bin, yaml, &[&b]);
    // 20 clients trickle a 20-byte POST body, a byte every 50 ms.
    let mut slow: Vec<Client> = (0..20)
        .map(|_| {
            let mut c = p.client();
            c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 20\r\n\r\n");
            c
        })
        .collect();
    for _ in 0..19 {
        for c in &mut slow {
            c.send(b"x");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        b.connections.load(Ordering::SeqCst),
        0,
        "no backend connection while bodies trickle"
    );
    for c in &mut slow {
        c.send(b"y");
    }
    for c in &mut slow {
        let r = c.read_response(false).expect("answer");
        assert_eq!(
            (r.status, r.text()),
            (200, "xxxxxxxxxxxxxxxxxxxy".to_string())
        );
    }
    // A body that never completes: 408 at client_body_timeout, no backend involved.
    let before = b.requests().len();
    let mut c = p.client();
    c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 20\r\nExpect: 100-continue\r\n\r\n");
    let r = c.read_response(false).expect("100 Continue from the proxy");
    assert_eq!(r.status, 100);
    let started = Instant::now();
    let mut got = None;
    while started.elapsed() < Duration::from_secs(5) {
        c.send(b"z");
        c.w.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        if let Some(r) = c.read_response(false) {
            got = Some(r);
            break;
        }
    }
    let r = got.expect("a final answer");
    assert_eq!(r.status, 408);
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(b.requests().len(), before);
}

fn max_conns_caps_requests_in_flight_per_backend(bin: &PathBuf) {
    let capped = Backend::start("capped").unwrap();
    let other = Backend::start("other").unwrap();
    let p = Proxy::with_backends(
        bin,
        &[],
        &[
            "--backend",
            &format!("http://{},max_conns=2", capped.addr),
            "--algorithm",
            "ip_hash",
        ],
    );
    // Two slow requests fill the cap; a third is refused at once.
    let addr = p.addr;
    let slow: Vec<_> = (0..2)
        .map(|_| std::thread::spawn(move || get(addr, "/slow/800")))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    assert_eq!(get(p.addr, "/now").status, 503);
    assert!(started.elapsed() < Duration::from_millis(500));
    for t in slow {
        assert_eq!(t.join().unwrap().status, 200);
    }
    assert_eq!(get(p.addr, "/now").status, 200, "a slot is free again");
    drop(p);
    // With a second backend, requests beyond the cap go there instead.
    let p = Proxy::with_backends(
        bin,
        &[],
        &[
            "--backend",
            &format!("http://{},max_conns=1", capped.addr),
            "--backend",
            &format!("http://{}", other.addr),
            "--algorithm",
            "least_conn",
        ],
    );
    let addr = p.addr;
    let slow: Vec<_> = (0..3)
        .map(|_| std::thread::spawn(move || get(addr, "/slow/600")))
        .collect();
    let resps: Vec<Response> = slow.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(resps.iter().all(|r| r.status == 200));
    let on_capped = by_backend(&resps).get("capped").copied().unwrap_or(0);
    assert!(on_capped <= 1, "{:?}", by_backend(&resps));
}

fn idle_pooled_connection_that_receives_bytes_is_closed(bin: &PathBuf) {
    let rogue = stray_bytes_backend();
    let admin = format!("127.0.0.1:{}", free_port());
    let p = Proxy::in_front_of(bin, rogue.addr, &["--admin", &admin]);
    let admin: std::net::SocketAddr = admin.parse().unwrap();
    let r = get(p.addr, "/unsolicited");
    assert_eq!(r.status, 200);
    // The stray response reaches the pooled connection 30 ms later; no request follows.
    let started = Instant::now();
    let unread = loop {
        let n = metric(&admin_metrics(admin), "trireme_upstream_idle_unread_total");
        if n > 0 || started.elapsed() > Duration::from_secs(3) {
            break n;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(unread, 1);
    // mio and tokio watch idle sockets (closed at once); monoio sweeps its pool each second.
    let bound = if bin.ends_with("trireme-monoio") {
        1500
    } else {
        250
    };
    assert!(
        started.elapsed() < Duration::from_millis(bound),
        "closed after {:?}",
        started.elapsed()
    );
}

fn backend_closing_idle_connections_fails_no_post(bin: &PathBuf) {
    // Keep-alive answers without `Connection: close`, then the backend closes the idle
    // connection 20 ms later (a short keep-alive timeout on its side).
    let rogue = Rogue::start(|r| {
        let body = format!("got {} bytes", r.body.len());
        vec![
            Step::Send(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .into_bytes(),
            ),
            Step::Sleep(Duration::from_millis(20)),
            Step::Close,
        ]
    });
    let p = Proxy::in_front_of(bin, rogue.addr, &["--workers", "1"]);
    let mut c = p.client();
    for i in 0..10 {
        c.send(b"POST /form HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello");
        let r = c.read_response(false).expect("answer");
        assert_eq!(
            (r.status, r.text()),
            (200, "got 5 bytes".into()),
            "POST {i}"
        );
        // The backend has closed the pooled connection by the next POST.
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        rogue.requests().len(),
        10,
        "each POST reached the backend once"
    );
    assert_eq!(rogue.connections(), 10);
}

fn round_robin_and_weights(bin: &PathBuf) {
    let b: Vec<Backend> = (1..=3)
        .map(|i| Backend::start(&format!("b{i}")).unwrap())
        .collect();
    let p = Proxy::with_backends(bin, &[&b[0], &b[1], &b[2]], &[]);
    let mut c = p.client();
    let resps: Vec<Response> = (0..30).map(|_| c.get("/")).collect();
    assert!(resps.iter().all(|r| r.status == 200));
    let counts = by_backend(&resps);
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        vec![10, 10, 10],
        "{counts:?}"
    );
    // What the backends saw matches what the client saw.
    assert_eq!(b.iter().map(|x| x.requests().len()).sum::<usize>(), 30);
    drop(p);

    // Weighted: 3:1 gives exactly 30:10 over 40 requests (smooth WRR is exact per period).
    let p = Proxy::start(
        bin,
        &[
            "--listen".into(),
            "{listen}".into(),
            "--backend".into(),
            format!("http://{},weight=3", b[0].addr),
            "--backend".into(),
            format!("http://{}", b[1].addr),
        ],
    );
    let mut c = p.client();
    let resps: Vec<Response> = (0..40).map(|_| c.get("/")).collect();
    let counts = by_backend(&resps);
    assert_eq!(counts.get("b1"), Some(&30), "{counts:?}");
    assert_eq!(counts.get("b2"), Some(&10), "{counts:?}");
}

fn keep_alive_reuses_backend_connections(bin: &PathBuf) {
    let b = Backend::start("b1").unwrap();
    // One worker: pools are per worker on the thread-per-core runtimes.
    let p = Proxy::with_backends(bin, &[&b], &["--workers", "1"]);
    let mut c = p.client();
    for _ in 0..100 {
        assert_eq!(c.get("/").status, 200);
    }
    assert_eq!(
        b.connections.load(Ordering::SeqCst),
        1,
        "100 keep-alive requests used one backend connection"
    );
    // New client connections, one after another, still reuse the pooled backend connection.
    for _ in 0..20 {
        assert_eq!(get(p.addr, "/").status, 200);
    }
    assert_eq!(b.connections.load(Ordering::SeqCst), 1);
    assert_eq!(b.requests().len(), 120);
}

fn failover_with_zero_failed_gets(bin: &PathBuf) {
    let b: Vec<Backend> = (1..=3)
        .map(|i| Backend::start(&format!("b{i}")).unwrap())
        .collect();
    let p = Proxy::with_backends(bin, &[&b[0], &b[1], &b[2]], &[]);
    let addr = p.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(Mutex::new(Vec::<String>::new()));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                let start = Instant::now();
                while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(20) {
                    c.send(b"GET /slow/2 HTTP/1.1\r\nHost: t\r\n\r\n");
                    match c.read_response(false) {
                        Some(r) if r.status == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        other => {
                            failed
                                .lock()
                                .unwrap()
                                .push(format!("{:?}", other.map(|r| (r.status, r.text()))));
                            c = Client::connect(addr);
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    b[1].kill();
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let failed = failed.lock().unwrap();
    assert!(
        failed.is_empty(),
        "failed GETs after a backend died: {failed:?}\n{}",
        p.logs()
    );
    assert!(ok.load(Ordering::Relaxed) > 100);
    let before = b[1].requests().len();
    for _ in 0..20 {
        assert_eq!(get(addr, "/").status, 200);
    }
    assert_eq!(
        b[1].requests().len(),
        before,
        "the dead backend gets nothing"
    );
}

fn streaming_large_bodies_with_bounded_memory(bin: &PathBuf) {
    let b = Backend::start("b1").unwrap();
    let yaml =
        "server:\n  listen: \"{listen}\"\n  max_body_size: 64MB\nbackends:\n  - url: http://{b0}\n";
    let p = Proxy::with_config(bin, yaml, &[&b]);
    let idle_rss = p.peak_rss_kib();
    // 64 MiB chunked response.
    let n = 64 << 20;
    let mut c = p.client();
    let r = c.get(&format!("/chunked/{n}"));
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), n);
    assert!(r.body == pattern(n), "body bytes differ");
    // 32 MiB upload with Content-Length, then 8 MiB chunked upload, echoed back.
    let up = pattern(32 << 20);
    c.send(
        format!(
            "POST /bytes/0 HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
            up.len()
        )
        .as_bytes(),
    );
    c.send(&up);
    assert_eq!(c.read_response(false).unwrap().status, 200);
    assert_eq!(b.requests().last().unwrap().body.len(), up.len());
    let small = pattern(8 << 20);
    c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n");
    for part in small.chunks(100_000) {
        c.send(format!("{:x}\r\n", part.len()).as_bytes());
        c.send(part);
        c.send(b"\r\n");
    }
    c.send(b"0\r\n\r\n");
    let r = c.read_response(false).unwrap();
    assert!(r.body == small, "echoed body differs");
    // The proxy never holds a body whole: its peak RSS grows by far less than the bodies.
    p.assert_rss_growth_below(idle_rss, 24 * 1024, "while streaming 104 MiB");
}

/// A client that reads a large response slowly: the proxy writes part of what it has each
/// time while the backend keeps sending. Its memory follows what is pending, not what was
/// sent.
fn slow_reader_streaming_keeps_memory_bounded(bin: &PathBuf) {
    use std::io::Read;
    let b = Backend::start("b1").unwrap();
    let p = Proxy::with_backends(bin, &[&b], &[]);
    let idle_rss = p.peak_rss_kib();
    let n: usize = 48 << 20;
    let mut s = std::net::TcpStream::connect(p.addr).unwrap();
    s.write_all(
        format!("GET /chunked/{n} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 256 * 1024];
    let mut reads = 0u32;
    loop {
        let k = s.read(&mut buf).unwrap();
        if k == 0 {
            break;
        }
        got += k;
        reads += 1;
        // Slow at first (the proxy's socket stays full, its writes partial), then fast.
        if reads < 400 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    assert!(got > n, "whole response: {got} bytes");
    p.assert_rss_growth_below(idle_rss, 16 * 1024, "streaming 48 MiB to a slow reader");
}

fn rejected_requests_reach_no_backend(bin: &PathBuf) {
    let b = Backend::start("b1").unwrap();
    let p = Proxy::with_backends(bin, &[&b], &[]);
    let cases: &[(&[u8], u16)] = &[
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1x\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX{}: a\r\nHost: a\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"GET / http/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET / HTTP/1.1junk\r\nHost: a\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 999999999999\r\n\r\n", 413),
    ];
    for (raw, want) in cases {
        let mut c = p.client();
        c.send(raw);
        let r = c
            .read_response(false)
            .unwrap_or_else(|| panic!("no response to {:?}", String::from_utf8_lossy(raw)));
        assert_eq!(r.status, *want, "{:?}", String::from_utf8_lossy(raw));
        assert!(
            c.closed_within(Duration::from_secs(5)),
            "connection stays open after {:?}",
            String::from_utf8_lossy(raw)
        );
    }
    // Long URI and huge head.
    let mut c = p.client();
    c.send(format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(10_000)).as_bytes());
    assert_eq!(c.read_response(false).unwrap().status, 414);
    let mut c = p.client();
    c.send(
        format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
            "a".repeat(20_000)
        )
        .as_bytes(),
    );
    assert_eq!(c.read_response(false).unwrap().status, 431);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        b.requests().len(),
        0,
        "a rejected request reached the backend: {:?}",
        b.requests()
    );
    assert_eq!(b.connections.load(Ordering::SeqCst), 0);
}

fn proxy_errors_502_503_504(bin: &PathBuf) {
    let live = Backend::start("live").unwrap();
    let dead_port = free_port();
    let yaml = format!(
        "server:\n  listen: \"{{listen}}\"\nload_balancing:\n  retries: 0\n  response_timeout: 1s\n  passive_health:\n    max_fails: 2\n    fail_timeout: 60s\n    panic_threshold: 0\nupstreams:\n  dead:\n    backends:\n      - url: http://127.0.0.1:{dead_port}\nroutes:\n  - path: /dead\n    upstream: dead\nbackends:\n  - url: http://{{b0}}\n"
    );
    let p = Proxy::with_config(bin, &yaml, &[&live]);
    assert_eq!(get(p.addr, "/dead").status, 502);
    assert_eq!(get(p.addr, "/dead").status, 502);
    let r = get(p.addr, "/dead");
    assert_eq!(r.status, 503, "ejected after max_fails");
    assert!(r.text().contains("503"));
    let r = get(p.addr, "/slow/3000");
    assert_eq!(r.status, 504);
    assert_eq!(get(p.addr, "/").status, 200);
    let logs = p.logs();
    assert!(logs.contains("could not connect to the backend"), "{logs}");
    assert!(logs.contains("no backend available"), "{logs}");
    assert!(logs.contains("did not respond in time"), "{logs}");
}

fn headers_forwarded_and_hop_by_hop_removed(bin: &PathBuf) {
    let b = Backend::start("b1").unwrap();
    let p = Proxy::with_backends(bin, &[&b], &[]);
    let mut c = p.client();
    c.send(b"GET /x?y=1 HTTP/1.1\r\nHost: app.example\r\nConnection: X-Secret\r\nX-Secret: s\r\nProxy-Connection: keep-alive\r\nKeep-Alive: 5\r\nX-Forwarded-For: 203.0.113.9\r\nX-Keep: yes\r\n\r\n");
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.header("connection").is_none());
    let got = &b.requests()[0];
    assert_eq!(got.target, "/x?y=1");
    assert_eq!(got.header("host"), Some("app.example"));
    // The client is not a trusted proxy: its X-Forwarded-For is replaced.
    assert_eq!(got.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(got.header("x-real-ip"), Some("127.0.0.1"));
    assert_eq!(got.header("x-forwarded-host"), Some("app.example"));
    assert_eq!(
        got.header("forwarded"),
        Some("for=127.0.0.1;host=\"app.example\";proto=http")
    );
    assert_eq!(got.header("x-forwarded-proto"), Some("http"));
    assert_eq!(got.header("via"), Some("1.1 trireme"));
    assert_eq!(got.header("x-keep"), Some("yes"));
    for h in ["x-secret", "proxy-connection", "keep-alive", "connection"] {
        assert!(got.header(h).is_none(), "{h} reached the backend");
    }
    // HEAD: no body, Content-Length kept.
    c.send(b"HEAD /bytes/1234 HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = c.read_response(true).unwrap();
    assert_eq!(r.header("content-length"), Some("1234"));
    assert_eq!(
        c.get("/").status,
        200,
        "connection still in sync after HEAD"
    );
}

fn active_health_checks_eject_and_readmit(bin: &PathBuf) {
    let b1 = Backend::start("b1").unwrap();
    let b2 = Backend::start("b2").unwrap();
    let yaml = "server:\n  listen: \"{listen}\"\nload_balancing:\n  health_check:\n    path: /health\n    interval: 100ms\n    timeout: 500ms\n    healthy_threshold: 2\n    unhealthy_threshold: 2\n  passive_health:\n    max_fails: 0\nbackends:\n  - url: http://{b0}\n  - url: http://{b1}\n";
    let p = Proxy::with_config(bin, yaml, &[&b1, &b2]);
    let b2_addr = b2.addr;
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        b2.requests().iter().any(|r| r.target == "/health"),
        "probes reach backends"
    );
    drop(b2);
    std::thread::sleep(Duration::from_millis(600));
    // Idempotent GETs never fail: the dead backend is out, or the retry covers the gap.
    let resps: Vec<Response> = (0..20).map(|_| get(p.addr, "/")).collect();
    assert!(
        resps
            .iter()
            .all(|r| r.status == 200 && r.header("x-backend") == Some("b1")),
        "{:?}",
        by_backend(&resps)
    );
    let b2 = Backend::start_on(b2_addr, "b2-again").unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let resps: Vec<Response> = (0..20).map(|_| get(p.addr, "/")).collect();
    assert!(
        by_backend(&resps).get("b2-again").copied().unwrap_or(0) >= 5,
        "re-admitted: {:?}\n{}",
        by_backend(&resps),
        p.logs()
    );
    drop(b2);
}

/// Active health probes are carried out by the runtime's own worker: four backends that
/// accept connections and never answer keep four probes in flight until their timeout, and
/// the process has no more threads than the same proxy without health checks (it used to
/// run a checker thread plus a thread per probe in flight).
fn health_probes_run_on_the_workers_without_threads_of_their_own(bin: &PathBuf) {
    let live = Backend::start("live").unwrap();
    // Listening, never accepting: the kernel completes the connect, nothing ever answers.
    let silent: Vec<std::net::TcpListener> = (0..4)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let backends: String = silent
        .iter()
        .map(|l| format!("  - url: http://{}\n", l.local_addr().unwrap()))
        .collect();
    let with = format!("server:\n  listen: \"{{listen}}\"\n  workers: 2\nload_balancing:\n  health_check:\n    path: /health\n    interval: 50ms\n    timeout: 3s\n    healthy_threshold: 1\n    unhealthy_threshold: 1\nbackends:\n  - url: http://{{b0}}\n{backends}");
    let without = format!("server:\n  listen: \"{{listen}}\"\n  workers: 2\nbackends:\n  - url: http://{{b0}}\n{backends}");
    let plain = Proxy::with_config(bin, &without, &[&live]);
    let checked = Proxy::with_config(bin, &with, &[&live]);
    assert_eq!(get(checked.addr, "/").status, 200);
    assert_eq!(get(plain.addr, "/").status, 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !live.requests().iter().any(|r| r.target == "/health") {
        assert!(
            Instant::now() < deadline,
            "no probe reached the live backend"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let base = threads_of(plain.pid());
    let mut most = 0;
    for _ in 0..20 {
        most = most.max(threads_of(checked.pid()));
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(
        most <= base,
        "{most} threads with four probes in flight, {base} without health checks"
    );
    // The live backend keeps being probed meanwhile (a silent one delays no other).
    let before = live
        .requests()
        .iter()
        .filter(|r| r.target == "/health")
        .count();
    std::thread::sleep(Duration::from_millis(300));
    let after = live
        .requests()
        .iter()
        .filter(|r| r.target == "/health")
        .count();
    assert!(
        after > before,
        "probes of the live backend stalled ({before} -> {after})"
    );
    drop(silent);
}

fn pipelined_requests_in_order(bin: &PathBuf) {
    let b: Vec<Backend> = (1..=2)
        .map(|i| Backend::start(&format!("b{i}")).unwrap())
        .collect();
    let p = Proxy::with_backends(bin, &[&b[0], &b[1]], &[]);
    let mut c = p.client();
    let mut all = Vec::new();
    for i in 0..20 {
        all.extend_from_slice(
            format!("GET /bytes/{} HTTP/1.1\r\nHost: t\r\n\r\n", 100 + i).as_bytes(),
        );
    }
    c.send(&all);
    for i in 0..20 {
        let r = c.read_response(false).unwrap();
        assert_eq!(r.body.len(), 100 + i, "response {i} out of order");
    }
}

fn routes_match_the_normalised_path_and_host(bin: &PathBuf) {
    let public = Backend::start("public").unwrap();
    let internal = Backend::start("internal").unwrap();
    let admin = Backend::start("admin-host").unwrap();
    let yaml = "server:\n  listen: \"{listen}\"\nbackends:\n  - url: http://{b0}\nupstreams:\n  internal:\n    backends:\n      - url: http://{b1}\n  adminhost:\n    backends:\n      - url: http://{b2}\nroutes:\n  - path: /internal\n    upstream: internal\n  - host: admin.example\n    upstream: adminhost\n";
    let p = Proxy::with_config(bin, yaml, &[&public, &internal, &admin]);
    let mut c = p.client();
    for (target, host, who, seen) in [
        ("/internal", "t", "internal", "/internal"),
        (
            "/internal/x?q=/../y",
            "t",
            "internal",
            "/internal/x?q=/../y",
        ),
        ("/internalfoo", "t", "public", "/internalfoo"),
        ("/internal/../secret", "t", "public", "/secret"),
        ("/%69nternal/x", "t", "internal", "/internal/x"),
        ("/%2e%2e/internal/./x", "t", "internal", "/internal/x"),
        ("//internal//x", "t", "internal", "/internal/x"),
        ("/a", "ADMIN.example.", "admin-host", "/a"),
        ("/a", "admin.example:80", "admin-host", "/a"),
    ] {
        c.send(format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes());
        let r = c.read_response(false).unwrap();
        assert_eq!(r.header("x-backend"), Some(who), "{host}{target}");
        let b = match who {
            "internal" => &internal,
            "public" => &public,
            _ => &admin,
        };
        let got = b.requests().pop().unwrap();
        assert_eq!(got.target, seen, "forwarded form of {target}");
    }
    let host = admin.requests().pop().unwrap();
    assert_eq!(host.header("host"), Some("admin.example"));
    // A malformed escape is the client's error.
    c.send(b"GET /a%zz HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().status, 400);
}
