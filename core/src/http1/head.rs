//! Request and response heads: parsed with httparse, validated strictly (RFC 9112), and kept
//! as index ranges into the caller's buffer instead of borrowed slices, so a parsed head can
//! outlive the borrow of the read buffer it came from.

use super::{BodyKind, Limits, Version};
use crate::error::{HttpError, Status};
use smallvec::SmallVec;

/// A byte range inside the head buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Span {
    pub start: u32,
    pub end: u32,
}

impl Span {
    #[inline]
    pub fn get<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.start as usize..self.end as usize]
    }
    #[inline]
    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
    /// The position of `part` inside `buf`. A slice that does not lie inside `buf` (httparse
    /// hands out a static "" in some cases) gives an empty span instead of a wild one.
    fn of(buf: &[u8], part: &[u8]) -> Span {
        let base = buf.as_ptr() as usize;
        let p = part.as_ptr() as usize;
        match p.checked_sub(base) {
            Some(start) if start + part.len() <= buf.len() => Span {
                start: start as u32,
                end: (start + part.len()) as u32,
            },
            _ => Span::default(),
        }
    }
}

/// One header field as two ranges into the head buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeaderSpan {
    pub name: Span,
    pub value: Span,
}

/// Request methods the proxy treats specially; anything else is `Other`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Options,
    Trace,
    Connect,
    Patch,
    Other,
}

impl Method {
    fn from_bytes(m: &[u8]) -> Method {
        match m {
            b"GET" => Method::Get,
            b"HEAD" => Method::Head,
            b"POST" => Method::Post,
            b"PUT" => Method::Put,
            b"DELETE" => Method::Delete,
            b"OPTIONS" => Method::Options,
            b"TRACE" => Method::Trace,
            b"CONNECT" => Method::Connect,
            b"PATCH" => Method::Patch,
            _ => Method::Other,
        }
    }
    /// RFC 9110 section 9.2.2: safe to retry after a failure.
    pub fn is_idempotent(self) -> bool {
        matches!(
            self,
            Method::Get
                | Method::Head
                | Method::Put
                | Method::Delete
                | Method::Options
                | Method::Trace
        )
    }
}

/// Hop-by-hop header names (RFC 9110 section 7.6.1), plus `Proxy-Connection`, plus the
/// framing headers that the proxy always regenerates itself. Dispatched on the length
/// first: most fields have none of these lengths and cost one comparison.
#[inline]
pub(crate) fn is_hop_by_hop(name: &[u8]) -> bool {
    let is = |s: &[u8]| name_is(name, s);
    match name.len() {
        2 => is(b"te"),
        7 => is(b"trailer") || is(b"upgrade"),
        10 => is(b"connection") || is(b"keep-alive"),
        14 => is(b"content-length"),
        16 => is(b"proxy-connection"),
        17 => is(b"transfer-encoding"),
        18 => is(b"proxy-authenticate"),
        19 => is(b"proxy-authorization"),
        _ => false,
    }
}

/// A parsed, validated request head.
#[derive(Clone, Debug)]
pub struct RequestHead {
    /// Bytes of the head including the final blank line.
    pub len: usize,
    pub method: Method,
    pub method_span: Span,
    /// The request target as sent (origin-, absolute- or asterisk-form).
    pub target: Span,
    /// Path and query to forward (origin-form; for absolute-form the part after the authority).
    pub path: Span,
    /// Authority from an absolute-form target, which replaces Host (RFC 9112 section 3.2.2).
    pub target_authority: Option<Span>,
    pub version: Version,
    pub headers: SmallVec<[HeaderSpan; 24]>,
    pub host: Option<Span>,
    pub body: BodyKind,
    /// The client asked to keep the connection open after this exchange.
    pub keep_alive: bool,
    pub expect_continue: bool,
    /// Field names listed in `Connection`, which are hop-by-hop for this message.
    pub connection_tokens: SmallVec<[Span; 4]>,
}

impl RequestHead {
    /// Is this header one the proxy must not forward (hop-by-hop, or named in Connection)?
    pub fn is_hop(&self, buf: &[u8], h: &HeaderSpan) -> bool {
        self.is_hop_name(buf, h.name.get(buf))
    }

    /// Is a field of this name one the proxy must not forward (hop-by-hop, or named in
    /// Connection)?
    pub fn is_hop_name(&self, buf: &[u8], name: &[u8]) -> bool {
        is_hop_by_hop(name)
            || self
                .connection_tokens
                .iter()
                .any(|t| t.get(buf).eq_ignore_ascii_case(name))
    }

    /// The effective host: authority of an absolute-form target, else the Host field.
    pub fn effective_host<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        match (self.target_authority, self.host) {
            (Some(a), _) => a.get(buf),
            (None, Some(h)) => h.get(buf),
            (None, None) => b"",
        }
    }

    /// First value of a header, by case-insensitive name.
    pub fn header<'a>(&self, buf: &'a [u8], name: &str) -> Option<&'a [u8]> {
        self.headers
            .iter()
            .find(|h| h.name.get(buf).eq_ignore_ascii_case(name.as_bytes()))
            .map(|h| h.value.get(buf))
    }
}

/// Outcome of trying to parse a head out of a buffer.
#[derive(Debug)]
pub enum Parsed<T> {
    Complete(T),
    /// More bytes are needed; nothing is wrong yet.
    Partial,
}

/// httparse calls anything but `HTTP/1.0` and `HTTP/1.1` a version error. RFC 9112
/// sections 2.3 and 3 make a request line without a syntactically valid HTTP-version
/// (`http/1.1`, garbage, a target with a space leaving junk in the version's place) a 400;
/// 505 is for a well-formed `HTTP/D.D` this proxy does not speak (`HTTP/2.0`, `HTTP/0.9`).
fn version_error(buf: &[u8]) -> HttpError {
    // httparse may stop at the first wrong byte, before the line ends: then what is there
    // must be the start of a well-formed version.
    let shape: &[u8] = b"HTTP/D.D";
    let well_formed = version_token(buf).is_some_and(|(_, v, complete)| {
        (v.len() == shape.len() || (!complete && v.len() < shape.len()))
            && v.iter().zip(shape).all(|(&c, &want)| match want {
                b'D' => c.is_ascii_digit(),
                want => c == want,
            })
    });
    if well_formed {
        HttpError::new(Status::HttpVersionNotSupported, "unsupported HTTP version")
    } else {
        HttpError::new(Status::BadRequest, "invalid HTTP version in request line")
    }
}

/// The third token of a request line of exactly three: (its offset in `buf`, its bytes,
/// whether the line is complete).
fn version_token(buf: &[u8]) -> Option<(usize, &[u8], bool)> {
    let end = buf.iter().position(|&b| b == b'\r' || b == b'\n');
    let line = &buf[..end.unwrap_or(buf.len())];
    let mut spaces = line
        .iter()
        .enumerate()
        .filter(|(_, &b)| b == b' ')
        .map(|(i, _)| i);
    let (_, second) = (spaces.next()?, spaces.next()?);
    if spaces.next().is_some() {
        return None;
    }
    Some((second + 1, &line[second + 1..], end.is_some()))
}

/// Where the minor digit of an `HTTP/1.D` version with D above 1 sits in the request line.
fn higher_minor(buf: &[u8]) -> Option<usize> {
    match version_token(buf)? {
        (at, [b'H', b'T', b'T', b'P', b'/', b'1', b'.', d], _) if (b'2'..=b'9').contains(d) => {
            Some(at + 7)
        }
        _ => None,
    }
}

fn map_httparse_request(e: httparse::Error, buf: &[u8]) -> HttpError {
    match e {
        httparse::Error::Version => version_error(buf),
        httparse::Error::TooManyHeaders => HttpError::new(
            Status::RequestHeaderFieldsTooLarge,
            "too many header fields",
        ),
        httparse::Error::HeaderName => {
            HttpError::new(Status::BadRequest, "invalid header field name")
        }
        httparse::Error::HeaderValue => {
            HttpError::new(Status::BadRequest, "invalid header field value")
        }
        httparse::Error::NewLine => HttpError::new(Status::BadRequest, "invalid line ending"),
        httparse::Error::Status => HttpError::new(Status::BadRequest, "invalid status"),
        httparse::Error::Token => {
            HttpError::new(Status::BadRequest, "invalid token in request line")
        }
    }
}

/// Bytes of the request line seen so far (up to the first LF), to judge URI length on a
/// partial head.
fn first_line_len(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == b'\n')
}

const MAX_HEADERS_HARD: usize = 256;
const MAX_RESPONSE_HEADERS: usize = 128;
// `ResponseHead::hop` has a bit per field.
const _: () = assert!(MAX_RESPONSE_HEADERS <= 128);

/// Parse and validate a request head at the start of `buf`.
///
/// Returns `Partial` until the whole head is present. Limits are enforced on partial input
/// too, so a client cannot make the proxy buffer more than `limits.max_head` bytes.
pub fn parse_request(buf: &[u8], limits: &Limits) -> Result<Parsed<RequestHead>, HttpError> {
    // RFC 9112 section 2.2: ignore at least one empty line before the request line.
    let skip = leading_crlf(buf);
    let buf_full = buf;
    let buf = &buf[skip..];
    let max_headers = limits.max_headers.min(MAX_HEADERS_HARD);
    // Uninitialized header slots: no 8 KiB memset per parse (and per partial re-parse).
    let mut storage =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS_HARD];
    let mut req = httparse::Request::new(&mut []);
    let status = match req.parse_with_uninit_headers(buf, &mut storage[..max_headers]) {
        Ok(s) => s,
        Err(httparse::Error::Version) => {
            // RFC 9110 section 2.5: a higher minor version of a major version spoken is
            // processed as the highest minor spoken. Rare: parse a copy that says 1.1
            // (same length, so every span is valid in `buf_full` too).
            if let Some(at) = higher_minor(buf) {
                let mut copy = buf_full.to_vec();
                copy[skip + at] = b'1';
                return parse_request(&copy, limits);
            }
            return Err(version_error(buf));
        }
        Err(e) => return Err(map_httparse_request(e, buf)),
    };
    let len = match status {
        httparse::Status::Partial => {
            match first_line_len(buf) {
                None if buf.len() > limits.max_uri + 32 => {
                    return Err(HttpError::new(Status::UriTooLong, "request line too long"))
                }
                _ => {}
            }
            if buf_full.len() >= limits.max_head {
                return Err(HttpError::new(
                    Status::RequestHeaderFieldsTooLarge,
                    "request head too large",
                ));
            }
            return Ok(Parsed::Partial);
        }
        httparse::Status::Complete(n) => n,
    };
    if skip + len > limits.max_head {
        return Err(HttpError::new(
            Status::RequestHeaderFieldsTooLarge,
            "request head too large",
        ));
    }
    let method_s = req.method.unwrap_or("");
    let target_s = req.path.unwrap_or("");
    if target_s.len() > limits.max_uri {
        return Err(HttpError::new(
            Status::UriTooLong,
            "request target too long",
        ));
    }
    let version = if req.version == Some(0) {
        Version::Http10
    } else {
        Version::Http11
    };
    let method = Method::from_bytes(method_s.as_bytes());
    let method_span = Span::of(buf_full, method_s.as_bytes());
    let target = Span::of(buf_full, target_s.as_bytes());

    // Request target forms (RFC 9112 section 3.2).
    let tb = target_s.as_bytes();
    let (path, target_authority) = if tb.first() == Some(&b'/') {
        (target, None)
    } else if tb == b"*" {
        if method != Method::Options {
            return Err(HttpError::new(
                Status::BadRequest,
                "asterisk-form target outside OPTIONS",
            ));
        }
        (target, None)
    } else if method == Method::Connect {
        return Err(HttpError::new(
            Status::MethodNotAllowed,
            "CONNECT is not supported",
        ));
    } else if let Some(rest) = strip_scheme(tb) {
        let auth_len = rest
            .iter()
            .position(|&b| b == b'/' || b == b'?')
            .unwrap_or(rest.len());
        let auth = &rest[..auth_len];
        if auth.is_empty() || !valid_host(auth) {
            return Err(HttpError::new(
                Status::BadRequest,
                "invalid authority in absolute-form target",
            ));
        }
        let auth_span = Span::of(buf_full, auth);
        let path_bytes = &rest[auth_len..];
        // An absolute-form target with an empty path forwards as "/"; the caller sees an
        // empty span and writes "/".
        (Span::of(buf_full, path_bytes), Some(auth_span))
    } else {
        return Err(HttpError::new(Status::BadRequest, "invalid request target"));
    };

    let mut headers: SmallVec<[HeaderSpan; 24]> = SmallVec::new();
    let mut host: Option<Span> = None;
    let mut content_length: Option<u64> = None;
    let mut te_seen = false;
    let mut te_chunked_last = false;
    let mut te_other = false;
    let mut te_chunked_count = 0usize;
    let mut conn_close = false;
    let mut conn_keep_alive = false;
    let mut expect_continue = false;
    let mut connection_tokens: SmallVec<[Span; 4]> = SmallVec::new();

    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let value = h.value;
        debug_assert!(
            field_ok(name, value),
            "httparse let an invalid field through"
        );
        let hs = HeaderSpan {
            name: Span::of(buf_full, name),
            value: Span::of(buf_full, value),
        };
        headers.push(hs);
        if name_is(name, b"host") {
            if host.is_some() {
                return Err(HttpError::new(Status::BadRequest, "duplicate Host header"));
            }
            let v = trim(value);
            if !v.is_empty() && !valid_host(v) {
                return Err(HttpError::new(Status::BadRequest, "invalid Host header"));
            }
            host = Some(Span::of(buf_full, v));
        } else if name_is(name, b"content-length") {
            if content_length.is_some() {
                return Err(HttpError::new(
                    Status::BadRequest,
                    "duplicate Content-Length",
                ));
            }
            content_length = Some(
                parse_content_length(value)
                    .ok_or_else(|| HttpError::new(Status::BadRequest, "invalid Content-Length"))?,
            );
        } else if name_is(name, b"transfer-encoding") {
            te_seen = true;
            for coding in value.split(|&b| b == b',') {
                let c = trim(coding);
                if c.is_empty() {
                    continue;
                }
                if !c.iter().all(|&b| is_tchar(b)) {
                    return Err(HttpError::new(
                        Status::BadRequest,
                        "invalid Transfer-Encoding",
                    ));
                }
                te_chunked_last = c.eq_ignore_ascii_case(b"chunked");
                if te_chunked_last {
                    te_chunked_count += 1;
                } else {
                    // Known codings before chunked ("gzip, chunked") would have to be
                    // forwarded as they are; like nginx, only plain "chunked" is accepted.
                    te_other = true;
                }
            }
        } else if name_is(name, b"connection") {
            for tok in value.split(|&b| b == b',') {
                let t = trim(tok);
                if t.is_empty() {
                    continue;
                }
                if !t.iter().all(|&b| is_tchar(b)) {
                    return Err(HttpError::new(
                        Status::BadRequest,
                        "invalid Connection header",
                    ));
                }
                if t.eq_ignore_ascii_case(b"close") {
                    conn_close = true;
                } else if t.eq_ignore_ascii_case(b"keep-alive") {
                    conn_keep_alive = true;
                }
                connection_tokens.push(Span::of(buf_full, t));
            }
        } else if name_is(name, b"expect") {
            if trim(value).eq_ignore_ascii_case(b"100-continue") {
                expect_continue = true;
            } else {
                return Err(HttpError::new(
                    Status::ExpectationFailed,
                    "unsupported expectation",
                ));
            }
        }
    }

    if version == Version::Http11 && host.is_none() {
        return Err(HttpError::new(Status::BadRequest, "missing Host header"));
    }

    let body = if te_seen {
        if version == Version::Http10 {
            return Err(HttpError::new(
                Status::BadRequest,
                "Transfer-Encoding in an HTTP/1.0 request",
            ));
        }
        if content_length.is_some() {
            return Err(HttpError::new(
                Status::BadRequest,
                "both Content-Length and Transfer-Encoding",
            ));
        }
        if !te_chunked_last || te_chunked_count != 1 {
            return Err(HttpError::new(
                Status::BadRequest,
                "Transfer-Encoding whose final coding is not chunked",
            ));
        }
        if te_other {
            return Err(HttpError::new(
                Status::NotImplemented,
                "unsupported transfer coding",
            ));
        }
        BodyKind::Chunked
    } else if let Some(n) = content_length {
        if n > limits.max_body {
            return Err(HttpError::new(
                Status::PayloadTooLarge,
                "request body larger than max_body_size",
            ));
        }
        if n == 0 {
            BodyKind::None
        } else {
            BodyKind::Length(n)
        }
    } else {
        BodyKind::None
    };

    let keep_alive = match version {
        Version::Http11 => !conn_close,
        Version::Http10 => conn_keep_alive && !conn_close,
    };

    Ok(Parsed::Complete(RequestHead {
        len: skip + len,
        method,
        method_span,
        target,
        path,
        target_authority,
        version,
        headers,
        host,
        body,
        keep_alive,
        expect_continue,
        connection_tokens,
    }))
}

fn leading_crlf(buf: &[u8]) -> usize {
    let mut i = 0;
    // At most a few empty lines; more is not a client worth waiting for.
    while i < buf.len() && i < 8 && (buf[i] == b'\r' || buf[i] == b'\n') {
        i += 1;
    }
    i
}

fn strip_scheme(t: &[u8]) -> Option<&[u8]> {
    for s in [b"http://".as_slice(), b"https://"] {
        if t.len() >= s.len() && t[..s.len()].eq_ignore_ascii_case(s) {
            return Some(&t[s.len()..]);
        }
    }
    None
}

/// Is field name `name` the name `lower` (lowercase letters, digits and `-`), ignoring ASCII
/// case? For token characters (which names are, httparse checks), OR-ing 0x20 lowercases a
/// letter and leaves digits and `-` as they are, and maps no other token onto them, so the
/// comparison runs eight bytes at a time.
#[inline]
pub fn name_is(name: &[u8], lower: &[u8]) -> bool {
    debug_assert!(lower
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-'));
    if name.len() != lower.len() {
        return false;
    }
    #[inline(always)]
    fn word(s: &[u8]) -> u64 {
        match s.first_chunk::<8>() {
            Some(w) => u64::from_le_bytes(*w),
            None => 0,
        }
    }
    let mut i = 0;
    while i + 8 <= name.len() {
        if word(&name[i..]) | 0x2020_2020_2020_2020 != word(&lower[i..]) {
            return false;
        }
        i += 8;
    }
    name[i..]
        .iter()
        .zip(&lower[i..])
        .all(|(a, b)| a | 0x20 == *b)
}

/// RFC 9110 `tchar`.
#[inline]
pub fn is_tchar(b: u8) -> bool {
    matches!(b,
        b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_' | b'`' | b'|' | b'~'
        | b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z')
}

/// Field names are tokens; values are VCHAR / obs-text / SP / HTAB with no CR, LF, NUL or
/// DEL. httparse (with the default, strict `ParserConfig` both parsers use: no obs-fold, no
/// space before the colon, no skipped invalid lines) returns only fields like that, so this
/// is a debug assertion on the request path, not a second byte-at-a-time pass; the
/// property test `parsed_fields_are_valid` holds httparse to it on arbitrary input.
pub(crate) fn field_ok(name: &[u8], value: &[u8]) -> bool {
    static VALUE: [bool; 256] = {
        let mut t = [false; 256];
        let mut b = 0;
        while b < 256 {
            t[b] = b == b'\t' as usize || (b >= 0x20 && b != 0x7f);
            b += 1;
        }
        t
    };
    !name.is_empty()
        && name.iter().all(|&b| is_tchar(b))
        && value.iter().all(|&b| VALUE[b as usize])
}

fn valid_host(h: &[u8]) -> bool {
    static OK: [bool; 256] = {
        let mut t = [false; 256];
        let mut b = 0;
        while b < 256 {
            let c = b as u8;
            t[b] = c.is_ascii_alphanumeric()
                || matches!(c, b'.' | b'-' | b'_' | b':' | b'[' | b']' | b'~' | b'%');
            b += 1;
        }
        t
    };
    h.iter().all(|&b| OK[b as usize])
}

#[inline]
pub fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(start, |e| e + 1);
    &v[start..end]
}

/// Content-Length: 1*DIGIT, no sign, no list, at most 18 digits (no overflow possible).
pub fn parse_content_length(v: &[u8]) -> Option<u64> {
    let v = trim(v);
    if v.is_empty() || v.len() > 18 || !v.iter().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(v.iter().fold(0u64, |acc, &b| acc * 10 + (b - b'0') as u64))
}

/// A parsed response head (from a backend).
#[derive(Clone, Debug)]
pub struct ResponseHead {
    pub len: usize,
    pub version: Version,
    pub status: u16,
    pub reason: Span,
    pub headers: SmallVec<[HeaderSpan; 24]>,
    /// Framing of the response body as sent by the backend (ignoring the request method).
    pub body: BodyKind,
    /// The backend intends to close the connection after this response.
    pub close: bool,
    pub connection_tokens: SmallVec<[Span; 4]>,
    /// Which fields are hop-by-hop (bit i: `headers[i]`), framing fields and the fields
    /// `Connection` names included: judged once, while parsing.
    pub hop: [u64; 2],
}

impl ResponseHead {
    /// Field `i` is hop-by-hop (see [`hop`](Self::hop)).
    #[inline]
    pub fn is_hop_at(&self, i: usize) -> bool {
        self.hop
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    pub fn is_hop(&self, buf: &[u8], h: &HeaderSpan) -> bool {
        let name = h.name.get(buf);
        is_hop_by_hop(name)
            || self
                .connection_tokens
                .iter()
                .any(|t| t.get(buf).eq_ignore_ascii_case(name))
    }
}

/// Parse a backend's response head. Errors here become 502 for the client.
pub fn parse_response(buf: &[u8], max_head: usize) -> Result<Parsed<ResponseHead>, HttpError> {
    // Uninitialized header slots: no memset of 128 headers per response.
    let mut storage =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_RESPONSE_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let bad = |why: &'static str| HttpError::new(Status::BadGateway, why);
    let status = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut storage)
        .map_err(|_| bad("invalid response head from backend"))?;
    let len = match status {
        httparse::Status::Partial => {
            if buf.len() >= max_head {
                return Err(bad("response head from backend too large"));
            }
            return Ok(Parsed::Partial);
        }
        httparse::Status::Complete(n) => n,
    };
    let version = if resp.version == Some(0) {
        Version::Http10
    } else {
        Version::Http11
    };
    let code = resp.code.unwrap_or(0);
    if code < 100 {
        // Three digits, but not a status (`000`, `099`): nothing a client could act on.
        return Err(bad("invalid status code from backend"));
    }
    let reason = reason_span(buf);
    let mut headers: SmallVec<[HeaderSpan; 24]> = SmallVec::new();
    let mut content_length: Option<u64> = None;
    let mut te_seen = false;
    let mut te_chunked_last = false;
    let mut close = version == Version::Http10;
    let mut connection_tokens: SmallVec<[Span; 4]> = SmallVec::new();
    let mut hop = [0u64; 2];
    for (i, h) in resp.headers.iter().enumerate() {
        let name = h.name.as_bytes();
        debug_assert!(
            field_ok(name, h.value),
            "httparse let an invalid field through"
        );
        headers.push(HeaderSpan {
            name: Span::of(buf, name),
            value: Span::of(buf, h.value),
        });
        if is_hop_by_hop(name) {
            hop[i / 64] |= 1 << (i % 64);
        }
        // Only three names matter for framing: look at the length before the bytes.
        if !matches!(name.len(), 10 | 14 | 17) {
            continue;
        }
        if name_is(name, b"content-length") {
            let n = parse_content_length(h.value)
                .ok_or_else(|| bad("invalid Content-Length from backend"))?;
            if content_length.is_some_and(|c| c != n) {
                return Err(bad("conflicting Content-Length from backend"));
            }
            content_length = Some(n);
        } else if name_is(name, b"transfer-encoding") {
            te_seen = true;
            for c in h.value.split(|&b| b == b',') {
                let c = trim(c);
                if c.is_empty() {
                    continue;
                }
                te_chunked_last = c.eq_ignore_ascii_case(b"chunked");
                if !te_chunked_last {
                    // `gzip, chunked`: the proxy re-frames bodies and would drop the
                    // coding, handing the client bytes it cannot know are compressed.
                    return Err(bad("backend sent a transfer coding other than chunked"));
                }
            }
        } else if name_is(name, b"connection") {
            for t in h.value.split(|&b| b == b',') {
                let t = trim(t);
                if t.is_empty() {
                    continue;
                }
                if t.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if t.eq_ignore_ascii_case(b"keep-alive") && version == Version::Http10 {
                    close = false;
                }
                connection_tokens.push(Span::of(buf, t));
            }
        }
    }
    if te_seen && content_length.is_some() {
        return Err(bad(
            "backend sent both Content-Length and Transfer-Encoding",
        ));
    }
    if !connection_tokens.is_empty() {
        // Fields named by `Connection` are this hop's too.
        for (i, h) in headers.iter().enumerate() {
            let name = h.name.get(buf);
            if connection_tokens
                .iter()
                .any(|t| t.get(buf).eq_ignore_ascii_case(name))
            {
                hop[i / 64] |= 1 << (i % 64);
            }
        }
    }
    let body = if (100..200).contains(&code) || code == 204 || code == 304 {
        BodyKind::None
    } else if te_seen {
        if te_chunked_last {
            BodyKind::Chunked
        } else {
            close = true;
            BodyKind::UntilClose
        }
    } else if let Some(n) = content_length {
        if n == 0 {
            BodyKind::None
        } else {
            BodyKind::Length(n)
        }
    } else {
        close = true;
        BodyKind::UntilClose
    };
    Ok(Parsed::Complete(ResponseHead {
        len,
        version,
        status: code,
        reason,
        headers,
        body,
        close,
        connection_tokens,
        hop,
    }))
}

/// The reason phrase as sent, from the raw status line: httparse reports a non-UTF-8 phrase
/// (obs-text is legal there) as empty, but the proxy forwards it unchanged.
fn reason_span(buf: &[u8]) -> Span {
    let line_end = buf
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(buf.len());
    // "HTTP/1.x NNN" is 12 bytes; the phrase follows one space.
    if line_end <= 13 {
        return Span {
            start: line_end as u32,
            end: line_end as u32,
        };
    }
    Span {
        start: 13,
        end: line_end as u32,
    }
}

/// Status code of a health-probe response, as soon as the status line is complete.
pub fn probe_status(buf: &[u8]) -> Parsed<Result<u16, ()>> {
    let line_end = match buf.iter().position(|&b| b == b'\n') {
        Some(i) => i,
        None if buf.len() > 1024 => return Parsed::Complete(Err(())),
        None => return Parsed::Partial,
    };
    let line = &buf[..line_end];
    let ok = line.starts_with(b"HTTP/1.") && line.len() >= 12 && line[8] == b' ';
    if !ok {
        return Parsed::Complete(Err(()));
    }
    let code = &line[9..12];
    if !code.iter().all(|b| b.is_ascii_digit()) {
        return Parsed::Complete(Err(()));
    }
    Parsed::Complete(Ok(code
        .iter()
        .fold(0u16, |a, &b| a * 10 + (b - b'0') as u16)))
}

/// RFC 3986 unreserved characters: the ones a percent-escape stands for needlessly.
fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The value of one hexadecimal digit.
#[inline]
pub(crate) fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Normalise a path in place (RFC 3986 §6.2.2): escapes of unreserved characters decoded,
/// the others' hex digits upper-cased, dot segments removed (§5.2.4), and with
/// `merge_slashes` empty segments dropped (`//` as `/`, nginx's default). Never longer
/// than it was; returns the new length. `Err` for a malformed escape.
pub fn normalize_path(p: &mut [u8], merge_slashes: bool) -> Result<usize, HttpError> {
    let bad = || HttpError::new(Status::BadRequest, "invalid percent-encoding in the path");
    // Escapes first (a `%2e%2e` segment is a `..` segment).
    let mut n = p.len();
    if p.contains(&b'%') {
        let (mut r, mut w) = (0, 0);
        while r < n {
            if p[r] != b'%' {
                p[w] = p[r];
                (r, w) = (r + 1, w + 1);
                continue;
            }
            if r + 2 >= n {
                return Err(bad());
            }
            let (hi, lo) = match (hex_val(p[r + 1]), hex_val(p[r + 2])) {
                (Some(h), Some(l)) => (h, l),
                _ => return Err(bad()),
            };
            let v = hi * 16 + lo;
            if unreserved(v) {
                p[w] = v;
                w += 1;
            } else {
                p[w] = b'%';
                p[w + 1] = p[r + 1].to_ascii_uppercase();
                p[w + 2] = p[r + 2].to_ascii_uppercase();
                w += 3;
            }
            r += 3;
        }
        n = w;
    }
    let dirty = p[..n]
        .windows(2)
        .any(|w| (w[0] == b'/' && w[1] == b'.') || (merge_slashes && w[0] == b'/' && w[1] == b'/'));
    if !dirty || p.first() != Some(&b'/') {
        return Ok(n);
    }
    // Segment by segment; the output (at `o`) never overtakes the input (at `i`).
    let mut o = 0;
    let mut i = 0;
    while i < n {
        let start = i + 1;
        let end = p[start..n]
            .iter()
            .position(|&b| b == b'/')
            .map_or(n, |k| start + k);
        let last = end == n;
        let pop = |o: &mut usize, p: &[u8]| {
            *o = p[..*o].iter().rposition(|&b| b == b'/').unwrap_or(0);
        };
        match &p[start..end] {
            b"." => {}
            b".." => pop(&mut o, p),
            b"" if merge_slashes && !last => {}
            _ => {
                p[o] = b'/';
                p.copy_within(start..end, o + 1);
                o += 1 + (end - start);
                i = end;
                continue;
            }
        }
        // A trailing `.`, `..` or empty segment leaves the path ending in `/`.
        if last {
            p[o] = b'/';
            o += 1;
        }
        i = end;
    }
    if o == 0 {
        p[0] = b'/';
        o = 1;
    }
    Ok(o)
}

/// Normalise the host in place: lower case, a trailing dot dropped (`example.com.`), the
/// default port dropped (`:80`). Returns the new length.
pub fn normalize_host(h: &mut [u8]) -> usize {
    h.make_ascii_lowercase();
    let mut n = h.len();
    let port_at = if h.first() == Some(&b'[') {
        h.iter().position(|&b| b == b']').map(|i| i + 1)
    } else {
        h.iter().rposition(|&b| b == b':')
    };
    let name_end = port_at.unwrap_or(n);
    if &h[name_end..n] == b":80" {
        n = name_end;
    }
    let mut name = name_end;
    while name > 1 && h[name - 1] == b'.' {
        name -= 1;
    }
    if name < name_end {
        h.copy_within(name_end..n, name);
        n -= name_end - name;
    }
    n
}

impl RequestHead {
    /// Normalise the request target and host in `buf` (the bytes this head was parsed
    /// from), so routing, the cache key and the backend all see one form of them: the path
    /// by [`normalize_path`] (the query is kept as sent), the host by [`normalize_host`].
    pub fn normalize(&mut self, buf: &mut [u8], merge_slashes: bool) -> Result<(), HttpError> {
        let (start, end) = (self.path.start as usize, self.path.end as usize);
        if end > start {
            let t = &mut buf[start..end];
            let q = t.iter().position(|&b| b == b'?').unwrap_or(t.len());
            let n = normalize_path(&mut t[..q], merge_slashes)?;
            if n < q {
                t.copy_within(q.., n);
            }
            self.path.end = (start + n + (t.len() - q)) as u32;
        }
        for span in [self.target_authority.as_mut(), self.host.as_mut()]
            .into_iter()
            .flatten()
        {
            let s = span.start as usize;
            let n = normalize_host(&mut buf[s..span.end as usize]);
            span.end = (s + n) as u32;
        }
        Ok(())
    }
}
