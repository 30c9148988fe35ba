//! Reading one response off an upstream HTTP/1.1 connection: the head (interim `1xx`
//! responses are handed out on the way), the body de-framed into a [`BodySink`], and whether
//! the connection may carry another request afterwards. Bytes in, body pieces out; the caller
//! owns the read buffer and every decision about what the response means.
//!
//! ```text
//! head ──(interim: skip_interim)──> head ──start_body──> body ──read_body / on_eof──> done
//! ```
//!
//! The session (`proxy`) drives one reader per exchange; a later HTTP/2 upstream is another
//! reader behind the same sink.

use super::body::{BodyError, Chunk, ChunkedDecoder};
use super::head::{parse_response, Parsed, ResponseHead};
use super::BodyKind;
use crate::error::HttpError;
use bytes::{Buf, Bytes, BytesMut};

/// Largest response head accepted from a backend (502 beyond).
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Where de-framed body bytes go: the response pipeline's first stage
/// ([`crate::respond`]).
pub trait BodySink {
    /// Body bytes split off the read buffer: they can be written without a copy.
    fn shared(&mut self, b: Bytes);
    /// Body bytes still in the read buffer (a stage that keeps them copies them).
    fn copy(&mut self, d: &[u8]);
    /// The body is complete (not called when it breaks off).
    fn end(&mut self);
}

#[derive(Debug)]
enum Framing {
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
}

#[derive(Debug)]
enum State {
    Head,
    Body(Framing),
    Done,
}

/// One response read off a backend connection (see the [module docs](self)).
#[derive(Debug)]
pub struct ResponseReader {
    state: State,
    /// The backend announced it closes the connection after this response.
    close: bool,
    /// The body ran until the backend closed the connection.
    closed_by_peer: bool,
}

impl Default for ResponseReader {
    fn default() -> Self {
        Self::new()
    }
}

impl ResponseReader {
    /// A reader waiting for a response head.
    pub fn new() -> Self {
        ResponseReader {
            state: State::Head,
            close: false,
            closed_by_peer: false,
        }
    }

    /// A reader with nothing (more) to read.
    pub fn done() -> Self {
        ResponseReader {
            state: State::Done,
            close: false,
            closed_by_peer: false,
        }
    }

    /// Waiting for the (final) response head.
    #[inline]
    pub fn awaiting_head(&self) -> bool {
        matches!(self.state, State::Head)
    }

    /// Reading the body.
    #[inline]
    pub fn in_body(&self) -> bool {
        matches!(self.state, State::Body(_))
    }

    /// The response was read whole.
    #[inline]
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// The body runs until the backend closes the connection.
    pub fn until_close(&self) -> bool {
        matches!(self.state, State::Body(Framing::UntilClose))
    }

    /// Parse the next head in `buf` (final or interim); nothing is consumed. Errors are the
    /// backend's fault (502).
    #[inline]
    pub fn head(&self, buf: &[u8]) -> Result<Parsed<ResponseHead>, HttpError> {
        debug_assert!(self.awaiting_head(), "response head read out of turn");
        parse_response(buf, MAX_RESPONSE_HEAD)
    }

    /// Consume interim response `h` (`1xx`); the final head follows.
    #[inline]
    pub fn skip_interim(&mut self, buf: &mut BytesMut, h: &ResponseHead) {
        debug_assert!((100..200).contains(&h.status) && h.status != 101);
        buf.advance(h.len);
    }

    /// Consume final head `h` and read the body framed as it says, or none when the request
    /// admits none (`no_body`: HEAD, 204, 304). Returns the body's framing on the wire
    /// ([`BodyKind::None`] when the response is already complete).
    #[inline]
    pub fn start_body(&mut self, buf: &mut BytesMut, h: &ResponseHead, no_body: bool) -> BodyKind {
        buf.advance(h.len);
        self.close = h.close;
        let kind = if no_body { BodyKind::None } else { h.body };
        self.state = match kind {
            BodyKind::None | BodyKind::Length(0) => State::Done,
            BodyKind::Length(n) => State::Body(Framing::Length(n)),
            BodyKind::Chunked => State::Body(Framing::Chunked(ChunkedDecoder::new())),
            BodyKind::UntilClose => State::Body(Framing::UntilClose),
        };
        match kind {
            BodyKind::Length(0) => BodyKind::None,
            k => k,
        }
    }

    /// De-frame what `buf` holds of the body into `sink`; true once the body is complete
    /// (the sink's `end` was called). A body delimited by length is split off the buffer
    /// ([`BodySink::shared`]); chunk data and bodies read until close are handed out in
    /// place ([`BodySink::copy`]) and consumed.
    #[inline]
    pub fn read_body(
        &mut self,
        buf: &mut BytesMut,
        sink: &mut impl BodySink,
    ) -> Result<bool, BodyError> {
        let State::Body(framing) = &mut self.state else {
            return Ok(self.is_done());
        };
        let complete = match framing {
            Framing::Length(rem) => {
                let n = (*rem).min(buf.len() as u64) as usize;
                if n > 0 {
                    sink.shared(buf.split_to(n).freeze());
                }
                *rem -= n as u64;
                *rem == 0
            }
            Framing::UntilClose => {
                if !buf.is_empty() {
                    sink.copy(buf);
                    buf.clear();
                }
                false
            }
            Framing::Chunked(dec) => {
                let mut pos = 0;
                let mut complete = false;
                while pos < buf.len() {
                    let (used, chunk) = dec.decode(&buf[pos..])?;
                    match chunk {
                        Some(Chunk::Data(r)) => sink.copy(&buf[pos + r.start..pos + r.end]),
                        Some(Chunk::End) => complete = true,
                        None => {}
                    }
                    pos += used;
                    if complete || used == 0 {
                        break;
                    }
                }
                buf.advance(pos);
                complete
            }
        };
        if complete {
            self.state = State::Done;
            sink.end();
        }
        Ok(complete)
    }

    /// The backend closed the connection: true when that completes the body (one read
    /// until close; the sink's `end` was called), false when it breaks the response off.
    pub fn on_eof(&mut self, sink: &mut impl BodySink) -> bool {
        match self.state {
            State::Body(Framing::UntilClose) => {
                self.state = State::Done;
                self.closed_by_peer = true;
                sink.end();
                true
            }
            State::Done => true,
            _ => false,
        }
    }

    /// After a complete response: whether the connection may carry another request. Not
    /// when the backend announced a close or closed it, nor when bytes follow the response
    /// (`leftover`: the backend broke framing).
    #[inline]
    pub fn reusable(&self, leftover: &[u8]) -> bool {
        self.is_done() && !self.close && !self.closed_by_peer && leftover.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default, Debug, PartialEq)]
    struct Got {
        body: Vec<u8>,
        shared: usize,
        ended: u32,
    }
    impl BodySink for Got {
        fn shared(&mut self, b: Bytes) {
            self.shared += 1;
            self.body.extend_from_slice(&b);
        }
        fn copy(&mut self, d: &[u8]) {
            self.body.extend_from_slice(d);
        }
        fn end(&mut self) {
            self.ended += 1;
        }
    }

    /// Feed `wire` in pieces of `step` bytes; returns the body, whether it completed, the
    /// leftover bytes and the reader.
    fn read(wire: &[u8], step: usize, no_body: bool) -> (Got, bool, Vec<u8>, ResponseReader) {
        let mut r = ResponseReader::new();
        let mut buf = BytesMut::new();
        let mut got = Got::default();
        let mut complete = false;
        for piece in wire.chunks(step.max(1)) {
            buf.extend_from_slice(piece);
            while r.awaiting_head() {
                match r.head(&buf).unwrap() {
                    Parsed::Partial => break,
                    Parsed::Complete(h) if (100..200).contains(&h.status) => {
                        r.skip_interim(&mut buf, &h)
                    }
                    Parsed::Complete(h) => {
                        if r.start_body(&mut buf, &h, no_body) == BodyKind::None {
                            complete = true;
                        }
                    }
                }
            }
            if r.in_body() {
                complete |= r.read_body(&mut buf, &mut got).unwrap();
            }
        }
        (got, complete, buf.to_vec(), r)
    }

    #[test]
    fn length_body_is_split_off_and_reuse_follows_the_close_flag() {
        let wire = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        for step in [1, 3, wire.len()] {
            let (got, complete, left, r) = read(wire, step, false);
            assert!(complete);
            assert_eq!(got.body, b"hello");
            assert_eq!(got.ended, 1);
            assert!(left.is_empty());
            assert!(r.reusable(&left));
        }
        let wire = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi";
        let (_, complete, left, r) = read(wire, 100, false);
        assert!(complete && !r.reusable(&left));
    }

    #[test]
    fn bytes_after_the_response_forbid_reuse() {
        let wire = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhiEXTRA";
        let (got, complete, left, r) = read(wire, 100, false);
        assert!(complete);
        assert_eq!(got.body, b"hi");
        assert_eq!(left, b"EXTRA");
        assert!(!r.reusable(&left));
    }

    #[test]
    fn chunked_body_is_decoded_in_any_split() {
        let wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3;x=y\r\n ab\r\n0\r\nT: v\r\n\r\n";
        for step in 1..wire.len() {
            let (got, complete, left, r) = read(wire, step, false);
            assert!(complete, "step {step}");
            assert_eq!(got.body, b"hello ab", "step {step}");
            assert_eq!((got.ended, got.shared), (1, 0));
            assert!(r.reusable(&left));
        }
    }

    #[test]
    fn broken_chunk_is_an_error() {
        let mut r = ResponseReader::new();
        let mut buf =
            BytesMut::from(&b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"[..]);
        let Parsed::Complete(h) = r.head(&buf).unwrap() else {
            panic!()
        };
        r.start_body(&mut buf, &h, false);
        assert!(r.read_body(&mut buf, &mut Got::default()).is_err());
        assert!(!r.is_done());
    }

    #[test]
    fn interim_responses_are_skipped_to_the_final_head() {
        let wire = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx";
        for step in [1, 5, wire.len()] {
            let (got, complete, left, r) = read(wire, step, false);
            assert!(
                complete && got.body == b"x" && r.reusable(&left),
                "step {step}"
            );
        }
        let mut r = ResponseReader::new();
        let mut buf = BytesMut::from(&wire[..]);
        let mut interim = vec![];
        loop {
            let Parsed::Complete(h) = r.head(&buf).unwrap() else {
                panic!()
            };
            if (100..200).contains(&h.status) {
                interim.push(h.status);
                r.skip_interim(&mut buf, &h);
                continue;
            }
            assert_eq!(h.status, 200);
            assert_eq!(r.start_body(&mut buf, &h, false), BodyKind::Length(1));
            break;
        }
        assert_eq!(interim, [100, 103]);
        let mut got = Got::default();
        assert!(r.read_body(&mut buf, &mut got).unwrap());
        assert_eq!(got.body, b"x");
    }

    #[test]
    fn no_body_responses_complete_at_the_head() {
        let wire = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n";
        let (got, complete, left, r) = read(wire, 7, true);
        assert!(complete && got.body.is_empty() && got.ended == 0);
        assert!(r.reusable(&left));
    }

    #[test]
    fn body_until_close_ends_at_eof_and_never_reuses() {
        let wire = b"HTTP/1.1 200 OK\r\n\r\nabc";
        let (mut got, complete, left, mut r) = read(wire, 4, false);
        assert!(!complete && r.until_close());
        assert_eq!(got.body, b"abc");
        assert!(r.on_eof(&mut got));
        assert_eq!(got.ended, 1);
        assert!(r.is_done() && !r.reusable(&left));
        // A length-delimited body cut short by the close is broken.
        let (mut got, complete, _, mut r) = read(
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc",
            100,
            false,
        );
        assert!(!complete);
        assert!(!r.on_eof(&mut got));
        assert_eq!(got.ended, 0);
    }
}
