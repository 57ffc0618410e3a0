//! What client mode returns instead of sending a request: [`RateLimitError`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::Nanos;

/// A request the client-mode [`RateLimitByRoute`](super::RateLimitByRoute) gave back to its
/// caller without sending it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RateLimitError {
    /// Waiting for the route's quota would take longer than the configured maximum wait.
    WaitTooLong {
        /// The route the request fell under (its pattern, or `"default"`).
        route: Arc<str>,
        /// How long it would have had to wait at least, counted from when it was made.
        wait: Duration,
        /// The maximum wait that was configured.
        max_wait: Duration,
    },
    /// The route's queue already holds as many waiting requests as it may (see
    /// [`Builder::max_queue`](super::Builder::max_queue)).
    QueueFull {
        /// The route the request fell under (its pattern, or `"default"`).
        route: Arc<str>,
        /// The most requests the route's queue holds.
        max_queue: usize,
    },
    /// The request costs more units than one of its route's quotas allows in a whole period
    /// (or a whole burst): it could never be admitted, so it is returned at once.
    CostTooHigh {
        /// The route the request fell under (its pattern, or `"default"`).
        route: Arc<str>,
        /// The unit of the quota it does not fit in (`None`: requests).
        unit: Option<&'static str>,
        /// What the request costs in that quota.
        cost: u32,
        /// The most that quota admits at once: its count, or a paced quota's burst.
        most: u32,
    },
}

impl RateLimitError {
    /// A request made at `since` whose turn comes at `turn` at the earliest, past its
    /// `max_wait`: the one place this error is made, wherever the request waits.
    pub(crate) fn wait_too_long(
        route: Arc<str>,
        since: Nanos,
        turn: Nanos,
        max_wait: Duration,
    ) -> Self {
        Self::WaitTooLong {
            route,
            wait: Duration::from_nanos(turn.saturating_sub(since)),
            max_wait,
        }
    }

    /// The refusal it reports.
    pub(crate) fn refusal(&self) -> crate::event::Refusal {
        match self {
            Self::WaitTooLong { .. } => crate::event::Refusal::WaitTooLong,
            Self::QueueFull { .. } => crate::event::Refusal::QueueFull,
            Self::CostTooHigh { .. } => crate::event::Refusal::CostTooHigh,
        }
    }
}

impl fmt::Display for RateLimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::WaitTooLong {
                route,
                wait,
                max_wait,
            } => write!(
                f,
                "rate limit of route `{route}`: the request would wait at least {wait:?}, \
                 longer than the maximum of {max_wait:?}"
            ),
            Self::QueueFull { route, max_queue } => write!(
                f,
                "rate limit of route `{route}`: {max_queue} requests already wait for their \
                 turn, as many as its queue holds"
            ),
            Self::CostTooHigh {
                route,
                unit,
                cost,
                most,
            } => write!(
                f,
                "rate limit of route `{route}`: the request costs {cost} {}, more than the \
                 {most} its quota ever admits at once",
                unit.unwrap_or("requests")
            ),
        }
    }
}

impl std::error::Error for RateLimitError {}
