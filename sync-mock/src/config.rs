//! What the mock enforces and how its jobs behave.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// The endpoints the mock serves. Each has its own rate limit per API key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Endpoint {
    /// `POST /v2/generate`: create a generation.
    Create,
    /// `GET /v2/generate/{id}`: one generation.
    Get,
    /// `GET /v2/generations`: list generations.
    List,
    /// `GET /v2/generations/count`: count generations.
    Count,
}

impl Endpoint {
    /// Every endpoint, in a fixed order.
    pub const ALL: [Endpoint; 4] = [Self::Create, Self::Get, Self::List, Self::Count];

    /// The route as `METHOD /path`, as the counters name it.
    pub const fn route(self) -> &'static str {
        match self {
            Self::Create => "POST /v2/generate",
            Self::Get => "GET /v2/generate/{id}",
            Self::List => "GET /v2/generations",
            Self::Count => "GET /v2/generations/count",
        }
    }

    pub(crate) const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.route())
    }
}

/// A request rate: at most `count` requests per `period`, in the sense of the server's
/// [`Algorithm`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    /// Requests allowed per period.
    pub count: u32,
    /// The period.
    pub period: Duration,
}

impl Limit {
    /// `count` requests per `period`.
    pub const fn new(count: u32, period: Duration) -> Self {
        Self { count, period }
    }

    /// `count` requests per second.
    pub const fn per_second(count: u32) -> Self {
        Self::new(count, Duration::from_secs(1))
    }

    /// `count` requests per minute.
    pub const fn per_minute(count: u32) -> Self {
        Self::new(count, Duration::from_secs(60))
    }
}

/// How the server counts requests against a [`Limit`]. Sync does not say which it uses, so
/// a client must be safe against all of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// Windows of one period, aligned to the server's start: at most `count` in each. Allows
    /// up to `2 × count` in a period that straddles a window's edge.
    FixedWindow,
    /// A log of accepted requests: at most `count` in any period-long interval, each place
    /// freed exactly one period after it was taken. Counted by the mock's own code, apart
    /// from `tower-quota`, whose server mode keeps no exact log (see
    /// [`BucketedWindow`](Self::BucketedWindow)).
    SlidingWindow,
    /// `tower-quota`'s own server-mode sliding window (the mock runs that layer): at most
    /// `count` in any period-long interval, counted in 16 buckets per key in constant memory,
    /// so a place is held up to a sixteenth of a period longer than
    /// [`SlidingWindow`](Self::SlidingWindow) holds it, and a refusal's wait is up to that
    /// much longer. A client pacing to an exact window meets 429s here unless it holds each
    /// place that much longer (`safety_margin` of `period / 16`).
    BucketedWindow,
    /// A leaky bucket like nginx's `limit_req ... nodelay`: requests drain at `count` per
    /// `period`, and at most `burst` may arrive at once. Enforced by `tower-quota`'s server
    /// mode (its GCRA with this burst, which is this bucket exactly). `burst: 1` is strict even pacing
    /// (nginx with no `burst`); nginx's `burst=k` is `burst: k + 1` here.
    LeakyBucket {
        /// Requests allowed at once (at least 1).
        burst: u32,
    },
}

/// A problem with a [`Config`], found when the mock starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub(crate) String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid mock configuration: {}", self.0)
    }
}

impl std::error::Error for ConfigError {}

/// The mock's settings. [`Config::default`] is Sync as documented: 60 creates a minute and 600
/// a minute on each other endpoint, per API key; one key, `sk-test`, on the Creator plan (3
/// jobs at once); jobs that stay `PENDING` for 2 s and `PROCESSING` for 10 s.
#[derive(Clone, Debug)]
pub struct Config {
    pub(crate) keys: BTreeMap<String, usize>,
    pub(crate) algorithm: Algorithm,
    pub(crate) limits: [Limit; 4],
    pub(crate) pending: Duration,
    pub(crate) processing: Duration,
    pub(crate) failure_rate: f64,
    pub(crate) retry_after: bool,
    pub(crate) error_codes: bool,
    pub(crate) webhook_secret: String,
    pub(crate) seed: u64,
    pub(crate) dialect: Option<tower_quota::headers::Dialect>,
}

/// The API key of [`Config::default`].
pub const DEFAULT_KEY: &str = "sk-test";

/// The webhook signing secret of [`Config::default`].
pub const DEFAULT_WEBHOOK_SECRET: &str = "whsec_test";

impl Default for Config {
    fn default() -> Self {
        Self {
            keys: BTreeMap::from([(DEFAULT_KEY.to_owned(), 3)]),
            algorithm: Algorithm::SlidingWindow,
            limits: [
                Limit::per_minute(60),
                Limit::per_minute(600),
                Limit::per_minute(600),
                Limit::per_minute(600),
            ],
            pending: Duration::from_secs(2),
            processing: Duration::from_secs(10),
            failure_rate: 0.0,
            retry_after: true,
            error_codes: true,
            webhook_secret: DEFAULT_WEBHOOK_SECRET.to_owned(),
            seed: 0,
            dialect: None,
        }
    }
}

impl Config {
    /// Sync's documented defaults (see the type's docs).
    pub fn new() -> Self {
        Self::default()
    }

    /// Accepts `key` with a plan allowing `concurrency` jobs `PENDING` or `PROCESSING` at once
    /// (Hobbyist 1, Creator 3, Growth 6, Scale 15). Replaces the plan of a known key.
    pub fn api_key(mut self, key: impl Into<String>, concurrency: usize) -> Self {
        self.keys.insert(key.into(), concurrency);
        self
    }

    /// Accepts only the keys given after this call.
    pub fn no_keys(mut self) -> Self {
        self.keys.clear();
        self
    }

    /// How the route limits are counted (default: sliding window).
    pub fn algorithm(mut self, algorithm: Algorithm) -> Self {
        self.algorithm = algorithm;
        self
    }

    /// The rate limit of one endpoint, per API key.
    pub fn limit(mut self, endpoint: Endpoint, limit: Limit) -> Self {
        self.limits[endpoint.index()] = limit;
        self
    }

    /// The rate limit of every endpoint but `POST /v2/generate`, each counted on its own.
    pub fn other_limits(mut self, limit: Limit) -> Self {
        for endpoint in [Endpoint::Get, Endpoint::List, Endpoint::Count] {
            self.limits[endpoint.index()] = limit;
        }
        self
    }

    /// How long a job stays `PENDING`, then `PROCESSING`.
    pub fn job_durations(mut self, pending: Duration, processing: Duration) -> Self {
        self.pending = pending;
        self.processing = processing;
        self
    }

    /// The share of jobs that end `FAILED` instead of `COMPLETED` (0 to 1). Which ones is
    /// decided by the seed, so a run is repeatable.
    pub fn failure_rate(mut self, rate: f64) -> Self {
        self.failure_rate = rate;
        self
    }

    /// The seed for job ids and failures.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Whether 429s carry a `Retry-After` (default: yes; Sync documents none).
    pub fn retry_after(mut self, on: bool) -> Self {
        self.retry_after = on;
        self
    }

    /// States each request's route limit on its response in `dialect`, as other APIs do (Sync
    /// states none: the default). A 429 states nothing left.
    pub fn state_limits(mut self, dialect: tower_quota::headers::Dialect) -> Self {
        self.dialect = Some(dialect);
        self
    }

    /// Whether 429 bodies carry `errorCode` (default: yes; the older API did not).
    pub fn error_codes(mut self, on: bool) -> Self {
        self.error_codes = on;
        self
    }

    /// The secret webhooks are signed with.
    pub fn webhook_secret(mut self, secret: impl Into<String>) -> Self {
        self.webhook_secret = secret.into();
        self
    }

    /// Divides every period and job duration by `factor`, so that a run of minutes takes
    /// seconds with the same shape. `Retry-After` stays in whole seconds, as on the wire.
    pub fn time_scale(mut self, factor: u32) -> Self {
        let factor = factor.max(1);
        for limit in &mut self.limits {
            limit.period /= factor;
        }
        self.pending /= factor;
        self.processing /= factor;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        for endpoint in Endpoint::ALL {
            let limit = self.limits[endpoint.index()];
            if limit.count == 0 || limit.period.is_zero() {
                return Err(ConfigError(format!(
                    "the limit of {endpoint} needs a count and a period above zero"
                )));
            }
        }
        if let Algorithm::LeakyBucket { burst: 0 } = self.algorithm {
            return Err(ConfigError("a leaky bucket's burst is at least 1".into()));
        }
        if !(0.0..=1.0).contains(&self.failure_rate) {
            return Err(ConfigError(format!(
                "the failure rate {} is not between 0 and 1",
                self.failure_rate
            )));
        }
        if let Some((key, _)) = self.keys.iter().find(|(_, &n)| n == 0) {
            return Err(ConfigError(format!(
                "the plan of key {key:?} allows no job at all"
            )));
        }
        Ok(())
    }

    pub(crate) fn limit_of(&self, endpoint: Endpoint) -> Limit {
        self.limits[endpoint.index()]
    }
}
