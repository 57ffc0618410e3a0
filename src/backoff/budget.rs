//! [`RetryBudget`]: retries as a bounded share of traffic, cheap on the path of every request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tower::retry::budget::Budget;

use crate::error::ConfigError;
use crate::lock::lock;

/// A retry budget: over the last `ttl` (counted in two windows of `ttl`, so up to twice that),
/// retries may be at most `min_per_sec × ttl` plus `retry_percent` of the requests.
///
/// It plays the part of tower's [`TpsBudget`](tower::retry::budget::TpsBudget) with the same
/// three settings, but a request's deposit is one relaxed atomic add (tower's takes a lock and
/// reads the clock), and invalid settings are a [`ConfigError`] instead of a panic. Runs on
/// `tokio::time`, so a paused test clock drives it.
#[derive(Debug)]
pub struct RetryBudget {
    ttl: Duration,
    reserve: f64,
    percent: f64,
    deposits: AtomicU64,
    window: Mutex<BudgetWindow>,
}

#[derive(Debug)]
struct BudgetWindow {
    started: Option<Instant>,
    previous_deposits: u64,
    retries: u64,
    previous_retries: u64,
}

impl RetryBudget {
    /// Retries at most `min_per_sec × ttl` plus `retry_percent` (0.2 = 20%) of the requests
    /// made over the last `ttl`.
    pub fn new(ttl: Duration, min_per_sec: u32, retry_percent: f64) -> Result<Self, ConfigError> {
        if ttl.is_zero() || ttl > Duration::from_secs(3600) {
            return Err(ConfigError::InvalidSetting {
                name: "ttl",
                reason: "must be above zero and at most an hour",
            });
        }
        if !retry_percent.is_finite() || !(0.0..=1000.0).contains(&retry_percent) {
            return Err(ConfigError::InvalidSetting {
                name: "retry_percent",
                reason: "must be between 0 and 1000",
            });
        }
        Ok(Self::with(ttl, f64::from(min_per_sec), retry_percent))
    }

    fn with(ttl: Duration, min_per_sec: f64, retry_percent: f64) -> Self {
        Self {
            ttl,
            reserve: min_per_sec * ttl.as_secs_f64(),
            percent: retry_percent,
            deposits: AtomicU64::new(0),
            window: Mutex::new(BudgetWindow {
                started: None,
                previous_deposits: 0,
                retries: 0,
                previous_retries: 0,
            }),
        }
    }
}

impl Default for RetryBudget {
    /// tower's defaults: a 10 s window, 10 retries a second of reserve, 20% of requests.
    fn default() -> Self {
        Self::with(Duration::from_secs(10), 10.0, 0.2)
    }
}

impl Budget for RetryBudget {
    fn deposit(&self) {
        self.deposits.fetch_add(1, Ordering::Relaxed);
    }

    fn withdraw(&self) -> bool {
        let mut window = lock(&self.window);
        let now = Instant::now();
        let started = *window.started.get_or_insert(now);
        let age = now.saturating_duration_since(started);
        if age >= self.ttl {
            let deposits = self.deposits.swap(0, Ordering::Relaxed);
            let stale = age >= self.ttl * 2;
            window.previous_deposits = if stale { 0 } else { deposits };
            window.previous_retries = if stale { 0 } else { window.retries };
            window.retries = 0;
            window.started = Some(now);
        }
        let requests = self.deposits.load(Ordering::Relaxed) + window.previous_deposits;
        let allowed = self.reserve + self.percent * requests as f64;
        let used = window.retries + window.previous_retries;
        if (used + 1) as f64 <= allowed {
            window.retries += 1;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_are_a_share_of_requests_plus_the_reserve() {
        let budget = RetryBudget::new(Duration::from_secs(10), 1, 0.1).unwrap();
        for _ in 0..100 {
            budget.deposit();
        }
        let granted = (0..100).filter(|_| budget.withdraw()).count();
        assert_eq!(granted, 20, "10 of reserve and 10% of 100");
        // Two windows later the past is forgotten: the reserve again.
        tokio::time::sleep(Duration::from_secs(20)).await;
        let granted = (0..100).filter(|_| budget.withdraw()).count();
        assert_eq!(granted, 10);
    }

    #[test]
    fn bad_settings_are_typed_errors() {
        assert!(RetryBudget::new(Duration::ZERO, 1, 0.1).is_err());
        assert!(RetryBudget::new(Duration::from_secs(1), 1, f64::NAN).is_err());
        assert!(RetryBudget::new(Duration::from_secs(1), 1, -0.5).is_err());
    }
}
