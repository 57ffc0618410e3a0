//! The server's own counting of route limits, written apart from `tower-quota`'s limiters so
//! that one shared mistake cannot hide itself. Times are durations since the server started.
//!
//! It counts the fixed window and the exact sliding log, which `tower-quota`'s server mode
//! does not have. The leaky bucket and the bucketed window are counted by that layer
//! ([`crate::quotas`]); the leaky bucket stays here as the oracle its unit tests check, and
//! for the limit a bucket states.

use std::collections::VecDeque;
use std::time::Duration;

use crate::config::{Algorithm, Limit};

/// The count of one endpoint for one API key.
#[derive(Debug)]
pub(crate) enum Counter {
    Fixed { window: u64, count: u32 },
    Sliding { accepted: VecDeque<Duration> },
    Leaky { tat: Duration, burst: u32 },
}

impl Counter {
    pub(crate) fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::FixedWindow => Self::Fixed {
                window: 0,
                count: 0,
            },
            // A bucketed window is counted by the layer: only its stated limit is read here.
            Algorithm::SlidingWindow | Algorithm::BucketedWindow => Self::Sliding {
                accepted: VecDeque::new(),
            },
            Algorithm::LeakyBucket { burst } => Self::Leaky {
                tat: Duration::ZERO,
                burst: burst.max(1),
            },
        }
    }

    /// Counts a request arriving at `now`, or says how long until one would be accepted.
    pub(crate) fn hit(&mut self, limit: Limit, now: Duration) -> Result<(), Duration> {
        match self {
            Self::Fixed { window, count } => {
                let period = limit.period.as_nanos();
                let current = u64::try_from(now.as_nanos() / period).unwrap_or(u64::MAX);
                if current != *window {
                    *window = current;
                    *count = 0;
                }
                if *count >= limit.count {
                    let next = Duration::from_nanos(
                        u64::try_from(period * u128::from(current + 1)).unwrap_or(u64::MAX),
                    );
                    return Err(next.saturating_sub(now));
                }
                *count += 1;
                Ok(())
            }
            Self::Sliding { accepted } => {
                // A request accepted at `t` counts until `t + period`, exclusive.
                while accepted
                    .front()
                    .is_some_and(|&t| now.saturating_sub(t) >= limit.period)
                {
                    accepted.pop_front();
                }
                if accepted.len() >= limit.count as usize {
                    let oldest = accepted[0];
                    return Err((oldest + limit.period).saturating_sub(now));
                }
                accepted.push_back(now);
                Ok(())
            }
            Self::Leaky { tat, burst } => {
                let interval = limit.period / limit.count;
                let tolerance = interval * (*burst - 1);
                if *tat > now + tolerance {
                    return Err(*tat - tolerance - now);
                }
                *tat = (*tat).max(now) + interval;
                Ok(())
            }
        }
    }
}

impl Counter {
    /// What the counter would state at `now`: the limit in force (a leaky bucket's is its
    /// burst, over `burst` intervals), the requests left, and how long until every one
    /// counted is gone (then the whole limit is free again).
    pub(crate) fn state(&mut self, limit: Limit, now: Duration) -> (Limit, u32, Duration) {
        match self {
            Self::Fixed { window, count } => {
                let period = limit.period.as_nanos();
                let current = u64::try_from(now.as_nanos() / period).unwrap_or(u64::MAX);
                let used = if current == *window { *count } else { 0 };
                let next = Duration::from_nanos(
                    u64::try_from(period * u128::from(current + 1)).unwrap_or(u64::MAX),
                );
                (
                    limit,
                    limit.count.saturating_sub(used),
                    next.saturating_sub(now),
                )
            }
            Self::Sliding { accepted } => {
                while accepted
                    .front()
                    .is_some_and(|&t| now.saturating_sub(t) >= limit.period)
                {
                    accepted.pop_front();
                }
                let left = limit.count.saturating_sub(accepted.len() as u32);
                let clear = accepted
                    .back()
                    .map_or(Duration::ZERO, |&t| (t + limit.period).saturating_sub(now));
                (limit, left, clear)
            }
            Self::Leaky { tat, burst } => {
                let interval = limit.period / limit.count;
                let backlog = tat.saturating_sub(now);
                let room = (interval * *burst).saturating_sub(backlog);
                let left = (room.as_nanos() / interval.as_nanos().max(1)) as u32;
                let stated = Limit {
                    count: *burst,
                    period: interval * *burst,
                };
                (stated, left.min(*burst), backlog)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn run(algorithm: Algorithm, limit: Limit, at: &[u64]) -> Vec<Result<(), Duration>> {
        let mut counter = Counter::new(algorithm);
        at.iter()
            .map(|&ms| counter.hit(limit, Duration::from_millis(ms)))
            .collect()
    }

    #[test]
    fn fixed_window_resets_at_the_edge_and_allows_two_counts_across_it() {
        let limit = Limit::new(3, 1000 * MS);
        let got = run(
            Algorithm::FixedWindow,
            limit,
            &[0, 1, 2, 999, 999, 1000, 1001, 1002, 1003],
        );
        assert_eq!(
            got,
            vec![
                Ok(()),
                Ok(()),
                Ok(()),
                Err(MS),
                Err(MS),
                Ok(()),
                Ok(()),
                Ok(()),
                Err(997 * MS)
            ]
        );
    }

    #[test]
    fn fixed_window_allows_a_double_burst_at_the_edge() {
        let limit = Limit::new(3, 1000 * MS);
        let got = run(
            Algorithm::FixedWindow,
            limit,
            &[997, 998, 999, 1000, 1001, 1002],
        );
        assert!(got.iter().all(Result::is_ok), "{got:?}");
    }

    #[test]
    fn sliding_window_frees_a_place_exactly_one_period_after_it_was_taken() {
        let limit = Limit::new(3, 1000 * MS);
        let got = run(
            Algorithm::SlidingWindow,
            limit,
            &[0, 10, 20, 500, 999, 1000, 1000, 1009, 1010],
        );
        assert_eq!(
            got,
            vec![
                Ok(()),
                Ok(()),
                Ok(()),
                Err(500 * MS),
                Err(MS),
                Ok(()),
                Err(10 * MS),
                Err(MS),
                Ok(())
            ]
        );
    }

    #[test]
    fn sliding_window_never_holds_more_than_count_in_any_period() {
        let limit = Limit::new(5, 100 * MS);
        let times: Vec<u64> = (0..2000).map(|i| i * 7 % 1000 + i / 3).collect();
        let mut sorted = times.clone();
        sorted.sort_unstable();
        let mut counter = Counter::new(Algorithm::SlidingWindow);
        let accepted: Vec<u64> = sorted
            .iter()
            .copied()
            .filter(|&ms| counter.hit(limit, Duration::from_millis(ms)).is_ok())
            .collect();
        for (i, &start) in accepted.iter().enumerate() {
            let inside = accepted[i..]
                .iter()
                .take_while(|&&t| t < start + 100)
                .count();
            assert!(inside <= 5, "{inside} accepted in [{start}, {start}+100)");
        }
    }

    #[test]
    fn leaky_bucket_without_burst_demands_even_spacing() {
        let limit = Limit::new(4, 1000 * MS); // one per 250 ms
        let bucket = Algorithm::LeakyBucket { burst: 1 };
        let got = run(bucket, limit, &[0, 100, 249, 250, 499, 500, 1000, 1000]);
        assert_eq!(
            got,
            vec![
                Ok(()),
                Err(150 * MS),
                Err(MS),
                Ok(()),
                Err(MS),
                Ok(()),
                Ok(()),
                Err(250 * MS)
            ]
        );
    }

    #[test]
    fn leaky_bucket_burst_then_refill_at_the_rate() {
        let limit = Limit::new(4, 1000 * MS);
        let bucket = Algorithm::LeakyBucket { burst: 3 };
        // Three at once, the fourth waits one interval; after a full drain, three again.
        let got = run(
            bucket,
            limit,
            &[0, 0, 0, 0, 250, 250, 2000, 2000, 2000, 2000],
        );
        assert_eq!(
            got,
            vec![
                Ok(()),
                Ok(()),
                Ok(()),
                Err(250 * MS),
                Ok(()),
                Err(250 * MS),
                Ok(()),
                Ok(()),
                Ok(()),
                Err(250 * MS)
            ]
        );
    }
}
