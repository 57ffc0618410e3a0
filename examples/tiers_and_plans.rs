//! A job API that sells plans, and a client of it living within them.
//!
//! The server (axum, on 127.0.0.1) enforces, per API key, with this crate's server modes:
//! - per-tier quotas on `POST /v2/generate` (`RateLimitByRoute` with `tier_by`: Hobbyist 4
//!   creates per 2 s, Scale 20), the tier read from an extension its authentication
//!   middleware sets;
//! - per-plan job concurrency (`ConcurrencyLimitByPlan`'s server mode, `KeyedPlans`: Hobbyist
//!   1 job at once, Scale 5), each job's slot held from its create until the job ends (the
//!   job runner calls `complete(key, id)`), refused past the plan with Sync's JSON 429.
//!
//! Jobs take 400 ms. Each customer runs 8 jobs (create, then poll the status until it ends)
//! twice: bare (a plain hyper client retrying 429s after 100 ms), then through the client
//! modes of the same layers (`ConcurrencyLimitByPlan` over `RateLimitByRoute`, with the
//! customer's plan and quotas). Then the Hobbyist upgrades to Scale; its next requests get
//! Scale's quotas and plan. Runs in about 15 seconds:
//!
//! ```sh
//! cargo run --example tiers_and_plans
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Request, State};
use axum::http::{HeaderName, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_quota::concurrency::KeyedPlans;
use tower_quota::presets::sync::{self, PlanFullBody};
use tower_quota::rate_limit::UnknownTier;
use tower_quota::{BoxError, ConcurrencyLimitByPlan, Plan, Quota, RateLimitByRoute};

/// GCRA on both sides: the server counts exactly what the client paces.
const HOBBYIST: Quota = Quota::new(4, Duration::from_secs(2)).with_burst(4);
const SCALE: Quota = Quota::new(20, Duration::from_secs(2)).with_burst(20);
const OTHER: Quota = Quota::new(400, Duration::from_secs(2)).with_burst(400);
const JOB: Duration = Duration::from_millis(400);
const JOBS: usize = 8;

/// A customer's tier, as the server's records say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tier {
    Hobbyist,
    Scale,
}

impl Tier {
    fn name(self) -> &'static str {
        match self {
            Self::Hobbyist => "hobbyist",
            Self::Scale => "scale",
        }
    }

    fn plan(self) -> Plan {
        match self {
            Self::Hobbyist => Plan::Enterprise(1),
            Self::Scale => Plan::Enterprise(5),
        }
    }

    fn creates(self) -> Quota {
        match self {
            Self::Hobbyist => HOBBYIST,
            Self::Scale => SCALE,
        }
    }
}

/// The server's side: its customers and its jobs.
#[derive(Clone)]
struct Api {
    customers: Arc<Mutex<HashMap<String, Tier>>>,
    jobs: Arc<Mutex<HashMap<String, &'static str>>>,
    next: Arc<AtomicU64>,
    plans: KeyedPlans<PlanFullBody>,
}

/// Set by the authentication middleware for the layers and handlers below it.
#[derive(Clone, Copy)]
struct Customer(Tier);

async fn authenticate(State(api): State<Api>, mut request: Request, next: Next) -> Response {
    let key = request
        .headers()
        .get("x-api-key")
        .and_then(|v| v.to_str().ok());
    let tier = key.and_then(|key| api.customers.lock().unwrap().get(key).copied());
    let Some(tier) = tier else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    request.extensions_mut().insert(Customer(tier));
    next.run(request).await
}

async fn create(State(api): State<Api>, request: Request) -> Response {
    let key = request.headers()["x-api-key"]
        .to_str()
        .unwrap_or_default()
        .to_owned();
    let id = format!("gen_{}", api.next.fetch_add(1, Ordering::Relaxed));
    api.jobs.lock().unwrap().insert(id.clone(), "PENDING");
    // The job runner: the job ends after a while, and gives its plan slot back.
    let runner = api.clone();
    let job = id.clone();
    tokio::spawn(async move {
        tokio::time::sleep(JOB).await;
        runner.jobs.lock().unwrap().insert(job.clone(), "COMPLETED");
        runner.plans.complete(&key, &job);
    });
    let body = format!(r#"{{"id":"{id}","status":"PENDING"}}"#);
    (StatusCode::CREATED, body).into_response()
}

async fn status(State(api): State<Api>, Path(id): Path<String>) -> Response {
    match api.jobs.lock().unwrap().get(&id) {
        Some(status) => format!(r#"{{"id":"{id}","status":"{status}"}}"#).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn start_server() -> Result<(String, Api), BoxError> {
    let customers = HashMap::from([
        ("sk-hobby".to_owned(), Tier::Hobbyist),
        ("sk-scale".to_owned(), Tier::Scale),
    ]);
    let customers = Arc::new(Mutex::new(customers));
    let tier_of =
        |head: &tower_quota::RequestHead<'_>| head.extensions().get::<Customer>().map(|c| c.0);
    let quotas = RateLimitByRoute::builder()
        .route("POST /v2/generate", HOBBYIST)
        .default_quota(OTHER)
        .reject()
        .key_header(HeaderName::from_static("x-api-key"))
        .tier_by(
            move |head| tier_of(head).map(Tier::name),
            UnknownTier::Refuse,
        )
        .tier("hobbyist", [("POST /v2/generate", HOBBYIST)])
        .tier("scale", [("POST /v2/generate", SCALE)])
        .build()?;
    let plans = sync::plan_server(Plan::Enterprise(1))
        .plan_by(move |head| tier_of(head).map(Tier::plan))
        .build()?;
    let api = Api {
        customers,
        jobs: Arc::default(),
        next: Arc::default(),
        plans: plans.clone(),
    };
    let app = Router::new()
        .route("/v2/generate", post(create))
        .route("/v2/generate/{id}", get(status))
        .layer(plans)
        .layer(quotas)
        .layer(axum::middleware::from_fn_with_state(
            api.clone(),
            authenticate,
        ))
        .with_state(api.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((base, api))
}

/// What one run saw.
#[derive(Default)]
struct Run {
    done: usize,
    rate_429s: usize,
    plan_429s: usize,
}

/// Sends `method path` as `key`; its status and body.
async fn send<S, B>(
    svc: S,
    base: &str,
    key: &str,
    method: &str,
    path: &str,
) -> Result<(u16, serde_json::Value), BoxError>
where
    S: Service<http::Request<Empty<Bytes>>, Response = http::Response<B>> + Clone,
    S::Error: Into<BoxError>,
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    let request = http::Request::builder()
        .method(method)
        .uri(format!("{base}{path}"))
        .header("x-api-key", key)
        .body(Empty::new())?;
    let response = svc.oneshot(request).await.map_err(Into::into)?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(Into::into)?
        .to_bytes();
    Ok((status, serde_json::from_slice(&body).unwrap_or_default()))
}

/// `JOBS` jobs, each created (a 429 retried after 100 ms) and polled every 50 ms until done.
async fn run_jobs<S, B>(svc: S, base: &str, key: &str) -> Result<Run, BoxError>
where
    S: Service<http::Request<Empty<Bytes>>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let run = Arc::new(Mutex::new(Run::default()));
    let mut jobs = Vec::new();
    for _ in 0..JOBS {
        let (svc, base, key, run) = (svc.clone(), base.to_owned(), key.to_owned(), run.clone());
        jobs.push(tokio::spawn(async move {
            let id = loop {
                let (status, body) = send(svc.clone(), &base, &key, "POST", "/v2/generate").await?;
                match (status, body["errorCode"].as_str()) {
                    (201, _) => break body["id"].as_str().unwrap_or_default().to_owned(),
                    (429, Some("concurrency_limit_reached")) => run.lock().unwrap().plan_429s += 1,
                    (429, _) => run.lock().unwrap().rate_429s += 1,
                    (other, _) => return Err(format!("create answered {other}").into()),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            let path = format!("/v2/generate/{id}");
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let (_, body) = send(svc.clone(), &base, &key, "GET", &path).await?;
                if body["status"] == "COMPLETED" {
                    run.lock().unwrap().done += 1;
                    return Ok::<_, BoxError>(());
                }
            }
        }));
    }
    for job in jobs {
        job.await??;
    }
    let run = std::mem::take(&mut *run.lock().unwrap());
    Ok(run)
}

/// The client modes of the same layers, for a customer on `tier`.
fn layered(tier: Tier) -> Result<(RateLimitByRoute, ConcurrencyLimitByPlan), BoxError> {
    let quotas = RateLimitByRoute::builder()
        .route("POST /v2/generate", tier.creates())
        .default_quota(OTHER)
        .build()?;
    let plan = ConcurrencyLimitByPlan::builder(tier.plan()).build()?;
    Ok((quotas, plan))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let (base, api) = start_server().await?;
    println!("job API on {base}: Hobbyist {HOBBYIST} creates and 1 job at once, Scale {SCALE} and 5; jobs of {JOB:?}\n");
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();

    let mut rows = Vec::new();
    for (key, tier) in [("sk-hobby", Tier::Hobbyist), ("sk-scale", Tier::Scale)] {
        let start = Instant::now();
        let bare = run_jobs(client.clone(), &base, key).await?;
        rows.push((format!("{} bare", tier.name()), bare, start.elapsed()));
        // The server's windows clear before the layered run.
        tokio::time::sleep(Duration::from_secs(2)).await;

        let (quotas, plan) = layered(tier)?;
        let svc = ServiceBuilder::new()
            .layer(plan)
            .layer(quotas)
            .service(client.clone());
        let start = Instant::now();
        let layered_run = run_jobs(svc, &base, key).await?;
        rows.push((
            format!("{} layered", tier.name()),
            layered_run,
            start.elapsed(),
        ));
    }

    // The Hobbyist upgrades: the server's records change, and its next requests get Scale's
    // quotas and plan; the client's layers are changed on their live handles.
    tokio::time::sleep(Duration::from_secs(2)).await;
    api.customers
        .lock()
        .unwrap()
        .insert("sk-hobby".into(), Tier::Scale);
    let (quotas, plan) = layered(Tier::Hobbyist)?;
    quotas.set_quota("POST /v2/generate", SCALE)?;
    plan.set_plan(Tier::Scale.plan())?;
    let svc = ServiceBuilder::new()
        .layer(plan)
        .layer(quotas)
        .service(client.clone());
    let start = Instant::now();
    let upgraded = run_jobs(svc, &base, "sk-hobby").await?;
    rows.push(("hobbyist upgraded".into(), upgraded, start.elapsed()));

    println!("| customer, client      | jobs done | rate 429s | plan 429s | wall time |");
    println!("|-----------------------|-----------|-----------|-----------|-----------|");
    for (name, run, time) in &rows {
        println!(
            "| {name:<21} | {:>7}/{JOBS} | {:>9} | {:>9} | {:>8.2}s |",
            run.done,
            run.rate_429s,
            run.plan_429s,
            time.as_secs_f64()
        );
    }
    let server = api.plans.snapshot();
    println!(
        "\nserver: {} creates refused over a plan, {} jobs bound, {} slots held now",
        server.counters.refused.plan_full,
        server.counters.jobs_bound,
        api.plans.in_use("sk-hobby") + api.plans.in_use("sk-scale"),
    );
    println!(
        "What to look at: the bare client collects 429s of both kinds and retries; the layered \
         one paces its creates to its tier's quota and waits for its plan's slots, with no 429. \
         After the upgrade, the same customer runs five jobs at once."
    );
    Ok(())
}
