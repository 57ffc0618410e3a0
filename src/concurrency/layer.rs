//! [`ConcurrencyLimitByPlan`]: the layer, the handle to its slots, and its builder.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tower_layer::Layer;

use super::plan::Plan;
use super::service::ConcurrencyLimitByPlanService;
use super::slots::{Effect, ReleaseReason, Slots};
use super::watch::Watch;
use crate::clock::{nanos, Clock};
use crate::error::ConfigError;
use crate::route::{self, Pattern, RouteTable};
use crate::store::StoreHandle;
use crate::sync::lock;

/// What a route's requests mean to the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RouteKind {
    /// Creates a job: needs a slot.
    Create,
    /// Shows one job, whose id is the pattern's parameter named by [`PlanConfig::id_param`].
    Status,
    /// Shows a list of jobs.
    List,
}

#[derive(Debug)]
pub(crate) struct PlanConfig {
    /// The status routes' parameter that holds the job's id.
    pub(crate) id_param: Box<str>,
    pub(crate) id_field: Box<str>,
    pub(crate) status_field: Box<str>,
    pub(crate) active: Box<[Box<str>]>,
    pub(crate) max_prefix: usize,
    pub(crate) max_queue: Option<usize>,
    pub(crate) max_wait: Option<Duration>,
    pub(crate) in_flight: bool,
    /// The most a held job's slot lives.
    pub(crate) max_job_life: Duration,
}

impl PlanConfig {
    /// Whether a job in `status` no longer holds a slot.
    pub(crate) fn is_terminal(&self, status: &str) -> bool {
        !self.active.iter().any(|a| **a == *status)
    }
}

/// What every clone of the layer shares.
#[derive(Debug)]
pub(crate) struct PlanState {
    pub(crate) table: RouteTable,
    pub(crate) kinds: Box<[RouteKind]>,
    /// The path of the first status route whose only parameter is the job id, split around
    /// it, for the watch (`/v2/generate/` and ``); or why there is none.
    pub(crate) watch_path: Result<(Box<str>, Box<str>), String>,
    pub(crate) config: PlanConfig,
    pub(crate) clock: Clock,
    pub(crate) slots: Mutex<Slots>,
    pub(crate) plan: Mutex<Plan>,
    /// Notified when a job takes or gives back a slot, while a watch runs.
    pub(crate) changed: Notify,
    pub(crate) watches: AtomicUsize,
    /// The store the slots are shared through with other processes, if any.
    pub(crate) store: Option<StoreHandle>,
}

/// The slots, locked. Changes of the held jobs go to the shared store, if any, when it is
/// let go.
pub(crate) struct SlotsGuard<'a> {
    slots: MutexGuard<'a, Slots>,
    shared: &'a PlanState,
}

impl Deref for SlotsGuard<'_> {
    type Target = Slots;

    #[inline]
    fn deref(&self) -> &Slots {
        &self.slots
    }
}

impl DerefMut for SlotsGuard<'_> {
    #[inline]
    fn deref_mut(&mut self) -> &mut Slots {
        &mut self.slots
    }
}

impl Drop for SlotsGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        if !self.slots.effects.is_empty() {
            self.send_effects();
        }
    }
}

impl SlotsGuard<'_> {
    #[cold]
    #[inline(never)]
    fn send_effects(&mut self) {
        let effects = std::mem::take(&mut self.slots.effects);
        let Some(store) = &self.shared.store else {
            return;
        };
        let lease = self.shared.lease();
        for effect in effects {
            match effect {
                Effect::Finished(id) => store.job_done(&id, lease),
                Effect::Active(id) => store.job_active(&id, lease),
            }
        }
    }
}

impl PlanState {
    /// The slots, locked.
    #[inline]
    pub(crate) fn slots(&self) -> SlotsGuard<'_> {
        SlotsGuard {
            slots: lock(&self.slots),
            shared: self,
        }
    }

    /// The slots, locked, for a change of the creates in flight only (a release, an unknown
    /// outcome), which the shared store never needs to hear of from here.
    #[inline]
    pub(crate) fn counts(&self) -> MutexGuard<'_, Slots> {
        lock(&self.slots)
    }

    pub(crate) fn end_job(&self, id: &str, why: ReleaseReason) -> bool {
        let finished = self.slots().end_job(id, why);
        if finished {
            self.notify();
        }
        finished
    }

    /// When a create that starts waiting now gives up (its maximum wait), if ever.
    pub(crate) fn wait_deadline(&self) -> Option<crate::clock::Nanos> {
        let max_wait = self.config.max_wait?;
        Some(self.clock.now().saturating_add(nanos(max_wait)))
    }

    /// The most a held job's slot lives.
    pub(crate) fn lease(&self) -> Duration {
        self.config.max_job_life
    }

    /// Tells running watches that the held jobs changed.
    pub(crate) fn notify(&self) {
        if self.watches.load(Ordering::Relaxed) > 0 {
            self.changed.notify_waiters();
        }
    }
}

/// Job slots that live as long as the job: a [`Layer`] and the handle to its state.
///
/// A job API counts concurrency in jobs: a Sync generation holds one of the plan's slots while
/// it is `PENDING` or `PROCESSING`, long after the `POST /v2/generate` that created it has
/// returned. Requests on the job routes (`POST /v2/generate` by default) wait in a fair FIFO
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
    /// Creates sent and not yet answered.
    pub in_flight: usize,
    /// Creates whose outcome will never be read (held until a reconcile or the lease).
    pub unknown: usize,
    /// Job-creating requests waiting for a slot.
    pub queued: usize,
    /// The jobs holding slots, oldest first.
    pub jobs: Vec<HeldJob>,
}

impl ConcurrencyLimitByPlan {
    /// A layer for `plan` with the defaults: job route `POST /v2/generate`, status route
    /// `GET /v2/generate/{id}`, list route `GET /v2/generations`, id field `id`, status field
    /// `status`, active statuses `PENDING` and `PROCESSING`, a maximum job life of one hour.
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
        match Builder::new(plan).assemble() {
            Ok(layer) => layer,
            Err(error) => unreachable!("the default routes are valid: {error}"),
        }
    }

    /// A layer allowing `limit` jobs at once, for APIs with other plan names. Zero is an error.
    pub fn with_limit(limit: usize) -> Result<Self, ConfigError> {
        Self::builder(Plan::Enterprise(limit)).build()
    }

    /// A builder, to set the routes, the JSON fields, the queue's bounds and the job life.
    pub fn builder(plan: Plan) -> Builder {
        Builder::new(plan)
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
        let held = self.shared.end_job(id, ReleaseReason::Finished);
        if !held {
            let now = self.shared.clock.now();
            self.shared.slots().complete_early(id, now);
        }
        if let (false, Some(store)) = (held, &self.shared.store) {
            // Held elsewhere, or not bound anywhere yet: the fleet remembers it as done.
            store.job_done(id, self.shared.lease());
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
        if let Some(store) = &self.shared.store {
            // Jobs other processes hold, gone from the list, are given back too; their creates
            // still in flight are left alone (no list can show them yet).
            let active = ids.iter().map(|id| id.as_ref().to_owned()).collect();
            store.jobs_reconcile(active, as_of, self.shared.clock, self.shared.lease());
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
        let slots = self.shared.slots();
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
        }
    }

    /// Changes the plan (an upgrade, a downgrade). More slots wake waiters at once; fewer take
    /// effect as jobs finish. A plan allowing no job is an error and changes nothing.
    pub fn set_plan(&self, plan: Plan) -> Result<(), ConfigError> {
        let limit = plan.checked_limit()?;
        *lock(&self.shared.plan) = plan;
        self.shared.slots().set_limit(limit);
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

/// Builds a [`ConcurrencyLimitByPlan`]; from [`ConcurrencyLimitByPlan::builder`].
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `.build()`"]
pub struct Builder {
    plan: Plan,
    job_routes: Option<Vec<String>>,
    status_routes: Option<Vec<String>>,
    list_routes: Option<Vec<String>>,
    id_param: String,
    id_field: String,
    status_field: String,
    active: Vec<String>,
    max_job_life: Duration,
    max_prefix: usize,
    max_queue: Option<usize>,
    max_wait: Option<Duration>,
    in_flight: bool,
    store: Option<StoreHandle>,
}

impl Builder {
    fn new(plan: Plan) -> Self {
        Self {
            plan,
            job_routes: None,
            status_routes: None,
            list_routes: None,
            id_param: "id".into(),
            id_field: "id".into(),
            status_field: "status".into(),
            active: vec!["PENDING".into(), "PROCESSING".into()],
            max_job_life: Duration::from_secs(3600),
            max_prefix: 64 * 1024,
            max_queue: None,
            max_wait: None,
            in_flight: false,
            store: None,
        }
    }

    /// A route whose requests create a job and need a slot, as `"METHOD /path"`. The first call
    /// replaces the default (`POST /v2/generate`); later calls add routes.
    pub fn job_route(mut self, pattern: impl Into<String>) -> Self {
        self.job_routes
            .get_or_insert_with(Vec::new)
            .push(pattern.into());
        self
    }

    /// A route whose responses show one job, named by the pattern's parameter
    /// [`id_param`](Self::id_param) (`"GET /v2/generate/{id}"`, the default), whatever other
    /// parameters it has (`"GET /v2/projects/{project}/generations/{id}"`). The first call
    /// replaces the default. A status route without that parameter makes
    /// [`build`](Self::build) fail with a [`ConfigError::InvalidRoute`] naming it.
    pub fn status_route(mut self, pattern: impl Into<String>) -> Self {
        self.status_routes
            .get_or_insert_with(Vec::new)
            .push(pattern.into());
        self
    }

    /// A route whose responses are a JSON array of jobs (`"GET /v2/generations"`, the
    /// default). The first call replaces the default.
    pub fn list_route(mut self, pattern: impl Into<String>) -> Self {
        self.list_routes
            .get_or_insert_with(Vec::new)
            .push(pattern.into());
        self
    }

    /// The parameter of the status routes that holds the job's id (default `id`, as in
    /// `GET /v2/generate/{id}`); the routes' other parameters are ignored.
    pub fn id_param(mut self, name: impl Into<String>) -> Self {
        self.id_param = name.into();
        self
    }

    /// The JSON field holding a job's id (default `id`).
    pub fn id_field(mut self, name: impl Into<String>) -> Self {
        self.id_field = name.into();
        self
    }

    /// The JSON field holding a job's status (default `status`).
    pub fn status_field(mut self, name: impl Into<String>) -> Self {
        self.status_field = name.into();
        self
    }

    /// The statuses in which a job holds a slot (default `PENDING`, `PROCESSING`); any other
    /// is terminal.
    pub fn active_statuses<I>(mut self, statuses: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        self.active = statuses.into_iter().map(Into::into).collect();
        self
    }

    /// The longest a job (or a create with an unknown outcome) may hold a slot without being
    /// seen to end (default one hour). Past it the slot is given back with a warning.
    pub fn max_job_life(mut self, life: Duration) -> Self {
        self.max_job_life = life;
        self
    }

    /// How many bytes of a response body are read to find a job's id and status (default
    /// 64 KiB). The body passes to the caller unchanged and undelayed either way.
    pub fn max_prefix(mut self, bytes: usize) -> Self {
        self.max_prefix = bytes;
        self
    }

    /// At most this many requests wait for a slot; one more fails at once with
    /// [`ConcurrencyError::QueueFull`](super::ConcurrencyError::QueueFull).
    pub fn max_queue(mut self, len: usize) -> Self {
        self.max_queue = Some(len);
        self
    }

    /// A request that waited this long for a slot fails with
    /// [`ConcurrencyError::WaitTooLong`](super::ConcurrencyError::WaitTooLong).
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.max_wait = Some(wait);
        self
    }

    /// In-flight mode, for APIs whose concurrency counts requests in flight: a slot is held
    /// from the send until the response body ends or is dropped, not for a job's life. A
    /// transport error or a dropped response future gives it back at once too.
    pub fn in_flight(mut self) -> Self {
        self.in_flight = true;
        self
    }

    /// Shares the plan's slots with other processes through a store (feature `redis`): jobs
    /// created by every process sharing it count against one plan. A create takes a slot
    /// here (in this process's fair queue) and then in the store, waiting across processes
    /// for one; `complete(id)` and `reconcile` work from any process, and a job given back
    /// anywhere is let go everywhere. Each held job has a lease in the store of the maximum
    /// job life, so the slots of a process that dies come back. While the store is away,
    /// its [`FailMode`](crate::store::FailMode) decides: creates go on under this process's
    /// own plan count, or fail with a [`StoreError`](crate::store::StoreError).
    ///
    /// A reconcile in any process frees only jobs and unknown outcomes older than its list,
    /// never a create still in flight elsewhere; a create dropped while it waits for its
    /// slot in the store leaves nothing there; finished ids are remembered by the fleet (for
    /// the maximum job life, the latest 4,096), so a completion that arrives before the
    /// creator read the job's id, or a stale list, never holds a slot for a finished job; and
    /// a create whose outcome is unknown is held in the store, where any process's reconcile
    /// accounts for it.
    ///
    /// Build the layer inside a Tokio runtime: it listens for jobs given back elsewhere.
    #[cfg(feature = "redis")]
    pub fn store(mut self, store: crate::store::RedisStore) -> Self {
        self.store = Some(store);
        self
    }

    /// Builds the layer, or says what is wrong.
    pub fn build(self) -> Result<ConcurrencyLimitByPlan, ConfigError> {
        self.plan.checked_limit()?;
        if self.max_job_life.is_zero() {
            return Err(ConfigError::InvalidSetting {
                name: "max_job_life",
                reason: "must be above zero",
            });
        }
        if self.id_param.is_empty() {
            return Err(ConfigError::InvalidSetting {
                name: "id_param",
                reason: "the parameter name must not be empty",
            });
        }
        if self.id_field.is_empty() || self.status_field.is_empty() {
            return Err(ConfigError::InvalidSetting {
                name: "id_field / status_field",
                reason: "field names must not be empty",
            });
        }
        if self.active.is_empty() {
            return Err(ConfigError::InvalidSetting {
                name: "active_statuses",
                reason: "at least one status must hold a slot",
            });
        }
        self.assemble()
    }

    fn assemble(self) -> Result<ConcurrencyLimitByPlan, ConfigError> {
        let defaults = |routes: Option<Vec<String>>, default: &str| {
            routes.unwrap_or_else(|| vec![default.to_owned()])
        };
        let mut table = RouteTable::default();
        let mut kinds = Vec::new();
        let mut watch_path = None;
        let mut unwatchable = Vec::new();
        let groups = [
            (
                RouteKind::Create,
                defaults(self.job_routes, "POST /v2/generate"),
            ),
            (
                RouteKind::Status,
                defaults(self.status_routes, "GET /v2/generate/{id}"),
            ),
            (
                RouteKind::List,
                defaults(self.list_routes, "GET /v2/generations"),
            ),
        ];
        for (kind, patterns) in groups {
            for text in patterns {
                let pattern = Pattern::parse(&text)?;
                if kind == RouteKind::Status {
                    let params = route::params(&pattern.path);
                    let id_param = &*self.id_param;
                    let Some(&(_, start, end)) = params.iter().find(|p| p.0 == id_param) else {
                        return Err(ConfigError::InvalidRoute {
                            pattern: text,
                            reason: format!(
                                "a status route names the job id with the parameter `{{{id_param}}}` (Builder::id_param), as in `/v2/generate/{{{id_param}}}`"
                            ),
                        });
                    };
                    if params.len() == 1 {
                        let path = &pattern.path;
                        watch_path
                            .get_or_insert_with(|| (path[..start].into(), path[end..].into()));
                    } else {
                        unwatchable.push(text.clone());
                    }
                }
                table.insert(&text, &pattern, kinds.len())?;
                kinds.push(kind);
            }
        }
        let limit = self.plan.limit();
        let mut slots = Slots::new(limit, nanos(self.max_job_life));
        if self.store.is_some() {
            slots.mirror();
        }
        let layer = ConcurrencyLimitByPlan {
            shared: Arc::new(PlanState {
                table,
                kinds: kinds.into(),
                watch_path: watch_path.ok_or_else(|| {
                    format!(
                        "no status route has the job id as its only parameter, which the watch could fill: {} also need(s) other parameters",
                        unwatchable.join(", ")
                    )
                }),
                config: PlanConfig {
                    id_param: self.id_param.into(),
                    id_field: self.id_field.into(),
                    status_field: self.status_field.into(),
                    active: self.active.into_iter().map(Into::into).collect(),
                    max_prefix: self.max_prefix,
                    max_queue: self.max_queue,
                    max_wait: self.max_wait,
                    in_flight: self.in_flight,
                    max_job_life: self.max_job_life,
                },
                clock: Clock::new(),
                slots: Mutex::new(slots),
                plan: Mutex::new(self.plan),
                changed: Notify::new(),
                watches: AtomicUsize::new(0),
                store: self.store,
            }),
        };
        #[cfg(feature = "redis")]
        if let Some(store) = &layer.shared.store {
            listen(&layer.shared, store)?;
        }
        Ok(layer)
    }
}

/// Lets go, in this process, of the jobs another process gave back.
#[cfg(feature = "redis")]
fn listen(shared: &Arc<PlanState>, store: &crate::store::RedisStore) -> Result<(), ConfigError> {
    use tokio::sync::broadcast::error::RecvError;
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return Err(ConfigError::InvalidSetting {
            name: "store",
            reason: "a layer with a store must be built inside a Tokio runtime",
        });
    };
    let mut done = store.done_jobs();
    let shared = Arc::downgrade(shared);
    runtime.spawn(async move {
        loop {
            match done.recv().await {
                Ok(id) => {
                    let Some(shared) = shared.upgrade() else {
                        return;
                    };
                    shared.end_job(&id, ReleaseReason::Elsewhere);
                }
                Err(RecvError::Lagged(missed)) => tracing::warn!(
                    missed,
                    "missed jobs given back elsewhere: their slots come back with a reconcile or their lease"
                ),
                Err(RecvError::Closed) => return,
            }
        }
    });
    Ok(())
}
