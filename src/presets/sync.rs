//! Sync's lip-sync API (`https://api.sync.so`): its routes and quotas, its plans' job JSON,
//! the `errorCode` of its 429s, its long poll and the signature of its webhooks.
//!
//! ```
//! use tower::ServiceBuilder;
//! use tower_quota::presets::sync;
//! use tower_quota::Plan;
//! # fn wrap<S>(client: S) -> Result<(), tower_quota::ConfigError> {
//! let limits = sync::rate_limits().build()?;          // 60/min on POST /v2/generate, 600 on the rest
//! let plan = sync::plan(Plan::Creator).build()?;      // 3 generations PENDING or PROCESSING
//! let backoff = sync::backoff().build()?;             // tells its two kinds of 429 apart
//! let svc = ServiceBuilder::new()
//!     .layer(backoff)
//!     .layer(plan)
//!     .layer(limits)
//!     .service(client);
//! # drop(svc);
//! # Ok(())
//! # }
//! ```

use std::time::Duration;

use http::response::Parts;

use crate::backoff::LimitKind;
use crate::concurrency;
use crate::rate_limit::{self, WaitConfig};
use crate::{Backoff429, Plan, Quota};

/// The route that creates a generation: a job, holding one of the plan's slots.
pub const GENERATE: &str = "POST /v2/generate";
/// The route that shows one generation.
pub const STATUS: &str = "GET /v2/generate/{id}";
/// The route that lists generations.
pub const LIST: &str = "GET /v2/generations";
/// The statuses in which a generation counts against the plan.
pub const ACTIVE_STATUSES: [&str; 2] = ["PENDING", "PROCESSING"];

/// Sync's request rates, for a client: 60 a minute on [`GENERATE`], 600 a minute on every
/// other route.
pub fn rate_limits() -> rate_limit::Builder<WaitConfig> {
    crate::RateLimitByRoute::builder()
        .route(GENERATE, Quota::per_minute(60))
        .default_quota(Quota::per_minute(600))
}

/// A plan's job slots as Sync counts them: created by [`GENERATE`], shown by [`STATUS`]
/// (the id in `{id}`) and [`LIST`], with the id and status in the JSON fields `id` and
/// `status`, active while [`ACTIVE_STATUSES`], for at most an hour unseen. Routes given on the
/// returned builder replace these, as its defaults.
pub fn plan(plan: Plan) -> concurrency::Builder {
    concurrency::Builder::new(plan)
        .default_routes(GENERATE, STATUS, LIST)
        .active_statuses(ACTIVE_STATUSES)
}

/// The header field Sync's clients send their API key in.
pub const API_KEY_HEADER: &str = "x-api-key";

/// The body of Sync's refusal of a create over its plan: `429` with
/// `{"error":"Too Many Requests","errorCode":"concurrency_limit_reached","message":..,"statusCode":429}`.
pub const PLAN_FULL_BODY: &str = r#"{"error":"Too Many Requests","errorCode":"concurrency_limit_reached","message":"Concurrency limit reached for your plan. Wait for a generation to finish.","statusCode":429}"#;

/// Sync's JSON refusal of a create over its plan ([`PLAN_FULL_BODY`], `content-type:
/// application/json`), for server mode's
/// [`RejectBuilder::reject_with`](concurrency::RejectBuilder::reject_with). A refusal for
/// another reason (a missing key) gets Sync's body of that status, with no `errorCode`.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlanFullBody;

impl<B: From<String>> concurrency::RejectPlan<B> for PlanFullBody {
    fn response(&self, rejection: &concurrency::PlanRejection<'_>) -> http::Response<B> {
        let body = match rejection.reason {
            concurrency::PlanRejectReason::PlanFull => PLAN_FULL_BODY.to_owned(),
            other => {
                let status = other.status();
                format!(
                    r#"{{"error":"{}","message":"{}","statusCode":{}}}"#,
                    status.canonical_reason().unwrap_or(""),
                    status.canonical_reason().unwrap_or(""),
                    status.as_u16()
                )
            }
        };
        let mut response = http::Response::new(B::from(body));
        let json = http::HeaderValue::from_static("application/json");
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, json);
        response
    }
}

/// A plan's job slots enforced by a server, as Sync enforces them: [`plan`]'s routes and job
/// JSON in server mode, each client keyed by its [`API_KEY_HEADER`], on `plan` unless
/// [`plan_by`](concurrency::RejectBuilder::plan_by) names its own, refused with Sync's JSON
/// ([`PlanFullBody`]).
///
/// ```
/// use tower_quota::presets::sync;
/// use tower_quota::Plan;
///
/// let jobs = sync::plan_server(Plan::Creator).build().unwrap();
/// assert_eq!(jobs.in_use("sk-1"), 0);
/// ```
pub fn plan_server(plan: Plan) -> concurrency::RejectBuilder<PlanFullBody> {
    self::plan(plan)
        .reject()
        .key_header(http::HeaderName::from_static(API_KEY_HEADER))
        .reject_with(PlanFullBody)
}

/// [`Backoff429`]'s defaults, with Sync's refusals told apart by [`error_code`].
pub fn backoff() -> Backoff429 {
    Backoff429::new().classify(error_code)
}

/// Reads the `errorCode` of Sync's 429 body: `concurrency_limit_reached` is a concurrency
/// refusal; anything else (`rate_limit_exceeded`, no code, no JSON) a rate-limit one.
pub fn error_code(_: &Parts, body: &[u8]) -> LimitKind {
    match crate::json::field(body, "errorCode").as_deref() {
        Some("concurrency_limit_reached") => LimitKind::Concurrency,
        _ => LimitKind::Rate,
    }
}

/// The query of Sync's long poll of a generation: the server answers when the job ends, or
/// after `timeout` (whole seconds, at least one). For
/// [`Watch::query`](crate::concurrency::Watch::query).
pub fn long_poll(timeout: Duration) -> String {
    format!("?wait=true&timeout={}", timeout.as_secs().max(1))
}

#[cfg(feature = "sync-webhook")]
mod webhook;

#[cfg(feature = "sync-webhook")]
pub use webhook::{sign_webhook, verify_webhook, SignatureError, SIGNATURE_HEADER};

#[cfg(test)]
mod tests {
    use super::*;

    fn parts() -> Parts {
        http::Response::new(()).into_parts().0
    }

    #[test]
    fn error_code_tells_a_concurrency_429_from_a_rate_one() {
        let concurrency = br#"{"statusCode":429,"errorCode":"concurrency_limit_reached"}"#;
        assert_eq!(error_code(&parts(), concurrency), LimitKind::Concurrency);
        for rate in [
            &br#"{"statusCode":429,"errorCode":"rate_limit_exceeded"}"#[..],
            b"{}",
            b"not json",
            b"",
            br#"{"errorCode":"concurrency_limit_rea"#,
        ] {
            assert_eq!(error_code(&parts(), rate), LimitKind::Rate);
        }
    }

    #[test]
    fn the_long_poll_asks_in_whole_seconds_and_at_least_one() {
        assert_eq!(long_poll(Duration::from_secs(30)), "?wait=true&timeout=30");
        assert_eq!(long_poll(Duration::ZERO), "?wait=true&timeout=1");
    }

    #[test]
    fn the_preset_plan_builds_with_nothing_else() {
        assert!(plan(Plan::Creator).build().is_ok());
        assert!(rate_limits().build().is_ok());
        assert!(backoff().build().is_ok());
    }
}
