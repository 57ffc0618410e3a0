//! `ConcurrencyLimitByPlan`'s server mode (`KeyedPlans`) over real sockets on 127.0.0.1: a
//! hyper client against an axum job API that enforces each client's plan with the crate's
//! layer. Plans per key, completions, terminal statuses, failed and unknown creates, callers
//! that give up, upgrades at run time, and a flood of fresh keys.

#[path = "common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower_quota::concurrency::KeyedPlans;
use tower_quota::presets::sync::{self, PlanFullBody};
use tower_quota::{ConcurrencyLimitByPlan, ConfigError, Plan};

use common::serve;

/// The job API's own records: each job's status.
#[derive(Clone, Default)]
struct Api {
    jobs: Arc<Mutex<HashMap<String, &'static str>>>,
    next: Arc<AtomicU64>,
}

impl Api {
    fn finish(&self, id: &str) {
        self.jobs.lock().unwrap().insert(id.to_owned(), "COMPLETED");
    }
}

/// Creates a job, unless `x-answer` asks for another answer (`500`, `400`, `text`) or
/// `x-slow` for a ten-second wait first.
async fn create(State(api): State<Api>, headers: HeaderMap) -> axum::response::Response {
    if headers.contains_key("x-slow") {
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    match headers.get("x-answer").and_then(|v| v.to_str().ok()) {
        Some("500") => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        Some("400") => return (StatusCode::BAD_REQUEST, "bad input").into_response(),
        Some("text") => return (StatusCode::CREATED, "created, no JSON").into_response(),
        _ => {}
    }
    let id = format!("gen_{}", api.next.fetch_add(1, Ordering::Relaxed));
    api.jobs.lock().unwrap().insert(id.clone(), "PENDING");
    let body = format!(r#"{{"id":"{id}","status":"PENDING"}}"#);
    (StatusCode::CREATED, body).into_response()
}

async fn status(State(api): State<Api>, Path(id): Path<String>) -> axum::response::Response {
    match api.jobs.lock().unwrap().get(&id) {
        Some(status) => format!(r#"{{"id":"{id}","status":"{status}"}}"#).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

fn app(api: Api, jobs: KeyedPlans<PlanFullBody>) -> Router {
    Router::new()
        .route("/v2/generate", post(create))
        .route("/v2/generate/{id}", get(status))
        .with_state(api)
        .layer(jobs)
}

struct Caller {
    client: Client<HttpConnector, Empty<Bytes>>,
    addr: SocketAddr,
}

/// An answer: status and body.
struct Answer {
    status: u16,
    body: serde_json::Value,
    text: String,
}

impl Caller {
    fn new(addr: SocketAddr) -> Self {
        let client = Client::builder(TokioExecutor::new()).build_http();
        Self { client, addr }
    }

    async fn send(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = self
            .client
            .request(request.body(Empty::new()).unwrap())
            .await
            .unwrap();
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Answer { status, body, text }
    }

    async fn create(&self, key: &str) -> Answer {
        self.send("POST", "/v2/generate", &[("x-api-key", key)])
            .await
    }
}

fn id(answer: &Answer) -> String {
    answer.body["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_plan_of_three_refuses_the_fourth_create_until_a_job_is_completed() {
    let api = Api::default();
    let jobs = sync::plan_server(Plan::Creator).build().unwrap();
    let caller = Caller::new(serve(app(api, jobs.clone())).await);

    let mut ids = Vec::new();
    for _ in 0..3 {
        let answer = caller.create("sk-1").await;
        assert_eq!(answer.status, 201);
        ids.push(id(&answer));
    }
    assert_eq!(jobs.in_use("sk-1"), 3);
    let refused = caller.create("sk-1").await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.body["errorCode"], "concurrency_limit_reached");
    assert_eq!(refused.body["statusCode"], 429);
    // Another key has its own plan.
    assert_eq!(caller.create("sk-2").await.status, 201);

    // Completions that free nothing: an unknown id, another key's job.
    assert!(!jobs.complete("sk-1", "gen_999"));
    assert!(!jobs.complete("sk-2", &ids[0]));
    assert_eq!(caller.create("sk-1").await.status, 429);

    assert!(jobs.complete("sk-1", &ids[0]));
    assert!(!jobs.complete("sk-1", &ids[0]), "a job completes once");
    assert_eq!(jobs.in_use("sk-1"), 2);
    assert_eq!(caller.create("sk-1").await.status, 201);
    assert_eq!(caller.create("sk-1").await.status, 429);
    let counters = jobs.snapshot().counters;
    assert_eq!(counters.refused.plan_full, 3);
    assert_eq!(counters.jobs_bound, 5);
}

#[tokio::test]
async fn a_terminal_status_passing_through_frees_the_slot() {
    let api = Api::default();
    let jobs = sync::plan_server(Plan::Hobbyist).build().unwrap();
    let caller = Caller::new(serve(app(api.clone(), jobs.clone())).await);

    let job = id(&caller.create("sk-1").await);
    assert_eq!(caller.create("sk-1").await.status, 429);
    // Still active: the status passes and frees nothing.
    let path = format!("/v2/generate/{job}");
    let key = [("x-api-key", "sk-1")];
    assert_eq!(
        caller.send("GET", &path, &key).await.body["status"],
        "PENDING"
    );
    assert_eq!(jobs.in_use("sk-1"), 1);
    // Another key asking about it frees nothing either.
    api.finish(&job);
    caller.send("GET", &path, &[("x-api-key", "sk-2")]).await;
    assert_eq!(jobs.in_use("sk-1"), 1);
    // Its own client sees it end.
    assert_eq!(
        caller.send("GET", &path, &key).await.body["status"],
        "COMPLETED"
    );
    assert_eq!(jobs.in_use("sk-1"), 0);
    assert_eq!(caller.create("sk-1").await.status, 201);
    assert_eq!(jobs.snapshot().counters.freed.status, 1);
}

#[tokio::test]
async fn plans_per_key_and_an_upgrade_at_run_time() {
    let plans: Arc<Mutex<HashMap<String, Plan>>> = Arc::new(Mutex::new(HashMap::from([
        ("sk-hobby".to_owned(), Plan::Hobbyist),
        ("sk-growth".to_owned(), Plan::Growth),
    ])));
    let lookup = plans.clone();
    let jobs = sync::plan_server(Plan::Hobbyist)
        .plan_by(move |head| {
            let key = head.headers().get("x-api-key")?.to_str().ok()?;
            lookup.lock().unwrap().get(key).copied()
        })
        .build()
        .unwrap();
    let caller = Caller::new(serve(app(Api::default(), jobs.clone())).await);
    let creates = |key: &'static str, n: usize| {
        let caller = &caller;
        async move {
            let mut passed = 0;
            for _ in 0..n {
                passed += usize::from(caller.create(key).await.status == 201);
            }
            passed
        }
    };
    assert_eq!(creates("sk-hobby", 3).await, 1);
    assert_eq!(creates("sk-growth", 8).await, 6);
    assert_eq!(creates("sk-unlisted", 3).await, 1); // the builder's plan
                                                    // The upgrade takes effect on the next create.
    plans
        .lock()
        .unwrap()
        .insert("sk-hobby".into(), Plan::Creator);
    assert_eq!(creates("sk-hobby", 3).await, 2);
    jobs.set_default_plan(Plan::Enterprise(2)).unwrap();
    assert_eq!(creates("sk-unlisted", 3).await, 1);
    assert!(jobs.set_default_plan(Plan::Enterprise(0)).is_err());
}

#[tokio::test(start_paused = true)]
async fn failed_unknown_and_abandoned_creates() {
    let api = Api::default();
    let jobs = sync::plan_server(Plan::Creator).build().unwrap();
    let caller = Caller::new(serve(app(api, jobs.clone())).await);
    let with = |answer: &'static str| [("x-api-key", "sk-1"), ("x-answer", answer)];

    // A 4xx made nothing: given back at once.
    assert_eq!(
        caller
            .send("POST", "/v2/generate", &with("400"))
            .await
            .status,
        400
    );
    assert_eq!(jobs.in_use("sk-1"), 0);
    // A 5xx, and a success whose body is not JSON, may have made a job: held.
    assert_eq!(
        caller
            .send("POST", "/v2/generate", &with("500"))
            .await
            .status,
        500
    );
    let text = caller.send("POST", "/v2/generate", &with("text")).await;
    assert_eq!(text.text, "created, no JSON");
    assert_eq!(jobs.in_use("sk-1"), 2);
    // The application's own records say what runs: nothing.
    jobs.reconcile("sk-1", Vec::<String>::new());
    assert_eq!(jobs.in_use("sk-1"), 0);

    // A caller that gives up before the answer: the job may exist, so the slot is held
    // until its lease (the maximum job life, an hour), then comes back.
    let slow = [("x-api-key", "sk-1"), ("x-slow", "1")];
    let gave_up = tokio::time::timeout(
        Duration::from_secs(1),
        caller.send("POST", "/v2/generate", &slow),
    )
    .await;
    assert!(gave_up.is_err());
    // The server notices the closed connection and drops the handler's future.
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(jobs.in_use("sk-1"), 1);
    tokio::time::advance(Duration::from_secs(3_601)).await;
    assert_eq!(jobs.in_use("sk-1"), 0);
}

#[tokio::test]
async fn a_flood_of_fresh_keys_stays_bounded_and_locks_nobody_out() {
    let api = Api::default();
    let jobs = sync::plan_server(Plan::Hobbyist)
        .max_keys(64)
        .build()
        .unwrap();
    let caller = Caller::new(serve(app(api, jobs.clone())).await);
    let held = id(&caller.create("sk-victim").await);
    for i in 0..2_000 {
        // Each fresh key takes its plan's one slot and keeps it.
        let key = format!("sk-flood-{i}");
        assert_eq!(caller.create(&key).await.status, 201, "{key}");
    }
    let snapshot = jobs.snapshot();
    assert!(snapshot.tracked_keys <= 64, "{}", snapshot.tracked_keys);
    assert!(
        snapshot.keys_forgotten >= 1_900,
        "{}",
        snapshot.keys_forgotten
    );
    // The latest client, still tracked, stays at its plan; a newcomer is admitted at once.
    assert_eq!(caller.create("sk-flood-1999").await.status, 429);
    assert_eq!(caller.create("sk-new").await.status, 201);
    // The first client was forgotten to make room (the documented price): its job no
    // longer counts, and completing it frees nothing.
    assert_eq!(jobs.in_use("sk-victim"), 0);
    assert!(!jobs.complete("sk-victim", &held));
}

#[test]
fn bad_server_settings_are_typed_errors() {
    let error = ConcurrencyLimitByPlan::builder(Plan::Creator)
        .jobs_per_create(|_| 2)
        .reject()
        .build()
        .unwrap_err();
    assert!(
        matches!(error, ConfigError::InvalidSetting { name: "reject", .. }),
        "{error}"
    );
    let error = ConcurrencyLimitByPlan::builder(Plan::Creator)
        .in_flight()
        .reject()
        .build()
        .unwrap_err();
    assert!(
        matches!(error, ConfigError::InvalidSetting { .. }),
        "{error}"
    );
    let error = ConcurrencyLimitByPlan::builder(Plan::Enterprise(0))
        .reject()
        .build()
        .unwrap_err();
    assert!(
        matches!(error, ConfigError::InvalidSetting { name: "plan", .. }),
        "{error}"
    );
    let error = sync::plan_server(Plan::Creator)
        .max_keys(0)
        .build()
        .unwrap_err();
    assert!(
        matches!(
            error,
            ConfigError::InvalidSetting {
                name: "max_keys",
                ..
            }
        ),
        "{error}"
    );
    let error = ConcurrencyLimitByPlan::custom(3)
        .job_route("POST /v1/jobs")
        .active_statuses(["running"])
        .status_route("GET /v1/jobs")
        .reject()
        .build()
        .unwrap_err();
    assert!(matches!(error, ConfigError::InvalidRoute { .. }), "{error}");
}

/// A fleet of two servers sharing each client's plan through one Redis.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_servers_shares_each_clients_plan_through_redis() {
    use tower_quota::store::{FailMode, RedisStore};

    let Some((url, _server)) = common::redis::shared_redis() else {
        return;
    };
    let prefix = common::redis::unique_prefix("keyed-plans");
    let server = |api: Api| {
        let store = RedisStore::builder(url.as_str())
            .prefix(prefix.as_str())
            .timeout(STORE_TIMEOUT)
            .fail_mode(FailMode::Closed)
            .build()
            .unwrap();
        let jobs = sync::plan_server(Plan::Creator)
            .store(store)
            .build()
            .unwrap();
        (app(api, jobs.clone()), jobs)
    };
    // Both servers front one job API (its records shared), each with its own layer.
    let api = Api::default();
    let (app_a, jobs_a) = server(api.clone());
    let (app_b, jobs_b) = server(api.clone());
    let a = Caller::new(serve(app_a).await);
    let b = Caller::new(serve(app_b).await);

    let first = id(&a.create("sk-1").await);
    let second = id(&b.create("sk-1").await);
    assert_eq!(a.create("sk-1").await.status, 201);
    for caller in [&a, &b] {
        let refused = caller.create("sk-1").await;
        assert_eq!(refused.status, 429);
        assert_eq!(refused.body["errorCode"], "concurrency_limit_reached");
    }
    assert_eq!(jobs_a.in_use_shared("sk-1").await.unwrap(), 3);
    assert_eq!(
        b.create("sk-2").await.status,
        201,
        "another client's own plan"
    );

    // A job made through A, completed through B's handle, for the fleet.
    assert!(
        !jobs_b.complete_shared("sk-2", &first).await.unwrap(),
        "not sk-2's"
    );
    assert!(jobs_b.complete_shared("sk-1", &first).await.unwrap());
    assert!(
        !jobs_b.complete_shared("sk-1", &first).await.unwrap(),
        "once"
    );
    assert_eq!(a.create("sk-1").await.status, 201);
    assert_eq!(b.create("sk-1").await.status, 429);

    // A job made through B, seen to end through A.
    api.finish(&second);
    let path = format!("/v2/generate/{second}");
    let status = a.send("GET", &path, &[("x-api-key", "sk-1")]).await;
    assert_eq!(status.body["status"], "COMPLETED");
    let store_settled = async {
        while jobs_a.in_use_shared("sk-1").await.unwrap() != 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), store_settled)
        .await
        .expect("the status's end reaches the store");
    assert_eq!(b.create("sk-1").await.status, 201);

    // A 4xx gives its slot back for the fleet; a 5xx holds it.
    let fail = |answer| [("x-api-key", "sk-3"), ("x-answer", answer)];
    assert_eq!(
        a.send("POST", "/v2/generate", &fail("400")).await.status,
        400
    );
    assert_eq!(
        a.send("POST", "/v2/generate", &fail("500")).await.status,
        500
    );
    let settled = async {
        while jobs_b.in_use_shared("sk-3").await.unwrap() != 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), settled)
        .await
        .expect("the answers reach the store");
    // A list is judged on Redis's clock with the store's timeout as margin: what was taken
    // within it is left to a later reconcile (a create racing the list is never freed).
    tokio::time::sleep(STORE_TIMEOUT + Duration::from_millis(50)).await;
    jobs_b.reconcile("sk-3", Vec::<String>::new());
    let reconciled = async {
        while jobs_a.in_use_shared("sk-3").await.unwrap() != 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), reconciled)
        .await
        .expect("the reconcile reaches the store");
}

/// The store's timeout in the fleet test.
#[cfg(feature = "redis")]
const STORE_TIMEOUT: Duration = Duration::from_millis(500);

/// A Hobbyist plan server counted in the Redis at `url`, under a fresh prefix, failing closed.
#[cfg(feature = "redis")]
fn hobbyist_plans_in(
    url: &str,
    what: &str,
) -> (
    tower_quota::store::RedisStore,
    tower_quota::concurrency::KeyedPlans<sync::PlanFullBody>,
) {
    let store = tower_quota::store::RedisStore::builder(url)
        .prefix(common::redis::unique_prefix(what).as_str())
        .timeout(STORE_TIMEOUT)
        .fail_mode(tower_quota::store::FailMode::Closed)
        .build()
        .unwrap();
    let jobs = sync::plan_server(Plan::Hobbyist)
        .store(store.clone())
        .build()
        .unwrap();
    (store, jobs)
}

#[test]
fn the_server_mode_service_future_and_body_are_send_and_sync() {
    use tower_quota::concurrency::{KeyedPlanBody, KeyedPlanFuture, KeyedPlansService};
    type Inner = tower::util::BoxCloneSyncService<
        http::Request<axum::body::Body>,
        http::Response<axum::body::Body>,
        std::convert::Infallible,
    >;
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<KeyedPlans<PlanFullBody>>();
    send_sync::<KeyedPlansService<Inner, PlanFullBody>>();
    send::<KeyedPlanFuture<Inner, axum::body::Body, PlanFullBody>>();
    send::<KeyedPlanBody<axum::body::Body>>();
    send_sync::<KeyedPlanBody<http_body_util::Full<Bytes>>>();
}

// ---------------------------------------------------------------------------------------
// Found by an outside review: each failed before its fix.
// ---------------------------------------------------------------------------------------

/// The application reconciles from its own records, read a moment before the call (a DB
/// query): a job bound in between is not in the list. `reconcile_as_of` with the time the
/// list was read leaves it alone (before, server mode had only `reconcile`, which freed it).
#[tokio::test]
async fn a_reconcile_as_of_a_list_read_before_a_create_leaves_its_job_alone() {
    let api = Api::default();
    let jobs = sync::plan_server(Plan::Hobbyist).build().unwrap();
    let caller = Caller::new(serve(app(api.clone(), jobs.clone())).await);

    // The job runner reads the client's active jobs: none yet.
    let listed_at = tokio::time::Instant::now();
    let listed: Vec<String> = api
        .jobs
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, s)| **s == "PENDING")
        .map(|(id, _)| id.clone())
        .collect();
    // Meanwhile the client creates its one job.
    let job = id(&caller.create("sk-1").await);
    assert_eq!(jobs.in_use("sk-1"), 1);
    // The (now stale) list arrives.
    jobs.reconcile_as_of("sk-1", listed, listed_at);
    assert_eq!(
        api.jobs.lock().unwrap()[&job],
        "PENDING",
        "the job still runs"
    );
    assert_eq!(
        caller.create("sk-1").await.status,
        429,
        "a Hobbyist runs two jobs at once: the reconcile freed a job created after its list"
    );
    // A list read now, without the job (it ended), frees it.
    api.finish(&job);
    jobs.reconcile("sk-1", Vec::<String>::new());
    assert_eq!(jobs.in_use("sk-1"), 0);
}

/// A create the application answers `303 See Other` (the job made, its status URL in
/// `Location`: a common answer of asynchronous job APIs) is read as a failure and its slot
/// given back, so the client runs past its plan.
#[tokio::test]
async fn a_create_answered_with_a_redirect_is_not_given_back() {
    let jobs = sync::plan_server(Plan::Hobbyist).build().unwrap();
    let next = Arc::new(AtomicU64::new(0));
    let app = Router::new()
        .route(
            "/v2/generate",
            post(move || {
                let next = next.clone();
                async move {
                    let id = format!("gen_{}", next.fetch_add(1, Ordering::Relaxed));
                    (
                        StatusCode::SEE_OTHER,
                        [("location", format!("/v2/generate/{id}"))],
                        format!(r#"{{"id":"{id}","status":"PENDING"}}"#),
                    )
                }
            }),
        )
        .layer(jobs.clone());
    let caller = Caller::new(serve(app).await);
    assert_eq!(caller.create("sk-1").await.status, 303);
    assert_eq!(
        jobs.in_use("sk-1"),
        1,
        "the job exists (its id is in the answer): its slot must stay held"
    );
    assert_eq!(caller.create("sk-1").await.status, 429);
}

/// With a store failing closed, a create whose `take` reaches Redis after the store's
/// timeout is refused (429 store_unavailable) while Redis holds its slot anyway, as a
/// create in flight, until the maximum job life: a Hobbyist is locked out for an hour by
/// one slow round trip. (FailMode::Open leaks the same way: the create is counted locally
/// and the store's `c:` member is never given back.)
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_that_times_out_leaves_no_slot_in_redis() {
    use tower_quota::store::{FailMode, RedisStore};

    let Some(server) = common::redis::RedisServer::start() else {
        return;
    };
    let url = server.url();
    let port = url
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .to_owned();
    let store = RedisStore::builder(url.as_str())
        .prefix(common::redis::unique_prefix("plan-take-timeout").as_str())
        .timeout(Duration::from_millis(200))
        .fail_mode(FailMode::Closed)
        .build()
        .unwrap();
    let jobs = sync::plan_server(Plan::Hobbyist)
        .store(store.clone())
        .build()
        .unwrap();
    let caller = Caller::new(serve(app(Api::default(), jobs.clone())).await);
    // Warm the connection and the script cache.
    assert_eq!(jobs.in_use_shared("sk-1").await.unwrap(), 0);

    // Redis stalls for 600 ms (a failover, a slow command, a GC pause of a proxy).
    let paused = std::process::Command::new("redis-cli")
        .args(["-p", &port, "CLIENT", "PAUSE", "600", "ALL"])
        .output()
        .unwrap();
    assert!(paused.status.success(), "{paused:?}");
    let refused = caller.create("sk-1").await;
    assert_eq!(
        refused.status, 429,
        "refused: the store is away (fails closed)"
    );

    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        jobs.in_use_shared("sk-1").await.unwrap(),
        0,
        "a refused create must hold nothing in the store"
    );
    assert_eq!(caller.create("sk-1").await.status, 201);
}

/// With a store, every answer of a status route for a job not held locally (any id, any
/// key, no key at all) queues an `end` in the store's one ordered background queue, 4,096
/// deep and drained one round trip at a time; past it, changes are dropped. A flood of
/// status requests for made-up ids (404s) thus drops other clients' completions, binds and
/// give-backs: a completed job keeps its slot for the fleet until its lease (an hour).
#[cfg(feature = "redis")]
#[tokio::test]
async fn a_flood_of_status_404s_drops_no_other_clients_completion() {
    use tower::ServiceExt;

    let Some((url, _server)) = common::redis::shared_redis() else {
        return;
    };
    let (store, jobs) = hobbyist_plans_in(&url, "plan-flood");
    let api = Api::default();
    let router = app(api.clone(), jobs.clone());
    let caller = Caller::new(serve(router.clone()).await);

    let job = id(&caller.create("sk-victim").await);
    store.flush().await;
    assert_eq!(jobs.in_use_shared("sk-victim").await.unwrap(), 1);

    // Anyone, without a key: status requests for ids that never existed.
    for i in 0..20_000 {
        let request = http::Request::get(format!("/v2/generate/nope-{i}"))
            .body(axum::body::Body::empty())
            .unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), 404);
    }
    // The victim's job ends; the application says so.
    api.finish(&job);
    jobs.complete("sk-victim", &job);
    store.flush().await;
    assert_eq!(
        jobs.in_use_shared("sk-victim").await.unwrap(),
        0,
        "the completion was dropped from the full background queue"
    );
}

/// The same flood over real sockets, on a two-thread runtime: 16 connections asking for
/// made-up ids, while the victim's job is completed in the middle of it.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_status_404s_over_sockets_drops_no_completion() {
    let Some((url, _server)) = common::redis::shared_redis() else {
        return;
    };
    // Redis a millisecond away (another availability zone): a proxy delays its answers.
    let target = url
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let url = slow_proxy(target, Duration::from_millis(1)).await;
    let (store, jobs) = hobbyist_plans_in(&url, "plan-flood-sockets");
    let api = Api::default();
    let addr = serve(app(api.clone(), jobs.clone())).await;
    let caller = Caller::new(addr);
    let job = id(&caller.create("sk-victim").await);
    store.flush().await;

    let started = std::time::Instant::now();
    let mut flood = Vec::new();
    for t in 0..16 {
        flood.push(tokio::spawn(async move {
            let caller = Caller::new(addr);
            for i in 0..1_500 {
                let path = format!("/v2/generate/nope-{t}-{i}");
                assert_eq!(caller.send("GET", &path, &[]).await.status, 404);
            }
        }));
    }
    for task in flood {
        task.await.unwrap();
    }
    let sent = started.elapsed();
    // The victim's job ends as the flood does.
    api.finish(&job);
    jobs.complete("sk-victim", &job);
    store.flush().await;
    eprintln!(
        "24,000 status 404s sent in {sent:?}; the store's queue drained {:?} later",
        started.elapsed() - sent
    );
    assert_eq!(
        jobs.in_use_shared("sk-victim").await.unwrap(),
        0,
        "the completion was dropped from the full background queue"
    );
}

/// A TCP proxy to `target` that delays each chunk of its answers by `delay`: a Redis that
/// far away. Its URL.
#[cfg(feature = "redis")]
async fn slow_proxy(target: String, delay: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                let outbound = tokio::net::TcpStream::connect(target).await.unwrap();
                let (mut from_client, mut to_client) = inbound.into_split();
                let (mut from_redis, mut to_redis) = outbound.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from_client, &mut to_redis).await;
                });
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match from_redis.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    tokio::time::sleep(delay).await;
                    if to_client.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    format!("redis://{addr}/")
}

/// The application makes the job, then its answer is lost (the caller's timeout, a dropped
/// connection): the slot is held as an unknown outcome. `complete(key, id)` of the job frees
/// nothing: the layer never saw the id, and an id it does not hold cannot be told from one
/// completed twice (which must free nothing). The application's list frees it: `reconcile`.
#[tokio::test]
async fn the_slot_of_a_lost_answer_is_freed_by_the_applications_list() {
    let api = Api::default();
    let jobs = sync::plan_server(Plan::Hobbyist).build().unwrap();
    let made = api.clone();
    let app = Router::new()
        .route(
            "/v2/generate",
            post(move || {
                let api = made.clone();
                async move {
                    let id = format!("gen_{}", api.next.fetch_add(1, Ordering::Relaxed));
                    api.jobs.lock().unwrap().insert(id.clone(), "PENDING");
                    // Made; the answer takes a while (an upload, a slow write).
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    (
                        StatusCode::CREATED,
                        format!(r#"{{"id":"{id}","status":"PENDING"}}"#),
                    )
                }
            }),
        )
        .layer(jobs.clone());
    let caller = Caller::new(serve(app).await);
    let gave_up = tokio::time::timeout(Duration::from_millis(300), caller.create("sk-1")).await;
    assert!(gave_up.is_err());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(jobs.in_use("sk-1"), 1);

    // The job runs, and ends; the application says so, naming it.
    let job = api.jobs.lock().unwrap().keys().next().unwrap().clone();
    api.finish(&job);
    assert!(!jobs.complete("sk-1", &job));
    assert_eq!(jobs.in_use("sk-1"), 1);
    jobs.reconcile("sk-1", Vec::<String>::new());
    assert_eq!(jobs.in_use("sk-1"), 0, "the client's only job is over");
}

/// A service instance that refused a create (429) gives back what its caller reserved below
/// it: another instance gets the `ConcurrencyLimit` permit while the refusing one idles (a
/// keep-alive connection's service). Before, the idle instance kept the permit (an outside
/// attack found it).
#[tokio::test(start_paused = true)]
async fn a_refused_create_gives_back_the_permit_reserved_below() {
    use tower::{Service, ServiceBuilder, ServiceExt};

    let jobs = sync::plan_server(Plan::Hobbyist).build().unwrap();
    let made = Arc::new(AtomicU64::new(0));
    let api = tower::service_fn(move |_: http::Request<axum::body::Body>| {
        let n = made.fetch_add(1, Ordering::SeqCst);
        async move {
            let body = format!(r#"{{"id":"gen_{n}","status":"PENDING"}}"#);
            Ok::<_, std::convert::Infallible>(http::Response::new(axum::body::Body::from(body)))
        }
    });
    let service = ServiceBuilder::new()
        .layer(jobs.clone())
        .concurrency_limit(1)
        .service(api);
    let create = || {
        http::Request::post("/v2/generate")
            .header("x-api-key", "sk-1")
            .body(axum::body::Body::empty())
            .unwrap()
    };
    let answer = service.clone().oneshot(create()).await.unwrap();
    answer.into_body().collect().await.unwrap();
    assert_eq!(jobs.in_use("sk-1"), 1);

    let mut idle = service.clone();
    let refused = idle.ready().await.unwrap().call(create()).await.unwrap();
    assert_eq!(refused.status(), 429);
    let mut other = service.clone();
    let ready = tokio::time::timeout(Duration::from_secs(30), other.ready()).await;
    assert!(ready.is_ok(), "the refusing instance kept the permit");
    drop(idle);
}
