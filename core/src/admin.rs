//! The admin endpoints, answered by ordinary sessions on the runtime's workers: an admin
//! listener's connections are [`crate::proxy::Session`]s whose context ([`context`]) carries
//! an [`Admin`], so they are read with core's HTTP/1.1 parser and its limits, timed by the
//! same timer table (408 when a head is late, keep-alive, drain), and a slow admin client
//! holds one connection's state on an event loop instead of a thread. Requests are answered
//! locally (a response the session generates; no backend, no cache).
//!
//! - `GET /metrics`: Prometheus text (proxy, upstream and cache counters).
//! - `POST /cache/purge?url=http://host/path`: drop that URL (every variant).
//! - `POST /cache/purge?prefix=http://host/path`: drop every URL starting with it.
//!
//! Answers are small JSON or text; bad requests get 400, unknown paths 404, other methods
//! 405, a request body 413. With `admin.token`, every request needs
//! `Authorization: Bearer TOKEN` (401 otherwise). At most `admin.max_connections` are open
//! at once: one beyond is answered 503 and closed.

use crate::config::AdminSection;
use crate::http1::head::{trim, RequestHead};
use crate::http1::Limits;
use crate::metrics::Metrics;
use crate::proxy::ProxyContext;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// The longest admin request head (431 beyond); no request carries a body.
pub const MAX_HEAD: usize = 8 * 1024;

/// What an admin listener serves, and its connection bound.
pub struct Admin {
    /// The proxy whose metrics and cache the endpoints show and act on.
    serves: Arc<ProxyContext>,
    token: Option<Box<str>>,
    max_connections: usize,
    open: AtomicUsize,
}

/// The context of an admin listener's sessions: admin limits and head timeout, no
/// upstreams, routes or cache of its own, and metrics of its own (admin connections do not
/// count as the proxy's).
pub fn context(serves: &Arc<ProxyContext>, cfg: &AdminSection) -> Arc<ProxyContext> {
    let p = serves.as_ref();
    Arc::new(ProxyContext {
        limits: Limits {
            max_head: MAX_HEAD,
            max_uri: 4 * 1024,
            max_headers: 32,
            max_body: 0,
        },
        header_timeout: cfg.header_timeout.0,
        keep_alive_timeout: p.keep_alive_timeout,
        idle_timeout: p.idle_timeout,
        max_requests_per_connection: p.max_requests_per_connection,
        upstreams: Vec::new(),
        router: crate::route::Router::default(),
        metrics: Arc::new(Metrics::default()),
        via_name: p.via_name.clone(),
        clock: p.clock,
        cache: None,
        trusted_proxies: crate::forward::TrustedProxies(Vec::new()),
        merge_slashes: false,
        allow_trace: false,
        body_timeout: p.body_timeout,
        body_buffer: 0,
        per_ip: None,
        tls: None,
        admin: Some(Arc::new(Admin {
            serves: serves.clone(),
            token: cfg.token.as_deref().map(Box::from),
            max_connections: cfg.max_connections,
            open: AtomicUsize::new(0),
        })),
    })
}

/// A locally generated answer.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub reason: &'static str,
    pub content_type: &'static str,
    /// Extra header lines, each ending in CRLF.
    pub extra: &'static [u8],
    pub body: Vec<u8>,
}

impl Answer {
    fn new(status: u16, reason: &'static str, content_type: &'static str, body: &str) -> Self {
        Answer {
            status,
            reason,
            content_type,
            extra: b"",
            body: body.as_bytes().to_vec(),
        }
    }
    fn text(status: u16, reason: &'static str, body: &str) -> Self {
        Answer::new(status, reason, "text/plain", body)
    }
    fn json(status: u16, reason: &'static str, body: &str) -> Self {
        Answer::new(status, reason, "application/json", body)
    }
}

impl Admin {
    /// A connection opens: false when `admin.max_connections` are open already (it is
    /// answered 503 and closed). Every call is matched by [`closed`](Self::closed).
    pub(crate) fn opened(&self) -> bool {
        self.open.fetch_add(1, Ordering::AcqRel) < self.max_connections
    }

    pub(crate) fn closed(&self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }

    /// Answer one request head (`buf` holds it). `HEAD` gets `GET`'s head (the session
    /// leaves the body out).
    pub fn answer(&self, h: &RequestHead, buf: &[u8], now: Instant) -> Answer {
        if let Some(t) = &self.token {
            if !bearer_matches(h, buf, t) {
                let mut a = Answer::text(
                    401,
                    "Unauthorized",
                    "admin.token is set: send Authorization: Bearer TOKEN\n",
                );
                a.extra = b"WWW-Authenticate: Bearer realm=\"trireme-admin\"\r\n";
                return a;
            }
        }
        let target = h.target.get(buf);
        let (path, query) = match target.iter().position(|&b| b == b'?') {
            Some(i) => (&target[..i], &target[i + 1..]),
            None => (target, &b""[..]),
        };
        let method = h.method_span.get(buf);
        match (method, path) {
            (b"GET" | b"HEAD", b"/metrics") => {
                let mut out = String::new();
                let p = &self.serves;
                p.metrics.render(&mut out);
                render_upstreams(p, &mut out, now);
                if let Some(c) = &p.cache {
                    c.render(&mut out);
                }
                Answer::new(200, "OK", "text/plain; version=0.0.4", &out)
            }
            (b"POST" | b"PURGE", b"/cache/purge") => self.purge(query),
            (_, b"/metrics" | b"/cache/purge") => {
                let mut a = Answer::text(405, "Method Not Allowed", "method not allowed\n");
                a.extra = match path {
                    b"/metrics" => b"Allow: GET, HEAD\r\n",
                    _ => b"Allow: POST, PURGE\r\n",
                };
                a
            }
            _ => Answer::text(
                404,
                "Not Found",
                "endpoints: GET /metrics, POST /cache/purge?url=|prefix=\n",
            ),
        }
    }

    fn purge(&self, query: &[u8]) -> Answer {
        let Some(cache) = &self.serves.cache else {
            return Answer::json(404, "Not Found", "{\"error\":\"no cache configured\"}\n");
        };
        let (mut url, mut prefix) = (None, None);
        for kv in query.split(|&b| b == b'&') {
            let (k, v) = match kv.iter().position(|&b| b == b'=') {
                Some(i) => (&kv[..i], &kv[i + 1..]),
                None => (kv, &b""[..]),
            };
            match k {
                b"url" => url = Some(percent_decode(v)),
                b"prefix" => prefix = Some(percent_decode(v)),
                _ => {}
            }
        }
        let res = match (url, prefix) {
            (Some(u), None) => cache.purge(&u, false),
            (None, Some(p)) => cache.purge(&p, true),
            _ => Err("give exactly one of url= or prefix=".to_string()),
        };
        match res {
            Ok(n) => {
                tracing::info!(purged = n, "cache purge");
                Answer::json(200, "OK", &format!("{{\"purged\":{n}}}\n"))
            }
            Err(e) => Answer::json(400, "Bad Request", &format!("{{\"error\":{e:?}}}\n")),
        }
    }
}

/// `Authorization: Bearer TOKEN`, compared in constant time.
fn bearer_matches(h: &RequestHead, buf: &[u8], token: &str) -> bool {
    let Some(v) = h.header(buf, "authorization") else {
        return false;
    };
    let v = trim(v);
    let Some(given) = v
        .get(..7)
        .filter(|p| p.eq_ignore_ascii_case(b"bearer "))
        .map(|_| trim(&v[7..]))
    else {
        return false;
    };
    let want = token.as_bytes();
    given.len() == want.len()
        && given
            .iter()
            .zip(want)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// A query value: `%XX` decoded, `+` as a space; invalid UTF-8 replaced.
fn percent_decode(b: &[u8]) -> String {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Per-upstream health: backends taking requests, and picks made in panic mode.
fn render_upstreams(ctx: &ProxyContext, out: &mut String, now: Instant) {
    use std::fmt::Write;
    let _ = writeln!(out, "# TYPE trireme_upstream_backends_available gauge");
    for u in &ctx.upstreams {
        let up = (0..u.backends.len())
            .filter(|&i| u.is_available(i, now))
            .count();
        let _ = writeln!(
            out,
            "trireme_upstream_backends_available{{upstream=\"{}\"}} {up}",
            u.cfg.name
        );
    }
    let _ = writeln!(out, "# TYPE trireme_upstream_panic_picks_total counter");
    for u in &ctx.upstreams {
        let _ = writeln!(
            out,
            "trireme_upstream_panic_picks_total{{upstream=\"{}\"}} {}",
            u.cfg.name,
            u.panic_picks.load(Ordering::Relaxed)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;
    use crate::sim::{parse_responses, Behavior, Reply, Sim};
    use std::time::Duration;

    const B1: &str = "127.0.0.1:9001";

    fn section(token: Option<&str>, max_connections: usize) -> AdminSection {
        AdminSection {
            listen: "127.0.0.1:0".into(),
            token: token.map(String::from),
            max_connections,
            header_timeout: Dur(Duration::from_secs(1)),
        }
    }

    /// A proxy with a cache and one backend, and an admin context beside it.
    fn sim(token: Option<&str>, max: usize) -> (Sim, Arc<ProxyContext>) {
        let now = crate::test_origin();
        let ctx = crate::test_ctx(
            &format!("server:\n  header_timeout: 3s\ncache:\n  size: 1MB\nbackends:\n  - url: http://{B1}\n"),
            now,
        );
        let admin = context(&ctx, &section(token, max));
        let ok = Behavior::Serve(Box::new(|_| {
            let mut r = Reply::ok(b"hello");
            r.headers
                .push(("Cache-Control".into(), "max-age=60".into()));
            r
        }));
        (
            Sim::new(ctx, vec![(B1.parse().unwrap(), ok)], 7, now),
            admin,
        )
    }

    fn text(received: &[u8]) -> Vec<(u16, String)> {
        text_after(received, &[false; 8])
    }

    /// Responses, `heads[i]` telling whether the i-th answers a HEAD.
    fn text_after(received: &[u8], heads: &[bool]) -> Vec<(u16, String)> {
        parse_responses(received, heads)
            .into_iter()
            .map(|r| (r.0, String::from_utf8_lossy(&r.2).into_owned()))
            .collect()
    }

    #[test]
    fn a_slow_admin_client_stalls_neither_admin_requests_nor_traffic() {
        let (mut sim, admin) = sim(None, 4);
        let slow = sim.connect_on(admin.clone(), "127.0.0.1:4000".parse().unwrap());
        sim.send(slow, b"GET /metrics HTTP/1.1\r\nHost: x\r\n");
        let client = sim.connect_client("10.0.0.1:5000".parse().unwrap());
        for _ in 0..3 {
            sim.send(client, b"GET /a HTTP/1.1\r\nHost: example.com\r\n\r\n");
            sim.run_for(Duration::from_millis(20));
        }
        let quick = sim.connect_on(admin.clone(), "127.0.0.1:4001".parse().unwrap());
        // Two requests on one keep-alive admin connection.
        sim.send(quick, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        sim.send(quick, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        sim.run_for(Duration::from_millis(20));
        let got = text_after(&sim.clients[quick].received, &[false, true]);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!((got[1].0, got[1].1.as_str()), (200, ""));
        assert_eq!(got[0].0, 200);
        assert!(
            got[0].1.contains("trireme_requests_total 3\n"),
            "{}",
            got[0].1
        );
        assert!(
            got[0].1.contains("trireme_cache_hits_total 2\n"),
            "{}",
            got[0].1
        );
        assert!(!sim.clients[quick].closed);
        assert_eq!(text(&sim.clients[client].received).len(), 3);
        assert!(sim.clients[slow].received.is_empty());
        // The slow one is cut off at admin.header_timeout (1 s), not the proxy's (3 s).
        sim.run_for(Duration::from_millis(1000));
        assert_eq!(text(&sim.clients[slow].received)[0].0, 408);
        assert!(sim.clients[slow].closed);
        // Admin connections are not the proxy's: its metrics count only the client's.
        let m = &sim.ctx.metrics;
        assert_eq!(m.connections_accepted.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn admin_requests_need_the_token_and_are_bounded() {
        let (mut sim, admin) = sim(Some("t0ken"), 2);
        let a = sim.connect_on(admin.clone(), "127.0.0.1:4000".parse().unwrap());
        sim.send(a, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        sim.send(
            a,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t0ken\r\n\r\n",
        );
        sim.send(
            a,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: bearer t0kex\r\n\r\n",
        );
        sim.run_for(Duration::from_millis(10));
        let r = parse_responses(&sim.clients[a].received, &[false; 3]);
        let codes: Vec<u16> = r.iter().map(|r| r.0).collect();
        assert_eq!(codes, [401, 200, 401]);
        let challenge = String::from_utf8_lossy(&sim.clients[a].received).into_owned();
        assert!(challenge.contains("WWW-Authenticate: Bearer realm=\"trireme-admin\"\r\n"));
        // A second connection fits; a third is answered 503 and closed at once.
        let b = sim.connect_on(admin.clone(), "127.0.0.1:4001".parse().unwrap());
        let c = sim.connect_on(admin.clone(), "127.0.0.1:4002".parse().unwrap());
        sim.run_for(Duration::from_millis(10));
        assert!(sim.clients[b].received.is_empty());
        assert_eq!(text(&sim.clients[c].received)[0].0, 503);
        assert!(sim.clients[c].closed);
    }

    #[test]
    fn admin_answers_purges_methods_paths_and_bodies() {
        let (mut sim, admin) = sim(None, 4);
        let client = sim.connect_client("10.0.0.1:5000".parse().unwrap());
        sim.send(client, b"GET /a HTTP/1.1\r\nHost: example.com\r\n\r\n");
        sim.run_for(Duration::from_millis(20));
        let a = sim.connect_on(admin.clone(), "127.0.0.1:4000".parse().unwrap());
        for req in [
            "POST /cache/purge?url=http%3A%2F%2Fexample.com%2Fa HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            "POST /cache/purge?url=nope HTTP/1.1\r\nHost: x\r\n\r\n",
            "POST /cache/purge?url=http://a/&prefix=http://a/ HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /cache/purge HTTP/1.1\r\nHost: x\r\n\r\n",
            "DELETE /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n",
            "POST /cache/purge?prefix=http://example.com/ HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab",
        ] {
            sim.send(a, req.as_bytes());
            sim.run_for(Duration::from_millis(5));
        }
        let got = text(&sim.clients[a].received);
        let codes: Vec<u16> = got.iter().map(|r| r.0).collect();
        assert_eq!(codes, [200, 400, 400, 405, 405, 404, 413], "{got:?}");
        // The stored response was dropped (the one the client's GET stored).
        assert_eq!(got[0].1, "{\"purged\":1}\n");
        assert!(got[1].1.starts_with("{\"error\":"), "{}", got[1].1);
        let raw = String::from_utf8_lossy(&sim.clients[a].received).into_owned();
        assert!(raw.contains("Allow: POST, PURGE\r\n") && raw.contains("Allow: GET, HEAD\r\n"));
        // A body is not read: the connection closes after the 413.
        assert!(sim.clients[a].closed);
    }

    #[test]
    fn percent_decoding_of_query_values() {
        assert_eq!(percent_decode(b"a%2Fb+c%zz%4"), "a/b c%zz%4");
        assert_eq!(percent_decode(b"%41%42"), "AB");
    }
}
