//! YAML configuration. Key names follow the source documents where they apply
//! (`server.workers`, `max_connections`, `timeout`, `keep_alive_timeout`,
//! `load_balancing.algorithm`, `health_check.*`, `backends[].url/weight`, ...).
//! Unknown keys and bad values are errors naming the file, line and key.
//!
//! Parsing is pure: the file's text comes in, host names are resolved by a function the
//! runtime passes to [`Config::build`].

use crate::balance::{Algorithm, HashMethod};
use crate::cache::store::Store;
use crate::cache::{HttpCache, Policy, SetCookie, WallClock};
use crate::http1::Limits;
use crate::metrics::Metrics;
use crate::proxy::ProxyContext;
use crate::route::{HostPattern, Route, Router};
use crate::upstream::{
    ActiveHealth, BackendConfig, HashKey, PassiveHealth, PoolConfig, Upstream, UpstreamConfig,
};
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

mod diag;
pub use diag::{did_you_mean, ConfigError, Diag, Outline};

// ------------------------------------------------------------------ value types

/// A duration written as `30s`, `500ms`, `2m`, `1h`, `1d`, or a bare number of seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

/// A size written as `4GB`, `512KB`, `16KiB`, `10MB`, or a bare number of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(pub u64);

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration `{s}` (expected e.g. 30s, 500ms, 2m)"))?;
    let secs = match unit.trim() {
        "" | "s" | "sec" => n,
        "ms" => n / 1000.0,
        "us" => n / 1e6,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        u => {
            return Err(format!(
                "invalid duration unit `{u}` in `{s}` (use ms, s, m, h or d)"
            ))
        }
    };
    if !secs.is_finite() || !(0.0..=10.0 * 365.0 * 86400.0).contains(&secs) {
        return Err(format!("duration `{s}` out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid size `{s}` (expected e.g. 16KB, 10MB, 4GB)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" | "tib" => 1024.0f64.powi(4),
        u => {
            return Err(format!(
                "invalid size unit `{u}` in `{s}` (use B, KB, MB, GB)"
            ))
        }
    };
    let v = n * mult;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 / 2.0 {
        return Err(format!("size `{s}` out of range"));
    }
    Ok(v as u64)
}

struct StrOrNum<T>(fn(&str) -> Result<T, String>, fn(u64) -> T);

impl<T> Visitor<'_> for StrOrNum<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string like `30s` / `10MB` or a number")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.0)(v).map_err(E::custom)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        Ok((self.1)(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        if v < 0 {
            return Err(E::custom("must not be negative"));
        }
        Ok((self.1)(v as u64))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        (self.0)(&v.to_string()).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrOrNum(
            |s| parse_duration(s).map(Dur),
            |n| Dur(Duration::from_secs(n)),
        ))
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrOrNum(|s| parse_size(s).map(Size), Size))
    }
}

/// `algorithm:` names from the source documents plus trireme's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AlgorithmName(pub Algorithm);

impl<'de> Deserialize<'de> for AlgorithmName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Algorithm::from_name(&s).map(AlgorithmName).ok_or_else(|| {
            de::Error::custom(match did_you_mean(&s, Algorithm::NAMES.iter().copied()) {
                Some(m) => format!("unknown algorithm `{s}`; did you mean `{m}`?"),
                None => format!(
                    "unknown algorithm `{s}` (expected one of: {})",
                    Algorithm::NAMES.join(", ")
                ),
            })
        })
    }
}

/// `cache.set_cookie:` `strip`, `no_store` or `replay`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetCookieName(pub SetCookie);

impl<'de> Deserialize<'de> for SetCookieName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SetCookie::from_name(&s).map(SetCookieName).ok_or_else(|| {
            de::Error::custom(match did_you_mean(&s, SetCookie::NAMES.iter().copied()) {
                Some(m) => format!("unknown set_cookie policy `{s}`; did you mean `{m}`?"),
                None => format!(
                    "unknown set_cookie policy `{s}` (expected one of: {})",
                    SetCookie::NAMES.join(", ")
                ),
            })
        })
    }
}

/// A backend URL: `http://host:port` (port defaults to 80).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendUrl {
    pub host: String,
    pub port: u16,
}

impl BackendUrl {
    pub fn parse(s: &str) -> Result<BackendUrl, String> {
        let rest = if let Some(r) = s.strip_prefix("http://") {
            r
        } else if s.starts_with("https://") {
            return Err(format!(
                "`{s}`: https backends are not supported yet (use http://)"
            ));
        } else if s.contains("://") {
            return Err(format!("`{s}`: unsupported scheme (use http://host:port)"));
        } else {
            s
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') {
            return Err(format!(
                "`{s}`: a backend URL has no path (use http://host:port)"
            ));
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let end = v6
                .find(']')
                .ok_or_else(|| format!("`{s}`: unterminated IPv6 address"))?;
            let host = &v6[..end];
            let port = match &v6[end + 1..] {
                "" => 80,
                p => p
                    .strip_prefix(':')
                    .and_then(|p| p.parse().ok())
                    .ok_or_else(|| format!("`{s}`: invalid port"))?,
            };
            (host.to_string(), port)
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_string(),
                    p.parse()
                        .map_err(|_| format!("`{s}`: invalid port `{p}`"))?,
                ),
                None => (rest.to_string(), 80),
            }
        };
        if host.is_empty() {
            return Err(format!("`{s}`: missing host"));
        }
        Ok(BackendUrl { host, port })
    }
    /// Host header value used towards this backend.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl<'de> Deserialize<'de> for BackendUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        BackendUrl::parse(&s).map_err(de::Error::custom)
    }
}

/// `hash_key:` `header:NAME`, `cookie:NAME`, `path` or `ip`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HashKeySpec(pub HashKey);

impl<'de> Deserialize<'de> for HashKeySpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let k = if let Some(h) = s.strip_prefix("header:") {
            HashKey::Header(h.trim().to_string())
        } else if let Some(c) = s.strip_prefix("cookie:") {
            HashKey::Cookie(c.trim().to_string())
        } else if s == "path" || s == "uri" {
            HashKey::Path
        } else if s == "ip" || s == "client_ip" {
            HashKey::ClientIp
        } else {
            return Err(de::Error::custom(format!(
                "invalid hash_key `{s}` (expected header:NAME, cookie:NAME, path or ip)"
            )));
        };
        Ok(HashKeySpec(k))
    }
}

/// `expected_status: 200` or `"200-399"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusRange(pub u16, pub u16);

impl<'de> Deserialize<'de> for StatusRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        fn parse(s: &str) -> Result<StatusRange, String> {
            let bad =
                || format!("invalid expected_status `{s}` (expected e.g. 200 or \"200-399\")");
            let (a, b) = s.split_once('-').unwrap_or((s, s));
            let a: u16 = a.trim().parse().map_err(|_| bad())?;
            let b: u16 = b.trim().parse().map_err(|_| bad())?;
            if !(100..=599).contains(&a) || !(100..=599).contains(&b) || a > b {
                return Err(bad());
            }
            Ok(StatusRange(a, b))
        }
        d.deserialize_any(StrOrNum(parse, |n| StatusRange(n as u16, n as u16)))
    }
}

// ------------------------------------------------------------------ file schema

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub server: ServerSection,
    #[serde(default)]
    pub load_balancing: LbSection,
    #[serde(default)]
    pub backends: Vec<BackendSection>,
    /// Named upstreams for routing; the top-level `backends` form the upstream `default`.
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamSection>,
    #[serde(default)]
    pub routes: Vec<RouteSection>,
    /// Shared HTTP cache (RFC 9111). Absent or `size: 0`: no cache.
    #[serde(default)]
    pub cache: Option<CacheSection>,
    /// Admin listener (metrics, cache purge). Absent: none.
    #[serde(default)]
    pub admin: Option<AdminSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// Loopback by default: purge and metrics are for operators, not clients.
    pub listen: String,
    /// Require `Authorization: Bearer TOKEN` on every admin request (401 otherwise).
    /// Without one, a listener on a non-loopback address logs a warning at start.
    pub token: Option<String>,
    /// Admin connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// A client must send its whole request head within this time (408 otherwise).
    pub header_timeout: Dur,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            listen: "127.0.0.1:9901".into(),
            token: None,
            max_connections: 16,
            header_timeout: Dur(Duration::from_secs(5)),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSection {
    /// Bytes of memory for the in-process (L1) store; `l1.size` says the same.
    pub size: Option<Size>,
    /// Only `lru` (least recently used) is implemented.
    pub eviction_policy: String,
    /// Responses with larger bodies are passed through, not stored.
    pub max_object_size: Size,
    /// No entry stays fresh longer than this, whatever the origin says.
    pub max_ttl: Dur,
    /// Freshness for storable responses that state none (0: RFC 9111 heuristics only).
    pub default_ttl: Dur,
    /// Request header fields added to every cache key (the key extension), e.g. a tenant.
    pub key_headers: Vec<String>,
    /// Store shards (each its own lock and LRU); default: 16.
    pub shards: usize,
    /// Concurrent misses for one key wait this long for the first one's response before
    /// going to the backend themselves (nginx: `proxy_cache_lock_timeout`).
    pub lock_timeout: Dur,
    /// Responses with `Set-Cookie`: `strip` (default: stored only with explicit shared
    /// freshness, without the cookie), `no_store`, or `replay` (stored with the cookie).
    pub set_cookie: SetCookieName,
    /// `Vary` variants kept per URL; a new one beyond that replaces the URL's least
    /// recently used variant (a flood of distinct `Accept-Encoding` values stays bounded).
    /// Targeted cache-control fields (RFC 9213) this cache obeys over `Cache-Control`,
    /// first present wins.
    pub targeted_fields: Vec<String>,
    /// Remove the targeted fields from what is forwarded to clients.
    pub strip_targeted_fields: bool,
    pub max_variants: usize,
    /// Background refreshes (stale-while-revalidate, warming) carried out at once; more
    /// wait in a bounded queue.
    pub refresh_concurrency: usize,
    pub l1: Option<L1Section>,
    /// The shared tier: a Redis that several trireme instances use.
    pub l2: Option<L2Section>,
    /// Paths fetched into the cache at start.
    pub warming: Option<WarmingSection>,
    /// The seed configs' form of start-up warming (`preload.paths`).
    pub preload: Option<PreloadSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WarmingSection {
    pub enabled: bool,
    /// The `Host` the warmed entries are keyed under (what clients send).
    pub host: Option<String>,
    pub on_startup: Vec<WarmPath>,
    /// Paths fetched again on a cron schedule (UTC; 5 fields, or 6 with seconds first).
    pub scheduled: Vec<ScheduledWarm>,
    /// Refresh entries that drew `threshold` requests this hour before they expire.
    pub predictive: Option<PredictiveSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PredictiveSection {
    pub enabled: bool,
    /// Requests in the current hour that make an entry worth refreshing early.
    pub threshold: u64,
    /// Refresh at most this long before expiry (and at most half the lifetime before).
    pub horizon: Dur,
}

impl Default for PredictiveSection {
    fn default() -> Self {
        PredictiveSection {
            enabled: true,
            threshold: 10,
            horizon: Dur(Duration::from_secs(30)),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduledWarm {
    pub cron: String,
    pub paths: Vec<String>,
}

impl Default for WarmingSection {
    fn default() -> Self {
        WarmingSection {
            enabled: true,
            host: None,
            on_startup: Vec::new(),
            scheduled: Vec::new(),
            predictive: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmPath {
    pub path: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreloadSection {
    pub enabled: bool,
    pub paths: Vec<String>,
}

impl CacheSection {
    /// Paths to fetch at start and the host to key them under.
    pub fn warm_paths(&self) -> (Option<&str>, Vec<&str>) {
        let mut paths = Vec::new();
        if let Some(w) = self.warming.as_ref().filter(|w| w.enabled) {
            paths.extend(w.on_startup.iter().map(|p| p.path.as_str()));
            for s in &w.scheduled {
                paths.extend(s.paths.iter().map(String::as_str));
            }
        }
        if let Some(p) = self.preload.as_ref().filter(|p| p.enabled) {
            paths.extend(p.paths.iter().map(String::as_str));
        }
        (self.warming.as_ref().and_then(|w| w.host.as_deref()), paths)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct L1Section {
    pub size: Option<Size>,
    /// Same as `cache.default_ttl` (the seed configs' `l1.ttl: 300`).
    pub ttl: Option<Dur>,
}

impl Default for CacheSection {
    fn default() -> Self {
        CacheSection {
            size: None,
            eviction_policy: "lru".into(),
            max_object_size: Size(8 * 1024 * 1024),
            max_ttl: Dur(Duration::from_secs(365 * 86400)),
            default_ttl: Dur(Duration::ZERO),
            key_headers: Vec::new(),
            shards: 16,
            lock_timeout: Dur(Duration::from_secs(5)),
            set_cookie: SetCookieName::default(),
            max_variants: crate::cache::store::DEFAULT_MAX_VARIANTS,
            targeted_fields: vec!["CDN-Cache-Control".into()],
            strip_targeted_fields: false,
            refresh_concurrency: 16,
            l1: None,
            l2: None,
            warming: None,
            preload: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct L2Section {
    pub enabled: bool,
    pub host: String,
    pub port: u16,
    /// Redis expiry of the entries trireme writes (`3600` or `1h`).
    pub ttl: Dur,
    /// Connect plus reply time a lookup may take before the request goes on without L2.
    pub timeout: Dur,
    /// Prepended to every Redis key (several deployments can share one Redis).
    pub key_prefix: String,
    /// `AUTH` on every new connection (Redis `requirepass`, or an ACL user's password).
    pub password: Option<String>,
    /// ACL user name for `AUTH` (Redis 6+); needs `password`.
    pub username: Option<String>,
    /// Database number (`SELECT`).
    pub db: u32,
    /// Not trireme's to bound: refused with a pointer to Redis's `maxmemory`.
    pub size: Option<Size>,
}

impl Default for L2Section {
    fn default() -> Self {
        L2Section {
            enabled: true,
            host: "127.0.0.1".into(),
            port: 6379,
            ttl: Dur(Duration::from_secs(3600)),
            timeout: Dur(Duration::from_millis(100)),
            key_prefix: "trireme:".into(),
            password: None,
            username: None,
            db: 0,
            size: None,
        }
    }
}

impl CacheSection {
    /// The L2 section when L2 is on.
    pub fn l2_on(&self) -> Option<&L2Section> {
        self.l2.as_ref().filter(|l| l.enabled)
    }

    /// L1 bytes: `size`, else `l1.size`, else 0 (off).
    pub fn l1_size(&self) -> u64 {
        self.size
            .or(self.l1.as_ref().and_then(|l| l.size))
            .map_or(0, |s| s.0)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    pub listen: String,
    pub workers: Option<usize>,
    /// Unset: as many as the open-files limit allows (two descriptors per connection),
    /// at most 100,000.
    pub max_connections: Option<usize>,
    /// Inactivity allowed while a body is in flight.
    pub timeout: Dur,
    pub keep_alive_timeout: Dur,
    #[serde(alias = "client_header_timeout")]
    pub header_timeout: Dur,
    pub max_body_size: Size,
    pub max_header_size: Size,
    pub max_uri_length: Size,
    pub max_headers: usize,
    #[serde(alias = "keepalive_requests")]
    pub max_requests_per_connection: u32,
    /// How long a graceful shutdown waits for requests in flight.
    pub shutdown_timeout: Dur,
    pub connection_pool: PoolSection,
    /// trireme-tokio only: one multi-thread runtime (work stealing), or one current-thread
    /// runtime per worker with its own listener (thread-per-core, like trireme-mio).
    pub tokio_flavor: TokioFlavor,
    /// Client addresses or ranges (`10.0.0.0/8`, `::1`) whose `X-Forwarded-For`,
    /// `Forwarded`, `X-Real-IP`, `X-Forwarded-Host` and `X-Forwarded-Proto` are kept and
    /// appended to; from every other client they are replaced. Default: none.
    pub trusted_proxies: Vec<String>,
    /// Request paths are normalised (dot segments removed, needless escapes decoded) for
    /// routing, the cache and the backend; this also merges `//` into `/` (nginx's
    /// `merge_slashes`, on by default).
    pub merge_slashes: bool,
    /// Forward `TRACE` requests (default: answer 405, as nginx does).
    pub allow_trace: bool,
    /// The whole request body must arrive within this time of the request head (408
    /// otherwise), besides `timeout` between reads.
    pub client_body_timeout: Dur,
    /// Request bodies up to this size are received whole before a backend connection is
    /// used (nginx's `client_body_buffer_size`); 0 streams every body at once.
    pub client_body_buffer_size: Size,
    /// Connections one client address may have open at once (all workers); more are
    /// closed at accept. Unset: no limit.
    pub max_connections_per_ip: Option<u32>,
}

/// `server.max_connections` when unset and the open-files limit allows it.
pub const DEFAULT_MAX_CONNECTIONS: usize = 100_000;
/// Descriptors kept aside from client and upstream connections: listeners, pooled
/// connections, epoll and event fds, logs, health probes.
pub const RESERVED_FDS: u64 = 1024;

/// Process-level settings every runtime reads.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Worker threads (at least 1).
    pub workers: usize,
    /// Client connections open at once, over all workers; more are closed at accept.
    pub max_connections: usize,
    /// How long a graceful shutdown waits for requests in flight.
    pub drain_timeout: Duration,
    pub tokio_flavor: TokioFlavor,
    /// Background fetches (cache refreshes, warming) at once (`cache.refresh_concurrency`).
    pub refresh_concurrency: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokioFlavor {
    #[default]
    MultiThread,
    CurrentThread,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: "127.0.0.1:8080".into(),
            workers: None,
            max_connections: None,
            timeout: Dur(Duration::from_secs(30)),
            keep_alive_timeout: Dur(Duration::from_secs(75)),
            header_timeout: Dur(Duration::from_secs(10)),
            max_body_size: Size(10 * 1024 * 1024),
            max_header_size: Size(16 * 1024),
            max_uri_length: Size(8 * 1024),
            max_headers: 100,
            max_requests_per_connection: 10_000,
            shutdown_timeout: Dur(Duration::from_secs(30)),
            connection_pool: PoolSection::default(),
            tokio_flavor: TokioFlavor::default(),
            trusted_proxies: Vec::new(),
            merge_slashes: true,
            allow_trace: false,
            client_body_timeout: Dur(Duration::from_secs(60)),
            client_body_buffer_size: Size(16 * 1024),
            max_connections_per_ip: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolSection {
    #[serde(alias = "reuse_connections")]
    pub enabled: bool,
    /// Idle connections kept per backend and worker.
    #[serde(alias = "max_per_backend")]
    pub max_idle: usize,
    pub idle_timeout: Dur,
    pub max_lifetime: Dur,
    pub max_requests: u32,
}

impl Default for PoolSection {
    fn default() -> Self {
        let d = PoolConfig::default();
        PoolSection {
            enabled: d.enabled,
            max_idle: d.max_idle,
            idle_timeout: Dur(d.idle_timeout),
            max_lifetime: Dur(d.max_lifetime),
            max_requests: d.max_requests,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LbSection {
    pub algorithm: AlgorithmName,
    pub hash_key: HashKeySpec,
    pub hash_method: HashMethodName,
    pub seed: u64,
    pub retries: u32,
    pub connect_timeout: Dur,
    #[serde(alias = "read_timeout")]
    pub response_timeout: Dur,
    pub health_check: Option<HealthSection>,
    pub passive_health: PassiveSection,
    pub connection_draining: DrainSection,
}

impl Default for LbSection {
    fn default() -> Self {
        LbSection {
            algorithm: AlgorithmName(Algorithm::RoundRobin),
            hash_key: HashKeySpec(HashKey::ClientIp),
            hash_method: HashMethodName(HashMethod::Maglev),
            seed: 0x0074_7269_7265_6d65,
            retries: 2,
            connect_timeout: Dur(Duration::from_secs(5)),
            response_timeout: Dur(Duration::from_secs(60)),
            health_check: None,
            passive_health: PassiveSection::default(),
            connection_draining: DrainSection::default(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HashMethodName(pub HashMethod);

impl<'de> Deserialize<'de> for HashMethodName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "maglev" => Ok(HashMethodName(HashMethod::Maglev)),
            "ring" | "ketama" => Ok(HashMethodName(HashMethod::Ring)),
            _ => Err(de::Error::custom(format!(
                "unknown hash_method `{s}` (expected maglev or ring)"
            ))),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthSection {
    pub enabled: bool,
    pub path: String,
    pub interval: Dur,
    pub timeout: Dur,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    pub expected_status: StatusRange,
}

impl Default for HealthSection {
    fn default() -> Self {
        let d = ActiveHealth::default();
        HealthSection {
            enabled: true,
            path: d.path,
            interval: Dur(d.interval),
            timeout: Dur(d.timeout),
            healthy_threshold: d.healthy_threshold,
            unhealthy_threshold: d.unhealthy_threshold,
            expected_status: StatusRange(d.expected_status.0, d.expected_status.1),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PassiveSection {
    pub max_fails: u32,
    pub fail_timeout: Dur,
    pub on_5xx: bool,
    /// Percent of healthy backends below which health is ignored (0-100, 0: off).
    pub panic_threshold: u8,
}

impl Default for PassiveSection {
    fn default() -> Self {
        let d = PassiveHealth::default();
        PassiveSection {
            max_fails: d.max_fails,
            fail_timeout: Dur(d.fail_timeout),
            on_5xx: d.on_5xx,
            panic_threshold: d.panic_threshold,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrainSection {
    pub enabled: bool,
    pub timeout: Option<Dur>,
}

impl Default for DrainSection {
    fn default() -> Self {
        DrainSection {
            enabled: true,
            timeout: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSection {
    pub url: BackendUrl,
    #[serde(default = "one")]
    pub weight: u32,
    /// Requests in flight to this backend at most, all workers together (0: no limit);
    /// beyond it another backend is picked, or the request gets a 503.
    #[serde(default)]
    pub max_conns: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    pub backends: Vec<BackendSection>,
    /// Replaces the top-level `load_balancing` for this upstream when given.
    #[serde(default)]
    pub load_balancing: Option<LbSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default, alias = "path_prefix")]
    pub path: Option<String>,
    pub upstream: String,
}

// ------------------------------------------------------------------ resolved config

/// A validated configuration, ready to build a [`ProxyContext`].
#[derive(Debug)]
pub struct Config {
    pub file: FileConfig,
    pub listen: SocketAddr,
    /// TLS on the listener (`--tls-cert` / `--tls-key`: the files are read by the caller).
    pub tls: Option<crate::tls::TlsAcceptor>,
    /// The certificate and key files `tls` was made from, read again on SIGHUP.
    pub tls_files: Vec<(std::path::PathBuf, std::path::PathBuf)>,
    /// The source's name and outline, to place errors found later (by `build`).
    origin: (String, Outline),
}

/// A request path a config key names: what trireme will put in a request line.
fn check_path(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!(
            "`{p}` must start with / (e.g. /{})",
            p.trim_start_matches('/')
        ));
    }
    if let Some(c) = p
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || *c == '#')
    {
        return Err(format!(
            "`{p}` contains {c:?}, which a request path cannot hold"
        ));
    }
    Ok(())
}

/// Collects the semantic errors of a config, each placed by its key path.
struct Checks<'a> {
    file: &'a str,
    outline: &'a Outline,
    diags: Vec<Diag>,
}

impl Checks<'_> {
    fn err(&mut self, key: &str, msg: impl Into<String>) {
        let (line, col) = self.outline.find(key);
        self.diags.push(Diag {
            line,
            col,
            key: key.to_string(),
            msg: msg.into(),
        });
    }

    fn lb(&mut self, at: &str, lb: &LbSection) {
        if let Some(h) = &lb.health_check {
            if let Err(e) = check_path(&h.path) {
                self.err(&format!("{at}.health_check.path"), e);
            }
            if h.interval.0.is_zero() {
                self.err(&format!("{at}.health_check.interval"), "must be above 0");
            }
        }
        if lb.passive_health.panic_threshold > 100 {
            self.err(
                &format!("{at}.passive_health.panic_threshold"),
                "a percentage: 0-100 (0 turns panic mode off)",
            );
        }
    }

    fn backends(&mut self, at: &str, list: &[BackendSection]) {
        for (i, b) in list.iter().enumerate() {
            if b.weight == 0 || b.weight > 10_000 {
                self.err(
                    &format!("{at}[{i}].weight"),
                    format!("weight {} out of range (1-10000)", b.weight),
                );
            }
        }
    }
}

impl Config {
    /// Parse and validate YAML text. `file` names the source in error messages; every
    /// error is reported, each as `FILE:LINE:COL: KEY: message`.
    pub fn from_yaml(src: &str, file: &str) -> Result<Config, ConfigError> {
        let mut read = diag::deserialize_all::<FileConfig>(src);
        let Some(fc) = read.value.take() else {
            return Err(ConfigError {
                file: file.to_string(),
                diags: read.diags,
            });
        };
        let outline = std::mem::take(&mut read.outline);
        let mut diags = read.diags.clone();
        match Self::check(fc, outline, file) {
            Ok(c) if diags.is_empty() => return Ok(c),
            Ok(_) => {}
            // Both kinds, less what only echoes an entry blanked for its own error.
            Err(e) => diags.extend(e.diags.into_iter().filter(|d| !read.echoes(&d.key))),
        }
        diags.sort_by_key(|d| (d.line == 0, d.line, d.col));
        Err(ConfigError {
            file: file.to_string(),
            diags,
        })
    }

    /// Validate an already-built [`FileConfig`] (used by the config-less CLI path); `src`
    /// is the YAML it came from, if any, to place errors.
    pub fn validate(fc: FileConfig, src: &str, file: &str) -> Result<Config, ConfigError> {
        let outline = Outline::parse(src).unwrap_or_default();
        Self::check(fc, outline, file)
    }

    fn check(fc: FileConfig, outline: Outline, file: &str) -> Result<Config, ConfigError> {
        let mut ck = Checks {
            file,
            outline: &outline,
            diags: Vec::new(),
        };
        let listen: Option<SocketAddr> = fc.server.listen.parse().ok();
        if listen.is_none() {
            ck.err(
                "server.listen",
                format!(
                    "invalid listen address `{}` (expected IP:PORT, e.g. 0.0.0.0:8080)",
                    fc.server.listen
                ),
            );
        }
        if fc.backends.is_empty() && fc.upstreams.is_empty() {
            ck.err(
                "backends",
                "no backends configured (add `backends: [{url: http://127.0.0.1:9000}]`)",
            );
        }
        if fc.upstreams.contains_key("default") && !fc.backends.is_empty() {
            ck.err(
                "upstreams.default",
                "the upstream name `default` is taken by the top-level `backends`",
            );
        }
        ck.lb("load_balancing", &fc.load_balancing);
        ck.backends("backends", &fc.backends);
        for (name, u) in &fc.upstreams {
            if u.backends.is_empty() {
                ck.err(
                    &format!("upstreams.{name}.backends"),
                    format!("upstream `{name}` has no backends"),
                );
            }
            ck.backends(&format!("upstreams.{name}.backends"), &u.backends);
            if let Some(lb) = &u.load_balancing {
                ck.lb(&format!("upstreams.{name}.load_balancing"), lb);
            }
        }
        for (i, r) in fc.routes.iter().enumerate() {
            let known = fc.upstreams.contains_key(&r.upstream)
                || (r.upstream == "default" && !fc.backends.is_empty());
            if !known {
                let mut names: Vec<&str> = fc.upstreams.keys().map(String::as_str).collect();
                if !fc.backends.is_empty() {
                    names.push("default");
                }
                let hint = diag::did_you_mean(&r.upstream, names.iter().copied())
                    .map(|m| format!("; did you mean `{m}`?"))
                    .unwrap_or_default();
                ck.err(
                    &format!("routes[{i}].upstream"),
                    format!("route names unknown upstream `{}`{hint}", r.upstream),
                );
            }
            if let Some(p) = &r.path {
                if let Err(e) = check_path(p) {
                    ck.err(&format!("routes[{i}].path"), e);
                }
            }
        }
        if fc.server.max_headers == 0 || fc.server.max_headers > 256 {
            ck.err("server.max_headers", "must be 1-256");
        }
        if fc.server.max_requests_per_connection == 0 {
            ck.err("server.max_requests_per_connection", "must be at least 1");
        }
        if let Some(a) = &fc.admin {
            if a.listen.parse::<SocketAddr>().is_err() {
                ck.err(
                    "admin.listen",
                    format!("`{}` is not an address (IP:PORT)", a.listen),
                );
            }
            if a.max_connections == 0 {
                ck.err("admin.max_connections", "must be at least 1");
            }
            if a.header_timeout.0.is_zero() {
                ck.err("admin.header_timeout", "must be above 0");
            }
            if a.token
                .as_ref()
                .is_some_and(|t| t.len() < 16 || !t.bytes().all(|b| b.is_ascii_graphic()))
            {
                ck.err(
                    "admin.token",
                    "a token needs at least 16 printable characters, no spaces",
                );
            }
        }
        if let Some(c) = &fc.cache {
            if !c.eviction_policy.eq_ignore_ascii_case("lru") {
                ck.err("cache.eviction_policy", "only `lru` is supported");
            }
            if let Some(w) = &c.warming {
                for (i, s) in w.scheduled.iter().enumerate() {
                    if let Err(e) = crate::cache::CronSchedule::parse(&s.cron) {
                        ck.err(&format!("cache.warming.scheduled[{i}].cron"), e.to_string());
                    }
                    for (j, p) in s.paths.iter().enumerate() {
                        if let Err(e) = check_path(p) {
                            ck.err(&format!("cache.warming.scheduled[{i}].paths[{j}]"), e);
                        }
                    }
                }
                for (i, p) in w.on_startup.iter().enumerate() {
                    if let Err(e) = check_path(&p.path) {
                        ck.err(&format!("cache.warming.on_startup[{i}].path"), e);
                    }
                }
            }
            let (host, paths) = c.warm_paths();
            if !paths.is_empty() && host.is_none() {
                ck.err(
                    "cache.warming.host",
                    "cache warming needs `cache.warming.host`, the Host clients send, to key what it fetches",
                );
            }
            if let Some(l2) = &c.l2 {
                if l2.size.is_some() {
                    ck.err(
                        "cache.l2.size",
                        "Redis bounds its own memory: set `maxmemory` and `maxmemory-policy allkeys-lru` in redis.conf instead",
                    );
                }
                if l2.enabled && c.l1_size() == 0 {
                    ck.err(
                        "cache.l2.enabled",
                        "L2 needs the L1 cache: set `cache.size` (or `cache.l1.size`)",
                    );
                }
                if l2.timeout.0.is_zero() {
                    ck.err("cache.l2.timeout", "must be above 0");
                }
                if l2.ttl.0.as_millis() == 0 {
                    ck.err("cache.l2.ttl", "must be at least 1ms");
                }
                if l2.username.is_some() && l2.password.is_none() {
                    ck.err("cache.l2.username", "an ACL user needs `password` too");
                }
                if l2.port == 0 {
                    ck.err("cache.l2.port", "must be a port (1-65535)");
                }
            }
            if c.max_variants == 0 {
                ck.err("cache.max_variants", "must be at least 1");
            }
            for (i, t) in c.targeted_fields.iter().enumerate() {
                let token = !t.is_empty()
                    && t.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
                if !token || t.eq_ignore_ascii_case("cache-control") {
                    ck.err(
                        &format!("cache.targeted_fields[{i}]"),
                        format!("`{t}` is not a targeted field name (e.g. CDN-Cache-Control)"),
                    );
                }
            }
            if c.l1_size() > 0 && c.max_object_size.0 == 0 {
                ck.err("cache.max_object_size", "must be above 0");
            }
        }
        for (i, t) in fc.server.trusted_proxies.iter().enumerate() {
            if let Err(e) = crate::forward::Cidr::parse(t) {
                ck.err(&format!("server.trusted_proxies[{i}]"), e.to_string());
            }
        }
        if fc.server.client_body_buffer_size.0 > 1 << 20 {
            ck.err(
                "server.client_body_buffer_size",
                "at most 1MB (bodies beyond it are streamed)",
            );
        }
        if fc.server.client_body_timeout.0.is_zero() {
            ck.err("server.client_body_timeout", "must be above 0");
        }
        if fc.server.max_connections_per_ip == Some(0) {
            ck.err(
                "server.max_connections_per_ip",
                "must be at least 1 (leave it out for no limit)",
            );
        }
        if fc.server.max_connections == Some(0) {
            ck.err("server.max_connections", "must be at least 1");
        }
        match listen {
            Some(listen) if ck.diags.is_empty() => Ok(Config {
                file: fc,
                listen,
                tls: None,
                tls_files: Vec::new(),
                origin: (file.to_string(), outline),
            }),
            _ => Err(ConfigError {
                file: ck.file.to_string(),
                diags: ck.diags,
            }),
        }
    }

    /// What a runtime needs besides the proxy context. `cores` is the machine's core count,
    /// used when `server.workers` is unset or 0; `fd_limit` the process's open-files limit,
    /// which bounds `max_connections` when the config leaves it unset.
    pub fn run_options(&self, cores: usize, fd_limit: u64) -> RunOptions {
        RunOptions {
            workers: match self.file.server.workers {
                Some(n) if n > 0 => n,
                _ => cores.max(1),
            },
            max_connections: self.file.server.max_connections.unwrap_or_else(|| {
                let fit = fd_limit.saturating_sub(RESERVED_FDS) / 2;
                fit.clamp(1, DEFAULT_MAX_CONNECTIONS as u64) as usize
            }),
            drain_timeout: self.drain_timeout(),
            tokio_flavor: self.file.server.tokio_flavor,
            refresh_concurrency: self
                .file
                .cache
                .as_ref()
                .map_or(16, |c| c.refresh_concurrency.max(1)),
        }
    }

    pub fn drain_timeout(&self) -> Duration {
        let d = &self.file.load_balancing.connection_draining;
        match (d.enabled, d.timeout) {
            (false, _) => Duration::ZERO,
            (true, Some(t)) => t.0,
            (true, None) => self.file.server.shutdown_timeout.0,
        }
    }

    /// A problem found after validation, placed at `key` in the source.
    fn diag(&self, key: &str, msg: String) -> Diag {
        let (line, col) = self.origin.1.find(key);
        Diag {
            line,
            col,
            key: key.to_string(),
            msg,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn upstream_config(
        &self,
        at: &str,
        name: &str,
        lb: &LbSection,
        backends: &[BackendSection],
        pool: &PoolSection,
        resolve: &dyn Fn(&str, u16) -> Result<SocketAddr, String>,
        errors: &mut Vec<Diag>,
    ) -> UpstreamConfig {
        let mut bs = Vec::new();
        for (i, b) in backends.iter().enumerate() {
            let addr = match resolve(&b.url.host, b.url.port) {
                Ok(a) => a,
                Err(e) => {
                    errors.push(self.diag(
                        &format!("{at}[{i}].url"),
                        format!("backend `{}` of upstream `{name}`: {e}", b.url.authority()),
                    ));
                    continue;
                }
            };
            bs.push(BackendConfig {
                addr,
                host: b.url.authority(),
                weight: b.weight,
                max_conns: b.max_conns,
            });
        }
        UpstreamConfig {
            name: name.to_string(),
            backends: bs,
            algorithm: lb.algorithm.0,
            hash_method: lb.hash_method.0,
            hash_key: lb.hash_key.0.clone(),
            seed: lb.seed,
            passive: PassiveHealth {
                max_fails: lb.passive_health.max_fails,
                fail_timeout: lb.passive_health.fail_timeout.0,
                on_5xx: lb.passive_health.on_5xx,
                panic_threshold: lb.passive_health.panic_threshold,
            },
            active: lb
                .health_check
                .as_ref()
                .filter(|h| h.enabled)
                .map(|h| ActiveHealth {
                    path: h.path.clone(),
                    interval: h.interval.0,
                    timeout: h.timeout.0,
                    healthy_threshold: h.healthy_threshold.max(1),
                    unhealthy_threshold: h.unhealthy_threshold.max(1),
                    expected_status: (h.expected_status.0, h.expected_status.1),
                }),
            pool: PoolConfig {
                enabled: pool.enabled,
                max_idle: pool.max_idle,
                idle_timeout: pool.idle_timeout.0,
                max_lifetime: pool.max_lifetime.0,
                max_requests: pool.max_requests.max(1),
            },
            retries: lb.retries,
            connect_timeout: lb.connect_timeout.0,
            response_timeout: lb.response_timeout.0,
        }
    }

    /// Build the shared context: upstreams (resolving host names with `resolve`), routes,
    /// limits and timeouts. `base` is the runtime's clock origin.
    /// Build the shared context. `base` and `wall` are the same moment on the monotonic
    /// and the wall clock (the cache converts between them for HTTP dates).
    pub fn build(
        &self,
        base: Instant,
        wall: SystemTime,
        resolve: &dyn Fn(&str, u16) -> Result<SocketAddr, String>,
    ) -> Result<Arc<ProxyContext>, ConfigError> {
        let fc = &self.file;
        let pool = &fc.server.connection_pool;
        let mut ups: Vec<UpstreamConfig> = Vec::new();
        let mut names: Vec<String> = Vec::new();
        let mut errors = Vec::new();
        if !fc.backends.is_empty() {
            ups.push(self.upstream_config(
                "backends",
                "default",
                &fc.load_balancing,
                &fc.backends,
                pool,
                resolve,
                &mut errors,
            ));
            names.push("default".into());
        }
        for (name, u) in &fc.upstreams {
            let lb = u.load_balancing.as_ref().unwrap_or(&fc.load_balancing);
            ups.push(self.upstream_config(
                &format!("upstreams.{name}.backends"),
                name,
                lb,
                &u.backends,
                pool,
                resolve,
                &mut errors,
            ));
            names.push(name.clone());
        }
        // L2's Redis is an upstream of its own: the runtimes pool its connections and
        // drive lookups like any backend request.
        let l2 = match fc
            .cache
            .as_ref()
            .filter(|c| c.l1_size() > 0)
            .and_then(|c| c.l2_on())
        {
            Some(l) => {
                let addr = match resolve(&l.host, l.port) {
                    Ok(a) => a,
                    Err(e) => {
                        errors.push(
                            self.diag("cache.l2.host", format!("`{}:{}`: {e}", l.host, l.port)),
                        );
                        return Err(ConfigError {
                            file: self.origin.0.clone(),
                            diags: errors,
                        });
                    }
                };
                ups.push(UpstreamConfig {
                    name: "cache-l2".into(),
                    backends: vec![BackendConfig {
                        addr,
                        host: format!("{}:{}", l.host, l.port),
                        weight: 1,
                        max_conns: 0,
                    }],
                    algorithm: Algorithm::RoundRobin,
                    hash_method: HashMethod::Maglev,
                    hash_key: HashKey::ClientIp,
                    seed: 0,
                    passive: PassiveHealth::default(),
                    active: None,
                    pool: PoolConfig {
                        enabled: true,
                        max_idle: pool.max_idle.max(16),
                        idle_timeout: pool.idle_timeout.0,
                        max_lifetime: pool.max_lifetime.0,
                        max_requests: u32::MAX,
                    },
                    retries: 0,
                    connect_timeout: l.timeout.0,
                    response_timeout: l.timeout.0,
                });
                Some((l, addr, (ups.len() - 1) as u16))
            }
            None => None,
        };
        if !errors.is_empty() {
            return Err(ConfigError {
                file: self.origin.0.clone(),
                diags: errors,
            });
        }
        let upstreams: Vec<Arc<Upstream>> = ups
            .into_iter()
            .enumerate()
            .map(|(i, u)| Arc::new(Upstream::new(i as u16, u, base)))
            .collect();
        let routes = fc
            .routes
            .iter()
            .map(|r| Route {
                host: r.host.as_deref().map(HostPattern::parse),
                path_prefix: r.path.clone().unwrap_or_else(|| "/".into()),
                upstream: names.iter().position(|n| *n == r.upstream).unwrap_or(0),
            })
            .collect();
        let default = if fc.backends.is_empty() {
            None
        } else {
            Some(0)
        };
        let s = &fc.server;
        Ok(Arc::new(ProxyContext {
            limits: Limits {
                max_head: s.max_header_size.0 as usize,
                max_uri: s.max_uri_length.0 as usize,
                max_headers: s.max_headers,
                max_body: s.max_body_size.0,
            },
            header_timeout: s.header_timeout.0,
            keep_alive_timeout: s.keep_alive_timeout.0,
            idle_timeout: s.timeout.0,
            max_requests_per_connection: s.max_requests_per_connection,
            upstreams,
            router: Router { routes, default },
            metrics: Arc::new(Metrics::default()),
            via_name: "trireme".into(),
            merge_slashes: s.merge_slashes,
            allow_trace: s.allow_trace,
            body_timeout: s.client_body_timeout.0,
            body_buffer: s.client_body_buffer_size.0.min(1 << 20) as usize,
            per_ip: s.max_connections_per_ip.map(crate::admission::PerIp::new),
            admin: None,
            tls: self.tls.clone(),
            trusted_proxies: crate::forward::TrustedProxies(
                s.trusted_proxies
                    .iter()
                    .filter_map(|t| crate::forward::Cidr::parse(t).ok())
                    .collect(),
            ),
            clock: WallClock { base, wall },
            cache: fc.cache.as_ref().and_then(|c| {
                let size = c.l1_size() as usize;
                (size > 0).then(|| {
                    let mut hc = HttpCache::new(
                        Store::new(size, c.shards.max(1), c.max_object_size.0 as usize)
                            .with_max_variants(c.max_variants),
                        Policy {
                            max_ttl: c.max_ttl.0,
                            default_ttl: c
                                .l1
                                .as_ref()
                                .and_then(|l| l.ttl)
                                .map_or(c.default_ttl.0, |t| t.0),
                            set_cookie: c.set_cookie.0,
                            targeted: c
                                .targeted_fields
                                .iter()
                                .map(|t| t.to_ascii_lowercase().into_bytes())
                                .collect(),
                            strip_targeted: c.strip_targeted_fields,
                            ..Policy::default()
                        },
                        c.key_headers.clone(),
                    );
                    hc.lock_timeout = c.lock_timeout.0;
                    if let Some(w) = c.warming.as_ref().filter(|w| w.enabled) {
                        hc.warming = crate::cache::WarmingPlan {
                            host: w.host.clone(),
                            // Crons are checked above (a bad one is a config error).
                            scheduled: w
                                .scheduled
                                .iter()
                                .filter_map(|s| {
                                    let cron = crate::cache::CronSchedule::parse(&s.cron).ok()?;
                                    Some((cron, s.paths.clone()))
                                })
                                .collect(),
                            predictive: w
                                .predictive
                                .as_ref()
                                .filter(|p| p.enabled)
                                .map(|p| (p.threshold, p.horizon.0)),
                        };
                    }
                    hc.l2 = l2.map(|(l, addr, upstream)| {
                        crate::cache::l2::L2::new(
                            addr,
                            upstream,
                            l.key_prefix.clone().into_bytes(),
                            l.ttl.0,
                            l.timeout.0,
                            c.max_object_size.0 as usize,
                            base,
                        )
                        .with_instance(wall)
                        .with_login(
                            l.username.as_deref(),
                            l.password.as_deref(),
                            l.db,
                        )
                    });
                    Arc::new(hc)
                })
            }),
        }))
    }
}

/// Resolve IP literals only (what core can do without I/O); runtimes pass a resolver that
/// also looks up host names.
pub fn resolve_literal(host: &str, port: u16) -> Result<SocketAddr, String> {
    host.parse::<std::net::IpAddr>()
        .map(|ip| SocketAddr::new(ip, port))
        .map_err(|_| format!("`{host}` is not an IP address"))
}

#[cfg(test)]
mod tests;
