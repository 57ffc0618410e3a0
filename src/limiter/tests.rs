//! The limiter's algorithms against their guarantees: property tests and fixed cases.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use proptest::prelude::*;

use super::{Limiter, NotYet};
use crate::quota::{Quota, Rate};

const MS: u64 = 1_000_000;
const SEC: u64 = 1_000 * MS;

fn rate(quota: Quota, margin_ms: u64) -> Rate {
    Rate::new(quota, Some(Duration::from_millis(margin_ms)))
}

#[test]
fn window_admits_a_burst_then_waits_for_the_first_place_to_free() {
    let rate = rate(Quota::per_minute(3), 10);
    let mut l = Limiter::new(&rate);
    for _ in 0..3 {
        l.try_acquire(&rate, 0).unwrap();
    }
    // All three in flight: only a response can free a place.
    assert_eq!(l.try_acquire(&rate, 0), Err(NotYet::Response));
    l.release(&rate, 2 * SEC);
    assert_eq!(
        l.try_acquire(&rate, 2 * SEC),
        Err(NotYet::Until(62 * SEC + 10 * MS))
    );
    l.release(&rate, 3 * SEC);
    l.release(&rate, 3 * SEC);
    assert_eq!(l.remaining(&rate, 62 * SEC + 10 * MS - 1), 0);
    assert_eq!(l.remaining(&rate, 62 * SEC + 10 * MS), 1);
    l.try_acquire(&rate, 62 * SEC + 10 * MS).unwrap();
    assert_eq!(
        l.try_acquire(&rate, 62 * SEC + 10 * MS),
        Err(NotYet::Until(63 * SEC + 10 * MS))
    );
}

#[test]
fn window_estimates_count_the_requests_ahead() {
    let rate = rate(Quota::per_second(2), 0);
    let mut l = Limiter::new(&rate);
    l.try_hit(&rate, 0).unwrap();
    l.try_hit(&rate, 100 * MS).unwrap();
    assert_eq!(l.estimate(&rate, 100 * MS, 0, 1), SEC);
    assert_eq!(l.estimate(&rate, 100 * MS, 1, 1), 1100 * MS);
    // The third waiter needs a place that the first two have not taken yet.
    assert_eq!(l.estimate(&rate, 100 * MS, 2, 1), 100 * MS + SEC);
}

#[test]
fn gcra_with_burst_one_paces_evenly() {
    let rate = rate(Quota::per_second(10).with_burst(1), 0);
    let mut l = Limiter::new(&rate);
    let mut now = 0;
    for i in 0..5 {
        match l.try_hit(&rate, now) {
            Ok(()) => {}
            Err(NotYet::Until(at)) => {
                assert_eq!(at, i * 100 * MS);
                now = at;
                l.try_hit(&rate, now).unwrap();
            }
            Err(NotYet::Response) => panic!("nothing in flight"),
        }
    }
    assert_eq!(now, 400 * MS);
}

#[test]
fn gcra_allows_its_burst_then_one_per_interval() {
    let rate = rate(Quota::per_second(10).with_burst(3), 0);
    let mut l = Limiter::new(&rate);
    for _ in 0..3 {
        l.try_hit(&rate, 0).unwrap();
    }
    assert_eq!(l.try_hit(&rate, 0), Err(NotYet::Until(100 * MS)));
    assert_eq!(l.remaining(&rate, 100 * MS), 1);
    assert_eq!(l.remaining(&rate, 300 * MS), 3);
    assert!(l.is_idle(&rate, 300 * MS));
}

#[test]
fn gcra_in_flight_requests_hold_their_place() {
    let rate = rate(Quota::per_second(10).with_burst(2), 0);
    let mut l = Limiter::new(&rate);
    l.try_acquire(&rate, 0).unwrap();
    l.try_acquire(&rate, 0).unwrap();
    assert_eq!(l.try_acquire(&rate, 0), Err(NotYet::Response));
    // The first is answered late: the schedule runs from its response.
    l.release(&rate, 90 * MS);
    assert_eq!(l.try_acquire(&rate, 90 * MS), Err(NotYet::Until(190 * MS)));
}

#[test]
fn a_server_429_blocks_and_headers_only_tighten() {
    let rate = rate(Quota::per_minute(100), 0);
    let mut l = Limiter::new(&rate);
    l.block_until(5 * SEC);
    assert_eq!(l.try_acquire(&rate, SEC), Err(NotYet::Until(5 * SEC)));
    l.block_until(2 * SEC); // never loosens
    assert_eq!(l.try_acquire(&rate, 3 * SEC), Err(NotYet::Until(5 * SEC)));
    l.try_acquire(&rate, 5 * SEC).unwrap();
    // The server says 3 left until 10 s; one request of ours is in flight and may not be in
    // its count yet, so 2 remain.
    l.cap(3, None, 10 * SEC, 5 * SEC);
    assert_eq!(l.remaining(&rate, 5 * SEC), 2);
    l.try_acquire(&rate, 5 * SEC).unwrap();
    l.try_acquire(&rate, 5 * SEC).unwrap();
    assert_eq!(l.try_acquire(&rate, 5 * SEC), Err(NotYet::Until(10 * SEC)));
    // A looser report for the same window (an older response, late) changes nothing.
    l.cap(50, None, 10 * SEC + 200 * MS, 6 * SEC);
    assert_eq!(
        l.try_acquire(&rate, 6 * SEC),
        Err(NotYet::Until(10 * SEC + 200 * MS))
    );
    l.try_acquire(&rate, 10 * SEC + 200 * MS).unwrap();
    // A report for a new window replaces the bound; the local quota still holds.
    l.cap(1000, None, 70 * SEC, 11 * SEC);
    assert_eq!(l.remaining(&rate, 11 * SEC), 100 - 4);
}

#[test]
fn a_stated_limit_bounds_each_window_after_its_reset_until_the_server_says_more() {
    // No bound of its own (a learnt quota): only what the server states.
    let rate = rate(Quota::new(u32::MAX, Duration::from_secs(1)), 0);
    let mut l = Limiter::new(&rate);
    // 2 of 3 left until 10 s, said at 0 s: a window of 10 s.
    l.cap(2, Some(3), 10 * SEC, 0);
    for _ in 0..2 {
        l.try_acquire(&rate, 0).unwrap();
        l.release(&rate, 0);
    }
    assert_eq!(l.try_acquire(&rate, SEC), Err(NotYet::Until(10 * SEC)));
    // Past the reset, the limit again, for a window as long as the one seen.
    for _ in 0..3 {
        l.try_acquire(&rate, 10 * SEC).unwrap();
        l.release(&rate, 10 * SEC);
    }
    assert_eq!(l.try_acquire(&rate, 11 * SEC), Err(NotYet::Until(20 * SEC)));
    // A fresh statement renews the bound; one window more past its reset, the limit again.
    l.cap(0, Some(3), 30 * SEC, 11 * SEC);
    assert_eq!(l.try_acquire(&rate, 12 * SEC), Err(NotYet::Until(30 * SEC)));
    for _ in 0..3 {
        l.try_acquire(&rate, 45 * SEC).unwrap();
        l.release(&rate, 45 * SEC);
    }
    assert_eq!(l.try_acquire(&rate, 46 * SEC), Err(NotYet::Until(49 * SEC)));
    // A statement for another reset replaces it.
    l.cap(100, Some(100), 60 * SEC, 47 * SEC);
    l.try_acquire(&rate, 47 * SEC).unwrap();
}

#[test]
fn a_stated_limit_is_carried_past_one_reset_only_without_a_fresh_statement() {
    // A server that stops stating (an error page, a proxy) must not hold the route to an old
    // limit for good: one window more, then the bound is gone.
    let rate = rate(Quota::new(u32::MAX, Duration::from_secs(1)), 0);
    let mut l = Limiter::new(&rate);
    l.cap(0, Some(1), 3600 * SEC, 0);
    l.try_acquire(&rate, 3600 * SEC).unwrap();
    l.release(&rate, 3600 * SEC);
    assert_eq!(
        l.try_acquire(&rate, 3601 * SEC),
        Err(NotYet::Until(7200 * SEC))
    );
    for _ in 0..5 {
        l.try_acquire(&rate, 7200 * SEC).unwrap();
        l.release(&rate, 7200 * SEC);
    }
}

#[test]
fn a_stated_window_is_the_length_of_the_bound_carried_past_a_reset() {
    // Said 10 s before its reset, of a limit that renews every 60 s (the draft's `w`): after
    // the reset, 3 in the next 60 s, not 3 in each 10 s.
    let rate = rate(Quota::new(u32::MAX, Duration::from_secs(1)), 0);
    let mut l = Limiter::new(&rate);
    l.cap(0, Some(3), 10 * SEC, 0);
    l.renews_over(60 * SEC);
    for _ in 0..3 {
        l.try_acquire(&rate, 10 * SEC).unwrap();
        l.release(&rate, 10 * SEC);
    }
    assert_eq!(l.try_acquire(&rate, 21 * SEC), Err(NotYet::Until(70 * SEC)));
}

#[test]
fn a_stated_limit_of_zero_is_not_carried_past_its_reset() {
    // Nothing would be sent, so nothing would ever say more: the route must not close for good.
    let rate = rate(Quota::new(u32::MAX, Duration::from_secs(1)), 0);
    let mut l = Limiter::new(&rate);
    l.cap(0, Some(0), 10 * SEC, 0);
    assert_eq!(l.try_acquire(&rate, SEC), Err(NotYet::Until(10 * SEC)));
    l.try_acquire(&rate, 10 * SEC).unwrap();
}

#[test]
fn changing_algorithm_errs_on_the_safe_side() {
    let window = rate(Quota::per_second(4), 0);
    let gcra = rate(Quota::per_second(4).with_burst(4), 0);
    let mut l = Limiter::new(&window);
    for _ in 0..4 {
        l.try_hit(&window, 0).unwrap();
    }
    l.change_rate(&window, &gcra, 0);
    assert!(l.try_hit(&gcra, 0).is_err());
    l.change_rate(&gcra, &window, 0);
    assert_eq!(l.try_hit(&window, 0), Err(NotYet::Until(SEC)));
}

#[test]
fn a_window_filled_by_a_change_of_algorithm_takes_no_memory_per_place() {
    // Four billion places filled at once: one run, not four billion response times (32 GiB).
    let gcra = rate(Quota::per_second(10).with_burst(1), 0);
    let huge = rate(Quota::per_hour(u32::MAX), 0);
    let mut l = Limiter::new(&gcra);
    l.try_hit(&gcra, 0).unwrap();
    l.change_rate(&gcra, &huge, 0);
    assert_eq!(l.try_hit(&huge, 0), Err(NotYet::Until(3_600 * SEC)));
    assert_eq!(l.remaining(&huge, SEC), 0);
    // Answers after the run queue behind it, and the run frees at once when its time comes.
    let small = rate(Quota::per_second(2), 0);
    let mut l = Limiter::new(&gcra);
    l.try_hit(&gcra, 0).unwrap();
    l.change_rate(&gcra, &small, 0);
    assert_eq!(l.try_hit(&small, 500 * MS), Err(NotYet::Until(SEC)));
    l.try_hit(&small, SEC).unwrap();
    l.try_hit(&small, SEC + MS).unwrap();
    assert_eq!(l.try_hit(&small, SEC + 2 * MS), Err(NotYet::Until(2 * SEC)));
}

#[test]
fn a_new_gcra_rate_applies_at_once() {
    let fast = rate(Quota::per_second(10).with_burst(1), 0);
    let slow = rate(Quota::per_second(1).with_burst(1), 0);
    let mut l = Limiter::new(&fast);
    l.try_hit(&fast, 0).unwrap();
    // The schedule was 100 ms ahead of now: one request's worth, which is a second now.
    l.change_rate(&fast, &slow, 0);
    assert_eq!(l.try_hit(&slow, 100 * MS), Err(NotYet::Until(SEC)));
    l.try_hit(&slow, SEC).unwrap();
    // Raised again, the level in requests is kept: one request ahead is 100 ms ahead.
    l.change_rate(&slow, &fast, 1500 * MS);
    assert_eq!(l.try_hit(&fast, 1500 * MS), Err(NotYet::Until(1550 * MS)));
    // An idle schedule stays idle; huge values saturate instead of overflowing.
    let mut idle = Limiter::new(&fast);
    idle.change_rate(&fast, &slow, 5 * SEC);
    idle.try_hit(&slow, 5 * SEC).unwrap();
    let glacial = rate(
        Quota::new(1, Duration::from_secs(100 * 365 * 24 * 3600)).with_burst(1),
        0,
    );
    let mut l = Limiter::new(&fast);
    l.try_hit(&fast, 0).unwrap();
    l.change_rate(&fast, &glacial, 0);
    assert!(matches!(l.try_hit(&glacial, 0), Err(NotYet::Until(at)) if at >= glacial.interval));
}

#[test]
fn a_cancelled_place_is_given_back_as_if_never_taken() {
    let window = rate(Quota::per_second(2), 0);
    let mut l = Limiter::new(&window);
    l.try_acquire(&window, 0).unwrap();
    l.try_acquire(&window, 0).unwrap();
    assert_eq!(l.try_acquire(&window, 0), Err(NotYet::Response));
    l.cancel();
    // No answer is counted: the place is free at once, and for good.
    assert_eq!(l.remaining(&window, 0), 1);
    l.release(&window, 0);
    assert!(l.is_idle(&window, SEC));

    let gcra = rate(Quota::per_second(10).with_burst(1), 0);
    let mut l = Limiter::new(&gcra);
    l.try_acquire(&gcra, 0).unwrap();
    l.cancel();
    // The schedule did not move.
    l.try_hit(&gcra, 0).unwrap();
    assert_eq!(l.try_hit(&gcra, 0), Err(NotYet::Until(100 * MS)));

    // A server's bound gets its place back too.
    let mut l = Limiter::new(&window);
    l.cap(1, None, 10 * SEC, 0);
    l.try_acquire(&window, 0).unwrap();
    assert_eq!(l.remaining(&window, 0), 0);
    l.cancel();
    assert_eq!(l.remaining(&window, 0), 1);
}

/// Runs requests arriving at `arrivals` (sorted) through one limiter, first come first served,
/// each answered `rtt` after it is sent, or given up on `gives_up` after it is sent when that
/// is sooner (then held for `hold`). Returns `(send, last)` times, where `last` is the latest
/// moment the server may count the request: its response, or the end of its hold.
fn simulate(
    rate: &Rate,
    arrivals: &[u64],
    rtts: &[u64],
    gives_up: &[Option<u64>],
    hold: u64,
) -> Vec<(u64, u64)> {
    let mut limiter = Limiter::new(rate);
    // (when, given up) of the requests in flight.
    let mut in_flight = BinaryHeap::new();
    let mut sent = Vec::with_capacity(arrivals.len());
    let mut now = 0;
    loop {
        while let Some(&Reverse((at, given_up))) = in_flight.peek() {
            if at > now {
                break;
            }
            in_flight.pop();
            if given_up {
                limiter.abandon(rate, at, hold, 1);
            } else {
                limiter.release(rate, at);
            }
        }
        let mut wake = None;
        while sent.len() < arrivals.len() && arrivals[sent.len()] <= now {
            match limiter.try_acquire(rate, now) {
                Ok(()) => {
                    let i = sent.len();
                    let rtt = rtts[i];
                    match gives_up.get(i).copied().flatten().filter(|&g| g < rtt) {
                        Some(g) => {
                            sent.push((now, now + g + hold));
                            in_flight.push(Reverse((now + g, true)));
                        }
                        None => {
                            sent.push((now, now + rtt));
                            in_flight.push(Reverse((now + rtt, false)));
                        }
                    }
                }
                Err(NotYet::Until(at)) => {
                    assert!(at > now, "a wait must lie in the future");
                    wake = Some(at);
                    break;
                }
                Err(NotYet::Response) => {
                    assert!(
                        !in_flight.is_empty(),
                        "waiting for a response none will send"
                    );
                    break;
                }
            }
        }
        if sent.len() == arrivals.len() && in_flight.is_empty() {
            return sent;
        }
        let next_arrival = arrivals.get(sent.len()).copied().filter(|&a| a > now);
        now = [in_flight.peek().map(|r| r.0 .0), wake, next_arrival]
            .into_iter()
            .flatten()
            .min()
            .expect("something must happen next");
    }
}

/// Where the server may count each request: anywhere between its send and its response.
fn server_times(sent: &[(u64, u64)], at: &[f64]) -> Vec<u64> {
    let mut times: Vec<u64> = sent
        .iter()
        .zip(at.iter().cycle())
        .map(|(&(s, r), &f)| s + ((r - s) as f64 * f) as u64)
        .collect();
    times.sort_unstable();
    times
}

fn arrivals_and_rtts() -> impl Strategy<Value = (Vec<u64>, Vec<u64>, Vec<f64>)> {
    (1usize..160).prop_flat_map(|n| {
        (
            prop::collection::vec(0u64..3_000, n),
            prop::collection::vec(prop_oneof![Just(0u64), 0u64..400], n),
            prop::collection::vec(prop_oneof![Just(0.0), Just(1.0), 0.0f64..1.0], 1..8),
        )
            .prop_map(|(mut gaps, rtts, at)| {
                // Arrival gaps in ms, often zero: bursts.
                let mut t = 0;
                for g in gaps.iter_mut() {
                    t += if *g < 1_500 { 0 } else { (*g - 1_500) * MS };
                    *g = t;
                }
                let rtts = rtts.into_iter().map(|r| r * MS).collect();
                (gaps, rtts, at)
            })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn no_window_ever_holds_more_than_the_quota(
        count in 1u32..12,
        period_ms in 50u64..2_000,
        margin_ms in 0u64..20,
        (arrivals, rtts, at) in arrivals_and_rtts(),
    ) {
        let rate = rate(Quota::new(count, Duration::from_millis(period_ms)), margin_ms);
        let sent = simulate(&rate, &arrivals, &rtts, &[], 0);
        let times = server_times(&sent, &at);
        let n = count as usize;
        for i in n..times.len() {
            prop_assert!(
                times[i] - times[i - n] >= rate.period,
                "{} requests within {} ns", n + 1, times[i] - times[i - n]
            );
        }
        // Nothing waits without cause: a request goes at its arrival when the window allows.
        prop_assert!(sent.iter().zip(&arrivals).all(|(&(s, _), &a)| s >= a));
    }

    #[test]
    fn gcra_spacing_holds(
        count in 1u32..12,
        burst in 1u32..6,
        period_ms in 50u64..2_000,
        margin_ms in 0u64..20,
        (arrivals, rtts, at) in arrivals_and_rtts(),
    ) {
        let rate = rate(Quota::new(count, Duration::from_millis(period_ms)).with_burst(burst), margin_ms);
        let sent = simulate(&rate, &arrivals, &rtts, &[], 0);
        let times = server_times(&sent, &at);
        let b = burst as u64;
        for i in 0..times.len() {
            for j in i + 1..times.len() {
                let k = (j - i + 1) as u64;
                if k > b {
                    prop_assert!(
                        times[j] - times[i] >= (k - b) * rate.interval,
                        "{k} requests within {} ns", times[j] - times[i]
                    );
                }
            }
        }
    }

    #[test]
    fn abandoned_requests_counted_late_keep_the_window(
        count in 1u32..12,
        period_ms in 50u64..2_000,
        margin_ms in 0u64..20,
        hold_ms in 0u64..3_000,
        (arrivals, rtts, at) in arrivals_and_rtts(),
        gives_up in prop::collection::vec(prop::option::weighted(0.3, 0u64..400), 1..40),
    ) {
        let rate = rate(Quota::new(count, Duration::from_millis(period_ms)), margin_ms);
        let gives_up: Vec<_> = gives_up.iter().cycle().take(arrivals.len()).map(|g| g.map(|g| g * MS)).collect();
        let sent = simulate(&rate, &arrivals, &rtts, &gives_up, hold_ms * MS);
        let times = server_times(&sent, &at);
        let n = count as usize;
        for i in n..times.len() {
            prop_assert!(
                times[i] - times[i - n] >= rate.period,
                "{} requests within {} ns", n + 1, times[i] - times[i - n]
            );
        }
    }

    #[test]
    fn abandoned_requests_counted_late_keep_the_gcra_spacing(
        count in 1u32..12,
        burst in 1u32..6,
        period_ms in 50u64..2_000,
        margin_ms in 0u64..20,
        hold_ms in 0u64..3_000,
        (arrivals, rtts, at) in arrivals_and_rtts(),
        gives_up in prop::collection::vec(prop::option::weighted(0.3, 0u64..400), 1..40),
    ) {
        let rate = rate(Quota::new(count, Duration::from_millis(period_ms)).with_burst(burst), margin_ms);
        let gives_up: Vec<_> = gives_up.iter().cycle().take(arrivals.len()).map(|g| g.map(|g| g * MS)).collect();
        let sent = simulate(&rate, &arrivals, &rtts, &gives_up, hold_ms * MS);
        let times = server_times(&sent, &at);
        let b = burst as u64;
        for i in 0..times.len() {
            for j in i + 1..times.len() {
                let k = (j - i + 1) as u64;
                if k > b {
                    prop_assert!(
                        times[j] - times[i] >= (k - b) * rate.interval,
                        "{k} requests within {} ns", times[j] - times[i]
                    );
                }
            }
        }
    }

    #[test]
    fn instant_responses_use_the_whole_window(count in 1u32..20, bursts in 1usize..5) {
        // With instant responses and no margin, a sliding window sends exactly `count` per
        // period: the quota is used in full.
        let rate = rate(Quota::new(count, Duration::from_secs(1)), 0);
        let arrivals = vec![0; count as usize * bursts];
        let rtts = vec![0; arrivals.len()];
        let sent = simulate(&rate, &arrivals, &rtts, &[], 0);
        for (i, &(s, _)) in sent.iter().enumerate() {
            prop_assert_eq!(s, (i / count as usize) as u64 * SEC);
        }
    }
}
