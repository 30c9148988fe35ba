//! Buffers. [`OutBuf`]: bytes waiting to be written to one peer; the runtime writes from
//! [`OutBuf::pending`] (or both of [`OutBuf::pending_parts`] with one vectored write) and
//! reports progress with [`OutBuf::consume`]. [`BufPool`]: a worker's
//! free buffers, lent to a session while a request is in flight and taken back when it goes
//! idle, so an idle keep-alive connection holds no buffer and a busy one allocates none.

use bytes::{Buf, Bytes, BytesMut};

/// First allocation of an output buffer: a response head plus a small body.
pub const INITIAL_CAPACITY: usize = 4096;

/// Bodies at least this long are written from the read buffer they arrived in
/// ([`OutBuf::push_shared`]) instead of being copied.
pub const SHARE_MIN: usize = 2048;

#[derive(Debug, Default)]
pub struct OutBuf {
    buf: Vec<u8>,
    pos: usize,
    /// Bytes shared with a read buffer, written after `buf`'s pending bytes (not copied).
    shared: Option<Bytes>,
    /// Bytes written (consumed) over the buffer's life: with [`len`](Self::len), where in
    /// the stream a message starts, to tell later whether any of it went out.
    written: u64,
    /// Pending bytes out on a lend (in a write in flight; not in `buf` meanwhile).
    lent: usize,
    /// The shared bytes are out on a lend ([`lend`](Self::lend)):
    /// no other may be queued until they are back.
    lent_shared: bool,
}

impl OutBuf {
    pub fn new() -> Self {
        OutBuf {
            buf: Vec::new(),
            pos: 0,
            shared: None,
            written: 0,
            lent: 0,
            lent_shared: false,
        }
    }
    /// The next bytes to write, contiguous: the owned ones first, then the shared ones.
    #[inline]
    pub fn pending(&self) -> &[u8] {
        if self.pos < self.buf.len() {
            &self.buf[self.pos..]
        } else {
            self.shared.as_deref().unwrap_or(&[])
        }
    }
    /// Everything pending, in order, for one vectored write.
    #[inline]
    pub fn pending_parts(&self) -> (&[u8], &[u8]) {
        (&self.buf[self.pos..], self.shared.as_deref().unwrap_or(&[]))
    }
    #[inline]
    pub fn len(&self) -> usize {
        self.buf.len() - self.pos + self.shared.as_ref().map_or(0, Bytes::len)
    }
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Shared bytes wait to be written (their read buffer is not to be reused yet).
    #[inline]
    pub fn has_shared(&self) -> bool {
        self.shared.is_some() || self.lent_shared
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
        let keep = at.saturating_sub(self.written + self.lent as u64) as usize;
        let own = self.buf.len() - self.pos;
        if keep <= own {
            self.buf.truncate(self.pos + keep);
            self.shared = None;
        } else if let Some(s) = self.shared.as_mut() {
            s.truncate(keep - own);
        }
    }

    /// `n` bytes of [`pending_parts`](Self::pending_parts) were written.
    pub fn consume(&mut self, n: usize) {
        self.written += n as u64;
        let own = self.buf.len() - self.pos;
        self.pos += n.min(own);
        if n > own {
            if let Some(s) = self.shared.as_mut() {
                s.advance((n - own).min(s.len()));
            }
        }
        if self.shared.as_ref().is_some_and(|s| s.is_empty()) {
            self.shared = None;
        }
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
    }
    pub fn clear(&mut self) {
        self.buf.clear();
        self.pos = 0;
        self.shared = None;
    }
    /// Queue `b` (a slice of a read buffer) to be written after what is pending, without
    /// copying it when it is long and nothing else is shared already.
    pub fn push_shared(&mut self, b: Bytes) {
        if self.shared.is_some() || b.len() < SHARE_MIN {
            self.vec().extend_from_slice(&b);
        } else {
            self.shared = Some(b);
        }
    }
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }
    /// Hand the (emptied) allocation back, leaving none.
    pub fn take_vec(&mut self) -> Vec<u8> {
        self.pos = 0;
        self.shared = None;
        let mut v = std::mem::take(&mut self.buf);
        v.clear();
        v
    }
    /// Take back a lent owned buffer: its bytes from `pos` come first again, before
    /// anything appended while it was away. Returns the spare, emptied, for the pool.
    fn unlend_owned(&mut self, mut lent: Vec<u8>, mut pos: usize) -> Vec<u8> {
        self.lent = 0;
        let own = &self.buf[self.pos..];
        // Drop the bytes written before the lend when appending would grow the allocation
        // (as `vec` does): a peer that keeps taking part of each write would otherwise
        // have every byte ever sent kept in front of `pos`. Offsets of the write reported
        // next count from `pos`, so they hold.
        if pos > 0 && lent.len() + own.len() > lent.capacity() {
            lent.drain(..pos.min(lent.len()));
            pos = 0;
        }
        lent.extend_from_slice(own);
        let mut spare = std::mem::replace(&mut self.buf, lent);
        self.pos = pos.min(self.buf.len());
        spare.clear();
        spare
    }

    /// For writes that own what they write (io_uring), without copying shared bytes: hand
    /// over the allocation with the pending owned bytes (from the returned offset) and the
    /// shared bytes that follow them, for one vectored write; `spare` takes the allocation's
    /// place for bytes appended meanwhile. Give both back with
    /// [`unlend`](Self::unlend) before reporting how much was written. While they are out,
    /// [`has_shared`](Self::has_shared) stays true.
    pub fn lend(&mut self, mut spare: Vec<u8>) -> (Vec<u8>, usize, Option<Bytes>) {
        spare.clear();
        let shared = self.shared.take();
        let pos = std::mem::replace(&mut self.pos, 0);
        self.lent = self.buf.len() - pos + shared.as_ref().map_or(0, Bytes::len);
        self.lent_shared = shared.is_some();
        (std::mem::replace(&mut self.buf, spare), pos, shared)
    }

    /// Take back what [`lend`](Self::lend) lent: the owned bytes
    /// from `pos`, then the shared ones, then anything appended meanwhile (the shared bytes
    /// are copied only in that case, to keep the order). Returns the spare, emptied.
    pub fn unlend(&mut self, lent: Vec<u8>, pos: usize, shared: Option<Bytes>) -> Vec<u8> {
        self.lent_shared = false;
        let Some(sh) = shared else {
            return self.unlend_owned(lent, pos);
        };
        if self.pos == self.buf.len() {
            let spare = self.unlend_owned(lent, pos);
            self.shared = Some(sh);
            return spare;
        }
        self.lent = 0;
        let mut v = lent;
        v.drain(..pos.min(v.len()));
        v.extend_from_slice(&sh);
        v.extend_from_slice(&self.buf[self.pos..]);
        let mut spare = std::mem::replace(&mut self.buf, v);
        self.pos = 0;
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
    /// Copy the shared bytes into the owned buffer (so that bytes appended next follow
    /// them).
    fn own_shared(&mut self) {
        if let Some(s) = self.shared.take() {
            self.vec().extend_from_slice(&s);
        }
    }

    /// Append space for writing (after any shared bytes, which are copied in first).
    /// Compacts consumed bytes first when that avoids growth.
    #[inline]
    pub fn vec(&mut self) -> &mut Vec<u8> {
        if self.shared.is_some() {
            self.own_shared();
        }
        if self.buf.capacity() == 0 {
            // One allocation up front instead of a string of small regrowths per connection.
            self.buf.reserve(INITIAL_CAPACITY);
        }
        if self.pos > 0 && self.buf.len() + 4096 > self.buf.capacity() {
            self.buf.drain(..self.pos);
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

    /// A peer that takes part of every write while more keeps coming (io_uring lends the
    /// buffer each time): the allocation stays bounded by what is pending, not by what was
    /// ever sent (it grew to everything streamed, 64 MiB in a black-box test under load).
    #[test]
    fn stream_offsets_tell_whether_a_message_went_out_even_across_a_lend() {
        let mut o = OutBuf::new();
        o.vec().extend_from_slice(b"first");
        let (lent, pos, sh) = o.lend(Vec::new());
        // While "first" is in a write in flight, a second message is queued.
        let at = o.end_offset();
        assert_eq!(at, 5);
        o.vec().extend_from_slice(b"second");
        assert!(o.untouched_from(at));
        assert!(!o.untouched_from(2), "lent bytes may be on the wire");
        let spare = o.unlend(lent, pos, sh);
        drop(spare);
        o.consume(3);
        assert!(o.untouched_from(at));
        o.truncate_at(at);
        assert_eq!(o.pending(), b"st", "the first message's rest stays");
        o.vec().extend_from_slice(b"third");
        o.consume(4);
        assert!(!o.untouched_from(at), "part of what followed went out");
        assert_eq!(o.written(), 7);
    }

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
            let (v, pos, sh) = o.lend(Vec::new());
            // While the write flies, the session appends (flow control keeps the total
            // pending near 64 KiB).
            fill(&mut o, 24 * 1024);
            // Half of what was lent got written.
            let n = (v.len() - pos) / 2;
            sent.extend_from_slice(&v[pos..pos + n]);
            let _spare = o.unlend(v, pos, sh);
            o.consume(n);
            assert!(o.capacity() <= 512 * 1024, "capacity {}", o.capacity());
        }
        sent.extend_from_slice(o.pending());
        assert!(
            sent.iter().enumerate().all(|(i, &b)| b == i as u8),
            "bytes in order"
        );
    }

    /// io_uring, vectored: the shared body goes out with the owned bytes before it, neither
    /// copied; bytes appended meanwhile follow it, whatever part of the write went out.
    #[test]
    fn lent_shared_bytes_come_back_in_order_uncopied() {
        for written in [0usize, 2, 4, 10, 4 + 3000] {
            for append in [false, true] {
                let body = Bytes::from(vec![b'b'; 3000]);
                let mut o = OutBuf::new();
                o.vec().extend_from_slice(b"head");
                o.push_shared(body.clone());
                let (v, pos, sh) = o.lend(Vec::new());
                assert_eq!(&v[pos..], b"head");
                let sh = sh.expect("the body, lent");
                assert_eq!(sh.as_ptr(), body.as_ptr(), "not copied");
                assert!(o.has_shared(), "no other body may queue meanwhile");
                assert_eq!(o.end_offset(), 3004);
                if append {
                    o.vec().extend_from_slice(b"next");
                }
                let spare = o.unlend(v, pos, Some(sh));
                assert!(spare.is_empty());
                o.consume(written);
                let mut rest = Vec::new();
                while !o.is_empty() {
                    let (a, b) = o.pending_parts();
                    rest.extend_from_slice(a);
                    rest.extend_from_slice(b);
                    let n = a.len() + b.len();
                    o.consume(n);
                }
                let mut all = b"head".to_vec();
                all.extend_from_slice(&body);
                if append {
                    all.extend_from_slice(b"next");
                }
                assert_eq!(rest, all[written..], "written {written}, append {append}");
                assert_eq!(o.written() as usize, all.len());
            }
        }
    }

    #[test]
    fn shared_bytes_follow_owned_ones_and_appends_follow_them() {
        let body = Bytes::from(vec![b'b'; SHARE_MIN]);
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
        // Appending copies the shared rest in first: the order stays.
        o.vec().extend_from_slice(b"tail");
        assert!(!o.has_shared());
        assert_eq!(&o.pending()[o.len() - 4..], b"tail");
        assert_eq!(o.len(), SHARE_MIN - 2 + 4);
        o.consume(o.len());
        assert!(o.is_empty() && !o.has_shared());
        // Short bodies are copied; a lend hands the shared bytes over beside the owned ones.
        o.push_shared(Bytes::from_static(b"short"));
        assert!(!o.has_shared());
        o.clear();
        o.vec().extend_from_slice(b"h");
        o.push_shared(body.clone());
        let (lent, pos, sh) = o.lend(Vec::new());
        assert_eq!(lent.len() - pos, 1);
        assert_eq!(
            sh.as_ref().map(|b| b.as_ptr()),
            Some(body.as_ptr()),
            "not copied"
        );
        assert!(o.is_empty());
        o.unlend(lent, pos, sh);
        assert_eq!(o.len(), 1 + SHARE_MIN);
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
        let (lent, pos, sh) = o.lend(Vec::with_capacity(64));
        assert_eq!(&lent[pos..], b"hello ");
        assert!(o.is_empty());
        o.vec().extend_from_slice(b"world");
        let spare = o.unlend(lent, pos, sh);
        assert!(spare.is_empty() && spare.capacity() >= 64);
        assert_eq!(o.pending(), b"hello world");
        o.consume(6); // the lent write sent "hello "
        assert_eq!(o.pending(), b"world");

        // Nothing appended meanwhile: the same allocation comes back.
        let mut o = OutBuf::new();
        o.vec().extend_from_slice(b"abc");
        let (lent, pos, sh) = o.lend(Vec::new());
        let ptr = lent.as_ptr();
        o.unlend(lent, pos, sh);
        assert_eq!(o.pending().as_ptr(), ptr);
        assert_eq!(o.pending(), b"abc");
    }
}
