//! [`Builder`]: the routes, their quotas and each mode's settings, checked when built.

use std::fmt;
use std::hash::{Hash, RandomState};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;

use super::client::state::{ClientRoute, Learn, QuotaNames};
use super::cost::{CostFns, Quotas, ResponseHead, Weighing};
use super::layer::LayerState;
use super::server::key::{
    ClientKey, ForwardedHeader, KeyHashing, MissingKey, RequestHead, TrustedProxies,
};
use super::server::state::KeyedRoute;
use super::server::tier::{TierSettings, Tiers, UnknownTier};
use crate::clock::Clock;
use crate::error::ConfigError;
use crate::event::{EventConfig, LayerKind};
use crate::quota::{Quota, Rate};
use crate::route::{Pattern, RouteTable};
#[cfg(feature = "redis")]
use crate::store::StoreHandle;

use super::layer::{RateLimitByRoute, Reject, Wait, DEFAULT_ROUTE};
use super::reject::EmptyBody;

/// Client-mode settings, as held by a [`Builder`].
#[derive(Debug, Clone)]
pub struct WaitConfig {
    pub(crate) max_wait: Option<Duration>,
    pub(crate) max_queue: Option<usize>,
    pub(crate) abandoned_hold: Duration,
    learn: Learn,
    /// The quotas the server named for learnt routes, and the route whose state holds each.
    pub(crate) quota_names: QuotaNames,
    #[cfg(feature = "redis")]
    pub(crate) store: Option<StoreHandle>,
}

/// Server-mode settings, as held by a [`Builder`].
pub struct RejectConfig<F = EmptyBody> {
    pub(crate) key: ClientKey,
    /// A key setting that could not be used, reported by `build`.
    key_error: Option<ConfigError>,
    pub(crate) on_missing: Option<MissingKey>,
    pub(crate) headers: bool,
    max_keys: usize,
    /// IPv6 clients are told apart by this many leading bits of their address.
    pub(crate) ipv6_prefix: u8,
    pub(crate) body: F,
    pub(crate) hasher: KeyHashing,
    #[cfg(feature = "redis")]
    pub(crate) store: Option<StoreHandle>,
    /// Whether the missing peer address was warned about.
    pub(crate) warned_no_peer: AtomicBool,
    /// The tiers as given to the builder (taken by `build`).
    tier_settings: TierSettings,
    /// The tiers, compiled: `None` without tiers.
    pub(crate) tiers: Option<Tiers>,
}

impl<F> fmt::Debug for RejectConfig<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RejectConfig")
            .field("key", &self.key)
            .field("on_missing", &self.on_missing)
            .field("headers", &self.headers)
            .field("max_keys", &self.max_keys)
            .field("ipv6_prefix", &self.ipv6_prefix)
            .field("tiers", &self.tiers)
            .finish()
    }
}

/// Builds a [`RateLimitByRoute`]. Made by [`RateLimitByRoute::builder`].
#[derive(Debug)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct Builder<C = WaitConfig> {
    /// Each route's pattern and quotas; `None` for a route whose quota is learnt.
    routes: Vec<(String, Option<Quotas>)>,
    /// What requests cost in the units quotas count.
    costs: CostFns,
    default: Option<Quota>,
    margin: Option<Duration>,
    /// Client mode: a learnt default quota for requests that match no route.
    learn_quota: bool,
    events: EventConfig,
    config: C,
}

impl RateLimitByRoute<Wait> {
    /// Starts a client-mode builder with no routes and no default quota.
    pub fn builder() -> Builder<WaitConfig> {
        Builder {
            routes: Vec::new(),
            costs: CostFns::default(),
            default: None,
            margin: None,
            learn_quota: false,
            events: EventConfig::default(),
            config: WaitConfig {
                max_wait: None,
                max_queue: None,
                abandoned_hold: Duration::from_secs(60),
                learn: Learn {
                    enabled: true,
                    backoff: Duration::from_secs(1),
                    dialects: crate::headers::Dialects::all(),
                },
                quota_names: QuotaNames::default(),
                #[cfg(feature = "redis")]
                store: None,
            },
        }
    }
}

impl<C> Builder<C> {
    event_setters!("rate_limit");

    /// Gives the requests matching `pattern` their own quota, or several: a request waits
    /// (client mode) or is refused (server mode) until every one of them admits it, and then
    /// takes its place in all of them at once. It never holds a place in one while it waits
    /// for another.
    ///
    /// ```
    /// use tower_quota::{Quota, RateLimitByRoute};
    ///
    /// let layer = RateLimitByRoute::builder()
    ///     .route("POST /v2/generate", Quota::per_minute(60))
    ///     .route("POST /v1/chat", [Quota::per_minute(500), Quota::per_day(10_000)])
    ///     .build()
    ///     .unwrap();
    /// # drop(layer);
    /// ```
    ///
    /// A quota [`counting`](Quota::counting) a unit other than requests (tokens, points,
    /// weights) takes what [`cost`](Builder::cost) says each request costs in it.
    ///
    /// A pattern is a method (or `*` for any method), one space, and a path in which `{name}`
    /// matches one segment and a final `{*name}` the rest: `"POST /v2/generate"`,
    /// `"GET /v2/generate/{id}"`, `"* /v2/assets/{*rest}"`. Routes for the request's own
    /// method are tried before `*` routes. Malformed or colliding patterns are reported by
    /// [`build`](Builder::build), naming the pattern.
    pub fn route(mut self, pattern: impl Into<String>, quotas: impl Into<Quotas>) -> Self {
        self.routes.push((pattern.into(), Some(quotas.into())));
        self
    }

    /// What a request costs in `unit`, for every quota [`counting`](Quota::counting) it: a
    /// closure over the request's head (its headers, or an [`http::Extensions`] value the
    /// caller set). A quota that counts requests costs one per request.
    ///
    /// In client mode the cost is taken when the request is sent. It may be an upper bound
    /// (the most tokens a completion may spend), corrected from the response by
    /// [`cost_after`](Builder::cost_after). A cost larger than a quota allows at once (its
    /// count, or a paced quota's burst) is returned to the caller at once as
    /// [`RateLimitError::CostTooHigh`](super::RateLimitError::CostTooHigh); server mode
    /// answers it `413 Content Too Large`. A request that costs nothing in a quota takes
    /// nothing from it, but waits (server mode: is refused) while the quota is full.
    ///
    /// [`acquire`](RateLimitByRoute::acquire) hands the closure a request of a method and a
    /// path only; [`acquire_with_head`](RateLimitByRoute::acquire_with_head) gives it the
    /// request's fields and extensions.
    pub fn cost<G>(mut self, unit: &'static str, cost: G) -> Self
    where
        G: Fn(&RequestHead<'_>) -> u32 + Send + Sync + 'static,
    {
        self.costs.set_before(unit, Arc::new(cost));
        self
    }

    /// What a request turned out to cost in `unit`, read from its response's head (a usage
    /// header, the tokens a server says it counted); `None` keeps the cost taken. The
    /// difference is taken or given back at once: the request holds its true cost in the
    /// quota from its response on, so the requests after it see the true budget. A cost
    /// counts as at most the quota's capacity. In server mode, the response is the one the
    /// inner service answers with. The closure runs once per response; should it panic, the
    /// request is held as abandoned.
    ///
    /// ```
    /// use tower_quota::rate_limit::ResponseHead;
    /// use tower_quota::{Quota, RateLimitByRoute};
    ///
    /// let layer = RateLimitByRoute::builder()
    ///     .route(
    ///         "POST /v1/chat",
    ///         [Quota::per_minute(500), Quota::per_minute(30_000).counting("tokens")],
    ///     )
    ///     // At most the completion's limit, as the caller set it in a header.
    ///     .cost("tokens", |head| {
    ///         let max = head.headers().get("x-max-tokens");
    ///         max.and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(4_096)
    ///     })
    ///     // What the server says it counted.
    ///     .cost_after("tokens", |head: &ResponseHead<'_>| {
    ///         let used = head.headers().get("x-usage-tokens")?;
    ///         used.to_str().ok()?.parse().ok()
    ///     })
    ///     .build()
    ///     .unwrap();
    /// # drop(layer);
    /// ```
    pub fn cost_after<G>(mut self, unit: &'static str, cost: G) -> Self
    where
        G: Fn(&ResponseHead<'_>) -> Option<u32> + Send + Sync + 'static,
    {
        self.costs.set_after(unit, Arc::new(cost));
        self
    }

    /// The quota shared by every request that matches no route. Without one, such requests
    /// pass unlimited.
    pub fn default_quota(mut self, quota: Quota) -> Self {
        self.default = Some(quota);
        self
    }

    /// How much longer than its period a request holds its place after its response, to cover
    /// late timers and a server's clock granularity.
    ///
    /// Default: 1% of the time a request holds its place for (the window of a sliding window,
    /// the emission interval of a paced quota), at most 50 ms. Server mode counts requests
    /// itself and uses no margin.
    pub fn safety_margin(mut self, margin: Duration) -> Self {
        self.margin = Some(margin);
        self
    }

    /// The route table and each route's name and compiled quotas; a learnt route (client
    /// mode only) gets `learnt`.
    fn compile(
        &self,
        margin: Option<Duration>,
        learnt: Option<Quota>,
    ) -> Result<(RouteTable, Vec<CompiledRoute>), ConfigError> {
        if self.routes.len() >= usize::from(u16::MAX) {
            return Err(ConfigError::InvalidSetting {
                name: "route",
                reason: "at most 65,534 routes",
            });
        }
        let mut table = RouteTable::default();
        let mut routes = Vec::with_capacity(self.routes.len() + 1);
        let configured = self.routes.iter().filter_map(|(_, q)| q.as_ref());
        let quotas = configured.flat_map(Quotas::as_slice).chain(&self.default);
        self.costs.check(quotas)?;
        for (index, (text, quotas)) in self.routes.iter().enumerate() {
            let pattern = Pattern::parse(text)?;
            let (quotas, is_learnt) = match (quotas, &learnt) {
                (Some(quotas), _) => (quotas.as_slice(), false),
                (None, Some(learnt)) => (std::slice::from_ref(learnt), true),
                (None, None) => {
                    return Err(ConfigError::InvalidSetting {
                        name: "learn_route",
                        reason: "client mode only: server mode enforces the quotas it is given",
                    })
                }
            };
            if quotas.is_empty() {
                return Err(ConfigError::InvalidQuota {
                    route: text.clone(),
                    reason: "a route needs at least one quota",
                });
            }
            for quota in quotas {
                check_quota(text, quota)?;
            }
            table.insert(text, &pattern, index)?;
            routes.push(CompiledRoute {
                name: Arc::from(text.as_str()),
                rates: quotas.iter().map(|q| Rate::new(*q, margin)).collect(),
                learnt: is_learnt,
                weighing: Weighing::new(quotas, &self.costs),
            });
        }
        if let Some(quota) = &self.default {
            check_quota(DEFAULT_ROUTE, quota)?;
            table.set_default(routes.len());
            routes.push(CompiledRoute {
                name: Arc::from(DEFAULT_ROUTE),
                rates: vec![Rate::new(*quota, margin)],
                learnt: self.learn_quota,
                weighing: Weighing::new(std::slice::from_ref(quota), &self.costs),
            });
        }
        Ok((table, routes))
    }
}

/// A route compiled: its name (its pattern, or `"default"`), quotas, whether its quota is
/// learnt, and how its requests are weighed, if they are.
struct CompiledRoute {
    name: Arc<str>,
    rates: Vec<Rate>,
    learnt: bool,
    weighing: Option<Weighing>,
}

pub(super) fn check_quota(route: &str, quota: &Quota) -> Result<(), ConfigError> {
    quota
        .validate()
        .map_err(|reason| ConfigError::InvalidQuota {
            route: route.to_owned(),
            reason,
        })
}

impl Builder<WaitConfig> {
    /// The longest a request may wait for its turn. A request that would wait longer is
    /// returned at once with [`RateLimitError::WaitTooLong`](super::RateLimitError::WaitTooLong), saying how
    /// long it would have waited; one whose wait turns out longer than estimated is returned
    /// when the maximum runs out. Default: no maximum.
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.config.max_wait = Some(max_wait);
        self
    }

    /// The most requests that may wait for their turn on one route at once (in this process,
    /// with or without a store). A request that would have to wait while that many already
    /// do is returned at once with
    /// [`RateLimitError::QueueFull`](super::RateLimitError::QueueFull), unsent; `0` returns
    /// every request that would have to wait. Default: no maximum, so the queue grows with
    /// the requests the program makes (each waiting request holds its own request and a
    /// clone of the inner service).
    pub fn max_queue(mut self, max_queue: usize) -> Self {
        self.config.max_queue = Some(max_queue);
        self
    }

    /// How long a request given up on after it was sent (its response future dropped, or a
    /// transport error) keeps holding its place as if still in flight; after that it counts
    /// as answered then, and holds its place for the quota's period (or emission interval)
    /// from then, as an answered request does. Default: 60 s.
    ///
    /// The server may count such a request late: a stalled or queueing server still has it
    /// after the client has given up. A server that counts an abandoned request no later than
    /// `abandoned_hold` after the client gave up on it never sees more than the quota; one
    /// that counts it later may. A longer hold covers slower servers, at the price of places
    /// held longer after each timeout or transport error. `Duration::ZERO` counts an abandoned
    /// request as answered at once.
    pub fn abandoned_hold(mut self, hold: Duration) -> Self {
        self.config.abandoned_hold = hold;
        self
    }

    /// Whether responses passing back teach the limiter (default: yes). A 429 closes its route
    /// to every caller until its `Retry-After`; `RateLimit`, `RateLimit-Remaining`/`-Reset` and
    /// `X-RateLimit-Remaining`/`-Reset` fields can lower what is left until their reset. Either
    /// can only tighten the local limit, never loosen it.
    pub fn learn_from_responses(mut self, enabled: bool) -> Self {
        self.config.learn.enabled = enabled;
        self
    }

    /// How long a 429 that carries no usable `Retry-After` closes its route. Default: 1 s.
    pub fn learn_backoff(mut self, backoff: Duration) -> Self {
        self.config.learn.backoff = backoff;
        self
    }

    /// Learns the quota nobody configured: requests that match no route, with no default
    /// quota, count against the limit the server states, in any dialect read
    /// ([`dialects`](Self::dialects)). The first requests go at once; from the first response
    /// that states a limit on, no more are sent than it says are left before its reset, and
    /// after each reset no more than the stated limit, until a response says more. Where the
    /// server's statements are true, it answers no 429 after that first statement. All such
    /// requests share one learnt limit; a configured quota stays the ceiling of its route,
    /// which learning only tightens.
    ///
    /// [`learn_route`](Self::learn_route) learns the quota of one route apart.
    pub fn learn_quota(mut self) -> Self {
        self.learn_quota = true;
        self
    }

    /// A route whose quota nobody configured: its requests count against the limit the
    /// server states for them, learnt as [`learn_quota`](Self::learn_quota) learns the
    /// default's. `pattern` is written as for [`route`](Self::route).
    ///
    /// Learnt routes whose responses name the same quota (GitHub's `x-ratelimit-resource`,
    /// such as `core` or `search`; the draft's policy names) share it: from the first such
    /// response on, a route's requests count against the quota as the first learnt route to
    /// name it counts it, and wait in one queue with that route's requests; its requests
    /// still in flight where it counted before are taken off what the shared quota has left.
    /// A route keeps the first quota it is placed under: a later response naming another
    /// (a server renaming it, or naming one of several policies alone) only tightens it,
    /// never moves it nor loosens it. The learnt default ([`learn_quota`](Self::learn_quota))
    /// shares too. Routes with a configured quota keep their own.
    pub fn learn_route(mut self, pattern: impl Into<String>) -> Self {
        self.routes.push((pattern.into(), None));
        self
    }

    /// The rate-limit header dialects read from responses (default: every one of
    /// [`Dialect`](crate::headers::Dialect)).
    pub fn dialects(mut self, dialects: crate::headers::Dialects) -> Self {
        self.config.learn.dialects = dialects;
        self
    }

    /// Keeps the quotas in a store shared with other processes (feature `redis`), so that
    /// every process's requests count against one quota per route: the fleet never sends
    /// more than a route's quota together. Requests then wait across processes (a release
    /// anywhere wakes them) and the store's [`FailMode`](crate::store::FailMode) says what
    /// happens while it is away.
    ///
    /// With a store, a 429 passing back closes the route for the whole fleet until its
    /// `Retry-After`; `RateLimit` / `X-RateLimit-*` fields are not learnt from.
    #[cfg(feature = "redis")]
    pub fn store(mut self, store: crate::store::RedisStore) -> Self {
        self.config.store = Some(store);
        self
    }

    /// Switches to server mode: requests over quota are answered at once with a 429 and a
    /// `Retry-After` in whole seconds (rounded up, never 0), plus the IETF draft
    /// `RateLimit-Policy` and `RateLimit` fields.
    pub fn reject(self) -> Builder<RejectConfig<EmptyBody>> {
        Builder {
            routes: self.routes,
            costs: self.costs,
            default: self.default,
            margin: self.margin,
            learn_quota: false,
            events: self.events,
            config: RejectConfig {
                key: ClientKey::Global,
                // Client mode only: a server enforces the quotas it is given.
                key_error: self.learn_quota.then_some(ConfigError::InvalidSetting {
                    name: "learn_quota",
                    reason: "client mode only: server mode enforces the quotas it is given",
                }),
                on_missing: None,
                headers: true,
                max_keys: 65_536,
                ipv6_prefix: 64,
                body: EmptyBody,
                hasher: KeyHashing::Random(RandomState::new()),
                #[cfg(feature = "redis")]
                store: self.config.store,
                warned_no_peer: AtomicBool::new(false),
                tier_settings: TierSettings::default(),
                tiers: None,
            },
        }
    }

    /// Builds the layer, or says which part of the configuration is unusable.
    pub fn build(mut self) -> Result<RateLimitByRoute<Wait>, ConfigError> {
        // A learnt quota has no bound of its own: what the server states bounds it.
        let learnt = Quota::new(u32::MAX, Duration::from_secs(1));
        self.learn_quota &= self.default.is_none();
        if self.learn_quota {
            self.check_learning("learn_quota")?;
            self.default = Some(learnt);
        }
        if self.routes.iter().any(|(_, quota)| quota.is_none()) {
            self.check_learning("learn_route")?;
        }
        let (table, routes) = self.compile(self.margin, Some(learnt))?;
        let learn = self.config.learn;
        let routes = routes
            .into_iter()
            .enumerate()
            .map(|(index, route)| {
                // `compile` refused more routes than a `u16` counts.
                ClientRoute::new(index as u16, route.name, learn, route.rates, route.learnt)
                    .weighed(route.weighing)
            })
            .collect::<Box<[ClientRoute]>>();
        let events = self
            .events
            .build(LayerKind::Client, routes.iter().map(|r| r.name.clone()));
        Ok(RateLimitByRoute {
            mode: Wait(Arc::new(Arc::new(LayerState {
                table,
                routes,
                events,
                clock: Clock::new(),
                config: self.config,
            }))),
        })
    }
}

impl Builder<WaitConfig> {
    /// Whether quotas can be learnt as configured, for the setting `name` that learns one.
    fn check_learning(&self, name: &'static str) -> Result<(), ConfigError> {
        #[cfg(feature = "redis")]
        if self.config.store.is_some() {
            return Err(ConfigError::InvalidSetting {
                name,
                reason: "a learnt quota is kept in this process only: not with a store",
            });
        }
        let reason = if self.config.learn.dialects == crate::headers::Dialects::none() {
            "a quota is learnt from the fields of a dialect: none is read"
        } else if !self.config.learn.enabled {
            "a quota is learnt from responses: learn_from_responses is off"
        } else {
            return Ok(());
        };
        Err(ConfigError::InvalidSetting { name, reason })
    }
}

impl<F> Builder<RejectConfig<F>> {
    /// Counts quotas per value of this request header field, such as `x-api-key`. Requests
    /// without it follow the [`MissingKey`] policy (by default they share one anonymous
    /// quota). Keys are kept only as keyed hashes.
    pub fn key_header(mut self, name: HeaderName) -> Self {
        self.config.key = ClientKey::Header(name);
        self
    }

    /// Counts quotas per peer IP address, read from the request's extensions: a
    /// `std::net::SocketAddr` or `IpAddr`, or (feature `axum`) axum's
    /// `ConnectInfo<SocketAddr>`, which `into_make_service_with_connect_info` inserts.
    ///
    /// A request without any of these is answered `500 Internal Server Error`, with a warning
    /// logged once: the server is not giving the layer the address (axum served without
    /// `into_make_service_with_connect_info`, or the crate built without the `axum`
    /// feature), and counting every client against one shared quota would be a silent
    /// outage. [`on_missing_key`](Self::on_missing_key) chooses otherwise explicitly.
    ///
    /// Behind a reverse proxy every request comes from the proxy's address: use
    /// [`key_forwarded_ip`](Self::key_forwarded_ip) there.
    ///
    /// An IPv6 client is keyed by its `/64` network, not its address: a host is usually
    /// given a whole `/64` and can take a fresh address from it for every request, so one
    /// quota per address would be no quota at all. [`ipv6_prefix`](Self::ipv6_prefix) sets
    /// another length.
    pub fn key_peer_ip(mut self) -> Self {
        self.config.key = ClientKey::PeerIp;
        self
    }

    /// How many leading bits of an IPv6 client address tell clients apart, for
    /// [`key_peer_ip`](Self::key_peer_ip) and [`key_forwarded_ip`](Self::key_forwarded_ip)
    /// (default 64: one quota per `/64` network, the block a single host or home is usually
    /// given). Use 56 or 48 where providers hand out larger blocks to one customer, 128 to
    /// key by the full address. More than 128 is a [`ConfigError`] from `build`. IPv4
    /// addresses (and IPv4-mapped IPv6 ones) are always keyed in full.
    pub fn ipv6_prefix(mut self, bits: u8) -> Self {
        self.config.ipv6_prefix = bits;
        self
    }

    /// Counts quotas per client IP address as forwarded by trusted reverse proxies.
    ///
    /// `trusted_proxies` are addresses (`"10.0.0.7"`) or ranges (`"10.0.0.0/8"`,
    /// `"fd00::/8"`); a malformed one is a [`ConfigError`] from `build`. A request whose
    /// peer (read as [`key_peer_ip`](Self::key_peer_ip) does) is not one of them is keyed by
    /// the peer, whatever its header fields say. One from a trusted proxy is keyed by the
    /// address in `header`: for the lists (`Forwarded`, `X-Forwarded-For`, all their field
    /// lines in order), the first address from the right that is not a trusted proxy, since
    /// everything left of it was written by the client; without the field, by the proxy's
    /// own address. The list is read only as far as that address, so what a client wrote
    /// left of it (garbage included) changes nothing; an entry the walk reaches that is not an
    /// address (`unknown`, `_hidden`) follows the [`MissingKey`] policy. IPv6 addresses count
    /// by network, as in [`key_peer_ip`](Self::key_peer_ip). Name the field your proxy writes: one it passes through
    /// untouched is the client's to forge.
    pub fn key_forwarded_ip<I>(mut self, header: ForwardedHeader, trusted_proxies: I) -> Self
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        match TrustedProxies::new(header, trusted_proxies) {
            Ok(proxies) => {
                self.config.key = ClientKey::Forwarded(Arc::new(proxies));
                self.config.key_error = None;
            }
            Err(error) => self.config.key_error = Some(error),
        }
        self
    }

    /// What a request without a client key gets (default: [`MissingKey::Shared`], one
    /// anonymous quota per route; for layers keyed by address, a missing peer address is
    /// answered 500 unless a policy is set here).
    pub fn on_missing_key(mut self, policy: MissingKey) -> Self {
        self.config.on_missing = Some(policy);
        self
    }

    /// Counts quotas per key that a closure reads from the request's head; `None` follows the
    /// [`MissingKey`] policy (by default one anonymous quota).
    pub fn key_fn<K, G>(mut self, key: G) -> Self
    where
        G: Fn(&RequestHead<'_>) -> Option<K> + Send + Sync + 'static,
        K: Hash,
    {
        self.config.key = ClientKey::from_fn(key);
        self
    }

    /// Whether the responses of limited routes carry the IETF draft `RateLimit-Policy` and
    /// `RateLimit` fields (default: yes): every response, so that a client can pace itself
    /// before it is refused, as the draft intends. A passing response gets
    /// `RateLimit: "<route>";r=<requests left>;t=<seconds until all it counted is gone>`, a
    /// 429 `r=0` and `t` the wait. Costs one small allocation per response (the field's
    /// value).
    pub fn rate_limit_headers(mut self, enabled: bool) -> Self {
        self.config.headers = enabled;
        self
    }

    /// The most client keys tracked at once, per route (default 65,536; 146 bytes each in a
    /// full table, whatever the quota). The table is cut into 16 shards, so the number is rounded up to a
    /// multiple of 16 (`max_keys(1)` tracks 16). A new client arriving at a full table takes
    /// the place of a little-used one, whose count is kept in a fixed-size shadow table for
    /// when it comes back: a flood of fresh keys neither grows memory nor locks newcomers out,
    /// and lets a client at its quota through only in the case the module docs name. See the
    /// [module docs](super#deploying-server-mode).
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.config.max_keys = max_keys;
        self
    }

    /// Derives each request's quotas from the request: `tier` names its tier (from its
    /// head: a header, the key, or an extension an authentication layer set), and a tier
    /// given to [`tier`](Self::tier) counts it under that tier's quotas on the routes the
    /// tier names (and under the routes' own quotas on the others). A request whose tier is
    /// unknown (the closure answers `None`, or a name no `tier` gave) follows `unknown`,
    /// which has no default: refused with a 403, counted in a tier named for it, or counted
    /// under the routes' own quotas.
    ///
    /// The closure runs on every request of a limited route, so a change of tier (an
    /// upgrade) takes effect on the client's next request. Each tier that names a route
    /// keeps its own table of clients there, bounded by [`max_keys`](Self::max_keys) as the
    /// route's own is: a client that changes tier is counted in its new tier's table from
    /// then on, starting from what it counted there before (nothing, usually), while what
    /// it counted in its old tier stays there until it no longer matters. So in the window
    /// of a change it may send up to both tiers' quotas; tiers are set by the server, not by
    /// the client, so only the server's own changes open that window. With a
    /// [`store`](Self::store), a client is counted under one key whatever its tier, against
    /// its tier's quotas: its count follows it across a change of tier, and a fleet of
    /// servers shares it.
    ///
    /// ```
    /// use axum::http::HeaderName;
    /// use tower_quota::rate_limit::UnknownTier;
    /// use tower_quota::{Quota, RateLimitByRoute};
    ///
    /// /// Set by an authentication layer in front of this one.
    /// #[derive(Clone)]
    /// struct Customer { tier: &'static str }
    ///
    /// let layer = RateLimitByRoute::builder()
    ///     .route("POST /v2/generate", Quota::per_minute(60))
    ///     .default_quota(Quota::per_minute(600))
    ///     .reject()
    ///     .key_header(HeaderName::from_static("x-api-key"))
    ///     .tier_by(
    ///         |head| head.extensions().get::<Customer>().map(|c| c.tier),
    ///         UnknownTier::Refuse,
    ///     )
    ///     .tier("hobbyist", [("POST /v2/generate", Quota::per_minute(60))])
    ///     .tier("scale", [("POST /v2/generate", Quota::per_minute(300))])
    ///     .build()
    ///     .unwrap();
    /// # drop(layer);
    /// ```
    pub fn tier_by<G, T>(mut self, tier: G, unknown: UnknownTier) -> Self
    where
        G: Fn(&RequestHead<'_>) -> Option<T> + Send + Sync + 'static,
        T: AsRef<str>,
    {
        self.config.tier_settings.set_by(tier, unknown);
        self
    }

    /// A tier, and its quotas on the routes it names: each pattern as written to
    /// [`route`](Builder::route) (or `"default"` for the default quota), with as many
    /// quotas, counting the same units in the same order, as the route has. Routes the
    /// tier does not name keep their own quotas for its clients. `build` fails on an
    /// unknown pattern, a pattern named twice, an unusable quota, a tier named twice, and
    /// on tiers without [`tier_by`](Self::tier_by).
    pub fn tier<I, P, Q>(mut self, name: impl Into<String>, routes: I) -> Self
    where
        I: IntoIterator<Item = (P, Q)>,
        P: Into<String>,
        Q: Into<Quotas>,
    {
        let routes = routes
            .into_iter()
            .map(|(pattern, quotas)| (pattern.into(), quotas.into()))
            .collect();
        let name: String = name.into();
        self.config.tier_settings.tiers.push((name.into(), routes));
        self
    }

    /// Builds each 429 response with this closure (its status and rate-limit fields are set
    /// afterwards), for example Sync's JSON error body.
    pub fn reject_with<G>(self, response: G) -> Builder<RejectConfig<G>> {
        Builder {
            routes: self.routes,
            costs: self.costs,
            default: self.default,
            margin: self.margin,
            learn_quota: false,
            events: self.events,
            config: RejectConfig {
                key: self.config.key,
                key_error: self.config.key_error,
                on_missing: self.config.on_missing,
                headers: self.config.headers,
                max_keys: self.config.max_keys,
                ipv6_prefix: self.config.ipv6_prefix,
                body: response,
                hasher: self.config.hasher,
                #[cfg(feature = "redis")]
                store: self.config.store,
                warned_no_peer: self.config.warned_no_peer,
                tier_settings: self.config.tier_settings,
                tiers: None,
            },
        }
    }

    /// Keeps every client's quotas in a store shared with other servers (feature `redis`),
    /// so that a fleet of servers enforces one quota per client key. Client keys are hashed
    /// the same way in every process (SipHash with fixed keys; the same Rust release across
    /// the fleet keeps it stable). While the store is away, its
    /// [`FailMode`](crate::store::FailMode) says whether each server falls back to its own
    /// count or refuses with a 429.
    #[cfg(feature = "redis")]
    pub fn store(mut self, store: crate::store::RedisStore) -> Self {
        self.config.store = Some(store);
        self
    }

    /// Builds the layer, or says which part of the configuration is unusable.
    pub fn build(mut self) -> Result<RateLimitByRoute<Reject<F>>, ConfigError> {
        if let Some(error) = self.config.key_error.take() {
            return Err(error);
        }
        if self.config.max_keys == 0 {
            return Err(ConfigError::InvalidSetting {
                name: "max_keys",
                reason: "at least one key must be tracked",
            });
        }
        if self.config.ipv6_prefix > 128 {
            return Err(ConfigError::InvalidSetting {
                name: "ipv6_prefix",
                reason: "an IPv6 address has 128 bits",
            });
        }
        // The server counts its own requests: there is no round trip to cover.
        let (table, routes) = self.compile(Some(self.margin.unwrap_or(Duration::ZERO)), None)?;
        let max_keys = self.config.max_keys;
        let tiers = std::mem::take(&mut self.config.tier_settings).compile()?;
        let placed = match &tiers {
            Some(tiers) => place_tiers(
                tiers,
                &routes,
                self.margin.unwrap_or(Duration::ZERO),
                cfg!(feature = "redis") && self.config.has_store(),
            )?,
            None => Vec::new(),
        };
        let routes = routes
            .into_iter()
            .map(|route| KeyedRoute::new(route.name, route.rates, max_keys, route.weighing))
            .collect::<Box<[KeyedRoute]>>();
        let count = tiers.as_ref().map_or(0, |t| t.names.len());
        for (tier, route, rates) in placed {
            routes[route].set_tier_rates(tier, count, &rates, max_keys);
        }
        self.config.tiers = tiers;
        let events = self
            .events
            .build(LayerKind::Server, routes.iter().map(|r| r.name.clone()));
        Ok(RateLimitByRoute {
            mode: Reject(Arc::new(LayerState {
                table,
                routes,
                events,
                clock: Clock::new(),
                config: self.config,
            })),
        })
    }
}

/// Where each tier's quotas go: (tier, route, its compiled quotas there), checked against the
/// route's own (as many, counting the same units).
fn place_tiers(
    tiers: &Tiers,
    routes: &[CompiledRoute],
    margin: Duration,
    stored: bool,
) -> Result<Vec<(usize, usize, Vec<Rate>)>, ConfigError> {
    let mut placed = Vec::new();
    for (tier, named) in tiers.routes.iter().enumerate() {
        for (i, (pattern, quotas)) in named.iter().enumerate() {
            let Some(index) = routes.iter().position(|r| *r.name == **pattern) else {
                return Err(ConfigError::UnknownRoute {
                    pattern: pattern.clone(),
                });
            };
            if named[..i].iter().any(|(p, _)| p == pattern) {
                return Err(ConfigError::InvalidValue {
                    name: "tier",
                    value: pattern.clone(),
                    reason: "a tier names this route twice",
                });
            }
            let quotas = quotas.as_slice();
            for quota in quotas {
                check_quota(pattern, quota)?;
            }
            let own = &routes[index].rates;
            let same = quotas.len() == own.len()
                && quotas
                    .iter()
                    .zip(own)
                    .all(|(q, r)| q.unit() == r.quota.unit());
            if !same {
                return Err(ConfigError::InvalidQuota {
                    route: pattern.clone(),
                    reason: "a tier's quotas on a route must be as many as the route's, counting \
                             the same units in the same order",
                });
            }
            let rates: Vec<Rate> = quotas.iter().map(|q| Rate::new(*q, Some(margin))).collect();
            // In a store a client's count lies under one key whatever its tier, kept in
            // buckets of a sixteenth of the period (or a GCRA time): only the count may differ.
            if stored && rates.iter().zip(own).any(|(r, own)| !same_shape(r, own)) {
                return Err(ConfigError::InvalidQuota {
                    route: pattern.clone(),
                    reason: "with a store, a tier's quotas on a route have the route's periods                              and algorithms (a window, or GCRA); only their counts differ",
                });
            }
            placed.push((tier, index, rates));
        }
    }
    Ok(placed)
}

/// Whether two quotas keep their counts alike in a store: the same period and algorithm.
pub(crate) fn same_shape(a: &Rate, b: &Rate) -> bool {
    a.quota.period() == b.quota.period() && a.is_gcra() == b.is_gcra()
}

impl<F> RejectConfig<F> {
    /// Whether it counts in a shared store.
    pub(crate) fn has_store(&self) -> bool {
        #[cfg(feature = "redis")]
        return self.store.is_some();
        #[cfg(not(feature = "redis"))]
        false
    }
}
