//! The reqwest middlewares, a reqwest client against an axum server over real sockets on
//! 127.0.0.1, on tokio's paused clock.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use futures::future::join_all;
use futures::StreamExt;
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_quota::backoff::{Retried, Schedule};
use tower_quota::concurrency::Job;
use tower_quota::middleware::{BackoffMiddleware, PlanMiddleware, RateLimitMiddleware};
use tower_quota::rate_limit::RateLimitError;
use tower_quota::{Backoff429, ConcurrencyLimitByPlan, Plan, Quota, RateLimitByRoute};

use crate::common::serve;

/// What the server saw: when each request came, and how many jobs it made.
#[derive(Clone, Default)]
struct Seen {
    at: Arc<Mutex<Vec<Instant>>>,
    jobs: Arc<Mutex<u32>>,
    refusals_left: Arc<Mutex<u32>>,
    unavailable_left: Arc<Mutex<u32>>,
}

async fn counted(State(seen): State<Seen>) -> impl IntoResponse {
    seen.at.lock().unwrap().push(Instant::now());
    "{}"
}

async fn create(State(seen): State<Seen>) -> impl IntoResponse {
    seen.at.lock().unwrap().push(Instant::now());
    let mut jobs = seen.jobs.lock().unwrap();
    *jobs += 1;
    format!(r#"{{"id":"gen_{jobs}","status":"PENDING"}}"#)
}

/// 429 with a `Retry-After` of 2 seconds and a body, as long as refusals are left.
async fn refusing(State(seen): State<Seen>) -> axum::response::Response {
    seen.at.lock().unwrap().push(Instant::now());
    let mut left = seen.refusals_left.lock().unwrap();
    if *left > 0 {
        *left -= 1;
        let body = r#"{"statusCode":429,"errorCode":"rate_limit_exceeded","message":"slow down"}"#;
        return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "2")], body).into_response();
    }
    "done".into_response()
}

/// A create answered 503 while `unavailable_left` lasts (the job's fate unknown to the
/// client), then made.
async fn flaky_create(State(seen): State<Seen>) -> axum::response::Response {
    {
        let mut left = seen.unavailable_left.lock().unwrap();
        if *left > 0 {
            *left -= 1;
            seen.at.lock().unwrap().push(Instant::now());
            return (StatusCode::SERVICE_UNAVAILABLE, "try again").into_response();
        }
    }
    create(State(seen)).await.into_response()
}

/// A 429 whose body sends one byte and then stalls.
async fn stalling_refusal() -> axum::response::Response {
    let stream = futures::stream::once(async { Ok::<_, std::io::Error>(bytes::Bytes::from("{")) })
        .chain(futures::stream::pending());
    let body = axum::body::Body::from_stream(stream);
    (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")], body).into_response()
}

async fn server(seen: &Seen) -> String {
    let app = Router::new()
        .route("/v2/models", get(counted))
        .route("/v2/generate", post(create))
        .route("/v2/refusing", post(refusing).get(refusing))
        .route("/v2/flaky", post(flaky_create))
        .route("/v2/stalling", get(stalling_refusal))
        .with_state(seen.clone());
    format!("http://{}", serve(app).await)
}

fn client(middleware: impl reqwest_middleware::Middleware) -> ClientWithMiddleware {
    ClientBuilder::new(reqwest::Client::new())
        .with(middleware)
        .build()
}

#[tokio::test(start_paused = true)]
async fn requests_through_the_middleware_and_the_layer_share_one_quota() {
    let seen = Seen::default();
    let origin = server(&seen).await;
    let limits = RateLimitByRoute::builder()
        .route("GET /v2/models", Quota::per_minute(5))
        .build()
        .unwrap();
    let client = client(RateLimitMiddleware::new(limits.clone()));

    // Eight through the middleware and four through the layer over a reqwest service, at once.
    let through_middleware = (0..8).map(|_| {
        let (client, url) = (client.clone(), format!("{origin}/v2/models"));
        async move { client.get(url).send().await.unwrap().status() }
    });
    let plain = reqwest::Client::new();
    let service = tower::service_fn(move |request: http::Request<reqwest::Body>| {
        let plain = plain.clone();
        async move {
            let request = reqwest::Request::try_from(request)?;
            Ok::<_, tower_quota::BoxError>(http::Response::from(plain.execute(request).await?))
        }
    });
    let service = ServiceBuilder::new().layer(limits.clone()).service(service);
    let through_layer = (0..4).map(|_| {
        let request = http::Request::get(format!("{origin}/v2/models"))
            .body(reqwest::Body::from(""))
            .unwrap();
        let service = service.clone();
        async move { service.oneshot(request).await.unwrap().status() }
    });
    let (a, b) = tokio::join!(join_all(through_middleware), join_all(through_layer));
    assert!(a.iter().chain(&b).all(|s| s.is_success()));

    // Never more than 5 in any minute, and all 12 in three windows.
    let at = seen.at.lock().unwrap().clone();
    assert_eq!(at.len(), 12);
    for (i, first) in at.iter().enumerate() {
        let in_window = at[i..]
            .iter()
            .filter(|t| t.duration_since(*first) < Duration::from_secs(60))
            .count();
        assert!(in_window <= 5, "{in_window} requests within a minute");
    }
    assert!(at[11].duration_since(at[0]) < Duration::from_secs(150));
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_is_the_layers_typed_error() {
    let seen = Seen::default();
    let origin = server(&seen).await;
    let limits = RateLimitByRoute::builder()
        .route("GET /v2/models", Quota::per_minute(1))
        .max_queue(0)
        .build()
        .unwrap();
    let client = client(RateLimitMiddleware::new(limits));
    let url = format!("{origin}/v2/models");
    client.get(&url).send().await.unwrap();
    let error = client.get(&url).send().await.unwrap_err();
    let reqwest_middleware::Error::Middleware(error) = error else {
        panic!("not the middleware's error: {error}");
    };
    assert!(
        matches!(
            error.downcast_ref::<RateLimitError>(),
            Some(RateLimitError::QueueFull { .. })
        ),
        "{error}"
    );
    assert_eq!(
        seen.at.lock().unwrap().len(),
        1,
        "the refused request was not sent"
    );
}

#[tokio::test(start_paused = true)]
async fn a_create_through_the_middleware_holds_its_slot_until_its_job_ends() {
    let seen = Seen::default();
    let origin = server(&seen).await;
    let plan = ConcurrencyLimitByPlan::new(Plan::Hobbyist);
    let client = client(PlanMiddleware::new(plan.clone()));
    let url = format!("{origin}/v2/generate");

    let response = client.post(&url).send().await.unwrap();
    let job = response.extensions().get::<Job>().cloned().unwrap();
    assert_eq!(response.url().as_str(), url, "the response keeps its URL");
    assert_eq!(
        response.text().await.unwrap(),
        r#"{"id":"gen_1","status":"PENDING"}"#
    );
    assert_eq!(job.id(), Some("gen_1"));

    // The second create waits for the slot, which a webhook's `complete` gives back.
    let second = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move { client.post(url).send().await.unwrap().text().await.unwrap() }
    });
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(!second.is_finished());
    assert_eq!(
        *seen.jobs.lock().unwrap(),
        1,
        "the second create was not sent"
    );
    assert!(plan.complete("gen_1"));
    assert_eq!(
        second.await.unwrap(),
        r#"{"id":"gen_2","status":"PENDING"}"#
    );
    assert_eq!(plan.jobs()[0].id, "gen_2");
}

fn backoff() -> Backoff429 {
    Backoff429::builder()
        .schedule(Schedule::new().max_retries(3))
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn refusals_are_retried_after_retry_after() {
    let seen = Seen::default();
    *seen.refusals_left.lock().unwrap() = 2;
    let origin = server(&seen).await;
    let client = client(BackoffMiddleware::new(backoff()));
    let start = Instant::now();
    let response = client
        .post(format!("{origin}/v2/refusing"))
        .body("again and again")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let retried = *response.extensions().get::<Retried>().unwrap();
    assert_eq!(retried.attempts, 3);
    assert_eq!(response.text().await.unwrap(), "done");
    assert!(start.elapsed() >= Duration::from_secs(4));
    assert_eq!(seen.at.lock().unwrap().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_refusal_handed_back_keeps_its_whole_body() {
    let seen = Seen::default();
    *seen.refusals_left.lock().unwrap() = 10;
    let origin = server(&seen).await;
    let backoff = backoff().max_retries(1).max_body(8);
    let client = client(BackoffMiddleware::new(backoff));
    let response = client
        .get(format!("{origin}/v2/refusing"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.extensions().get::<Retried>().unwrap().attempts, 2);
    assert_eq!(
        response.text().await.unwrap(),
        r#"{"statusCode":429,"errorCode":"rate_limit_exceeded","message":"slow down"}"#
    );
}

#[tokio::test(start_paused = true)]
async fn a_streaming_body_is_sent_once_and_its_refusal_handed_back() {
    let seen = Seen::default();
    *seen.refusals_left.lock().unwrap() = 1;
    let origin = server(&seen).await;
    let client = client(BackoffMiddleware::new(backoff()));
    let stream = http_body_util::StreamBody::new(futures::stream::iter([Ok::<_, std::io::Error>(
        http_body::Frame::data(bytes::Bytes::from_static(b"streamed")),
    )]));
    let response = client
        .post(format!("{origin}/v2/refusing"))
        .body(reqwest::Body::wrap(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert!(response.extensions().get::<Retried>().is_none());
    assert_eq!(seen.at.lock().unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_three_together_over_one_client() {
    let seen = Seen::default();
    *seen.refusals_left.lock().unwrap() = 1;
    let origin = server(&seen).await;
    let limits = RateLimitByRoute::builder()
        .default_quota(Quota::per_minute(600))
        .build()
        .unwrap();
    let plan = ConcurrencyLimitByPlan::new(Plan::Creator);
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(BackoffMiddleware::new(backoff()))
        .with(PlanMiddleware::new(plan.clone()))
        .with(RateLimitMiddleware::new(limits.clone()))
        .build();
    let response = client
        .post(format!("{origin}/v2/refusing"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.text().await.unwrap(), "done");
    let created = client
        .post(format!("{origin}/v2/generate"))
        .send()
        .await
        .unwrap();
    created.text().await.unwrap();
    assert_eq!(plan.jobs()[0].id, "gen_1");
    assert_eq!(limits.snapshot()[0].in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn a_create_sent_again_after_a_503_takes_over_its_own_slot() {
    let seen = Seen::default();
    *seen.unavailable_left.lock().unwrap() = 1;
    let origin = server(&seen).await;
    let plan = ConcurrencyLimitByPlan::builder(Plan::Hobbyist)
        .job_route("POST /v2/flaky")
        .build()
        .unwrap();
    let backoff = Backoff429::builder()
        .retry_transient()
        .idempotency_keys()
        .build()
        .unwrap();
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(BackoffMiddleware::new(backoff))
        .with(PlanMiddleware::new(plan.clone()))
        .build();
    let start = Instant::now();
    let response = client
        .post(format!("{origin}/v2/flaky"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.text().await.unwrap();
    // The 503 left the job's fate unknown and its slot held; the retry, carrying the same
    // idempotency key, is that create again and takes the slot over at once, rather than
    // wait an hour for its own first attempt's lease.
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(seen.at.lock().unwrap().len(), 2);
    let snapshot = plan.snapshot();
    assert_eq!((snapshot.in_use, snapshot.unknown), (1, 0), "{snapshot:?}");
    assert_eq!(plan.jobs()[0].id, "gen_1");
}

#[tokio::test(start_paused = true)]
async fn a_stalling_refusal_is_read_no_further_than_its_frame_bound() {
    let seen = Seen::default();
    let origin = server(&seen).await;
    let backoff = backoff()
        .max_retries(1)
        .max_read_frames(1)
        .max_read_time(Duration::from_secs(30));
    let client = client(BackoffMiddleware::new(backoff));
    let start = Instant::now();
    let response = client
        .get(format!("{origin}/v2/stalling"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.extensions().get::<Retried>().unwrap().attempts, 2);
    // One second of Retry-After, not two reads of thirty.
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}
