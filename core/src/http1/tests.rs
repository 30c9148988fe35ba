use super::body::Chunk;
use super::*;
use crate::error::Status;
use proptest::prelude::*;

fn parse(s: &[u8]) -> Result<Parsed<RequestHead>, crate::HttpError> {
    parse_request(s, &Limits::default())
}

fn status_of(s: &[u8]) -> u16 {
    match parse(s) {
        Err(e) => e.status.code(),
        Ok(Parsed::Complete(_)) => 200,
        Ok(Parsed::Partial) => 0,
    }
}

fn complete(s: &[u8]) -> RequestHead {
    match parse(s) {
        Ok(Parsed::Complete(h)) => h,
        other => panic!("expected a complete head, got {other:?}"),
    }
}

#[test]
fn simple_get() {
    let raw = b"GET /a?b=c HTTP/1.1\r\nHost: example.com\r\nX-A: 1\r\n\r\nrest";
    let h = complete(raw);
    assert_eq!(h.len, raw.len() - 4);
    assert_eq!(h.method, Method::Get);
    assert_eq!(h.path.get(raw), b"/a?b=c");
    assert_eq!(h.effective_host(raw), b"example.com");
    assert_eq!(h.body, BodyKind::None);
    assert!(h.keep_alive);
    assert_eq!(h.header(raw, "x-a"), Some(&b"1"[..]));
}

#[test]
fn partial_until_blank_line() {
    assert_eq!(status_of(b"GET / HTTP/1.1\r\nHost: a\r\n"), 0);
    assert_eq!(status_of(b"GET / HTT"), 0);
}

#[test]
fn smuggling_vectors_are_rejected() {
    let cases: &[(&[u8], u16)] = &[
        // CL + TE
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        // conflicting / duplicate / invalid CL
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x10\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n", 400),
        // TE whose final coding is not chunked; chunked twice
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\x0b\r\n\r\n", 400),
        // unknown codings before chunked
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: foo, chunked\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
        // TE in HTTP/1.0
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        // obs-fold
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n 2\r\n\r\n", 400),
        // bare CR
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r2\r\n\r\n", 400),
        (b"GET / HTTP/1.1\rHost: a\r\n\r\n", 400),
        // NUL
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\x002\r\n\r\n", 400),
        // whitespace before colon
        (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n", 400),
        // invalid field names
        (b"GET / HTTP/1.1\r\nHost: a\r\nX(A): 1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\n: 1\r\n\r\n", 400),
        // missing / duplicate Host
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
        // versions
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        // a higher minor of HTTP/1 is read as HTTP/1.1 (RFC 9110 section 2.5)
        (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 200),
        (b"GET / HTTP/1.9\r\nHost: a\r\n\r\n", 200),
        (b"GET / HTTP/0.9\r\n\r\n", 505),
        // not an HTTP-version at all: 400 (RFC 9112 sections 2.3, 3)
        (b"GET / http/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET / HTTP/1.1x\r\nHost: a\r\n\r\n", 400),
        (b"GET / HTTP/11\r\nHost: a\r\n\r\n", 400),
        (b"GET / FOO\r\nHost: a\r\n\r\n", 400),
        (b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET /a HTTP/1.1 x\r\nHost: a\r\n\r\n", 400),
        // request line
        (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET foo HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", 405),
        (b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 200-ok\r\n\r\n", 417),
    ];
    for (raw, want) in cases {
        // Byte by byte too: a parser that stops at the first wrong byte judges the same.
        let limits = Limits::default();
        let mut seen = None;
        for n in 1..=raw.len() {
            match parse_request(&raw[..n], &limits) {
                Ok(Parsed::Partial) => continue,
                Ok(Parsed::Complete(_)) => break,
                Err(e) => {
                    seen = Some(e.status.code());
                    break;
                }
            }
        }
        if let Some(code) = seen {
            assert_eq!(
                code,
                *want,
                "prefix of {}",
                String::from_utf8_lossy(raw).escape_debug()
            );
        }
        assert_eq!(
            status_of(raw),
            *want,
            "{}",
            String::from_utf8_lossy(raw).escape_debug()
        );
    }
}

#[test]
fn accepted_forms() {
    let h = complete(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n");
    assert_eq!(h.body, BodyKind::Chunked);
    let h = complete(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\n");
    assert_eq!(h.body, BodyKind::Length(12));
    let h = complete(b"GET / HTTP/1.0\r\n\r\n");
    assert!(!h.keep_alive);
    let h = complete(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert!(h.keep_alive);
    let raw = b"GET http://Example.com:8080 HTTP/1.1\r\nHost: other\r\n\r\n";
    let h = complete(raw);
    assert_eq!(h.effective_host(raw), b"Example.com:8080");
    assert!(h.path.is_empty());
    let h = complete(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(h.method, Method::Options);
    // Leading empty line before the request line is tolerated (RFC 9112 section 2.2).
    let h = complete(b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(h.len, 2 + 27);
    // Connection-named fields are hop-by-hop.
    let raw = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: X-Secret, close\r\nX-Secret: 1\r\n\r\n";
    let h = complete(raw);
    assert!(!h.keep_alive);
    let secret = h
        .headers
        .iter()
        .find(|x| x.name.get(raw) == b"X-Secret")
        .unwrap();
    assert!(h.is_hop(raw, secret));
}

#[test]
fn limits() {
    let l = Limits {
        max_head: 64,
        max_uri: 16,
        max_headers: 3,
        max_body: 10,
    };
    let p = |s: &[u8]| match parse_request(s, &l) {
        Err(e) => e.status.code(),
        Ok(Parsed::Complete(_)) => 200,
        Ok(Parsed::Partial) => 0,
    };
    assert_eq!(
        p(b"GET /aaaaaaaaaaaaaaaaaaaaaaaa HTTP/1.1\r\nHost: a\r\n\r\n"),
        414
    );
    assert_eq!(
        p(&[b"GET /".as_slice(), &[b'a'; 100]].concat()),
        414,
        "URI limit holds on a partial line"
    );
    assert_eq!(
        p(b"GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 1\r\nC: 1\r\n\r\n"),
        431
    );
    assert_eq!(
        p(b"GET / HTTP/1.1\r\nHost: a\r\nA: 11111111111111111111111111111111111111111\r\n"),
        431
    );
    assert_eq!(
        p(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n"),
        413
    );
    assert_eq!(
        p(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n"),
        200
    );
}

#[test]
fn response_framing() {
    let r = |s: &[u8]| match parse_response(s, 4096) {
        Ok(Parsed::Complete(h)) => Ok((h.status, h.body, h.close)),
        Ok(Parsed::Partial) => Err(0),
        Err(e) => Err(e.status.code()),
    };
    assert_eq!(
        r(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n"),
        Ok((200, BodyKind::Length(3), false))
    );
    assert_eq!(
        r(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
        Ok((200, BodyKind::Chunked, false))
    );
    assert_eq!(
        r(b"HTTP/1.1 200 OK\r\n\r\n"),
        Ok((200, BodyKind::UntilClose, true))
    );
    assert_eq!(
        r(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n"),
        Ok((200, BodyKind::Length(1), true))
    );
    assert_eq!(
        r(b"HTTP/1.1 204 No Content\r\n\r\n"),
        Ok((204, BodyKind::None, false))
    );
    assert_eq!(
        r(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"),
        Ok((304, BodyKind::None, false))
    );
    assert_eq!(
        r(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"),
        Err(502)
    );
    assert_eq!(
        r(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"),
        Err(502)
    );
    assert_eq!(
        r(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"),
        Ok((200, BodyKind::None, true))
    );
    assert_eq!(r(b"garbage\r\n\r\n"), Err(502));
    assert_eq!(r(b"HTTP/1.1 200 OK\r\n"), Err(0));
}

#[test]
fn non_utf8_reason_phrase_is_forwarded_not_a_crash() {
    // Found by fuzzing: httparse reports such a phrase as a static "" outside the buffer.
    let raw = b"HTTP/1.0 001 #\x80HTT\x84\r\n\n=";
    let _ = parse_response(raw, 4096);
    let raw = b"HTTP/1.1 200 Gr\xfc\xdfe\r\nContent-Length: 0\r\n\r\n";
    match parse_response(raw, 4096) {
        Ok(Parsed::Complete(h)) => assert_eq!(h.reason.get(raw), b"Gr\xfc\xdfe"),
        other => panic!("{other:?}"),
    }
    let raw = b"HTTP/1.1 204\r\n\r\n";
    match parse_response(raw, 4096) {
        Ok(Parsed::Complete(h)) => assert!(h.reason.get(raw).is_empty()),
        other => panic!("{other:?}"),
    }
}

fn decode_all(dec: &mut ChunkedDecoder, input: &[u8]) -> Result<(Vec<u8>, bool, usize), BodyError> {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let (used, c) = dec.decode(&input[pos..])?;
        match c {
            Some(Chunk::Data(r)) => out.extend_from_slice(&input[pos + r.start..pos + r.end]),
            Some(Chunk::End) => return Ok((out, true, pos + used)),
            None => {}
        }
        pos += used;
        if used == 0 || pos == input.len() {
            return Ok((out, false, pos));
        }
    }
}

#[test]
fn chunked_decoder() {
    let mut d = ChunkedDecoder::new();
    let (out, done, used) = decode_all(
        &mut d,
        b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\nNEXT",
    )
    .unwrap();
    assert_eq!(out, b"hello world");
    assert!(done);
    assert_eq!(used, 44);
    for bad in [
        &b"\r\n"[..],
        b"g\r\n",
        b"5\nhello\r\n",
        b"5\r\nhelloX\r\n",
        b"5 \r\nhello\r\n",
        b" 5\r\nhello\r\n",
        b"11111111111111111\r\n",
        b"5;a\x00b\r\n",
        b"5\r\nhello\r\n0\r\nbad trailer\r\r\n",
        b"-1\r\n",
        b"0x5\r\n",
    ] {
        let mut d = ChunkedDecoder::new();
        assert!(
            decode_all(&mut d, bad).is_err(),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    // 16 hex digits is the maximum (no overflow: values stay within u64).
    let mut d = ChunkedDecoder::new();
    assert!(decode_all(&mut d, b"ffffffffffffffff\r\n").is_ok());
}

#[test]
fn error_response_is_well_formed() {
    let mut out = Vec::new();
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(784111777);
    write::error_response(&mut out, Status::BadGateway, true, t);
    let s = String::from_utf8(out).unwrap();
    assert!(s.starts_with("HTTP/1.1 502 Bad Gateway\r\n"));
    assert!(s.contains("Date: Sun, 06 Nov 1994 08:49:37 GMT\r\n"), "{s}");
    assert!(s.contains("Connection: close\r\n"));
    let body = s.split("\r\n\r\n").nth(1).unwrap();
    assert!(s.contains(&format!("Content-Length: {}\r\n", body.len())));
}

#[test]
fn higher_minor_version_is_read_as_http_1_1() {
    let raw = b"GET /x HTTP/1.3\r\nHost: a\r\n\r\n";
    let h = complete(raw);
    assert_eq!(h.version, Version::Http11);
    assert_eq!(h.target.get(raw), b"/x");
    assert_eq!(h.header(raw, "host"), Some(&b"a"[..]));
}

#[test]
fn cached_date_changes_with_the_second_only() {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(784111777);
    let a = write::http_date(t);
    assert_eq!(&a, b"Sun, 06 Nov 1994 08:49:37 GMT");
    assert_eq!(
        write::http_date(t + std::time::Duration::from_millis(999)),
        a
    );
    assert_eq!(
        &write::http_date(t + std::time::Duration::from_secs(1)),
        b"Sun, 06 Nov 1994 08:49:38 GMT"
    );
    assert_eq!(write::http_date(t), a, "going back re-formats");
}

proptest! {
    /// A request fed whole or split at any byte boundaries yields the same outcome.
    #[test]
    fn split_feeding_is_equivalent(
        idx in 0usize..8,
        cuts in proptest::collection::vec(0usize..400, 0..6),
    ) {
        let reqs: [&[u8]; 8] = [
            b"GET /x HTTP/1.1\r\nHost: a\r\nX-Long: aaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
            b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        ];
        let raw = reqs[idx];
        let whole = format!("{:?}", parse(raw).map(|p| match p { Parsed::Complete(h) => (h.len, h.body), Parsed::Partial => (0, BodyKind::None) }));
        // Feeding a growing prefix: every prefix is Partial or the same error, and the
        // first complete parse equals the whole parse.
        let mut points: Vec<usize> = cuts.into_iter().map(|c| c % (raw.len() + 1)).collect();
        points.push(raw.len());
        points.sort();
        let mut final_outcome = None;
        for p in points {
            match parse(&raw[..p]) {
                Ok(Parsed::Partial) => {}
                other => {
                    final_outcome = Some(format!("{:?}", other.map(|p| match p { Parsed::Complete(h) => (h.len, h.body), Parsed::Partial => (0, BodyKind::None) })));
                    break;
                }
            }
        }
        prop_assert_eq!(final_outcome.unwrap_or_default(), whole);
    }

    /// The chunked decoder gives the same data for any split of its input.
    #[test]
    fn chunked_split_equivalence(data in proptest::collection::vec(any::<u8>(), 0..300), sizes in proptest::collection::vec(1usize..50, 1..10), split in 1usize..64) {
        let mut enc = Vec::new();
        let mut rest = &data[..];
        for s in sizes.iter().cycle() {
            if rest.is_empty() { break; }
            let n = (*s).min(rest.len());
            write::push_chunk(&mut enc, &rest[..n]);
            rest = &rest[n..];
        }
        enc.extend_from_slice(write::LAST_CHUNK);
        let mut d = ChunkedDecoder::new();
        let mut out = Vec::new();
        let mut done = false;
        for piece in enc.chunks(split) {
            let mut pos = 0;
            while pos < piece.len() && !done {
                let (used, c) = d.decode(&piece[pos..]).unwrap();
                match c {
                    Some(Chunk::Data(r)) => out.extend_from_slice(&piece[pos + r.start..pos + r.end]),
                    Some(Chunk::End) => done = true,
                    None => {}
                }
                pos += used;
            }
        }
        prop_assert!(done);
        prop_assert_eq!(out, data);
    }
}

#[test]
fn paths_and_hosts_normalise_in_place() {
    let norm = |s: &str, merge: bool| -> Result<String, crate::HttpError> {
        let mut b = s.as_bytes().to_vec();
        let n = head::normalize_path(&mut b, merge)?;
        Ok(String::from_utf8(b[..n].to_vec()).unwrap())
    };
    for (input, want) in [
        ("/", "/"),
        ("/a/b", "/a/b"),
        ("/internal/../secret", "/secret"),
        ("/a/./b/../c", "/a/c"),
        ("/a/b/..", "/a/"),
        ("/a/.", "/a/"),
        ("/..", "/"),
        ("/../../x", "/x"),
        ("/%69nternal", "/internal"),
        ("/%2e%2e/secret", "/secret"),
        ("/a/%2E%2e/b", "/b"),
        ("/a%2fb", "/a%2Fb"),
        ("/%252e%252e/x", "/%252e%252e/x"),
        ("/x%00y", "/x%00y"),
        ("/a//b", "/a/b"),
        ("//internal", "/internal"),
        ("/a/", "/a/"),
        ("/a//", "/a/"),
        ("/~user/%7Efile", "/~user/~file"),
        ("/.hidden/..x", "/.hidden/..x"),
    ] {
        assert_eq!(norm(input, true).unwrap(), want, "{input}");
    }
    assert_eq!(norm("/a//b", false).unwrap(), "/a//b");
    assert_eq!(norm("/a//../b", false).unwrap(), "/a/b");
    for bad in ["/%", "/%4", "/%zz", "/a%g1"] {
        assert_eq!(
            norm(bad, true).unwrap_err().status,
            Status::BadRequest,
            "{bad}"
        );
    }
    let host = |s: &str| {
        let mut b = s.as_bytes().to_vec();
        let n = head::normalize_host(&mut b);
        String::from_utf8(b[..n].to_vec()).unwrap()
    };
    assert_eq!(host("Example.COM"), "example.com");
    assert_eq!(host("example.com."), "example.com");
    assert_eq!(host("example.com.:8080"), "example.com:8080");
    assert_eq!(host("example.com:80"), "example.com");
    assert_eq!(host("[::1]:80"), "[::1]");
    assert_eq!(host("[::1]:8080"), "[::1]:8080");
}

#[test]
fn a_parsed_head_is_normalised_with_its_query_kept() {
    let mut buf =
        b"GET /a/../b/%7e?x=/../%41 HTTP/1.1\r\nHost: WWW.Example.com.:80\r\n\r\n".to_vec();
    let mut h = match parse_request(&buf, &Limits::default()).unwrap() {
        Parsed::Complete(h) => h,
        Parsed::Partial => panic!("partial"),
    };
    h.normalize(&mut buf, true).unwrap();
    assert_eq!(h.path.get(&buf), b"/b/~?x=/../%41");
    assert_eq!(h.effective_host(&buf), b"www.example.com");
    let mut buf = b"GET http://A.example./x/./y HTTP/1.1\r\nHost: other\r\n\r\n".to_vec();
    let mut h = match parse_request(&buf, &Limits::default()).unwrap() {
        Parsed::Complete(h) => h,
        Parsed::Partial => panic!("partial"),
    };
    h.normalize(&mut buf, true).unwrap();
    assert_eq!(h.path.get(&buf), b"/x/y");
    assert_eq!(h.effective_host(&buf), b"a.example");
}

proptest! {
    #[test]
    fn normalised_paths_have_no_dot_segments_and_are_stable(
        segs in proptest::collection::vec("[a.%2eE/]{0,4}", 0..8),
        merge in any::<bool>(),
    ) {
        let input = format!("/{}", segs.join("/"));
        let mut b = input.clone().into_bytes();
        if let Ok(n) = head::normalize_path(&mut b, merge) {
            prop_assert!(n <= input.len());
            let out = b[..n].to_vec();
            prop_assert_eq!(out[0], b'/');
            for seg in out.split(|&c| c == b'/') {
                prop_assert!(seg != b"." && seg != b"..", "{input} -> {:?}", String::from_utf8_lossy(&out));
            }
            let mut again = out.clone();
            let m = head::normalize_path(&mut again, merge).unwrap();
            prop_assert_eq!(&again[..m], &out[..], "idempotent");
        }
    }
}

/// Bytes a header block is made of in the property test below: the ones that matter at
/// a field's edges (CR, LF, NUL, DEL, other controls, colon, space, tab, obs-text) often.
fn header_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        4 => proptest::sample::select(b"aZ-9:: \t\r\n".to_vec()),
        1 => proptest::sample::select(vec![0u8, 0x01, 0x0b, 0x1f, 0x7f, 0x80, 0xff, b'"', b'(', b'@']),
    ]
}

proptest! {
    /// httparse keeps the promise `field_ok` states (which is only a debug assertion on the
    /// request path): whatever it returns as a field, request or response, is valid.
    #[test]
    fn parsed_fields_are_valid(block in proptest::collection::vec(header_byte(), 0..80)) {
        for start in [&b"GET / HTTP/1.1\r\nHost: a\r\n"[..], b"HTTP/1.1 200 OK\r\n"] {
            let mut buf = start.to_vec();
            buf.extend_from_slice(&block);
            buf.extend_from_slice(b"\r\n\r\n");
            let mut storage = [httparse::EMPTY_HEADER; 64];
            let fields: Vec<(Vec<u8>, Vec<u8>)> = if start.starts_with(b"GET") {
                let mut r = httparse::Request::new(&mut storage);
                match r.parse(&buf) {
                    Ok(httparse::Status::Complete(_)) => r.headers.iter().map(|h| (h.name.as_bytes().to_vec(), h.value.to_vec())).collect(),
                    _ => continue,
                }
            } else {
                let mut r = httparse::Response::new(&mut storage);
                match r.parse(&buf) {
                    Ok(httparse::Status::Complete(_)) => r.headers.iter().map(|h| (h.name.as_bytes().to_vec(), h.value.to_vec())).collect(),
                    _ => continue,
                }
            };
            for (n, v) in &fields {
                prop_assert!(head::field_ok(n, v), "{:?}: {:?}", String::from_utf8_lossy(n), v);
            }
        }
    }
}

#[test]
fn fields_httparse_must_refuse() {
    for bad in [
        &b"X: a\rb\r\n"[..],
        b"X: a\0b\r\n",
        b"X: a\x7fb\r\n",
        b"X: a\x01b\r\n",
        b"X : a\r\n",
        b"X: a\r\n b\r\n",
        b"X\x01: a\r\n",
        b": a\r\n",
    ] {
        let mut req = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
        req.extend_from_slice(bad);
        req.extend_from_slice(b"\r\n");
        assert!(
            parse_request(&req, &Limits::default()).is_err(),
            "request accepted {:?}",
            String::from_utf8_lossy(bad)
        );
        let mut resp = b"HTTP/1.1 200 OK\r\n".to_vec();
        resp.extend_from_slice(bad);
        resp.extend_from_slice(b"Content-Length: 0\r\n\r\n");
        assert!(
            parse_response(&resp, 8192).is_err(),
            "response accepted {:?}",
            String::from_utf8_lossy(bad)
        );
    }
    assert!(head::field_ok(b"X-A", b"v\tw \x80\xff"));
    assert!(!head::field_ok(b"X A", b"v"));
    assert!(!head::field_ok(b"", b"v"));
    assert!(!head::field_ok(b"X", b"\x7f"));
}

#[test]
fn hop_by_hop_names_in_any_case() {
    for n in [
        "connection",
        "Keep-Alive",
        "PROXY-CONNECTION",
        "te",
        "Trailer",
        "transfer-encoding",
        "Upgrade",
        "content-length",
        "proxy-authenticate",
        "Proxy-Authorization",
    ] {
        assert!(head::is_hop_by_hop(n.as_bytes()), "{n}");
    }
    for n in [
        "",
        "t",
        "tex",
        "date",
        "content-type",
        "connections",
        "upgrade-insecure-requests",
        "trailers",
    ] {
        assert!(!head::is_hop_by_hop(n.as_bytes()), "{n}");
    }
}

/// `name_is` agrees with `eq_ignore_ascii_case` for every token byte at every position
/// (and every byte a field value may hold), on the names it is used with.
#[test]
fn name_is_matches_case_insensitive_equality_on_tokens() {
    for needle in [
        "te",
        "host",
        "content-length",
        "transfer-encoding",
        "proxy-authorization",
        "x-forwarded-for",
    ] {
        let n = needle.as_bytes();
        for pos in 0..n.len() {
            for b in (0u8..=255).filter(|&b| b == b'\t' || b >= 0x20) {
                let mut name = n.to_vec();
                name[pos] = b;
                assert_eq!(
                    head::name_is(&name, n),
                    name.eq_ignore_ascii_case(n),
                    "{needle} with {b:#x} at {pos}"
                );
            }
        }
        assert!(head::name_is(needle.to_ascii_uppercase().as_bytes(), n));
        assert!(!head::name_is(&n[1..], n));
    }
}

#[test]
fn response_hop_bits_match_the_hop_rule_field_by_field() {
    let raw = b"HTTP/1.1 200 OK\r\nX-A: 1\r\nConnection: x-b, Keep-Alive\r\nX-B: 2\r\nkeep-alive: t=5\r\nTE: trailers\r\nContent-Length: 3\r\nx-b: 3\r\nVary: *\r\n\r\n";
    let h = match head::parse_response(raw, 64 * 1024).unwrap() {
        Parsed::Complete(h) => h,
        Parsed::Partial => panic!("partial"),
    };
    let bits: Vec<bool> = (0..h.headers.len()).map(|i| h.is_hop_at(i)).collect();
    let rule: Vec<bool> = h.headers.iter().map(|f| h.is_hop(raw, f)).collect();
    assert_eq!(bits, rule);
    assert_eq!(
        bits,
        [false, true, true, true, true, true, true, false],
        "X-A, Connection, X-B, keep-alive, TE, Content-Length, x-b, Vary"
    );
    // A field past the parsed ones is not a hop field (no bit).
    assert!(!h.is_hop_at(h.headers.len()) && !h.is_hop_at(500));
}
