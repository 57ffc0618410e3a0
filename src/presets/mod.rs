//! Presets: one vendor's API in one place, so that the layers' own defaults stay
//! vendor-neutral.
//!
//! A preset knows an API's routes, quotas, job JSON, refusal bodies and webhooks, and hands
//! out the crate's builders already set for it; anything it sets can still be changed on the
//! builder it returns. The layers assume none of it: a [`RateLimitByRoute`] has no route
//! until you name one, a [`ConcurrencyLimitByPlan`] built from
//! [`ConcurrencyLimitByPlan::custom`] has no job route or status until you name
//! them, and [`Backoff429::new`] takes every 429 for a rate-limit refusal.
//!
//! [`Plan`](crate::Plan)'s named plans are Sync's, so a layer made from a `Plan`
//! ([`ConcurrencyLimitByPlan::new`], [`ConcurrencyLimitByPlan::builder`]) starts from the
//! [`sync`] preset.
//!
//! [`RateLimitByRoute`]: crate::RateLimitByRoute
//! [`ConcurrencyLimitByPlan`]: crate::ConcurrencyLimitByPlan
//! [`ConcurrencyLimitByPlan::custom`]: crate::ConcurrencyLimitByPlan::custom
//! [`ConcurrencyLimitByPlan::new`]: crate::ConcurrencyLimitByPlan::new
//! [`ConcurrencyLimitByPlan::builder`]: crate::ConcurrencyLimitByPlan::builder
//! [`Backoff429::new`]: crate::Backoff429::new

pub mod sync;
