//! Static files: every decision of serving one, none of the I/O (issue 12's core half).
//!
//! The runtime opens, stats and sends files when core asks; what to open, whether the
//! request may see it, and what the answer is (status, validators, ranges, headers) is
//! decided here, from the request and the file's metadata the runtime reports:
//!
//! - [`Locations::locate`]: the location a request path falls under (longest prefix) and
//!   the path below its root, percent-decoded once and refused when it could leave the root
//!   or name what is hidden ([`resolve`]: `..` in any encoding, encoded slashes and
//!   backslashes, NUL and control bytes, escapes that decode to another escape, invalid or
//!   overlong UTF-8, dotfiles unless allowed). The runtime still opens the path beneath the
//!   root (`openat2` with `RESOLVE_BENEATH`, or its equivalent), so a symlink cannot lead
//!   out either.
//! - [`Validators`]: the file's `ETag` (size and modification time, like nginx's) and
//!   `Last-Modified`.
//! - [`evaluate`]: the conditional request and range headers in RFC 9110 section 13.2.2's
//!   order, to a [`Outcome`]: 200, 304, 412, 206 (one range or several) or 416.
//! - [`content_type`]: the media type from the extension (`charset=utf-8` for text).
//! - [`multipart_layout`]: the part heads and length of a `multipart/byteranges` body.

use crate::Status;
use smallvec::SmallVec;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Whether names beginning with a dot may be served.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Dotfiles {
    /// Hidden (404), except `/.well-known/` (RFC 8615: ACME challenges and the like).
    #[default]
    Deny,
    /// Served like any other name.
    Allow,
}

/// A request path's part below a location's root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// Relative, `/`-separated, without empty, `.` or `..` segments; empty for the root.
    pub rel: String,
    /// The request path ended in `/` (a directory is asked for: its index, or a listing).
    pub dir: bool,
}

/// Why a path is refused: the status the request gets and a reason for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    pub status: Status,
    pub why: &'static str,
}

fn refuse(status: Status, why: &'static str) -> Refused {
    Refused { status, why }
}

use crate::http1::head::hex_val as hex;

/// The path below a root that `path` (a request's path, without its query, relative to the
/// location: what follows the location's prefix) names, or why it is refused. Decoded once;
/// anything that could mean another path to a component that decodes again, normalises
/// differently or reads a byte as a separator is refused rather than guessed at.
pub fn resolve(path: &[u8], dotfiles: Dotfiles) -> Result<Resolved, Refused> {
    let bad = |why| refuse(Status::BadRequest, why);
    let mut out: Vec<u8> = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        let b = path[i];
        if b != b'%' {
            if b == b'\\' {
                return Err(bad("a backslash in a static path"));
            }
            out.push(b);
            i += 1;
            continue;
        }
        let v = match (
            path.get(i + 1).and_then(|&h| hex(h)),
            path.get(i + 2).and_then(|&l| hex(l)),
        ) {
            (Some(h), Some(l)) => h * 16 + l,
            _ => return Err(bad("invalid percent-encoding in the path")),
        };
        if v == b'/' || v == b'\\' {
            return Err(bad("an encoded slash in a static path"));
        }
        out.push(v);
        i += 3;
    }
    // An escape left after decoding (`%252e` is `%2e`): whatever reads the name again may
    // decode it, so it is refused, not served as the literal name.
    if out
        .windows(3)
        .any(|w| w[0] == b'%' && hex(w[1]).is_some() && hex(w[2]).is_some())
    {
        return Err(bad("a double-encoded static path"));
    }
    if out.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return Err(bad("a control byte in a static path"));
    }
    // Rust's UTF-8 check refuses overlong forms (`C0 AE` for `.`) and surrogates.
    let text = std::str::from_utf8(&out).map_err(|_| bad("a static path that is not UTF-8"))?;
    let dir = text.is_empty() || text.ends_with('/');
    let mut rel = String::with_capacity(text.len());
    let mut first = true;
    for seg in text.split('/') {
        match seg {
            "" | "." => continue,
            ".." => return Err(bad("a `..` segment in a static path")),
            s if s.starts_with('.') => {
                let well_known = first && s == ".well-known";
                if dotfiles == Dotfiles::Deny && !well_known {
                    return Err(refuse(Status::NotFound, "a hidden (dot) name"));
                }
            }
            _ => {}
        }
        if !rel.is_empty() {
            rel.push('/');
        }
        rel.push_str(seg);
        first = false;
    }
    Ok(Resolved { rel, dir })
}

/// One `static.locations` entry: a path prefix served from a directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// The request path prefix (`/static/`; `/` for everything).
    pub prefix: String,
    /// The directory it is served from (the runtime opens files beneath it).
    pub root: std::path::PathBuf,
    /// Names tried, in order, for a request that names a directory.
    pub index: Vec<String>,
    /// Answer a directory without an index with a listing (off: 404, like nginx's
    /// `autoindex off`).
    pub listing: bool,
    pub dotfiles: Dotfiles,
    /// `Cache-Control` sent with its files, if any.
    pub cache_control: Option<String>,
}

/// Where a request path falls among the locations.
#[derive(Debug, PartialEq, Eq)]
pub enum Located<'a> {
    /// Under no location: the request goes on (to the backends, or 404 when there are none).
    Elsewhere,
    /// Under `location`, naming `path` below its root.
    File {
        location: &'a Location,
        path: Resolved,
    },
    /// The location's prefix without its trailing slash (`/static` for `/static/`): a
    /// redirect to the directory, as nginx answers.
    Redirect(&'a Location),
    /// Under a location, but refused.
    Refused(Refused),
}

/// The configured locations, longest prefix first.
#[derive(Clone, Debug, Default)]
pub struct Locations {
    by_length: Vec<Location>,
}

impl Locations {
    pub fn new(mut locations: Vec<Location>) -> Self {
        locations.sort_by_key(|l| std::cmp::Reverse(l.prefix.len()));
        Locations {
            by_length: locations,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.by_length.is_empty()
    }

    /// The location `path` (a request's normalised path, without its query) falls under,
    /// and what it names there. A prefix matches at a segment boundary only: `/static`
    /// covers `/static` and `/static/a`, never `/statics`.
    pub fn locate(&self, path: &[u8]) -> Located<'_> {
        for l in &self.by_length {
            let p = l.prefix.as_bytes();
            let slash = p.ends_with(b"/");
            let Some(rest) = path.strip_prefix(p) else {
                if p.len() > 1 && slash && path == &p[..p.len() - 1] {
                    return Located::Redirect(l);
                }
                continue;
            };
            if !slash && rest.is_empty() {
                // `/static` for a `/static` location: its directory, without the slash.
                return Located::Redirect(l);
            }
            if !slash && rest[0] != b'/' {
                continue; // `/statics` is not under `/static`
            }
            return match resolve(rest, l.dotfiles) {
                Ok(path) => Located::File { location: l, path },
                Err(e) => Located::Refused(e),
            };
        }
        Located::Elsewhere
    }
}

/// A file's media type: written as `base`, then `; charset=utf-8` when `utf8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContentType {
    pub base: &'static str,
    pub utf8: bool,
}

impl std::fmt::Display for ContentType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.base)?;
        if self.utf8 {
            f.write_str("; charset=utf-8")?;
        }
        Ok(())
    }
}

/// The media type for a file name, from its extension (mime_guess's table;
/// `application/octet-stream` when unknown); text types say `charset=utf-8`.
pub fn content_type(name: &str) -> ContentType {
    let base = mime_guess::from_path(name)
        .first_raw()
        .unwrap_or("application/octet-stream");
    let utf8 = base.starts_with("text/")
        || matches!(
            base,
            "application/javascript" | "application/json" | "application/xml" | "image/svg+xml"
        );
    ContentType { base, utf8 }
}

/// What a file's answer is judged by: its strong `ETag` and its modification time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Validators {
    /// The opaque tag with its quotes (`"65f1c2a0-1a2b"`).
    pub etag: SmallVec<[u8; 40]>,
    /// Whole seconds since the epoch (HTTP dates have no finer grain).
    pub modified: u64,
}

impl Validators {
    /// From the file's length and modification time, as nginx makes them: the two in hex,
    /// so a new version of a file (a new length or time) never keeps its tag.
    pub fn of(len: u64, modified: SystemTime) -> Self {
        let secs = modified
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        let mut etag = SmallVec::new();
        etag.push(b'"');
        push_hex(&mut etag, secs);
        etag.push(b'-');
        push_hex(&mut etag, len);
        etag.push(b'"');
        Validators {
            etag,
            modified: secs,
        }
    }

    /// `Last-Modified` as an HTTP date.
    pub fn last_modified(&self) -> String {
        httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(self.modified))
    }
}

fn push_hex(out: &mut SmallVec<[u8; 40]>, v: u64) {
    let digits = if v == 0 {
        1
    } else {
        (64 - v.leading_zeros()).div_ceil(4)
    };
    for i in (0..digits).rev() {
        out.push(b"0123456789abcdef"[((v >> (4 * i)) & 0xf) as usize]);
    }
}

/// The conditional and range fields of a request, as sent (`None` when absent; a field
/// sent more than once is joined with `, ` by the caller, as lists are).
#[derive(Clone, Copy, Debug, Default)]
pub struct Conditions<'a> {
    pub if_match: Option<&'a [u8]>,
    pub if_none_match: Option<&'a [u8]>,
    pub if_modified_since: Option<&'a [u8]>,
    pub if_unmodified_since: Option<&'a [u8]>,
    pub if_range: Option<&'a [u8]>,
    pub range: Option<&'a [u8]>,
}

/// A byte range of the file, both ends inclusive (`first <= last < len`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    pub first: u64,
    pub last: u64,
}

impl ByteRange {
    pub fn len(&self) -> u64 {
        self.last - self.first + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

/// What a request for a file gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// 200 with the whole file.
    Full,
    /// 304: the client's copy is current.
    NotModified,
    /// 412: a precondition (`If-Match`, `If-Unmodified-Since`) failed.
    PreconditionFailed,
    /// 206 with one range (`Content-Range`), or several as `multipart/byteranges`.
    Partial(SmallVec<[ByteRange; 2]>),
    /// 416 with `Content-Range: bytes */len`.
    Unsatisfiable,
}

/// GET or HEAD (every other method is refused before this, with 405).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Read {
    Get,
    Head,
}

/// Judge a request for a file of `len` bytes with validators `v`, in RFC 9110 section
/// 13.2.2's order: `If-Match`, else `If-Unmodified-Since` (412 when it fails); then
/// `If-None-Match`, else `If-Modified-Since` (304); then `Range` for a GET, unless
/// `If-Range` names another version. A `Range` of another unit, a malformed one, or one of
/// more than `max_ranges` ranges (or whose ranges add up to more than the file: an
/// amplification attempt) is ignored: the whole file, as RFC 9110 allows.
pub fn evaluate(
    method: Read,
    c: &Conditions<'_>,
    v: &Validators,
    len: u64,
    max_ranges: usize,
) -> Outcome {
    if let Some(im) = c.if_match {
        if !tag_list_matches(im, &v.etag, true) {
            return Outcome::PreconditionFailed;
        }
    } else if let Some(t) = c.if_unmodified_since.and_then(http_date) {
        if v.modified > t {
            return Outcome::PreconditionFailed;
        }
    }
    if let Some(inm) = c.if_none_match {
        if tag_list_matches(inm, &v.etag, false) {
            return Outcome::NotModified;
        }
    } else if let Some(t) = c.if_modified_since.and_then(http_date) {
        if v.modified <= t {
            return Outcome::NotModified;
        }
    }
    let Some(range) = c.range.filter(|_| method == Read::Get) else {
        return Outcome::Full;
    };
    if let Some(ir) = c.if_range {
        let ir = crate::http1::head::trim(ir);
        let current = if ir.starts_with(b"\"") || ir.starts_with(b"W/") {
            // A strong comparison: a weak tag never matches.
            ir == &v.etag[..]
        } else {
            http_date(ir) == Some(v.modified)
        };
        if !current {
            return Outcome::Full;
        }
    }
    match parse_ranges(range, len, max_ranges) {
        Ranges::Ignore => Outcome::Full,
        Ranges::Unsatisfiable => Outcome::Unsatisfiable,
        Ranges::Some(r) => Outcome::Partial(r),
    }
}

fn http_date(v: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(crate::http1::head::trim(v)).ok()?;
    let t = httpdate::parse_http_date(s).ok()?;
    Some(t.duration_since(UNIX_EPOCH).ok()?.as_secs())
}

/// Whether an `If-Match` / `If-None-Match` list names `etag` (`*` names any): the strong
/// comparison for `If-Match`, the weak one (a `W/` prefix ignored) for `If-None-Match`.
fn tag_list_matches(list: &[u8], etag: &[u8], strong: bool) -> bool {
    let list = crate::http1::head::trim(list);
    if list == b"*" {
        return true;
    }
    let mut rest = list;
    loop {
        rest = trim_start_commas(rest);
        if rest.is_empty() {
            return false;
        }
        let weak = rest.starts_with(b"W/");
        let tag_at = if weak { 2 } else { 0 };
        if rest.get(tag_at) != Some(&b'"') {
            return false; // malformed: matches nothing
        }
        let Some(close) = rest[tag_at + 1..].iter().position(|&b| b == b'"') else {
            return false;
        };
        let end = tag_at + 1 + close + 1;
        let tag = &rest[tag_at..end];
        if tag == etag && !(strong && weak) {
            return true;
        }
        rest = &rest[end..];
    }
}

fn trim_start_commas(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t' | b',', tail @ ..] = s {
        s = tail;
    }
    s
}

/// A `Range` field judged against a length.
#[derive(Debug, PartialEq, Eq)]
enum Ranges {
    /// Not a usable byte range set: serve the whole file.
    Ignore,
    /// Well formed, but no range overlaps the file.
    Unsatisfiable,
    /// The ranges to send, in the order asked, overlapping and adjacent ones merged.
    Some(SmallVec<[ByteRange; 2]>),
}

fn parse_ranges(v: &[u8], len: u64, max_ranges: usize) -> Ranges {
    let v = crate::http1::head::trim(v);
    // The unit is case-insensitive; whitespace around `=` is not allowed.
    let set = match v.split_at_checked(6) {
        Some((unit, set)) if unit.eq_ignore_ascii_case(b"bytes=") => set,
        _ => return Ranges::Ignore,
    };
    let mut out: SmallVec<[ByteRange; 2]> = SmallVec::new();
    let mut asked = 0usize;
    for spec in set.split(|&b| b == b',') {
        let spec = crate::http1::head::trim(spec);
        if spec.is_empty() {
            continue; // RFC 9110 allows empty list elements
        }
        asked += 1;
        if asked > max_ranges {
            return Ranges::Ignore;
        }
        let Some(dash) = spec.iter().position(|&b| b == b'-') else {
            return Ranges::Ignore;
        };
        let (a, b) = (&spec[..dash], &spec[dash + 1..]);
        let r = match (number(a), number(b)) {
            // `first-last` and `first-`
            (Some(first), last) if !a.is_empty() => {
                let last = match last {
                    Some(l) if !b.is_empty() => {
                        if l < first {
                            return Ranges::Ignore;
                        }
                        l.min(len.saturating_sub(1))
                    }
                    None if b.is_empty() => len.saturating_sub(1),
                    _ => return Ranges::Ignore,
                };
                if first >= len {
                    continue; // unsatisfiable on its own
                }
                ByteRange { first, last }
            }
            // `-suffix`: the last `suffix` bytes
            (None, Some(suffix)) if a.is_empty() && !b.is_empty() => {
                if suffix == 0 || len == 0 {
                    continue;
                }
                ByteRange {
                    first: len - suffix.min(len),
                    last: len - 1,
                }
            }
            _ => return Ranges::Ignore,
        };
        out.push(r);
    }
    if asked == 0 {
        return Ranges::Ignore;
    }
    if out.is_empty() {
        return Ranges::Unsatisfiable;
    }
    // Ranges that overlap or touch are coalesced (RFC 9110 section 14.2 allows it whatever
    // their order); then they go in file order. Disjoint ones keep the order asked.
    let mut sorted = out.clone();
    sorted.sort_by_key(|r| r.first);
    let touching = sorted
        .windows(2)
        .any(|w| w[1].first <= w[0].last.saturating_add(1));
    let merged = if touching {
        let mut m: SmallVec<[ByteRange; 2]> = SmallVec::new();
        for r in sorted {
            match m.last_mut() {
                Some(prev) if r.first <= prev.last.saturating_add(1) => {
                    prev.last = prev.last.max(r.last);
                }
                _ => m.push(r),
            }
        }
        m
    } else {
        out
    };
    let total: u64 = merged.iter().map(ByteRange::len).sum();
    if merged.len() > 1 && total >= len {
        // As much as the file or more, in parts: the file itself is cheaper for both.
        return Ranges::Ignore;
    }
    Ranges::Some(merged)
}

/// Digits only (no sign, no space), at most 19 of them.
fn number(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0')))
}

/// `Content-Range` of a 206 part: `bytes first-last/len`.
pub fn content_range(r: ByteRange, len: u64) -> String {
    format!("bytes {}-{}/{len}", r.first, r.last)
}

/// The body of a `multipart/byteranges` answer: for each range the part's head (the
/// boundary, `Content-Type`, `Content-Range`), then its bytes of the file; then the closing
/// boundary. Returns the heads in order (the last entry is the closing delimiter) and the
/// body's whole length, so the answer carries a `Content-Length`.
pub fn multipart_layout(
    ranges: &[ByteRange],
    len: u64,
    content_type: &str,
    boundary: &str,
) -> (Vec<String>, u64) {
    let mut heads = Vec::with_capacity(ranges.len() + 1);
    let mut total = 0u64;
    for (i, r) in ranges.iter().enumerate() {
        let lead = if i == 0 { "" } else { "\r\n" };
        let h = format!(
            "{lead}--{boundary}\r\nContent-Type: {content_type}\r\nContent-Range: {}\r\n\r\n",
            content_range(*r, len)
        );
        total += h.len() as u64 + r.len();
        heads.push(h);
    }
    let end = format!("\r\n--{boundary}--\r\n");
    total += end.len() as u64;
    heads.push(end);
    (heads, total)
}

#[cfg(test)]
mod tests;
