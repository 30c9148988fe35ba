//! Process-level services shared by every event model: listening sockets (one per worker
//! with SO_REUSEPORT), signals, the open-files limit, and active health checks.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use trireme_core::http1::head::{probe_status, Parsed};
use trireme_core::proxy::ProxyContext;
use trireme_core::shutdown::Shutdown;
use trireme_core::upstream::HealthChecker;

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
/// is logged and ignored until config reload exists: its default action would kill the
/// process and every request in flight.
pub fn spawn_signal_thread(sd: Arc<Shutdown>) -> io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    std::thread::Builder::new()
        .name("trireme-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == SIGHUP {
                    tracing::warn!(
                        "SIGHUP received: reload is not supported yet; ignored (restart to apply a new config)"
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

/// One thread per upstream with active health checks; each probe runs on a short-lived
/// thread with blocking sockets and the probe's timeout, so a black-holed backend delays
/// no other. Results update the upstream's shared state, which every worker reads.
pub fn spawn_health_checks(ctx: &ProxyContext, sd: Arc<Shutdown>) -> io::Result<()> {
    for up in &ctx.upstreams {
        let Some(cfg) = up.cfg.active.clone() else {
            continue;
        };
        let mut hc = HealthChecker::new(up.clone(), cfg, Instant::now());
        let sd = sd.clone();
        std::thread::Builder::new()
            .name("trireme-health".into())
            .spawn(move || {
                let (tx, rx) = mpsc::channel::<(usize, Option<u16>)>();
                while !sd.is_requested() {
                    let now = Instant::now();
                    while let Some(p) = hc.poll_probe(now) {
                        let req = hc.request(p.backend).to_vec();
                        let tx = tx.clone();
                        let spawned = std::thread::Builder::new()
                            .name("trireme-probe".into())
                            .spawn(move || {
                                let st = probe(p.addr, &req, p.timeout);
                                let _ = tx.send((p.backend, st));
                            });
                        if spawned.is_err() {
                            hc.on_result(p.backend, None, now);
                        }
                    }
                    let next = hc.next_deadline().unwrap_or(now + Duration::from_secs(1));
                    // Wake at least every 200 ms to notice shutdown.
                    let wait = next
                        .saturating_duration_since(Instant::now())
                        .min(Duration::from_millis(200));
                    if let Ok((b, st)) = rx.recv_timeout(wait) {
                        hc.on_result(b, st, Instant::now());
                    }
                }
            })?;
    }
    Ok(())
}

/// Send one probe request; the status code, or None on any failure within `timeout`.
fn probe(addr: SocketAddr, req: &[u8], timeout: Duration) -> Option<u16> {
    let deadline = Instant::now() + timeout;
    let mut s = TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    s.write_all(req).ok()?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .ok()?;
        let n = s.read(&mut chunk).ok()?;
        buf.extend_from_slice(&chunk[..n]);
        match probe_status(&buf) {
            Parsed::Complete(r) => return r.ok(),
            Parsed::Partial if n == 0 => return None,
            Parsed::Partial => {}
        }
    }
}
