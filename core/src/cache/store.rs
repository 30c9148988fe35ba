//! L1: the in-process store shared by every worker. Sharded by primary key (one short
//! lock per shard, never a global one), each shard bounded in bytes with LRU eviction.
//! A primary key holds one entry per `Vary` variant.

use super::{vary_key, ResponseFacts};
use bytes::Bytes;
use parking_lot::Mutex;
use smallvec::SmallVec;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A stored response.
#[derive(Debug)]
pub struct Stored {
    /// Status line and header fields as they go to clients (no hop-by-hop fields, no
    /// framing fields, no `Age`), each line ending in CRLF, without the final empty line.
    pub head: Bytes,
    pub body: Bytes,
    pub facts: ResponseFacts,
    pub etag: Option<Bytes>,
    /// The response's `Vary` field value(s), joined; empty when none.
    pub vary: Bytes,
    /// The secondary key of the request that fetched it (see [`vary_key`]).
    pub secondary: Vec<u8>,
    /// Hits in the current hour (predictive warming).
    pub demand: Demand,
}

/// Hits counted per wall-clock hour.
#[derive(Debug, Default)]
pub struct Demand {
    hour: AtomicU64,
    hits: AtomicU64,
}

fn hour_of(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 3600)
}

impl Demand {
    pub fn hit(&self, now: std::time::SystemTime) {
        let h = hour_of(now);
        if self.hour.swap(h, Ordering::Relaxed) != h {
            self.hits.store(1, Ordering::Relaxed);
        } else {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Hits so far in the hour of `now`.
    pub fn this_hour(&self, now: std::time::SystemTime) -> u64 {
        if self.hour.load(Ordering::Relaxed) == hour_of(now) {
            self.hits.load(Ordering::Relaxed)
        } else {
            0
        }
    }

    /// A copy of the counts (an entry refreshed keeps its demand).
    pub fn carried(&self) -> Demand {
        Demand {
            hour: AtomicU64::new(self.hour.load(Ordering::Relaxed)),
            hits: AtomicU64::new(self.hits.load(Ordering::Relaxed)),
        }
    }
}

impl Stored {
    /// A copy sharing the body and head bytes (reference-counted).
    pub fn clone_of(s: &Stored) -> Stored {
        Stored {
            head: s.head.clone(),
            body: s.body.clone(),
            facts: s.facts.clone(),
            etag: s.etag.clone(),
            vary: s.vary.clone(),
            secondary: s.secondary.clone(),
            demand: s.demand.carried(),
        }
    }

    /// Bytes charged against the store's bound.
    pub fn charge(&self, key_len: usize) -> usize {
        key_len + self.head.len() + self.body.len() + self.secondary.len() + self.vary.len() + 256
    }
}

/// Counters for metrics and tests.
#[derive(Debug, Default)]
pub struct StoreStats {
    pub inserts: AtomicU64,
    pub evictions: AtomicU64,
    pub invalidations: AtomicU64,
    pub rejected_too_large: AtomicU64,
    /// Variants dropped to make room for a newer one of the same key (`max_variants`).
    pub variant_evictions: AtomicU64,
}

const NIL: u32 = u32::MAX;

/// Variants kept per primary key unless configured (`cache.max_variants`).
pub const DEFAULT_MAX_VARIANTS: usize = 32;

struct Node {
    key: Arc<[u8]>,
    entry: Arc<Stored>,
    charge: usize,
    prev: u32,
    next: u32,
    /// The shard's tick when last stored or served: the least recent variant of a key
    /// makes room when the key has `max_variants`.
    used: u64,
}

/// The variants stored under one primary key.
#[derive(Default)]
struct Variants {
    /// Their nodes, sorted by secondary key (binary search, no scan).
    nodes: SmallVec<[u32; 1]>,
    /// The distinct `Vary` values among them, with how many variants have each: a lookup
    /// computes the request's secondary key once per value, not once per variant.
    varies: SmallVec<[(Bytes, u32); 1]>,
}

/// Where the variant with `secondary` is (or would go) in `v.nodes`.
fn find(nodes: &[Option<Node>], v: &Variants, secondary: &[u8]) -> Result<usize, usize> {
    v.nodes.binary_search_by(|&i| {
        let n = nodes[i as usize].as_ref().expect("live node");
        n.entry.secondary.as_slice().cmp(secondary)
    })
}

#[derive(Default)]
struct Shard {
    /// Primary key -> its variants.
    map: HashMap<Arc<[u8]>, Variants, ahash::RandomState>,
    nodes: Vec<Option<Node>>,
    free: Vec<u32>,
    /// Most recently used first.
    head: u32,
    tail: u32,
    bytes: usize,
    tick: u64,
}

impl Shard {
    fn new() -> Self {
        Shard {
            head: NIL,
            tail: NIL,
            ..Default::default()
        }
    }

    fn node(&self, i: u32) -> &Node {
        self.nodes[i as usize].as_ref().expect("live node")
    }

    fn node_mut(&mut self, i: u32) -> &mut Node {
        self.nodes[i as usize].as_mut().expect("live node")
    }

    fn find(&self, v: &Variants, secondary: &[u8]) -> Result<usize, usize> {
        find(&self.nodes, v, secondary)
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = {
            let n = self.node(i);
            (n.prev, n.next)
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.node_mut(prev).next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.node_mut(next).prev = prev;
        }
    }

    fn push_front(&mut self, i: u32) {
        let old = self.head;
        self.tick += 1;
        let tick = self.tick;
        {
            let n = self.node_mut(i);
            n.prev = NIL;
            n.next = old;
            n.used = tick;
        }
        if old != NIL {
            self.node_mut(old).prev = i;
        } else {
            self.tail = i;
        }
        self.head = i;
    }

    /// Node `i` was used: most recent now.
    fn touch(&mut self, i: u32) {
        self.unlink(i);
        self.push_front(i);
    }

    /// Remove node `i` entirely (map, list, slot).
    fn remove(&mut self, i: u32) -> Node {
        self.unlink(i);
        let Shard {
            map,
            nodes,
            free,
            bytes,
            ..
        } = self;
        let n = nodes[i as usize].as_ref().expect("live node");
        if let Some(v) = map.get_mut(&n.key) {
            if let Ok(pos) = find(nodes, v, &n.entry.secondary) {
                v.nodes.remove(pos);
            }
            if let Some(k) = v.varies.iter().position(|(b, _)| *b == n.entry.vary) {
                v.varies[k].1 -= 1;
                if v.varies[k].1 == 0 {
                    v.varies.swap_remove(k);
                }
            }
            if v.nodes.is_empty() {
                map.remove(&n.key);
            }
        }
        let n = nodes[i as usize].take().expect("live node");
        free.push(i);
        *bytes -= n.charge;
        n
    }
}

pub struct Store {
    shards: Box<[Mutex<Shard>]>,
    hasher: ahash::RandomState,
    shard_cap: usize,
    max_object: usize,
    max_variants: usize,
    pub stats: StoreStats,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("shards", &self.shards.len())
            .field("bytes", &self.bytes())
            .finish()
    }
}

impl Store {
    /// A store of at most `capacity` bytes in `shards` shards (each holds `capacity /
    /// shards`); objects larger than `max_object` bytes are not stored.
    pub fn new(capacity: usize, shards: usize, max_object: usize) -> Store {
        let shards = shards.max(1);
        Store {
            shards: (0..shards).map(|_| Mutex::new(Shard::new())).collect(),
            // Fixed keys: shard choice does not need to resist flooding (the map does,
            // with its own random state).
            hasher: ahash::RandomState::with_seeds(1, 2, 3, 4),
            shard_cap: capacity / shards,
            max_object: max_object.min(capacity / shards),
            max_variants: DEFAULT_MAX_VARIANTS,
            stats: StoreStats::default(),
        }
    }

    /// At most `n` `Vary` variants per primary key; a new one beyond that replaces the
    /// least recently used one of that key.
    pub fn with_max_variants(mut self, n: usize) -> Store {
        self.max_variants = n.max(1);
        self
    }

    pub fn max_object(&self) -> usize {
        self.max_object
    }

    fn shard(&self, key: &[u8]) -> &Mutex<Shard> {
        let h = self.hasher.hash_one(key);
        &self.shards[(h % self.shards.len() as u64) as usize]
    }

    /// The stored variant of `key` that matches the request (its `Vary` fields taken from
    /// `request_field`), marked most recently used. The request's secondary key is
    /// computed outside the shard's lock, once per distinct `Vary` of the key's variants;
    /// the variant is then found by binary search.
    pub fn get<V, I>(&self, key: &[u8], request_field: impl Fn(&[u8]) -> V) -> Option<Arc<Stored>>
    where
        V: IntoIterator<Item = I>,
        I: AsRef<[u8]>,
    {
        let shard = self.shard(key);
        let varies: SmallVec<[Bytes; 2]> = {
            let mut s = shard.lock();
            let v = s.map.get(key)?;
            if let [(vary, _)] = &v.varies[..] {
                if vary.is_empty() {
                    // No Vary (the common case): one lock, one variant.
                    let i = *v.nodes.first()?;
                    s.touch(i);
                    return Some(s.node(i).entry.clone());
                }
            }
            v.varies.iter().map(|(b, _)| b.clone()).collect()
        };
        let wanted: SmallVec<[(Bytes, Vec<u8>); 2]> = varies
            .into_iter()
            .filter_map(|vary| {
                let k = if vary.is_empty() {
                    Vec::new()
                } else {
                    vary_key([&vary[..]], &request_field)?
                };
                Some((vary, k))
            })
            .collect();
        let mut s = shard.lock();
        for (vary, secondary) in &wanted {
            let v = s.map.get(key)?;
            let Ok(pos) = s.find(v, secondary) else {
                continue;
            };
            let i = v.nodes[pos];
            if s.node(i).entry.vary == *vary {
                s.touch(i);
                return Some(s.node(i).entry.clone());
            }
        }
        None
    }

    /// Store `entry` under `key`, replacing the variant with the same secondary key (and
    /// past `max_variants` the key's least recently used one), and evict least recently
    /// used entries beyond the bound. `false` when too large.
    pub fn insert(&self, key: &[u8], entry: Stored) -> bool {
        let charge = entry.charge(key.len());
        if entry.body.len() > self.max_object || charge > self.shard_cap {
            self.stats
                .rejected_too_large
                .fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let mut s = self.shard(key).lock();
        if let Some(v) = s.map.get(key) {
            match s.find(v, &entry.secondary) {
                Ok(pos) => {
                    let same = v.nodes[pos];
                    s.remove(same);
                }
                Err(_) if v.nodes.len() >= self.max_variants => {
                    let oldest = v.nodes.iter().copied().min_by_key(|&i| s.node(i).used);
                    if let Some(i) = oldest {
                        s.remove(i);
                        self.stats.variant_evictions.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(_) => {}
            }
        }
        let key: Arc<[u8]> = match s.map.get_key_value(key) {
            Some((k, _)) => k.clone(),
            None => Arc::from(key),
        };
        let vary = entry.vary.clone();
        let secondary = entry.secondary.clone();
        let node = Node {
            key: key.clone(),
            entry: Arc::new(entry),
            charge,
            prev: NIL,
            next: NIL,
            used: 0,
        };
        let i = match s.free.pop() {
            Some(i) => {
                s.nodes[i as usize] = Some(node);
                i
            }
            None => {
                s.nodes.push(Some(node));
                (s.nodes.len() - 1) as u32
            }
        };
        s.push_front(i);
        let Shard { map, nodes, .. } = &mut *s;
        let v = map.entry(key).or_default();
        let pos = find(nodes, v, &secondary).unwrap_or_else(|p| p);
        v.nodes.insert(pos, i);
        match v.varies.iter_mut().find(|(b, _)| *b == vary) {
            Some((_, n)) => *n += 1,
            None => v.varies.push((vary, 1)),
        }
        s.bytes += charge;
        while s.bytes > self.shard_cap && s.tail != NIL {
            let t = s.tail;
            s.remove(t);
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
        }
        self.stats.inserts.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Drop every variant stored under `key`. Returns how many.
    pub fn invalidate(&self, key: &[u8]) -> usize {
        let mut s = self.shard(key).lock();
        let ids: SmallVec<[u32; 4]> = match s.map.get(key) {
            Some(v) => v.nodes.iter().copied().collect(),
            None => return 0,
        };
        for &i in &ids {
            s.remove(i);
        }
        self.stats
            .invalidations
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
        ids.len()
    }

    /// Drop every entry whose primary key starts with `prefix` (all shards). Returns how
    /// many. A purge, not a hot path: it walks the keys of each shard under its lock.
    pub fn invalidate_prefix(&self, prefix: &[u8]) -> usize {
        let mut n = 0;
        for shard in self.shards.iter() {
            let mut s = shard.lock();
            let ids: Vec<u32> = s
                .map
                .iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .flat_map(|(_, v)| v.nodes.iter().copied())
                .collect();
            for i in ids {
                s.remove(i);
                n += 1;
            }
        }
        self.stats
            .invalidations
            .fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// Entries for which `pick` says yes, with their keys (a scan of every shard).
    pub fn select(
        &self,
        mut pick: impl FnMut(&[u8], &Stored) -> bool,
    ) -> Vec<(Vec<u8>, Arc<Stored>)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let s = shard.lock();
            for n in s.nodes.iter().flatten() {
                if pick(&n.key, &n.entry) {
                    out.push((n.key.to_vec(), n.entry.clone()));
                }
            }
        }
        out
    }

    /// Bytes held, over all shards.
    pub fn bytes(&self) -> usize {
        self.shards.iter().map(|s| s.lock().bytes).sum()
    }

    /// Entries held, over all shards.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map.values().map(|v| v.nodes.len()).sum::<usize>())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Test support: a stored `200` with `body`, fresh for a minute, received at `at`.
#[cfg(test)]
pub(crate) fn test_entry(body: &[u8], at: std::time::SystemTime) -> Stored {
    let head = "HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\n";
    let whole = format!("{head}\r\n");
    let Ok(crate::http1::Parsed::Complete(h)) =
        crate::http1::head::parse_response(whole.as_bytes(), 4096)
    else {
        panic!("bad head")
    };
    Stored {
        head: Bytes::copy_from_slice(head.as_bytes()),
        body: Bytes::copy_from_slice(body),
        facts: crate::cache::http::response_facts(&h, whole.as_bytes(), at, at),
        etag: None,
        vary: Bytes::new(),
        secondary: Vec::new(),
        demand: Default::default(),
    }
}
