//! [`Builder`]: a plan's routes, JSON fields, queue bounds and job life, checked when built.

use crate::event::{EventConfig, LayerKind};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::plan::Plan;
use super::slots::Slots;
use crate::clock::{nanos, Clock};
use crate::error::ConfigError;
use crate::route::{self, Pattern, RouteTable};
#[cfg(feature = "redis")]
use crate::store::StoreHandle;

use super::layer::ConcurrencyLimitByPlan;
use super::state::{JobsPerCreate, PlanConfig, PlanState, RouteKind};
#[cfg(feature = "redis")]
use super::store::listen;

/// Builds a [`ConcurrencyLimitByPlan`]: from [`ConcurrencyLimitByPlan::custom`]
/// with nothing assumed of the API, or from a preset
/// ([`presets::sync::plan`](crate::presets::sync::plan), which
/// [`ConcurrencyLimitByPlan::builder`] starts from).
///
/// Without a preset, name the routes that create jobs and the statuses in which a job holds a
/// slot; the status and list routes are optional, and the JSON fields default to `id` and
/// `status`:
///
/// ```
/// use tower_quota::ConcurrencyLimitByPlan;
/// # fn main() -> Result<(), tower_quota::ConfigError> {
/// let jobs = ConcurrencyLimitByPlan::custom(4)
///     .job_route("POST /v1/renders")
///     .status_route("GET /v1/renders/{id}")
///     .active_statuses(["queued", "running"])
///     .build()?;
/// # drop(jobs);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `.build()`"]
pub struct Builder {
    plan: Plan,
    job_routes: Option<Vec<String>>,
    status_routes: Option<Vec<String>>,
    list_routes: Option<Vec<String>>,
    /// A preset's job, status and list routes: the ones used where no route of a kind is
    /// given.
    default_routes: Option<[&'static str; 3]>,
    id_param: String,
    id_field: String,
    id_path: Option<String>,
    jobs_per_create: Option<JobsPerCreate>,
    status_field: String,
    active: Vec<String>,
    max_job_life: Duration,
    max_prefix: usize,
    max_queue: Option<usize>,
    max_wait: Option<Duration>,
    in_flight: bool,
    events: EventConfig,
    #[cfg(feature = "redis")]
    store: Option<StoreHandle>,
}

impl Builder {
    /// Nothing assumed of the API: no route, no active status.
    pub(crate) fn new(plan: Plan) -> Self {
        Self {
            plan,
            job_routes: None,
            status_routes: None,
            list_routes: None,
            default_routes: None,
            id_param: "id".into(),
            id_field: "id".into(),
            id_path: None,
            jobs_per_create: None,
            status_field: "status".into(),
            active: Vec::new(),
            max_job_life: Duration::from_secs(3600),
            max_prefix: 64 * 1024,
            max_queue: None,
            max_wait: None,
            in_flight: false,
            events: EventConfig::default(),
            #[cfg(feature = "redis")]
            store: None,
        }
    }

    event_setters!("plan");

    /// A preset's routes of each kind, used where none of that kind is given.
    pub(crate) fn default_routes(
        mut self,
        job: &'static str,
        status: &'static str,
        list: &'static str,
    ) -> Self {
        self.default_routes = Some([job, status, list]);
        self
    }

    /// A route whose requests create a job and need a slot, as `"METHOD /path"`. The first call
    /// replaces a preset's (Sync's `POST /v2/generate`); later calls add routes. At least
    /// one is needed.
    pub fn job_route(mut self, pattern: impl Into<String>) -> Self {
        self.job_routes
            .get_or_insert_with(Vec::new)
            .push(pattern.into());
        self
    }

    /// A route whose responses show one job, named by the pattern's parameter
    /// [`id_param`](Self::id_param) (Sync's `"GET /v2/generate/{id}"`), whatever other
    /// parameters it has (`"GET /v2/projects/{project}/generations/{id}"`). The first call
    /// replaces a preset's. A status route without that parameter makes
    /// [`build`](Self::build) fail with a [`ConfigError::InvalidRoute`] naming it.
    pub fn status_route(mut self, pattern: impl Into<String>) -> Self {
        self.status_routes
            .get_or_insert_with(Vec::new)
            .push(pattern.into());
        self
    }

    /// A route whose responses are a JSON array of jobs (Sync's `"GET /v2/generations"`).
    /// The first call replaces a preset's.
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

    /// Where a create's response shows the ids of the jobs it started, for creates that start
    /// several ([`jobs_per_create`](Self::jobs_per_create)): a JSON pointer whose `*` steps
    /// into every element of an array. `/generations/*/id` reads each object's `id` in the
    /// array `generations`; `/ids/*` an array of ids. An array element that is a string or a
    /// number where an object was expected is an id itself; the
    /// [`status_field`](Self::status_field) beside an id is its job's status. Where the path
    /// shows no id, a create of one job reads the top-level object's
    /// [`id_field`](Self::id_field) and status, as a single create does; a create of several
    /// is held as unknown outcomes (the answer names the batch, not its jobs).
    ///
    /// Without it, a create on a route that counts its jobs is read as a top-level array of
    /// jobs (each element's `id_field`, or the element itself: `/*/id`), or as one object. A
    /// path not starting with `/`, with an empty step, or with a `~` not written `~0` or
    /// `~1` makes [`build`](Self::build) fail (a field named `*` cannot be a step).
    pub fn id_path(mut self, pointer: impl Into<String>) -> Self {
        self.id_path = Some(pointer.into());
        self
    }

    /// How many jobs a create starts, and so how many slots it takes, read from its head: a
    /// batch API's one request starting many jobs, each counted against the plan. One for
    /// every create without it. (Sync's own batches are not counted in generation slots:
    /// they have a limit of concurrent batches of their own; see the README.) The closure sees the method, URI, header fields and
    /// extensions: a caller that knows its batch's size can put it in the request's
    /// extensions and read it back here.
    ///
    /// A create of `n` jobs waits in the same first-come-first-served queue until `n` slots
    /// are free at once, and takes them in one step: it never holds part of them while it
    /// waits, and creates behind it wait behind it, so a big batch is not starved by small
    /// creates of its process. (A shared store keeps no queue: other processes' creates may
    /// pass it.) A count of 0, or above the plan's slots, fails at once with
    /// [`ConcurrencyError::JobCount`](super::ConcurrencyError::JobCount), as does a waiting
    /// batch when [`set_plan`](super::ConcurrencyLimitByPlan::set_plan) lowers the plan
    /// below its count. With a shared store, the `n` slots are taken there in one step too.
    ///
    /// Each id the response shows (at [`id_path`](Self::id_path)) then holds one slot of its
    /// own, given back on its own: a terminal status, [`complete`](super::ConcurrencyLimitByPlan::complete),
    /// a reconcile or its lease. Slots the response shows no id for are settled as a single
    /// create's would be: all given back on a definite failure (4xx); held as unknown
    /// outcomes after a 5xx, a transport error, or a body that is not JSON, was cut at
    /// [`max_prefix`](Self::max_prefix) or dropped before its end (the server may have made
    /// those jobs). A whole JSON body that shows some ids but fewer than `n` says what the
    /// server made: the other slots are given back. Ids beyond `n` hold slots too, as jobs
    /// seen active, up to the plan's size. An id whose status beside it is terminal is given
    /// back at once.
    ///
    /// ```
    /// use http::{Request, Response};
    /// use http_body_util::{BodyExt, Full};
    /// use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
    /// use tower_quota::concurrency::Job;
    /// use tower_quota::{ConcurrencyLimitByPlan, RequestHead};
    ///
    /// /// How many jobs a batch request starts, set by the caller.
    /// #[derive(Clone, Copy)]
    /// struct BatchSize(u32);
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_quota::BoxError> {
    /// let plan = ConcurrencyLimitByPlan::custom(15) // 15 jobs at once
    ///     .active_statuses(["queued", "running"])
    ///     .job_route("POST /v1/jobs")
    ///     .job_route("POST /v1/jobs/batch")
    ///     .jobs_per_create(|head: &RequestHead<'_>| {
    ///         head.extensions().get::<BatchSize>().map_or(1, |size| size.0)
    ///     })
    ///     .id_path("/jobs/*/id")
    ///     .build()?;
    ///
    /// // A stand-in for the API: the batch starts three jobs.
    /// let api = service_fn(|_req: Request<String>| async {
    ///     let body = r#"{"jobs":[{"id":"g1"},{"id":"g2"},{"id":"g3"}]}"#;
    ///     Ok::<_, std::convert::Infallible>(Response::new(Full::new(body.as_bytes())))
    /// });
    /// let mut svc = ServiceBuilder::new().layer(plan.clone()).service(api);
    ///
    /// let mut batch = Request::post("https://api.example/v1/jobs/batch").body(String::new())?;
    /// batch.extensions_mut().insert(BatchSize(3));
    /// let response = svc.ready().await?.call(batch).await?;
    /// let job = response.extensions().get::<Job>().cloned().unwrap();
    /// response.into_body().collect().await?;
    /// assert_eq!(job.ids().collect::<Vec<_>>(), ["g1", "g2", "g3"]);
    /// assert_eq!(plan.in_use(), 3); // one slot per job
    ///
    /// plan.complete("g2"); // each is given back on its own
    /// assert_eq!(plan.in_use(), 2);
    /// # Ok(())
    /// # }
    /// ```
    pub fn jobs_per_create<F>(mut self, jobs: F) -> Self
    where
        F: Fn(&crate::RequestHead<'_>) -> u32 + Send + Sync + 'static,
    {
        self.jobs_per_create = Some(JobsPerCreate(Arc::new(jobs)));
        self
    }

    /// The JSON field holding a job's status (default `status`).
    pub fn status_field(mut self, name: impl Into<String>) -> Self {
        self.status_field = name.into();
        self
    }

    /// The statuses in which a job holds a slot (Sync's `PENDING`, `PROCESSING`); any other
    /// is terminal. At least one is needed.
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
    /// transport error or a dropped response future gives it back at once too. No job status
    /// is read: the status and list routes (a preset's included) are checked but not routed,
    /// and no active status needs naming.
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

    /// Switches to server mode, for an API that enforces plans on its own clients: creates
    /// are counted per client key (set on the returned builder) against each client's plan,
    /// and a create past it is answered at once with a 429. The job and status routes, the
    /// JSON fields, the active statuses, the maximum job life (the lease of a job and of an
    /// unknown outcome), the bytes read of a body and the events' settings carry over; the
    /// plan given to this builder is every client's unless
    /// [`plan_by`](super::RejectBuilder::plan_by) names another. See the
    /// [module docs](super#server-mode).
    ///
    /// Server mode never queues, so `max_queue` and `max_wait` are ignored; it counts one job
    /// per create, reads the top-level object's id, and keeps no list route, so
    /// [`jobs_per_create`](Self::jobs_per_create), [`id_path`](Self::id_path) and
    /// [`in_flight`](Self::in_flight) make [`build`](super::RejectBuilder::build) fail.
    ///
    /// ```
    /// use axum::http::HeaderName;
    /// use tower_quota::{ConcurrencyLimitByPlan, Plan};
    ///
    /// let jobs = ConcurrencyLimitByPlan::builder(Plan::Creator) // 3 jobs per client
    ///     .reject()
    ///     .key_header(HeaderName::from_static("x-api-key"))
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(jobs.in_use("sk-1"), 0);
    /// ```
    pub fn reject(self) -> super::RejectBuilder {
        let preset = self.default_routes;
        let defaults = |routes: Option<Vec<String>>, kind: usize| {
            routes.unwrap_or_else(|| preset.map(|p| vec![p[kind].to_owned()]).unwrap_or_default())
        };
        let error = if self.jobs_per_create.is_some() {
            Some("jobs_per_create: server mode counts one job per create")
        } else if self.id_path.is_some() {
            Some("id_path: server mode reads the id of the answer's top-level object")
        } else if self.in_flight {
            Some("in_flight: server mode counts jobs, not requests in flight")
        } else {
            None
        };
        super::RejectBuilder::new(super::server::Inherited {
            plan: self.plan,
            job_routes: defaults(self.job_routes, 0),
            status_routes: defaults(self.status_routes, 1),
            id_param: self.id_param,
            id_field: self.id_field,
            status_field: self.status_field,
            active: self.active,
            max_job_life: self.max_job_life,
            max_prefix: self.max_prefix,
            events: self.events,
            #[cfg(feature = "redis")]
            store: self.store,
            error: error.map(|reason| ConfigError::InvalidSetting {
                name: "reject",
                reason,
            }),
        })
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
        if let Some(Err(reason)) = self.id_path.as_deref().map(crate::json::IdPath::parse) {
            return Err(ConfigError::InvalidSetting {
                name: "id_path",
                reason,
            });
        }
        // In in-flight mode no status is read: a request's slot ends with its response.
        if self.active.is_empty() && !self.in_flight {
            return Err(ConfigError::InvalidSetting {
                name: "active_statuses",
                reason: "name the statuses in which a job holds a slot (presets::sync::plan names Sync's)",
            });
        }
        if self.job_routes.as_ref().is_none_or(Vec::is_empty) && self.default_routes.is_none() {
            return Err(ConfigError::InvalidSetting {
                name: "job_route",
                reason: "name the routes that create jobs (presets::sync::plan names Sync's)",
            });
        }
        self.assemble()
    }

    pub(super) fn assemble(self) -> Result<ConcurrencyLimitByPlan, ConfigError> {
        let preset = self.default_routes;
        let defaults = |routes: Option<Vec<String>>, kind: usize| {
            routes.unwrap_or_else(|| preset.map(|p| vec![p[kind].to_owned()]).unwrap_or_default())
        };
        let mut table = RouteTable::default();
        let mut kinds = Vec::new();
        let mut watch_path = None;
        let mut unwatchable = Vec::new();
        let groups = [
            (RouteKind::Create, defaults(self.job_routes, 0)),
            (RouteKind::Status, defaults(self.status_routes, 1)),
            (RouteKind::List, defaults(self.list_routes, 2)),
        ];
        for (kind, patterns) in groups {
            for text in patterns {
                let pattern = Pattern::parse(&text)?;
                if kind == RouteKind::Status {
                    let params = route::params(&pattern.path);
                    let id_param = &*self.id_param;
                    if !params.iter().any(|p| p.0 == id_param) {
                        return Err(ConfigError::InvalidRoute {
                            pattern: text,
                            reason: format!(
                                "a status route names the job id with the parameter `{{{id_param}}}` (Builder::id_param), as in `/jobs/{{{id_param}}}`"
                            ),
                        });
                    }
                }
                if self.in_flight && kind != RouteKind::Create {
                    // Checked, but not routed: in-flight mode counts requests, not jobs, so no
                    // response shows one.
                    continue;
                }
                if kind == RouteKind::Status {
                    let params = route::params(&pattern.path);
                    if let (1, Some(&(_, start, end))) =
                        (params.len(), params.iter().find(|p| p.0 == &*self.id_param))
                    {
                        let path = &pattern.path;
                        watch_path
                            .get_or_insert_with(|| (path[..start].into(), path[end..].into()));
                    } else {
                        unwatchable.push(text.clone());
                    }
                }
                table.insert(&text, &pattern, kinds.len())?;
                kinds.push(match kind {
                    RouteKind::Create if self.jobs_per_create.is_some() => RouteKind::CreateCounted,
                    kind => kind,
                });
            }
        }
        let limit = self.plan.limit();
        #[cfg_attr(not(feature = "redis"), allow(unused_mut))]
        let mut slots = Slots::new(limit, nanos(self.max_job_life));
        // A bound job's id is copied for its event only when a listener will read it.
        slots.report_ids = self.events.listener.is_some();
        #[cfg(feature = "redis")]
        if self.store.is_some() {
            slots.mirror();
        }
        let layer = ConcurrencyLimitByPlan {
            shared: Arc::new(PlanState {
                table,
                kinds: kinds.into(),
                watch_path: watch_path.ok_or_else(|| {
                    if self.in_flight {
                        "in-flight mode counts requests, not jobs: there is no job to watch".to_owned()
                    } else if unwatchable.is_empty() {
                        "no status route (Builder::status_route): the watch polls one whose only parameter is the job id".to_owned()
                    } else {
                        format!(
                            "no status route has the job id as its only parameter, which the watch could fill: {} also need(s) other parameters",
                            unwatchable.join(", ")
                        )
                    }
                }),
                config: PlanConfig {
                    id_param: self.id_param.into(),
                    id_path: match self.id_path.as_deref().map(crate::json::IdPath::parse) {
                        Some(Ok(path)) => path,
                        Some(Err(reason)) => {
                            return Err(ConfigError::InvalidSetting {
                                name: "id_path",
                                reason,
                            })
                        }
                        None => crate::json::IdPath::each(&self.id_field),
                    },
                    id_path_set: self.id_path.is_some(),
                    jobs_per_create: self.jobs_per_create,
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
                warned_no_id: std::sync::atomic::AtomicBool::new(false),
                #[cfg(feature = "redis")]
                store: self.store,
                events: self
                    .events
                    .build(LayerKind::Plan, [Arc::from("plan")]),
            }),
        };
        #[cfg(feature = "redis")]
        if let Some(store) = &layer.shared.store {
            listen(&layer.shared, store)?;
        }
        Ok(layer)
    }
}
