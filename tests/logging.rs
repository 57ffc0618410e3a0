//! What the crate logs, and in which spans. Alone in its binary: tracing caches each
//! callsite's interest across the process, so a test of another binary's threads, logging
//! with no subscriber, could hide an event from the subscriber of a test here.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_quota::{Backoff429, ConcurrencyLimitByPlan, Plan, Quota, RateLimitByRoute};
use tracing_subscriber::layer::SubscriberExt;

fn head(status: u16) -> http::response::Parts {
    let response = Response::builder().status(status).body(()).unwrap();
    response.into_parts().0
}

fn created(id: &str) -> Response<Full<bytes::Bytes>> {
    let body = format!(r#"{{"id":"{id}","status":"PENDING"}}"#);
    Response::new(Full::new(bytes::Bytes::from(body)))
}

/// Records the names of the spans this crate opens.
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Spans {
    fn on_new_span(
        &self,
        attributes: &tracing::span::Attributes<'_>,
        _: &tracing::span::Id,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let metadata = attributes.metadata();
        if metadata.target().starts_with("tower_quota") {
            self.0.lock().unwrap().push(metadata.name().to_owned());
        }
    }
}

/// A request that waits or is retried runs in a span of its layer; one sent at once opens none.
#[tokio::test(start_paused = true)]
async fn requests_that_wait_or_are_retried_run_in_spans() {
    let spans = Spans::default();
    let _logging =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(spans.clone()));

    let limits = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(1))
        .build()
        .unwrap();
    for _ in 0..2 {
        let permit = limits.acquire(&Method::POST, "/v2/generate").await.unwrap();
        permit.finish(&head(200)).await;
    }
    let plan = ConcurrencyLimitByPlan::new(Plan::Hobbyist);
    let first = plan.acquire(&Method::POST, "/v2/generate").await.unwrap();
    let waiting = tokio::spawn({
        let plan = plan.clone();
        async move {
            plan.acquire::<Full<bytes::Bytes>>(&Method::POST, "/v2/generate")
                .await
                .map(drop)
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let response = first.finish(created("gen_1")).await.unwrap();
    response.into_body().collect().await.unwrap();
    plan.complete("gen_1");
    waiting.await.unwrap().unwrap();

    let refusing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let api = service_fn(move |_: Request<()>| {
        let status = if refusing.swap(false, std::sync::atomic::Ordering::Relaxed) {
            429
        } else {
            200
        };
        async move {
            Ok::<_, Infallible>(
                Response::builder()
                    .status(status)
                    .body(Full::new(bytes::Bytes::new()))
                    .unwrap(),
            )
        }
    });
    let backoff = Backoff429::builder().build().unwrap();
    let svc = ServiceBuilder::new().layer(backoff).service(api);
    svc.oneshot(Request::get("/").body(()).unwrap())
        .await
        .unwrap();

    let spans = spans.0.lock().unwrap().clone();
    assert_eq!(
        spans,
        ["rate_limit_wait", "plan_wait", "backoff_retry"],
        "one each, for the one that waited or was retried"
    );
}

/// Records the level of every event of this crate.
#[cfg(feature = "redis")]
#[derive(Clone, Default)]
struct Levels(Arc<Mutex<Vec<tracing::Level>>>);

#[cfg(feature = "redis")]
impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Levels {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target().starts_with("tower_quota") {
            self.0.lock().unwrap().push(*event.metadata().level());
        }
    }
}

/// A store that does not answer is logged at `warn` once, when the outage begins, and each
/// request through it at `debug` only: an outage does not log a line per request.
#[cfg(feature = "redis")]
#[tokio::test]
async fn an_outage_is_logged_once_at_warn_not_per_request() {
    let levels = Levels::default();
    let _logging =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(levels.clone()));
    use tower_quota::store::{FailMode, RedisStore};
    let store = RedisStore::builder("redis://127.0.0.1:1/") // nothing listens there
        .timeout(Duration::from_millis(200))
        .fail_mode(FailMode::Open)
        .build()
        .unwrap();
    let limits = RateLimitByRoute::builder()
        .route("GET /work", Quota::per_minute(600))
        .store(store)
        .build()
        .unwrap();
    let api = tower::service_fn(|_: Request<()>| async {
        Ok::<_, std::convert::Infallible>(Response::new(()))
    });
    let service = ServiceBuilder::new().layer(limits).service(api);
    for _ in 0..20 {
        let request = Request::get("/work").body(()).unwrap();
        let response = service.clone().oneshot(request).await.unwrap();
        assert!(
            response.status().is_success(),
            "failing open, each request goes"
        );
    }
    let levels = levels.0.lock().unwrap().clone();
    let warns = levels
        .iter()
        .filter(|&&l| l == tracing::Level::WARN)
        .count();
    assert_eq!(warns, 1, "{levels:?}");
    assert!(
        levels
            .iter()
            .all(|&l| l == tracing::Level::WARN || l >= tracing::Level::DEBUG),
        "nothing per request above debug: {levels:?}"
    );
    assert!(
        levels.len() > 20,
        "each request is still logged, at debug: {levels:?}"
    );
}
