//! The client side of an HTTP/1.1 connection, as the server sees it: the bytes read from the
//! client and not yet parsed, the responses not yet written, the transport under both (TLS,
//! [`crate::transport`]), and what the connection's keep-alive and head timer depend on
//! (requests answered, half-close, drain, when the pending head started, the last I/O).
//!
//! The session ([`crate::proxy::Session`]) parses requests from `input` and
//! writes responses into `output`, both plaintext; the runtime reaches the
//! socket's side only through the session's methods, which land here: without a transport
//! they are the same buffers (no copy), with one the runtime reads into and writes from the
//! raw buffers and the transport converts between the two.

use std::time::{Duration, Instant};

use bytes::BytesMut;

use crate::buf::{BufPool, OutBuf};
use crate::proxy::READ_CHUNK;
use crate::transport::{Transport, TransportError};

pub(crate) struct ServerConn {
    /// Plaintext read from the client, not yet consumed by the parser.
    pub(crate) input: BytesMut,
    /// Plaintext to write to the client.
    pub(crate) output: OutBuf,
    /// The transport under the connection, with its raw buffers (none: plain TCP).
    layer: Option<Box<Layer>>,
    /// The last read from or write to the client.
    pub(crate) last_io: Instant,
    /// When the bytes of the head being received started arriving.
    pub(crate) head_started: Option<Instant>,
    /// Requests answered on this connection.
    pub(crate) requests_done: u32,
    /// The client closed its sending side.
    pub(crate) eof: bool,
    /// Graceful shutdown: the connection closes after the request in flight.
    pub(crate) draining: bool,
}

struct Layer {
    transport: Box<dyn Transport>,
    /// Bytes read from the socket, not yet taken by the transport.
    raw_in: BytesMut,
    /// Bytes for the socket.
    raw_out: OutBuf,
    /// [`Transport::close`] was called.
    closed: bool,
    /// [`Transport::receive`] failed: nothing more is read.
    failed: bool,
}

impl ServerConn {
    pub(crate) fn new(now: Instant) -> Self {
        ServerConn {
            input: BytesMut::new(),
            output: OutBuf::new(),
            layer: None,
            last_io: now,
            head_started: None,
            requests_done: 0,
            eof: false,
            draining: false,
        }
    }

    pub(crate) fn set_transport(&mut self, transport: Box<dyn Transport>) {
        self.layer = Some(Box::new(Layer {
            transport,
            raw_in: BytesMut::new(),
            raw_out: OutBuf::new(),
            closed: false,
            failed: false,
        }));
    }

    /// Where the runtime's next read goes (with room for [`READ_CHUNK`] bytes).
    pub(crate) fn reserve_read(&mut self) -> &mut BytesMut {
        let b = self.read_target();
        b.reserve(READ_CHUNK);
        b
    }

    /// Where bytes read from the socket go: the plaintext input, or the transport's.
    pub(crate) fn read_target(&mut self) -> &mut BytesMut {
        match self.layer.as_deref_mut() {
            Some(l) => &mut l.raw_in,
            None => &mut self.input,
        }
    }

    /// Bytes were read (into [`read_target`](Self::read_target)): the transport takes
    /// what it can into the plaintext input. An error closes the connection: the plaintext
    /// buffered is dropped and nothing more is read.
    pub(crate) fn received(&mut self, now: Instant) -> Result<(), TransportError> {
        self.last_io = now;
        let Some(l) = self.layer.as_deref_mut() else {
            return Ok(());
        };
        if l.failed {
            l.raw_in.clear();
            return Ok(());
        }
        // The first request's head timer runs from the first byte of the transport's
        // handshake, so a client trickling a handshake cannot hold the connection (plain
        // bytes start it when the parser sees a partial head).
        if self.requests_done == 0 && self.head_started.is_none() && !l.raw_in.is_empty() {
            self.head_started = Some(now);
        }
        // Room for what a read's worth of records carries (no regrowth per record).
        self.input.reserve(READ_CHUNK);
        let r = l
            .transport
            .receive(&mut l.raw_in, &mut self.input, l.raw_out.vec());
        if r.is_err() {
            l.failed = true;
            l.raw_in.clear();
            self.input.clear();
        }
        r
    }

    /// What the runtime writes next: the plaintext output, or (with a transport) the bytes
    /// it encodes the plaintext into, followed once `closing` by its closing bytes.
    #[inline]
    pub(crate) fn write_target(&mut self, closing: bool) -> &mut OutBuf {
        if self.layer.is_none() {
            return &mut self.output;
        }
        self.encode(closing)
    }

    /// The transport's part of [`write_target`](Self::write_target) (kept out of the plain
    /// path).
    #[inline(never)]
    fn encode(&mut self, closing: bool) -> &mut OutBuf {
        let Some(l) = self.layer.as_deref_mut() else {
            return &mut self.output;
        };
        if !self.output.is_empty() {
            l.transport.send(&mut self.output, l.raw_out.vec());
        }
        if closing && !l.closed {
            l.closed = true;
            l.transport.close(l.raw_out.vec());
        }
        &mut l.raw_out
    }

    /// Something waits to be written (`closing`: the connection closes after it, so a
    /// transport's closing bytes count).
    pub(crate) fn has_output(&self, closing: bool) -> bool {
        !self.output.is_empty()
            || self
                .layer
                .as_deref()
                .is_some_and(|l| !l.raw_out.is_empty() || (closing && !l.closed))
    }

    /// Bytes waiting to be written, plaintext and encoded (what flow control bounds).
    pub(crate) fn out_len(&self) -> usize {
        self.output.len() + self.layer.as_deref().map_or(0, |l| l.raw_out.len())
    }

    /// `n` bytes of the [`write_target`](Self::write_target) were written. False (and
    /// nothing consumed past the end) when that is more than was pending.
    pub(crate) fn written(&mut self, n: usize, now: Instant) -> bool {
        self.last_io = now;
        let out = match self.layer.as_deref_mut() {
            Some(l) => &mut l.raw_out,
            None => &mut self.output,
        };
        let ok = n <= out.len();
        out.consume(n.min(out.len()));
        ok
    }

    /// Drop everything waiting to be written.
    pub(crate) fn clear_output(&mut self) {
        self.output.clear();
        if let Some(l) = self.layer.as_deref_mut() {
            l.raw_out.clear();
        }
    }

    /// Nothing read is waiting to be parsed or decoded.
    pub(crate) fn input_is_empty(&self) -> bool {
        self.input.is_empty() && self.raw_in_is_empty()
    }

    /// The connection closes after the response to a request whose head is `head_len`
    /// bytes at the front of the input: the client asked (`keep_alive` false), a drain,
    /// the client's half-close with nothing sent after that head, or the per-connection
    /// request limit.
    pub(crate) fn closes_after(
        &self,
        head_len: usize,
        keep_alive: bool,
        max_requests: u32,
    ) -> bool {
        !keep_alive
            || self.draining
            || (self.eof && self.input.len() <= head_len && self.raw_in_is_empty())
            || self.requests_done + 1 >= max_requests
    }

    fn raw_in_is_empty(&self) -> bool {
        self.layer.as_deref().is_none_or(|l| l.raw_in.is_empty())
    }

    /// When the head timer fires: `header_timeout` after the head started arriving (or, on
    /// a new connection, after it opened), `keep_alive_timeout` after the last answer.
    pub(crate) fn head_deadline(&self, header: Duration, keep_alive: Duration) -> Instant {
        match self.head_started {
            Some(s) => s + header,
            None if self.requests_done == 0 => self.last_io + header,
            None => self.last_io + keep_alive,
        }
    }

    /// Nothing is buffered either way, so the buffers may go back to the pool. Shared body
    /// bytes still in a write (lent to io_uring) hold part of the read buffer: parked then,
    /// it would go back to the pool cut short and the next read would allocate.
    pub(crate) fn can_park(&self) -> bool {
        self.input_is_empty() && !self.has_output(false) && !self.output.has_shared()
    }

    /// Take buffers from `pool` for those given back by [`give_back`](Self::give_back).
    pub(crate) fn unpark(&mut self, pool: &mut BufPool) {
        if self.input.capacity() == 0 {
            self.input = pool.read_buf(READ_CHUNK);
        }
        if self.output.capacity() == 0 {
            self.output.set_vec(pool.out_buf());
        }
        if let Some(l) = self.layer.as_deref_mut() {
            if l.raw_in.capacity() == 0 {
                l.raw_in = pool.read_buf(READ_CHUNK);
            }
            if l.raw_out.capacity() == 0 {
                l.raw_out.set_vec(pool.out_buf());
            }
        }
    }

    /// Return every buffer to `pool`.
    pub(crate) fn give_back(&mut self, pool: &mut BufPool) {
        pool.put_read(std::mem::take(&mut self.input));
        pool.put_out(self.output.take_vec());
        if let Some(l) = self.layer.as_deref_mut() {
            pool.put_read(std::mem::take(&mut l.raw_in));
            pool.put_out(l.raw_out.take_vec());
        }
    }
}
