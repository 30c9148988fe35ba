//! Black-box scenarios: the real binary in front of real backend servers on 127.0.0.1.
//! Every scenario runs once per runtime binary (the `matrix!` list); a new runtime is one
//! more line there.

#[macro_use]
mod common;

use common::*;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

matrix!(
    stray_backend_bytes_never_reach_another_request,
    idle_pooled_connection_that_receives_bytes_is_closed,
    broken_backend_answers_and_trace_get_clean_errors,
    backend_closing_idle_connections_fails_no_post,
    slow_request_bodies_hold_no_backend_connection,
    max_conns_caps_requests_in_flight_per_backend,
    round_robin_and_weights,
    keep_alive_reuses_backend_connections,
    failover_with_zero_failed_gets,
    streaming_large_bodies_with_bounded_memory,
    slow_reader_streaming_keeps_memory_bounded,
    pipelined_hits_of_a_large_cached_object_keep_memory_bounded,
    rejected_requests_reach_no_backend,
    proxy_errors_502_503_504,
    headers_forwarded_and_hop_by_hop_removed,
    slow_client_head_is_cut_off,
    graceful_shutdown_finishes_in_flight,
    active_health_checks_eject_and_readmit,
    pipelined_requests_in_order,
    check_command_reports_errors,
    clients_vanishing_mid_response_leave_no_work_behind,
    ten_thousand_keep_alive_connections,
    graceful_shutdown_under_load_loses_nothing,
    max_connections_enforced_at_accept,
    connections_per_client_address_are_limited,
    cache_hits_misses_and_invalidation,
    cache_never_replays_one_clients_cookie,
    forwarding_fields_cannot_poison_the_cache,
    cache_bounds_the_variants_of_one_url,
    routes_match_the_normalised_path_and_host,
    cache_serves_stale_when_the_backend_dies,
    cache_purge_and_metrics_on_the_admin_listener,
    admin_listener_is_bounded_concurrent_and_can_require_a_token,
    cache_coalesces_concurrent_misses,
    cache_refreshes_stale_entries_in_the_background,
    cache_background_refreshes_are_bounded,
    cache_warms_configured_paths_at_start,
    cache_warms_on_a_schedule,
    cache_refreshes_hot_entries_before_they_expire,
    cache_streams_one_fetch_to_concurrent_requests,
    cache_l2_is_shared_between_instances,
    cache_l2_invalidations_reach_the_other_instances,
    cache_l2_holds_every_variant_of_a_vary_response,
    cache_l2_refreshes_an_entry_another_instance_revalidated,
    cache_l2_redis_killed_mid_test_fails_no_request,
    cache_l2_unresponsive_redis_is_skipped,
    cache_l2_logs_in_to_a_password_protected_redis,
    cache_l2_deletes_for_an_acl_user_refused_the_channel,
);

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

use std::sync::Mutex;

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

/// One write of 40 pipelined requests for a 4 MB cached object, then a client that does not
/// read for a while: the proxy answers them one at a time as its output drains, never 40
/// bodies at once, and writes each from the stored body (no copy).
fn pipelined_hits_of_a_large_cached_object_keep_memory_bounded(bin: &PathBuf) {
    let b = Backend::start("b1").unwrap();
    let p = Proxy::with_backends(bin, &[&b], &["--cache", "64MB"]);
    let n = 4_000_000;
    let path = format!("/bytes/{n}?cc=max-age=60");
    let first = get(p.addr, &path);
    assert_eq!((first.status, first.body.len()), (200, n));
    let cached_rss = p.peak_rss_kib();
    let mut c = p.client();
    c.send(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n")
            .repeat(40)
            .as_bytes(),
    );
    std::thread::sleep(Duration::from_millis(500));
    // Hits are written from the stored body itself, one at a time: not even one copy.
    p.assert_rss_growth_below(cached_rss, 2 * 1024, "holding pipelined hits");
    for i in 0..40 {
        let r = c.read_response(false).unwrap();
        assert_eq!((r.status, r.header("x-cache")), (200, Some("HIT")), "{i}");
        assert!(r.body == first.body, "{i}: body differs");
    }
    // Three pipelined, then the client's half-close: all three answered whole, then EOF.
    let s = std::net::TcpStream::connect(p.addr).unwrap();
    let mut c = Client::from_stream(s.try_clone().unwrap());
    c.send(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n")
            .repeat(3)
            .as_bytes(),
    );
    s.shutdown(std::net::Shutdown::Write).unwrap();
    for i in 0..3 {
        let r = c
            .read_response(false)
            .unwrap_or_else(|| panic!("response {i} after half-close"));
        assert_eq!((r.status, r.body.len()), (200, n), "{i}");
    }
    assert!(c.closed_within(Duration::from_secs(5)));
    assert_eq!(b.requests().len(), 1);
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

fn cache_hits_misses_and_invalidation(bin: &PathBuf) {
    let b = Backend::start("b1").unwrap();
    let p = Proxy::with_backends(bin, &[&b], &["--cache", "16MB"]);
    let mut c = p.client();
    let path = "/bytes/20000?cc=max-age=60&etag=v1";
    let first = c.get(path);
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-cache"), Some("MISS"));
    assert_eq!(first.body, pattern(20000));
    // Hits, on this connection and on new ones, with an Age header; the backend saw one.
    for i in 0..5 {
        let r = if i % 2 == 0 {
            c.get(path)
        } else {
            get(p.addr, path)
        };
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-cache"), Some("HIT"), "{:?}", r.headers);
        assert!(r.header("age").is_some());
        assert_eq!(r.header("etag"), Some("\"v1\""));
        assert_eq!(r.body, first.body);
    }
    assert_eq!(b.requests().len(), 1);
    // A conditional request is answered by the cache: 304, no body.
    c.send(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nIf-None-Match: \"v1\"\r\n\r\n").as_bytes(),
    );
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    // HEAD is answered from the GET entry.
    c.send(format!("HEAD {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes());
    let r = c.read_response(true).unwrap();
    assert_eq!((r.status, r.header("content-length")), (200, Some("20000")));
    assert_eq!(b.requests().len(), 1);
    // private and no-store are never served from the cache.
    for uncached in ["/x?cc=private,max-age=60", "/y?cc=no-store"] {
        for _ in 0..2 {
            assert_eq!(c.get(uncached).header("x-cache"), Some("MISS"));
        }
    }
    assert_eq!(b.requests().len(), 5);
    // A POST to the target invalidates it.
    c.send(format!("POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\n\r\nhi").as_bytes());
    assert_eq!(c.read_response(false).unwrap().status, 200);
    assert_eq!(c.get(path).header("x-cache"), Some("MISS"));
    assert_eq!(b.requests().len(), 7);
}

fn cache_never_replays_one_clients_cookie(bin: &PathBuf) {
    let b = Backend::start("b1").unwrap();
    let p = Proxy::with_backends(bin, &[&b], &["--cache", "1MB"]);
    // Only Last-Modified (heuristically fresh for a day) and a session cookie: not stored.
    let heuristic = "/h?lm=1&setcookie=session=alice";
    let r = get(p.addr, heuristic);
    assert_eq!(
        r.header("set-cookie"),
        Some("session=alice"),
        "the fetching client gets it"
    );
    let r = get(p.addr, heuristic);
    assert_eq!(r.header("x-cache"), Some("MISS"), "not stored: {r:?}");
    assert_eq!(
        r.header("set-cookie"),
        Some("session=alice"),
        "from the origin again"
    );
    assert_eq!(b.requests().len(), 2);
    // Explicit shared freshness: stored, but the cookie stays with the client that fetched it.
    for shared in [
        "/s?cc=s-maxage=60&setcookie=session=bob",
        "/p?cc=public,max-age=60&setcookie=session=bob",
    ] {
        let r = get(p.addr, shared);
        assert_eq!(r.header("set-cookie"), Some("session=bob"));
        let hit = get(p.addr, shared);
        assert_eq!(hit.header("x-cache"), Some("HIT"), "{shared}: {hit:?}");
        assert!(
            hit.header("set-cookie").is_none(),
            "{shared}: cookie replayed: {hit:?}"
        );
        assert_eq!(hit.body, r.body);
    }
    drop(p);
    // The other policies, by name.
    for (policy, stored) in [("no_store", false), ("replay", true)] {
        let yaml = format!(
            "server:\n  listen: \"{{listen}}\"\ncache:\n  size: 1MB\n  set_cookie: {policy}\nbackends:\n  - url: http://{{b0}}\n"
        );
        let p = Proxy::with_config(bin, &yaml, &[&b]);
        let path = format!("/{policy}?cc=s-maxage=60&setcookie=session=carol");
        get(p.addr, &path);
        let r = get(p.addr, &path);
        assert_eq!(
            r.header("x-cache") == Some("HIT"),
            stored,
            "{policy}: {r:?}"
        );
        // no_store: from the origin again; replay: the stored cookie, replayed.
        assert_eq!(
            r.header("set-cookie"),
            Some("session=carol"),
            "{policy}: {r:?}"
        );
    }
}

fn forwarding_fields_cannot_poison_the_cache(bin: &PathBuf) {
    let b = Backend::start("b1").unwrap();
    let p = Proxy::with_backends(bin, &[&b], &["--cache", "1MB"]);
    // A backend that builds links from X-Forwarded-Host (or trusts X-Real-IP, Forwarded).
    for (field, spoof, honest) in [
        ("x-forwarded-host", "evil.example", "test"),
        ("x-real-ip", "203.0.113.66", "127.0.0.1"),
        (
            "forwarded",
            "for=203.0.113.66",
            "for=127.0.0.1;host=\"test\";proto=http",
        ),
        ("x-original-url", "/admin", "-"),
    ] {
        let path = format!("/poison?reflect={field}&cc=max-age=60");
        let mut c = p.client();
        c.send(format!("GET {path} HTTP/1.1\r\nHost: test\r\n{field}: {spoof}\r\n\r\n").as_bytes());
        let r = c.read_response(false).unwrap();
        assert_eq!(
            r.text(),
            format!("{field}: {honest}\n"),
            "what the backend saw"
        );
        let victim = get(p.addr, &path);
        assert_eq!(victim.header("x-cache"), Some("HIT"));
        assert!(!victim.text().contains(spoof), "{field}: {}", victim.text());
    }
    drop(p);
    // A trusted proxy in front (here: loopback) keeps its fields; this hop is appended.
    let yaml = "server:\n  listen: \"{listen}\"\n  trusted_proxies: [127.0.0.0/8, \"::1\"]\nbackends:\n  - url: http://{b0}\n";
    let p = Proxy::with_config(bin, yaml, &[&b]);
    let mut c = p.client();
    c.send(b"GET /t HTTP/1.1\r\nHost: test\r\nX-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().status, 200);
    let got = b.requests().into_iter().find(|r| r.target == "/t").unwrap();
    assert_eq!(
        got.header("x-forwarded-for"),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(got.header("x-forwarded-proto"), Some("https"));
}

fn cache_bounds_the_variants_of_one_url(bin: &PathBuf) {
    let b = Backend::start("b1").unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let yaml = format!(
        "server:\n  listen: \"{{listen}}\"\nadmin:\n  listen: \"{admin}\"\ncache:\n  size: 8MB\n  max_variants: 4\nbackends:\n  - url: http://{{b0}}\n"
    );
    let p = Proxy::with_config(bin, &yaml, &[&b]);
    let mut c = p.client();
    let path = "/v?vary=Accept-Encoding&cc=max-age=600";
    let ask = |c: &mut Client, ae: &str| {
        c.send(
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nAccept-Encoding: {ae}\r\n\r\n").as_bytes(),
        );
        c.read_response(false).unwrap()
    };
    for i in 0..10 {
        assert_eq!(
            ask(&mut c, &format!("x-{i}")).header("x-cache"),
            Some("MISS")
        );
    }
    // The four most recent variants are kept; older ones made room.
    assert_eq!(ask(&mut c, "x-9").header("x-cache"), Some("HIT"));
    assert_eq!(ask(&mut c, "x-6").header("x-cache"), Some("HIT"));
    assert_eq!(ask(&mut c, "x-0").header("x-cache"), Some("MISS"));
    let m = admin_metrics(admin.parse().unwrap());
    assert_eq!(
        metric(&m, "trireme_cache_variant_evictions_total"),
        7,
        "{m}"
    );
    assert_eq!(metric(&m, "trireme_cache_entries"), 4);
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

fn cache_serves_stale_when_the_backend_dies(bin: &PathBuf) {
    let b = Backend::start("b1").unwrap();
    let p = Proxy::with_backends(bin, &[&b], &["--cache", "1MB"]);
    let path = "/bytes/3000?cc=max-age=1,stale-if-error=600";
    let first = get(p.addr, path);
    assert_eq!(first.header("x-cache"), Some("MISS"));
    std::thread::sleep(Duration::from_millis(1600));
    b.kill();
    for _ in 0..3 {
        let r = get(p.addr, path);
        assert_eq!(r.status, 200, "stale-if-error answers: {:?}", r.headers);
        assert_eq!(r.header("x-cache"), Some("STALE"));
        assert_eq!(r.body, first.body);
    }
    // Not stored with stale-if-error: the client sees the failure.
    assert!(get(p.addr, "/other?cc=max-age=60").status >= 500);
}

fn cache_purge_and_metrics_on_the_admin_listener(bin: &PathBuf) {
    let b = Backend::start("b1").unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let p = Proxy::with_backends(bin, &[&b], &["--cache", "1MB", "--admin", &admin]);
    let admin: std::net::SocketAddr = admin.parse().unwrap();
    let call = |req: &str| -> Response {
        let mut c = Client::connect(admin);
        c.send(req.as_bytes());
        c.read_response(false).expect("admin answers")
    };
    let a = "/a?cc=max-age=60";
    let b2 = "/b?cc=max-age=60";
    for path in [a, a, b2, b2] {
        assert_eq!(get(p.addr, path).status, 200);
    }
    assert_eq!(get(p.addr, a).header("x-cache"), Some("HIT"));
    let host = "test"; // the Host the test client sends
                       // Purge one URL: it misses next time; the other still hits.
    let r = call(&format!(
        "POST /cache/purge?url=http://{host}/a%3Fcc%3Dmax-age%3D60 HTTP/1.1\r\nHost: x\r\n\r\n"
    ));
    assert_eq!((r.status, r.text()), (200, "{\"purged\":1}\n".to_string()));
    assert_eq!(get(p.addr, a).header("x-cache"), Some("MISS"));
    assert_eq!(get(p.addr, b2).header("x-cache"), Some("HIT"));
    // Purge by prefix: both go.
    let r = call(&format!(
        "POST /cache/purge?prefix=http://{host}/ HTTP/1.1\r\nHost: x\r\n\r\n"
    ));
    assert_eq!((r.status, r.text()), (200, "{\"purged\":2}\n".to_string()));
    assert_eq!(get(p.addr, b2).header("x-cache"), Some("MISS"));
    // Bad requests are refused clearly.
    assert_eq!(
        call("POST /cache/purge?url=nope HTTP/1.1\r\nHost: x\r\n\r\n").status,
        400
    );
    assert_eq!(
        call("GET /cache/purge HTTP/1.1\r\nHost: x\r\n\r\n").status,
        405
    );
    // Metrics count what happened.
    let m = call("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").text();
    let value = |name: &str| -> u64 {
        m.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing in {m}"))
    };
    assert_eq!(value("trireme_cache_hits_total"), 4);
    assert_eq!(value("trireme_cache_misses_total"), 4);
    assert_eq!(value("trireme_cache_invalidations_total"), 3);
    assert_eq!(b.requests().len(), 4);
}

fn admin_listener_is_bounded_concurrent_and_can_require_a_token(bin: &PathBuf) {
    let b = Backend::start("b1").unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let token = "s3cret-admin-token-0123";
    let yaml = format!(
        "server:\n  listen: \"{{listen}}\"\nadmin:\n  listen: \"{admin}\"\n  token: {token}\n  max_connections: 3\n  header_timeout: 1s\ncache:\n  size: 1MB\nbackends:\n  - url: http://{{b0}}\n"
    );
    let p = Proxy::with_config(bin, &yaml, &[&b]);
    let admin: std::net::SocketAddr = admin.parse().unwrap();
    let metrics =
        format!("GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n");
    // The token is required.
    let r = admin_call(admin, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(r.status, 401);
    assert!(r
        .header("www-authenticate")
        .is_some_and(|v| v.starts_with("Bearer")));
    let r = admin_call(
        admin,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong-token-xxxxxxx\r\n\r\n",
    );
    assert_eq!(r.status, 401);
    assert_eq!(admin_call(admin, &metrics).status, 200);
    // A slow client (a header line now and then) freezes nothing, and is cut off at the
    // head deadline with a 408.
    let mut slow = Client::connect(admin);
    slow.send(b"GET /metrics HTTP/1.1\r\n");
    let started = Instant::now();
    let r = admin_call(admin, &metrics);
    assert_eq!(
        r.status, 200,
        "served while the slow client holds its connection"
    );
    assert!(started.elapsed() < Duration::from_millis(500));
    slow.send(b"X-A: 1\r\n");
    let r = slow.read_response(false).expect("an answer");
    assert_eq!(r.status, 408);
    assert!(started.elapsed() < Duration::from_secs(3));
    // A 1 MiB line without a newline: 431 once the head limit is passed, memory flat.
    let before = p.peak_rss_kib();
    let mut big = Client::connect(admin);
    let _ = big.w.write_all(&vec![b'a'; 1 << 20]);
    let r = big.read_response(false).expect("an answer");
    assert!(matches!(r.status, 414 | 431), "{r:?}");
    p.assert_rss_growth_below(before, 4 * 1024, "for a 1 MiB admin request line");
    // Connections beyond max_connections are answered 503 at once.
    let held: Vec<Client> = (0..3)
        .map(|_| {
            let mut c = Client::connect(admin);
            c.send(b"GET /metrics HTTP/1.1\r\n");
            c
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(admin_call(admin, &metrics).status, 503);
    drop(held);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(admin_call(admin, &metrics).status, 200, "free again");
}

fn cache_coalesces_concurrent_misses(bin: &PathBuf) {
    let b = Backend::start("b1").unwrap();
    let p = Proxy::with_backends(bin, &[&b], &["--cache", "1MB"]);
    let addr = p.addr;
    let go = Arc::new(std::sync::Barrier::new(40));
    let threads: Vec<_> = (0..40)
        .map(|_| {
            let go = go.clone();
            std::thread::spawn(move || {
                go.wait();
                get(addr, "/slow/300?cc=max-age=60")
            })
        })
        .collect();
    let resps: Vec<Response> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(resps
        .iter()
        .all(|r| r.status == 200 && r.body == resps[0].body));
    assert_eq!(
        b.requests().len(),
        1,
        "40 concurrent misses for one key reached the backend once"
    );
}

fn cache_refreshes_stale_entries_in_the_background(bin: &PathBuf) {
    let b = Backend::start("b1").unwrap();
    let p = Proxy::with_backends(bin, &[&b], &["--cache", "1MB"]);
    let path = "/bytes/500?cc=max-age=2,stale-while-revalidate=30&etag=v1";
    assert_eq!(get(p.addr, path).header("x-cache"), Some("MISS"));
    std::thread::sleep(Duration::from_millis(2200));
    // Stale: answered at once from the store, and refreshed behind the client's back.
    let r = get(p.addr, path);
    assert_eq!((r.status, r.header("x-cache")), (200, Some("STALE")));
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.requests().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "no background refresh: {}",
            p.logs()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let refresh = &b.requests()[1];
    assert_eq!(refresh.target, path);
    assert_eq!(refresh.header("if-none-match"), Some("\"v1\""));
    std::thread::sleep(Duration::from_millis(100));
    let r = get(p.addr, path);
    assert_eq!(
        r.header("x-cache"),
        Some("HIT"),
        "fresh again after the refresh"
    );
    assert_eq!(r.body, pattern(500));
    assert_eq!(b.requests().len(), 2);
}

fn threads_of(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn cache_background_refreshes_are_bounded(bin: &PathBuf) {
    let b = Backend::start("b1").unwrap();
    let yaml = "server:\n  listen: \"{listen}\"\ncache:\n  size: 8MB\n  refresh_concurrency: 4\nbackends:\n  - url: http://{b0}\n";
    let p = Proxy::with_config(bin, yaml, &[&b]);
    let path =
        |i: usize| format!("/r/{i}?cc=max-age=1,stale-while-revalidate=60&etag=v1&slowcond=1500");
    let mut c = p.client();
    for i in 0..40 {
        assert_eq!(c.get(&path(i)).status, 200);
    }
    std::thread::sleep(Duration::from_millis(1200));
    let base = threads_of(p.pid());
    // 40 stale entries, each served at once and refreshed in the background by an
    // origin that takes 1.5 s per validation.
    for i in 0..40 {
        assert_eq!(c.get(&path(i)).header("x-cache"), Some("STALE"));
    }
    let mut most = 0;
    for _ in 0..20 {
        most = most.max(threads_of(p.pid()));
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(
        most <= base + 4,
        "at most 4 refresh threads: {base} before, {most} at most"
    );
    assert!(most > base, "refreshes run meanwhile");
}

fn cache_warms_configured_paths_at_start(bin: &PathBuf) {
    let b = Backend::start("b1").unwrap();
    let yaml = "server:\n  listen: \"{listen}\"\ncache:\n  size: 1MB\n  warming:\n    host: test\n    on_startup:\n      - path: /w1?cc=max-age=60\n  preload:\n    enabled: true\n    paths:\n      - /w2?cc=max-age=60\nbackends:\n  - url: http://{b0}\n";
    let p = Proxy::with_config(bin, yaml, &[&b]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.requests().len() < 2 {
        assert!(Instant::now() < deadline, "no warming fetch: {}", p.logs());
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    for path in ["/w1?cc=max-age=60", "/w2?cc=max-age=60"] {
        let r = get(p.addr, path);
        assert_eq!(
            r.header("x-cache"),
            Some("HIT"),
            "{path} warmed: {:?}",
            r.headers
        );
    }
    assert_eq!(b.requests().len(), 2);
    assert!(p.logs().contains("cache warming started"));
}

fn cache_warms_on_a_schedule(bin: &PathBuf) {
    let b = Backend::start("b1").unwrap();
    // Every second (six fields: seconds first).
    let yaml = "server:\n  listen: \"{listen}\"\ncache:\n  size: 1MB\n  warming:\n    host: test\n    scheduled:\n      - cron: \"* * * * * *\"\n        paths:\n          - /s1?cc=max-age=60\nbackends:\n  - url: http://{b0}\n";
    let p = Proxy::with_config(bin, yaml, &[&b]);
    let deadline = Instant::now() + Duration::from_secs(6);
    while b.requests().len() < 3 {
        assert!(
            Instant::now() < deadline,
            "scheduled warming did not run: {}",
            p.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(b.requests().iter().all(|r| r.target == "/s1?cc=max-age=60"));
    assert_eq!(
        get(p.addr, "/s1?cc=max-age=60").header("x-cache"),
        Some("HIT")
    );
    assert!(p.logs().contains("scheduled cache warming"));
}

fn cache_refreshes_hot_entries_before_they_expire(bin: &PathBuf) {
    let b = Backend::start("b1").unwrap();
    let yaml = "server:\n  listen: \"{listen}\"\ncache:\n  size: 1MB\n  warming:\n    predictive:\n      threshold: 3\n      horizon: 30s\nbackends:\n  - url: http://{b0}\n";
    let p = Proxy::with_config(bin, yaml, &[&b]);
    let hot = "/hot?cc=max-age=6&etag=h1";
    let cold = "/cold?cc=max-age=6&etag=c1";
    assert_eq!(get(p.addr, hot).header("x-cache"), Some("MISS"));
    assert_eq!(get(p.addr, cold).header("x-cache"), Some("MISS"));
    for _ in 0..4 {
        assert_eq!(get(p.addr, hot).header("x-cache"), Some("HIT"));
    }
    // Within the last half of its life the hot entry is refreshed ahead of expiry (a
    // conditional request); the cold one is not.
    let deadline = Instant::now() + Duration::from_secs(6);
    while !b.requests().iter().skip(2).any(|r| r.target == hot) {
        assert!(
            Instant::now() < deadline,
            "no predictive refresh: {}",
            p.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let refresh = b
        .requests()
        .into_iter()
        .skip(2)
        .find(|r| r.target == hot)
        .unwrap();
    assert_eq!(refresh.header("if-none-match"), Some("\"h1\""));
    assert!(b.requests().iter().filter(|r| r.target == cold).count() == 1);
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

fn cache_l2_is_shared_between_instances(bin: &PathBuf) {
    let redis = Redis::start();
    let b = Backend::start("b1").unwrap();
    let (a, a_admin) = l2_proxy(bin, &b, redis.addr);
    let (other, other_admin) = l2_proxy(bin, &b, redis.addr);
    let path = "/bytes/30000?cc=max-age=60&etag=v7";
    let first = get(a.addr, path);
    assert_eq!((first.status, first.header("x-cache")), (200, Some("MISS")));
    // The writer puts it in Redis off the request path.
    assert_eq!(redis.wait_keys(|n| n == 1), 1, "the entry reaches Redis");
    // The other instance never saw it: its L1 misses, L2 hits, the backend is not asked.
    let r = get(other.addr, path);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-cache"), Some("HIT"), "{:?}", r.headers);
    assert_eq!(r.header("cache-status"), Some("trireme; hit; detail=l2"));
    assert_eq!(r.header("etag"), Some("\"v7\""));
    assert!(r.header("age").is_some());
    assert_eq!(r.body, first.body);
    // Now from its own L1.
    let r = get(other.addr, path);
    assert_eq!(r.header("cache-status"), Some("trireme; hit"));
    assert_eq!(b.requests().len(), 1);
    let m = admin_metrics(other_admin);
    assert_eq!(metric(&m, "trireme_cache_l2_hits_total"), 1);
    assert_eq!(metric(&m, "trireme_cache_l2_errors_total"), 0);
    assert_eq!(
        metric(
            &wait_metric(a_admin, "trireme_cache_l2_writes_total", 1),
            "trireme_cache_l2_writes_total"
        ),
        1
    );
    // Purge on one instance removes the entry from Redis too: after it, the other
    // instance's next miss on a third key does not find it there either.
    let r = admin_call(
        other_admin,
        "POST /cache/purge?prefix=http://test/bytes/ HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    assert_eq!(redis.wait_keys(|n| n == 0), 0, "purged from Redis");
    let r = get(other.addr, path);
    assert_eq!(r.header("x-cache"), Some("MISS"));
    assert_eq!(b.requests().len(), 2);
    // A POST through one instance invalidates the target in Redis as well.
    assert_eq!(redis.wait_keys(|n| n == 1), 1);
    let mut c = a.client();
    c.send(format!("POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\n\r\nhi").as_bytes());
    assert_eq!(c.read_response(false).unwrap().status, 200);
    assert_eq!(redis.wait_keys(|n| n == 0), 0, "invalidated in Redis");
}

fn cache_l2_invalidations_reach_the_other_instances(bin: &PathBuf) {
    let redis = Redis::start();
    let b = Backend::start("b1").unwrap();
    let (a, a_admin) = l2_proxy(bin, &b, redis.addr);
    let (o, o_admin) = l2_proxy(bin, &b, redis.addr);
    assert_eq!(redis.wait_subscribers("trireme:invalidations:0", 2), 2);
    let status = |p: &Proxy, path: &str| {
        let r = get(p.addr, path);
        assert_eq!(r.status, 200);
        r.header("cache-status").unwrap_or("").to_string()
    };
    // Two entries in both L1s: fetched through `a`, read from L2 through `o`.
    let (x, y) = ("/bytes/2000?cc=max-age=60", "/bytes/3000?cc=max-age=60");
    for path in [x, y] {
        assert_eq!(status(&a, path), "trireme; fwd=miss; stored");
    }
    assert_eq!(redis.wait_keys(|n| n == 2), 2);
    for path in [x, y] {
        assert_eq!(status(&o, path), "trireme; hit; detail=l2");
        assert_eq!(
            (status(&a, path), status(&o, path)),
            ("trireme; hit".into(), "trireme; hit".into())
        );
    }
    assert_eq!(b.requests().len(), 2);
    // Purging one URL through `o` drops it from `a`'s memory too, and only it.
    let r = admin_call(
        o_admin,
        &format!("POST /cache/purge?url=http://test{x} HTTP/1.1\r\nHost: x\r\n\r\n"),
    );
    assert_eq!(r.status, 200);
    let m = wait_metric(a_admin, "trireme_cache_l2_peer_invalidations_total", 1);
    assert_eq!(
        metric(&m, "trireme_cache_l2_peer_invalidations_total"),
        1,
        "{m}"
    );
    assert_eq!(redis.keys(), 1);
    assert!(status(&a, x).contains("fwd=miss"), "purged in a's L1");
    assert_eq!(b.requests().len(), 3);
    assert_eq!(status(&a, y), "trireme; hit");
    // A POST through `a` invalidates its target in `o`'s memory (and Redis).
    assert_eq!(redis.wait_keys(|n| n == 2), 2, "x is back in Redis");
    let mut c = a.client();
    c.send(format!("POST {y} HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\n\r\nhi").as_bytes());
    assert_eq!(c.read_response(false).unwrap().status, 200);
    let m = wait_metric(o_admin, "trireme_cache_l2_peer_invalidations_total", 1);
    assert_eq!(
        metric(&m, "trireme_cache_l2_peer_invalidations_total"),
        1,
        "{m}"
    );
    assert!(status(&o, y).contains("fwd=miss"), "invalidated in o's L1");
    // `a` got no message of its own back, `o` none for its own purge.
    let am = admin_metrics(a_admin);
    assert_eq!(
        metric(&am, "trireme_cache_l2_peer_invalidations_total"),
        1,
        "{am}"
    );
}

fn cache_l2_holds_every_variant_of_a_vary_response(bin: &PathBuf) {
    let redis = Redis::start();
    let b = Backend::start("b1").unwrap();
    let (a, a_admin) = l2_proxy(bin, &b, redis.addr);
    let (o, o_admin) = l2_proxy(bin, &b, redis.addr);
    let path = "/bytes/1500?cc=max-age=60&vary=Accept-Language";
    let get_lang = |p: &Proxy, lang: &str| {
        let mut c = p.client();
        c.send(
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nAccept-Language: {lang}\r\n\r\n")
                .as_bytes(),
        );
        let r = c.read_response(false).unwrap();
        assert_eq!((r.status, r.body.len()), (200, 1500), "{lang}");
        r.header("cache-status").unwrap_or("").to_string()
    };
    // Two variants fetched through `a`: one Redis key holds both.
    for lang in ["en", "de"] {
        assert_eq!(get_lang(&a, lang), "trireme; fwd=miss; stored");
    }
    let m = wait_metric(a_admin, "trireme_cache_l2_writes_total", 2);
    assert_eq!(metric(&m, "trireme_cache_l2_writes_total"), 2, "{m}");
    assert_eq!(redis.keys(), 1);
    // Both are L2 hits through `o`; a third language is not there.
    for lang in ["de", "en"] {
        assert_eq!(get_lang(&o, lang), "trireme; hit; detail=l2", "{lang}");
    }
    assert_eq!(b.requests().len(), 2);
    assert_eq!(get_lang(&o, "fr"), "trireme; fwd=miss; stored");
    assert_eq!(b.requests().len(), 3);
    let m = admin_metrics(o_admin);
    assert_eq!(metric(&m, "trireme_cache_l2_hits_total"), 2, "{m}");
    assert_eq!(metric(&m, "trireme_cache_l2_misses_total"), 1, "{m}");
    assert_eq!(metric(&m, "trireme_cache_l2_errors_total"), 0, "{m}");
    // The backend saw each language once.
    let langs: Vec<String> = b
        .requests()
        .iter()
        .map(|r| r.header("accept-language").unwrap_or("").to_string())
        .collect();
    assert_eq!(langs, ["en", "de", "fr"]);
}

fn cache_l2_deletes_for_an_acl_user_refused_the_channel(bin: &PathBuf) {
    let redis = Redis::start();
    // Every key and command, no Pub/Sub channel.
    let acl = [
        "ACL",
        "SETUSER",
        "edge",
        "on",
        ">pw",
        "~*",
        "+@all",
        "resetchannels",
    ];
    assert_eq!(redis.command(&acl), "+OK");
    let b = Backend::start("b1").unwrap();
    let admin: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let yaml = format!(
        "server:\n  listen: \"{{listen}}\"\ncache:\n  size: 4MB\n  l2:\n    host: 127.0.0.1\n    port: {}\n    username: edge\n    password: pw\nadmin:\n  listen: \"{admin}\"\nbackends:\n  - url: http://{{b0}}\n",
        redis.addr.port()
    );
    let p = Proxy::with_config(bin, &yaml, &[&b]);
    let path = "/bytes/700?cc=max-age=60";
    assert_eq!(get(p.addr, path).header("x-cache"), Some("MISS"));
    assert_eq!(redis.wait_keys(|n| n == 1), 1, "{}", p.logs());
    // The purge is carried out in Redis though its announcement is refused, and only once.
    let r = admin_call(
        admin,
        &format!("POST /cache/purge?url=http://test{path} HTTP/1.1\r\nHost: x\r\n\r\n"),
    );
    assert_eq!(r.status, 200);
    assert_eq!(redis.wait_keys(|n| n == 0), 0);
    let m = wait_metric(admin, "trireme_cache_l2_deletes_total", 1);
    assert_eq!(metric(&m, "trireme_cache_l2_deletes_total"), 1, "{m}");
    assert_eq!(metric(&m, "trireme_cache_l2_write_errors_total"), 0, "{m}");
    // No deletion left pending: the next miss asks L2 again.
    assert_eq!(get(p.addr, path).header("x-cache"), Some("MISS"));
    let m = admin_metrics(admin);
    assert_eq!(metric(&m, "trireme_cache_l2_misses_total"), 2, "{m}");
    assert_eq!(metric(&m, "trireme_cache_l2_skipped_total"), 0, "{m}");
    let logs = p.logs();
    assert!(logs.contains("refused PUBLISH"), "{logs}");
    assert!(logs.contains("SUBSCRIBE refused"), "{logs}");
}

fn cache_l2_refreshes_an_entry_another_instance_revalidated(bin: &PathBuf) {
    let redis = Redis::start();
    let b = Backend::start("b1").unwrap();
    let (a, a_admin) = l2_proxy(bin, &b, redis.addr);
    let (o, _) = l2_proxy(bin, &b, redis.addr);
    let path = "/bytes/800?cc=max-age=2&etag=r1";
    let status = |p: &Proxy| {
        let r = get(p.addr, path);
        assert_eq!((r.status, r.body.len()), (200, 800));
        r.header("cache-status").unwrap_or("").to_string()
    };
    assert_eq!(status(&a), "trireme; fwd=miss; stored");
    let m = wait_metric(a_admin, "trireme_cache_l2_writes_total", 1);
    assert_eq!(metric(&m, "trireme_cache_l2_writes_total"), 1, "{m}");
    assert_eq!(status(&o), "trireme; hit; detail=l2");
    // Both copies age out; `a` validates its own with the origin (a 304) and writes the
    // refreshed entry to Redis.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(status(&a), "trireme; fwd=stale; fwd-status=304");
    let m = wait_metric(a_admin, "trireme_cache_l2_writes_total", 2);
    assert_eq!(metric(&m, "trireme_cache_l2_writes_total"), 2, "{m}");
    // `o` takes the refreshed copy from Redis instead of asking the origin again.
    assert_eq!(status(&o), "trireme; hit; detail=l2");
    let seen = b.requests();
    assert_eq!(seen.len(), 2, "one fetch, one validation");
    assert_eq!(seen[1].header("if-none-match"), Some("\"r1\""));
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

fn cache_l2_redis_killed_mid_test_fails_no_request(bin: &PathBuf) {
    let mut redis = Redis::start();
    let b = Backend::start("b1").unwrap();
    let (p, admin) = l2_proxy(bin, &b, redis.addr);
    let mut c = p.client();
    for i in 0..120 {
        if i == 60 {
            let m = admin_metrics(admin);
            let looked = metric(&m, "trireme_cache_l2_misses_total")
                + metric(&m, "trireme_cache_l2_hits_total");
            assert!(looked >= 40, "L2 was in use before Redis died: {m}");
            redis.kill();
        }
        // A mix of repeated and new keys: L1 hits, L2 lookups, misses.
        let path = format!("/bytes/{}?cc=max-age=60", 100 + i % 40 + (i / 40) * 1000);
        let r = if i % 3 == 0 {
            get(p.addr, &path)
        } else {
            c.get(&path)
        };
        assert_eq!(r.status, 200, "request {i}: {:?}", r.headers);
        assert_eq!(r.body.len(), 100 + i % 40 + (i / 40) * 1000, "request {i}");
    }
    let m = admin_metrics(admin);
    assert!(
        metric(&m, "trireme_cache_l2_errors_total") + metric(&m, "trireme_cache_l2_skipped_total")
            > 0,
        "{m}"
    );
    assert_eq!(metric(&m, "trireme_upstream_errors_total"), 0, "{m}");
}

fn cache_l2_unresponsive_redis_is_skipped(bin: &PathBuf) {
    // Accepts connections and never answers: every lookup runs into the L2 timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    let h2 = held.clone();
    std::thread::spawn(move || {
        for s in silent.incoming().flatten() {
            h2.lock().unwrap().push(s);
        }
    });
    let b = Backend::start("b1").unwrap();
    let (p, admin) = l2_proxy(bin, &b, addr);
    for i in 0..6 {
        let r = get(p.addr, &format!("/bytes/{}?cc=max-age=60", 10 + i));
        assert_eq!((r.status, r.header("x-cache")), (200, Some("MISS")), "{i}");
        assert_eq!(r.body.len(), 10 + i);
    }
    let m = admin_metrics(admin);
    // The first lookup timed out; the ones after it within the back-off skipped L2.
    assert!(metric(&m, "trireme_cache_l2_errors_total") >= 1, "{m}");
    assert!(metric(&m, "trireme_cache_l2_skipped_total") >= 1, "{m}");
    assert_eq!(metric(&m, "trireme_cache_l2_hits_total"), 0);
    assert!(p.logs().contains("L2 cache lookup failed"), "{}", p.logs());
    assert_eq!(b.requests().len(), 6);
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

fn cache_streams_one_fetch_to_concurrent_requests(bin: &PathBuf) {
    const N: usize = 200_000;
    let b = Backend::start("b1").unwrap();
    b.close_gate();
    let p = Proxy::with_backends(bin, &[&b], &["--cache", "4MB"]);
    let addr = p.addr;
    let path = "/gated/200000?cc=max-age=60";
    // The first request leads the fetch: the backend sends half the body, then waits.
    let lead = std::thread::spawn(move || get(addr, path));
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.requests().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the lead request reached no backend"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Requests for the same key now get the head and the first half while the backend
    // still holds the second: streamed from the lead's fetch, not waiting for its end.
    let mut followers = Vec::new();
    for _ in 0..8 {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
            .unwrap();
        followers.push((s, Vec::new()));
    }
    for (s, buf) in followers.iter_mut() {
        read_until(s, buf, |b| {
            head_end(b).is_some_and(|h| b.len() - h >= N / 2)
        });
        let head = String::from_utf8_lossy(&buf[..head_end(buf).unwrap()]).to_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("content-length: 200000\r\n"), "{head}");
        assert!(
            head.contains("cache-status: trireme; fwd=miss; collapsed"),
            "{head}"
        );
    }
    b.open_gate();
    let whole = pattern(N);
    for (s, buf) in followers.iter_mut() {
        read_until(s, buf, |b| head_end(b).is_some_and(|h| b.len() - h >= N));
        let h = head_end(buf).unwrap();
        assert_eq!(buf.len() - h, N);
        assert!(buf[h..] == whole[..], "streamed body differs");
    }
    let r = lead.join().unwrap();
    assert_eq!((r.status, r.body.len()), (200, N));
    assert!(r.body == whole);
    assert_eq!(b.requests().len(), 1, "nine requests, one backend fetch");
    // The keep-alive followers carry on, now from the stored entry.
    let (s, buf) = &mut followers[0];
    buf.clear();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
        .unwrap();
    read_until(s, buf, |b| head_end(b).is_some_and(|h| b.len() - h >= N));
    assert!(String::from_utf8_lossy(&buf[..200]).contains("Cache-Status: trireme; hit\r\n"));
    assert_eq!(b.requests().len(), 1);
}

fn cache_l2_logs_in_to_a_password_protected_redis(bin: &PathBuf) {
    let redis = Redis::start_with(Some("s3cret"));
    let b = Backend::start("b1").unwrap();
    let admin: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let yaml = |password: &str| {
        format!(
            "server:\n  listen: \"{{listen}}\"\ncache:\n  size: 4MB\n  l2:\n    host: 127.0.0.1\n    port: {}\n    password: {password}\n    db: 3\nadmin:\n  listen: \"{admin}\"\nbackends:\n  - url: http://{{b0}}\n",
            redis.addr.port()
        )
    };
    let writer = Proxy::with_config(bin, &yaml("s3cret"), &[&b]);
    let path = "/bytes/500?cc=max-age=60";
    assert_eq!(get(writer.addr, path).header("x-cache"), Some("MISS"));
    // Written to database 3 (DBSIZE counts database 0): SELECT was honoured.
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.keys_in(3) == 0 {
        assert!(
            Instant::now() < deadline,
            "the entry never reached database 3: {}",
            writer.logs()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(writer);
    assert_eq!(redis.keys(), 0);
    // A new instance logs in on its new connection, then finds it.
    let reader = Proxy::with_config(bin, &yaml("s3cret"), &[&b]);
    let r = get(reader.addr, path);
    assert_eq!(
        r.header("cache-status"),
        Some("trireme; hit; detail=l2"),
        "{:?}",
        r.headers
    );
    drop(reader);
    assert_eq!(b.requests().len(), 1);
    // A wrong password: lookups fail (counted), requests do not.
    let wrong = Proxy::with_config(bin, &yaml("nope"), &[&b]);
    let r = get(wrong.addr, path);
    assert_eq!((r.status, r.header("x-cache")), (200, Some("MISS")));
    let m = admin_metrics(admin);
    assert_eq!(metric(&m, "trireme_cache_l2_errors_total"), 1, "{m}");
    assert!(wrong.logs().contains("WRONGPASS"), "{}", wrong.logs());
}
