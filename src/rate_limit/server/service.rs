//! Server mode: each client's quota per route, and the 429s past it.
//!
//! A route's clients live in [`KeyTable`]s (16 shards, so that different clients rarely
//! contend for one lock) of bounded size; see [`crate::limiter::keyed`] for what a flood of
//! fresh keys can and cannot do. Requests are matched the way axum routes them: `HEAD` under
//! the `GET` route, and, inside a nested router, by the path the client sent
//! (`OriginalUri`, feature `axum`).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{header, HeaderValue, Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::key::{Extracted, KeyHashing, MissingKey, ANONYMOUS};
use crate::clock::Nanos;
use crate::headers;
use crate::limiter::keyed::{KeyTable, Verdict};
use crate::lock::lock;
use crate::quota::{Quota, Rate};
use crate::rate_limit::builder::RejectConfig;
use crate::rate_limit::layer::Reject;
use crate::rate_limit::reject::{RejectReason, RejectResponse, Rejection};
use crate::rate_limit::service::RateLimitByRouteService;
use crate::readiness::waiting_clone;
use crate::route::request_path;
use crate::store::{Decision, FailMode, StoreCall, StoreError};

/// Shards of a keyed route: requests of different clients rarely contend for one lock.
pub(crate) const SHARDS: usize = 16;

/// One route in server mode: a limit per client key.
#[derive(Debug)]
pub(crate) struct KeyedRoute {
    pub(crate) name: Arc<str>,
    shards: Box<[Mutex<Shard>]>,
}

#[derive(Debug)]
struct Shard {
    rate: Rate,
    /// The route's `RateLimit-Policy` field, made once.
    policy: HeaderValue,
    clients: KeyTable,
}

/// The rate-limit fields a passing response gets.
#[derive(Debug)]
pub(crate) struct Stamp {
    policy: HeaderValue,
    ratelimit: HeaderValue,
}

impl Stamp {
    fn apply<B>(self, response: &mut Response<B>) {
        let fields = response.headers_mut();
        // Appended: a layer below may state its own policy, and both hold.
        fields.append(headers::RATELIMIT_POLICY, self.policy);
        fields.append(headers::RATELIMIT, self.ratelimit);
    }
}

/// A refusal of server mode.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Refused {
    pub(crate) wait: Duration,
    pub(crate) quota: Quota,
    pub(crate) reason: RejectReason,
}

fn policy(name: &str, quota: Quota) -> HeaderValue {
    // Cloned once so that later clones share the bytes instead of copying them.
    let value = headers::policy_value(name, quota.count(), quota.period());
    value.clone()
}

impl KeyedRoute {
    pub(crate) fn new(name: Arc<str>, rate: Rate, max_keys: usize) -> Self {
        let capacity = max_keys.div_ceil(SHARDS).max(1);
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    rate,
                    policy: policy(&name, rate.quota),
                    clients: KeyTable::new(capacity),
                })
            })
            .collect();
        Self { name, shards }
    }

    fn shard(&self, key: u64) -> &Mutex<Shard> {
        &self.shards[(key as usize) % SHARDS]
    }

    pub(crate) fn quota(&self) -> Quota {
        lock(&self.shards[0]).rate.quota
    }

    pub(crate) fn rate(&self) -> Rate {
        lock(&self.shards[0]).rate
    }

    /// Counts a request of client `key` at `now`; with `stamp`, the fields its response gets.
    pub(crate) fn hit(&self, key: u64, now: Nanos, stamp: bool) -> Result<Option<Stamp>, Refused> {
        let mut shard = lock(self.shard(key));
        let Shard {
            rate,
            policy,
            clients,
        } = &mut *shard;
        match clients.hit(key, rate, now) {
            Verdict::Pass { remaining, reset } if stamp => {
                let policy = policy.clone();
                drop(shard);
                let reset = Duration::from_nanos(reset.saturating_sub(now));
                Ok(Some(Stamp {
                    policy,
                    ratelimit: headers::ratelimit_value(&self.name, remaining, reset),
                }))
            }
            Verdict::Pass { .. } => Ok(None),
            Verdict::Refuse { until } => Err(Refused {
                wait: Duration::from_nanos(until.saturating_sub(now)),
                quota: rate.quota,
                reason: RejectReason::Quota,
            }),
        }
    }

    /// The fields of a response admitted with `remaining` left, all counted gone after
    /// `reset` (a shared store's count).
    pub(crate) fn stamp(&self, remaining: u32, reset: Duration) -> Stamp {
        Stamp {
            policy: lock(&self.shards[0]).policy.clone(),
            ratelimit: headers::ratelimit_value(&self.name, remaining, reset),
        }
    }

    pub(crate) fn tracked_keys(&self) -> usize {
        self.shards.iter().map(|s| lock(s).clients.len()).sum()
    }

    /// Replaces the quota, keeping what each client has counted.
    pub(crate) fn set_rate(&self, rate: Rate, now: Nanos) {
        let policy = policy(&self.name, rate.quota);
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            let old = shard.rate;
            shard.clients.change_rate(&old, &rate, now);
            shard.rate = rate;
            shard.policy = policy.clone();
        }
    }
}

// ===== the service =====

impl<S, B, ResBody, F> Service<Request<B>> for RateLimitByRouteService<S, Reject<F>>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone,
    F: RejectResponse<ResBody>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = RejectFuture<S, B, F>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let shared = &self.mode.0;
        let Some(index) = shared
            .table
            .lookup(request.method(), request_path(&request))
        else {
            return RejectFuture::inner(self.inner.call(request), None);
        };
        let config = &shared.config;
        let route = &shared.routes[index];
        let key = match config
            .key
            .extract(&request, &config.hasher, config.ipv6_prefix)
        {
            Extracted::Key(key) => key,
            Extracted::Missing => match config.on_missing.unwrap_or_default() {
                MissingKey::Shared => ANONYMOUS,
                MissingKey::Pass => return RejectFuture::inner(self.inner.call(request), None),
                MissingKey::Refuse => {
                    return RejectFuture::rejected(refusal(config, route, RejectReason::MissingKey))
                }
            },
            Extracted::NoPeer => match config.on_missing {
                Some(MissingKey::Shared) => ANONYMOUS,
                Some(MissingKey::Pass) => {
                    return RejectFuture::inner(self.inner.call(request), None)
                }
                Some(MissingKey::Refuse) => {
                    return RejectFuture::rejected(refusal(config, route, RejectReason::MissingKey))
                }
                None => {
                    no_peer(config);
                    return RejectFuture::rejected(refusal(
                        config,
                        route,
                        RejectReason::NoPeerAddress,
                    ));
                }
            },
        };
        if config.store.is_some() {
            return self.call_store(request, index, key);
        }
        match route.hit(key, shared.clock.now(), config.headers) {
            Ok(stamp) => RejectFuture::inner(self.inner.call(request), stamp),
            Err(refused) => RejectFuture::rejected(rejection(config, &route.name, refused)),
        }
    }
}

impl<S: Clone, F> RateLimitByRouteService<S, Reject<F>> {
    /// A request whose verdict a shared store gives. It waits for the store with a clone of
    /// the inner service, readied once the verdict is in.
    #[inline(never)]
    fn call_store<B>(
        &mut self,
        request: Request<B>,
        index: usize,
        key: u64,
    ) -> RejectFuture<S, B, F>
    where
        S: Service<Request<B>>,
    {
        let inner = waiting_clone(&mut self.inner);
        let shared = &self.mode.0;
        let config = &shared.config;
        let Some(store) = &config.store else {
            unreachable!("called with a store");
        };
        let route = &shared.routes[index];
        let stable = match config
            .key
            .extract(&request, &KeyHashing::Stable, config.ipv6_prefix)
        {
            Extracted::Key(key) => key,
            Extracted::Missing | Extracted::NoPeer => ANONYMOUS,
        };
        let name = store.key(&format!("rate:{}:{stable:016x}", route.name));
        let call = store.acquire(&name, &store.member(), &route.rate(), true);
        RejectFuture::store(StoreHit {
            inner,
            request: Some(request),
            call,
            layer: Reject(shared.clone()),
            route: index,
            local_key: key,
            admitted: None,
        })
    }
}

/// Warns, once per layer, that the server gives no peer address to a layer keyed by it.
#[cold]
fn no_peer<F>(config: &RejectConfig<F>) {
    if !config.warned_no_peer.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "RateLimitByRoute keys clients by address, but the server supplies none: requests \
             are answered 500. Serve axum with `into_make_service_with_connect_info::<SocketAddr>()` \
             (feature `axum`), insert a `SocketAddr` extension, or set `on_missing_key`"
        );
    } else {
        tracing::debug!("no peer address for a layer keyed by address: answered 500");
    }
}

/// The response for a request refused for another reason than its quota (no key, no peer
/// address).
fn refusal<B, F: RejectResponse<B>>(
    config: &RejectConfig<F>,
    route: &KeyedRoute,
    reason: RejectReason,
) -> Response<B> {
    let refused = Refused {
        wait: Duration::ZERO,
        quota: route.quota(),
        reason,
    };
    rejection(config, &route.name, refused)
}

pin_project! {
    /// The response future of server mode: the inner service's (with the rate-limit fields
    /// added), or a ready refusal, or, with a shared store, the store's verdict first.
    pub struct RejectFuture<S, B, F>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future, S::Response, Box<StoreHit<S, B, F>>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<Fut, R, H> {
        // Sent; its response gets the rate-limit fields, if any.
        Inner { #[pin] future: Fut, stamp: Option<Stamp> },
        // Refused, with the response to give.
        Rejected { response: Option<R> },
        // Waiting for a shared store's verdict.
        Store { hit: H },
    }
}

/// What a request whose verdict the shared store gave becomes.
type NextState<S, B, F> = State<
    <S as Service<Request<B>>>::Future,
    <S as Service<Request<B>>>::Response,
    Box<StoreHit<S, B, F>>,
>;

/// A request whose verdict the shared store is deciding.
pub(crate) struct StoreHit<S, B, F> {
    /// A clone of the inner service, readied once the request may go.
    inner: S,
    request: Option<Request<B>>,
    call: StoreCall,
    layer: Reject<F>,
    route: usize,
    /// The client's key in this process's own limiter, for [`FailMode::Open`].
    local_key: u64,
    /// Once admitted: the fields of its response, while the inner service gets ready.
    admitted: Option<Option<Stamp>>,
}

impl<S, B, F> RejectFuture<S, B, F>
where
    S: Service<Request<B>>,
{
    fn inner(future: S::Future, stamp: Option<Stamp>) -> Self {
        Self {
            state: State::Inner { future, stamp },
        }
    }

    fn rejected(response: S::Response) -> Self {
        Self {
            state: State::Rejected {
                response: Some(response),
            },
        }
    }

    fn store(hit: StoreHit<S, B, F>) -> Self {
        Self {
            state: State::Store { hit: Box::new(hit) },
        }
    }
}

impl<S, B, F, ResBody> Future for RejectFuture<S, B, F>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    F: RejectResponse<ResBody>,
{
    type Output = Result<Response<ResBody>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Inner { future, stamp } => {
                    let mut response = ready!(future.poll(cx))?;
                    if let Some(stamp) = stamp.take() {
                        stamp.apply(&mut response);
                    }
                    return Poll::Ready(Ok(response));
                }
                StateProj::Rejected { response } => {
                    let response = response
                        .take()
                        .expect("a refusal's future polled after it answered");
                    return Poll::Ready(Ok(response));
                }
                StateProj::Store { hit } => {
                    let next = ready!(hit.poll_verdict(cx))?;
                    this.state.set(next);
                }
            }
        }
    }
}

impl<S, B, F, ResBody> StoreHit<S, B, F>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    F: RejectResponse<ResBody>,
{
    /// Waits for the store's verdict; once admitted, readies the inner service and sends.
    fn poll_verdict(&mut self, cx: &mut Context<'_>) -> Poll<Result<NextState<S, B, F>, S::Error>> {
        if self.admitted.is_none() {
            let decision = ready!(Pin::new(&mut self.call).poll(cx));
            match self.verdict(decision) {
                Ok(stamp) => self.admitted = Some(stamp),
                Err(refused) => {
                    let shared = &self.layer.0;
                    let name = &shared.routes[self.route].name;
                    return Poll::Ready(Ok(State::Rejected {
                        response: Some(rejection(&shared.config, name, refused)),
                    }));
                }
            }
        }
        // Admitted: only now is the inner service driven ready.
        if let Err(error) = ready!(self.inner.poll_ready(cx)) {
            self.request = None;
            return Poll::Ready(Err(error));
        }
        let Some(request) = self.request.take() else {
            unreachable!("a store verdict polled after it was given");
        };
        Poll::Ready(Ok(State::Inner {
            future: self.inner.call(request),
            stamp: self.admitted.take().flatten(),
        }))
    }

    /// What the store's answer means for this request: the fields of its response, or why
    /// it is refused.
    fn verdict(&self, decision: Result<Decision, StoreError>) -> Result<Option<Stamp>, Refused> {
        let shared = &self.layer.0;
        let route = &shared.routes[self.route];
        let config = &shared.config;
        let refused = |wait: Duration, reason| Refused {
            wait,
            quota: route.quota(),
            reason,
        };
        match decision {
            Ok(Decision::Counted { remaining, reset }) if config.headers => {
                Ok(Some(route.stamp(remaining, reset)))
            }
            Ok(Decision::Admitted | Decision::Counted { .. }) => Ok(None),
            // Nothing is in flight in server mode; should it ever be, a period is safe.
            Ok(Decision::Wait(wait)) => Err(refused(
                wait.unwrap_or(route.quota().period()),
                RejectReason::Quota,
            )),
            Err(error) => match config.store.as_ref().map(|s| s.fail_mode()) {
                Some(FailMode::Closed) => {
                    tracing::warn!(%error, "the shared quota store failed: refusing");
                    Err(refused(
                        Duration::from_secs(1),
                        RejectReason::StoreUnavailable,
                    ))
                }
                _ => {
                    tracing::warn!(%error, "the shared quota store failed: counting against this server's own quota");
                    route.hit(self.local_key, shared.clock.now(), config.headers)
                }
            },
        }
    }
}

impl<S, B, F> std::fmt::Debug for RejectFuture<S, B, F>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RejectFuture").finish_non_exhaustive()
    }
}

/// The response for a refused request: the configured response, with its status and header
/// fields.
pub(crate) fn rejection<B, F: RejectResponse<B>>(
    config: &RejectConfig<F>,
    route: &Arc<str>,
    refused: Refused,
) -> Response<B> {
    let Refused {
        wait,
        quota,
        reason,
    } = refused;
    let rejection = Rejection {
        route: route.clone(),
        quota,
        retry_after: wait,
        reason,
    };
    let mut response = config.body.response(&rejection);
    let status = match reason {
        RejectReason::MissingKey => StatusCode::BAD_REQUEST,
        RejectReason::NoPeerAddress => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::TOO_MANY_REQUESTS,
    };
    *response.status_mut() = status;
    if status == StatusCode::TOO_MANY_REQUESTS {
        let fields = response.headers_mut();
        fields.insert(header::RETRY_AFTER, headers::retry_after_value(wait));
        if config.headers {
            fields.insert(
                headers::RATELIMIT_POLICY,
                headers::policy_value(route, quota.count(), quota.period()),
            );
            fields.insert(headers::RATELIMIT, headers::ratelimit_value(route, 0, wait));
        }
    }
    response
}
