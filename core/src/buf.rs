//! Buffers. [`OutBuf`]: bytes waiting to be written to one peer, as a queue of segments
//! (owned bytes, and shared [`Bytes`] such as a body in the read buffer it arrived in or a
//! stored cache entry, never copied); the runtime writes from [`OutBuf::pending`], or from
//! several segments at once with one vectored write ([`OutBuf::chunks`],
//! [`OutBuf::io_slices`]), and reports progress with [`OutBuf::consume`]; a runtime whose
//! writes own what they write (io_uring) lends the segments out ([`OutBuf::lend`]).
//! [`BufPool`]: a worker's free buffers, lent to a session while a request is in flight and
//! taken back when it goes idle, so an idle keep-alive connection holds no buffer and a busy
//! one allocates none.

use bytes::{Buf, Bytes, BytesMut};
use smallvec::SmallVec;

/// First allocation of an output buffer: a response head plus a small body.
pub const INITIAL_CAPACITY: usize = 4096;

/// Bodies at least this long are written from the read buffer they arrived in
/// ([`OutBuf::push_shared`]) instead of being copied.
pub const SHARE_MIN: usize = 2048;

/// At most this many shared segments wait at once; a body pushed past it is copied (it
/// bounds the queue's bookkeeping, not the bytes, which the session's flow control bounds).
pub const MAX_SHARED: usize = 32;

/// Chunks the runtimes hand one vectored write ([`OutBuf::io_slices`], [`Lent::chunks`]):
/// a head, a body, the next response's head and body. More wait for the next write.
pub const WRITE_IOV: usize = 4;

/// A shared segment: `bytes` go out after the owned bytes before index `at` of the owned
/// buffer (and before those from `at` on). Never empty.
#[derive(Debug)]
struct Seg {
    at: usize,
    bytes: Bytes,
}

/// The shared segments in order (two inline: a body, and the next response's). Segments
/// that share an `at` go out in queue order.
type Segs = SmallVec<[Seg; 2]>;

/// Walk the chunks of owned bytes `buf[pos..]` interleaved with `segs`, in write order,
/// until `f` says stop (returns false).
#[inline]
fn each_chunk<'a>(buf: &'a [u8], pos: usize, segs: &'a [Seg], mut f: impl FnMut(&'a [u8]) -> bool) {
    let mut p = pos;
    for s in segs {
        if s.at > p {
            if !f(&buf[p..s.at]) {
                return;
            }
            p = s.at;
        }
        if !f(&s.bytes) {
            return;
        }
    }
    if p < buf.len() {
        f(&buf[p..]);
    }
}

#[derive(Debug, Default)]
pub struct OutBuf {
    /// The owned bytes, in order; the shared segments slot in between them.
    buf: Vec<u8>,
    pos: usize,
    segs: Segs,
    /// Bytes pending in `segs`.
    shared_len: usize,
    /// Bytes written (consumed) over the buffer's life: with [`len`](Self::len), where in
    /// the stream a message starts, to tell later whether any of it went out.
    written: u64,
    /// Pending bytes out on a lend (in a write in flight; not in `buf` meanwhile).
    lent: usize,
    /// Shared segments are out on a lend ([`lend`](Self::lend)): their read buffers are
    /// not to be reused until they are back.
    lent_shared: bool,
}

/// What [`OutBuf::lend`] hands a write that owns what it writes: the owned allocation
/// (pending from an offset) and the shared segments among its bytes, in order. Give it
/// back with [`OutBuf::unlend`].
#[derive(Debug, Default)]
pub struct Lent {
    buf: Vec<u8>,
    pos: usize,
    segs: Segs,
    shared_len: usize,
}

impl Lent {
    /// The lent bytes in write order, as up to `dst.len()` chunks (for one vectored
    /// write); returns how many were filled. The chunks point into heap memory that stays
    /// put while the value is moved.
    pub fn chunks<'a>(&'a self, dst: &mut [&'a [u8]]) -> usize {
        fill(&self.buf, self.pos, &self.segs, dst)
    }
    /// Bytes lent.
    pub fn len(&self) -> usize {
        self.buf.len() - self.pos + self.shared_len
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[inline]
fn fill<'a>(buf: &'a [u8], pos: usize, segs: &'a [Seg], dst: &mut [&'a [u8]]) -> usize {
    let mut n = 0;
    each_chunk(buf, pos, segs, |c| {
        if n == dst.len() {
            return false;
        }
        dst[n] = c;
        n += 1;
        true
    });
    n
}

impl OutBuf {
    pub fn new() -> Self {
        Self::default()
    }
    /// The next bytes to write, contiguous: the first segment.
    #[inline]
    pub fn pending(&self) -> &[u8] {
        match self.segs.first() {
            Some(s) if s.at > self.pos => &self.buf[self.pos..s.at],
            Some(s) => &s.bytes,
            None => &self.buf[self.pos..],
        }
    }
    /// The first two pending chunks, in order (either may be empty), for a vectored write
    /// of two; [`chunks`](Self::chunks) gives more.
    #[inline]
    pub fn pending_parts(&self) -> (&[u8], &[u8]) {
        let mut two: [&[u8]; 2] = [&[], &[]];
        self.chunks(&mut two);
        (two[0], two[1])
    }
    /// The pending bytes in write order, as up to `dst.len()` chunks; returns how many
    /// were filled.
    #[inline]
    pub fn chunks<'a>(&'a self, dst: &mut [&'a [u8]]) -> usize {
        fill(&self.buf, self.pos, &self.segs, dst)
    }
    /// [`chunks`](Self::chunks) as `IoSlice`s, for `write_vectored`.
    #[inline]
    pub fn io_slices<'a>(&'a self, dst: &mut [std::io::IoSlice<'a>]) -> usize {
        let mut n = 0;
        each_chunk(&self.buf, self.pos, &self.segs, |c| {
            if n == dst.len() {
                return false;
            }
            dst[n] = std::io::IoSlice::new(c);
            n += 1;
            true
        });
        n
    }
    #[inline]
    pub fn len(&self) -> usize {
        self.buf.len() - self.pos + self.shared_len
    }
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Shared bytes wait to be written (their read buffer is not to be reused yet).
    #[inline]
    pub fn has_shared(&self) -> bool {
        !self.segs.is_empty() || self.lent_shared
    }
    /// The stream offset just past the pending bytes: where bytes queued next begin.
    pub fn end_offset(&self) -> u64 {
        self.written + (self.lent + self.len()) as u64
    }

    /// Bytes written so far over the buffer's life.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// No byte from stream offset `at` on has been written or is in a write in flight.
    pub fn untouched_from(&self, at: u64) -> bool {
        at >= self.written + self.lent as u64
    }

    /// Drop the pending bytes from stream offset `at` on, which must be
    /// [`untouched_from`](Self::untouched_from) (e.g. a response head that gives way to
    /// an error response).
    pub fn truncate_at(&mut self, at: u64) {
        debug_assert!(self.untouched_from(at));
        let mut keep = at.saturating_sub(self.written + self.lent as u64) as usize;
        let mut p = self.pos;
        for i in 0..self.segs.len() {
            let run = self.segs[i].at - p;
            if keep <= run {
                self.buf.truncate(p + keep);
                self.segs.truncate(i);
                return self.recount();
            }
            keep -= run;
            p = self.segs[i].at;
            let l = self.segs[i].bytes.len();
            if keep <= l {
                self.segs[i].bytes.truncate(keep);
                self.segs.truncate(if keep == 0 { i } else { i + 1 });
                self.buf.truncate(p);
                return self.recount();
            }
            keep -= l;
        }
        self.buf.truncate(p + keep);
    }

    fn recount(&mut self) {
        self.shared_len = self.segs.iter().map(|s| s.bytes.len()).sum();
    }

    /// `n` bytes of the pending ones (in write order) were written.
    #[inline]
    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len(), "consumed {n} of {} pending", self.len());
        self.written += n as u64;
        if self.segs.is_empty() {
            // Owned bytes only (a head, a short body, a request).
            self.pos = (self.pos + n).min(self.buf.len());
            if self.pos == self.buf.len() {
                self.buf.clear();
                self.pos = 0;
            }
            return;
        }
        if n == self.len() {
            // All of it (the usual case: a head and its body in one write).
            self.buf.clear();
            self.pos = 0;
            self.segs.clear();
            self.shared_len = 0;
            return;
        }
        self.consume_segments(n);
    }

    fn consume_segments(&mut self, mut n: usize) {
        while n > 0 {
            match self.segs.first_mut() {
                Some(s) if s.at > self.pos => {
                    let k = n.min(s.at - self.pos);
                    self.pos += k;
                    n -= k;
                }
                Some(s) => {
                    let k = n.min(s.bytes.len());
                    s.bytes.advance(k);
                    self.shared_len -= k;
                    n -= k;
                    if s.bytes.is_empty() {
                        self.segs.remove(0);
                    }
                }
                None => {
                    self.pos += n.min(self.buf.len() - self.pos);
                    break;
                }
            }
        }
        if self.pos == self.buf.len() {
            // Every segment left comes after all the owned bytes.
            self.buf.clear();
            self.pos = 0;
            for s in &mut self.segs {
                s.at = 0;
            }
        }
    }
    pub fn clear(&mut self) {
        self.buf.clear();
        self.pos = 0;
        self.segs.clear();
        self.shared_len = 0;
    }
    /// Queue `b` (a slice of a read buffer, a stored body) to be written after what is
    /// pending, without copying it when it is long.
    pub fn push_shared(&mut self, b: Bytes) {
        if b.len() < SHARE_MIN || self.segs.len() >= MAX_SHARED {
            self.vec().extend_from_slice(&b);
        } else {
            self.shared_len += b.len();
            self.segs.push(Seg {
                at: self.buf.len(),
                bytes: b,
            });
        }
    }
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }
    /// Hand the (emptied) allocation back, leaving none (nor a spilled segment queue).
    pub fn take_vec(&mut self) -> Vec<u8> {
        self.pos = 0;
        self.shared_len = 0;
        if self.segs.spilled() {
            self.segs = Segs::new();
        } else {
            self.segs.clear();
        }
        let mut v = std::mem::take(&mut self.buf);
        v.clear();
        v
    }

    /// For writes that own what they write (io_uring), without copying shared bytes: hand
    /// over everything pending (the owned allocation and the shared segments among its
    /// bytes) for one vectored write; `spare` takes the allocation's place for bytes queued
    /// meanwhile. Give it back with [`unlend`](Self::unlend) before reporting how much was
    /// written. While it is out, [`has_shared`](Self::has_shared) stays true if it holds
    /// shared bytes.
    pub fn lend(&mut self, mut spare: Vec<u8>) -> Lent {
        spare.clear();
        let l = Lent {
            buf: std::mem::replace(&mut self.buf, spare),
            pos: std::mem::replace(&mut self.pos, 0),
            segs: std::mem::take(&mut self.segs),
            shared_len: std::mem::replace(&mut self.shared_len, 0),
        };
        self.lent = l.len();
        self.lent_shared = !l.segs.is_empty();
        l
    }

    /// Take back what [`lend`](Self::lend) lent: its bytes come first again, then anything
    /// queued meanwhile (owned bytes queued meanwhile are moved behind the lent ones; no
    /// shared bytes are copied). Returns the spare, emptied, for the pool.
    pub fn unlend(&mut self, l: Lent) -> Vec<u8> {
        self.lent = 0;
        self.lent_shared = false;
        let Lent {
            buf: mut v,
            mut pos,
            mut segs,
            shared_len,
        } = l;
        let own = self.buf.len() - self.pos;
        if own == 0 && self.segs.is_empty() {
            // Nothing queued meanwhile (the usual case): the lent bytes are all there is.
            let mut spare = std::mem::replace(&mut self.buf, v);
            spare.clear();
            self.pos = pos;
            self.segs = segs;
            self.shared_len = shared_len;
            return spare;
        }
        // Drop the bytes written before the lend when appending would grow the allocation
        // (as `vec` does): a peer that keeps taking part of each write would otherwise
        // have every byte ever sent kept in front of `pos`. Offsets of the write reported
        // next count from `pos`, so they hold.
        if pos > 0 && v.len() + own > v.capacity() {
            v.drain(..pos);
            for s in &mut segs {
                s.at -= pos;
            }
            pos = 0;
        }
        let base = v.len();
        v.extend_from_slice(&self.buf[self.pos..]);
        for mut s in self.segs.drain(..) {
            s.at = s.at - self.pos + base;
            segs.push(s);
        }
        self.segs = segs;
        self.shared_len += shared_len;
        let mut spare = std::mem::replace(&mut self.buf, v);
        self.pos = pos;
        spare.clear();
        spare
    }

    /// Use `v` (emptied) as the allocation. Pending bytes, if any, are kept.
    pub fn set_vec(&mut self, mut v: Vec<u8>) {
        if self.is_empty() {
            v.clear();
            self.buf = v;
            self.pos = 0;
        }
    }

    /// Append space for writing: owned bytes queued after everything pending (shared
    /// segments included, which stay where they are). Compacts consumed bytes first when
    /// that avoids growth.
    #[inline]
    pub fn vec(&mut self) -> &mut Vec<u8> {
        if self.buf.capacity() == 0 {
            // One allocation up front instead of a string of small regrowths per connection.
            self.buf.reserve(INITIAL_CAPACITY);
        }
        if self.pos > 0 && self.buf.len() + 4096 > self.buf.capacity() {
            self.buf.drain(..self.pos);
            for s in &mut self.segs {
                s.at -= self.pos;
            }
            self.pos = 0;
        }
        &mut self.buf
    }
}

/// One worker's free buffers: read buffers in two sizes and output buffers. Bounded: past
/// `max_free` per kind, returned buffers are freed.
#[derive(Debug)]
pub struct BufPool {
    small: Vec<BytesMut>,
    big: Vec<BytesMut>,
    outs: Vec<Vec<u8>>,
    max_free: usize,
}

impl Default for BufPool {
    fn default() -> Self {
        Self::new(256)
    }
}

impl BufPool {
    pub fn new(max_free: usize) -> Self {
        BufPool {
            small: Vec::new(),
            big: Vec::new(),
            outs: Vec::new(),
            max_free,
        }
    }

    /// A read buffer with room for at least `min` bytes.
    pub fn read_buf(&mut self, min: usize) -> BytesMut {
        let list = if min > crate::proxy::READ_CHUNK {
            &mut self.big
        } else {
            &mut self.small
        };
        match list.pop() {
            Some(mut b) => {
                b.reserve(min); // reclaims the whole allocation: it is empty and unique
                b
            }
            None => BytesMut::with_capacity(min),
        }
    }

    pub fn put_read(&mut self, mut b: BytesMut) {
        if b.capacity() == 0 {
            return;
        }
        b.clear();
        // A buffer whose front was split off (a body written from it) reports only the
        // capacity after the split: take the whole allocation back when nothing else holds
        // it, so it is filed by its real size (never allocates).
        let _ = b.try_reclaim(crate::proxy::UP_READ_CHUNK);
        let list = if b.capacity() > crate::proxy::READ_CHUNK {
            &mut self.big
        } else {
            &mut self.small
        };
        if list.len() < self.max_free {
            list.push(b);
        }
    }

    pub fn out_buf(&mut self) -> Vec<u8> {
        self.outs
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(INITIAL_CAPACITY))
    }

    pub fn put_out(&mut self, v: Vec<u8>) {
        if v.capacity() > 0 && self.outs.len() < self.max_free {
            self.outs.push(v);
        }
    }

    /// Buffers held free (read buffers, output buffers).
    pub fn free(&self) -> (usize, usize) {
        (self.small.len() + self.big.len(), self.outs.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A write of at most `n` bytes from `parts`: what it took goes to `sent`; how much.
    fn take_up_to(parts: &[&[u8]], n: usize, sent: &mut Vec<u8>) -> usize {
        let mut left = n;
        for part in parts {
            let t = part.len().min(left);
            sent.extend_from_slice(&part[..t]);
            left -= t;
        }
        n - left
    }

    /// Everything pending, in write order (through `chunks`, one at a time).
    fn drain_all(o: &mut OutBuf) -> Vec<u8> {
        let mut got = Vec::new();
        while !o.is_empty() {
            let mut c: [&[u8]; 3] = [&[]; 3];
            let n = o.chunks(&mut c);
            let mut k = 0;
            for part in &c[..n] {
                got.extend_from_slice(part);
                k += part.len();
            }
            o.consume(k);
        }
        got
    }

    #[test]
    fn stream_offsets_tell_whether_a_message_went_out_even_across_a_lend() {
        let mut o = OutBuf::new();
        o.vec().extend_from_slice(b"first");
        let l = o.lend(Vec::new());
        // While "first" is in a write in flight, a second message is queued.
        let at = o.end_offset();
        assert_eq!(at, 5);
        o.vec().extend_from_slice(b"second");
        assert!(o.untouched_from(at));
        assert!(!o.untouched_from(2), "lent bytes may be on the wire");
        drop(o.unlend(l));
        o.consume(3);
        assert!(o.untouched_from(at));
        o.truncate_at(at);
        assert_eq!(o.pending(), b"st", "the first message's rest stays");
        o.vec().extend_from_slice(b"third");
        o.consume(4);
        assert!(!o.untouched_from(at), "part of what followed went out");
        assert_eq!(o.written(), 7);
    }

    /// A peer that takes part of every write while more keeps coming (io_uring lends the
    /// buffer each time): the allocation stays bounded by what is pending, not by what was
    /// ever sent (it grew to everything streamed, 64 MiB in a black-box test under load).
    #[test]
    fn lend_cycles_with_partial_writes_stay_bounded() {
        let mut o = OutBuf::new();
        let mut sent = Vec::new();
        let mut next = 0u8;
        let mut fill = |o: &mut OutBuf, n: usize| {
            for _ in 0..n {
                o.vec().push(next);
                next = next.wrapping_add(1);
            }
        };
        fill(&mut o, 48 * 1024);
        for _ in 0..1000 {
            let l = o.lend(Vec::new());
            // While the write flies, the session appends (flow control keeps the total
            // pending near 64 KiB).
            fill(&mut o, 24 * 1024);
            // Half of what was lent got written.
            let mut c: [&[u8]; 1] = [&[]];
            assert_eq!(l.chunks(&mut c), 1);
            let n = c[0].len() / 2;
            sent.extend_from_slice(&c[0][..n]);
            let _spare = o.unlend(l);
            o.consume(n);
            assert!(o.capacity() <= 512 * 1024, "capacity {}", o.capacity());
        }
        sent.extend_from_slice(&drain_all(&mut o));
        assert!(
            sent.iter().enumerate().all(|(i, &b)| b == i as u8),
            "bytes in order"
        );
    }

    /// io_uring, vectored: the shared body goes out with the owned bytes before it, neither
    /// copied; bytes and bodies queued meanwhile follow it, whatever part of the write went
    /// out, and are not copied either.
    #[test]
    fn lent_shared_bytes_come_back_in_order_uncopied() {
        for written in [0usize, 2, 4, 10, 4 + 3000] {
            for append in [false, true] {
                let body = Bytes::from(vec![b'b'; 3000]);
                let next = Bytes::from(vec![b'n'; 2500]);
                let mut o = OutBuf::new();
                o.vec().extend_from_slice(b"head");
                o.push_shared(body.clone());
                let l = o.lend(Vec::new());
                let mut c: [&[u8]; 4] = [&[]; 4];
                assert_eq!(l.chunks(&mut c), 2);
                assert_eq!(c[0], b"head");
                assert_eq!(c[1].as_ptr(), body.as_ptr(), "not copied");
                assert!(o.has_shared(), "its read buffer is not reusable meanwhile");
                assert_eq!(o.end_offset(), 3004);
                if append {
                    o.vec().extend_from_slice(b"next");
                    o.push_shared(next.clone());
                }
                let spare = o.unlend(l);
                assert!(spare.is_empty());
                o.consume(written);
                if append && written < 3004 {
                    let mut c: [&[u8]; 4] = [&[]; 4];
                    let n = o.chunks(&mut c);
                    assert!(
                        c[..n]
                            .iter()
                            .any(|p| p.as_ptr() == body[written.max(4) - 4..].as_ptr()),
                        "the lent body is still not copied"
                    );
                    assert_eq!(
                        c[n - 1].as_ptr(),
                        next.as_ptr(),
                        "nor the one queued meanwhile"
                    );
                }
                let rest = drain_all(&mut o);
                let mut all = b"head".to_vec();
                all.extend_from_slice(&body);
                if append {
                    all.extend_from_slice(b"next");
                    all.extend_from_slice(&next);
                }
                assert_eq!(rest, all[written..], "written {written}, append {append}");
                assert_eq!(o.written() as usize, all.len());
            }
        }
    }

    #[test]
    fn shared_bytes_follow_owned_ones_and_appends_follow_them_uncopied() {
        let body = Bytes::from(vec![b'b'; SHARE_MIN]);
        let second = Bytes::from(vec![b'c'; SHARE_MIN + 1]);
        let mut o = OutBuf::new();
        o.vec().extend_from_slice(b"head");
        o.push_shared(body.clone());
        assert!(o.has_shared());
        assert_eq!(o.len(), 4 + SHARE_MIN);
        assert_eq!(o.pending(), b"head");
        let (own, shared) = o.pending_parts();
        assert_eq!((own, shared), (&b"head"[..], &body[..]));
        // A write across both parts.
        o.consume(6);
        assert_eq!(o.pending(), &body[2..]);
        assert_eq!(o.len(), SHARE_MIN - 2);
        // Appending queues after the shared rest, which stays shared.
        o.vec().extend_from_slice(b"tail");
        o.push_shared(second.clone());
        assert!(o.has_shared());
        let mut c: [&[u8]; 8] = [&[]; 8];
        let n = o.chunks(&mut c);
        assert_eq!(n, 3);
        assert_eq!(c[0].as_ptr(), body[2..].as_ptr(), "not copied");
        assert_eq!(c[1], b"tail");
        assert_eq!(
            c[2].as_ptr(),
            second.as_ptr(),
            "a second body is not copied either"
        );
        let mut io = [std::io::IoSlice::new(&[]); 2];
        assert_eq!(o.io_slices(&mut io), 2, "as many as fit");
        assert_eq!(o.len(), SHARE_MIN - 2 + 4 + SHARE_MIN + 1);
        o.consume(SHARE_MIN - 2 + 1);
        assert_eq!(o.pending(), b"ail");
        o.consume(o.len());
        assert!(o.is_empty() && !o.has_shared());
        // Short bodies are copied.
        o.push_shared(Bytes::from_static(b"short"));
        assert!(!o.has_shared());
        assert_eq!(o.pending(), b"short");
    }

    #[test]
    fn truncation_cuts_across_segments() {
        let body = Bytes::from(vec![b'b'; 3000]);
        for cut in [0u64, 2, 4, 5, 3004, 3006, 3007] {
            let mut o = OutBuf::new();
            o.vec().extend_from_slice(b"head");
            o.push_shared(body.clone());
            o.vec().extend_from_slice(b"xyz");
            o.truncate_at(cut);
            let mut all = b"head".to_vec();
            all.extend_from_slice(&body);
            all.extend_from_slice(b"xyz");
            assert_eq!(o.len() as u64, cut, "cut {cut}");
            assert_eq!(o.end_offset(), cut);
            o.vec().extend_from_slice(b"!");
            let mut want = all[..cut as usize].to_vec();
            want.push(b'!');
            assert_eq!(drain_all(&mut o), want, "cut {cut}");
        }
    }

    #[test]
    fn a_split_read_buffer_goes_back_to_the_pool_whole() {
        let mut pool = BufPool::new(4);
        let mut b = pool.read_buf(crate::proxy::UP_READ_CHUNK);
        b.extend_from_slice(&[1u8; 20_000]);
        let body = b.split_to(20_000).freeze();
        assert!(b.capacity() < crate::proxy::READ_CHUNK);
        drop(body);
        pool.put_read(b);
        // Filed as a big buffer again: the next upstream read gets it, no allocation.
        let again = pool.read_buf(crate::proxy::UP_READ_CHUNK);
        assert!(again.capacity() >= crate::proxy::UP_READ_CHUNK);
        assert_eq!(pool.free().0, 0);
    }

    #[test]
    fn lent_bytes_come_back_before_bytes_appended_meanwhile() {
        let mut o = OutBuf::new();
        o.vec().extend_from_slice(b"xxhello ");
        o.consume(2);
        let l = o.lend(Vec::with_capacity(64));
        assert_eq!(l.len(), 6);
        assert!(o.is_empty());
        o.vec().extend_from_slice(b"world");
        let spare = o.unlend(l);
        assert!(spare.is_empty() && spare.capacity() >= 64);
        assert_eq!(o.pending(), b"hello world");
        o.consume(6); // the lent write sent "hello "
        assert_eq!(o.pending(), b"world");

        // Nothing appended meanwhile: the same allocation comes back.
        let mut o = OutBuf::new();
        o.vec().extend_from_slice(b"abc");
        let l = o.lend(Vec::new());
        let mut c: [&[u8]; 1] = [&[]];
        l.chunks(&mut c);
        let ptr = c[0].as_ptr();
        o.unlend(l);
        assert_eq!(o.pending().as_ptr(), ptr);
        assert_eq!(o.pending(), b"abc");
    }

    #[test]
    fn parking_frees_a_spilled_queue() {
        let mut o = OutBuf::new();
        for _ in 0..5 {
            o.push_shared(Bytes::from(vec![b'b'; SHARE_MIN]));
        }
        assert!(o.segs.spilled());
        o.consume(o.len());
        drop(o.take_vec());
        assert!(
            !o.segs.spilled(),
            "an idle connection keeps no queue on the heap"
        );
        assert!(o.is_empty() && !o.has_shared());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Own(u16),
        Shared(u16),
        Write(u16),
        /// Lend, queue `.1` owned and `.2` shared meanwhile, then `.0` of the lent bytes went out.
        Lend(u16, u16, u16),
        /// Truncate at this many bytes past the first untouched offset.
        Truncate(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u16..300).prop_map(Op::Own),
            (0u16..5000).prop_map(Op::Shared),
            (0u16..6000).prop_map(Op::Write),
            (0u16..6000, 0u16..300, 0u16..5000).prop_map(|(a, b, c)| Op::Lend(a, b, c)),
            (0u16..6000).prop_map(Op::Truncate),
        ]
    }

    proptest! {
        /// Whatever is queued, written in parts, lent, appended meanwhile or truncated, the
        /// bytes that go out are the stream in order, and the offsets agree with it.
        #[test]
        fn the_queue_writes_the_stream_in_order(ops in proptest::collection::vec(op(), 1..60)) {
            let mut o = OutBuf::new();
            let mut want: Vec<u8> = Vec::new(); // the stream: written ++ pending
            let mut sent: Vec<u8> = Vec::new();
            let mut next = 0u8;
            let mut bytes = |n: u16| -> Vec<u8> {
                (0..n).map(|_| { next = next.wrapping_add(1); next }).collect()
            };
            for op in ops {
                match op {
                    Op::Own(n) => {
                        let b = bytes(n);
                        o.vec().extend_from_slice(&b);
                        want.extend_from_slice(&b);
                    }
                    Op::Shared(n) => {
                        let b = bytes(n);
                        want.extend_from_slice(&b);
                        o.push_shared(Bytes::from(b));
                    }
                    Op::Write(n) => {
                        let mut c: [&[u8]; 3] = [&[]; 3];
                        let k = o.chunks(&mut c);
                        let done = take_up_to(&c[..k], n as usize, &mut sent);
                        o.consume(done);
                    }
                    Op::Lend(n, own, shared) => {
                        let l = o.lend(Vec::new());
                        let mut c: [&[u8]; 8] = [&[]; 8];
                        let k = l.chunks(&mut c);
                        let done = take_up_to(&c[..k], n as usize, &mut sent);
                        let b = bytes(own);
                        o.vec().extend_from_slice(&b);
                        want.extend_from_slice(&b);
                        let b = bytes(shared);
                        want.extend_from_slice(&b);
                        o.push_shared(Bytes::from(b));
                        drop(o.unlend(l));
                        o.consume(done);
                    }
                    Op::Truncate(n) => {
                        let at = (o.written() + n as u64).min(o.end_offset());
                        prop_assert!(o.untouched_from(at));
                        o.truncate_at(at);
                        want.truncate(at as usize);
                    }
                }
                prop_assert_eq!(o.written() as usize, sent.len());
                prop_assert_eq!(o.end_offset() as usize, want.len());
                prop_assert_eq!(&want[..sent.len()], &sent[..]);
            }
            sent.extend_from_slice(&drain_all(&mut o));
            prop_assert_eq!(sent, want);
        }
    }
}
