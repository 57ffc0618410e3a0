//! The mock's state: accounts with their counters, generations and their lifecycle.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::Value;
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::config::{Config, Endpoint};
use crate::limits::Counter;
use crate::quotas::{RouteQuotas, Verdict};
use crate::stats::{Arrival, Stats};
use crate::webhook;
use tower_quota::concurrency::KeyedPlans;
use tower_quota::presets::sync;
use tower_quota::Plan;

/// A generation's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    /// Waiting to start; holds a plan slot.
    Pending,
    /// Running; holds a plan slot.
    Processing,
    /// Done, with an output.
    Completed,
    /// Done, with an error.
    Failed,
    /// Refused before it started.
    Rejected,
}

impl Status {
    /// Parses a status as the API spells it.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "PENDING" => Self::Pending,
            "PROCESSING" => Self::Processing,
            "COMPLETED" => Self::Completed,
            "FAILED" => Self::Failed,
            "REJECTED" => Self::Rejected,
            _ => return None,
        })
    }

    /// Whether a generation in this status holds one of its plan's slots.
    pub fn is_active(self) -> bool {
        matches!(self, Self::Pending | Self::Processing)
    }
}

/// A generation as the API returns it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Generation {
    pub(crate) id: String,
    pub(crate) created_at: String,
    pub(crate) status: Status,
    pub(crate) model: String,
    pub(crate) input: Value,
    pub(crate) options: Value,
    pub(crate) output_url: Option<String>,
    pub(crate) error: Option<String>,
    #[serde(rename = "error_code")]
    pub(crate) error_code: Option<String>,
    #[serde(skip)]
    pub(crate) key: String,
    #[serde(skip)]
    pub(crate) webhook_url: Option<String>,
    /// When it was created, since the server started.
    #[serde(skip)]
    pub(crate) started: Duration,
    /// When it ends, since the server started.
    #[serde(skip)]
    pub(crate) ends_at: Duration,
}

/// One API key: its plan, its counters, its generations.
#[derive(Debug)]
pub(crate) struct Account {
    /// Generations `PENDING` or `PROCESSING` (the plan itself is enforced by `jobs`).
    pub(crate) active: usize,
    /// The route limits counted by the mock itself (a fixed window and the exact sliding log,
    /// which the layer lacks).
    pub(crate) counters: Vec<Counter>,
    /// Per endpoint, what the layer said last: requests left, and when all counted is gone
    /// (since the server started).
    pub(crate) stated: [(u32, Duration); 4],
    /// `Idempotency-Key` to generation id.
    pub(crate) idempotency: HashMap<String, String>,
    /// Ids of this key's generations, oldest first.
    pub(crate) generations: Vec<String>,
}

#[derive(Debug, Default)]
pub(crate) struct Inner {
    pub(crate) accounts: HashMap<String, Account>,
    pub(crate) generations: HashMap<String, Generation>,
    pub(crate) next_seq: u64,
    pub(crate) stats: Stats,
    jobs: Vec<AbortHandle>,
}

/// Everything the handlers share.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) config: Config,
    /// The plans' concurrency, enforced by `tower-quota`'s server-mode layer: each key's
    /// generations hold slots of its plan from their create until they end.
    pub(crate) jobs: KeyedPlans,
    /// The route limits, enforced by `tower-quota`'s server mode (`None`: a fixed window or
    /// the exact sliding log, counted by the mock in `Account::counters`).
    pub(crate) quotas: Option<RouteQuotas>,
    pub(crate) epoch: Instant,
    pub(crate) inner: Mutex<Inner>,
    /// Notified whenever a generation's status changes (for long polls).
    pub(crate) changed: Notify,
    webhooks: webhook::Sender,
}

/// Why a request was refused by a limit.
pub(crate) enum Refusal {
    /// Over the route's rate; a request would be accepted after this long.
    Rate(Duration),
    /// Over the plan; a slot frees after this long.
    Concurrency(Duration),
    /// No such API key.
    UnknownKey,
}

impl State {
    pub(crate) fn new(config: Config) -> Self {
        let accounts = config
            .keys
            .keys()
            .map(|key| {
                let account = Account {
                    active: 0,
                    counters: Endpoint::ALL
                        .iter()
                        .map(|_| Counter::new(config.algorithm))
                        .collect(),
                    stated: [(0, Duration::ZERO); 4],
                    idempotency: HashMap::new(),
                    generations: Vec::new(),
                };
                (key.clone(), account)
            })
            .collect();
        let plans = config.keys.clone();
        let jobs = sync::plan(Plan::Creator)
            .reject()
            .key_header(axum::http::HeaderName::from_static(sync::API_KEY_HEADER))
            .plan_by(move |head| {
                let key = head.headers().get(sync::API_KEY_HEADER)?.to_str().ok()?;
                plans.get(key).map(|&n| Plan::Enterprise(n))
            })
            .build()
            .expect("the preset's routes and fields are valid");
        let quotas = RouteQuotas::new(&config);
        Self {
            quotas,
            config,
            jobs,
            epoch: Instant::now(),
            inner: Mutex::new(Inner {
                accounts,
                ..Inner::default()
            }),
            changed: Notify::new(),
            webhooks: webhook::Sender::new(),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What `key`'s counter of `endpoint` states now: its limit, what is left and how long
    /// until all counted is gone; `None` for an unknown key.
    pub(crate) fn statement(
        &self,
        endpoint: Endpoint,
        key: &str,
    ) -> Option<(crate::config::Limit, u32, Duration)> {
        let now = self.now();
        let limit = self.config.limit_of(endpoint);
        let mut guard = self.lock();
        let account = guard.accounts.get_mut(key)?;
        let counter = &mut account.counters[endpoint.index()];
        if self.quotas.is_none() {
            return Some(counter.state(limit, now));
        }
        // The limit as the mock states it (a leaky bucket's is its burst), the rest as the
        // layer said.
        let (stated, _, _) = counter.state(limit, now);
        let (left, reset_at) = account.stated[endpoint.index()];
        Some((stated, left, reset_at.saturating_sub(now)))
    }

    /// Time since the server started, on tokio's clock.
    pub(crate) fn now(&self) -> Duration {
        Instant::now().saturating_duration_since(self.epoch)
    }

    pub(crate) fn stop_jobs(&self) {
        for job in self.lock().jobs.drain(..) {
            job.abort();
        }
    }

    /// Counts a request to `endpoint`, checks its key, and counts it against the key's rate
    /// limit. `Ok(false)` when the key is missing or unknown.
    pub(crate) async fn admit(
        &self,
        endpoint: Endpoint,
        key: Option<&str>,
    ) -> Result<bool, Refusal> {
        let key = {
            let mut guard = self.lock();
            let inner = &mut *guard;
            *inner
                .stats
                .requests
                .entry(endpoint.route().to_owned())
                .or_default() += 1;
            match key.filter(|k| inner.accounts.contains_key(*k)) {
                Some(key) => key,
                None => {
                    inner.stats.unauthorized += 1;
                    return Ok(false);
                }
            }
        };
        let verdict = match &self.quotas {
            Some(quotas) => Some(quotas.hit(endpoint, key).await),
            None => None,
        };
        let mut guard = self.lock();
        let inner = &mut *guard;
        let Some(account) = inner.accounts.get_mut(key) else {
            return Ok(false);
        };
        let now = self.now();
        let result = match verdict {
            None => account.counters[endpoint.index()].hit(self.config.limit_of(endpoint), now),
            Some(Verdict::Pass { left, reset }) => {
                account.stated[endpoint.index()] = (left, now + reset);
                Ok(())
            }
            Some(Verdict::Refuse { wait }) => {
                account.stated[endpoint.index()] = (0, now + wait);
                Err(wait)
            }
        };
        inner.stats.arrivals.push(Arrival {
            endpoint,
            key: key.to_owned(),
            at: now,
            limited: result.is_err(),
        });
        match result {
            Ok(()) => Ok(true),
            Err(wait) => {
                *inner
                    .stats
                    .rate_limited
                    .entry(endpoint.route().to_owned())
                    .or_default() += 1;
                Err(Refusal::Rate(wait))
            }
        }
    }

    /// The generation an `Idempotency-Key` of `key`'s made before, if any: a replay, which
    /// starts nothing and takes no slot.
    pub(crate) fn replay(&self, key: &str, idempotency_key: Option<&str>) -> Option<Generation> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let account = inner.accounts.get(key)?;
        let id = account.idempotency.get(idempotency_key?)?;
        let generation = inner.generations.get(id)?.clone();
        inner.stats.replays += 1;
        Some(generation)
    }

    /// How long until one of `key`'s generations ends and frees a slot of its plan.
    pub(crate) fn frees_in(&self, key: &str) -> Duration {
        let now = self.now();
        let inner = self.lock();
        let Some(account) = inner.accounts.get(key) else {
            return Duration::ZERO;
        };
        let frees_at = account
            .generations
            .iter()
            .filter_map(|id| inner.generations.get(id))
            .filter(|g| g.status.is_active())
            .map(|g| g.ends_at)
            .min()
            .unwrap_or(now);
        frees_at.saturating_sub(now)
    }

    /// Counts a create refused over its plan.
    pub(crate) fn concurrency_limited(&self) {
        self.lock().stats.concurrency_limited += 1;
    }

    /// Creates a generation for `key`, its plan's slot taken by the layer (`jobs`); or, when
    /// a create with the same `Idempotency-Key` made one meanwhile (two sent at once), that
    /// one, replayed (`true`).
    pub(crate) fn create(
        self: &Arc<Self>,
        key: &str,
        idempotency_key: Option<String>,
        request: CreateRequest,
    ) -> Result<(Generation, bool), Refusal> {
        let now = self.now();
        let mut guard = self.lock();
        let inner = &mut *guard;
        let Some(account) = inner.accounts.get_mut(key) else {
            return Err(Refusal::UnknownKey);
        };
        let made = idempotency_key
            .as_ref()
            .and_then(|k| account.idempotency.get(k))
            .and_then(|id| inner.generations.get(id));
        if let Some(generation) = made {
            let generation = generation.clone();
            inner.stats.replays += 1;
            return Ok((generation, true));
        }
        let seq = inner.next_seq;
        inner.next_seq += 1;
        let id = generation_id(self.config.seed, seq);
        let generation = Generation {
            id: id.clone(),
            created_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            status: Status::Pending,
            model: request.model,
            input: request.input,
            options: request
                .options
                .unwrap_or_else(|| Value::Object(Default::default())),
            output_url: None,
            error: None,
            error_code: None,
            key: key.to_owned(),
            webhook_url: request.webhook_url,
            started: now,
            ends_at: now + self.config.pending + self.config.processing,
        };
        account.active += 1;
        account.generations.push(id.clone());
        if let Some(k) = idempotency_key {
            account.idempotency.insert(k, id.clone());
        }
        let stats = &mut inner.stats;
        stats.created += 1;
        stats.active += 1;
        stats.max_active = stats.max_active.max(stats.active);
        let by_key = stats.max_active_by_key.entry(key.to_owned()).or_default();
        *by_key = (*by_key).max(account.active);
        inner.generations.insert(id.clone(), generation.clone());
        let fails = unit(self.config.seed, seq, "fails") < self.config.failure_rate;
        let started = Instant::now();
        let job = tokio::spawn(Arc::clone(self).run(id, started, fails));
        inner.jobs.push(job.abort_handle());
        Ok((generation, false))
    }

    /// A generation's life after its create.
    async fn run(self: Arc<Self>, id: String, started: Instant, fails: bool) {
        let processing = started + self.config.pending;
        tokio::time::sleep_until(processing).await;
        self.set_status(&id, Status::Processing);
        tokio::time::sleep_until(processing + self.config.processing).await;
        let status = if fails {
            Status::Failed
        } else {
            Status::Completed
        };
        let Some(finished) = self.set_status(&id, status) else {
            return;
        };
        let Some(url) = finished.webhook_url.clone() else {
            return;
        };
        let body = match serde_json::to_vec(&finished) {
            Ok(body) => body,
            Err(error) => {
                tracing::error!(%error, "a generation did not serialize");
                return;
            }
        };
        let delivered = self
            .webhooks
            .send(&url, &self.config.webhook_secret, body.into())
            .await;
        let mut inner = self.lock();
        if delivered {
            inner.stats.webhooks_delivered += 1;
        } else {
            inner.stats.webhooks_failed += 1;
        }
    }

    fn set_status(&self, id: &str, status: Status) -> Option<Generation> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let generation = inner.generations.get_mut(id)?;
        generation.status = status;
        match status {
            Status::Completed => {
                generation.output_url = Some(format!("https://cdn.sync.test/outputs/{id}.mp4"));
                inner.stats.completed += 1;
            }
            Status::Failed => {
                generation.error = Some("the mock failed this generation".into());
                generation.error_code = Some("generation_failed".into());
                inner.stats.failed += 1;
            }
            _ => {}
        }
        if !status.is_active() {
            inner.stats.job_time += self.now().saturating_sub(generation.started);
            inner.stats.active -= 1;
            if let Some(account) = inner.accounts.get_mut(&generation.key) {
                account.active -= 1;
            }
        }
        let generation = generation.clone();
        drop(guard);
        if !status.is_active() {
            // Its plan's slot is free: the layer lets the key's next create through.
            self.jobs.complete(&generation.key, &generation.id);
        }
        self.changed.notify_waiters();
        Some(generation)
    }

    pub(crate) fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }

    /// A generation of `key`'s, if it exists.
    pub(crate) fn generation(&self, key: &str, id: &str) -> Option<Generation> {
        self.lock()
            .generations
            .get(id)
            .filter(|g| g.key == key)
            .cloned()
    }

    /// How many of `key`'s generations have a status in `statuses` (all when empty).
    pub(crate) fn count(&self, key: &str, statuses: &[Status]) -> usize {
        let inner = self.lock();
        inner.accounts.get(key).map_or(0, |account| {
            account
                .generations
                .iter()
                .filter_map(|id| inner.generations.get(id))
                .filter(|g| statuses.is_empty() || statuses.contains(&g.status))
                .count()
        })
    }

    /// `key`'s generations newest first, after `cursor` (an id), with a status in `statuses`
    /// (all when empty), at most `limit`. `None` when the cursor is not one of the key's generations.
    pub(crate) fn list(
        &self,
        key: &str,
        statuses: &[Status],
        cursor: Option<&str>,
        limit: usize,
    ) -> Option<Vec<Generation>> {
        let inner = self.lock();
        let account = inner.accounts.get(key)?;
        let mut ids = account.generations.iter().rev().peekable();
        if let Some(cursor) = cursor {
            ids.by_ref().find(|id| *id == cursor)?;
        }
        Some(
            ids.filter_map(|id| inner.generations.get(id))
                .filter(|g| statuses.is_empty() || statuses.contains(&g.status))
                .take(limit)
                .cloned()
                .collect(),
        )
    }
}

/// What a create's body must hold.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CreateRequest {
    pub(crate) model: String,
    pub(crate) input: Value,
    pub(crate) options: Option<Value>,
    pub(crate) webhook_url: Option<String>,
}

fn hash(seed: u64, seq: u64, salt: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    (seed, seq, salt).hash(&mut hasher);
    hasher.finish()
}

/// A number in `[0, 1)`, the same for the same seed and job.
fn unit(seed: u64, seq: u64, salt: &str) -> f64 {
    (hash(seed, seq, salt) >> 11) as f64 / (1u64 << 53) as f64
}

/// A UUID-shaped id, the same for the same seed and job.
fn generation_id(seed: u64, seq: u64) -> String {
    let a = hash(seed, seq, "id-a");
    let b = hash(seed, seq, "id-b");
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        (b >> 48) & 0x3fff | 0x8000,
        b & 0xffff_ffff_ffff
    )
}
