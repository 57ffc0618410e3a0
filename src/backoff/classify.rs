//! Which limit a refused response is about: [`LimitKind`], and the default classifier that
//! reads Sync's `errorCode`.

use std::fmt;
use std::sync::Arc;

use http::response::Parts;

/// Which limit a response is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LimitKind {
    /// A request rate (Sync: `errorCode` `rate_limit_exceeded`).
    Rate,
    /// A concurrency limit (Sync: `errorCode` `concurrency_limit_reached`): a slot frees when
    /// a job ends, which may take minutes.
    Concurrency,
    /// A transient failure: 502, 503, 504 or a connection error (retried only when enabled).
    Transient,
}

impl fmt::Display for LimitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Rate => "rate limit",
            Self::Concurrency => "concurrency limit",
            Self::Transient => "transient failure",
        })
    }
}

/// Tells which limit a refused response is about, from its head and the first bytes of its
/// body.
pub(crate) type Classifier = Arc<dyn Fn(&Parts, &[u8]) -> LimitKind + Send + Sync>;

/// Reads Sync's `errorCode`: `concurrency_limit_reached` is a concurrency 429, anything else
/// (`rate_limit_exceeded`, no code, no JSON) a rate-limit one.
pub(crate) fn sync_error_code(_: &Parts, body: &[u8]) -> LimitKind {
    match crate::json::field(body, "errorCode").as_deref() {
        Some("concurrency_limit_reached") => LimitKind::Concurrency,
        _ => LimitKind::Rate,
    }
}
