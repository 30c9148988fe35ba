//! What the proxy tells a backend about the client, and which of the client's forwarding
//! fields it believes: `X-Forwarded-For`, `Forwarded`, `X-Real-IP`, `X-Forwarded-Host`,
//! `X-Forwarded-Proto`, in one place.
//!
//! A client's own values of these fields are believed only when it connects from a
//! trusted proxy range (`server.trusted_proxies`); from anyone else they are replaced by
//! what the proxy saw (its address, the request's host, the scheme), so a backend that
//! reflects one of them cannot be made to say something for everyone. `X-Original-URL`
//! and `X-Rewrite-URL` (which some frameworks take as the real target) never pass.
//!
//! The upstream request head is written from these rules ([`ForwardFields`]), and the
//! cache computes a request's `Vary` variant from the same values ([`vary_values`]): a
//! variant is chosen by what the backend received, not by what the client sent.

use crate::http1::head::RequestHead;
use smallvec::SmallVec;
use std::borrow::Cow;
use std::net::IpAddr;

/// The client connection as forwarding sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub ip: IpAddr,
    /// It connects from `server.trusted_proxies`: its forwarding fields are kept (and
    /// appended to), not replaced.
    pub trusted: bool,
    /// It came over TLS: `X-Forwarded-Proto` and `Forwarded`'s `proto` say `https`.
    pub https: bool,
}

/// An address as text, on the stack: the longest IPv6 form is 45 bytes. Written once per
/// request, which names the client three times (`X-Forwarded-For`, `Forwarded`,
/// `X-Real-IP`); not kept per connection (an idle connection's memory counts more).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpText {
    len: u8,
    buf: [u8; 45],
}

impl IpText {
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }

    pub fn of(ip: IpAddr) -> IpText {
        let mut buf = [0u8; 45];
        let len = match ip {
            IpAddr::V4(a) => {
                // Digits written in place: no formatter, no copy call per octet.
                let mut n = 0;
                for (i, o) in a.octets().into_iter().enumerate() {
                    if i > 0 {
                        buf[n] = b'.';
                        n += 1;
                    }
                    if o >= 100 {
                        buf[n] = b'0' + o / 100;
                        n += 1;
                    }
                    if o >= 10 {
                        buf[n] = b'0' + o / 10 % 10;
                        n += 1;
                    }
                    buf[n] = b'0' + o % 10;
                    n += 1;
                }
                n
            }
            IpAddr::V6(a) => {
                use std::io::Write;
                let mut c = std::io::Cursor::new(&mut buf[..]);
                let _ = write!(c, "{a}");
                c.position() as usize
            }
        };
        IpText {
            len: len as u8,
            buf,
        }
    }
}

impl Peer {
    /// A request the proxy makes on its own (warming, background refreshes).
    pub const LOCAL: Peer = Peer {
        ip: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        trusted: false,
        https: false,
    };

    pub fn new(ip: IpAddr, trusted: bool) -> Peer {
        Peer {
            ip,
            trusted,
            https: false,
        }
    }

    /// The scheme the client used.
    #[inline]
    pub fn scheme(&self) -> &'static str {
        if self.https {
            "https"
        } else {
            "http"
        }
    }

    /// The address as text, as the forwarding fields carry it.
    pub fn ip_text(&self) -> IpText {
        IpText::of(self.ip)
    }
}

/// An IP range, `10.0.0.0/8`, `2001:db8::/32`, or one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, bits) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let net: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not an address or range (e.g. 10.0.0.0/8, ::1)"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(b) => match b.trim().parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("`{s}`: prefix length must be 0-{max}")),
            },
        };
        Ok(Cidr { net, bits })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        fn under(a: u128, b: u128, bits: u8, width: u8) -> bool {
            let shift = width - bits;
            bits == 0 || (a >> shift) == (b >> shift)
        }
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                under(u32::from(n) as u128, u32::from(a) as u128, self.bits, 32)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => under(u128::from(n), u128::from(a), self.bits, 128),
            // An IPv4 client on a dual-stack socket shows as ::ffff:a.b.c.d.
            (IpAddr::V4(_), IpAddr::V6(a)) => a
                .to_ipv4_mapped()
                .is_some_and(|v4| self.contains(IpAddr::V4(v4))),
            (IpAddr::V6(_), IpAddr::V4(_)) => false,
        }
    }
}

/// `server.trusted_proxies`.
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies(pub Vec<Cidr>);

impl TrustedProxies {
    pub fn peer(&self, ip: IpAddr) -> Peer {
        Peer::new(ip, self.0.iter().any(|c| c.contains(ip)))
    }
}

/// A request field the proxy does not pass on as the client sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Host,
    XForwardedFor,
    Forwarded,
    XRealIp,
    XForwardedHost,
    XForwardedProto,
    Via,
    /// `X-Original-URL`, `X-Rewrite-URL`: never forwarded.
    Dropped,
}

/// Which forwarding field `name` is, if any (case-insensitive).
pub fn classify(name: &[u8]) -> Option<Field> {
    let is = |s: &str| crate::http1::head::name_is(name, s.as_bytes());
    match name.len() {
        3 if is("via") => Some(Field::Via),
        4 if is("host") => Some(Field::Host),
        9 if is("forwarded") => Some(Field::Forwarded),
        9 if is("x-real-ip") => Some(Field::XRealIp),
        13 if is("x-rewrite-url") => Some(Field::Dropped),
        14 if is("x-original-url") => Some(Field::Dropped),
        15 if is("x-forwarded-for") => Some(Field::XForwardedFor),
        16 if is("x-forwarded-host") => Some(Field::XForwardedHost),
        17 if is("x-forwarded-proto") => Some(Field::XForwardedProto),
        _ => None,
    }
}

/// Append `ip` as text (no allocation).
pub fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    out.extend_from_slice(IpText::of(ip).as_bytes());
}

/// This hop's `Forwarded` element (RFC 7239): `for=192.0.2.1;host="h";proto=http`, an IPv6
/// node quoted and bracketed.
pub fn push_forwarded_element(
    out: &mut Vec<u8>,
    ip: IpAddr,
    text: &IpText,
    host: &[u8],
    proto: &str,
) {
    out.extend_from_slice(b"for=");
    if ip.is_ipv6() {
        out.extend_from_slice(b"\"[");
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"]\"");
    } else {
        out.extend_from_slice(text.as_bytes());
    }
    // Host values are validated (no quote or backslash can occur); quoted for the ':'.
    out.extend_from_slice(b";host=\"");
    out.extend_from_slice(host);
    out.extend_from_slice(b"\";proto=");
    out.extend_from_slice(proto.as_bytes());
}

/// The forwarding fields of one request as they go to the backend: what the client sent
/// (kept only from a trusted peer), to which this hop's values are added or which they
/// replace. Collected while the other fields are copied.
#[derive(Default)]
pub struct ForwardFields<'b> {
    xff: SmallVec<[&'b [u8]; 2]>,
    forwarded: SmallVec<[&'b [u8]; 2]>,
    via: SmallVec<[&'b [u8]; 2]>,
    real_ip: Option<&'b [u8]>,
    host: Option<&'b [u8]>,
    proto: Option<&'b [u8]>,
}

impl<'b> ForwardFields<'b> {
    /// Take note of a client field. False: not a forwarding field, copy it as it is.
    pub fn note(&mut self, peer: Peer, name: &[u8], value: &'b [u8]) -> bool {
        let Some(f) = classify(name) else {
            return false;
        };
        let t = peer.trusted;
        match f {
            Field::Host | Field::Dropped => {}
            Field::Via => self.via.push(value),
            Field::XForwardedFor if t => self.xff.push(value),
            Field::Forwarded if t => self.forwarded.push(value),
            Field::XRealIp if t => self.real_ip = self.real_ip.or(Some(value)),
            Field::XForwardedHost if t => self.host = self.host.or(Some(value)),
            Field::XForwardedProto if t => self.proto = self.proto.or(Some(value)),
            _ => {}
        }
        true
    }

    /// Write this hop's forwarding fields. `host`: the Host sent to the backend.
    pub fn write(&self, out: &mut Vec<u8>, peer: Peer, host: &[u8], via: &[u8]) {
        let list = |out: &mut Vec<u8>, vs: &[&[u8]]| {
            for v in vs {
                out.extend_from_slice(v);
                out.extend_from_slice(b", ");
            }
        };
        out.extend_from_slice(b"X-Forwarded-For: ");
        let text = peer.ip_text();
        list(out, &self.xff);
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"\r\nForwarded: ");
        list(out, &self.forwarded);
        push_forwarded_element(out, peer.ip, &text, host, peer.scheme());
        out.extend_from_slice(b"\r\nX-Real-IP: ");
        out.extend_from_slice(self.real_ip.unwrap_or(text.as_bytes()));
        out.extend_from_slice(b"\r\nX-Forwarded-Host: ");
        out.extend_from_slice(self.host.unwrap_or(host));
        out.extend_from_slice(b"\r\nX-Forwarded-Proto: ");
        out.extend_from_slice(self.proto.unwrap_or(peer.scheme().as_bytes()));
        out.extend_from_slice(b"\r\nVia: ");
        list(out, &self.via);
        out.extend_from_slice(via);
        out.extend_from_slice(b"\r\n");
    }
}

/// The values field `name` has in the request as forwarded to the backend, for the
/// cache's `Vary` (RFC 9111 §4.1): none for the fields the proxy removes (hop-by-hop ones,
/// those the client lists in `Connection`, `X-Original-URL`), this hop's value for the
/// ones it sets, the client's values otherwise. `Via` counts as sent (the proxy only
/// appends a constant).
pub fn vary_values<'b>(
    h: &RequestHead,
    buf: &'b [u8],
    peer: Peer,
    name: &[u8],
) -> SmallVec<[Cow<'b, [u8]>; 2]> {
    let mut out: SmallVec<[Cow<'b, [u8]>; 2]> = SmallVec::new();
    let sent = || {
        h.headers
            .iter()
            .filter(|f| f.name.get(buf).eq_ignore_ascii_case(name))
            .map(|f| f.value.get(buf))
    };
    let own = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut v = Vec::new();
        f(&mut v);
        Cow::Owned(v)
    };
    let host = h.effective_host(buf);
    let first_if_trusted = || sent().next().filter(|_| peer.trusted);
    match classify(name) {
        Some(Field::Dropped) => {}
        Some(Field::Host) => out.push(Cow::Borrowed(host)),
        Some(Field::XForwardedFor) => {
            if peer.trusted {
                out.extend(sent().map(Cow::Borrowed));
            }
            out.push(Cow::Owned(peer.ip_text().as_bytes().to_vec()));
        }
        Some(Field::Forwarded) => {
            if peer.trusted {
                out.extend(sent().map(Cow::Borrowed));
            }
            out.push(own(&|v| {
                push_forwarded_element(v, peer.ip, &peer.ip_text(), host, peer.scheme())
            }));
        }
        Some(Field::XRealIp) => out.push(match first_if_trusted() {
            Some(v) => Cow::Borrowed(v),
            None => Cow::Owned(peer.ip_text().as_bytes().to_vec()),
        }),
        Some(Field::XForwardedHost) => out.push(Cow::Borrowed(first_if_trusted().unwrap_or(host))),
        Some(Field::XForwardedProto) => out.push(Cow::Borrowed(
            first_if_trusted().unwrap_or(peer.scheme().as_bytes()),
        )),
        Some(Field::Via) | None if h.is_hop_name(buf, name) => {}
        Some(Field::Via) | None => out.extend(sent().map(Cow::Borrowed)),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_contain_what_they_should() {
        let c = |s: &str| Cidr::parse(s).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(c("10.0.0.0/8").contains(ip("10.200.3.4")));
        assert!(!c("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(c("127.0.0.1").contains(ip("127.0.0.1")));
        assert!(!c("127.0.0.1").contains(ip("127.0.0.2")));
        assert!(c("0.0.0.0/0").contains(ip("203.0.113.9")));
        assert!(c("2001:db8::/32").contains(ip("2001:db8:1::5")));
        assert!(!c("2001:db8::/32").contains(ip("2001:db9::5")));
        assert!(c("10.0.0.0/8").contains(ip("::ffff:10.1.1.1")));
        assert!(!c("::/0").contains(ip("10.1.1.1")));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("example.com").is_err());
    }

    proptest::proptest! {
        #[test]
        fn ip_text_is_the_address_as_displayed(a: u32, b: u128) {
            let v4 = IpAddr::V4(a.into());
            let (t4, s4) = (IpText::of(v4), v4.to_string());
            proptest::prop_assert_eq!(t4.as_bytes(), s4.as_bytes());
            let v6 = IpAddr::V6(b.into());
            let (t6, s6) = (IpText::of(v6), v6.to_string());
            proptest::prop_assert_eq!(t6.as_bytes(), s6.as_bytes());
        }
    }

    #[test]
    fn ip_text_of_every_octet() {
        for o in 0..=255u8 {
            let ip = IpAddr::V4([o, 0, 255, o].into());
            assert_eq!(IpText::of(ip).as_bytes(), ip.to_string().as_bytes());
        }
    }

    #[test]
    fn forwarded_element_quotes_ipv6_and_host() {
        let mut v = Vec::new();
        let ip: IpAddr = "2001:db8::1".parse().unwrap();
        push_forwarded_element(&mut v, ip, &IpText::of(ip), b"a.example:8080", "http");
        assert_eq!(
            String::from_utf8(v).unwrap(),
            "for=\"[2001:db8::1]\";host=\"a.example:8080\";proto=http"
        );
        let mut v = Vec::new();
        push_ip(&mut v, "192.0.2.10".parse().unwrap());
        assert_eq!(v, b"192.0.2.10");
        assert_eq!(Peer::LOCAL.ip_text().as_bytes(), b"0.0.0.0");
        let long: IpAddr = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"
            .parse()
            .unwrap();
        assert_eq!(
            Peer::new(long, false).ip_text().as_bytes(),
            long.to_string().as_bytes()
        );
    }
}
