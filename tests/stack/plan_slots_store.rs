//! A plan's job slots shared across processes through Redis (feature `redis`), against the
//! local Sync API over real sockets.
//!
//! Redis keeps time with its own clock, which tokio's paused clock cannot move, so these
//! tests run in real time with jobs of half a second; nothing waits on a sleep to order
//! events.

#![cfg(feature = "redis")]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sync_mock::{Config, MockServer};
use tokio::sync::{watch, Notify};
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_quota::concurrency::{ConcurrencyError, Job};
use tower_quota::store::{FailMode, RedisStore, StoreError};
use tower_quota::{ConcurrencyLimitByPlan, Plan};

use crate::common::redis::{shared_redis, unique_prefix, RedisServer};
use crate::common::redis_query;

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn create_request(api: &MockServer, webhook: Option<&str>) -> http::Request<Full<Bytes>> {
    let mut body = serde_json::json!({
        "model": "lipsync-2",
        "input": [{"type": "video", "url": "https://example.com/v.mp4"},
                  {"type": "audio", "url": "https://example.com/a.wav"}],
    });
    if let Some(url) = webhook {
        body["webhookUrl"] = url.into();
    }
    http::Request::post(api.url("/v2/generate"))
        .header("x-api-key", sync_mock::DEFAULT_KEY)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// Sends one create through `plan`; the job's id if one was made.
async fn create(
    plan: &ConcurrencyLimitByPlan,
    client: &HttpClient,
    request: http::Request<Full<Bytes>>,
) -> Result<Option<String>, BoxError> {
    let service = ServiceBuilder::new()
        .layer(plan.clone())
        .service(client.clone());
    let response = service.oneshot(request).await?;
    assert_eq!(response.status(), StatusCode::CREATED);
    let job = response.extensions().get::<Job>().cloned();
    response.into_body().collect().await?;
    Ok(job.and_then(|job| job.id().map(str::to_owned)))
}

/// Who created each job, and a count of the webhooks received.
#[derive(Clone)]
struct Fleet {
    plans: Arc<Mutex<Vec<ConcurrencyLimitByPlan>>>,
    creators: Arc<Mutex<HashMap<String, usize>>>,
    finished: Arc<Mutex<(usize, Option<Instant>)>>,
    all_done: Arc<Notify>,
    jobs: usize,
}

/// A job is over: the webhook completes it through the *next* process's handle, never the
/// one that created it, so every slot comes back across processes.
async fn on_webhook(State(fleet): State<Fleet>, body: Bytes) -> StatusCode {
    let generation: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let id = generation["id"].as_str().unwrap().to_owned();
    let creator = fleet
        .creators
        .lock()
        .unwrap()
        .get(&id)
        .copied()
        .unwrap_or(0);
    let plan = fleet.plans.lock().unwrap()[(creator + 1) % 3].clone();
    plan.complete(&id);
    let mut finished = fleet.finished.lock().unwrap();
    finished.0 += 1;
    finished.1 = Some(Instant::now());
    if finished.0 == fleet.jobs {
        fleet.all_done.notify_one();
    }
    StatusCode::NO_CONTENT
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_share_one_plan() {
    const EACH: usize = 6;
    const JOB: Duration = Duration::from_millis(500);
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let prefix = unique_prefix("plan");
    let api = Arc::new(
        MockServer::start(
            Config::default()
                .api_key(sync_mock::DEFAULT_KEY, 3)
                .job_durations(Duration::from_millis(100), JOB - Duration::from_millis(100)),
        )
        .await
        .unwrap(),
    );
    let fleet = Fleet {
        plans: Arc::default(),
        creators: Arc::default(),
        finished: Arc::default(),
        all_done: Arc::default(),
        jobs: 3 * EACH,
    };
    let hooks = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/webhooks/sync", hooks.local_addr().unwrap());
    let app = Router::new()
        .route("/webhooks/sync", post(on_webhook))
        .with_state(fleet.clone());
    tokio::spawn(async move { axum::serve(hooks, app).await.unwrap() });

    // Three processes: each its own runtime, Redis connections and plan handle. Each stays up
    // until every job is over, since it lets go of the jobs completed elsewhere.
    let registered = Arc::new(std::sync::Barrier::new(3));
    let (over, over_rx) = watch::channel(false);
    let start = Instant::now();
    let processes: Vec<_> = (0..3)
        .map(|index| {
            let (url, prefix, api, fleet) =
                (url.clone(), prefix.clone(), api.clone(), fleet.clone());
            let (hook_url, registered, mut over) =
                (hook_url.clone(), registered.clone(), over_rx.clone());
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let plan = runtime.block_on(async {
                    let store = RedisStore::builder(url)
                        .prefix(prefix)
                        .fail_mode(FailMode::Closed)
                        .build()
                        .unwrap();
                    ConcurrencyLimitByPlan::builder(Plan::Creator)
                        .max_job_life(Duration::from_secs(60))
                        .store(store)
                        .build()
                        .unwrap()
                });
                fleet.plans.lock().unwrap().push(plan.clone());
                registered.wait();
                runtime.block_on(async move {
                    let client = Client::builder(TokioExecutor::new()).build_http();
                    let mut creates: FuturesUnordered<_> = (0..EACH)
                        .map(|_| create(&plan, &client, create_request(&api, Some(&hook_url))))
                        .collect();
                    while let Some(id) = creates.next().await {
                        let id = id.unwrap().expect("every create makes a job");
                        fleet.creators.lock().unwrap().insert(id, index);
                    }
                    let _ = over.wait_for(|over| *over).await;
                });
            })
        })
        .collect();
    fleet.all_done.notified().await;
    let last = fleet.finished.lock().unwrap().1.unwrap();
    over.send(true).unwrap();
    for process in processes {
        tokio::task::spawn_blocking(move || process.join().unwrap())
            .await
            .unwrap();
    }

    let stats = api.stats();
    assert_eq!(stats.created, 3 * EACH as u64);
    assert_eq!(stats.too_many_requests(), 0, "no 429 of either kind");
    assert!(
        stats.max_active_by_key[sync_mock::DEFAULT_KEY] <= 3,
        "the plan held across processes: {:?}",
        stats.max_active_by_key
    );
    // The plan's three slots were busy for most of the run.
    let span = last.duration_since(start);
    let used = stats.job_time.as_secs_f64() / (3.0 * span.as_secs_f64());
    println!(
        "18 jobs of {JOB:?} in {span:?} (ideal {:?}): slots busy {:.1}% of the time",
        JOB * 6,
        used * 100.0
    );
    assert!(
        used >= 0.95,
        "the fleet kept the slots busy {:.1}%",
        used * 100.0
    );
}

// ===== Redis stopped and started mid-test =====

fn plan_over(url: &str, fail_mode: FailMode) -> ConcurrencyLimitByPlan {
    let store = RedisStore::builder(url)
        .prefix("slots")
        .timeout(Duration::from_millis(200))
        .poll_interval(Duration::from_millis(100))
        .fail_mode(fail_mode)
        .build()
        .unwrap();
    ConcurrencyLimitByPlan::builder(Plan::Creator)
        .max_wait(Duration::from_millis(300))
        .store(store)
        .build()
        .unwrap()
}

async fn long_jobs_api() -> MockServer {
    MockServer::start(
        Config::default()
            .api_key(sync_mock::DEFAULT_KEY, 3)
            .job_durations(Duration::from_secs(60), Duration::from_secs(60)),
    )
    .await
    .unwrap()
}

/// Creates until one gets through (Redis is back), for at most ten seconds.
async fn until_created(plan: &ConcurrencyLimitByPlan, client: &HttpClient, api: &MockServer) {
    let started = Instant::now();
    while create(plan, client, create_request(api, None))
        .await
        .is_err()
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the store did not come back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_and_back_failing_closed() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let api = long_jobs_api().await;
    let plan = plan_over(&redis.url(), FailMode::Closed);
    let client = Client::builder(TokioExecutor::new()).build_http();

    create(&plan, &client, create_request(&api, None))
        .await
        .unwrap();
    redis.stop();
    let error = create(&plan, &client, create_request(&api, None))
        .await
        .unwrap_err();
    assert!(error.downcast_ref::<StoreError>().is_some(), "{error}");
    assert_eq!(plan.in_use(), 1, "the refused create gave its slot back");
    assert_eq!(
        api.stats().created,
        1,
        "nothing sent while the plan is unknown"
    );

    redis.restart();
    until_created(&plan, &client, &api).await;
    create(&plan, &client, create_request(&api, None))
        .await
        .unwrap();
    assert_eq!(plan.in_use(), 3);
    let error = create(&plan, &client, create_request(&api, None))
        .await
        .unwrap_err();
    assert!(matches!(
        error.downcast_ref::<ConcurrencyError>(),
        Some(ConcurrencyError::WaitTooLong { .. })
    ));
    let stats = api.stats();
    assert_eq!(stats.created, 3);
    assert_eq!(stats.too_many_requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_and_back_failing_open() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let api = long_jobs_api().await;
    let plan = plan_over(&redis.url(), FailMode::Open);
    let client = Client::builder(TokioExecutor::new()).build_http();

    create(&plan, &client, create_request(&api, None))
        .await
        .unwrap();
    redis.stop();
    // This process's own count takes over: two more fit the plan, the fourth waits.
    create(&plan, &client, create_request(&api, None))
        .await
        .unwrap();
    create(&plan, &client, create_request(&api, None))
        .await
        .unwrap();
    let error = create(&plan, &client, create_request(&api, None))
        .await
        .unwrap_err();
    assert!(matches!(
        error.downcast_ref::<ConcurrencyError>(),
        Some(ConcurrencyError::WaitTooLong { .. })
    ));
    redis.restart();
    // Back: the plan is still full here, and a create still waits rather than going over.
    let error = create(&plan, &client, create_request(&api, None))
        .await
        .unwrap_err();
    assert!(
        error.downcast_ref::<ConcurrencyError>().is_some(),
        "{error}"
    );
    let stats = api.stats();
    assert_eq!(stats.created, 3);
    assert_eq!(stats.too_many_requests(), 0);
}

// ===== reconcile from any process, and the leases of a process that died =====

fn shared_plan(url: &str, prefix: &str, life: Duration) -> ConcurrencyLimitByPlan {
    let store = RedisStore::builder(url)
        .prefix(prefix)
        .poll_interval(Duration::from_millis(100))
        .fail_mode(FailMode::Closed)
        .build()
        .unwrap();
    ConcurrencyLimitByPlan::builder(Plan::Creator)
        .max_job_life(life)
        .store(store)
        .build()
        .unwrap()
}

/// Waits (in real time, for at most five seconds) until `done` holds.
async fn eventually(mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < Duration::from_secs(5), "not within 5 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconcile_in_one_process_frees_the_jobs_another_holds() {
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let prefix = unique_prefix("reconcile");
    let api = long_jobs_api().await;
    let creator = shared_plan(&url, &prefix, Duration::from_secs(60));
    let other = shared_plan(&url, &prefix, Duration::from_secs(60));
    let client = Client::builder(TokioExecutor::new()).build_http();
    for _ in 0..3 {
        create(&creator, &client, create_request(&api, None))
            .await
            .unwrap();
    }
    assert_eq!(creator.in_use(), 3);
    // The creates' jobs reach Redis through the creator's background queue: a reconcile that
    // came before them would see creates in flight, which it rightly leaves alone.
    let redis = redis::Client::open(url.as_str()).unwrap();
    let mut connection = redis.get_multiplexed_async_connection().await.unwrap();
    let held_key = format!("{{{prefix}:slots}}:held");
    let mut jobs_in_redis = 0;
    let started = Instant::now();
    while jobs_in_redis < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "jobs not in Redis within 5 s"
        );
        let held: Vec<String> = redis::cmd("ZRANGE")
            .arg(&held_key)
            .arg(0)
            .arg(-1)
            .query_async(&mut connection)
            .await
            .unwrap();
        jobs_in_redis = held.iter().filter(|m| m.starts_with("j:")).count();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The other process lists the account's jobs (here: none is active any more, as if they
    // had ended with nobody watching) and reconciles, as it would every so often. Holds taken
    // within the store's timeout before a list are left to the next one (Redis cannot tell
    // when a list was requested more closely than that), so the first reconciles may free
    // nothing.
    eventually(|| {
        other.reconcile(Vec::<String>::new());
        creator.in_use() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slots_of_a_process_that_died_come_back_with_their_leases() {
    const LIFE: Duration = Duration::from_secs(1);
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let prefix = unique_prefix("died");
    // Jobs end on the server long before the leases, which nobody gives back.
    let api = Arc::new(
        MockServer::start(
            Config::default()
                .api_key(sync_mock::DEFAULT_KEY, 3)
                .job_durations(Duration::from_millis(50), Duration::from_millis(50)),
        )
        .await
        .unwrap(),
    );
    let died = {
        let (url, prefix, api) = (url.clone(), prefix.clone(), api.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let plan = shared_plan(&url, &prefix, LIFE);
                let client = Client::builder(TokioExecutor::new()).build_http();
                for _ in 0..3 {
                    create(&plan, &client, create_request(&api, None))
                        .await
                        .unwrap();
                }
                // Die: the runtime and everything on it goes, giving nothing back. (Whether
                // the creates' slots were bound to their jobs in Redis yet or not, each has a
                // lease of the job life.)
                Instant::now()
            })
        })
    };
    let died_at = tokio::task::spawn_blocking(move || died.join().unwrap())
        .await
        .unwrap();

    let survivor = shared_plan(&url, &prefix, LIFE);
    let client = Client::builder(TokioExecutor::new()).build_http();
    create(&survivor, &client, create_request(&api, None))
        .await
        .unwrap();
    let waited = died_at.elapsed();
    assert!(
        waited >= LIFE / 2,
        "the dead process's slots were held until their leases ran out ({waited:?})"
    );
    assert!(waited < LIFE * 4, "and came back then ({waited:?})");
    assert_eq!(api.stats().too_many_requests(), 0);
}

// ===== a fleet of creators, webhooks and reconciles (issue: the server saw 4 and 5 active
// jobs on a plan of 3) =====

/// The members of a plan's held set in Redis.
async fn held_in_redis(url: &str, prefix: &str) -> Vec<String> {
    let redis = redis::Client::open(url).unwrap();
    let mut connection = redis.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("ZRANGE")
        .arg(format!("{{{prefix}:slots}}:held"))
        .arg(0)
        .arg(-1)
        .query_async(&mut connection)
        .await
        .unwrap()
}

/// Waits (in real time, for at most five seconds) until the held set in Redis satisfies `done`.
async fn eventually_held(url: &str, prefix: &str, done: impl Fn(&[String]) -> bool) {
    let started = Instant::now();
    loop {
        let held = held_in_redis(url, prefix).await;
        if done(&held) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "held in Redis not as expected within 5 s: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An API of the test's own: a create makes its job only when the test opens the gate, so
/// creates can be held in flight, before the server made anything, for as long as a test needs.
#[derive(Clone)]
struct GatedApi {
    gate: Arc<tokio::sync::Semaphore>,
    arrived: Arc<std::sync::atomic::AtomicUsize>,
    jobs: Arc<Mutex<(usize, usize)>>, // (made, the most active at once: jobs never end here)
}

impl Default for GatedApi {
    fn default() -> Self {
        Self {
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
            arrived: Arc::default(),
            jobs: Arc::default(),
        }
    }
}

impl GatedApi {
    async fn start(&self) -> String {
        async fn create(State(api): State<GatedApi>) -> (StatusCode, String) {
            api.arrived
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            api.gate.acquire().await.unwrap().forget();
            let mut jobs = api.jobs.lock().unwrap();
            jobs.0 += 1;
            jobs.1 = jobs.1.max(jobs.0);
            let body = format!(r#"{{"id":"job-{}","status":"PENDING"}}"#, jobs.0);
            (StatusCode::CREATED, body)
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new()
            .route("/v2/generate", post(create))
            .route("/v2/other", axum::routing::get(|| async { "other" }))
            .with_state(self.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}/v2/generate")
    }

    fn arrived(&self) -> usize {
        self.arrived.load(std::sync::atomic::Ordering::SeqCst)
    }
}

fn gated_request(url: &str) -> http::Request<Full<Bytes>> {
    http::Request::post(url)
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap()
}

fn store_plan(url: &str, prefix: &str, plan: Plan) -> ConcurrencyLimitByPlan {
    let store = RedisStore::builder(url)
        .prefix(prefix)
        .timeout(Duration::from_millis(50))
        .poll_interval(Duration::from_millis(50))
        .fail_mode(FailMode::Closed)
        .build()
        .unwrap();
    ConcurrencyLimitByPlan::builder(plan)
        .max_job_life(Duration::from_secs(60))
        .max_wait(Duration::from_millis(300))
        .store(store)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconcile_elsewhere_never_frees_a_create_still_in_flight() {
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let prefix = unique_prefix("in-flight");
    let api = GatedApi::default();
    let create_url = api.start().await;
    let creator = store_plan(&url, &prefix, Plan::Creator);
    let reconciler = store_plan(&url, &prefix, Plan::Creator);
    let late = store_plan(&url, &prefix, Plan::Creator);
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();

    // Three creates sent and waiting at the server, which has made no job yet.
    let sent: Vec<_> = (0..3)
        .map(|_| {
            let service = ServiceBuilder::new()
                .layer(creator.clone())
                .service(client.clone());
            tokio::spawn(service.oneshot(gated_request(&create_url)))
        })
        .collect();
    while api.arrived() < 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Older than any list a reconcile could now be given, by more than its margin.
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Another process lists the jobs (truthfully: none yet) and reconciles; then it
    // reconciles a list showing one job, which tells when both reached Redis.
    reconciler.reconcile(Vec::<String>::new());
    reconciler.reconcile(["seen-elsewhere"]);
    eventually_held(&url, &prefix, |held| {
        held.iter().any(|m| m == "j:seen-elsewhere")
    })
    .await;
    let held = held_in_redis(&url, &prefix).await;
    assert_eq!(
        held.iter().filter(|m| m.starts_with("c:")).count(),
        3,
        "the creates in flight keep their slots: {held:?}"
    );

    // A third process finds the plan full, and sends nothing.
    let service = ServiceBuilder::new()
        .layer(late.clone())
        .service(client.clone());
    let answer = tokio::time::timeout(
        Duration::from_secs(2),
        service.oneshot(gated_request(&create_url)),
    )
    .await
    .expect("the late create was sent: the reconcile freed the creates in flight");
    let error = answer.unwrap_err();
    assert!(
        matches!(
            error.downcast_ref::<ConcurrencyError>(),
            Some(ConcurrencyError::WaitTooLong { .. })
        ),
        "{error}"
    );

    api.gate.add_permits(10);
    for create in sent {
        create.await.unwrap().unwrap();
    }
    assert_eq!(api.arrived(), 3);
    assert_eq!(api.jobs.lock().unwrap().1, 3, "never above the plan");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_dropped_while_it_waits_for_its_redis_slot_leaves_no_trace() {
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let prefix = unique_prefix("dropped");
    let api = GatedApi::default();
    let create_url = api.start().await;
    api.gate.add_permits(10);
    let holder = store_plan(&url, &prefix, Plan::Hobbyist);
    let waiter = store_plan(&url, &prefix, Plan::Hobbyist);
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let job = create_gated(&holder, &client, &create_url).await;

    // The plan's one slot is held elsewhere: this create waits for Redis, and is dropped.
    let service = ServiceBuilder::new()
        .layer(waiter.clone())
        .service(client.clone());
    let waited = tokio::time::timeout(
        Duration::from_millis(100),
        service.oneshot(gated_request(&create_url)),
    )
    .await;
    assert!(waited.is_err(), "it waited");
    assert_eq!(
        waiter.in_use(),
        0,
        "nothing was sent: no unknown outcome here"
    );
    assert_eq!(api.arrived(), 1);
    holder.complete(&job);
    eventually_held(&url, &prefix, <[String]>::is_empty).await;
    // And the slot is there for the next create, in either process.
    create_gated(&waiter, &client, &create_url).await;
    assert_eq!(waiter.in_use(), 1);
}

/// Sends one create to a gated API through `plan`, reads its answer; the job's id.
async fn create_gated(plan: &ConcurrencyLimitByPlan, client: &HttpClient, url: &str) -> String {
    let service = ServiceBuilder::new()
        .layer(plan.clone())
        .service(client.clone());
    let response = service.oneshot(gated_request(url)).await.unwrap();
    let job = response.extensions().get::<Job>().cloned().unwrap();
    response.into_body().collect().await.unwrap();
    job.id().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_elsewhere_before_the_creators_bind_is_not_lost() {
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let prefix = unique_prefix("early");
    let api = GatedApi::default();
    let create_url = api.start().await;
    api.gate.add_permits(10);
    let creator = store_plan(&url, &prefix, Plan::Creator);
    let webhook = store_plan(&url, &prefix, Plan::Creator);
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();

    // The create is answered, its body not read yet: its id is not known to the creator.
    let service = ServiceBuilder::new()
        .layer(creator.clone())
        .service(client.clone());
    let response = service.oneshot(gated_request(&create_url)).await.unwrap();
    // The job ends at once, and its webhook reaches another process first.
    assert!(!webhook.complete("job-1"), "not held there");
    let redis = redis::Client::open(url.as_str()).unwrap();
    let mut connection = redis.get_multiplexed_async_connection().await.unwrap();
    let started = Instant::now();
    loop {
        let done: Option<f64> = redis::cmd("ZSCORE")
            .arg(format!("{{{prefix}:slots}}:done"))
            .arg("job-1")
            .query_async(&mut connection)
            .await
            .unwrap();
        if done.is_some() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the fleet does not remember the completion"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Now the creator reads the id: the slot comes back, here and in Redis.
    response.into_body().collect().await.unwrap();
    eventually(|| creator.in_use() == 0).await;
    eventually_held(&url, &prefix, <[String]>::is_empty).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_list_cannot_take_back_the_slot_of_a_completed_job() {
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let prefix = unique_prefix("stale");
    let api = GatedApi::default();
    let create_url = api.start().await;
    api.gate.add_permits(10);
    let creator = store_plan(&url, &prefix, Plan::Creator);
    let reconciler = store_plan(&url, &prefix, Plan::Creator);
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let job = create_gated(&creator, &client, &create_url).await;
    eventually_held(&url, &prefix, |held| held == [format!("j:{job}")]).await;
    assert!(creator.complete(&job));
    eventually_held(&url, &prefix, <[String]>::is_empty).await;

    // A list requested before the job ended arrives now, in another process.
    reconciler.reconcile([job.as_str()]);
    eventually(|| reconciler.in_use() == 0).await;
    assert!(held_in_redis(&url, &prefix).await.is_empty());
    assert_eq!(creator.in_use(), 0);
}

/// A small deterministic generator, so that a failing run can be repeated from its seed.
struct Dice(u64);

impl Dice {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// The active job ids, as the API lists them.
async fn list_active(client: &HttpClient, api: &MockServer) -> Vec<String> {
    let request =
        http::Request::get(api.url("/v2/generations?status=PENDING,PROCESSING&limit=100"))
            .header("x-api-key", sync_mock::DEFAULT_KEY)
            .body(Full::new(Bytes::new()))
            .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let jobs: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
    jobs.iter()
        .map(|job| job["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_creators_webhooks_and_reconciles_never_exceeds_the_plan() {
    const CREATORS: usize = 4;
    const RUN: Duration = Duration::from_secs(3);
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let prefix = unique_prefix("fleet");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("seed {seed}");
    // Jobs of milliseconds, and no rate limit to speak of: only the plan binds.
    let api = Arc::new(
        MockServer::start(
            Config::default()
                .api_key(sync_mock::DEFAULT_KEY, 3)
                .job_durations(Duration::from_millis(5), Duration::from_millis(15))
                .limit(
                    sync_mock::Endpoint::Create,
                    sync_mock::Limit::per_second(100_000),
                )
                .other_limits(sync_mock::Limit::per_second(100_000)),
        )
        .await
        .unwrap(),
    );
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();

    // The webhook process completes every job it hears of; it never creates.
    let webhook = store_plan(&url, &prefix, Plan::Creator);
    let hooks = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/webhooks/sync", hooks.local_addr().unwrap());
    async fn on_hook(State(plan): State<ConcurrencyLimitByPlan>, body: Bytes) -> StatusCode {
        let generation: serde_json::Value = serde_json::from_slice(&body).unwrap();
        plan.complete(generation["id"].as_str().unwrap());
        StatusCode::NO_CONTENT
    }
    let app = Router::new()
        .route("/webhooks/sync", post(on_hook))
        .with_state(webhook.clone());
    tokio::spawn(async move { axum::serve(hooks, app).await.unwrap() });

    // The reconciling process lists the active jobs every 20 ms.
    let reconciler = store_plan(&url, &prefix, Plan::Creator);
    let (stop, stopped) = watch::channel(false);
    let reconciling = {
        let (client, api, plan, mut stopped) = (
            client.clone(),
            api.clone(),
            reconciler.clone(),
            stopped.clone(),
        );
        tokio::spawn(async move {
            while !*stopped.borrow() {
                let listed_at = tokio::time::Instant::now();
                let active = list_active(&client, &api).await;
                plan.reconcile_as_of(active, listed_at);
                let _ = tokio::time::timeout(Duration::from_millis(20), stopped.changed()).await;
            }
        })
    };

    // The creating processes create as fast as their slots allow, and give up on one create
    // in four at a random moment: while it waits, while it is sent, or while it is answered.
    let creators: Vec<ConcurrencyLimitByPlan> = (0..CREATORS)
        .map(|_| store_plan(&url, &prefix, Plan::Creator))
        .collect();
    let creating: Vec<_> = creators
        .iter()
        .enumerate()
        .map(|(index, plan)| {
            let (plan, client, api, hook_url, stopped) = (
                plan.clone(),
                client.clone(),
                api.clone(),
                hook_url.clone(),
                stopped.clone(),
            );
            let mut dice = Dice(seed.wrapping_mul(index as u64 + 1) | 1);
            tokio::spawn(async move {
                let (mut made, mut dropped, mut refused) = (0, 0, 0);
                while !*stopped.borrow() {
                    let service = ServiceBuilder::new()
                        .layer(plan.clone())
                        .service(client.clone());
                    let request = create_request(&api, Some(&hook_url));
                    let send = async {
                        let response = service.oneshot(request).await?;
                        response.into_body().collect().await?;
                        Ok::<_, BoxError>(())
                    };
                    if dice.below(4) == 0 {
                        let after = Duration::from_micros(dice.below(5_000));
                        if tokio::time::timeout(after, send).await.is_err() {
                            dropped += 1;
                        }
                    } else {
                        match send.await {
                            Ok(()) => made += 1,
                            Err(_) => refused += 1, // waited past max_wait: sent nothing
                        }
                    }
                }
                (made, dropped, refused)
            })
        })
        .collect();

    tokio::time::sleep(RUN).await;
    stop.send(true).unwrap();
    let mut totals = (0, 0, 0);
    for creating in creating {
        let (made, dropped, refused) = creating.await.unwrap();
        totals = (totals.0 + made, totals.1 + dropped, totals.2 + refused);
    }
    reconciling.await.unwrap();

    let stats = api.stats();
    println!(
        "{} jobs made by the server; creates read {}, dropped {}, refused {}",
        stats.created, totals.0, totals.1, totals.2
    );
    assert!(
        stats.created >= 30,
        "the fleet made progress: {}",
        stats.created
    );
    assert_eq!(
        stats.concurrency_limited, 0,
        "the server refused creates over the plan (seed {seed})"
    );
    assert!(
        stats.max_active_by_key[sync_mock::DEFAULT_KEY] <= 3,
        "the server saw {} active jobs on a plan of 3 (seed {seed})",
        stats.max_active_by_key[sync_mock::DEFAULT_KEY]
    );

    // Every job ends; then no slot is stuck anywhere, once a list says nothing is active.
    let started = Instant::now();
    while api.stats().active > 0 {
        assert!(started.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eventually(|| {
        reconciler.reconcile(Vec::<String>::new());
        creators
            .iter()
            .chain([&webhook, &reconciler])
            .all(|p| p.in_use() == 0)
    })
    .await;
    eventually_held(&url, &prefix, <[String]>::is_empty).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_waiting_for_its_redis_slot_lets_other_requests_through_a_limit_below() {
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let prefix = unique_prefix("readiness");
    let api = GatedApi::default();
    let create_url = api.start().await;
    api.gate.add_permits(10);
    let other_url = create_url.replace("/v2/generate", "/v2/other");
    let holder = store_plan(&url, &prefix, Plan::Hobbyist);
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let job = create_gated(&holder, &client, &create_url).await;

    // Another process, with one request at a time allowed below its plan layer (a Buffer
    // behaves the same): the caller keeps its service, as a hyper or tonic stack does.
    let store = RedisStore::builder(&url)
        .prefix(&prefix)
        .poll_interval(Duration::from_millis(50))
        .fail_mode(FailMode::Closed)
        .build()
        .unwrap();
    let plan = ConcurrencyLimitByPlan::builder(Plan::Hobbyist)
        .max_job_life(Duration::from_secs(60))
        .store(store)
        .build()
        .unwrap();
    let mut service = ServiceBuilder::new()
        .layer(plan.clone())
        .concurrency_limit(1)
        .service(client.clone());
    let waiting = service
        .ready()
        .await
        .unwrap()
        .call(gated_request(&create_url));
    let waiting = tokio::spawn(waiting);
    // The create waits for the plan's one slot, held by the other process; this request needs
    // no slot, and goes through meanwhile.
    let other = http::Request::get(&other_url)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(2), async {
        service.ready().await.unwrap().call(other).await
    })
    .await
    .expect("the waiting create held the only request allowed below")
    .unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    assert!(!waiting.is_finished());
    assert_eq!(api.arrived(), 1);

    // Its turn comes when the job ends elsewhere: it readies its own service, then is sent.
    holder.complete(&job);
    let created = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiting create is sent once the slot is free")
        .unwrap()
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    assert_eq!(api.arrived(), 2);
}

fn plan_with_life(url: &str, prefix: &str, life: Duration) -> ConcurrencyLimitByPlan {
    let store = RedisStore::builder(url)
        .prefix(prefix)
        .timeout(Duration::from_millis(50))
        .poll_interval(Duration::from_millis(50))
        .fail_mode(FailMode::Closed)
        .build()
        .unwrap();
    ConcurrencyLimitByPlan::builder(Plan::Creator)
        .max_job_life(life)
        .store(store)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_with_different_job_lives_share_one_plan() {
    // Before: the held set's expiry was set to the lease of whoever wrote last, so a process
    // with a one-minute job life cut a one-hour job's slot to a minute; and a reconcile judged
    // a hold's age by its own lease, so a process with a one-hour life freed a job bound by a
    // one-minute process after the list was requested.
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let prefix = unique_prefix("lives");
    let api = GatedApi::default();
    let create_url = api.start().await;
    api.gate.add_permits(10);
    let long = plan_with_life(&url, &prefix, Duration::from_secs(3_600));
    let short = plan_with_life(&url, &prefix, Duration::from_secs(60));
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let held_key = format!("{{{prefix}:slots}}:held");

    let first = create_gated(&long, &client, &create_url).await;
    eventually_held(&url, &prefix, |held| held.len() == 1).await;
    // A list requested now, before the short-lived process creates its job.
    let listed_at = tokio::time::Instant::now();
    let second = create_gated(&short, &client, &create_url).await;
    eventually_held(&url, &prefix, |held| held.len() == 2).await;
    let ttl: i64 = redis_query(&url, redis::cmd("PTTL").arg(&held_key)).await;
    assert!(ttl > 3_000_000, "the held set expires in {ttl} ms");

    // The list shows the first job only: the second, bound after it, is left alone.
    long.reconcile_as_of([first.as_str()], listed_at);
    // The store runs a process's changes in order: once this one is done, so is the reconcile.
    long.complete("marker");
    let done_key = format!("{{{prefix}:slots}}:done");
    let started = Instant::now();
    loop {
        let marker: Option<f64> =
            redis_query(&url, redis::cmd("ZSCORE").arg(&done_key).arg("marker")).await;
        if marker.is_some() {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut held = held_in_redis(&url, &prefix).await;
    held.sort();
    let mut expected = vec![format!("j:{first}"), format!("j:{second}")];
    expected.sort();
    assert_eq!(held, expected);
    assert_eq!(short.in_use(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_life_of_any_length_keeps_the_slots_working_and_expiring() {
    // Before: a lease of 10^20 microseconds or more was written `1e+20` to PEXPIRE, which
    // failed every call after the slot was added, leaving it without an expiry for ever.
    let Some((url, _server)) = shared_redis() else {
        return;
    };
    let prefix = unique_prefix("forever");
    let api = GatedApi::default();
    let create_url = api.start().await;
    api.gate.add_permits(10);
    let plan = plan_with_life(&url, &prefix, Duration::MAX);
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let job = create_gated(&plan, &client, &create_url).await;
    eventually_held(&url, &prefix, |held| held == [format!("j:{job}")]).await;
    let held_key = format!("{{{prefix}:slots}}:held");
    let ttl: i64 = redis_query(&url, redis::cmd("PTTL").arg(&held_key)).await;
    assert!(ttl > 0, "the held set has no expiry: {ttl}");
    assert!(plan.complete(&job));
    eventually_held(&url, &prefix, <[String]>::is_empty).await;
}
