//! The L1 HTTP cache: hits, variants, staleness, coalescing, refreshes, warming, purge and the admin listener.

use super::*;

matrix!(
    pipelined_hits_of_a_large_cached_object_keep_memory_bounded,
    cache_hits_misses_and_invalidation,
    cache_never_replays_one_clients_cookie,
    forwarding_fields_cannot_poison_the_cache,
    cache_bounds_the_variants_of_one_url,
    cache_serves_stale_when_the_backend_dies,
    cache_purge_and_metrics_on_the_admin_listener,
    admin_listener_is_bounded_concurrent_and_can_require_a_token,
    slow_admin_clients_hold_no_thread_and_stall_no_traffic,
    cache_coalesces_concurrent_misses,
    cache_refreshes_stale_entries_in_the_background,
    cache_background_refreshes_are_bounded,
    cache_background_refreshes_retry_on_another_backend,
    cache_warms_configured_paths_at_start,
    cache_warms_on_a_schedule,
    cache_refreshes_hot_entries_before_they_expire,
    cache_streams_one_fetch_to_concurrent_requests,
);

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

fn slow_admin_clients_hold_no_thread_and_stall_no_traffic(bin: &PathBuf) {
    let b = Backend::start("b1").unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let yaml = format!(
        "server:\n  listen: \"{{listen}}\"\n  workers: 2\nadmin:\n  listen: \"{admin}\"\n  max_connections: 8\n  header_timeout: 2s\ncache:\n  size: 1MB\nbackends:\n  - url: http://{{b0}}\n"
    );
    let p = Proxy::with_config(bin, &yaml, &[&b]);
    let admin: std::net::SocketAddr = admin.parse().unwrap();
    assert_eq!(get(p.addr, "/warm").status, 200);
    let accepted = metric(&admin_metrics(admin), "trireme_connections_accepted_total");
    let base = threads_of(p.pid());
    // Six admin clients that send half a head and stop.
    let slow: Vec<Client> = (0..6)
        .map(|_| {
            let mut c = Client::connect(admin);
            c.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n");
            c
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    // Traffic and other admin requests go on meanwhile; one admin connection keeps alive.
    for i in 0..20 {
        assert_eq!(get(p.addr, &format!("/t{i}")).status, 200);
    }
    let mut keep = Client::connect(admin);
    for _ in 0..2 {
        keep.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        let r = keep.read_response(false).expect("an admin answer");
        assert_eq!(r.status, 200);
        assert!(
            r.text().contains("trireme_requests_total 21\n"),
            "{}",
            r.text()
        );
    }
    // No thread per admin connection, and no admin thread at all: the workers serve them.
    assert_eq!(
        threads_of(p.pid()),
        base,
        "threads with slow admin clients held"
    );
    let names = thread_names(p.pid());
    assert!(
        names.iter().all(|n| !n.starts_with("trireme-admin")),
        "{names:?}"
    );
    // Each slow one is cut off at admin.header_timeout with a 408.
    for mut c in slow {
        let r = c.read_response(false).expect("an answer");
        assert_eq!(r.status, 408);
    }
    // Admin connections (nine by now) are not the proxy's: only the 20 requests' count.
    let m = keep_metrics(&mut keep);
    assert_eq!(
        metric(&m, "trireme_connections_accepted_total"),
        accepted + 20
    );
}

/// `GET /metrics` on a kept-alive admin connection.
fn keep_metrics(c: &mut Client) -> String {
    c.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    c.read_response(false).expect("an admin answer").text()
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
    let conns = || b.connections.load(std::sync::atomic::Ordering::SeqCst);
    let conns0 = conns();
    // 40 stale entries, each served at once and refreshed in the background (a connection
    // each) by an origin that takes 1.5 s per validation: at most 4 reach it at once (the
    // rest wait in the queue), and they run on the proxy's own worker, not on threads of
    // their own.
    for i in 0..40 {
        assert_eq!(c.get(&path(i)).header("x-cache"), Some("STALE"));
    }
    let opened = || conns() - conns0;
    let mut most = 0;
    for _ in 0..20 {
        most = most.max(threads_of(p.pid()));
        std::thread::sleep(Duration::from_millis(25));
    }
    let first = opened();
    assert!(
        (1..=4).contains(&first),
        "{first} refresh connections within 0.5 s (at most 4 at once)"
    );
    assert!(
        most <= base,
        "no thread per refresh: {base} before, {most} at most"
    );
    // Once the first ones are answered, the next go out, still at most 4 at once.
    let deadline = Instant::now() + Duration::from_secs(5);
    while opened() <= first {
        assert!(
            Instant::now() < deadline,
            "the queued refreshes never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let answered = b
        .requests()
        .iter()
        .filter(|r| r.header("if-none-match").is_some())
        .count();
    assert!(
        opened() <= answered + 4,
        "{} refresh connections with {answered} answered",
        opened()
    );
}

fn cache_background_refreshes_retry_on_another_backend(bin: &PathBuf) {
    let b = Backend::start("b1").unwrap();
    let dead = free_port();
    let yaml = format!("server:\n  listen: \"{{listen}}\"\ncache:\n  size: 1MB\nload_balancing:\n  retries: 2\n  passive_health:\n    max_fails: 0\nbackends:\n  - url: http://127.0.0.1:{dead}\n  - url: http://{{b0}}\n");
    let p = Proxy::with_config(bin, &yaml, &[&b]);
    let path = |i: usize| format!("/r/{i}?cc=max-age=1,stale-while-revalidate=60&etag=v1");
    let mut c = p.client();
    const N: usize = 6;
    for i in 0..N {
        assert_eq!(c.get(&path(i)).status, 200, "{}", p.logs());
    }
    std::thread::sleep(Duration::from_millis(1200));
    for i in 0..N {
        assert_eq!(c.get(&path(i)).header("x-cache"), Some("STALE"));
    }
    let refreshes = || {
        b.requests()
            .iter()
            .filter(|r| r.header("if-none-match") == Some("\"v1\""))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while refreshes() < N {
        assert!(
            Instant::now() < deadline,
            "{} of {N} refreshes reached the live backend: {}",
            refreshes(),
            p.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
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
    // The schedule's time is kept by the runtime's first worker: no thread of its own.
    let names = thread_names(p.pid());
    assert!(
        names.iter().all(|n| !n.starts_with("trireme-refresh")),
        "{names:?}"
    );
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

fn cache_streams_one_fetch_to_concurrent_requests(bin: &PathBuf) {
    const N: usize = 200_000;
    let b = Backend::start("b1").unwrap();
    b.close_gate();
    let admin = format!("127.0.0.1:{}", free_port());
    let p = Proxy::with_backends(bin, &[&b], &["--cache", "4MB", "--admin", &admin]);
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
    // The followers were woken as the body grew, and never looked on a timer (polling): a
    // follower left waiting would have sat until its stall bound (`server.timeout`, far past
    // the 10 s read timeout above). How many wake-ups that took depends on how fast each
    // client read (one whose output stayed full resumed on its own writes, needing none).
    let m = admin_metrics(admin.parse().unwrap());
    assert!(metric(&m, "trireme_waiter_wakeups_total") >= 1, "{m}");
    assert_eq!(metric(&m, "trireme_waiter_polls_total"), 0, "{m}");
    // The keep-alive followers carry on, now from the stored entry.
    let (s, buf) = &mut followers[0];
    buf.clear();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
        .unwrap();
    read_until(s, buf, |b| head_end(b).is_some_and(|h| b.len() - h >= N));
    assert!(String::from_utf8_lossy(&buf[..200]).contains("Cache-Status: trireme; hit\r\n"));
    assert_eq!(b.requests().len(), 1);
}
