//! TLS termination (`--tls-cert` / `--tls-key`): a real rustls client against the binary,
//! with a certificate made for the test.

use super::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::io::{BufReader, Read};
use std::net::TcpStream;

matrix!(
    tls_terminates_and_the_backend_hears_https,
    a_second_connection_resumes_its_session,
    plain_http_on_the_tls_listener_gets_no_answer_and_breaks_nothing,
    a_bad_certificate_or_key_file_is_an_error_naming_it,
    a_handshake_trickled_byte_by_byte_is_cut_off_by_the_header_timeout,
    sni_picks_the_certificate_that_names_the_host,
    sighup_replaces_the_certificate_and_keeps_open_connections,
    a_large_upload_crosses_tls_whole,
);

/// A certificate for 127.0.0.1 and localhost, written to files: (cert, key, cert PEM).
fn cert_files() -> (PathBuf, PathBuf, String) {
    cert_files_for(&["localhost", "127.0.0.1"])
}

/// A certificate for `names`, written to files: (cert, key, cert PEM).
fn cert_files_for(names: &[&str]) -> (PathBuf, PathBuf, String) {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let c = rcgen::generate_simple_self_signed(names).expect("rcgen");
    let dir = std::env::temp_dir().join(format!(
        "trireme-tls-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, c.cert.pem()).unwrap();
    std::fs::write(&key, c.key_pair.serialize_pem()).unwrap();
    (cert, key, c.cert.pem())
}

fn tls_proxy(bin: &PathBuf, b: &Backend) -> (Proxy, Arc<rustls::ClientConfig>) {
    let (cert, key, pem) = cert_files();
    let p = Proxy::with_backends(
        bin,
        &[b],
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    (p, client_config(&pem))
}

/// A client that trusts `pem` and offers ALPN h2 and http/1.1.
fn client_config(pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(cfg)
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn connect(p: &Proxy, cfg: &Arc<rustls::ClientConfig>) -> BufReader<Tls> {
    connect_as(p, cfg, "127.0.0.1")
}

/// Connect sending `host` as the SNI name (and verifying the certificate against it).
fn connect_as(p: &Proxy, cfg: &Arc<rustls::ClientConfig>, host: &str) -> BufReader<Tls> {
    let s = TcpStream::connect(p.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let name = ServerName::try_from(host.to_string()).unwrap();
    let conn = rustls::ClientConnection::new(cfg.clone(), name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, s);
    // Drive the handshake now, so its outcome can be looked at before a request.
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .unwrap_or_else(|e| panic!("handshake: {e}; {}", p.logs()));
    }
    BufReader::new(tls)
}

fn get(c: &mut BufReader<Tls>, path: &str) -> Response {
    c.get_mut()
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: secure.example\r\n\r\n").as_bytes())
        .unwrap();
    let (line, headers) = trireme::demo::read_head(c).expect("a response head");
    let status: u16 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = trireme::demo::read_body(c, &headers, true).expect("a body");
    Response {
        status,
        headers,
        body,
    }
}

fn tls_terminates_and_the_backend_hears_https(bin: &PathBuf) {
    let b = Backend::start("b1").unwrap();
    let (p, cfg) = tls_proxy(bin, &b);
    let mut c = connect(&p, &cfg);
    {
        let conn = &c.get_ref().conn;
        assert_eq!(conn.alpn_protocol(), Some(&b"http/1.1"[..]), "ALPN");
        assert_eq!(
            conn.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
    }
    // Keep-alive over TLS: several exchanges, small and large, on one connection.
    let r = get(&mut c, "/a");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello from b1\n");
    let r = get(&mut c, "/bytes/300000");
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 300_000);
    assert_eq!(get(&mut c, "/chunked/70000").body.len(), 70_000);
    let seen = b.requests();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0].header("x-forwarded-proto"), Some("https"));
    assert_eq!(
        seen[0].header("forwarded"),
        Some("for=127.0.0.1;host=\"secure.example\";proto=https")
    );
    assert_eq!(
        b.connections.load(Ordering::Relaxed),
        1,
        "one pooled backend connection"
    );
}

fn a_second_connection_resumes_its_session(bin: &PathBuf) {
    let b = Backend::start("b1").unwrap();
    let (p, cfg) = tls_proxy(bin, &b);
    let mut first = connect(&p, &cfg);
    assert_eq!(get(&mut first, "/one").status, 200);
    assert_eq!(
        first.get_ref().conn.handshake_kind(),
        Some(rustls::HandshakeKind::Full)
    );
    // The session's tickets came after the handshake; the second connection offers one.
    let mut second = connect(&p, &cfg);
    assert_eq!(
        second.get_ref().conn.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed),
        "the server resumed the session"
    );
    assert_eq!(get(&mut second, "/two").status, 200);
}

fn plain_http_on_the_tls_listener_gets_no_answer_and_breaks_nothing(bin: &PathBuf) {
    let b = Backend::start("b1").unwrap();
    let (p, cfg) = tls_proxy(bin, &b);
    let mut s = TcpStream::connect(p.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(
        !got.starts_with(b"HTTP/"),
        "no plaintext answer: {:?}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(
        got.first(),
        Some(&0x15),
        "a TLS alert record, then the close: {got:?}"
    );
    assert!(b.requests().is_empty(), "nothing reached the backend");
    let mut c = connect(&p, &cfg);
    assert_eq!(
        get(&mut c, "/after").status,
        200,
        "the listener still serves TLS"
    );
}

fn a_bad_certificate_or_key_file_is_an_error_naming_it(bin: &PathBuf) {
    let (cert, key, _) = cert_files();
    let garbage = cert.with_file_name("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let run = |c: &std::path::Path, k: &std::path::Path| {
        let out = std::process::Command::new(bin)
            .args(["--listen", "127.0.0.1:0", "--backend", "http://127.0.0.1:9"])
            .arg("--tls-cert")
            .arg(c)
            .arg("--tls-key")
            .arg(k)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, err) = run(&garbage, &key);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("--tls-cert {}", garbage.display())),
        "{err}"
    );
    let (code, err) = run(&cert, &garbage);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("--tls-key {}", garbage.display())),
        "{err}"
    );
    let missing = cert.with_file_name("missing.pem");
    let (code, err) = run(&cert, &missing);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot read"), "{err}");
    // --tls-cert alone is refused by the command line.
    let out = std::process::Command::new(bin)
        .args(["--backend", "http://127.0.0.1:9", "--tls-cert"])
        .arg(&cert)
        .output()
        .unwrap();
    assert!(!out.status.success());
}

fn a_handshake_trickled_byte_by_byte_is_cut_off_by_the_header_timeout(bin: &PathBuf) {
    let b = Backend::start("b1").unwrap();
    let (cert, key, pem) = cert_files();
    let yaml = cert.with_file_name("config.yaml");
    std::fs::write(
        &yaml,
        format!(
            "server:\n  header_timeout: 1s\nbackends:\n  - url: http://{}\n",
            b.addr
        ),
    )
    .unwrap();
    let p = Proxy::start(
        bin,
        &[
            "--config".into(),
            yaml.display().to_string(),
            "--listen".into(),
            "{listen}".into(),
            "--tls-cert".into(),
            cert.display().to_string(),
            "--tls-key".into(),
            key.display().to_string(),
        ],
    );
    // A real ClientHello, sent a byte every 200 ms: each byte is activity, but the head
    // timer runs from the first one.
    let cfg = client_config(&pem);
    let mut conn =
        rustls::ClientConnection::new(cfg, ServerName::try_from("127.0.0.1").unwrap()).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    let mut s = TcpStream::connect(p.addr).unwrap();
    let started = Instant::now();
    let mut cut = None;
    for byte in hello.iter().take(hello.len() - 1) {
        if s.write_all(&[*byte]).is_err() {
            cut = Some(started.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        if started.elapsed() > Duration::from_secs(8) {
            break;
        }
    }
    let cut = cut.unwrap_or_else(|| {
        // The write side may still take bytes after the close: the read side tells.
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 64];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break started.elapsed(),
                Ok(_) => continue,
            }
        }
    });
    assert!(
        cut < Duration::from_secs(4),
        "the trickling handshake was cut after {cut:?}, not about 1 s"
    );
}

fn sni_picks_the_certificate_that_names_the_host(bin: &PathBuf) {
    let b = Backend::start("b1").unwrap();
    let (ca, ka, pa) = cert_files_for(&["a.example"]);
    let (cb, kb, pb) = cert_files_for(&["*.b.example"]);
    let arg = |p: &PathBuf| p.display().to_string();
    let p = Proxy::with_backends(
        bin,
        &[&b],
        &[
            "--tls-cert",
            &arg(&ca),
            "--tls-key",
            &arg(&ka),
            "--tls-cert",
            &arg(&cb),
            "--tls-key",
            &arg(&kb),
        ],
    );
    let cfg = client_config(&format!("{pa}{pb}"));
    let leaf = |pem: &str| {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .next()
            .unwrap()
            .unwrap()
    };
    for (host, want) in [
        ("a.example", &pa),
        ("api.b.example", &pb),
        ("www.b.example", &pb),
    ] {
        let mut c = connect_as(&p, &cfg, host);
        let sent = c.get_ref().conn.peer_certificates().unwrap()[0].clone();
        assert_eq!(sent, leaf(want), "{host} got another certificate");
        assert_eq!(get(&mut c, "/").status, 200, "{host}");
    }
}

fn sighup_replaces_the_certificate_and_keeps_open_connections(bin: &PathBuf) {
    let b = Backend::start("b1").unwrap();
    let (cert, key, old_pem) = cert_files();
    let p = Proxy::with_backends(
        bin,
        &[&b],
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let leaf = |pem: &str| {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .next()
            .unwrap()
            .unwrap()
    };
    let mut open = connect(&p, &client_config(&old_pem));
    assert_eq!(get(&mut open, "/before").status, 200);
    // A new certificate in the same files, then SIGHUP.
    let new =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let new_pem = new.cert.pem();
    std::fs::write(&cert, &new_pem).unwrap();
    std::fs::write(&key, new.key_pair.serialize_pem()).unwrap();
    let hup = || {
        // SAFETY: kill(2) on the PID of the child this test started.
        assert_eq!(unsafe { libc::kill(p.pid() as i32, libc::SIGHUP) }, 0)
    };
    hup();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.logs().contains("TLS certificates reloaded") {
        assert!(Instant::now() < deadline, "no reload: {}", p.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut fresh = connect(&p, &client_config(&new_pem));
    assert_eq!(
        fresh.get_ref().conn.peer_certificates().unwrap()[0],
        leaf(&new_pem)
    );
    assert_eq!(get(&mut fresh, "/after").status, 200);
    assert_eq!(
        get(&mut open, "/still").status,
        200,
        "the open connection was kept"
    );
    // A broken file: the error names it and the certificate in use stays.
    std::fs::write(&cert, "garbage\n").unwrap();
    hup();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.logs().contains("the certificates in use stay") {
        assert!(Instant::now() < deadline, "no error logged: {}", p.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        p.logs().contains(&format!("--tls-cert {}", cert.display())),
        "{}",
        p.logs()
    );
    let mut again = connect(&p, &client_config(&new_pem));
    assert_eq!(
        again.get_ref().conn.peer_certificates().unwrap()[0],
        leaf(&new_pem)
    );
    assert_eq!(get(&mut again, "/x").status, 200);
}

fn a_large_upload_crosses_tls_whole(bin: &PathBuf) {
    let b = Backend::start("b1").unwrap();
    let (p, cfg) = tls_proxy(bin, &b);
    let mut c = connect(&p, &cfg);
    // 1 MiB in one write: many records arrive per read, more than rustls buffers at once.
    let body: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
    let head = format!(
        "POST /echo HTTP/1.1\r\nHost: secure.example\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let w = c.get_mut();
    w.write_all(head.as_bytes()).unwrap();
    w.write_all(&body).unwrap();
    let (line, headers) = trireme::demo::read_head(&mut c).expect("a response head");
    assert!(line.contains(" 200 "), "{line}");
    let echoed = trireme::demo::read_body(&mut c, &headers, true).expect("a body");
    assert_eq!(echoed.len(), body.len());
    assert!(echoed == body, "the echoed body differs");
    assert_eq!(
        b.requests()[0].body.len(),
        body.len(),
        "the backend got it whole"
    );
    assert_eq!(
        get(&mut c, "/next").status,
        200,
        "the connection is still in sync"
    );
}
