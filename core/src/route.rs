//! Host and path routing to named upstreams.

/// How a route matches the Host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPattern {
    /// Exact host name (lowercase, no port).
    Exact(String),
    /// `*.example.com`: any subdomain; stored as `.example.com`.
    Suffix(String),
}

impl HostPattern {
    pub fn parse(s: &str) -> HostPattern {
        let s = s.to_ascii_lowercase();
        match s.strip_prefix('*') {
            Some(rest) if rest.starts_with('.') => HostPattern::Suffix(rest.to_string()),
            _ => HostPattern::Exact(s),
        }
    }
    fn score(&self, host: &[u8]) -> Option<usize> {
        match self {
            HostPattern::Exact(h) => h.as_bytes().eq_ignore_ascii_case(host).then_some(2),
            HostPattern::Suffix(sfx) => {
                let s = sfx.as_bytes();
                (host.len() > s.len() && host[host.len() - s.len()..].eq_ignore_ascii_case(s))
                    .then_some(1)
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct Route {
    pub host: Option<HostPattern>,
    /// Path prefix ("/" matches everything).
    pub path_prefix: String,
    pub upstream: usize,
}

/// Most specific host match wins (exact over wildcard over none), then the longest path
/// prefix, then the first route in config order. A prefix matches whole segments: `/api`
/// takes `/api`, `/api/x` and `/api?q`, not `/apix` (a prefix ending in `/` matches what
/// starts with it). Paths and hosts come in normalised ([`RequestHead::normalize`]).
///
/// [`RequestHead::normalize`]: crate::http1::head::RequestHead::normalize
#[derive(Clone, Debug, Default)]
pub struct Router {
    pub routes: Vec<Route>,
    pub default: Option<usize>,
}

/// Host without port (or a trailing dot), for matching.
pub fn host_name(host: &[u8]) -> &[u8] {
    if host.first() == Some(&b'[') {
        // [v6]:port
        return match host.iter().position(|&b| b == b']') {
            Some(i) => &host[..=i],
            None => host,
        };
    }
    let name = match host.iter().rposition(|&b| b == b':') {
        Some(i) => &host[..i],
        None => host,
    };
    match name {
        [rest @ .., b'.'] if !rest.is_empty() => rest,
        n => n,
    }
}

/// Does `path` start with the route prefix `prefix` on a segment boundary?
fn prefix_matches(path: &[u8], prefix: &[u8]) -> bool {
    path.starts_with(prefix)
        && (prefix.ends_with(b"/")
            || path.len() == prefix.len()
            || matches!(path[prefix.len()], b'/' | b'?'))
}

impl Router {
    pub fn route(&self, host: &[u8], path: &[u8]) -> Option<usize> {
        let host = host_name(host);
        let mut best: Option<(usize, usize, usize)> = None; // (host score, prefix len, upstream)
        for r in &self.routes {
            let hs = match &r.host {
                None => 0,
                Some(p) => match p.score(host) {
                    Some(s) => s,
                    None => continue,
                },
            };
            if !prefix_matches(path, r.path_prefix.as_bytes()) {
                continue;
            }
            let cand = (hs, r.path_prefix.len(), r.upstream);
            if best.is_none_or(|b| (cand.0, cand.1) > (b.0, b.1)) {
                best = Some(cand);
            }
        }
        best.map(|b| b.2).or(self.default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_specific_route_wins() {
        let r = Router {
            routes: vec![
                Route {
                    host: None,
                    path_prefix: "/api".into(),
                    upstream: 1,
                },
                Route {
                    host: Some(HostPattern::parse("*.example.com")),
                    path_prefix: "/".into(),
                    upstream: 2,
                },
                Route {
                    host: Some(HostPattern::parse("api.example.com")),
                    path_prefix: "/".into(),
                    upstream: 3,
                },
                Route {
                    host: Some(HostPattern::parse("api.example.com")),
                    path_prefix: "/v2".into(),
                    upstream: 4,
                },
            ],
            default: Some(0),
        };
        assert_eq!(r.route(b"other", b"/x"), Some(0));
        assert_eq!(r.route(b"other:8080", b"/api/users"), Some(1));
        assert_eq!(r.route(b"www.example.com", b"/api"), Some(2));
        assert_eq!(r.route(b"API.example.com:80", b"/v1"), Some(3));
        assert_eq!(r.route(b"api.example.com", b"/v2/x"), Some(4));
        assert_eq!(
            r.route(b"example.com", b"/"),
            Some(0),
            "wildcard needs a subdomain"
        );
        assert_eq!(host_name(b"[::1]:8080"), b"[::1]");
        // Whole segments only; a trailing-dot host matches its exact route.
        assert_eq!(r.route(b"other", b"/apix"), Some(0));
        assert_eq!(r.route(b"other", b"/api?x=1"), Some(1));
        assert_eq!(r.route(b"api.example.com.", b"/v2"), Some(4));
        assert_eq!(r.route(b"api.example.com.:8080", b"/v2x"), Some(3));
    }
}
