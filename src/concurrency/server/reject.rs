//! What a server's refusal of a create says: the reason, and the response built for it.

use http::{Response, StatusCode};

use crate::concurrency::Plan;
use crate::rate_limit::{EmptyBody, RequestHead};

/// Why server mode refused a create, handed to the code that builds the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PlanRejectReason {
    /// The client's plan has no free slot: `429 Too Many Requests`.
    PlanFull,
    /// The create carries no client key and the layer refuses such requests
    /// ([`MissingKey::Refuse`](crate::rate_limit::MissingKey::Refuse)): `400 Bad Request`.
    MissingKey,
    /// The layer keys clients by address and the server supplied none (a configuration
    /// error): `500 Internal Server Error`.
    NoPeerAddress,
    /// The shared store is away and fails closed: `429 Too Many Requests`.
    StoreUnavailable,
}

impl PlanRejectReason {
    /// The status the refusal is answered with.
    pub fn status(self) -> StatusCode {
        match self {
            Self::PlanFull | Self::StoreUnavailable => StatusCode::TOO_MANY_REQUESTS,
            Self::MissingKey => StatusCode::BAD_REQUEST,
            Self::NoPeerAddress => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A create refused by server mode, as the response builder sees it.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct PlanRejection<'a> {
    /// The client's plan.
    pub plan: Plan,
    /// The slots the client holds (its jobs, creates in flight and unknown outcomes).
    pub in_use: usize,
    /// Why the create was refused.
    pub reason: PlanRejectReason,
    /// The refused request's head (its key, to say when a slot frees, say).
    pub head: RequestHead<'a>,
}

/// Builds the response server mode sends for a refused create. The status is set on it
/// afterwards; header fields it carries (a `Retry-After` of its own) are kept.
pub trait RejectPlan<B> {
    /// The response for this refusal.
    fn response(&self, rejection: &PlanRejection<'_>) -> Response<B>;
}

impl<B: Default> RejectPlan<B> for EmptyBody {
    fn response(&self, _: &PlanRejection<'_>) -> Response<B> {
        Response::new(B::default())
    }
}

impl<B, F> RejectPlan<B> for F
where
    F: Fn(&PlanRejection<'_>) -> Response<B>,
{
    fn response(&self, rejection: &PlanRejection<'_>) -> Response<B> {
        self(rejection)
    }
}
