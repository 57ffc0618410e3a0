//! [`Backoff429`]: the layer and its settings.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::response::Parts;
use http::HeaderName;
use tower::retry::budget::Budget;
use tower_layer::Layer;

use super::budget::RetryBudget;
use super::classify::{every_429_is_rate, Classifier, LimitKind};
use super::random::Random;
use super::replay::{BufferBodies, BufferBodiesService, ReplayBodies};
use super::schedule::{Jitter, Schedule};
use super::service::Backoff429Service;
use crate::error::ConfigError;
use crate::event::{BackoffCounters, Event, EventConfig, Events, LayerKind};

/// The most `max_body` may be.
const MAX_BODY: usize = 16 << 20;

#[derive(Clone)]
pub(crate) struct BackoffConfig {
    /// The schedule of rate-limit 429s, and of the others unless they have their own.
    pub(crate) rate_schedule: Schedule,
    pub(crate) concurrency_schedule: Option<Schedule>,
    pub(crate) transient: bool,
    pub(crate) deadline: Option<Duration>,
    pub(crate) budget: Arc<dyn Budget + Send + Sync>,
    pub(crate) classifier: Classifier,
    /// Whether a classifier was given (the default tells no concurrency 429 apart).
    pub(crate) classifies: bool,
    pub(crate) idempotency_header: Option<HeaderName>,
    /// The rate-limit header dialects read for a wait.
    pub(crate) dialects: crate::headers::Dialects,
    pub(crate) error_on_exhaustion: bool,
    pub(crate) max_body: usize,
    pub(crate) max_read_frames: usize,
    pub(crate) max_read_time: Duration,
    random: Random,
    event_config: EventConfig,
    /// The layer's name, listener and counters (one scope).
    pub(crate) events: Arc<Events>,
}

impl fmt::Debug for BackoffConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackoffConfig")
            .field("rate_schedule", &self.rate_schedule)
            .field("concurrency_schedule", &self.concurrency_schedule)
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
            LimitKind::Concurrency => self
                .concurrency_schedule
                .as_ref()
                .unwrap_or(&self.rate_schedule),
            _ => &self.rate_schedule,
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
        self.rate_schedule.validate()?;
        if let Some(concurrency) = &self.concurrency_schedule {
            concurrency.validate()?;
            if !self.classifies {
                return Err(ConfigError::InvalidSetting {
                    name: "concurrency_schedule",
                    reason: "no classifier tells a concurrency 429 apart, so it would never apply: set one with classify (presets::sync::error_code reads Sync's)",
                });
            }
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
///
/// `M` is how request bodies are sent again: [`ReplayBodies`] by default (a body that is
/// [`ReplayBody`](super::ReplayBody), as every `Clone` body is), or [`BufferBodies`] once
/// [`buffer_bodies`](Self::buffer_bodies) is set (any body).
#[derive(Clone, Debug)]
pub struct Backoff429<M = ReplayBodies> {
    pub(crate) config: Arc<BackoffConfig>,
    mode: M,
}

impl Default for Backoff429 {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff429 {
    /// Vendor-neutral defaults: 5 retries, 1, 2, 4, 8, 16 s apart before jitter
    /// ([`Jitter::Equal`]), as the common advice for a 429 goes (Sync's among others); every
    /// 429 taken for a rate-limit refusal (see [`classify`](Self::classify)); no deadline; the
    /// default [`RetryBudget`] (retries at most 20% of requests, beyond 10 a second);
    /// transient failures not retried. [`presets::sync::backoff`](crate::presets::sync::backoff)
    /// adds Sync's classifier.
    pub fn new() -> Self {
        Self {
            config: Arc::new(BackoffConfig {
                rate_schedule: Schedule::default(),
                concurrency_schedule: None,
                transient: false,
                deadline: None,
                budget: Arc::new(RetryBudget::default()),
                classifier: Arc::new(every_429_is_rate),
                classifies: false,
                idempotency_header: None,
                dialects: crate::headers::Dialects::all(),
                error_on_exhaustion: false,
                max_body: 64 * 1024,
                max_read_frames: 1024,
                max_read_time: Duration::from_secs(10),
                random: Random::new(),
                event_config: EventConfig::default(),
                events: Arc::new(
                    EventConfig::default().build(LayerKind::Backoff, ["backoff".into()]),
                ),
            }),
            mode: ReplayBodies,
        }
    }

    /// The same defaults as [`new`](Self::new), to be checked at the end, as every layer of
    /// this crate is built: `Backoff429::builder().max_retries(3).build()?`. The layer is its
    /// own builder, so every setter below works in both forms.
    pub fn builder() -> Self {
        Self::new()
    }
}

impl<M> Backoff429<M> {
    /// Takes requests with any body, the service below getting it as a
    /// [`Buffered`](super::Buffered) body: one whose size is known and at most `max_bytes`
    /// (a `Content-Length` of that much at most, or no body) is read whole before it is sent,
    /// and replayed by each retry; any other is streamed once as it comes, never retried, its
    /// answer handed back as it is (a `debug` event says so). For hyper's `Incoming`, axum's
    /// `Body` and other streaming bodies, which are not `Clone`. Default: off (request
    /// bodies must be [`ReplayBody`](super::ReplayBody)). See
    /// [`BufferBodiesService`](super::BufferBodiesService).
    pub fn buffer_bodies(self, max_bytes: usize) -> Backoff429<BufferBodies> {
        Backoff429 {
            config: self.config,
            mode: BufferBodies {
                max_bytes: max_bytes as u64,
            },
        }
    }

    /// The layer, once its settings are checked: a [`ConfigError`] names the first that
    /// makes no sense (see [`validate`](Self::validate)).
    pub fn build(self) -> Result<Self, ConfigError> {
        self.validate()?;
        Ok(self)
    }

    /// Names the layer (default `backoff`): the `layer` of its [`Event`]s and the `layer`
    /// label of its metrics.
    ///
    /// The layer is its own builder, so its counters are made anew by this setter, by
    /// [`on_event`](Self::on_event) and by `metrics`: set these first. Clones made before
    /// keep the counters they had; layers made from this one by other setters share its
    /// counters.
    pub fn name(self, name: impl Into<String>) -> Self {
        let name: Arc<str> = name.into().into();
        self.with(|c| {
            c.event_config.name = Some(name);
            c.events = Arc::new(c.event_config.build(LayerKind::Backoff, ["backoff".into()]));
        })
    }

    /// Whether the layer records its metrics through the `metrics` facade (default: yes,
    /// with feature `metrics`). Its events and counters are kept either way.
    #[cfg(feature = "metrics")]
    pub fn metrics(self, enabled: bool) -> Self {
        self.with(|c| {
            c.event_config.metrics = enabled;
            c.events = Arc::new(c.event_config.build(LayerKind::Backoff, ["backoff".into()]));
        })
    }

    /// Calls `listener` with each of the layer's [`Event`]s as it happens (see
    /// [`event`](crate::event)): [`Event::Retry`] and [`Event::NoRetry`]. A second call
    /// replaces the first listener.
    pub fn on_event<L>(self, listener: L) -> Self
    where
        L: Fn(&Event<'_>) + Send + Sync + 'static,
    {
        self.with(|c| {
            c.event_config.listener(listener);
            c.events = Arc::new(c.event_config.build(LayerKind::Backoff, ["backoff".into()]));
        })
    }

    /// What the layer has done since it was built (or named): retries by kind, the time spent
    /// waiting before them, refusals not retried by why.
    pub fn counters(&self) -> BackoffCounters {
        self.config.events.scope(0).backoff_counters()
    }

    fn with(mut self, change: impl FnOnce(&mut BackoffConfig)) -> Self {
        // A clone sharing the settings gets its own copy first.
        change(Arc::make_mut(&mut self.config));
        self
    }

    /// At most this many retries of one request (default 5).
    pub fn max_retries(self, n: u32) -> Self {
        self.with(|c| c.rate_schedule.max_retries = n)
    }

    /// The first retry's nominal delay (default 1 s, at least a millisecond).
    pub fn base_delay(self, delay: Duration) -> Self {
        self.with(|c| c.rate_schedule.base_delay = delay)
    }

    /// How much each delay grows on the one before (default 2).
    pub fn factor(self, factor: f64) -> Self {
        self.with(|c| c.rate_schedule.factor = factor)
    }

    /// The longest nominal delay (default 60 s).
    pub fn max_delay(self, cap: Duration) -> Self {
        self.with(|c| c.rate_schedule.max_delay = cap)
    }

    /// How waits are spread (default [`Jitter::Equal`], never zero).
    pub fn jitter(self, jitter: Jitter) -> Self {
        self.with(|c| c.rate_schedule.jitter = jitter)
    }

    /// The whole schedule for rate-limit 429s (and, unless set apart, the others).
    pub fn schedule(self, schedule: Schedule) -> Self {
        self.with(|c| c.rate_schedule = schedule)
    }

    /// A schedule of its own for concurrency 429s, whose slots free when jobs end (often
    /// minutes): for example `Schedule::new().base_delay(Duration::from_secs(15))`. It needs a
    /// classifier ([`classify`](Self::classify)) that tells those 429s apart: without one,
    /// [`build`](Self::build) fails, since the schedule would never apply.
    pub fn concurrency_schedule(self, schedule: Schedule) -> Self {
        self.with(|c| c.concurrency_schedule = Some(schedule))
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
    /// Default: every 429 is a rate-limit refusal. Sync's JSON `errorCode` is read by
    /// [`presets::sync::error_code`](crate::presets::sync::error_code).
    pub fn classify<F>(self, classify: F) -> Self
    where
        F: Fn(&Parts, &[u8]) -> LimitKind + Send + Sync + 'static,
    {
        self.with(|c| {
            c.classifier = Arc::new(classify);
            c.classifies = true;
        })
    }

    /// The rate-limit header dialects read for the wait a refusal asks (default: every one of
    /// [`Dialect`](crate::headers::Dialect)). `Retry-After` is always read.
    pub fn dialects(self, dialects: crate::headers::Dialects) -> Self {
        self.with(|c| c.dialects = dialects)
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

impl<S> Layer<S> for Backoff429<ReplayBodies> {
    type Service = Backoff429Service<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Backoff429Service::new(inner, self.config.clone())
    }
}

impl<S> Layer<S> for Backoff429<BufferBodies> {
    type Service = BufferBodiesService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BufferBodiesService {
            inner: Backoff429Service::new(inner, self.config.clone()),
            max_bytes: self.mode.max_bytes,
        }
    }
}
