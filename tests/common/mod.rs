//! What the test binaries share: a Redis of their own or CI's, and small helpers.

#![allow(dead_code)] // each test binary uses its part

pub(crate) mod redis;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// Server mode answers at once: polls its future one time.
pub(crate) fn now<F: Future>(future: F) -> F::Output {
    match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("server mode must answer at once"),
    }
}

/// Serves an axum app on a free port of 127.0.0.1.
pub(crate) async fn serve(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A response's `Retry-After`, in whole seconds as server mode writes it.
pub(crate) fn retry_after<B>(response: &http::Response<B>) -> Duration {
    let secs = response.headers()["retry-after"].to_str().unwrap();
    Duration::from_secs(secs.parse().unwrap())
}

/// Runs one command on the Redis at `url`.
#[cfg(feature = "redis")]
pub(crate) async fn redis_query<T: ::redis::FromRedisValue>(
    url: &str,
    command: &mut ::redis::Cmd,
) -> T {
    let client = ::redis::Client::open(url).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    command.query_async(&mut connection).await.unwrap()
}
