//! Balancing algorithms. Every pick is O(1) or O(log n) and deterministic for a given seed:
//! no clock and no thread RNG, so a pick can be replayed in tests and the simulator.
//!
//! | name              | pick                                   | state                          |
//! |-------------------|----------------------------------------|--------------------------------|
//! | `round_robin`     | O(1): precomputed smooth WRR schedule  | atomic cursor                  |
//! | `least_conn`      | O(1) read + O(log n) update            | tournament tree under a mutex  |
//! | `ip_hash`         | O(1): Maglev table on the client IP    | immutable table                |
//! | `consistent_hash` | O(1) Maglev or O(log n) ring           | immutable table                |
//! | `p2c`             | O(1): two weighted samples (alias)     | atomic RNG state               |
//!
//! Availability (health) is read per pick through [`Avail`]; unavailable backends are skipped.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    RoundRobin,
    LeastConn,
    IpHash,
    ConsistentHash,
    P2c,
}

impl Algorithm {
    pub const NAMES: &'static [&'static str] = &[
        "round_robin",
        "least_conn",
        "ip_hash",
        "consistent_hash",
        "p2c",
    ];
    pub fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "round_robin" | "roundrobin" => Algorithm::RoundRobin,
            "least_conn" | "leastconn" | "least_connections" => Algorithm::LeastConn,
            "ip_hash" => Algorithm::IpHash,
            "consistent_hash" => Algorithm::ConsistentHash,
            "p2c" | "power_of_two" => Algorithm::P2c,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::RoundRobin => "round_robin",
            Algorithm::LeastConn => "least_conn",
            Algorithm::IpHash => "ip_hash",
            Algorithm::ConsistentHash => "consistent_hash",
            Algorithm::P2c => "p2c",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashMethod {
    Maglev,
    Ring,
}

/// What a balancer may know about a backend at pick time.
pub trait Avail {
    fn len(&self) -> usize;
    fn available(&self, i: usize) -> bool;
    fn weight(&self, i: usize) -> u32;
    /// Requests in flight to backend `i` (all workers).
    fn active(&self, i: usize) -> u32;
    /// Stable identity used by the hash algorithms (the backend address as written).
    fn key(&self, i: usize) -> &[u8];
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Stable 64-bit hash (FNV-1a with a murmur3 finalizer), seeded. Stable across versions
/// and machines, so two trireme instances map the same key to the same backend.
pub fn hash64(seed: u64, data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    fmix64(h)
}

#[inline]
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

#[inline]
fn splitmix(state: &AtomicU64) -> u64 {
    let z = state
        .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
        .wrapping_add(0x9e37_79b9_7f4a_7c15);
    fmix64(z)
}

/// Request facts a pick may use.
#[derive(Clone, Copy, Debug)]
pub struct PickInput<'a> {
    /// Client address bytes (ip_hash, and the fallback key for consistent_hash).
    pub client: &'a [u8],
    /// The configured hash key's value for consistent_hash, when the request has it.
    pub key: Option<&'a [u8]>,
}

pub struct Balancer {
    kind: Kind,
}

enum Kind {
    RoundRobin(Schedule),
    LeastConn(Mutex<LcTree>),
    Maglev { table: Maglev, seed: u64, ip: bool },
    Ring { ring: Ring, seed: u64 },
    P2c { alias: Alias, rng: AtomicU64 },
}

impl Balancer {
    pub fn new(alg: Algorithm, method: HashMethod, backends: &dyn Avail, seed: u64) -> Self {
        let kind = match alg {
            Algorithm::RoundRobin => Kind::RoundRobin(Schedule::new(backends)),
            Algorithm::LeastConn => Kind::LeastConn(Mutex::new(LcTree::new(backends))),
            Algorithm::IpHash => Kind::Maglev {
                table: Maglev::new(backends, seed),
                seed,
                ip: true,
            },
            Algorithm::ConsistentHash => match method {
                HashMethod::Maglev => Kind::Maglev {
                    table: Maglev::new(backends, seed),
                    seed,
                    ip: false,
                },
                HashMethod::Ring => Kind::Ring {
                    ring: Ring::new(backends, seed),
                    seed,
                },
            },
            Algorithm::P2c => Kind::P2c {
                alias: Alias::new(backends),
                rng: AtomicU64::new(seed),
            },
        };
        Balancer { kind }
    }

    /// Pick an available backend not in `exclude`, or `None` when there is none.
    pub fn pick(&self, b: &dyn Avail, input: &PickInput<'_>, exclude: &[u16]) -> Option<usize> {
        let ok = |i: usize| b.available(i) && !exclude.contains(&(i as u16));
        if b.is_empty() {
            return None;
        }
        match &self.kind {
            Kind::RoundRobin(s) => s.pick(b.len(), &ok),
            Kind::LeastConn(t) => t.lock().pick(&ok),
            Kind::Maglev { table, seed, ip } => {
                let key = if *ip {
                    input.client
                } else {
                    input.key.unwrap_or(input.client)
                };
                table.lookup(hash64(*seed, key), b.len(), &ok)
            }
            Kind::Ring { ring, seed } => {
                ring.lookup(hash64(*seed, input.key.unwrap_or(input.client)), &ok)
            }
            Kind::P2c { alias, rng } => {
                let n = b.len();
                let mut first: Option<usize> = None;
                // Two available weighted samples; a few tries, then a linear fallback.
                for _ in 0..8 {
                    let i = alias.sample(splitmix(rng));
                    if !ok(i) {
                        continue;
                    }
                    match first {
                        None if n > 1 => first = Some(i),
                        None => return Some(i),
                        Some(f) if f == i => continue,
                        Some(f) => {
                            // Lower load per unit of weight wins; ties keep the first sample.
                            let lf = b.active(f) as u64 * b.weight(i) as u64;
                            let li = b.active(i) as u64 * b.weight(f) as u64;
                            return Some(if li < lf { i } else { f });
                        }
                    }
                }
                first.or_else(|| (0..n).find(|&i| ok(i)))
            }
        }
    }

    /// A request to backend `i` began (least_conn bookkeeping).
    pub fn on_begin(&self, i: usize) {
        if let Kind::LeastConn(t) = &self.kind {
            t.lock().add(i, 1);
        }
    }

    /// A request to backend `i` ended.
    pub fn on_end(&self, i: usize) {
        if let Kind::LeastConn(t) = &self.kind {
            t.lock().add(i, -1);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Smooth weighted round robin, nginx's algorithm, precomputed as one period of its output.

struct Schedule {
    seq: Vec<u32>,
    cursor: AtomicUsize,
}

/// The largest schedule kept; weights are scaled down proportionally beyond it.
const MAX_SCHEDULE: u64 = 1 << 20;

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl Schedule {
    fn new(b: &dyn Avail) -> Self {
        let n = b.len();
        let mut w: Vec<u64> = (0..n).map(|i| b.weight(i).max(1) as u64).collect();
        let g = w.iter().copied().fold(0, gcd).max(1);
        w.iter_mut().for_each(|x| *x /= g);
        let mut total: u64 = w.iter().sum();
        if total > MAX_SCHEDULE {
            w.iter_mut()
                .for_each(|x| *x = (*x * MAX_SCHEDULE / total).max(1));
            total = w.iter().sum();
        }
        let seq = if w.iter().all(|&x| x == 1) {
            (0..n as u32).collect()
        } else if (total as u128) * (n as u128) <= 20_000_000 {
            // nginx: every step add each weight to its current, pick the max, subtract total.
            let mut cur = vec![0i64; n];
            let mut seq = Vec::with_capacity(total as usize);
            for _ in 0..total {
                let mut best = 0;
                for i in 0..n {
                    cur[i] += w[i] as i64;
                    if cur[i] > cur[best] {
                        best = i;
                    }
                }
                cur[best] -= total as i64;
                seq.push(best as u32);
            }
            seq
        } else {
            // Large pools: earliest-deadline-first gives the same counts per period and the
            // same smoothness property (no backend twice in a row beyond its share) in
            // O(total log n) instead of O(total n).
            use std::cmp::Reverse;
            use std::collections::BinaryHeap;
            let mut heap: BinaryHeap<Reverse<(u128, u32)>> = (0..n)
                .map(|i| Reverse(((total as u128 * 1_000_000) / w[i] as u128 / 2, i as u32)))
                .collect();
            let mut seq = Vec::with_capacity(total as usize);
            for _ in 0..total {
                let Reverse((t, i)) = heap.pop().expect("non-empty");
                seq.push(i);
                heap.push(Reverse((
                    t + (total as u128 * 1_000_000) / w[i as usize] as u128,
                    i,
                )));
            }
            seq
        };
        Schedule {
            seq,
            cursor: AtomicUsize::new(0),
        }
    }

    fn pick(&self, n: usize, ok: &dyn Fn(usize) -> bool) -> Option<usize> {
        let len = self.seq.len();
        if len == 0 || n == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        for k in 0..len {
            let i = self.seq[(start + k) % len] as usize;
            if ok(i) {
                if k > 0 {
                    // Skipped unavailable entries: move the shared cursor past them too.
                    self.cursor.fetch_add(k, Ordering::Relaxed);
                }
                return Some(i);
            }
        }
        None
    }
}

// ---------------------------------------------------------------------------------------
// Weighted least connections: a tournament tree whose root is the backend with the fewest
// requests in flight per unit of weight (ties: fewest picks per unit of weight, then index).

struct LcLeaf {
    active: u64,
    picks: u64,
    weight: u64,
}

struct LcTree {
    leaves: Vec<LcLeaf>,
    /// Implicit binary tree over `size` leaves; each node holds the winning leaf index.
    nodes: Vec<u32>,
    size: usize,
}

const NONE: u32 = u32::MAX;

impl LcTree {
    fn new(b: &dyn Avail) -> Self {
        let n = b.len();
        let size = n.next_power_of_two().max(1);
        let leaves = (0..n)
            .map(|i| LcLeaf {
                active: 0,
                picks: 0,
                weight: b.weight(i).max(1) as u64,
            })
            .collect();
        let mut t = LcTree {
            leaves,
            nodes: vec![NONE; 2 * size],
            size,
        };
        for i in 0..size {
            t.nodes[size + i] = if i < n { i as u32 } else { NONE };
        }
        for p in (1..size).rev() {
            t.nodes[p] = t.better(t.nodes[2 * p], t.nodes[2 * p + 1]);
        }
        t
    }

    fn better(&self, a: u32, b: u32) -> u32 {
        if a == NONE {
            return b;
        }
        if b == NONE {
            return a;
        }
        if self.less(a as usize, b as usize) {
            a
        } else {
            b
        }
    }

    /// Is leaf a strictly preferable to leaf b?
    fn less(&self, a: usize, b: usize) -> bool {
        let (la, lb) = (&self.leaves[a], &self.leaves[b]);
        let (x, y) = (la.active * lb.weight, lb.active * la.weight);
        if x != y {
            return x < y;
        }
        let (x, y) = (la.picks * lb.weight, lb.picks * la.weight);
        if x != y {
            return x < y;
        }
        a < b
    }

    fn update(&mut self, i: usize) {
        let mut p = (self.size + i) / 2;
        while p >= 1 {
            self.nodes[p] = self.better(self.nodes[2 * p], self.nodes[2 * p + 1]);
            p /= 2;
        }
    }

    fn add(&mut self, i: usize, d: i64) {
        if let Some(l) = self.leaves.get_mut(i) {
            if d > 0 {
                l.active += d as u64;
                l.picks += 1;
            } else {
                l.active = l.active.saturating_sub((-d) as u64);
            }
            self.update(i);
        }
    }

    fn pick(&mut self, ok: &dyn Fn(usize) -> bool) -> Option<usize> {
        let root = self.nodes[1];
        if root != NONE && ok(root as usize) {
            return Some(root as usize);
        }
        // The best is unavailable or excluded: the best among the rest, O(n). This path is
        // taken only while some backend is down or on a retry.
        let mut best: Option<usize> = None;
        for i in 0..self.leaves.len() {
            if ok(i) && best.is_none_or(|b| self.less(i, b)) {
                best = Some(i);
            }
        }
        best
    }
}

// ---------------------------------------------------------------------------------------
// Maglev (Eisenbud et al., NSDI 2016), weighted: a backend fills table slots in proportion
// to its weight. Lookup O(1); unavailable backends fall through to the next slot.

struct Maglev {
    table: Vec<u32>,
}

const PRIMES: [u64; 8] = [
    65_537, 131_071, 262_147, 524_287, 1_048_573, 2_097_143, 4_194_301, 8_388_593,
];

impl Maglev {
    fn new(b: &dyn Avail, seed: u64) -> Self {
        let n = b.len();
        if n == 0 {
            return Maglev { table: Vec::new() };
        }
        let m = *PRIMES
            .iter()
            .find(|&&p| p >= 100 * n as u64)
            .unwrap_or(&PRIMES[7]);
        let offsets: Vec<u64> = (0..n).map(|i| hash64(seed, b.key(i)) % m).collect();
        // Two backends with one skip walk the same permutation shifted, contend for the same
        // slots, and a change of the set then moves up to twice the ideal share of keys: a
        // skip that an earlier backend already has is hashed again (m - 1 >= 100 n choices).
        let mut skips: Vec<u64> = Vec::with_capacity(n);
        for i in 0..n {
            let mut round = 0u64;
            let skip = loop {
                let s = hash64(seed ^ 0x5bd1_e995 ^ round, b.key(i)) % (m - 1) + 1;
                if !skips.contains(&s) {
                    break s;
                }
                round += 1;
            };
            skips.push(skip);
        }
        let wmax = (0..n).map(|i| b.weight(i).max(1) as u64).max().unwrap_or(1);
        let mut next = vec![0u64; n];
        let mut credit = vec![0u64; n];
        let mut table = vec![NONE; m as usize];
        let mut filled = 0u64;
        'outer: loop {
            for i in 0..n {
                credit[i] += b.weight(i).max(1) as u64;
                while credit[i] >= wmax {
                    credit[i] -= wmax;
                    loop {
                        let c = (offsets[i] + next[i] * skips[i]) % m;
                        next[i] += 1;
                        if table[c as usize] == NONE {
                            table[c as usize] = i as u32;
                            filled += 1;
                            break;
                        }
                    }
                    if filled == m {
                        break 'outer;
                    }
                }
            }
        }
        Maglev { table }
    }

    fn lookup(&self, h: u64, n: usize, ok: &dyn Fn(usize) -> bool) -> Option<usize> {
        let m = self.table.len();
        if m == 0 {
            return None;
        }
        let start = (h % m as u64) as usize;
        // Unavailable: walk forward to the next slot. Slots of distinct backends are spread,
        // so this ends fast; cap the walk and finish with a linear check when most are down.
        for k in 0..m.min(4096) {
            let i = self.table[(start + k) % m] as usize;
            if ok(i) {
                return Some(i);
            }
        }
        (0..n).find(|&i| ok(i))
    }
}

// ---------------------------------------------------------------------------------------
// Ring hash (ketama-style): points per backend in proportion to weight, binary search.

struct Ring {
    hashes: Vec<u64>,
    owner: Vec<u32>,
}

impl Ring {
    fn new(b: &dyn Avail, seed: u64) -> Self {
        let n = b.len();
        let total_w: u64 = (0..n).map(|i| b.weight(i).max(1) as u64).sum();
        // About 160 points per unit of weight, at most ~1M points in all.
        let per_w = (1_000_000 / total_w.max(1)).clamp(1, 160);
        let mut pts: Vec<(u64, u32)> = Vec::new();
        for i in 0..n {
            let count = b.weight(i).max(1) as u64 * per_w;
            for r in 0..count {
                let mut k = b.key(i).to_vec();
                k.push(b'#');
                k.extend_from_slice(r.to_string().as_bytes());
                pts.push((hash64(seed, &k), i as u32));
            }
        }
        pts.sort_unstable();
        Ring {
            hashes: pts.iter().map(|p| p.0).collect(),
            owner: pts.iter().map(|p| p.1).collect(),
        }
    }

    fn lookup(&self, h: u64, ok: &dyn Fn(usize) -> bool) -> Option<usize> {
        let len = self.hashes.len();
        if len == 0 {
            return None;
        }
        let start = self.hashes.partition_point(|&x| x < h) % len;
        for k in 0..len {
            let i = self.owner[(start + k) % len] as usize;
            if ok(i) {
                return Some(i);
            }
        }
        None
    }
}

// ---------------------------------------------------------------------------------------
// Walker/Vose alias table: O(1) weighted sampling for p2c.

struct Alias {
    prob: Vec<u64>,
    alias: Vec<u32>,
}

impl Alias {
    fn new(b: &dyn Avail) -> Self {
        let n = b.len();
        if n == 0 {
            return Alias {
                prob: Vec::new(),
                alias: Vec::new(),
            };
        }
        let total: u64 = (0..n).map(|i| b.weight(i).max(1) as u64).sum();
        // Scaled probabilities: p_i * n, in units of `total`.
        let mut scaled: Vec<u64> = (0..n)
            .map(|i| b.weight(i).max(1) as u64 * n as u64)
            .collect();
        let mut prob = vec![0u64; n];
        let mut alias = vec![0u32; n];
        let (mut small, mut large): (Vec<usize>, Vec<usize>) =
            (0..n).partition(|&i| scaled[i] < total);
        while let (Some(s), Some(&l)) = (small.pop(), large.last()) {
            prob[s] = scaled[s];
            alias[s] = l as u32;
            scaled[l] -= total - scaled[s];
            if scaled[l] < total {
                large.pop();
                small.push(l);
            }
        }
        for i in large.into_iter().chain(small) {
            prob[i] = total;
        }
        // Store thresholds as fractions of u64::MAX for a multiply-free comparison.
        let prob = prob
            .into_iter()
            .map(|p| ((p as u128 * u64::MAX as u128) / total as u128) as u64)
            .collect();
        Alias { prob, alias }
    }

    #[inline]
    fn sample(&self, r: u64) -> usize {
        let n = self.prob.len();
        let i = ((r as u128 * n as u128) >> 64) as usize;
        let coin = fmix64(r ^ 0x2545_f491_4f6c_dd1d);
        if coin <= self.prob[i] {
            i
        } else {
            self.alias[i] as usize
        }
    }
}

#[cfg(test)]
mod tests;
