use super::*;
use proptest::prelude::*;
use std::cell::RefCell;

/// A test pool of backends with settable health and load.
struct Pool {
    weights: Vec<u32>,
    up: RefCell<Vec<bool>>,
    active: RefCell<Vec<u32>>,
    keys: Vec<Vec<u8>>,
}

impl Pool {
    fn new(weights: Vec<u32>) -> Pool {
        let n = weights.len();
        Pool {
            keys: (0..n)
                .map(|i| format!("10.0.{}.{}:80", i / 256, i % 256).into_bytes())
                .collect(),
            weights,
            up: RefCell::new(vec![true; n]),
            active: RefCell::new(vec![0; n]),
        }
    }
}

impl Avail for Pool {
    fn len(&self) -> usize {
        self.weights.len()
    }
    fn available(&self, i: usize) -> bool {
        self.up.borrow()[i]
    }
    fn weight(&self, i: usize) -> u32 {
        self.weights[i]
    }
    fn active(&self, i: usize) -> u32 {
        self.active.borrow()[i]
    }
    fn key(&self, i: usize) -> &[u8] {
        &self.keys[i]
    }
}

const ALL: [Algorithm; 5] = [
    Algorithm::RoundRobin,
    Algorithm::LeastConn,
    Algorithm::IpHash,
    Algorithm::ConsistentHash,
    Algorithm::P2c,
];

fn input(i: u64) -> ([u8; 8], [u8; 8]) {
    (i.to_be_bytes(), (i.wrapping_mul(0x9e37_79b9)).to_be_bytes())
}

#[test]
fn smooth_wrr_matches_nginx_sequence() {
    // nginx's documented example: weights 5, 1, 1 give a a b a c a a.
    let p = Pool::new(vec![5, 1, 1]);
    let b = Balancer::new(Algorithm::RoundRobin, HashMethod::Maglev, &p, 0);
    let seq: Vec<usize> = (0..7)
        .map(|_| {
            b.pick(
                &p,
                &PickInput {
                    client: b"",
                    key: None,
                },
                &[],
            )
            .unwrap()
        })
        .collect();
    assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
}

#[test]
fn large_pools_build_and_pick() {
    let weights: Vec<u32> = (0..10_000).map(|i| 1 + (i % 7)).collect();
    let p = Pool::new(weights);
    for alg in ALL {
        let method = if alg == Algorithm::ConsistentHash {
            HashMethod::Ring
        } else {
            HashMethod::Maglev
        };
        let b = Balancer::new(alg, method, &p, 7);
        let (c, k) = input(42);
        assert!(b
            .pick(
                &p,
                &PickInput {
                    client: &c,
                    key: Some(&k)
                },
                &[]
            )
            .is_some());
    }
}

#[test]
fn least_conn_prefers_idle_and_spreads_ties() {
    let p = Pool::new(vec![1, 1, 1]);
    let b = Balancer::new(Algorithm::LeastConn, HashMethod::Maglev, &p, 0);
    // Sequential requests (each finishes before the next) spread over all three.
    let mut seen = [0; 3];
    for _ in 0..30 {
        let i = b
            .pick(
                &p,
                &PickInput {
                    client: b"",
                    key: None,
                },
                &[],
            )
            .unwrap();
        b.on_begin(i);
        b.on_end(i);
        seen[i] += 1;
    }
    assert_eq!(seen, [10, 10, 10]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Picks follow the weights (exactly per period for round robin, within tolerance for
    /// the hashing and random algorithms).
    #[test]
    fn distribution_follows_weights(weights in proptest::collection::vec(1u32..6, 2..8), seed in any::<u64>()) {
        let p = Pool::new(weights.clone());
        let total: u32 = weights.iter().sum();
        for alg in [Algorithm::RoundRobin, Algorithm::ConsistentHash, Algorithm::P2c] {
            let b = Balancer::new(alg, HashMethod::Maglev, &p, seed);
            let n = 20_000u64;
            let mut counts = vec![0u64; weights.len()];
            for i in 0..n {
                let (c, k) = input(i ^ seed);
                let pick = b.pick(&p, &PickInput { client: &c, key: Some(&k) }, &[]).unwrap();
                counts[pick] += 1;
            }
            for (i, &w) in weights.iter().enumerate() {
                let expect = n as f64 * w as f64 / total as f64;
                let tol = if alg == Algorithm::RoundRobin { 1.0 + total as f64 } else { expect * 0.2 + 50.0 };
                prop_assert!((counts[i] as f64 - expect).abs() <= tol, "{:?}: backend {} weight {} got {} expected {:.0}", alg, i, w, counts[i], expect);
            }
        }
    }

    /// An unavailable backend is never picked, whatever the algorithm.
    #[test]
    fn unhealthy_never_picked(weights in proptest::collection::vec(1u32..5, 1..12), down in proptest::collection::vec(any::<bool>(), 12), seed in any::<u64>()) {
        let p = Pool::new(weights.clone());
        for (i, d) in down.iter().take(weights.len()).enumerate() {
            p.up.borrow_mut()[i] = !d;
        }
        let any_up = p.up.borrow().iter().any(|&u| u);
        for alg in ALL {
            for method in [HashMethod::Maglev, HashMethod::Ring] {
                let b = Balancer::new(alg, method, &p, seed);
                for i in 0..300u64 {
                    let (c, k) = input(i.wrapping_add(seed));
                    let pick = b.pick(&p, &PickInput { client: &c, key: Some(&k) }, &[]);
                    match pick {
                        Some(x) => prop_assert!(p.up.borrow()[x], "{:?} picked down backend {}", alg, x),
                        None => prop_assert!(!any_up, "{:?} found nothing while a backend is up", alg),
                    }
                    if let Some(x) = pick { b.on_begin(x); }
                }
            }
        }
    }

    /// least_conn never picks a busier backend than another available one of equal weight.
    #[test]
    fn least_conn_never_picks_busier(ops in proptest::collection::vec((any::<bool>(), 0usize..6), 1..200), down in 0usize..7) {
        let p = Pool::new(vec![2; 6]);
        if down < 6 { p.up.borrow_mut()[down] = false; }
        let b = Balancer::new(Algorithm::LeastConn, HashMethod::Maglev, &p, 0);
        let mut active = [0u32; 6];
        for (start, which) in ops {
            if start || active.iter().all(|&a| a == 0) {
                let Some(i) = b.pick(&p, &PickInput { client: b"", key: None }, &[]) else { continue };
                for j in 0..6 {
                    if p.up.borrow()[j] {
                        prop_assert!(active[i] <= active[j], "picked {} ({} active) over {} ({} active)", i, active[i], j, active[j]);
                    }
                }
                b.on_begin(i);
                active[i] += 1;
            } else if active[which] > 0 {
                b.on_end(which);
                active[which] -= 1;
            }
        }
    }

    /// Consistent hashing moves about 1/n of the keys when a backend is added.
    #[test]
    fn consistent_hash_minimal_disruption(n in 3usize..20, seed in any::<u64>()) {
        for method in [HashMethod::Maglev, HashMethod::Ring] {
            let before = Pool::new(vec![1; n]);
            let after = Pool::new(vec![1; n + 1]);
            let b0 = Balancer::new(Algorithm::ConsistentHash, method, &before, seed);
            let b1 = Balancer::new(Algorithm::ConsistentHash, method, &after, seed);
            let keys = 4000u64;
            let mut moved = 0;
            for i in 0..keys {
                let k = format!("user-{i}");
                let inp = PickInput { client: b"", key: Some(k.as_bytes()) };
                if b0.pick(&before, &inp, &[]) != b1.pick(&after, &inp, &[]) {
                    moved += 1;
                }
            }
            let ideal = keys as f64 / (n + 1) as f64;
            prop_assert!((moved as f64) < ideal * 1.6 + 40.0, "{:?}: {} of {} keys moved adding backend {}, ideal {:.0}", method, moved, keys, n + 1, ideal);
            // Removing (marking down) one backend moves only its own keys.
            after.up.borrow_mut()[0] = false;
            let mut moved_rm = 0;
            let mut owned = 0;
            for i in 0..keys {
                let k = format!("user-{i}");
                let inp = PickInput { client: b"", key: Some(k.as_bytes()) };
                let mut probe = Pool::new(vec![1; n + 1]);
                probe.keys = after.keys.clone();
                let a = b1.pick(&probe, &inp, &[]);
                let c = b1.pick(&after, &inp, &[]);
                if a == Some(0) { owned += 1; }
                if a != c { moved_rm += 1; }
            }
            prop_assert_eq!(moved_rm, owned);
        }
    }
}

#[test]
fn p2c_avoids_the_loaded_backend() {
    let p = Pool::new(vec![1, 1]);
    p.active.borrow_mut()[0] = 50;
    let b = Balancer::new(Algorithm::P2c, HashMethod::Maglev, &p, 1);
    let ones = (0..1000)
        .filter(|_| {
            b.pick(
                &p,
                &PickInput {
                    client: b"",
                    key: None,
                },
                &[],
            ) == Some(1)
        })
        .count();
    assert!(
        ones > 700,
        "p2c picked the idle backend only {ones}/1000 times"
    );
}

#[test]
fn exclusion_is_honoured() {
    let p = Pool::new(vec![1, 1, 1]);
    for alg in ALL {
        let b = Balancer::new(alg, HashMethod::Maglev, &p, 3);
        for i in 0..100u64 {
            let (c, k) = input(i);
            let got = b.pick(
                &p,
                &PickInput {
                    client: &c,
                    key: Some(&k),
                },
                &[0, 2],
            );
            assert_eq!(got, Some(1), "{alg:?}");
        }
        assert_eq!(
            b.pick(
                &p,
                &PickInput {
                    client: b"",
                    key: None
                },
                &[0, 1, 2]
            ),
            None
        );
    }
}

/// Regression (CI, proptest seed): with this seed backends 0 and 5 hashed to the same Maglev
/// skip, so their permutations were one walk shifted; adding a backend then moved 1.9x the
/// ideal share of keys. Skips are now distinct and the move is about 1/(n+1).
#[test]
fn maglev_equal_skips_do_not_double_disruption() {
    let seed = 10_557_631_026_469_699_408u64;
    for n in [6usize, 10] {
        let before = Pool::new(vec![1; n]);
        let after = Pool::new(vec![1; n + 1]);
        let b0 = Balancer::new(Algorithm::ConsistentHash, HashMethod::Maglev, &before, seed);
        let b1 = Balancer::new(Algorithm::ConsistentHash, HashMethod::Maglev, &after, seed);
        let moved = (0..4000u64)
            .filter(|i| {
                let k = format!("user-{i}");
                let inp = PickInput {
                    client: b"",
                    key: Some(k.as_bytes()),
                };
                b0.pick(&before, &inp, &[]) != b1.pick(&after, &inp, &[])
            })
            .count();
        let ideal = 4000.0 / (n + 1) as f64;
        assert!(
            (moved as f64) < ideal * 1.3,
            "n={n}: {moved} keys moved, ideal {ideal:.0}"
        );
    }
}
