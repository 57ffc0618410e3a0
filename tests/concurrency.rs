//! `ConcurrencyLimitByPlan` on tokio's paused clock, against a scripted job API: every path
//! by which a slot is given back, and cancellation at each stage.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tokio_test::{assert_pending, assert_ready};
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_quota::concurrency::{ConcurrencyError, Job, PlanBody};
use tower_quota::{ConcurrencyLimitByPlan, ConfigError, Plan, ServiceBuilderExt};

mod common;

/// What the scripted API does with the next create.
#[derive(Clone, Debug)]
enum Next {
    Create,
    Status(u16),
    TransportError,
    /// A 201 whose body is this text.
    Body(String),
}

/// A job API: creates make `job-N` (PENDING); status and list routes show the jobs.
#[derive(Clone, Default)]
struct Api {
    jobs: Arc<Mutex<HashMap<String, String>>>,
    order: Arc<Mutex<Vec<String>>>,
    script: Arc<Mutex<VecDeque<Next>>>,
    creates: Arc<Mutex<Vec<Instant>>>,
}

impl Api {
    fn set(&self, id: &str, status: &str) {
        self.jobs
            .lock()
            .unwrap()
            .insert(id.to_owned(), status.to_owned());
    }

    fn next(&self, next: Next) {
        self.script.lock().unwrap().push_back(next);
    }

    fn creates(&self) -> usize {
        self.creates.lock().unwrap().len()
    }

    fn answer(&self, request: &Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, BoxError> {
        let path = request.uri().path().to_owned();
        let json = |status: u16, body: String| {
            Ok(Response::builder()
                .status(status)
                .body(Full::new(Bytes::from(body)))
                .unwrap())
        };
        if request.method() == http::Method::POST && path == "/v2/generate" {
            self.creates.lock().unwrap().push(Instant::now());
            let next = self
                .script
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or(Next::Create);
            return match next {
                Next::Create => {
                    let mut order = self.order.lock().unwrap();
                    let id = format!("job-{}", order.len() + 1);
                    order.push(id.clone());
                    self.set(&id, "PENDING");
                    json(
                        201,
                        format!(r#"{{"id":"{id}","status":"PENDING","model":"lipsync-2"}}"#),
                    )
                }
                Next::Status(code) => {
                    json(code, r#"{"errorCode":"concurrency_limit_reached"}"#.into())
                }
                Next::TransportError => Err("connection reset".into()),
                Next::Body(body) => json(201, body),
            };
        }
        // The status route, also under a project (`/v2/projects/{project}/generations/{id}`)
        // and as `/v2/jobs/{id}/status`.
        let status_id = path
            .strip_prefix("/v2/generate/")
            .or_else(|| {
                let rest = path.strip_prefix("/v2/projects/")?;
                Some(rest.split_once("/generations/")?.1)
            })
            .or_else(|| path.strip_prefix("/v2/jobs/")?.strip_suffix("/status"));
        if let Some(id) = status_id {
            return match self.jobs.lock().unwrap().get(id) {
                Some(status) => json(200, format!(r#"{{"id":"{id}","status":"{status}"}}"#)),
                None => json(404, "{}".into()),
            };
        }
        if path == "/v2/generations" {
            let jobs = self.jobs.lock().unwrap();
            let items: Vec<String> = jobs
                .iter()
                .map(|(id, status)| format!(r#"{{"id":"{id}","status":"{status}"}}"#))
                .collect();
            return json(200, format!("[{}]", items.join(",")));
        }
        json(200, "{}".into())
    }
}

type Svc =
    tower::util::BoxCloneService<Request<Full<Bytes>>, Response<PlanBody<Full<Bytes>>>, BoxError>;

/// The scripted API as a service.
fn api_service(
    api: &Api,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = BoxError,
    Future = impl std::future::Future<Output = Result<Response<Full<Bytes>>, BoxError>> + Send,
> + Clone
       + Send
       + 'static {
    let api = api.clone();
    tower::service_fn(move |request: Request<Full<Bytes>>| {
        let answer = api.answer(&request);
        async move { answer }
    })
}

/// The scripted API as a service that records the URI of each request it gets.
#[allow(clippy::type_complexity)] // an `impl Service` and its log: no alias can name it
fn recording(
    api: &Api,
) -> (
    impl Service<
            Request<Full<Bytes>>,
            Response = Response<Full<Bytes>>,
            Error = BoxError,
            Future = impl std::future::Future<Output = Result<Response<Full<Bytes>>, BoxError>> + Send,
        > + Clone
        + Send
        + 'static,
    Arc<Mutex<Vec<String>>>,
) {
    let polled = Arc::new(Mutex::new(Vec::new()));
    let (api, seen) = (api.clone(), polled.clone());
    let service = tower::service_fn(move |request: Request<Full<Bytes>>| {
        seen.lock().unwrap().push(request.uri().to_string());
        let answer = api.answer(&request);
        async move { answer }
    });
    (service, polled)
}

fn stack(plan: &ConcurrencyLimitByPlan, api: &Api) -> Svc {
    tower::util::BoxCloneService::new(
        ServiceBuilder::new()
            .concurrency_limit_by_plan(plan.clone())
            .service(api_service(api)),
    )
}

fn create() -> Request<Full<Bytes>> {
    Request::post("http://api.test/v2/generate")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap()
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://api.test{path}"))
        .body(Full::default())
        .unwrap()
}

type Sent = Result<(StatusCode, Option<String>, Bytes), BoxError>;

/// Sends a request and reads the whole body; the job id, if the response carries one.
fn send(
    svc: &Svc,
    request: Request<Full<Bytes>>,
) -> impl std::future::Future<Output = Sent> + Send {
    let svc = svc.clone();
    async move {
        let response = svc.oneshot(request).await?;
        let status = response.status();
        let job = response.extensions().get::<Job>().cloned();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, job.and_then(|j| j.id().map(str::to_owned)), body))
    }
}

fn spawn_create(svc: &Svc) -> tokio::task::JoinHandle<Sent> {
    tokio::spawn(send(svc, create()))
}

/// Lets spawned tasks run without moving the clock.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn the_plan_plus_one_th_create_waits_until_a_job_completes() {
    let plan = ConcurrencyLimitByPlan::new(Plan::Creator);
    let api = Api::default();
    let svc = stack(&plan, &api);
    for n in 1..=3 {
        let (status, id, _) = send(&svc, create()).await.unwrap();
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(id.as_deref(), Some(format!("job-{n}").as_str()));
    }
    assert_eq!(
        plan.in_use(),
        3,
        "held after the responses, for the jobs' life"
    );
    let fourth = spawn_create(&svc);
    let fifth = spawn_create(&svc);
    settle().await;
    assert_eq!(api.creates(), 3);
    assert_eq!(plan.queue_len(), 2);

    assert!(plan.complete("job-2"));
    assert!(!plan.complete("job-2"), "a slot is given back once");
    let (_, id, _) = fourth.await.unwrap().unwrap();
    assert_eq!(id.as_deref(), Some("job-4"));
    settle().await;
    assert_eq!(api.creates(), 4, "the fifth still waits");
    plan.complete("job-1");
    assert_eq!(fifth.await.unwrap().unwrap().1.as_deref(), Some("job-5"));
    let held: Vec<String> = plan.jobs().into_iter().map(|j| j.id).collect();
    assert_eq!(held.len(), 3);
    assert!(held.contains(&"job-3".to_owned()) && held.contains(&"job-5".to_owned()));
}

#[tokio::test(start_paused = true)]
async fn a_definite_failure_gives_the_slot_back_at_once() {
    let plan = ConcurrencyLimitByPlan::new(Plan::Hobbyist);
    let api = Api::default();
    let svc = stack(&plan, &api);
    for code in [429, 400, 403, 404, 409, 422] {
        api.next(Next::Status(code));
        let (status, id, _) = send(&svc, create()).await.unwrap();
        assert_eq!(status.as_u16(), code);
        assert_eq!(id, None);
        assert_eq!(plan.in_use(), 0, "after a {code}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_create_answered_5xx_is_an_unknown_outcome_held_until_reconciled() {
    let plan = ConcurrencyLimitByPlan::builder(Plan::Hobbyist)
        .max_job_life(Duration::from_secs(600))
        .build()
        .unwrap();
    let api = Api::default();
    let svc = stack(&plan, &api);
    for code in [500, 502, 503, 504, 599] {
        api.next(Next::Status(code));
        let (status, id, _) = send(&svc, create()).await.unwrap();
        assert_eq!((status.as_u16(), id), (code, None));
        let snapshot = plan.snapshot();
        assert_eq!(
            (snapshot.in_use, snapshot.unknown),
            (1, 1),
            "after a {code} the job may exist"
        );
        // The next create waits for the outcome to be known.
        let waiting = spawn_create(&svc);
        settle().await;
        assert_eq!(plan.queue_len(), 1, "after a {code}");
        tokio::time::sleep(Duration::from_secs(1)).await;
        plan.reconcile(Vec::<String>::new());
        let (_, id, _) = waiting.await.unwrap().unwrap();
        plan.complete(&id.unwrap());
        assert_eq!(plan.in_use(), 0);
    }
    // Or its lease runs out.
    api.next(Next::Status(502));
    send(&svc, create()).await.unwrap();
    let start = Instant::now();
    send(&svc, create()).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(600));
}

#[tokio::test(start_paused = true)]
async fn a_terminal_status_seen_on_the_status_route_gives_the_slot_back() {
    let plan = ConcurrencyLimitByPlan::new(Plan::Hobbyist);
    let api = Api::default();
    let svc = stack(&plan, &api);
    send(&svc, create()).await.unwrap();
    api.set("job-1", "PROCESSING");
    send(&svc, get("/v2/generate/job-1")).await.unwrap();
    assert_eq!(plan.in_use(), 1, "PROCESSING is active");
    let waiting = spawn_create(&svc);
    settle().await;
    api.set("job-1", "COMPLETED");
    send(&svc, get("/v2/generate/job-1")).await.unwrap();
    assert_eq!(waiting.await.unwrap().unwrap().1.as_deref(), Some("job-2"));

    // A 404 for a held job: it is gone.
    api.jobs.lock().unwrap().remove("job-2");
    send(&svc, get("/v2/generate/job-2")).await.unwrap();
    assert_eq!(plan.in_use(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_list_route_ends_jobs_and_counts_other_processes_jobs() {
    let plan = ConcurrencyLimitByPlan::new(Plan::Creator);
    let api = Api::default();
    let svc = stack(&plan, &api);
    send(&svc, create()).await.unwrap();
    send(&svc, create()).await.unwrap();
    api.set("job-1", "FAILED");
    api.set("other-process", "PROCESSING");
    send(&svc, get("/v2/generations")).await.unwrap();
    let mut held: Vec<(String, bool)> = plan.jobs().into_iter().map(|j| (j.id, j.ours)).collect();
    held.sort();
    assert_eq!(
        held,
        [
            ("job-2".to_owned(), true),
            ("other-process".to_owned(), false)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn reconcile_gives_back_gone_jobs_and_unknown_outcomes() {
    let plan = ConcurrencyLimitByPlan::new(Plan::Creator);
    let api = Api::default();
    let svc = stack(&plan, &api);
    send(&svc, create()).await.unwrap();
    send(&svc, create()).await.unwrap();
    api.next(Next::TransportError);
    let error = send(&svc, create()).await.unwrap_err();
    assert!(error.to_string().contains("connection reset"));
    let snapshot = plan.snapshot();
    assert_eq!(
        (snapshot.in_use, snapshot.unknown),
        (3, 1),
        "the failed send's outcome is unknown"
    );

    tokio::time::sleep(Duration::from_secs(1)).await;
    plan.reconcile(["job-2"]);
    let snapshot = plan.snapshot();
    assert_eq!((snapshot.in_use, snapshot.unknown), (1, 0));
    assert_eq!(snapshot.jobs[0].id, "job-2");
    assert_eq!(snapshot.jobs[0].age, Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn a_lease_runs_out_and_wakes_a_waiter_on_time() {
    let plan = ConcurrencyLimitByPlan::builder(Plan::Hobbyist)
        .max_job_life(Duration::from_secs(600))
        .build()
        .unwrap();
    let api = Api::default();
    let svc = stack(&plan, &api);
    let start = Instant::now();
    send(&svc, create()).await.unwrap();
    let waiting = spawn_create(&svc);
    waiting.await.unwrap().unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(600));
    assert_eq!(plan.jobs()[0].id, "job-2");
}

#[tokio::test(start_paused = true)]
async fn cancellation_at_each_stage() {
    let plan = ConcurrencyLimitByPlan::new(Plan::Hobbyist);
    let api = Api::default();

    // 1. Dropped while waiting: leaves the queue, wakes nobody wrongly.
    let svc = stack(&plan, &api);
    send(&svc, create()).await.unwrap();
    let mut waiting = tokio_test::task::spawn(svc.clone().oneshot(create()));
    assert_pending!(waiting.poll());
    let behind = spawn_create(&svc);
    settle().await;
    assert_eq!(plan.queue_len(), 2);
    drop(waiting);
    assert_eq!(plan.queue_len(), 1);
    plan.complete("job-1");
    assert_eq!(behind.await.unwrap().unwrap().1.as_deref(), Some("job-2"));
    plan.complete("job-2");

    // 2. Dropped after the send, before the answer: the server may have made the job.
    let (slow_tx, slow_rx) = tokio::sync::oneshot::channel::<()>();
    let slow_rx = Arc::new(Mutex::new(Some(slow_rx)));
    let slow = tower::service_fn(move |_: Request<Full<Bytes>>| -> BoxFuture<'static, Result<Response<Full<Bytes>>, BoxError>> {
        let rx = slow_rx.lock().unwrap().take();
        Box::pin(async move {
            if let Some(rx) = rx {
                let _ = rx.await;
            }
            Ok(Response::new(Full::new(Bytes::from_static(br#"{"id":"late"}"#))))
        })
    });
    let mut in_flight = tokio_test::task::spawn(
        ServiceBuilder::new()
            .layer(plan.clone())
            .service(slow)
            .oneshot(create()),
    );
    assert_pending!(in_flight.poll());
    assert_eq!(plan.snapshot().in_flight, 1);
    drop(in_flight);
    drop(slow_tx);
    let snapshot = plan.snapshot();
    assert_eq!((snapshot.in_use, snapshot.unknown), (1, 1));
    // A list taken later shows no job: the create made none.
    tokio::time::sleep(Duration::from_secs(1)).await;
    plan.reconcile(Vec::<String>::new());
    assert_eq!(plan.in_use(), 0);

    // 3. Answered, body dropped unread: the job exists but its id is unknown.
    let response = svc.clone().oneshot(create()).await.unwrap();
    let job = response.extensions().get::<Job>().cloned().unwrap();
    drop(response);
    assert_eq!(job.id(), None);
    assert_eq!(plan.snapshot().unknown, 1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    plan.reconcile(["job-3"]);
    assert_eq!(plan.jobs()[0].id, "job-3", "the list accounts for it");
    plan.complete("job-3");

    // 4. Body read in part: the id came in the first bytes, so it is known.
    let mut response = svc.clone().oneshot(create()).await.unwrap();
    let job = response.extensions().get::<Job>().cloned().unwrap();
    let _first = response.body_mut().frame().await;
    drop(response);
    assert_eq!(job.id(), Some("job-4"));
    assert_eq!(plan.snapshot().unknown, 0);
    assert_eq!(plan.in_use(), 1);
}

// ===== readiness: a create waiting for a slot holds no service that was driven ready =====

/// With `svc` over something that reserves capacity when driven ready (one place), a create
/// waiting for a slot must not stop a status request through the same stack.
async fn a_waiting_create_stops_no_other_request(plan: ConcurrencyLimitByPlan, api: Api, svc: Svc) {
    send(&svc, create()).await.unwrap();
    // The caller keeps its service after a call that waits, as a connection's handler does.
    let mut caller = svc.clone();
    caller.ready().await.unwrap();
    let waiting = tokio::spawn(caller.call(create()));
    settle().await;
    assert_eq!(plan.queue_len(), 1);
    let status = tokio::time::timeout(
        Duration::from_secs(1),
        send(&svc, get("/v2/generate/job-1")),
    )
    .await
    .expect("a status request passes while a create waits for a slot")
    .unwrap();
    assert_eq!(status.0, StatusCode::OK);
    api.set("job-1", "COMPLETED");
    send(&svc, get("/v2/generate/job-1")).await.unwrap();
    let response = tokio::time::timeout(Duration::from_secs(1), waiting)
        .await
        .expect("the waiting create readies its own service")
        .unwrap()
        .unwrap();
    response.into_body().collect().await.unwrap();
    assert_eq!(plan.jobs()[0].id, "job-2");
    tokio::time::timeout(Duration::from_secs(1), caller.ready())
        .await
        .expect("the caller's service readies again")
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_waiting_create_stops_no_other_request_over_a_concurrency_limit() {
    let plan = ConcurrencyLimitByPlan::new(Plan::Hobbyist);
    let api = Api::default();
    let below = tower::limit::ConcurrencyLimit::new(api_service(&api), 1);
    let svc = tower::util::BoxCloneService::new(plan.layer(below));
    a_waiting_create_stops_no_other_request(plan, api, svc).await;
}

#[tokio::test(start_paused = true)]
async fn a_waiting_create_stops_no_other_request_over_a_buffer() {
    let plan = ConcurrencyLimitByPlan::new(Plan::Hobbyist);
    let api = Api::default();
    let below = tower::buffer::Buffer::new(api_service(&api), 1);
    let svc = tower::util::BoxCloneService::new(plan.layer(below));
    a_waiting_create_stops_no_other_request(plan, api, svc).await;
}

#[tokio::test(start_paused = true)]
async fn a_create_dropped_while_readying_gives_its_slot_back() {
    let plan = ConcurrencyLimitByPlan::new(Plan::Hobbyist);
    let api = Api::default();
    let below = tower::limit::ConcurrencyLimit::new(api_service(&api), 1);
    let svc = tower::util::BoxCloneService::new(plan.layer(below.clone()));
    send(&svc, create()).await.unwrap();
    let mut waiting = tokio_test::task::spawn(svc.clone().oneshot(create()));
    assert_pending!(waiting.poll());
    // Something else takes the only capacity below the layer while the create waits.
    let mut other = below.clone();
    let mut other_ready = tokio_test::task::spawn(std::future::poll_fn(|cx| other.poll_ready(cx)));
    assert_ready!(other_ready.poll()).unwrap();
    drop(other_ready);
    plan.complete("job-1");
    // Its turn: it holds the slot while it readies its own service...
    assert!(waiting.is_woken());
    assert_pending!(waiting.poll());
    let snapshot = plan.snapshot();
    assert_eq!(
        (snapshot.in_use, snapshot.in_flight, snapshot.queued),
        (1, 1, 0)
    );
    // ...and, dropped before it was sent, gives the slot back.
    drop(waiting);
    let snapshot = plan.snapshot();
    assert_eq!((snapshot.in_use, snapshot.unknown), (0, 0));
    drop(other);
    send(&svc, create()).await.unwrap();
    assert_eq!(api.creates(), 2, "the dropped create was never sent");
}

#[tokio::test(start_paused = true)]
async fn a_readiness_error_returns_the_create_and_its_slot() {
    let plan = ConcurrencyLimitByPlan::new(Plan::Hobbyist);
    let (mut service, mut handle) =
        tower_test::mock::spawn_layer::<Request<()>, Response<Full<Bytes>>, _>(plan.clone());
    let post = || {
        Request::post("http://api.test/v2/generate")
            .body(())
            .unwrap()
    };
    assert!(service.poll_ready().is_ready());
    let first = service.call(post());
    let (_, reply) = handle.next_request().await.unwrap();
    reply.send_response(Response::new(Full::new(Bytes::from_static(
        br#"{"id":"a"}"#,
    ))));
    first.await.unwrap().into_body().collect().await.unwrap();
    assert!(service.poll_ready().is_ready());
    let mut waiting = tokio_test::task::spawn(service.call(post()));
    assert_pending!(waiting.poll());
    handle.send_error("the connection pool is closed");
    plan.complete("a");
    let error = assert_ready!(waiting.poll()).unwrap_err();
    assert_eq!(error.to_string(), "the connection pool is closed");
    let snapshot = plan.snapshot();
    assert_eq!(
        (snapshot.in_use, snapshot.unknown),
        (0, 0),
        "nothing was sent"
    );
}

#[tokio::test(start_paused = true)]
async fn a_create_returned_at_once_leaves_its_service_ready_for_nothing() {
    let plan = ConcurrencyLimitByPlan::builder(Plan::Hobbyist)
        .max_queue(0)
        .build()
        .unwrap();
    let api = Api::default();
    let below = tower::limit::ConcurrencyLimit::new(api_service(&api), 1);
    let mut svc = plan.layer(below.clone());
    svc.ready().await.unwrap();
    svc.call(create())
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    svc.ready().await.unwrap();
    let error = svc.call(create()).await.unwrap_err();
    assert_eq!(
        error.downcast_ref::<ConcurrencyError>(),
        Some(&ConcurrencyError::QueueFull { max_queue: 0 })
    );
    // Refused at once: what the caller's `poll_ready` reserved below is free again.
    let mut other = below.clone();
    tokio::time::timeout(Duration::from_secs(1), other.ready())
        .await
        .expect("the refused create's readiness is given back")
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_body_passes_byte_for_byte_and_only_a_bounded_prefix_is_read() {
    let plan = ConcurrencyLimitByPlan::builder(Plan::Creator)
        .max_prefix(64)
        .build()
        .unwrap();
    let api = Api::default();
    let svc = stack(&plan, &api);
    let filler = "x".repeat(1000);
    let early = format!(r#"{{"id":"early","status":"PENDING","note":"{filler}"}}"#);
    api.next(Next::Body(early.clone()));
    let (_, id, body) = send(&svc, create()).await.unwrap();
    assert_eq!(body, early.as_bytes());
    assert_eq!(id.as_deref(), Some("early"));

    let late = format!(r#"{{"note":"{filler}","id":"late"}}"#);
    api.next(Next::Body(late.clone()));
    let (_, id, body) = send(&svc, create()).await.unwrap();
    assert_eq!(body, late.as_bytes());
    assert_eq!(id, None, "the id lies past the prefix");
    assert_eq!(plan.snapshot().unknown, 1);

    // Not JSON at all: tolerated, held as unknown.
    api.next(Next::Body("<html>oops</html>".into()));
    let (status, id, _) = send(&svc, create()).await.unwrap();
    assert_eq!((status, id), (StatusCode::CREATED, None));
    assert_eq!(plan.snapshot().unknown, 2);
}

#[tokio::test(start_paused = true)]
async fn a_complete_before_the_create_body_showed_the_id_frees_the_slot_when_it_shows() {
    type Chunks = futures::channel::mpsc::UnboundedReceiver<
        Result<http_body::Frame<Bytes>, std::convert::Infallible>,
    >;
    let plan = ConcurrencyLimitByPlan::new(Plan::Hobbyist);
    let (body_tx, body_rx) = futures::channel::mpsc::unbounded();
    let body_rx = Arc::new(Mutex::new(Some(body_rx)));
    // A create answered at once whose body comes later.
    let slow_body = tower::service_fn(move |_: Request<Full<Bytes>>| {
        let rx: Option<Chunks> = body_rx.lock().unwrap().take();
        async move {
            let rx = rx.ok_or("one create only")?;
            let response = Response::builder()
                .status(201)
                .body(http_body_util::StreamBody::new(rx))
                .unwrap();
            Ok::<_, BoxError>(response)
        }
    });
    let svc = plan.layer(slow_body);
    let response = svc.oneshot(create()).await.unwrap();
    let job = response.extensions().get::<Job>().cloned().unwrap();
    assert_eq!(plan.snapshot().in_flight, 1);

    // The webhook says the job ended before the body showed its id.
    assert!(!plan.complete("gen_9"), "nothing held under that id yet");
    assert_eq!(plan.in_use(), 1);

    body_tx
        .unbounded_send(Ok(http_body::Frame::data(Bytes::from_static(
            br#"{"id":"gen_9","status":"PENDING"}"#,
        ))))
        .unwrap();
    drop(body_tx);
    response.into_body().collect().await.unwrap();
    assert_eq!(job.id(), Some("gen_9"));
    let snapshot = plan.snapshot();
    assert_eq!(
        (snapshot.in_use, snapshot.unknown),
        (0, 0),
        "freed as soon as the id showed"
    );
    assert!(!plan.complete("gen_9"));
}

#[tokio::test(start_paused = true)]
async fn a_create_answered_terminal_holds_nothing() {
    let plan = ConcurrencyLimitByPlan::new(Plan::Hobbyist);
    let api = Api::default();
    let svc = stack(&plan, &api);
    api.next(Next::Body(r#"{"id":"r","status":"REJECTED"}"#.into()));
    send(&svc, create()).await.unwrap();
    assert_eq!(plan.in_use(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_queue_is_bounded() {
    let plan = ConcurrencyLimitByPlan::builder(Plan::Hobbyist)
        .max_queue(1)
        .build()
        .unwrap();
    let api = Api::default();
    let svc = stack(&plan, &api);
    send(&svc, create()).await.unwrap();
    let _waiting = spawn_create(&svc);
    settle().await;
    let full = send(&svc, create()).await.unwrap_err();
    assert_eq!(
        full.downcast_ref::<ConcurrencyError>(),
        Some(&ConcurrencyError::QueueFull { max_queue: 1 })
    );
}

#[tokio::test(start_paused = true)]
async fn the_wait_is_bounded() {
    let plan = ConcurrencyLimitByPlan::builder(Plan::Hobbyist)
        .max_wait(Duration::from_secs(30))
        .build()
        .unwrap();
    let api = Api::default();
    let svc = stack(&plan, &api);
    send(&svc, create()).await.unwrap();
    let start = Instant::now();
    let waiting = spawn_create(&svc);
    settle().await;
    let too_long = waiting.await.unwrap().unwrap_err();
    assert!(matches!(
        too_long.downcast_ref::<ConcurrencyError>(),
        Some(ConcurrencyError::WaitTooLong { in_use: 1, .. })
    ));
    assert_eq!(start.elapsed(), Duration::from_secs(30));
    assert_eq!((plan.queue_len(), api.creates()), (0, 1));
}

#[tokio::test(start_paused = true)]
async fn in_flight_mode_holds_a_slot_until_the_body_ends_or_is_dropped() {
    let plan = ConcurrencyLimitByPlan::builder(Plan::Hobbyist)
        .in_flight()
        .build()
        .unwrap();
    let api = Api::default();
    let svc = stack(&plan, &api);
    let response = svc.clone().oneshot(create()).await.unwrap();
    assert_eq!(plan.in_use(), 1, "the body is not over");
    response.into_body().collect().await.unwrap();
    assert_eq!(plan.in_use(), 0);
    let response = svc.clone().oneshot(create()).await.unwrap();
    drop(response);
    assert_eq!(plan.in_use(), 0);
    api.next(Next::Status(500));
    send(&svc, create()).await.unwrap();
    assert_eq!(plan.in_use(), 0);
}

#[tokio::test(start_paused = true)]
async fn in_flight_mode_frees_the_slot_at_once_on_a_transport_error() {
    let plan = ConcurrencyLimitByPlan::builder(Plan::Hobbyist)
        .in_flight()
        .build()
        .unwrap();
    let api = Api::default();
    let svc = stack(&plan, &api);
    api.next(Next::TransportError);
    let error = send(&svc, create()).await.unwrap_err();
    assert!(error.to_string().contains("connection reset"));
    let snapshot = plan.snapshot();
    assert_eq!((snapshot.in_use, snapshot.unknown), (0, 0));
    send(&svc, create()).await.unwrap();
    assert_eq!(api.creates(), 2, "the next create went at once");
}

#[tokio::test(start_paused = true)]
async fn in_flight_mode_frees_the_slot_at_once_when_the_future_is_dropped() {
    let plan = ConcurrencyLimitByPlan::builder(Plan::Hobbyist)
        .in_flight()
        .build()
        .unwrap();
    let never = tower::service_fn(|_: Request<Full<Bytes>>| {
        std::future::pending::<Result<Response<Full<Bytes>>, BoxError>>()
    });
    let mut in_flight = tokio_test::task::spawn(plan.layer(never).oneshot(create()));
    assert_pending!(in_flight.poll());
    assert_eq!(plan.snapshot().in_flight, 1);
    drop(in_flight); // a timeout above the layer
    let snapshot = plan.snapshot();
    assert_eq!((snapshot.in_use, snapshot.unknown), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn plan_changes_at_run_time() {
    let plan = ConcurrencyLimitByPlan::new(Plan::Hobbyist);
    let api = Api::default();
    let svc = stack(&plan, &api);
    send(&svc, create()).await.unwrap();
    let waiters: Vec<_> = (0..3).map(|_| spawn_create(&svc)).collect();
    settle().await;
    assert_eq!(plan.queue_len(), 3);
    plan.set_plan(Plan::Creator).unwrap();
    settle().await;
    assert_eq!(api.creates(), 3, "two more slots wake two waiters at once");
    plan.set_plan(Plan::Hobbyist).unwrap();
    plan.complete("job-1");
    settle().await;
    assert_eq!(
        api.creates(),
        3,
        "fewer slots: 2 still held, the plan allows 1"
    );
    assert_eq!(
        plan.set_plan(Plan::Enterprise(0)),
        Err(ConfigError::InvalidSetting {
            name: "plan",
            reason: "a plan must allow at least one job"
        })
    );
    assert_eq!(plan.plan(), Plan::Hobbyist);
    plan.complete("job-2");
    plan.complete("job-3");
    for waiter in waiters {
        waiter.await.unwrap().unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_plan_allowing_no_job_is_a_typed_error() {
    assert!(ConcurrencyLimitByPlan::with_limit(0).is_err());
    assert!(ConcurrencyLimitByPlan::builder(Plan::Enterprise(0))
        .build()
        .is_err());
}

#[tokio::test]
async fn a_status_route_with_no_parameter_is_a_typed_error() {
    assert!(ConcurrencyLimitByPlan::builder(Plan::Scale)
        .status_route("GET /v2/generate")
        .build()
        .is_err());
}

#[tokio::test]
async fn a_plan_allowing_no_job_made_by_new_fails_each_job_request() {
    // `new` is infallible: each job request fails with a clear error instead.
    let plan = ConcurrencyLimitByPlan::new(Plan::Enterprise(0));
    let api = Api::default();
    let error = send(&stack(&plan, &api), create()).await.unwrap_err();
    assert_eq!(
        error.downcast_ref::<ConcurrencyError>(),
        Some(&ConcurrencyError::NoSlots)
    );
    // Other requests pass.
    send(&stack(&plan, &api), get("/v2/other")).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_watch_polls_held_jobs_through_the_service_below() {
    let plan = ConcurrencyLimitByPlan::new(Plan::Hobbyist);
    let api = Api::default();
    let svc = stack(&plan, &api);
    let below = {
        let api = api.clone();
        tower::service_fn(move |request: Request<Full<Bytes>>| {
            let answer = api.answer(&request);
            async move { answer }
        })
    };
    let polls = Arc::new(Mutex::new(0));
    let counted = {
        let polls = polls.clone();
        tower::ServiceBuilder::new()
            .map_request(move |r: Request<Full<Bytes>>| {
                *polls.lock().unwrap() += 1;
                r
            })
            .service(below)
    };
    tokio::spawn(
        plan.watch(counted, "http://api.test")
            .interval(Duration::from_secs(5))
            .run(),
    );
    let start = Instant::now();
    send(&svc, create()).await.unwrap();
    let waiting = spawn_create(&svc);
    tokio::time::sleep(Duration::from_secs(12)).await;
    api.set("job-1", "COMPLETED");
    waiting.await.unwrap().unwrap();
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(15),
        "seen at the poll after the end"
    );
    assert_eq!(
        *polls.lock().unwrap(),
        5,
        "job-1 at 0, 5, 10 and 15 s; job-2 as soon as it is held, at 15 s"
    );
}

// ===== status routes with several parameters: the job id is the one named `id` =====

#[tokio::test(start_paused = true)]
async fn a_status_route_with_several_parameters_reads_the_job_from_its_id_parameter() {
    let plan = ConcurrencyLimitByPlan::builder(Plan::Hobbyist)
        .status_route("GET /v2/projects/{project}/generations/{id}")
        .build()
        .unwrap();
    let api = Api::default();
    let svc = stack(&plan, &api);
    send(&svc, create()).await.unwrap();
    let waiting = spawn_create(&svc);
    settle().await;
    api.set("job-1", "COMPLETED");
    send(&svc, get("/v2/projects/acme/generations/job-1"))
        .await
        .unwrap();
    let (_, id, _) = tokio::time::timeout(Duration::from_secs(1), waiting)
        .await
        .expect("the status response freed job-1's slot")
        .unwrap()
        .unwrap();
    assert_eq!(id.as_deref(), Some("job-2"));
    // A 404 there names the job by its id too.
    api.jobs.lock().unwrap().remove("job-2");
    send(&svc, get("/v2/projects/acme/generations/job-2"))
        .await
        .unwrap();
    assert_eq!(plan.in_use(), 0);
}

#[test]
fn a_status_route_without_the_id_parameter_is_a_config_error_naming_it() {
    let pattern = "GET /v2/projects/{project}/generations/{generation}";
    let error = ConcurrencyLimitByPlan::builder(Plan::Hobbyist)
        .status_route("GET /v2/generate/{id}")
        .status_route(pattern)
        .build()
        .unwrap_err();
    match &error {
        ConfigError::InvalidRoute { pattern: named, .. } => assert_eq!(named, pattern),
        other => panic!("{other:?}"),
    }
    assert!(error.to_string().contains("{id}"), "{error}");
}

#[tokio::test(start_paused = true)]
async fn a_custom_id_param_names_the_job_on_status_routes_and_for_the_watch() {
    assert!(matches!(
        ConcurrencyLimitByPlan::builder(Plan::Hobbyist)
            .id_param("")
            .build(),
        Err(ConfigError::InvalidSetting {
            name: "id_param",
            ..
        })
    ));
    let plan = ConcurrencyLimitByPlan::builder(Plan::Creator)
        .id_param("generation")
        .status_route("GET /v2/projects/{project}/generations/{generation}")
        .status_route("GET /v2/jobs/{generation}/status")
        .build()
        .unwrap();
    let api = Api::default();
    let svc = stack(&plan, &api);
    send(&svc, create()).await.unwrap();
    send(&svc, create()).await.unwrap();
    api.set("job-1", "COMPLETED");
    send(&svc, get("/v2/projects/acme/generations/job-1"))
        .await
        .unwrap();
    assert_eq!(plan.jobs()[0].id, "job-2");

    // The watch polls the route it can fill: the one whose only parameter is the id.
    let (below, polled) = recording(&api);
    api.set("job-2", "COMPLETED");
    let watch = tokio::spawn(plan.watch(below, "http://api.test/").run());
    tokio::time::timeout(Duration::from_secs(1), async {
        while plan.in_use() > 0 {
            // Paused clock: lets the timeout fire if it never happens.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the watch saw job-2 end");
    watch.abort();
    assert_eq!(
        *polled.lock().unwrap(),
        ["http://api.test/v2/jobs/job-2/status"]
    );
}

#[tokio::test(start_paused = true)]
async fn the_watch_stops_at_once_when_no_status_route_has_the_id_as_its_only_parameter() {
    let plan = ConcurrencyLimitByPlan::builder(Plan::Hobbyist)
        .status_route("GET /v2/projects/{project}/generations/{id}")
        .build()
        .unwrap();
    let api = Api::default();
    let svc = stack(&plan, &api);
    send(&svc, create()).await.unwrap();
    let polled = Arc::new(Mutex::new(0));
    let below = {
        let (api, polled) = (api.clone(), polled.clone());
        tower::service_fn(move |request: Request<Full<Bytes>>| {
            *polled.lock().unwrap() += 1;
            let answer = api.answer(&request);
            async move { answer }
        })
    };
    // It cannot know the project: it polls nothing rather than a wrong URI.
    tokio::time::timeout(
        Duration::from_secs(60),
        plan.watch(below, "http://api.test").run(),
    )
    .await
    .expect("the watch returns at once");
    assert_eq!(*polled.lock().unwrap(), 0);
    assert_eq!(plan.in_use(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_watch_skips_a_job_id_that_cannot_stand_in_a_uri_and_goes_on() {
    let plan = ConcurrencyLimitByPlan::new(Plan::Growth);
    let api = Api::default();
    let svc = stack(&plan, &api);
    // Another process's jobs, from a list, with ids no status URI can hold as they are.
    let odd = ["bad id", "jöb", "a/../b", "q?x", ""];
    plan.reconcile(odd);
    send(&svc, create()).await.unwrap();
    assert_eq!(plan.in_use(), 6);
    api.set("job-1", "COMPLETED");
    let (below, polled) = recording(&api);
    let watch = tokio::spawn(
        plan.watch(below, "http://api.test")
            .interval(Duration::from_secs(5))
            .run(),
    );
    tokio::time::timeout(Duration::from_secs(60), async {
        while plan.jobs().iter().any(|j| j.id == "job-1") {
            // Paused clock: lets the timeout fire if it never happens.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the watch polled job-1 despite the odd ids");
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(!watch.is_finished(), "the watch goes on");
    watch.abort();
    assert_eq!(
        *polled.lock().unwrap(),
        ["http://api.test/v2/generate/job-1"]
    );
    assert_eq!(plan.in_use(), 5, "the odd ids stay held until a reconcile");
}

#[test]
fn plans_parse_and_display() {
    for (text, plan) in [
        ("hobbyist", Plan::Hobbyist),
        ("Creator", Plan::Creator),
        ("GROWTH", Plan::Growth),
        (" scale ", Plan::Scale),
        ("enterprise:40", Plan::Enterprise(40)),
        ("Enterprise(40)", Plan::Enterprise(40)),
    ] {
        assert_eq!(text.parse::<Plan>(), Ok(plan), "{text}");
        assert_eq!(plan.to_string().parse::<Plan>(), Ok(plan));
    }
    for bad in [
        "",
        "pro",
        "enterprise",
        "enterprise:0",
        "enterprise:-1",
        "enterprise(x)",
    ] {
        assert!(bad.parse::<Plan>().is_err(), "{bad}");
    }
    assert_eq!(
        [Plan::Hobbyist, Plan::Creator, Plan::Growth, Plan::Scale].map(Plan::limit),
        [1, 3, 6, 15]
    );
}

#[cfg(feature = "serde")]
#[test]
fn plans_serialize_as_their_text() {
    assert_eq!(
        serde_json::to_string(&Plan::Enterprise(40)).unwrap(),
        r#""Enterprise(40)""#
    );
    assert_eq!(
        serde_json::from_str::<Plan>(r#""creator""#).unwrap(),
        Plan::Creator
    );
    assert!(serde_json::from_str::<Plan>(r#""enterprise:0""#).is_err());
}

#[tokio::test]
async fn a_layer_for_any_api_names_its_job_routes_and_active_statuses() {
    // Nothing of Sync's is assumed: without a job route or an active status, no layer.
    let error = ConcurrencyLimitByPlan::custom(1)
        .active_statuses(["queued"])
        .build()
        .unwrap_err();
    assert!(error.to_string().contains("job_route"), "{error}");
    let error = ConcurrencyLimitByPlan::custom(1)
        .job_route("POST /v1/renders")
        .build()
        .unwrap_err();
    assert!(error.to_string().contains("active_statuses"), "{error}");
}

#[tokio::test(start_paused = true)]
async fn a_layer_for_any_api_holds_its_jobs_by_its_own_routes_and_statuses() {
    let done = Arc::new(Mutex::new(false));
    let renders = Arc::new(Mutex::new(0));
    let api = {
        let (done, renders) = (done.clone(), renders.clone());
        tower::service_fn(move |request: Request<Full<Bytes>>| {
            let status = if *done.lock().unwrap() {
                "done"
            } else {
                "running"
            };
            let body = match (request.method().as_str(), request.uri().path()) {
                ("POST", "/v1/renders") => {
                    let mut renders = renders.lock().unwrap();
                    *renders += 1;
                    format!(r#"{{"id":"r{renders}","status":"queued"}}"#)
                }
                ("GET", "/v1/renders/r1") => format!(r#"{{"id":"r1","status":"{status}"}}"#),
                _ => "{}".to_owned(),
            };
            async move { Ok::<_, BoxError>(Response::new(Full::new(Bytes::from(body)))) }
        })
    };
    let plan = ConcurrencyLimitByPlan::custom(1)
        .job_route("POST /v1/renders")
        .status_route("GET /v1/renders/{id}")
        .active_statuses(["queued", "running"])
        .build()
        .unwrap();
    let svc: Svc = tower::util::BoxCloneService::new(plan.layer(api));
    let render = || {
        Request::post("http://api.test/v1/renders")
            .body(Full::default())
            .unwrap()
    };
    send(&svc, render()).await.unwrap();
    assert_eq!(plan.in_use(), 1, "a `queued` render holds the slot");
    // Sync's create route means nothing here: it passes, taking no slot.
    send(&svc, create()).await.unwrap();
    let mut second = tokio_test::task::spawn(send(&svc, render()));
    assert_pending!(second.poll());
    send(&svc, get("/v1/renders/r1")).await.unwrap();
    assert_eq!(plan.in_use(), 1, "a `running` render still holds it");
    assert_pending!(second.poll());
    *done.lock().unwrap() = true;
    send(&svc, get("/v1/renders/r1")).await.unwrap();
    settle().await;
    assert_ready!(second.poll()).unwrap();
    assert_eq!(plan.in_use(), 1, "the second render holds it now");
}

#[tokio::test(start_paused = true)]
async fn a_watch_adds_the_query_it_is_given_to_each_poll() {
    let plan = ConcurrencyLimitByPlan::new(Plan::Creator);
    let api = Api::default();
    send(&stack(&plan, &api), create()).await.unwrap();
    let (below, polled) = recording(&api);
    let watch = tokio::spawn(
        plan.watch(below.clone(), "http://api.test")
            .query("?fields=status")
            .run(),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    watch.abort();
    let sync = tokio::spawn(
        plan.watch(below, "http://api.test")
            .long_poll(Duration::from_millis(1500))
            .run(),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    sync.abort();
    assert_eq!(
        *polled.lock().unwrap(),
        [
            "http://api.test/v2/generate/job-1?fields=status",
            // Sync's long poll, in whole seconds.
            "http://api.test/v2/generate/job-1?wait=true&timeout=1",
        ]
    );
}

#[tokio::test]
async fn in_flight_mode_reads_no_job_from_a_list_or_a_status() {
    let plan = ConcurrencyLimitByPlan::builder(Plan::Creator)
        .in_flight()
        .build()
        .unwrap();
    let api = Api::default();
    api.set("elsewhere-1", "PENDING");
    api.set("elsewhere-2", "PROCESSING");
    send(&stack(&plan, &api), get("/v2/generations"))
        .await
        .unwrap();
    send(&stack(&plan, &api), get("/v2/generate/elsewhere-1"))
        .await
        .unwrap();
    assert_eq!(plan.in_use(), 0, "in-flight mode counts requests, not jobs");
}

#[tokio::test]
async fn an_in_flight_layer_for_any_api_names_no_status() {
    let plan = ConcurrencyLimitByPlan::custom(2)
        .job_route("POST /v1/chat")
        .in_flight()
        .build()
        .unwrap();
    assert_eq!(plan.in_use(), 0);
}

/// How many generations a batch request starts, as its caller sets it.
#[derive(Clone, Copy)]
struct BatchLines(u32);

/// Over real sockets: an axum API whose batch route starts one generation per line of the
/// request body (and refuses a batch over its plan with a 429, as Sync does), and a hyper
/// client through the layer. A batch takes one slot per generation, a second batch waits
/// until its slots are free at once, each generation's slot is given back by its own
/// terminal status, and the server never sees more jobs at once than the plan.
#[tokio::test]
async fn a_batch_over_real_sockets_holds_a_slot_per_generation() {
    use axum::extract::{Path, State};
    use axum::routing::{get, post};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    const PLAN: usize = 4;

    #[derive(Clone, Default)]
    struct Server {
        /// Each generation and whether it is still active.
        jobs: Arc<Mutex<Vec<(String, bool)>>>,
    }
    async fn batch(State(server): State<Server>, body: String) -> axum::response::Response {
        use axum::response::IntoResponse;
        let mut jobs = server.jobs.lock().unwrap();
        let lines = body.lines().filter(|l| !l.trim().is_empty()).count();
        let active = jobs.iter().filter(|(_, active)| *active).count();
        if active + lines > PLAN {
            let body = r#"{"statusCode":429,"errorCode":"concurrency_limit_reached"}"#;
            return (StatusCode::TOO_MANY_REQUESTS, body).into_response();
        }
        let mut made = Vec::new();
        for _ in 0..lines {
            let id = format!("gen-{}", jobs.len() + 1);
            made.push(format!(r#"{{"id":"{id}","status":"PENDING"}}"#));
            jobs.push((id, true));
        }
        let body = format!(r#"{{"batchId":"b","generations":[{}]}}"#, made.join(","));
        (StatusCode::CREATED, body).into_response()
    }
    async fn status(State(server): State<Server>, Path(id): Path<String>) -> String {
        let jobs = server.jobs.lock().unwrap();
        let active = jobs.iter().any(|(job, active)| *job == id && *active);
        let status = if active { "PROCESSING" } else { "COMPLETED" };
        format!(r#"{{"id":"{id}","status":"{status}"}}"#)
    }
    let server = Server::default();
    let app = axum::Router::new()
        .route("/v2/batch", post(batch))
        .route("/v2/generate/{id}", get(status))
        .with_state(server.clone());
    let addr = common::serve(app).await;

    let plan = ConcurrencyLimitByPlan::builder(Plan::Enterprise(PLAN))
        .job_route("POST /v2/generate")
        .job_route("POST /v2/batch")
        .jobs_per_create(|head: &tower_quota::RequestHead<'_>| {
            head.extensions()
                .get::<BatchLines>()
                .map_or(1, |lines| lines.0)
        })
        .id_path("/generations/*/id")
        .build()
        .unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let svc = ServiceBuilder::new().layer(plan.clone()).service(client);

    let send_batch = |lines: u32| {
        let svc = svc.clone();
        async move {
            let body = "{\"model\":\"lipsync-2\"}\n".repeat(lines as usize);
            let mut request = Request::post(format!("http://{addr}/v2/batch"))
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            request.extensions_mut().insert(BatchLines(lines));
            let response = svc.oneshot(request).await?;
            let status = response.status();
            let job = response.extensions().get::<Job>().cloned();
            response.into_body().collect().await?;
            let ids: Vec<String> = job
                .map(|job| job.ids().map(str::to_owned).collect())
                .unwrap_or_default();
            Ok::<_, BoxError>((status, ids))
        }
    };
    let poll_status = |id: String| {
        let svc = svc.clone();
        async move {
            let request = Request::get(format!("http://{addr}/v2/generate/{id}"))
                .body(Full::default())
                .unwrap();
            let response = svc.oneshot(request).await.unwrap();
            response.into_body().collect().await.unwrap();
        }
    };

    let (status, first) = send_batch(3).await.unwrap();
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(first, ["gen-1", "gen-2", "gen-3"]);
    assert_eq!(plan.in_use(), 3);

    // Two more need two slots at once: one is free, so the batch waits, holding none.
    let second = tokio::spawn(send_batch(2));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while plan.queue_len() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the batch never queued"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(plan.in_use(), 3, "no slot held while it waits");

    // gen-2 ends on the server; the status the client reads frees its slot alone.
    server.jobs.lock().unwrap()[1].1 = false;
    poll_status("gen-2".into()).await;
    let (status, ids) = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("the waiting batch is sent once two slots are free")
        .unwrap()
        .unwrap();
    assert_eq!(
        status,
        StatusCode::CREATED,
        "the server never counts over the plan"
    );
    assert_eq!(ids, ["gen-4", "gen-5"]);
    let mut held: Vec<String> = plan.jobs().into_iter().map(|job| job.id).collect();
    held.sort();
    assert_eq!(held, ["gen-1", "gen-3", "gen-4", "gen-5"]);

    // The others end one by one: a webhook, then statuses.
    assert!(plan.complete("gen-4"));
    for id in ["gen-1", "gen-3", "gen-5"] {
        server
            .jobs
            .lock()
            .unwrap()
            .iter_mut()
            .filter(|(job, _)| job == id)
            .for_each(|(_, active)| *active = false);
        poll_status(id.into()).await;
    }
    assert_eq!(plan.in_use(), 0);

    // A batch over the plan never reaches the server.
    let error = send_batch(PLAN as u32 + 1).await.unwrap_err();
    assert!(matches!(
        error.downcast_ref::<ConcurrencyError>(),
        Some(ConcurrencyError::JobCount {
            jobs: 5,
            limit: PLAN
        })
    ));
    assert_eq!(server.jobs.lock().unwrap().len(), 5);
}
