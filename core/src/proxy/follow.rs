//! Collapsed forwarding: a request for a key another request is fetching (a storable
//! response of known length) gets the response head at once and streams the body from
//! the fetch as it arrives, instead of waiting for it to complete. The session looks at the
//! growing body when woken (the fetch added to it, ended or failed; see
//! [`crate::wake`]) and whenever the client drained its output; without a waker it polls
//! every [`WAIT_POLL`].

use super::{Session, Source, State, HIGH_WATER};
use crate::cache::http::{write_hit_head, Growing, Grown, HitReply, Served, WAIT_POLL};
use crate::http1::head::{Method, RequestHead};
use crate::http1::Version;
use crate::respond::{ClientBody, Framing};
use bytes::Buf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// A response being streamed from another request's fetch.
#[derive(Debug)]
pub(super) struct Follow {
    grow: Arc<Growing>,
    /// Body bytes copied to the client so far.
    sent: usize,
    /// Next look at the growing body.
    pub(super) next: Instant,
    /// The connection closes after this response.
    close: bool,
}

impl Session {
    /// Answer the request with `h` from `grow`: the head now, the body as it arrives.
    pub(super) fn begin_follow(&mut self, h: &RequestHead, grow: Arc<Growing>, now: Instant) {
        let ctx = self.ctx.clone();
        let close = self.closes_after(h);
        self.conn.input.advance(h.len);
        let head_only = h.method == Method::Head;
        ctx.metrics.count_status(grow.facts.status);
        if let Some(cache) = &ctx.cache {
            cache.stats.hits.fetch_add(1, Ordering::Relaxed);
        }
        let wall = ctx.clock.at(now);
        write_hit_head(
            self.conn.output.vec(),
            &grow.head,
            grow.length,
            HitReply {
                age: crate::cache::current_age(&grow.facts, wall).as_secs(),
                how: Served::Collapsed,
                head_only,
                not_modified: false,
                close,
                http10_keep_alive: h.version == Version::Http10 && !close,
            },
        );
        self.state = State::Active;
        if head_only || grow.length == 0 {
            self.served(close, now);
            return;
        }
        self.source = Source::Follow(Box::new(Follow {
            grow,
            sent: 0,
            next: now,
            close,
        }));
        self.pump_follow(now);
    }

    /// Copy what arrived since the last look (as much as the output bound allows).
    pub(super) fn pump_follow(&mut self, now: Instant) {
        let room = HIGH_WATER.saturating_sub(self.conn.out_len());
        let Source::Follow(f) = &mut self.source else {
            return;
        };
        // Woken sessions need no poll: the deadline is only a bound on a fetch that stalls
        // (its own response timeout fails it first, which wakes this one).
        f.next = match &self.waker {
            Some(_) => now + self.ctx.idle_timeout,
            None => now + WAIT_POLL,
        };
        if room == 0 {
            return;
        }
        let mut sink = ClientBody::new(&mut self.conn.output, Framing::Length(f.grow.length));
        let (n, state) = f
            .grow
            .copy_from(f.sent, room, &mut sink, self.waker.as_ref());
        f.sent += n;
        match state {
            Grown::More => {}
            Grown::Done => {
                let (sent, close) = (f.sent, f.close);
                self.source = Source::Direct;
                if let Some(cache) = &self.ctx.cache {
                    cache
                        .stats
                        .bytes_served
                        .fetch_add(sent as u64, Ordering::Relaxed);
                }
                self.served(close, now);
                if self.state == State::Idle {
                    // A pipelined request may be waiting.
                    self.process_client(now);
                }
            }
            Grown::Failed => {
                tracing::debug!(client = %self.peer.ip, "the fetch this response streamed from failed; closing");
                self.source = Source::Direct;
                self.abort(now);
            }
        }
    }

    /// The client connection closes after the response being streamed.
    pub(super) fn follow_close_after(&mut self) {
        if let Source::Follow(f) = &mut self.source {
            f.close = true;
        }
    }
}
