//! The handles of the three layers, on tokio's paused clock, mixed with requests through the
//! layers themselves.

use std::convert::Infallible;
use std::time::Duration;

use http::{HeaderMap, Method, Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_quota::backoff::{BackoffError, Decision};
use tower_quota::concurrency::{ConcurrencyError, Job};
use tower_quota::rate_limit::RateLimitError;
use tower_quota::{Backoff429, ConcurrencyLimitByPlan, Plan, Quota, RateLimitByRoute};

fn head(status: u16, headers: &[(&str, &str)]) -> http::response::Parts {
    let mut response = Response::builder().status(status);
    for (name, value) in headers {
        response = response.header(*name, *value);
    }
    response.body(()).unwrap().into_parts().0
}

#[tokio::test(start_paused = true)]
async fn a_permit_and_a_request_through_the_layer_count_against_one_quota() {
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(2))
        .build()
        .unwrap();
    let api = service_fn(|_: Request<()>| async { Ok::<_, Infallible>(Response::new(())) });
    let mut svc = ServiceBuilder::new().layer(limits.clone()).service(api);

    let permit = limits.acquire(&Method::POST, "/v2/generate").await.unwrap();
    permit.finish(&head(200, &[])).await;
    let request = Request::post("/v2/generate").body(()).unwrap();
    svc.ready().await.unwrap().call(request).await.unwrap();
    assert_eq!(limits.snapshot()[0].remaining, 0);

    // The third waits for the window, whichever way it comes.
    let start = Instant::now();
    let permit = limits.acquire(&Method::POST, "/v2/generate").await.unwrap();
    assert!(
        start.elapsed() >= Duration::from_secs(60),
        "{:?}",
        start.elapsed()
    );
    permit.finish(&head(200, &[])).await;

    // A route without a quota, and a query in the path, pass at once.
    let start = Instant::now();
    let permit = limits
        .acquire(&Method::GET, "/v2/models?x=1")
        .await
        .unwrap();
    permit.finish(&head(200, &[])).await;
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_refusal_reported_to_a_permit_closes_the_route_for_the_layer_too() {
    let limits = RateLimitByRoute::builder()
        .route("GET /v2/generations", Quota::per_minute(600))
        .build()
        .unwrap();
    let permit = limits
        .acquire(&Method::GET, "/v2/generations")
        .await
        .unwrap();
    permit.finish(&head(429, &[("retry-after", "30")])).await;

    let api = service_fn(|_: Request<()>| async { Ok::<_, Infallible>(Response::new(())) });
    let svc = ServiceBuilder::new().layer(limits.clone()).service(api);
    let start = Instant::now();
    let request = Request::get("/v2/generations").body(()).unwrap();
    svc.oneshot(request).await.unwrap();
    assert!(
        start.elapsed() >= Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn a_permit_dropped_unfinished_is_held_as_abandoned() {
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(60))
        .abandoned_hold(Duration::from_secs(5))
        .build()
        .unwrap();
    let permit = limits.acquire(&Method::POST, "/v2/generate").await.unwrap();
    drop(permit);
    let route = &limits.snapshot()[0];
    assert_eq!((route.in_flight, route.abandoned), (1, 1));
    tokio::time::sleep(Duration::from_secs(6)).await;
    let route = &limits.snapshot()[0];
    assert_eq!((route.in_flight, route.abandoned), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn acquire_returns_the_layers_own_errors() {
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(1))
        .max_wait(Duration::from_secs(10))
        .build()
        .unwrap();
    let permit = limits.acquire(&Method::POST, "/v2/generate").await.unwrap();
    permit.finish(&head(200, &[])).await;
    let error = limits
        .acquire(&Method::POST, "/v2/generate")
        .await
        .unwrap_err();
    assert!(
        matches!(
            error.downcast_ref::<RateLimitError>(),
            Some(RateLimitError::WaitTooLong { .. })
        ),
        "{error}"
    );
    // A path with bytes `http::Uri` refuses counts as its client sends it, percent-encoded.
    let permit = limits.acquire(&Method::GET, "/v2/a|b c^é").await.unwrap();
    permit.finish(&head(200, &[])).await;
    // Not a request target: an error that says so, no panic.
    let error = limits.acquire(&Method::GET, "no path").await.unwrap_err();
    assert!(
        error.to_string().contains("not a request target"),
        "{error}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_dropped_acquire_leaves_the_queue() {
    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(1))
        .build()
        .unwrap();
    let permit = limits.acquire(&Method::POST, "/v2/generate").await.unwrap();
    permit.finish(&head(200, &[])).await;
    let waiting = tokio::time::timeout(
        Duration::from_secs(1),
        limits.acquire(&Method::POST, "/v2/generate"),
    )
    .await;
    assert!(waiting.is_err(), "the second waits for the window");
    assert_eq!(limits.snapshot()[0].waiters, 0);
}

fn created(id: &str) -> Response<Full<bytes::Bytes>> {
    let body = format!(r#"{{"id":"{id}","status":"PENDING"}}"#);
    Response::new(Full::new(bytes::Bytes::from(body)))
}

#[tokio::test(start_paused = true)]
async fn a_plan_permit_binds_its_job_and_shares_the_slots_with_the_layer() {
    let plan = ConcurrencyLimitByPlan::new(Plan::Hobbyist);
    let permit = plan.acquire(&Method::POST, "/v2/generate").await.unwrap();
    let response = permit.finish(created("gen_1")).await.unwrap();
    let job = response.extensions().get::<Job>().cloned().unwrap();
    response.into_body().collect().await.unwrap();
    assert_eq!(job.id(), Some("gen_1"));
    assert_eq!(plan.in_use(), 1);

    // A create through the layer waits for the slot the permit's job holds.
    let api = service_fn(|_: Request<()>| async { Ok::<_, Infallible>(created("gen_2")) });
    let svc = ServiceBuilder::new().layer(plan.clone()).service(api);
    let request = Request::post("/v2/generate").body(()).unwrap();
    let through_layer = tokio::spawn(svc.oneshot(request));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!through_layer.is_finished());
    assert_eq!(plan.queue_len(), 1);

    // A status response through a permit that shows the job ended frees the slot.
    let permit = plan
        .acquire(&Method::GET, "/v2/generate/gen_1")
        .await
        .unwrap();
    let status = Response::new(Full::new(bytes::Bytes::from_static(
        br#"{"id":"gen_1","status":"COMPLETED"}"#,
    )));
    let response = permit.finish(status).await.unwrap();
    response.into_body().collect().await.unwrap();
    let response = through_layer.await.unwrap().unwrap();
    response.into_body().collect().await.unwrap();
    assert_eq!(plan.jobs()[0].id, "gen_2");
}

#[tokio::test(start_paused = true)]
async fn a_plan_permit_dropped_after_a_create_keeps_its_slot() {
    let plan = ConcurrencyLimitByPlan::builder(Plan::Hobbyist)
        .max_queue(0)
        .build()
        .unwrap();
    let permit = plan
        .acquire::<Full<bytes::Bytes>>(&Method::POST, "/v2/generate")
        .await
        .unwrap();
    drop(permit); // the server may have created the job
    assert_eq!(plan.in_use(), 1);
    let error = plan
        .acquire::<Full<bytes::Bytes>>(&Method::POST, "/v2/generate")
        .await
        .unwrap_err();
    assert!(
        matches!(
            error.downcast_ref::<ConcurrencyError>(),
            Some(ConcurrencyError::QueueFull { .. })
        ),
        "{error}"
    );
}

#[tokio::test(start_paused = true)]
async fn retries_follow_the_layers_rules() {
    let backoff = Backoff429::builder()
        .max_retries(2)
        .base_delay(Duration::from_secs(1))
        .build()
        .unwrap();
    let mut headers = HeaderMap::new();
    let mut retries = backoff.retries(&Method::POST, &mut headers).unwrap();
    assert!(!retries.may_retry(&head(200, &[])));
    assert!(
        !retries.may_retry(&head(503, &[])),
        "transient failures are not retried"
    );
    // The server's word first, then the schedule, then no retries left.
    let refusal = head(429, &[("retry-after", "7")]);
    assert_eq!(
        retries.decide(&refusal, b""),
        Decision::Retry(Duration::from_secs(7))
    );
    assert!(matches!(
        retries.decide(&head(429, &[]), b""),
        Decision::Retry(_)
    ));
    assert_eq!(retries.decide(&head(429, &[]), b""), Decision::HandBack);
    assert_eq!(retries.retried().unwrap().attempts, 3);

    let strict = backoff.clone().max_retries(0).error_on_exhaustion();
    let mut retries = strict.retries(&Method::GET, &mut headers).unwrap();
    assert!(matches!(
        retries.decide(&head(429, &[]), b""),
        Decision::Fail(BackoffError::Exhausted { attempts: 1, .. })
    ));

    // A setting that makes no sense is an error, not a panic.
    let invalid = Backoff429::new().factor(0.5);
    assert!(matches!(
        invalid.retries(&Method::GET, &mut headers),
        Err(BackoffError::Config(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn retries_after_transport_errors_only_when_the_request_may_be_sent_again() {
    let backoff = Backoff429::builder()
        .retry_transient()
        .idempotency_keys()
        .build()
        .unwrap();
    let mut headers = HeaderMap::new();
    let mut retries = backoff.retries(&Method::POST, &mut headers).unwrap();
    assert!(headers.contains_key("idempotency-key"), "a key is added");
    assert!(matches!(retries.decide_error(), Decision::Retry(_)));
    assert!(retries.may_retry(&head(503, &[])));

    let without_keys = Backoff429::builder().retry_transient().build().unwrap();
    let mut headers = HeaderMap::new();
    let mut retries = without_keys.retries(&Method::POST, &mut headers).unwrap();
    assert_eq!(retries.decide_error(), Decision::HandBack);
    assert!(!retries.may_retry(&head(503, &[])));
    assert_eq!(
        retries.decide(&head(503, &[]), b""),
        Decision::HandBack,
        "a POST without a key is not sent again after a 503"
    );
}

#[tokio::test(start_paused = true)]
async fn retries_read_the_classifier() {
    let backoff = tower_quota::presets::sync::backoff()
        .concurrency_schedule(
            tower_quota::backoff::Schedule::new()
                .base_delay(Duration::from_secs(30))
                .jitter(tower_quota::backoff::Jitter::None),
        )
        .build()
        .unwrap();
    let mut headers = HeaderMap::new();
    let mut retries = backoff.retries(&Method::POST, &mut headers).unwrap();
    let body = br#"{"statusCode":429,"errorCode":"concurrency_limit_reached"}"#;
    assert_eq!(
        retries.decide(&head(429, &[]), body),
        Decision::Retry(Duration::from_secs(30))
    );
}
