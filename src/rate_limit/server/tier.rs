//! Tiers: quotas derived from the request. A closure names each request's tier (from its key,
//! a header, or an extension an authentication layer set), and a tier that names a route has
//! its own quotas and its own table of clients on it.
//!
//! The tier is read on every request, so a customer's upgrade takes effect on its next
//! request: the closure answers the new tier. Tables stay bounded as the route's own are
//! ([`Builder::max_keys`](crate::rate_limit::Builder::max_keys) per tier and route).

use std::fmt;
use std::sync::Arc;

use super::key::RequestHead;
use crate::error::ConfigError;
use crate::rate_limit::cost::Quotas;

/// What server mode does with a request whose tier is unknown: the tier closure answered
/// `None`, or a name no [`Builder::tier`](crate::rate_limit::Builder::tier) gave. Required
/// by [`Builder::tier_by`](crate::rate_limit::Builder::tier_by), so that the choice is
/// always written down.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum UnknownTier {
    /// Answered `403 Forbidden` with no `Retry-After` (the response builder sees
    /// [`RejectReason::UnknownTier`](crate::rate_limit::RejectReason::UnknownTier)): no
    /// wait makes the request pass.
    Refuse,
    /// Counted as a request of this tier, which must be one given to
    /// [`Builder::tier`](crate::rate_limit::Builder::tier) (else `build` fails).
    Use(String),
    /// Counted under the routes' own quotas, those given to
    /// [`Builder::route`](crate::rate_limit::Builder::route) and
    /// [`Builder::default_quota`](crate::rate_limit::Builder::default_quota).
    RouteQuotas,
}

/// A tier's routes and their quotas, as given.
pub(crate) type TierRoutes = Vec<(String, Quotas)>;

type TierFn = dyn Fn(&RequestHead<'_>, &[Arc<str>]) -> Option<usize> + Send + Sync;

/// A layer's tiers as the builder collects them.
#[derive(Default)]
pub(crate) struct TierSettings {
    pub(crate) by: Option<(Arc<TierFn>, UnknownTier)>,
    /// Each tier's name and the routes it names, in order given.
    pub(crate) tiers: Vec<(Arc<str>, TierRoutes)>,
}

impl fmt::Debug for TierSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TierSettings")
            .field("unknown", &self.by.as_ref().map(|(_, u)| u))
            .field("tiers", &self.tiers.len())
            .finish()
    }
}

impl TierSettings {
    pub(crate) fn set_by<G, T>(&mut self, tier: G, unknown: UnknownTier)
    where
        G: Fn(&RequestHead<'_>) -> Option<T> + Send + Sync + 'static,
        T: AsRef<str>,
    {
        let by = move |head: &RequestHead<'_>, names: &[Arc<str>]| {
            let name = tier(head)?;
            let name = name.as_ref();
            names.iter().position(|n| **n == *name)
        };
        self.by = Some((Arc::new(by), unknown));
    }

    /// The compiled tiers, or why they cannot be used; `None` without tiers.
    pub(crate) fn compile(self) -> Result<Option<Tiers>, ConfigError> {
        let Some((by, unknown)) = self.by else {
            if self.tiers.is_empty() {
                return Ok(None);
            }
            return Err(ConfigError::InvalidSetting {
                name: "tier",
                reason: "tiers need `tier_by`: the closure that names each request's tier",
            });
        };
        if self.tiers.is_empty() {
            return Err(ConfigError::InvalidSetting {
                name: "tier_by",
                reason: "name at least one tier with `tier`",
            });
        }
        let names: Box<[Arc<str>]> = self.tiers.iter().map(|(n, _)| n.clone()).collect();
        for (i, name) in names.iter().enumerate() {
            if name.is_empty() {
                return Err(ConfigError::InvalidSetting {
                    name: "tier",
                    reason: "a tier's name must not be empty",
                });
            }
            if names[..i].contains(name) {
                return Err(ConfigError::InvalidValue {
                    name: "tier",
                    value: name.to_string(),
                    reason: "given twice",
                });
            }
        }
        let unknown = match unknown {
            UnknownTier::Refuse => Unknown::Refuse,
            UnknownTier::RouteQuotas => Unknown::RouteQuotas,
            UnknownTier::Use(name) => match names.iter().position(|n| **n == *name) {
                Some(index) => Unknown::Use(index),
                None => {
                    return Err(ConfigError::InvalidValue {
                        name: "UnknownTier::Use",
                        value: name,
                        reason: "no tier of that name was given to `tier`",
                    })
                }
            },
        };
        Ok(Some(Tiers {
            by,
            names,
            unknown,
            routes: self.tiers.into_iter().map(|(_, routes)| routes).collect(),
        }))
    }
}

/// What an unknown tier becomes, compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unknown {
    Refuse,
    Use(usize),
    RouteQuotas,
}

/// A layer's tiers, compiled.
pub(crate) struct Tiers {
    by: Arc<TierFn>,
    pub(crate) names: Box<[Arc<str>]>,
    pub(crate) unknown: Unknown,
    /// Each tier's routes and quotas, as given (checked and placed by the builder).
    pub(crate) routes: Vec<TierRoutes>,
}

/// The tier a request counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tier {
    /// This tier's quotas (where it names the route).
    Of(usize),
    /// The routes' own quotas.
    RouteQuotas,
    /// Refused: its tier is unknown.
    Refused,
}

impl Tiers {
    /// The tier of a request.
    pub(crate) fn of(&self, head: &RequestHead<'_>) -> Tier {
        match (self.by)(head, &self.names) {
            Some(index) => Tier::Of(index),
            None => match self.unknown {
                Unknown::Refuse => Tier::Refused,
                Unknown::Use(index) => Tier::Of(index),
                Unknown::RouteQuotas => Tier::RouteQuotas,
            },
        }
    }

    pub(crate) fn position(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| **n == *name)
    }
}

impl fmt::Debug for Tiers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tiers")
            .field("names", &self.names)
            .field("unknown", &self.unknown)
            .finish()
    }
}
