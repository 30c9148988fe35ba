//! Safe defaults and conformance (issue 10): the real binaries in front of real backends on
//! 127.0.0.1, every scenario on every runtime.

#[macro_use]
mod common;

use common::*;
use std::path::PathBuf;

matrix!(
    only_backend_answering_500s_and_refusing_is_still_used,
    panic_mode_keeps_failing_backends_in_rotation,
);

fn only_backend_answering_500s_and_refusing_is_still_used(bin: &PathBuf) {
    // Defaults: an application's 500s are not a backend failure, and the only backend of
    // an upstream is never ejected (panic mode), so no request gets a made-up 503.
    let b = Backend::start("only").unwrap();
    let dead_port = free_port();
    let yaml = format!(
        "server:\n  listen: \"{{listen}}\"\nload_balancing:\n  retries: 0\n  passive_health:\n    fail_timeout: 300ms\nupstreams:\n  dead:\n    backends:\n      - url: http://127.0.0.1:{dead_port}\nroutes:\n  - path: /dead\n    upstream: dead\nbackends:\n  - url: http://{{b0}}\n"
    );
    let p = Proxy::with_config(bin, &yaml, &[&b]);
    for _ in 0..10 {
        assert_eq!(get(p.addr, "/status/500").status, 500);
    }
    assert_eq!(
        get(p.addr, "/").status,
        200,
        "500s ejected the only backend"
    );
    assert_eq!(b.requests().len(), 11);
    // Refused connections do count as failures, but the only backend stays in use.
    let codes: Vec<u16> = (0..8).map(|_| get(p.addr, "/dead").status).collect();
    assert_eq!(
        codes,
        vec![502; 8],
        "the only backend was ejected: {codes:?}"
    );
    // The ejection's end is logged like its start.
    std::thread::sleep(std::time::Duration::from_millis(400));
    assert_eq!(get(p.addr, "/dead").status, 502);
    let logs = p.logs();
    assert!(logs.contains("backend ejected"), "{logs}");
    assert!(logs.contains("panic mode"), "{logs}");
    assert!(logs.contains("backend ejection over"), "{logs}");
}

fn panic_mode_keeps_failing_backends_in_rotation(bin: &PathBuf) {
    let a = Backend::start("a").unwrap();
    let dead_port = free_port();
    let yaml = format!(
        "server:\n  listen: \"{{listen}}\"\nload_balancing:\n  retries: 0\n  passive_health:\n    max_fails: 1\n    on_5xx: true\n    fail_timeout: 60s\nbackends:\n  - url: http://{{b0}}\n  - url: http://127.0.0.1:{dead_port}\n"
    );
    let p = Proxy::with_config(bin, &yaml, &[&a]);
    // One of two failing: it is ejected (half the backends stay healthy), so at most the
    // first request to it fails.
    let codes: Vec<u16> = (0..10).map(|_| get(p.addr, "/").status).collect();
    assert_eq!(
        codes.iter().filter(|&&c| c == 502).count(),
        1,
        "the refusing backend was not ejected: {codes:?}"
    );
    assert_eq!(codes.iter().filter(|&&c| c == 200).count(), 9);
    // The other one fails too (on_5xx counts here): none healthy, so both stay in rotation.
    assert_eq!(get(p.addr, "/status/500").status, 500);
    let before = a.requests().len();
    let codes: Vec<u16> = (0..10).map(|_| get(p.addr, "/").status).collect();
    assert!(
        codes.contains(&200) && codes.contains(&502) && !codes.contains(&503),
        "both backends should be tried: {codes:?}"
    );
    assert_eq!(
        a.requests().len() - before,
        codes.iter().filter(|&&c| c == 200).count()
    );
    assert!(p.logs().contains("panic mode"), "{}", p.logs());
}
