//! Time as the limiters see it: nanoseconds since an epoch, read from `tokio::time`.

use std::time::Duration;
use tokio::time::Instant;

/// Nanoseconds since a [`Clock`]'s epoch. Compact (8 bytes) and cheap to compare; wraps only
/// after 584 years.
pub(crate) type Nanos = u64;

/// Converts a duration to nanoseconds, saturating at `u64::MAX`.
pub(crate) fn nanos(d: Duration) -> Nanos {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The time source of one limiter. Reads `tokio::time::Instant`, so a paused test clock
/// drives it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    epoch: Instant,
}

impl Clock {
    pub(crate) fn new() -> Self {
        Self {
            epoch: Instant::now(),
        }
    }

    pub(crate) fn now(&self) -> Nanos {
        nanos(Instant::now().saturating_duration_since(self.epoch))
    }

    pub(crate) fn instant(&self, at: Nanos) -> Instant {
        // `checked_add` guards the far future (a wait of centuries): clamp to a year ahead.
        self.epoch
            .checked_add(Duration::from_nanos(at))
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 24 * 3600))
    }
}
