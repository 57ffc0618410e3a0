//! When to retry: a [`Schedule`] of exponential delays, spread by a [`Jitter`], and the
//! decision to give up that it makes for each refusal.

use std::time::Duration;

use crate::error::ConfigError;

/// How a wait is spread around the schedule's nominal delay `d`, so that clients refused
/// together do not all come back together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "lowercase")
)]
#[non_exhaustive]
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

/// A jitter by its name: `none`, `full`, `equal`, `decorrelated` (any case).
impl std::str::FromStr for Jitter {
    type Err = ConfigError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Ok(match name.to_ascii_lowercase().as_str() {
            "none" => Self::None,
            "full" => Self::Full,
            "equal" => Self::Equal,
            "decorrelated" => Self::Decorrelated,
            _ => {
                return Err(ConfigError::InvalidSetting {
                    name: "jitter",
                    reason: "must be one of none, full, equal, decorrelated",
                })
            }
        })
    }
}

/// When to retry: the `n`-th retry waits `base_delay × factor^(n-1)`, capped at `max_delay`,
/// spread by the [`Jitter`], for at most `max_retries` retries. What the server asks
/// (`Retry-After` and its kin) always wins when it asks for longer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub(crate) base_delay: Duration,
    pub(crate) factor: f64,
    pub(crate) max_delay: Duration,
    pub(crate) max_retries: u32,
    pub(crate) jitter: Jitter,
}

impl Default for Schedule {
    /// The vendor's advice: 1 s, 2 s, 4 s, 8 s, 16 s (before jitter), five retries.
    fn default() -> Self {
        Self {
            base_delay: Duration::from_secs(1),
            factor: 2.0,
            max_delay: Duration::from_secs(60),
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
        self.base_delay = delay;
        self
    }

    /// How much each delay grows on the one before (at least 1).
    pub fn factor(mut self, factor: f64) -> Self {
        self.factor = factor;
        self
    }

    /// The longest nominal delay (at least the base delay).
    pub fn max_delay(mut self, cap: Duration) -> Self {
        self.max_delay = cap;
        self
    }

    /// How waits are spread (default [`Jitter::Equal`]).
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |name, reason| Err(ConfigError::InvalidSetting { name, reason });
        if self.base_delay < MIN_WAIT {
            return invalid(
                "base_delay",
                "must be at least a millisecond: a shorter wait is a tight loop",
            );
        }
        if !self.factor.is_finite() || self.factor < 1.0 {
            return invalid("factor", "must be a finite number of at least 1");
        }
        if self.max_delay < self.base_delay {
            return invalid("max_delay", "must be at least the base delay");
        }
        Ok(())
    }

    /// The nominal delay before retry number `retry` (1-based): at most `max_delay`,
    /// however large the numbers.
    pub(crate) fn nominal(&self, retry: u32) -> Duration {
        let exponent = i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX);
        let secs = self.base_delay.as_secs_f64() * self.factor.powi(exponent);
        Duration::try_from_secs_f64(secs)
            .map_or(self.max_delay, |nominal| nominal.min(self.max_delay))
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
                let high = previous
                    .max(self.base_delay)
                    .saturating_mul(3)
                    .min(self.max_delay);
                self.base_delay
                    .saturating_add(share(high.saturating_sub(self.base_delay), unit))
                    .min(self.max_delay)
            }
        };
        wait.max(MIN_WAIT)
    }
}

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
        if hint.is_some_and(|asked| asked > self.max_delay) {
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
