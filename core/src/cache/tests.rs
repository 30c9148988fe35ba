use super::*;
use proptest::prelude::*;
use std::time::UNIX_EPOCH;

fn t(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

fn cc(s: &str) -> Directives {
    Directives::parse([s.as_bytes()])
}

/// A 200 fetched at t(0), arriving at t(0), with these directives.
fn resp(directives: &str) -> ResponseFacts {
    ResponseFacts {
        status: 200,
        cc: cc(directives),
        date: Some(t(0)),
        expires: None,
        last_modified: None,
        age: 0,
        has_etag: true,
        vary_star: false,
        set_cookie: false,
        request_time: t(0),
        response_time: t(0),
    }
}

fn get() -> RequestFacts {
    RequestFacts {
        cacheable_method: true,
        ..Default::default()
    }
}

fn get_cc(directives: &str) -> RequestFacts {
    RequestFacts {
        cacheable_method: true,
        cc: cc(directives),
        ..Default::default()
    }
}

#[test]
fn directives_parse_like_the_rfc_says() {
    let d = Directives::parse([
        &b"Public, MAX-AGE=60, s-maxage=\"120\""[..],
        b"stale-while-revalidate=30,stale-if-error=600, no-cache=\"Set-Cookie, X\"",
    ]);
    assert!(d.public && d.no_cache);
    assert_eq!(d.max_age, Some(60));
    assert_eq!(d.s_maxage, Some(120));
    assert_eq!(d.stale_while_revalidate, Some(30));
    assert_eq!(d.stale_if_error, Some(600));
    // Malformed max-age: stale. First occurrence wins. Huge values saturate.
    assert_eq!(cc("max-age=abc").max_age, Some(0));
    assert_eq!(cc("max-age=5, max-age=500").max_age, Some(5));
    assert_eq!(cc("max-age=99999999999999999999").max_age, Some(DELTA_MAX));
    assert_eq!(cc("max-stale").max_stale, Some(None));
    assert_eq!(cc("max-stale=10").max_stale, Some(Some(10)));
    assert!(cc("private=\"a, b\", no-store").no_store);
    assert_eq!(cc(""), Directives::default());
}

#[test]
fn storable_follows_section_3() {
    let p = Policy::default();
    assert_eq!(storable(&get(), &resp("max-age=60"), &p), Ok(()));
    let post = RequestFacts::default();
    assert_eq!(
        storable(&post, &resp("max-age=60"), &p),
        Err(NotStored::Method)
    );
    assert_eq!(
        storable(&get(), &resp("no-store, max-age=60"), &p),
        Err(NotStored::NoStore)
    );
    assert_eq!(
        storable(&get_cc("no-store"), &resp("max-age=60"), &p),
        Err(NotStored::NoStore)
    );
    assert_eq!(
        storable(&get(), &resp("private, max-age=60"), &p),
        Err(NotStored::Private)
    );
    // Authorization: only with public, must-revalidate or s-maxage.
    let auth = RequestFacts {
        authorization: true,
        ..get()
    };
    assert_eq!(
        storable(&auth, &resp("max-age=60"), &p),
        Err(NotStored::Authorization)
    );
    for ok in [
        "public, max-age=60",
        "must-revalidate, max-age=60",
        "s-maxage=60",
    ] {
        assert_eq!(storable(&auth, &resp(ok), &p), Ok(()), "{ok}");
    }
    let mut star = resp("max-age=60");
    star.vary_star = true;
    assert_eq!(storable(&get(), &star, &p), Err(NotStored::VaryStar));
    // A 500 without explicit freshness is not stored; with max-age it is.
    let mut e = resp("");
    e.status = 500;
    assert_eq!(storable(&get(), &e, &p), Err(NotStored::NoFreshness));
    e.cc = cc("max-age=5");
    assert_eq!(storable(&get(), &e, &p), Ok(()));
    // Zero freshness and no validator: nothing to reuse.
    let mut z = resp("max-age=0");
    z.has_etag = false;
    assert_eq!(storable(&get(), &z, &p), Err(NotStored::Useless));
    let mut partial = resp("max-age=60");
    partial.status = 206;
    assert_eq!(storable(&get(), &partial, &p), Err(NotStored::Status));
}

#[test]
fn freshness_lifetime_precedence_and_heuristics() {
    let p = Policy::default();
    assert_eq!(
        freshness_lifetime(&resp("max-age=60, s-maxage=10"), &p),
        Duration::from_secs(10)
    );
    assert_eq!(
        freshness_lifetime(&resp("max-age=60"), &p),
        Duration::from_secs(60)
    );
    let mut r = resp("");
    r.expires = Some(Some(t(300)));
    assert_eq!(freshness_lifetime(&r, &p), Duration::from_secs(300));
    r.expires = Some(None); // invalid Expires: already expired
    assert_eq!(freshness_lifetime(&r, &p), Duration::ZERO);
    // Heuristic: 10% of Date - Last-Modified, capped at a day.
    let mut h = resp("");
    h.last_modified = Some(t(0) - Duration::from_secs(1000));
    assert_eq!(freshness_lifetime(&h, &p), Duration::from_secs(100));
    h.last_modified = Some(t(0) - Duration::from_secs(100 * 24 * 3600));
    assert_eq!(freshness_lifetime(&h, &p), Duration::from_secs(24 * 3600));
    // Not heuristically cacheable: no heuristic freshness.
    h.status = 500;
    assert_eq!(freshness_lifetime(&h, &p), Duration::ZERO);
    // The TTL cap.
    let capped = Policy {
        max_ttl: Duration::from_secs(30),
        ..Policy::default()
    };
    assert_eq!(
        freshness_lifetime(&resp("max-age=600"), &capped),
        Duration::from_secs(30)
    );
}

#[test]
fn current_age_per_section_4_2_3() {
    // Sent at 0, Date 2, arrived at 4 carrying Age: 10; now 20.
    let mut r = resp("max-age=60");
    r.request_time = t(0);
    r.date = Some(t(2));
    r.response_time = t(4);
    r.age = 10;
    // apparent = 4-2 = 2; corrected age = 10 + (4-0) = 14; initial = 14; resident = 16.
    assert_eq!(current_age(&r, t(20)), Duration::from_secs(30));
    // A Date in the future (clock skew) counts as zero apparent age.
    r.date = Some(t(100));
    r.age = 0;
    assert_eq!(current_age(&r, t(4)), Duration::from_secs(4));
}

#[test]
fn reuse_decisions() {
    let p = Policy::default();
    let r = resp("max-age=60");
    assert_eq!(reuse(&get(), &r, &p, t(59)), Reuse::Fresh);
    assert_eq!(reuse(&get(), &r, &p, t(60)), Reuse::Validate);
    // Request limits.
    assert_eq!(reuse(&get_cc("max-age=10"), &r, &p, t(20)), Reuse::Validate);
    assert_eq!(
        reuse(&get_cc("min-fresh=30"), &r, &p, t(40)),
        Reuse::Validate
    );
    assert_eq!(reuse(&get_cc("max-stale=30"), &r, &p, t(80)), Reuse::Fresh);
    assert_eq!(
        reuse(&get_cc("max-stale=30"), &r, &p, t(95)),
        Reuse::Validate
    );
    assert_eq!(reuse(&get_cc("max-stale"), &r, &p, t(9999)), Reuse::Fresh);
    assert_eq!(reuse(&get_cc("no-cache"), &r, &p, t(1)), Reuse::Validate);
    let pragma = RequestFacts {
        pragma_no_cache: true,
        ..get()
    };
    assert_eq!(reuse(&pragma, &r, &p, t(1)), Reuse::Validate);
    // stale-while-revalidate window.
    let swr = resp("max-age=60, stale-while-revalidate=30");
    assert_eq!(reuse(&get(), &swr, &p, t(70)), Reuse::StaleWhileRevalidate);
    assert_eq!(reuse(&get(), &swr, &p, t(91)), Reuse::Validate);
    // must-revalidate / proxy-revalidate / s-maxage forbid serving stale, even if asked.
    for d in [
        "max-age=60, must-revalidate, stale-while-revalidate=30",
        "max-age=60, proxy-revalidate",
        "s-maxage=60, stale-while-revalidate=30",
    ] {
        assert_eq!(
            reuse(&get_cc("max-stale"), &resp(d), &p, t(70)),
            Reuse::Validate,
            "{d}"
        );
    }
    // Response no-cache: always validated.
    assert_eq!(
        reuse(&get(), &resp("no-cache, max-age=60"), &p, t(1)),
        Reuse::Validate
    );
}

#[test]
fn stale_if_error_window() {
    let p = Policy::default();
    let r = resp("max-age=60, stale-if-error=300");
    assert!(stale_on_error(&get(), &r, &p, t(200)));
    assert!(!stale_on_error(&get(), &r, &p, t(400)));
    assert!(!stale_on_error(&get(), &resp("max-age=60"), &p, t(61)));
    // The request may ask for it too.
    assert!(stale_on_error(
        &get_cc("stale-if-error=100"),
        &resp("max-age=60"),
        &p,
        t(100)
    ));
    assert!(!stale_on_error(
        &get(),
        &resp("max-age=60, must-revalidate, stale-if-error=300"),
        &p,
        t(100)
    ));
}

#[test]
fn keys_and_vary() {
    assert_eq!(
        primary_key("http", b"Example.COM:80", b"/a?b=1", b""),
        primary_key("http", b"example.com", b"/a?b=1", b"")
    );
    assert_ne!(
        primary_key("http", b"example.com", b"/a", b""),
        primary_key("http", b"example.com", b"/A", b"")
    );
    assert_ne!(
        primary_key("http", b"example.com", b"/a", b""),
        primary_key("https", b"example.com", b"/a", b"")
    );
    assert_ne!(
        primary_key("http", b"example.com", b"/a", b"mobile"),
        primary_key("http", b"example.com", b"/a", b"")
    );
    let fields = |enc: &'static [u8]| {
        move |name: &[u8]| -> Vec<&'static [u8]> {
            match name {
                b"accept-encoding" => vec![enc],
                b"accept-language" => vec![b"en"],
                _ => vec![],
            }
        }
    };
    let k1 = vary_key(
        [&b"Accept-Encoding, accept-language"[..]],
        fields(b"gzip, br"),
    );
    let k2 = vary_key(
        [&b"ACCEPT-LANGUAGE"[..], b"accept-encoding"],
        fields(b"gzip,br"),
    );
    assert_eq!(
        k1, k2,
        "name case and order, and whitespace after commas, do not matter"
    );
    let k3 = vary_key([&b"accept-encoding"[..]], fields(b"identity"));
    assert_ne!(vary_key([&b"accept-encoding"[..]], fields(b"gzip")), k3);
    assert_eq!(
        vary_key([&b"accept-encoding, *"[..]], fields(b"gzip")),
        None
    );
}

#[test]
fn negotiation_fields_share_one_variant_per_meaning() {
    let lang = |v: &'static [u8]| {
        move |name: &[u8]| -> Vec<&'static [u8]> {
            if name == b"accept-language" {
                vec![v]
            } else {
                vec![]
            }
        }
    };
    let k = |v| vary_key([&b"Accept-Language"[..]], lang(v));
    assert_eq!(k(b"en-US, fr;q=0.5"), k(b"fr; q=0.5,EN-us"));
    assert_eq!(k(b"en-US,fr;q=0.5"), k(b" en-us ,  fr;q=0.5 "));
    assert_ne!(k(b"en-US"), k(b"fr"));
    // Other fields keep their case: a cookie or token may be case-sensitive.
    let tok = |v: &'static [u8]| {
        move |name: &[u8]| -> Vec<&'static [u8]> {
            if name == b"x-token" {
                vec![v]
            } else {
                vec![]
            }
        }
    };
    assert_ne!(
        vary_key([&b"X-Token"[..]], tok(b"Abc")),
        vary_key([&b"X-Token"[..]], tok(b"abc"))
    );
}

#[test]
fn age_field_first_value_and_invalid_ones() {
    assert_eq!(parse_age(b"7200, 0"), 7200);
    assert_eq!(parse_age(b" 60 "), 60);
    assert_eq!(parse_age(b"-5"), 0);
    assert_eq!(parse_age(b"1.5"), 0);
    assert_eq!(parse_age(b"abc, 7"), 0);
    assert_eq!(parse_age(b""), 0);
    assert_eq!(parse_age(b"99999999999999999999999"), 1 << 31);
}

#[test]
fn must_understand_overrides_no_store_for_understood_statuses() {
    let p = Policy::default();
    let mut r = resp("max-age=60, no-store, must-understand");
    assert_eq!(storable(&get(), &r, &p), Ok(()));
    r.status = 299;
    assert_eq!(storable(&get(), &r, &p), Err(NotStored::Status));
    let r = resp("max-age=60, no-store");
    assert_eq!(storable(&get(), &r, &p), Err(NotStored::NoStore));
    // The request's own no-store still wins.
    let r = resp("max-age=60, no-store, must-understand");
    assert_eq!(
        storable(&get_cc("no-store"), &r, &p),
        Err(NotStored::NoStore)
    );
}

#[test]
fn conditional_requests_answered_by_the_cache() {
    let lm = t(0);
    assert!(not_modified(
        Some(b"\"a\", W/\"b\""),
        None,
        Some(b"\"b\""),
        None
    ));
    assert!(not_modified(Some(b"*"), None, Some(b"\"x\""), None));
    assert!(!not_modified(
        Some(b"\"a\""),
        None,
        Some(b"\"b\""),
        Some(lm)
    ));
    // If-None-Match takes precedence over If-Modified-Since.
    let later = format_date(t(10));
    assert!(!not_modified(
        Some(b"\"a\""),
        Some(later.as_bytes()),
        Some(b"\"b\""),
        Some(lm)
    ));
    assert!(not_modified(None, Some(later.as_bytes()), None, Some(lm)));
    let earlier = format_date(t(0) - Duration::from_secs(10));
    assert!(!not_modified(
        None,
        Some(earlier.as_bytes()),
        None,
        Some(lm)
    ));
    assert!(!not_modified(None, Some(b"garbage"), None, Some(lm)));
}

#[test]
fn unsafe_methods_invalidate() {
    assert!(invalidates(b"POST", 200));
    assert!(invalidates(b"DELETE", 204));
    assert!(invalidates(b"PUT", 302));
    assert!(!invalidates(b"POST", 500));
    assert!(!invalidates(b"GET", 200));
    assert_eq!(
        same_origin_target(b"/x?y", "http", b"a.com"),
        Some(&b"/x?y"[..])
    );
    assert_eq!(
        same_origin_target(b"http://A.com/x", "http", b"a.com"),
        Some(&b"/x"[..])
    );
    assert_eq!(
        same_origin_target(b"http://b.com/x", "http", b"a.com"),
        None
    );
    assert_eq!(same_origin_target(b"//b.com/x", "http", b"a.com"), None);
    assert_eq!(
        same_origin_target(b"https://a.com/x", "http", b"a.com"),
        None
    );
}

#[test]
fn dates_in_all_three_formats() {
    let want = parse_date(b"Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
    assert_eq!(parse_date(b"Sunday, 06-Nov-94 08:49:37 GMT"), Some(want));
    assert_eq!(parse_date(b"Sun Nov  6 08:49:37 1994"), Some(want));
    assert_eq!(parse_date(b"yesterday"), None);
    assert_eq!(format_date(want), "Sun, 06 Nov 1994 08:49:37 GMT");
    // Conditionals read every format too.
    for ims in [
        &b"Sun, 06 Nov 1994 08:49:37 GMT"[..],
        b"Sunday, 06-Nov-94 08:49:37 GMT",
        b"Sun Nov  6 08:49:37 1994",
    ] {
        assert!(not_modified(None, Some(ims), None, Some(want)));
    }
}

proptest! {
    #[test]
    fn age_grows_with_time_and_covers_the_age_header(
        sent in 0u64..1000, delay in 0u64..100, skew in 0u64..200, age in 0u64..10_000,
        a in 0u64..100_000, b in 0u64..100_000,
    ) {
        let mut r = resp("max-age=60");
        r.request_time = t(sent);
        r.response_time = t(sent + delay);
        r.date = Some(t(sent + skew));
        r.age = age;
        let (lo, hi) = (a.min(b), a.max(b));
        let now_lo = t(sent + delay + lo);
        let now_hi = t(sent + delay + hi);
        prop_assert!(current_age(&r, now_lo) <= current_age(&r, now_hi));
        prop_assert!(current_age(&r, now_lo) >= Duration::from_secs(age + lo));
    }

    #[test]
    fn fresh_means_younger_than_the_lifetime(
        max_age in 0u64..10_000, s_maxage in proptest::option::of(0u64..10_000),
        now in 0u64..20_000, cap in 1u64..20_000,
    ) {
        let d = match s_maxage {
            Some(s) => format!("max-age={max_age}, s-maxage={s}"),
            None => format!("max-age={max_age}"),
        };
        let r = resp(&d);
        let p = Policy { max_ttl: Duration::from_secs(cap), ..Policy::default() };
        let life = freshness_lifetime(&r, &p);
        prop_assert!(life <= Duration::from_secs(cap));
        prop_assert_eq!(life, Duration::from_secs(s_maxage.unwrap_or(max_age).min(cap)));
        let fresh = reuse(&get(), &r, &p, t(now)) == Reuse::Fresh;
        prop_assert_eq!(fresh, Duration::from_secs(now) < life);
    }

    #[test]
    fn vary_key_ignores_name_order_and_case(
        names in proptest::collection::vec(prop_oneof![
            Just("accept-encoding"), Just("Accept-Language"), Just("USER-AGENT"), Just("x-tenant")
        ], 1..4),
        rotate in 0usize..4,
    ) {
        let fields = |n: &[u8]| -> Vec<&'static [u8]> {
            match n {
                b"accept-encoding" => vec![b"gzip"],
                b"accept-language" => vec![b"fr"],
                b"user-agent" => vec![b"curl/8"],
                _ => vec![],
            }
        };
        let a = names.join(", ");
        let mut other = names.clone();
        let len = other.len();
        other.rotate_left(rotate % len);
        let b = other.iter().map(|n| n.to_ascii_uppercase()).collect::<Vec<_>>().join(",");
        prop_assert_eq!(vary_key([a.as_bytes()], fields), vary_key([b.as_bytes()], fields));
    }

    #[test]
    fn primary_key_separates_targets_and_hosts(
        h1 in "[a-z]{1,8}\\.com", h2 in "[a-z]{1,8}\\.com",
        p1 in "/[a-z0-9]{0,8}", p2 in "/[a-z0-9]{0,8}",
    ) {
        let k1 = primary_key("http", h1.as_bytes(), p1.as_bytes(), b"");
        let k2 = primary_key("http", h2.as_bytes(), p2.as_bytes(), b"");
        prop_assert_eq!(k1 == k2, h1 == h2 && p1 == p2);
        let upper = primary_key("http", h1.to_uppercase().as_bytes(), p1.as_bytes(), b"");
        prop_assert_eq!(primary_key("http", h1.as_bytes(), p1.as_bytes(), b""), upper);
    }
}

mod store_tests {
    use super::*;
    use crate::cache::store::{Store, Stored};
    use bytes::Bytes;

    fn entry(body: usize, vary: &str, secondary: &[u8]) -> Stored {
        Stored {
            head: Bytes::from_static(b"HTTP/1.1 200 OK\r\n"),
            body: Bytes::from(vec![b'x'; body]),
            facts: resp("max-age=60"),
            etag: None,
            vary: Bytes::from(vary.to_string()),
            secondary: secondary.to_vec(),
            demand: Default::default(),
        }
    }

    fn none(_: &[u8]) -> Vec<&'static [u8]> {
        vec![]
    }

    #[test]
    fn lru_evicts_the_least_recently_used_under_the_byte_bound() {
        // One shard of 10,000 bytes; entries of ~2,300 bytes: four fit.
        let s = Store::new(10_000, 1, 5_000);
        for k in [b"a", b"b", b"c", b"d"] {
            assert!(s.insert(k, entry(2_000, "", b"")));
        }
        assert!(s.get(b"a", none).is_some()); // a is now the most recent
        assert!(s.insert(b"e", entry(2_000, "", b"")));
        assert!(s.get(b"b", none).is_none(), "b was least recently used");
        for k in [b"a", b"c", b"d", b"e"] {
            assert!(s.get(k, none).is_some());
        }
        assert!(s.bytes() <= 10_000);
        assert_eq!(
            s.stats.evictions.load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        // Too large for max_object: refused, nothing evicted.
        assert!(!s.insert(b"big", entry(6_000, "", b"")));
        assert_eq!(s.len(), 4);
    }

    #[test]
    fn variants_live_side_by_side_and_invalidate_together() {
        let s = Store::new(1 << 20, 4, 1 << 16);
        let gz = |n: &[u8]| -> Vec<&'static [u8]> {
            if n == b"accept-encoding" {
                vec![b"gzip"]
            } else {
                vec![]
            }
        };
        let br = |n: &[u8]| -> Vec<&'static [u8]> {
            if n == b"accept-encoding" {
                vec![b"br"]
            } else {
                vec![]
            }
        };
        let k_gz = vary_key([&b"Accept-Encoding"[..]], gz).unwrap();
        let k_br = vary_key([&b"Accept-Encoding"[..]], br).unwrap();
        s.insert(b"/x", entry(10, "Accept-Encoding", &k_gz));
        s.insert(b"/x", entry(20, "Accept-Encoding", &k_br));
        assert_eq!(s.get(b"/x", gz).unwrap().body.len(), 10);
        assert_eq!(s.get(b"/x", br).unwrap().body.len(), 20);
        assert!(
            s.get(b"/x", none).is_none(),
            "no variant for a request without the field"
        );
        // Same variant again: replaced, not duplicated.
        s.insert(b"/x", entry(30, "Accept-Encoding", &k_gz));
        assert_eq!(s.get(b"/x", gz).unwrap().body.len(), 30);
        assert_eq!(s.len(), 2);
        assert_eq!(s.invalidate(b"/x"), 2);
        assert!(s.is_empty() && s.bytes() == 0);
    }

    fn lang(v: &'static str) -> impl Fn(&[u8]) -> Vec<&'static [u8]> {
        move |n: &[u8]| {
            if n == b"accept-language" {
                vec![v.as_bytes()]
            } else {
                vec![]
            }
        }
    }

    fn lang_key(v: &'static str) -> Vec<u8> {
        vary_key([&b"Accept-Language"[..]], lang(v)).unwrap()
    }

    #[test]
    fn variants_per_key_are_bounded_least_recently_used_first() {
        let s = Store::new(1 << 24, 1, 1 << 16).with_max_variants(4);
        let langs: Vec<&'static str> = ["a", "b", "c", "d", "e", "f"].to_vec();
        for l in &langs[..4] {
            assert!(s.insert(b"/x", entry(10, "Accept-Language", &lang_key(l))));
        }
        // `a` is used again: `b` is now the least recent variant of /x.
        assert!(s.get(b"/x", lang("a")).is_some());
        assert!(s.insert(b"/x", entry(10, "Accept-Language", &lang_key("e"))));
        assert_eq!(s.len(), 4);
        assert!(s.get(b"/x", lang("b")).is_none(), "b made room");
        for l in ["a", "c", "d", "e"] {
            assert!(s.get(b"/x", lang(l)).is_some(), "{l} kept");
        }
        assert_eq!(
            s.stats
                .variant_evictions
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        // Another key is not affected by /x's bound.
        assert!(s.insert(b"/y", entry(10, "Accept-Language", &lang_key("f"))));
        assert_eq!(s.len(), 5);
    }

    /// A lookup asks for the request's fields once per distinct `Vary` of the key's
    /// variants, however many variants there are (the cost of a miss does not grow with
    /// a flood of variants).
    #[test]
    fn a_lookup_computes_the_request_key_once_per_vary_not_per_variant() {
        let s = Store::new(1 << 26, 1, 1 << 16).with_max_variants(10_000);
        let names: Vec<String> = (0..2_000).map(|i| format!("lang-{i}")).collect();
        for n in &names {
            let k = vary_key([&b"Accept-Language"[..]], |f: &[u8]| {
                if f == b"accept-language" {
                    vec![n.as_bytes()]
                } else {
                    vec![]
                }
            })
            .unwrap();
            assert!(s.insert(b"/x", entry(1, "Accept-Language", &k)));
        }
        assert_eq!(s.len(), 2_000);
        let calls = std::cell::Cell::new(0);
        let counting = |f: &[u8]| {
            calls.set(calls.get() + 1);
            if f == b"accept-language" {
                vec![&b"lang-1234"[..]]
            } else {
                vec![]
            }
        };
        assert!(s.get(b"/x", counting).is_some());
        assert_eq!(calls.get(), 1);
        calls.set(0);
        let missing = |f: &[u8]| {
            calls.set(calls.get() + 1);
            let _ = f;
            vec![&b"nope"[..]]
        };
        assert!(s.get(b"/x", missing).is_none());
        assert_eq!(calls.get(), 1);
    }

    proptest! {
        #[test]
        fn variants_are_found_and_bounded(
            ops in proptest::collection::vec((0u8..3, 0u8..12, any::<bool>()), 1..200),
        ) {
            let s = Store::new(1 << 24, 2, 1 << 16).with_max_variants(5);
            const LANGS: [&str; 12] = ["a","b","c","d","e","f","g","h","i","j","k","l"];
            for (k, l, get) in ops {
                let key = [b'k', k];
                let l = LANGS[l as usize];
                if get {
                    if let Some(e) = s.get(&key, lang(l)) {
                        prop_assert_eq!(&e.secondary, &lang_key(l));
                    }
                } else {
                    s.insert(&key, entry(10, "Accept-Language", &lang_key(l)));
                    prop_assert!(s.get(&key, lang(l)).is_some(), "just stored");
                }
                prop_assert!(s.len() <= 3 * 5);
            }
        }

        #[test]
        fn bytes_never_exceed_the_bound(
            ops in proptest::collection::vec((0u8..40, 0usize..3_000, any::<bool>()), 1..300),
            shards in 1usize..5,
        ) {
            let cap = 20_000;
            let s = Store::new(cap, shards, 4_000);
            for (k, size, get) in ops {
                let key = [b'k', k];
                if get {
                    let _ = s.get(&key, none);
                } else {
                    s.insert(&key, entry(size, "", b""));
                }
                prop_assert!(s.bytes() <= cap);
            }
        }
    }
}

/// A response that sets a cookie is one user's unless the origin says a shared cache may
/// keep it: heuristics and a default TTL are not enough.
#[test]
fn set_cookie_needs_explicit_shared_freshness() {
    let with_cookie = |d: &str| ResponseFacts {
        set_cookie: true,
        has_etag: false,
        last_modified: Some(t(0) - Duration::from_secs(86_400 * 30)),
        ..resp(d)
    };
    let p = Policy {
        default_ttl: Duration::from_secs(300),
        ..Policy::default()
    };
    for d in ["", "max-age=60", "public", "must-revalidate"] {
        assert_eq!(
            storable(&get(), &with_cookie(d), &p),
            Err(NotStored::SetCookie),
            "`{d}`"
        );
    }
    for d in ["s-maxage=60", "public, max-age=60"] {
        assert_eq!(storable(&get(), &with_cookie(d), &p), Ok(()), "`{d}`");
        let never = Policy {
            set_cookie: SetCookie::NoStore,
            ..p.clone()
        };
        assert_eq!(
            storable(&get(), &with_cookie(d), &never),
            Err(NotStored::SetCookie)
        );
    }
    // Without a cookie, heuristics still apply.
    let plain = ResponseFacts {
        set_cookie: false,
        ..with_cookie("")
    };
    assert_eq!(storable(&get(), &plain, &p), Ok(()));
}
