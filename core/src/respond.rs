//! The response pipeline: what happens to a response between where it comes from and the
//! client's connection.
//!
//! ```text
//! source (backend reader, ...)                                    client (HTTP/1.1)
//!   head ──> ResponsePlan ──stages edit it (fields, framing)──> write_h1 ──> OutBuf
//!   body ──> BodySink ──> stage ──> stage ──> ClientBody (chunk framing) ──> OutBuf
//! ```
//!
//! A stage sees the head as a [`ResponsePlan`]: the source's fields (as spans into the bytes
//! they arrived in, copied out in runs, never re-parsed), which of them are dropped, the
//! fields added, and how the body is delimited for the client. It sees the body as a
//! [`BodySink`] in front of the next one: it may look at the bytes (the cache's capture
//! copies them), transform them (compression, with `Framing::Chunked` set on the head), or
//! pass them on untouched. The last sink frames the body for the client. Stages are
//! composed statically (a struct holding the next sink), so a pipeline without stages costs
//! nothing.

use crate::buf::OutBuf;
use crate::http1::head::{self, HeaderSpan, ResponseHead};
use crate::http1::response::BodySink;
use crate::http1::write::{push_chunk, push_content_length, push_date, push_dec, LAST_CHUNK};
use bytes::Bytes;
use smallvec::SmallVec;
use std::time::SystemTime;

/// How the body is delimited for the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// The response has no body (HEAD, 204, 304): a source's `Content-Length` is kept (it
    /// describes the representation), except on a 204.
    NoBody,
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: chunked` (HTTP/1.1 clients).
    Chunked,
    /// Delimited by closing the connection (an HTTP/1.0 client, length unknown).
    Close,
}

/// Where a plan's fields come from.
#[derive(Clone, Copy)]
enum Fields<'b> {
    /// A backend's parsed head; `src` holds the bytes its spans point into.
    Parsed { h: &'b ResponseHead, src: &'b [u8] },
    /// Field lines as the cache stored them (`Name: value\r\n` each, end-to-end fields
    /// only, `Date` always among them), after the status line `status_line`.
    Stored {
        status_line: &'b [u8],
        lines: &'b [u8],
    },
    /// A response the proxy makes itself: no fields but those added.
    Local,
}

/// A response head on its way to the client (see the [module docs](self)).
pub struct ResponsePlan<'b> {
    status: u16,
    reason: &'b [u8],
    /// The status was changed from the source's (a stored status line is rewritten).
    restatused: bool,
    fields: Fields<'b>,
    /// Fields of the source dropped by stages (bit i: field i; past 128 all are).
    dropped: [u64; 2],
    /// Pieces of field lines (`Name: value\r\n`) written after the forwarded ones.
    added: SmallVec<[&'b [u8]; 6]>,
    pub framing: Framing,
    /// The client connection closes after this response (`Connection: close`).
    pub close: bool,
    /// An HTTP/1.0 client keeps the connection (`Connection: keep-alive`).
    pub http10_keep_alive: bool,
}

/// The field lines of stored `lines` with their index and name (lines without CRLF).
fn stored_lines(lines: &[u8]) -> impl Iterator<Item = (usize, &[u8], &[u8])> {
    lines
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(|l| !l.is_empty())
        .enumerate()
        .map(|(i, l)| {
            let colon = l.iter().position(|&b| b == b':').unwrap_or(l.len());
            (i, &l[..colon], l)
        })
}

impl<'b> ResponsePlan<'b> {
    fn new(status: u16, reason: &'b [u8], fields: Fields<'b>, framing: Framing) -> Self {
        ResponsePlan {
            status,
            reason,
            restatused: false,
            fields,
            dropped: [0; 2],
            added: SmallVec::new(),
            framing,
            close: false,
            http10_keep_alive: false,
        }
    }

    /// The plan for a backend's response head `h` (read from `src`): its end-to-end fields
    /// forwarded, hop-by-hop ones (including those its `Connection` names) and framing
    /// dropped; `framing` is how the client will get the body.
    #[inline]
    pub fn forwarded(h: &'b ResponseHead, src: &'b [u8], framing: Framing) -> Self {
        Self::new(
            h.status,
            h.reason.get(src),
            Fields::Parsed { h, src },
            framing,
        )
    }

    /// The plan for a stored head (`crate::cache::store::Stored::head`: the status line,
    /// then end-to-end field lines, each with its CRLF; `Date` among them).
    pub fn stored(head: &'b [u8], framing: Framing) -> Self {
        let end = head
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(head.len(), |i| i + 2);
        let (status_line, lines) = head.split_at(end);
        // "HTTP/1.1 200 OK\r\n", as the cache wrote it.
        let code = status_line.get(9..12).unwrap_or(b"500");
        let status = code
            .iter()
            .fold(0u16, |n, &d| n * 10 + u16::from(d.wrapping_sub(b'0') % 10));
        let reason = status_line
            .get(13..status_line.len().saturating_sub(2))
            .unwrap_or(b"");
        Self::new(
            status,
            reason,
            Fields::Stored { status_line, lines },
            framing,
        )
    }

    /// The plan for a response the proxy makes itself.
    pub fn local(status: u16, reason: &'b [u8], framing: Framing) -> Self {
        Self::new(status, reason, Fields::Local, framing)
    }

    pub fn status(&self) -> u16 {
        self.status
    }

    /// Answer with another status (a cache's 304 from a stored 200).
    pub fn set_status(&mut self, status: u16, reason: &'b [u8]) {
        self.status = status;
        self.reason = reason;
        self.restatused = true;
    }

    fn drop_at(&mut self, i: usize) {
        if let Some(w) = self.dropped.get_mut(i / 64) {
            *w |= 1 << (i % 64);
        }
    }

    #[inline]
    fn dropped_bit(&self, i: usize) -> bool {
        // Fields past 128 (a backend limit): dropped rather than forwarded unseen by stages.
        self.dropped
            .get(i / 64)
            .is_none_or(|w| w & (1 << (i % 64)) != 0)
    }

    /// Whether backend field `i` (named `name`) is not forwarded: a stage dropped it, or
    /// it is hop-by-hop (framing fields included, except the representation's length on a
    /// response without a body, which describes what a GET would get; not on a 204).
    #[inline]
    fn parsed_dropped(&self, h: &ResponseHead, i: usize, name: &[u8]) -> bool {
        if self.dropped_bit(i) {
            return true;
        }
        if !h.is_hop_at(i) {
            return false;
        }
        !(self.framing == Framing::NoBody
            && h.status != 204
            && head::name_is(name, b"content-length"))
    }

    /// The value of the first forwarded field named `name` (given in lower case; fields
    /// match whatever their case).
    pub fn field(&self, name: &[u8]) -> Option<&'b [u8]> {
        match self.fields {
            Fields::Parsed { h, src } => h
                .headers
                .iter()
                .enumerate()
                .find(|&(i, hd)| {
                    let n = hd.name.get(src);
                    head::name_is(n, name) && !self.parsed_dropped(h, i, n)
                })
                .map(|(_, hd)| hd.value.get(src)),
            Fields::Stored { lines, .. } => stored_lines(lines)
                .find(|&(i, n, _)| n.eq_ignore_ascii_case(name) && !self.dropped_bit(i))
                .map(|(_, n, l)| head::trim(&l[(n.len() + 1).min(l.len())..])),
            Fields::Local => None,
        }
    }

    /// Stop forwarding every field named `name` (given in lower case).
    pub fn drop_field(&mut self, name: &[u8]) {
        self.drop_where(|n| n.eq_ignore_ascii_case(name));
    }

    /// Stop forwarding the fields `strip` says so of (by name).
    pub fn drop_where(&mut self, mut strip: impl FnMut(&[u8]) -> bool) {
        match self.fields {
            Fields::Parsed { h, src } => {
                for (i, hd) in h.headers.iter().enumerate() {
                    if strip(hd.name.get(src)) {
                        self.drop_at(i);
                    }
                }
            }
            Fields::Stored { lines, .. } => {
                for (i, n, _) in stored_lines(lines) {
                    if strip(n) {
                        self.drop_at(i);
                    }
                }
            }
            Fields::Local => {}
        }
    }

    /// Add a field after the forwarded ones (the bytes are borrowed until the head is
    /// written).
    pub fn add_field(&mut self, name: &'b [u8], value: &'b [u8]) {
        self.added.extend_from_slice(&[name, b": ", value, b"\r\n"]);
    }

    /// Add field lines as written (`Name: value\r\n` each).
    pub fn add_lines(&mut self, lines: &'b [u8]) {
        debug_assert!(lines.is_empty() || lines.ends_with(b"\r\n"));
        self.added.push(lines);
    }

    /// Serialize as an HTTP/1.1 response head. `wall` (asked only then) dates it when the
    /// source did not (RFC 9110 section 6.6.1: the origin had no clock; this proxy has).
    #[inline]
    pub fn write_h1(&self, out: &mut Vec<u8>, wall: impl FnOnce() -> SystemTime) {
        let stored_line = match self.fields {
            Fields::Stored { status_line, .. } if !self.restatused => Some(status_line),
            _ => None,
        };
        match stored_line {
            Some(line) => out.extend_from_slice(line),
            None => {
                out.extend_from_slice(b"HTTP/1.1 ");
                push_dec(out, self.status as u64);
                out.push(b' ');
                out.extend_from_slice(self.reason);
                out.extend_from_slice(b"\r\n");
            }
        }
        let dated = match self.fields {
            Fields::Parsed { h, src } => {
                let mut runs = Runs::new(src);
                let mut dated = false;
                for (i, hd) in h.headers.iter().enumerate() {
                    let name = hd.name.get(src);
                    if self.parsed_dropped(h, i, name) {
                        runs.flush(out);
                    } else {
                        dated |= head::name_is(name, b"date");
                        runs.keep(out, hd);
                    }
                }
                runs.flush(out);
                dated
            }
            Fields::Stored { lines, .. } if self.dropped == [0; 2] => {
                out.extend_from_slice(lines);
                true
            }
            Fields::Stored { lines, .. } => {
                let mut dated = false;
                for (i, n, l) in stored_lines(lines) {
                    if !self.dropped_bit(i) {
                        dated |= n.eq_ignore_ascii_case(b"date");
                        out.extend_from_slice(l);
                        out.extend_from_slice(b"\r\n");
                    }
                }
                dated
            }
            Fields::Local => false,
        };
        if !dated {
            push_date(out, wall());
        }
        match self.framing {
            Framing::Length(n) => push_content_length(out, n),
            Framing::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
            Framing::NoBody | Framing::Close => {}
        }
        for piece in &self.added {
            out.extend_from_slice(piece);
        }
        if self.close {
            out.extend_from_slice(b"Connection: close\r\n");
        } else if self.http10_keep_alive {
            out.extend_from_slice(b"Connection: keep-alive\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// The last body stage: the body framed for an HTTP/1.1 client into its output (shared
/// pieces stay shared unless chunk framing needs them copied).
pub struct ClientBody<'o> {
    out: &'o mut OutBuf,
    chunked: bool,
}

impl<'o> ClientBody<'o> {
    pub fn new(out: &'o mut OutBuf, framing: Framing) -> Self {
        ClientBody {
            out,
            chunked: framing == Framing::Chunked,
        }
    }
}

impl BodySink for ClientBody<'_> {
    #[inline]
    fn shared(&mut self, b: Bytes) {
        if self.chunked {
            push_chunk(self.out.vec(), &b);
        } else {
            self.out.push_shared(b);
        }
    }
    #[inline]
    fn copy(&mut self, d: &[u8]) {
        if self.chunked {
            push_chunk(self.out.vec(), d);
        } else {
            self.out.vec().extend_from_slice(d);
        }
    }
    fn end(&mut self) {
        if self.chunked {
            self.out.vec().extend_from_slice(LAST_CHUNK);
        }
    }
}

/// The cache's capture as a body stage: every body byte on its way to the client is also
/// copied into the entry being stored (and to the requests that follow its fetch); at the
/// end the entry is complete and stored.
pub struct CaptureStage<'a, S> {
    pub cache: &'a crate::cache::HttpCache,
    pub capture: &'a mut crate::cache::http::Capture,
    pub next: S,
}

impl<S: BodySink> BodySink for CaptureStage<'_, S> {
    fn shared(&mut self, b: Bytes) {
        self.capture.push(&b);
        self.next.shared(b);
    }
    fn copy(&mut self, d: &[u8]) {
        self.capture.push(d);
        self.next.copy(d);
    }
    fn end(&mut self) {
        self.cache.finish(self.capture);
        self.next.end();
    }
}

/// Forwarded header fields copied in runs: consecutive kept fields that `buf` separates by
/// exactly CRLF go out as one copy of their lines as received (`name:` OWS `value`, already
/// validated), instead of four appends per field. A field whose line does not look like
/// that (an empty value httparse placed elsewhere) is written field by field.
pub(crate) struct Runs<'b> {
    buf: &'b [u8],
    start: usize,
    /// End of the run's last value; 0: no run open.
    end: usize,
}

impl<'b> Runs<'b> {
    pub(crate) fn new(buf: &'b [u8]) -> Self {
        Runs {
            buf,
            start: 0,
            end: 0,
        }
    }

    #[inline]
    pub(crate) fn keep(&mut self, out: &mut Vec<u8>, h: &HeaderSpan) {
        let (s, colon, e) = (
            h.name.start as usize,
            h.name.end as usize,
            h.value.end as usize,
        );
        if e <= colon || self.buf.get(colon) != Some(&b':') {
            self.flush(out);
            push_header(out, h.name.get(self.buf), h.value.get(self.buf));
            return;
        }
        if self.end != 0 && s == self.end + 2 && &self.buf[self.end..s] == b"\r\n" {
            self.end = e;
            return;
        }
        self.flush(out);
        (self.start, self.end) = (s, e);
    }

    #[inline]
    pub(crate) fn flush(&mut self, out: &mut Vec<u8>) {
        if self.end != 0 {
            out.extend_from_slice(&self.buf[self.start..self.end]);
            out.extend_from_slice(b"\r\n");
            self.end = 0;
        }
    }
}

#[inline]
pub(crate) fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http1::head::{parse_response, Parsed};
    use std::time::{Duration, UNIX_EPOCH};

    fn head(wire: &[u8]) -> ResponseHead {
        match parse_response(wire, 64 * 1024).unwrap() {
            Parsed::Complete(h) => h,
            Parsed::Partial => panic!("partial"),
        }
    }

    fn text(plan: &ResponsePlan<'_>) -> String {
        let mut out = Vec::new();
        plan.write_h1(&mut out, || UNIX_EPOCH + Duration::from_secs(784111777));
        String::from_utf8(out).unwrap()
    }

    const WIRE: &[u8] = b"HTTP/1.1 200 Fine\r\nServer: o\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\nContent-Length: 5\r\nETag: \"a\"\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nVary: Accept\r\n\r\n";

    #[test]
    fn forwarded_head_drops_hop_fields_and_reframes() {
        let h = head(WIRE);
        let plan = ResponsePlan::forwarded(&h, WIRE, Framing::Chunked);
        assert_eq!(
            text(&plan),
            "HTTP/1.1 200 Fine\r\nServer: o\r\nETag: \"a\"\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nVary: Accept\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        // Without a body the representation's length stays (but not on a 204).
        let mut plan = ResponsePlan::forwarded(&h, WIRE, Framing::NoBody);
        plan.close = true;
        assert!(text(&plan).contains("\r\nContent-Length: 5\r\n"));
        assert!(text(&plan).ends_with("Connection: close\r\n\r\n"));
    }

    #[test]
    fn stages_edit_fields_and_the_proxy_dates_undated_responses() {
        let wire = b"HTTP/1.1 200 OK\r\nETag: \"a\"\r\nContent-Type: text/css\r\nContent-Length: 9\r\n\r\n";
        let h = head(wire);
        let mut plan = ResponsePlan::forwarded(&h, wire, Framing::Length(9));
        assert_eq!(plan.field(b"content-type"), Some(&b"text/css"[..]));
        assert_eq!(plan.field(b"content-length"), None, "framing is the plan's");
        // What a compression stage does.
        plan.drop_field(b"etag");
        plan.add_field(b"ETag", b"W/\"a\"");
        plan.add_lines(b"Vary: Accept-Encoding\r\n");
        plan.framing = Framing::Chunked;
        plan.http10_keep_alive = true;
        assert_eq!(plan.field(b"etag"), None);
        assert_eq!(
            text(&plan),
            "HTTP/1.1 200 OK\r\nContent-Type: text/css\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nTransfer-Encoding: chunked\r\nETag: W/\"a\"\r\nVary: Accept-Encoding\r\nConnection: keep-alive\r\n\r\n"
        );
    }

    #[test]
    fn stored_heads_go_out_as_stored_unless_a_stage_edits_them() {
        let stored = b"HTTP/1.1 200 OK\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nETag: \"v1\"\r\nContent-Type: text/css\r\nX-Y: z\r\n";
        let mut plan = ResponsePlan::stored(stored, Framing::Length(3));
        assert_eq!(plan.status(), 200);
        assert_eq!(plan.field(b"content-type"), Some(&b"text/css"[..]));
        plan.add_field(b"Age", b"7");
        let t = text(&plan);
        assert_eq!(
            t,
            format!(
                "{}Content-Length: 3\r\nAge: 7\r\n\r\n",
                std::str::from_utf8(stored).unwrap()
            )
        );
        // A 304 keeps only the validators (what the cache's not-modified reply does).
        let mut plan = ResponsePlan::stored(stored, Framing::NoBody);
        plan.set_status(304, b"Not Modified");
        plan.drop_where(|n| !n.eq_ignore_ascii_case(b"etag") && !n.eq_ignore_ascii_case(b"date"));
        assert_eq!(plan.field(b"x-y"), None);
        plan.close = true;
        assert_eq!(
            text(&plan),
            "HTTP/1.1 304 Not Modified\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nETag: \"v1\"\r\nConnection: close\r\n\r\n"
        );
        // Dropping the stored Date has the proxy date the response.
        let mut plan = ResponsePlan::stored(stored, Framing::NoBody);
        plan.drop_field(b"date");
        assert!(text(&plan).starts_with("HTTP/1.1 200 OK\r\nETag: \"v1\"\r\nContent-Type: text/css\r\nX-Y: z\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\n"));
    }

    #[test]
    fn local_replies_carry_only_what_is_added() {
        let mut plan = ResponsePlan::local(503, b"Service Unavailable", Framing::Length(4));
        plan.add_lines(b"Server: trireme\r\n");
        assert_eq!(plan.field(b"server"), None);
        assert_eq!(
            text(&plan),
            "HTTP/1.1 503 Service Unavailable\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nContent-Length: 4\r\nServer: trireme\r\n\r\n"
        );
    }

    #[test]
    fn client_body_frames_chunks_and_keeps_shared_bytes_shared() {
        let mut out = OutBuf::new();
        let mut b = ClientBody::new(&mut out, Framing::Chunked);
        b.copy(b"abc");
        b.shared(Bytes::from_static(b"de"));
        b.copy(b"");
        b.end();
        assert_eq!(out.pending(), b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n");
        let mut out = OutBuf::new();
        let long = Bytes::from(vec![b'x'; crate::buf::SHARE_MIN]);
        let mut b = ClientBody::new(&mut out, Framing::Length(long.len() as u64));
        b.shared(long.clone());
        b.end();
        assert!(out.has_shared());
        assert_eq!(out.len(), long.len());
    }
}
