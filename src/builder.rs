//! [`ServiceBuilderExt`]: one method per layer of this crate on tower's `ServiceBuilder`.

use tower::ServiceBuilder;
use tower_layer::Stack;

use crate::backoff::Backoff429;
use crate::concurrency::ConcurrencyLimitByPlan;
use crate::rate_limit::RateLimitByRoute;

mod sealed {
    pub trait Sealed<T> {}
    impl<L> Sealed<L> for tower::ServiceBuilder<L> {}
}

/// Adds this crate's layers to a [`ServiceBuilder`].
///
/// ```
/// use tower::ServiceBuilder;
/// use tower_quota::{Quota, RateLimitByRoute, ServiceBuilderExt};
/// # fn wrap<S>(client: S) -> Result<(), tower_quota::ConfigError> {
/// let limits = RateLimitByRoute::builder()
///     .default_quota(Quota::per_minute(600))
///     .build()?;
/// let svc = ServiceBuilder::new().rate_limit_by_route(limits).service(client);
/// # drop(svc);
/// # Ok(())
/// # }
/// ```
pub trait ServiceBuilderExt<L>: sealed::Sealed<L> + Sized {
    /// Adds a [`RateLimitByRoute`] layer.
    fn rate_limit_by_route<M>(
        self,
        limits: RateLimitByRoute<M>,
    ) -> ServiceBuilder<Stack<RateLimitByRoute<M>, L>>;

    /// Adds a [`ConcurrencyLimitByPlan`] layer.
    fn concurrency_limit_by_plan(
        self,
        plan: ConcurrencyLimitByPlan,
    ) -> ServiceBuilder<Stack<ConcurrencyLimitByPlan, L>>;

    /// Adds a [`Backoff429`] layer.
    fn backoff_429<M>(self, backoff: Backoff429<M>) -> ServiceBuilder<Stack<Backoff429<M>, L>>;
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    fn rate_limit_by_route<M>(
        self,
        limits: RateLimitByRoute<M>,
    ) -> ServiceBuilder<Stack<RateLimitByRoute<M>, L>> {
        self.layer(limits)
    }

    fn concurrency_limit_by_plan(
        self,
        plan: ConcurrencyLimitByPlan,
    ) -> ServiceBuilder<Stack<ConcurrencyLimitByPlan, L>> {
        self.layer(plan)
    }

    fn backoff_429<M>(self, backoff: Backoff429<M>) -> ServiceBuilder<Stack<Backoff429<M>, L>> {
        self.layer(backoff)
    }
}
