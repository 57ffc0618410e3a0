//! A plan's slots against a model of them, and fixed cases.

use std::collections::{BTreeMap, HashSet};
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
    assert!(slots.try_take(1, || 0));
    assert!(slots.try_take(1, || 0));
    assert!(!slots.try_take(1, || 0));
    let ticket = slots.join();
    assert_eq!(slots.poll_take(ticket, 0, waker()), Err(None));
    assert_eq!(slots.in_use(), 2);
}

#[test]
fn every_release_path_frees_the_slot_once() {
    let mut slots = Slots::new(10, LEASE);
    assert!(slots.try_take(1, || 0));
    slots.release(ReleaseReason::Failed);
    assert_eq!(slots.in_use(), 0);

    slots.try_take(1, || 0);
    slots.bind("a", 0);
    assert!(slots.end_job("a", ReleaseReason::Finished));
    assert!(!slots.end_job("a", ReleaseReason::Finished));

    slots.try_take(1, || 0);
    slots.bind("b", 0);
    slots.try_take(1, || 0);
    slots.unknown(0, None);
    assert_eq!(slots.in_use(), 2);
    // The list shows neither: b is over and the unknown outcome made no job.
    slots.reconcile(["x"], SEC, SEC);
    assert_eq!(slots.in_use(), 1, "x, another process's job, takes a slot");
    assert!(slots.is_held("x"));

    slots.try_take(1, || SEC);
    slots.bind("d", SEC);
    assert_eq!(slots.expire(SEC + LEASE - 1), Some(SEC + LEASE));
    slots.expire(SEC + LEASE);
    assert_eq!(slots.in_use(), 0);

    assert_eq!(
        slots.log,
        [
            ReleaseReason::Failed,
            ReleaseReason::Finished,
            ReleaseReason::Reconciled,
            ReleaseReason::Reconciled,
            ReleaseReason::Expired,
            ReleaseReason::Expired
        ]
    );
}

#[test]
fn leases_are_only_looked_at_when_no_slot_is_free() {
    let mut slots = Slots::new(1, LEASE);
    slots.try_take(1, || 0);
    slots.bind("old", 0);
    assert!(!slots.try_take(1, || LEASE - 1));
    assert!(
        slots.try_take(1, || LEASE),
        "the expired lease frees the slot"
    );
    let mut slots = Slots::new(2, LEASE);
    assert!(slots.try_take(1, || unreachable!("a free slot needs no clock")));
}

#[test]
fn a_job_listed_first_is_held_once_when_its_create_is_answered() {
    let mut slots = Slots::new(3, LEASE);
    slots.try_take(1, || 0);
    slots.seen_active("a", 0);
    assert_eq!(slots.in_use(), 2);
    slots.bind("a", 0);
    assert_eq!(slots.in_use(), 1);
    // A stale list showing a finished job does not take it back.
    slots.end_job("a", ReleaseReason::Finished);
    slots.seen_active("a", SEC);
    assert_eq!(slots.in_use(), 0);
}

#[test]
fn reconcile_leaves_holds_newer_than_the_list() {
    let mut slots = Slots::new(3, LEASE);
    slots.try_take(1, || 0);
    slots.bind("old", 0);
    slots.try_take(1, || 5 * SEC);
    slots.bind("new", 5 * SEC);
    slots.reconcile(std::iter::empty(), 2 * SEC, 6 * SEC);
    assert!(!slots.is_held("old"));
    assert!(slots.is_held("new"));
}

#[test]
fn more_slots_admit_waiters_in_order_fewer_wait_for_jobs_to_end() {
    let mut slots = Slots::new(1, LEASE);
    slots.try_take(1, || 0);
    slots.bind("first", 0);
    let t1 = slots.join();
    let t2 = slots.join();
    assert!(slots.poll_take(t2, 0, waker()).is_err(), "not its turn");
    slots.set_limit(3);
    assert!(slots.poll_take(t1, 0, waker()).is_ok());
    assert!(slots.poll_take(t2, 0, waker()).is_ok());
    assert_eq!(slots.in_use(), 3);
    slots.set_limit(1);
    slots.end_job("first", ReleaseReason::Finished);
    assert!(!slots.try_take(1, || 0), "2 held, plan of 1");
}

#[derive(Debug, Clone)]
enum Step {
    /// A create of this many jobs joins the queue.
    Join(usize),
    Poll(usize),
    Leave(usize),
    Fail,
    Unknown,
    Bind(u8),
    Finish(u8),
    SeenActive(u8),
    Reconcile(Vec<u8>),
    Advance(u32),
    SetLimit(usize),
}

fn op() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => prop_oneof![3 => Just(1usize), 1 => 2usize..5].prop_map(Step::Join),
        4 => any::<usize>().prop_map(Step::Poll),
        1 => any::<usize>().prop_map(Step::Leave),
        1 => Just(Step::Fail),
        1 => Just(Step::Unknown),
        3 => (0u8..12).prop_map(Step::Bind),
        2 => (0u8..12).prop_map(Step::Finish),
        1 => (12u8..16).prop_map(Step::SeenActive),
        1 => proptest::collection::vec(0u8..16, 0..6).prop_map(Step::Reconcile),
        1 => (0u32..400).prop_map(Step::Advance),
        1 => (1usize..5).prop_map(Step::SetLimit),
    ]
}

/// What the slots should hold, kept the simple way.
#[derive(Default)]
struct Model {
    in_flight: usize,
    unknown: Vec<Nanos>,
    jobs: std::collections::HashMap<String, Nanos>,
    finished: HashSet<String>,
}

impl Model {
    fn in_use(&self) -> usize {
        self.in_flight + self.unknown.len() + self.jobs.len()
    }

    fn end_job(&mut self, id: &str) -> bool {
        let held = self.jobs.remove(id).is_some();
        if held {
            self.finished.insert(id.to_owned());
        }
        held
    }

    fn seen_active(&mut self, id: &str, now: Nanos) {
        if !self.jobs.contains_key(id) && !self.finished.contains(id) {
            self.jobs.insert(id.to_owned(), now);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Under random interleavings of creates, failures, completions, status reports,
    /// reconciles, lease expiries and cancellations: admission never takes the slots in use
    /// past the plan, waiters are admitted strictly in order, the slots hold exactly what a
    /// plain model of them holds after every step (so each is released exactly once), and
    /// once every job ends every waiter gets its slot.
    #[test]
    fn slots_hold_the_plan_release_once_and_starve_no_one(
        limit in 1usize..5,
        ops in proptest::collection::vec(op(), 1..120),
    ) {
        let mut slots = Slots::new(limit, LEASE);
        let mut model = Model::default();
        let mut now: Nanos = 0;
        let mut waiting: BTreeMap<Ticket, usize> = BTreeMap::new();
        let mut limit = limit;
        for op in ops {
            match op {
                Step::Join(jobs) => {
                    waiting.insert(slots.join(), jobs);
                }
                Step::Poll(i) => {
                    let tickets: Vec<Ticket> = waiting.keys().copied().collect();
                    if !tickets.is_empty() {
                        let ticket = tickets[i % tickets.len()];
                        let jobs = waiting[&ticket];
                        if jobs <= limit {
                            // The slots expire leases first, as the model must.
                            model.jobs.retain(|_, &mut since| since + LEASE > now);
                            model.unknown.retain(|&since| since + LEASE > now);
                        }
                        let before = model.in_use();
                        match slots.poll_take_jobs(ticket, jobs, now, waker()) {
                            Turn::Taken => {
                                prop_assert_eq!(Some(&ticket), waiting.keys().next(), "admitted out of turn");
                                prop_assert!(before + jobs <= limit, "admitted {} with {} of {} in use", jobs, before, limit);
                                waiting.remove(&ticket);
                                model.in_flight += jobs;
                            }
                            Turn::Never => {
                                prop_assert!(jobs > limit);
                                slots.leave(ticket);
                                waiting.remove(&ticket);
                            }
                            Turn::Wait(_) => {}
                        }
                    }
                }
                Step::Leave(i) => {
                    let tickets: Vec<Ticket> = waiting.keys().copied().collect();
                    if !tickets.is_empty() {
                        let ticket = tickets[i % tickets.len()];
                        slots.leave(ticket);
                        waiting.remove(&ticket);
                    }
                }
                Step::Fail if model.in_flight > 0 => {
                    slots.release(ReleaseReason::Failed);
                    model.in_flight -= 1;
                }
                Step::Unknown if model.in_flight > 0 => {
                    slots.unknown(now, None);
                    model.in_flight -= 1;
                    model.unknown.push(now);
                }
                Step::Bind(job) if model.in_flight > 0 => {
                    let id = job.to_string();
                    slots.bind(&id, now);
                    model.in_flight -= 1;
                    model.seen_active(&id, now);
                }
                Step::Fail | Step::Unknown | Step::Bind(_) => {}
                Step::Finish(job) => {
                    let id = job.to_string();
                    prop_assert_eq!(slots.end_job(&id, ReleaseReason::Finished), model.end_job(&id));
                }
                Step::SeenActive(job) => {
                    let id = job.to_string();
                    slots.seen_active(&id, now);
                    model.seen_active(&id, now);
                }
                Step::Reconcile(active) => {
                    let ids: Vec<String> = active.iter().map(u8::to_string).collect();
                    slots.reconcile(ids.iter().map(String::as_str), now, now);
                    let gone: Vec<String> = model
                        .jobs
                        .iter()
                        .filter(|(id, &since)| since < now && !ids.contains(id))
                        .map(|(id, _)| id.clone())
                        .collect();
                    for id in gone {
                        model.end_job(&id);
                    }
                    model.unknown.retain(|&since| since >= now);
                    for id in &ids {
                        model.seen_active(id, now);
                    }
                }
                Step::Advance(secs) => {
                    now += Nanos::from(secs) * SEC;
                    slots.expire(now);
                    let expired: Vec<String> = model
                        .jobs
                        .iter()
                        .filter(|(_, &since)| since + LEASE <= now)
                        .map(|(id, _)| id.clone())
                        .collect();
                    for id in expired {
                        model.end_job(&id);
                    }
                    model.unknown.retain(|&since| since + LEASE > now);
                }
                Step::SetLimit(n) => {
                    limit = n;
                    slots.set_limit(n);
                }
            }
            prop_assert_eq!(slots.in_use(), model.in_use());
        }

        // Everything ends: the creates in flight fail, the jobs and unknown outcomes go.
        for _ in 0..model.in_flight {
            slots.release(ReleaseReason::Failed);
        }
        now += LEASE;
        slots.reconcile(std::iter::empty(), now, now);
        prop_assert_eq!(slots.in_use(), 0);
        // Then every waiter gets its slots, in order, or hears it never will (more jobs than
        // the plan).
        for (ticket, jobs) in waiting {
            match slots.poll_take_jobs(ticket, jobs, now, waker()) {
                Turn::Taken => slots.release_many(jobs, ReleaseReason::Failed),
                Turn::Never if jobs > limit => slots.leave(ticket),
                taken => prop_assert!(false, "waiter {:?} of {} starved: {:?}", ticket, jobs, taken),
            }
        }
    }
}

#[test]
fn a_job_completed_before_its_id_was_known_gives_its_slot_back_when_it_shows() {
    let mut slots = Slots::new(10, LEASE);
    assert!(
        !slots.complete_early("x", 0),
        "no create in flight: nothing to wait for"
    );
    assert!(slots.try_take(1, || 0));
    assert!(slots.complete_early("a", 0));
    assert_eq!(slots.bind("a", SEC), Bound::Completed);
    assert_eq!(slots.in_use(), 0);
    slots.seen_active("a", SEC);
    assert_eq!(slots.in_use(), 0, "a stale list does not take it back");
    assert_eq!(slots.log, [ReleaseReason::Completed]);

    // Remembered for the lease only.
    slots.try_take(1, || SEC);
    assert!(slots.complete_early("b", SEC));
    assert_eq!(slots.bind("b", SEC + LEASE), Bound::Held);
    assert_eq!(slots.early_len(), 0);

    // And only the last EARLY_COMPLETES ids.
    let now = 2 * SEC;
    slots.try_take(1, || now);
    for i in 0..=EARLY_COMPLETES {
        slots.complete_early(&i.to_string(), now);
    }
    assert_eq!(slots.early_len(), EARLY_COMPLETES);
    assert_eq!(
        slots.bind("0", now),
        Bound::Held,
        "the oldest was forgotten"
    );
    slots.try_take(1, || now);
    assert_eq!(slots.bind("1", now), Bound::Completed);
    assert_eq!(slots.in_use(), 2, "b and 0");
}

#[test]
fn a_create_sent_again_with_its_key_takes_over_its_unknown_outcome() {
    let mut slots = Slots::new(1, LEASE);
    assert!(slots.try_take(1, || 0));
    slots.unknown(0, Some("key-1".into()));
    let ticket = slots.join(); // another create waits for the one slot
    assert!(
        !slots.take_over("key-2", 1),
        "another key is another create"
    );
    assert!(slots.take_over("key-1", 1));
    assert_eq!((slots.in_use(), slots.creates()), (1, (1, 0)));
    assert!(!slots.take_over("key-1", 1), "taken over once");
    // The waiter still waits: the slot was never free.
    let waker = std::task::Waker::noop();
    assert!(slots.poll_take(ticket, 0, waker).is_err());
    slots.bind("gen_1", 0);
    assert!(slots.end_job("gen_1", ReleaseReason::Finished));
    assert!(slots.poll_take(ticket, 0, waker).is_ok());
}
