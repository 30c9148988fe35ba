//! Shared-cache decisions of RFC 9111, as pure functions: what may be stored, how long it
//! stays fresh, how old it is, whether a stored response may answer a request (fresh, stale
//! while revalidating, stale on error) or must be validated first, cache keys with `Vary`,
//! the conditional requests a cache answers itself, and what an unsafe method invalidates.
//!
//! Times are wall-clock values (`SystemTime`) passed in by the caller: HTTP dates are wall
//! clock. Nothing here reads a clock.
//!
//! trireme is a *shared* cache: `private` responses are never stored, `s-maxage` wins over
//! `max-age`, `proxy-revalidate` counts like `must-revalidate`, and responses to requests
//! with `Authorization` are stored only when the response explicitly allows it (§3.5).

pub mod http;
pub mod l2;
pub mod l2_conn;
pub mod store;

pub use http::{HttpCache, WallClock};

use std::time::{Duration, SystemTime};

/// `delta-seconds` beyond this are taken as this (RFC 9111 §1.2.2).
pub const DELTA_MAX: u64 = 2_147_483_648;

/// Cache-Control directives of a request or a response (RFC 9111 §5.2).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Directives {
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub no_store: bool,
    /// `no-cache` (with or without field names: either way the response is validated
    /// before reuse, the stricter reading).
    pub no_cache: bool,
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub immutable: bool,
    pub no_transform: bool,
    pub must_understand: bool,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
    /// Request: `max-stale` (`Some(None)`: any staleness), `min-fresh`, `only-if-cached`.
    pub max_stale: Option<Option<u64>>,
    pub min_fresh: Option<u64>,
    pub only_if_cached: bool,
}

/// A `delta-seconds` value: digits only; too large saturates. `None` when malformed.
fn delta_seconds(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut n: u64 = 0;
    for &d in v {
        n = n.saturating_mul(10).saturating_add((d - b'0') as u64);
    }
    Some(n.min(DELTA_MAX))
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Split a field value on commas outside quoted strings.
fn split_list(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut start = 0;
    let mut i = 0;
    let mut quoted = false;
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        while i < v.len() {
            match v[i] {
                b'"' => quoted = !quoted,
                b'\\' if quoted => i += 1,
                b',' if !quoted => {
                    let item = &v[start..i];
                    i += 1;
                    start = i;
                    return Some(trim(item));
                }
                _ => {}
            }
            i += 1;
        }
        done = true;
        Some(trim(&v[start.min(v.len())..]))
    })
    .filter(|s| !s.is_empty())
}

impl Directives {
    /// Parse every `Cache-Control` field line of a message. Names are case-insensitive;
    /// values may be quoted. A malformed `max-age` / `s-maxage` counts as 0 (stale, the
    /// safe reading of §4.2.1); for a repeated directive the first occurrence wins.
    pub fn parse<'a>(lines: impl IntoIterator<Item = &'a [u8]>) -> Directives {
        let mut d = Directives::default();
        for line in lines {
            for item in split_list(line) {
                let (name, value) = match item.iter().position(|&b| b == b'=') {
                    Some(eq) => (trim(&item[..eq]), Some(unquote(trim(&item[eq + 1..])))),
                    None => (item, None),
                };
                let secs = || value.and_then(delta_seconds);
                let n = |s: &str| name.eq_ignore_ascii_case(s.as_bytes());
                if n("max-age") {
                    d.max_age = d.max_age.or(Some(secs().unwrap_or(0)));
                } else if n("s-maxage") {
                    d.s_maxage = d.s_maxage.or(Some(secs().unwrap_or(0)));
                } else if n("no-store") {
                    d.no_store = true;
                } else if n("no-cache") {
                    d.no_cache = true;
                } else if n("private") {
                    d.private = true;
                } else if n("public") {
                    d.public = true;
                } else if n("must-revalidate") {
                    d.must_revalidate = true;
                } else if n("proxy-revalidate") {
                    d.proxy_revalidate = true;
                } else if n("immutable") {
                    d.immutable = true;
                } else if n("no-transform") {
                    d.no_transform = true;
                } else if n("must-understand") {
                    d.must_understand = true;
                } else if n("stale-while-revalidate") {
                    d.stale_while_revalidate = d.stale_while_revalidate.or(secs());
                } else if n("stale-if-error") {
                    d.stale_if_error = d.stale_if_error.or(secs());
                } else if n("max-stale") {
                    d.max_stale = d.max_stale.or(Some(secs()));
                } else if n("min-fresh") {
                    d.min_fresh = d.min_fresh.or(secs());
                } else if n("only-if-cached") {
                    d.only_if_cached = true;
                }
            }
        }
        d
    }
}

fn unquote(v: &[u8]) -> &[u8] {
    match v {
        [b'"', inner @ .., b'"'] => inner,
        _ => v,
    }
}

/// The fetches the cache makes on its own schedule (`cache.warming`): `paths` under
/// `host` on each cron schedule, and predictive refreshes of entries that drew `threshold`
/// requests this hour and expire within `horizon`. [`crate::background::Background`] keeps
/// the time and queues them.
#[derive(Clone, Debug, Default)]
pub struct WarmingPlan {
    /// The `Host` the warmed entries are keyed under.
    pub host: Option<String>,
    pub scheduled: Vec<(CronSchedule, Vec<String>)>,
    /// `(threshold, horizon)`.
    pub predictive: Option<(u64, std::time::Duration)>,
}

impl WarmingPlan {
    pub fn is_empty(&self) -> bool {
        self.scheduled.is_empty() && self.predictive.is_none()
    }
}

/// A cron schedule (UTC): 5 fields, or 6 with seconds first.
#[derive(Clone, Debug)]
pub struct CronSchedule(croner::Cron);

impl CronSchedule {
    pub fn parse(expr: &str) -> Result<CronSchedule, String> {
        croner::Cron::new(expr)
            .with_seconds_optional()
            .parse()
            .map(CronSchedule)
            .map_err(|e| format!("invalid cron `{expr}`: {e}"))
    }

    /// The first time strictly after `t`.
    pub fn next_after(&self, t: SystemTime) -> Option<SystemTime> {
        let at: chrono::DateTime<chrono::Utc> = t.into();
        self.0
            .find_next_occurrence(&at, false)
            .ok()
            .map(SystemTime::from)
    }
}

/// An HTTP date (IMF-fixdate, or the obsolete RFC 850 and asctime forms).
pub fn parse_date(v: &[u8]) -> Option<SystemTime> {
    httpdate::parse_http_date(std::str::from_utf8(trim(v)).ok()?).ok()
}

/// Format an IMF-fixdate (`Date`, `Last-Modified`).
pub fn format_date(t: SystemTime) -> String {
    httpdate::fmt_http_date(t)
}

/// Status codes a cache may store without explicit freshness (heuristically cacheable,
/// RFC 9110 §15.1).
pub fn heuristically_cacheable(status: u16) -> bool {
    matches!(
        status,
        200 | 203 | 204 | 206 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Status codes whose caching semantics this cache implements (for `must-understand`).
pub fn understood_status(status: u16) -> bool {
    heuristically_cacheable(status) && status != 206 || matches!(status, 302 | 303 | 307)
}

/// The `Age` field's value (RFC 9111 section 5.1): the first of a list, digits only; an
/// invalid one is ignored (0), one too large is capped at 2^31 seconds.
pub fn parse_age(v: &[u8]) -> u64 {
    let first = trim(v.split(|&b| b == b',').next().unwrap_or(b""));
    if first.is_empty() || !first.iter().all(u8::is_ascii_digit) {
        return 0;
    }
    std::str::from_utf8(first)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(u64::MAX)
        .min(1 << 31)
}

/// What the cache knows of a response when deciding on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseFacts {
    pub status: u16,
    pub cc: Directives,
    pub date: Option<SystemTime>,
    /// `Expires`: `Some(None)` when present but invalid (an already expired response).
    pub expires: Option<Option<SystemTime>>,
    pub last_modified: Option<SystemTime>,
    /// The `Age` it arrived with, in seconds.
    pub age: u64,
    pub has_etag: bool,
    /// `Vary: *`: never reused.
    pub vary_star: bool,
    /// It carries `Set-Cookie` (see [`SetCookie`]).
    pub set_cookie: bool,
    /// When the request that fetched it was sent, and when the response arrived.
    pub request_time: SystemTime,
    pub response_time: SystemTime,
}

/// What the cache knows of the request that fetched (or asks for) a response.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestFacts {
    /// GET or HEAD: the methods this cache stores.
    pub cacheable_method: bool,
    pub cc: Directives,
    pub authorization: bool,
    /// `Pragma: no-cache` without `Cache-Control` (HTTP/1.0 clients).
    pub pragma_no_cache: bool,
}

/// Why a response was not stored (for logs, counters and `Cache-Status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotStored {
    Method,
    Status,
    NoStore,
    Private,
    Authorization,
    VaryStar,
    /// No explicit freshness, no validator and not heuristically cacheable.
    NoFreshness,
    /// Zero freshness and no validator: it could never be reused.
    Useless,
    /// `Set-Cookie` without explicit shared-cache freshness, or `set_cookie: no_store`.
    SetCookie,
}

/// What the cache does with responses that set cookies (`cache.set_cookie`). A cookie is
/// usually one user's: replaying it to everyone who gets a hit hands out their session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SetCookie {
    /// Store such a response only when the origin gave explicit shared-cache freshness
    /// (`s-maxage`, or `public` with `max-age`), and store it without its `Set-Cookie`
    /// fields: only the client whose request fetched it receives them.
    #[default]
    Strip,
    /// Never store a response with `Set-Cookie` (nginx's behaviour).
    NoStore,
    /// Store it under the same rule as `Strip`, `Set-Cookie` included, and replay the
    /// cookie to every client served from the cache (for cookies that are the same for
    /// everyone).
    Replay,
}

impl SetCookie {
    pub const NAMES: [&'static str; 3] = ["strip", "no_store", "replay"];

    pub fn from_name(s: &str) -> Option<SetCookie> {
        match s {
            "strip" => Some(SetCookie::Strip),
            "no_store" => Some(SetCookie::NoStore),
            "replay" => Some(SetCookie::Replay),
            _ => None,
        }
    }
}

/// Limits from the config that shape storage decisions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Heuristic freshness: this fraction (percent) of the time since `Last-Modified`…
    pub heuristic_percent: u32,
    /// …capped here (RFC 9111 §4.2.2 suggests 10% with a cap).
    pub heuristic_max: Duration,
    /// No entry stays fresh longer than this, whatever the origin says.
    pub max_ttl: Duration,
    /// Freshness for cacheable responses that state none (0: heuristics only).
    pub default_ttl: Duration,
    pub set_cookie: SetCookie,
    /// Targeted cache-control fields (RFC 9213), lower case, in order of precedence: the
    /// first one a response carries replaces `Cache-Control` for this cache's decisions.
    pub targeted: Vec<Vec<u8>>,
    /// Remove the targeted fields from responses forwarded to clients.
    pub strip_targeted: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            heuristic_percent: 10,
            heuristic_max: Duration::from_secs(24 * 3600),
            max_ttl: Duration::from_secs(365 * 24 * 3600),
            default_ttl: Duration::ZERO,
            set_cookie: SetCookie::Strip,
            targeted: vec![b"cdn-cache-control".to_vec()],
            strip_targeted: false,
        }
    }
}

/// May a shared cache store this response to this request (RFC 9111 §3)?
pub fn storable(
    req: &RequestFacts,
    resp: &ResponseFacts,
    policy: &Policy,
) -> Result<(), NotStored> {
    if !req.cacheable_method {
        return Err(NotStored::Method);
    }
    // Final, understood status codes; 206 needs range support and 1xx are not responses.
    if !(200..600).contains(&resp.status) || resp.status == 206 || resp.status == 304 {
        return Err(NotStored::Status);
    }
    // RFC 9111 section 5.2.2.3: with `must-understand`, a cache stores only status codes
    // it understands, and then may ignore `no-store`.
    if resp.cc.must_understand && !understood_status(resp.status) {
        return Err(NotStored::Status);
    }
    if req.cc.no_store || (resp.cc.no_store && !resp.cc.must_understand) {
        return Err(NotStored::NoStore);
    }
    if resp.cc.private {
        return Err(NotStored::Private);
    }
    if req.authorization
        && !(resp.cc.public || resp.cc.must_revalidate || resp.cc.s_maxage.is_some())
    {
        return Err(NotStored::Authorization);
    }
    if resp.vary_star {
        return Err(NotStored::VaryStar);
    }
    if resp.set_cookie {
        // Heuristic freshness (or a default TTL) is no licence to hand one user's cookie
        // response to others: the origin must say a shared cache may keep it.
        let shared = resp.cc.s_maxage.is_some() || (resp.cc.public && resp.cc.max_age.is_some());
        if policy.set_cookie == SetCookie::NoStore || !shared {
            return Err(NotStored::SetCookie);
        }
    }
    let explicit =
        resp.cc.s_maxage.is_some() || resp.cc.max_age.is_some() || resp.expires.is_some();
    if !explicit && !resp.cc.public && !heuristically_cacheable(resp.status) {
        return Err(NotStored::NoFreshness);
    }
    let validator = resp.has_etag || resp.last_modified.is_some();
    if freshness_lifetime(resp, policy).is_zero() && !validator && resp.cc.stale_if_error.is_none()
    {
        return Err(NotStored::Useless);
    }
    Ok(())
}

/// How long the response stays fresh in a shared cache (RFC 9111 §4.2.1), capped by
/// `policy.max_ttl`.
pub fn freshness_lifetime(resp: &ResponseFacts, policy: &Policy) -> Duration {
    let secs = |s: u64| Duration::from_secs(s);
    let explicit = if let Some(s) = resp.cc.s_maxage {
        Some(secs(s))
    } else if let Some(m) = resp.cc.max_age {
        Some(secs(m))
    } else {
        match resp.expires {
            Some(Some(exp)) => {
                // Expires minus Date; without Date, the time it arrived stands in.
                let date = resp.date.unwrap_or(resp.response_time);
                Some(exp.duration_since(date).unwrap_or(Duration::ZERO))
            }
            Some(None) => Some(Duration::ZERO),
            None => None,
        }
    };
    let lifetime = explicit.unwrap_or_else(|| {
        if !(heuristically_cacheable(resp.status) || resp.cc.public) {
            return Duration::ZERO;
        }
        let heuristic = match resp.last_modified {
            Some(lm) => {
                let date = resp.date.unwrap_or(resp.response_time);
                let since = date.duration_since(lm).unwrap_or(Duration::ZERO);
                (since * policy.heuristic_percent / 100).min(policy.heuristic_max)
            }
            None => Duration::ZERO,
        };
        heuristic.max(policy.default_ttl)
    });
    lifetime.min(policy.max_ttl)
}

/// The response's current age at `now` (RFC 9111 §4.2.3).
pub fn current_age(resp: &ResponseFacts, now: SystemTime) -> Duration {
    let since = |a: SystemTime, b: SystemTime| a.duration_since(b).unwrap_or(Duration::ZERO);
    let apparent_age = resp
        .date
        .map_or(Duration::ZERO, |d| since(resp.response_time, d));
    let response_delay = since(resp.response_time, resp.request_time);
    let corrected_age_value = Duration::from_secs(resp.age) + response_delay;
    let corrected_initial_age = apparent_age.max(corrected_age_value);
    let resident_time = since(now, resp.response_time);
    corrected_initial_age + resident_time
}

/// What a stored response can do for a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reuse {
    /// Serve it as is.
    Fresh,
    /// Serve it now, and refresh it in the background (`stale-while-revalidate`).
    StaleWhileRevalidate,
    /// Validate with the origin first (conditional request); serve it on a 304.
    Validate,
}

/// May `stored` answer `req` at `now`, and how (RFC 9111 §4)?
pub fn reuse(
    req: &RequestFacts,
    stored: &ResponseFacts,
    policy: &Policy,
    now: SystemTime,
) -> Reuse {
    if stored.vary_star || stored.cc.no_cache || req.cc.no_cache || req.pragma_no_cache {
        return Reuse::Validate;
    }
    let lifetime = freshness_lifetime(stored, policy);
    let age = current_age(stored, now);
    // The request's own limits.
    if let Some(max_age) = req.cc.max_age {
        if age > Duration::from_secs(max_age) {
            return Reuse::Validate;
        }
    }
    let min_fresh = Duration::from_secs(req.cc.min_fresh.unwrap_or(0));
    if age + min_fresh < lifetime {
        return Reuse::Fresh;
    }
    // Stale from here on.
    let revalidate =
        stored.cc.must_revalidate || stored.cc.proxy_revalidate || stored.cc.s_maxage.is_some();
    if revalidate {
        return Reuse::Validate;
    }
    let staleness = age.saturating_sub(lifetime);
    if let Some(ms) = req.cc.max_stale {
        if ms.is_none_or(|s| staleness <= Duration::from_secs(s)) {
            return Reuse::Fresh;
        }
    }
    if let Some(swr) = stored.cc.stale_while_revalidate {
        if staleness <= Duration::from_secs(swr) {
            return Reuse::StaleWhileRevalidate;
        }
    }
    Reuse::Validate
}

/// Would a more recent copy of the stored response answer this request without going to
/// the origin? True when the stored one needs validation only because it aged: a fresh
/// copy from elsewhere (L2) then saves the round trip. False when every use is validated
/// (`no-cache` either side, `Vary: *`, a request's `max-age=0`) or it was never fresh.
pub fn fresher_copy_may_answer(
    req: &RequestFacts,
    stored: &ResponseFacts,
    policy: &Policy,
) -> bool {
    !(stored.vary_star
        || stored.cc.no_cache
        || req.cc.no_cache
        || req.pragma_no_cache
        || req.cc.max_age == Some(0))
        && freshness_lifetime(stored, policy) > Duration::ZERO
}

/// May `stored` be served stale because the origin failed or is unreachable
/// (`stale-if-error`, RFC 5861 §4)? Never when the origin required revalidation.
pub fn stale_on_error(
    req: &RequestFacts,
    stored: &ResponseFacts,
    policy: &Policy,
    now: SystemTime,
) -> bool {
    if stored.vary_star
        || stored.cc.must_revalidate
        || stored.cc.proxy_revalidate
        || stored.cc.s_maxage.is_some()
    {
        return false;
    }
    let staleness = current_age(stored, now).saturating_sub(freshness_lifetime(stored, policy));
    let allowed = req.cc.stale_if_error.or(stored.cc.stale_if_error);
    allowed.is_some_and(|s| staleness <= Duration::from_secs(s))
}

/// The primary cache key: method class, scheme, host (lower case, default port dropped)
/// and request target, plus the configured key extension. HEAD shares GET's key (a stored
/// GET response answers a HEAD).
pub fn primary_key(scheme: &str, host: &[u8], target: &[u8], extension: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + scheme.len() + host.len() + target.len() + extension.len());
    write_primary_key(&mut k, scheme, host, target, extension);
    k
}

/// [`primary_key`] into any byte sink (a stack buffer on the hit path).
pub fn write_primary_key(
    k: &mut impl Extend<u8>,
    scheme: &str,
    host: &[u8],
    target: &[u8],
    extension: &[u8],
) {
    let mut host = trim(host);
    let default_port: &[u8] = if scheme == "https" { b":443" } else { b":80" };
    if host.len() > default_port.len() && host.ends_with(default_port) {
        host = &host[..host.len() - default_port.len()];
    }
    k.extend(b"GET ".iter().copied());
    k.extend(scheme.bytes());
    k.extend(b"://".iter().copied());
    k.extend(host.iter().map(u8::to_ascii_lowercase));
    k.extend(target.iter().copied());
    if !extension.is_empty() {
        k.extend([0u8]);
        k.extend(extension.iter().copied());
    }
}

/// The secondary key of a response with `Vary` (RFC 9111 §4.1): for each field named, in
/// lower case and sorted, the request's values with whitespace around commas removed.
/// `None` for `Vary: *` (never matches).
pub fn vary_key<'a, V, I>(
    vary_lines: impl IntoIterator<Item = &'a [u8]>,
    request_field: impl Fn(&[u8]) -> V,
) -> Option<Vec<u8>>
where
    V: IntoIterator<Item = I>,
    I: AsRef<[u8]>,
{
    let mut names: Vec<Vec<u8>> = Vec::new();
    for line in vary_lines {
        for name in split_list(line) {
            if name == b"*" {
                return None;
            }
            let lower = name.to_ascii_lowercase();
            if !names.contains(&lower) {
                names.push(lower);
            }
        }
    }
    names.sort();
    let mut k = Vec::new();
    for n in &names {
        k.extend_from_slice(n);
        k.push(b':');
        if NEGOTIATION_FIELDS.contains(&n.as_slice()) {
            // Case, order and whitespace of these lists do not change the answer: one
            // variant for every spelling of the same preferences.
            let mut items: Vec<Vec<u8>> = request_field(n)
                .into_iter()
                .flat_map(|v| {
                    split_list(v.as_ref())
                        .map(|i| {
                            i.iter()
                                .filter(|b| !b.is_ascii_whitespace())
                                .map(u8::to_ascii_lowercase)
                                .collect::<Vec<u8>>()
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            items.sort();
            items.dedup();
            k.extend_from_slice(&items.join(&b","[..]));
        } else {
            let mut first = true;
            for v in request_field(n) {
                for item in split_list(v.as_ref()) {
                    if !first {
                        k.push(b',');
                    }
                    first = false;
                    k.extend_from_slice(item);
                }
            }
        }
        k.push(b'\n');
    }
    Some(k)
}

/// Request fields whose values are case-insensitive lists of preferences (RFC 9110
/// section 12.5), normalised in a secondary key.
const NEGOTIATION_FIELDS: [&[u8]; 4] = [
    b"accept",
    b"accept-charset",
    b"accept-encoding",
    b"accept-language",
];

/// Does a client's conditional GET match the stored response, so the cache answers 304
/// (RFC 9110 §13.2.2: `If-None-Match` takes precedence over `If-Modified-Since`)?
pub fn not_modified(
    if_none_match: Option<&[u8]>,
    if_modified_since: Option<&[u8]>,
    etag: Option<&[u8]>,
    last_modified: Option<SystemTime>,
) -> bool {
    if let Some(inm) = if_none_match {
        let Some(etag) = etag else { return false };
        return split_list(inm).any(|t| t == b"*" || weak_eq(t, etag));
    }
    match (if_modified_since.and_then(parse_date), last_modified) {
        (Some(since), Some(lm)) => lm <= since,
        _ => false,
    }
}

/// Weak comparison of entity tags (`W/"x"` equals `"x"`).
fn weak_eq(a: &[u8], b: &[u8]) -> bool {
    let strip = |t: &[u8]| -> Vec<u8> { t.strip_prefix(b"W/").unwrap_or(t).to_vec() };
    strip(trim(a)) == strip(trim(b))
}

/// Does this response to an unsafe request invalidate stored responses (RFC 9111 §4.4)?
/// Unsafe methods with a non-error response do.
pub fn invalidates(method: &[u8], status: u16) -> bool {
    let safe = matches!(method, b"GET" | b"HEAD" | b"OPTIONS" | b"TRACE");
    !safe && invalidating_status(status)
}

/// A response status after which an unsafe request invalidates: success or redirect.
pub fn invalidating_status(status: u16) -> bool {
    (200..400).contains(&status)
}

/// The targets a `Location` or `Content-Location` value invalidates besides the request
/// target: only same-origin ones (a relative reference, or an absolute one with this
/// scheme and host). Returns the request target form (path and query).
pub fn same_origin_target<'a>(value: &'a [u8], scheme: &str, host: &[u8]) -> Option<&'a [u8]> {
    let v = trim(value);
    if v.starts_with(b"/") && !v.starts_with(b"//") {
        return Some(v);
    }
    let rest = v.strip_prefix(scheme.as_bytes())?.strip_prefix(b"://")?;
    let slash = rest.iter().position(|&b| b == b'/').unwrap_or(rest.len());
    let (h, path) = rest.split_at(slash);
    (h.eq_ignore_ascii_case(trim(host)) && !path.is_empty()).then_some(path)
}

#[cfg(test)]
mod tests;
