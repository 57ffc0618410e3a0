//! What the mock counted: requests, 429s, jobs, and a log of every authenticated arrival.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Serialize, Serializer};

use crate::config::Endpoint;

impl Serialize for Endpoint {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.route())
    }
}

fn as_secs<S: Serializer>(d: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(d.as_secs_f64())
}

/// One request with a known API key, as the rate limiter saw it.
#[derive(Clone, Debug, Serialize)]
pub struct Arrival {
    /// The endpoint it was for.
    pub endpoint: Endpoint,
    /// The API key it carried.
    pub key: String,
    /// When it arrived, since the server started (seconds, in the admin endpoint's JSON).
    #[serde(serialize_with = "as_secs")]
    pub at: Duration,
    /// Whether the rate limit refused it.
    pub limited: bool,
}

/// The mock's counters, from [`MockServer::stats`](crate::MockServer::stats) or
/// `GET /_mock/stats`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    /// Requests per route, whatever their answer.
    pub requests: BTreeMap<String, u64>,
    /// Rate-limit 429s (`rate_limit_exceeded`) per route.
    pub rate_limited: BTreeMap<String, u64>,
    /// Concurrency 429s (`concurrency_limit_reached`).
    pub concurrency_limited: u64,
    /// 401s: no key or an unknown one.
    pub unauthorized: u64,
    /// Generations created (replays not included).
    pub created: u64,
    /// Creates answered with an earlier generation because of their `Idempotency-Key`.
    pub replays: u64,
    /// Generations that ended `COMPLETED`.
    pub completed: u64,
    /// Generations that ended `FAILED`.
    pub failed: u64,
    /// Time spent `PENDING` or `PROCESSING` by the generations that ended, summed: the plan
    /// slot-time used (seconds, in the admin endpoint's JSON).
    #[serde(serialize_with = "as_secs")]
    pub job_time: Duration,
    /// Generations `PENDING` or `PROCESSING` now, over all keys.
    pub active: usize,
    /// The most generations `PENDING` or `PROCESSING` at once, over all keys.
    pub max_active: usize,
    /// The same per key.
    pub max_active_by_key: BTreeMap<String, usize>,
    /// Webhooks answered with a 2xx.
    pub webhooks_delivered: u64,
    /// Webhooks that failed (no answer, or not a 2xx).
    pub webhooks_failed: u64,
    /// Every request with a known key, in order of arrival.
    pub arrivals: Vec<Arrival>,
}

impl Stats {
    /// All rate-limit 429s.
    pub fn rate_limited_total(&self) -> u64 {
        self.rate_limited.values().sum()
    }

    /// All 429s, of both kinds.
    pub fn too_many_requests(&self) -> u64 {
        self.rate_limited_total() + self.concurrency_limited
    }

    /// Requests to `endpoint`.
    pub fn requests_to(&self, endpoint: Endpoint) -> u64 {
        self.requests.get(endpoint.route()).copied().unwrap_or(0)
    }

    /// The most requests to `endpoint` with one key that arrived within any interval
    /// `[s, s + period)`, refused or not: what a client sent, as the server saw it. A client
    /// that keeps a quota of `n` per `period` keeps this at most `n`.
    pub fn max_in_window(&self, endpoint: Endpoint, period: Duration) -> usize {
        let mut by_key: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
        for arrival in self.arrivals.iter().filter(|a| a.endpoint == endpoint) {
            by_key.entry(&arrival.key).or_default().push(arrival.at);
        }
        by_key
            .values()
            .map(|times| {
                let mut most = 0;
                let mut start = 0;
                for (end, &t) in times.iter().enumerate() {
                    while t - times[start] >= period {
                        start += 1;
                    }
                    most = most.max(end + 1 - start);
                }
                most
            })
            .max()
            .unwrap_or(0)
    }
}
