use super::*;

fn err(yaml: &str) -> String {
    Config::from_yaml(yaml, "lb.yaml")
        .expect_err("should fail")
        .to_string()
}

#[test]
fn seed_style_config_parses() {
    let yaml = r#"
server:
  listen: 0.0.0.0:8080
  workers: 8
  max_connections: 100000
  timeout: 30s
  keep_alive_timeout: 120s
  max_body_size: 5MB
  connection_pool:
    reuse_connections: true
    idle_timeout: 60s
load_balancing:
  algorithm: least_conn
  health_check:
    interval: 5s
    timeout: 2s
    healthy_threshold: 2
    unhealthy_threshold: 3
  connection_draining:
    enabled: true
    timeout: 30s
backends:
  - url: http://127.0.0.1:8081
    weight: 5
  - url: http://127.0.0.1:8082
    weight: 3
  - url: http://127.0.0.1:8083
    weight: 2
"#;
    let cfg = Config::from_yaml(yaml, "lb.yaml").unwrap();
    assert_eq!(cfg.listen.port(), 8080);
    assert_eq!(cfg.file.server.workers, Some(8));
    assert_eq!(cfg.file.server.max_body_size.0, 5 * 1024 * 1024);
    assert_eq!(cfg.drain_timeout(), Duration::from_secs(30));
    let ctx = cfg
        .build(crate::test_origin(), crate::test_wall(), &resolve_literal)
        .unwrap();
    let up = &ctx.upstreams[0];
    assert_eq!(up.cfg.algorithm, Algorithm::LeastConn);
    assert_eq!(
        up.backends.iter().map(|b| b.weight).collect::<Vec<_>>(),
        vec![5, 3, 2]
    );
    assert_eq!(
        up.cfg.active.as_ref().unwrap().interval,
        Duration::from_secs(5)
    );
    assert_eq!(ctx.keep_alive_timeout, Duration::from_secs(120));
}

#[test]
fn errors_name_file_line_and_key() {
    let e = err(
        "server:\n  listen: 127.0.0.1:80\n  wrokers: 4\nbackends:\n  - url: http://127.0.0.1:1\n",
    );
    assert!(
        e.contains("lb.yaml") && e.contains("wrokers") && e.contains('3'),
        "{e}"
    );
    let e = err("server:\n  timeout: 30 parsecs\nbackends:\n  - url: http://127.0.0.1:1\n");
    assert!(
        e.contains("lb.yaml") && e.contains("parsecs") && e.contains('2'),
        "{e}"
    );
    let e = err("load_balancing:\n  algorithm: fastest\nbackends:\n  - url: http://127.0.0.1:1\n");
    assert!(
        e.contains("fastest") && e.contains("round_robin") && e.contains('2'),
        "{e}"
    );
    let e = err("backends:\n  - url: ftp://x:1\n");
    assert!(e.contains("unsupported scheme") && e.contains('2'), "{e}");
    let e = err("backends:\n  - url: http://127.0.0.1:1\n    weight: 0\n");
    assert!(e.contains("lb.yaml:3") && e.contains("weight"), "{e}");
    let e = err(
        "routes:\n  - path: /api\n    upstream: nope\nbackends:\n  - url: http://127.0.0.1:1\n",
    );
    assert!(e.contains("lb.yaml:3") && e.contains("nope"), "{e}");
    let e = err("server:\n  listen: nowhere\nbackends:\n  - url: http://127.0.0.1:1\n");
    assert!(e.contains("lb.yaml:2") && e.contains("listen"), "{e}");
    let e = err("server:\n  listen: 127.0.0.1:80\n");
    assert!(e.contains("no backends"), "{e}");
}

#[test]
fn units() {
    assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
    assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
    assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
    assert!(parse_duration("5 fortnights").is_err());
    assert!(parse_duration("-1s").is_err());
    assert_eq!(parse_size("4GB").unwrap(), 4 << 30);
    assert_eq!(parse_size("16KiB").unwrap(), 16 << 10);
    assert_eq!(parse_size("100").unwrap(), 100);
    assert!(parse_size("12 parsecs").is_err());
    assert_eq!(
        BackendUrl::parse("http://[::1]:81").unwrap(),
        BackendUrl {
            host: "::1".into(),
            port: 81
        }
    );
    assert_eq!(
        BackendUrl::parse("10.0.0.1").unwrap(),
        BackendUrl {
            host: "10.0.0.1".into(),
            port: 80
        }
    );
    assert!(BackendUrl::parse("https://a:1").is_err());
    assert!(BackendUrl::parse("http://a:1/path").is_err());
}

#[test]
fn shipped_example_configs_are_valid() {
    for (name, src) in [
        (
            "examples/full.yaml",
            include_str!("../../../examples/full.yaml"),
        ),
        (
            "examples/quickstart.yaml",
            include_str!("../../../examples/quickstart.yaml"),
        ),
    ] {
        let cfg = Config::from_yaml(src, name).unwrap_or_else(|e| panic!("{e}"));
        cfg.build(crate::test_origin(), crate::test_wall(), &resolve_literal)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn cache_warming_needs_a_host_and_absolute_paths() {
    let base = "backends:\n  - url: http://127.0.0.1:9001\ncache:\n  size: 1MB\n";
    let e = Config::from_yaml(
        &format!("{base}  warming:\n    on_startup:\n      - path: /a\n"),
        "w.yaml",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("w.yaml:5") && e.contains("cache.warming.host"),
        "{e}"
    );
    let e = Config::from_yaml(
        &format!("{base}  warming:\n    host: x\n    on_startup:\n      - path: a\n"),
        "w.yaml",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("w.yaml:8") && e.contains("must start with /"),
        "{e}"
    );
    let e = Config::from_yaml(
        &format!("{base}  warming:\n    host: x\n    scheduled:\n      - cron: \"61 * * * *\"\n        paths: [/a]\n"),
        "w.yaml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("w.yaml:8") && e.contains("invalid cron"), "{e}");
    let e = Config::from_yaml(&format!("{base}  eviction_policy: lfu\n"), "w.yaml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("w.yaml:5") && e.contains("lru"), "{e}");
}

#[test]
fn cache_l2_section_builds_a_pooled_redis_upstream() {
    let yaml = "cache:\n  l1:\n    size: 2MB\n    ttl: 300\n  l2:\n    enabled: true\n    host: 127.0.0.1\n    port: 6390\n    ttl: 3600\n    timeout: 20ms\n    key_prefix: \"edge:\"\nbackends:\n  - url: http://127.0.0.1:8081\n";
    let cfg = Config::from_yaml(yaml, "lb.yaml").unwrap();
    let ctx = cfg
        .build(crate::test_origin(), crate::test_wall(), &resolve_literal)
        .unwrap();
    let l2 = ctx.cache.as_ref().unwrap().l2.as_ref().expect("L2 on");
    assert_eq!(l2.addr, "127.0.0.1:6390".parse().unwrap());
    assert_eq!(l2.ttl, Duration::from_secs(3600));
    assert_eq!(l2.timeout, Duration::from_millis(20));
    assert_eq!(l2.prefix, b"edge:");
    let up = &ctx.upstreams[l2.upstream as usize];
    assert_eq!(up.cfg.name, "cache-l2");
    assert_eq!(up.backends[0].addr, l2.addr);
    assert_eq!(up.cfg.connect_timeout, l2.timeout);
    // Not routable: requests still go to the default upstream.
    assert_eq!(ctx.router.route(b"x", b"/"), Some(0));
    // Off: no Redis upstream at all.
    let off = yaml.replace("enabled: true", "enabled: false");
    let ctx = Config::from_yaml(&off, "lb.yaml")
        .unwrap()
        .build(crate::test_origin(), crate::test_wall(), &resolve_literal)
        .unwrap();
    assert!(ctx.cache.as_ref().unwrap().l2.is_none());
    assert_eq!(ctx.upstreams.len(), 1);
}

#[test]
fn cache_l2_errors_name_file_line_and_key() {
    let base = "cache:\n  size: 1MB\n  l2:\n    host: 127.0.0.1\n    size: 8GB\nbackends:\n  - url: http://127.0.0.1:8081\n";
    let e = err(base);
    assert!(
        e.contains("lb.yaml:5:5: cache.l2.size") && e.contains("maxmemory"),
        "{e}"
    );
    let e = err(&base.replace("    size: 8GB\n", "    timeout: 0s\n"));
    assert!(e.contains("lb.yaml:5:5: cache.l2.timeout"), "{e}");
    let e = err(&base
        .replace("  size: 1MB\n", "")
        .replace("    size: 8GB\n", "    enabled: true\n"));
    assert!(
        e.contains("lb.yaml:4:5: cache.l2.enabled") && e.contains("L1"),
        "{e}"
    );
    let e = err(&base.replace("    size: 8GB\n", "    hots: x\n"));
    assert!(e.contains("hots"), "{e}");
    // A host name core cannot resolve without I/O: the build says which.
    let cfg = Config::from_yaml(
        &base.replace(
            "    host: 127.0.0.1\n    size: 8GB\n",
            "    host: redis.internal\n",
        ),
        "lb.yaml",
    )
    .unwrap();
    let Err(e) = cfg.build(crate::test_origin(), crate::test_wall(), &resolve_literal) else {
        panic!("redis.internal resolved without a resolver");
    };
    let e = e.to_string();
    assert!(e.contains("cache.l2.host: `redis.internal:6379`"), "{e}");
}

#[test]
fn trusted_proxies_and_set_cookie_are_validated() {
    let e = err("server:\n  trusted_proxies:\n    - 10.0.0.0/8\n    - 10.0.0.0/40\nbackends:\n  - url: http://127.0.0.1:1\n");
    assert!(e.contains("lb.yaml:4:7: server.trusted_proxies[1]"), "{e}");
    assert!(e.contains("prefix length must be 0-32"), "{e}");
    let e = err(
        "server:\n  trusted_proxies: [proxy.internal]\nbackends:\n  - url: http://127.0.0.1:1\n",
    );
    assert!(e.contains("lb.yaml:2:"), "{e}");
    let e =
        err("cache:\n  size: 1MB\n  set_cookie: keep\nbackends:\n  - url: http://127.0.0.1:1\n");
    assert!(e.contains("strip, no_store, replay"), "{e}");
}

#[test]
fn admin_settings_are_validated() {
    let base = "admin:\n  listen: 127.0.0.1:9901\n  token: short\nbackends:\n  - url: http://127.0.0.1:1\n";
    let e = err(base);
    assert!(
        e.contains("lb.yaml:3:3: admin.token") && e.contains("16 printable"),
        "{e}"
    );
    let e = err(&base.replace("  token: short\n", "  max_connections: 0\n"));
    assert!(e.contains("lb.yaml:3:3: admin.max_connections: "), "{e}");
    let ok = base.replace("token: short", "token: a-long-enough-admin-token");
    assert!(Config::from_yaml(&ok, "lb.yaml").is_ok());
}

#[test]
fn every_error_in_one_format_all_at_once() {
    let src = "server:\n  listen: 127.0.0.1:8080\n  workrs: 2\n  timeout: 5x\nbackends:\n  - url: http://127.0.0.1:9000\n    wieght: 3\n  - url: http://127.0.0.1:9001\n    weight: 0\nload_balancing:\n  algorithm: lest_conn\n  algorithm: round_robin\n  health_check:\n    path: health\n";
    let e = Config::from_yaml(src, "site.yaml").unwrap_err();
    let text = e.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        vec![
            "site.yaml:3:3: server.workrs: unknown key `workrs`; did you mean `workers`?",
            "site.yaml:4:12: server.timeout: invalid duration unit `x` in `5x` (use ms, s, m, h or d)",
            "site.yaml:7:5: backends[0].wieght: unknown key `wieght`; did you mean `weight`?",
            "site.yaml:9:5: backends[1].weight: weight 0 out of range (1-10000)",
            "site.yaml:11:14: load_balancing.algorithm: unknown algorithm `lest_conn`; did you mean `least_conn`?",
            "site.yaml:12:3: load_balancing.algorithm: given twice (first on line 11)",
            "site.yaml:14:5: load_balancing.health_check.path: `health` must start with / (e.g. /health)",
            "site.yaml: 7 errors",
        ],
        "{text}"
    );
    // The YAML library's own wording does not leak out.
    assert!(
        !text.contains("DuplicateKeyPolicy") && !text.contains("<input>"),
        "{text}"
    );
}

#[test]
fn path_like_keys_are_validated() {
    for (yaml, key) in [
        ("load_balancing:\n  health_check:\n    path: \"/a b\"\n", "load_balancing.health_check.path"),
        ("routes:\n  - path: api\n    upstream: default\n", "routes[0].path"),
        ("upstreams:\n  u:\n    backends: [{url: http://127.0.0.1:2}]\n    load_balancing:\n      health_check:\n        path: x\n", "upstreams.u.load_balancing.health_check.path"),
        ("load_balancing:\n  passive_health:\n    panic_threshold: 101\n", "load_balancing.passive_health.panic_threshold"),
    ] {
        let src = format!("{yaml}backends:\n  - url: http://127.0.0.1:1\n");
        let e = Config::from_yaml(&src, "p.yaml").unwrap_err().to_string();
        assert!(e.contains(&format!(": {key}: ")), "{key}: {e}");
    }
}

#[test]
fn a_yaml_syntax_error_is_placed_too() {
    let e = Config::from_yaml("server: [\n", "s.yaml")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("s.yaml:"), "{e}");
    assert!(e.contains("invalid YAML"), "{e}");
}

/// `examples/full.yaml` marks each value `[default]` or `[example]`: the defaults must be
/// the code's. The file with its examples removed must read as the file with its examples
/// and its defaults removed.
#[test]
fn full_yaml_defaults_are_the_code_defaults() {
    let src = include_str!("../../../examples/full.yaml");
    let leaf = |l: &str| {
        let code = l.split(" #").next().unwrap_or("").trim_end();
        let t = code.trim_start();
        !t.is_empty() && !t.starts_with('#') && !code.ends_with(':')
    };
    for l in src.lines().filter(|l| leaf(l)) {
        assert!(
            l.contains("# [default]") || l.contains("# [example]"),
            "examples/full.yaml: a value marked neither [default] nor [example]: {l}"
        );
    }
    let keep = |defaults: bool| {
        // (line, whether a [default] under it was dropped)
        let mut lines: Vec<(String, bool)> = Vec::new();
        let mut skip_deeper: Option<usize> = None;
        for l in src.lines() {
            let indent = l.len() - l.trim_start().len();
            let t = l.trim_start();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            if let Some(d) = skip_deeper {
                if indent > d {
                    continue;
                }
                skip_deeper = None;
            }
            // List items are samples: dropped with what they hold.
            if t.starts_with("- ") {
                skip_deeper = Some(indent);
                continue;
            }
            if leaf(l) && l.contains("# [example]") {
                continue;
            }
            if leaf(l) && !defaults {
                // The section stays (present, with its defaults): mark its header.
                if let Some(h) = lines
                    .iter_mut()
                    .rev()
                    .find(|(h, _)| h.len() - h.trim_start().len() < indent)
                {
                    h.1 = true;
                }
                continue;
            }
            lines.push((
                l.split(" #").next().unwrap_or("").trim_end().to_string(),
                false,
            ));
        }
        // Sections left empty: `{}` where defaults were dropped from them, else gone.
        loop {
            let before = lines.clone();
            let mut out: Vec<(String, bool)> = Vec::new();
            for i in 0..lines.len() {
                let (l, had) = &lines[i];
                let indent = l.len() - l.trim_start().len();
                let empty = l.ends_with(':')
                    && lines
                        .get(i + 1)
                        .is_none_or(|(n, _)| n.len() - n.trim_start().len() <= indent);
                match (empty, had) {
                    (true, true) => out.push((format!("{l} {{}}"), false)),
                    (true, false) => {}
                    _ => out.push((l.clone(), *had)),
                }
            }
            lines = out;
            if lines == before {
                break;
            }
        }
        lines.into_iter().map(|(l, _)| l + "\n").collect::<String>()
    };
    let with_defaults = keep(true);
    let bare = keep(false);
    let a: FileConfig =
        serde_saphyr::from_str(&with_defaults).unwrap_or_else(|e| panic!("{e}\n{with_defaults}"));
    let b: FileConfig = serde_saphyr::from_str(&bare).unwrap_or_else(|e| panic!("{e}\n{bare}"));
    assert_eq!(
        format!("{a:#?}"),
        format!("{b:#?}"),
        "a value marked [default] in examples/full.yaml is not the default"
    );
}
