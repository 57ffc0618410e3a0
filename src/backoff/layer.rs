//! [`Backoff429`]: the layer, its schedules and its settings.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::response::Parts;
use http::HeaderName;
use tower::retry::budget::Budget;

use super::budget::RetryBudget;
use tower_layer::Layer;

use super::service::Backoff429Service;
use crate::error::ConfigError;

/// Which limit a response is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LimitKind {
    /// A request rate (Sync: `errorCode` `rate_limit_exceeded`).
    Rate,
    /// A concurrency limit (Sync: `errorCode` `concurrency_limit_reached`): a slot frees when
    /// a job ends, which may take minutes.
    Concurrency,
    /// A transient failure: 502, 503, 504 or a connection error (retried only when enabled).
    Transient,
}

impl fmt::Display for LimitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Rate => "rate limit",
            Self::Concurrency => "concurrency limit",
            Self::Transient => "transient failure",
        })
    }
}

/// How a wait is spread around the schedule's nominal delay `d`, so that clients refused
/// together do not all come back together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Jitter {
    /// Exactly `d`.
    None,
    /// Anywhere in `(0, d]`.
    Full,
    /// Anywhere in `[d / 2, d]`: never less than half the nominal delay, never zero. The
    /// default.
    #[default]
    Equal,
    /// AWS's "decorrelated" jitter: anywhere in `[base, 3 × previous wait]`, capped.
    Decorrelated,
}

/// When to retry: the `n`-th retry waits `base_delay × factor^(n-1)`, capped at `max_delay`,
/// spread by the [`Jitter`], for at most `max_retries` retries. What the server asks
/// (`Retry-After` and its kin) always wins when it asks for longer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub(crate) base: Duration,
    pub(crate) factor: f64,
    pub(crate) cap: Duration,
    pub(crate) max_retries: u32,
    pub(crate) jitter: Jitter,
}

impl Default for Schedule {
    /// The vendor's advice: 1 s, 2 s, 4 s, 8 s, 16 s (before jitter), five retries.
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            factor: 2.0,
            cap: Duration::from_secs(60),
            max_retries: 5,
            jitter: Jitter::Equal,
        }
    }
}

impl Schedule {
    /// The default schedule (see [`Schedule::default`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// At most this many retries (0: none).
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }

    /// The first retry's nominal delay (at least a millisecond).
    pub fn base_delay(mut self, delay: Duration) -> Self {
        self.base = delay;
        self
    }

    /// How much each delay grows on the one before (at least 1).
    pub fn factor(mut self, factor: f64) -> Self {
        self.factor = factor;
        self
    }

    /// The longest nominal delay (at least the base delay).
    pub fn max_delay(mut self, cap: Duration) -> Self {
        self.cap = cap;
        self
    }

    /// How waits are spread (default [`Jitter::Equal`]).
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |name, reason| Err(ConfigError::InvalidSetting { name, reason });
        if self.base < MIN_WAIT {
            return invalid(
                "base_delay",
                "must be at least a millisecond: a shorter wait is a tight loop",
            );
        }
        if !self.factor.is_finite() || self.factor < 1.0 {
            return invalid("factor", "must be a finite number of at least 1");
        }
        if self.cap < self.base {
            return invalid("max_delay", "must be at least the base delay");
        }
        Ok(())
    }

    /// The nominal delay before retry number `retry` (1-based): at most `max_delay`,
    /// however large the numbers.
    pub(crate) fn nominal(&self, retry: u32) -> Duration {
        let exponent = i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX);
        let secs = self.base.as_secs_f64() * self.factor.powi(exponent);
        Duration::try_from_secs_f64(secs).map_or(self.cap, |nominal| nominal.min(self.cap))
    }

    /// The wait before retry number `retry`, after `previous` (the last wait), with `unit` a
    /// random number in `[0, 1)`: at least [`MIN_WAIT`], at most `max_delay` (which a valid
    /// schedule keeps at least that).
    pub(crate) fn wait(&self, retry: u32, previous: Duration, unit: f64) -> Duration {
        let nominal = self.nominal(retry);
        let wait = match self.jitter {
            Jitter::None => nominal,
            Jitter::Full => share(nominal, 1.0 - unit),
            Jitter::Equal => {
                let half = nominal / 2;
                half + share(nominal - half, 1.0 - unit)
            }
            Jitter::Decorrelated => {
                let high = previous.max(self.base).saturating_mul(3).min(self.cap);
                self.base
                    .saturating_add(share(high.saturating_sub(self.base), unit))
                    .min(self.cap)
            }
        };
        wait.max(MIN_WAIT)
    }
}

/// The most `max_body` may be.
const MAX_BODY: usize = 16 << 20;

/// `fraction` (in `[0, 1]`) of `whole`: never more than `whole`, whatever the rounding of
/// floating point (near `Duration::MAX` a product can round past it).
fn share(whole: Duration, fraction: f64) -> Duration {
    Duration::try_from_secs_f64(whole.as_secs_f64() * fraction)
        .map_or(whole, |part| part.min(whole))
}

/// Why a refusal is not retried, as a [`Schedule`] decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GiveUp {
    /// The schedule's retries are spent.
    NoRetriesLeft,
    /// The server asks for a longer wait than the schedule's `max_delay`.
    ServerAsksTooLong,
    /// The wait (given) would end at or past the deadline.
    PastDeadline(Duration),
}

impl Schedule {
    /// The wait before retry number `retry` (1-based), after `previous` (the last wait),
    /// with `unit` a random number in `[0, 1)`, for a refusal whose server asked for `hint`,
    /// with `left` of the request's deadline.
    ///
    /// A wait is at least [`MIN_WAIT`] and at least what the server asked; a server asking
    /// for more than `max_delay` is not waited on at all, so no wait exceeds `max_delay`; and
    /// no wait reaches the deadline.
    pub(crate) fn next_wait(
        &self,
        retry: u32,
        previous: Duration,
        unit: f64,
        hint: Option<Duration>,
        left: Option<Duration>,
    ) -> Result<Duration, GiveUp> {
        if retry > self.max_retries {
            return Err(GiveUp::NoRetriesLeft);
        }
        if hint.is_some_and(|asked| asked > self.cap) {
            return Err(GiveUp::ServerAsksTooLong);
        }
        let wait = self
            .wait(retry, previous, unit)
            .max(hint.unwrap_or_default())
            .max(MIN_WAIT);
        match left {
            Some(left) if wait >= left => Err(GiveUp::PastDeadline(wait)),
            _ => Ok(wait),
        }
    }
}

/// No wait is shorter than this: a zero wait would be a tight loop.
pub(crate) const MIN_WAIT: Duration = Duration::from_millis(1);

/// Tells which limit a refused response is about, from its head and the first bytes of its
/// body.
pub(crate) type Classifier = Arc<dyn Fn(&Parts, &[u8]) -> LimitKind + Send + Sync>;

/// Reads Sync's `errorCode`: `concurrency_limit_reached` is a concurrency 429, anything else
/// (`rate_limit_exceeded`, no code, no JSON) a rate-limit one.
fn sync_error_code(_: &Parts, body: &[u8]) -> LimitKind {
    match crate::json::field(body, "errorCode").as_deref() {
        Some("concurrency_limit_reached") => LimitKind::Concurrency,
        _ => LimitKind::Rate,
    }
}

#[derive(Clone)]
pub(crate) struct BackoffConfig {
    pub(crate) rate: Schedule,
    pub(crate) concurrency: Option<Schedule>,
    pub(crate) transient: bool,
    pub(crate) deadline: Option<Duration>,
    pub(crate) budget: Arc<dyn Budget + Send + Sync>,
    pub(crate) classifier: Classifier,
    pub(crate) idempotency_header: Option<HeaderName>,
    pub(crate) error_on_exhaustion: bool,
    pub(crate) max_body: usize,
    pub(crate) max_read_frames: usize,
    pub(crate) max_read_time: Duration,
    random: Random,
}

/// A source of random numbers: std's randomly keyed hasher over a counter. A clone starts
/// with fresh keys.
struct Random {
    keys: RandomState,
    counter: AtomicU64,
}

impl Random {
    fn new() -> Self {
        Self {
            keys: RandomState::new(),
            counter: AtomicU64::new(0),
        }
    }

    fn next(&self) -> u64 {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.keys.hash_one(n)
    }
}

impl Clone for Random {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl fmt::Debug for BackoffConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackoffConfig")
            .field("rate", &self.rate)
            .field("concurrency", &self.concurrency)
            .field("transient", &self.transient)
            .field("deadline", &self.deadline)
            .field("idempotency_header", &self.idempotency_header)
            .field("error_on_exhaustion", &self.error_on_exhaustion)
            .field("max_body", &self.max_body)
            .field("max_read_frames", &self.max_read_frames)
            .field("max_read_time", &self.max_read_time)
            .finish_non_exhaustive()
    }
}

impl BackoffConfig {
    pub(crate) fn schedule(&self, kind: LimitKind) -> &Schedule {
        match kind {
            LimitKind::Concurrency => self.concurrency.as_ref().unwrap_or(&self.rate),
            _ => &self.rate,
        }
    }

    /// A random number in `[0, 1)`.
    pub(crate) fn unit(&self) -> f64 {
        (self.random.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A fresh idempotency key: 32 random hex digits.
    pub(crate) fn idempotency_key(&self) -> String {
        format!("{:016x}{:016x}", self.random.next(), self.random.next())
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        self.rate.validate()?;
        if let Some(concurrency) = &self.concurrency {
            concurrency.validate()?;
        }
        if self.deadline.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::InvalidSetting {
                name: "deadline",
                reason: "must be above zero",
            });
        }
        if self.max_body > MAX_BODY {
            return Err(ConfigError::InvalidSetting {
                name: "max_body",
                reason: "must be at most 16 MiB: each refusal being read holds a copy",
            });
        }
        Ok(())
    }
}

/// Retries 429s with exponential backoff and jitter, honouring `Retry-After`: a [`Layer`].
///
/// ```
/// use std::time::Duration;
/// use tower_quota::Backoff429;
/// # fn main() -> Result<(), tower_quota::ConfigError> {
/// let backoff = Backoff429::builder()      // base 1 s, factor 2, 5 retries: 1, 2, 4, 8, 16 s
///     .max_retries(5)
///     .base_delay(Duration::from_secs(1))
///     .build()?;
/// # let _ = backoff;
/// # Ok(())
/// # }
/// ```
///
/// The setters take any value; one that makes no sense (a base delay under a millisecond, a
/// factor below 1) is a [`ConfigError`] from [`Backoff429::build`] (as every layer of this
/// crate is built) or [`Backoff429::validate`]. A layer used without either logs the error
/// once, at `error` level, when it wraps a service, and fails each request with it rather
/// than misbehave. No valid
/// setting panics: delays saturate, and no wait exceeds `max_delay`. See the
/// [module docs](super).
#[derive(Clone, Debug)]
pub struct Backoff429 {
    pub(crate) config: Arc<BackoffConfig>,
}

impl Default for Backoff429 {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff429 {
    /// The vendor's advice: 5 retries, 1, 2, 4, 8, 16 s apart before jitter
    /// ([`Jitter::Equal`]); concurrency 429s on the same schedule; no deadline; the default
    /// [`RetryBudget`] (retries at most 20% of requests, beyond 10 a second); transient
    /// failures not retried.
    pub fn new() -> Self {
        Self {
            config: Arc::new(BackoffConfig {
                rate: Schedule::default(),
                concurrency: None,
                transient: false,
                deadline: None,
                budget: Arc::new(RetryBudget::default()),
                classifier: Arc::new(sync_error_code),
                idempotency_header: None,
                error_on_exhaustion: false,
                max_body: 64 * 1024,
                max_read_frames: 1024,
                max_read_time: Duration::from_secs(10),
                random: Random::new(),
            }),
        }
    }

    /// The same defaults as [`new`](Self::new), to be checked at the end, as every layer of
    /// this crate is built: `Backoff429::builder().max_retries(3).build()?`. The layer is its
    /// own builder, so every setter below works in both forms.
    pub fn builder() -> Self {
        Self::new()
    }

    /// The layer, once its settings are checked: a [`ConfigError`] names the first that
    /// makes no sense (see [`validate`](Self::validate)).
    pub fn build(self) -> Result<Self, ConfigError> {
        self.validate()?;
        Ok(self)
    }

    fn with(mut self, change: impl FnOnce(&mut BackoffConfig)) -> Self {
        // A clone sharing the settings gets its own copy first.
        change(Arc::make_mut(&mut self.config));
        self
    }

    /// At most this many retries of one request (default 5).
    pub fn max_retries(self, n: u32) -> Self {
        self.with(|c| c.rate.max_retries = n)
    }

    /// The first retry's nominal delay (default 1 s, at least a millisecond).
    pub fn base_delay(self, delay: Duration) -> Self {
        self.with(|c| c.rate.base = delay)
    }

    /// How much each delay grows on the one before (default 2).
    pub fn factor(self, factor: f64) -> Self {
        self.with(|c| c.rate.factor = factor)
    }

    /// The longest nominal delay (default 60 s).
    pub fn max_delay(self, cap: Duration) -> Self {
        self.with(|c| c.rate.cap = cap)
    }

    /// How waits are spread (default [`Jitter::Equal`], never zero).
    pub fn jitter(self, jitter: Jitter) -> Self {
        self.with(|c| c.rate.jitter = jitter)
    }

    /// The whole schedule for rate-limit 429s (and, unless set apart, the others).
    pub fn schedule(self, schedule: Schedule) -> Self {
        self.with(|c| c.rate = schedule)
    }

    /// A schedule of its own for concurrency 429s, whose slots free when jobs end (often
    /// minutes): for example `Schedule::new().base_delay(Duration::from_secs(15))`.
    pub fn concurrency_schedule(self, schedule: Schedule) -> Self {
        self.with(|c| c.concurrency = Some(schedule))
    }

    /// The most time one request may spend, counted from its call: the first attempt, the
    /// reading of each refusal's body, every wait and every retry.
    ///
    /// A wait that would end at or past it is not slept: the last refusal goes back at once
    /// (or [`BackoffError::Exhausted`](super::BackoffError::Exhausted) with
    /// [`error_on_exhaustion`](Self::error_on_exhaustion)), as when retries run out. If the
    /// deadline passes with nothing to hand back (an attempt in flight, a refusal's body
    /// being read, a retry waiting for the service below to be ready), what was under way is
    /// dropped and the call ends with
    /// [`BackoffError::DeadlineExceeded`](super::BackoffError::DeadlineExceeded). The
    /// caller's reading of the final response's body is not bounded by it.
    pub fn deadline(self, deadline: Duration) -> Self {
        self.with(|c| c.deadline = Some(deadline))
    }

    /// The retry budget shared by every request through the layer (default
    /// [`RetryBudget::default`]; tower's `TpsBudget` fits too). In a storm, a retry the budget
    /// refuses is not made: the caller gets the 429.
    pub fn budget(self, budget: impl Budget + Send + Sync + 'static) -> Self {
        self.with(|c| c.budget = Arc::new(budget))
    }

    /// Tells a rate-limit 429 from a concurrency one. The closure gets the response head and
    /// the start of its body, as much as was read (see [`max_body`](Self::max_body)).
    /// Default: Sync's JSON `errorCode`.
    pub fn classify<F>(self, classify: F) -> Self
    where
        F: Fn(&Parts, &[u8]) -> LimitKind + Send + Sync + 'static,
    {
        self.with(|c| c.classifier = Arc::new(classify))
    }

    /// Also retries transient failures: 502, 503, 504 and connection errors. Requests that
    /// may have been processed are only retried when safe: methods that are idempotent
    /// (`GET`, `HEAD`, `OPTIONS`, `PUT`, `DELETE`, `TRACE`), or requests carrying an
    /// `Idempotency-Key` (the caller's, or one this layer adds, see
    /// [`idempotency_keys`](Self::idempotency_keys)).
    ///
    /// This crate's own errors are never retried, whatever wraps them (tower's `Buffer` does;
    /// the `source()` chain is searched): a request a layer below gave back unsent
    /// ([`RateLimitError`](crate::rate_limit::RateLimitError),
    /// [`ConcurrencyError`](crate::concurrency::ConcurrencyError)), a failed shared store
    /// ([`StoreError`](crate::store::StoreError)), a [`ConfigError`], or a
    /// [`BackoffError`](super::BackoffError) of a `Backoff429` below. Each says the request
    /// should not simply be sent again now.
    pub fn retry_transient(self) -> Self {
        self.with(|c| c.transient = true)
    }

    /// Adds an `Idempotency-Key` to each request that has none and whose method is not
    /// idempotent: generated once per logical request, the same on every retry of it.
    pub fn idempotency_keys(self) -> Self {
        self.with(|c| c.idempotency_header = Some(HeaderName::from_static("idempotency-key")))
    }

    /// When retries run out, fail with
    /// [`BackoffError::Exhausted`](super::BackoffError::Exhausted) instead of answering with
    /// the last 429.
    pub fn error_on_exhaustion(self) -> Self {
        self.with(|c| c.error_on_exhaustion = true)
    }

    /// The most bytes of a refusal's body read to classify it (default 64 KiB, at most
    /// 16 MiB; 0 reads none). The classifier sees at most this many; the caller gets the
    /// whole body whatever is read.
    pub fn max_body(self, bytes: usize) -> Self {
        self.with(|c| c.max_body = bytes)
    }

    /// The most frames of a refusal's body read to classify it (default 1,024; 0 reads
    /// none), so a body of endless empty frames cannot hold the request in a loop.
    pub fn max_read_frames(self, frames: usize) -> Self {
        self.with(|c| c.max_read_frames = frames)
    }

    /// The longest a refusal's body is read to classify it (default 10 s), so a body that
    /// stalls is not waited on forever. When it is up, reading stops and the layer decides on
    /// what it read; a refusal handed back carries what was read and the rest, as it comes.
    /// A [`deadline`](Self::deadline) that passes first ends the call instead.
    pub fn max_read_time(self, time: Duration) -> Self {
        self.with(|c| c.max_read_time = time)
    }

    /// Whether the settings make sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.config.validate()
    }
}

impl<S> Layer<S> for Backoff429 {
    type Service = Backoff429Service<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Backoff429Service::new(inner, self.config.clone())
    }
}
