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
    /// The certificates, swapped whole by [`replace`](Self::replace).
    certs: Arc<Certs>,
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
        Self::from_pems(&[(chain, key)]).map_err(|(_, e)| e)
    }

    /// From several certificates, each a PEM chain and its key: a client's SNI name picks
    /// the one whose certificate names it (exactly, else by a `*.` wildcard for one
    /// label); the first is the default (no SNI, or a name none covers). The error names
    /// the pair (its index) and the part that is wrong.
    pub fn from_pems(pairs: &[(&[u8], &[u8])]) -> Result<Self, (usize, TlsSetupError)> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let by_sni = BySni::of(pairs, &provider)?;
        let certs = Arc::new(Certs {
            current: parking_lot::RwLock::new(Arc::new(by_sni)),
            provider: provider.clone(),
        });
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| (0, TlsSetupError::Cert(e.to_string())))?
            .with_no_client_auth()
            .with_cert_resolver(certs.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // rustls's default says it already; kept explicit, as the promise is ours.
        config.max_early_data_size = 0;
        Ok(TlsAcceptor {
            config: Arc::new(config),
            certs,
        })
    }

    /// Serve these certificates from now on (as [`from_pems`](Self::from_pems) takes them):
    /// handshakes that start later use them; connections already open keep theirs. When
    /// one pair is wrong nothing changes, and the error names it.
    pub fn replace(&self, pairs: &[(&[u8], &[u8])]) -> Result<(), (usize, TlsSetupError)> {
        let by_sni = BySni::of(pairs, &self.certs.provider)?;
        *self.certs.current.write() = Arc::new(by_sni);
        Ok(())
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

/// One chain and key, checked to belong together.
fn certified_key(
    chain: &[u8],
    key: &[u8],
    provider: &rustls::crypto::CryptoProvider,
) -> Result<rustls::sign::CertifiedKey, TlsSetupError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsSetupError::Cert(format!("not a PEM certificate chain: {e}")))?;
    if certs.is_empty() {
        return Err(TlsSetupError::Cert(
            "no certificate in it (expected -----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    webpki::EndEntityCert::try_from(&certs[0])
        .map_err(|e| TlsSetupError::Cert(format!("its first certificate does not parse: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(key)
        .map_err(|e| TlsSetupError::Key(format!("no usable PEM private key in it: {e}")))?;
    rustls::sign::CertifiedKey::from_der(certs, key, provider)
        .map_err(|e| TlsSetupError::Key(format!("does not fit the certificate: {e}")))
}

/// The certificates of a listener and the names each covers (its subject alternative
/// names), looked up by the client's SNI.
#[derive(Debug, Default)]
struct BySni {
    certs: Vec<Arc<rustls::sign::CertifiedKey>>,
    /// Lower-case names (`*.example.com` kept as is), with the index of their certificate;
    /// the first certificate to name one has it.
    names: Vec<(String, usize)>,
}

/// The resolver rustls asks: the certificates in force, replaceable.
#[derive(Debug)]
struct Certs {
    current: parking_lot::RwLock<Arc<BySni>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::server::ResolvesServerCert for Certs {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let by = self.current.read();
        Some(by.certs[by.pick(hello.server_name())].clone())
    }
}

impl BySni {
    fn of(
        pairs: &[(&[u8], &[u8])],
        provider: &rustls::crypto::CryptoProvider,
    ) -> Result<Self, (usize, TlsSetupError)> {
        let mut by_sni = BySni::default();
        for (i, (chain, key)) in pairs.iter().enumerate() {
            let ck = certified_key(chain, key, provider).map_err(|e| (i, e))?;
            by_sni.add(ck);
        }
        if by_sni.certs.is_empty() {
            return Err((0, TlsSetupError::Cert("no certificate given".into())));
        }
        Ok(by_sni)
    }

    fn add(&mut self, ck: rustls::sign::CertifiedKey) {
        let i = self.certs.len();
        if let Ok(ee) = webpki::EndEntityCert::try_from(&ck.cert[0]) {
            for n in ee.valid_dns_names() {
                let n = n.to_ascii_lowercase();
                if !self.names.iter().any(|(m, _)| *m == n) {
                    self.names.push((n, i));
                }
            }
        }
        self.certs.push(Arc::new(ck));
    }

    /// The certificate for `sni`: one naming it exactly, else one whose wildcard covers
    /// its first label, else the first.
    fn pick(&self, sni: Option<&str>) -> usize {
        let Some(sni) = sni else {
            return 0;
        };
        let sni = sni.trim_end_matches('.');
        let exact = self.names.iter().find(|(n, _)| n.eq_ignore_ascii_case(sni));
        let wild = || {
            let (_, parent) = sni.split_once('.')?;
            self.names.iter().find(|(n, _)| {
                n.strip_prefix("*.")
                    .is_some_and(|p| p.eq_ignore_ascii_case(parent))
            })
        };
        exact.or_else(wild).map_or(0, |&(_, i)| i)
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
