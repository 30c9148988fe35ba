//! Criterion microbenchmarks of trireme-core: head parsing, a whole exchange through a
//! session in memory, and one balancer pick for 10 and 10,000 backends per algorithm.
//!
//!     cargo bench -p trireme-core --bench core
//!     cargo bench -p trireme-core --bench core -- pick   (a subset)

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;
use trireme_core::balance::{Algorithm, HashMethod, PickInput};
use trireme_core::config::{resolve_literal, Config};
use trireme_core::http1::{parse_request, Limits};
use trireme_core::proxy::{ProxyContext, Session};
use trireme_core::upstream::{
    BackendConfig, HashKey, PassiveHealth, PoolConfig, Upstream, UpstreamConfig,
};

#[path = "exchange.rs"]
mod exchange;
use exchange::{exchange, REQ};

fn parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Bytes(REQ.len() as u64));
    let limits = Limits::default();
    g.bench_function("request_head", |b| {
        b.iter(|| parse_request(black_box(REQ), &limits).unwrap())
    });
    g.finish();
}

#[allow(clippy::disallowed_methods)]
fn origin() -> Instant {
    Instant::now()
}

fn ctx(t0: Instant) -> Arc<ProxyContext> {
    let cfg = Config::from_yaml(
        "backends:\n  - url: http://127.0.0.1:9001\n  - url: http://127.0.0.1:9002\n",
        "bench",
    )
    .unwrap();
    // A fixed wall clock: nothing here depends on the date.
    let wall = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
    cfg.build(t0, wall, &resolve_literal).unwrap()
}

/// One keep-alive request and its response through a session, buffers reused.
fn session(c: &mut Criterion) {
    let t0 = origin();
    let ctx = ctx(t0);
    let resp_head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\nDate: Mon, 23 Nov 2026 02:00:00 GMT\r\n\r\n";
    let body = [b'x'; 100];
    let mut s = Session::new(ctx, "10.0.0.1:40000".parse().unwrap(), t0);
    let mut g = c.benchmark_group("session");
    g.throughput(Throughput::Elements(1));
    g.bench_function("keepalive_exchange_100B", |b| {
        b.iter(|| exchange(&mut s, resp_head, &body, t0))
    });
    g.finish();
}

fn pick(c: &mut Criterion) {
    let t0 = origin();
    let mut g = c.benchmark_group("pick");
    for n in [10usize, 10_000] {
        for alg in [
            Algorithm::RoundRobin,
            Algorithm::LeastConn,
            Algorithm::IpHash,
            Algorithm::ConsistentHash,
            Algorithm::P2c,
        ] {
            let cfg = UpstreamConfig {
                name: "bench".into(),
                backends: (0..n)
                    .map(|i| BackendConfig {
                        addr: format!("10.{}.{}.{}:80", i / 65536, (i / 256) % 256, i % 256)
                            .parse()
                            .unwrap(),
                        host: "h".into(),
                        weight: 1 + (i % 3) as u32,
                        max_conns: 0,
                    })
                    .collect(),
                algorithm: alg,
                hash_method: HashMethod::Maglev,
                hash_key: HashKey::Header("x-user".into()),
                seed: 1,
                passive: PassiveHealth::default(),
                active: None,
                pool: PoolConfig::default(),
                retries: 0,
                connect_timeout: std::time::Duration::from_secs(1),
                response_timeout: std::time::Duration::from_secs(1),
            };
            let up = Upstream::new(0, cfg, t0);
            let mut i = 0u32;
            g.bench_with_input(BenchmarkId::new(alg.name(), n), &n, |b, _| {
                b.iter(|| {
                    i = i.wrapping_add(1);
                    let key = i.to_le_bytes();
                    let inp = PickInput {
                        client: &key,
                        key: Some(&key),
                    };
                    let p = up.pick(&inp, &[], t0).unwrap();
                    up.try_begin(p);
                    up.end(p);
                    black_box(p)
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, parse, session, pick);
criterion_main!(benches);
