//! What trireme's runtime crates share below the session: a read into a buffer's spare
//! capacity, the liveness probe of idle pooled connections, and worker threads joined with
//! one drain report. (Decisions live in trireme-core; this crate only touches the OS.)

#![deny(clippy::print_stdout, clippy::print_stderr)]

use bytes::BytesMut;
use std::io;
use std::os::fd::RawFd;
use std::thread::JoinHandle;
use trireme_core::upstream::Liveness;

/// Look at an idle socket without consuming anything: one non-blocking `recv` of a byte
/// with `MSG_PEEK`. Bytes waiting: [`Liveness::Unread`]; end of stream, a reset or any
/// other error: [`Liveness::Closed`]; would block: [`Liveness::Quiet`]. One system call,
/// paid on every reuse of a pooled connection (core's [`trireme_core::upstream::Pool`]
/// asks for it).
pub fn peek_idle(fd: RawFd) -> Liveness {
    let mut b = 0u8;
    loop {
        // SAFETY: a one-byte peek into a local.
        let n = unsafe {
            libc::recv(
                fd,
                (&mut b as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        return match n {
            1.. => Liveness::Unread,
            0 => Liveness::Closed,
            _ => match io::Error::last_os_error().kind() {
                io::ErrorKind::WouldBlock => Liveness::Quiet,
                io::ErrorKind::Interrupted => continue,
                _ => Liveness::Closed,
            },
        };
    }
}

/// One `read(2)` from `fd` into the spare capacity of `b`. `Ok((n, room))`: the bytes read
/// and the room that was offered (`n < room` on a stream socket: its queue is drained).
pub fn read_spare(fd: RawFd, b: &mut BytesMut) -> io::Result<(usize, usize)> {
    let spare = b.spare_capacity_mut();
    let room = spare.len();
    // SAFETY: the kernel writes at most `room` bytes into the spare capacity, and exactly
    // the `n` it reports are marked initialized below.
    let n = unsafe { libc::read(fd, spare.as_mut_ptr().cast(), room) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: see above.
    unsafe { b.set_len(b.len() + n) };
    Ok((n, room))
}

/// Shut a connected socket down both ways without closing its descriptor: whoever owns
/// it sees the end of its input on its next read and closes it the usual way. Used to
/// make room at `max_connections` by ending the connection idle the longest (the caller
/// knows the descriptor is still open: see `trireme_core::admission`).
pub fn shutdown_fd(fd: RawFd) {
    // SAFETY: shutdown(2) touches no memory; on a stale descriptor it fails harmlessly.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

/// Join the worker threads; each returns how many connections its drain timeout cut off.
/// Logs the outcome of the drain once for the process.
pub fn join_workers(threads: Vec<JoinHandle<io::Result<usize>>>) -> io::Result<()> {
    let mut res = Ok(());
    let mut left = 0;
    for t in threads {
        match t.join() {
            Ok(Ok(n)) => left += n,
            Ok(Err(e)) => res = Err(e),
            Err(_) => res = Err(io::Error::other("worker thread panicked")),
        }
    }
    if left > 0 {
        tracing::warn!(
            connections = left,
            "drain timeout reached; closed remaining connections"
        );
    } else if res.is_ok() {
        tracing::info!("drained; exiting");
    }
    res
}

/// The sockets a runtime serves until shutdown: the proxy's listeners (one per worker on
/// the thread-per-core runtimes) and, optionally, an admin listener, served beside them
/// (on the first worker of mio and monoio; by tokio's workers) with sessions of the admin
/// context
/// (`trireme_core::admin::context`).
pub struct Listeners {
    pub proxy: Vec<std::net::TcpListener>,
    pub admin: Option<AdminListener>,
}

pub struct AdminListener {
    pub listener: std::net::TcpListener,
    pub ctx: std::sync::Arc<trireme_core::ProxyContext>,
}

impl Listeners {
    /// Only the proxy's listeners.
    pub fn proxy(proxy: Vec<std::net::TcpListener>) -> Self {
        Listeners { proxy, admin: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn peek_tells_quiet_unread_and_closed_apart() {
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = b.as_raw_fd();
        assert_eq!(peek_idle(fd), Liveness::Quiet);
        a.write_all(b"x").unwrap();
        assert_eq!(peek_idle(fd), Liveness::Unread);
        assert_eq!(peek_idle(fd), Liveness::Unread, "a peek consumes nothing");
        let mut got = [0u8; 1];
        std::io::Read::read(&mut &b, &mut got).unwrap();
        assert_eq!(peek_idle(fd), Liveness::Quiet);
        drop(a);
        assert_eq!(peek_idle(fd), Liveness::Closed);
    }

    #[test]
    fn short_read_reports_room() {
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.write_all(b"hello").unwrap();
        let mut buf = BytesMut::with_capacity(64);
        buf.extend_from_slice(b">");
        let (n, room) = read_spare(b.as_raw_fd(), &mut buf).unwrap();
        assert_eq!(n, 5);
        assert!(room >= 63);
        assert_eq!(&buf[..], b">hello");
    }
}
