//! The L2 writer and subscriber threads: each drives one of core's sans-IO conversations
//! with Redis (`trireme_core::cache::l2_conn`: the [`Writer`] carries out the cache's queued
//! L2 work, `HSET` of what L1 stores and deletions for invalidations and purges, announced
//! to the other instances; the [`Subscriber`] applies the other instances' deletions to L1)
//! over a blocking connection, off the request path and whatever the event model. What is
//! sent, what each reply means and what a failure does to the queued work are core's; this
//! file only moves bytes, keeps time and logs.
//!
//! Redis down: writes are dropped (and counted); deletions wait at the head of the queue
//! and are retried every second, and until one is done lookups of the keys it covers skip
//! L2, so an invalidated entry never comes back from Redis.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};
use trireme_core::cache::http::HttpCache;
use trireme_core::cache::l2::L2;
use trireme_core::cache::l2_conn::{SubError, Subscriber, Writer};
use trireme_core::shutdown::Shutdown;

/// Connect and I/O time allowed per command (writes may be large; not on a request path).
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Wait before trying Redis again after a failure.
const RETRY: Duration = Duration::from_secs(1);
/// Wait before subscribing again after Redis refused it (a permission, not an outage).
const REFUSED_RETRY: Duration = Duration::from_secs(30);
/// How often the subscriber looks up from its socket for a shutdown.
const LISTEN_TICK: Duration = Duration::from_millis(250);

/// Start the writer when L2 is configured.
pub fn spawn(cache: Option<&Arc<HttpCache>>, sd: Arc<Shutdown>) -> std::io::Result<()> {
    let Some(cache) = cache.filter(|c| c.l2.is_some()).cloned() else {
        return Ok(());
    };
    // Tells this instance's invalidation messages from the others'.
    let me = instance_id();
    let (c3, me3, sd3) = (cache.clone(), me.clone(), sd.clone());
    std::thread::Builder::new()
        .name("trireme-l2-sub".into())
        .spawn(move || subscriber(&c3, &me3, &sd3))?;
    let c2 = cache.clone();
    let t = std::thread::Builder::new()
        .name("trireme-l2".into())
        .spawn(move || {
            if let Some(l2) = c2.l2.as_ref() {
                writer(l2, &me, &sd);
            }
        })?;
    let th = t.thread().clone();
    if let Some(l2) = &cache.l2 {
        l2.set_writer(move || th.unpark());
    }
    Ok(())
}

/// The writer thread: one connection at a time, opened when there is work, kept while it
/// works.
fn writer(l2: &L2, me: &[u8], sd: &Shutdown) {
    let mut sock: Option<TcpStream> = None;
    let mut w: Option<Writer> = None;
    // Logged when it changes, not per failed op.
    let mut healthy = true;
    while !sd.is_requested() {
        let cur = w.get_or_insert_with(|| Writer::new(l2, me));
        if !cur.refill(l2) && !cur.awaits_reply() {
            std::thread::park_timeout(Duration::from_millis(500));
            continue;
        }
        let res = match sock.as_mut() {
            Some(s) => converse(s, cur, l2),
            None => match open(l2) {
                Ok(s) => converse(sock.insert(s), cur, l2),
                Err(e) => {
                    // Nothing can be written now: what is queued is dropped, deletions wait.
                    l2.drop_writes();
                    Err(e)
                }
            },
        };
        match res {
            Ok(()) if !healthy => {
                healthy = true;
                tracing::info!(redis = %l2.addr, "L2 writer: Redis answers again");
            }
            Ok(()) => {}
            Err(e) => {
                sock = None;
                if let Some(cur) = w.take() {
                    cur.fail(l2, &e.to_string());
                }
                if std::mem::replace(&mut healthy, false) {
                    tracing::warn!(redis = %l2.addr, error = %e, "L2 writer: Redis failed; writes are dropped and deletions retried every second until it answers");
                }
                // A refusing or vanished Redis is not retried in a tight loop.
                std::thread::park_timeout(RETRY);
            }
        }
    }
}

/// Write what the writer has, read its replies, until its op is done.
fn converse(s: &mut TcpStream, w: &mut Writer, l2: &L2) -> std::io::Result<()> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        while !w.pending().is_empty() {
            let n = s.write(w.pending())?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            w.wrote(n);
        }
        if !w.awaits_reply() {
            return Ok(());
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        w.on_read(l2, &chunk[..n]).map_err(std::io::Error::other)?;
    }
}

fn open(l2: &L2) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&l2.addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Distinct per process (and per start): pid, start time, and the process's random hash
/// keys.
fn instance_id() -> Vec<u8> {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    std::process::id().hash(&mut h);
    std::time::SystemTime::now().hash(&mut h);
    format!("{:016x}", h.finish()).into_bytes()
}

/// The subscriber: applies other instances' deletions to L1, reconnecting (each
/// [`RETRY`]) while Redis is away.
fn subscriber(cache: &HttpCache, me: &[u8], sd: &Shutdown) {
    let Some(l2) = cache.l2.as_ref() else { return };
    let mut healthy = true;
    while !sd.is_requested() {
        let res = listen(cache, l2, me, sd, &mut healthy);
        if sd.is_requested() {
            return;
        }
        let wait = match res {
            Ok(()) => RETRY,
            Err(e) => {
                if std::mem::replace(&mut healthy, false) {
                    tracing::warn!(redis = %l2.addr, error = %e, "L2 subscriber: no subscription; invalidations by other instances are not received until it works (channel {:?})", String::from_utf8_lossy(&l2.channel()));
                }
                // Refused (an ACL user without the channel): asked again, but seldom.
                match e {
                    SubError::Refused(_) => REFUSED_RETRY,
                    SubError::Broken(_) => RETRY,
                }
            }
        };
        let until = Instant::now() + wait;
        while Instant::now() < until && !sd.is_requested() {
            std::thread::sleep(LISTEN_TICK);
        }
    }
}

/// One subscription, until it fails or shutdown.
fn listen(
    cache: &HttpCache,
    l2: &L2,
    me: &[u8],
    sd: &Shutdown,
    healthy: &mut bool,
) -> Result<(), SubError> {
    let io = |e: std::io::Error| SubError::Broken(e.to_string());
    let mut s = open(l2).map_err(io)?;
    let mut sub = Subscriber::new(l2, me);
    s.write_all(sub.pending()).map_err(io)?;
    let n = sub.pending().len();
    sub.wrote(n);
    s.set_read_timeout(Some(LISTEN_TICK)).map_err(io)?;
    // The login and the subscription are answered within the I/O time allowed.
    let asked = Instant::now();
    let mut chunk = [0u8; 16 * 1024];
    while !sd.is_requested() {
        match s.read(&mut chunk) {
            Ok(0) => return Err(SubError::Broken("Redis closed the connection".into())),
            Ok(n) => {
                if sub.on_read(cache, &chunk[..n])? && !std::mem::replace(healthy, true) {
                    tracing::info!(redis = %l2.addr, "L2 subscriber: subscribed again (invalidations sent meanwhile are not replayed)");
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if !sub.is_subscribed() && asked.elapsed() > IO_TIMEOUT {
                    return Err(SubError::Broken("no answer to SUBSCRIBE".into()));
                }
            }
            Err(e) => return Err(io(e)),
        }
    }
    Ok(())
}
