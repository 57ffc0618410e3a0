//! Job slots that live as long as the job: [`ConcurrencyLimitByPlan`].
//!
//! A job API counts concurrency in jobs, not requests. A Sync generation holds one of the
//! plan's slots (Hobbyist 1, Creator 3, Growth 6, Scale 15, Enterprise custom) while it is
//! `PENDING` or `PROCESSING`, minutes after the `POST /v2/generate` that created it returned,
//! and a create over the plan gets a 429 (the [`presets::sync`](crate::presets::sync) preset
//! knows its routes and statuses; any other job API names its own, see [`Builder`]). This
//! layer is the client-side queue the vendor advises: job-creating requests wait, first come first served, inside their response
//! futures until a slot is free, and each slot is held for its job's whole life.
//!
//! # The life of a slot
//!
//! - **Taken** before the create request is sent. Requests on other routes pass with no cost
//!   beyond a route match. A create that starts several jobs (a batch API,
//!   [`Builder::jobs_per_create`]) takes one slot per job, all at once when its turn comes at
//!   the head of the queue, and each job the response shows ([`Builder::id_path`]) then holds
//!   one of them on its own.
//! - **Given back at once** when the create gets a definite failure: a 4xx (a 429 included),
//!   since nothing was created.
//! - On a 2xx, the job's **id** is read from the response JSON (field `id` by default) as the
//!   caller reads the body: the body is not delayed and not a byte of it changes, and at most
//!   [`Builder::max_prefix`] bytes of it are kept. The response carries a [`Job`] in its
//!   extensions, whose [`Job::id`] is set once the body has shown it.
//! - The slot is then **held until the first of**: a response passing through the layer shows
//!   the job in a terminal state (a status route, Sync's `GET /v2/generate/{id}`, a 404
//!   there, or a list route, Sync's `GET /v2/generations`; any status but the active ones,
//!   Sync's `PENDING` and `PROCESSING`, is terminal); [`ConcurrencyLimitByPlan::complete`] (from a webhook, even one
//!   that comes before the create's body has shown the id: while a create is in flight such
//!   an id is remembered, for the maximum job life and at most the last 4,096 of them, and
//!   the slot is given back as soon as the body shows it);
//!   [`ConcurrencyLimitByPlan::reconcile`] with the list of active jobs says it is gone; or its
//!   lease ([`Builder::max_job_life`], one hour by default) runs out, with a warning.
//! - **Unknown outcomes**: a 5xx (a 502, 503 or 504 from a gateway that timed out is the
//!   usual one), a transport error after sending, a response future dropped after sending (a
//!   timeout above the layer), a body dropped before it showed the id, or a 2xx without an id.
//!   The server may have created a job, so the slot stays held, not freed: no id is known for
//!   a status or [`ConcurrencyLimitByPlan::complete`] to name, so it is held until a
//!   reconcile accounts for it or its lease runs out. A create sent again with the same
//!   `Idempotency-Key` (a retry of a 503) is that create again, since the server makes at most
//!   one job of a key: it takes over the slot its first send left held, at once (in this
//!   process: with a shared store, the store holds it). Jobs that a list shows active but this process does not hold (another process
//!   shares the API key) take slots too.
//! - A request dropped while **waiting** leaves the queue and wakes nobody wrongly.
//!
//! # Readiness
//!
//! `poll_ready` forwards to the inner service, and means what the inner service's does: it
//! says nothing about slots. Whether a request needs a slot is only known from the request,
//! so a create waits for one inside its response future, never in `poll_ready`.
//!
//! A create sent at once (and every other request) is sent with the service the caller drove
//! ready. A create that waits for a slot holds no service driven ready: it keeps a clone of
//! the inner service of its own, and the readiness the caller reserved (a slot of tower's
//! `Buffer`, a permit of its `ConcurrencyLimit`) is given back at the call. When its turn
//! comes it drives its clone ready, holding its slot meanwhile, then sends. So creates
//! waiting for a slot never stop status polls, lists or other requests through the same
//! stack, whatever reserves capacity below the layer. If the inner service fails to get
//! ready, the create is returned with that error (the inner service's own, as a
//! [`BoxError`](crate::BoxError)) and its slot is given back, since nothing was sent; the same
//! when the future is dropped while it readies. A create refused at once
//! ([`ConcurrencyError::QueueFull`], [`ConcurrencyError::NoSlots`]) gives the caller's
//! readiness back too.
//!
//! A status route names the job by its parameter [`Builder::id_param`] (`id` by default),
//! whatever other parameters it has: `GET /v2/projects/{project}/generations/{id}` reads the
//! job from `{id}`. A status route without that parameter is a
//! [`ConfigError`](crate::ConfigError) from [`Builder::build`], naming it.
//!
//! [`ConcurrencyLimitByPlan::watch`] polls the held jobs' status itself, through the service
//! below the layer. It knows only each job's id, so it polls the first status route whose only
//! parameter is the id; with none (each also needs, say, a `{project}`), it logs an error and
//! returns at once rather than guess. A job whose id cannot stand in a URI path as it is (a
//! space, non-ASCII, `/`, `?`, `%`: ids come from servers and lists) is not polled, with a
//! warning, and the watch goes on with the others. [`Builder::in_flight`] switches to counting requests in flight, for APIs
//! whose concurrency means that: the slot is held until the response body ends or is dropped,
//! and given back at once on a transport error or when the response future is dropped (the
//! slot is only for the HTTP request, which is over then).
//!
//! ```
//! use http::{Request, Response};
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//! use tower_quota::concurrency::Job;
//! use tower_quota::{ConcurrencyLimitByPlan, Plan};
//! use http_body_util::BodyExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_quota::BoxError> {
//! let plan = ConcurrencyLimitByPlan::new(Plan::Creator); // 3 jobs at once
//!
//! // A stand-in for the API: every create makes job `gen_1`.
//! let api = service_fn(|_req: Request<String>| async {
//!     let body = r#"{"id":"gen_1","status":"PENDING"}"#;
//!     Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(body.as_bytes())))
//! });
//! let mut svc = ServiceBuilder::new().layer(plan.clone()).service(api);
//!
//! let create = Request::post("https://api.sync.so/v2/generate").body(String::new())?;
//! let response = svc.ready().await?.call(create).await?;
//! let job = response.extensions().get::<Job>().cloned().unwrap();
//! response.into_body().collect().await?; // the caller reads the body as usual
//! assert_eq!(job.id(), Some("gen_1"));
//! assert_eq!(plan.in_use(), 1); // held until the job ends, not when the response did
//!
//! plan.complete("gen_1"); // e.g. from a webhook handler
//! assert_eq!(plan.in_use(), 0);
//! # Ok(())
//! # }
//! ```
//!
//! # Server mode
//!
//! An API that sells plans enforces them on its own clients: [`Builder::reject`] makes
//! [`KeyedPlans`], the same job routes and JSON read from the server's side. Each create is
//! counted under its client's key (a header such as `x-api-key`, a closure, the peer's
//! address) against its client's plan ([`RejectBuilder::plan_by`], read on every create, so
//! an upgrade takes effect on the next one). A create past the plan is answered at once with
//! a 429 and the body of [`RejectBuilder::reject_with`] (Sync's JSON,
//! `concurrency_limit_reached`, in [`presets::sync::plan_server`](crate::presets::sync::plan_server));
//! one under it takes a slot and is passed on, never queued. The slot is then held:
//!
//! - until the answer's status says nothing was made (a 4xx): given back at once;
//! - as the job the answer's JSON shows (`id`), until [`KeyedPlans::complete`] (the
//!   application's job runner or webhook says it ended) or a response of a status route
//!   shows it terminal or answers 404 to its own client; a completion that beats the
//!   answer's body is remembered while the client has a create in flight (its last 8);
//! - as an unknown outcome, when the application may have made a job the layer cannot name:
//!   a 5xx, an error, a success whose body shows no id (not JSON, cut at
//!   [`Builder::max_prefix`]), a caller that gave up (its connection closed, its future
//!   dropped) before the answer's body was read. Until [`KeyedPlans::reconcile`] with the
//!   application's own list of the client's jobs, or the lease
//!   ([`Builder::max_job_life`]) runs out.
//!
//! `complete` twice, for an id the client does not hold, or for another client's job frees
//! nothing and answers false. A client's entry holds at most its plan (jobs, creates in
//! flight, unknown outcomes) and 8 remembered completions, and exists only while it holds a
//! slot. At most [`RejectBuilder::max_keys`] clients are held: a newcomer at a full table
//! takes the place of the sampled client that holds least, so a flood of fresh keys can
//! neither grow memory nor lock newcomers out; the price is that a forgotten client may
//! exceed its plan by what it held. Only a create the application answered (or that was cut
//! off mid-flight) holds a slot: put authentication in front, and a flood of keys it refuses
//! holds nothing.

mod body;
mod builder;
mod error;
mod future;
mod hold;
mod layer;
mod observe;
mod permit;
mod plan;
pub(crate) mod server;
mod service;
mod slots;
mod state;
#[cfg(feature = "redis")]
mod store;
mod watch;

pub use body::{Job, PlanBody};
pub use builder::Builder;
pub use error::ConcurrencyError;
pub use future::ResponseFuture;
pub use layer::{ConcurrencyLimitByPlan, HeldJob, PlanSnapshot};
pub use permit::Permit;
pub use plan::{ParsePlanError, Plan};
pub use server::{
    KeyedPlanBody, KeyedPlanFuture, KeyedPlans, KeyedPlansService, KeyedPlansSnapshot,
    PlanRejectReason, PlanRejection, RejectBuilder, RejectPlan,
};
pub use service::ConcurrencyLimitByPlanService;
pub use watch::Watch;
