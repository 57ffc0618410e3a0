//! Reading a response body's bounded prefix for a job's id and status, once.

use std::sync::Arc;

use super::body::{Job, JobIds};
#[cfg(feature = "redis")]
use super::hold::unknown_in_store;
use super::hold::{HoldGuard, More};
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
    /// A create's slots beyond one here: their name in the shared store, a batch's count.
    more: Option<Box<More>>,
}

impl Observer {
    pub(crate) fn new(shared: Arc<PlanState>, what: Observe) -> Self {
        Self {
            shared,
            what: Some(what),
            prefix: Vec::new(),
            more: None,
        }
    }

    /// An observer that settles the slot `hold` owns.
    pub(crate) fn holding(hold: HoldGuard, what: Observe) -> Option<Self> {
        hold.into_parts().map(|(shared, more)| {
            let mut observer = Self::new(shared, what);
            observer.more = more;
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
            self.settle(what, &chunk[..chunk.len().min(max)], chunk.len() <= max);
            return;
        }
        let room = max - self.prefix.len();
        self.prefix
            .extend_from_slice(&chunk[..chunk.len().min(room)]);
        if last || self.prefix.len() == max {
            self.read_prefix(last && chunk.len() <= room);
        }
    }

    /// Reads the prefix (the whole body, or as much as was kept or received); `whole` when
    /// it is the whole body (it ended, and nothing was cut).
    pub(super) fn read_prefix(&mut self, whole: bool) {
        let what = self.what.take();
        let prefix = std::mem::take(&mut self.prefix);
        self.settle(what, &prefix, whole);
    }

    fn settle(&mut self, what: Option<Observe>, body: &[u8], whole: bool) {
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
            // A route that counts its creates' jobs reads every create as a batch, of one too
            // (its answer may be an array).
            Observe::Create { job }
                if More::jobs(&self.more) != 1
                    || config.id_path_set
                    || config.jobs_per_create.is_some() =>
            {
                self.settle_batch(job, body, whole);
            }
            Observe::Create { job } => {
                let seen = json::object(body, fields);
                let now = shared.clock.now();
                let Some(id) = seen.id else {
                    warn_no_id(shared);
                    #[cfg(feature = "redis")]
                    if let Some(member) = More::take_member(&mut self.more) {
                        unknown_in_store(shared, &member, 1..=1);
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
                if let (Some(store), Some(member)) =
                    (&shared.store, More::take_member(&mut self.more))
                {
                    if terminal || completed {
                        store.slot_release([member]);
                    } else {
                        store.slot_bind([(member, id.clone())], shared.job_lease());
                    }
                }
                let _ = job.id.set(JobIds::One(id.into()));
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

impl Observer {
    /// A create holding several slots (a batch, or a create read at
    /// [`id_path`](super::Builder::id_path)): each id the body shows holds one slot, and is
    /// let go at once if the status beside it is terminal; the slots no id shows are given
    /// back when the whole JSON body shows some ids but fewer (that is what the server made),
    /// and held as unknown outcomes otherwise (no id at all, not JSON, cut or dropped: the
    /// server may have made those jobs), as a single create's slot would be. A batch answered
    /// with one object of its own (a batch id, no job ids) shows no job id: its slots are held
    /// as unknown outcomes, until a reconcile or their lease.
    #[cold]
    #[inline(never)]
    fn settle_batch(&mut self, job: Job, body: &[u8], whole: bool) {
        let shared = self.shared.clone();
        let config = &shared.config;
        let fields = json::Fields {
            id: &config.id_field,
            status: &config.status_field,
        };
        let jobs = More::jobs(&self.more) as usize;
        // Ids past the count are held as jobs seen active, up to the plan's size: a path that
        // points at some other list must not fill the plan with strangers.
        let most = jobs.max(shared.slots().limit());
        let found = json::ids(body, &config.id_path, fields, most);
        let (mut ids, mut statuses) = (found.ids, found.statuses);
        if ids.is_empty() && jobs == 1 {
            // A single create's object: its id, and its status.
            if let Some(id) = found.root {
                ids.push(id);
                statuses.push(json::object(body, fields).status);
            }
        }
        let terminal: Vec<bool> = statuses
            .iter()
            .map(|s| s.as_deref().is_some_and(|s| config.is_terminal(s)))
            .collect();
        let bound = ids.len().min(jobs);
        let rest = jobs - bound;
        let made_fewer = bound > 0 && whole && found.complete;
        if bound == 0 {
            warn_no_id(&shared);
        } else if rest > 0 {
            tracing::debug!(
                jobs,
                ids = bound,
                made_fewer,
                "a create's response shows fewer job ids than the jobs it was counted for"
            );
        }
        if ids.len() > jobs {
            tracing::warn!(
                jobs,
                ids = ids.len(),
                "a create's response shows more job ids than the jobs it was counted for (jobs_per_create): the others hold slots as jobs seen active"
            );
        }
        let now = shared.clock.now();
        #[cfg_attr(not(feature = "redis"), allow(unused_variables))]
        let member = More::take_member(&mut self.more);
        #[cfg_attr(not(feature = "redis"), allow(unused_mut, unused_variables))]
        let mut completed = Vec::new();
        {
            let mut slots = shared.slots();
            for (k, id) in ids[..bound].iter().enumerate() {
                if slots.bind(id, now) == Bound::Completed {
                    completed.push(k);
                } else if terminal[k] {
                    slots.end_job(id, ReleaseReason::Finished);
                    completed.push(k);
                }
            }
            for (k, id) in ids.iter().enumerate().skip(bound) {
                if !terminal[k] {
                    slots.seen_active(id, now);
                }
            }
            if rest > 0 && !made_fewer && member.is_none() {
                for _ in 0..rest {
                    slots.unknown(now, None);
                }
            }
        }
        if rest > 0 && made_fewer {
            shared.release_many(rest as u32, ReleaseReason::Failed);
        }
        #[cfg(feature = "redis")]
        if let (Some(store), Some(member)) = (&shared.store, &member) {
            use super::hold::slot_member;
            let (mut binds, mut released) = (Vec::new(), Vec::new());
            for (k, id) in ids[..bound].iter().enumerate() {
                let name = slot_member(member, k as u32 + 1);
                if completed.contains(&k) {
                    released.push(name);
                } else {
                    binds.push((name, id.clone()));
                }
            }
            store.slot_bind(binds, shared.job_lease());
            let others = (bound as u32 + 1)..=(jobs as u32);
            if rest > 0 && made_fewer {
                released.extend(others.map(|k| slot_member(member, k)));
            } else if rest > 0 {
                unknown_in_store(&shared, member, others);
            }
            if !released.is_empty() {
                store.slot_release(released);
            }
        }
        let ids: Box<[Box<str>]> = ids.into_iter().map(Into::into).collect();
        let _ = job.id.set(JobIds::Many(ids));
        shared.notify();
    }
}

/// A successful create's response showed no job id: warned once (its id field is likely
/// misnamed), then logged at `debug`.
fn warn_no_id(shared: &PlanState) {
    let config = &shared.config;
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
}

impl Drop for Observer {
    fn drop(&mut self) {
        // A body dropped before its end: read what came.
        self.read_prefix(false);
    }
}
