//! TLS termination as a [`Transport`] under the client connection, sans-IO: the runtime
//! moves ciphertext exactly as it moves plain TCP bytes, and rustls's unbuffered-by-the-
//! caller connection API (`read_tls` / `process_new_packets` / `write_tls`) turns it into the
//! plaintext the HTTP/1.1 connection parses. This file is the only one that names rustls,
//! so a rustls upgrade touches nothing else.
//!
//! What it sets up (rustls's safe defaults): TLS 1.2 and 1.3 only, its default cipher
//! suites (no weak one), no renegotiation (rustls has none), no compression, ALPN
//! `http/1.1`, stateful session resumption from a bounded in-memory cache (rustls's
//! default of 256 sessions per acceptor) and no 0-RTT. The crypto provider is ring.

use std::io::{Read, Write};
use std::sync::Arc;

use bytes::BytesMut;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::buf::OutBuf;
use crate::transport::{Transport, TransportError};

/// What accepts TLS connections on a listener: the certificate chain and key, the
/// protocol versions, ALPN and the session cache, shared by every worker.
#[derive(Clone)]
pub struct TlsAcceptor {
    config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsAcceptor").finish_non_exhaustive()
    }
}

impl TlsAcceptor {
    /// From a PEM certificate chain (leaf first) and a PEM private key (PKCS#8, PKCS#1 or
    /// SEC1). The error says what is wrong with which of the two (the caller names the
    /// files).
    pub fn from_pem(chain: &[u8], key: &[u8]) -> Result<Self, TlsSetupError> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain)
            .collect::<Result<_, _>>()
            .map_err(|e| TlsSetupError::Cert(format!("not a PEM certificate chain: {e}")))?;
        if certs.is_empty() {
            return Err(TlsSetupError::Cert(
                "no certificate in it (expected -----BEGIN CERTIFICATE-----)".into(),
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(key)
            .map_err(|e| TlsSetupError::Key(format!("no usable PEM private key in it: {e}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsSetupError::Cert(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| TlsSetupError::Key(format!("does not fit the certificate: {e}")))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // rustls's default says it already; kept explicit, as the promise is ours.
        config.max_early_data_size = 0;
        Ok(TlsAcceptor {
            config: Arc::new(config),
        })
    }

    /// The transport for one new client connection.
    pub fn transport(&self) -> Box<dyn Transport> {
        // `new` fails only for a config rustls itself refuses (0-RTT with QUIC and the
        // like), which `from_pem` never builds.
        let conn = rustls::ServerConnection::new(self.config.clone())
            .expect("a server config from TlsAcceptor::from_pem is accepted");
        Box::new(TlsTransport {
            conn,
            failed: false,
        })
    }
}

/// Why TLS could not be set up: which input is wrong, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsSetupError {
    Cert(String),
    Key(String),
}

struct TlsTransport {
    conn: rustls::ServerConnection,
    /// `receive` failed: rustls holds the alert, which [`Transport::close`] sends.
    failed: bool,
}

impl TlsTransport {
    /// Everything rustls has to send (handshake records, alerts, encrypted data).
    fn flush(&mut self, out: &mut Vec<u8>) {
        while self.conn.wants_write() {
            match self.conn.write_tls(out) {
                Ok(0) | Err(_) => break, // a Vec takes everything; no progress means done
                Ok(_) => {}
            }
        }
    }
}

impl Transport for TlsTransport {
    fn receive(
        &mut self,
        raw: &mut BytesMut,
        plain: &mut BytesMut,
        out: &mut Vec<u8>,
    ) -> Result<(), TransportError> {
        loop {
            // rustls takes what fits its buffer; the rest stays in `raw` for the next round.
            let mut src: &[u8] = raw;
            // An error means its buffer is full: the plaintext is drained first.
            let took = self.conn.read_tls(&mut src).unwrap_or_default();
            let _ = raw.split_to(took);
            let state = match self.conn.process_new_packets() {
                Ok(s) => s,
                Err(_) => {
                    // The alert rustls queued goes out with the close.
                    self.failed = true;
                    return Err(TransportError(
                        "TLS: a record or handshake message was refused",
                    ));
                }
            };
            let avail = state.plaintext_bytes_to_read();
            if avail > 0 {
                let at = plain.len();
                plain.resize(at + avail, 0);
                let n = self.conn.reader().read(&mut plain[at..]).unwrap_or(0);
                plain.truncate(at + n);
            }
            if took == 0 || raw.is_empty() {
                break;
            }
        }
        self.flush(out);
        Ok(())
    }

    fn send(&mut self, plain: &mut OutBuf, out: &mut Vec<u8>) {
        while !plain.is_empty() {
            let mut parts: [&[u8]; 4] = [&[]; 4];
            let n = plain.chunks(&mut parts);
            let mut took = 0;
            for p in &parts[..n] {
                // rustls encrypts into records at once; `write` takes less only past its
                // buffer limit, which the flush below clears.
                let k = self.conn.writer().write(p).unwrap_or(0);
                took += k;
                if k < p.len() {
                    break;
                }
            }
            plain.consume(took);
            self.flush(out);
            if took == 0 {
                break;
            }
        }
    }

    fn close(&mut self, out: &mut Vec<u8>) {
        if !self.failed {
            self.conn.send_close_notify();
        }
        self.flush(out);
    }
}

#[cfg(test)]
mod tests;
