//! HTTP/1.1 messages: head parsing and validation ([`head`]), body framing ([`body`]) and
//! serialization helpers ([`write`](mod@write)).

pub mod body;
pub mod head;
pub mod response;
pub(crate) mod server;
pub mod write;

pub use body::{BodyError, ChunkedDecoder};
pub use head::{
    parse_request, parse_response, HeaderSpan, Method, Parsed, RequestHead, ResponseHead, Span,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// How a message body is delimited (RFC 9112 section 6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    None,
    Length(u64),
    Chunked,
    /// Response only: the body runs until the backend closes the connection.
    UntilClose,
}

/// Limits on what a client may send.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest request head, request line and fields included (431 beyond).
    pub max_head: usize,
    /// Longest request target (414 beyond).
    pub max_uri: usize,
    /// Most header fields (431 beyond).
    pub max_headers: usize,
    /// Largest request body (413 beyond, also mid-stream for chunked bodies).
    pub max_body: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head: 16 * 1024,
            max_uri: 8 * 1024,
            max_headers: 100,
            max_body: 10 * 1024 * 1024,
        }
    }
}

#[cfg(test)]
mod tests;
