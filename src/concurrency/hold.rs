//! Ownership of a create's slot from the moment it is taken: before the send (`Unsent`), then
//! held for the job, given back, or left as an unknown outcome, here and in a shared store.

use std::sync::Arc;

use super::slots::ReleaseReason;
use super::state::PlanState;

/// A slot taken for a job-creating request that has been sent. Dropped without an outcome,
/// the slot stays held as an unknown outcome (the server may have created the job); in
/// in-flight mode it is given back, since the request is over.
#[derive(Debug)]
pub(crate) struct HoldGuard {
    shared: Option<Arc<PlanState>>,
    /// The slot's name in the shared store, once the store gave one.
    member: Option<StoreMember>,
    /// The create's `Idempotency-Key`, kept with an unknown outcome so that the create sent
    /// again can take its slot over (boxed twice to be one word, as `member`).
    key: Option<IdempotencyKey>,
    /// How many slots it holds: one per job the create starts (in the store: `member` and
    /// its numbered siblings, [`slot_member`]).
    jobs: u32,
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

/// A slot's name in the shared store. Boxed twice to be one word: holds live on the path
/// of every create, store or not.
pub(crate) type StoreMember = Box<String>;

impl HoldGuard {
    /// Owns a slot the caller has just taken.
    #[inline]
    pub(crate) fn new(shared: Arc<PlanState>) -> Self {
        Self {
            shared: Some(shared),
            member: None,
            key: None,
            jobs: 1,
        }
    }

    /// It holds `jobs` slots, one per job the create starts.
    #[inline]
    pub(crate) fn with_jobs(mut self, jobs: u32) -> Self {
        self.jobs = jobs;
        self
    }

    /// The create carries this `Idempotency-Key`.
    pub(crate) fn with_key(mut self, key: Option<IdempotencyKey>) -> Self {
        self.key = key;
        self
    }

    /// The slot is held in the shared store too, as `member`.
    pub(crate) fn set_member(&mut self, member: StoreMember) {
        self.member = Some(member);
    }

    #[inline]
    pub(crate) fn release(mut self, why: ReleaseReason) {
        if let Some(shared) = self.shared.take() {
            shared.release_many(self.jobs, why);
            #[cfg(feature = "redis")]
            if self.member.is_some() {
                release_in_store(&shared, self.member.take(), 1..=self.jobs);
            }
        }
    }

    pub(crate) fn in_flight_mode(&self) -> bool {
        self.shared.as_ref().is_some_and(|s| s.config.in_flight)
    }

    /// Hands the slot on to the response body, which gives it back when it ends or is
    /// dropped (in-flight mode).
    #[inline]
    pub(crate) fn into_in_flight_slot(mut self) -> Option<InFlightSlot> {
        let member = self.member.take();
        let jobs = self.jobs;
        self.shared
            .take()
            .map(|shared| InFlightSlot(shared, member, jobs))
    }

    /// Hands the slots on (to an [`Observer`](super::observe::Observer), which settles
    /// them): the plan, the name in the store, how many.
    #[inline]
    pub(super) fn into_parts(mut self) -> Option<(Arc<PlanState>, Option<StoreMember>, u32)> {
        let member = self.member.take();
        let jobs = self.jobs;
        self.shared.take().map(|shared| (shared, member, jobs))
    }
}

/// Gives back the slots `ks` (numbered from 1, [`slot_member`]) a create held in the shared
/// store, if any.
#[cfg(feature = "redis")]
#[cold]
#[inline(never)]
pub(super) fn release_in_store(
    shared: &PlanState,
    member: Option<StoreMember>,
    ks: std::ops::RangeInclusive<u32>,
) {
    if let (Some(store), Some(member)) = (&shared.store, member) {
        store.slot_release(ks.map(|k| slot_member(&member, k)));
    }
}

impl Drop for HoldGuard {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            if shared.config.in_flight {
                // The slot is only for the request, which is over whatever the server did.
                shared.release_many(self.jobs, ReleaseReason::Abandoned);
                #[cfg(feature = "redis")]
                if self.member.is_some() {
                    release_in_store(&shared, self.member.take(), 1..=self.jobs);
                }
                return;
            }
            #[cfg(feature = "redis")]
            if self.member.is_some() {
                unknown_in_store(&shared, self.member.take(), 1..=self.jobs);
                return;
            }
            let now = shared.clock.now();
            let key: Option<Box<str>> = self.key.take().map(|key| (*key).into());
            let mut slots = shared.slots();
            for _ in 1..self.jobs {
                slots.unknown(now, key.clone());
            }
            slots.unknown(now, key);
        }
    }
}

/// The outcome of a create that held a slot in the shared store, as `member`, will never be
/// read. The store holds it for the whole fleet, until a reconcile in any process accounts for
/// it or its lease runs out; this process lets its own count of it go, since no reconcile
/// elsewhere could ever give that back. For a batch, `ks` names which of its slots (numbered
/// from 1, [`slot_member`]).
#[cfg(feature = "redis")]
#[cold]
#[inline(never)]
pub(super) fn unknown_in_store(
    shared: &PlanState,
    member: Option<StoreMember>,
    ks: std::ops::RangeInclusive<u32>,
) {
    if let (Some(store), Some(member), false) = (&shared.store, member, ks.is_empty()) {
        let jobs = ks.end() - ks.start() + 1;
        shared.release_many(jobs, ReleaseReason::Store);
        store.slot_unknown(ks.map(|k| slot_member(&member, k)), shared.job_lease());
    }
}

/// In-flight mode: slots (one per job the request counts as) given back when the response
/// body ends or is dropped.
#[derive(Debug)]
pub(crate) struct InFlightSlot(
    Arc<PlanState>,
    #[cfg_attr(not(feature = "redis"), allow(dead_code))] Option<StoreMember>,
    u32,
);

impl Drop for InFlightSlot {
    fn drop(&mut self) {
        self.0.release_many(self.2, ReleaseReason::Answered);
        #[cfg(feature = "redis")]
        if self.1.is_some() {
            release_in_store(&self.0, self.1.take(), 1..=self.2);
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

/// A slot taken for a create that is not sent yet, and the member that holds it in the shared
/// store, if one may (an acquire may have reached the store even when its answer did not come
/// back). Dropped (the service failed to get ready, the wait ran out, the store failed, the
/// future was dropped), both are given back: the server saw nothing, so nothing is unknown.
pub(crate) struct Unsent {
    pub(super) shared: Option<Arc<PlanState>>,
    pub(super) member: Option<StoreMember>,
    /// How many slots: one per job the create starts.
    pub(super) jobs: u32,
}

impl Unsent {
    pub(crate) fn local(shared: Arc<PlanState>, jobs: u32) -> Self {
        Self {
            shared: Some(shared),
            member: None,
            jobs,
        }
    }

    /// The create is being sent: its slots are held as in flight (in the store too, if it
    /// holds them there).
    pub(crate) fn sent(mut self) -> Option<HoldGuard> {
        let mut hold = HoldGuard::new(self.shared.take()?).with_jobs(self.jobs);
        if let Some(member) = self.member.take() {
            hold.set_member(member);
        }
        Some(hold)
    }

    #[cfg(feature = "redis")]
    /// The store failed and the create goes anyway, on this process's count (fail-open): the
    /// members an acquire may have left in the store go back.
    pub(crate) fn without_store(&mut self) {
        if let (Some(member), Some(shared)) = (self.member.take(), &self.shared) {
            release_in_store(shared, Some(member), 1..=self.jobs);
        }
    }
}

impl Drop for Unsent {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            shared.release_many(self.jobs, ReleaseReason::Unsent);
            #[cfg(feature = "redis")]
            if self.member.is_some() {
                release_in_store(&shared, self.member.take(), 1..=self.jobs);
            }
        }
    }
}
