//! Waking a session that waits on another request's fetch (collapsed forwarding, the cache
//! lock) when that fetch moves: body bytes arrived, it ended, failed, or gave up its key.
//!
//! Core has no threads and no event loop, so the runtime says how a session is reached: a
//! [`Wake`] target (one per worker, or per connection) and a token it chose, set with
//! [`Session::set_waker`](crate::proxy::Session::set_waker). The fetching session, on
//! whatever worker it runs, calls [`Wake::wake`] with the waiter's token; the runtime then
//! calls [`Session::on_wake`](crate::proxy::Session::on_wake) on its own worker. A session
//! without a waker looks again every [`WAIT_POLL`](crate::cache::http::WAIT_POLL)
//! instead (its deadline says when).

use smallvec::SmallVec;
use std::sync::Arc;

/// Where a runtime receives wake-ups: `token` names the session (the runtime's choice).
/// Called from any worker thread, with no lock of core's held; must not block.
pub trait Wake: Send + Sync {
    fn wake(&self, token: u64);
}

/// One session's address for wake-ups: cloning it is one reference count, no allocation.
#[derive(Clone)]
pub struct Waker {
    target: Arc<dyn Wake>,
    token: u64,
}

impl Waker {
    pub fn new(target: Arc<dyn Wake>, token: u64) -> Waker {
        Waker { target, token }
    }

    pub fn wake(&self) {
        self.target.wake(self.token);
    }

    fn same(&self, other: &Waker) -> bool {
        self.token == other.token && Arc::ptr_eq(&self.target, &other.target)
    }
}

impl std::fmt::Debug for Waker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Waker({})", self.token)
    }
}

/// Sessions waiting for one thing to move; each is woken once per registration (a waiter
/// that still waits afterwards registers again).
#[derive(Debug, Default)]
pub struct Waiters(SmallVec<[Waker; 2]>);

impl Waiters {
    /// Register `w` (once, however often it asks).
    pub fn add(&mut self, w: &Waker) {
        if !self.0.iter().any(|x| x.same(w)) {
            self.0.push(w.clone());
        }
    }

    /// Take the list, to wake it after the lock that guards it is released.
    pub fn take(&mut self) -> Waiters {
        Waiters(std::mem::take(&mut self.0))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn wake_all(self) {
        for w in self.0 {
            w.wake();
        }
    }
}

/// Tokens of sessions to wake on one worker, pushed from any thread: for runtimes whose
/// worker is rung once per batch (an eventfd, a socket pair). [`push`](Self::push) says
/// whether to ring: only the first token after the worker took the queue needs one (the
/// worker takes the queue only after it was rung, so no token is left waiting).
#[derive(Debug, Default)]
pub struct TokenQueue(parking_lot::Mutex<Vec<u64>>);

impl TokenQueue {
    /// Queue `token`; true when the worker must be rung.
    pub fn push(&self, token: u64) -> bool {
        let mut q = self.0.lock();
        q.push(token);
        q.len() == 1
    }

    /// Everything queued since the last take, swapped into `out` (emptied first), so the
    /// two allocations take turns and a busy worker allocates none.
    pub fn take_into(&self, out: &mut Vec<u64>) {
        out.clear();
        std::mem::swap(&mut *self.0.lock(), out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    #[derive(Default)]
    struct Log(Mutex<Vec<u64>>);
    impl Wake for Log {
        fn wake(&self, token: u64) {
            self.0.lock().push(token);
        }
    }

    #[test]
    fn each_registration_wakes_once() {
        let log = Arc::new(Log::default());
        let (a, b) = (Waker::new(log.clone(), 1), Waker::new(log.clone(), 2));
        let mut w = Waiters::default();
        w.add(&a);
        w.add(&b);
        w.add(&a);
        w.take().wake_all();
        assert_eq!(*log.0.lock(), vec![1, 2]);
        assert!(w.is_empty());
        w.take().wake_all();
        assert_eq!(log.0.lock().len(), 2, "nothing registered: nobody woken");
    }

    #[test]
    fn a_token_queue_rings_once_per_batch() {
        let q = TokenQueue::default();
        assert!(q.push(7), "the first token rings");
        assert!(!q.push(8), "a ring is on its way");
        let mut got = vec![1];
        q.take_into(&mut got);
        assert_eq!(got, vec![7, 8]);
        assert!(q.push(9), "taken: the next one rings again");
    }
}
