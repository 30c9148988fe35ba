//! The cost floor of any proxy on the benchmark harness: a byte relay that does nothing but
//! the socket calls of a request (read the client, write the backend, read the backend,
//! write the client; for a new client connection also its accept and close) on one
//! edge-triggered epoll loop. No parsing, no routing, no timers, no allocation per request.
//! It is not a proxy (no HTTP at all): it measures what the kernel charges a proxy's core for
//! the socket work of a request, which no proxy can go below.
//!
//! Backend connections are pooled like a proxy's: a client connection takes an idle one
//! (and opens one only when none is idle), and gives it back when the client goes. So that
//! a client's `Connection: close` does not close the backend connection too, the relay
//! renames that field on the way to the backend (`Xonnection: close`, same length) and puts
//! it back on the way to the client (`Connection: close` padded with spaces over the
//! backend's `Connection: keep-alive`): a byte search, no parsing, and only in the first
//! read of each direction. After such an answer the relay closes the client connection
//! itself once the answer's `Content-Length` bytes went (the one number it reads), as a
//! proxy does: the server side closes first. (Left to the client, the close put the relay's
//! p99 at 49 ms and its requests per second a fifth below nginx's: the close-small anomaly
//! of earlier runs.) A new client connection then costs what it costs
//! any pooling proxy: accept, the four calls, close.
//!
//!   cargo build --release --example floor-relay
//!   target/release/examples/floor-relay --listen 127.0.0.1:PORT --backend http://127.0.0.1:B
//!
//! (`benches/floor.sh` runs it beside trireme, nginx and HAProxy in the shared harness.)

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;

struct Client {
    stream: TcpStream,
    /// The backend connection it uses (a key into the backends).
    backend: usize,
    /// It asked for `Connection: close`: say so in the answer.
    closing: bool,
    /// The first read of each direction was looked at already.
    seen_request: bool,
    seen_response: bool,
    /// With `closing`: the bytes of the answer still to come (from its `Content-Length`),
    /// after which the relay closes the client, as a proxy does after a `Connection: close`
    /// exchange (the server side closes first, so the TIME_WAIT stays on the proxy's side).
    answer_left: Option<usize>,
}

struct Backend {
    stream: TcpStream,
    owner: Option<usize>,
}

const LISTENER: Token = Token(usize::MAX);

fn arg(name: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    let i = args
        .iter()
        .position(|a| a == name)
        .unwrap_or_else(|| panic!("missing {name}"));
    args[i + 1].clone()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// What to do with each chunk moved: rewrite it in place (first chunk only).
enum Rewrite<'a> {
    Request(&'a mut bool, &'a mut bool),
    Response(bool, &'a mut bool, &'a mut Option<usize>),
}

/// The length of a whole answer in `b` (its head and `Content-Length` body), if `b` holds
/// the head: a byte search, no parsing beyond the one number.
fn answer_len(b: &[u8]) -> Option<usize> {
    let head = find(b, b"\r\n\r\n")? + 4;
    let at = find(&b[..head], b"\r\nContent-Length: ")? + 18;
    let digits = b[at..head].iter().take_while(|c| c.is_ascii_digit());
    let len = digits.fold(0usize, |n, &c| n * 10 + usize::from(c - b'0'));
    Some(head + len)
}

impl Rewrite<'_> {
    fn apply(&mut self, b: &mut [u8]) {
        match self {
            Rewrite::Request(seen, closing) => {
                if !**seen {
                    **seen = true;
                    if let Some(i) = find(b, b"\r\nConnection: close") {
                        b[i + 2] = b'X';
                        **closing = true;
                    }
                }
            }
            Rewrite::Response(closing, seen, left) => {
                if !*closing {
                    return;
                }
                if !**seen {
                    **seen = true;
                    if let Some(i) = find(b, b"\r\nConnection: keep-alive") {
                        b[i + 2..i + 24].copy_from_slice(b"Connection: close     ");
                    }
                    **left = answer_len(b);
                }
                if let Some(n) = left {
                    *n = n.saturating_sub(b.len());
                }
            }
        }
    }
}

/// Move what `from` has to `to` until `from` would block. False when `from` is done.
fn pump(from: &mut TcpStream, to: &mut TcpStream, buf: &mut [u8], mut rw: Rewrite<'_>) -> bool {
    loop {
        match from.read(buf) {
            Ok(0) => return false,
            Ok(n) => {
                rw.apply(&mut buf[..n]);
                if to.write_all(&buf[..n]).is_err() {
                    return false;
                }
                if n < buf.len() {
                    return true; // short read: drained (edge-triggered, like trireme-mio)
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

fn main() -> std::io::Result<()> {
    let listen: SocketAddr = arg("--listen").parse().expect("--listen IP:PORT");
    let backend: SocketAddr = arg("--backend")
        .trim_start_matches("http://")
        .parse()
        .expect("--backend http://IP:PORT");
    let mut poll = Poll::new()?;
    let mut listener = TcpListener::bind(listen)?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut clients: slab::Slab<Client> = slab::Slab::new();
    let mut backends: slab::Slab<Backend> = slab::Slab::new();
    let mut idle: Vec<usize> = Vec::new();
    let mut events = Events::with_capacity(256);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match poll.poll(&mut events, None) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for ev in events.iter() {
            if ev.token() == LISTENER {
                while let Ok((mut client, _)) = listener.accept() {
                    client.set_nodelay(true)?;
                    let e = clients.vacant_entry();
                    let k = e.key();
                    let b = match idle.pop() {
                        Some(b) => b,
                        None => {
                            // Blocking connect on loopback, then non-blocking: set-up only.
                            let s = std::net::TcpStream::connect(backend)?;
                            s.set_nodelay(true)?;
                            s.set_nonblocking(true)?;
                            let mut stream = TcpStream::from_std(s);
                            let be = backends.vacant_entry();
                            poll.registry().register(
                                &mut stream,
                                Token(2 * be.key() + 1),
                                Interest::READABLE,
                            )?;
                            let b = be.key();
                            be.insert(Backend {
                                stream,
                                owner: None,
                            });
                            b
                        }
                    };
                    backends[b].owner = Some(k);
                    poll.registry()
                        .register(&mut client, Token(2 * k), Interest::READABLE)?;
                    e.insert(Client {
                        stream: client,
                        backend: b,
                        closing: false,
                        seen_request: false,
                        seen_response: false,
                        answer_left: None,
                    });
                }
                continue;
            }
            let t = ev.token().0;
            if t % 2 == 0 {
                let k = t / 2;
                let Some(c) = clients.get_mut(k) else {
                    continue;
                };
                let b = &mut backends[c.backend];
                let rw = Rewrite::Request(&mut c.seen_request, &mut c.closing);
                if !pump(&mut c.stream, &mut b.stream, &mut buf, rw) {
                    // The client went: its backend connection goes back to the pool.
                    // (Closing a socket takes it out of the epoll set: no deregister call.)
                    let c = clients.remove(k);
                    backends[c.backend].owner = None;
                    idle.push(c.backend);
                }
            } else {
                let bk = t / 2;
                let Some(b) = backends.get_mut(bk) else {
                    continue;
                };
                let alive = match b.owner {
                    Some(k) => {
                        let c = &mut clients[k];
                        let rw =
                            Rewrite::Response(c.closing, &mut c.seen_response, &mut c.answer_left);
                        let alive = pump(&mut b.stream, &mut c.stream, &mut buf, rw);
                        if alive && c.answer_left == Some(0) {
                            // The whole answer went: close the client, keep the backend.
                            clients.remove(k);
                            b.owner = None;
                            idle.push(bk);
                            continue;
                        }
                        alive
                    }
                    // Idle: only its close (or stray bytes) wakes it; either way it goes.
                    None => false,
                };
                if !alive {
                    let b = backends.remove(bk);
                    idle.retain(|&i| i != bk);
                    if let Some(k) = b.owner {
                        clients.remove(k);
                    }
                }
            }
        }
    }
}
