//! Server mode keyed by `x-api-key` in front of an application that answers at once, driven
//! without sockets: what the flood and key-table tests share.

use std::convert::Infallible;
use std::future::ready;

use http::{HeaderName, HeaderValue, Request, Response};
use tower::{service_fn, Layer, Service};
use tower_quota::rate_limit::Reject;
use tower_quota::RateLimitByRoute;

use crate::common::now;

pub(crate) const KEY: HeaderName = HeaderName::from_static("x-api-key");

/// A `POST /v2/generate` from client `key`.
pub(crate) fn request(key: &str) -> Request<()> {
    let mut request = Request::post("http://api.test/v2/generate")
        .body(())
        .unwrap();
    request
        .headers_mut()
        .insert(KEY, HeaderValue::from_str(key).unwrap());
    request
}

/// The application behind the layer: answers at once.
pub(crate) type App = fn(Request<()>) -> std::future::Ready<Result<Response<()>, Infallible>>;
pub(crate) type Server =
    tower_quota::rate_limit::RateLimitByRouteService<tower::util::ServiceFn<App>, Reject>;

/// The application behind `limits`.
pub(crate) fn server(limits: &RateLimitByRoute<Reject>) -> Server {
    let inner: App = |_| ready(Ok(Response::new(())));
    limits.layer(service_fn(inner))
}

/// Sends one request of client `key`; server mode answers at once.
pub(crate) fn send(server: &mut Server, key: &str) -> Response<()> {
    now(server.call(request(key))).unwrap()
}
