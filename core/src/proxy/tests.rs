use super::*;
use crate::buf::BufPool;
use crate::sim::{parse_responses, Behavior, Reply, Sim, SimRequest};
use proptest::prelude::*;

const B1: &str = "127.0.0.1:9001";
const B2: &str = "127.0.0.1:9002";
const CLIENT: &str = "10.1.2.3:5555";

fn ctx_from(yaml: &str, now: Instant) -> Arc<ProxyContext> {
    crate::test_ctx(yaml, now)
}

fn two_backends(extra: &str) -> String {
    format!(
        "server:\n  timeout: 5s\n  keep_alive_timeout: 20s\n  header_timeout: 3s\n  max_body_size: 1MB\nload_balancing:\n  connect_timeout: 1s\n  response_timeout: 2s\n{extra}backends:\n  - url: http://{B1}\n  - url: http://{B2}\n"
    )
}

fn echo_path(name: &'static str) -> Behavior {
    Behavior::Serve(Box::new(move |r: &SimRequest| {
        Reply::ok(format!("{name} {}", r.target()).as_bytes())
    }))
}

fn sim_with(yaml: &str, b1: Behavior, b2: Behavior, seed: u64) -> Sim {
    let now = crate::test_origin();
    let ctx = ctx_from(yaml, now);
    Sim::new(
        ctx,
        vec![(B1.parse().unwrap(), b1), (B2.parse().unwrap(), b2)],
        seed,
        now,
    )
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: example.com\r\n\r\n").into_bytes()
}

fn statuses(received: &[u8], n: usize) -> Vec<u16> {
    parse_responses(received, &vec![false; n])
        .iter()
        .map(|r| r.0)
        .collect()
}

#[test]
fn keep_alive_reuses_one_upstream_connection() {
    let mut sim = sim_with(&two_backends(""), echo_path("b1"), echo_path("b2"), 1);
    let c = sim.connect_client(CLIENT.parse().unwrap());
    for i in 0..10 {
        sim.send(c, &get(&format!("/r{i}")));
        sim.run_for(Duration::from_millis(10));
    }
    let resp = parse_responses(&sim.clients[c].received, &[false; 10]);
    assert_eq!(resp.len(), 10);
    assert!(resp.iter().all(|r| r.0 == 200));
    // Round robin alternates; each backend saw exactly one connection for five requests.
    assert_eq!(sim.backends[0].requests.len(), 5);
    assert_eq!(sim.backends[1].requests.len(), 5);
    assert_eq!(sim.backends[0].connections, 1);
    assert_eq!(sim.backends[1].connections, 1);
    assert!(!sim.clients[c].closed);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    for seed in 1..20 {
        let mut sim = sim_with(&two_backends(""), echo_path("b1"), echo_path("b2"), seed);
        sim.max_piece = 7;
        let c = sim.connect_client(CLIENT.parse().unwrap());
        let mut all = Vec::new();
        for i in 0..5 {
            all.extend_from_slice(&get(&format!("/p{i}")));
        }
        sim.send(c, &all);
        sim.run_for(Duration::from_millis(100));
        let resp = parse_responses(&sim.clients[c].received, &[false; 5]);
        assert_eq!(resp.len(), 5, "seed {seed}");
        for (i, r) in resp.iter().enumerate() {
            assert!(
                String::from_utf8_lossy(&r.2).ends_with(&format!("/p{i}")),
                "seed {seed}: {:?}",
                String::from_utf8_lossy(&r.2)
            );
        }
    }
}

#[test]
fn headers_are_rewritten_for_the_backend() {
    let spoof = b"GET /h HTTP/1.1\r\nHost: example.com\r\nConnection: keep-alive, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nUpgrade: websocket\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\nX-Real-IP: 1.1.1.1\r\nForwarded: for=1.1.1.1\r\nX-Original-URL: /admin\r\nX-Rewrite-URL: /admin\r\nX-End: kept\r\n\r\n";
    let mut sim = sim_with(&two_backends(""), echo_path("b1"), echo_path("b2"), 1);
    let c = sim.connect_client(CLIENT.parse().unwrap());
    sim.send(c, spoof);
    sim.run_for(Duration::from_millis(10));
    let r = &sim.backends[0].requests[0];
    for gone in [
        "connection",
        "x-hop",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
        "x-original-url",
        "x-rewrite-url",
    ] {
        assert!(r.header(gone).is_none(), "{gone} forwarded:\n{}", r.head);
    }
    // An untrusted client's forwarding fields are replaced by what the proxy saw.
    assert_eq!(r.header("x-forwarded-for"), Some("10.1.2.3"));
    assert_eq!(r.header("x-real-ip"), Some("10.1.2.3"));
    assert_eq!(r.header("x-forwarded-host"), Some("example.com"));
    assert_eq!(r.header("x-forwarded-proto"), Some("http"));
    assert_eq!(
        r.header("forwarded"),
        Some("for=10.1.2.3;host=\"example.com\";proto=http")
    );
    for once in [
        "x-forwarded-for",
        "x-real-ip",
        "forwarded",
        "x-forwarded-host",
    ] {
        let n = r
            .head
            .lines()
            .filter(|l| l.to_ascii_lowercase().starts_with(&format!("{once}:")))
            .count();
        assert_eq!(n, 1, "{once} sent once:\n{}", r.head);
    }
    assert_eq!(r.header("via"), Some("1.1 trireme"));
    assert_eq!(r.header("host"), Some("example.com"));
    assert_eq!(r.header("x-end"), Some("kept"));
    assert!(r.head.starts_with("GET /h HTTP/1.1\r\n"));

    // From a trusted proxy they are kept, and this hop is appended.
    let yaml = two_backends("").replace("server:\n", "server:\n  trusted_proxies: [10.0.0.0/8]\n");
    let mut sim = sim_with(&yaml, echo_path("b1"), echo_path("b2"), 1);
    let c = sim.connect_client(CLIENT.parse().unwrap());
    sim.send(c, spoof);
    sim.run_for(Duration::from_millis(10));
    let r = &sim.backends[0].requests[0];
    assert_eq!(r.header("x-forwarded-for"), Some("1.1.1.1, 10.1.2.3"));
    assert_eq!(r.header("x-real-ip"), Some("1.1.1.1"));
    assert_eq!(r.header("x-forwarded-host"), Some("evil.example"));
    assert_eq!(r.header("x-forwarded-proto"), Some("https"));
    assert_eq!(
        r.header("forwarded"),
        Some("for=1.1.1.1, for=10.1.2.3;host=\"example.com\";proto=http")
    );
    assert!(r.header("x-original-url").is_none(), "never forwarded");
}

/// The cache chooses a `Vary` variant by what the backend received: a field the client
/// names in `Connection` is not forwarded, so it does not select a variant either (else a
/// client could store the field-less answer under another variant's key).
#[test]
fn vary_variant_is_chosen_from_the_forwarded_request() {
    let yaml = two_backends("cache:\n  size: 1MB\n");
    let lang = || {
        Behavior::Serve(Box::new(|r: &SimRequest| Reply {
            headers: vec![
                ("Cache-Control".into(), "max-age=60".into()),
                ("Vary".into(), "X-Lang".into()),
            ],
            ..Reply::ok(format!("lang={}", r.header("x-lang").unwrap_or("none")).as_bytes())
        }))
    };
    let mut sim = sim_with(&yaml, lang(), lang(), 1);
    let c = sim.connect_client(CLIENT.parse().unwrap());
    // The attacker: X-Lang: fr, but listed in Connection, so the backend sees none.
    sim.send(
        c,
        b"GET /v HTTP/1.1\r\nHost: example.com\r\nX-Lang: fr\r\nConnection: X-Lang\r\n\r\n",
    );
    sim.run_for(Duration::from_millis(10));
    // A French client must get the French answer, not the stored field-less one.
    sim.send(
        c,
        b"GET /v HTTP/1.1\r\nHost: example.com\r\nX-Lang: fr\r\n\r\n",
    );
    sim.run_for(Duration::from_millis(10));
    // And a client without X-Lang is answered from the stored field-less variant.
    sim.send(c, &get("/v"));
    sim.run_for(Duration::from_millis(10));
    let resp = parse_responses(&sim.clients[c].received, &[false; 3]);
    let bodies: Vec<String> = resp
        .iter()
        .map(|r| String::from_utf8_lossy(&r.2).into_owned())
        .collect();
    assert_eq!(bodies, ["lang=none", "lang=fr", "lang=none"]);
    let xcache = |i: usize| {
        resp[i]
            .1
            .iter()
            .find(|(n, _)| n == "X-Cache")
            .map(|(_, v)| v.clone())
    };
    assert_eq!(xcache(2).as_deref(), Some("HIT"));
    assert_eq!(
        sim.backends[0].requests.len() + sim.backends[1].requests.len(),
        2
    );
}

#[test]
fn response_hop_by_hop_removed_and_http10_client_gets_close_delimited_body() {
    let b = Behavior::Serve(Box::new(|_r: &SimRequest| Reply {
        chunked: true,
        headers: vec![
            ("Connection".into(), "X-Internal".into()),
            ("X-Internal".into(), "1".into()),
            ("Keep-Alive".into(), "timeout=1".into()),
        ],
        ..Reply::ok(&[b'z'; 3000])
    }));
    let mut sim = sim_with(&two_backends(""), b, echo_path("b2"), 1);
    let c = sim.connect_client(CLIENT.parse().unwrap());
    sim.send(c, b"GET / HTTP/1.0\r\n\r\n");
    sim.run_for(Duration::from_millis(10));
    let raw = String::from_utf8_lossy(&sim.clients[c].received).into_owned();
    assert!(!raw.to_ascii_lowercase().contains("x-internal"), "{raw}");
    assert!(
        !raw.to_ascii_lowercase().contains("transfer-encoding"),
        "HTTP/1.0 client got chunked: {raw}"
    );
    assert!(raw.contains("Connection: close"));
    assert!(sim.clients[c].closed);
    assert!(raw.ends_with(&"z".repeat(3000)));
}

#[test]
fn large_bodies_stream_both_ways() {
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let big2 = big.clone();
    let b = Behavior::Serve(Box::new(move |r: &SimRequest| {
        if r.target() == "/up" {
            Reply::ok(format!("got {}", r.body.len()).as_bytes())
        } else {
            Reply {
                chunked: true,
                ..Reply::ok(&big2)
            }
        }
    }));
    let mut sim = sim_with(&two_backends(""), b, echo_path("b2"), 3);
    sim.max_piece = 4096;
    let c = sim.connect_client(CLIENT.parse().unwrap());
    sim.send(c, &get("/down"));
    sim.run_for(Duration::from_millis(50));
    let resp = parse_responses(&sim.clients[c].received, &[false]);
    assert_eq!(resp[0].2, big);
    // Upload, chunked from the client.
    let mut req = b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for part in big.chunks(10_000) {
        crate::http1::write::push_chunk(&mut req, part);
    }
    req.extend_from_slice(b"0\r\n\r\n");
    // The second request goes to backend 2 (round robin); pin to b1 by re-sending until b1.
    let c2 = sim.connect_client(CLIENT.parse().unwrap());
    sim.send(c2, &get("/skip"));
    sim.run_for(Duration::from_millis(10));
    sim.send(c2, &req);
    sim.run_for(Duration::from_millis(50));
    let got = sim.backends[0]
        .requests
        .iter()
        .find(|r| r.target() == "/up")
        .expect("upload reached b1");
    assert_eq!(got.body, big);
}

#[test]
fn bounded_buffering_while_client_does_not_read() {
    let now = crate::test_origin();
    let ctx = ctx_from(&two_backends(""), now);
    let mut s = Session::new(ctx, CLIENT.parse().unwrap(), now);
    s.feed_client(&get("/"), now);
    assert!(matches!(s.poll_action(), Some(Action::Connect { .. })));
    s.on_upstream_connected(s.up_io, false, now);
    let head = b"HTTP/1.1 200 OK\r\nContent-Length: 2000000\r\n\r\n";
    s.feed_upstream(s.up_io, head, now);
    // Feed while the session wants it, never writing to the client.
    let chunk = vec![1u8; 16 * 1024];
    let mut fed = 0;
    while s.wants_upstream_read() && fed < 2_000_000 {
        s.feed_upstream(s.up_io, &chunk, now);
        fed += chunk.len();
    }
    assert!(
        fed < 200_000,
        "read {fed} bytes while the client read nothing"
    );
    assert!(s.conn.output.len() < HIGH_WATER + 32 * 1024);
}

#[test]
fn client_write_error_drops_pending_output() {
    // A runtime whose client write failed must find nothing left to write (a runtime that
    // retried pending output after a failure would spin forever).
    let origin = crate::test_origin();
    let ctx = ctx_from(&two_backends(""), origin);
    let mut s = Session::new(ctx, CLIENT.parse().unwrap(), origin);
    s.feed_client(&get("/"), origin);
    assert!(matches!(s.poll_action(), Some(Action::Connect { .. })));
    s.on_upstream_connected(s.up_io, false, origin);
    s.on_upstream_written(s.up_io, s.up_out.len(), origin);
    s.feed_upstream(
        s.up_io,
        b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n",
        origin,
    );
    s.feed_upstream(s.up_io, &[b'x'; 30_000], origin);
    assert!(!s.conn.output.is_empty());
    s.on_client_error(origin);
    assert!(s.wants_close());
    assert!(s.conn.output.is_empty() && s.up_out.is_empty());
    assert!(matches!(
        s.poll_action(),
        Some(Action::ReleaseUpstream { reuse: false, .. })
    ));
    assert_eq!(s.poll_action(), None);
    // Reporting the error again changes nothing.
    s.on_client_error(origin);
    assert_eq!(s.poll_action(), None);
    assert_eq!(s.deadline(), None);
}

#[test]
fn backend_death_mid_response_aborts_the_client() {
    let b = Behavior::Serve(Box::new(|_r: &SimRequest| Reply {
        die_after: Some(500),
        ..Reply::ok(&[b'x'; 5000])
    }));
    let mut sim = sim_with(&two_backends(""), b, echo_path("b2"), 1);
    let c = sim.connect_client(CLIENT.parse().unwrap());
    sim.send(c, &get("/"));
    sim.run_for(Duration::from_millis(50));
    assert!(
        sim.clients[c].closed,
        "client must see the connection close"
    );
    let resp = parse_responses(&sim.clients[c].received, &[false]);
    assert!(
        resp.is_empty(),
        "a truncated response must not look complete"
    );
    assert_eq!(sim.pooled(), 0);
}

#[test]
fn connect_failure_is_retried_on_another_backend() {
    let mut sim = sim_with(&two_backends(""), Behavior::Refuse, echo_path("b2"), 1);
    let c = sim.connect_client(CLIENT.parse().unwrap());
    for _ in 0..6 {
        sim.send(c, &get("/x"));
        sim.run_for(Duration::from_millis(10));
    }
    assert_eq!(statuses(&sim.clients[c].received, 6), vec![200; 6]);
    assert_eq!(sim.backends[1].requests.len(), 6);
    // After max_fails (3) consecutive failures the dead backend is ejected: no more
    // connect attempts are needed.
    let m = &sim.ctx.metrics;
    assert!(
        m.retries.load(Ordering::Relaxed) <= 3,
        "retries: {}",
        m.retries.load(Ordering::Relaxed)
    );
}

#[test]
fn post_is_not_retried_and_gets_502() {
    let mut sim = sim_with(&two_backends(""), Behavior::Refuse, echo_path("b2"), 1);
    let c = sim.connect_client(CLIENT.parse().unwrap());
    sim.send(
        c,
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi",
    );
    sim.run_for(Duration::from_millis(10));
    assert_eq!(statuses(&sim.clients[c].received, 1), vec![502]);
    assert_eq!(sim.backends[1].requests.len(), 0);
}

#[test]
fn all_backends_failing_stay_in_rotation_by_default() {
    // Panic mode (on by default): with every backend ejected, requests still go to them.
    let mut sim = sim_with(
        &two_backends("  passive_health:\n    max_fails: 1\n    fail_timeout: 30s\n  retries: 0\n"),
        Behavior::Refuse,
        Behavior::Refuse,
        1,
    );
    let c = sim.connect_client(CLIENT.parse().unwrap());
    let mut codes = Vec::new();
    for _ in 0..4 {
        let before = sim.clients[c].received.len();
        sim.send(c, &get("/"));
        sim.run_for(Duration::from_millis(10));
        codes.extend(statuses(&sim.clients[c].received[before..], 1));
    }
    assert_eq!(codes, vec![502, 502, 502, 502]);
    assert!(
        sim.ctx.upstreams[0]
            .panic_picks
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
}

#[test]
fn no_healthy_backend_is_503() {
    let mut sim = sim_with(
        &two_backends("  passive_health:\n    max_fails: 1\n    fail_timeout: 30s\n    panic_threshold: 0\n  retries: 0\n"),
        Behavior::Refuse,
        Behavior::Refuse,
        1,
    );
    let c = sim.connect_client(CLIENT.parse().unwrap());
    let mut codes = Vec::new();
    for _ in 0..3 {
        let before = sim.clients[c].received.len();
        sim.send(c, &get("/"));
        sim.run_for(Duration::from_millis(10));
        codes.extend(statuses(&sim.clients[c].received[before..], 1));
    }
    assert_eq!(codes, vec![502, 502, 503]);
    // Re-admitted after fail_timeout.
    sim.run_for(Duration::from_secs(31));
    assert!(sim.ctx.upstreams[0].is_available(0, sim.now));
}

#[test]
fn stale_pooled_connection_is_retried_on_a_fresh_one() {
    let mut sim = sim_with(&two_backends(""), echo_path("b1"), echo_path("b2"), 1);
    let c = sim.connect_client(CLIENT.parse().unwrap());
    sim.send(c, &get("/1"));
    sim.run_for(Duration::from_millis(10));
    sim.send(c, &get("/2"));
    sim.run_for(Duration::from_millis(10));
    assert_eq!(sim.pooled(), 2);
    // Backend 1 restarts: its pooled connection is dead, and the request is sent on it before
    // the close is seen; the session must retry on a fresh connection.
    sim.kill_backend(B1.parse().unwrap());
    sim.backends[0].behavior = echo_path("b1");
    sim.send(c, &get("/3"));
    sim.run_for(Duration::from_millis(10));
    let codes = statuses(&sim.clients[c].received, 3);
    assert_eq!(
        codes,
        vec![200, 200, 200],
        "{}",
        String::from_utf8_lossy(&sim.clients[c].received)
    );
}

#[test]
fn connect_timeout_gives_504_and_slow_backend_gives_504() {
    let slow = Behavior::Serve(Box::new(|_r: &SimRequest| Reply {
        delay: Duration::from_secs(10),
        ..Reply::ok(b"late")
    }));
    let mut sim = sim_with(
        &two_backends("  retries: 0\n"),
        Behavior::Blackhole,
        slow,
        1,
    );
    let c = sim.connect_client(CLIENT.parse().unwrap());
    sim.send(c, &get("/"));
    sim.run_for(Duration::from_secs(3));
    sim.send(c, &get("/"));
    sim.run_for(Duration::from_secs(5));
    assert_eq!(statuses(&sim.clients[c].received, 2), vec![504, 504]);
}

#[test]
fn slow_client_head_is_cut_off() {
    let mut sim = sim_with(&two_backends(""), echo_path("b1"), echo_path("b2"), 1);
    let c = sim.connect_client(CLIENT.parse().unwrap());
    // One byte a second: the head timeout (3s) counts from the first byte, not the last.
    for b in b"GET / HTTP/1.1\r\nHost: a\r\n" {
        if sim.clients[c].closed {
            break;
        }
        sim.send(c, &[*b]);
        sim.run_for(Duration::from_secs(1));
    }
    assert!(sim.clients[c].closed);
    assert_eq!(statuses(&sim.clients[c].received, 1), vec![408]);
    assert!(sim.backends[0].requests.is_empty());
}

#[test]
fn idle_keep_alive_connection_is_closed_after_timeout() {
    let mut sim = sim_with(&two_backends(""), echo_path("b1"), echo_path("b2"), 1);
    let c = sim.connect_client(CLIENT.parse().unwrap());
    sim.send(c, &get("/"));
    sim.run_for(Duration::from_secs(19));
    assert!(!sim.clients[c].closed);
    sim.run_for(Duration::from_secs(2));
    assert!(sim.clients[c].closed);
}

#[test]
fn rejected_requests_never_reach_a_backend() {
    let cases: &[(&[u8], u16)] = &[
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/3.0\r\nHost: a\r\n\r\n", 505),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5000000\r\n\r\n", 413),
    ];
    for (raw, code) in cases {
        let mut sim = sim_with(&two_backends(""), echo_path("b1"), echo_path("b2"), 1);
        let c = sim.connect_client(CLIENT.parse().unwrap());
        sim.send(c, raw);
        sim.run_for(Duration::from_millis(10));
        assert_eq!(statuses(&sim.clients[c].received, 1), vec![*code]);
        assert!(sim.clients[c].closed);
        assert_eq!(
            sim.backends[0].requests.len() + sim.backends[1].requests.len(),
            0
        );
    }
}

#[test]
fn chunked_body_over_limit_is_413_mid_stream() {
    let mut sim = sim_with(&two_backends(""), echo_path("b1"), echo_path("b2"), 1);
    let c = sim.connect_client(CLIENT.parse().unwrap());
    let mut req = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..200 {
        crate::http1::write::push_chunk(&mut req, &[b'a'; 8192]);
    }
    sim.send(c, &req);
    sim.run_for(Duration::from_millis(50));
    assert_eq!(statuses(&sim.clients[c].received, 1), vec![413]);
    assert!(sim.clients[c].closed);
    assert!(
        sim.backends[0].requests.is_empty(),
        "the backend never saw a complete request"
    );
}

#[test]
fn head_and_204_and_304_have_no_body() {
    let b = Behavior::Serve(Box::new(|r: &SimRequest| match r.target() {
        "/204" => Reply::status(204),
        "/304" => Reply {
            headers: vec![("ETag".into(), "\"x\"".into())],
            ..Reply::status(304)
        },
        _ => Reply::ok(b"0123456789"),
    }));
    let mut sim = sim_with(
        &two_backends("  algorithm: ip_hash\n"),
        b,
        Behavior::Refuse,
        1,
    );
    let c = sim.connect_client("127.0.0.9:1".parse().unwrap());
    sim.send(c, b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n");
    sim.send(c, &get("/204"));
    sim.send(c, &get("/304"));
    sim.send(c, &get("/"));
    sim.run_for(Duration::from_millis(50));
    let resp = parse_responses(&sim.clients[c].received, &[true, false, false, false]);
    let codes: Vec<u16> = resp.iter().map(|r| r.0).collect();
    assert_eq!(
        codes,
        vec![200, 204, 304, 200],
        "{}",
        String::from_utf8_lossy(&sim.clients[c].received)
    );
    let head = &resp[0];
    assert!(head
        .1
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("content-length") && v == "10"));
    assert_eq!(resp[3].2, b"0123456789");
}

#[test]
fn expect_100_continue_is_relayed_for_streamed_bodies() {
    let now = crate::test_origin();
    let ctx = ctx_from(&two_backends(""), now);
    let mut s = Session::new(ctx, CLIENT.parse().unwrap(), now);
    // Larger than client_body_buffer_size: streamed, so the backend decides on the 100.
    s.feed_client(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\nExpect: 100-continue\r\n\r\n",
        now,
    );
    assert!(matches!(s.poll_action(), Some(Action::Connect { .. })));
    s.on_upstream_connected(s.up_io, false, now);
    let head = String::from_utf8_lossy(s.up_out.pending()).into_owned();
    assert!(head.contains("Expect: 100-continue"), "{head}");
    s.on_upstream_written(s.up_io, s.up_out.len(), now);
    s.feed_upstream(s.up_io, b"HTTP/1.1 100 Continue\r\n\r\n", now);
    assert_eq!(s.conn.output.pending(), b"HTTP/1.1 100 Continue\r\n\r\n");
    s.on_client_written(s.conn.output.len(), now);
    s.feed_client(b"body", now);
    assert_eq!(s.up_out.pending(), b"body");
}

/// A small body is received whole before any backend is involved: a client that sends
/// it slowly (or never) holds no backend connection. An `Expect: 100-continue` is
/// answered by the proxy, and not passed on (the body is there already).
#[test]
fn small_request_bodies_are_buffered_before_connecting() {
    let now = crate::test_origin();
    let ctx = ctx_from(&two_backends(""), now);
    let mut s = Session::new(ctx.clone(), CLIENT.parse().unwrap(), now);
    s.feed_client(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n",
        now,
    );
    assert_eq!(s.poll_action(), None, "no backend yet");
    assert_eq!(s.conn.output.pending(), b"HTTP/1.1 100 Continue\r\n\r\n");
    s.on_client_written(s.conn.output.len(), now);
    let t = now + Duration::from_millis(300);
    s.feed_client(b"01234", t);
    assert_eq!(s.poll_action(), None, "still waiting for the rest");
    s.feed_client(b"56789", t);
    assert!(matches!(s.poll_action(), Some(Action::Connect { .. })));
    s.on_upstream_connected(s.up_io, false, t);
    let up = String::from_utf8_lossy(s.up_out.pending()).into_owned();
    assert!(!up.contains("Expect"), "{up}");
    assert!(up.ends_with("\r\n\r\n0123456789"), "{up}");
    // A body that never completes is cut off at client_body_timeout with a 408, having
    // cost no backend connection.
    let mut s = Session::new(ctx.clone(), CLIENT.parse().unwrap(), now);
    s.feed_client(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n0",
        now,
    );
    let mut t = now;
    for _ in 0..200 {
        // One byte a second keeps the inactivity timeout at bay, not the total deadline.
        t += Duration::from_secs(1);
        if s.deadline().is_some_and(|d| d <= t) {
            s.on_timeout(t);
            break;
        }
    }
    assert_eq!(s.poll_action(), None);
    assert!(String::from_utf8_lossy(s.conn.output.pending()).starts_with("HTTP/1.1 408 "));
    assert!(t <= now + ctx.body_timeout + Duration::from_secs(1));
    // Chunked bodies are buffered up to their end too.
    let mut s = Session::new(ctx, CLIENT.parse().unwrap(), now);
    s.feed_client(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
        now,
    );
    assert_eq!(s.poll_action(), None);
    s.feed_client(b"0\r\n\r\n", now);
    assert!(matches!(s.poll_action(), Some(Action::Connect { .. })));
}

/// A streamed (large) body must arrive whole within client_body_timeout, however
/// steadily it trickles.
#[test]
fn streamed_bodies_have_a_total_deadline() {
    let now = crate::test_origin();
    let yaml = two_backends("").replace("server:\n", "server:\n  client_body_timeout: 20s\n");
    let ctx = ctx_from(&yaml, now);
    let mut s = Session::new(ctx, CLIENT.parse().unwrap(), now);
    s.feed_client(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n",
        now,
    );
    assert!(matches!(s.poll_action(), Some(Action::Connect { .. })));
    s.on_upstream_connected(s.up_io, false, now);
    let mut t = now;
    while t < now + Duration::from_secs(60) {
        t += Duration::from_secs(1);
        s.feed_client(b"x", t);
        let n = s.up_out.len();
        s.on_upstream_written(s.up_io, n, t);
        if s.deadline().is_some_and(|d| d <= t) {
            s.on_timeout(t);
        }
        if !s.conn.output.is_empty() || s.wants_close() {
            break;
        }
    }
    assert_eq!(t, now + Duration::from_secs(20));
    assert!(String::from_utf8_lossy(s.conn.output.pending()).starts_with("HTTP/1.1 408 "));
}

#[test]
fn drain_closes_idle_and_finishes_in_flight() {
    let slow = Behavior::Serve(Box::new(|_r: &SimRequest| Reply {
        delay: Duration::from_millis(500),
        ..Reply::ok(b"done")
    }));
    let mut sim = sim_with(
        &two_backends("  algorithm: ip_hash\n"),
        slow,
        Behavior::Refuse,
        1,
    );
    let busy = sim.connect_client("127.0.0.5:1".parse().unwrap());
    let idle = sim.connect_client("127.0.0.5:2".parse().unwrap());
    sim.send(busy, &get("/"));
    sim.run_for(Duration::from_millis(10));
    let now = sim.now;
    for c in [busy, idle] {
        sim.clients[c].session.begin_drain(now);
    }
    sim.run_for(Duration::from_secs(1));
    assert!(sim.clients[idle].closed);
    assert!(sim.clients[busy].closed);
    let resp = parse_responses(&sim.clients[busy].received, &[false]);
    assert_eq!(resp[0].0, 200);
    assert!(resp[0]
        .1
        .iter()
        .any(|(n, v)| n == "Connection" && v == "close"));
}

#[test]
fn routes_pick_named_upstreams() {
    let yaml = format!(
        "upstreams:\n  api:\n    backends:\n      - url: http://{B2}\nroutes:\n  - path: /api\n    upstream: api\nbackends:\n  - url: http://{B1}\n"
    );
    let mut sim = sim_with(&yaml, echo_path("b1"), echo_path("b2"), 1);
    let c = sim.connect_client(CLIENT.parse().unwrap());
    sim.send(c, &get("/api/users"));
    sim.send(c, &get("/web"));
    sim.run_for(Duration::from_millis(10));
    assert_eq!(sim.backends[1].requests[0].target(), "/api/users");
    assert_eq!(sim.backends[0].requests[0].target(), "/web");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Whatever the split of the byte stream, the client sees the same responses.
    #[test]
    fn any_split_same_responses(seed in 1u64..u64::MAX, piece in 1usize..64) {
        let run = |max_piece: usize| {
            let b = |name: &'static str| Behavior::Serve(Box::new(move |r: &SimRequest| Reply {
                chunked: r.target().contains("c"),
                ..Reply::ok(format!("{name}:{}:{}", r.target(), r.body.len()).as_bytes())
            }));
            let mut sim = sim_with(&two_backends(""), b("b1"), b("b2"), seed);
            sim.max_piece = max_piece;
            let c = sim.connect_client(CLIENT.parse().unwrap());
            let mut all = Vec::new();
            all.extend_from_slice(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n");
            all.extend_from_slice(b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n");
            all.extend_from_slice(b"PUT /d HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nwxyz");
            sim.send(c, &all);
            sim.run_for(Duration::from_millis(100));
            parse_responses(&sim.clients[c].received, &[false; 3]).into_iter().map(|r| (r.0, r.2)).collect::<Vec<_>>()
        };
        let whole = run(usize::MAX);
        prop_assert_eq!(whole.len(), 3);
        prop_assert_eq!(run(piece), whole);
    }
}

#[test]
fn bad_body_in_the_first_read_opens_no_backend_connection() {
    let now = crate::test_origin();
    let ctx = ctx_from(&two_backends(""), now);
    let mut s = Session::new(ctx, CLIENT.parse().unwrap(), now);
    s.feed_client(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        now,
    );
    let actions: Vec<Action> = std::iter::from_fn(|| s.poll_action()).collect();
    assert!(actions.is_empty(), "{actions:?}");
    assert!(s.conn.output.pending().starts_with(b"HTTP/1.1 400 "));
    assert!(s.ctx.upstreams[0]
        .backends
        .iter()
        .all(|b| b.active.load(Ordering::Relaxed) == 0));
}

/// One keep-alive exchange driven by hand, reading through the pool as runtimes do.
fn exchange(s: &mut Session, pool: &mut BufPool, now: Instant) {
    s.reserve_client_in(pool)
        .extend_from_slice(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n");
    s.on_client_read(now);
    match s.poll_action() {
        Some(Action::Connect { .. }) => s.on_upstream_connected(s.up_io, true, now),
        other => panic!("{other:?}"),
    }
    let n = s.up_out.len();
    assert!(n > 0);
    s.on_upstream_written(s.up_io, n, now);
    s.reserve_up_in(pool)
        .extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi");
    s.on_upstream_read(s.up_io, now);
    assert!(s.conn.output.pending().ends_with(b"\r\n\r\nhi"));
    let n = s.conn.output.len();
    s.on_client_written(n, now);
    assert!(matches!(
        s.poll_action(),
        Some(Action::ReleaseUpstream { reuse: true, .. })
    ));
}

#[test]
fn idle_connection_parks_its_buffers_and_reuses_them() {
    let now = crate::test_origin();
    let ctx = ctx_from(&two_backends(""), now);
    let mut s = Session::new(ctx, CLIENT.parse().unwrap(), now);
    let mut pool = BufPool::new(16);
    exchange(&mut s, &mut pool, now);
    let ptr = s.conn.input.as_ptr();
    s.park_buffers(&mut pool);
    assert_eq!(
        pool.free(),
        (2, 3),
        "all four buffers and the upstream head's copy parked"
    );
    assert_eq!(s.conn.input.capacity() + s.up_in.capacity(), 0);
    assert_eq!(s.conn.output.capacity() + s.up_out.capacity(), 0);
    // The next request takes the same allocations back.
    exchange(&mut s, &mut pool, now);
    assert_eq!(pool.free(), (0, 0));
    assert_eq!(s.conn.input.as_ptr(), ptr);
    // Not parked while a request is in flight.
    s.reserve_client_in(&mut pool)
        .extend_from_slice(b"GET /y HTTP/1.1\r\nHost: a\r\n\r\n");
    s.on_client_read(now);
    s.park_buffers(&mut pool);
    assert_eq!(pool.free(), (0, 0));
    s.recycle(&mut pool);
    assert_eq!(pool.free(), (2, 3));
}

fn cached(extra: &str) -> String {
    two_backends(extra).replace("backends:\n", "cache:\n  size: 1MB\nbackends:\n")
}

fn get_h(path: &str, extra: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: example.com\r\n{extra}\r\n").into_bytes()
}

/// A backend that counts requests and answers with these headers and a body naming it.
fn origin(
    name: &'static str,
    headers: &'static str,
    hits: Arc<std::sync::atomic::AtomicUsize>,
) -> Behavior {
    Behavior::Serve(Box::new(move |r: &SimRequest| {
        hits.fetch_add(1, Ordering::SeqCst);
        let mut reply = Reply::ok(format!("{name} {}", r.target()).as_bytes());
        for line in headers.split("\r\n").filter(|l| !l.is_empty()) {
            let (n, v) = line.split_once(": ").unwrap();
            reply.headers.push((n.to_string(), v.to_string()));
        }
        reply
    }))
}

fn responses_text(received: &[u8]) -> String {
    String::from_utf8_lossy(received).into_owned()
}

#[test]
fn cache_serves_a_fresh_hit_without_the_backend() {
    let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut sim = sim_with(
        &cached("  algorithm: round_robin\n"),
        origin("b1", "Cache-Control: max-age=60", n.clone()),
        origin("b2", "Cache-Control: max-age=60", n.clone()),
        1,
    );
    let c = sim.connect_client(CLIENT.parse().unwrap());
    for _ in 0..3 {
        sim.send(c, &get_h("/page", ""));
        sim.run_for(Duration::from_millis(10));
    }
    let text = responses_text(&sim.clients[c].received);
    let resp = parse_responses(&sim.clients[c].received, &[false; 3]);
    assert_eq!(resp.len(), 3, "{text}");
    assert!(resp.iter().all(|r| r.0 == 200));
    assert_eq!(
        n.load(Ordering::SeqCst),
        1,
        "one backend request for three GETs"
    );
    assert_eq!(text.matches("X-Cache: MISS").count(), 1, "{text}");
    assert_eq!(text.matches("X-Cache: HIT").count(), 2, "{text}");
    assert_eq!(
        text.matches("b1 /page").count() + text.matches("b2 /page").count(),
        3
    );
    // After max-age the entry is stale: the next GET goes to a backend again (on a new
    // connection: the first one's keep-alive timeout has passed).
    sim.run_for(Duration::from_secs(61));
    let c2 = sim.connect_client(CLIENT.parse().unwrap());
    sim.send(c2, &get_h("/page", ""));
    sim.run_for(Duration::from_millis(10));
    assert_eq!(n.load(Ordering::SeqCst), 2);
    assert!(responses_text(&sim.clients[c2].received).contains("X-Cache: MISS"));
}

#[test]
fn cache_never_stores_private_or_no_store_or_authorized_answers() {
    for (resp_headers, req_extra) in [
        ("Cache-Control: private, max-age=60", ""),
        ("Cache-Control: no-store", ""),
        ("Cache-Control: max-age=60", "Authorization: Bearer x\r\n"),
        ("Cache-Control: max-age=60", "Cache-Control: no-store\r\n"),
    ] {
        let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let h: &'static str = resp_headers;
        let mut sim = sim_with(
            &cached(""),
            origin("b1", h, n.clone()),
            origin("b2", h, n.clone()),
            1,
        );
        let c = sim.connect_client(CLIENT.parse().unwrap());
        for _ in 0..2 {
            sim.send(c, &get_h("/me", req_extra));
            sim.run_for(Duration::from_millis(10));
        }
        assert_eq!(
            n.load(Ordering::SeqCst),
            2,
            "{resp_headers} / {req_extra}: stored"
        );
        assert!(!responses_text(&sim.clients[c].received).contains("X-Cache: HIT"));
    }
}

#[test]
fn cache_answers_conditional_requests_and_vary_variants() {
    let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hd = "Cache-Control: max-age=60\r\nETag: \"v1\"\r\nVary: Accept-Language";
    let mut sim = sim_with(
        &cached(""),
        origin("b1", hd, n.clone()),
        origin("b2", hd, n.clone()),
        1,
    );
    let c = sim.connect_client(CLIENT.parse().unwrap());
    sim.send(c, &get_h("/doc", "Accept-Language: en\r\n"));
    sim.run_for(Duration::from_millis(10));
    // Same variant, conditional: 304 from the cache.
    sim.send(
        c,
        &get_h("/doc", "Accept-Language: en\r\nIf-None-Match: \"v1\"\r\n"),
    );
    sim.run_for(Duration::from_millis(10));
    // Another variant: a miss.
    sim.send(c, &get_h("/doc", "Accept-Language: fr\r\n"));
    sim.run_for(Duration::from_millis(10));
    let resp = parse_responses(&sim.clients[c].received, &[false; 3]);
    assert_eq!(
        resp.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![200, 304, 200]
    );
    assert_eq!(n.load(Ordering::SeqCst), 2);
}

#[test]
fn unsafe_methods_invalidate_the_cached_target() {
    let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hd = "Cache-Control: max-age=60";
    let mut sim = sim_with(
        &cached(""),
        origin("b1", hd, n.clone()),
        origin("b2", hd, n.clone()),
        1,
    );
    let c = sim.connect_client(CLIENT.parse().unwrap());
    sim.send(c, &get_h("/item", ""));
    sim.run_for(Duration::from_millis(10));
    sim.send(c, &get_h("/item", ""));
    sim.run_for(Duration::from_millis(10));
    assert_eq!(n.load(Ordering::SeqCst), 1);
    sim.send(
        c,
        b"POST /item HTTP/1.1\r\nHost: example.com\r\nContent-Length: 2\r\n\r\nhi",
    );
    sim.run_for(Duration::from_millis(10));
    sim.send(c, &get_h("/item", ""));
    sim.run_for(Duration::from_millis(10));
    assert_eq!(
        n.load(Ordering::SeqCst),
        3,
        "POST went through and the GET after it missed"
    );
}

#[test]
fn stale_entries_are_validated_and_a_304_refreshes_them() {
    let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let conditional = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let behave = |n: Arc<std::sync::atomic::AtomicUsize>,
                  cond: Arc<std::sync::atomic::AtomicUsize>| {
        Behavior::Serve(Box::new(move |r: &SimRequest| {
            n.fetch_add(1, Ordering::SeqCst);
            if r.header("if-none-match") == Some("\"v1\"") {
                cond.fetch_add(1, Ordering::SeqCst);
                let mut rep = Reply::ok(b"");
                rep.status = 304;
                rep.headers
                    .push(("Cache-Control".into(), "max-age=100".into()));
                rep.headers.push(("ETag".into(), "\"v1\"".into()));
                return rep;
            }
            let mut rep = Reply::ok(b"the body");
            rep.headers
                .push(("Cache-Control".into(), "max-age=10".into()));
            rep.headers.push(("ETag".into(), "\"v1\"".into()));
            rep
        }))
    };
    let mut sim = sim_with(
        &cached(""),
        behave(n.clone(), conditional.clone()),
        behave(n.clone(), conditional.clone()),
        1,
    );
    let c = sim.connect_client(CLIENT.parse().unwrap());
    sim.send(c, &get_h("/r", ""));
    sim.run_for(Duration::from_secs(15)); // stale after 10 s
    let c2 = sim.connect_client(CLIENT.parse().unwrap());
    sim.send(c2, &get_h("/r", ""));
    sim.run_for(Duration::from_millis(10));
    let text = responses_text(&sim.clients[c2].received);
    assert!(text.contains("X-Cache: REVALIDATED"), "{text}");
    assert!(
        text.ends_with("the body"),
        "the stored body answers: {text}"
    );
    assert!(text.contains("max-age=100"), "refreshed fields: {text}");
    assert_eq!(conditional.load(Ordering::SeqCst), 1);
    // Fresh again for 100 s: a hit, no backend.
    sim.send(c2, &get_h("/r", ""));
    sim.run_for(Duration::from_millis(10));
    assert_eq!(n.load(Ordering::SeqCst), 2);
    assert_eq!(
        responses_text(&sim.clients[c2].received)
            .matches("X-Cache: HIT")
            .count(),
        1
    );
}

#[test]
fn stale_if_error_serves_the_stored_response_when_backends_are_down() {
    let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hd = "Cache-Control: max-age=5, stale-if-error=600";
    let mut sim = sim_with(
        &cached("  retries: 0\n"),
        origin("b1", hd, n.clone()),
        origin("b2", hd, n.clone()),
        1,
    );
    let c = sim.connect_client(CLIENT.parse().unwrap());
    sim.send(c, &get_h("/s", ""));
    sim.run_for(Duration::from_secs(10));
    sim.kill_backend(B1.parse().unwrap());
    sim.kill_backend(B2.parse().unwrap());
    for i in 0..3 {
        let c = sim.connect_client(CLIENT.parse().unwrap());
        sim.send(c, &get_h("/s", ""));
        sim.run_for(Duration::from_secs(2));
        let text = responses_text(&sim.clients[c].received);
        assert!(text.starts_with("HTTP/1.1 200"), "request {i}: {text}");
        assert!(text.contains("stale-if-error"), "{text}");
    }
    // Without stale-if-error the client sees the error.
    let mut sim = sim_with(
        &cached("  retries: 0\n"),
        origin("b1", "Cache-Control: max-age=5", n.clone()),
        origin("b2", "Cache-Control: max-age=5", n.clone()),
        1,
    );
    let c = sim.connect_client(CLIENT.parse().unwrap());
    sim.send(c, &get_h("/s", ""));
    sim.run_for(Duration::from_secs(10));
    sim.kill_backend(B1.parse().unwrap());
    sim.kill_backend(B2.parse().unwrap());
    let c = sim.connect_client(CLIENT.parse().unwrap());
    sim.send(c, &get_h("/s", ""));
    sim.run_for(Duration::from_secs(2));
    let text = responses_text(&sim.clients[c].received);
    assert!(text.starts_with("HTTP/1.1 50"), "{text}");
}

fn slow_origin(headers: &'static str, hits: Arc<std::sync::atomic::AtomicUsize>) -> Behavior {
    Behavior::Serve(Box::new(move |r: &SimRequest| {
        hits.fetch_add(1, Ordering::SeqCst);
        let mut reply = Reply::ok(format!("body of {}", r.target()).as_bytes());
        reply.delay = Duration::from_millis(50);
        for line in headers.split("\r\n").filter(|l| !l.is_empty()) {
            let (n, v) = line.split_once(": ").unwrap();
            reply.headers.push((n.to_string(), v.to_string()));
        }
        reply
    }))
}

#[test]
fn concurrent_misses_for_one_key_make_one_backend_request() {
    let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hd = "Cache-Control: max-age=60";
    let mut sim = sim_with(
        &cached(""),
        slow_origin(hd, n.clone()),
        slow_origin(hd, n.clone()),
        7,
    );
    let clients: Vec<usize> = (0..100)
        .map(|i| {
            sim.connect_client(
                format!("10.0.{}.{}:4000", i / 200, i % 200 + 1)
                    .parse()
                    .unwrap(),
            )
        })
        .collect();
    for &c in &clients {
        sim.send(c, &get_h("/hot", ""));
    }
    sim.run_for(Duration::from_millis(500));
    assert_eq!(
        n.load(Ordering::SeqCst),
        1,
        "100 concurrent misses, one backend request"
    );
    for &c in &clients {
        let text = responses_text(&sim.clients[c].received);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.ends_with("body of /hot"), "{text}");
    }
    // Responses that may not be stored do not hold the others back for long: every
    // request reaches the backend, all within a few backend round trips.
    let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hd = "Cache-Control: no-store";
    let mut sim = sim_with(
        &cached(""),
        slow_origin(hd, n.clone()),
        slow_origin(hd, n.clone()),
        7,
    );
    let clients: Vec<usize> = (0..20)
        .map(|i| sim.connect_client(format!("10.1.0.{}:4000", i + 1).parse().unwrap()))
        .collect();
    for &c in &clients {
        sim.send(c, &get_h("/private", ""));
    }
    sim.run_for(Duration::from_millis(200));
    assert_eq!(n.load(Ordering::SeqCst), 20);
    assert!(clients
        .iter()
        .all(|&c| responses_text(&sim.clients[c].received).starts_with("HTTP/1.1 200")));
}

#[test]
fn a_waiting_request_goes_itself_after_the_lock_timeout() {
    let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // The leader's backend takes 50 ms; waiters give up after 10 ms.
    let yaml = cached("").replace(
        "cache:\n  size: 1MB\n",
        "cache:\n  size: 1MB\n  lock_timeout: 10ms\n",
    );
    let hd = "Cache-Control: max-age=60";
    let mut sim = sim_with(
        &yaml,
        slow_origin(hd, n.clone()),
        slow_origin(hd, n.clone()),
        7,
    );
    let a = sim.connect_client("10.2.0.1:4000".parse().unwrap());
    let b = sim.connect_client("10.2.0.2:4000".parse().unwrap());
    sim.send(a, &get_h("/k", ""));
    sim.send(b, &get_h("/k", ""));
    sim.run_for(Duration::from_millis(300));
    assert_eq!(n.load(Ordering::SeqCst), 2);
    for c in [a, b] {
        assert!(responses_text(&sim.clients[c].received).starts_with("HTTP/1.1 200"));
    }
}

#[test]
fn stale_while_revalidate_serves_stale_and_queues_one_background_refresh() {
    let now = crate::test_origin();
    let ctx = ctx_from(&cached(""), now);
    let cache = ctx.cache.clone().unwrap();
    let wakes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let w = wakes.clone();
    cache.set_refresher(move || {
        w.fetch_add(1, Ordering::SeqCst);
    });
    let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hd = "Cache-Control: max-age=1, stale-while-revalidate=30\r\nETag: \"v1\"";
    let mut sim = Sim::new(
        ctx.clone(),
        vec![
            (B1.parse().unwrap(), origin("b1", hd, n.clone())),
            (B2.parse().unwrap(), origin("b2", hd, n.clone())),
        ],
        3,
        now,
    );
    let c = sim.connect_client(CLIENT.parse().unwrap());
    sim.send(c, &get_h("/swr", ""));
    sim.run_for(Duration::from_secs(2));
    // Stale within the window: served at once, twice; one refresh queued.
    for _ in 0..2 {
        sim.send(c, &get_h("/swr", ""));
        sim.run_for(Duration::from_millis(5));
    }
    let text = responses_text(&sim.clients[c].received);
    assert_eq!(text.matches("X-Cache: STALE").count(), 2, "{text}");
    assert_eq!(
        n.load(Ordering::SeqCst),
        1,
        "no client waited for the backend"
    );
    assert_eq!(wakes.load(Ordering::SeqCst), 1);
    let job = cache.take_refresh().expect("a refresh");
    assert!(
        cache.take_refresh().is_none(),
        "one refresh per key at a time"
    );
    let req = String::from_utf8_lossy(&job.request).into_owned();
    assert!(req.starts_with("GET /swr HTTP/1.1\r\n"), "{req}");
    assert!(
        req.contains("If-None-Match: \"v1\"\r\n") && req.ends_with("Connection: close\r\n\r\n"),
        "{req}"
    );
    // The fetcher's answer: a 304 makes the entry fresh again.
    let wall = ctx.clock.at(sim.now);
    let what = cache
        .absorb(job, b"HTTP/1.1 304 Not Modified\r\nCache-Control: max-age=60, stale-while-revalidate=30\r\nETag: \"v1\"\r\n\r\n", wall)
        .unwrap();
    assert_eq!(what, "revalidated");
    sim.send(c, &get_h("/swr", ""));
    sim.run_for(Duration::from_millis(5));
    let text = responses_text(&sim.clients[c].received);
    assert_eq!(text.matches("X-Cache: HIT").count(), 1, "{text}");
    // A new body (chunked) replaces the entry.
    sim.run_for(Duration::from_secs(61));
    let c2 = sim.connect_client(CLIENT.parse().unwrap());
    sim.send(c2, &get_h("/swr", ""));
    sim.run_for(Duration::from_millis(5));
    let job = cache.take_refresh().expect("a second refresh");
    let wall = ctx.clock.at(sim.now);
    let what = cache
        .absorb(
            job,
            b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60, stale-while-revalidate=30\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nnew\r\n0\r\n\r\n",
            wall,
        )
        .unwrap();
    assert_eq!(what, "stored");
    sim.send(c2, &get_h("/swr", ""));
    sim.run_for(Duration::from_millis(5));
    let text = responses_text(&sim.clients[c2].received);
    assert!(
        text.ends_with("X-Cache: HIT\r\nCache-Status: trireme; hit\r\n\r\nnew"),
        "{text}"
    );
    // Broken answers are refused, the entry stays.
    sim.run_for(Duration::from_secs(61));
    let c3 = sim.connect_client(CLIENT.parse().unwrap());
    sim.send(c3, &get_h("/swr", ""));
    sim.run_for(Duration::from_millis(5));
    let job = cache.take_refresh().expect("a third refresh");
    let wall = ctx.clock.at(sim.now);
    let cut = b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 10\r\n\r\nabc";
    assert!(cache.absorb(job, cut, wall).is_err());
    sim.send(c3, &get_h("/swr", ""));
    sim.run_for(Duration::from_millis(5));
    let text = responses_text(&sim.clients[c3].received);
    assert!(text.ends_with("new"), "the entry stays: {text}");
}

// ------------------------------------------------------------------ L2 (Redis) lookups

const L2_CFG: &str = "  l2:\n    host: 127.0.0.1\n    port: 6379\n    timeout: 50ms\n";
/// The start of a lookup's first command (`HMGET key v e:`).
const HMGET: &[u8] = b"*4\r\n$5\r\nHMGET\r\n";
/// Redis's answer to it when the key is not there.
const L2_MISS: &[u8] = b"*2\r\n$-1\r\n$-1\r\n";

fn l2_ctx(now: Instant) -> Arc<ProxyContext> {
    let yaml = cached("").replace("  size: 1MB\n", &format!("  size: 1MB\n{L2_CFG}"));
    let ctx = ctx_from(&yaml, now);
    ctx.cache
        .as_ref()
        .unwrap()
        .l2
        .as_ref()
        .unwrap()
        .set_writer(|| {});
    ctx
}

/// Feed a GET for `path`; the session must ask L2 first: return after the GET command.
fn ask_l2(s: &mut Session, pool: &mut BufPool, path: &str, now: Instant) {
    s.reserve_client_in(pool).extend_from_slice(&get(path));
    s.on_client_read(now);
    match s.poll_action() {
        Some(Action::Connect {
            upstream: 1,
            backend: 0,
            addr,
            ..
        }) => assert_eq!(addr, "127.0.0.1:6379".parse().unwrap()),
        other => panic!("expected a connect to Redis, got {other:?}"),
    }
    assert!(s.poll_action().is_none());
    s.on_upstream_connected(s.up_io, true, now);
    let cmd = s.up_out.pending().to_vec();
    assert!(cmd.starts_with(HMGET), "{cmd:?}");
    assert!(cmd.ends_with(
        format!("trireme:GET http://example.com{path}\r\n$1\r\nv\r\n$2\r\ne:\r\n").as_bytes()
    ));
    s.on_upstream_written(s.up_io, cmd.len(), now);
    assert!(s.wants_upstream_read());
}

/// A failed lookup: the Redis connection is closed and the request goes to the backend.
fn assert_falls_through_to_the_backend(s: &mut Session) {
    assert_l2_released_then_backend(s, Some(false));
}

/// The lookup ended: the Redis connection goes back (pooled when `reuse` says so; either
/// way when `None`) and the request goes to the backend.
fn assert_l2_released_then_backend(s: &mut Session, reuse: Option<bool>) {
    match s.poll_action() {
        Some(Action::ReleaseUpstream {
            upstream: 1,
            reuse: r,
            ..
        }) => assert!(reuse.is_none_or(|want| want == r), "reuse {r}"),
        other => panic!("expected the Redis connection released, got {other:?}"),
    }
    assert!(matches!(
        s.poll_action(),
        Some(Action::Connect { upstream: 0, .. })
    ));
}

#[test]
fn l2_miss_goes_to_the_backend_and_the_stored_response_is_queued_for_l2() {
    let now = crate::test_origin();
    let ctx = l2_ctx(now);
    let mut pool = BufPool::default();
    let mut s = Session::new(ctx.clone(), CLIENT.parse().unwrap(), now);
    ask_l2(&mut s, &mut pool, "/x", now);
    s.reserve_up_in(&mut pool).extend_from_slice(L2_MISS);
    s.on_upstream_read(s.up_io, now);
    assert!(matches!(
        s.poll_action(),
        Some(Action::ReleaseUpstream {
            upstream: 1,
            backend: 0,
            reuse: true,
            ..
        })
    ));
    assert!(matches!(
        s.poll_action(),
        Some(Action::Connect { upstream: 0, .. })
    ));
    s.on_upstream_connected(s.up_io, false, now);
    let head = String::from_utf8_lossy(s.up_out.pending()).into_owned();
    assert!(head.starts_with("GET /x HTTP/1.1\r\n"), "{head}");
    let n = s.up_out.len();
    s.on_upstream_written(s.up_io, n, now);
    s.reserve_up_in(&mut pool).extend_from_slice(
        b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 5\r\n\r\nhello",
    );
    s.on_upstream_read(s.up_io, now);
    let out = String::from_utf8_lossy(s.conn.output.pending()).into_owned();
    assert!(
        out.contains("X-Cache: MISS") && out.ends_with("hello"),
        "{out}"
    );
    let cache = ctx.cache.as_ref().unwrap();
    let l2 = cache.l2.as_ref().unwrap();
    assert_eq!(l2.stats.misses.load(Ordering::Relaxed), 1);
    match l2.take_op() {
        Some(crate::cache::l2::L2Op::Set { key, entry }) => {
            assert_eq!(key, b"GET http://example.com/x");
            assert_eq!(&entry.body[..], b"hello");
        }
        other => panic!("{other:?}"),
    }
    // Counted once as a request.
    assert_eq!(ctx.metrics.requests.load(Ordering::Relaxed), 1);
}

/// Redis's reply to a GET: an entry (`max-age=60`, ETag "e") as another instance wrote it.
fn l2_hit_reply(body: &'static [u8]) -> Vec<u8> {
    hmget_hit(&l2_entry(body, "", b""))
}

/// HMGET's answer for an encoded entry without `Vary`: an empty `v`, then the entry.
fn hmget_hit(enc: &[u8]) -> Vec<u8> {
    let mut reply = b"*2\r\n$0\r\n\r\n".to_vec();
    reply.extend_from_slice(&resp_bulk(enc));
    reply
}

/// A RESP bulk string.
fn resp_bulk(b: &[u8]) -> Vec<u8> {
    let mut r = format!("${}\r\n", b.len()).into_bytes();
    r.extend_from_slice(b);
    r.extend_from_slice(b"\r\n");
    r
}

/// The lookup answered: the Redis connection goes back to the pool, no backend is asked,
/// and the answer is queued for the client (returned).
fn assert_answered_from_l2(s: &mut Session) -> String {
    assert!(matches!(
        s.poll_action(),
        Some(Action::ReleaseUpstream {
            upstream: 1,
            reuse: true,
            ..
        })
    ));
    assert!(s.poll_action().is_none(), "no backend connection");
    String::from_utf8_lossy(s.conn.output.pending()).into_owned()
}

/// An entry as L2 holds it, with `Vary: vary` (when not empty) and the secondary key of
/// the request that fetched it.
fn l2_entry(body: &'static [u8], vary: &str, secondary: &[u8]) -> Vec<u8> {
    l2_entry_at(body, vary, secondary, "max-age=60", crate::test_wall())
}

/// [`l2_entry`] with this `Cache-Control`, received from the origin at `wall`.
fn l2_entry_at(
    body: &'static [u8],
    vary: &str,
    secondary: &[u8],
    cc: &str,
    wall: std::time::SystemTime,
) -> Vec<u8> {
    let vary_line = if vary.is_empty() {
        String::new()
    } else {
        format!("Vary: {vary}\r\n")
    };
    let whole = format!("HTTP/1.1 200 OK\r\nCache-Control: {cc}\r\nETag: \"e\"\r\n{vary_line}\r\n");
    let whole = whole.as_bytes();
    let h = match head::parse_response(whole, 4096) {
        Ok(Parsed::Complete(h)) => h,
        _ => unreachable!(),
    };
    let entry = Stored {
        head: bytes::Bytes::copy_from_slice(&whole[..whole.len() - 2]),
        body: bytes::Bytes::from_static(body),
        facts: crate::cache::http::response_facts(&h, whole, wall, wall),
        etag: Some(bytes::Bytes::from_static(b"\"e\"")),
        vary: bytes::Bytes::copy_from_slice(vary.as_bytes()),
        secondary: secondary.to_vec(),
        demand: Default::default(),
    };
    let mut enc = Vec::new();
    crate::cache::l2::encode_entry(&entry, &mut enc);
    enc
}

#[test]
fn l2_variants_by_vary_take_a_second_step_for_the_requests_one() {
    let now = crate::test_origin();
    let ctx = l2_ctx(now);
    let l2 = ctx.cache.as_ref().unwrap().l2.as_ref().unwrap();
    let mut pool = BufPool::default();
    let lookup = |s: &mut Session, pool: &mut BufPool, encoding: &str| {
        s.reserve_client_in(pool)
            .extend_from_slice(&get_h("/v", &format!("Accept-Encoding: {encoding}\r\n")));
        s.on_client_read(now);
        assert!(matches!(
            s.poll_action(),
            Some(Action::Connect { upstream: 1, .. })
        ));
        s.on_upstream_connected(s.up_io, true, now);
        let n = s.up_out.len();
        s.on_upstream_written(s.up_io, n, now);
        // The key's responses vary by Accept-Encoding (the `e:` field is absent).
        s.reserve_up_in(pool)
            .extend_from_slice(b"*2\r\n$15\r\nAccept-Encoding\r\n$-1\r\n");
        s.on_upstream_read(s.up_io, now);
        assert!(s.poll_action().is_none(), "still asking Redis");
        let cmd = String::from_utf8_lossy(s.up_out.pending()).into_owned();
        let n = s.up_out.len();
        s.on_upstream_written(s.up_io, n, now);
        cmd
    };
    // A variant Redis holds: one more round trip, then an L2 hit.
    let mut s = Session::new(ctx.clone(), CLIENT.parse().unwrap(), now);
    let cmd = lookup(&mut s, &mut pool, "br");
    assert_eq!(
        cmd,
        "*3\r\n$4\r\nHGET\r\n$32\r\ntrireme:GET http://example.com/v\r\n$21\r\ne:accept-encoding:br\n\r\n"
    );
    let enc = l2_entry(b"brotli", "Accept-Encoding", b"accept-encoding:br\n");
    s.reserve_up_in(&mut pool)
        .extend_from_slice(&resp_bulk(&enc));
    s.on_upstream_read(s.up_io, now);
    let out = assert_answered_from_l2(&mut s);
    assert!(
        out.contains("Cache-Status: trireme; hit; detail=l2") && out.ends_with("brotli"),
        "{out}"
    );
    // A variant it does not hold: a miss after the second step, on to the backend.
    let mut s2 = Session::new(ctx.clone(), CLIENT.parse().unwrap(), now);
    let cmd = lookup(&mut s2, &mut pool, "gzip");
    assert!(cmd.ends_with("e:accept-encoding:gzip\n\r\n"), "{cmd:?}");
    s2.reserve_up_in(&mut pool).extend_from_slice(b"$-1\r\n");
    s2.on_upstream_read(s2.up_io, now);
    assert_l2_released_then_backend(&mut s2, Some(true));
    assert_eq!(l2.stats.hits.load(Ordering::Relaxed), 1);
    assert_eq!(l2.stats.misses.load(Ordering::Relaxed), 1);
    assert_eq!(l2.stats.errors.load(Ordering::Relaxed), 0);
}

#[test]
fn l2_hit_for_a_key_invalidated_meanwhile_is_not_used() {
    let now = crate::test_origin();
    // Here (a POST queued its deletion) or by another instance (Redis deleted it, then
    // its message came), while the GET was on its way: the reply still holds the entry.
    for peer in [false, true] {
        let ctx = l2_ctx(now);
        let cache = ctx.cache.as_ref().unwrap();
        let l2 = cache.l2.as_ref().unwrap();
        let mut pool = BufPool::default();
        let mut s = Session::new(ctx.clone(), CLIENT.parse().unwrap(), now);
        ask_l2(&mut s, &mut pool, "/gone/x", now);
        if peer {
            assert_eq!(
                cache.invalidate_from_peer(b"GET http://example.com/gone/", true),
                0
            );
        } else {
            l2.queue_delete(b"GET http://example.com/gone/x", false);
        }
        s.reserve_up_in(&mut pool)
            .extend_from_slice(&l2_hit_reply(b"old"));
        s.on_upstream_read(s.up_io, now);
        assert_l2_released_then_backend(&mut s, None);
        assert!(s.conn.output.is_empty());
        assert_eq!(l2.stats.hits.load(Ordering::Relaxed), 0);
        assert_eq!(cache.store.len(), 0, "not filled into L1 (peer: {peer})");
        assert_eq!(
            l2.stats.peer_invalidations.load(Ordering::Relaxed),
            peer as u64
        );
        // A peer's deletion is done in Redis already: nothing for this writer.
        assert_eq!(l2.take_op().is_some(), !peer);
    }
}

/// An entry as an L2 lookup reads it.
fn l2_stored(l2: &crate::cache::l2::L2, body: &'static [u8]) -> Stored {
    let mut b = bytes::BytesMut::from(&l2_hit_reply(body)[..]);
    match l2.parse_get_reply(&mut b) {
        Ok(Some(crate::cache::l2::Reply::Hit(e))) => *e,
        other => panic!("{other:?}"),
    }
}

#[test]
fn purge_of_one_url_deletes_exactly_its_keys_in_l1_and_l2() {
    let now = crate::test_origin();
    for key_headers in [false, true] {
        let yaml = cached("").replace("  size: 1MB\n", &format!("  size: 1MB\n{L2_CFG}"));
        let yaml = if key_headers {
            yaml.replace("cache:\n", "cache:\n  key_headers: [X-Tenant]\n")
        } else {
            yaml
        };
        let ctx = ctx_from(&yaml, now);
        let cache = ctx.cache.as_ref().unwrap();
        let l2 = cache.l2.as_ref().unwrap();
        l2.set_writer(|| {});
        let ext: &[u8] = if key_headers {
            b"\0x-tenant=t1,\n"
        } else {
            b""
        };
        for path in ["/a", "/ab"] {
            let key = [format!("GET http://example.com{path}").as_bytes(), ext].concat();
            assert!(cache.fill_from_l2(&key, l2_stored(l2, b"e"), l2.generation()));
        }
        assert_eq!(
            cache.purge("http://example.com/a", false),
            Ok(1),
            "/ab stays"
        );
        assert_eq!(cache.store.len(), 1);
        match l2.take_op() {
            Some(crate::cache::l2::L2Op::Delete { key, prefix }) => {
                // Without key headers the URL is one key; with them, its extended forms.
                assert_eq!(prefix, key_headers);
                let want: &[u8] = if key_headers {
                    b"GET http://example.com/a\0"
                } else {
                    b"GET http://example.com/a"
                };
                assert_eq!(key, want);
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn peer_invalidation_drops_l1_entries_and_a_racing_fill() {
    let now = crate::test_origin();
    let ctx = l2_ctx(now);
    let cache = ctx.cache.as_ref().unwrap();
    let l2 = cache.l2.as_ref().unwrap();
    let g = l2.generation();
    assert!(cache.fill_from_l2(b"GET http://example.com/a", l2_stored(l2, b"a"), g));
    assert!(cache.fill_from_l2(b"GET http://example.com/ab", l2_stored(l2, b"ab"), g));
    assert!(cache.fill_from_l2(b"GET http://example.com/b", l2_stored(l2, b"b"), g));
    assert_eq!(cache.store.len(), 3);
    // Exact: only that key.
    assert_eq!(
        cache.invalidate_from_peer(b"GET http://example.com/a", false),
        1
    );
    assert_eq!(cache.store.len(), 2);
    // A fill by a lookup that started before the invalidation is dropped again.
    assert!(!cache.fill_from_l2(b"GET http://example.com/a", l2_stored(l2, b"a"), g));
    assert_eq!(cache.store.len(), 2);
    // Prefix.
    assert_eq!(
        cache.invalidate_from_peer(b"GET http://example.com/", true),
        2
    );
    assert_eq!(cache.store.len(), 0);
}

#[test]
fn an_aged_l1_entry_is_refreshed_from_l2_when_another_instance_has_a_newer_one() {
    let t0 = crate::test_origin();
    let wall0 = crate::test_wall();
    for (cc, l2_newer, asks_l2, from_l2) in [
        // Aged out; Redis has a copy another instance refreshed 10 s ago: answered from it.
        ("max-age=60", true, true, true),
        // Aged out; Redis has the same copy: validated with the origin.
        ("max-age=60", false, true, false),
        // Validated on every use: a copy from Redis would not do, so it is not asked.
        ("no-cache", true, false, false),
    ] {
        let ctx = l2_ctx(t0);
        let cache = ctx.cache.as_ref().unwrap();
        let l2 = cache.l2.as_ref().unwrap();
        // L1 holds what it stored at t0.
        let mut b = bytes::BytesMut::from(&hmget_hit(&l2_entry_at(b"old", "", b"", cc, wall0))[..]);
        let Ok(Some(crate::cache::l2::Reply::Hit(old))) = l2.parse_get_reply(&mut b) else {
            panic!()
        };
        assert!(cache.fill_from_l2(b"GET http://example.com/r", *old, l2.generation()));
        let later = t0 + Duration::from_secs(100);
        let mut pool = BufPool::default();
        let mut s = Session::new(ctx.clone(), CLIENT.parse().unwrap(), later);
        s.reserve_client_in(&mut pool).extend_from_slice(&get("/r"));
        s.on_client_read(later);
        let Some(Action::Connect { upstream, .. }) = s.poll_action() else {
            panic!("{cc}: a connection")
        };
        assert_eq!(upstream == 1, asks_l2, "{cc}: L2 asked");
        if !asks_l2 {
            continue;
        }
        s.on_upstream_connected(s.up_io, true, later);
        let n = s.up_out.len();
        s.on_upstream_written(s.up_io, n, later);
        let at = if l2_newer {
            wall0 + Duration::from_secs(90)
        } else {
            wall0
        };
        s.reserve_up_in(&mut pool)
            .extend_from_slice(&hmget_hit(&l2_entry_at(b"new", "", b"", cc, at)));
        s.on_upstream_read(s.up_io, later);
        assert!(matches!(
            s.poll_action(),
            Some(Action::ReleaseUpstream { upstream: 1, .. })
        ));
        if from_l2 {
            assert!(s.poll_action().is_none(), "no backend connection");
            let out = String::from_utf8_lossy(s.conn.output.pending()).into_owned();
            assert!(
                out.contains("detail=l2") && out.contains("Age: 10\r\n") && out.ends_with("new"),
                "{out}"
            );
        } else {
            assert!(matches!(
                s.poll_action(),
                Some(Action::Connect { upstream: 0, .. })
            ));
            s.on_upstream_connected(s.up_io, true, later);
            let head = String::from_utf8_lossy(s.up_out.pending()).into_owned();
            assert!(
                head.contains("If-None-Match: \"e\"\r\n"),
                "validates L1's entry: {head}"
            );
        }
    }
}

/// Three pipelined GETs on a new session of a body of `len` bytes that L1 holds (filled
/// from L2), read: the context, the session, its pool and the body.
fn three_pipelined_hits(
    len: usize,
    now: Instant,
) -> (Arc<ProxyContext>, Session, BufPool, &'static [u8]) {
    let yaml = cached("").replace("  size: 1MB\n", &format!("  size: 16MB\n{L2_CFG}"));
    let ctx = ctx_from(&yaml, now);
    let cache = ctx.cache.as_ref().unwrap();
    let l2 = cache.l2.as_ref().unwrap();
    let body: &'static [u8] = Box::leak(vec![b'x'; len].into_boxed_slice());
    let mut b = bytes::BytesMut::from(&l2_hit_reply(body)[..]);
    let Ok(Some(crate::cache::l2::Reply::Hit(e))) = l2.parse_get_reply(&mut b) else {
        panic!()
    };
    assert!(cache.fill_from_l2(b"GET http://example.com/big", *e, l2.generation()));
    let mut pool = BufPool::default();
    let mut s = Session::new(ctx.clone(), CLIENT.parse().unwrap(), now);
    s.reserve_client_in(&mut pool)
        .extend_from_slice(&get("/big").repeat(3));
    s.on_client_read(now);
    (ctx, s, pool, body)
}

#[test]
fn pipelined_hits_wait_for_the_output_and_a_half_close_still_gets_them_all() {
    let now = crate::test_origin();
    let (ctx, mut s, _pool, body) = three_pipelined_hits(100_000, now);
    let cache = ctx.cache.as_ref().unwrap();
    s.on_client_eof(now);
    // One answer at a time: the next waits until the output drained below the mark.
    let mut sent = Vec::new();
    while !s.conn.output.is_empty() {
        let pending = s.conn.output.pending_parts();
        assert!(pending.0.len() + pending.1.len() < HIGH_WATER + body.len() + 512);
        assert!(!s.wants_close(), "not flushed yet");
        // The client takes 16 KiB at a time.
        let n = s.conn.output.pending().len().min(16 * 1024);
        sent.extend_from_slice(&s.conn.output.pending()[..n]);
        s.on_client_written(n, now);
    }
    let answers = sent.windows(15).filter(|w| w == b"HTTP/1.1 200 OK").count();
    assert_eq!(answers, 3);
    assert!(sent.len() > 3 * body.len(), "three whole bodies");
    assert!(s.wants_close(), "closes after the last answer");
    assert_eq!(cache.stats.hits.load(Ordering::Relaxed), 3);
}

/// Pipelined hits of a stored body: every answer's body goes out from the store itself,
/// the second and third too (the output used to copy every shared body but the first, and
/// any shared body bytes were queued after), and a lend (io_uring) takes them all uncopied.
#[test]
fn pipelined_hits_share_every_stored_body() {
    let now = crate::test_origin();
    let (ctx, mut s, mut pool, body) = three_pipelined_hits(3000, now);
    let cache = ctx.cache.as_ref().unwrap();
    let bodies = |c: &[&[u8]]| -> Vec<*const u8> {
        c.iter()
            .filter(|p| p.len() == body.len())
            .map(|p| p.as_ptr())
            .collect()
    };
    let mut c: [&[u8]; 8] = [&[]; 8];
    let n = s.conn.output.chunks(&mut c);
    let shared = bodies(&c[..n]);
    assert_eq!(n, 6, "head, body, three times");
    assert_eq!(shared.len(), 3, "three bodies");
    assert!(
        shared.iter().all(|&p| p == shared[0]),
        "all three are the stored body, not copies"
    );
    let stored = shared[0];
    let lent = s.conn.output.lend(pool.out_buf());
    let mut c: [&[u8]; 8] = [&[]; 8];
    let n = lent.chunks(&mut c);
    assert_eq!(bodies(&c[..n]), vec![stored; 3], "lent uncopied");
    let total = lent.len();
    pool.put_out(s.conn.output.unlend(lent));
    s.on_client_written(total, now);
    assert!(s.conn.output.is_empty());
    assert_eq!(cache.stats.hits.load(Ordering::Relaxed), 3);
}

#[test]
fn l2_hit_fills_l1_and_answers_without_the_backend() {
    let now = crate::test_origin();
    let reply = l2_hit_reply(b"from redis");

    let ctx = l2_ctx(now);
    let mut pool = BufPool::default();
    let mut s = Session::new(ctx.clone(), CLIENT.parse().unwrap(), now);
    let later = now + Duration::from_secs(3);
    ask_l2(&mut s, &mut pool, "/y", later);
    // The reply arrives in two reads.
    let (a, b) = reply.split_at(reply.len() / 2);
    s.reserve_up_in(&mut pool).extend_from_slice(a);
    s.on_upstream_read(s.up_io, later);
    assert!(s.poll_action().is_none() && s.conn.output.is_empty());
    s.reserve_up_in(&mut pool).extend_from_slice(b);
    s.on_upstream_read(s.up_io, later);
    let out = assert_answered_from_l2(&mut s);
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(
        out.contains("Cache-Status: trireme; hit; detail=l2"),
        "{out}"
    );
    assert!(
        out.contains("Age: 3\r\n"),
        "aged since it was stored: {out}"
    );
    assert!(out.ends_with("from redis"), "{out}");
    let n = s.conn.output.len();
    s.on_client_written(n, later);
    // L1 has it now: the next request is a plain L1 hit.
    s.reserve_client_in(&mut pool).extend_from_slice(&get("/y"));
    s.on_client_read(later);
    assert!(s.poll_action().is_none());
    let out = String::from_utf8_lossy(s.conn.output.pending()).into_owned();
    assert!(out.contains("Cache-Status: trireme; hit\r\n"), "{out}");
    let l2 = ctx.cache.as_ref().unwrap().l2.as_ref().unwrap();
    assert_eq!(l2.stats.hits.load(Ordering::Relaxed), 1);
    assert!(l2.take_op().is_none(), "an L2 fill is not written back");
    assert_eq!(ctx.metrics.requests.load(Ordering::Relaxed), 2);
}

#[test]
fn l2_timeout_or_garbage_falls_through_to_the_backend_and_backs_off() {
    let now = crate::test_origin();
    let ctx = l2_ctx(now);
    let mut pool = BufPool::default();
    let mut s = Session::new(ctx.clone(), CLIENT.parse().unwrap(), now);
    ask_l2(&mut s, &mut pool, "/slow", now);
    let d = s.deadline().expect("armed");
    assert_eq!(d, now + Duration::from_millis(50));
    s.on_timeout(d);
    assert!(matches!(
        s.poll_action(),
        Some(Action::ReleaseUpstream {
            upstream: 1,
            backend: 0,
            reuse: false,
            ..
        })
    ));
    assert!(matches!(
        s.poll_action(),
        Some(Action::Connect { upstream: 0, .. })
    ));
    let l2 = ctx.cache.as_ref().unwrap().l2.as_ref().unwrap();
    assert_eq!(l2.stats.errors.load(Ordering::Relaxed), 1);
    // Within the back-off another connection's miss does not ask L2.
    let mut s2 = Session::new(ctx.clone(), CLIENT.parse().unwrap(), d);
    s2.reserve_client_in(&mut pool)
        .extend_from_slice(&get("/other"));
    s2.on_client_read(d);
    assert!(matches!(
        s2.poll_action(),
        Some(Action::Connect { upstream: 0, .. })
    ));
    assert_eq!(l2.stats.skipped.load(Ordering::Relaxed), 1);
    // After it, a garbage reply (another application's value) is a failure too.
    let t = d + crate::cache::l2::BACKOFF;
    let mut s3 = Session::new(ctx.clone(), CLIENT.parse().unwrap(), t);
    ask_l2(&mut s3, &mut pool, "/g", t);
    s3.reserve_up_in(&mut pool)
        .extend_from_slice(b"*2\r\n$0\r\n\r\n$5\r\nhello\r\n");
    s3.on_upstream_read(s3.up_io, t);
    assert_falls_through_to_the_backend(&mut s3);
    assert_eq!(l2.stats.errors.load(Ordering::Relaxed), 2);
}

#[test]
fn client_half_close_during_l2_lookup_still_gets_its_answer() {
    let now = crate::test_origin();
    let ctx = l2_ctx(now);
    let mut pool = BufPool::default();
    let mut s = Session::new(ctx, CLIENT.parse().unwrap(), now);
    ask_l2(&mut s, &mut pool, "/h", now);
    s.on_client_eof(now);
    assert!(!s.wants_close());
    s.reserve_up_in(&mut pool).extend_from_slice(L2_MISS);
    s.on_upstream_read(s.up_io, now);
    assert!(matches!(
        s.poll_action(),
        Some(Action::ReleaseUpstream { .. })
    ));
    assert!(matches!(s.poll_action(), Some(Action::Connect { .. })));
    s.on_upstream_connected(s.up_io, false, now);
    let n = s.up_out.len();
    s.on_upstream_written(s.up_io, n, now);
    s.reserve_up_in(&mut pool)
        .extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    s.on_upstream_read(s.up_io, now);
    let out = String::from_utf8_lossy(s.conn.output.pending()).into_owned();
    assert!(
        out.contains("Connection: close") && out.ends_with("ok"),
        "{out}"
    );
    let n = s.conn.output.len();
    s.on_client_written(n, now);
    assert!(s.wants_close());
}

// ------------------------------------------------------------------ collapsed forwarding

/// Session `lead` fetches `path`; the backend has sent the head and `part` of the body.
fn lead_fetch(
    ctx: &Arc<ProxyContext>,
    pool: &mut BufPool,
    path: &str,
    head: &str,
    part: &[u8],
    now: Instant,
) -> Session {
    let mut s = Session::new(ctx.clone(), CLIENT.parse().unwrap(), now);
    s.reserve_client_in(pool).extend_from_slice(&get(path));
    s.on_client_read(now);
    assert!(matches!(s.poll_action(), Some(Action::Connect { .. })));
    s.on_upstream_connected(s.up_io, false, now);
    let n = s.up_out.len();
    s.on_upstream_written(s.up_io, n, now);
    s.reserve_up_in(pool).extend_from_slice(head.as_bytes());
    s.reserve_up_in(pool).extend_from_slice(part);
    s.on_upstream_read(s.up_io, now);
    s
}

#[test]
fn waiters_stream_the_lead_fetch_as_it_arrives() {
    let now = crate::test_origin();
    let ctx = ctx_from(&cached(""), now);
    let mut pool = BufPool::default();
    let head =
        "HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nETag: \"x\"\r\nContent-Length: 10\r\n\r\n";
    let mut lead = lead_fetch(&ctx, &mut pool, "/f", head, b"hello", now);
    // A second request for the key: the head and what arrived so far, no backend.
    let mut f = Session::new(ctx.clone(), CLIENT.parse().unwrap(), now);
    f.reserve_client_in(&mut pool).extend_from_slice(&get("/f"));
    f.on_client_read(now);
    assert!(f.poll_action().is_none(), "no backend connection");
    let out = String::from_utf8_lossy(f.conn.output.pending()).into_owned();
    assert!(
        out.contains("Cache-Status: trireme; fwd=miss; collapsed\r\n"),
        "{out}"
    );
    assert!(
        out.contains("Content-Length: 10\r\n") && out.ends_with("\r\n\r\nhello"),
        "{out}"
    );
    let n = f.conn.output.len();
    f.on_client_written(n, now);
    // A conditional request waits for the entry instead.
    let mut c = Session::new(ctx.clone(), CLIENT.parse().unwrap(), now);
    c.reserve_client_in(&mut pool)
        .extend_from_slice(&get_h("/f", "If-None-Match: \"x\"\r\n"));
    c.on_client_read(now);
    assert!(c.conn.output.is_empty() && c.poll_action().is_none());
    // The rest arrives: the follower's next look completes it; the waiter gets its 304.
    lead.reserve_up_in(&mut pool).extend_from_slice(b"world");
    lead.on_upstream_read(lead.up_io, now);
    let t = f.deadline().expect("polling");
    assert!(t <= now + crate::cache::http::WAIT_POLL);
    f.on_timeout(t);
    assert_eq!(f.conn.output.pending(), b"world");
    let n = f.conn.output.len();
    f.on_client_written(n, t);
    assert!(!f.wants_close());
    assert_eq!(f.deadline(), Some(t + ctx.keep_alive_timeout), "idle again");
    c.on_timeout(c.deadline().unwrap());
    assert!(String::from_utf8_lossy(c.conn.output.pending()).starts_with("HTTP/1.1 304"));
}

#[test]
fn followers_are_cut_off_when_the_lead_fetch_fails() {
    let now = crate::test_origin();
    let ctx = ctx_from(&cached(""), now);
    let mut pool = BufPool::default();
    let head = "HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 10\r\n\r\n";
    let mut lead = lead_fetch(&ctx, &mut pool, "/g", head, b"hel", now);
    let mut f = Session::new(ctx.clone(), CLIENT.parse().unwrap(), now);
    f.reserve_client_in(&mut pool).extend_from_slice(&get("/g"));
    f.on_client_read(now);
    assert!(String::from_utf8_lossy(f.conn.output.pending()).ends_with("hel"));
    let n = f.conn.output.len();
    f.on_client_written(n, now);
    // The backend dies mid-body. Nothing reached the lead's client yet: it gets a 502 in
    // place of the queued head. The follower already has part of the body: cut off.
    lead.on_upstream_eof(lead.up_io, true, now);
    let text = String::from_utf8_lossy(lead.conn.output.pending()).into_owned();
    assert!(
        text.starts_with("HTTP/1.1 502 ") && !text.contains("hel"),
        "{text}"
    );
    let t = f.deadline().unwrap();
    f.on_timeout(t);
    assert!(
        f.wants_close(),
        "a response that cannot complete is cut off"
    );
    assert!(f.conn.output.is_empty());
    // Nothing was stored: the next request fetches again.
    let mut again = Session::new(ctx.clone(), CLIENT.parse().unwrap(), t);
    again
        .reserve_client_in(&mut pool)
        .extend_from_slice(&get("/g"));
    again.on_client_read(t);
    assert!(matches!(again.poll_action(), Some(Action::Connect { .. })));
}

#[test]
fn other_vary_variants_and_unknown_lengths_are_not_streamed() {
    let now = crate::test_origin();
    let ctx = ctx_from(&cached(""), now);
    let mut pool = BufPool::default();
    let head = "HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nVary: Accept-Language\r\nContent-Length: 4\r\n\r\n";
    let mut lead = Session::new(ctx.clone(), CLIENT.parse().unwrap(), now);
    lead.reserve_client_in(&mut pool)
        .extend_from_slice(&get_h("/v", "Accept-Language: fr\r\n"));
    lead.on_client_read(now);
    assert!(matches!(lead.poll_action(), Some(Action::Connect { .. })));
    lead.on_upstream_connected(lead.up_io, false, now);
    let n = lead.up_out.len();
    lead.on_upstream_written(lead.up_io, n, now);
    lead.reserve_up_in(&mut pool)
        .extend_from_slice(head.as_bytes());
    lead.on_upstream_read(lead.up_io, now);
    // Another language waits (then fetches its own variant); the same one streams.
    let mut de = Session::new(ctx.clone(), CLIENT.parse().unwrap(), now);
    de.reserve_client_in(&mut pool)
        .extend_from_slice(&get_h("/v", "Accept-Language: de\r\n"));
    de.on_client_read(now);
    assert!(de.conn.output.is_empty());
    let mut fr = Session::new(ctx.clone(), CLIENT.parse().unwrap(), now);
    fr.reserve_client_in(&mut pool)
        .extend_from_slice(&get_h("/v", "Accept-Language: fr\r\n"));
    fr.on_client_read(now);
    assert!(String::from_utf8_lossy(fr.conn.output.pending()).contains("collapsed"));
    // Chunked (length unknown until the end): waiters wait for the entry.
    let chunked =
        "HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nTransfer-Encoding: chunked\r\n\r\n";
    let _lead2 = lead_fetch(&ctx, &mut pool, "/c", chunked, b"3\r\nabc\r\n", now);
    let mut w = Session::new(ctx.clone(), CLIENT.parse().unwrap(), now);
    w.reserve_client_in(&mut pool).extend_from_slice(&get("/c"));
    w.on_client_read(now);
    assert!(w.conn.output.is_empty() && w.poll_action().is_none());
}

#[test]
fn l2_new_connections_log_in_first_and_reused_ones_do_not() {
    let now = crate::test_origin();
    let yaml = cached("").replace(
        "  size: 1MB\n",
        &format!("  size: 1MB\n{L2_CFG}    username: edge\n    password: pw\n    db: 2\n"),
    );
    let ctx = ctx_from(&yaml, now);
    let mut pool = BufPool::default();
    let mut s = Session::new(ctx.clone(), CLIENT.parse().unwrap(), now);
    s.reserve_client_in(&mut pool).extend_from_slice(&get("/a"));
    s.on_client_read(now);
    assert!(matches!(
        s.poll_action(),
        Some(Action::Connect { upstream: 1, .. })
    ));
    s.on_upstream_connected(s.up_io, false, now);
    let cmds = String::from_utf8_lossy(s.up_out.pending()).into_owned();
    assert!(
        cmds.starts_with("*3\r\n$4\r\nAUTH\r\n$4\r\nedge\r\n$2\r\npw\r\n*2\r\n$6\r\nSELECT\r\n$1\r\n2\r\n*4\r\n$5\r\nHMGET\r\n"),
        "{cmds:?}"
    );
    let n = s.up_out.len();
    s.on_upstream_written(s.up_io, n, now);
    // The replies arrive piecemeal: +OK, +OK, then the miss.
    for piece in [
        &b"+O"[..],
        b"K\r\n+OK\r",
        b"\n*2\r\n$-",
        b"1\r\n$-1",
        b"\r\n",
    ] {
        assert!(s.poll_action().is_none());
        s.reserve_up_in(&mut pool).extend_from_slice(piece);
        s.on_upstream_read(s.up_io, now);
    }
    assert_l2_released_then_backend(&mut s, Some(true));
    // A pooled connection is logged in already: just the lookup.
    let mut s2 = Session::new(ctx.clone(), CLIENT.parse().unwrap(), now);
    s2.reserve_client_in(&mut pool)
        .extend_from_slice(&get("/b"));
    s2.on_client_read(now);
    assert!(matches!(s2.poll_action(), Some(Action::Connect { .. })));
    s2.on_upstream_connected(s2.up_io, true, now);
    assert!(s2.up_out.pending().starts_with(HMGET));
    // A refused login is a failed lookup: the backend answers.
    let mut s3 = Session::new(ctx.clone(), CLIENT.parse().unwrap(), now);
    s3.reserve_client_in(&mut pool)
        .extend_from_slice(&get("/c"));
    s3.on_client_read(now);
    assert!(matches!(s3.poll_action(), Some(Action::Connect { .. })));
    s3.on_upstream_connected(s3.up_io, false, now);
    s3.reserve_up_in(&mut pool)
        .extend_from_slice(b"-WRONGPASS invalid username-password pair\r\n");
    s3.on_upstream_read(s3.up_io, now);
    assert_falls_through_to_the_backend(&mut s3);
    let l2 = ctx.cache.as_ref().unwrap().l2.as_ref().unwrap();
    assert_eq!(l2.stats.errors.load(Ordering::Relaxed), 1);
}

#[test]
fn concurrent_requests_for_one_key_all_get_the_whole_response_as_it_drips_in() {
    const LEN: usize = 60_000;
    let body: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
    let mut streamed = 0;
    for seed in 1..25u64 {
        let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (b, n2) = (body.clone(), n.clone());
        let origin = move || -> Behavior {
            let (b, n2) = (b.clone(), n2.clone());
            Behavior::Serve(Box::new(move |_r: &SimRequest| {
                n2.fetch_add(1, Ordering::SeqCst);
                let mut reply = Reply::ok(&b);
                reply
                    .headers
                    .push(("Cache-Control".into(), "max-age=60".into()));
                reply.headers.push(("ETag".into(), "\"v\"".into()));
                reply.drip = Duration::from_micros(700);
                reply
            }))
        };
        let mut sim = sim_with(&cached(""), origin(), origin(), seed);
        sim.max_piece = 500 + (seed as usize * 977) % 6000;
        // GETs, HEADs and conditional GETs, arriving over the first few milliseconds.
        let kinds: Vec<u8> = (0..12).map(|i| ((i as u64 * 7 + seed) % 4) as u8).collect();
        let mut clients = Vec::new();
        for (i, &k) in kinds.iter().enumerate() {
            let c = sim.connect_client(format!("10.2.0.{}:4000", i + 1).parse().unwrap());
            let req = match k {
                0 => b"HEAD /big HTTP/1.1\r\nHost: example.com\r\n\r\n".to_vec(),
                1 => get_h("/big", "If-None-Match: \"v\"\r\n"),
                _ => get("/big"),
            };
            sim.send(c, &req);
            sim.run_for(Duration::from_micros(300 * (seed % 5)));
            clients.push((c, k));
        }
        sim.run_for(Duration::from_millis(300));
        // One GET reaches the backend; a HEAD arriving before any GET asks the backend
        // itself (a HEAD's answer is not stored, so it never leads a fetch).
        let gets = sim
            .backends
            .iter()
            .flat_map(|b| &b.requests)
            .filter(|r| r.head.starts_with("GET"))
            .count();
        assert_eq!(gets, 1, "seed {seed}: one GET fetch");
        let leading_heads = kinds.iter().take_while(|&&k| k == 0).count();
        assert!(n.load(Ordering::SeqCst) <= 1 + leading_heads, "seed {seed}");
        for &(c, k) in &clients {
            let resp = parse_responses(&sim.clients[c].received, &[k == 0]);
            let text =
                responses_text(&sim.clients[c].received[..200.min(sim.clients[c].received.len())]);
            assert_eq!(resp.len(), 1, "seed {seed} kind {k}: {text}");
            let (status, headers, got) = &resp[0];
            if headers
                .iter()
                .any(|(n, v)| n == "Cache-Status" && v.contains("collapsed"))
            {
                streamed += 1;
            }
            match (k, *status) {
                (0, 200) => {
                    assert!(got.is_empty());
                    let cl = headers
                        .iter()
                        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"));
                    assert_eq!(
                        cl.map(|(_, v)| v.as_str()),
                        Some("60000"),
                        "seed {seed}: {text}"
                    );
                }
                (1, 304) => assert!(got.is_empty()),
                (_, 200) => assert!(
                    got == &body,
                    "seed {seed} kind {k}: body differs ({} bytes)",
                    got.len()
                ),
                _ => panic!("seed {seed} kind {k}: {text}"),
            }
        }
    }
    assert!(
        streamed > 50,
        "waiters streamed the fetch as it arrived: {streamed}"
    );
}

/// The backend breaks framing while the connection sits in the pool: bytes after a HEAD
/// answer (its Content-Length names a body that never belongs to it), after a complete
/// body, after the last chunk, on a 204 and a 304. Whether the runtime watches idle
/// sockets (mio) or not (monoio, tokio between sweeps), no request ever receives them:
/// core's pool hands out only connections whose peek finds nothing.
#[test]
fn stray_bytes_on_a_pooled_connection_never_reach_the_next_request() {
    const INJECTED: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nINJECTED";
    let yaml = format!(
        "server:\n  timeout: 5s\nload_balancing:\n  response_timeout: 2s\nbackends:\n  - url: http://{B1}\n"
    );
    for watch_idle in [true, false] {
        for trigger in ["/head", "/length", "/chunked", "/204", "/304"] {
            let now = crate::test_origin();
            let b = Behavior::Serve(Box::new(|r: &SimRequest| {
                let late = Some((Duration::from_millis(30), INJECTED.to_vec()));
                let mut reply = match r.target() {
                    "/chunked" => Reply {
                        chunked: true,
                        ..Reply::ok(b"hello")
                    },
                    "/204" => Reply::status(204),
                    "/304" => Reply::status(304),
                    "/head" | "/length" => Reply::ok(b"hello"),
                    t => return Reply::ok(format!("answer to {t}").as_bytes()),
                };
                reply.then = late;
                reply
            }));
            let mut sim = Sim::new(ctx_from(&yaml, now), vec![(B1.parse().unwrap(), b)], 1, now);
            sim.watch_idle = watch_idle;
            let c = sim.connect_client(CLIENT.parse().unwrap());
            let head = trigger == "/head";
            let method = if head { "HEAD" } else { "GET" };
            sim.send(
                c,
                format!("{method} {trigger} HTTP/1.1\r\nHost: example.com\r\n\r\n").as_bytes(),
            );
            sim.run_for(Duration::from_millis(100));
            assert_eq!(sim.backends[0].connections, 1);
            // Later clients: none receives the stray bytes as its answer.
            let mut flags = vec![head];
            for i in 0..3 {
                sim.send(c, &get(&format!("/victim{i}")));
                sim.run_for(Duration::from_millis(50));
                flags.push(false);
            }
            let resp = parse_responses(&sim.clients[c].received, &flags);
            assert_eq!(resp.len(), 4, "{trigger} (watch_idle {watch_idle})");
            for (i, r) in resp[1..].iter().enumerate() {
                assert_eq!(
                    String::from_utf8_lossy(&r.2),
                    format!("answer to /victim{i}"),
                    "{trigger} (watch_idle {watch_idle}): a response went to the wrong request"
                );
            }
            assert_eq!(
                sim.backends[0].connections, 2,
                "{trigger}: the poisoned connection was closed, one new one carries the rest"
            );
            let unread = sim.ctx.metrics.upstream_idle_unread.load(Ordering::Relaxed);
            assert_eq!(unread, 1, "{trigger}: counted once");
        }
    }
}

/// The pool's limits hold in the simulator too: `max_requests` retires a connection after
/// that many exchanges (the simulator used to reset a connection's count on release).
#[test]
fn pooled_connections_retire_after_max_requests() {
    let yaml = two_backends("").replace(
        "server:\n",
        "server:\n  connection_pool:\n    max_requests: 3\n",
    );
    let mut sim = sim_with(&yaml, echo_path("b1"), echo_path("b2"), 1);
    let c = sim.connect_client(CLIENT.parse().unwrap());
    for i in 0..12 {
        sim.send(c, &get(&format!("/r{i}")));
        sim.run_for(Duration::from_millis(10));
    }
    assert_eq!(statuses(&sim.clients[c].received, 12), vec![200; 12]);
    // Six requests per backend, three per connection.
    assert_eq!(sim.backends[0].connections, 2);
    assert_eq!(sim.backends[1].connections, 2);
}

/// One request on a fresh session, answered by the backend with `raw`: what the client
/// got, and whether the session closed.
fn answer_with(raw: &[u8], yaml: &str) -> (Vec<u8>, bool) {
    let now = crate::test_origin();
    let mut s = Session::new(ctx_from(yaml, now), CLIENT.parse().unwrap(), now);
    s.feed_client(&get("/"), now);
    assert!(matches!(s.poll_action(), Some(Action::Connect { .. })));
    s.on_upstream_connected(s.up_io, false, now);
    s.on_upstream_written(s.up_io, s.up_out.len(), now);
    s.feed_upstream(s.up_io, raw, now);
    let mut got = Vec::new();
    while !s.conn.output.is_empty() {
        let (a, b) = s.conn.output.pending_parts();
        got.extend_from_slice(a);
        got.extend_from_slice(b);
        let n = a.len() + b.len();
        s.on_client_written(n, now);
    }
    (got, s.wants_close())
}

#[test]
fn broken_backend_answers_give_the_client_a_502() {
    for raw in [
        &b"HTTP/1.1 000 Zero\r\nContent-Length: 0\r\n\r\n"[..],
        b"HTTP/1.1 099 Low\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxyz",
        // A malformed chunk in the same read as the head: nothing went out yet.
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    ] {
        let (got, closed) = answer_with(raw, &two_backends(""));
        let text = String::from_utf8_lossy(&got);
        assert!(
            text.starts_with("HTTP/1.1 502 "),
            "{:?} -> {text}",
            String::from_utf8_lossy(raw)
        );
        assert_eq!(text.matches("HTTP/1.1").count(), 1, "only the 502: {text}");
        if raw.windows(4).any(|w| w == b"\nzz\r") {
            // The backend's framing is lost mid-body: the connection ends after the 502.
            assert!(closed || text.contains("Connection: close"), "{text}");
        }
    }
}

#[test]
fn a_malformed_chunk_after_the_head_went_out_cuts_the_connection() {
    let now = crate::test_origin();
    let mut s = Session::new(
        ctx_from(&two_backends(""), now),
        CLIENT.parse().unwrap(),
        now,
    );
    s.feed_client(&get("/"), now);
    assert!(matches!(s.poll_action(), Some(Action::Connect { .. })));
    s.on_upstream_connected(s.up_io, false, now);
    s.on_upstream_written(s.up_io, s.up_out.len(), now);
    s.feed_upstream(
        s.up_io,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        now,
    );
    // The head and the first chunk reach the client; then the framing breaks.
    s.on_client_written(s.conn.output.len(), now);
    s.feed_upstream(s.up_io, b"zz\r\n", now);
    assert!(s.wants_close(), "the only honest signal left");
    assert!(s.conn.output.is_empty());
}

#[test]
fn trace_is_answered_405_unless_allowed() {
    let now = crate::test_origin();
    let mut s = Session::new(
        ctx_from(&two_backends(""), now),
        CLIENT.parse().unwrap(),
        now,
    );
    s.feed_client(b"TRACE / HTTP/1.1\r\nHost: a\r\n\r\n", now);
    assert_eq!(s.poll_action(), None, "no backend involved");
    let text = String::from_utf8_lossy(s.conn.output.pending()).into_owned();
    assert!(text.starts_with("HTTP/1.1 405 "), "{text}");
    assert!(text.contains("\r\nAllow: GET, HEAD"), "{text}");
    let yaml = two_backends("").replace("server:\n", "server:\n  allow_trace: true\n");
    let mut s = Session::new(ctx_from(&yaml, now), CLIENT.parse().unwrap(), now);
    s.feed_client(b"TRACE / HTTP/1.1\r\nHost: a\r\n\r\n", now);
    assert!(matches!(s.poll_action(), Some(Action::Connect { .. })));
}

/// `max_lifetime` retires a pooled connection by age, counted from its creation, not from
/// its last release.
#[test]
fn pooled_connections_retire_after_max_lifetime() {
    let yaml = two_backends("").replace(
        "server:\n",
        "server:\n  connection_pool:\n    max_lifetime: 1s\n    idle_timeout: 30s\n",
    );
    let mut sim = sim_with(&yaml, echo_path("b1"), echo_path("b2"), 1);
    let c = sim.connect_client(CLIENT.parse().unwrap());
    // Each backend sees a request every 600 ms: a connection carries two, then is too old.
    for i in 0..12 {
        sim.send(c, &get(&format!("/r{i}")));
        sim.run_for(Duration::from_millis(300));
    }
    assert_eq!(statuses(&sim.clients[c].received, 12), vec![200; 12]);
    assert_eq!(sim.backends[0].connections, 3);
    assert_eq!(sim.backends[1].connections, 3);
}

/// Requests that wait on another request's fetch are woken when it moves, never polled:
/// a follower streams the body as it drips in and a conditional request waiting on the
/// cache lock gets its 304 once the entry is stored, with no deadline firing meanwhile.
#[test]
fn waiters_are_woken_not_polled() {
    let body: Vec<u8> = (0..20_000).map(|i| (i % 251) as u8).collect();
    let b = body.clone();
    let origin = Behavior::Serve(Box::new(move |_r: &SimRequest| {
        let mut reply = Reply::ok(&b);
        reply
            .headers
            .push(("Cache-Control".into(), "max-age=60".into()));
        reply.headers.push(("ETag".into(), "\"v\"".into()));
        reply.drip = Duration::from_millis(5);
        reply
    }));
    let mut sim = sim_with(&cached(""), origin, echo_path("b2"), 3);
    sim.max_piece = 1000;
    let lead = sim.connect_client("10.3.0.1:4000".parse().unwrap());
    sim.send(lead, &get("/w"));
    sim.run_for(Duration::from_millis(1));
    let follower = sim.connect_client("10.3.0.2:4000".parse().unwrap());
    sim.send(follower, &get("/w"));
    let waiter = sim.connect_client("10.3.0.3:4000".parse().unwrap());
    sim.send(waiter, &get_h("/w", "If-None-Match: \"v\"\r\n"));
    // The body takes about 20 pieces x 5 ms; no request times out in that time.
    sim.run_for(Duration::from_millis(400));
    for c in [lead, follower] {
        let resp = parse_responses(&sim.clients[c].received, &[false]);
        assert_eq!(resp.len(), 1, "client {c}");
        assert_eq!(resp[0].0, 200);
        assert_eq!(resp[0].2, body, "client {c}: the whole body");
    }
    assert_eq!(statuses(&sim.clients[waiter].received, 1), vec![304]);
    assert_eq!(sim.backends[0].requests.len(), 1, "one fetch for all three");
    assert!(sim.wakeups >= 10, "woken as the body grew: {}", sim.wakeups);
    assert_eq!(sim.timeouts, 0, "no deadline fired: nobody polled");
}

/// Forwarded response fields go out as received, in order, one per CRLF line, whatever
/// the backend's spacing and line ends: runs of kept lines are copied whole, and a
/// dropped (hop-by-hop) field, extra whitespace, a bare LF or an empty value ends a run.
#[test]
fn forwarded_response_fields_keep_order_and_lose_only_hop_by_hop_ones() {
    let raw = b"HTTP/1.1 200 OK\r\nA: 1\r\nB:2\r\nConnection: x-hop\r\nX-Hop: gone\r\nC:   3  \r\nD: 4\nE:\r\nF: \xe9t\xe9\r\nContent-Length: 2\r\nG: 7\r\n\r\nok";
    let (got, _) = answer_with(raw, &two_backends(""));
    let text = String::from_utf8_lossy(&got).into_owned();
    let head = &got[..got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 2];
    let lines: Vec<&[u8]> = head
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    for l in &lines {
        assert!(l.ends_with(b"\r"), "every line ends with CRLF: {text:?}");
    }
    let fields: Vec<String> = lines[1..]
        .iter()
        .map(|l| String::from_utf8_lossy(&l[..l.len() - 1]).into_owned())
        .filter(|l| !l.starts_with("Date:") && !l.starts_with("Via:"))
        .collect();
    assert_eq!(
        fields,
        vec![
            "A: 1",
            "B:2",
            "C:   3",
            "D: 4",
            "E:",
            "F: \u{fffd}t\u{fffd}",
            "G: 7",
            "Content-Length: 2"
        ],
        "{text:?}"
    );
    assert!(text.ends_with("\r\n\r\nok"));
}

/// A body written from the read buffer it arrived in, by a write that owns it while in
/// flight (io_uring's lend): the session's buffers are parked only once it is back, so the
/// read buffer returns to the pool whole and the next response's read allocates nothing.
#[test]
fn buffers_park_whole_after_a_lent_shared_body() {
    let now = crate::test_origin();
    let mut pool = BufPool::default();
    let ctx = ctx_from(&two_backends(""), now);
    let mut s = Session::new(ctx, CLIENT.parse().unwrap(), now);
    s.reserve_client_in(&mut pool).extend_from_slice(&get("/"));
    s.on_client_read(now);
    assert!(matches!(s.poll_action(), Some(Action::Connect { .. })));
    s.on_upstream_connected(s.up_io, false, now);
    let n = s.up_out.len();
    s.on_upstream_written(s.up_io, n, now);
    let up = s.reserve_up_in(&mut pool);
    let read_buf = up.as_ptr();
    up.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 16384\r\n\r\n");
    up.extend_from_slice(&[b'x'; 16384]);
    s.on_upstream_read(s.up_io, now);
    while s.poll_action().is_some() {}
    // The write takes the head and the body (shared with the read buffer) with it.
    let lent = s.conn.output.lend(pool.out_buf());
    let mut c: [&[u8]; 4] = [&[]; 4];
    assert_eq!(lent.chunks(&mut c), 2);
    assert_eq!(c[1].len(), 16384, "the body is shared");
    let total = lent.len();
    s.park_buffers(&mut pool);
    let spare = s.conn.output.unlend(lent);
    pool.put_out(spare);
    s.on_client_written(total, now);
    s.park_buffers(&mut pool);
    assert_eq!(
        pool.read_buf(UP_READ_CHUNK).as_ptr(),
        read_buf,
        "the read buffer came back to the pool whole"
    );
}

/// A session whose first connect (its I/O returned) timed out at the returned instant.
fn first_connect_timed_out() -> (Session, IoId, Instant) {
    let now = crate::test_origin();
    let ctx = ctx_from(&two_backends("  retries: 1\n"), now);
    let mut s = Session::new(ctx, CLIENT.parse().unwrap(), now);
    s.feed_client(&get("/"), now);
    let Some(Action::Connect { io: first, .. }) = s.poll_action() else {
        panic!("no connect");
    };
    let d = s.deadline().expect("connect timer");
    s.on_timeout(d);
    (s, first, d)
}

/// Every upstream action names its I/O, and each retry is a new one: the release names the
/// attempt it ends, the next connect a new id.
#[test]
fn each_connect_names_a_new_io_and_its_release_names_it_again() {
    // The connect times out: that attempt is released and another backend asked for.
    let (mut s, first, d) = first_connect_timed_out();
    let released = s.poll_action();
    assert!(
        matches!(released, Some(Action::ReleaseUpstream { io, .. }) if io == first),
        "{released:?}"
    );
    let Some(Action::Connect { io: second, .. }) = s.poll_action() else {
        panic!("no retry");
    };
    assert_ne!(first, second);
    s.on_upstream_connected(second, false, d);
    s.on_upstream_written(second, s.up_out.len(), d);
    s.feed_upstream(second, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", d);
    assert!(s.conn.output.pending().ends_with(b"\r\n\r\nok"));
}

/// A completion for an attempt the session gave up (a runtime that kept a timed-out
/// connect) is caught, not taken for the current attempt.
#[test]
#[cfg(debug_assertions)]
#[should_panic(expected = "on_upstream_connected for another I/O")]
fn a_completion_for_a_released_io_is_misuse() {
    let (mut s, first, d) = first_connect_timed_out();
    while s.poll_action().is_some() {}
    s.on_upstream_connected(first, false, d);
}

/// The transport slot under the client connection ([`crate::transport`]), with a stand-in
/// for TLS: records of a two-byte length and a payload XORed with 0x5a (so a session that
/// parsed the raw bytes would see garbage), `FF FF` as the closing bytes and `EE EE` as the
/// alert after a bad record.
mod transport {
    use super::*;
    use crate::transport::{Transport, TransportError};

    const MAX_RECORD: usize = 1000;

    #[derive(Default)]
    struct Records {
        failed: bool,
        closed: usize,
    }

    fn record(payload: &[u8], out: &mut Vec<u8>) {
        for p in payload.chunks(MAX_RECORD) {
            out.extend_from_slice(&(p.len() as u16).to_be_bytes());
            out.extend(p.iter().map(|b| b ^ 0x5a));
        }
    }

    /// The bytes a client would send for `plain`, in records of at most `max` bytes.
    fn records(plain: &[u8], max: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for p in plain.chunks(max) {
            record(p, &mut out);
        }
        out
    }

    /// What the client reads out of the proxy's records, and what followed the last one.
    fn open(mut raw: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let mut plain = Vec::new();
        while raw.len() >= 2 {
            let n = u16::from_be_bytes([raw[0], raw[1]]) as usize;
            if n == 0 || n > MAX_RECORD || raw.len() < 2 + n {
                break;
            }
            plain.extend(raw[2..2 + n].iter().map(|b| b ^ 0x5a));
            raw = &raw[2 + n..];
        }
        (plain, raw.to_vec())
    }

    impl Transport for Records {
        fn receive(
            &mut self,
            raw: &mut BytesMut,
            plain: &mut BytesMut,
            _out: &mut Vec<u8>,
        ) -> Result<(), TransportError> {
            while raw.len() >= 2 {
                let n = u16::from_be_bytes([raw[0], raw[1]]) as usize;
                if n == 0 || n > MAX_RECORD {
                    self.failed = true;
                    return Err(TransportError("bad record"));
                }
                if raw.len() < 2 + n {
                    break;
                }
                plain.extend(raw[2..2 + n].iter().map(|b| b ^ 0x5a));
                raw.advance(2 + n);
            }
            Ok(())
        }

        fn send(&mut self, plain: &mut OutBuf, out: &mut Vec<u8>) {
            while !plain.is_empty() {
                let (own, shared) = plain.pending_parts();
                let part = if own.is_empty() { shared } else { own };
                let n = part.len();
                record(part, out);
                plain.consume(n);
            }
        }

        fn close(&mut self, out: &mut Vec<u8>) {
            self.closed += 1;
            out.extend_from_slice(if self.failed {
                b"\xee\xee"
            } else {
                b"\xff\xff"
            });
        }
    }

    fn sim_records(seed: u64) -> (Sim, usize) {
        let mut sim = sim_with(&two_backends(""), echo_path("b1"), echo_path("b2"), seed);
        sim.max_piece = 5;
        let c = sim.connect_client(CLIENT.parse().unwrap());
        sim.clients[c]
            .session
            .set_transport(Box::new(Records::default()));
        (sim, c)
    }

    #[test]
    fn requests_and_responses_pass_through_the_transport() {
        for seed in 1..10 {
            let (mut sim, c) = sim_records(seed);
            let mut plain = Vec::new();
            for i in 0..4 {
                plain.extend_from_slice(&get(&format!("/t{i}")));
            }
            plain.extend_from_slice(b"GET /last HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
            // Records cut across requests, and arriving in pieces that cut records.
            sim.send(c, &records(&plain, 37));
            sim.run_for(Duration::from_millis(100));
            let targets: Vec<String> = sim.backends[0]
                .requests
                .iter()
                .chain(&sim.backends[1].requests)
                .map(|r| r.target().to_string())
                .collect();
            assert_eq!(targets.len(), 5, "seed {seed}: {targets:?}");
            let (got, after) = open(&sim.clients[c].received);
            let resp = parse_responses(&got, &[false; 5]);
            assert_eq!(resp.len(), 5, "seed {seed}");
            for (i, r) in resp.iter().enumerate().take(4) {
                assert!(String::from_utf8_lossy(&r.2).ends_with(&format!("/t{i}")));
            }
            assert!(String::from_utf8_lossy(&resp[4].2).ends_with("/last"));
            // The closing bytes follow the last response, then the connection closes.
            assert_eq!(after, b"\xff\xff", "seed {seed}");
            assert!(sim.clients[c].closed);
        }
    }

    #[test]
    fn a_transport_failure_sends_its_alert_and_closes() {
        let (mut sim, c) = sim_records(1);
        let mut raw = records(&get("/ok"), 1000);
        // A record of length zero, then a request nobody may see.
        raw.extend_from_slice(b"\x00\x00");
        raw.extend_from_slice(&records(&get("/never"), 1000));
        sim.max_piece = usize::MAX;
        sim.send(c, &raw);
        sim.run_for(Duration::from_millis(100));
        let seen: Vec<&str> = sim.backends[0]
            .requests
            .iter()
            .chain(&sim.backends[1].requests)
            .map(|r| r.target())
            .collect();
        // The bytes decoded before the bad record were dropped with it: nothing was asked.
        assert!(seen.is_empty(), "{seen:?}");
        assert_eq!(sim.clients[c].received, b"\xee\xee");
        assert!(sim.clients[c].closed);
    }

    #[test]
    fn output_through_a_transport_is_bounded_while_the_client_does_not_read() {
        let now = crate::test_origin();
        let ctx = ctx_from(&two_backends(""), now);
        let mut s = Session::new(ctx, CLIENT.parse().unwrap(), now);
        s.set_transport(Box::new(Records::default()));
        s.feed_client(&records(&get("/"), 1000), now);
        assert!(matches!(s.poll_action(), Some(Action::Connect { .. })));
        s.on_upstream_connected(s.up_io, false, now);
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 2000000\r\n\r\n";
        s.feed_upstream(s.up_io, head, now);
        let chunk = vec![1u8; 16 * 1024];
        let mut fed = 0;
        while s.wants_upstream_read() && fed < 2_000_000 {
            s.feed_upstream(s.up_io, &chunk, now);
            fed += chunk.len();
            // The runtime asks for output to write (the transport encodes it) but the
            // socket takes nothing.
            assert!(s.has_client_output());
            let _ = s.client_output();
        }
        assert!(
            fed < 200_000,
            "read {fed} bytes while the client read nothing"
        );
        assert!(s.conn.output.is_empty(), "every plaintext byte was encoded");
        assert!(s.conn.out_len() < HIGH_WATER + 32 * 1024);
        // Writing it all lets the response go on; what the client reads opens to it.
        let mut raw = Vec::new();
        while s.has_client_output() || s.wants_upstream_read() {
            if s.wants_upstream_read() {
                s.feed_upstream(s.up_io, &chunk, now);
            }
            let out = s.client_output();
            let (own, shared) = out.pending_parts();
            raw.extend_from_slice(own);
            raw.extend_from_slice(shared);
            let n = own.len() + shared.len();
            s.on_client_written(n, now);
        }
        let (plain, after) = open(&raw);
        assert!(after.is_empty());
        let resp = parse_responses(&plain, &[false]);
        assert_eq!(resp[0].0, 200);
        assert_eq!(resp[0].2.len(), 2_000_000);
    }

    #[test]
    fn an_idle_connection_parks_the_transport_buffers_too() {
        let now = crate::test_origin();
        let ctx = ctx_from(&two_backends(""), now);
        let mut pool = BufPool::default();
        let mut s = Session::new(ctx, CLIENT.parse().unwrap(), now);
        s.set_transport(Box::new(Records::default()));
        let raw = records(&get("/"), 1000);
        // Half a record: the raw input holds it, so the connection is not idle.
        s.reserve_client_in(&mut pool).extend_from_slice(&raw[..5]);
        s.on_client_read(now);
        assert!(!s.awaiting_request());
        s.park_buffers(&mut pool);
        assert_eq!(pool.free(), (0, 0), "nothing parked with a partial record");
        s.reserve_client_in(&mut pool).extend_from_slice(&raw[5..]);
        s.on_client_read(now);
        assert!(matches!(s.poll_action(), Some(Action::Connect { .. })));
        s.on_upstream_connected(s.up_io, false, now);
        s.on_upstream_written(s.up_io, s.up_out.len(), now);
        s.reserve_up_in(&mut pool)
            .extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi");
        s.on_upstream_read(s.up_io, now);
        let n = s.client_output().len();
        assert!(n > 0);
        s.on_client_written(n, now);
        assert!(matches!(
            s.poll_action(),
            Some(Action::ReleaseUpstream { reuse: true, .. })
        ));
        assert!(s.awaiting_request());
        s.park_buffers(&mut pool);
        // Plaintext and raw buffers, both ways, and the upstream ones: all in the pool.
        let (reads, outs) = pool.free();
        assert_eq!((reads, outs), (3, 4), "parked buffers");
        s.recycle(&mut pool);
    }
}
