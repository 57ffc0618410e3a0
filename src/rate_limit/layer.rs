//! [`RateLimitByRoute`]: the layer, its two modes, and the state every clone shares
//! (`LayerState`).

use std::fmt;
use std::sync::Arc;

use tower_layer::Layer;

use crate::clock::Clock;
use crate::event::Events;
use crate::route::RouteTable;

use super::client::state::ClientHandle;
use super::server::state::KeyedRoute;
use super::service::RateLimitByRouteService;

use super::builder::RejectConfig;
use super::reject::EmptyBody;

/// The name the default quota goes by in errors, snapshots and headers.
pub(crate) const DEFAULT_ROUTE: &str = "default";

/// What every clone of a layer shares: the routes, their state, the clock and the mode's
/// settings.
#[derive(Debug)]
pub(crate) struct LayerState<R, C> {
    pub(crate) table: RouteTable,
    pub(crate) routes: Box<[R]>,
    pub(crate) clock: Clock,
    /// The layer's name, listener and counters, one scope per route.
    pub(crate) events: Events,
    pub(crate) config: C,
}

/// Per-route rate limits, as a [`Layer`] and the handle to their shared state.
///
/// Built with [`RateLimitByRoute::builder`]. Cloning is cheap (one `Arc`) and never creates a
/// new limit: every clone, and every service made from any clone (say one per connection under
/// axum), counts against the same quotas.
///
/// The mode `M` is [`Wait`] for a client (requests wait for their turn) or [`Reject`] for a
/// server (excess requests are answered with 429), chosen on the builder.
pub struct RateLimitByRoute<M = Wait> {
    pub(crate) mode: M,
}

impl<M: Clone> Clone for RateLimitByRoute<M> {
    fn clone(&self) -> Self {
        Self {
            mode: self.mode.clone(),
        }
    }
}

impl<M: fmt::Debug> fmt::Debug for RateLimitByRoute<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitByRoute")
            .field("mode", &self.mode)
            .finish()
    }
}

/// Client mode: a request whose route has no quota left waits for its turn.
#[derive(Clone)]
pub struct Wait(pub(crate) ClientHandle);

impl fmt::Debug for Wait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wait")
            .field("routes", &self.0.routes.len())
            .field("max_wait", &self.0.config.max_wait)
            .finish()
    }
}

/// Server mode: a request over its client's quota is answered at once with 429.
///
/// `F` builds the 429 response's body: [`EmptyBody`] by default, or a closure given to
/// [`Builder::reject_with`](super::Builder::reject_with).
pub struct Reject<F = EmptyBody>(pub(crate) Arc<LayerState<KeyedRoute, RejectConfig<F>>>);

impl<F> Clone for Reject<F> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<F> fmt::Debug for Reject<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reject")
            .field("routes", &self.0.routes.len())
            .field("key", &self.0.config.key)
            .finish()
    }
}

impl<S> Layer<S> for RateLimitByRoute<Wait> {
    type Service = RateLimitByRouteService<S, Wait>;

    fn layer(&self, inner: S) -> Self::Service {
        // The same shared state, behind a handle of the service's own.
        let handle = Arc::new(Arc::clone(&*self.mode.0));
        RateLimitByRouteService::new(inner, Wait(handle))
    }
}

impl<S, F> Layer<S> for RateLimitByRoute<Reject<F>> {
    type Service = RateLimitByRouteService<S, Reject<F>>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimitByRouteService::new(inner, self.mode.clone())
    }
}
