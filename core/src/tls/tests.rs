use super::*;
use rustls::pki_types::ServerName;

/// A certificate for `localhost` (and 127.0.0.1) and its key, as PEM.
pub(crate) fn test_cert() -> (String, String) {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("rcgen");
    (c.cert.pem(), c.key_pair.serialize_pem())
}

fn client(cert_pem: &str, alpn: &[&[u8]]) -> rustls::ClientConnection {
    client_with(&[cert_pem], "localhost", alpn)
}

/// A client that trusts the certificates in `trusted`, for `host`, offering `alpn`.
fn client_with(trusted: &[&str], host: &str, alpn: &[&[u8]]) -> rustls::ClientConnection {
    let mut roots = rustls::RootCertStore::empty();
    for pem in trusted {
        for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    rustls::ClientConnection::new(
        Arc::new(cfg),
        ServerName::try_from(host.to_string()).unwrap(),
    )
    .unwrap()
}

/// Move the client's records to the server transport and back until neither has more.
fn pump(
    c: &mut rustls::ClientConnection,
    t: &mut Box<dyn Transport>,
    raw: &mut BytesMut,
    plain: &mut BytesMut,
) -> Result<(), TransportError> {
    for _ in 0..16 {
        let mut to_server = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut to_server).unwrap();
        }
        raw.extend_from_slice(&to_server);
        let mut to_client = Vec::new();
        t.receive(raw, plain, &mut to_client)?;
        if to_client.is_empty() && to_server.is_empty() {
            return Ok(());
        }
        let mut src = &to_client[..];
        while !src.is_empty() {
            c.read_tls(&mut src).unwrap();
            c.process_new_packets().unwrap();
        }
    }
    Ok(())
}

#[test]
fn a_request_and_its_response_cross_the_tls_transport() {
    let (cert, key) = test_cert();
    let acceptor = TlsAcceptor::from_pem(cert.as_bytes(), key.as_bytes()).unwrap();
    let mut t = acceptor.transport();
    let mut c = client(&cert, &[b"h2", b"http/1.1"]);
    let (mut raw, mut plain) = (BytesMut::new(), BytesMut::new());
    pump(&mut c, &mut t, &mut raw, &mut plain).unwrap();
    assert!(!c.is_handshaking(), "the handshake completes");
    assert_eq!(
        c.alpn_protocol(),
        Some(&b"http/1.1"[..]),
        "ALPN picks http/1.1"
    );
    assert_eq!(c.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    // The request arrives as plaintext, cut into as many records as it takes.
    let req = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".repeat(1500);
    c.writer().write_all(&req).unwrap();
    pump(&mut c, &mut t, &mut raw, &mut plain).unwrap();
    assert_eq!(&plain[..], &req[..]);
    assert!(raw.is_empty());
    // The response: owned and shared bytes, all encoded, nothing left behind.
    let mut resp = OutBuf::new();
    let head = b"HTTP/1.1 200 OK\r\nContent-Length: 70000\r\n\r\n";
    resp.vec().extend_from_slice(head);
    resp.push_shared(bytes::Bytes::from(vec![b'x'; 70_000]));
    let mut out = Vec::new();
    t.send(&mut resp, &mut out);
    assert!(resp.is_empty(), "every plaintext byte is taken");
    let mut src = &out[..];
    let mut got = Vec::new();
    while !src.is_empty() {
        c.read_tls(&mut src).unwrap();
        c.process_new_packets().unwrap();
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = c.reader().read(&mut chunk) {
            got.extend_from_slice(&chunk[..n]);
        }
    }
    assert_eq!(got.len(), head.len() + 70_000);
    assert!(got.starts_with(b"HTTP/1.1 200 OK\r\n"));
    // close_notify goes out with the close.
    let mut out = Vec::new();
    t.close(&mut out);
    let mut src = &out[..];
    c.read_tls(&mut src).unwrap();
    let state = c.process_new_packets().unwrap();
    assert!(state.peer_has_closed());
}

#[test]
fn plain_http_on_a_tls_listener_fails_with_an_alert() {
    let (cert, key) = test_cert();
    let acceptor = TlsAcceptor::from_pem(cert.as_bytes(), key.as_bytes()).unwrap();
    let mut t = acceptor.transport();
    let mut raw = BytesMut::from(&b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..]);
    let (mut plain, mut out) = (BytesMut::new(), Vec::new());
    assert!(t.receive(&mut raw, &mut plain, &mut out).is_err());
    assert!(plain.is_empty(), "nothing of it is taken as a request");
    t.close(&mut out);
    assert_eq!(
        out.first(),
        Some(&0x15),
        "the close sends an alert record: {out:?}"
    );
}

#[test]
fn bad_pem_is_an_error_that_says_which_part() {
    let (cert, key) = test_cert();
    assert!(matches!(
        TlsAcceptor::from_pem(b"not pem", key.as_bytes()),
        Err(TlsSetupError::Cert(_))
    ));
    assert!(matches!(
        TlsAcceptor::from_pem(cert.as_bytes(), b""),
        Err(TlsSetupError::Key(_))
    ));
    let (_, other_key) = test_cert();
    assert!(
        matches!(
            TlsAcceptor::from_pem(cert.as_bytes(), other_key.as_bytes()),
            Err(TlsSetupError::Key(_))
        ),
        "a key of another certificate is refused"
    );
}

fn cert_for(names: &[&str]) -> (String, String) {
    let c =
        rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("rcgen");
    (c.cert.pem(), c.key_pair.serialize_pem())
}

#[test]
fn sni_picks_the_certificate_that_names_the_host() {
    let (a, ak) = cert_for(&["a.example", "www.a.example"]);
    let (b, bk) = cert_for(&["*.b.example", "b.example"]);
    let acceptor =
        TlsAcceptor::from_pems(&[(a.as_bytes(), ak.as_bytes()), (b.as_bytes(), bk.as_bytes())])
            .unwrap();
    // Through a real handshake: the client checks the name against what it is sent.
    let leaf = |pem: &str| {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .next()
            .unwrap()
            .unwrap()
    };
    for (host, want) in [
        ("x.b.example", &b),
        ("B.Example", &b),
        ("www.a.example", &a),
        ("a.example", &a),
    ] {
        let mut t = acceptor.transport();
        let mut c = client_with(&[&a, &b], host, &[]);
        let (mut raw, mut plain) = (BytesMut::new(), BytesMut::new());
        pump(&mut c, &mut t, &mut raw, &mut plain).unwrap();
        assert!(!c.is_handshaking(), "{host}: handshake");
        assert_eq!(c.peer_certificates().unwrap()[0], leaf(want), "{host}");
    }
    // The lookup itself: no SNI or a name no certificate covers gets the first; a wildcard
    // covers one label only.
    let mut by = BySni::default();
    let provider = rustls::crypto::ring::default_provider();
    by.add(certified_key(a.as_bytes(), ak.as_bytes(), &provider).unwrap());
    by.add(certified_key(b.as_bytes(), bk.as_bytes(), &provider).unwrap());
    assert_eq!(by.pick(None), 0);
    assert_eq!(by.pick(Some("other.example")), 0);
    assert_eq!(
        by.pick(Some("x.y.b.example")),
        0,
        "a wildcard covers one label"
    );
    assert_eq!(
        by.pick(Some("x.b.example.")),
        1,
        "a trailing dot is the same name"
    );
    assert_eq!(by.pick(Some("b.example")), 1);
    // A bad second pair is named by its index.
    assert!(matches!(
        TlsAcceptor::from_pems(&[(a.as_bytes(), ak.as_bytes()), (b.as_bytes(), ak.as_bytes())]),
        Err((1, TlsSetupError::Key(_)))
    ));
}
