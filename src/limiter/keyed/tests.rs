//! Server mode's key table against its guarantees: quotas, floods, forgetting, memory.

use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::quota::Quota;

const MS: Nanos = 1_000_000;
const SEC: Nanos = 1_000_000_000;

fn rate(quota: Quota) -> Rate {
    Rate::new(quota, Some(Duration::ZERO))
}

fn passes(verdict: Verdict) -> bool {
    matches!(verdict, Verdict::Pass { .. })
}

/// Admitted times: no window `[t, t + period)` holds more than `count`.
fn assert_windows(admitted: &[Nanos], count: u32, period: Nanos) {
    for (i, &start) in admitted.iter().enumerate() {
        let within = admitted[i..]
            .iter()
            .take_while(|&&t| t < start + period)
            .count();
        assert!(
            within <= count as usize,
            "{within} admitted in [{start}, {start} + {period})"
        );
    }
}

#[test]
fn a_window_refuses_past_its_count_and_names_the_time_it_frees() {
    let rate = rate(Quota::per_minute(3));
    let mut state = KeyState::new(&rate, 0);
    for i in 0..3 {
        assert!(passes(state.hit(&rate, i * SEC, 1)));
    }
    let Verdict::Refuse { until } = state.hit(&rate, 10 * SEC, 1) else {
        panic!("over the quota");
    };
    // The first request's bucket (width 3.75 s) stops counting 17 buckets after it starts.
    assert_eq!(until, 17 * 3_750 * MS);
    assert!(!passes(state.hit(&rate, until - 1, 1)));
    assert!(passes(state.hit(&rate, until, 1)));
}

#[test]
fn a_state_is_the_same_size_at_any_quota() {
    assert!(std::mem::size_of::<KeyState>() <= 88);
    for quota in [Quota::per_minute(600), Quota::per_hour(10_000)] {
        let rate = rate(quota);
        let mut state = KeyState::new(&rate, 0);
        for i in 0..u64::from(quota.count()) {
            assert!(passes(state.hit(&rate, i, 1)));
        }
        assert!(!passes(state.hit(&rate, 10 * SEC, 1)));
    }
}

#[test]
fn gcra_keeps_its_level_in_requests_when_the_rate_changes() {
    let fast = rate(Quota::per_second(10).with_burst(1));
    let slow = rate(Quota::per_second(1).with_burst(1));
    let mut state = KeyState::new(&fast, 0);
    assert!(passes(state.hit(&fast, 0, 1)));
    state.change_rate(&fast, &slow, 0);
    // One request in the bucket drains at the new interval: the next goes a second later.
    assert!(!passes(state.hit(&slow, 100 * MS, 1)));
    assert!(!passes(state.hit(&slow, SEC - 1, 1)));
    assert!(passes(state.hit(&slow, SEC, 1)));
}

#[test]
fn a_window_keeps_its_count_when_the_quota_changes() {
    let wide = rate(Quota::per_minute(10));
    let narrow = rate(Quota::per_minute(2));
    let mut state = KeyState::new(&wide, 0);
    for i in 0..3 {
        assert!(passes(state.hit(&wide, i * SEC, 1)));
    }
    state.change_rate(&wide, &narrow, 5 * SEC);
    assert!(!passes(state.hit(&narrow, 5 * SEC, 1)));
    // Another period and algorithm: what was counted stays counted until it would expire.
    let paced = rate(Quota::per_second(1).with_burst(2));
    state.change_rate(&narrow, &paced, 5 * SEC);
    assert!(!passes(state.hit(&paced, 6 * SEC, 1)));
}

#[test]
fn a_flood_of_fresh_keys_never_frees_a_client_at_its_quota() {
    let rate = rate(Quota::per_hour(100));
    let mut table = KeyTable::new(1_000);
    let client = 0xc1_1e47;
    for i in 0..100 {
        assert!(passes(table.hit(client, &rate, i * MS, 1)));
    }
    assert!(!passes(table.hit(client, &rate, SEC, 1)));
    let mut now = SEC;
    for key in 1..=200_000u64 {
        now += MS / 10;
        let key = RandomState::new().hash_one(key);
        assert!(
            passes(table.hit(key, &rate, now, 1)),
            "fresh key {key} refused at {now}: {:?}",
            table.hit(key, &rate, now, 1)
        );
        assert!(table.len() <= 1_000);
    }
    // Twenty seconds of flood later, the client is still at its quota.
    let Verdict::Refuse { until, .. } = table.hit(client, &rate, now, 1) else {
        panic!("the flood freed a client at its quota");
    };
    assert!(until > 3_600 * SEC);
}

#[test]
fn a_flood_of_keys_one_short_of_their_quota_admits_newcomers_and_frees_no_client_at_its_quota() {
    let rate = rate(Quota::per_hour(20));
    let mut table = KeyTable::new(500);
    let client = 0xc1_1e47;
    for i in 0..20 {
        assert!(passes(table.hit(client, &rate, i * MS, 1)));
    }
    let mut now = SEC;
    for key in 1..=20_000u64 {
        let key = RandomState::new().hash_one(key);
        // Nineteen requests each: as heavy as a client can be and still be forgotten.
        for _ in 0..19 {
            now += MS / 10;
            assert!(
                passes(table.hit(key, &rate, now, 1)),
                "flood key {key} refused"
            );
        }
        assert!(table.len() <= 500);
        assert!(!passes(table.hit(client, &rate, now, 1)));
    }
    // Every count the shadow lost was below the quota.
    assert!(!table.lost.is_empty());
    assert!(table.lost.iter().all(|&(_, used)| used < 20));
}

#[test]
fn a_table_of_clients_at_their_quota_admits_newcomers_and_remembers_whom_it_displaced() {
    let rate = rate(Quota::per_minute(1));
    let mut table = KeyTable::new(10);
    let key = |n: u64| RandomState::new().hash_one(n);
    let clients: Vec<u64> = (1..=10).map(key).collect();
    for (i, &client) in clients.iter().enumerate() {
        assert!(passes(table.hit(client, &rate, (i as u64 + 1) * SEC, 1)));
    }
    // Every tracked client is at its quota: a newcomer is still admitted...
    assert!(passes(table.hit(key(99), &rate, 20 * SEC, 1)));
    assert_eq!(table.len(), 10);
    // ...and the client it displaced (the one that clears first) is refused when it comes
    // back, its count restored from the shadow, as is every other.
    for &client in &clients {
        let Verdict::Refuse { until } = table.hit(client, &rate, 21 * SEC, 1) else {
            panic!("client {client} at its quota was let through");
        };
        assert!(passes(table.hit(client, &rate, until, 1)));
    }
    assert!(table.lost.is_empty());
}

#[test]
fn a_flood_that_sends_each_fresh_key_its_whole_quota_locks_no_newcomer_out() {
    let rate = rate(Quota::per_hour(5));
    let mut table = KeyTable::new(1_000);
    let client = 0xc1_1e47;
    for i in 0..5 {
        assert!(passes(table.hit(client, &rate, i * MS, 1)));
    }
    let mut now = SEC;
    let mut newcomers_refused = 0;
    for key in 1..=20_000u64 {
        let key = RandomState::new().hash_one(key);
        for _ in 0..5 {
            now += MS / 10;
            assert!(passes(table.hit(key, &rate, now, 1)), "flood key refused");
        }
        if key % 100 == 0 {
            let newcomer = RandomState::new().hash_one(("newcomer", key));
            newcomers_refused += usize::from(!passes(table.hit(newcomer, &rate, now, 1)));
        }
        assert!(table.len() <= 1_000);
    }
    assert_eq!(newcomers_refused, 0);
    // The price, documented: a client at its quota is let through only if the shadow lost
    // its count, and then by no more than that count.
    let lost: u32 = table
        .lost
        .iter()
        .filter(|&&(k, _)| k == client)
        .map(|&(_, used)| used)
        .sum();
    let passed = (0..5)
        .filter(|_| passes(table.hit(client, &rate, now, 1)))
        .count() as u32;
    assert!(passed <= lost, "{passed} passed, {lost} lost");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn a_window_never_admits_more_than_its_count_in_any_period(
        count in 1u32..20,
        period_ms in 1u64..2_000,
        gaps in prop::collection::vec(0u64..300, 1..400),
    ) {
        let period = period_ms * MS;
        let rate = rate(Quota::new(count, Duration::from_nanos(period)));
        let mut state = KeyState::new(&rate, 0);
        let mut now = 0;
        let mut admitted = Vec::new();
        for gap in gaps {
            now += gap * MS / 7;
            if passes(state.hit(&rate, now, 1)) {
                admitted.push(now);
            }
        }
        assert_windows(&admitted, count, period);
    }

    #[test]
    fn a_client_pacing_at_ninety_percent_is_never_refused(
        count in 1u32..2_000,
        period_ms in 1u64..3_600_000,
        start in 0u64..10_000_000_000,
        gcra in any::<bool>(),
    ) {
        let period = period_ms * MS;
        let mut quota = Quota::new(count, Duration::from_nanos(period));
        if gcra {
            quota = quota.with_burst(1);
        }
        let rate = rate(quota);
        let spacing = (u128::from(period) * 10).div_ceil(9 * u128::from(count)) as u64;
        let mut state = KeyState::new(&rate, start);
        for i in 0..u64::from(count.min(300)) * 3 {
            let verdict = state.hit(&rate, start + i * spacing, 1);
            prop_assert!(passes(verdict), "request {i} refused: {verdict:?}");
        }
    }

    #[test]
    fn a_refused_client_is_admitted_when_it_comes_back_as_told(
        count in 1u32..10,
        period_ms in 1u64..1_000,
        burst in prop::option::of(1u32..5),
        gaps in prop::collection::vec(0u64..200, 1..100),
    ) {
        let mut quota = Quota::new(count, Duration::from_millis(period_ms));
        if let Some(burst) = burst {
            quota = quota.with_burst(burst);
        }
        let rate = rate(quota);
        let mut state = KeyState::new(&rate, 0);
        let mut now = 0;
        for gap in gaps {
            now += gap * MS / 3;
            if let Verdict::Refuse { until, .. } = state.hit(&rate, now, 1) {
                prop_assert!(until > now);
                let mut early = state;
                prop_assert!(!passes(early.hit(&rate, until - 1, 1)));
                let mut back = state;
                prop_assert!(passes(back.hit(&rate, until, 1)));
            }
        }
    }

    #[test]
    fn forgetting_lets_a_client_exceed_its_quota_only_by_what_the_shadow_lost(
        count in 2u32..40,
        capacity in 1usize..12,
        clients in 2u64..200,
        requests in prop::collection::vec((0u64..1_000, 0u64..50), 1..2_000),
    ) {
        let period = 500 * MS;
        let rate = rate(Quota::new(count, Duration::from_nanos(period)));
        let below = forgettable_below(&rate) as usize;
        let mut table = KeyTable::new(capacity);
        let mut admitted: std::collections::HashMap<u64, Vec<Nanos>> = Default::default();
        let mut told: std::collections::HashMap<u64, Nanos> = Default::default();
        let mut now = 0;
        for (client, gap) in requests {
            now += gap * MS / 10;
            let key = (client % clients).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            match table.hit(key, &rate, now, 1) {
                Verdict::Pass { .. } => {
                    admitted.entry(key).or_default().push(now);
                    told.remove(&key);
                }
                Verdict::Refuse { until } => {
                    // A client that comes back when told is admitted, forgotten meanwhile or
                    // not.
                    prop_assert!(told.get(&key).is_none_or(|&at| now < at));
                    told.insert(key, until);
                }
            }
            prop_assert!(table.len() <= capacity);
        }
        for (key, times) in &admitted {
            // A client exceeds its quota by no more than the counts the shadow dropped, each
            // of them at most its quota.
            let lost: u32 = table.lost.iter().filter(|&&(k, _)| k == *key).map(|&(_, used)| used).sum();
            prop_assert!(table.lost.iter().all(|&(_, used)| used <= below as u32 + 1));
            assert_windows(times, count + lost, period);
        }
    }
}

#[test]
fn the_shadow_uses_all_its_buckets_for_the_keys_of_one_shard() {
    let mut table = KeyTable::new(256);
    table.shadow = vec![Shadow::default(); 256].into_boxed_slice();
    // The keys of one shard share their lowest four bits.
    let keys = (0..4_096u64).map(|i| RandomState::new().hash_one(i) & !0xf);
    let mut first = std::collections::HashSet::new();
    let mut second = std::collections::HashSet::new();
    for key in keys {
        let [a, b] = table.buckets(key);
        first.insert(a);
        second.insert(b);
    }
    assert_eq!((first.len(), second.len()), (64, 64));
}

#[test]
fn a_full_quota_flood_never_lets_through_a_client_it_displaced() {
    // Before: the shadow dropped a count for any as heavy that cleared later, though its other
    // cell was free, and a client at its quota went through in five trials of five.
    for trial in 0..5u64 {
        let rate = rate(Quota::per_hour(5));
        let mut table = KeyTable::new(1_000);
        let victim = RandomState::new().hash_one(("victim", trial));
        for i in 0..5 {
            assert!(passes(table.hit(victim, &rate, i * MS, 1)));
        }
        let mut now = SEC;
        let mut told = None;
        for n in 1..=16_000u64 {
            let key = RandomState::new().hash_one((trial, n));
            for _ in 0..5 {
                now += MS / 10;
                assert!(passes(table.hit(key, &rate, now, 1)), "flood key refused");
            }
            // The victim tries again now and then, and is refused each time with the same
            // truthful time.
            if n % 500 == 0 {
                let Verdict::Refuse { until } = table.hit(victim, &rate, now, 1) else {
                    panic!("trial {trial}: the victim went through after {n} flood keys");
                };
                assert_eq!(*told.get_or_insert(until), until);
            }
        }
        let until = told.expect("refused");
        assert!(!passes(table.hit(victim, &rate, until - 1, 1)));
        assert!(passes(table.hit(victim, &rate, until, 1)));
        assert!(table.lost.iter().all(|&(k, _)| k != victim));
    }
}

#[test]
fn a_client_told_when_to_come_back_is_admitted_then_though_forgotten_meanwhile() {
    // Before: the shadow kept one time per client, the last request's, and a client told to
    // come back in 2,025 s was refused again then, for 1,800 s more.
    let rate = rate(Quota::per_hour(4));
    let mut table = KeyTable::new(1);
    let client = 1 << 40;
    for quarter in 0..4 {
        assert!(passes(table.hit(client, &rate, quarter * 900 * SEC, 1)));
    }
    let Verdict::Refuse { until } = table.hit(client, &rate, 3_000 * SEC, 1) else {
        panic!("over the quota");
    };
    // A newcomer takes the only place: the client goes to the shadow.
    assert!(passes(table.hit(2 << 40, &rate, 3_001 * SEC, 1)));
    assert!(!passes(table.hit(client, &rate, until - 1, 1)));
    assert!(passes(table.hit(client, &rate, until, 1)));
    // Restored, it still counts the other three until they clear, and no fewer.
    assert!(!passes(table.hit(client, &rate, until, 1)));
}

#[test]
fn a_flood_costs_a_few_clients_looked_at_per_fresh_key() {
    // Before: a newcomer below its quota made the next one scan the whole table, so a flood
    // that sent each fresh key its whole quota scanned the table once per key.
    for (quota, keys) in [
        (Quota::per_hour(5), 40_000u64),
        (Quota::per_minute(5), 40_000),
    ] {
        let rate = rate(quota);
        let capacity = 4_096;
        let mut table = KeyTable::new(capacity);
        let mut now = 0;
        for n in 0..keys {
            let key = RandomState::new().hash_one(n);
            for _ in 0..5 {
                // Ten minutes of flood in all.
                now += 3 * MS;
                assert!(passes(table.hit(key, &rate, now, 1)), "flood key refused");
            }
        }
        let newcomers = keys as usize - capacity;
        eprintln!(
            "{quota:?}: {} clients looked at for {newcomers} newcomers",
            table.scanned
        );
        assert!(
            table.scanned <= capacity + 32 * newcomers,
            "{quota:?}: {} clients looked at for {newcomers} newcomers",
            table.scanned
        );
    }
}

#[test]
fn a_paced_client_told_when_to_come_back_is_admitted_then_though_forgotten_meanwhile() {
    // Before: a paced client was restored at the level it had when forgotten, counted from
    // its return, and refused again at the time it was told, with the same Retry-After.
    let rate = rate(Quota::per_hour(4).with_burst(4));
    let mut table = KeyTable::new(1);
    let client = 1 << 40;
    for _ in 0..4 {
        assert!(passes(table.hit(client, &rate, 0, 1)));
    }
    let Verdict::Refuse { until } = table.hit(client, &rate, SEC, 1) else {
        panic!("over the burst");
    };
    assert!(passes(table.hit(2 << 40, &rate, 2 * SEC, 1)));
    assert!(!passes(table.hit(client, &rate, until - 1, 1)));
    assert!(passes(table.hit(client, &rate, until, 1)));
    assert!(!passes(table.hit(client, &rate, until, 1)));
}

#[test]
fn a_quota_changed_to_gcra_keeps_what_each_client_used() {
    // Before: a change from a sliding window to GCRA set each client's TAT to the time its
    // window cleared, so a client that had sent one request under per_hour(100) was refused
    // for an hour under per_second(10).
    let old = rate(Quota::per_hour(100));
    let new = rate(Quota::per_second(10).with_burst(10));
    let mut table = KeyTable::new(2);
    let (light, heavy, forgotten) = (1 << 40, 2 << 40, 3 << 40);
    for _ in 0..20 {
        assert!(passes(table.hit(forgotten, &old, 0, 1)));
    }
    for _ in 0..100 {
        assert!(passes(table.hit(heavy, &old, 0, 1)));
    }
    assert!(passes(table.hit(light, &old, 0, 1)));
    // The table holds two: `forgotten`, the less used, waits in the shadow.
    assert!(table.keys.contains_key(&light) && table.keys.contains_key(&heavy));
    table.change_rate(&old, &new, SEC);
    // One used: nine more now.
    for _ in 0..9 {
        assert!(passes(table.hit(light, &new, SEC, 1)));
    }
    assert!(!passes(table.hit(light, &new, SEC, 1)));
    // A hundred used: the bucket's level, drained at a tenth of a second a request.
    let Verdict::Refuse { until } = table.hit(heavy, &new, SEC, 1) else {
        panic!("a hundred used");
    };
    assert_eq!(until, SEC + 91 * SEC / 10);
    // Twenty used, forgotten meanwhile: the same, from the shadow.
    let Verdict::Refuse { until } = table.hit(forgotten, &new, SEC, 1) else {
        panic!("twenty used");
    };
    assert_eq!(until, SEC + 11 * SEC / 10);
}
