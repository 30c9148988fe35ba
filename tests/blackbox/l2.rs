//! The L2 (Redis) cache tier shared between instances.

use super::*;

matrix!(
    cache_l2_is_shared_between_instances,
    cache_l2_invalidations_reach_the_other_instances,
    cache_l2_holds_every_variant_of_a_vary_response,
    cache_l2_deletes_for_an_acl_user_refused_the_channel,
    cache_l2_refreshes_an_entry_another_instance_revalidated,
    cache_l2_redis_killed_mid_test_fails_no_request,
    cache_l2_unresponsive_redis_is_skipped,
    cache_l2_logs_in_to_a_password_protected_redis,
);

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
    // The writer and the subscriber run on the runtime's first worker: no threads of
    // their own.
    let names = thread_names(a.pid());
    assert!(
        names.iter().all(|n| !n.starts_with("trireme-l2")),
        "{names:?}"
    );
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
