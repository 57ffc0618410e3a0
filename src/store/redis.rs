//! [`RedisStore`]: limits kept in a Redis server, shared by every process that uses it.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::{PushInfo, PushKind, Script, Value};
use sync_wrapper::SyncFuture;
use tokio::sync::futures::OwnedNotified;
use tokio::sync::{broadcast, mpsc, Notify};
use tokio::task::JoinHandle;

use super::{Decision, FailMode, StoreCall, StoreError};
use crate::error::ConfigError;
use crate::quota::Rate;
use crate::rate_limit::cost::Costs;

mod connection;

use connection::{Connection, Nodes, Secrets, Settings};

/// Limits kept in Redis, so that every process using the same server and prefix shares them:
/// a fleet of clients stays inside one API key's quotas, a fleet of servers enforces one
/// quota per client key.
///
/// Give it to a layer's builder with `.store(store)`. Cheap to clone: clones share the
/// connections.
///
/// - On one server ([`builder`](Self::builder)) or a Redis Cluster ([`cluster`](Self::cluster)),
///   in plain text or over TLS (`rediss://`, feature `redis-tls`), with a user and password
///   from the URL or the builder that never appear in `Debug` output, errors or logs.
/// - Rates run as atomic Lua scripts on Redis's own clock (`TIME`), so the processes' clocks do
///   not matter: a client's sliding window is a sorted set of the places held (exact, as in
///   memory: one place per request of its period for the whole fleet, about 130 bytes each),
///   a server's per-client window a hash of up to 17 bucket counts (about 200 bytes at any
///   quota, as in memory), GCRA a stored theoretical arrival time. Keys are `{prefix:…}` (one
///   Redis Cluster slot per limit) and expire once idle.
/// - A request waiting for its turn sleeps until the time the script names, and is woken
///   early by a release anywhere in the fleet (pub/sub, resubscribed after a reconnect), with
///   a bounded poll as the fallback for a lost message.
/// - Every operation has a timeout; when Redis is slow or down, the [`FailMode`] decides.
///   The connections reconnect by themselves.
/// - A request in flight holds its place for at most the in-flight lease (default 2 min),
///   so the places of a process that dies come back.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    connection: Connection,
    /// The passwords it sends, scrubbed from every error and log line.
    secrets: Secrets,
    prefix: String,
    channel: String,
    timeout: Duration,
    fail_mode: FailMode,
    /// How long a place in flight is held at most (client mode).
    in_flight_lease: Duration,
    poll: Duration,
    released: Arc<Notify>,
    /// Makes this process's members unique in the fleet.
    node: u64,
    counter: AtomicU64,
    script: Script,
    slots_script: Script,
    /// Ids of jobs given back by some process, for the processes holding them locally.
    done: broadcast::Sender<Arc<str>>,
    /// Job slots' changes that nobody awaits (slots given back, jobs bound or done), run one
    /// after another in the order they were made, so that a job's end never overtakes its
    /// start.
    background: mpsc::Sender<Change>,
    /// Places given back (after a response, an abandon, a request never sent): one change per
    /// place, made after the place was taken, so they run [`PLACES_AT_ONCE`] at a time.
    places: mpsc::Sender<Change>,
    /// Runs a place's change when its queue is full, rather than lose it.
    runtime: tokio::runtime::Handle,
    /// Places' changes running in tasks of their own (the queue was full), for `flush`.
    overflow: Arc<Overflow>,
    subscriber: JoinHandle<()>,
    /// Whether the last operation failed: a failure is logged at `warn` when it begins and
    /// its end at `info`, each failing operation in between at `debug` only, so an outage
    /// does not log a line per request.
    failing: Arc<AtomicBool>,
}

/// How many finished job ids the fleet remembers (each for at most the maximum job life), so
/// that a job completed before its create was bound, or shown active by a stale list, does not
/// take a slot again.
const REMEMBERED_DONE: usize = 4096;

/// How many background changes may wait for Redis; past it (Redis away for long) a job
/// slot's change is dropped, and the lease gives the slot back.
const BACKGROUND: usize = 4096;

/// How many places are given back at once, each a round trip of its own on the shared
/// connection, so that the places keep up with the requests however far away Redis is.
const PLACES_AT_ONCE: usize = 64;

/// A change for a background worker, or a mark that resolves once the worker has finished
/// every change sent before it.
enum Change {
    Run(StoreCall),
    Flushed(tokio::sync::oneshot::Sender<()>),
}

/// Runs the job slots' changes one after another.
async fn in_order(mut queue: mpsc::Receiver<Change>) {
    while let Some(change) = queue.recv().await {
        match change {
            Change::Run(op) => done(op.await),
            Change::Flushed(mark) => {
                let _ = mark.send(());
            }
        }
    }
}

/// Runs the places' changes, up to [`PLACES_AT_ONCE`] at a time; a flush mark waits for
/// those running.
async fn at_once(mut queue: mpsc::Receiver<Change>) {
    use futures_util::stream::{FuturesUnordered, StreamExt};
    let mut running = FuturesUnordered::new();
    loop {
        tokio::select! {
            biased;
            Some(outcome) = running.next(), if !running.is_empty() => done(outcome),
            change = queue.recv(), if running.len() < PLACES_AT_ONCE => match change {
                Some(Change::Run(op)) => running.push(op),
                Some(Change::Flushed(mark)) => {
                    while let Some(outcome) = running.next().await {
                        done(outcome);
                    }
                    let _ = mark.send(());
                }
                None => break,
            },
        }
    }
    while let Some(outcome) = running.next().await {
        done(outcome);
    }
}

/// Places' changes running in tasks of their own, and a wake-up when the last one ends.
struct Overflow {
    running: std::sync::atomic::AtomicUsize,
    ended: Notify,
    /// At most [`PLACES_AT_ONCE`] of them run at once; the others wait for a turn before
    /// their operation (and its timeout) starts, so that a flood of changes does not make
    /// them time out one another.
    turns: Arc<tokio::sync::Semaphore>,
}

/// What a background change came to.
fn done(outcome: Result<Decision, StoreError>) {
    if let Err(error) = outcome {
        tracing::debug!(%error, "a change did not reach the store: the lease of what it held covers it");
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.subscriber.abort();
        // The background worker is left to finish what is queued (its queue closes with
        // this sender), so that the places and slots given back last still reach Redis
        // while the runtime runs.
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.prefix)
            .field("timeout", &self.inner.timeout)
            .field("fail_mode", &self.inner.fail_mode)
            .finish_non_exhaustive()
    }
}

/// Builds a [`RedisStore`]; see [`RedisStore::builder`] and [`RedisStore::cluster`].
///
/// Its `Debug` output shows the nodes' addresses, never a password.
#[derive(Debug, Clone)]
pub struct RedisStoreBuilder {
    settings: Settings,
    prefix: String,
    timeout: Duration,
    fail_mode: FailMode,
    in_flight_lease: Duration,
    poll: Duration,
}

impl RedisStore {
    /// A store on the Redis server at `url`: `redis://[user[:password]@]host[:port][/db]`, or
    /// `rediss://…` over TLS (feature `redis-tls`).
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder::new(Nodes::Server(url.into()))
    }

    /// A store on the Redis Cluster that `nodes` belong to (a few of its nodes' URLs, in the
    /// forms [`builder`](Self::builder) takes; the others are found from them).
    ///
    /// Every limit's keys share one hash slot (`{prefix:limit}`), so each operation is one
    /// script on one node; the connection follows `MOVED` and `ASK` redirections and failovers
    /// by itself, each operation within the store's timeout (past it, the [`FailMode`]
    /// decides). Release notifications are published cluster-wide.
    ///
    /// ```no_run
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), tower_quota::ConfigError> {
    /// use tower_quota::store::RedisStore;
    ///
    /// let store = RedisStore::cluster([
    ///     "redis://10.0.0.1:6379/",
    ///     "redis://10.0.0.2:6379/",
    ///     "redis://10.0.0.3:6379/",
    /// ])
    /// .password(std::env::var("REDIS_PASSWORD").unwrap_or_default())
    /// .build()?;
    /// # drop(store);
    /// # Ok(())
    /// # }
    /// ```
    pub fn cluster<I>(nodes: I) -> RedisStoreBuilder
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        RedisStoreBuilder::new(Nodes::Cluster(nodes.into_iter().map(Into::into).collect()))
    }

    /// What a layer does when this store fails.
    pub fn fail_mode(&self) -> FailMode {
        self.inner.fail_mode
    }

    /// The longest one operation may take.
    pub(crate) fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// Resolves once every change queued for the store before the call has reached Redis
    /// (or failed, each within the store's timeout): places given back after their
    /// responses, job slots bound and released.
    ///
    /// Those changes run in the background, in order, off the requests' paths. Await this
    /// before a process exits: a change still queued when its runtime stops is lost, and
    /// what it gave back stays taken for the whole fleet until its lease runs out
    /// ([`in_flight_lease`](RedisStoreBuilder::in_flight_lease)).
    pub async fn flush(&self) {
        for queue in [&self.inner.places, &self.inner.background] {
            let (mark, flushed) = tokio::sync::oneshot::channel();
            if queue.send(Change::Flushed(mark)).await.is_ok() {
                let _ = flushed.await;
            }
        }
        // And the places given back in tasks of their own while the queue was full.
        let overflow = &self.inner.overflow;
        loop {
            let ended = overflow.ended.notified();
            if overflow.running.load(Ordering::SeqCst) == 0 {
                return;
            }
            ended.await;
        }
    }

    /// The key of a limit: the prefix and the limit's name, in braces so that the keys of one
    /// limit share a Redis Cluster slot.
    pub(crate) fn key(&self, name: &str) -> String {
        format!("{{{}:{}}}", self.inner.prefix, name)
    }

    /// A name for one request's place, unique in the fleet.
    pub(crate) fn member(&self) -> String {
        let n = self.inner.counter.fetch_add(1, Ordering::Relaxed);
        format!("{:x}:{n:x}", self.inner.node)
    }

    /// Resolves when some process releases a place (or after a reconnect): created before
    /// an operation, so that a release during it is not missed.
    pub(crate) fn released(&self) -> OwnedNotified {
        self.inner.released.clone().notified_owned()
    }

    /// The longest a waiting request sleeps before asking again, notification or not.
    pub(crate) fn poll_interval(&self) -> Duration {
        self.inner.poll
    }

    /// Takes a place for one request costing `costs` at `key`, in each of `rates` (`hit`:
    /// counted and answered at once, as a server does).
    pub(crate) fn acquire(
        &self,
        key: &str,
        member: &str,
        rates: &[Rate],
        costs: &Costs,
        hit: bool,
    ) -> StoreCall {
        let op = if hit { "hit" } else { "acquire" };
        let quotas = StoreQuotas::new(rates, costs, costs);
        self.run(key, op, member, quotas, Duration::ZERO)
    }

    /// Gives back the places `member` holds at `key` for a request answered now, which took
    /// `taken` and cost `cost`, closing the limit for `block` if the server asked so.
    pub(crate) fn release_call(
        &self,
        key: &str,
        member: &str,
        quotas: StoreQuotas<'_>,
        block: Duration,
    ) -> StoreCall {
        self.run(key, "release", member, quotas, block)
    }

    /// The places `member` holds at `key` are for a request given up on after its send: they
    /// are held as in flight for `hold`, then as answered then.
    pub(crate) fn abandon_call(
        &self,
        key: &str,
        member: &str,
        quotas: StoreQuotas<'_>,
        hold: Duration,
    ) -> StoreCall {
        self.run(key, "abandon", member, quotas, hold)
    }

    /// The same, in the background (for a request dropped by its caller). A place whose
    /// change never reaches the store expires with its lease.
    pub(crate) fn abandon(&self, key: &str, member: &str, quotas: StoreQuotas<'_>, hold: Duration) {
        self.give_back(self.abandon_call(key, member, quotas, hold));
    }

    /// Gives back entirely, in the background, the places `member` took at `key` for a
    /// request that was never sent.
    pub(crate) fn cancel(&self, key: &str, member: &str, quotas: StoreQuotas<'_>) {
        self.give_back(self.run(key, "cancel", member, quotas, Duration::ZERO));
    }

    /// A server's request counted at `at` (microseconds, on Redis's clock) at `key` turned
    /// out to cost other than it took: the difference is counted, in the background.
    pub(crate) fn correct(&self, key: &str, quotas: StoreQuotas<'_>, at: u64) {
        self.give_back(self.run(key, "correct", "", quotas, Duration::from_micros(at)));
    }

    /// Runs the rate script; `span` is the release's block, the abandon's hold, or when a
    /// corrected request was counted.
    fn run(
        &self,
        key: &str,
        op: &'static str,
        member: &str,
        quotas: StoreQuotas<'_>,
        span: Duration,
    ) -> StoreCall {
        let n = quotas.rates.len();
        let mut keys = Vec::with_capacity(1 + 3 * n);
        keys.push(format!("{key}:closed"));
        for i in 0..n {
            // The first quota's keys are named as a route's one quota always was.
            let quota = match i {
                0 => key.to_owned(),
                i => format!("{key}:{i}"),
            };
            keys.push(format!("{quota}:held"));
            keys.push(format!("{quota}:tat"));
            keys.push(format!("{quota}:buckets"));
        }
        let nanos = |n: u64| micros(Duration::from_nanos(n));
        let mut args = Vec::with_capacity(6 + 9 * n);
        args.extend([
            op.into(),
            micros(self.inner.in_flight_lease),
            member.into(),
            micros(span),
            self.inner.channel.clone(),
            n.to_string(),
        ]);
        for (i, rate) in quotas.rates.iter().enumerate() {
            args.extend([
                if rate.is_gcra() { "gcra" } else { "window" }.into(),
                rate.count.to_string(),
                nanos(rate.period),
                nanos(rate.margin),
                nanos(rate.interval),
                rate.burst.max(1).to_string(),
                if rate.quota.unit().is_some() {
                    "1"
                } else {
                    "0"
                }
                .into(),
                quotas.taken.get(i).to_string(),
                quotas.cost.get(i).to_string(),
            ]);
        }
        self.invoke(&self.inner.script, keys, args)
    }

    /// Runs `script` on `keys` and `args`, within the store's timeout.
    fn invoke(&self, script: &Script, keys: Vec<String>, args: Vec<String>) -> StoreCall {
        let script = script.clone();
        let connection = self.inner.connection.clone();
        let secrets = self.inner.secrets.clone();
        let timeout = self.inner.timeout;
        let (failing, fail_mode) = (self.inner.failing.clone(), self.inner.fail_mode);
        SyncFuture::new(Box::pin(async move {
            let mut invocation = script.prepare_invoke();
            invocation.key(keys).arg(args);
            let reply =
                tokio::time::timeout(timeout, connection.invoke::<Vec<i64>>(&invocation)).await;
            let decision = decision(reply, timeout, &secrets);
            health(&failing, fail_mode, &decision);
            decision
        }))
    }
}

/// The quotas of one limit in the store, what a request took in each, and what it turned out
/// to cost (the same but for a release or correction that says otherwise).
#[derive(Debug, Clone, Copy)]
pub(crate) struct StoreQuotas<'a> {
    rates: &'a [Rate],
    taken: &'a Costs,
    cost: &'a Costs,
}

impl<'a> StoreQuotas<'a> {
    pub(crate) fn new(rates: &'a [Rate], taken: &'a Costs, cost: &'a Costs) -> Self {
        Self { rates, taken, cost }
    }
}

// ===== job slots =====

impl RedisStore {
    /// Takes `jobs` of `limit` job slots at once (one per job the create starts) for a
    /// create about to be sent, held as `member` (and `member/2`.. for the others) for at most
    /// `job_lease`; none unless all are free.
    pub(crate) fn slot_acquire(
        &self,
        limit: usize,
        job_lease: Duration,
        member: &str,
        jobs: u32,
    ) -> StoreCall {
        let mut args = vec![
            "acquire".into(),
            limit.to_string(),
            micros(job_lease),
            member.into(),
        ];
        if jobs != 1 {
            args.push(jobs.to_string());
        }
        self.run_slots(args)
    }

    /// The create's slot held as `member` made job `id`, for each pair of `binds`. If a job
    /// is already over somewhere in the fleet (completed before this bind arrived), its slot
    /// is given back instead and the creator hears of it as of a job done elsewhere.
    pub(crate) fn slot_bind(
        &self,
        binds: impl IntoIterator<Item = (String, String)>,
        job_lease: Duration,
    ) {
        let binds = binds.into_iter();
        let mut args = Vec::with_capacity(2 + binds.size_hint().0 * 2);
        args.push("bind".into());
        for (i, (member, id)) in binds.into_iter().enumerate() {
            args.push(member);
            args.push(id);
            if i == 0 {
                args.push(micros(job_lease));
            }
        }
        if args.len() > 1 {
            self.spawn(self.run_slots(args));
        }
    }

    /// The creates' slots held as `members` are over without a job.
    pub(crate) fn slot_release(&self, members: impl IntoIterator<Item = String>) {
        let members = members.into_iter();
        let mut args = Vec::with_capacity(1 + members.size_hint().0);
        args.push("release".into());
        args.extend(members);
        if args.len() > 1 {
            self.spawn(self.run_slots(args));
        }
    }

    /// The outcome of the creates' slots held as `members` will never be read: from now on a
    /// reconcile may account for them (a create still in flight is never reconciled away).
    pub(crate) fn slot_unknown(
        &self,
        members: impl IntoIterator<Item = String>,
        job_lease: Duration,
    ) {
        let members = members.into_iter();
        let mut args = Vec::with_capacity(2 + members.size_hint().0);
        args.push("unknown".into());
        for (i, member) in members.into_iter().enumerate() {
            args.push(member);
            if i == 0 {
                args.push(micros(job_lease));
            }
        }
        if args.len() > 1 {
            self.spawn(self.run_slots(args));
        }
    }

    /// Job `id` is over, wherever it was created. The fleet remembers it for `job_lease`, so a
    /// bind or a stale list that comes later does not take a slot for it again.
    pub(crate) fn job_done(&self, id: &str, job_lease: Duration) {
        let message = format!("done:{id}");
        self.spawn(self.run_slots(vec![
            "remove".into(),
            format!("j:{id}"),
            message,
            micros(job_lease),
        ]));
    }

    /// Job `id` was seen active: it holds a slot, whoever created it.
    pub(crate) fn job_active(&self, id: &str, job_lease: Duration) {
        self.spawn(self.run_slots(vec!["active".into(), id.into(), micros(job_lease)]));
    }

    /// `active` is every job the server counts, as listed at `as_of` on `clock`.
    ///
    /// Redis judges which holds are older than the list on its own clock, from the list's
    /// age. The age is taken when the change is sent (not when it is queued), and the store's
    /// timeout is added to it, since the script runs within the timeout of its send or
    /// not at all as far as this process knows: a hold taken just after the list was requested
    /// is kept, never freed early.
    pub(crate) fn jobs_reconcile(
        &self,
        active: Vec<String>,
        as_of: crate::clock::Nanos,
        clock: crate::clock::Clock,
        job_lease: Duration,
    ) {
        let store = self.clone();
        self.spawn(SyncFuture::new(Box::pin(async move {
            let age = Duration::from_nanos(clock.now().saturating_sub(as_of));
            let age = age.saturating_add(store.inner.timeout);
            let mut args = vec!["reconcile".into(), micros(age), micros(job_lease)];
            args.extend(active);
            store.run_slots(args).await
        })));
    }

    /// Ids of jobs another process gave back.
    pub(crate) fn done_jobs(&self) -> broadcast::Receiver<Arc<str>> {
        self.inner.done.subscribe()
    }

    /// Gives a place back in the background, if there is room in the places' queue;
    /// otherwise hands the change back (to be awaited on the request's path).
    pub(crate) fn try_give_back(&self, op: StoreCall) -> Result<(), StoreCall> {
        self.inner
            .places
            .try_send(Change::Run(op))
            .map_err(|full| match full.into_inner() {
                Change::Run(op) => op,
                Change::Flushed(_) => unreachable!("a place's change was sent"),
            })
    }

    /// Gives a place back in the background: in the places' queue, or, when it is full, in a
    /// task of its own rather than lose it (nobody awaits it: its request is gone).
    pub(crate) fn give_back(&self, op: StoreCall) {
        if let Err(op) = self.try_give_back(op) {
            let overflow = self.inner.overflow.clone();
            overflow.running.fetch_add(1, Ordering::SeqCst);
            self.inner.runtime.spawn(async move {
                let turn = overflow.turns.clone().acquire_owned().await;
                done(op.await);
                drop(turn);
                if overflow.running.fetch_sub(1, Ordering::SeqCst) == 1 {
                    overflow.ended.notify_waiters();
                }
            });
        }
    }

    /// Runs a job slot's change in the background, after the ones made before it.
    pub(crate) fn spawn(&self, op: StoreCall) {
        if self.inner.background.try_send(Change::Run(op)).is_err() {
            tracing::debug!(
                "too many changes wait for the store: this one is dropped, and its lease covers it"
            );
        }
    }

    fn run_slots(&self, mut args: Vec<String>) -> StoreCall {
        args.insert(1, self.inner.channel.clone());
        args.insert(2, REMEMBERED_DONE.to_string());
        let slots = self.key("slots");
        let keys = vec![
            format!("{slots}:held"),
            format!("{slots}:done"),
            format!("{slots}:since"),
        ];
        self.invoke(&self.inner.slots_script, keys, args)
    }
}

/// The longest time a script is given: 2^52 microseconds (about 142 years, forever for a lease
/// or a hold), so that its numbers stay exact in Lua and its expiries are valid.
const MAX_MICROS: u128 = 1 << 52;

/// Whole microseconds, rounded up (a wait or a hold is never shortened), as a script takes them.
fn micros(d: Duration) -> String {
    d.as_nanos().div_ceil(1_000).min(MAX_MICROS).to_string()
}

/// What a script's reply (or its absence) means.
/// Logs the store's health where it changes: the first failure at `warn` (with what the
/// layers do meanwhile), each further one at `debug`, the first success after them at `info`.
fn health(failing: &AtomicBool, fail_mode: FailMode, outcome: &Result<Decision, StoreError>) {
    match outcome {
        Err(error) if !failing.swap(true, Ordering::Relaxed) => {
            let meanwhile = match fail_mode {
                FailMode::Open => "each process falls back to its own limits",
                FailMode::Closed => {
                    "requests under a shared limit fail (client) or are refused (server)"
                }
            };
            tracing::warn!(%error, "the shared store failed: until it answers again, {meanwhile}; further failures are logged at debug");
        }
        Err(error) => tracing::debug!(%error, "the shared store failed again"),
        Ok(_) if failing.swap(false, Ordering::Relaxed) => {
            tracing::info!("the shared store answers again");
        }
        Ok(_) => {}
    }
}

fn decision(
    reply: Result<redis::RedisResult<Vec<i64>>, tokio::time::error::Elapsed>,
    timeout: Duration,
    secrets: &Secrets,
) -> Result<Decision, StoreError> {
    let reply = match reply {
        Err(_) => return Err(StoreError::Timeout(timeout)),
        Ok(Err(error)) => return Err(StoreError::Unavailable(secrets.scrub(error.to_string()))),
        Ok(Ok(reply)) => reply,
    };
    match reply[..] {
        [1, reset, remaining, at] => Ok(Decision::Counted {
            remaining: u32::try_from(remaining).unwrap_or(0),
            reset: Duration::from_micros(u64::try_from(reset).unwrap_or(0)),
            at: u64::try_from(at).unwrap_or(0),
        }),
        [1, _] => Ok(Decision::Admitted),
        [_, wait] => Ok(Decision::Wait(
            u64::try_from(wait).ok().map(Duration::from_micros),
        )),
        _ => Err(StoreError::Unavailable(format!(
            "unexpected reply from the store's script: {reply:?}"
        ))),
    }
}

impl RedisStoreBuilder {
    fn new(nodes: Nodes) -> Self {
        Self {
            settings: Settings::new(nodes),
            prefix: "tower-quota".to_owned(),
            timeout: Duration::from_millis(250),
            fail_mode: FailMode::Open,
            in_flight_lease: Duration::from_secs(120),
            poll: Duration::from_millis(500),
        }
    }

    /// The user to authenticate as (Redis ACL), in place of the URL's.
    pub fn username(mut self, username: impl Into<String>) -> Self {
        self.settings.username = Some(username.into());
        self
    }

    /// The password to authenticate with, in place of the URL's. It is never shown: not in
    /// `Debug` output, errors or logs. An empty one is none (a variable left unset), as is an
    /// empty [`username`](Self::username).
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.settings.password = Some(password.into());
        self
    }

    /// Trusts the certificate authority in `pem` (PEM) for `rediss://` nodes, in place of the
    /// OS's root certificates: for a Redis whose certificate is signed by a CA of your own.
    #[cfg(feature = "redis-tls")]
    pub fn ca_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.settings.ca_certificate = Some(pem.into());
        self
    }

    /// Presents this certificate and private key (PEM) to `rediss://` nodes that ask clients
    /// for one (mutual TLS, `tls-auth-clients yes`).
    #[cfg(feature = "redis-tls")]
    pub fn client_certificate(
        mut self,
        certificate_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.settings.client_certificate = Some((certificate_pem.into(), key_pem.into()));
        self
    }

    /// The namespace of this store's keys (default `"tower-quota"`). Processes that share
    /// limits use the same prefix; limits of different API keys use different ones.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The longest one Redis operation may take before the [`FailMode`] applies (default
    /// 250 ms).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// What a layer does when Redis is slow or down (default [`FailMode::Open`]).
    pub fn fail_mode(mut self, fail_mode: FailMode) -> Self {
        self.fail_mode = fail_mode;
        self
    }

    /// The longest a request in flight holds its place if its process never gives it back
    /// (it died); default 2 minutes. A request that is really in flight longer than this
    /// loses its place early, so keep it above the slowest response.
    pub fn in_flight_lease(mut self, lease: Duration) -> Self {
        self.in_flight_lease = lease;
        self
    }

    /// The longest a waiting request sleeps before asking Redis again when no release
    /// notification comes (default 500 ms).
    pub fn poll_interval(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    /// Builds the store. Connections are made lazily, so Redis need not be up yet (the
    /// [`FailMode`] covers the time until it is). Must run inside a Tokio runtime, which
    /// keeps the release subscription alive.
    pub fn build(self) -> Result<RedisStore, ConfigError> {
        let invalid = |name, reason| Err(ConfigError::InvalidSetting { name, reason });
        if self.timeout.is_zero() {
            return invalid("timeout", "must be above zero");
        }
        if self.poll.is_zero() {
            return invalid("poll_interval", "must be above zero");
        }
        if self.in_flight_lease.is_zero() {
            return invalid("in_flight_lease", "must be above zero");
        }
        if self.prefix.is_empty() || self.prefix.contains(['{', '}']) {
            return invalid("prefix", "must be non-empty, without braces");
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return invalid(
                "runtime",
                "a RedisStore must be built inside a Tokio runtime",
            );
        };
        // Release notifications come on a RESP3 connection of their own, resubscribed after
        // every reconnect. A disconnection wakes the waiters too, so that they ask again.
        let released = Arc::new(Notify::new());
        let notify = released.clone();
        let (done, _) = broadcast::channel(1024);
        let done_sender = done.clone();
        let push = move |push: PushInfo| {
            if push.kind == PushKind::Message {
                if let Some(Value::BulkString(message)) = push.data.get(1) {
                    if let Some(id) = message.strip_prefix(b"done:") {
                        let id = String::from_utf8_lossy(id);
                        let _ = done_sender.send(Arc::from(id.as_ref()));
                    }
                }
            }
            notify.notify_waiters();
            Ok::<(), redis::aio::SendError>(())
        };
        let (connection, subscriber) = self.settings.connect(self.timeout, self.poll, push)?;
        let secrets = self.settings.secrets();
        let channel = format!("{{{}}}:released", self.prefix);
        let subscriber = runtime.spawn(subscribe(
            subscriber,
            channel.clone(),
            self.poll,
            secrets.clone(),
        ));
        // The workers are detached: each ends once every handle is dropped and its queue
        // is drained.
        let (background, queue) = mpsc::channel(BACKGROUND);
        runtime.spawn(in_order(queue));
        let (places, queue) = mpsc::channel(BACKGROUND);
        runtime.spawn(at_once(queue));

        let node = std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), 0u8);
        Ok(RedisStore {
            inner: Arc::new(Inner {
                connection,
                secrets,
                prefix: self.prefix,
                channel,
                timeout: self.timeout,
                fail_mode: self.fail_mode,
                in_flight_lease: self.in_flight_lease,
                poll: self.poll,
                released,
                node,
                counter: AtomicU64::new(0),
                script: Script::new(include_str!("rate.lua")),
                slots_script: Script::new(include_str!("slots.lua")),
                done,
                background,
                places,
                runtime,
                overflow: Arc::new(Overflow {
                    running: std::sync::atomic::AtomicUsize::new(0),
                    ended: Notify::new(),
                    turns: Arc::new(tokio::sync::Semaphore::new(PLACES_AT_ONCE)),
                }),
                subscriber,
                failing: Arc::new(AtomicBool::new(false)),
            }),
        })
    }
}

/// Subscribes to release notifications until it succeeds, then pings at the poll interval so
/// that a lost connection is noticed, remade and resubscribed.
async fn subscribe(connection: Connection, channel: String, every: Duration, secrets: Secrets) {
    let mut subscribed = false;
    loop {
        if !subscribed {
            match connection.subscribe(&channel).await {
                Ok(()) => subscribed = true,
                Err(error) => {
                    let error = secrets.scrub(error.to_string());
                    tracing::debug!(%error, "release notifications: subscribing again");
                }
            }
        } else if let Err(error) = connection.ping().await {
            let error = secrets.scrub(error.to_string());
            tracing::debug!(%error, "release notifications: reconnecting");
        }
        tokio::time::sleep(every).await;
    }
}

// One client's job slots, for a plan enforced by a fleet of servers (server mode).
mod keyed_slots;
pub(crate) use keyed_slots::KeyedCall;
