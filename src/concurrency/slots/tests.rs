use std::collections::{BTreeSet, HashSet};
use std::task::Waker;

use proptest::prelude::*;

use super::*;

const SEC: Nanos = 1_000_000_000;
const LEASE: Nanos = 600 * SEC;

fn waker() -> &'static Waker {
    Waker::noop()
}

#[test]
fn a_free_slot_is_taken_at_once_and_the_plan_plus_one_th_waits() {
    let mut slots = Slots::new(2, LEASE);
    assert!(slots.try_take(0).is_some());
    assert!(slots.try_take(0).is_some());
    assert_eq!(slots.try_take(0), None);
    let ticket = slots.join();
    assert_eq!(slots.poll_take(ticket, 0, waker()), Err(None));
    assert_eq!(slots.in_use(), 2);
}

#[test]
fn every_release_path_frees_the_slot_once() {
    let mut slots = Slots::new(10, LEASE);
    let failed = slots.try_take(0).unwrap();
    slots.release(failed, Release::Failed);
    slots.release(failed, Release::Failed);
    assert_eq!(slots.in_use(), 0);

    let a = slots.try_take(0).unwrap();
    slots.bind(a, "a", 0);
    assert!(slots.finish("a", Release::Finished));
    assert!(!slots.finish("a", Release::Finished));

    let b = slots.try_take(0).unwrap();
    slots.bind(b, "b", 0);
    let c = slots.try_take(0).unwrap();
    slots.unknown(c);
    assert_eq!(slots.in_use(), 2);
    // The list shows neither: b is over and c's outcome is accounted for.
    slots.reconcile(["x"], SEC, SEC);
    assert_eq!(slots.in_use(), 1, "x, another process's job, takes a slot");
    assert!(slots.is_held("x"));

    let d = slots.try_take(SEC).unwrap();
    slots.bind(d, "d", SEC);
    assert_eq!(slots.expire(SEC + LEASE - 1), Some(SEC + LEASE));
    slots.expire(SEC + LEASE);
    assert_eq!(slots.in_use(), 0);

    let releases: Vec<Release> = slots.log.iter().map(|r| r.2).collect();
    assert_eq!(
        releases,
        [
            Release::Failed,
            Release::Finished,
            Release::Reconciled,
            Release::Reconciled,
            Release::Expired,
            Release::Expired
        ]
    );
}

#[test]
fn a_job_listed_first_is_held_once_when_its_create_is_answered() {
    let mut slots = Slots::new(3, LEASE);
    let hold = slots.try_take(0).unwrap();
    slots.seen_active("a", 0);
    assert_eq!(slots.in_use(), 2);
    slots.bind(hold, "a", 0);
    assert_eq!(slots.in_use(), 1);
    // A stale list showing a finished job does not take it back.
    slots.finish("a", Release::Finished);
    slots.seen_active("a", SEC);
    assert_eq!(slots.in_use(), 0);
}

#[test]
fn reconcile_leaves_holds_newer_than_the_list() {
    let mut slots = Slots::new(3, LEASE);
    let old = slots.try_take(0).unwrap();
    slots.bind(old, "old", 0);
    let new = slots.try_take(5 * SEC).unwrap();
    slots.bind(new, "new", 5 * SEC);
    slots.reconcile(std::iter::empty(), 2 * SEC, 6 * SEC);
    assert!(!slots.is_held("old"));
    assert!(slots.is_held("new"));
}

#[test]
fn more_slots_admit_waiters_in_order_fewer_wait_for_jobs_to_end() {
    let mut slots = Slots::new(1, LEASE);
    let first = slots.try_take(0).unwrap();
    slots.bind(first, "first", 0);
    let t1 = slots.join();
    let t2 = slots.join();
    assert!(slots.poll_take(t2, 0, waker()).is_err(), "not its turn");
    slots.set_limit(3);
    assert!(slots.poll_take(t1, 0, waker()).is_ok());
    assert!(slots.poll_take(t2, 0, waker()).is_ok());
    assert_eq!(slots.in_use(), 3);
    slots.set_limit(1);
    slots.finish("first", Release::Finished);
    assert_eq!(slots.try_take(0), None, "2 held, plan of 1");
}

#[derive(Debug, Clone)]
enum Op {
    Join,
    Poll(usize),
    Leave(usize),
    Fail(usize),
    Unknown(usize),
    Bind(usize, u8),
    Finish(u8),
    SeenActive(u8),
    Reconcile(Vec<u8>),
    Advance(u32),
    SetLimit(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Join),
        4 => any::<usize>().prop_map(Op::Poll),
        1 => any::<usize>().prop_map(Op::Leave),
        1 => any::<usize>().prop_map(Op::Fail),
        1 => any::<usize>().prop_map(Op::Unknown),
        3 => (any::<usize>(), 0u8..12).prop_map(|(h, j)| Op::Bind(h, j)),
        2 => (0u8..12).prop_map(Op::Finish),
        1 => (12u8..16).prop_map(Op::SeenActive),
        1 => proptest::collection::vec(0u8..16, 0..6).prop_map(Op::Reconcile),
        1 => (0u32..400).prop_map(Op::Advance),
        1 => (1usize..5).prop_map(Op::SetLimit),
    ]
}

fn pick<T: Copy>(items: &[T], i: usize) -> Option<T> {
    (!items.is_empty()).then(|| items[i % items.len()])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Under random interleavings of creates, failures, completions, status reports,
    /// reconciles, lease expiries and cancellations: admission never takes the slots in use
    /// past the plan, waiters are admitted strictly in order, every hold is released at most
    /// once, and once every job ends every waiter gets its slot.
    #[test]
    fn slots_hold_the_plan_release_once_and_starve_no_one(
        limit in 1usize..5,
        ops in proptest::collection::vec(op(), 1..120),
    ) {
        let mut slots = Slots::new(limit, LEASE);
        let mut now: Nanos = 0;
        let mut waiting: BTreeSet<u64> = BTreeSet::new();
        let mut holds: Vec<HoldId> = Vec::new(); // in flight
        let mut limit = limit;
        for op in ops {
            match op {
                Op::Join => {
                    waiting.insert(slots.join());
                }
                Op::Poll(i) => {
                    let tickets: Vec<u64> = waiting.iter().copied().collect();
                    if let Some(ticket) = pick(&tickets, i) {
                        let before = slots.in_use();
                        if let Ok(hold) = slots.poll_take(ticket, now, waker()) {
                            prop_assert_eq!(Some(&ticket), waiting.first(), "admitted out of turn");
                            prop_assert!(before < limit, "admitted with {} of {} in use", before, limit);
                            waiting.remove(&ticket);
                            holds.push(hold);
                        }
                    }
                }
                Op::Leave(i) => {
                    let tickets: Vec<u64> = waiting.iter().copied().collect();
                    if let Some(ticket) = pick(&tickets, i) {
                        slots.leave(ticket);
                        waiting.remove(&ticket);
                    }
                }
                Op::Fail(i) => {
                    if let Some(hold) = pick(&holds, i) {
                        slots.release(hold, Release::Failed);
                        holds.retain(|&h| h != hold);
                    }
                }
                Op::Unknown(i) => {
                    if let Some(hold) = pick(&holds, i) {
                        slots.unknown(hold);
                        holds.retain(|&h| h != hold);
                    }
                }
                Op::Bind(i, job) => {
                    if let Some(hold) = pick(&holds, i) {
                        slots.bind(hold, &job.to_string(), now);
                        holds.retain(|&h| h != hold);
                    }
                }
                Op::Finish(job) => {
                    slots.finish(&job.to_string(), Release::Finished);
                }
                Op::SeenActive(job) => slots.seen_active(&job.to_string(), now),
                Op::Reconcile(active) => {
                    let ids: Vec<String> = active.iter().map(u8::to_string).collect();
                    slots.reconcile(ids.iter().map(String::as_str), now, now);
                }
                Op::Advance(secs) => {
                    now += Nanos::from(secs) * SEC;
                    slots.expire(now);
                }
                Op::SetLimit(n) => {
                    limit = n;
                    slots.set_limit(n);
                }
            }
        }

        // Every hold is released at most once.
        let mut released_holds = HashSet::new();
        for (hold, _, _) in &slots.log {
            if let Some(hold) = hold {
                prop_assert!(released_holds.insert(*hold), "hold {} released twice", hold);
            }
        }
        // Everything ends: the jobs, the creates in flight, the unknown outcomes.
        for hold in holds.drain(..) {
            slots.release(hold, Release::Failed);
        }
        now += LEASE;
        slots.reconcile(std::iter::empty(), now, now);
        prop_assert_eq!(slots.in_use(), 0);
        // Then every waiter gets its slot, in order.
        for ticket in waiting.iter().copied().collect::<Vec<_>>() {
            let hold = slots.poll_take(ticket, now, waker());
            prop_assert!(hold.is_ok(), "waiter {} starved", ticket);
            if let Ok(hold) = hold {
                slots.release(hold, Release::Failed);
            }
        }
    }
}
