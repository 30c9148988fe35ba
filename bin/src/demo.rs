//! Demo backends: small HTTP/1.1 servers on loopback (threads, std::net), used by the `demo`
//! command and by the black-box tests. Each records what it received.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request as the backend saw it.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    pub target: String,
    /// Header lines as received (name, value), in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Which accepted connection (0-based) carried it.
    pub conn: usize,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A running backend. Dropping it stops accepting and closes its connections.
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    pub received: Arc<Mutex<Vec<Received>>>,
    pub connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    /// `/gated/N` answers send half the body, then wait while this is closed (false).
    gate: Arc<AtomicBool>,
    /// Open connections (a handle each, for `kill`); removed when they end.
    conns: Arc<Mutex<std::collections::HashMap<usize, TcpStream>>>,
}

/// How the backend answers. `/status/NNN` answers NNN; `/bytes/N` answers N bytes;
/// `/chunked/N` answers N bytes chunked; `/slow/MS` waits MS ms; `/health` answers 200;
/// `/gated/N` answers N bytes, the second half only once the gate is open
/// ([`Backend::close_gate`]): the returned offset is where the answer waits for it.
/// Anything else: 200 with `hello from NAME`. Query parameters add caching fields:
/// `cc=max-age=60,public` (Cache-Control), `etag=v1` (ETag "v1"), `vary=Accept-Language`,
/// `lm=1` (a `Last-Modified` a year back: heuristically fresh for a day), `setcookie=a=b`
/// (Set-Cookie: a=b), `cdncc=max-age=60` (CDN-Cache-Control), `age=7200` (Age);
/// `reflect=NAME` answers `NAME: value` of the request (a backend that
/// trusts a forwarding field, for cache-poisoning tests); `slowcond=MS` waits MS ms before
/// answering a conditional request (a cache's validation or refresh).
/// A GET or HEAD whose `If-None-Match` names that ETag (or `*`) is answered 304.
fn respond(name: &str, r: &Received, out: &mut Vec<u8>) -> Option<usize> {
    let path = r.target.split('?').next().unwrap_or("");
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (first, arg) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut status = 200u16;
    let mut body: Vec<u8> = format!("hello from {name}\n").into_bytes();
    let mut chunked = false;
    let mut gated = false;
    match first {
        "status" => {
            status = arg.parse().unwrap_or(200);
            body = format!("status {status} from {name}\n").into_bytes();
        }
        "bytes" => body = pattern(arg.parse().unwrap_or(0)),
        "gated" => {
            body = pattern(arg.parse().unwrap_or(0));
            gated = true;
        }
        "chunked" => {
            body = pattern(arg.parse().unwrap_or(0));
            chunked = true;
        }
        "slow" => std::thread::sleep(Duration::from_millis(arg.parse().unwrap_or(100))),
        "echo" => body = r.body.clone(),
        _ => {}
    }
    let query = r.target.split_once('?').map_or("", |(_, q)| q);
    let conditional =
        r.header("if-none-match").is_some() || r.header("if-modified-since").is_some();
    if let Some(ms) = query.split('&').find_map(|kv| kv.strip_prefix("slowcond=")) {
        if conditional {
            std::thread::sleep(Duration::from_millis(ms.parse().unwrap_or(100)));
        }
    }
    if let Some(name) = query.split('&').find_map(|kv| kv.strip_prefix("reflect=")) {
        body = format!("{name}: {}\n", r.header(name).unwrap_or("-")).into_bytes();
    }
    let etag = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("etag="))
        .map(|v| format!("\"{v}\""));
    let matched = r.header("if-none-match").is_some_and(|inm| {
        inm.split(',')
            .map(str::trim)
            .any(|t| t == "*" || Some(t.trim_start_matches("W/")) == etag.as_deref())
    });
    if status == 200 && etag.is_some() && matched && (r.method == "GET" || r.method == "HEAD") {
        status = 304;
    }
    let reason = match status {
        200 => "OK",
        304 => "Not Modified",
        _ => "Status",
    };
    out.extend_from_slice(
        format!("HTTP/1.1 {status} {reason}\r\nX-Backend: {name}\r\nContent-Type: text/plain\r\n")
            .as_bytes(),
    );
    for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        let v = v.replace("%20", " ");
        match k {
            "cc" => out.extend_from_slice(format!("Cache-Control: {v}\r\n").as_bytes()),
            "etag" => out.extend_from_slice(format!("ETag: \"{v}\"\r\n").as_bytes()),
            "vary" => out.extend_from_slice(format!("Vary: {v}\r\n").as_bytes()),
            "setcookie" => out.extend_from_slice(format!("Set-Cookie: {v}\r\n").as_bytes()),
            "cdncc" => out.extend_from_slice(format!("CDN-Cache-Control: {v}\r\n").as_bytes()),
            "age" => out.extend_from_slice(format!("Age: {v}\r\n").as_bytes()),
            "lm" => {
                let a_year_ago = std::time::SystemTime::now() - Duration::from_secs(365 * 86400);
                let lm = trireme_core::cache::format_date(a_year_ago);
                out.extend_from_slice(format!("Last-Modified: {lm}\r\n").as_bytes());
            }
            _ => {}
        }
    }
    if r.method == "HEAD" || status == 204 || status == 304 {
        out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
        if status == 204 || status == 304 {
            out.truncate(out.len() - 2 - format!("Content-Length: {}\r\n", body.len()).len());
            out.extend_from_slice(b"\r\n");
        }
        return None;
    }
    if chunked {
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
        for c in body.chunks(8192) {
            out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
            out.extend_from_slice(c);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
    } else {
        out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
        out.extend_from_slice(&body);
    }
    gated.then(|| out.len() - body.len() / 2)
}

/// Deterministic body bytes: `i % 251` as a byte, so truncation or reordering shows.
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// Read a message head: the start line and the header fields, in order.
pub fn read_head(rd: &mut impl BufRead) -> Option<(String, Vec<(String, String)>)> {
    let mut line = String::new();
    if rd.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut headers = Vec::new();
    loop {
        let mut l = String::new();
        if rd.read_line(&mut l).ok()? == 0 {
            return None;
        }
        let l = l.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            break;
        }
        let (n, v) = l.split_once(':')?;
        headers.push((n.to_string(), v.trim().to_string()));
    }
    Some((line.trim_end().to_string(), headers))
}

fn find<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Read a body framed by Content-Length or chunked encoding; with neither, read to EOF when
/// `to_eof` (a response) or nothing (a request).
pub fn read_body(
    rd: &mut impl BufRead,
    headers: &[(String, String)],
    to_eof: bool,
) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    if let Some(cl) = find(headers, "content-length") {
        let n: usize = cl.parse().ok()?;
        body.resize(n, 0);
        rd.read_exact(&mut body).ok()?;
    } else if find(headers, "transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut sz = String::new();
            rd.read_line(&mut sz).ok()?;
            let n = usize::from_str_radix(sz.trim_end().split(';').next()?, 16).ok()?;
            if n == 0 {
                let mut end = String::new();
                rd.read_line(&mut end).ok()?;
                break;
            }
            let start = body.len();
            body.resize(start + n, 0);
            rd.read_exact(&mut body[start..]).ok()?;
            let mut crlf = [0u8; 2];
            rd.read_exact(&mut crlf).ok()?;
        }
    } else if to_eof {
        rd.read_to_end(&mut body).ok()?;
    }
    Some(body)
}

fn read_request(rd: &mut BufReader<TcpStream>, conn: usize) -> Option<Received> {
    let (line, headers) = read_head(rd)?;
    let mut it = line.split_whitespace();
    let method = it.next()?.to_string();
    let target = it.next()?.to_string();
    let body = read_body(rd, &headers, false)?;
    Some(Received {
        method,
        target,
        headers,
        body,
        conn,
    })
}

impl Backend {
    /// Start a backend on 127.0.0.1 (ephemeral port).
    pub fn start(name: &str) -> std::io::Result<Backend> {
        Self::start_on("127.0.0.1:0".parse().expect("addr"), name)
    }

    pub fn start_on(addr: SocketAddr, name: &str) -> std::io::Result<Backend> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let b = Backend {
            addr,
            name: name.to_string(),
            received: Arc::default(),
            connections: Arc::default(),
            stop: Arc::default(),
            gate: Arc::new(AtomicBool::new(true)),
            conns: Arc::default(),
        };
        let (name, received, connections, stop, conns, gate) = (
            b.name.clone(),
            b.received.clone(),
            b.connections.clone(),
            b.stop.clone(),
            b.conns.clone(),
            b.gate.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let (s, _) = match listener.accept() {
                    Ok(x) => x,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                };
                let _ = s.set_nonblocking(false);
                let _ = s.set_nodelay(true);
                let id = connections.fetch_add(1, Ordering::SeqCst);
                if let Ok(c) = s.try_clone() {
                    conns.lock().expect("lock").insert(id, c);
                }
                let (name, received, stop) = (name.clone(), received.clone(), stop.clone());
                let gate = gate.clone();
                let conns = conns.clone();
                std::thread::spawn(move || {
                    // Forget this connection's handle when it ends (no descriptor leak).
                    struct Forget(
                        Arc<Mutex<std::collections::HashMap<usize, TcpStream>>>,
                        usize,
                    );
                    impl Drop for Forget {
                        fn drop(&mut self) {
                            if let Ok(mut m) = self.0.lock() {
                                m.remove(&self.1);
                            }
                        }
                    }
                    let _forget = Forget(conns, id);
                    let mut w = match s.try_clone() {
                        Ok(w) => w,
                        Err(_) => return,
                    };
                    let mut rd = BufReader::new(s);
                    let mut out = Vec::new();
                    while let Some(r) = read_request(&mut rd, id) {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        out.clear();
                        let wait_at = respond(&name, &r, &mut out);
                        let close = r
                            .header("connection")
                            .is_some_and(|c| c.eq_ignore_ascii_case("close"));
                        received.lock().expect("lock").push(r);
                        let mut from = 0;
                        if let Some(at) = wait_at {
                            if w.write_all(&out[..at]).is_err() {
                                return;
                            }
                            from = at;
                            // Bounded: a test that forgets to open the gate still ends.
                            let until = std::time::Instant::now() + Duration::from_secs(30);
                            while !gate.load(Ordering::SeqCst)
                                && !stop.load(Ordering::Relaxed)
                                && std::time::Instant::now() < until
                            {
                                std::thread::sleep(Duration::from_millis(2));
                            }
                        }
                        if w.write_all(&out[from..]).is_err() || close {
                            return;
                        }
                    }
                });
            }
        });
        Ok(b)
    }

    /// `/gated/N` answers stop halfway until [`open_gate`](Self::open_gate).
    pub fn close_gate(&self) {
        self.gate.store(false, Ordering::SeqCst);
    }

    pub fn open_gate(&self) {
        self.gate.store(true, Ordering::SeqCst);
    }

    pub fn requests(&self) -> Vec<Received> {
        self.received.lock().expect("lock").clone()
    }

    /// Stop accepting and reset every open connection (like a crashed process).
    pub fn kill(&self) {
        self.stop.store(true, Ordering::Relaxed);
        for (_, c) in self.conns.lock().expect("lock").drain() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        // Unblock the accept loop's listener by connecting once; it exits on `stop`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(50));
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `demo`: three backends named backend-1..N and the proxy in front of them.
pub fn run(
    rt: &crate::runtimes::Runtime,
    listen: &str,
    n: usize,
    algorithm: &str,
) -> Result<(), String> {
    let n = n.clamp(1, 64);
    let backends: Vec<Backend> = (1..=n)
        .map(|i| Backend::start(&format!("backend-{i}")))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot start demo backends: {e}"))?;
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    crate::cli::run_demo_proxy(rt, listen, &addrs, algorithm)
}
