//! Output buffer: bytes waiting to be written to one peer. The runtime writes from
//! [`OutBuf::pending`] and reports progress with [`OutBuf::consume`]; the allocation is kept
//! and reused, so a keep-alive connection does not allocate per request.

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
