//! Request bodies through `Backoff429`: `Clone` bodies replayed, any body taken by a layer
//! that buffers them (buffered and replayed when small and of known size, else streamed once
//! and never retried), and a proxy of hyper's `Incoming` over real sockets.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::State;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use futures::stream;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{service_fn, BoxError, Service, ServiceBuilder, ServiceExt};
use tower_quota::backoff::{Buffered, ReplayBody, Retried};
use tower_quota::{Backoff429, ServiceBuilderExt};

use crate::common::serve;

/// The bodies a service below the layer was sent.
type Seen = Arc<Mutex<Vec<Bytes>>>;

type Sent = Request<Buffered<BoxBody<Bytes, Infallible>>>;

/// A service below the layer: records each body it is sent, answers 429 to the first
/// `refusals` requests and 200 after.
fn api(
    refusals: usize,
) -> (
    impl Service<Sent, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
        + Clone
        + Send,
    Seen,
) {
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let svc = service_fn(move |request: Sent| {
        let log = log.clone();
        async move {
            let body = request.into_body().collect().await.unwrap().to_bytes();
            let mut seen = log.lock().unwrap();
            seen.push(body);
            let status = if seen.len() <= refusals { 429 } else { 200 };
            let response = Response::builder().status(status);
            Ok::<_, Infallible>(response.body(Full::new(Bytes::from("answer"))).unwrap())
        }
    });
    (svc, seen)
}

fn post_with(body: BoxBody<Bytes, Infallible>) -> Request<BoxBody<Bytes, Infallible>> {
    Request::post("http://api.test/v2/generate")
        .body(body)
        .unwrap()
}

/// A body of known size that is not `Clone`.
fn sized(text: &'static str) -> BoxBody<Bytes, Infallible> {
    Full::new(Bytes::from_static(text.as_bytes())).boxed()
}

/// A body of unknown size, streamed in two frames.
fn streamed(parts: [&'static str; 2]) -> BoxBody<Bytes, Infallible> {
    let frames = parts.map(|p| Ok::<_, Infallible>(Frame::data(Bytes::from_static(p.as_bytes()))));
    StreamBody::new(stream::iter(frames)).boxed()
}

#[tokio::test(start_paused = true)]
async fn a_body_of_known_size_is_buffered_and_replayed() {
    let (api, seen) = api(2);
    let svc = ServiceBuilder::new()
        .backoff_429(Backoff429::builder().buffer_bodies(1024).build().unwrap())
        .service(api);
    let response = svc
        .oneshot(post_with(sized("{\"model\":\"lipsync-2\"}")))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.extensions().get::<Retried>().unwrap().attempts, 3);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|body| body == "{\"model\":\"lipsync-2\"}"));
}

#[tokio::test(start_paused = true)]
async fn a_streaming_body_passes_untouched_and_is_not_retried() {
    let (api, seen) = api(1);
    let svc = ServiceBuilder::new()
        .backoff_429(Backoff429::builder().buffer_bodies(1024).build().unwrap())
        .service(api);
    let response = svc
        .oneshot(post_with(streamed(["first ", "second"])))
        .await
        .unwrap();
    // Sent once, as it came; its 429 handed back.
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(response.extensions().get::<Retried>().is_none());
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        "answer"
    );
    assert_eq!(*seen.lock().unwrap(), ["first second"]);
}

#[tokio::test(start_paused = true)]
async fn a_body_larger_than_the_buffer_is_sent_once() {
    let (api, seen) = api(1);
    let svc = ServiceBuilder::new()
        .backoff_429(Backoff429::builder().buffer_bodies(4).build().unwrap())
        .service(api);
    let response = svc
        .oneshot(post_with(sized("more than four")))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(*seen.lock().unwrap(), ["more than four"]);
}

#[tokio::test(start_paused = true)]
async fn an_empty_body_is_replayed() {
    let (api, seen) = api(1);
    let svc = ServiceBuilder::new()
        .backoff_429(Backoff429::builder().buffer_bodies(0).build().unwrap())
        .service(api);
    let response = svc
        .oneshot(post_with(http_body_util::Empty::new().boxed()))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(seen.lock().unwrap().len(), 2);
}

/// A body of the caller's that can be replayed without being `Clone`.
struct Handle(Arc<Bytes>);

impl ReplayBody for Handle {
    fn replay(&self) -> Option<Self> {
        Some(Self(self.0.clone()))
    }
}

#[tokio::test(start_paused = true)]
async fn a_body_type_of_the_callers_can_say_how_it_is_replayed() {
    let sent: Arc<Mutex<usize>> = Arc::default();
    let count = sent.clone();
    let api = service_fn(move |_: Request<Handle>| {
        let count = count.clone();
        async move {
            let mut sent = count.lock().unwrap();
            *sent += 1;
            let status = if *sent == 1 { 429 } else { 200 };
            let response = Response::builder().status(status);
            Ok::<_, Infallible>(response.body(Full::new(Bytes::new())).unwrap())
        }
    });
    let svc = ServiceBuilder::new()
        .backoff_429(Backoff429::new())
        .service(api);
    let request = Request::post("http://api.test/jobs")
        .body(Handle(Arc::new(Bytes::from_static(b"job"))))
        .unwrap();
    assert_eq!(svc.oneshot(request).await.unwrap().status(), 200);
    assert_eq!(*sent.lock().unwrap(), 2);
}

/// Over real sockets: an axum proxy forwards each request's body (axum's `Body`, not `Clone`)
/// through a hyper client under `Backoff429::buffer_bodies` to an upstream that refuses once.
#[tokio::test(start_paused = true)]
async fn a_proxy_of_incoming_bodies_retries_those_it_buffered() {
    let upstream_seen: Arc<Mutex<Vec<Bytes>>> = Arc::default();
    let upstream = serve(
        Router::new()
            .route(
                "/jobs",
                post(
                    |State(seen): State<Arc<Mutex<Vec<Bytes>>>>, body: Bytes| async move {
                        let mut seen = seen.lock().unwrap();
                        seen.push(body);
                        if seen.len() == 1 {
                            StatusCode::TOO_MANY_REQUESTS
                        } else {
                            StatusCode::CREATED
                        }
                    },
                ),
            )
            .with_state(upstream_seen.clone()),
    )
    .await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Buffered<Body>>();
    let forward = ServiceBuilder::new()
        .backoff_429(
            Backoff429::builder()
                .buffer_bodies(64 * 1024)
                .build()
                .unwrap(),
        )
        .service(client);
    let proxy = serve(Router::new().route(
        "/jobs",
        post(move |request: Request<Body>| {
            let forward = forward.clone();
            async move {
                let (mut parts, body) = request.into_parts();
                parts.uri = format!("http://{upstream}/jobs").parse().unwrap();
                let response = forward
                    .oneshot(Request::from_parts(parts, body))
                    .await
                    .map_err(|error: BoxError| error.to_string())?;
                Ok::<_, String>(response.status())
            }
        }),
    ))
    .await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = Request::post(format!("http://{proxy}/jobs"))
        .body(Full::new(Bytes::from_static(b"{\"n\":1}")))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(*upstream_seen.lock().unwrap(), ["{\"n\":1}", "{\"n\":1}"]);
}

/// A body that says it is small but streams more.
struct Lying(u8);

impl http_body::Body for Lying {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.0 == 0 {
            return std::task::Poll::Ready(None);
        }
        self.0 -= 1;
        std::task::Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; 1024])))))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(10)
    }
}

#[tokio::test(start_paused = true)]
async fn a_body_that_lies_about_its_size_fails_at_the_bound() {
    let (api, seen) = api(0);
    let svc = ServiceBuilder::new()
        .backoff_429(Backoff429::builder().buffer_bodies(64).build().unwrap())
        .service(api);
    let error = svc
        .oneshot(post_with(BodyExt::boxed(Lying(100))))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("length limit"), "{error}");
    assert!(seen.lock().unwrap().is_empty(), "nothing sent");
}
