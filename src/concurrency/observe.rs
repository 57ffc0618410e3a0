//! Reading a response body's bounded prefix for a job's id and status, once.

use std::sync::Arc;

use super::body::Job;
#[cfg(feature = "redis")]
use super::hold::unknown_in_store;
use super::hold::{HoldGuard, StoreMember};
use super::slots::{Bound, ReleaseReason};
use super::state::PlanState;
use crate::json::{self, Fields};

/// What a response body is read for.
#[derive(Debug)]
pub(crate) enum Observe {
    /// A successful create, which holds a slot: the job's id (and status).
    Create { job: Job },
    /// One job's status.
    Status { id: Box<str> },
    /// A list of jobs.
    List,
}

/// Reads a response body's prefix for what it shows, once: when the body ends, when the
/// prefix is full, or when the body is dropped.
#[derive(Debug)]
pub(crate) struct Observer {
    shared: Arc<PlanState>,
    what: Option<Observe>,
    prefix: Vec<u8>,
    /// The name in the shared store of the slot this create holds, if any.
    member: Option<StoreMember>,
}

impl Observer {
    pub(crate) fn new(shared: Arc<PlanState>, what: Observe) -> Self {
        Self {
            shared,
            what: Some(what),
            prefix: Vec::new(),
            member: None,
        }
    }

    /// An observer that settles the slot `hold` owns.
    pub(crate) fn holding(hold: HoldGuard, what: Observe) -> Option<Self> {
        hold.into_parts().map(|(shared, member)| {
            let mut observer = Self::new(shared, what);
            observer.member = member;
            observer
        })
    }

    /// Keeps what fits of `chunk` in the prefix; reads the prefix once the body is over
    /// (`last`) or the prefix is full.
    pub(super) fn feed(&mut self, chunk: &[u8], last: bool) {
        if self.what.is_none() {
            return;
        }
        let max = self.shared.config.max_prefix;
        if last && self.prefix.is_empty() {
            // The whole body in one chunk, the common case: read it where it lies.
            let what = self.what.take();
            self.settle(what, &chunk[..chunk.len().min(max)]);
            return;
        }
        let room = max - self.prefix.len();
        self.prefix
            .extend_from_slice(&chunk[..chunk.len().min(room)]);
        if last || self.prefix.len() == max {
            self.read_prefix();
        }
    }

    /// Reads the prefix (the whole body, or as much as was kept or received).
    pub(super) fn read_prefix(&mut self) {
        let what = self.what.take();
        let prefix = std::mem::take(&mut self.prefix);
        self.settle(what, &prefix);
    }

    fn settle(&mut self, what: Option<Observe>, body: &[u8]) {
        let Some(what) = what else {
            return;
        };
        let shared = &self.shared;
        let config = &shared.config;
        let fields = Fields {
            id: &config.id_field,
            status: &config.status_field,
        };
        match what {
            Observe::Create { job } => {
                let seen = json::object(body, fields);
                let now = shared.clock.now();
                let Some(id) = seen.id else {
                    if !shared
                        .warned_no_id
                        .swap(true, std::sync::atomic::Ordering::Relaxed)
                    {
                        tracing::warn!(
                            field = &*config.id_field,
                            "no job id in a successful create's response (is the id field named right?): its slot stays held until a reconcile or the maximum job life; further ones are logged at debug"
                        );
                    } else {
                        tracing::debug!(
                            field = &*config.id_field,
                            "no job id in a successful create's response: its slot stays held"
                        );
                    }
                    #[cfg(feature = "redis")]
                    if self.member.is_some() {
                        unknown_in_store(shared, self.member.take());
                        return;
                    }
                    shared.slots().unknown(now, None);
                    return;
                };
                let terminal = seen.status.is_some_and(|s| config.is_terminal(&s));
                #[cfg_attr(not(feature = "redis"), allow(unused_variables))]
                let completed = {
                    let mut slots = shared.slots();
                    let bound = slots.bind(&id, now);
                    if terminal {
                        slots.end_job(&id, ReleaseReason::Finished);
                    }
                    bound == Bound::Completed
                };
                #[cfg(feature = "redis")]
                if let (Some(store), Some(member)) = (&shared.store, self.member.take()) {
                    if terminal || completed {
                        store.slot_release(&member);
                    } else {
                        store.slot_bind(&member, &id, shared.job_lease());
                    }
                }
                let _ = job.id.set(id.into());
                shared.notify();
            }
            Observe::Status { id } => {
                let seen = json::object(body, fields);
                if seen.status.is_some_and(|s| config.is_terminal(&s)) {
                    shared.end_job(&id, ReleaseReason::Finished);
                }
            }
            Observe::List => {
                let now = shared.clock.now();
                let mut slots = shared.slots();
                for seen in json::array(body, fields) {
                    let (Some(id), Some(status)) = (seen.id, seen.status) else {
                        continue;
                    };
                    if config.is_terminal(&status) {
                        slots.end_job(&id, ReleaseReason::Finished);
                    } else {
                        slots.seen_active(&id, now);
                    }
                }
                drop(slots);
                shared.notify();
            }
        }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        // A body dropped before its end: read what came.
        self.read_prefix();
    }
}
