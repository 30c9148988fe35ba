use super::*;
use crate::balance::PickInput;
use std::sync::atomic::Ordering;

fn upstream(n: usize, now: Instant) -> Arc<Upstream> {
    let cfg = UpstreamConfig {
        name: "t".into(),
        backends: (0..n)
            .map(|i| BackendConfig {
                addr: format!("127.0.0.1:{}", 9000 + i).parse().unwrap(),
                host: "h".into(),
                weight: 1,
                max_conns: 0,
            })
            .collect(),
        algorithm: crate::balance::Algorithm::RoundRobin,
        hash_method: crate::balance::HashMethod::Maglev,
        hash_key: HashKey::ClientIp,
        seed: 1,
        passive: PassiveHealth {
            max_fails: 2,
            fail_timeout: Duration::from_secs(10),
            on_5xx: true,
            panic_threshold: 50,
        },
        active: None,
        pool: PoolConfig::default(),
        retries: 1,
        connect_timeout: Duration::from_secs(1),
        response_timeout: Duration::from_secs(1),
    };
    Arc::new(Upstream::new(0, cfg, now))
}

#[test]
fn passive_ejection_and_readmission() {
    let t0 = crate::test_origin();
    let up = upstream(2, t0);
    let inp = PickInput {
        client: b"",
        key: None,
    };
    up.report_failure(0, t0);
    assert!(up.is_available(0, t0), "one failure is below max_fails");
    up.report_success(0);
    up.report_failure(0, t0);
    assert!(up.is_available(0, t0), "success resets the count");
    up.report_failure(0, t0);
    assert!(!up.is_available(0, t0));
    for _ in 0..10 {
        assert_eq!(up.pick(&inp, &[], t0 + Duration::from_secs(5)), Some(1));
    }
    assert!(up.is_available(0, t0 + Duration::from_secs(10)));
}

#[test]
fn panic_mode_keeps_the_last_backends_in_rotation() {
    let t0 = crate::test_origin();
    let inp = PickInput {
        client: b"",
        key: None,
    };
    // The only backend: ejected on paper, still picked (nginx never marks the only
    // server of a group down).
    let one = upstream(1, t0);
    one.report_failure(0, t0);
    one.report_failure(0, t0);
    assert_eq!(one.pick(&inp, &[], t0), Some(0));
    assert_eq!(one.panic_picks.load(Ordering::Relaxed), 1);
    // Two backends, one failing: 1 of 2 healthy is not below 50 %, so it is ejected.
    let two = upstream(2, t0);
    two.report_failure(0, t0);
    two.report_failure(0, t0);
    for _ in 0..6 {
        assert_eq!(two.pick(&inp, &[], t0), Some(1));
    }
    assert_eq!(two.panic_picks.load(Ordering::Relaxed), 0);
    // Both failing: panic mode, both in rotation.
    two.report_failure(1, t0);
    two.report_failure(1, t0);
    let picks: Vec<_> = (0..6).map(|_| two.pick(&inp, &[], t0).unwrap()).collect();
    assert!(picks.contains(&0) && picks.contains(&1), "{picks:?}");
    // Probes failing count as unhealthy too.
    let three = upstream(3, t0);
    three.set_healthy(0, false);
    three.set_healthy(1, false);
    let picks: Vec<_> = (0..6).map(|_| three.pick(&inp, &[], t0).unwrap()).collect();
    assert!(picks.contains(&0) && picks.contains(&1) && picks.contains(&2));
    three.set_healthy(1, true);
    for _ in 0..6 {
        assert_ne!(
            three.pick(&inp, &[], t0),
            Some(0),
            "2 of 3 healthy: no panic"
        );
    }
    // Ejections end on time, and the marks count comes back to zero.
    let later = t0 + Duration::from_secs(11);
    let _ = two.pick(&inp, &[], later);
    assert_eq!(two.marks.load(Ordering::Relaxed), 0);
    three.set_healthy(0, true);
    assert_eq!(three.marks.load(Ordering::Relaxed), 0);
}

#[test]
fn panic_threshold_zero_turns_it_off() {
    let t0 = crate::test_origin();
    let mut up = upstream(1, t0);
    Arc::get_mut(&mut up).unwrap().cfg.passive.panic_threshold = 0;
    up.report_failure(0, t0);
    up.report_failure(0, t0);
    let inp = PickInput {
        client: b"",
        key: None,
    };
    assert_eq!(up.pick(&inp, &[], t0), None);
}

#[test]
fn active_checks_need_thresholds() {
    let t0 = crate::test_origin();
    let up = upstream(2, t0);
    let cfg = ActiveHealth {
        healthy_threshold: 2,
        unhealthy_threshold: 3,
        interval: Duration::from_secs(1),
        ..ActiveHealth::default()
    };
    let mut hc = HealthChecker::new(up.clone(), cfg, t0);
    let mut t = t0;
    let round = |hc: &mut HealthChecker, t: Instant, status0: Option<u16>| {
        let mut probes = Vec::new();
        while let Some(p) = hc.poll_probe(t) {
            probes.push(p.backend);
        }
        assert_eq!(probes.len(), 2);
        hc.on_result(0, status0, t);
        hc.on_result(1, Some(200), t);
        assert_eq!(hc.next_deadline(), Some(t + Duration::from_secs(1)));
    };
    for i in 0..3 {
        assert!(
            up.backends[0].is_healthy(),
            "still healthy after {i} failures"
        );
        round(&mut hc, t, Some(503));
        t += Duration::from_secs(1);
    }
    assert!(!up.backends[0].is_healthy());
    assert!(hc.request(0).starts_with(b"GET / HTTP/1.1\r\nHost: h\r\n"));
    round(&mut hc, t, Some(200));
    t += Duration::from_secs(1);
    assert!(
        !up.backends[0].is_healthy(),
        "one success is below healthy_threshold"
    );
    round(&mut hc, t, Some(204));
    assert!(up.backends[0].is_healthy());
    assert!(up.backends[1].is_healthy());
}

#[test]
fn pool_limits() {
    let t0 = crate::test_origin();
    let cfg = PoolConfig {
        enabled: true,
        max_idle: 2,
        idle_timeout: Duration::from_secs(5),
        max_lifetime: Duration::from_secs(60),
        max_requests: 3,
    };
    let mut p: Pool<u32> = Pool::new(2, cfg, Default::default());
    let fresh = ConnMeta {
        created: t0,
        requests: 1,
    };
    assert_eq!(p.put(0, 1, fresh, t0), None);
    assert_eq!(p.put(0, 2, fresh, t0), None);
    assert_eq!(p.put(0, 3, fresh, t0), Some(3), "max_idle");
    assert_eq!(
        p.put(
            1,
            4,
            ConnMeta {
                created: t0,
                requests: 3
            },
            t0
        ),
        Some(4),
        "max_requests"
    );
    assert_eq!(
        p.put(1, 5, fresh, t0 + Duration::from_secs(61)),
        Some(5),
        "max_lifetime"
    );
    // LIFO: the most recently used comes back first.
    assert_eq!(
        p.take(0, t0, |_| Liveness::Quiet, |_| {}).map(|x| x.0),
        Some(2)
    );
    assert_eq!(p.put(0, 2, fresh, t0 + Duration::from_secs(3)), None);
    let mut closed = Vec::new();
    p.evict_expired(t0 + Duration::from_secs(6), |c| closed.push(c));
    assert_eq!(closed, vec![1]);
    assert_eq!(p.next_expiry(), Some(t0 + Duration::from_secs(8)));
    let mut closed = Vec::new();
    assert!(p
        .take(
            0,
            t0 + Duration::from_secs(9),
            |_| unreachable!("expired connections are not probed"),
            |c| closed.push(c)
        )
        .is_none());
    assert_eq!(closed, vec![2]);
    assert_eq!(p.idle_count(), 0);
}

fn pool_of(conns: &[u32], t0: Instant) -> (Pool<u32>, Arc<crate::metrics::Metrics>) {
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let mut p = Pool::new(1, PoolConfig::default(), metrics.clone());
    let meta = ConnMeta {
        created: t0,
        requests: 0,
    };
    for &c in conns {
        assert!(p.put(0, c, meta, t0).is_none());
    }
    (p, metrics)
}

/// The rule that keeps a response with its request: a pooled connection with unread bytes
/// or a closed peer is never handed out, whatever the runtime; the next quiet one is.
#[test]
fn take_never_hands_out_a_connection_with_unread_bytes_or_a_closed_peer() {
    let t0 = crate::test_origin();
    let (mut p, metrics) = pool_of(&[1, 2, 3], t0);
    let state = |c: &u32| match c {
        3 => Liveness::Unread,
        2 => Liveness::Closed,
        _ => Liveness::Quiet,
    };
    let mut closed = Vec::new();
    let got = p.take(0, t0, state, |c| closed.push(c));
    assert_eq!(got.map(|x| x.0), Some(1));
    assert_eq!(closed, vec![3, 2], "both are closed, most recent first");
    assert_eq!(metrics.upstream_idle_unread.load(Ordering::Relaxed), 1);
    assert_eq!(metrics.upstream_idle_closed.load(Ordering::Relaxed), 1);
    // Nothing quiet left: no connection, and the caller opens a new one.
    let (mut p, _) = pool_of(&[4], t0);
    assert!(p.take(0, t0, |_| Liveness::Unread, drop).is_none());
    assert_eq!(p.idle_count(), 0);
}

#[test]
fn an_idle_connection_that_turns_readable_leaves_the_pool() {
    let t0 = crate::test_origin();
    let (mut p, _) = pool_of(&[1, 2], t0);
    assert_eq!(
        p.on_idle_readable(0, t0, |&c| c == 1, |_| Liveness::Quiet),
        None,
        "a spurious wake-up keeps it"
    );
    assert_eq!(
        p.on_idle_readable(0, t0, |&c| c == 1, |_| Liveness::Unread),
        Some(1)
    );
    assert_eq!(p.idle_count(), 1);
    // The sweep (runtimes that watch no idle socket) finds the rest.
    let mut closed = Vec::new();
    p.sweep(t0, |_| Liveness::Closed, |c| closed.push(c));
    assert_eq!(closed, vec![2]);
    assert_eq!(p.idle_count(), 0);
}

/// `max_conns` holds across workers: the check and the increment are one step. (Threads
/// here stand in for the runtimes' workers; core itself starts none.)
#[test]
#[allow(clippy::disallowed_methods)]
fn max_conns_is_never_exceeded_by_racing_workers() {
    let t0 = crate::test_origin();
    let mut cfg = upstream(1, t0).cfg.clone();
    cfg.backends[0].max_conns = 5;
    let up = Arc::new(Upstream::new(0, cfg, t0));
    let peak = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (up, peak) = (up.clone(), peak.clone());
            std::thread::spawn(move || {
                let mut got = 0;
                for _ in 0..2_000 {
                    if up.try_begin(0) {
                        got += 1;
                        let now = up.backends[0].active.load(Ordering::Relaxed);
                        peak.fetch_max(now, Ordering::Relaxed);
                        up.end(0);
                    }
                }
                got
            })
        })
        .collect();
    let got: u32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(got > 0);
    assert!(peak.load(Ordering::Relaxed) <= 5);
    assert_eq!(up.backends[0].active.load(Ordering::Relaxed), 0);
    // At the cap, the backend is unavailable to the balancer.
    for _ in 0..5 {
        assert!(up.try_begin(0));
    }
    assert!(!up.try_begin(0));
    let inp = PickInput {
        client: b"",
        key: None,
    };
    assert_eq!(up.pick(&inp, &[], t0), None);
}

#[test]
fn background_attempts_count_in_flight_report_health_and_retry_elsewhere() {
    let t0 = crate::test_origin();
    let up = upstream(3, t0);
    let metrics = crate::metrics::Metrics::default();
    let inp = PickInput {
        client: b"",
        key: None,
    };
    let active = |i: usize| up.backends[i].active.load(Ordering::Relaxed);
    let mut at = Attempts::new(up.clone());
    let first = at.begin(&inp, t0).expect("a backend");
    assert_eq!(
        active(first),
        1,
        "in flight counts for least_conn and max_conns"
    );
    // A failed connect: counted against the backend; the retry goes elsewhere.
    assert!(at.failed(t0, &metrics));
    assert_eq!(active(first), 0);
    assert_eq!(up.backends[first].failures.load(Ordering::Relaxed), 1);
    let second = at.begin(&inp, t0).expect("another backend");
    assert_ne!(
        second, first,
        "a retry never goes back to a backend already tried"
    );
    // The budget (`retries: 1`) is spent.
    assert!(!at.failed(t0, &metrics));
    assert_eq!(metrics.retries.load(Ordering::Relaxed), 1);
    // An answer ends the attempt; a 5xx counts against the backend (on_5xx).
    let mut at = Attempts::new(up.clone());
    let b = at.begin(&inp, t0).unwrap();
    let fails = |i: usize| up.backends[i].failures.load(Ordering::Relaxed);
    let before = fails(b);
    at.answered(503, t0);
    assert_eq!(active(b), 0);
    assert_eq!(fails(b), before + 1);
    let b = at.begin(&inp, t0).unwrap();
    let before = fails(b);
    at.answered(200, t0);
    assert_eq!(fails(b), before, "a good answer counts no failure");
    assert_eq!(active(b), 0);
    // Dropped mid-attempt: the in-flight count is given back.
    let mut at = Attempts::new(up.clone());
    let b = at.begin(&inp, t0).unwrap();
    assert_eq!(active(b), 1);
    drop(at);
    assert_eq!(active(b), 0);
}

#[test]
fn a_stale_connection_is_retried_once_on_the_same_backend_outside_the_budget() {
    let t0 = crate::test_origin();
    let up = upstream(3, t0);
    let metrics = crate::metrics::Metrics::default();
    let inp = PickInput {
        client: b"",
        key: None,
    };
    let active = |i: usize| up.backends[i].active.load(Ordering::Relaxed);
    let mut at = AttemptState::new(&up);
    assert_eq!(
        at.again_on_fresh(&up),
        None,
        "no attempt yet: nothing to retry"
    );
    let b = at.begin(&up, &inp, t0).expect("a backend");
    assert_eq!((at.current(), at.last(), active(b)), (Some(b), Some(b), 1));
    // The pooled connection was found closed: the same backend, once, and the slot is
    // held again (the first one was given back).
    assert_eq!(at.again_on_fresh(&up), Some(b));
    assert_eq!(active(b), 1);
    assert!(at.stale_retry_used());
    assert_eq!(at.again_on_fresh(&up), None, "only once per request");
    assert_eq!(active(b), 0, "the refused retry still gave the slot back");
    assert_eq!(at.current(), None);
    assert_eq!(
        at.last(),
        Some(b),
        "the last backend is remembered after its slot"
    );
    // The budget (`retries: 1`) is untouched by it.
    assert!(at.may_retry());
    assert!(at.take_retry(&metrics));
    assert!(!at.may_retry());
    assert!(!at.take_retry(&metrics));
    assert_eq!(metrics.retries.load(Ordering::Relaxed), 1);
    // The next attempt skips the backend tried; `end` hands back the slot it held.
    let next = at.begin(&up, &inp, t0).expect("another backend");
    assert_ne!(next, b);
    assert_eq!(at.end(&up), Some(next));
    assert_eq!(at.end(&up), None, "ended once");
    assert_eq!(active(next), 0);
    // A response's status goes to passive health without ending the attempt.
    let mut at = AttemptState::new(&up);
    let b = at.begin(&up, &inp, t0).unwrap();
    let fails = up.backends[b].failures.load(Ordering::Relaxed);
    at.report_status(&up, 502, t0);
    assert_eq!(up.backends[b].failures.load(Ordering::Relaxed), fails + 1);
    assert_eq!(active(b), 1, "in flight until the body is read");
    // A failure that may not be retried (a POST) ends it and takes no retry.
    assert!(!at.failed(&up, false, t0, &metrics));
    assert_eq!(active(b), 0);
    assert_eq!(metrics.retries.load(Ordering::Relaxed), 1);
}

#[test]
fn health_hands_out_one_probe_per_backend_and_takes_verdicts_back() {
    let now = crate::test_origin();
    let ctx = crate::test_ctx(
        "load_balancing:\n  health_check:\n    path: /hc\n    interval: 1s\n    timeout: 2s\n    unhealthy_threshold: 1\nbackends:\n  - url: http://127.0.0.1:9001\n  - url: http://127.0.0.1:9002\n",
        now,
    );
    let mut h = Health::for_context(&ctx, now);
    let mut a = h.poll_probe(now).expect("first backend due");
    let b = h.poll_probe(now).expect("second backend due");
    assert!(
        h.poll_probe(now).is_none(),
        "one probe in flight per backend"
    );
    assert_eq!(a.deadline, now + Duration::from_secs(2));
    assert!(a.pending().starts_with(b"GET /hc HTTP/1.1\r\n"));
    let n = a.pending().len();
    a.wrote(n);
    assert!(a.pending().is_empty());
    assert_eq!(
        a.on_read(b"HTTP/1.1 50"),
        None,
        "undecided until the status line"
    );
    assert_eq!(a.on_read(b"3 Unavailable\r\n"), Some(Some(503)));
    h.on_result(a.id, Some(503), now);
    assert!(
        !ctx.upstreams[0].backends[0].is_healthy(),
        "503 is outside 200-399"
    );
    h.on_result(b.id, Some(200), now);
    assert!(ctx.upstreams[0].backends[1].is_healthy());
    assert_eq!(h.next_deadline(), Some(now + Duration::from_secs(1)));
}
