//! The session's L2 lookup: on an L1 miss it leads, the session asks Redis (the `cache-l2`
//! upstream, through the runtime like any backend connection) before the backend.
//!
//! The request head stays in `client_in` while the lookup runs (the session is `Idle`
//! with a head pending, as while it waits for another request's fetch). When the lookup
//! ends, the head is processed again: after a hit L1 has the entry and answers; after a
//! miss or a failure the request goes to the backend with the lookup's pending fetch
//! (still leading the key for requests waiting on it).

use super::{Session, Source};
use crate::cache::http::Pending;
use crate::cache::l2::{Reply, L2};
use crate::cache::store::Stored;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// An L2 lookup in flight.
#[derive(Debug)]
pub(super) struct L2Fetch {
    /// The L1 miss this lookup is for (it holds the key's lead).
    pending: Box<Pending>,
    since: Instant,
    pub(super) connected: bool,
    /// `+OK` replies to the new connection's `AUTH` / `SELECT` still to come.
    hello_left: usize,
    /// The first reply named `Vary` fields: the request's variant was asked for.
    variant: bool,
    /// [`L2::generation`] when the lookup started: an invalidation since that covers the
    /// key keeps the reply out of L1.
    generation: u64,
}

impl Session {
    fn l2_tier(&self) -> Option<&L2> {
        self.ctx.cache.as_ref().and_then(|c| c.l2.as_ref())
    }

    /// The head being processed is one whose L2 lookup already ended.
    pub(super) fn l2_resumed(&self) -> bool {
        self.l2_tried
            .is_some_and(|(n, _)| n == self.conn.requests_done)
    }

    /// The hit being served was filled from L2 for this request.
    pub(super) fn l2_filled(&self) -> bool {
        self.l2_tried == Some((self.conn.requests_done, true))
    }

    /// An L1 miss: start an L2 lookup and return `None`, or give `p` back when L2 is not
    /// to be asked (not configured, not the key's lead, L1 holds an entry that must be
    /// validated whatever its age, asked already, backing off after a failure, a deletion
    /// pending). An L1 entry that merely aged is asked for: another instance may have
    /// refreshed it.
    pub(super) fn l2_begin(&mut self, p: Box<Pending>, now: Instant) -> Option<Box<Pending>> {
        let ctx = self.ctx.clone();
        let Some(l2) = ctx.cache.as_ref().and_then(|c| c.l2.as_ref()) else {
            return Some(p);
        };
        if p.lead.is_none() || (p.has_stored() && !p.fresher_may_answer) || self.l2_resumed() {
            return Some(p);
        }
        if !l2.may_look_up(&p.key, now) {
            return Some(p);
        }
        let (upstream, addr) = (l2.upstream, l2.addr);
        self.up_out.clear();
        self.up_in.clear();
        l2.get_command(&p.key, self.up_out.vec());
        self.push_connect(upstream, 0, addr, false);
        self.l2_tried = Some((self.conn.requests_done, false));
        debug_assert!(matches!(self.source, Source::Direct));
        self.source = Source::L2(Box::new(L2Fetch {
            pending: p,
            since: now,
            connected: false,
            hello_left: 0,
            variant: false,
            generation: l2.generation(),
        }));
        None
    }

    /// When the lookup gives up.
    pub(super) fn l2_deadline(&self) -> Option<Instant> {
        let Source::L2(f) = &self.source else {
            return None;
        };
        Some(f.since + self.l2_tier()?.timeout)
    }

    fn l2_mut(&mut self) -> Option<&mut L2Fetch> {
        match &mut self.source {
            Source::L2(f) => Some(f),
            _ => None,
        }
    }

    fn l2_ref(&self) -> Option<&L2Fetch> {
        match &self.source {
            Source::L2(f) => Some(f),
            _ => None,
        }
    }

    /// Connected; a new connection logs in first (`AUTH` / `SELECT` before the `GET`).
    pub(super) fn l2_connected(&mut self, reused: bool, now: Instant) {
        let ctx = self.ctx.clone();
        let Some(l2) = ctx.cache.as_ref().and_then(|c| c.l2.as_ref()) else {
            return;
        };
        self.last_up_io = now;
        let Source::L2(f) = &mut self.source else {
            return;
        };
        f.connected = true;
        let (hello, replies) = l2.hello();
        if !reused && replies > 0 {
            let get = self.up_out.pending().to_vec();
            self.up_out.clear();
            let out = self.up_out.vec();
            out.extend_from_slice(hello);
            out.extend_from_slice(&get);
            f.hello_left = replies;
        }
    }

    /// Reply bytes arrived in `up_in`.
    pub(super) fn l2_read(&mut self, now: Instant) {
        let Some(cache) = self.ctx.cache.clone() else {
            return;
        };
        let Some(l2) = cache.l2.as_ref() else { return };
        while self.l2_ref().is_some_and(|f| f.hello_left > 0) {
            match l2.parse_ok(&mut self.up_in) {
                Ok(None) => return,
                Ok(Some(())) => {
                    if let Some(f) = self.l2_mut() {
                        f.hello_left -= 1;
                    }
                }
                Err(why) => {
                    self.l2_fail(&format!("login: {why}"), now);
                    return;
                }
            }
        }
        // Invalidated (here or by another instance) while the reply was on its way: not
        // brought back. Not more recent than L1's aged entry: that one is validated.
        let unusable = |f: Option<&L2Fetch>, entry: &Stored| {
            f.is_some_and(|f| {
                l2.deletion_pending(&f.pending.key)
                    || l2.invalidated_since(&f.pending.key, f.generation)
                    || f.pending
                        .stored_since()
                        .is_some_and(|t| entry.facts.response_time <= t)
            })
        };
        let reply = if self.l2_ref().is_some_and(|f| f.variant) {
            l2.parse_variant_reply(&mut self.up_in)
        } else {
            l2.parse_get_reply(&mut self.up_in)
        };
        match reply {
            Ok(None) => {}
            Ok(Some(Reply::Vary(vary))) => {
                let Source::L2(f) = &mut self.source else {
                    return;
                };
                match f.pending.vary_key(&vary) {
                    Some(secondary) if self.up_in.is_empty() => {
                        f.variant = true;
                        self.up_out.clear();
                        l2.variant_command(&f.pending.key, &secondary, self.up_out.vec());
                    }
                    // `Vary: *` (never reused), or bytes beyond the reply: done here.
                    _ => {
                        let reuse = self.up_in.is_empty();
                        l2.stats.misses.fetch_add(1, Ordering::Relaxed);
                        self.l2_end(reuse, now);
                    }
                }
            }
            Ok(Some(Reply::Hit(entry))) if !unusable(self.l2_ref(), &entry) => {
                let reuse = self.up_in.is_empty();
                let Some(f) = self.l2_release(reuse) else {
                    return;
                };
                l2.stats.hits.fetch_add(1, Ordering::Relaxed);
                cache.fill_from_l2(&f.pending.key, *entry, f.generation);
                self.l2_tried = Some((self.conn.requests_done, true));
                // The lead goes with `f`: the head is looked up again and L1 answers
                // (or, an entry for another variant or a stale one, it is a miss again).
                drop(f);
                self.process_client(now);
            }
            Ok(Some(Reply::Hit(_) | Reply::Miss)) => {
                let reuse = self.up_in.is_empty();
                l2.stats.misses.fetch_add(1, Ordering::Relaxed);
                self.l2_end(reuse, now);
            }
            Err(why) => self.l2_fail(&why, now),
        }
    }

    /// The lookup failed (connect, timeout, closed, a bad reply): count it, back off, and
    /// let the request go to the backend.
    pub(super) fn l2_fail(&mut self, why: &str, now: Instant) {
        if self.l2_ref().is_none() {
            return;
        }
        if let Some(l2) = self.l2_tier() {
            if l2.failed(now) {
                tracing::warn!(redis = %l2.addr, "L2 cache lookup failed ({why}); skipping L2 for {:?}", crate::cache::l2::BACKOFF);
            }
        }
        self.l2_end(false, now);
    }

    /// No entry from L2: go on to the backend with the pending fetch.
    fn l2_end(&mut self, reuse: bool, now: Instant) {
        if let Some(f) = self.l2_release(reuse) {
            self.source = Source::AfterL2(f.pending);
            self.process_client(now);
        }
    }

    /// End the lookup: the Redis connection back to the pool (`reuse`) or closed.
    pub(super) fn l2_release(&mut self, reuse: bool) -> Option<Box<L2Fetch>> {
        let f = match std::mem::take(&mut self.source) {
            Source::L2(f) => f,
            other => {
                self.source = other;
                return None;
            }
        };
        let upstream = self.l2_tier().map_or(0, |l| l.upstream);
        self.push_release(upstream, 0, reuse && f.connected);
        self.up_out.clear();
        self.up_in.clear();
        Some(f)
    }
}
