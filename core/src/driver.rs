//! The rules every runtime applies around its sessions, written once: who is admitted when
//! connections are scarce ([`Gate`]), how long to wait after `accept` fails
//! ([`ACCEPT_BACKOFF`]), when a connection's one timer is re-armed and what its expiry does
//! ([`TimerSlot`]), and how often idle pooled connections are swept
//! ([`POOL_SWEEP_EVERY`]; returning a connection to the pool is
//! [`crate::upstream::Pool::release`]). The three runtimes and the simulator call these;
//! a runtime keeps only its event model (how it waits, reads, writes, connects and
//! accepts).

use crate::admission::{IpSlot, PerIp};
use crate::metrics::{Metrics, Throttle};
use crate::proxy::Session;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// After `accept` failed for want of resources (`EMFILE`, `ENFILE`, `ENOBUFS`), accept
/// again only this much later: the connection waits in the backlog meanwhile, and an
/// edge-triggered listener would otherwise never be told again (or a level-triggered one
/// spin).
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// How often a worker closes the idle pooled connections past their idle timeout or
/// lifetime ([`crate::upstream::Pool::evict_expired`]).
pub const POOL_SWEEP_EVERY: Duration = Duration::from_secs(1);

/// What to do with a connection just accepted.
#[derive(Debug)]
pub enum Admit<E> {
    /// Serve it, keeping `ip` (its count against `max_connections_per_ip`) for its life.
    /// `evicted`: to make room, end this idle connection first (taken from the runtime's
    /// idle list).
    Open {
        ip: Option<IpSlot>,
        evicted: Option<E>,
    },
    /// Close it at once: a limit is reached (counted, and logged at most once a second).
    Refuse,
}

/// One worker's admission of new connections (`server.max_connections`, shared by all
/// workers through the runtime's count of open connections, and
/// `server.max_connections_per_ip`).
pub struct Gate {
    per_ip: Option<Arc<PerIp>>,
    max: usize,
    metrics: Arc<Metrics>,
    reject_log: Throttle,
}

impl Gate {
    pub fn new(per_ip: Option<Arc<PerIp>>, max_connections: usize, metrics: Arc<Metrics>) -> Self {
        Gate {
            per_ip,
            max: max_connections,
            metrics,
            reject_log: Throttle::new(Duration::from_secs(1)),
        }
    }

    /// Judge a connection from `peer` while `open` client connections are open (all
    /// workers). At the limit, the one idle the longest makes room: `evict_idle` takes it
    /// out of the runtime's idle list (asked only then); with none idle the new one is
    /// refused.
    pub fn admit<E>(
        &mut self,
        peer: SocketAddr,
        open: usize,
        evict_idle: impl FnOnce() -> Option<E>,
        now: Instant,
    ) -> Admit<E> {
        let m = &self.metrics;
        let ip = match &self.per_ip {
            Some(p) => match p.try_open(peer.ip()) {
                Some(s) => Some(s),
                None => {
                    m.connections_rejected_per_ip
                        .fetch_add(1, Ordering::Relaxed);
                    if let Some(more) = self.reject_log.hit(now) {
                        tracing::warn!(client = %peer, more, "max_connections_per_ip reached for this address; closing its new connections");
                    }
                    return Admit::Refuse;
                }
            },
            None => None,
        };
        if open < self.max {
            return Admit::Open { ip, evicted: None };
        }
        match evict_idle() {
            Some(e) => {
                m.connections_evicted_idle.fetch_add(1, Ordering::Relaxed);
                Admit::Open {
                    ip,
                    evicted: Some(e),
                }
            }
            None => {
                m.connections_rejected.fetch_add(1, Ordering::Relaxed);
                if let Some(more) = self.reject_log.hit(now) {
                    let max = self.max;
                    tracing::warn!(client = %peer, max, more, "max_connections reached and none idle; closing new connections");
                }
                Admit::Refuse
            }
        }
    }

    /// `accept` failed: logs it and says when to accept again.
    pub fn accept_failed(&self, error: &dyn std::fmt::Display, now: Instant) -> Instant {
        tracing::warn!(error = %error, "accept failed");
        now + ACCEPT_BACKOFF
    }
}

/// A connection's one timer, as the runtime arms it: re-armed only when the session's
/// deadline moves earlier (a timer that fires early, because the deadline moved later
/// meanwhile, is harmless: the session rechecks against `now`), so a busy connection does
/// not re-arm its timer on every event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimerSlot {
    armed: Option<Instant>,
}

impl TimerSlot {
    /// After driving the session: the instant to (re)arm the runtime's timer at, when it
    /// must be.
    #[inline]
    pub fn rearm(&mut self, s: &Session) -> Option<Instant> {
        let d = s.deadline()?;
        if self.armed.is_none_or(|a| d < a) {
            self.armed = Some(d);
            return Some(d);
        }
        None
    }

    /// When the timer is armed for (a runtime with a timer heap drops entries for any
    /// other instant: superseded).
    #[inline]
    pub fn armed(&self) -> Option<Instant> {
        self.armed
    }

    /// The runtime's timer fired at `now`: the session handles what is due (nothing, when
    /// its deadline moved later). Re-arm with [`rearm`](Self::rearm) after driving it.
    pub fn fire(&mut self, s: &mut Session, now: Instant) {
        self.armed = None;
        if s.deadline().is_some_and(|d| d <= now) {
            s.on_timeout(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::IdleList;
    use std::net::{IpAddr, Ipv4Addr};

    fn peer(last: u8) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)), 40000)
    }

    #[test]
    #[allow(clippy::disallowed_methods)]
    fn at_the_limit_the_oldest_idle_makes_room_else_the_new_one_is_refused() {
        let metrics = Arc::new(Metrics::default());
        let mut gate = Gate::new(None, 2, metrics.clone());
        let now = Instant::now();
        let mut idle = IdleList::default();
        assert!(matches!(
            gate.admit(peer(1), 1, || idle.pop_oldest(), now),
            Admit::Open { evicted: None, .. }
        ));
        idle.enter("first");
        idle.enter("second");
        match gate.admit(peer(1), 2, || idle.pop_oldest(), now) {
            Admit::Open { evicted, .. } => assert_eq!(evicted, Some("first")),
            Admit::Refuse => panic!("an idle connection could make room"),
        }
        let _ = idle.pop_oldest();
        assert!(matches!(
            gate.admit(peer(1), 2, || idle.pop_oldest(), now),
            Admit::Refuse
        ));
        assert_eq!(metrics.connections_evicted_idle.load(Ordering::Relaxed), 1);
        assert_eq!(metrics.connections_rejected.load(Ordering::Relaxed), 1);
    }

    #[test]
    #[allow(clippy::disallowed_methods)]
    fn per_address_slots_are_held_for_the_connections_life() {
        let metrics = Arc::new(Metrics::default());
        let mut gate = Gate::new(Some(PerIp::new(1)), 100, metrics.clone());
        let now = Instant::now();
        let none = || None::<()>;
        let Admit::Open { ip: slot, .. } = gate.admit(peer(1), 0, none, now) else {
            panic!("first connection refused");
        };
        assert!(matches!(gate.admit(peer(1), 1, none, now), Admit::Refuse));
        assert!(matches!(
            gate.admit(peer(2), 1, none, now),
            Admit::Open { .. }
        ));
        drop(slot);
        assert!(matches!(
            gate.admit(peer(1), 1, none, now),
            Admit::Open { .. }
        ));
        assert_eq!(
            metrics.connections_rejected_per_ip.load(Ordering::Relaxed),
            1
        );
    }

    #[test]
    #[allow(clippy::disallowed_methods)]
    fn the_timer_is_rearmed_only_when_the_deadline_moves_earlier() {
        let now = crate::test_origin();
        let ctx = crate::test_ctx(
            "server:\n  header_timeout: 3s\nbackends:\n  - url: http://127.0.0.1:9001\n",
            now,
        );
        let mut s = Session::new(ctx.clone(), peer(1), now);
        let mut t = TimerSlot::default();
        // A fresh connection waits for its head: one deadline, armed once.
        let d = t.rearm(&s).expect("armed");
        assert_eq!(t.rearm(&s), None, "same deadline: no re-arm");
        // An early fire (the deadline is later than `now`) changes nothing in the session.
        t.fire(&mut s, now);
        assert!(!s.wants_close());
        assert_eq!(t.rearm(&s), Some(d), "re-armed after firing");
        assert_eq!(d, now + Duration::from_secs(3), "the head timeout");
        // Due: the connection that sent nothing closes.
        t.fire(&mut s, d);
        assert!(s.wants_close());
    }
}
