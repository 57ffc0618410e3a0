//! Property tests of the backoff schedule: no valid setting, attempt number, server hint or
//! deadline makes a wait panic, exceed `max_delay`, undercut what the server asked or reach
//! the deadline.

use std::time::Duration;

use proptest::prelude::*;

use super::schedule::{GiveUp, MIN_WAIT};
use super::{Backoff429, Jitter, Schedule};

/// Durations from nothing to `Duration::MAX`, the edges often.
fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::MAX),
        (0u64..5_000_000).prop_map(Duration::from_nanos),
        (0u64..100_000_000_000_000).prop_map(Duration::from_nanos),
        (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        (u64::MAX - 1000..=u64::MAX, 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
    ]
}

fn factor() -> impl Strategy<Value = f64> {
    prop_oneof![Just(1.0), Just(f64::MAX), 1.0..4.0f64, 1.0..f64::MAX,]
}

fn jitter() -> impl Strategy<Value = Jitter> {
    prop_oneof![
        Just(Jitter::None),
        Just(Jitter::Full),
        Just(Jitter::Equal),
        Just(Jitter::Decorrelated),
    ]
}

/// A schedule from any values (most of them valid).
fn schedule() -> impl Strategy<Value = Schedule> {
    (duration(), duration(), factor(), any::<u32>(), jitter()).prop_map(
        |(base, extra, factor, max_retries, jitter)| {
            Schedule::new()
                .base_delay(base)
                .max_delay(base.saturating_add(extra))
                .factor(factor)
                .max_retries(max_retries)
                .jitter(jitter)
        },
    )
}

/// A random number in `[0, 1)` as the layer makes them, the edges often.
fn unit() -> impl Strategy<Value = f64> {
    prop_oneof![Just(0u64), Just(u64::MAX), any::<u64>()]
        .prop_map(|bits| (bits >> 11) as f64 / (1u64 << 53) as f64)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// Every wait of a valid schedule is at least a millisecond and what the server asked,
    /// at most `max_delay` and short of the deadline; a server asking for more than
    /// `max_delay` gets none.
    #[test]
    fn waits_stay_within_their_bounds(
        schedule in schedule(),
        retry in prop_oneof![1u32..10, any::<u32>()],
        previous in duration(),
        unit in unit(),
        hint in proptest::option::of(duration()),
        left in proptest::option::of(duration()),
    ) {
        prop_assume!(schedule.validate().is_ok());
        let max_delay = schedule.max_delay;
        let wait = schedule.wait(retry, previous, unit);
        prop_assert!(wait >= MIN_WAIT && wait <= max_delay, "wait {wait:?}, max_delay {max_delay:?}");
        match schedule.next_wait(retry, previous, unit, hint, left) {
            Ok(wait) => {
                prop_assert!(retry <= schedule.max_retries);
                prop_assert!(wait >= MIN_WAIT && wait <= max_delay, "wait {wait:?}, max_delay {max_delay:?}");
                prop_assert!(wait >= hint.unwrap_or_default(), "wait {wait:?}, asked {hint:?}");
                prop_assert!(left.is_none_or(|left| wait < left), "wait {wait:?}, left {left:?}");
            }
            Err(GiveUp::NoRetriesLeft) => prop_assert!(retry > schedule.max_retries),
            Err(GiveUp::ServerAsksTooLong) => prop_assert!(hint.is_some_and(|h| h > max_delay)),
            Err(GiveUp::PastDeadline(wait)) => {
                prop_assert!(left.is_some_and(|left| wait >= left));
            }
        }
    }

    /// Without jitter the wait is the nominal delay: `base × factor^(n-1)`, capped.
    #[test]
    fn without_jitter_the_wait_is_the_capped_exponential(
        schedule in schedule(),
        retry in 1u32..64,
    ) {
        let schedule = schedule.jitter(Jitter::None);
        prop_assume!(schedule.validate().is_ok());
        let exact = schedule.base_delay.as_secs_f64() * schedule.factor.powi(retry as i32 - 1);
        let expected = exact.min(schedule.max_delay.as_secs_f64());
        let wait = schedule.wait(retry, Duration::ZERO, 0.5);
        prop_assert!(wait <= schedule.max_delay);
        // As exact as floating point goes (huge durations lose their nanoseconds).
        let error = (wait.as_secs_f64() - expected).abs();
        prop_assert!(error <= expected * 1e-9 + 1e-9, "{wait:?} for {expected} s");
    }

    /// Any layer whose settings validate builds a service; none panics doing so.
    #[test]
    fn any_valid_layer_validates_without_panic(
        rate in schedule(),
        concurrency in proptest::option::of(schedule()),
        deadline in proptest::option::of(duration()),
        max_body in prop_oneof![Just(0usize), Just(usize::MAX), 0usize..(32 << 20)],
        max_read_frames in any::<usize>(),
        max_read_time in duration(),
    ) {
        // From a preset that tells concurrency 429s apart, which a concurrency schedule needs.
        let mut backoff = crate::presets::sync::backoff()
            .schedule(rate)
            .max_body(max_body)
            .max_read_frames(max_read_frames)
            .max_read_time(max_read_time);
        if let Some(concurrency) = concurrency {
            backoff = backoff.concurrency_schedule(concurrency);
        }
        if let Some(deadline) = deadline {
            backoff = backoff.deadline(deadline);
        }
        let valid = backoff.validate().is_ok();
        prop_assert_eq!(
            valid,
            rate.validate().is_ok()
                && concurrency.is_none_or(|c| c.validate().is_ok())
                && deadline.is_none_or(|d| !d.is_zero())
                && max_body <= 16 << 20
        );
    }
}

#[test]
fn a_concurrency_schedule_without_a_classifier_is_invalid() {
    let schedule = Schedule::new().base_delay(Duration::from_secs(15));
    let error = Backoff429::new()
        .concurrency_schedule(schedule)
        .validate()
        .unwrap_err();
    assert!(
        error.to_string().contains("concurrency_schedule"),
        "{error}"
    );
    let classified = Backoff429::new()
        .concurrency_schedule(schedule)
        .classify(crate::presets::sync::error_code);
    assert!(classified.validate().is_ok());
}

#[test]
fn a_base_delay_under_a_millisecond_is_invalid() {
    let schedule = Schedule::new().base_delay(Duration::from_micros(999));
    assert!(schedule.validate().is_err());
    let schedule = Schedule::new().base_delay(MIN_WAIT).max_delay(MIN_WAIT);
    assert!(schedule.validate().is_ok());
}
