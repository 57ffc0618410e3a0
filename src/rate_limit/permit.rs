//! The handle API of client mode: a turn taken and given back by a caller that sends its
//! requests itself ([`RateLimitByRoute::acquire`], [`Permit`]).

use http::response::Parts;
use http::{Method, Response};

use super::client::future::ResponseFuture;
use super::layer::{RateLimitByRoute, Wait};
use crate::handoff::{Handed, Handoff};
use crate::BoxError;

type Inner = Handed<ResponseFuture<Handoff<Response<()>>, ()>, Response<()>>;

/// A request's turn under its route's quota, taken by [`RateLimitByRoute::acquire`]: send
/// the request, then give the turn back with [`finish`](Permit::finish).
///
/// Dropped without `finish` or [`not_sent`](Permit::not_sent) (the send failed, or was
/// given up on), the request is treated as
/// one abandoned after it was sent, exactly as a response future dropped under the layer: the
/// server may have counted it, so its place is held for the layer's
/// [`abandoned_hold`](super::Builder::abandoned_hold), then given back.
#[derive(Debug)]
#[must_use = "a permit is the request's turn: send the request, then `finish` it"]
pub struct Permit {
    inner: Inner,
}

impl Permit {
    /// Gives the turn back with the response's head: its place is held as the layer holds
    /// one (until the response, plus the quota's period), and what the response says of the
    /// limit (a 429, `Retry-After`, rate-limit header fields) is learnt, for every request of
    /// the route whichever way it comes. With a shared store, this is when the place is given
    /// back in the store (one round trip).
    pub async fn finish(self, response: &Parts) {
        let mut head = Response::new(());
        *head.status_mut() = response.status;
        *head.version_mut() = response.version;
        *head.headers_mut() = response.headers.clone();
        self.finish_head(head).await;
    }

    /// [`finish`](Self::finish) with a head the caller has already copied (the reqwest
    /// middleware's), so that its header fields are not copied twice.
    pub(crate) async fn finish_head(self, head: Response<()>) {
        // An error here means the layer had already let the request go: nothing to give back.
        let _ = self.inner.answer(head).await;
    }

    /// Gives the turn back for a request that never left (its connection was refused, it
    /// failed before a byte was written): its place is given back entirely, as if never
    /// taken. Only for a failure that proves it: after any doubt, drop the permit (the server
    /// may have counted the request).
    pub async fn not_sent(self) {
        self.inner.not_sent().await;
    }
}

impl RateLimitByRoute<Wait> {
    /// Waits for the turn of a request `method path` (`path` as in the request's target:
    /// `/v2/generate`, a query allowed) for a client that sends it itself, not through a tower
    /// service: reqwest without middleware, another HTTP stack, a queue worker. The request
    /// waits in the same queue and counts against the same quota (and the same shared store)
    /// as one sent through the layer or any of its clones, so both ways can be mixed.
    ///
    /// A route without a quota gives a permit at once. The error is the layer's own, returning
    /// the request unsent: a [`RateLimitError`](super::RateLimitError) (its wait would be too
    /// long, or its queue is full), a store's error when the store fails closed, or a `path`
    /// that is not a request target. Dropping the future leaves the queue.
    ///
    /// ```
    /// use http::Method;
    /// use tower_quota::{Quota, RateLimitByRoute};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_quota::BoxError> {
    /// let limits = RateLimitByRoute::builder()
    ///     .route("POST /v2/generate", Quota::per_minute(60))
    ///     .build()?;
    ///
    /// let permit = limits.acquire(&Method::POST, "/v2/generate").await?;
    /// // ... send the request with any client, then give the turn back with its head:
    /// let (head, _body) = http::Response::new(()).into_parts();
    /// permit.finish(&head).await;
    /// assert_eq!(limits.snapshot()[0].remaining, 59);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn acquire(&self, method: &Method, path: &str) -> Result<Permit, BoxError> {
        let inner = Handed::turn(self, method, path, None, None).await?;
        Ok(Permit { inner })
    }

    /// [`acquire`](Self::acquire) for a request with these header fields and extensions,
    /// which a route that weighs its requests ([`Builder::cost`](super::Builder::cost))
    /// reads its cost from. Copies them; `acquire` is enough for a route that weighs nothing.
    ///
    /// ```
    /// use http::{Extensions, HeaderMap, Method};
    /// use tower_quota::rate_limit::RequestHead;
    /// use tower_quota::{Quota, RateLimitByRoute};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_quota::BoxError> {
    /// let limits = RateLimitByRoute::builder()
    ///     .route("POST /v1/chat", Quota::per_minute(10_000).counting("tokens"))
    ///     .cost("tokens", |head: &RequestHead<'_>| {
    ///         let max = head.headers().get("x-max-tokens");
    ///         max.and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(4_096)
    ///     })
    ///     .build()?;
    ///
    /// let mut headers = HeaderMap::new();
    /// headers.insert("x-max-tokens", "5000".parse()?);
    /// let permit = limits
    ///     .acquire_with_head(&Method::POST, "/v1/chat", &headers, &Extensions::new())
    ///     .await?;
    /// assert_eq!(limits.snapshot()[0].remaining, 5_000);
    /// permit.not_sent().await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn acquire_with_head(
        &self,
        method: &Method,
        path: &str,
        headers: &http::HeaderMap,
        extensions: &http::Extensions,
    ) -> Result<Permit, BoxError> {
        let head = Some((headers, extensions));
        let inner = Handed::turn(self, method, path, None, head).await?;
        Ok(Permit { inner })
    }

    /// Whether any route weighs its requests (the reqwest middleware then hands them its
    /// header fields and extensions).
    #[cfg(feature = "reqwest-middleware")]
    pub(crate) fn weighs(&self) -> bool {
        self.mode.0.routes.iter().any(|route| route.is_weighed())
    }
}
