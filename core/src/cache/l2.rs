//! L2: a Redis shared by trireme instances, behind the in-process L1.
//!
//! Sans-IO like the rest of core: this module holds the RESP commands and replies (the
//! `redis-protocol` codec), the entry encoding, and the tier's shared state (back-off after
//! a failure, deletions not yet carried out, the write queue). Who does the I/O:
//!
//! - Lookups run on the request path through the runtime, like any other upstream
//!   connection: on an L1 miss the session connects to the `cache-l2` upstream (pooled),
//!   sends `GET`, reads the reply under [`L2::timeout`] and, on a hit, fills L1 and answers
//!   from it. Redis down, slow or answering garbage never fails a request: the lookup is
//!   abandoned, counted, and the request goes to the backend; for [`BACKOFF`] after a
//!   failure lookups skip L2 altogether.
//! - Writes (`HSET` of what L1 stores, one field per variant) and deletions (invalidation,
//!   purge) are queued here and carried out by the L2 writer
//!   ([`super::l2_conn::Writer`], a background run on the runtime's first worker), off the
//!   request path. Until a deletion is carried out, lookups of the
//!   keys it covers skip L2, so an invalidated response never comes back from Redis.
//! - Instances sharing a Redis tell each other what they invalidated: after carrying out
//!   a deletion the writer publishes it on [`L2::channel`], and every instance's
//!   subscriber drops the same keys from its own L1
//!   ([`HttpCache::invalidate_from_peer`](super::http::HttpCache::invalidate_from_peer)),
//!   so a purge or a `POST` through one instance is not answered from another's memory.
//!   A lookup whose reply raced an invalidation (local or a peer's) does not keep what it
//!   brought back ([`L2::invalidated_since`]).
//!
//! One Redis hash per primary cache key (`key_prefix` + key): field `v` holds the `Vary`
//! of what was stored last (empty without one), field `e:<secondary key>` each variant's
//! entry. A lookup asks `HMGET key v e:` (one round trip without `Vary`); when `v` names
//! fields, it computes the request's secondary key from them and asks `HGET key
//! e:<secondary>`. The entry is matched against the request again in L1, so a `Vary`
//! that changed meanwhile costs a miss, never a wrong answer. The whole hash expires
//! after `ttl` from its last write; deleting the key deletes every variant.

use super::store::Stored;
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use redis_protocol::resp2::decode::decode_bytes_mut;
use redis_protocol::resp2::types::BytesFrame;
/// A parsed Redis reply (RESP2).
pub use redis_protocol::resp2::types::OwnedFrame;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// After a failed lookup, further lookups skip L2 for this long.
pub const BACKOFF: Duration = Duration::from_secs(1);
/// Writes queued at most; past it, new writes are dropped (and counted).
pub const QUEUE: usize = 4096;
/// Invalidations remembered for the lookups in flight (older ones: assume covered).
const RECENT: usize = 256;
/// Bytes an entry may take beyond the body: head, fields, framing.
const ENTRY_OVERHEAD: usize = 64 * 1024 + 256;
const MAGIC: &[u8; 5] = b"TRL2\x01";

/// Counters for metrics and tests.
#[derive(Debug, Default)]
pub struct L2Stats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Lookups abandoned: connect failure, timeout, an error reply, a bad entry.
    pub errors: AtomicU64,
    /// Lookups not made: within [`BACKOFF`] of a failure, or a deletion of the key pending.
    pub skipped: AtomicU64,
    pub writes: AtomicU64,
    pub deletes: AtomicU64,
    /// Writes or deletions that failed (Redis down or refusing).
    pub write_errors: AtomicU64,
    /// Writes dropped: the queue was full, or Redis was down when their turn came.
    pub dropped: AtomicU64,
    /// Invalidations received from other instances and applied to L1.
    pub peer_invalidations: AtomicU64,
}

/// Work for the L2 writer.
#[derive(Debug)]
pub enum L2Op {
    Set {
        key: Vec<u8>,
        entry: Arc<Stored>,
    },
    /// Delete `key`, or every key starting with it (`prefix`).
    Delete {
        key: Vec<u8>,
        prefix: bool,
    },
}

type Wake = Box<dyn Fn() + Send + Sync>;

pub struct L2 {
    pub addr: SocketAddr,
    /// The `cache-l2` upstream's index in `ProxyContext::upstreams` (its connection pool).
    pub upstream: u16,
    /// Prepended to every cache key to make the Redis key.
    pub prefix: Vec<u8>,
    /// Redis expiry of written entries.
    pub ttl: Duration,
    /// Connect and reply time allowed for a lookup.
    pub timeout: Duration,
    /// Largest entry (encoded) read or written: larger replies are abandoned.
    pub max_entry: usize,
    /// Redis refused a `PUBLISH` of a deletion (logged once).
    pub announce_refused: AtomicBool,
    /// The writer's last op failed (logged when it changes).
    pub writer_down: AtomicBool,
    /// The subscription is down (logged when it changes).
    pub subscriber_down: AtomicBool,
    instance: Mutex<Vec<u8>>,
    /// Commands sent first on every new connection (`AUTH`, `SELECT`), each answered `+OK`.
    hello: Vec<u8>,
    hello_replies: usize,
    pub stats: L2Stats,
    base: Instant,
    /// Nanoseconds after `base` until which lookups skip L2.
    down_until: AtomicU64,
    queue: Mutex<VecDeque<L2Op>>,
    wake: Mutex<Option<Wake>>,
    /// Deletions queued but not yet carried out (prefixes, or exact keys).
    deleting: Mutex<Vec<(Vec<u8>, bool)>>,
    /// How many: lookups look at the list (a lock shared by the workers) only when any.
    deleting_n: AtomicUsize,
    /// Invalidations so far (local and peers'); a lookup notes it when it starts.
    generation: AtomicU64,
    /// The last [`RECENT`] invalidations: (generation it made, key, prefix).
    recent: Mutex<VecDeque<(u64, Vec<u8>, bool)>>,
    /// `SELECT`ed database: part of the invalidation channel (Pub/Sub ignores databases).
    db: u32,
}

impl std::fmt::Debug for L2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("L2")
            .field("addr", &self.addr)
            .field("ttl", &self.ttl)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Longest `Vary` value read back (field names only).
const MAX_VARY: usize = 4096;

/// How a lookup step ended.
#[derive(Debug)]
pub enum Reply {
    /// A stored entry.
    Hit(Box<Stored>),
    Miss,
    /// The key's variants differ by these `Vary` fields: ask for the request's one
    /// ([`L2::variant_command`]).
    Vary(Bytes),
}

impl L2 {
    pub fn new(
        addr: SocketAddr,
        upstream: u16,
        prefix: Vec<u8>,
        ttl: Duration,
        timeout: Duration,
        max_object: usize,
        base: Instant,
    ) -> L2 {
        L2 {
            addr,
            upstream,
            prefix,
            ttl,
            timeout,
            max_entry: max_object.saturating_add(ENTRY_OVERHEAD),
            announce_refused: AtomicBool::new(false),
            writer_down: AtomicBool::new(false),
            subscriber_down: AtomicBool::new(false),
            instance: Mutex::new(b"0".to_vec()),
            hello: Vec::new(),
            hello_replies: 0,
            stats: L2Stats::default(),
            base,
            down_until: AtomicU64::new(0),
            queue: Mutex::new(VecDeque::new()),
            wake: Mutex::new(None),
            deleting: Mutex::new(Vec::new()),
            deleting_n: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
            recent: Mutex::new(VecDeque::new()),
            db: 0,
        }
    }

    /// Authenticate (`AUTH [username] password`) and pick a database (`SELECT db`) on
    /// every new connection.
    /// Named after `wall`, the time the process set the tier up (see
    /// [`set_instance`](Self::set_instance)).
    pub fn with_instance(self, wall: SystemTime) -> L2 {
        let t = wall.duration_since(UNIX_EPOCH).unwrap_or_default();
        self.set_instance(format!("{:016x}", t.as_nanos() as u64).into_bytes());
        self
    }

    pub fn with_login(mut self, username: Option<&str>, password: Option<&str>, db: u32) -> L2 {
        self.hello.clear();
        self.hello_replies = 0;
        self.db = db;
        if let Some(pw) = password {
            match username {
                Some(u) => encode_command(&mut self.hello, &[b"AUTH", u.as_bytes(), pw.as_bytes()]),
                None => encode_command(&mut self.hello, &[b"AUTH", pw.as_bytes()]),
            }
            self.hello_replies += 1;
        }
        if db != 0 {
            encode_command(&mut self.hello, &[b"SELECT", db.to_string().as_bytes()]);
            self.hello_replies += 1;
        }
        self
    }

    /// The commands a new connection starts with, and how many `+OK` replies they get.
    pub fn hello(&self) -> (&[u8], usize) {
        (&self.hello, self.hello_replies)
    }

    /// Parse one `+OK` at the start of `buf` (the answer to a [`hello`](Self::hello)
    /// command): `Ok(None)` until it is complete.
    pub fn parse_ok(&self, buf: &mut BytesMut) -> Result<Option<()>, String> {
        if buf.len() > 4096 {
            return Err("oversized reply".into());
        }
        match decode_bytes_mut(buf) {
            Ok(None) => Ok(None),
            Ok(Some((BytesFrame::SimpleString(s), _, _))) if &s[..] == b"OK" => Ok(Some(())),
            Ok(Some((BytesFrame::Error(e), _, _))) => Err(format!("error reply: {e}")),
            Ok(Some((other, _, _))) => Err(format!("unexpected reply: {other:?}")),
            Err(e) => Err(format!("bad reply: {e}")),
        }
    }

    fn nanos(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_nanos() as u64
    }

    /// Whether a lookup of `key` may go to L2 now: not within [`BACKOFF`] of a failure,
    /// and no deletion covering it is pending. Counts the skipped ones.
    pub fn may_look_up(&self, key: &[u8], now: Instant) -> bool {
        if self.nanos(now) < self.down_until.load(Ordering::Relaxed) {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if self.deletion_pending(key) {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// A deletion covering `key` is queued and not yet carried out.
    pub fn deletion_pending(&self, key: &[u8]) -> bool {
        if self.deleting_n.load(Ordering::Acquire) == 0 {
            return false;
        }
        self.deleting
            .lock()
            .iter()
            .any(|(k, prefix)| covers(k, *prefix, key))
    }

    /// Invalidations so far: a lookup notes it when it starts, for
    /// [`invalidated_since`](Self::invalidated_since).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Remember an invalidation for the lookups in flight.
    pub fn note_invalidation(&self, key: &[u8], prefix: bool) {
        let mut r = self.recent.lock();
        let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        if r.len() == RECENT {
            r.pop_front();
        }
        r.push_back((g, key.to_vec(), prefix));
    }

    /// Whether an invalidation since generation `g` covers `key` (also true when more
    /// than `RECENT` happened since: too many to tell, and a lookup is cheap to redo).
    pub fn invalidated_since(&self, key: &[u8], g: u64) -> bool {
        if self.generation.load(Ordering::Acquire) == g {
            return false;
        }
        let r = self.recent.lock();
        if r.front().is_none_or(|&(first, ..)| first > g + 1) {
            return true;
        }
        r.iter()
            .filter(|(n, ..)| *n > g)
            .any(|(_, k, p)| covers(k, *p, key))
    }

    /// The Pub/Sub channel on which instances sharing this Redis (the same `key_prefix`
    /// and database) announce the deletions they carried out.
    pub fn channel(&self) -> Vec<u8> {
        let mut c = self.prefix.clone();
        c.extend_from_slice(format!("invalidations:{}", self.db).as_bytes());
        c
    }

    /// `SUBSCRIBE` to [`channel`](Self::channel).
    pub fn subscribe_command(&self, out: &mut Vec<u8>) {
        encode_command(out, &[b"SUBSCRIBE", &self.channel()]);
    }

    /// `PUBLISH` a deletion carried out by instance `me`: `<me> <k|p><key>`.
    pub fn publish_command(&self, me: &[u8], key: &[u8], prefix: bool, out: &mut Vec<u8>) {
        let mut msg = Vec::with_capacity(me.len() + 2 + key.len());
        msg.extend_from_slice(me);
        msg.push(b' ');
        msg.push(if prefix { b'p' } else { b'k' });
        msg.extend_from_slice(key);
        encode_command(out, &[b"PUBLISH", &self.channel(), &msg]);
    }

    /// A frame read on the subscription: another instance's deletion as (key, prefix);
    /// `None` for this instance's own, subscription confirmations and anything else.
    pub fn peer_message(&self, me: &[u8], frame: &OwnedFrame) -> Option<(Vec<u8>, bool)> {
        let OwnedFrame::Array(parts) = frame else {
            return None;
        };
        let [OwnedFrame::BulkString(kind), OwnedFrame::BulkString(chan), OwnedFrame::BulkString(msg)] =
            &parts[..]
        else {
            return None;
        };
        if kind != b"message" || *chan != self.channel() {
            return None;
        }
        let sp = msg.iter().position(|&b| b == b' ')?;
        let (who, rest) = (&msg[..sp], &msg[sp + 1..]);
        if who == me {
            return None;
        }
        match rest.split_first()? {
            (b'k', key) => Some((key.to_vec(), false)),
            (b'p', key) => Some((key.to_vec(), true)),
            _ => None,
        }
    }

    /// A lookup failed: count it and skip L2 for [`BACKOFF`]. True when this opened the
    /// back-off (the caller logs it once).
    pub fn failed(&self, now: Instant) -> bool {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        let n = self.nanos(now);
        let until = n + BACKOFF.as_nanos() as u64;
        self.down_until.fetch_max(until, Ordering::Relaxed) <= n
    }

    /// The first step of a lookup, `HMGET key v e:` (the `Vary` of the key's variants,
    /// and the entry of a response without one), encoded onto `out`.
    pub fn get_command(&self, key: &[u8], out: &mut Vec<u8>) {
        encode_command(out, &[b"HMGET", &self.redis_key(key), b"v", b"e:"]);
    }

    /// The second step when the first said [`Reply::Vary`]: `HGET key e:<secondary>`.
    pub fn variant_command(&self, key: &[u8], secondary: &[u8], out: &mut Vec<u8>) {
        encode_command(
            out,
            &[b"HGET", &self.redis_key(key), &variant_field(secondary)],
        );
    }

    /// Parse the reply to [`get_command`](Self::get_command) at the start of `buf`:
    /// `Ok(None)` until it is complete; then what it says, its bytes split off `buf`.
    /// `Err` for error replies, bad framing, an entry over [`max_entry`](Self::max_entry).
    pub fn parse_get_reply(&self, buf: &mut BytesMut) -> Result<Option<Reply>, String> {
        match buf.first() {
            None => return Ok(None),
            Some(b'*') => {}
            Some(_) => return Err(other_reply(buf)),
        }
        if buf.len() < 4 {
            return if b"*2\r\n".starts_with(buf) {
                Ok(None)
            } else {
                Err(other_reply(buf))
            };
        }
        if &buf[..4] != b"*2\r\n" {
            return Err(other_reply(buf));
        }
        let Some((vary, at)) = bulk_at(buf, 4, MAX_VARY)? else {
            return Ok(None);
        };
        let Some((entry, end)) = bulk_at(buf, at, self.max_entry)? else {
            return Ok(None);
        };
        let reply = buf.split_to(end);
        match vary {
            None => Ok(Some(Reply::Miss)),
            Some(v) if v.is_empty() => match entry {
                None => Ok(Some(Reply::Miss)),
                Some(e) => hit(&reply[e]).map(Some),
            },
            Some(v) => Ok(Some(Reply::Vary(Bytes::copy_from_slice(&reply[v])))),
        }
    }

    /// Parse the reply to [`variant_command`](Self::variant_command): a hit or a miss.
    pub fn parse_variant_reply(&self, buf: &mut BytesMut) -> Result<Option<Reply>, String> {
        match buf.first() {
            None => Ok(None),
            Some(b'$') => {
                let Some((entry, end)) = bulk_at(buf, 0, self.max_entry)? else {
                    return Ok(None);
                };
                let reply = buf.split_to(end);
                match entry {
                    None => Ok(Some(Reply::Miss)),
                    Some(e) => hit(&reply[e]).map(Some),
                }
            }
            Some(_) => Err(other_reply(buf)),
        }
    }

    /// The writer: called when work is queued.
    pub fn set_writer(&self, wake: impl Fn() + Send + Sync + 'static) {
        *self.wake.lock() = Some(Box::new(wake));
    }

    fn wake_writer(&self) {
        if let Some(w) = self.wake.lock().as_ref() {
            w();
        }
    }

    /// L1 stored `entry` under `key`: write it to L2 too (dropped, and counted, when
    /// [`QUEUE`] writes are waiting already).
    pub fn queue_set(&self, key: &[u8], entry: Stored) {
        if self.wake.lock().is_none() {
            return;
        }
        let mut q = self.queue.lock();
        if q.len() >= QUEUE {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.push_back(L2Op::Set {
            key: key.to_vec(),
            entry: Arc::new(entry),
        });
        drop(q);
        self.wake_writer();
    }

    /// Delete `key` (or every key under the prefix) from L2. Lookups of the keys it covers
    /// skip L2 until it is done ([`deleted`](Self::deleted)). The same deletion already
    /// pending covers this one: writes queued since for those keys are dropped instead.
    pub fn queue_delete(&self, key: &[u8], prefix: bool) {
        if self.wake.lock().is_none() {
            return;
        }
        let mut d = self.deleting.lock();
        if d.iter().any(|(k, p)| k == key && *p == prefix) {
            drop(d);
            self.queue.lock().retain(|op| match op {
                L2Op::Set { key: k, .. } => !(k == key || (prefix && k.starts_with(key))),
                L2Op::Delete { .. } => true,
            });
            return;
        }
        d.push((key.to_vec(), prefix));
        self.deleting_n.store(d.len(), Ordering::Release);
        drop(d);
        self.note_invalidation(key, prefix);
        self.queue.lock().push_back(L2Op::Delete {
            key: key.to_vec(),
            prefix,
        });
        self.wake_writer();
    }

    /// The writer's next job.
    pub fn take_op(&self) -> Option<L2Op> {
        self.queue.lock().pop_front()
    }

    /// Work is queued for the writer.
    pub fn has_ops(&self) -> bool {
        !self.queue.lock().is_empty()
    }

    /// Name this process in what it publishes (before the writer and the subscriber
    /// start; distinct per process and start). The config's tier starts with a name from
    /// its start time.
    pub fn set_instance(&self, id: Vec<u8>) {
        *self.instance.lock() = id;
    }

    /// This process's name on the invalidation channel.
    pub fn instance(&self) -> Vec<u8> {
        self.instance.lock().clone()
    }

    /// Redis is unreachable: drop the queued writes (counted); deletions stay.
    pub fn drop_writes(&self) {
        let mut q = self.queue.lock();
        let before = q.len();
        q.retain(|op| matches!(op, L2Op::Delete { .. }));
        let n = (before - q.len()) as u64;
        self.stats.dropped.fetch_add(n, Ordering::Relaxed);
    }

    /// Put a deletion back at the front (Redis was unreachable; tried again later).
    pub fn retry_later(&self, op: L2Op) {
        self.queue.lock().push_front(op);
    }

    /// A deletion was carried out.
    pub fn deleted(&self, key: &[u8], prefix: bool) {
        self.stats.deletes.fetch_add(1, Ordering::Relaxed);
        let mut d = self.deleting.lock();
        if let Some(i) = d.iter().position(|(k, p)| k == key && *p == prefix) {
            d.swap_remove(i);
        }
        self.deleting_n.store(d.len(), Ordering::Release);
    }

    /// The Redis key for a cache key.
    pub fn redis_key(&self, key: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.prefix.len() + key.len());
        k.extend_from_slice(&self.prefix);
        k.extend_from_slice(key);
        k
    }

    /// `HSET key v <vary> e:<secondary> <entry>` then `PEXPIRE key ttl`, in three parts to
    /// write in order: what precedes the body, the body itself (not copied), what follows
    /// it. Redis answers each of the two commands with an integer.
    pub fn set_command(&self, key: &[u8], entry: &Stored) -> (Vec<u8>, Bytes, Vec<u8>) {
        let mut meta = Vec::with_capacity(entry.head.len() + 128);
        encode_entry_meta(entry, &mut meta);
        let k = self.redis_key(key);
        let field = variant_field(&entry.secondary);
        let mut pre =
            Vec::with_capacity(meta.len() + k.len() + entry.vary.len() + field.len() + 64);
        pre.extend_from_slice(b"*6\r\n$4\r\nHSET\r\n");
        for part in [&k[..], b"v", &entry.vary, &field] {
            push_bulk_len(&mut pre, part.len());
            pre.extend_from_slice(part);
            pre.extend_from_slice(b"\r\n");
        }
        push_bulk_len(&mut pre, meta.len() + entry.body.len());
        pre.extend_from_slice(&meta);
        let mut post = b"\r\n".to_vec();
        let ttl = self.ttl.as_millis().max(1).to_string();
        encode_command(&mut post, &[b"PEXPIRE", &k, ttl.as_bytes()]);
        (pre, entry.body.clone(), post)
    }

    /// `SCAN cursor MATCH <prefix>* COUNT 512`: one step of a prefix deletion.
    pub fn scan_command(&self, prefix: &[u8], cursor: &[u8], out: &mut Vec<u8>) {
        let mut pattern = glob_escape(&self.redis_key(prefix));
        pattern.push(b'*');
        encode_command(
            out,
            &[b"SCAN", cursor, b"MATCH", &pattern, b"COUNT", b"512"],
        );
    }

    /// Render the L2 counters (Prometheus text).
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let s = &self.stats;
        crate::metrics::write_counters(
            out,
            &[
                ("trireme_cache_l2_hits_total", &s.hits),
                ("trireme_cache_l2_misses_total", &s.misses),
                ("trireme_cache_l2_errors_total", &s.errors),
                ("trireme_cache_l2_skipped_total", &s.skipped),
                ("trireme_cache_l2_writes_total", &s.writes),
                ("trireme_cache_l2_deletes_total", &s.deletes),
                ("trireme_cache_l2_write_errors_total", &s.write_errors),
                ("trireme_cache_l2_dropped_total", &s.dropped),
                (
                    "trireme_cache_l2_peer_invalidations_total",
                    &s.peer_invalidations,
                ),
            ],
        );
        let _ = writeln!(
            out,
            "# TYPE trireme_cache_l2_queue gauge\ntrireme_cache_l2_queue {}",
            self.queue.lock().len()
        );
    }
}

/// A command as a RESP array of bulk strings, appended to `out`.
pub fn encode_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    use redis_protocol::resp2::encode::encode_borrowed;
    use redis_protocol::resp2::types::BorrowedFrame;
    let parts: Vec<BorrowedFrame<'_>> = args.iter().map(|a| BorrowedFrame::BulkString(a)).collect();
    let frame = BorrowedFrame::Array(&parts);
    let start = out.len();
    out.resize(start + frame.encode_len(false), 0);
    let n = encode_borrowed(&mut out[start..], &frame, false).expect("buffer sized by encode_len");
    out.truncate(start + n);
}

/// A complete reply at the start of `buf` and its length, `Ok(None)` while incomplete.
pub fn parse_reply(buf: &[u8]) -> Result<Option<(OwnedFrame, usize)>, String> {
    redis_protocol::resp2::decode::decode(buf).map_err(|e| e.to_string())
}

/// The hash field of the variant with this secondary key.
fn variant_field(secondary: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(2 + secondary.len());
    f.extend_from_slice(b"e:");
    f.extend_from_slice(secondary);
    f
}

/// A complete bulk string: its bytes' range in the buffer (`None` for a nil), and where
/// the next value starts.
type Bulk = (Option<std::ops::Range<usize>>, usize);

/// A bulk string at `buf[at..]` of at most `limit` bytes: `Ok(None)` while incomplete;
/// then its bytes' range (`None` for a nil) and where the next value starts. The length
/// is checked before the bytes are waited for.
fn bulk_at(buf: &[u8], at: usize, limit: usize) -> Result<Option<Bulk>, String> {
    let rest = &buf[at..];
    match rest.first() {
        None => return Ok(None),
        Some(b'$') => {}
        Some(_) => return Err(other_reply(rest)),
    }
    let Some(eol) = rest.iter().take(24).position(|&b| b == b'\n') else {
        return if rest.len() < 24 {
            Ok(None)
        } else {
            Err("bad bulk string length".into())
        };
    };
    let len = std::str::from_utf8(&rest[1..eol])
        .ok()
        .and_then(|s| s.strip_suffix('\r'))
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or("bad bulk string length")?;
    let start = at + eol + 1;
    if len == -1 {
        return Ok(Some((None, start)));
    }
    if len < 0 || len as u64 > limit as u64 {
        return Err(format!("value of {len} bytes is over the limit"));
    }
    let end = start + len as usize;
    if buf.len() < end + 2 {
        return Ok(None);
    }
    if &buf[end..end + 2] != b"\r\n" {
        return Err("bad bulk string framing".into());
    }
    Ok(Some((Some(start..end), end + 2)))
}

/// An entry's bytes: copied out of the read buffer (the entry then holds exactly its own
/// bytes; a slice would keep the whole pooled buffer alive inside L1).
fn hit(b: &[u8]) -> Result<Reply, String> {
    decode_entry(Bytes::copy_from_slice(b))
        .map(|s| Reply::Hit(Box::new(s)))
        .ok_or_else(|| "not a trireme entry".into())
}

/// Why a reply that is not the expected shape is refused (error replies quoted).
fn other_reply(buf: &[u8]) -> String {
    if buf.first() == Some(&b'-') {
        let line = buf.split(|&b| b == b'\r').next().unwrap_or(&[]);
        let line = &line[1..line.len().min(200)];
        format!("error reply: {}", String::from_utf8_lossy(line))
    } else {
        format!(
            "unexpected reply: {:?}",
            String::from_utf8_lossy(&buf[..buf.len().min(40)])
        )
    }
}

/// Whether an invalidation of `k` (every key under it when `prefix`) covers `key`.
fn covers(k: &[u8], prefix: bool, key: &[u8]) -> bool {
    if prefix {
        key.starts_with(k)
    } else {
        key == k
    }
}

/// Escape Redis glob characters so `pattern` matches itself literally.
fn glob_escape(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() + 8);
    for &b in s {
        if matches!(b, b'*' | b'?' | b'[' | b']' | b'\\') {
            out.push(b'\\');
        }
        out.push(b);
    }
    out
}

fn put_time(out: &mut Vec<u8>, t: SystemTime) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    out.extend_from_slice(&d.as_secs().to_be_bytes());
    out.extend_from_slice(&d.subsec_nanos().to_be_bytes());
}

fn put_part(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

/// An entry as L2 holds it: magic, request and response times, the `Age` it arrived
/// with, then head, `Vary`, secondary key, ETag (length-prefixed) and the body. The
/// freshness facts are derived from the head again when it is read.
pub fn encode_entry(e: &Stored, out: &mut Vec<u8>) {
    encode_entry_meta(e, out);
    out.extend_from_slice(&e.body);
}

/// Everything of [`encode_entry`] before the body.
fn encode_entry_meta(e: &Stored, out: &mut Vec<u8>) {
    out.extend_from_slice(MAGIC);
    put_time(out, e.facts.request_time);
    put_time(out, e.facts.response_time);
    out.extend_from_slice(&e.facts.age.to_be_bytes());
    put_part(out, &e.head);
    put_part(out, &e.vary);
    put_part(out, &e.secondary);
    match &e.etag {
        Some(t) => put_part(out, t),
        None => out.extend_from_slice(&u32::MAX.to_be_bytes()),
    }
}

fn push_bulk_len(out: &mut Vec<u8>, n: usize) {
    out.push(b'$');
    out.extend_from_slice(n.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
}

struct Reader {
    b: Bytes,
    pos: usize,
}

impl Reader {
    fn take(&mut self, n: usize) -> Option<Bytes> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len())?;
        let s = self.b.slice(self.pos..end);
        self.pos = end;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?[..].try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?[..].try_into().ok()?))
    }
    fn time(&mut self) -> Option<SystemTime> {
        let secs = self.u64()?;
        let nanos = self.u32()?;
        UNIX_EPOCH.checked_add(Duration::new(secs, nanos.min(999_999_999)))
    }
    fn part(&mut self) -> Option<Option<Bytes>> {
        match self.u32()? {
            u32::MAX => Some(None),
            n => Some(Some(self.take(n as usize)?)),
        }
    }
}

/// An entry read back from L2 (slices of `b`, no copy); `None` when `b` is not one.
pub fn decode_entry(b: Bytes) -> Option<Stored> {
    if !b.starts_with(MAGIC) {
        return None;
    }
    let mut r = Reader {
        b,
        pos: MAGIC.len(),
    };
    let request_time = r.time()?;
    let response_time = r.time()?;
    let age = r.u64()?;
    let head = r.part()??;
    let vary = r.part()??;
    let secondary = r.part()??.to_vec();
    let etag = r.part()?;
    let body = r.b.slice(r.pos..);
    let mut whole = Vec::with_capacity(head.len() + 2);
    whole.extend_from_slice(&head);
    whole.extend_from_slice(b"\r\n");
    let parsed = match crate::http1::head::parse_response(&whole, whole.len()) {
        Ok(crate::http1::head::Parsed::Complete(h)) if h.len == whole.len() => h,
        _ => return None,
    };
    let mut facts = super::http::response_facts(&parsed, &whole, request_time, response_time);
    facts.age = age;
    Some(Stored {
        head,
        body,
        facts,
        etag,
        vary,
        secondary,
        demand: Default::default(),
    })
}

/// Test support: a tier on 127.0.0.1:6379, keys under `t:`, a minute's expiry, 50 ms lookups.
#[cfg(test)]
pub(crate) fn test_l2() -> L2 {
    L2::new(
        "127.0.0.1:6379".parse().unwrap(),
        1,
        b"t:".to_vec(),
        Duration::from_secs(60),
        Duration::from_millis(50),
        1000,
        crate::test_origin(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn l2() -> L2 {
        test_l2()
    }

    fn entry(head: &str, body: &[u8], etag: Option<&str>) -> Stored {
        let whole = format!("{head}\r\n");
        let h = match crate::http1::head::parse_response(whole.as_bytes(), 4096) {
            Ok(crate::http1::head::Parsed::Complete(h)) => h,
            _ => panic!("bad head"),
        };
        let t0 = UNIX_EPOCH + Duration::new(1_700_000_000, 123);
        let mut facts = super::super::http::response_facts(
            &h,
            whole.as_bytes(),
            t0,
            t0 + Duration::from_millis(5),
        );
        facts.age = 7;
        Stored {
            head: Bytes::copy_from_slice(head.as_bytes()),
            body: Bytes::copy_from_slice(body),
            facts,
            etag: etag.map(|e| Bytes::copy_from_slice(e.as_bytes())),
            vary: Bytes::from_static(b"accept-encoding"),
            secondary: b"accept-encoding=gzip\n".to_vec(),
            demand: Default::default(),
        }
    }

    #[test]
    fn entry_round_trips() {
        let e = entry(
            "HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nETag: \"v1\"\r\nVary: Accept-Encoding\r\n",
            b"hello",
            Some("\"v1\""),
        );
        let mut enc = Vec::new();
        encode_entry(&e, &mut enc);
        let d = decode_entry(Bytes::from(enc)).expect("decodes");
        assert_eq!(d.head, e.head);
        assert_eq!(d.body, e.body);
        assert_eq!(d.etag, e.etag);
        assert_eq!(d.vary, e.vary);
        assert_eq!(d.secondary, e.secondary);
        assert_eq!(d.facts.age, 7);
        assert_eq!(d.facts.cc.max_age, Some(60));
        assert_eq!(d.facts.request_time, e.facts.request_time);
        assert_eq!(d.facts.response_time, e.facts.response_time);
        assert_eq!(d.facts.status, 200);
    }

    /// Redis's reply to `HMGET key v e:`.
    fn hmget_reply(vary: Option<&[u8]>, entry: Option<&[u8]>) -> Vec<u8> {
        let mut w = b"*2\r\n".to_vec();
        for v in [vary, entry] {
            match v {
                None => w.extend_from_slice(b"$-1\r\n"),
                Some(b) => {
                    w.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
                    w.extend_from_slice(b);
                    w.extend_from_slice(b"\r\n");
                }
            }
        }
        w
    }

    #[test]
    fn get_reply_hit_miss_vary_error_and_partial() {
        let l2 = l2();
        let mut out = Vec::new();
        l2.get_command(b"GET http://a/x", &mut out);
        assert_eq!(
            out,
            b"*4\r\n$5\r\nHMGET\r\n$16\r\nt:GET http://a/x\r\n$1\r\nv\r\n$2\r\ne:\r\n"
        );
        let parse = |wire: &[u8]| l2.parse_get_reply(&mut BytesMut::from(wire));

        // No key; a key whose responses vary but none for the empty secondary key.
        assert!(matches!(
            parse(&hmget_reply(None, None)),
            Ok(Some(Reply::Miss))
        ));
        assert!(matches!(
            parse(&hmget_reply(Some(b""), None)),
            Ok(Some(Reply::Miss))
        ));

        let e = entry(
            "HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\n",
            b"body",
            None,
        );
        let mut enc = Vec::new();
        encode_entry(&e, &mut enc);
        let wire = hmget_reply(Some(b""), Some(&enc));
        // Every prefix is incomplete, the whole is a hit, what follows stays.
        for cut in 0..wire.len() {
            assert!(matches!(parse(&wire[..cut]), Ok(None)), "cut {cut}");
        }
        let mut buf = BytesMut::from(&wire[..]);
        buf.extend_from_slice(b"+next");
        match l2.parse_get_reply(&mut buf) {
            Ok(Some(Reply::Hit(s))) => assert_eq!(&s.body[..], b"body"),
            other => panic!("{other:?}"),
        }
        assert_eq!(&buf[..], b"+next");
        // Variants by Vary: the second step asks for the request's one.
        match parse(&hmget_reply(Some(b"Accept-Encoding"), Some(&enc))) {
            Ok(Some(Reply::Vary(v))) => assert_eq!(&v[..], b"Accept-Encoding"),
            other => panic!("{other:?}"),
        }
        out.clear();
        l2.variant_command(b"GET http://a/x", b"accept-encoding:gzip\n", &mut out);
        assert_eq!(
            out,
            b"*3\r\n$4\r\nHGET\r\n$16\r\nt:GET http://a/x\r\n$23\r\ne:accept-encoding:gzip\n\r\n"
        );
        let mut one = format!("${}\r\n", enc.len()).into_bytes();
        one.extend_from_slice(&enc);
        one.extend_from_slice(b"\r\n");
        for cut in 0..one.len() {
            let mut buf = BytesMut::from(&one[..cut]);
            assert!(
                matches!(l2.parse_variant_reply(&mut buf), Ok(None)),
                "cut {cut}"
            );
        }
        assert!(matches!(
            l2.parse_variant_reply(&mut BytesMut::from(&one[..])),
            Ok(Some(Reply::Hit(_)))
        ));
        assert!(matches!(
            l2.parse_variant_reply(&mut BytesMut::from(&b"$-1\r\n"[..])),
            Ok(Some(Reply::Miss))
        ));

        // Errors: an error reply (a string value under the key, say), another
        // application's value, bad framing, too large (refused from the length alone).
        let wrongtype = parse(b"-WRONGTYPE Operation against a key holding the wrong kind\r\n");
        assert!(
            matches!(&wrongtype, Err(e) if e.contains("WRONGTYPE")),
            "{wrongtype:?}"
        );
        assert!(parse(&hmget_reply(Some(b""), Some(b"abc"))).is_err());
        assert!(parse(b"*3\r\n").is_err());
        assert!(parse(b"*2\r\n$1\r\nvX\r\n").is_err());
        assert!(parse(b"*2\r\n$0\r\n\r\n$99999999\r\n").is_err());
        assert!(parse(b"*2\r\n$99999\r\n").is_err(), "Vary over its limit");
        assert!(l2
            .parse_variant_reply(&mut BytesMut::from(&b"$99999999\r\n"[..]))
            .is_err());
        assert!(l2
            .parse_variant_reply(&mut BytesMut::from(&b":1\r\n"[..]))
            .is_err());
    }

    #[test]
    fn backoff_and_pending_deletes_skip_lookups() {
        let l2 = l2();
        l2.set_writer(|| {});
        let t = crate::test_origin();
        assert!(l2.may_look_up(b"k1", t));
        assert!(l2.failed(t));
        assert!(
            !l2.failed(t + Duration::from_millis(10)),
            "already backing off"
        );
        assert!(!l2.may_look_up(b"k1", t + Duration::from_millis(500)));
        assert!(l2.may_look_up(b"k1", t + BACKOFF + Duration::from_millis(20)));
        l2.queue_delete(b"GET http://a/p", true);
        assert!(!l2.may_look_up(b"GET http://a/p/x", t + BACKOFF * 2));
        assert!(l2.may_look_up(b"GET http://a/q", t + BACKOFF * 2));
        // A write queued after the deletion, then the same deletion again: the write goes.
        let e = entry("HTTP/1.1 200 OK\r\n", b"x", None);
        l2.queue_set(b"GET http://a/p/y", Stored::clone_of(&e));
        l2.queue_set(b"GET http://a/q", e);
        l2.queue_delete(b"GET http://a/p", true);
        assert!(matches!(
            l2.take_op(),
            Some(L2Op::Delete { prefix: true, .. })
        ));
        assert!(matches!(l2.take_op(), Some(L2Op::Set { key, .. }) if key == b"GET http://a/q"));
        assert!(l2.take_op().is_none());
        l2.deleted(b"GET http://a/p", true);
        assert!(l2.may_look_up(b"GET http://a/p/x", t + BACKOFF * 2));
        assert_eq!(l2.stats.skipped.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn set_command_is_hset_then_pexpire() {
        let l2 = l2();
        let e = entry(
            "HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nVary: Accept-Encoding\r\n",
            b"the body",
            None,
        );
        let (pre, body, post) = l2.set_command(b"GET http://a/x", &e);
        let mut wire = pre;
        wire.extend_from_slice(&body);
        wire.extend_from_slice(&post);
        let (f, n) = parse_reply(&wire).unwrap().unwrap();
        let OwnedFrame::Array(parts) = f else {
            panic!()
        };
        let mut value = Vec::new();
        encode_entry(&e, &mut value);
        let bulk = |b: &[u8]| OwnedFrame::BulkString(b.to_vec());
        assert_eq!(
            parts,
            vec![
                bulk(b"HSET"),
                bulk(b"t:GET http://a/x"),
                bulk(b"v"),
                bulk(b"accept-encoding"),
                bulk(b"e:accept-encoding=gzip\n"),
                bulk(&value),
            ]
        );
        let (f, m) = parse_reply(&wire[n..]).unwrap().unwrap();
        assert_eq!(n + m, wire.len());
        assert_eq!(
            f,
            OwnedFrame::Array(vec![
                bulk(b"PEXPIRE"),
                bulk(b"t:GET http://a/x"),
                bulk(b"60000")
            ])
        );
    }

    #[test]
    fn invalidations_are_published_and_peers_read_others_only() {
        let l2 = l2().with_login(None, None, 3);
        assert_eq!(l2.channel(), b"t:invalidations:3");
        let mut out = Vec::new();
        l2.publish_command(b"a1", b"GET http://a/x", true, &mut out);
        let (f, _) = parse_reply(&out).unwrap().unwrap();
        let OwnedFrame::Array(parts) = f else {
            panic!()
        };
        assert_eq!(parts[0], OwnedFrame::BulkString(b"PUBLISH".to_vec()));
        assert_eq!(
            parts[1],
            OwnedFrame::BulkString(b"t:invalidations:3".to_vec())
        );
        // As a subscriber receives it.
        let OwnedFrame::BulkString(payload) = parts[2].clone() else {
            panic!()
        };
        let msg = |chan: &[u8], payload: &[u8]| {
            OwnedFrame::Array(vec![
                OwnedFrame::BulkString(b"message".to_vec()),
                OwnedFrame::BulkString(chan.to_vec()),
                OwnedFrame::BulkString(payload.to_vec()),
            ])
        };
        let m = msg(b"t:invalidations:3", &payload);
        assert_eq!(
            l2.peer_message(b"b2", &m),
            Some((b"GET http://a/x".to_vec(), true))
        );
        assert_eq!(l2.peer_message(b"a1", &m), None, "its own");
        assert_eq!(
            l2.peer_message(b"b2", &msg(b"t:invalidations:3", b"a1 kGET http://a/y")),
            Some((b"GET http://a/y".to_vec(), false))
        );
        // Another database's channel, a confirmation, garbage.
        assert_eq!(
            l2.peer_message(b"b2", &msg(b"t:invalidations:0", &payload)),
            None
        );
        let confirm = OwnedFrame::Array(vec![
            OwnedFrame::BulkString(b"subscribe".to_vec()),
            OwnedFrame::BulkString(b"t:invalidations:3".to_vec()),
            OwnedFrame::Integer(1),
        ]);
        assert_eq!(l2.peer_message(b"b2", &confirm), None);
        assert_eq!(
            l2.peer_message(b"b2", &msg(b"t:invalidations:3", b"a1 xGET")),
            None
        );
        assert_eq!(
            l2.peer_message(b"b2", &msg(b"t:invalidations:3", b"nospace")),
            None
        );
    }

    #[test]
    fn lookups_see_invalidations_since_they_started() {
        let l2 = l2();
        let g0 = l2.generation();
        assert!(!l2.invalidated_since(b"GET http://a/x", g0));
        l2.note_invalidation(b"GET http://a/", true);
        assert!(l2.invalidated_since(b"GET http://a/x", g0));
        assert!(!l2.invalidated_since(b"GET http://b/x", g0));
        let g1 = l2.generation();
        assert!(
            !l2.invalidated_since(b"GET http://a/x", g1),
            "before it started"
        );
        l2.note_invalidation(b"GET http://b/x", false);
        assert!(l2.invalidated_since(b"GET http://b/x", g1));
        assert!(
            !l2.invalidated_since(b"GET http://b/xy", g1),
            "exact key only"
        );
        // More than RECENT since: too many to tell, counted as covered.
        for i in 0..RECENT {
            l2.note_invalidation(format!("GET http://c/{i}").as_bytes(), false);
        }
        assert!(l2.invalidated_since(b"GET http://z/", g1));
        let g2 = l2.generation() - RECENT as u64;
        assert!(
            !l2.invalidated_since(b"GET http://z/", g2),
            "all since g2 remembered"
        );
    }

    #[test]
    fn scan_pattern_is_literal() {
        let l2 = l2();
        let mut out = Vec::new();
        l2.scan_command(b"GET http://a/[x]*", b"0", &mut out);
        let (f, _) = parse_reply(&out).unwrap().unwrap();
        let OwnedFrame::Array(parts) = f else {
            panic!()
        };
        assert_eq!(
            parts[3],
            OwnedFrame::BulkString(b"t:GET http://a/\\[x\\]\\**".to_vec())
        );
    }

    proptest! {
        /// Any entry bytes round-trip; any garbage decodes to None or an entry, never panics.
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&bytes);
            let _ = decode_entry(Bytes::from(b));
            let _ = decode_entry(Bytes::from(bytes));
        }

        #[test]
        fn bodies_round_trip(body in proptest::collection::vec(any::<u8>(), 0..2000), age in 0u64..1_000_000) {
            let mut e = entry("HTTP/1.1 200 OK\r\nCache-Control: max-age=5\r\n", &body, None);
            e.facts.age = age;
            let mut enc = Vec::new();
            encode_entry(&e, &mut enc);
            let d = decode_entry(Bytes::from(enc)).unwrap();
            prop_assert_eq!(&d.body[..], &body[..]);
            prop_assert_eq!(d.facts.age, age);
            prop_assert!(d.etag.is_none());
        }
    }
}
