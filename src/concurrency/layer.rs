//! [`ConcurrencyLimitByPlan`]: the layer, and the handle to its slots.

use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::plan::Plan;
use super::service::ConcurrencyLimitByPlanService;
use super::slots::ReleaseReason;
use super::watch::Watch;
use crate::clock::nanos;
use crate::error::ConfigError;
use crate::event::SlotCounters;
use crate::lock::lock;

use super::builder::Builder;
use super::state::PlanState;

/// Job slots that live as long as the job: a [`Layer`] and the handle to its state.
///
/// A job API counts concurrency in jobs: a Sync generation holds one of the plan's slots while
/// it is `PENDING` or `PROCESSING`, long after the `POST /v2/generate` that created it has
/// returned. Requests on the job routes (Sync's `POST /v2/generate`) wait in a fair FIFO
/// queue until a slot is free; the slot is then held for the job's whole life. See the
/// [module docs](super) for the life of a slot.
///
/// Cloning is cheap (one `Arc`); every clone and every service made from it share one set of
/// slots.
#[derive(Debug, Clone)]
pub struct ConcurrencyLimitByPlan {
    pub(crate) shared: Arc<PlanState>,
}

/// A job held by this layer, from [`ConcurrencyLimitByPlan::jobs`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeldJob {
    /// The job's id.
    pub id: String,
    /// How long it has held its slot.
    pub age: Duration,
    /// Whether this process created it (false: another process did, and a list showed it).
    pub ours: bool,
}

/// The state of the slots at one moment, from [`ConcurrencyLimitByPlan::snapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PlanSnapshot {
    /// The plan.
    pub plan: Plan,
    /// Slots held, by jobs, creates in flight and creates with an unknown outcome.
    pub in_use: usize,
    /// Creates taken, sent or about to be, and not yet answered.
    pub in_flight: usize,
    /// Creates whose outcome will never be read (held until a reconcile or the lease).
    pub unknown: usize,
    /// Job-creating requests waiting for a slot.
    pub queued: usize,
    /// The jobs holding slots, oldest first.
    pub jobs: Vec<HeldJob>,
    /// What the slots have done since the layer was built.
    pub counters: SlotCounters,
}

impl ConcurrencyLimitByPlan {
    /// A layer for Sync's `plan`, as the [`presets::sync`](crate::presets::sync) preset counts
    /// it: job route `POST /v2/generate`, status route `GET /v2/generate/{id}`, list route
    /// `GET /v2/generations`, id field `id`, status field `status`, active statuses `PENDING`
    /// and `PROCESSING`, a maximum job life of one hour. For another API, start from
    /// [`custom`](Self::custom).
    ///
    /// `Enterprise(0)` allows no job: it is logged once, at `error` level, and every
    /// job-creating request fails at once with
    /// [`ConcurrencyError::NoSlots`](super::ConcurrencyError::NoSlots). Use
    /// [`ConcurrencyLimitByPlan::builder`] (or [`with_limit`](Self::with_limit)) to get that as
    /// a [`ConfigError`] instead.
    pub fn new(plan: Plan) -> Self {
        if let Err(error) = plan.checked_limit() {
            tracing::error!(%error, %plan, "ConcurrencyLimitByPlan allows no job: its job requests will fail");
        }
        match crate::presets::sync::plan(plan).assemble() {
            Ok(layer) => layer,
            Err(error) => unreachable!("the preset's routes are valid: {error}"),
        }
    }

    /// Sync's routes and job JSON (as [`new`](Self::new)) with a limit of `limit` jobs at
    /// once, for a Sync plan under another name. Zero is an error. Another API's jobs need
    /// [`custom`](Self::custom), which assumes nothing of Sync.
    pub fn with_limit(limit: usize) -> Result<Self, ConfigError> {
        Self::builder(Plan::Enterprise(limit)).build()
    }

    /// A builder for Sync's `plan`, starting from the [`presets::sync`](crate::presets::sync)
    /// preset (as [`new`](Self::new)), to change the routes, the JSON fields, the queue's
    /// bounds and the job life.
    pub fn builder(plan: Plan) -> Builder {
        crate::presets::sync::plan(plan)
    }

    /// A builder for any API's jobs, `limit` at once, assuming nothing of it (no route of
    /// Sync's): name the routes that create jobs and, unless it counts requests in flight
    /// ([`Builder::in_flight`]), the statuses in which a job holds a slot (see [`Builder`]).
    pub fn custom(limit: usize) -> Builder {
        Builder::new(Plan::Enterprise(limit))
    }

    /// Job `id` is over (for example, a webhook said so): its slot is given back. False when
    /// it held none.
    ///
    /// A webhook can come before the create's response body has shown the job's id. So while
    /// a create is in flight, an id that holds no slot is remembered (for the maximum job
    /// life, and at most the last 4,096 such ids), and the create's slot is given back as
    /// soon as its body shows that id. The result is false then: nothing was given back yet.
    ///
    /// With a shared store, the job's slot is given back for every process: whichever
    /// process created it lets it go too. The result then only says whether this process held
    /// it. A completion that arrives before the creating process has read the job's id (a
    /// webhook faster than the create's answer) is not lost: the fleet remembers finished
    /// ids for the maximum job life (the latest 4,096), and the create's slot is given back
    /// as soon as its id is known.
    pub fn complete(&self, id: &str) -> bool {
        let held = self.shared.end_job(id, ReleaseReason::Completed);
        if !held {
            let now = self.shared.clock.now();
            self.shared.slots().complete_early(id, now);
        }
        #[cfg(feature = "redis")]
        if let (false, Some(store)) = (held, &self.shared.store) {
            // Held elsewhere, or not bound anywhere yet: the fleet remembers it as done.
            store.job_done(id, self.shared.job_lease());
        }
        held
    }

    /// `active_ids` are every job the API counts as active now (for example, every page of
    /// `GET /v2/generations?status=PENDING,PROCESSING`). Held jobs not in it are given back,
    /// creates with an unknown outcome are accounted for by it, and active jobs this process
    /// does not hold (another process shares the key) take slots.
    ///
    /// The list is taken as current: a job whose create was answered after the list was
    /// requested is not in it, and would lose its slot. When that can happen, use
    /// [`reconcile_as_of`](Self::reconcile_as_of) with the time the list was requested.
    pub fn reconcile<I>(&self, active_ids: I)
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        self.reconcile_as_of(active_ids, tokio::time::Instant::now());
    }

    /// [`reconcile`](Self::reconcile) with a list requested at `listed_at`: jobs that took
    /// their slot at or after it are left alone, since the list may not show them yet.
    pub fn reconcile_as_of<I>(&self, active_ids: I, listed_at: tokio::time::Instant)
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let ids: Vec<I::Item> = active_ids.into_iter().collect();
        let as_of = nanos(listed_at.saturating_duration_since(self.shared.clock.instant(0)));
        let now = self.shared.clock.now();
        self.shared
            .slots()
            .reconcile(ids.iter().map(AsRef::as_ref), as_of, now);
        #[cfg(feature = "redis")]
        if let Some(store) = &self.shared.store {
            // Jobs other processes hold, gone from the list, are given back too; their creates
            // still in flight are left alone (no list can show them yet).
            let active = ids.iter().map(|id| id.as_ref().to_owned()).collect();
            store.jobs_reconcile(active, as_of, self.shared.clock, self.shared.job_lease());
        }
        self.shared.notify();
    }

    /// Slots held now.
    pub fn in_use(&self) -> usize {
        self.shared.slots().in_use()
    }

    /// Job-creating requests waiting for a slot.
    pub fn queue_len(&self) -> usize {
        self.shared.slots().queue_len()
    }

    /// The plan in force.
    pub fn plan(&self) -> Plan {
        *lock(&self.shared.plan)
    }

    /// The jobs holding slots, oldest first.
    pub fn jobs(&self) -> Vec<HeldJob> {
        self.snapshot().jobs
    }

    /// Everything at one moment.
    pub fn snapshot(&self) -> PlanSnapshot {
        let now = self.shared.clock.now();
        let plan = self.plan();
        let mut slots = self.shared.slots();
        // A hold whose lease ran out is not shown as held.
        slots.expire(now);
        let mut jobs: Vec<HeldJob> = slots
            .jobs()
            .map(|(id, job)| HeldJob {
                id: id.to_owned(),
                age: Duration::from_nanos(now.saturating_sub(job.since)),
                ours: job.ours,
            })
            .collect();
        jobs.sort_by(|a, b| b.age.cmp(&a.age).then_with(|| a.id.cmp(&b.id)));
        let (in_flight, unknown) = slots.creates();
        PlanSnapshot {
            plan,
            in_use: slots.in_use(),
            in_flight,
            unknown,
            queued: slots.queue_len(),
            jobs,
            counters: self.shared.events.scope(0).slot_counters(),
        }
    }

    /// Changes the plan (an upgrade, a downgrade). More slots wake waiters at once; fewer take
    /// effect as jobs finish. A plan allowing no job is an error and changes nothing.
    pub fn set_plan(&self, plan: Plan) -> Result<(), ConfigError> {
        let limit = plan.checked_limit()?;
        *lock(&self.shared.plan) = plan;
        self.shared.slots().set_limit(limit);
        self.shared.show_figures();
        Ok(())
    }

    /// An active watch over the held jobs: polls each one's status through `service` (the
    /// service *below* this layer, so that a rate limiter there paces the polls too) at
    /// `origin` (`"https://api.sync.so"`), and gives back the slot of each job it sees in a
    /// terminal state. Run it with `tokio::spawn(plan.watch(svc, origin).run())`.
    ///
    /// The watch knows only the job's id, so it polls the first status route whose only
    /// parameter is the id ([`Builder::id_param`]): `GET /v2/generate/{id}`, or
    /// `GET /v2/projects/acme/generations/{id}` with the project written out. With no such
    /// route (every status route has another parameter, such as `{project}`, that the watch
    /// could not fill), [`Watch::run`] logs an error naming the routes and returns at once;
    /// the status routes still free slots from the responses the caller reads through the
    /// layer. A job whose id cannot stand in a URI path (a space, non-ASCII, `/`, `?`, `%`)
    /// is not polled, with a warning; the watch goes on with the others.
    pub fn watch<S>(&self, service: S, origin: impl Into<String>) -> Watch<S> {
        Watch::new(self.clone(), service, origin.into())
    }
}

impl<S> Layer<S> for ConcurrencyLimitByPlan {
    type Service = ConcurrencyLimitByPlanService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ConcurrencyLimitByPlanService::new(inner, self.shared.clone())
    }
}
