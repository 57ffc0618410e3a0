//! Ownership of a create's slot from the moment it is taken: before the send (`Unsent`), then
//! held for the job, given back, or left as an unknown outcome, here and in a shared store.

use std::sync::Arc;

use super::slots::ReleaseReason;
use super::state::PlanState;

/// Slots taken for a job-creating request that has been sent (one, or one per job of a
/// batch). Dropped without an outcome, they stay held as unknown outcomes (the server may have
/// created the jobs); in in-flight mode they are given back, since the request is over.
#[derive(Debug)]
pub(crate) struct HoldGuard {
    shared: Option<Arc<PlanState>>,
    /// More than one slot here: the slots' name in a shared store, or a batch's count.
    more: Option<Box<More>>,
    /// The create's `Idempotency-Key`, kept with an unknown outcome so that the create sent
    /// again can take its slot over (boxed twice to be one word, as `more`).
    key: Option<IdempotencyKey>,
}

/// What a create's hold keeps beyond one slot in this process, boxed to be one word (`None`
/// for one slot here only): holds live on the path of every create, store or batch or not.
#[derive(Debug)]
pub(crate) struct More {
    /// The slots' name in the shared store, once the store gave one: `member` itself, then
    /// `member/2`, `member/3`.. for the other jobs of a batch ([`slot_member`]).
    pub(crate) member: Option<String>,
    /// How many slots: one per job the create starts.
    pub(crate) jobs: u32,
}

impl More {
    /// How many slots a hold with `more` holds.
    #[inline]
    pub(crate) fn jobs(more: &Option<Box<More>>) -> u32 {
        more.as_ref().map_or(1, |more| more.jobs)
    }

    /// What a create of `jobs` jobs keeps, with no store: nothing for one.
    #[inline]
    pub(crate) fn of_jobs(jobs: u32) -> Option<Box<More>> {
        if jobs == 1 {
            None
        } else {
            Some(Self::batch(jobs))
        }
    }

    #[cold]
    #[inline(never)]
    fn batch(jobs: u32) -> Box<More> {
        Box::new(More { member: None, jobs })
    }

    /// The name in the shared store, taken out (to give back or bind).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn take_member(more: &mut Option<Box<More>>) -> Option<String> {
        more.as_mut()?.member.take()
    }
}

/// The name in the shared store of a create's `k`th slot (from 1): `member` itself, then
/// `member/2`, `member/3`.. for the other jobs of a batch (as `slots.lua` names them).
#[cfg(feature = "redis")]
pub(crate) fn slot_member(member: &str, k: u32) -> String {
    if k <= 1 {
        member.to_owned()
    } else {
        format!("{member}/{k}")
    }
}

impl HoldGuard {
    /// Owns the slot(s) the caller has just taken.
    #[inline]
    pub(crate) fn new(shared: Arc<PlanState>, more: Option<Box<More>>) -> Self {
        Self {
            shared: Some(shared),
            more,
            key: None,
        }
    }

    /// The create carries this `Idempotency-Key`.
    pub(crate) fn with_key(mut self, key: Option<IdempotencyKey>) -> Self {
        self.key = key;
        self
    }

    #[inline]
    pub(crate) fn release(mut self, why: ReleaseReason) {
        if let Some(shared) = self.shared.take() {
            let jobs = More::jobs(&self.more);
            shared.release_many(jobs, why);
            #[cfg(feature = "redis")]
            if let Some(member) = More::take_member(&mut self.more) {
                release_in_store(&shared, &member, 1..=jobs);
            }
        }
    }

    pub(crate) fn in_flight_mode(&self) -> bool {
        self.shared.as_ref().is_some_and(|s| s.config.in_flight)
    }

    /// Hands the slots on to the response body, which gives them back when it ends or is
    /// dropped (in-flight mode).
    #[inline]
    pub(crate) fn into_in_flight_slot(mut self) -> Option<InFlightSlot> {
        let more = self.more.take();
        self.shared.take().map(|shared| InFlightSlot(shared, more))
    }

    /// Hands the slots on (to an [`Observer`](super::observe::Observer), which settles them).
    #[inline]
    pub(super) fn into_parts(mut self) -> Option<(Arc<PlanState>, Option<Box<More>>)> {
        let more = self.more.take();
        self.shared.take().map(|shared| (shared, more))
    }
}

/// Gives back the slots `ks` (numbered from 1, [`slot_member`]) a create held in the shared
/// store as `member`.
#[cfg(feature = "redis")]
#[cold]
#[inline(never)]
pub(super) fn release_in_store(
    shared: &PlanState,
    member: &str,
    ks: std::ops::RangeInclusive<u32>,
) {
    if let Some(store) = &shared.store {
        store.slot_release(ks.map(|k| slot_member(member, k)));
    }
}

impl Drop for HoldGuard {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            let jobs = More::jobs(&self.more);
            if shared.config.in_flight {
                // The slot is only for the request, which is over whatever the server did.
                shared.release_many(jobs, ReleaseReason::Abandoned);
                #[cfg(feature = "redis")]
                if let Some(member) = More::take_member(&mut self.more) {
                    release_in_store(&shared, &member, 1..=jobs);
                }
                return;
            }
            #[cfg(feature = "redis")]
            if let Some(member) = More::take_member(&mut self.more) {
                unknown_in_store(&shared, &member, 1..=jobs);
                return;
            }
            let now = shared.clock.now();
            let key: Option<Box<str>> = self.key.take().map(|key| (*key).into());
            let mut slots = shared.slots();
            for _ in 1..jobs {
                slots.unknown(now, key.clone());
            }
            slots.unknown(now, key);
        }
    }
}

/// The outcome of a create that held slots in the shared store, as `member`, will never be
/// read. The store holds them for the whole fleet, until a reconcile in any process accounts
/// for them or their lease runs out; this process lets its own count of them go, since no
/// reconcile elsewhere could ever give that back. `ks` names which of a batch's slots
/// (numbered from 1, [`slot_member`]).
#[cfg(feature = "redis")]
#[cold]
#[inline(never)]
pub(super) fn unknown_in_store(
    shared: &PlanState,
    member: &str,
    ks: std::ops::RangeInclusive<u32>,
) {
    if let (Some(store), false) = (&shared.store, ks.is_empty()) {
        shared.release_many(ks.end() - ks.start() + 1, ReleaseReason::Store);
        store.slot_unknown(ks.map(|k| slot_member(member, k)), shared.job_lease());
    }
}

/// In-flight mode: slots (one per job the request counts as) given back when the response
/// body ends or is dropped.
#[derive(Debug)]
pub(crate) struct InFlightSlot(Arc<PlanState>, Option<Box<More>>);

impl Drop for InFlightSlot {
    fn drop(&mut self) {
        let Some(more) = &mut self.1 else {
            self.0.release(ReleaseReason::Answered);
            return;
        };
        self.0.release_many(more.jobs, ReleaseReason::Answered);
        #[cfg(feature = "redis")]
        if let Some(member) = more.member.take() {
            release_in_store(&self.0, &member, 1..=more.jobs);
        }
    }
}

/// A create's `Idempotency-Key`, as a hold keeps it.
pub(crate) type IdempotencyKey = Box<String>;

const IDEMPOTENCY_KEY: http::HeaderName = http::HeaderName::from_static("idempotency-key");

/// The `Idempotency-Key` of a create, as the plan keeps it with an unknown outcome (a key of
/// more than 255 bytes, or not text, is not kept: no server takes one).
#[inline]
pub(crate) fn idempotency_key<B>(request: &http::Request<B>) -> Option<IdempotencyKey> {
    let key = request.headers().get(IDEMPOTENCY_KEY)?.to_str().ok()?;
    (key.len() < 256).then(|| Box::new(key.to_owned()))
}

/// Slots taken for a create that is not sent yet, and the member that holds them in the shared
/// store, if one may (an acquire may have reached the store even when its answer did not come
/// back). Dropped (the service failed to get ready, the wait ran out, the store failed, the
/// future was dropped), both are given back: the server saw nothing, so nothing is unknown.
pub(crate) struct Unsent {
    pub(super) shared: Option<Arc<PlanState>>,
    pub(super) more: Option<Box<More>>,
}

impl Unsent {
    #[inline]
    pub(crate) fn local(shared: Arc<PlanState>, jobs: u32) -> Self {
        Self {
            shared: Some(shared),
            more: More::of_jobs(jobs),
        }
    }

    /// How many slots.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn jobs(&self) -> u32 {
        More::jobs(&self.more)
    }

    /// The create is being sent: its slots are held as in flight (in the store too, if it
    /// holds them there).
    pub(crate) fn sent(mut self) -> Option<HoldGuard> {
        let shared = self.shared.take()?;
        Some(HoldGuard::new(shared, self.more.take()))
    }

    #[cfg(feature = "redis")]
    /// The store failed and the create goes anyway, on this process's count (fail-open): the
    /// members an acquire may have left in the store go back.
    pub(crate) fn without_store(&mut self) {
        let jobs = self.jobs();
        if let (Some(member), Some(shared)) = (More::take_member(&mut self.more), &self.shared) {
            release_in_store(shared, &member, 1..=jobs);
        }
    }
}

impl Drop for Unsent {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            let Some(more) = &mut self.more else {
                shared.release(ReleaseReason::Unsent);
                return;
            };
            shared.release_many(more.jobs, ReleaseReason::Unsent);
            #[cfg(feature = "redis")]
            if let Some(member) = more.member.take() {
                release_in_store(&shared, &member, 1..=more.jobs);
            }
        }
    }
}
