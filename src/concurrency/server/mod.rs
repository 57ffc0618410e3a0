//! Server mode of [`ConcurrencyLimitByPlan`](crate::ConcurrencyLimitByPlan): job slots per
//! client key, enforced by the API itself (see the [module docs](super#server-mode)).

mod body;
mod builder;
mod future;
mod layer;
mod reject;
mod service;
mod state;
#[cfg(feature = "redis")]
mod store;

pub use body::KeyedPlanBody;
pub(crate) use builder::Inherited;
pub use builder::RejectBuilder;
pub use future::KeyedPlanFuture;
pub use layer::{KeyedPlans, KeyedPlansSnapshot};
pub use reject::{PlanRejectReason, PlanRejection, RejectPlan};
pub use service::KeyedPlansService;
