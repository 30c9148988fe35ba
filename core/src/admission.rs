//! Who gets in when connections are scarce: the idle connections a worker may close to
//! admit a new client once `max_connections` are open (the one idle longest first), and
//! the per-client-address limit (`server.max_connections_per_ip`).
//!
//! The runtime keeps one [`IdleList`] per worker (or one behind a lock where tasks move
//! between threads), puts a connection in it while it waits for a request with nothing to
//! write, and takes it out when bytes arrive or it closes. At the limit it takes the
//! oldest out and closes it (the shutdown of its socket makes the connection see the end
//! of its input and close by the usual path).

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

const NIL: u32 = u32::MAX;

/// A connection's place in an [`IdleList`]; stale once it was taken out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdleSlot {
    index: u32,
    gen: u32,
}

struct Node<T> {
    value: Option<T>,
    gen: u32,
    prev: u32,
    next: u32,
}

/// Idle connections, least recently idle first: O(1) to enter, leave and take the oldest;
/// no allocation once the list has grown to the worker's peak.
pub struct IdleList<T> {
    nodes: Vec<Node<T>>,
    free: Vec<u32>,
    /// Oldest first.
    head: u32,
    tail: u32,
    len: usize,
}

impl<T> Default for IdleList<T> {
    fn default() -> Self {
        IdleList {
            nodes: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            len: 0,
        }
    }
}

impl<T> IdleList<T> {
    /// `value` (what the runtime needs to close the connection) starts waiting now.
    pub fn enter(&mut self, value: T) -> IdleSlot {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.nodes.push(Node {
                    value: None,
                    gen: 0,
                    prev: NIL,
                    next: NIL,
                });
                (self.nodes.len() - 1) as u32
            }
        };
        let tail = self.tail;
        let n = &mut self.nodes[index as usize];
        n.value = Some(value);
        n.prev = tail;
        n.next = NIL;
        let gen = n.gen;
        if tail == NIL {
            self.head = index;
        } else {
            self.nodes[tail as usize].next = index;
        }
        self.tail = index;
        self.len += 1;
        IdleSlot { index, gen }
    }

    /// Keep a connection's membership (`slot`) in step with whether it is `idle` now
    /// (see `Session::is_idle`); `value` is what the list holds for it.
    pub fn track(&mut self, slot: &mut Option<IdleSlot>, idle: bool, value: T) {
        match (idle, *slot) {
            (true, None) => *slot = Some(self.enter(value)),
            (false, Some(s)) => {
                self.leave(s);
                *slot = None;
            }
            _ => {}
        }
    }

    /// The connection is busy again or closing. A slot already taken out (by
    /// [`pop_oldest`](Self::pop_oldest)) is left alone.
    pub fn leave(&mut self, slot: IdleSlot) -> Option<T> {
        let n = self.nodes.get(slot.index as usize)?;
        if n.gen != slot.gen || n.value.is_none() {
            return None;
        }
        Some(self.unlink(slot.index))
    }

    /// The connection idle the longest, taken out.
    pub fn pop_oldest(&mut self) -> Option<T> {
        (self.head != NIL).then(|| self.unlink(self.head))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn unlink(&mut self, i: u32) -> T {
        let (prev, next) = {
            let n = &self.nodes[i as usize];
            (n.prev, n.next)
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.nodes[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.nodes[next as usize].prev = prev;
        }
        let n = &mut self.nodes[i as usize];
        n.gen = n.gen.wrapping_add(1);
        self.free.push(i);
        self.len -= 1;
        n.value.take().expect("linked nodes hold a value")
    }
}

/// Connections open per client address, all workers together.
#[derive(Debug)]
pub struct PerIp {
    limit: u32,
    shards: Box<[Mutex<HashMap<IpAddr, u32, ahash::RandomState>>]>,
    hasher: ahash::RandomState,
}

/// One counted connection; uncounted when dropped.
#[derive(Debug)]
pub struct IpSlot {
    per_ip: Arc<PerIp>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut m = self.per_ip.shard(self.ip).lock();
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

impl PerIp {
    pub fn new(limit: u32) -> Arc<PerIp> {
        Arc::new(PerIp {
            limit,
            // Fixed keys for the shard choice; each map keeps its own (seeded) state.
            shards: (0..16)
                .map(|_| {
                    Mutex::new(HashMap::with_hasher(ahash::RandomState::with_seeds(
                        5, 6, 7, 8,
                    )))
                })
                .collect(),
            hasher: ahash::RandomState::with_seeds(1, 2, 3, 4),
        })
    }

    fn shard(&self, ip: IpAddr) -> &Mutex<HashMap<IpAddr, u32, ahash::RandomState>> {
        let h = self.hasher.hash_one(ip);
        &self.shards[(h % self.shards.len() as u64) as usize]
    }

    /// Count a new connection from `ip`, unless it already has `limit` open.
    pub fn try_open(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let mut m = self.shard(ip).lock();
        let n = m.entry(ip).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            per_ip: self.clone(),
            ip,
        })
    }

    pub fn open_from(&self, ip: IpAddr) -> u32 {
        self.shard(ip).lock().get(&ip).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_idle_connection_goes_first() {
        let mut l = IdleList::default();
        let a = l.enter('a');
        let b = l.enter('b');
        let _c = l.enter('c');
        // `a` got a request: not idle any more; it comes back as the newest.
        assert_eq!(l.leave(a), Some('a'));
        let a2 = l.enter('a');
        assert_eq!(l.pop_oldest(), Some('b'));
        assert_eq!(
            l.leave(b),
            None,
            "taken out already: a stale slot does nothing"
        );
        assert_eq!(l.pop_oldest(), Some('c'));
        assert_eq!(l.len(), 1);
        assert_eq!(l.leave(a2), Some('a'));
        assert!(l.is_empty() && l.pop_oldest().is_none());
        // Slots are reused without confusing old holders.
        let d = l.enter('d');
        assert_eq!(l.leave(a), None);
        assert_eq!(l.leave(d), Some('d'));
    }

    #[test]
    fn per_ip_counts_and_releases() {
        let p = PerIp::new(2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = p.try_open(ip).unwrap();
        let _s2 = p.try_open(ip).unwrap();
        assert!(p.try_open(ip).is_none());
        assert!(
            p.try_open(other).is_some(),
            "another address is not affected"
        );
        drop(s1);
        assert_eq!(p.open_from(ip), 1);
        assert!(p.try_open(ip).is_some());
    }
}
