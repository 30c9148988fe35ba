//! A process-wide shutdown request: set once (by a signal, a test, a supervisor), seen by
//! every worker of every runtime. Runtimes register a wake-up (a `mio::Waker`, a tokio
//! `Notify`, an eventfd) so a worker parked in its event loop notices at once.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

type Wake = Box<dyn Fn() + Send + Sync>;

#[derive(Default)]
pub struct Shutdown {
    requested: AtomicBool,
    wakers: Mutex<Vec<Wake>>,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Ask every worker to stop accepting and drain. Idempotent.
    pub fn request(&self) {
        if !self.requested.swap(true, Ordering::SeqCst) {
            for w in self.wakers.lock().iter() {
                w();
            }
        }
    }

    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Call `wake` when shutdown is requested (at once if it already was).
    pub fn on_request(&self, wake: impl Fn() + Send + Sync + 'static) {
        let mut ws = self.wakers.lock();
        if self.is_requested() {
            drop(ws);
            wake();
        } else {
            ws.push(Box::new(wake));
        }
    }
}

impl std::fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shutdown")
            .field("requested", &self.is_requested())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    #[test]
    fn wakes_registered_and_late_listeners_once() {
        let s = Shutdown::new();
        let n = Arc::new(AtomicUsize::new(0));
        let n1 = n.clone();
        s.on_request(move || {
            n1.fetch_add(1, Ordering::SeqCst);
        });
        assert!(!s.is_requested());
        s.request();
        s.request();
        assert_eq!(n.load(Ordering::SeqCst), 1);
        let n2 = n.clone();
        s.on_request(move || {
            n2.fetch_add(10, Ordering::SeqCst);
        });
        assert_eq!(n.load(Ordering::SeqCst), 11);
        assert!(s.is_requested());
    }
}
