use super::*;
use proptest::prelude::*;

fn ok(p: &str) -> String {
    resolve(p.as_bytes(), Dotfiles::Deny)
        .unwrap_or_else(|e| panic!("{p}: {e:?}"))
        .rel
}

fn status(p: &[u8]) -> Option<Status> {
    resolve(p, Dotfiles::Deny).err().map(|e| e.status)
}

#[test]
fn paths_resolve_below_the_root() {
    assert_eq!(ok("/a/b.txt"), "a/b.txt");
    assert_eq!(ok("a/b.txt"), "a/b.txt");
    assert_eq!(ok("/a//b/./c"), "a/b/c");
    assert_eq!(ok("/with%20space"), "with space");
    assert_eq!(ok("/caf%C3%A9.txt"), "café.txt");
    assert_eq!(
        ok("/.well-known/acme-challenge/x"),
        ".well-known/acme-challenge/x"
    );
    assert_eq!(ok(""), "");
    assert_eq!(ok("/"), "");
    let r = resolve(b"/docs/", Dotfiles::Deny).unwrap();
    assert!(r.dir);
    assert_eq!(r.rel, "docs");
    assert!(!resolve(b"/docs", Dotfiles::Deny).unwrap().dir);
    assert_eq!(
        resolve(b"/.env", Dotfiles::Allow).unwrap().rel,
        ".env",
        "dotfiles served when allowed"
    );
}

/// Every way of walking out of the root that a traversal word list tries: refused, each
/// with 400 (malformed or ambiguous) or 404 (hidden).
#[test]
fn the_traversal_corpus_never_resolves() {
    let corpus: &[&[u8]] = &[
        b"/../etc/passwd",
        b"..",
        b"/a/../../etc/passwd",
        b"/%2e%2e/etc/passwd",
        b"/%2E%2E/etc/passwd",
        b"/.%2e/etc/passwd",
        b"/%2e./etc/passwd",
        b"/%2e%2e%2fetc%2fpasswd",
        b"/..%2fetc",
        b"/..%5cetc",
        b"/..\\etc\\passwd",
        b"/a\\b",
        b"/%5c..%5cetc",
        b"/%252e%252e/etc/passwd",
        b"/%252e%252e%252fetc",
        b"/%25%32%65%25%32%65/etc",
        b"/%c0%ae%c0%ae/etc/passwd",
        b"/%c0%2e%c0%2e/etc",
        b"/%e0%80%ae%e0%80%ae/etc",
        b"/%c0%af",
        b"/%ed%a0%80",
        b"/etc/passwd%00.png",
        b"/a%00",
        b"/a\x00b",
        b"/a%0d%0aSet-Cookie:x",
        b"/a%7f",
        b"/.git/config",
        b"/a/.env",
        b"/.well-known/.secret",
        b"/%2egit/config",
        b"/....//etc",
        b"/%",
        b"/%2",
        b"/%zz",
        b"/%ff",
    ];
    for p in corpus {
        let s = status(p);
        assert!(
            matches!(s, Some(Status::BadRequest | Status::NotFound)),
            "{} resolved: {:?}",
            String::from_utf8_lossy(p),
            resolve(p, Dotfiles::Deny)
        );
    }
    assert_eq!(status(b"/.git/config"), Some(Status::NotFound));
    assert_eq!(status(b"/%2e%2e/x"), Some(Status::BadRequest));
}

proptest! {
    /// Whatever the bytes: a resolved path is relative, made of plain names only, so joined
    /// to a root it stays beneath it.
    #[test]
    fn a_resolved_path_never_leaves_its_root(
        raw in proptest::collection::vec(
            prop_oneof![
                Just(b'.'), Just(b'/'), Just(b'%'), Just(b'\\'), Just(b'2'), Just(b'e'),
                Just(b'E'), Just(b'f'), Just(b'5'), Just(b'c'), Just(b'0'), Just(b'a'),
                any::<u8>(),
            ],
            0..24,
        ),
        allow in any::<bool>(),
    ) {
        let dot = if allow { Dotfiles::Allow } else { Dotfiles::Deny };
        if let Ok(r) = resolve(&raw, dot) {
            let root = std::path::Path::new("/srv/www");
            let joined = root.join(&r.rel);
            prop_assert!(joined.starts_with(root));
            for c in std::path::Path::new(&r.rel).components() {
                prop_assert!(matches!(c, std::path::Component::Normal(_)), "{:?}", r.rel);
            }
            prop_assert!(!r.rel.contains('\\') && !r.rel.contains('\0'));
            prop_assert!(!r.rel.split('/').any(|s| s == ".." || s == "."));
            if !allow {
                for (i, s) in r.rel.split('/').enumerate() {
                    prop_assert!(!s.starts_with('.') || (i == 0 && s == ".well-known"));
                }
            }
        }
    }
}

fn loc(prefix: &str) -> Location {
    Location {
        prefix: prefix.into(),
        root: format!("/srv{prefix}").into(),
        index: vec!["index.html".into()],
        listing: false,
        dotfiles: Dotfiles::Deny,
        cache_control: None,
    }
}

#[test]
fn the_longest_prefix_at_a_segment_boundary_wins() {
    let ls = Locations::new(vec![
        loc("/"),
        loc("/static/"),
        loc("/static/img"),
        loc("/dl"),
    ]);
    let file = |p: &str| match ls.locate(p.as_bytes()) {
        Located::File { location, path } => (location.prefix.clone(), path.rel, path.dir),
        other => panic!("{p}: {other:?}"),
    };
    assert_eq!(
        file("/static/a.css"),
        ("/static/".into(), "a.css".into(), false)
    );
    assert_eq!(
        file("/static/img/x.png"),
        ("/static/img".into(), "x.png".into(), false)
    );
    assert_eq!(
        file("/static/imgs/x.png"),
        ("/static/".into(), "imgs/x.png".into(), false),
        "`/static/img` does not cover `/static/imgs`"
    );
    assert_eq!(file("/dl/f.zip"), ("/dl".into(), "f.zip".into(), false));
    assert_eq!(file("/dlx"), ("/".into(), "dlx".into(), false));
    assert_eq!(file("/"), ("/".into(), "".into(), true));
    assert_eq!(file("/static/"), ("/static/".into(), "".into(), true));
    for p in ["/static", "/dl", "/static/img"] {
        assert!(
            matches!(ls.locate(p.as_bytes()), Located::Redirect(_)),
            "{p}: a directory without its slash"
        );
    }
    assert!(matches!(
        ls.locate(b"/static/../x"),
        Located::Refused(Refused {
            status: Status::BadRequest,
            ..
        })
    ));
    let only = Locations::new(vec![loc("/static/")]);
    assert_eq!(only.locate(b"/api/x"), Located::Elsewhere);
    assert!(Locations::default().is_empty());
}

#[test]
fn media_types_come_from_the_extension() {
    assert_eq!(
        content_type("a/index.html").to_string(),
        "text/html; charset=utf-8"
    );
    assert_eq!(content_type("x.css").to_string(), "text/css; charset=utf-8");
    assert_eq!(content_type("x.png").to_string(), "image/png");
    assert_eq!(content_type("x.PNG").to_string(), "image/png");
    assert_eq!(
        content_type("x.json").to_string(),
        "application/json; charset=utf-8"
    );
    assert_eq!(
        content_type("noext").to_string(),
        "application/octet-stream"
    );
    assert_eq!(
        content_type("x.unknownext").to_string(),
        "application/octet-stream"
    );
}

fn t(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

#[test]
fn validators_change_with_the_file() {
    let v = Validators::of(6699, t(1_700_000_000));
    assert_eq!(&v.etag[..], b"\"6553f100-1a2b\"");
    assert_eq!(v.last_modified(), "Tue, 14 Nov 2023 22:13:20 GMT");
    assert_eq!(&Validators::of(0, t(0)).etag[..], b"\"0-0\"");
    assert_ne!(Validators::of(6700, t(1_700_000_000)).etag, v.etag);
    assert_ne!(Validators::of(6699, t(1_700_000_001)).etag, v.etag);
    // Sub-second times: the second counts (HTTP dates have no finer grain).
    let frac = Validators::of(6699, t(1_700_000_000) + Duration::from_millis(900));
    assert_eq!(frac, v);
}

fn date(secs: u64) -> String {
    httpdate::fmt_http_date(t(secs))
}

#[test]
fn conditionals_follow_rfc_9110s_order() {
    let v = Validators::of(1000, t(1_700_000_000));
    let tag = std::str::from_utf8(&v.etag).unwrap().to_string();
    let other = "\"abc\"".to_string();
    let (older, same, newer) = (
        date(1_699_999_999),
        date(1_700_000_000),
        date(1_700_000_001),
    );
    let weak = format!("W/{tag}");
    let both = format!("{other}, {tag}");
    let ev = |c: Conditions<'_>| evaluate(Read::Get, &c, &v, 1000, 16);
    fn b(s: &String) -> Option<&[u8]> {
        Some(s.as_bytes())
    }
    use Outcome::*;
    assert_eq!(ev(Conditions::default()), Full);
    // If-Match: strong comparison; `*` matches any.
    assert_eq!(
        ev(Conditions {
            if_match: b(&tag),
            ..Default::default()
        }),
        Full
    );
    assert_eq!(
        ev(Conditions {
            if_match: b(&both),
            ..Default::default()
        }),
        Full
    );
    assert_eq!(
        ev(Conditions {
            if_match: Some(b"*"),
            ..Default::default()
        }),
        Full
    );
    assert_eq!(
        ev(Conditions {
            if_match: b(&other),
            ..Default::default()
        }),
        PreconditionFailed
    );
    assert_eq!(
        ev(Conditions {
            if_match: b(&weak),
            ..Default::default()
        }),
        PreconditionFailed,
        "a weak tag never matches strongly"
    );
    // If-Unmodified-Since, only without If-Match.
    assert_eq!(
        ev(Conditions {
            if_unmodified_since: b(&older),
            ..Default::default()
        }),
        PreconditionFailed
    );
    assert_eq!(
        ev(Conditions {
            if_unmodified_since: b(&same),
            ..Default::default()
        }),
        Full
    );
    assert_eq!(
        ev(Conditions {
            if_match: b(&tag),
            if_unmodified_since: b(&older),
            ..Default::default()
        }),
        Full,
        "If-Match decides; If-Unmodified-Since is not looked at"
    );
    assert_eq!(
        ev(Conditions {
            if_unmodified_since: Some(b"not a date"),
            ..Default::default()
        }),
        Full,
        "an invalid date is ignored"
    );
    // If-None-Match: weak comparison, 304 for GET and HEAD.
    assert_eq!(
        ev(Conditions {
            if_none_match: b(&tag),
            ..Default::default()
        }),
        NotModified
    );
    assert_eq!(
        ev(Conditions {
            if_none_match: b(&weak),
            ..Default::default()
        }),
        NotModified
    );
    assert_eq!(
        ev(Conditions {
            if_none_match: b(&both),
            ..Default::default()
        }),
        NotModified
    );
    assert_eq!(
        ev(Conditions {
            if_none_match: Some(b"*"),
            ..Default::default()
        }),
        NotModified
    );
    assert_eq!(
        ev(Conditions {
            if_none_match: b(&other),
            ..Default::default()
        }),
        Full
    );
    assert_eq!(
        evaluate(
            Read::Head,
            &Conditions {
                if_none_match: b(&tag),
                ..Default::default()
            },
            &v,
            1000,
            16
        ),
        NotModified
    );
    // If-Modified-Since, only without If-None-Match.
    assert_eq!(
        ev(Conditions {
            if_modified_since: b(&same),
            ..Default::default()
        }),
        NotModified
    );
    assert_eq!(
        ev(Conditions {
            if_modified_since: b(&newer),
            ..Default::default()
        }),
        NotModified
    );
    assert_eq!(
        ev(Conditions {
            if_modified_since: b(&older),
            ..Default::default()
        }),
        Full
    );
    assert_eq!(
        ev(Conditions {
            if_none_match: b(&other),
            if_modified_since: b(&same),
            ..Default::default()
        }),
        Full,
        "If-None-Match decides; If-Modified-Since is not looked at"
    );
    // A failed precondition wins over a match that would give 304.
    assert_eq!(
        ev(Conditions {
            if_match: b(&other),
            if_none_match: b(&tag),
            ..Default::default()
        }),
        PreconditionFailed
    );
    // Range, and If-Range naming this version or another.
    let one: SmallVec<[ByteRange; 2]> = smallvec::smallvec![ByteRange { first: 0, last: 99 }];
    let range = Some(&b"bytes=0-99"[..]);
    assert_eq!(
        ev(Conditions {
            range,
            ..Default::default()
        }),
        Partial(one.clone())
    );
    assert_eq!(
        evaluate(
            Read::Head,
            &Conditions {
                range,
                ..Default::default()
            },
            &v,
            1000,
            16
        ),
        Full,
        "HEAD ignores Range"
    );
    assert_eq!(
        ev(Conditions {
            range,
            if_range: b(&tag),
            ..Default::default()
        }),
        Partial(one.clone())
    );
    assert_eq!(
        ev(Conditions {
            range,
            if_range: b(&same),
            ..Default::default()
        }),
        Partial(one)
    );
    assert_eq!(
        ev(Conditions {
            range,
            if_range: b(&other),
            ..Default::default()
        }),
        Full
    );
    assert_eq!(
        ev(Conditions {
            range,
            if_range: b(&weak),
            ..Default::default()
        }),
        Full
    );
    assert_eq!(
        ev(Conditions {
            range,
            if_range: b(&older),
            ..Default::default()
        }),
        Full
    );
    assert_eq!(
        ev(Conditions {
            range,
            if_none_match: b(&tag),
            ..Default::default()
        }),
        NotModified,
        "a current copy gets 304, not a part"
    );
}

fn ranges(v: &str, len: u64) -> Ranges {
    parse_ranges(v.as_bytes(), len, 16)
}

fn some(rs: &[(u64, u64)]) -> Ranges {
    Ranges::Some(
        rs.iter()
            .map(|&(first, last)| ByteRange { first, last })
            .collect(),
    )
}

#[test]
fn range_sets_are_parsed_bounded_and_merged() {
    assert_eq!(ranges("bytes=0-0", 10), some(&[(0, 0)]));
    assert_eq!(ranges("bytes=2-5", 10), some(&[(2, 5)]));
    assert_eq!(ranges("bytes=2-", 10), some(&[(2, 9)]));
    assert_eq!(ranges("bytes=-3", 10), some(&[(7, 9)]));
    assert_eq!(
        ranges("bytes=-30", 10),
        some(&[(0, 9)]),
        "a suffix longer than the file"
    );
    assert_eq!(
        ranges("bytes=5-100", 10),
        some(&[(5, 9)]),
        "the end is clamped"
    );
    assert_eq!(
        ranges("BYTES=1-2", 10),
        some(&[(1, 2)]),
        "the unit is case-insensitive"
    );
    assert_eq!(ranges("bytes= 1-2 , ,4-5", 10), some(&[(1, 2), (4, 5)]));
    assert_eq!(
        ranges("bytes=6-7,0-1", 10),
        some(&[(6, 7), (0, 1)]),
        "disjoint: order kept"
    );
    assert_eq!(
        ranges("bytes=0-3,2-5", 10),
        some(&[(0, 5)]),
        "overlapping: merged"
    );
    assert_eq!(
        ranges("bytes=4-5,0-3", 10),
        some(&[(0, 5)]),
        "adjacent: merged"
    );
    assert_eq!(ranges("bytes=10-20", 10), Ranges::Unsatisfiable);
    assert_eq!(ranges("bytes=10-,20-30", 10), Ranges::Unsatisfiable);
    assert_eq!(ranges("bytes=-0", 10), Ranges::Unsatisfiable);
    assert_eq!(
        ranges("bytes=0-", 0),
        Ranges::Unsatisfiable,
        "an empty file has no byte 0"
    );
    assert_eq!(
        ranges("bytes=10-20,1-2", 10),
        some(&[(1, 2)]),
        "the satisfiable ones stay"
    );
    for ignored in [
        "items=0-5",
        "bytes 0-5",
        "bytes=5-2",
        "bytes=a-b",
        "bytes=-",
        "bytes=",
        "bytes=1-2-3",
        "bytes=+1-2",
        "bytes=99999999999999999999-",
    ] {
        assert_eq!(ranges(ignored, 10), Ranges::Ignore, "{ignored}");
    }
    // Amplification: too many ranges, or parts that add up to the whole file, get the file.
    let many = format!(
        "bytes={}",
        (0..17)
            .map(|i| format!("{}-{}", i * 2, i * 2))
            .collect::<Vec<_>>()
            .join(",")
    );
    assert_eq!(ranges(&many, 100), Ranges::Ignore);
    assert_eq!(
        ranges("bytes=0-4,6-9", 10),
        Ranges::Some(smallvec::smallvec![
            ByteRange { first: 0, last: 4 },
            ByteRange { first: 6, last: 9 }
        ])
    );
    assert_eq!(
        ranges("bytes=0-5,6-9,0-9", 10),
        some(&[(0, 9)]),
        "one range: the whole file is fine"
    );
    assert_eq!(ranges("bytes=0-4,6-9,8-9,0-0", 10), some(&[(0, 4), (6, 9)]));
    assert_eq!(ranges("bytes=0-,-5", 10), some(&[(0, 9)]));
}

proptest! {
    /// Against a model: the ranges sent lie in the file, are disjoint and not adjacent, and
    /// cover exactly the bytes asked for (when the set is not ignored).
    #[test]
    fn ranges_cover_exactly_the_bytes_asked(
        len in 0u64..64,
        specs in proptest::collection::vec((0u64..80, 0u64..80, 0u8..3), 1..6),
    ) {
        let text: Vec<String> = specs
            .iter()
            .map(|&(a, b, kind)| match kind {
                0 => format!("{}-{}", a.min(b), a.max(b)),
                1 => format!("{a}-"),
                _ => format!("-{b}"),
            })
            .collect();
        let v = format!("bytes={}", text.join(","));
        let mut want = vec![false; len as usize];
        for &(a, b, kind) in &specs {
            let (first, last) = match kind {
                0 => (a.min(b), a.max(b)),
                1 => (a, u64::MAX),
                _ => (len.saturating_sub(b), if b == 0 { 0 } else { u64::MAX }),
            };
            if kind == 2 && b == 0 {
                continue;
            }
            for i in first..=last.min(len.saturating_sub(1)) {
                if i < len {
                    want[i as usize] = true;
                }
            }
        }
        match parse_ranges(v.as_bytes(), len, 16) {
            Ranges::Some(rs) => {
                let mut got = vec![false; len as usize];
                for r in &rs {
                    prop_assert!(r.first <= r.last && r.last < len, "{v}: {r:?}");
                    for i in r.first..=r.last {
                        prop_assert!(!got[i as usize], "{v}: overlap at {i}");
                        got[i as usize] = true;
                    }
                }
                let mut sorted = rs.to_vec();
                sorted.sort_by_key(|r| r.first);
                for w in sorted.windows(2) {
                    prop_assert!(w[1].first > w[0].last + 1, "{v}: adjacent parts left unmerged");
                }
                prop_assert_eq!(got, want, "{}", v);
            }
            Ranges::Unsatisfiable => prop_assert!(want.iter().all(|b| !b), "{}", v),
            Ranges::Ignore => {
                // Only when the parts would add up to the file or more.
                let asked: u64 = want.iter().filter(|b| **b).count() as u64;
                prop_assert!(asked == len && len > 0, "{v} ignored");
            }
        }
    }
}

#[test]
fn a_multipart_layout_adds_up() {
    let rs = [
        ByteRange { first: 0, last: 9 },
        ByteRange {
            first: 20,
            last: 29,
        },
    ];
    let (heads, total) = multipart_layout(&rs, 100, "text/plain", "B0UND");
    assert_eq!(heads.len(), 3);
    assert_eq!(
        heads[0],
        "--B0UND\r\nContent-Type: text/plain\r\nContent-Range: bytes 0-9/100\r\n\r\n"
    );
    assert!(heads[1].starts_with("\r\n--B0UND\r\n"));
    assert_eq!(heads[2], "\r\n--B0UND--\r\n");
    let body: u64 = heads.iter().map(|h| h.len() as u64).sum::<u64>() + 20;
    assert_eq!(total, body);
    assert_eq!(content_range(rs[1], 100), "bytes 20-29/100");
}
