//! Why a request through [`Backoff429`](super::Backoff429) failed.

use std::fmt;
use std::time::Duration;

use http::StatusCode;

use crate::concurrency::ConcurrencyError;
use crate::error::ConfigError;
use crate::rate_limit::RateLimitError;
use crate::store::StoreError;

/// A request through [`Backoff429`](super::Backoff429) failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackoffError {
    /// Retries ran out (with [`Backoff429::error_on_exhaustion`](super::Backoff429::error_on_exhaustion)).
    Exhausted {
        /// Requests sent, the first one included.
        attempts: u32,
        /// Time spent waiting between them.
        waited: Duration,
        /// The last response's status.
        status: StatusCode,
    },
    /// The request's [`deadline`](super::Backoff429::deadline) passed while an attempt was in
    /// flight, a refusal's body was being read, or a retry was waiting for the service below
    /// to be ready: there was no answer to hand back. (When the deadline only stops a further
    /// wait, the last refusal is handed back instead, or [`Exhausted`](Self::Exhausted).)
    DeadlineExceeded {
        /// The deadline that was configured.
        deadline: Duration,
        /// Requests sent, the one cut included.
        attempts: u32,
    },
    /// The layer's settings are invalid (see [`Backoff429::validate`](super::Backoff429::validate)).
    Config(ConfigError),
}

impl fmt::Display for BackoffError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exhausted {
                attempts,
                waited,
                status,
            } => write!(
                f,
                "still {status} after {attempts} attempts and {waited:?} of waiting"
            ),
            Self::DeadlineExceeded { deadline, attempts } => write!(
                f,
                "no answer within the deadline of {deadline:?} ({attempts} attempts sent)"
            ),
            Self::Config(error) => write!(f, "backoff not applied: {error}"),
        }
    }
}

impl std::error::Error for BackoffError {}

/// In the extensions of a response that was retried: what it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Retried {
    /// Requests sent, the first one included.
    pub attempts: u32,
    /// Time spent waiting between them.
    pub waited: Duration,
}

/// Whether `error`, or an error in its `source()` chain (as tower's `Buffer` wraps the errors
/// of its service) or inside an `io::Error`, is one of this crate's: a request a layer below gave back unsent, a
/// failed shared store, a setting, a `Backoff429` below that gave up. Those are never retried.
pub(crate) fn is_own(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    // A bound, for a chain that would loop.
    for _ in 0..64 {
        let Some(error) = next else {
            return false;
        };
        if error.is::<RateLimitError>()
            || error.is::<ConcurrencyError>()
            || error.is::<StoreError>()
            || error.is::<ConfigError>()
            || error.is::<BackoffError>()
        {
            return true;
        }
        // `io::Error::source()` skips the error it wraps (it gives that error's source), so
        // an error made with `io::Error::other(own)` is looked into through `get_ref`.
        next = match error
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => error.source(),
        };
    }
    false
}
