//! Why a request through [`Backoff429`](super::Backoff429) failed.

use std::fmt;
use std::time::Duration;

use http::StatusCode;

use crate::error::ConfigError;

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
            Self::Config(error) => write!(f, "backoff not applied: {error}"),
        }
    }
}

impl std::error::Error for BackoffError {}

/// In the extensions of a response that was retried: what it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retried {
    /// Requests sent, the first one included.
    pub attempts: u32,
    /// Time spent waiting between them.
    pub waited: Duration,
}
