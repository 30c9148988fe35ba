//! L1: the in-process store shared by every worker. Sharded by primary key (one short
//! lock per shard, never a global one), each shard bounded in bytes with LRU eviction.
//! A primary key holds one entry per `Vary` variant.

use super::{vary_key, ResponseFacts};
use bytes::Bytes;
use parking_lot::Mutex;
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
}

const NIL: u32 = u32::MAX;

struct Node {
    key: Arc<[u8]>,
    entry: Arc<Stored>,
    charge: usize,
    prev: u32,
    next: u32,
}

#[derive(Default)]
struct Shard {
    /// Primary key -> nodes of its variants.
    map: HashMap<Arc<[u8]>, Vec<u32>, ahash::RandomState>,
    nodes: Vec<Option<Node>>,
    free: Vec<u32>,
    /// Most recently used first.
    head: u32,
    tail: u32,
    bytes: usize,
}

impl Shard {
    fn new() -> Self {
        Shard {
            head: NIL,
            tail: NIL,
            ..Default::default()
        }
    }

    fn node(&mut self, i: u32) -> &mut Node {
        self.nodes[i as usize].as_mut().expect("live node")
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = {
            let n = self.node(i);
            (n.prev, n.next)
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.node(prev).next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.node(next).prev = prev;
        }
    }

    fn push_front(&mut self, i: u32) {
        let old = self.head;
        {
            let n = self.node(i);
            n.prev = NIL;
            n.next = old;
        }
        if old != NIL {
            self.node(old).prev = i;
        } else {
            self.tail = i;
        }
        self.head = i;
    }

    /// Remove node `i` entirely (map, list, slot).
    fn remove(&mut self, i: u32) -> Node {
        self.unlink(i);
        let n = self.nodes[i as usize].take().expect("live node");
        self.free.push(i);
        self.bytes -= n.charge;
        if let Some(v) = self.map.get_mut(&n.key) {
            v.retain(|&x| x != i);
            if v.is_empty() {
                self.map.remove(&n.key);
            }
        }
        n
    }
}

pub struct Store {
    shards: Box<[Mutex<Shard>]>,
    hasher: ahash::RandomState,
    shard_cap: usize,
    max_object: usize,
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
            stats: StoreStats::default(),
        }
    }

    pub fn max_object(&self) -> usize {
        self.max_object
    }

    fn shard(&self, key: &[u8]) -> &Mutex<Shard> {
        let h = self.hasher.hash_one(key);
        &self.shards[(h % self.shards.len() as u64) as usize]
    }

    /// The stored variant of `key` that matches the request (its `Vary` fields taken from
    /// `request_field`), marked most recently used.
    pub fn get<V, I>(&self, key: &[u8], request_field: impl Fn(&[u8]) -> V) -> Option<Arc<Stored>>
    where
        V: IntoIterator<Item = I>,
        I: AsRef<[u8]>,
    {
        let mut s = self.shard(key).lock();
        // Copied out of the map (the loop reorders the LRU list); on the stack for up to
        // four variants.
        let ids: smallvec::SmallVec<[u32; 4]> = smallvec::SmallVec::from_slice(s.map.get(key)?);
        for i in ids {
            let entry = s.node(i).entry.clone();
            let matches = if entry.vary.is_empty() {
                true
            } else {
                vary_key([&entry.vary[..]], &request_field).as_deref() == Some(&entry.secondary[..])
            };
            if matches {
                s.unlink(i);
                s.push_front(i);
                return Some(entry);
            }
        }
        None
    }

    /// Store `entry` under `key`, replacing the variant with the same secondary key, and
    /// evict least recently used entries beyond the bound. `false` when too large.
    pub fn insert(&self, key: &[u8], entry: Stored) -> bool {
        let charge = entry.charge(key.len());
        if entry.body.len() > self.max_object || charge > self.shard_cap {
            self.stats
                .rejected_too_large
                .fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let mut s = self.shard(key).lock();
        // Replace the same variant.
        if let Some(ids) = s.map.get(key).cloned() {
            for i in ids {
                if s.node(i).entry.secondary == entry.secondary {
                    s.remove(i);
                }
            }
        }
        let key: Arc<[u8]> = match s.map.get_key_value(key) {
            Some((k, _)) => k.clone(),
            None => Arc::from(key),
        };
        let node = Node {
            key: key.clone(),
            entry: Arc::new(entry),
            charge,
            prev: NIL,
            next: NIL,
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
        s.map.entry(key).or_default().push(i);
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
        let ids = s.map.get(key).cloned().unwrap_or_default();
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
            let keys: Vec<Arc<[u8]>> = s
                .map
                .keys()
                .filter(|k| k.starts_with(prefix))
                .cloned()
                .collect();
            for k in keys {
                let ids = s.map.get(&k).cloned().unwrap_or_default();
                for i in ids {
                    s.remove(i);
                    n += 1;
                }
            }
        }
        self.stats
            .invalidations
            .fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// Replace a stored entry's metadata after a 304 (same body).
    pub fn refresh(&self, key: &[u8], old: &Arc<Stored>, head: Bytes, facts: ResponseFacts) {
        let updated = Stored {
            head,
            body: old.body.clone(),
            facts,
            etag: old.etag.clone(),
            vary: old.vary.clone(),
            secondary: old.secondary.clone(),
            demand: old.demand.carried(),
        };
        self.insert(key, updated);
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
            .map(|s| s.lock().map.values().map(Vec::len).sum::<usize>())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
