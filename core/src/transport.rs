//! What may sit between a client's socket and the HTTP/1.1 connection that reads it: a
//! [`Transport`] (TLS is the one to come). Sans-IO like the rest of core: the runtime reads
//! the socket into the connection's raw input and writes its raw output, and the transport
//! turns one into plaintext requests and plaintext responses into the other, through
//! the client connection (`http1::server::ServerConn`). Without one (plain TCP) the runtime reads and writes
//! the plaintext buffers themselves, with no copy and no call.

use bytes::BytesMut;

use crate::buf::OutBuf;

/// The transport failed (a record that does not decrypt, a handshake that cannot complete):
/// the connection is closed after what [`Transport::close`] writes (an alert).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransportError(pub &'static str);

impl std::fmt::Display for TransportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for TransportError {}

/// A byte transport under one client connection.
pub trait Transport: Send {
    /// Take what can be taken of `raw` (bytes read from the socket, consumed from the front
    /// as they are used; a partial record stays for the next read), appending the plaintext
    /// it carries to `plain` and any bytes to send back at once (a handshake's) to `out`.
    fn receive(
        &mut self,
        raw: &mut BytesMut,
        plain: &mut BytesMut,
        out: &mut Vec<u8>,
    ) -> Result<(), TransportError>;

    /// Encode every pending byte of `plain` (consumed as taken) into `out`.
    fn send(&mut self, plain: &mut OutBuf, out: &mut Vec<u8>);

    /// The connection closes once its output is written: the transport's last bytes (a TLS
    /// `close_notify`, or the alert after [`receive`](Self::receive) failed). Called once.
    fn close(&mut self, out: &mut Vec<u8>);
}
