//! Why a job-creating request was given back unsent.

use std::fmt;

use super::state::PlanState;
use std::time::Duration;

/// A job-creating request was given back to its caller without being sent.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConcurrencyError {
    /// The queue for a slot already held its maximum length.
    QueueFull {
        /// The maximum length.
        max_queue: usize,
    },
    /// The request waited its maximum time for a slot.
    WaitTooLong {
        /// The maximum wait.
        max_wait: Duration,
        /// Slots held when it gave up.
        in_use: usize,
    },
    /// The plan allows no job at all (`Enterprise(0)`).
    NoSlots,
    /// The create would start `jobs` jobs (as [`Builder::jobs_per_create`] counts them) and
    /// so needs that many slots at once, but the plan has `limit` slots in all: it could never
    /// be sent (or it starts none, `jobs` 0). Returned at once, and to a create already
    /// waiting when the plan is lowered below its count.
    ///
    /// [`Builder::jobs_per_create`]: super::Builder::jobs_per_create
    JobCount {
        /// The jobs the create would start.
        jobs: u32,
        /// The plan's slots in all.
        limit: usize,
    },
}

impl ConcurrencyError {
    /// A create that waited its plan's `max_wait` for a slot, as the plan stands now: the one
    /// place this error is made, wherever the create waited.
    pub(crate) fn wait_too_long(plan: &PlanState) -> Self {
        Self::WaitTooLong {
            max_wait: plan.config.max_wait.unwrap_or_default(),
            in_use: plan.slots().in_use(),
        }
    }
}

impl fmt::Display for ConcurrencyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::QueueFull { max_queue } => write!(
                f,
                "job not sent: {max_queue} requests already wait for a slot of the plan"
            ),
            Self::WaitTooLong { max_wait, in_use } => write!(
                f,
                "job not sent: no slot of the plan freed within {max_wait:?} ({in_use} held)"
            ),
            Self::NoSlots => f.write_str("job not sent: the plan allows no job at all"),
            Self::JobCount { jobs: 0, .. } => {
                f.write_str("job not sent: the create starts no job (0 jobs per create)")
            }
            Self::JobCount { jobs, limit } => write!(
                f,
                "job not sent: the create starts {jobs} jobs, more than the plan's {limit} slots"
            ),
        }
    }
}

impl std::error::Error for ConcurrencyError {}
