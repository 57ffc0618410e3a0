//! What a route allows: a count per period, and the algorithm that spreads it.

use std::fmt;
use std::time::Duration;

use crate::clock::{nanos, Nanos};

/// A request quota: at most `count` requests per `period`.
///
/// By default a quota is a **sliding window**: never more than `count` requests in any window
/// of length `period`, with bursts of up to `count` allowed. This is safe against servers that
/// count with fixed windows, sliding windows or token buckets of the same size.
///
/// [`Quota::with_burst`] switches to **GCRA** (a virtual-scheduling leaky bucket) with the
/// given burst size: requests are paced at `period / count` apart on average, with up to
/// `burst` sent at once after an idle spell. `with_burst(1)` is even pacing, which a
/// leaky-bucket server with no burst allowance (nginx `limit_req` without `burst=`) demands.
///
/// Constructors never fail; a zero count, period or burst is reported by the builder that
/// receives the quota, as a [`ConfigError`](crate::ConfigError).
///
/// ```
/// use std::time::Duration;
/// use tower_quota::Quota;
///
/// let generate = Quota::per_minute(60);
/// assert_eq!(generate.count(), 60);
/// assert_eq!(generate.period(), Duration::from_secs(60));
///
/// let paced = Quota::per_second(10).with_burst(1);
/// assert_eq!(paced.burst(), Some(1));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Quota {
    count: u32,
    period: Duration,
    burst: Option<u32>,
    unit: Option<&'static str>,
}

impl Quota {
    /// `count` requests per `period`, as a sliding window.
    pub const fn new(count: u32, period: Duration) -> Self {
        Self {
            count,
            period,
            burst: None,
            unit: None,
        }
    }

    /// `count` requests per second.
    pub const fn per_second(count: u32) -> Self {
        Self::new(count, Duration::from_secs(1))
    }

    /// `count` requests per minute.
    pub const fn per_minute(count: u32) -> Self {
        Self::new(count, Duration::from_secs(60))
    }

    /// `count` requests per hour.
    pub const fn per_hour(count: u32) -> Self {
        Self::new(count, Duration::from_secs(3600))
    }

    /// `count` requests per day (24 hours).
    pub const fn per_day(count: u32) -> Self {
        Self::new(count, Duration::from_secs(24 * 3600))
    }

    /// Paces the quota with GCRA instead of a sliding window, allowing bursts of `burst`.
    pub const fn with_burst(mut self, burst: u32) -> Self {
        self.burst = Some(burst);
        self
    }

    /// Counts `unit`s instead of requests: each request costs what the route's builder says
    /// it costs in that unit (`.cost(unit, ..)`, and `.cost_after(unit, ..)` to correct it
    /// from the response). A request is admitted once every quota of its route has room for
    /// its cost, and takes it from all of them at once.
    ///
    /// ```
    /// use tower_quota::rate_limit::RequestHead;
    /// use tower_quota::{Quota, RateLimitByRoute};
    ///
    /// /// What the caller says a request may spend, set in its extensions.
    /// #[derive(Clone, Copy)]
    /// struct MaxTokens(u32);
    ///
    /// let layer = RateLimitByRoute::builder()
    ///     .route(
    ///         "POST /v1/chat",
    ///         [Quota::per_minute(500), Quota::per_minute(30_000).counting("tokens")],
    ///     )
    ///     .cost("tokens", |head: &RequestHead<'_>| {
    ///         head.extensions().get::<MaxTokens>().map_or(1_000, |max| max.0)
    ///     })
    ///     .build()
    ///     .unwrap();
    /// # drop(layer);
    /// ```
    pub const fn counting(mut self, unit: &'static str) -> Self {
        self.unit = Some(unit);
        self
    }

    /// The unit it counts, or `None` for requests.
    pub const fn unit(&self) -> Option<&'static str> {
        self.unit
    }

    /// The number of requests (or units) allowed per period.
    pub const fn count(&self) -> u32 {
        self.count
    }

    /// The period the count applies to.
    pub const fn period(&self) -> Duration {
        self.period
    }

    /// The GCRA burst size, or `None` for a sliding window.
    pub const fn burst(&self) -> Option<u32> {
        self.burst
    }

    /// Checks the quota, returning why it is unusable.
    pub(crate) fn validate(&self) -> Result<(), &'static str> {
        if self.count == 0 {
            return Err("a quota's count must be at least 1");
        }
        if self.period.is_zero() {
            return Err("a quota's period must be longer than zero");
        }
        if self.burst == Some(0) {
            return Err("a quota's burst must be at least 1");
        }
        // Nanosecond arithmetic must not overflow: a century is plenty.
        if self.period > Duration::from_secs(100 * 365 * 24 * 3600) {
            return Err("a quota's period must be at most 100 years");
        }
        Ok(())
    }
}

impl fmt::Display for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.count)?;
        if let Some(unit) = self.unit {
            write!(f, " {unit}")?;
        }
        write!(f, " per {:?}", self.period)?;
        if let Some(burst) = self.burst {
            write!(f, " (paced, burst {burst})")?;
        }
        Ok(())
    }
}

/// A quota as text: `"60/min"`, `"600 per minute"`, `"10000/day"`, `"5/30s"`, `"2/1h30m"`
/// (a count, `/` or `per`, and a unit, `s`, `sec`, `second`, `min`, `minute`, `h`, `hour`,
/// `d`, `day`, `week`, plurals and any case alike, or any duration of
/// [`humantime`](https://docs.rs/humantime)), as an
/// environment variable or a config file gives it. A sliding window; a paced quota adds
/// `", burst 5"`.
///
/// ```
/// use tower_quota::Quota;
/// assert_eq!("60/min".parse(), Ok(Quota::per_minute(60)));
/// assert_eq!("600 per minute".parse(), Ok(Quota::per_minute(600)));
/// assert_eq!("10/s, burst 1".parse(), Ok(Quota::per_second(10).with_burst(1)));
/// assert!("sixty/min".parse::<Quota>().is_err());
/// ```
impl std::str::FromStr for Quota {
    type Err = ParseQuotaError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = |reason: &'static str| ParseQuotaError {
            text: text.into(),
            reason,
        };
        let (rate, burst) = match text.split_once(',') {
            Some((rate, burst)) => {
                let burst = burst.trim();
                let burst = burst
                    .strip_prefix("burst")
                    .ok_or_else(|| error("what follows a comma must be `burst N`"))?;
                let burst = burst
                    .trim()
                    .parse::<u32>()
                    .map_err(|_| error("a burst must be a whole number"))?;
                (rate, Some(burst))
            }
            None => (text, None),
        };
        let (count, period) = rate
            .split_once('/')
            .or_else(|| rate.split_once(" per "))
            .ok_or_else(|| error("expected a count, `/` or `per`, and a period: `60/min`"))?;
        let count = count
            .trim()
            .parse::<u32>()
            .map_err(|_| error("the count must be a whole number"))?;
        let unit = period.trim().to_ascii_lowercase();
        // A unit, singular or plural (not `ms`, which is a duration of its own).
        let singular = match unit.as_str() {
            "ms" => "ms",
            plural => plural
                .strip_suffix('s')
                .filter(|s| s.len() > 1)
                .unwrap_or(plural),
        };
        let period = match singular {
            "ms" => Duration::from_millis(1),
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hr" | "hour" => Duration::from_secs(3600),
            "d" | "day" => Duration::from_secs(86_400),
            "week" => Duration::from_secs(7 * 86_400),
            _ => humantime::parse_duration(&unit)
                .map_err(|_| error("the period must be a unit (`min`) or a duration (`30s`)"))?,
        };
        let quota = Self::new(count, period);
        Ok(match burst {
            Some(burst) => quota.with_burst(burst),
            None => quota,
        })
    }
}

/// A quota's text that does not read as one, from [`Quota`]'s `FromStr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseQuotaError {
    text: Box<str>,
    reason: &'static str,
}

impl fmt::Display for ParseQuotaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} is not a quota: {}", self.text, self.reason)
    }
}

impl std::error::Error for ParseQuotaError {}

/// A validated quota in the limiter's units.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rate {
    pub(crate) quota: Quota,
    pub(crate) count: u32,
    pub(crate) period: Nanos,
    /// GCRA burst, or 0 for a sliding window.
    pub(crate) burst: u32,
    /// GCRA emission interval: `period / count`, rounded up so that pacing is never early.
    pub(crate) interval: Nanos,
    /// Added to every response time before it is counted (see `limiter`).
    pub(crate) margin: Nanos,
}

impl Rate {
    /// Compiles a quota, which must have passed [`Quota::validate`]. `margin` of `None` takes
    /// the default: 1% of the period a request holds its place for (the window for a sliding
    /// window, the emission interval for GCRA), at most 50 ms.
    pub(crate) fn new(quota: Quota, margin: Option<Duration>) -> Self {
        let count = quota.count.max(1);
        let period = nanos(quota.period).max(1);
        let interval = period.div_ceil(u64::from(count));
        let burst = quota.burst.unwrap_or(0);
        let spacing = if burst == 0 { period } else { interval };
        let margin = match margin {
            Some(margin) => nanos(margin),
            None => (spacing / 100).min(50_000_000),
        };
        Self {
            quota,
            count,
            period,
            burst,
            interval,
            margin,
        }
    }

    pub(crate) fn is_gcra(&self) -> bool {
        self.burst != 0
    }

    /// Whether a request of `units` can ever be admitted: at most the count of a sliding
    /// window, the burst of a paced quota.
    pub(crate) fn fits(&self, units: u32) -> bool {
        units <= self.capacity()
    }

    /// The most units a request may cost.
    pub(crate) fn capacity(&self) -> u32 {
        if self.is_gcra() {
            self.burst
        } else {
            self.count
        }
    }
}
