//! The admin listener: operators' endpoints on their own socket (loopback by default),
//! served by one blocking thread whatever the event model, since they act on state every
//! worker shares.
//!
//! - `GET /metrics`: Prometheus text (proxy and cache counters).
//! - `POST /cache/purge?url=http://host/path`: drop that URL (every variant).
//! - `POST /cache/purge?prefix=http://host/path`: drop every URL starting with it.
//!
//! Answers are small JSON or text; bad requests get 400, unknown paths 404, other methods
//! 405.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;
use trireme_core::proxy::ProxyContext;
use trireme_core::shutdown::Shutdown;

/// Bind `addr` and serve the admin endpoints until shutdown.
pub fn spawn(
    addr: SocketAddr,
    ctx: Arc<ProxyContext>,
    sd: Arc<Shutdown>,
) -> std::io::Result<SocketAddr> {
    let l = TcpListener::bind(addr)?;
    let bound = l.local_addr()?;
    l.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("trireme-admin".into())
        .spawn(move || {
            while !sd.is_requested() {
                match l.accept() {
                    Ok((s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                        let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
                        let _ = handle(s, &ctx);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        })?;
    Ok(bound)
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

fn reply(s: &mut TcpStream, status: &str, ctype: &str, body: &str) -> std::io::Result<()> {
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn handle(mut s: TcpStream, ctx: &ProxyContext) -> std::io::Result<()> {
    let mut rd = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    rd.read_line(&mut line)?;
    // Drain the head (no bodies are taken).
    loop {
        let mut l = String::new();
        if rd.read_line(&mut l)? == 0 || l == "\r\n" || l == "\n" {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    match (method, path) {
        ("GET", "/metrics") => {
            let mut out = String::new();
            ctx.metrics.render(&mut out);
            if let Some(c) = &ctx.cache {
                c.render(&mut out);
            }
            reply(&mut s, "200 OK", "text/plain; version=0.0.4", &out)
        }
        ("POST" | "PURGE", "/cache/purge") => {
            let Some(cache) = &ctx.cache else {
                return reply(
                    &mut s,
                    "404 Not Found",
                    "application/json",
                    "{\"error\":\"no cache configured\"}\n",
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
                        &mut s,
                        "200 OK",
                        "application/json",
                        &format!("{{\"purged\":{n}}}\n"),
                    )
                }
                Err(e) => reply(
                    &mut s,
                    "400 Bad Request",
                    "application/json",
                    &format!("{{\"error\":{:?}}}\n", e),
                ),
            }
        }
        (_, "/metrics" | "/cache/purge") => reply(
            &mut s,
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n",
        ),
        _ => reply(
            &mut s,
            "404 Not Found",
            "text/plain",
            "endpoints: GET /metrics, POST /cache/purge?url=|prefix=\n",
        ),
    }
}
