//! [`RejectBuilder`]: server mode's keys, plans and refusal body, checked when built.

use std::fmt;
use std::hash::{Hash, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::HeaderName;

use super::layer::KeyedPlans;
use super::state::KeyedSlots;
use crate::clock::{nanos, Clock};
use crate::concurrency::Plan;
use crate::error::ConfigError;
use crate::event::{EventConfig, LayerKind};
use crate::rate_limit::server::key::{ClientKey, KeyHashing};
use crate::rate_limit::{EmptyBody, MissingKey, RequestHead};
use crate::route::{self, Pattern, RouteTable};

pub(crate) type PlanFn = dyn Fn(&RequestHead<'_>) -> Option<Plan> + Send + Sync;

/// What a route's requests mean to server mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ServerRoute {
    /// Creates a job: needs a slot of the client's plan.
    Create,
    /// Shows one job, named by the id parameter.
    Status,
}

/// What the client builder hands to server mode.
#[derive(Debug)]
pub(crate) struct Inherited {
    pub(crate) plan: Plan,
    pub(crate) job_routes: Vec<String>,
    pub(crate) status_routes: Vec<String>,
    pub(crate) id_param: String,
    pub(crate) id_field: String,
    pub(crate) status_field: String,
    pub(crate) active: Vec<String>,
    pub(crate) max_job_life: Duration,
    pub(crate) max_prefix: usize,
    pub(crate) events: EventConfig,
    #[cfg(feature = "redis")]
    pub(crate) store: Option<crate::store::StoreHandle>,
    /// A client-mode setting server mode cannot honour, reported by `build`.
    pub(crate) error: Option<ConfigError>,
}

/// Builds [`KeyedPlans`]: [`ConcurrencyLimitByPlan`](crate::ConcurrencyLimitByPlan)'s server
/// mode. Made by [`Builder::reject`](crate::concurrency::Builder::reject), which hands it the
/// job and status routes, the JSON fields, the active statuses, the maximum job life and the
/// plan (each key's, unless [`plan_by`](Self::plan_by) says otherwise).
#[must_use = "a builder does nothing until `build` is called"]
pub struct RejectBuilder<F = EmptyBody> {
    base: Inherited,
    key: ClientKey,
    on_missing: Option<MissingKey>,
    plan_by: Option<Arc<PlanFn>>,
    max_keys: usize,
    body: F,
}

impl<F> fmt::Debug for RejectBuilder<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RejectBuilder")
            .field("plan", &self.base.plan)
            .field("key", &self.key)
            .field("on_missing", &self.on_missing)
            .field("max_keys", &self.max_keys)
            .finish()
    }
}

impl RejectBuilder<EmptyBody> {
    pub(crate) fn new(base: Inherited) -> Self {
        Self {
            base,
            key: ClientKey::Global,
            on_missing: None,
            plan_by: None,
            max_keys: 65_536,
            body: EmptyBody,
        }
    }
}

impl<F> RejectBuilder<F> {
    /// Counts jobs per value of this request header field, such as `x-api-key`. Requests
    /// without it follow the [`MissingKey`] policy (by default they share one anonymous
    /// plan). Keys are kept only as keyed hashes. Without a key setting, every client
    /// shares one plan.
    pub fn key_header(mut self, name: HeaderName) -> Self {
        self.key = ClientKey::Header(name);
        self
    }

    /// Counts jobs per key a closure reads from the request's head (an extension an
    /// authentication layer set, say); `None` follows the [`MissingKey`] policy.
    /// [`KeyedPlans::complete_key`] names a key by the value the closure returns.
    pub fn key_fn<K, G>(mut self, key: G) -> Self
    where
        G: Fn(&RequestHead<'_>) -> Option<K> + Send + Sync + 'static,
        K: Hash,
    {
        self.key = ClientKey::from_fn(key);
        self
    }

    /// Counts jobs per peer IP address, read as
    /// [`rate_limit::Builder::key_peer_ip`](crate::rate_limit::Builder::key_peer_ip) reads it.
    pub fn key_peer_ip(mut self) -> Self {
        self.key = ClientKey::PeerIp;
        self
    }

    /// What a create without a client key gets (default: [`MissingKey::Shared`], one
    /// anonymous plan; for a layer keyed by address, a missing peer address is answered 500
    /// unless a policy is set here).
    pub fn on_missing_key(mut self, policy: MissingKey) -> Self {
        self.on_missing = Some(policy);
        self
    }

    /// Each client's plan, read from its create's head (from an extension an authentication
    /// layer set, or a lookup of the key); `None` gives it the plan the builder was made
    /// with. Read on every create, so an upgrade takes effect on the client's next create
    /// (a downgrade too: jobs held past the new plan finish, and creates are refused until
    /// the client is under it). A plan of no slot (`Enterprise(0)`) refuses every create.
    pub fn plan_by<G>(mut self, plan: G) -> Self
    where
        G: Fn(&RequestHead<'_>) -> Option<Plan> + Send + Sync + 'static,
    {
        self.plan_by = Some(Arc::new(plan));
        self
    }

    /// The most client keys holding slots at once (default 65,536, rounded up to a multiple
    /// of the 16 shards). A key holds an entry only while it holds a slot. A new client at a
    /// full table takes the place of the sampled one that holds least: a flood of fresh keys
    /// neither grows memory nor locks newcomers out, and a client forgotten for it may exceed
    /// its plan by what it held (see the [module docs](crate::concurrency#server-mode)).
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys;
        self
    }

    /// Builds each refusal's response (its status is set afterwards; its header fields are
    /// kept): Sync's JSON is [`presets::sync::PlanFullBody`](crate::presets::sync::PlanFullBody),
    /// which [`presets::sync::plan_server`](crate::presets::sync::plan_server) sets. Default:
    /// an empty body.
    pub fn reject_with<G>(self, body: G) -> RejectBuilder<G> {
        RejectBuilder {
            base: self.base,
            key: self.key,
            on_missing: self.on_missing,
            plan_by: self.plan_by,
            max_keys: self.max_keys,
            body,
        }
    }

    /// Keeps every client's slots in a store shared with the other servers of a fleet
    /// (feature `redis`), so that a client's plan holds across all of them: a create takes
    /// its slot in the store before it is passed on (one round trip), and what ends a slot
    /// anywhere (an answer, [`KeyedPlans::complete`], a terminal status) gives it back for
    /// the fleet. Client keys are hashed the same way in every process (build the fleet with
    /// one Rust release). While the store is away, its
    /// [`FailMode`](crate::store::FailMode) decides: `Closed` refuses creates with a 429
    /// ([`PlanRejectReason::StoreUnavailable`](super::PlanRejectReason::StoreUnavailable)),
    /// `Open` counts them in this server's own table. Each hold has a lease of the maximum
    /// job life in the store, so the slots of a server that dies come back.
    #[cfg(feature = "redis")]
    pub fn store(mut self, store: crate::store::RedisStore) -> Self {
        self.base.store = Some(store);
        self
    }

    /// Builds the layer, or says which part of the configuration is unusable.
    pub fn build(self) -> Result<KeyedPlans<F>, ConfigError> {
        let base = self.base;
        if let Some(error) = base.error {
            return Err(error);
        }
        base.plan.checked_limit()?;
        if self.max_keys == 0 {
            return Err(ConfigError::InvalidSetting {
                name: "max_keys",
                reason: "at least one key must be tracked",
            });
        }
        if base.max_job_life.is_zero() {
            return Err(ConfigError::InvalidSetting {
                name: "max_job_life",
                reason: "must be above zero",
            });
        }
        if base.id_field.is_empty() || base.status_field.is_empty() || base.id_param.is_empty() {
            return Err(ConfigError::InvalidSetting {
                name: "id_field / status_field / id_param",
                reason: "names must not be empty",
            });
        }
        if base.active.is_empty() {
            return Err(ConfigError::InvalidSetting {
                name: "active_statuses",
                reason: "name the statuses in which a job holds a slot (presets::sync::plan names Sync's)",
            });
        }
        if base.job_routes.is_empty() {
            return Err(ConfigError::InvalidSetting {
                name: "job_route",
                reason: "name the routes that create jobs (presets::sync::plan names Sync's)",
            });
        }
        let mut table = RouteTable::default();
        let mut kinds = Vec::new();
        let groups = [
            (ServerRoute::Create, base.job_routes),
            (ServerRoute::Status, base.status_routes),
        ];
        for (kind, patterns) in groups {
            for text in patterns {
                let pattern = Pattern::parse(&text)?;
                if kind == ServerRoute::Status
                    && !route::params(&pattern.path)
                        .iter()
                        .any(|p| p.0 == base.id_param)
                {
                    return Err(ConfigError::InvalidRoute {
                        pattern: text,
                        reason: format!(
                            "a status route names the job id with the parameter `{{{}}}`",
                            base.id_param
                        ),
                    });
                }
                table.insert(&text, &pattern, kinds.len())?;
                kinds.push(kind);
            }
        }
        let lease = nanos(base.max_job_life);
        Ok(KeyedPlans {
            shared: Arc::new(super::layer::KeyedPlanState {
                table,
                kinds: kinds.into(),
                key: self.key,
                hasher: KeyHashing::Random(RandomState::new()),
                on_missing: self.on_missing,
                plan_by: self.plan_by,
                default_plan: Mutex::new(base.plan),
                id_param: base.id_param.into(),
                id_field: base.id_field.into(),
                status_field: base.status_field.into(),
                active: base.active.into_iter().map(Into::into).collect(),
                max_prefix: base.max_prefix,
                slots: KeyedSlots::new(self.max_keys, lease),
                forgotten: AtomicU64::new(0),
                warned_no_peer: AtomicBool::new(false),
                clock: Clock::new(),
                events: base.events.build(LayerKind::Plan, [Arc::from("plan")]),
                body: self.body,
                #[cfg(feature = "redis")]
                store: base.store,
            }),
        })
    }
}
