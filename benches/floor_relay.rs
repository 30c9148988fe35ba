//! The cost floor of any proxy on the benchmark harness: a byte relay that does nothing but
//! the four socket calls per keep-alive request (read the client, write the backend, read the
//! backend, write the client) on one edge-triggered epoll loop. No parsing, no routing, no
//! timers, no allocation per request; each client connection gets its own backend connection.
//! It is not a proxy (no HTTP at all): it measures what the kernel charges a proxy's core for
//! the socket work of a request, which no proxy can go below.
//!
//!   cargo build --release --example floor-relay
//!   target/release/examples/floor-relay --listen 127.0.0.1:PORT --backend http://127.0.0.1:B
//!
//! (`benches/floor.sh` runs it beside trireme-mio, nginx and HAProxy in the shared harness.)

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;

struct Pair {
    client: TcpStream,
    backend: TcpStream,
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

/// Move what `from` has to `to` until `from` would block. False when the pair is done.
fn pump(from: &mut TcpStream, to: &mut TcpStream, buf: &mut [u8]) -> bool {
    loop {
        match from.read(buf) {
            Ok(0) => return false,
            Ok(n) => {
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
    let mut pairs: slab::Slab<Pair> = slab::Slab::new();
    let mut events = Events::with_capacity(256);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        poll.poll(&mut events, None)?;
        for ev in events.iter() {
            if ev.token() == LISTENER {
                while let Ok((mut client, _)) = listener.accept() {
                    // Blocking connect on loopback, then non-blocking: set-up only.
                    let b = std::net::TcpStream::connect(backend)?;
                    b.set_nodelay(true)?;
                    b.set_nonblocking(true)?;
                    let mut backend = TcpStream::from_std(b);
                    client.set_nodelay(true)?;
                    let e = pairs.vacant_entry();
                    let k = e.key();
                    poll.registry()
                        .register(&mut client, Token(2 * k), Interest::READABLE)?;
                    poll.registry()
                        .register(&mut backend, Token(2 * k + 1), Interest::READABLE)?;
                    e.insert(Pair { client, backend });
                }
                continue;
            }
            let k = ev.token().0 / 2;
            let Some(p) = pairs.get_mut(k) else { continue };
            let alive = if ev.token().0 % 2 == 0 {
                pump(&mut p.client, &mut p.backend, &mut buf)
            } else {
                pump(&mut p.backend, &mut p.client, &mut buf)
            };
            if !alive {
                let mut p = pairs.remove(k);
                let _ = poll.registry().deregister(&mut p.client);
                let _ = poll.registry().deregister(&mut p.backend);
            }
        }
    }
}
