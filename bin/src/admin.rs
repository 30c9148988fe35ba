//! The admin listener: operators' endpoints on their own socket (loopback by default),
//! served on threads of its own whatever the event model, since they act on state every
//! worker shares.
//!
//! - `GET /metrics`: Prometheus text (proxy and cache counters).
//! - `POST /cache/purge?url=http://host/path`: drop that URL (every variant).
//! - `POST /cache/purge?prefix=http://host/path`: drop every URL starting with it.
//!
//! Answers are small JSON or text; bad requests get 400, unknown paths 404, other methods
//! 405. Requests are read with core's parser and limits (414, 431, 413 for a body, 408
//! when the head is not complete within `admin.header_timeout`); up to
//! `admin.max_connections` are served at once (503 beyond), one request per connection.
//! With `admin.token`, every request needs `Authorization: Bearer TOKEN` (401 otherwise).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use trireme_core::config::AdminSection;
use trireme_core::http1::head::{parse_request, Parsed, RequestHead};
use trireme_core::http1::Limits;
use trireme_core::proxy::ProxyContext;
use trireme_core::shutdown::Shutdown;

/// The longest admin request head (431 beyond); no request carries a body.
const MAX_HEAD: usize = 8 * 1024;

/// Bind `addr` and serve the admin endpoints until shutdown.
pub fn spawn(
    addr: SocketAddr,
    cfg: &AdminSection,
    ctx: Arc<ProxyContext>,
    sd: Arc<Shutdown>,
) -> std::io::Result<SocketAddr> {
    let l = TcpListener::bind(addr)?;
    let bound = l.local_addr()?;
    l.set_nonblocking(true)?;
    if cfg.token.is_none() && !bound.ip().is_loopback() {
        tracing::warn!(
            admin = %bound,
            "the admin listener is reachable beyond loopback and has no admin.token: anyone \
             who can connect can purge the cache and read metrics"
        );
    }
    let limits = Limits {
        max_head: MAX_HEAD,
        max_uri: 4 * 1024,
        max_headers: 32,
        max_body: 0,
    };
    let open = Arc::new(AtomicUsize::new(0));
    let (max, timeout) = (cfg.max_connections, cfg.header_timeout.0);
    let token = cfg.token.clone().map(Arc::<str>::from);
    std::thread::Builder::new()
        .name("trireme-admin".into())
        .spawn(move || {
            while !sd.is_requested() {
                let mut s = match l.accept() {
                    Ok((s, _)) => s,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                };
                let _ = s.set_nonblocking(false);
                let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
                if open.load(Ordering::Acquire) >= max {
                    let _ = reply(
                        &mut s,
                        503,
                        "text/plain",
                        "too many admin connections\n",
                        &[],
                    );
                    continue;
                }
                open.fetch_add(1, Ordering::AcqRel);
                let (ctx, slot, token, limits) =
                    (ctx.clone(), open.clone(), token.clone(), limits.clone());
                let spawned = std::thread::Builder::new()
                    .name("trireme-admin-conn".into())
                    .spawn(move || {
                        let _ = serve(s, &ctx, &limits, timeout, token.as_deref());
                        slot.fetch_sub(1, Ordering::AcqRel);
                    });
                if spawned.is_err() {
                    open.fetch_sub(1, Ordering::AcqRel);
                }
            }
        })?;
    Ok(bound)
}

/// Read one request head (bounded in size and time), answer it, close.
fn serve(
    mut s: TcpStream,
    ctx: &ProxyContext,
    limits: &Limits,
    timeout: Duration,
    token: Option<&str>,
) -> std::io::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; MAX_HEAD];
    let mut len = 0;
    let head = loop {
        match parse_request(&buf[..len], limits) {
            Ok(Parsed::Complete(h)) => break h,
            Err(e) => {
                let why = format!("{}\n", e.why);
                reply(&mut s, e.status.code(), "text/plain", &why, &[])?;
                linger(&mut s);
                return Ok(());
            }
            Ok(Parsed::Partial) => {}
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let timed_out = left.is_zero()
            || len == buf.len()
            || match s.set_read_timeout(Some(left)).and(s.read(&mut buf[len..])) {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    len += n;
                    false
                }
                Err(e) => {
                    use std::io::ErrorKind::{TimedOut, WouldBlock};
                    if !matches!(e.kind(), WouldBlock | TimedOut) {
                        return Err(e);
                    }
                    true
                }
            };
        if timed_out {
            let why = "request head not received in time\n";
            return reply(&mut s, 408, "text/plain", why, &[]);
        }
    };
    let buf = &buf[..head.len];
    if let Some(t) = token {
        if !bearer_matches(&head, buf, t) {
            return reply(
                &mut s,
                401,
                "text/plain",
                "admin.token is set: send Authorization: Bearer TOKEN\n",
                &["WWW-Authenticate: Bearer realm=\"trireme-admin\""],
            );
        }
    }
    let target = String::from_utf8_lossy(head.target.get(buf)).into_owned();
    let method = String::from_utf8_lossy(head.method_span.get(buf)).into_owned();
    handle(&mut s, ctx, &method, &target)
}

/// After an error answer to a client still sending: stop writing, then read and drop what
/// it sends for a bounded while (1 s, 2 MiB), so closing with unread input does not reset
/// the connection before the answer is read (nginx's lingering close).
fn linger(s: &mut TcpStream) {
    let _ = s.shutdown(std::net::Shutdown::Write);
    let until = Instant::now() + Duration::from_secs(1);
    let mut sink = [0u8; 16 * 1024];
    let mut total = 0usize;
    while total < 2 << 20 {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match s.read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(n) => total += n,
        }
    }
}

/// `Authorization: Bearer TOKEN`, compared in constant time.
fn bearer_matches(h: &RequestHead, buf: &[u8], token: &str) -> bool {
    let Some(v) = h.header(buf, "authorization") else {
        return false;
    };
    let v = trireme_core::http1::head::trim(v);
    let Some(given) = v
        .get(..7)
        .filter(|p| p.eq_ignore_ascii_case(b"bearer "))
        .map(|_| trireme_core::http1::head::trim(&v[7..]))
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

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn reply(
    s: &mut TcpStream,
    status: u16,
    ctype: &str,
    body: &str,
    extra: &[&str],
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let date = trireme_core::http1::write::http_date(std::time::SystemTime::now());
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nDate: {}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n",
        String::from_utf8_lossy(&date),
        body.len()
    );
    for e in extra {
        head.push_str(e);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    head.push_str(body);
    s.write_all(head.as_bytes())
}

fn handle(
    s: &mut TcpStream,
    ctx: &ProxyContext,
    method: &str,
    target: &str,
) -> std::io::Result<()> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    match (method, path) {
        ("GET", "/metrics") => {
            let mut out = String::new();
            ctx.metrics.render(&mut out);
            render_upstreams(ctx, &mut out);
            if let Some(c) = &ctx.cache {
                c.render(&mut out);
            }
            reply(s, 200, "text/plain; version=0.0.4", &out, &[])
        }
        ("POST" | "PURGE", "/cache/purge") => {
            let Some(cache) = &ctx.cache else {
                return reply(
                    s,
                    404,
                    "application/json",
                    "{\"error\":\"no cache configured\"}\n",
                    &[],
                );
            };
            let mut url = None;
            let mut prefix = None;
            for kv in query.split('&') {
                match kv.split_once('=') {
                    Some(("url", v)) => url = Some(percent_decode(v)),
                    Some(("prefix", v)) => prefix = Some(percent_decode(v)),
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
                    reply(
                        s,
                        200,
                        "application/json",
                        &format!("{{\"purged\":{n}}}\n"),
                        &[],
                    )
                }
                Err(e) => reply(
                    s,
                    400,
                    "application/json",
                    &format!("{{\"error\":{:?}}}\n", e),
                    &[],
                ),
            }
        }
        (_, "/metrics" | "/cache/purge") => {
            reply(s, 405, "text/plain", "method not allowed\n", &[])
        }
        _ => reply(
            s,
            404,
            "text/plain",
            "endpoints: GET /metrics, POST /cache/purge?url=|prefix=\n",
            &[],
        ),
    }
}

/// Per-upstream health: backends taking requests, and picks made in panic mode.
fn render_upstreams(ctx: &ProxyContext, out: &mut String) {
    use std::fmt::Write;
    let now = Instant::now();
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
