//! Process-level services shared by every event model: listening sockets (one per worker
//! with SO_REUSEPORT), signals and the open-files limit. (Active health checks run on the
//! runtimes' own workers: core's `upstream::Health`.)

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use trireme_core::shutdown::Shutdown;

/// `n` listening sockets on `addr`. With more than one, each has SO_REUSEPORT so the kernel
/// spreads new connections over the workers' own accept queues (port 0: the first socket
/// picks the port, the others join it).
///
/// SO_REUSEPORT would also let the group join a port that another process (of the same
/// user) already listens on with it, splitting traffic between the two silently. So the
/// port is first claimed by a socket without SO_REUSEPORT, which fails with "address in
/// use" where anyone listens, as nginx and HAProxy do; the group binds once it is closed.
pub fn bind_listeners(addr: SocketAddr, n: usize) -> io::Result<Vec<TcpListener>> {
    use socket2::{Domain, Socket, Type};
    let mut out = Vec::with_capacity(n);
    let mut at = addr;
    if n > 1 {
        let probe = Socket::new(Domain::for_address(at), Type::STREAM, None)?;
        probe.set_reuse_address(true)?;
        probe.bind(&at.into()).map_err(in_use)?;
        if at.port() == 0 {
            at = probe
                .local_addr()?
                .as_socket()
                .ok_or_else(|| io::Error::other("not an IP socket"))?;
        }
    }
    for _ in 0..n.max(1) {
        let s = Socket::new(Domain::for_address(at), Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        if n > 1 {
            s.set_reuse_port(true)?;
        }
        s.set_nonblocking(true)?;
        s.bind(&at.into()).map_err(in_use)?;
        s.listen(4096)?;
        let l: TcpListener = s.into();
        at = l.local_addr()?;
        out.push(l);
    }
    Ok(out)
}

/// Bind with `bind`, trying again for up to a second while the address is in use, as nginx
/// does (five tries, 500 ms apart): a process just killed may hold its sockets a moment
/// longer (io_uring releases a ring's files after the process is gone).
pub fn bind_retrying<T>(mut bind: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    let mut tries = 0;
    loop {
        match bind() {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && tries < 10 => {
                if tries == 0 {
                    tracing::warn!(error = %e, "address in use; trying again for a second");
                }
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            r => return r,
        }
    }
}

fn in_use(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::AddrInUse {
        io::Error::new(
            e.kind(),
            format!(
                "{e}: another process listens on this port (stop it, or pick another --listen)"
            ),
        )
    } else {
        e
    }
}

/// SIGTERM or SIGINT requests a graceful shutdown; a second one is logged and ignored
/// (the drain timeout bounds the wait). SIGHUP, which an nginx unit file sends to reload,
/// runs `on_hup` (the TLS certificates are read again) and is otherwise logged and ignored
/// until config reload exists: its default action would kill the process and every
/// request in flight.
pub fn spawn_signal_thread(
    sd: Arc<Shutdown>,
    on_hup: Option<Box<dyn Fn() + Send>>,
) -> io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    std::thread::Builder::new()
        .name("trireme-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == SIGHUP {
                    if let Some(f) = &on_hup {
                        f();
                    }
                    tracing::warn!(
                        "SIGHUP received: config reload is not supported yet (restart to apply a new config)"
                    );
                    continue;
                }
                let name = if sig == SIGTERM { "SIGTERM" } else { "SIGINT" };
                if sd.is_requested() {
                    tracing::info!("{name} received; already draining");
                } else {
                    tracing::info!("{name} received");
                    sd.request();
                }
            }
        })?;
    Ok(())
}

/// Raise the open-files limit toward `want` (the hard limit too, where the process may),
/// and return the soft limit now in force.
pub fn raise_open_files(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return u64::MAX;
    }
    if lim.rlim_cur >= want {
        return lim.rlim_cur;
    }
    for max in [lim.rlim_max.max(want), lim.rlim_max] {
        let raised = libc::rlimit {
            rlim_cur: want.min(max),
            rlim_max: max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return raised.rlim_cur;
        }
    }
    lim.rlim_cur
}

/// Descriptors needed for `max_connections` client connections, each holding at most one
/// upstream connection, plus pooled ones and the reserve.
pub fn fds_needed(max_connections: usize, pooled: usize) -> u64 {
    (max_connections as u64)
        .saturating_mul(2)
        .saturating_add(pooled as u64)
        .saturating_add(trireme_core::config::RESERVED_FDS)
}
