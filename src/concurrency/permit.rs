//! The handle API: a plan's slot taken and bound by a caller that sends its requests itself
//! ([`ConcurrencyLimitByPlan::acquire`], [`Permit`]).

use http::{Method, Response};

use super::body::PlanBody;
use super::future::ResponseFuture;
use super::layer::ConcurrencyLimitByPlan;
use crate::handoff::{Handed, Handoff};
use crate::BoxError;

type Inner<B> = Handed<ResponseFuture<Handoff<Response<B>>, ()>, Response<B>>;

/// What a request holds under the plan, taken by [`ConcurrencyLimitByPlan::acquire`]: for a
/// create, a job slot; for any other request, nothing, but its response is still read for
/// what it shows of the held jobs. Send the request, then hand its response to
/// [`finish`](Permit::finish).
///
/// Dropped without `finish`, a create is treated as one abandoned after it was sent, exactly
/// as under the layer: the server may have created the job, so its slot stays held until a
/// reconcile accounts for it or its lease runs out.
#[must_use = "a permit holds the request's slot: send the request, then `finish` it"]
pub struct Permit<B> {
    inner: Inner<B>,
}

impl<B> std::fmt::Debug for Permit<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit").finish_non_exhaustive()
    }
}

impl<B> Permit<B> {
    /// Hands the response over, and takes it back with its body wrapped as under the layer:
    /// the body is read for the job's id (a create) or statuses (a status or list route) as
    /// the caller reads it, byte for byte and without delay, and the response carries a
    /// [`Job`](super::Job) in its extensions for a create. Read the body of a create to its
    /// end: the slot is bound to the job once the body has shown its id, and a body dropped
    /// before that leaves the slot held until a reconcile or its lease.
    pub async fn finish(self, response: Response<B>) -> Result<Response<PlanBody<B>>, BoxError> {
        self.inner.answer(response).await
    }

    /// For a request that never left (its connection was refused, it failed before a byte
    /// was written): a create's slot is given back at once, since no job can exist. Only for
    /// a failure that proves it: after any doubt, drop the permit (the slot stays held as an
    /// unknown outcome).
    pub async fn not_sent(self) {
        self.inner.not_sent().await;
    }
}

impl ConcurrencyLimitByPlan {
    /// Takes what a request `method path` needs under the plan, for a client that sends it
    /// itself, not through a tower service: a create waits for a slot (first come, first
    /// served, with the requests through the layer and its clones, and in the same shared
    /// store), any other request passes at once. The error is the layer's own, returning the
    /// request unsent: a [`ConcurrencyError`](super::ConcurrencyError) (no slots, a full
    /// queue, a wait too long), a store's error when the store fails closed, or a `path`
    /// that is not a request target. Dropping the future leaves the queue.
    ///
    /// The body type `B` is the response body the caller will hand to
    /// [`Permit::finish`].
    ///
    /// ```
    /// use http::{Method, Response};
    /// use http_body_util::{BodyExt, Full};
    /// use tower_quota::{ConcurrencyLimitByPlan, Plan};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_quota::BoxError> {
    /// let plan = ConcurrencyLimitByPlan::new(Plan::Hobbyist); // Sync's routes, 1 job at once
    ///
    /// let permit = plan.acquire(&Method::POST, "/v2/generate").await?;
    /// // ... send the create with any client; its response:
    /// let response = Response::new(Full::new(&br#"{"id":"gen_1","status":"PENDING"}"#[..]));
    /// let response = permit.finish(response).await?;
    /// response.into_body().collect().await?; // read the create's body, or the slot stays held
    /// assert_eq!(plan.jobs()[0].id, "gen_1");
    ///
    /// plan.complete("gen_1");
    /// assert_eq!(plan.in_use(), 0);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn acquire<B>(&self, method: &Method, path: &str) -> Result<Permit<B>, BoxError> {
        let inner = Handed::turn(self, method, path, None, None).await?;
        Ok(Permit { inner })
    }

    /// [`acquire`](Self::acquire) for a request with these header fields: a create sent
    /// again with the `Idempotency-Key` of one whose outcome is unknown (a 5xx, a transport
    /// error) is that create again, and takes over the slot it left held rather than wait for
    /// it (the server makes at most one job of a key).
    pub async fn acquire_with_headers<B>(
        &self,
        method: &Method,
        path: &str,
        headers: &http::HeaderMap,
    ) -> Result<Permit<B>, BoxError> {
        let inner = Handed::turn(self, method, path, Some(headers), None).await?;
        Ok(Permit { inner })
    }
}
