//! Which limit a refused response is about: [`LimitKind`], and the default classifier that
//! takes every 429 for a rate-limit refusal (a vendor's preset tells them apart, as
//! [`presets::sync::error_code`](crate::presets::sync::error_code) does).

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

/// The default: a 429 is about a request rate, as HTTP defines it ("Too Many Requests").
pub(crate) fn every_429_is_rate(_: &Parts, _: &[u8]) -> LimitKind {
    LimitKind::Rate
}
