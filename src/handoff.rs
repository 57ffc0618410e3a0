//! The layers' own request paths, driven for a caller that sends its requests itself: the
//! handle API (`RateLimitByRoute::acquire`, `ConcurrencyLimitByPlan::acquire`) under clients
//! that are not tower services.
//!
//! A handle runs the very service the layer makes, over [`Handoff`], a service below it
//! whose call hands the turn over to the caller and whose answer is what the caller reports.
//! So a request through a handle waits in the same queue, counts in the same state and the
//! same shared store, learns from its response and is given up on exactly as one through the
//! layer: there is one implementation of each layer's rules, not one per transport.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::{Method, Request, Uri};
use tokio::sync::oneshot;
use tower_service::Service;

use crate::BoxError;

/// Where the caller's answer goes: the response, or word that the request never left.
type Reply<R> = oneshot::Sender<Result<R, NotSent>>;

/// The error a handle's request ends with when its caller says it was never sent (a refused
/// connection): the layers then give back what it held entirely, as for a request whose
/// service failed before the send, instead of holding it as abandoned.
#[derive(Debug)]
pub(crate) struct NotSent;

impl std::fmt::Display for NotSent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request was never sent")
    }
}

impl std::error::Error for NotSent {}

/// Whether `error` says the request never left (from a handle's caller).
pub(crate) fn never_sent(error: &BoxError) -> bool {
    error.is::<NotSent>()
}

/// The service below a layer driven by a handle: its one call gives the caller the turn to
/// send, and waits for the answer the caller reports. Clones (a request that waits keeps one
/// of its own) share the one handover.
pub(crate) struct Handoff<R> {
    turn: Arc<Mutex<Option<oneshot::Sender<Reply<R>>>>>,
}

impl<R> Clone for Handoff<R> {
    fn clone(&self) -> Self {
        Self {
            turn: self.turn.clone(),
        }
    }
}

impl<R> Service<Request<()>> for Handoff<R> {
    type Response = R;
    type Error = BoxError;
    type Future = Answer<R>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<()>) -> Self::Future {
        let (reply, answer) = oneshot::channel();
        let turn = crate::lock::lock(&self.turn).take();
        if let Some(turn) = turn {
            // The caller's side is dropped only with this call's future.
            let _ = turn.send(reply);
        }
        Answer(answer)
    }
}

/// The answer the caller reports; an error if it gives up without one (the request was
/// sent, so the layer treats it as abandoned), or [`NotSent`].
pub(crate) struct Answer<R>(oneshot::Receiver<Result<R, NotSent>>);

impl<R> Future for Answer<R> {
    type Output = Result<R, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|answer| match answer {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(not_sent)) => Err(not_sent.into()),
            Err(_) => Err("the request was given up on after it was sent".into()),
        })
    }
}

/// `path` as a request target: as given, or with the bytes that `http::Uri` refuses (a `|`,
/// a `^`, a space, non-ASCII) percent-encoded, as a client must send them anyway, so that a
/// path a URL library let through is never refused here.
fn target(path: &str) -> Result<Uri, BoxError> {
    // What an error quotes of the path: a few dozen characters say which it was.
    let quoted = || {
        let mut end = path.len().min(64);
        while !path.is_char_boundary(end) {
            end -= 1;
        }
        let more = if end < path.len() { "..." } else { "" };
        format!("{:?}{more}", &path[..end])
    };
    if !path.starts_with('/') {
        return Err(format!(
            "{} is not a request target: a path starts with `/`",
            quoted()
        )
        .into());
    }
    if let Ok(uri) = path.parse() {
        return Ok(uri);
    }
    let mut encoded = String::with_capacity(path.len() + 8);
    for byte in path.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
        .parse()
        .map_err(|error| format!("{} is not a request target: {error}", quoted()).into())
}

/// A request that holds its turn: the layer's response future, waiting for the answer the
/// caller reports through `reply`.
pub(crate) struct Handed<F, R> {
    future: Pin<Box<F>>,
    reply: Reply<R>,
}

impl<F, R> std::fmt::Debug for Handed<F, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handed").finish_non_exhaustive()
    }
}

impl<F, R, T> Handed<F, R>
where
    F: Future<Output = Result<T, BoxError>>,
{
    /// Waits for the turn of a request `method path` (with `headers`: only its idempotency
    /// key is copied; or with `head`: all its header fields and extensions, for a route that
    /// weighs requests by them) through `layer`'s service: ready with the turn, or with the
    /// error that returns the request unsent (the layer's own: a full queue, a wait too long,
    /// a failed store).
    pub(crate) async fn turn<L, S>(
        layer: &L,
        method: &Method,
        path: &str,
        headers: Option<&http::HeaderMap>,
        head: Option<(&http::HeaderMap, &http::Extensions)>,
    ) -> Result<Self, BoxError>
    where
        L: tower_layer::Layer<Handoff<R>, Service = S>,
        S: Service<Request<()>, Future = F>,
        S::Error: Into<BoxError>,
    {
        let uri = target(path)?;
        let mut request = Request::builder()
            .method(method.clone())
            .uri(uri)
            .body(())
            .map_err(BoxError::from)?;
        // What a layer reads of a request's fields: a create's idempotency key.
        if let Some(key) = headers.and_then(|headers| headers.get("idempotency-key")) {
            request.headers_mut().insert("idempotency-key", key.clone());
        }
        if let Some((headers, extensions)) = head {
            *request.headers_mut() = headers.clone();
            *request.extensions_mut() = extensions.clone();
        }
        let (turn, mut given) = oneshot::channel();
        let mut service = layer.layer(Handoff {
            turn: Arc::new(Mutex::new(Some(turn))),
        });
        std::future::poll_fn(|cx| service.poll_ready(cx))
            .await
            .map_err(Into::into)?;
        let mut future = Box::pin(service.call(request));
        std::future::poll_fn(|cx| {
            // The layer's future first: it waits for the turn and then calls `Handoff`.
            if let Poll::Ready(result) = future.as_mut().poll(cx) {
                return Poll::Ready(Err(match result {
                    Err(error) => error,
                    Ok(_) => "the layer answered without sending the request".into(),
                }));
            }
            match Pin::new(&mut given).poll(cx) {
                Poll::Ready(Ok(reply)) => Poll::Ready(Ok(reply)),
                Poll::Ready(Err(_)) => Poll::Ready(Err("the layer dropped the request".into())),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
        .map(|reply| Self { future, reply })
    }

    /// Reports the answer, and waits for the layer to take it in (give its place back, bind
    /// its job, learn from it).
    pub(crate) async fn answer(self, answer: R) -> Result<T, BoxError> {
        self.reply_with(Ok(answer)).await
    }

    /// Reports that the request was never sent, and waits for the layer to give back what it
    /// held.
    pub(crate) async fn not_sent(self) {
        let _ = self.reply_with(Err(NotSent)).await;
    }

    async fn reply_with(self, answer: Result<R, NotSent>) -> Result<T, BoxError> {
        let Self { future, reply } = self;
        if reply.send(answer).is_err() {
            return Err("the layer dropped the request".into());
        }
        future.await
    }
}
