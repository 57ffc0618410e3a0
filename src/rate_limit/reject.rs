//! What a server's 429 says: the reason a request was refused, and the body built for it.

use std::sync::Arc;
use std::time::Duration;

use http::{header, Response, StatusCode};

use super::builder::RejectConfig;
use super::server::state::Refused;
use crate::headers;
use crate::quota::Quota;

/// The default 429 body: `ResBody::default()`, empty for the usual body types.
#[derive(Debug, Clone, Copy, Default)]
pub struct EmptyBody;

/// Why server mode refused a request, handed to the closure that builds the response.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Rejection {
    /// The route's pattern, or `"default"`.
    pub route: Arc<str>,
    /// The route's quota.
    pub quota: Quota,
    /// How long the client must wait before the request would be admitted (zero when the
    /// refusal is not about time: [`RejectReason::MissingKey`],
    /// [`RejectReason::NoPeerAddress`], [`RejectReason::CostTooHigh`],
    /// [`RejectReason::UnknownTier`]).
    ///
    /// The quota above is the one that refused it (for a route of several quotas).
    pub retry_after: Duration,
    /// Why the request was refused.
    pub reason: RejectReason,
}

/// Why server mode refused a request; the status it is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RejectReason {
    /// The client's quota for the route is used up: `429`, with `Retry-After`.
    Quota,
    /// The shared store is away and fails closed: `429`, `Retry-After: 1`.
    StoreUnavailable,
    /// The request carries no client key and the layer refuses such requests
    /// ([`MissingKey::Refuse`](super::MissingKey::Refuse)): `400 Bad Request`.
    MissingKey,
    /// The layer keys clients by address and the server supplied none (a configuration
    /// error, logged as a warning): `500 Internal Server Error`.
    NoPeerAddress,
    /// The request costs more than one of its route's quotas ever admits at once (its count,
    /// or a paced quota's burst): `413 Content Too Large`, with no `Retry-After`, since no
    /// wait lets it pass.
    CostTooHigh,
    /// The request's tier is unknown and the layer refuses such requests
    /// ([`UnknownTier::Refuse`](super::UnknownTier::Refuse)): `403 Forbidden`, with no
    /// `Retry-After`.
    UnknownTier,
}

impl RejectReason {
    /// The refusal it reports.
    pub(crate) fn refusal(self) -> crate::event::Refusal {
        use crate::event::Refusal;
        match self {
            Self::Quota => Refusal::Quota,
            Self::StoreUnavailable => Refusal::StoreUnavailable,
            Self::MissingKey => Refusal::MissingKey,
            Self::NoPeerAddress => Refusal::NoPeerAddress,
            Self::CostTooHigh => Refusal::CostTooHigh,
            Self::UnknownTier => Refusal::UnknownTier,
        }
    }
}

/// Builds the response server mode sends for a refused request. Status and rate-limit header
/// fields are set on it afterwards.
pub trait RejectResponse<B> {
    /// The response for this rejection.
    fn response(&self, rejection: &Rejection) -> Response<B>;
}

impl<B: Default> RejectResponse<B> for EmptyBody {
    fn response(&self, _: &Rejection) -> Response<B> {
        Response::new(B::default())
    }
}

impl<B, F> RejectResponse<B> for F
where
    F: Fn(&Rejection) -> Response<B>,
{
    fn response(&self, rejection: &Rejection) -> Response<B> {
        self(rejection)
    }
}

/// The response for a refused request: the configured response, with its status and header
/// fields.
pub(crate) fn rejection<B, F: RejectResponse<B>>(
    config: &RejectConfig<F>,
    route: &Arc<str>,
    refused: Refused,
) -> Response<B> {
    let Refused {
        wait,
        quota,
        reason,
    } = refused;
    let rejection = Rejection {
        route: route.clone(),
        quota,
        retry_after: wait,
        reason,
    };
    let mut response = config.body.response(&rejection);
    let status = match reason {
        RejectReason::MissingKey => StatusCode::BAD_REQUEST,
        RejectReason::NoPeerAddress => StatusCode::INTERNAL_SERVER_ERROR,
        RejectReason::CostTooHigh => StatusCode::PAYLOAD_TOO_LARGE,
        RejectReason::UnknownTier => StatusCode::FORBIDDEN,
        _ => StatusCode::TOO_MANY_REQUESTS,
    };
    *response.status_mut() = status;
    if status == StatusCode::TOO_MANY_REQUESTS {
        let fields = response.headers_mut();
        fields.insert(header::RETRY_AFTER, headers::retry_after_value(wait));
        if config.headers {
            fields.insert(
                headers::RATELIMIT_POLICY,
                headers::policy_value(route, quota.count(), quota.period()),
            );
            fields.insert(headers::RATELIMIT, headers::ratelimit_value(route, 0, wait));
        }
    }
    response
}
