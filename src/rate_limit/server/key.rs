//! Which client a request comes from, for server mode's per-client quotas.
//!
//! A key is never trusted to be there: a request without one follows the layer's
//! [`MissingKey`] policy, and a peer address the server never supplied is a configuration
//! error answered with a 500, not a quietly shared quota. Forwarded addresses are read only
//! when the connection comes from a trusted proxy, walking the proxies' list from the right,
//! so a client cannot name itself a fresh quota.

use std::fmt;
use std::hash::{BuildHasher, DefaultHasher, Hash, RandomState};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

use http::{Extensions, HeaderMap, HeaderName, Method, Request, Uri};
use ipnet::IpNet;

use crate::error::ConfigError;

/// A borrowed view of a request's head, handed to a client-key closure.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    method: &'a Method,
    uri: &'a Uri,
    headers: &'a HeaderMap,
    extensions: &'a Extensions,
}

impl<'a> RequestHead<'a> {
    pub(crate) fn of<B>(request: &'a Request<B>) -> Self {
        Self {
            method: request.method(),
            uri: request.uri(),
            headers: request.headers(),
            extensions: request.extensions(),
        }
    }

    /// The request's method.
    pub fn method(&self) -> &'a Method {
        self.method
    }

    /// The request's URI.
    pub fn uri(&self) -> &'a Uri {
        self.uri
    }

    /// The request's header fields.
    pub fn headers(&self) -> &'a HeaderMap {
        self.headers
    }

    /// The request's extensions (where a server puts the peer's address).
    pub fn extensions(&self) -> &'a Extensions {
        self.extensions
    }
}

/// What server mode does with a request from which no client key can be read (no key
/// header, a closure answering `None`, a forwarded address it cannot parse). Set with
/// [`Builder::on_missing_key`](crate::rate_limit::Builder::on_missing_key).
///
/// A server that supplies no peer address at all to a layer keyed by address
/// ([`key_peer_ip`](crate::rate_limit::Builder::key_peer_ip),
/// [`key_forwarded_ip`](crate::rate_limit::Builder::key_forwarded_ip)) is misconfigured: unless a policy
/// was set explicitly, such requests are answered `500 Internal Server Error` with a warning
/// in the log, never counted against one shared quota in silence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MissingKey {
    /// Every such request counts against one anonymous quota per route (the default).
    #[default]
    Shared,
    /// Such requests are answered `400 Bad Request` (the layer's response builder sees
    /// [`RejectReason::MissingKey`](crate::rate_limit::RejectReason::MissingKey)).
    Refuse,
    /// Such requests pass uncounted.
    Pass,
}

/// Which header field a trusted proxy puts the client's address in, for
/// [`Builder::key_forwarded_ip`](crate::rate_limit::Builder::key_forwarded_ip). Name the one your proxy
/// writes: a field it passes through untouched is the client's to forge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ForwardedHeader {
    /// `Forwarded: for=192.0.2.60;proto=https, for="[2001:db8::1]:4711"` (RFC 7239).
    Forwarded,
    /// `X-Forwarded-For: 192.0.2.60, 10.0.0.7`.
    XForwardedFor,
    /// `X-Real-IP: 192.0.2.60`, a single address set by the proxy.
    XRealIp,
}

type KeyFn = dyn Fn(&RequestHead<'_>, &KeyHashing) -> Option<u64> + Send + Sync;

/// How client keys are hashed.
#[derive(Debug, Clone)]
pub(crate) enum KeyHashing {
    /// With this process's random keys, so that clients cannot choose keys that collide.
    Random(RandomState),
    /// The same in every process (SipHash with zero keys), for keys kept in a shared store.
    /// Stable for processes built by the same Rust release.
    #[cfg(feature = "redis")]
    Stable,
}

impl BuildHasher for KeyHashing {
    type Hasher = DefaultHasher;

    fn build_hasher(&self) -> DefaultHasher {
        match self {
            Self::Random(state) => state.build_hasher(),
            #[cfg(feature = "redis")]
            Self::Stable => DefaultHasher::new(),
        }
    }
}

/// How server mode tells clients apart.
#[derive(Clone, Default)]
pub(crate) enum ClientKey {
    /// Every request counts against one shared quota per route.
    #[default]
    Global,
    /// The value of a header field, such as `x-api-key`.
    Header(HeaderName),
    /// The peer's IP address.
    PeerIp,
    /// The client's address as trusted proxies forward it.
    Forwarded(Arc<TrustedProxies>),
    /// A closure.
    Fn(Arc<KeyFn>),
}

/// Proxies whose forwarded addresses are believed, and the field they write.
#[derive(Debug)]
pub(crate) struct TrustedProxies {
    header: ForwardedHeader,
    proxies: Vec<IpNet>,
}

impl TrustedProxies {
    /// Parses each proxy as an address (`10.0.0.7`, `::1`) or a range (`10.0.0.0/8`).
    pub(crate) fn new<I>(header: ForwardedHeader, proxies: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let proxies = proxies
            .into_iter()
            .map(|text| {
                let text = text.as_ref().trim();
                text.parse::<IpNet>()
                    .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| ConfigError::InvalidValue {
                        name: "trusted proxy",
                        value: text.to_owned(),
                        reason: "not an IP address or a range such as `10.0.0.0/8`",
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { header, proxies })
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.proxies.iter().any(|net| net.contains(&ip))
    }

    /// The client's address, given the connection's peer: the peer itself unless it is a
    /// trusted proxy; else the first address from the right of the forwarded list that is
    /// not a trusted proxy. The list is read from the right and only as far as that address,
    /// so nothing a client writes on the left (bytes that are not text, an element without
    /// `for=`, an unclosed quote) changes the answer. `None` when an entry the walk reaches
    /// cannot be read.
    fn client(&self, peer: IpAddr, headers: &HeaderMap) -> Option<IpAddr> {
        if !self.trusts(peer) {
            return Some(peer);
        }
        let entries: Box<dyn Iterator<Item = &[u8]>> = match self.header {
            ForwardedHeader::XRealIp => {
                let mut values = headers.get_all("x-real-ip").iter();
                return match (values.next(), values.next()) {
                    (None, _) => Some(peer),
                    (Some(value), None) => parse_node(value.to_str().ok()?),
                    (Some(_), Some(_)) => None,
                };
            }
            ForwardedHeader::XForwardedFor => Box::new(
                headers
                    .get_all("x-forwarded-for")
                    .iter()
                    .rev()
                    .flat_map(|line| line.as_bytes().rsplit(|&b| b == b',')),
            ),
            ForwardedHeader::Forwarded => Box::new(
                headers
                    .get_all(http::header::FORWARDED)
                    .iter()
                    .rev()
                    .flat_map(|line| rsplit_outside_quotes(line.as_bytes(), b',')),
            ),
        };
        let mut client = peer;
        for entry in entries {
            let entry = std::str::from_utf8(entry.trim_ascii()).ok()?;
            if entry.is_empty() {
                continue;
            }
            client = match self.header {
                ForwardedHeader::Forwarded => parse_node(forwarded_for(entry)?)?,
                _ => parse_node(entry)?,
            };
            if !self.trusts(client) {
                break;
            }
        }
        Some(client)
    }
}

/// Splits on `separator` outside double-quoted strings, from the right: the proxies' entries
/// on the right are read as they were written, whatever a client put on the left.
fn rsplit_outside_quotes(text: &[u8], separator: u8) -> impl Iterator<Item = &[u8]> {
    let mut end = Some(text.len());
    let mut at = text.len();
    let mut in_string = false;
    std::iter::from_fn(move || {
        let part_end = end?;
        while at > 0 {
            at -= 1;
            match text[at] {
                b'"' if !escaped(text, at) => in_string = !in_string,
                c if c == separator && !in_string => {
                    end = Some(at);
                    return Some(&text[at + 1..part_end]);
                }
                _ => {}
            }
        }
        end = None;
        Some(&text[..part_end])
    })
}

/// Whether the byte at `at` follows an odd number of backslashes.
fn escaped(text: &[u8], at: usize) -> bool {
    let backslashes = text[..at].iter().rev().take_while(|&&b| b == b'\\').count();
    backslashes % 2 == 1
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The client an address stands for: an IPv4 address (or an IPv4-mapped IPv6 one) itself,
/// an IPv6 address its network of `ipv6_prefix` bits.
fn network(ip: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => {
            let bits = u32::from(ipv6_prefix.min(128));
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & mask))
        }
        v4 => v4,
    }
}

/// The `for=` parameter of one `Forwarded` element, unquoted.
fn forwarded_for(element: &str) -> Option<&str> {
    for pair in split_outside_quotes(element, ';') {
        let (name, value) = pair.split_once('=')?;
        if name.trim().eq_ignore_ascii_case("for") {
            let value = value.trim();
            return Some(
                value
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(value),
            );
        }
    }
    None
}

/// An address, with or without a port: `192.0.2.60`, `192.0.2.60:4711`, `2001:db8::1`,
/// `[2001:db8::1]:4711`. Obfuscated identifiers (`unknown`, `_hidden`) are not addresses.
fn parse_node(node: &str) -> Option<IpAddr> {
    let node = node.trim();
    if let Some(rest) = node.strip_prefix('[') {
        let (ip, _port) = rest.split_once(']')?;
        return ip.parse::<Ipv6Addr>().ok().map(IpAddr::V6).map(canonical);
    }
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    let (ip, port) = node.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    ip.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// Splits on `separator` outside double-quoted strings.
fn split_outside_quotes(text: &str, separator: char) -> impl Iterator<Item = &str> {
    let mut in_string = false;
    let mut escaped = false;
    let mut start = 0;
    let mut parts = Vec::new();
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_string => escaped = true,
            '"' => in_string = !in_string,
            c if c == separator && !in_string => {
                parts.push(text[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(text[start..].trim());
    parts.into_iter().filter(|part| !part.is_empty())
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Global => f.write_str("Global"),
            Self::Header(name) => f.debug_tuple("Header").field(name).finish(),
            Self::PeerIp => f.write_str("PeerIp"),
            Self::Forwarded(proxies) => f.debug_tuple("Forwarded").field(proxies).finish(),
            Self::Fn(_) => f.write_str("Fn(..)"),
        }
    }
}

/// The key read from a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Extracted {
    /// The client's key (never 0: that is the anonymous key).
    Key(u64),
    /// The request carries no key.
    Missing,
    /// The layer keys by address and the server supplied none.
    NoPeer,
}

/// The key of requests that share one anonymous quota.
pub(crate) const ANONYMOUS: u64 = 0;

impl ClientKey {
    pub(crate) fn from_fn<F, K>(f: F) -> Self
    where
        F: Fn(&RequestHead<'_>) -> Option<K> + Send + Sync + 'static,
        K: Hash,
    {
        Self::Fn(Arc::new(move |head, hasher| {
            f(head).map(|key| hasher.hash_one(key))
        }))
    }

    /// The key's hash, keyed with `hasher`'s random keys so that clients cannot choose keys
    /// that collide. IPv6 addresses count by their first `ipv6_prefix` bits.
    pub(crate) fn extract<B>(
        &self,
        request: &Request<B>,
        hasher: &KeyHashing,
        ipv6_prefix: u8,
    ) -> Extracted {
        let key = match self {
            Self::Global => return Extracted::Key(ANONYMOUS),
            Self::Header(name) => request
                .headers()
                .get(name)
                .map(|value| hasher.hash_one(value.as_bytes())),
            Self::PeerIp => match peer_ip(request.extensions()) {
                Some(ip) => Some(hasher.hash_one(network(ip, ipv6_prefix))),
                None => return Extracted::NoPeer,
            },
            Self::Forwarded(proxies) => match peer_ip(request.extensions()) {
                Some(peer) => proxies
                    .client(canonical(peer), request.headers())
                    .map(|ip| hasher.hash_one(network(ip, ipv6_prefix))),
                None => return Extracted::NoPeer,
            },
            Self::Fn(f) => f(&RequestHead::of(request), hasher),
        };
        // Keep 0 for the anonymous key; a real key hashing to 0 shares the next value.
        key.map_or(Extracted::Missing, |k| Extracted::Key(k.max(1)))
    }
}

fn peer_ip(extensions: &Extensions) -> Option<IpAddr> {
    #[cfg(feature = "axum")]
    if let Some(info) = extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>() {
        return Some(info.0.ip());
    }
    extensions
        .get::<std::net::SocketAddr>()
        .map(|addr| addr.ip())
        .or_else(|| extensions.get::<IpAddr>().copied())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn forwarded_addresses_are_believed_only_from_trusted_proxies() {
        let xff = TrustedProxies::new(ForwardedHeader::XForwardedFor, ["10.0.0.0/8"]).unwrap();
        let spoofed = headers(&[("x-forwarded-for", "6.6.6.6, 203.0.113.9, 10.1.1.1")]);
        // Straight from a client: the peer, whatever it claims.
        assert_eq!(
            xff.client(ip("198.51.100.7"), &spoofed),
            Some(ip("198.51.100.7"))
        );
        // Through the proxies: the first untrusted hop from the right, not the forged one.
        assert_eq!(
            xff.client(ip("10.0.0.2"), &spoofed),
            Some(ip("203.0.113.9"))
        );
        // Several field lines are one list.
        let lines = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "203.0.113.9,10.1.1.1"),
        ]);
        assert_eq!(xff.client(ip("10.0.0.2"), &lines), Some(ip("203.0.113.9")));
        // No field: the proxy itself is the client.
        assert_eq!(
            xff.client(ip("10.0.0.2"), &HeaderMap::new()),
            Some(ip("10.0.0.2"))
        );
        // Garbage where a trusted proxy should have written an address: no key.
        let garbage = headers(&[("x-forwarded-for", "203.0.113.9, unknown")]);
        assert_eq!(xff.client(ip("10.0.0.2"), &garbage), None);
    }

    #[test]
    fn the_forwarded_field_in_its_quoted_forms() {
        let fwd = TrustedProxies::new(ForwardedHeader::Forwarded, ["10.0.0.2", "::1"]).unwrap();
        let value = headers(&[(
            "forwarded",
            r#"for="_gazonk", For="[2001:db8:cafe::17]:4711";proto=https, for=10.0.0.2;by="x,y""#,
        )]);
        assert_eq!(fwd.client(ip("::1"), &value), Some(ip("2001:db8:cafe::17")));
        let v4 = headers(&[("forwarded", "for=192.0.2.60:8080;proto=http")]);
        assert_eq!(fwd.client(ip("10.0.0.2"), &v4), Some(ip("192.0.2.60")));
        // An IPv4-mapped peer is its IPv4 address.
        assert_eq!(
            fwd.client(ip("::ffff:10.0.0.2"), &v4),
            Some(ip("192.0.2.60"))
        );
        let obfuscated = headers(&[("forwarded", "for=_hidden")]);
        assert_eq!(fwd.client(ip("10.0.0.2"), &obfuscated), None);
    }

    #[test]
    fn what_a_client_writes_left_of_the_proxies_cannot_hide_its_address() {
        let value = |bytes: &[u8]| HeaderValue::from_bytes(bytes).unwrap();
        let xff = TrustedProxies::new(ForwardedHeader::XForwardedFor, ["10.0.0.0/8"]).unwrap();
        let mut forged = HeaderMap::new();
        // Bytes that are not text, and a line of the client's own before the proxy's.
        forged.append("x-forwarded-for", value(b"\xff\xfe, nonsense"));
        forged.append("x-forwarded-for", value(b"\xc3(, 203.0.113.9, 10.1.1.1"));
        assert_eq!(xff.client(ip("10.0.0.2"), &forged), Some(ip("203.0.113.9")));

        let fwd = TrustedProxies::new(ForwardedHeader::Forwarded, ["10.0.0.0/8"]).unwrap();
        for line in [
            // An element without `for=`, an unclosed quote, bytes that are not text.
            &b"proto=https, for=203.0.113.9"[..],
            b"for=\"evil, for=203.0.113.9",
            b"for=\xff\xfe;by=x, for=203.0.113.9;proto=http, for=10.1.1.1",
            b"for=\"[2001:db8::1]\\\", for=203.0.113.9",
        ] {
            let mut forged = HeaderMap::new();
            forged.append(http::header::FORWARDED, value(line));
            assert_eq!(
                fwd.client(ip("10.0.0.2"), &forged),
                Some(ip("203.0.113.9")),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        // What the walk reaches must still be readable.
        let mut hidden = HeaderMap::new();
        hidden.append(
            http::header::FORWARDED,
            value(b"for=203.0.113.9, proto=https"),
        );
        assert_eq!(fwd.client(ip("10.0.0.2"), &hidden), None);
    }

    #[test]
    fn x_real_ip_is_one_address_from_a_trusted_proxy() {
        let real = TrustedProxies::new(ForwardedHeader::XRealIp, ["127.0.0.1"]).unwrap();
        let one = headers(&[("x-real-ip", "192.0.2.1")]);
        assert_eq!(real.client(ip("127.0.0.1"), &one), Some(ip("192.0.2.1")));
        assert_eq!(real.client(ip("192.0.2.99"), &one), Some(ip("192.0.2.99")));
        let two = headers(&[("x-real-ip", "192.0.2.1"), ("x-real-ip", "192.0.2.2")]);
        assert_eq!(real.client(ip("127.0.0.1"), &two), None);
    }

    #[test]
    fn untrustworthy_proxy_lists_are_config_errors() {
        let error =
            TrustedProxies::new(ForwardedHeader::XForwardedFor, ["10.0.0.0/33"]).unwrap_err();
        assert!(matches!(error, ConfigError::InvalidValue { value, .. } if value == "10.0.0.0/33"));
    }
}
