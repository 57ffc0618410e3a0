//! The retry decisions of one request: the rules the layer's response future follows, and
//! the handle API ([`Backoff429::retries`], [`Retries`]) for a caller that sends and sends
//! again itself.

use std::sync::Arc;
use std::time::Duration;

use http::response::Parts;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use tokio::time::Instant;

use super::classify::LimitKind;
use super::error::{BackoffError, Retried};
use super::layer::{Backoff429, BackoffConfig};
use super::schedule::GiveUp;
use crate::event::{Event, NoRetry};
use crate::headers;

/// The resolution of tokio's timer.
const TIMER_TICK: Duration = Duration::from_millis(1);

/// The waits of a request that has been retried.
pub(super) struct Waits {
    pub(super) total: Duration,
    pub(super) last: Duration,
    /// The span of the request's retries (`backoff_retry`, at `debug`, its `attempt` the
    /// latest), entered while the layer's future is polled past its first answer.
    pub(super) span: tracing::Span,
}

impl Default for Waits {
    fn default() -> Self {
        Self {
            total: Duration::ZERO,
            last: Duration::ZERO,
            span: tracing::Span::none(),
        }
    }
}

/// How long to wait before retry number `retries + 1` of a refusal of `kind`, or `None` to
/// give up; counts the retry (`retries`, `waits`) when there is one. `deadline` is when the
/// request's deadline falls, if one applies.
pub(super) fn next_wait(
    config: &BackoffConfig,
    kind: LimitKind,
    hint: Option<Duration>,
    retries: &mut u32,
    waits: &mut Option<Box<Waits>>,
    deadline: Option<Instant>,
) -> Option<Duration> {
    let schedule = config.schedule(kind);
    let retry = retries.saturating_add(1);
    let last_wait = waits.as_ref().map_or(Duration::ZERO, |w| w.last);
    // tokio's timer fires up to a millisecond late (it rounds a deadline up to its next
    // tick): a wait must end that much before the deadline for its retry to be sent by it.
    let left = deadline.map(|at| {
        at.saturating_duration_since(Instant::now())
            .saturating_sub(TIMER_TICK)
    });
    let wait = match schedule.next_wait(retry, last_wait, config.unit(), hint, left) {
        Ok(wait) => wait,
        Err(GiveUp::NoRetriesLeft) => {
            tracing::debug!(retries = *retries, reason = %kind, "no retries left");
            return no_retry(config, kind, NoRetry::NoRetriesLeft);
        }
        Err(GiveUp::ServerAsksTooLong) => {
            tracing::debug!(asked = ?hint, max_delay = ?schedule.max_delay, "the server asks for a longer wait than the schedule's maximum: giving up");
            return no_retry(config, kind, NoRetry::ServerAsksTooLong);
        }
        Err(GiveUp::PastDeadline(wait)) => {
            tracing::debug!(
                ?wait,
                deadline = ?config.deadline,
                "the wait would end at or past the deadline: giving up"
            );
            return no_retry(config, kind, NoRetry::PastDeadline);
        }
    };
    if !config.budget.withdraw() {
        tracing::debug!("retry budget spent: giving up");
        return no_retry(config, kind, NoRetry::BudgetSpent);
    }
    config.events.emit(0, |layer, _| Event::Retry {
        layer,
        attempt: retry.saturating_add(1),
        kind,
        wait,
    });
    *retries = retry;
    let waits = waits.get_or_insert_with(Box::default);
    waits.total = waits.total.saturating_add(wait);
    waits.last = wait;
    tracing::debug!(attempt = retry.saturating_add(1), ?wait, reason = %kind, "retrying after a refusal");
    Some(wait)
}

/// Reports a refusal not retried; `None`.
#[cold]
fn no_retry(config: &BackoffConfig, kind: LimitKind, why: NoRetry) -> Option<Duration> {
    config
        .events
        .emit(0, |layer, _| Event::NoRetry { layer, kind, why });
    None
}

/// Whether a request with `method` and `headers` may be sent again after a failure that may
/// have been processed (an idempotent method, or an idempotency key, which the layer adds
/// when [`idempotency_keys`](Backoff429::idempotency_keys) is set).
pub(super) fn prepare(config: &BackoffConfig, method: &Method, headers: &mut HeaderMap) -> bool {
    if matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    ) {
        return true;
    }
    if let Some(header) = &config.idempotency_header {
        if !headers.contains_key(header) {
            if let Ok(key) = HeaderValue::from_str(&config.idempotency_key()) {
                headers.insert(header.clone(), key);
            }
        }
    }
    headers.contains_key("idempotency-key")
}

/// Whether an answer with `status` and `headers` is one the layer may retry: a rate-limit
/// refusal (a 429, or a 403 that says so), or a transient failure when those are retried and
/// the request may be sent again.
pub(super) fn may_retry(
    config: &BackoffConfig,
    replayable: bool,
    status: StatusCode,
    headers: &HeaderMap,
) -> bool {
    match status {
        StatusCode::TOO_MANY_REQUESTS => true,
        StatusCode::FORBIDDEN => headers::refused_in(status, headers, config.dialects),
        _ => config.transient && replayable && matches!(status.as_u16(), 502..=504),
    }
}

/// What to do with an answer, from [`Retries`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decision {
    /// Send the request again after this wait.
    Retry(Duration),
    /// Hand this answer back to the caller.
    HandBack,
    /// Fail the request with this error instead of handing the answer back (retries ran out
    /// with [`Backoff429::error_on_exhaustion`] set).
    Fail(BackoffError),
}

/// The retry decisions of one request, from [`Backoff429::retries`], for a caller that sends
/// (and sends again) the request itself: the layer's rules, schedules, classifier, deadline
/// and retry budget (shared with every request through the layer and its clones).
///
/// ```
/// use http::{HeaderMap, Method, Response, StatusCode};
/// use tower_quota::backoff::Decision;
/// use tower_quota::Backoff429;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), tower_quota::BoxError> {
/// let backoff = Backoff429::builder().max_retries(3).build()?;
/// let mut headers = HeaderMap::new(); // the request's: an idempotency key may be added
/// let mut retries = backoff.retries(&Method::GET, &mut headers)?;
/// loop {
///     // ... send the request with any client; here the server refuses it once:
///     let status = if retries.retried().is_none() { StatusCode::TOO_MANY_REQUESTS } else { StatusCode::OK };
///     let (head, body) = Response::builder().status(status).body(&b""[..])?.into_parts();
///     if !retries.may_retry(&head) {
///         break; // hand the response back
///     }
///     // The start of the refusal's body, for a classifier (up to `retries.max_body()`).
///     match retries.decide(&head, body) {
///         Decision::Retry(wait) => tokio::time::sleep(wait).await,
///         Decision::HandBack => break,
///         Decision::Fail(error) => return Err(error.into()),
///         _ => break,
///     }
/// }
/// assert_eq!(retries.retried().unwrap().attempts, 2);
/// # Ok(())
/// # }
/// ```
pub struct Retries {
    config: Arc<BackoffConfig>,
    replayable: bool,
    retries: u32,
    waits: Option<Box<Waits>>,
    deadline: Option<Instant>,
}

impl std::fmt::Debug for Retries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retries")
            .field("retries", &self.retries)
            .field("replayable", &self.replayable)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl<M> Backoff429<M> {
    /// The retry decisions of one request `method` with `headers`, for a client that is not
    /// a tower service: counted in the layer's retry budget as a request through it is, its
    /// deadline starting now. When transient failures are retried with
    /// [`idempotency_keys`](Self::idempotency_keys), a key is added to `headers` (send them
    /// with every attempt). A layer with an invalid setting is a [`BackoffError::Config`].
    pub fn retries(
        &self,
        method: &Method,
        headers: &mut HeaderMap,
    ) -> Result<Retries, BackoffError> {
        let config = &self.config;
        config.validate().map_err(BackoffError::Config)?;
        let replayable = config.transient && prepare(config, method, headers);
        config.budget.deposit();
        Ok(Retries {
            config: config.clone(),
            replayable,
            retries: 0,
            waits: None,
            deadline: config
                .deadline
                .and_then(|after| Instant::now().checked_add(after)),
        })
    }
}

impl Retries {
    /// Whether `response` is one the layer may retry (a 429, a 403 that says it is about a
    /// rate limit, or a transient 502-504 when those are retried and the request may be sent
    /// again). Any other answer is handed back as it is, without a decision.
    pub fn may_retry(&self, response: &Parts) -> bool {
        may_retry(
            &self.config,
            self.replayable,
            response.status,
            &response.headers,
        )
    }

    /// When the request's [`deadline`](Backoff429::deadline) falls, if one applies: an
    /// attempt still in flight then is cut ([`deadline_exceeded`](Self::deadline_exceeded)).
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The error of a request whose deadline passed while an attempt was in flight or a
    /// refusal's body was being read: there is no answer to hand back.
    pub fn deadline_exceeded(&self) -> BackoffError {
        BackoffError::DeadlineExceeded {
            deadline: self.config.deadline.unwrap_or_default(),
            attempts: self.retries.saturating_add(1),
        }
    }

    /// How long a refusal's body is read for the classifier, at most.
    pub fn max_read_time(&self) -> Duration {
        self.config.max_read_time
    }

    /// How many frames of a refusal's body are read for the classifier, at most.
    pub fn max_read_frames(&self) -> usize {
        self.config.max_read_frames
    }

    /// How much of a refusal's body the classifier reads, at most.
    pub fn max_body(&self) -> usize {
        self.config.max_body
    }

    /// What to do with a refusal (an answer for which [`may_retry`](Self::may_retry) holds):
    /// `body` is the start of its body (up to [`max_body`](Self::max_body) bytes), which the
    /// layer's classifier reads to tell a rate-limit refusal from a concurrency one. The wait
    /// follows the server's `Retry-After` or reset, else the schedule, within the deadline,
    /// the retries left and the retry budget.
    pub fn decide(&mut self, response: &Parts, body: impl AsRef<[u8]>) -> Decision {
        if !self.may_retry(response) {
            return Decision::HandBack;
        }
        let config = &self.config;
        let kind = if headers::refused_in(response.status, &response.headers, config.dialects) {
            (config.classifier)(response, body.as_ref())
        } else {
            LimitKind::Transient
        };
        let hint = super::future::server_hint(response, config.dialects);
        self.wait_or_give_up(kind, hint, response.status)
    }

    /// What to do after a transport error: a retry only when transient failures are retried
    /// and the request may be sent again (an idempotent method or an idempotency key).
    pub fn decide_error(&mut self) -> Decision {
        if !self.replayable {
            return Decision::HandBack;
        }
        match next_wait(
            &self.config,
            LimitKind::Transient,
            None,
            &mut self.retries,
            &mut self.waits,
            self.deadline,
        ) {
            Some(wait) => Decision::Retry(wait),
            None => Decision::HandBack,
        }
    }

    fn wait_or_give_up(
        &mut self,
        kind: LimitKind,
        hint: Option<Duration>,
        status: StatusCode,
    ) -> Decision {
        let config = &self.config;
        if let Some(wait) = next_wait(
            config,
            kind,
            hint,
            &mut self.retries,
            &mut self.waits,
            self.deadline,
        ) {
            return Decision::Retry(wait);
        }
        if config.error_on_exhaustion {
            return Decision::Fail(BackoffError::Exhausted {
                attempts: self.retries.saturating_add(1),
                waited: self.waits.as_ref().map_or(Duration::ZERO, |w| w.total),
                status,
            });
        }
        Decision::HandBack
    }

    /// The retries so far, as the layer records them in a response's extensions (`None`
    /// before the first).
    pub fn retried(&self) -> Option<Retried> {
        self.waits.as_ref().map(|waits| Retried {
            attempts: self.retries.saturating_add(1),
            waited: waits.total,
        })
    }
}
