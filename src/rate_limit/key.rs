//! Which client a request comes from, for server mode's per-client quotas.

use std::fmt;
use std::hash::{BuildHasher, DefaultHasher, Hash, RandomState};
use std::sync::Arc;

use http::{Extensions, HeaderMap, HeaderName, Method, Request, Uri};

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

type KeyFn = dyn Fn(&RequestHead<'_>, &KeyHashing) -> Option<u64> + Send + Sync;

/// How client keys are hashed.
#[derive(Debug, Clone)]
pub(crate) enum KeyHashing {
    /// With this process's random keys, so that clients cannot choose keys that collide.
    Random(RandomState),
    /// The same in every process (SipHash with zero keys), for keys kept in a shared store.
    /// Stable for processes built by the same Rust release.
    Stable,
}

impl BuildHasher for KeyHashing {
    type Hasher = DefaultHasher;

    fn build_hasher(&self) -> DefaultHasher {
        match self {
            Self::Random(state) => state.build_hasher(),
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
    /// A closure.
    Fn(Arc<KeyFn>),
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Global => f.write_str("Global"),
            Self::Header(name) => f.debug_tuple("Header").field(name).finish(),
            Self::PeerIp => f.write_str("PeerIp"),
            Self::Fn(_) => f.write_str("Fn(..)"),
        }
    }
}

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
    /// that collide. A request with no key (a missing header, an unknown peer) falls under
    /// one shared anonymous key.
    pub(crate) fn extract<B>(&self, request: &Request<B>, hasher: &KeyHashing) -> u64 {
        const ANONYMOUS: u64 = 0;
        let key = match self {
            Self::Global => return ANONYMOUS,
            Self::Header(name) => request
                .headers()
                .get(name)
                .map(|value| hasher.hash_one(value.as_bytes())),
            Self::PeerIp => peer_ip(request.extensions()).map(|ip| hasher.hash_one(ip)),
            Self::Fn(f) => f(&RequestHead::of(request), hasher),
        };
        // Keep 0 for the anonymous key; a real key hashing to 0 shares the next value.
        key.map_or(ANONYMOUS, |k| k.max(1))
    }
}

fn peer_ip(extensions: &Extensions) -> Option<std::net::IpAddr> {
    #[cfg(feature = "axum")]
    if let Some(info) = extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>() {
        return Some(info.0.ip());
    }
    extensions
        .get::<std::net::SocketAddr>()
        .map(|addr| addr.ip())
        .or_else(|| extensions.get::<std::net::IpAddr>().copied())
}
