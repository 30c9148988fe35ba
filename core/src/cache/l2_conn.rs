//! The L2 tier's two long-lived conversations with Redis besides lookups, as sans-IO
//! machines: the [`Writer`] carries out the queued L2 work (`HSET` + `PEXPIRE` of what L1
//! stores, `UNLINK` of invalidated and purged keys, announced with `PUBLISH`), and the
//! [`Subscriber`] listens on the tier's channel for the other instances' deletions and
//! applies them to L1. Whoever owns the socket feeds replies in ([`Writer::on_read`]) and
//! writes what is pending ([`Writer::pending`]); a failed or closed connection ends the
//! machine ([`Writer::fail`] hands its work back to the queue's rules).
//!
//! Redis down: writes are dropped (and counted); deletions go back to the head of the queue
//! to be retried, and until one is done lookups of the keys it covers skip L2, so an
//! invalidated entry never comes back from Redis. Messages published while a subscription
//! is down are not replayed (Pub/Sub keeps nothing): those L1 copies live out their
//! freshness.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use super::http::HttpCache;
use super::l2::{encode_command, parse_reply, L2Op, OwnedFrame, L2};

/// Replies buffered at most while one is incomplete (a `SCAN` batch of 512 keys fits).
const MAX_REPLY: usize = 1 << 20;

/// Connect and reply time allowed per command (writes may be large; not on a request path).
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Wait before trying Redis again after a failure.
pub const RETRY: Duration = Duration::from_secs(1);
/// Wait before subscribing again after Redis refused it (a permission, not an outage).
pub const REFUSED_RETRY: Duration = Duration::from_secs(30);

/// Where the writer's op in flight stands: which reply it waits for.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// No op in flight.
    Idle,
    /// The integer replies to `HSET` and `PEXPIRE` still to come.
    Set { left: u8 },
    /// The reply to the `UNLINK` of one key.
    Unlink,
    /// The reply to a `SCAN` of a prefix.
    Scan,
    /// The reply to the `UNLINK` of a scanned batch; `next`: the cursor after it.
    ScanUnlink { next: Vec<u8> },
    /// The reply to the `PUBLISH` of the deletion carried out (`deleted` keys).
    Publish { deleted: usize },
}

#[derive(Debug)]
struct Tail {
    body: bytes::Bytes,
    post: Vec<u8>,
    post_written: usize,
}

/// The writer's side of one connection (see the [module docs](self)).
#[derive(Debug)]
pub struct Writer {
    me: Vec<u8>,
    out: Vec<u8>,
    written: usize,
    /// A write's entry body and the bytes after it, written after `out` (the body straight
    /// from the stored entry, not copied).
    tail: Option<Tail>,
    inbuf: Vec<u8>,
    /// `+OK` replies to `AUTH` / `SELECT` still to come.
    hello_left: usize,
    op: Option<L2Op>,
    step: Step,
    /// Keys a prefix deletion removed so far.
    total: usize,
}

/// A reply that ends the connection: an error, or one the conversation cannot be in.
fn bad(f: &OwnedFrame) -> String {
    match f {
        OwnedFrame::Error(e) => format!("Redis: {e}"),
        other => format!("unexpected Redis reply: {other:?}"),
    }
}

fn parse_next(inbuf: &mut Vec<u8>) -> Result<Option<OwnedFrame>, String> {
    match parse_reply(inbuf)? {
        Some((f, n)) => {
            inbuf.drain(..n);
            Ok(Some(f))
        }
        None if inbuf.len() > MAX_REPLY => Err("oversized Redis reply".into()),
        None => Ok(None),
    }
}

impl Writer {
    /// A new connection's writer, instance `me` (named in what it publishes): it logs in
    /// first (`AUTH` / `SELECT`).
    pub fn new(l2: &L2, me: &[u8]) -> Writer {
        let (hello, replies) = l2.hello();
        Writer {
            me: me.to_vec(),
            out: hello.to_vec(),
            written: 0,
            tail: None,
            inbuf: Vec::new(),
            hello_left: replies,
            op: None,
            step: Step::Idle,
            total: 0,
        }
    }

    /// Bytes to write now.
    pub fn pending(&self) -> &[u8] {
        if self.written < self.out.len() {
            return &self.out[self.written..];
        }
        match &self.tail {
            Some(t) if !t.body.is_empty() => &t.body,
            Some(t) => &t.post[t.post_written..],
            None => &[],
        }
    }

    /// `n` bytes of [`pending`](Self::pending) were written.
    pub fn wrote(&mut self, n: usize) {
        if self.written < self.out.len() {
            self.written = (self.written + n).min(self.out.len());
            if self.written == self.out.len() {
                self.out.clear();
                self.written = 0;
            }
            return;
        }
        let Some(t) = self.tail.as_mut() else {
            return;
        };
        if !t.body.is_empty() {
            let k = n.min(t.body.len());
            bytes::Buf::advance(&mut t.body, k);
        } else {
            t.post_written = (t.post_written + n).min(t.post.len());
            if t.post_written == t.post.len() {
                self.tail = None;
            }
        }
    }

    /// No op in flight and nothing awaited: the connection may sit idle.
    pub fn is_idle(&self) -> bool {
        self.step == Step::Idle && self.hello_left == 0 && self.pending().is_empty()
    }

    /// Waiting for a reply (the owner bounds how long).
    pub fn awaits_reply(&self) -> bool {
        self.step != Step::Idle || self.hello_left > 0
    }

    /// With no op in flight, take the next queued one and write its commands. True when
    /// there is something to write.
    pub fn refill(&mut self, l2: &L2) -> bool {
        if self.step == Step::Idle {
            if let Some(op) = l2.take_op() {
                self.start(l2, op);
            }
        }
        !self.pending().is_empty()
    }

    fn start(&mut self, l2: &L2, op: L2Op) {
        match &op {
            L2Op::Set { key, entry } => {
                let (pre, body, post) = l2.set_command(key, entry);
                self.out.extend_from_slice(&pre);
                self.tail = Some(Tail {
                    body,
                    post,
                    post_written: 0,
                });
                self.step = Step::Set { left: 2 };
            }
            L2Op::Delete { key, prefix: false } => {
                encode_command(&mut self.out, &[b"UNLINK", &l2.redis_key(key)]);
                self.step = Step::Unlink;
            }
            L2Op::Delete { key, prefix: true } => {
                self.total = 0;
                l2.scan_command(key, b"0", &mut self.out);
                self.step = Step::Scan;
            }
        }
        self.op = Some(op);
    }

    fn publish(&mut self, l2: &L2, deleted: usize) {
        if let Some(L2Op::Delete { key, prefix }) = &self.op {
            l2.publish_command(&self.me, key, *prefix, &mut self.out);
        }
        self.step = Step::Publish { deleted };
    }

    /// Reply bytes arrived. An error means the connection is of no more use: drop it and
    /// [`fail`](Self::fail).
    pub fn on_read(&mut self, l2: &L2, data: &[u8]) -> Result<(), String> {
        self.inbuf.extend_from_slice(data);
        while let Some(f) = parse_next(&mut self.inbuf)? {
            self.on_reply(l2, f)?;
        }
        Ok(())
    }

    fn on_reply(&mut self, l2: &L2, f: OwnedFrame) -> Result<(), String> {
        if self.hello_left > 0 {
            match &f {
                OwnedFrame::SimpleString(s) if s == b"OK" => {
                    self.hello_left -= 1;
                    return Ok(());
                }
                other => return Err(format!("login: {}", bad(other))),
            }
        }
        match std::mem::replace(&mut self.step, Step::Idle) {
            Step::Idle => return Err(format!("reply with no command: {f:?}")),
            Step::Set { left } => {
                let OwnedFrame::Integer(_) = f else {
                    return Err(bad(&f));
                };
                if left > 1 {
                    self.step = Step::Set { left: left - 1 };
                } else {
                    l2.stats.writes.fetch_add(1, Relaxed);
                    self.op = None;
                }
            }
            Step::Unlink => {
                let OwnedFrame::Integer(n) = f else {
                    return Err(bad(&f));
                };
                self.publish(l2, n.max(0) as usize);
            }
            Step::Scan => {
                let OwnedFrame::Array(mut parts) = f else {
                    return Err(bad(&f));
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
                    let mut args: Vec<&[u8]> = vec![b"UNLINK"];
                    args.extend(keys.iter().map(Vec::as_slice));
                    encode_command(&mut self.out, &args);
                    self.step = Step::ScanUnlink { next };
                } else {
                    self.scan_on(l2, next);
                }
            }
            Step::ScanUnlink { next } => {
                if let OwnedFrame::Integer(n) = f {
                    self.total += n.max(0) as usize;
                } else if let OwnedFrame::Error(_) = f {
                    return Err(bad(&f));
                }
                self.scan_on(l2, next);
            }
            Step::Publish { deleted } => {
                match f {
                    OwnedFrame::Integer(_) => {}
                    // A refusal (an ACL user without the channel) leaves the deletion done:
                    // logged once, and the other instances keep their L1 copies until they
                    // expire.
                    OwnedFrame::Error(e) => {
                        if !l2.announce_refused.swap(true, Relaxed) {
                            tracing::warn!(redis = %l2.addr, error = %e, "L2 writer: Redis refused PUBLISH; other instances are not told of invalidations (grant the channel {:?})", String::from_utf8_lossy(&l2.channel()));
                        }
                    }
                    other => return Err(bad(&other)),
                }
                if let Some(L2Op::Delete { key, prefix }) = self.op.take() {
                    tracing::debug!(keys = deleted, "L2 deletion");
                    l2.deleted(&key, prefix);
                }
            }
        }
        Ok(())
    }

    /// After a scanned batch: the next `SCAN`, or the announcement once the cursor is back
    /// at 0.
    fn scan_on(&mut self, l2: &L2, next: Vec<u8>) {
        if next == b"0" {
            let total = self.total;
            self.publish(l2, total);
        } else if let Some(L2Op::Delete { key, .. }) = &self.op {
            l2.scan_command(key, &next, &mut self.out);
            self.step = Step::Scan;
        }
    }

    /// The connection failed (or could not be opened) with an op in flight: a write is
    /// dropped (counted), a deletion goes back to the head of the queue (the whole of it
    /// is done again: `UNLINK` of a missing key is harmless).
    pub fn fail(mut self, l2: &L2, why: &str) {
        if let Some(op) = self.op.take() {
            fail_op(l2, op, why);
        }
    }
}

/// An op that could not be carried out (see [`Writer::fail`]).
pub fn fail_op(l2: &L2, op: L2Op, why: &str) {
    l2.stats.write_errors.fetch_add(1, Relaxed);
    match op {
        L2Op::Set { .. } => {
            l2.stats.dropped.fetch_add(1, Relaxed);
            tracing::debug!(redis = %l2.addr, error = why, "L2 write dropped");
        }
        op @ L2Op::Delete { .. } => {
            tracing::debug!(redis = %l2.addr, error = why, "L2 deletion failed; retrying");
            l2.retry_later(op);
        }
    }
}

/// How a subscription ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubError {
    /// Redis refused the `SUBSCRIBE` (an ACL user without the channel): a permission, not
    /// an outage; asked again, but seldom.
    Refused(String),
    /// Anything else: a bad reply, a failed login.
    Broken(String),
}

impl std::fmt::Display for SubError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubError::Refused(e) => write!(f, "SUBSCRIBE refused: {e}"),
            SubError::Broken(e) => f.write_str(e),
        }
    }
}

/// The subscriber's side of one connection (see the [module docs](self)).
#[derive(Debug)]
pub struct Subscriber {
    me: Vec<u8>,
    out: Vec<u8>,
    written: usize,
    inbuf: Vec<u8>,
    hello_left: usize,
    subscribed: bool,
}

impl Subscriber {
    /// A new connection's subscriber for instance `me` (whose own messages it ignores):
    /// it logs in, then subscribes to the tier's channel.
    pub fn new(l2: &L2, me: &[u8]) -> Subscriber {
        let (hello, replies) = l2.hello();
        let mut out = hello.to_vec();
        l2.subscribe_command(&mut out);
        Subscriber {
            me: me.to_vec(),
            out,
            written: 0,
            inbuf: Vec::new(),
            hello_left: replies,
            subscribed: false,
        }
    }

    pub fn pending(&self) -> &[u8] {
        &self.out[self.written..]
    }

    pub fn wrote(&mut self, n: usize) {
        self.written = (self.written + n).min(self.out.len());
    }

    pub fn is_subscribed(&self) -> bool {
        self.subscribed
    }

    /// Bytes arrived: the subscription's confirmation (`Ok(true)` when this read brought
    /// it), then messages, each other instance's deletion applied to `cache`'s L1.
    pub fn on_read(&mut self, cache: &HttpCache, data: &[u8]) -> Result<bool, SubError> {
        let Some(l2) = cache.l2.as_ref() else {
            return Err(SubError::Broken("no L2 tier".into()));
        };
        self.inbuf.extend_from_slice(data);
        let mut confirmed = false;
        while let Some(f) = parse_next(&mut self.inbuf).map_err(SubError::Broken)? {
            if self.hello_left > 0 {
                match &f {
                    OwnedFrame::SimpleString(s) if s == b"OK" => self.hello_left -= 1,
                    other => return Err(SubError::Broken(format!("login: {}", bad(other)))),
                }
                continue;
            }
            if !self.subscribed {
                match &f {
                    OwnedFrame::Array(a)
                        if a.first() == Some(&OwnedFrame::BulkString(b"subscribe".to_vec())) =>
                    {
                        self.subscribed = true;
                        confirmed = true;
                    }
                    OwnedFrame::Error(e) => return Err(SubError::Refused(e.clone())),
                    other => return Err(SubError::Broken(bad(other))),
                }
                continue;
            }
            if let Some((key, prefix)) = l2.peer_message(&self.me, &f) {
                let n = cache.invalidate_from_peer(&key, prefix);
                tracing::debug!(entries = n, prefix, "L2: another instance's invalidation");
            }
        }
        Ok(confirmed)
    }
}

/// Test support: Redis's confirmation of a `SUBSCRIBE` to `l2`'s channel.
#[cfg(test)]
pub(crate) fn test_confirmation(l2: &L2) -> Vec<u8> {
    let chan = l2.channel();
    let mut f = format!("*3\r\n$9\r\nsubscribe\r\n${}\r\n", chan.len()).into_bytes();
    f.extend_from_slice(&chan);
    f.extend_from_slice(b"\r\n:1\r\n");
    f
}

/// Test support: a message on `l2`'s channel carrying `body`.
#[cfg(test)]
pub(crate) fn test_message(l2: &L2, body: &str) -> Vec<u8> {
    let chan = l2.channel();
    let mut f = format!("*3\r\n$7\r\nmessage\r\n${}\r\n", chan.len()).into_bytes();
    f.extend_from_slice(&chan);
    f.extend_from_slice(format!("\r\n${}\r\n{body}\r\n", body.len()).as_bytes());
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::store::Stored;
    use std::time::{Duration, UNIX_EPOCH};

    fn l2() -> L2 {
        let l2 = crate::cache::l2::test_l2().with_login(None, Some("pw"), 0);
        // A writer runs: work is queued.
        l2.set_writer(|| {});
        l2
    }

    fn entry(body: &[u8]) -> Stored {
        crate::cache::store::test_entry(body, UNIX_EPOCH + Duration::from_secs(1_700_000_000))
    }

    /// Everything the writer has to write, as a write loop takes it.
    fn take(w: &mut Writer) -> String {
        let mut s = Vec::new();
        while !w.pending().is_empty() {
            // A short write first: the parts hold across partial writes.
            let n = w.pending().len().min(3);
            s.extend_from_slice(&w.pending()[..n]);
            w.wrote(n);
        }
        String::from_utf8_lossy(&s).into_owned()
    }

    #[test]
    fn the_writer_logs_in_writes_an_entry_and_sits_idle() {
        let l2 = l2();
        let e = entry(b"hello");
        let body = e.body.as_ptr();
        l2.queue_set(b"k1", e);
        let mut w = Writer::new(&l2, b"me");
        assert!(w.refill(&l2));
        // The login and the command's start, then the body from the stored entry itself.
        let n = w.pending().len();
        let mut sent = String::from_utf8_lossy(w.pending()).into_owned();
        w.wrote(n);
        assert_eq!(w.pending().as_ptr(), body, "the body is written uncopied");
        sent += &take(&mut w);
        assert!(
            sent.starts_with("*2\r\n$4\r\nAUTH\r\n$2\r\npw\r\n"),
            "{sent:?}"
        );
        assert!(
            sent.contains("HSET\r\n$4\r\nt:k1\r\n") && sent.contains("hello"),
            "{sent:?}"
        );
        assert!(sent.contains("PEXPIRE"), "{sent:?}");
        // Replies may arrive in any pieces.
        w.on_read(&l2, b"+OK\r\n:").unwrap();
        assert!(w.awaits_reply());
        w.on_read(&l2, b"1\r\n").unwrap();
        assert_eq!(l2.stats.writes.load(Relaxed), 0, "PEXPIRE not answered yet");
        w.on_read(&l2, b":1\r\n").unwrap();
        assert_eq!(l2.stats.writes.load(Relaxed), 1);
        assert!(w.is_idle() && !w.refill(&l2));
        // A reply nobody asked for ends the connection.
        assert!(w.on_read(&l2, b":1\r\n").is_err());
    }

    #[test]
    fn a_prefix_is_deleted_batch_by_batch_then_announced() {
        let l2 = l2();
        l2.queue_delete(b"/a", true);
        assert!(l2.deletion_pending(b"/a/x"));
        let mut w = Writer::new(&l2, b"me");
        w.on_read(&l2, b"+OK\r\n").unwrap();
        assert!(w.refill(&l2));
        let scan = take(&mut w);
        assert!(
            scan.contains("SCAN\r\n$1\r\n0\r\n") && scan.contains("t:/a*"),
            "{scan:?}"
        );
        // A batch of two keys, more to come after cursor 17.
        w.on_read(
            &l2,
            b"*2\r\n$2\r\n17\r\n*2\r\n$4\r\nt:/a\r\n$6\r\nt:/a/b\r\n",
        )
        .unwrap();
        let unlink = take(&mut w);
        assert!(
            unlink.contains("UNLINK\r\n$4\r\nt:/a\r\n$6\r\nt:/a/b\r\n"),
            "{unlink:?}"
        );
        w.on_read(&l2, b":2\r\n").unwrap();
        let next = take(&mut w);
        assert!(next.contains("SCAN\r\n$2\r\n17\r\n"), "{next:?}");
        // The last batch is empty: the deletion is announced.
        w.on_read(&l2, b"*2\r\n$1\r\n0\r\n*0\r\n").unwrap();
        let publish = take(&mut w);
        assert!(
            publish.contains("PUBLISH") && publish.contains("me p/a"),
            "{publish:?}"
        );
        assert!(l2.deletion_pending(b"/a/x"), "done only once announced");
        // Refused (an ACL user without the channel): the deletion stands, logged once.
        w.on_read(&l2, b"-NOPERM this user has no permissions\r\n")
            .unwrap();
        assert!(l2.announce_refused.load(Relaxed));
        assert!(!l2.deletion_pending(b"/a/x"));
        assert_eq!(l2.stats.deletes.load(Relaxed), 1);
        assert!(w.is_idle());
    }

    #[test]
    fn a_failed_connection_drops_the_write_and_requeues_the_deletion() {
        let l2 = l2();
        l2.queue_set(b"k1", entry(b"x"));
        l2.queue_delete(b"k2", false);
        let mut w = Writer::new(&l2, b"me");
        assert!(w.refill(&l2));
        w.fail(&l2, "connection refused");
        assert_eq!(l2.stats.dropped.load(Relaxed), 1);
        let mut w = Writer::new(&l2, b"me");
        assert!(w.refill(&l2));
        assert!(take(&mut w).contains("UNLINK\r\n$4\r\nt:k2\r\n"));
        // An error reply to the UNLINK: the connection is given up, the deletion kept.
        w.on_read(&l2, b"+OK\r\n").unwrap();
        assert!(w.on_read(&l2, b"-ERR busy\r\n").is_err());
        w.fail(&l2, "error reply");
        assert_eq!(l2.stats.write_errors.load(Relaxed), 2);
        assert!(l2.deletion_pending(b"k2"));
        assert!(matches!(
            l2.take_op(),
            Some(L2Op::Delete { prefix: false, .. })
        ));
    }

    #[test]
    fn the_subscriber_applies_only_the_other_instances_deletions() {
        let now = crate::test_origin();
        let yaml = "cache:\n  size: 1MB\n  l2:\n    host: 127.0.0.1\n    port: 6379\n    password: pw\nbackends:\n  - url: http://127.0.0.1:9001\n";
        let ctx = crate::test_ctx(yaml, now);
        let cache = ctx.cache.as_ref().unwrap();
        let l2 = cache.l2.as_ref().unwrap();
        let mut sub = Subscriber::new(l2, b"me");
        let asked = String::from_utf8_lossy(sub.pending()).into_owned();
        assert!(
            asked.contains("AUTH") && asked.contains("SUBSCRIBE"),
            "{asked:?}"
        );
        let n = sub.pending().len();
        sub.wrote(n);
        let mut reply = b"+OK\r\n".to_vec();
        reply.extend_from_slice(&test_confirmation(l2));
        assert_eq!(sub.on_read(cache, &reply), Ok(true));
        assert!(sub.is_subscribed());
        let message = |body: &str| test_message(l2, body);
        // This instance's own announcement is skipped; another's is applied.
        assert_eq!(sub.on_read(cache, &message("me k/x")), Ok(false));
        assert_eq!(l2.stats.peer_invalidations.load(Relaxed), 0);
        assert_eq!(sub.on_read(cache, &message("other k/x")), Ok(false));
        assert_eq!(l2.stats.peer_invalidations.load(Relaxed), 1);
        // A refusal is told apart from a broken connection.
        let mut sub = Subscriber::new(l2, b"me");
        let refused = sub.on_read(cache, b"+OK\r\n-NOPERM no channel\r\n");
        assert!(matches!(refused, Err(SubError::Refused(_))), "{refused:?}");
        let mut sub = Subscriber::new(l2, b"me");
        assert!(matches!(
            sub.on_read(cache, b"-WRONGPASS\r\n"),
            Err(SubError::Broken(_))
        ));
    }
}
