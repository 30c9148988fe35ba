//! Buffers. [`OutBuf`]: bytes waiting to be written to one peer; the runtime writes from
//! [`OutBuf::pending`] and reports progress with [`OutBuf::consume`]. [`BufPool`]: a worker's
//! free buffers, lent to a session while a request is in flight and taken back when it goes
//! idle, so an idle keep-alive connection holds no buffer and a busy one allocates none.

use bytes::BytesMut;

/// First allocation of an output buffer: a response head plus a small body.
pub const INITIAL_CAPACITY: usize = 4096;

#[derive(Debug, Default)]
pub struct OutBuf {
    buf: Vec<u8>,
    pos: usize,
}

impl OutBuf {
    pub fn new() -> Self {
        OutBuf {
            buf: Vec::new(),
            pos: 0,
        }
    }
    #[inline]
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.pos..]
    }
    #[inline]
    pub fn len(&self) -> usize {
        self.buf.len() - self.pos
    }
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.pos == self.buf.len()
    }
    /// `n` bytes of [`pending`](Self::pending) were written.
    pub fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.buf.len());
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
    }
    pub fn clear(&mut self) {
        self.buf.clear();
        self.pos = 0;
    }
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }
    /// Hand the (emptied) allocation back, leaving none.
    pub fn take_vec(&mut self) -> Vec<u8> {
        self.pos = 0;
        let mut v = std::mem::take(&mut self.buf);
        v.clear();
        v
    }
    /// For writes that must own their buffer while in flight (io_uring): hand over the
    /// allocation with the pending bytes (they start at the returned offset) and put
    /// `spare` in its place for bytes appended meanwhile. Give it back with
    /// [`unlend`](Self::unlend) before reporting how much was written.
    pub fn lend(&mut self, mut spare: Vec<u8>) -> (Vec<u8>, usize) {
        spare.clear();
        let pos = std::mem::replace(&mut self.pos, 0);
        (std::mem::replace(&mut self.buf, spare), pos)
    }

    /// Take back a lent buffer: its bytes from `pos` come first again, before anything
    /// appended while it was away. Returns the spare, emptied, for the pool.
    pub fn unlend(&mut self, mut lent: Vec<u8>, pos: usize) -> Vec<u8> {
        if !self.is_empty() {
            lent.extend_from_slice(self.pending());
        }
        let mut spare = std::mem::replace(&mut self.buf, lent);
        self.pos = pos.min(self.buf.len());
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
    /// Append space for writing. Compacts consumed bytes first when that avoids growth.
    #[inline]
    pub fn vec(&mut self) -> &mut Vec<u8> {
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

    #[test]
    fn lent_bytes_come_back_before_bytes_appended_meanwhile() {
        let mut o = OutBuf::new();
        o.vec().extend_from_slice(b"xxhello ");
        o.consume(2);
        let (lent, pos) = o.lend(Vec::with_capacity(64));
        assert_eq!(&lent[pos..], b"hello ");
        assert!(o.is_empty());
        o.vec().extend_from_slice(b"world");
        let spare = o.unlend(lent, pos);
        assert!(spare.is_empty() && spare.capacity() >= 64);
        assert_eq!(o.pending(), b"hello world");
        o.consume(6); // the lent write sent "hello "
        assert_eq!(o.pending(), b"world");

        // Nothing appended meanwhile: the same allocation comes back.
        let mut o = OutBuf::new();
        o.vec().extend_from_slice(b"abc");
        let (lent, pos) = o.lend(Vec::new());
        let ptr = lent.as_ptr();
        o.unlend(lent, pos);
        assert_eq!(o.pending().as_ptr(), ptr);
        assert_eq!(o.pending(), b"abc");
    }
}
