//! Every response future of the crate, polled again after it answered, panics with a message
//! that names it (as `std::future::Ready` does), whatever path it took.

use std::convert::Infallible;
use std::future::Future;
use std::task::{Context, Waker};

use http::{Method, Request, Response};
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_quota::{Backoff429, ConcurrencyLimitByPlan, Plan, Quota, RateLimitByRoute};

fn api() -> impl Service<
    Request<String>,
    Response = Response<String>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<String>, Infallible>> + Send,
> + Clone {
    service_fn(|_: Request<String>| async {
        Ok::<_, Infallible>(Response::new(
            r#"{"id":"job-1","status":"PENDING"}"#.to_owned(),
        ))
    })
}

fn request(method: Method, path: &str) -> Request<String> {
    Request::builder()
        .method(method)
        .uri(path)
        .body(String::new())
        .unwrap()
}

/// The future of `request` through `svc`, once it is ready.
async fn ready_call<S: Service<Request<String>>>(svc: &mut S, request: Request<String>) -> S::Future
where
    S::Error: std::fmt::Debug,
{
    svc.ready().await.unwrap().call(request)
}

/// Drives `future` to its answer, then polls it once more.
async fn answer_then_poll_again<F: Future>(future: F) {
    let mut future = Box::pin(future);
    let _ = future.as_mut().await;
    let _ = future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()));
}

#[tokio::test]
#[should_panic(expected = "client-mode `ResponseFuture` polled after completion")]
async fn a_client_mode_future_polled_after_its_answer_panics() {
    let layer = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(60))
        .build()
        .unwrap();
    let mut svc = layer.layer(api());
    answer_then_poll_again(ready_call(&mut svc, request(Method::POST, "/v2/generate")).await).await;
}

#[tokio::test]
#[should_panic(expected = "client-mode `ResponseFuture` polled after completion")]
async fn a_client_mode_future_refused_at_once_then_polled_again_panics() {
    let layer = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(1))
        .max_queue(0)
        .build()
        .unwrap();
    let mut svc = layer.layer(api());
    let first = svc.call(request(Method::POST, "/v2/generate"));
    let refused = svc.call(request(Method::POST, "/v2/generate"));
    first.await.unwrap();
    answer_then_poll_again(refused).await;
}

#[tokio::test]
#[should_panic(expected = "`RejectFuture` polled after completion")]
async fn a_server_mode_future_polled_after_its_answer_panics() {
    let layer = RateLimitByRoute::builder()
        .route("POST /v2/generate", Quota::per_minute(60))
        .reject()
        .key_header(http::HeaderName::from_static("x-api-key"))
        .build()
        .unwrap();
    let mut svc = layer.layer(api());
    answer_then_poll_again(ready_call(&mut svc, request(Method::POST, "/v2/generate")).await).await;
}

#[tokio::test]
#[should_panic(expected = "plan `ResponseFuture` polled after completion")]
async fn a_plan_future_polled_after_its_answer_panics() {
    let layer = ConcurrencyLimitByPlan::new(Plan::Creator);
    let mut svc = layer.layer(api());
    answer_then_poll_again(ready_call(&mut svc, request(Method::POST, "/v2/generate")).await).await;
}

#[tokio::test]
#[should_panic(expected = "`Backoff429` `ResponseFuture` polled after completion")]
async fn a_backoff_future_polled_after_its_answer_panics() {
    let mut svc = Backoff429::new().layer(api());
    answer_then_poll_again(ready_call(&mut svc, request(Method::GET, "/v2/generate/job-1")).await)
        .await;
}
