//! The L2 writer: carries out the cache's queued L2 work (`HSET` of what L1 stores,
//! deletions for invalidations and purges) on one thread with a blocking Redis
//! connection, off the request path and whatever the event model. Commands and replies
//! come from core (`trireme_core::cache::l2`); this file only moves bytes.
//!
//! Redis down: writes are dropped (and counted); deletions wait at the head of the
//! queue and are retried every second, and until one is done lookups of the keys it
//! covers skip L2, so an invalidated entry never comes back from Redis.
//!
//! Instances sharing the Redis tell each other: after a deletion the writer publishes it
//! on the tier's channel, and a subscriber thread drops what other instances deleted from
//! this instance's L1. Messages published while this instance's subscription is down are
//! not replayed (Pub/Sub keeps nothing): those L1 copies live out their freshness.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;
use trireme_core::cache::http::HttpCache;
use trireme_core::cache::l2::{encode_command, parse_reply, L2Op, OwnedFrame, L2};
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
            let Some(l2) = c2.l2.as_ref() else { return };
            let mut conn: Option<Conn> = None;
            // Logged when it changes, not per failed op.
            let mut healthy = true;
            // Redis refused a PUBLISH (logged once).
            let mut announce_refused = false;
            while !sd.is_requested() {
                let Some(op) = l2.take_op() else {
                    std::thread::park_timeout(Duration::from_millis(500));
                    continue;
                };
                if conn.is_none() {
                    match Conn::open(l2) {
                        Ok(c) => conn = Some(c),
                        Err(e) => {
                            failed(l2, op, &e, &mut healthy);
                            l2.drop_writes();
                            std::thread::park_timeout(RETRY);
                            continue;
                        }
                    }
                }
                let Some(c) = conn.as_mut() else { continue };
                let res = match &op {
                    L2Op::Set { key, entry } => {
                        let (pre, body, post) = l2.set_command(key, entry);
                        // HSET, then PEXPIRE: an integer reply each.
                        c.send(&pre)
                            .and_then(|_| c.send(&body))
                            .and_then(|_| c.call(&post))
                            .and_then(|r| expect_int(&r))
                            .and_then(|_| c.read_reply())
                            .and_then(|r| expect_int(&r))
                            .map(|_| {
                                l2.stats
                                    .writes
                                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            })
                    }
                    // Deleted, then announced to the other instances (both again when
                    // either fails: the op is retried).
                    L2Op::Delete { key, prefix } => delete(c, l2, key, *prefix)
                        .and_then(|n| {
                            announce(c, l2, &me, key, *prefix, &mut announce_refused).map(|_| n)
                        })
                        .map(|n| {
                            tracing::debug!(keys = n, "L2 deletion");
                            l2.deleted(key, *prefix);
                        }),
                };
                match res {
                    Ok(()) if !healthy => {
                        healthy = true;
                        tracing::info!(redis = %l2.addr, "L2 writer: Redis answers again");
                    }
                    Ok(()) => {}
                    Err(e) => {
                        conn = None;
                        failed(l2, op, &e, &mut healthy);
                        // A refusing or vanished Redis is not retried in a tight loop.
                        std::thread::park_timeout(RETRY);
                    }
                }
            }
        })?;
    let th = t.thread().clone();
    if let Some(l2) = &cache.l2 {
        l2.set_writer(move || th.unpark());
    }
    Ok(())
}

/// Tell the other instances about a deletion carried out. A refusal (an ACL user without
/// the channel) leaves the deletion done: logged once, and the other instances keep their
/// L1 copies until they expire. Only an I/O failure fails the op (it is retried).
fn announce(
    c: &mut Conn,
    l2: &L2,
    me: &[u8],
    key: &[u8],
    prefix: bool,
    refused: &mut bool,
) -> std::io::Result<()> {
    let mut cmd = Vec::new();
    l2.publish_command(me, key, prefix, &mut cmd);
    match c.call_frame(&cmd)? {
        OwnedFrame::Integer(_) => Ok(()),
        OwnedFrame::Error(e) => {
            if !std::mem::replace(refused, true) {
                tracing::warn!(redis = %l2.addr, error = %e, "L2 writer: Redis refused PUBLISH; other instances are not told of invalidations (grant the channel {:?})", String::from_utf8_lossy(&l2.channel()));
            }
            Ok(())
        }
        other => Err(bad(&other)),
    }
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
                if e.kind() == std::io::ErrorKind::PermissionDenied {
                    REFUSED_RETRY
                } else {
                    RETRY
                }
            }
        };
        let until = std::time::Instant::now() + wait;
        while std::time::Instant::now() < until && !sd.is_requested() {
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
) -> std::io::Result<()> {
    let mut c = Conn::open(l2)?;
    let mut cmd = Vec::new();
    l2.subscribe_command(&mut cmd);
    match c.call_frame(&cmd)? {
        OwnedFrame::Array(a)
            if a.first() == Some(&OwnedFrame::BulkString(b"subscribe".to_vec())) => {}
        OwnedFrame::Error(e) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("SUBSCRIBE refused: {e}"),
            ))
        }
        other => return Err(bad(&other)),
    }
    if !std::mem::replace(healthy, true) {
        tracing::info!(redis = %l2.addr, "L2 subscriber: subscribed again (invalidations sent meanwhile are not replayed)");
    }
    c.s.set_read_timeout(Some(LISTEN_TICK))?;
    while !sd.is_requested() {
        match c.read_reply() {
            Ok(f) => {
                if let Some((key, prefix)) = l2.peer_message(me, &f) {
                    let n = cache.invalidate_from_peer(&key, prefix);
                    tracing::debug!(entries = n, prefix, "L2: another instance's invalidation");
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A failed op: writes are dropped, deletions retried.
fn failed(l2: &L2, op: L2Op, e: &std::io::Error, healthy: &mut bool) {
    use std::sync::atomic::Ordering::Relaxed;
    l2.stats.write_errors.fetch_add(1, Relaxed);
    if std::mem::replace(healthy, false) {
        tracing::warn!(redis = %l2.addr, error = %e, "L2 writer: Redis failed; writes are dropped and deletions retried every second until it answers");
    }
    match op {
        L2Op::Set { .. } => {
            l2.stats.dropped.fetch_add(1, Relaxed);
            tracing::debug!(redis = %l2.addr, error = %e, "L2 write dropped");
        }
        op @ L2Op::Delete { .. } => {
            tracing::debug!(redis = %l2.addr, error = %e, "L2 deletion failed; retrying");
            l2.retry_later(op);
        }
    }
}

/// Delete one key, or every key under a prefix (SCAN + UNLINK, batch by batch).
fn delete(c: &mut Conn, l2: &L2, key: &[u8], prefix: bool) -> std::io::Result<usize> {
    let mut cmd = Vec::new();
    if !prefix {
        encode_command(&mut cmd, &[b"UNLINK", &l2.redis_key(key)]);
        return match c.call(&cmd)? {
            OwnedFrame::Integer(n) => Ok(n as usize),
            other => Err(bad(&other)),
        };
    }
    let mut cursor = b"0".to_vec();
    let mut total = 0;
    loop {
        cmd.clear();
        l2.scan_command(key, &cursor, &mut cmd);
        let OwnedFrame::Array(mut parts) = c.call(&cmd)? else {
            return Err(bad(&OwnedFrame::Null));
        };
        let (Some(OwnedFrame::Array(keys)), Some(OwnedFrame::BulkString(next))) =
            (parts.pop(), parts.pop())
        else {
            return Err(bad(&OwnedFrame::Array(parts)));
        };
        let keys: Vec<Vec<u8>> = keys
            .into_iter()
            .filter_map(|k| match k {
                OwnedFrame::BulkString(k) => Some(k),
                _ => None,
            })
            .collect();
        if !keys.is_empty() {
            cmd.clear();
            let mut args: Vec<&[u8]> = vec![b"UNLINK"];
            args.extend(keys.iter().map(Vec::as_slice));
            encode_command(&mut cmd, &args);
            if let OwnedFrame::Integer(n) = c.call(&cmd)? {
                total += n as usize;
            }
        }
        if next == b"0" {
            return Ok(total);
        }
        cursor = next;
    }
}

fn bad(f: &OwnedFrame) -> std::io::Error {
    std::io::Error::other(format!("unexpected Redis reply: {f:?}"))
}

fn expect_int(f: &OwnedFrame) -> std::io::Result<()> {
    match f {
        OwnedFrame::Integer(_) => Ok(()),
        other => Err(bad(other)),
    }
}

fn expect_ok(f: &OwnedFrame) -> std::io::Result<()> {
    match f {
        OwnedFrame::SimpleString(s) if s == b"OK" => Ok(()),
        other => Err(bad(other)),
    }
}

struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn open(l2: &L2) -> std::io::Result<Conn> {
        let s = TcpStream::connect_timeout(&l2.addr, IO_TIMEOUT)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        s.set_nodelay(true)?;
        let mut c = Conn {
            s,
            buf: Vec::with_capacity(4096),
        };
        // AUTH / SELECT: one command each, each answered +OK.
        let (hello, replies) = l2.hello();
        if replies > 0 {
            c.s.write_all(hello)?;
            for _ in 0..replies {
                expect_ok(&c.read_reply()?)?;
            }
        }
        Ok(c)
    }

    /// Send the first parts of a command ([`call`](Self::call) sends the last).
    fn send(&mut self, part: &[u8]) -> std::io::Result<()> {
        self.s.write_all(part)
    }

    /// Send one command (or its last part), read its reply (an error reply is an error).
    fn call(&mut self, cmd: &[u8]) -> std::io::Result<OwnedFrame> {
        self.s.write_all(cmd)?;
        self.read_reply()
    }

    /// Send one command, read its reply, error replies included.
    fn call_frame(&mut self, cmd: &[u8]) -> std::io::Result<OwnedFrame> {
        self.s.write_all(cmd)?;
        self.read_frame()
    }

    /// The next reply (bytes after it stay buffered for the next call); an error reply is
    /// an error.
    fn read_reply(&mut self) -> std::io::Result<OwnedFrame> {
        match self.read_frame()? {
            OwnedFrame::Error(e) => Err(std::io::Error::other(format!("Redis: {e}"))),
            f => Ok(f),
        }
    }

    /// The next reply, as it came.
    fn read_frame(&mut self) -> std::io::Result<OwnedFrame> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((f, n)) = parse_reply(&self.buf).map_err(std::io::Error::other)? {
                self.buf.drain(..n);
                return Ok(f);
            }
            let n = self.s.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}
