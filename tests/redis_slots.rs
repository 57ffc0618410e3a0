//! A plan's job slots shared across processes through Redis (feature `redis`), against the
//! local Sync API over real sockets.
//!
//! Redis keeps time with its own clock, which tokio's paused clock cannot move, so these
//! tests run in real time with jobs of half a second; nothing waits on a sleep to order
//! events.

#![cfg(feature = "redis")]

mod redis_server;

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
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_quota::concurrency::{ConcurrencyError, Job};
use tower_quota::store::{FailMode, RedisStore, StoreError};
use tower_quota::{ConcurrencyLimitByPlan, Plan};

use redis_server::{shared_redis, unique_prefix, RedisServer};

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
    // had ended with nobody watching) and reconciles.
    other.reconcile(Vec::<String>::new());
    eventually(|| creator.in_use() == 0).await;
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
