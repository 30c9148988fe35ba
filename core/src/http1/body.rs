//! Body framing: a strict, incremental chunked decoder. Data comes out as ranges of the
//! input so the caller can forward it without an intermediate copy.

use std::ops::Range;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyError {
    /// Malformed chunk framing (bad size, missing CRLF, bare CR, control bytes).
    Invalid(&'static str),
    /// The chunk size overflowed or the extension / trailer section is too large.
    TooLarge(&'static str),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Invalid(w) | BodyError::TooLarge(w) => f.write_str(w),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Reading hex digits of a chunk size (at least one).
    Size,
    /// In a chunk extension, until CR.
    Ext,
    /// Expect LF after the size line's CR.
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final CRLF).
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

/// What one decode step produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Chunk {
    /// Body data at this range of the input.
    Data(Range<usize>),
    /// The terminating chunk and trailer section were read; the body is complete.
    End,
}

/// Incremental decoder for `Transfer-Encoding: chunked` (RFC 9112 section 7.1).
///
/// Strict: sizes are 1-16 hex digits, lines end in CRLF, extensions may not contain CR, LF
/// or NUL, and the extension and trailer sections are bounded. Trailer fields are validated
/// and dropped (the proxy re-frames the body and does not forward trailers).
#[derive(Clone, Debug)]
pub struct ChunkedDecoder {
    state: State,
    size_digits: u8,
    remaining: u64,
    ext_len: usize,
    trailer_len: usize,
    /// Total data bytes decoded so far.
    pub decoded: u64,
}

const MAX_EXT: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        ChunkedDecoder {
            state: State::Size,
            size_digits: 0,
            remaining: 0,
            ext_len: 0,
            trailer_len: 0,
            decoded: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decode from `input`. Returns how many bytes were consumed and what they yielded
    /// (`None` when the input was consumed without completing a data range or the end).
    /// Call again with the rest of the input until it returns 0 consumed and `None`.
    pub fn decode(&mut self, input: &[u8]) -> Result<(usize, Option<Chunk>), BodyError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Size => {
                    if let Some(d) = hex(b) {
                        if self.size_digits >= 16 {
                            return Err(BodyError::TooLarge("chunk size overflow"));
                        }
                        self.remaining = (self.remaining << 4) | d as u64;
                        self.size_digits += 1;
                        i += 1;
                    } else if self.size_digits == 0 {
                        return Err(BodyError::Invalid("invalid chunk size"));
                    } else if b == b';' {
                        self.state = State::Ext;
                        self.ext_len = 0;
                        i += 1;
                    } else if b == b'\r' {
                        self.state = State::SizeLf;
                        i += 1;
                    } else {
                        return Err(BodyError::Invalid("invalid chunk size"));
                    }
                }
                State::Ext => {
                    if b == b'\r' {
                        self.state = State::SizeLf;
                    } else if b == b'\n' || b == 0 || (b < 0x20 && b != b'\t') || b == 0x7f {
                        return Err(BodyError::Invalid("invalid chunk extension"));
                    } else {
                        self.ext_len += 1;
                        if self.ext_len > MAX_EXT {
                            return Err(BodyError::TooLarge("chunk extension too long"));
                        }
                    }
                    i += 1;
                }
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(BodyError::Invalid("bare CR in chunk size line"));
                    }
                    i += 1;
                    self.size_digits = 0;
                    if self.remaining == 0 {
                        self.state = State::TrailerStart;
                    } else {
                        self.state = State::Data;
                    }
                }
                State::Data => {
                    let avail = (input.len() - i) as u64;
                    let take = avail.min(self.remaining) as usize;
                    self.remaining -= take as u64;
                    self.decoded += take as u64;
                    if self.remaining == 0 {
                        self.state = State::DataCr;
                    }
                    return Ok((i + take, Some(Chunk::Data(i..i + take))));
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(BodyError::Invalid("missing CRLF after chunk data"));
                    }
                    self.state = State::DataLf;
                    i += 1;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(BodyError::Invalid("missing CRLF after chunk data"));
                    }
                    self.state = State::Size;
                    i += 1;
                }
                State::TrailerStart => {
                    if b == b'\r' {
                        self.state = State::EndLf;
                    } else {
                        if !crate::http1::head::is_tchar(b) {
                            return Err(BodyError::Invalid("invalid trailer field"));
                        }
                        self.state = State::TrailerLine;
                        self.trailer_len += 1;
                    }
                    i += 1;
                }
                State::TrailerLine => {
                    if b == b'\r' {
                        self.state = State::TrailerLf;
                    } else if b == b'\n' || b == 0 || (b < 0x20 && b != b'\t') || b == 0x7f {
                        return Err(BodyError::Invalid("invalid trailer field"));
                    }
                    self.trailer_len += 1;
                    if self.trailer_len > MAX_TRAILERS {
                        return Err(BodyError::TooLarge("trailer section too large"));
                    }
                    i += 1;
                }
                State::TrailerLf => {
                    if b != b'\n' {
                        return Err(BodyError::Invalid("bare CR in trailer section"));
                    }
                    self.state = State::TrailerStart;
                    i += 1;
                }
                State::EndLf => {
                    if b != b'\n' {
                        return Err(BodyError::Invalid("bare CR after last chunk"));
                    }
                    self.state = State::Done;
                    return Ok((i + 1, Some(Chunk::End)));
                }
                State::Done => return Ok((i, None)),
            }
        }
        Ok((i, None))
    }
}

use super::head::hex_val as hex;
