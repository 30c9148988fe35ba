#![no_main]
//! The TLS transport fed arbitrary client bytes in arbitrary splits: never panics, takes
//! every byte or fails, hands up no more plaintext than it was given, and answers with
//! bounded output (a handshake flight, an alert).
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use trireme_core::buf::OutBuf;
use trireme_core::tls::TlsAcceptor;

fn acceptor() -> &'static TlsAcceptor {
    static A: OnceLock<TlsAcceptor> = OnceLock::new();
    A.get_or_init(|| {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("rcgen");
        TlsAcceptor::from_pem(c.cert.pem().as_bytes(), c.key_pair.serialize_pem().as_bytes())
            .expect("acceptor")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let step = 1 + split as usize;
    let mut t = acceptor().transport();
    let mut raw = bytes::BytesMut::new();
    let mut plain = bytes::BytesMut::new();
    let mut out = Vec::new();
    let mut failed = false;
    for piece in rest.chunks(step) {
        raw.extend_from_slice(piece);
        if t.receive(&mut raw, &mut plain, &mut out).is_err() {
            failed = true;
            break;
        }
        assert!(plain.len() <= rest.len(), "more plaintext than bytes in");
        assert!(out.len() <= 64 * 1024 + rest.len(), "output out of bounds");
    }
    if !failed {
        let mut resp = OutBuf::new();
        resp.vec().extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        t.send(&mut resp, &mut out);
    }
    t.close(&mut out);
});
