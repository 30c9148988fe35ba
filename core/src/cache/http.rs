//! The cache as the proxy session uses it: look a request up, capture a storable response
//! while it streams to the client, answer hits (and conditional requests) from the store,
//! invalidate on unsafe methods.

use super::store::{Store, Stored};
use super::{
    current_age, not_modified, primary_key, reuse, same_origin_target, storable, vary_key,
    Directives, Policy, RequestFacts, ResponseFacts, Reuse,
};
use crate::forward::{vary_values, Peer};
use crate::http1::head::{Method, RequestHead, ResponseHead};
use crate::wake::{Waiters, Waker};
use bytes::Bytes;
use parking_lot::Mutex;
use smallvec::SmallVec;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// The same moment on the monotonic and the wall clock: `now` converts to an HTTP date.
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    pub base: Instant,
    pub wall: SystemTime,
}

impl WallClock {
    pub fn at(&self, now: Instant) -> SystemTime {
        self.wall + now.saturating_duration_since(self.base)
    }

    /// The monotonic moment of wall-clock time `t` (the inverse of [`at`](Self::at); a
    /// time before the base maps to the base).
    pub fn instant_of(&self, t: SystemTime) -> Instant {
        self.base + t.duration_since(self.wall).unwrap_or_default()
    }
}

#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub stale_served: AtomicU64,
    pub not_modified: AtomicU64,
    /// Stale entries refreshed by a 304 from the origin.
    pub revalidated: AtomicU64,
    pub stored: AtomicU64,
    pub bytes_served: AtomicU64,
}

pub struct HttpCache {
    pub store: Store,
    pub policy: Policy,
    /// Request fields whose values extend every key.
    pub key_headers: Vec<String>,
    pub stats: CacheStats,
    /// Keys being fetched right now (request coalescing): `None` while fetching; `Some(t)`
    /// once the fetch turned out not storable ("hit for pass"): until `t`, requests for the
    /// key go to the backend at once instead of waiting.
    inflight: Box<[Mutex<Inflight>]>,
    /// How long a request waits for another one's fetch of the same key before going to
    /// the backend itself (nginx: `proxy_cache_lock_timeout`).
    pub lock_timeout: Duration,
    /// Background refreshes (stale-while-revalidate) waiting for the runtime's fetcher.
    refreshes: Mutex<std::collections::VecDeque<Refresh>>,
    /// Wakes the fetcher; `None` while no fetcher runs (then nothing is queued).
    refresh_wake: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
    /// The shared tier behind this one (Redis), when configured.
    pub l2: Option<super::l2::L2>,
    /// What the cache fetches on its own schedule.
    pub warming: super::WarmingPlan,
}

/// Refreshes queued at most; past it, a stale entry is simply refreshed later.
const REFRESH_QUEUE: usize = 1024;

/// A background refresh of a stale entry: the request to send (conditional, `Connection:
/// close`) to a backend of `upstream`, and what [`HttpCache::absorb`] needs for the answer.
#[derive(Debug)]
pub struct Refresh {
    pub upstream: u16,
    pub request: Vec<u8>,
    pub pending: Box<Pending>,
}

/// Keys being fetched or passed, one map per shard.
type Inflight = HashMap<Vec<u8>, Flight, ahash::RandomState>;

#[derive(Debug)]
enum Flight {
    /// Being fetched; once its storable response head arrived (with a known length),
    /// the body as it grows, for waiting requests to stream. The requests waiting for it
    /// (the cache lock) are woken when that changes or the fetch ends.
    Fetching(Option<Arc<Growing>>, Waiters),
    /// Not storable ("hit for pass"): until then, requests go to the backend at once.
    Pass(SystemTime),
}

/// Why a request does not lead its key's fetch.
#[derive(Debug)]
enum Busy {
    /// Another request fetches it (with its response as it grows, once there is one).
    Fetching(Option<Arc<Growing>>),
    /// Its responses are not stored (a live pass marker).
    Pass,
}

impl Flight {
    fn busy(&self, now: SystemTime) -> Option<Busy> {
        match self {
            Flight::Fetching(g, _) => Some(Busy::Fetching(g.clone())),
            Flight::Pass(until) if now < *until => Some(Busy::Pass),
            Flight::Pass(_) => None,
        }
    }

    /// Wake the requests waiting on this fetch (they look again).
    fn waiters(&mut self) -> Waiters {
        match self {
            Flight::Fetching(_, w) => w.take(),
            Flight::Pass(_) => Waiters::default(),
        }
    }
}

/// A storable response on its way into the cache, shared with the requests that wait on
/// its key: they send its head at once and stream the body as it arrives (collapsed
/// forwarding), instead of waiting for it to complete.
#[derive(Debug)]
pub struct Growing {
    /// The stored head (status line and fields, as in [`Stored::head`]).
    pub head: Bytes,
    /// Body length (only responses with a known length are streamed to waiters).
    pub length: u64,
    pub facts: ResponseFacts,
    pub etag: Option<Bytes>,
    pub vary: Bytes,
    pub secondary: Vec<u8>,
    body: Mutex<GrowBody>,
}

#[derive(Debug, Default)]
struct GrowBody {
    /// Followers that have sent everything there is: woken when that changes.
    waiters: Waiters,
    bytes: Vec<u8>,
    /// Complete: the stored entry (its body is `bytes`).
    done: Option<Arc<Stored>>,
    /// Abandoned before it completed (the fetch failed): followers are cut off.
    failed: bool,
}

/// What a follower may send next.
#[derive(Debug, PartialEq, Eq)]
pub enum Grown {
    /// Body bytes from the offset asked for (possibly none yet).
    More,
    /// The body is complete.
    Done,
    /// The fetch failed: the response cannot be completed.
    Failed,
}

impl Growing {
    /// Hand body bytes from `sent` on to `out` (a body stage), at most `max`; how many, and
    /// the state (`out`'s `end` is called when that is [`Grown::Done`]). Bytes of a
    /// completed fetch are shared with the stored body, not copied. A follower that got all
    /// there is and has a `waker` is woken when more arrives, the body completes or the
    /// fetch fails.
    pub fn copy_from(
        &self,
        sent: usize,
        max: usize,
        out: &mut impl crate::http1::response::BodySink,
        waker: Option<&Waker>,
    ) -> (usize, Grown) {
        let mut b = self.body.lock();
        if b.failed {
            return (0, Grown::Failed);
        }
        let avail = match &b.done {
            Some(s) => s.body.len(),
            None => b.bytes.len(),
        };
        let end = avail.min(sent.saturating_add(max));
        let n = end.saturating_sub(sent);
        if n > 0 {
            match &b.done {
                Some(s) => out.shared(s.body.slice(sent..end)),
                None => out.copy(&b.bytes[sent..end]),
            }
        }
        let caught_up = end >= avail;
        let state = if b.done.is_some() && caught_up {
            out.end();
            Grown::Done
        } else {
            Grown::More
        };
        if let (Grown::More, true, Some(w)) = (&state, caught_up, waker) {
            b.waiters.add(w);
        }
        (n, state)
    }

    /// Wake the followers waiting for more (after a change, outside the lock).
    fn wake(&self) {
        let w = self.body.lock().waiters.take();
        w.wake_all();
    }
}

/// How often a waiting request looks at the store again.
pub const WAIT_POLL: Duration = Duration::from_millis(2);

/// The right to fetch a key for everyone waiting on it; given up when dropped.
pub struct Lead {
    cache: Arc<HttpCache>,
    key: Vec<u8>,
}

impl std::fmt::Debug for HttpCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpCache")
            .field("store", &self.store)
            .field("policy", &self.policy)
            .finish()
    }
}

impl std::fmt::Debug for Lead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lead")
    }
}

impl Lead {
    /// The response will not be stored: the waiters, and requests for the key for the next
    /// `lock_timeout`, go to the backend themselves.
    pub fn pass(&self, now: SystemTime) {
        if let Some(v) = self
            .cache
            .inflight_shard(&self.key)
            .lock()
            .get_mut(&self.key)
        {
            let w = v.waiters();
            *v = Flight::Pass(now + self.cache.lock_timeout);
            w.wake_all();
        }
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        let mut m = self.cache.inflight_shard(&self.key).lock();
        // A pass marker outlives the fetch; a plain fetch ends here.
        let ended = match m.get(&self.key) {
            Some(Flight::Fetching(..)) => m.remove(&self.key),
            _ => None,
        };
        drop(m);
        if let Some(mut f) = ended {
            f.waiters().wake_all();
        }
    }
}

/// Pass markers kept per shard before expired ones are swept.
const PASS_SWEEP: usize = 1024;

/// What the session keeps of a cacheable request until its response arrives.
#[derive(Debug)]
pub struct Pending {
    pub key: Vec<u8>,
    /// The request head's bytes and spans into them (for `Vary`).
    head_bytes: Vec<u8>,
    head: RequestHead,
    facts: RequestFacts,
    /// The client, for the values its request is forwarded with (`Vary`).
    peer: Peer,
    request_time: SystemTime,
    /// A stored response that needs validation (or may answer if the origin fails).
    stale: Option<Arc<Stored>>,
    /// The proxy added `If-None-Match` / `If-Modified-Since` for `stale` (the client sent
    /// no conditional of its own), so a 304 refreshes the stored response.
    pub validating: bool,
    /// `stale` needs validation only because it aged: a more recent copy (from L2) may
    /// answer instead ([`fresher_copy_may_answer`](super::fresher_copy_may_answer)).
    pub fresher_may_answer: bool,
    /// This request fetches the key for others waiting on it.
    pub lead: Option<Lead>,
}

impl Pending {
    /// The request head this pending fetch was made for: its bytes and spans into them.
    pub fn request_head(&self) -> (&[u8], &RequestHead) {
        (&self.head_bytes, &self.head)
    }

    /// The request's secondary key under a response's `Vary` (`None` for `Vary: *`),
    /// from the values it was forwarded with.
    pub fn vary_key(&self, vary: &[u8]) -> Option<Vec<u8>> {
        vary_key([vary], |n| {
            vary_values(&self.head, &self.head_bytes, self.peer, n)
        })
    }

    /// A background refresh validates whenever the stored entry has a validator, whatever
    /// conditionals the client sent (they were answered from the store).
    fn force_validators(&mut self) {
        self.validating = self
            .stale
            .as_ref()
            .is_some_and(|s| s.etag.is_some() || s.facts.last_modified.is_some());
    }

    /// The conditional header lines of a refresh (`If-None-Match` / `If-Modified-Since`).
    pub fn refresh_lines(&self) -> Vec<u8> {
        let mut lines = Vec::new();
        let Some(stored) = self.stale.as_ref().filter(|_| self.validating) else {
            return lines;
        };
        if let Some(etag) = &stored.etag {
            lines.extend_from_slice(b"If-None-Match: ");
            lines.extend_from_slice(etag);
            lines.extend_from_slice(b"\r\n");
        }
        if let Some(lm) = stored.facts.last_modified {
            lines.extend_from_slice(b"If-Modified-Since: ");
            lines.extend_from_slice(super::format_date(lm).as_bytes());
            lines.extend_from_slice(b"\r\n");
        }
        lines
    }

    /// L1 holds an entry for the request (stale, or to be validated).
    pub fn has_stored(&self) -> bool {
        self.stale.is_some()
    }

    /// When L1's entry (if any) was received from the origin.
    pub fn stored_since(&self) -> Option<SystemTime> {
        self.stale.as_ref().map(|s| s.facts.response_time)
    }

    /// This fetch will not be stored: whoever waits on it should stop.
    pub fn pass(&self, now: SystemTime) {
        if let Some(l) = &self.lead {
            l.pass(now);
        }
    }

    /// Conditional header lines to validate the stored response, unless the client sent
    /// conditionals of its own (then its request goes through as is).
    pub fn validator_lines(&mut self) -> Option<Vec<u8>> {
        if has_conditionals(&self.head, &self.head_bytes) {
            return None;
        }
        self.stale.as_ref()?;
        self.force_validators();
        self.validating.then(|| self.refresh_lines())
    }
}

/// What to do with a request.
#[derive(Debug)]
pub enum Lookup {
    /// Not the cache's business (no cache, unsafe method, a request body).
    Bypass,
    /// An unsafe method: a non-error response invalidates this key (and same-origin
    /// `Location` / `Content-Location`).
    Invalidate { key: Vec<u8>, scheme_host: Vec<u8> },
    /// Answer from the store. `stale`: within `stale-while-revalidate`.
    Hit {
        stored: Arc<Stored>,
        age: u64,
        stale: bool,
        not_modified: bool,
        /// Stale within `stale-while-revalidate` and nobody refreshing it yet: the caller
        /// builds the request and queues the refresh ([`HttpCache::queue_refresh`]).
        refresh: Option<Box<Pending>>,
    },
    /// Forward; store the response if it may be stored.
    Miss(Box<Pending>),
    /// `only-if-cached` and nothing usable stored: 504 (RFC 9111 §5.2.1.7).
    Unsatisfiable,
    /// Another request is fetching this key and its response may answer this one:
    /// stream it as it arrives.
    Follow(Arc<Growing>),
    /// Another request is fetching this key: look again when woken (with a waker), else
    /// in [`WAIT_POLL`].
    Wait,
}

/// A response being copied into the cache as it streams to the client (and, through
/// its [`Growing`], to the requests waiting on its key).
#[derive(Debug)]
pub struct Capture {
    key: Vec<u8>,
    grow: Arc<Growing>,
    limit: usize,
    /// Too large: abandoned.
    dropped: bool,
    /// Stored (or refused by the store): complete either way.
    finished: bool,
}

impl Capture {
    /// Body bytes as they go to the client (decoded, without chunk framing).
    pub fn push(&mut self, data: &[u8]) {
        if self.dropped {
            return;
        }
        let mut b = self.grow.body.lock();
        if b.bytes.len() + data.len() > self.limit {
            self.dropped = true;
            b.bytes = Vec::new();
            b.failed = true;
        } else {
            b.bytes.extend_from_slice(data);
        }
        let w = b.waiters.take();
        drop(b);
        w.wake_all();
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if !self.finished {
            // The fetch ended before the response did: whoever streams it is cut off.
            self.grow.body.lock().failed = true;
            self.grow.wake();
        }
    }
}

/// The request carries conditional fields of its own.
fn has_conditionals(h: &RequestHead, buf: &[u8]) -> bool {
    [
        &b"if-none-match"[..],
        b"if-modified-since",
        b"if-match",
        b"if-unmodified-since",
        b"if-range",
    ]
    .iter()
    .any(|n| !field_values(h, buf, n).is_empty())
}

/// Every value of a request field, in order.
pub fn field_values<'a>(h: &RequestHead, buf: &'a [u8], name: &[u8]) -> Vec<&'a [u8]> {
    h.headers
        .iter()
        .filter(|f| f.name.get(buf).eq_ignore_ascii_case(name))
        .map(|f| f.value.get(buf))
        .collect()
}

fn request_facts(h: &RequestHead, buf: &[u8]) -> RequestFacts {
    let cc_lines = field_values(h, buf, b"cache-control");
    let pragma_no_cache = cc_lines.is_empty()
        && field_values(h, buf, b"pragma")
            .iter()
            .any(|v| v.eq_ignore_ascii_case(b"no-cache"));
    RequestFacts {
        cacheable_method: matches!(h.method, Method::Get | Method::Head),
        cc: Directives::parse(cc_lines),
        authorization: !field_values(h, buf, b"authorization").is_empty(),
        pragma_no_cache,
    }
}

impl HttpCache {
    pub fn new(store: Store, policy: Policy, key_headers: Vec<String>) -> Self {
        HttpCache {
            store,
            policy,
            key_headers,
            stats: CacheStats::default(),
            inflight: (0..16)
                .map(|_| {
                    Mutex::new(HashMap::with_hasher(ahash::RandomState::with_seeds(
                        5, 6, 7, 8,
                    )))
                })
                .collect(),
            lock_timeout: Duration::from_secs(5),
            refreshes: Mutex::new(std::collections::VecDeque::new()),
            refresh_wake: Mutex::new(None),
            l2: None,
            warming: super::WarmingPlan::default(),
        }
    }

    /// A fetcher (a runtime service) will carry out background refreshes; `wake` is called
    /// when one is queued.
    /// The same call wakes it for L2 work (the L2 writer runs beside the fetches:
    /// [`crate::background::Background`]).
    pub fn set_refresher(&self, wake: impl Fn() + Send + Sync + 'static) {
        let wake = Arc::new(wake);
        if let Some(l2) = &self.l2 {
            let w = wake.clone();
            l2.set_writer(move || w());
        }
        *self.refresh_wake.lock() = Some(Box::new(move || wake()));
    }

    /// Queue a refresh and wake the fetcher. Dropped (with its lead) when the queue is full.
    pub fn queue_refresh(&self, r: Refresh) {
        let mut q = self.refreshes.lock();
        if q.len() < REFRESH_QUEUE {
            q.push_back(r);
            drop(q);
            if let Some(w) = self.refresh_wake.lock().as_ref() {
                w();
            }
        }
    }

    /// Entries without `Vary` or key extension that drew at least `threshold` requests
    /// this hour and expire within `min(horizon, lifetime / 2)`: the predictive warming
    /// candidates, as (host, target, entry).
    pub fn hot_and_expiring(
        &self,
        threshold: u64,
        horizon: Duration,
        now: SystemTime,
    ) -> Vec<(String, String, Arc<Stored>)> {
        let hot = self.store.select(|key, e| {
            if !e.vary.is_empty() || key.contains(&0) || e.demand.this_hour(now) < threshold {
                return false;
            }
            let life = super::freshness_lifetime(&e.facts, &self.policy);
            let left = life.saturating_sub(current_age(&e.facts, now));
            !left.is_zero() && left <= horizon.min(life / 2)
        });
        hot.into_iter()
            .filter_map(|(key, e)| {
                let url = std::str::from_utf8(key.strip_prefix(b"GET http://")?).ok()?;
                let slash = url.find('/')?;
                Some((url[..slash].to_string(), url[slash..].to_string(), e))
            })
            .collect()
    }

    /// A fetch of `path` under `host` into the cache for a backend of `upstream`: warming
    /// (`stale` None), or a conditional refresh of `stale` (predictive warming). `None` when
    /// the key is being fetched already or the path is not a valid target.
    pub fn fetch_job(
        self: &Arc<Self>,
        host: &str,
        path: &str,
        upstream: u16,
        limits: &crate::http1::Limits,
        now: SystemTime,
        stale: Option<Arc<Stored>>,
    ) -> Option<Refresh> {
        let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
            .into_bytes();
        let h = match crate::http1::head::parse_request(&request, limits) {
            Ok(crate::http1::head::Parsed::Complete(h)) => h,
            _ => return None,
        };
        let key = self.key(&h, &request);
        let lead = self.lead(&key, now).ok()?;
        let facts = request_facts(&h, &request);
        let mut pending = Box::new(Pending {
            key: key.to_vec(),
            head_bytes: request.clone(),
            head: h,
            facts,
            peer: Peer::LOCAL,
            request_time: now,
            stale,
            validating: false,
            fresher_may_answer: false,
            lead: Some(lead),
        });
        pending.force_validators();
        let mut request = request;
        let end = request.len() - 2;
        request.splice(end..end, pending.refresh_lines());
        Some(Refresh {
            upstream,
            request,
            pending,
        })
    }

    /// The next refresh for the fetcher to carry out.
    pub fn take_refresh(&self) -> Option<Refresh> {
        self.refreshes.lock().pop_front()
    }

    /// The whole response to a refresh arrived (`response`: head and body, the backend
    /// closed after it): store or refresh the entry. Says what happened.
    pub fn absorb(
        self: &Arc<Self>,
        r: Refresh,
        response: &[u8],
        now: SystemTime,
    ) -> Result<&'static str, String> {
        use crate::http1::body::{Chunk, ChunkedDecoder};
        use crate::http1::head::{parse_response, Parsed};
        use crate::http1::BodyKind;
        let h = match parse_response(response, 64 * 1024) {
            Ok(Parsed::Complete(h)) => h,
            Ok(Parsed::Partial) => return Err("incomplete response head".into()),
            Err(e) => return Err(format!("bad response head: {}", e.why)),
        };
        let p = &r.pending;
        if h.status == 304 {
            return match self.revalidated(p, &h, response, now) {
                Some(_) => Ok("revalidated"),
                None => Err("304 to a request that was not conditional".into()),
            };
        }
        let Some(mut c) = self.begin_capture(p, &h, response, now) else {
            if crate::cache::invalidating_status(h.status) || h.status >= 400 {
                // The origin now says something the cache may not keep: drop the old one.
                self.drop_key(&p.key);
            }
            return Ok("not storable");
        };
        let body = &response[h.len..];
        match h.body {
            BodyKind::None => {}
            BodyKind::Length(n) => {
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                if body.len() < n {
                    return Err("response body cut short".into());
                }
                c.push(&body[..n]);
            }
            BodyKind::UntilClose => c.push(body),
            BodyKind::Chunked => {
                let mut dec = ChunkedDecoder::new();
                let mut pos = 0;
                loop {
                    let (used, chunk) = dec
                        .decode(&body[pos..])
                        .map_err(|e| format!("bad chunked body: {e}"))?;
                    if let Some(Chunk::Data(r)) = &chunk {
                        c.push(&body[pos + r.start..pos + r.end]);
                    }
                    pos += used;
                    if matches!(chunk, Some(Chunk::End)) {
                        break;
                    }
                    if used == 0 || pos >= body.len() {
                        return Err("chunked body cut short".into());
                    }
                }
            }
        }
        self.finish(&mut c);
        Ok("stored")
    }

    fn inflight_shard(&self, key: &[u8]) -> &Mutex<Inflight> {
        let h = key.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        &self.inflight[(h % self.inflight.len() as u64) as usize]
    }

    /// The fetch of `key` under way, or its live pass marker.
    fn in_flight(&self, key: &[u8], now: SystemTime) -> Option<Busy> {
        self.inflight_shard(key).lock().get(key)?.busy(now)
    }

    /// Wake `w` when the fetch of `key` moves (its response head arrives, so it may be
    /// followed; it ends or gives up the key). At once when it has ended already.
    fn wait_for(&self, key: &[u8], w: &Waker) {
        if let Some(Flight::Fetching(_, waiters)) = self.inflight_shard(key).lock().get_mut(key) {
            return waiters.add(w);
        }
        w.wake();
    }

    /// Become the one fetching `key`, or learn that another request is (`Err(Fetching)`,
    /// with its response as it grows once there is one) or that the key's responses are
    /// not stored, so waiting is pointless (`Err(Pass)`).
    fn lead(self: &Arc<Self>, key: &[u8], now: SystemTime) -> Result<Lead, Busy> {
        let mut m = self.inflight_shard(key).lock();
        if let Some(b) = m.get(key).and_then(|f| f.busy(now)) {
            return Err(b);
        }
        if m.len() >= PASS_SWEEP {
            m.retain(|_, v| match v {
                Flight::Fetching(..) => true,
                Flight::Pass(until) => now < *until,
            });
        }
        m.insert(key.to_vec(), Flight::Fetching(None, Waiters::default()));
        Ok(Lead {
            cache: self.clone(),
            key: key.to_vec(),
        })
    }

    /// The request's primary cache key, on the stack unless it is long.
    fn key(&self, h: &RequestHead, buf: &[u8]) -> SmallVec<[u8; 192]> {
        let mut ext = Vec::new();
        for name in &self.key_headers {
            ext.extend_from_slice(name.as_bytes());
            ext.push(b'=');
            for v in field_values(h, buf, name.as_bytes()) {
                ext.extend_from_slice(v);
                ext.push(b',');
            }
            ext.push(b'\n');
        }
        let mut k = SmallVec::new();
        super::write_primary_key(&mut k, "http", h.effective_host(buf), h.path.get(buf), &ext);
        k
    }

    /// May a request stream `g`, the response another request is fetching for its key?
    /// Fresh for it, the same `Vary` variant, and no conditionals (those are answered
    /// from the entry once it is complete).
    fn may_follow(
        &self,
        g: &Growing,
        h: &RequestHead,
        buf: &[u8],
        peer: Peer,
        facts: &RequestFacts,
        now: SystemTime,
    ) -> bool {
        if has_conditionals(h, buf) {
            return false;
        }
        if !g.vary.is_empty()
            && vary_key([&g.vary[..]], |n| vary_values(h, buf, peer, n)).as_ref()
                != Some(&g.secondary)
        {
            return false;
        }
        reuse(facts, &g.facts, &self.policy, now) == Reuse::Fresh
    }

    /// What to do with a request from `peer`. `may_wait`: it has not yet waited
    /// `lock_timeout` for another request's fetch of the same key.
    pub fn lookup(
        self: &Arc<Self>,
        h: &RequestHead,
        buf: &[u8],
        peer: Peer,
        now: SystemTime,
        may_wait: bool,
        waker: Option<&Waker>,
    ) -> Lookup {
        let safe = matches!(
            h.method,
            Method::Get | Method::Head | Method::Options | Method::Trace
        );
        if !safe {
            return Lookup::Invalidate {
                key: self.key(h, buf).to_vec(),
                scheme_host: h.effective_host(buf).to_vec(),
            };
        }
        let facts = request_facts(h, buf);
        if !facts.cacheable_method || h.body != crate::http1::BodyKind::None {
            return Lookup::Bypass;
        }
        let key = self.key(h, buf);
        let stored = self.store.get(&key, |name| vary_values(h, buf, peer, name));
        if let Some(stored) = &stored {
            let decision = reuse(&facts, &stored.facts, &self.policy, now);
            if decision != Reuse::Validate {
                let age = current_age(&stored.facts, now).as_secs();
                let nm = not_modified(
                    field_values(h, buf, b"if-none-match").first().copied(),
                    field_values(h, buf, b"if-modified-since").first().copied(),
                    stored.etag.as_deref(),
                    stored.facts.last_modified,
                );
                let stale = decision == Reuse::StaleWhileRevalidate;
                let refresh =
                    if stale && h.method == Method::Get && self.refresh_wake.lock().is_some() {
                        self.lead(&key, now).ok().map(|lead| {
                            let mut p = Box::new(Pending {
                                key: key.to_vec(),
                                head_bytes: buf[..h.len].to_vec(),
                                head: h.clone(),
                                facts: facts.clone(),
                                peer,
                                request_time: now,
                                stale: Some(stored.clone()),
                                validating: false,
                                fresher_may_answer: false,
                                lead: Some(lead),
                            });
                            p.force_validators();
                            p
                        })
                    } else {
                        None
                    };
                return Lookup::Hit {
                    stored: stored.clone(),
                    age,
                    stale,
                    not_modified: nm,
                    refresh,
                };
            }
        }
        if facts.cc.only_if_cached && stored.is_none() {
            return Lookup::Unsatisfiable;
        }
        // Coalescing: one request fetches, concurrent ones for the same key wait for it
        // (at most `lock_timeout`, then they go themselves, leaderless).
        // A HEAD never leads: its response is not stored, so it would only hold the GETs
        // back (and mark the key "not storable"). It follows or waits for a GET's fetch.
        let flight = if h.method == Method::Head {
            self.in_flight(&key, now).map_or(Ok(None), Err)
        } else {
            self.lead(&key, now).map(Some)
        };
        let lead = match flight {
            Ok(l) => l,
            Err(Busy::Fetching(Some(g))) if self.may_follow(&g, h, buf, peer, &facts, now) => {
                return Lookup::Follow(g);
            }
            Err(Busy::Fetching(_)) if may_wait => {
                if let Some(w) = waker {
                    self.wait_for(&key, w);
                }
                return Lookup::Wait;
            }
            Err(_) => None,
        };
        let fresher_may_answer = stored
            .as_ref()
            .is_some_and(|s| super::fresher_copy_may_answer(&facts, &s.facts, &self.policy));
        Lookup::Miss(Box::new(Pending {
            lead,
            key: key.to_vec(),
            head_bytes: buf[..h.len].to_vec(),
            head: h.clone(),
            facts,
            peer,
            request_time: now,
            stale: stored,
            validating: false,
            fresher_may_answer,
        }))
    }

    /// The origin answered 304 to the proxy's validation: refresh the stored response's
    /// header fields and freshness from it (RFC 9111 §4.3.4) and return the refreshed
    /// entry, which answers the client.
    pub fn revalidated(
        &self,
        p: &Pending,
        h: &ResponseHead,
        buf: &[u8],
        now: SystemTime,
    ) -> Option<Arc<Stored>> {
        let old = p.stale.as_ref().filter(|_| p.validating)?;
        // Stored fields, minus those the 304 replaces, plus the 304's.
        let mut head = Vec::with_capacity(old.head.len() + h.len);
        if let Some(status) = old.head.split(|&b| b == b'\n').next() {
            head.extend_from_slice(status);
            head.push(b'\n');
        }
        // A 304 without `Date` still dates the refreshed entry: now (as a full response
        // without one is dated when stored), not when the old response arrived.
        let undated = header(h, buf, b"date").is_none();
        if undated {
            crate::http1::write::push_date(&mut head, now);
        }
        for (name, line) in stored_fields(&old.head) {
            let replaced = (undated && name.eq_ignore_ascii_case(b"date"))
                || h.headers.iter().any(|f| {
                    !not_stored_field(h, buf, f, &self.policy)
                        && f.name.get(buf).eq_ignore_ascii_case(name)
                });
            if !replaced {
                head.extend_from_slice(line);
                head.extend_from_slice(b"\r\n");
            }
        }
        for f in &h.headers {
            if !not_stored_field(h, buf, f, &self.policy) {
                head.extend_from_slice(f.name.get(buf));
                head.extend_from_slice(b": ");
                head.extend_from_slice(f.value.get(buf));
                head.extend_from_slice(b"\r\n");
            }
        }
        // Facts from the merged fields, as if the full response had just arrived.
        let mut whole = head.clone();
        whole.extend_from_slice(b"\r\n");
        let parsed = match crate::http1::head::parse_response(&whole, whole.len()) {
            Ok(crate::http1::head::Parsed::Complete(r)) => r,
            _ => return None,
        };
        let mut facts = response_facts(&parsed, &whole, p.request_time, now);
        self.retarget(&mut facts, &parsed, &whole);
        facts.status = old.facts.status;
        let etag = header(&parsed, &whole, b"etag").map(Bytes::copy_from_slice);
        let entry = Stored {
            head: Bytes::from(head),
            body: old.body.clone(),
            facts,
            etag,
            vary: old.vary.clone(),
            secondary: old.secondary.clone(),
            demand: old.demand.carried(),
        };
        if storable(&p.facts, &entry.facts, &self.policy).is_err() {
            self.drop_key(&p.key);
            return Some(Arc::new(entry));
        }
        let entry = Arc::new(entry);
        if self.store.insert(&p.key, Stored::clone_of(&entry)) {
            if let Some(l2) = &self.l2 {
                l2.queue_set(&p.key, Stored::clone_of(&entry));
            }
        }
        self.stats.revalidated.fetch_add(1, Ordering::Relaxed);
        Some(entry)
    }

    /// The origin failed (or none is available): a stored response that may be served
    /// stale on error (`stale-if-error`), and its age.
    pub fn stale_for_error(&self, p: &Pending, now: SystemTime) -> Option<(Arc<Stored>, u64)> {
        let stored = p.stale.as_ref()?;
        if !super::stale_on_error(&p.facts, &stored.facts, &self.policy, now) {
            return None;
        }
        self.stats.stale_served.fetch_add(1, Ordering::Relaxed);
        Some((stored.clone(), current_age(&stored.facts, now).as_secs()))
    }

    /// On the response head of a miss: start copying it into the cache if it may be
    /// stored.
    pub fn begin_capture(
        &self,
        p: &Pending,
        h: &ResponseHead,
        buf: &[u8],
        now: SystemTime,
    ) -> Option<Box<Capture>> {
        let mut facts = response_facts(h, buf, p.request_time, now);
        self.retarget(&mut facts, h, buf);
        if let Err(why) = storable(&p.facts, &facts, &self.policy) {
            tracing::trace!(?why, "response not stored");
            if let Some(l) = &p.lead {
                l.pass(now);
            }
            return None;
        }
        let vary_lines: Vec<&[u8]> = response_values(h, buf, b"vary").collect();
        let vary = vary_lines.join(&b", "[..]);
        let secondary = if vary.is_empty() {
            Vec::new()
        } else {
            p.vary_key(&vary)?
        };
        let etag = header(h, buf, b"etag").map(Bytes::copy_from_slice);
        let limit = self.store.max_object();
        let length = match h.body {
            crate::http1::BodyKind::Length(n) => Some(n),
            crate::http1::BodyKind::None => Some(0),
            _ => None,
        };
        let grow = Arc::new(Growing {
            head: Bytes::from(stored_head(h, buf, &self.policy, now)),
            length: length.unwrap_or(0),
            facts,
            etag,
            vary: Bytes::from(vary),
            secondary,
            body: Mutex::new(GrowBody::default()),
        });
        if p.lead.is_some() && length.is_some_and(|n| n <= limit as u64) {
            // Requests waiting on the key may stream it from here on.
            let mut woken = Waiters::default();
            if let Some(Flight::Fetching(g @ None, w)) =
                self.inflight_shard(&p.key).lock().get_mut(&p.key)
            {
                *g = Some(grow.clone());
                woken = w.take();
            }
            // Waiters look again: they follow this response now.
            woken.wake_all();
        }
        Some(Box::new(Capture {
            key: p.key.clone(),
            grow,
            limit,
            dropped: false,
            finished: false,
        }))
    }

    /// Purge one URL (`http://host/path?query`, every variant and key extension) or, with
    /// `prefix`, every URL starting with it. Returns how many entries went.
    pub fn purge(&self, url: &str, prefix: bool) -> Result<usize, String> {
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
            .ok_or_else(|| format!("`{url}`: expected an absolute http:// URL"))?;
        let (host, target) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, "/"),
        };
        if host.is_empty() {
            return Err(format!("`{url}`: no host"));
        }
        let mut key = primary_key("http", host.as_bytes(), target.as_bytes(), b"");
        // With `key_headers`, every key of a URL is `key \0 extension`: a URL is a prefix
        // then, and `prefix` purges cover the extensions too.
        let prefix = if prefix {
            true
        } else if self.key_headers.is_empty() {
            false
        } else {
            key.push(0);
            true
        };
        if let Some(l2) = &self.l2 {
            l2.queue_delete(&key, prefix);
        }
        Ok(self.drop_l1(&key, prefix))
    }

    /// Drop from L1 what `key` covers (every key under it when `prefix`).
    fn drop_l1(&self, key: &[u8], prefix: bool) -> usize {
        if prefix {
            self.store.invalidate_prefix(key)
        } else {
            self.store.invalidate(key)
        }
    }

    /// Another instance sharing L2 carried out this deletion: drop the same from L1 (its
    /// L2 copy is gone already). Returns how many entries went.
    pub fn invalidate_from_peer(&self, key: &[u8], prefix: bool) -> usize {
        if let Some(l2) = &self.l2 {
            // First: a lookup whose reply is on its way sees it and does not fill L1.
            l2.note_invalidation(key, prefix);
            l2.stats.peer_invalidations.fetch_add(1, Ordering::Relaxed);
        }
        self.drop_l1(key, prefix)
    }

    /// Prometheus text for the cache's counters.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let st = &self.stats;
        let ss = &self.store.stats;
        crate::metrics::write_counters(
            out,
            &[
                ("trireme_cache_hits_total", &st.hits),
                ("trireme_cache_misses_total", &st.misses),
                ("trireme_cache_stale_served_total", &st.stale_served),
                ("trireme_cache_not_modified_total", &st.not_modified),
                ("trireme_cache_revalidated_total", &st.revalidated),
                ("trireme_cache_stored_total", &st.stored),
                ("trireme_cache_bytes_served_total", &st.bytes_served),
                ("trireme_cache_evictions_total", &ss.evictions),
                (
                    "trireme_cache_variant_evictions_total",
                    &ss.variant_evictions,
                ),
                ("trireme_cache_invalidations_total", &ss.invalidations),
                ("trireme_cache_too_large_total", &ss.rejected_too_large),
            ],
        );
        if let Some(l2) = &self.l2 {
            l2.render(out);
        }
        let _ = writeln!(
            out,
            "# TYPE trireme_cache_bytes gauge\ntrireme_cache_bytes {}\n# TYPE trireme_cache_entries gauge\ntrireme_cache_entries {}",
            self.store.bytes(),
            self.store.len()
        );
    }

    /// The response streamed completely: store it.
    pub fn finish(&self, c: &mut Capture) {
        if c.dropped {
            return;
        }
        c.finished = true;
        let g = &c.grow;
        let mut b = g.body.lock();
        let stored = Stored {
            head: g.head.clone(),
            body: Bytes::from(std::mem::take(&mut b.bytes)),
            facts: g.facts.clone(),
            etag: g.etag.clone(),
            vary: g.vary.clone(),
            secondary: g.secondary.clone(),
            demand: Default::default(),
        };
        // Followers finish from the entry (its body is the bytes they were reading).
        b.done = Some(Arc::new(Stored::clone_of(&stored)));
        let followers = b.waiters.take();
        drop(b);
        followers.wake_all();
        // L2 gets what L1 keeps (an entry L1 refuses would be fetched from L2 for nothing).
        let for_l2 = self.l2.as_ref().map(|_| Stored::clone_of(&stored));
        let key = std::mem::take(&mut c.key);
        if self.store.insert(&key, stored) {
            self.stats.stored.fetch_add(1, Ordering::Relaxed);
            if let (Some(l2), Some(e)) = (&self.l2, for_l2) {
                l2.queue_set(&key, e);
            }
        }
    }

    /// An entry read from L2 by a lookup that started at L2 generation `since`: into L1
    /// (not written back). False when L1 refused it, or an invalidation that covers it
    /// came meanwhile (checked after the insert, so one landing in between removes it).
    pub fn fill_from_l2(&self, key: &[u8], mut entry: Stored, since: u64) -> bool {
        let mut whole = entry.head.to_vec();
        whole.extend_from_slice(b"\r\n");
        if let Ok(crate::http1::head::Parsed::Complete(h)) =
            crate::http1::head::parse_response(&whole, whole.len())
        {
            self.retarget(&mut entry.facts, &h, &whole);
        }
        if !self.store.insert(key, entry) {
            return false;
        }
        match &self.l2 {
            Some(l2) if l2.invalidated_since(key, since) => {
                self.store.invalidate(key);
                false
            }
            _ => true,
        }
    }

    /// RFC 9213: the first targeted field the response carries (`CDN-Cache-Control` by
    /// default) replaces `Cache-Control` for this cache; one without a valid directive is
    /// ignored.
    fn retarget(&self, facts: &mut ResponseFacts, h: &ResponseHead, buf: &[u8]) {
        for name in &self.policy.targeted {
            let mut lines = response_values(h, buf, name).peekable();
            if lines.peek().is_none() {
                continue;
            }
            let d = super::Directives::parse(lines);
            if d != super::Directives::default() {
                facts.cc = d;
                return;
            }
        }
    }

    /// Whether forwarded responses lose their targeted fields (`cache.strip_targeted_fields`).
    pub fn strips_any(&self) -> bool {
        self.policy.strip_targeted && !self.policy.targeted.is_empty()
    }

    /// Whether the forwarded response drops this field (see [`strips_any`](Self::strips_any)).
    pub fn strips(&self, name: &[u8]) -> bool {
        self.strips_any()
            && self
                .policy
                .targeted
                .iter()
                .any(|t| t.eq_ignore_ascii_case(name))
    }

    /// Drop what is stored under `key`, in L1 and L2.
    fn drop_key(&self, key: &[u8]) {
        // L2 first: a request that misses L1 from here on sees the deletion pending and
        // does not bring the entry back from Redis.
        if let Some(l2) = &self.l2 {
            l2.queue_delete(key, false);
        }
        self.store.invalidate(key);
    }

    /// A non-error response to an unsafe request: drop what is stored for its target and
    /// for same-origin `Location` / `Content-Location` (RFC 9111 §4.4).
    pub fn invalidate(&self, key: &[u8], host: &[u8], h: &ResponseHead, buf: &[u8]) {
        self.drop_key(key);
        for f in &h.headers {
            let name = f.name.get(buf);
            if name.eq_ignore_ascii_case(b"location")
                || name.eq_ignore_ascii_case(b"content-location")
            {
                if let Some(target) = same_origin_target(f.value.get(buf), "http", host) {
                    // The key extension is the request's; other variants of the target
                    // under other extensions expire on their own.
                    self.drop_key(&primary_key("http", host, target, b""));
                }
            }
        }
    }
}

/// Every value of a response field, in order.
fn response_values<'a>(
    h: &'a ResponseHead,
    buf: &'a [u8],
    name: &'a [u8],
) -> impl Iterator<Item = &'a [u8]> + 'a {
    h.headers
        .iter()
        .filter(move |f| f.name.get(buf).eq_ignore_ascii_case(name))
        .map(move |f| f.value.get(buf))
}

fn header<'a>(h: &'a ResponseHead, buf: &'a [u8], name: &'a [u8]) -> Option<&'a [u8]> {
    response_values(h, buf, name).next()
}

/// What the cache needs to know of a response, from its head.
pub fn response_facts(
    h: &ResponseHead,
    buf: &[u8],
    request_time: SystemTime,
    response_time: SystemTime,
) -> ResponseFacts {
    let cc = Directives::parse(response_values(h, buf, b"cache-control"));
    let age = header(h, buf, b"age").map_or(0, super::parse_age);
    ResponseFacts {
        status: h.status,
        date: header(h, buf, b"date").and_then(super::parse_date),
        expires: header(h, buf, b"expires").map(super::parse_date),
        last_modified: header(h, buf, b"last-modified").and_then(super::parse_date),
        age,
        has_etag: header(h, buf, b"etag").is_some(),
        vary_star: response_values(h, buf, b"vary")
            .any(|v| v.split(|&b| b == b',').any(|t| t.trim_ascii() == b"*")),
        set_cookie: header(h, buf, b"set-cookie").is_some(),
        cc,
        request_time,
        response_time,
    }
}

/// Fields never stored with a response: hop-by-hop ones, framing (the cache re-frames),
/// `Age` (computed when served), and `Set-Cookie` unless the policy replays cookies.
fn not_stored_field(
    h: &ResponseHead,
    buf: &[u8],
    f: &crate::http1::head::HeaderSpan,
    policy: &Policy,
) -> bool {
    let n = f.name.get(buf);
    h.is_hop(buf, f)
        || n.eq_ignore_ascii_case(b"content-length")
        || n.eq_ignore_ascii_case(b"transfer-encoding")
        || n.eq_ignore_ascii_case(b"age")
        || n.eq_ignore_ascii_case(b"x-cache")
        || n.eq_ignore_ascii_case(b"cache-status")
        || (policy.set_cookie != super::SetCookie::Replay && n.eq_ignore_ascii_case(b"set-cookie"))
}

/// The field lines of a stored head (after its status line), each with its field name,
/// without line endings.
fn stored_fields(head: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    head.split(|&b| b == b'\n').skip(1).filter_map(|line| {
        let l = line.strip_suffix(b"\r").unwrap_or(line);
        (!l.is_empty()).then(|| (l.split(|&b| b == b':').next().unwrap_or(b""), l))
    })
}

/// Status line and the header fields to store, each line with its CRLF.
/// The head to store; one without `Date` gets the time it was received (RFC 9110 section
/// 6.6.1), as the client of the miss saw it, so every hit carries a `Date`.
pub fn stored_head(
    h: &ResponseHead,
    buf: &[u8],
    policy: &Policy,
    received: std::time::SystemTime,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(h.len);
    crate::proxy::write_status_line(&mut out, h.status, h.reason.get(buf));
    if header(h, buf, b"date").is_none() {
        crate::http1::write::push_date(&mut out, received);
    }
    for f in &h.headers {
        if !not_stored_field(h, buf, f, policy) {
            out.extend_from_slice(f.name.get(buf));
            out.extend_from_slice(b": ");
            out.extend_from_slice(f.value.get(buf));
            out.extend_from_slice(b"\r\n");
        }
    }
    out
}

/// How a hit is labelled in `X-Cache` and `Cache-Status` (RFC 9211).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    Hit,
    /// Read from L2 (Redis) into L1 for this request.
    L2Hit,
    /// Within `stale-while-revalidate`.
    Stale,
    /// Validated with the origin (304) and served from the store.
    Revalidated,
    /// The origin failed; served within `stale-if-error`.
    StaleIfError,
    /// Streamed from another request's fetch of the same key as it arrived.
    Collapsed,
}

/// How to answer from the store.
#[derive(Clone, Copy, Debug)]
pub struct HitReply {
    /// Seconds, for the `Age` field.
    pub age: u64,
    pub how: Served,
    /// A HEAD request: no body.
    pub head_only: bool,
    /// The client's conditional matched: 304.
    pub not_modified: bool,
    /// `Connection: close` (the connection ends after this response).
    pub close: bool,
    /// An HTTP/1.0 client keeping the connection: `Connection: keep-alive`.
    pub http10_keep_alive: bool,
}

/// Write a response from the store: the stored head, `Age`, framing, what happened,
/// the connection's fate, then the body (not for HEAD, not for a 304).
pub fn write_hit(out: &mut crate::buf::OutBuf, stored: &Stored, r: HitReply) {
    write_hit_head(out.vec(), &stored.head, stored.body.len() as u64, r);
    if !r.head_only && !r.not_modified {
        // The stored body itself, not a copy (short ones are copied in).
        let len = stored.body.len() as u64;
        use crate::http1::response::BodySink;
        let mut body = crate::respond::ClientBody::new(out, crate::respond::Framing::Length(len));
        body.shared(stored.body.clone());
        body.end();
    }
}

/// The head part of [`write_hit`], for a stored `head` and a body of `body_len` bytes,
/// through the response pipeline ([`crate::respond`]).
pub fn write_hit_head(out: &mut Vec<u8>, head: &[u8], body_len: u64, r: HitReply) {
    use crate::respond::{Framing, ResponsePlan};
    let mut age = itoa::Buffer::new();
    let mut plan = if r.not_modified {
        // 304: the validators and caching fields of the stored response, no body.
        let mut p = ResponsePlan::stored(head, Framing::NoBody);
        p.set_status(304, b"Not Modified");
        const KEEP: [&[u8]; 7] = [
            b"etag",
            b"cache-control",
            b"expires",
            b"date",
            b"vary",
            b"content-location",
            b"last-modified",
        ];
        p.drop_where(|name| !KEEP.iter().any(|k| name.eq_ignore_ascii_case(k)));
        p
    } else {
        ResponsePlan::stored(head, Framing::Length(body_len))
    };
    plan.add_field(b"Age", age.format(r.age).as_bytes());
    plan.add_lines(match r.how {
        Served::Hit => b"X-Cache: HIT\r\nCache-Status: trireme; hit\r\n",
        Served::L2Hit => b"X-Cache: HIT\r\nCache-Status: trireme; hit; detail=l2\r\n",
        Served::Stale => {
            b"X-Cache: STALE\r\nCache-Status: trireme; hit; detail=stale-while-revalidate\r\n"
        }
        Served::Revalidated => {
            b"X-Cache: REVALIDATED\r\nCache-Status: trireme; fwd=stale; fwd-status=304\r\n"
        }
        Served::StaleIfError => {
            b"X-Cache: STALE\r\nCache-Status: trireme; hit; detail=stale-if-error\r\n"
        }
        Served::Collapsed => b"X-Cache: HIT\r\nCache-Status: trireme; fwd=miss; collapsed\r\n",
    });
    plan.close = r.close;
    plan.http10_keep_alive = r.http10_keep_alive;
    // Stored heads always carry a `Date`: the clock is never asked.
    plan.write_h1(out, || std::time::UNIX_EPOCH);
}
