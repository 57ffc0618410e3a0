//! What a request costs: a route's several quotas ([`Quotas`]), the units each one counts
//! (requests, or what a closure over the request says), and the cost corrected from the
//! response ([`ResponseHead`]).

use std::fmt;
use std::sync::Arc;

use http::{Extensions, HeaderMap, Response, StatusCode};

use super::server::key::RequestHead;
use crate::error::ConfigError;
use crate::quota::{Quota, Rate};

/// The quotas of one route: one [`Quota`], or several that a request must all fit in (500
/// requests a minute and 10,000 a day; requests and tokens). Made from a `Quota`, an array or
/// a `Vec` of them, so `.route(pattern, quota)` and `.route(pattern, [a, b])` both read as
/// they should.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quotas(Vec<Quota>);

impl Quotas {
    /// The quotas, in the order given.
    pub fn as_slice(&self) -> &[Quota] {
        &self.0
    }
}

impl From<Quota> for Quotas {
    fn from(quota: Quota) -> Self {
        Self(vec![quota])
    }
}

impl<const N: usize> From<[Quota; N]> for Quotas {
    fn from(quotas: [Quota; N]) -> Self {
        Self(quotas.into())
    }
}

impl From<Vec<Quota>> for Quotas {
    fn from(quotas: Vec<Quota>) -> Self {
        Self(quotas)
    }
}

impl From<&[Quota]> for Quotas {
    fn from(quotas: &[Quota]) -> Self {
        Self(quotas.into())
    }
}

/// A borrowed view of a response's head, handed to a closure that reads a request's true
/// cost from its answer (`.cost_after(unit, ..)`): a usage header, for example.
#[derive(Debug, Clone, Copy)]
pub struct ResponseHead<'a> {
    status: StatusCode,
    headers: &'a HeaderMap,
    extensions: &'a Extensions,
}

impl<'a> ResponseHead<'a> {
    pub(crate) fn of<B>(response: &'a Response<B>) -> Self {
        Self {
            status: response.status(),
            headers: response.headers(),
            extensions: response.extensions(),
        }
    }

    /// The response's status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The response's header fields.
    pub fn headers(&self) -> &'a HeaderMap {
        self.headers
    }

    /// The response's extensions.
    pub fn extensions(&self) -> &'a Extensions {
        self.extensions
    }
}

type RequestCost = dyn Fn(&RequestHead<'_>) -> u32 + Send + Sync;
type ResponseCost = dyn Fn(&ResponseHead<'_>) -> Option<u32> + Send + Sync;

/// The cost closures a builder was given, by unit.
#[derive(Clone, Default)]
pub(crate) struct CostFns {
    before: Vec<(&'static str, Arc<RequestCost>)>,
    after: Vec<(&'static str, Arc<ResponseCost>)>,
}

impl fmt::Debug for CostFns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let before = self.before.iter().map(|(u, _)| u);
        let after = self.after.iter().map(|(u, _)| u);
        f.debug_struct("CostFns")
            .field("before", &before.collect::<Vec<_>>())
            .field("after", &after.collect::<Vec<_>>())
            .finish()
    }
}

impl CostFns {
    /// What a request costs in `unit` (the last closure given for it counts).
    pub(crate) fn set_before(&mut self, unit: &'static str, cost: Arc<RequestCost>) {
        self.before.retain(|(u, _)| *u != unit);
        self.before.push((unit, cost));
    }

    /// What a request turned out to cost in `unit`, read from its response.
    pub(crate) fn set_after(&mut self, unit: &'static str, cost: Arc<ResponseCost>) {
        self.after.retain(|(u, _)| *u != unit);
        self.after.push((unit, cost));
    }

    fn before(&self, unit: &str) -> Option<&Arc<RequestCost>> {
        self.before.iter().find(|(u, _)| *u == unit).map(|(_, f)| f)
    }

    fn after(&self, unit: &str) -> Option<&Arc<ResponseCost>> {
        self.after.iter().find(|(u, _)| *u == unit).map(|(_, f)| f)
    }

    /// Checks that every unit a quota counts has a cost, and every cost a quota to count it.
    pub(crate) fn check<'q>(
        &self,
        quotas: impl IntoIterator<Item = &'q Quota> + Clone,
    ) -> Result<(), ConfigError> {
        for quota in quotas.clone() {
            if let Some(unit) = quota.unit() {
                if self.before(unit).is_none() {
                    return Err(ConfigError::InvalidSetting {
                        name: "cost",
                        reason: "a quota counts a unit that no `cost` closure weighs",
                    });
                }
            }
        }
        let counted = |unit: &str| quotas.clone().into_iter().any(|q| q.unit() == Some(unit));
        let units = self.before.iter().map(|(u, _)| *u);
        if !units.chain(self.after.iter().map(|(u, _)| *u)).all(counted) {
            return Err(ConfigError::InvalidSetting {
                name: "cost",
                reason: "a cost is given for a unit that no quota counts",
            });
        }
        Ok(())
    }
}

/// How one route's requests are weighed, quota by quota in the route's order: made only for
/// a route with a quota that counts a unit other than requests.
#[derive(Clone)]
pub(crate) struct Weighing {
    quotas: Box<[Weigh]>,
    /// Whether any quota's cost is corrected from the response.
    corrected: bool,
}

#[derive(Clone, Default)]
struct Weigh {
    before: Option<Arc<RequestCost>>,
    after: Option<Arc<ResponseCost>>,
}

impl fmt::Debug for Weighing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Weighing")
            .field("quotas", &self.quotas.len())
            .field("corrected", &self.corrected)
            .finish()
    }
}

impl Weighing {
    /// How the requests of a route with these quotas are weighed; `None` when every one of
    /// them counts requests.
    pub(crate) fn new(quotas: &[Quota], fns: &CostFns) -> Option<Self> {
        if quotas.iter().all(|q| q.unit().is_none()) {
            return None;
        }
        let quotas: Box<[Weigh]> = quotas
            .iter()
            .map(|q| match q.unit() {
                None => Weigh::default(),
                Some(unit) => Weigh {
                    before: fns.before(unit).cloned(),
                    after: fns.after(unit).cloned(),
                },
            })
            .collect();
        let corrected = quotas.iter().any(|w| w.after.is_some());
        Some(Self { quotas, corrected })
    }

    /// Whether a quota's cost is corrected from the response.
    pub(crate) fn corrects(&self) -> bool {
        self.corrected
    }

    /// What a request costs in each quota.
    pub(crate) fn costs(&self, head: &RequestHead<'_>) -> Costs {
        let cost = |w: &Weigh| w.before.as_ref().map_or(1, |f| f(head));
        Costs::collect(self.quotas.iter().map(cost))
    }

    /// What a request that took `taken` turned out to cost, read from its response: `None`
    /// when nothing is corrected. A quota whose closure says nothing keeps what was taken.
    pub(crate) fn answered(&self, taken: &Costs, head: &ResponseHead<'_>) -> Option<Costs> {
        Some(taken.corrected(&self.read(head)?))
    }

    /// What a response says its request cost, quota by quota (`None` where it says nothing):
    /// `None` when nothing is corrected.
    pub(crate) fn read(&self, head: &ResponseHead<'_>) -> Option<Corrections> {
        if !self.corrected {
            return None;
        }
        let read = |w: &Weigh| w.after.as_ref().and_then(|f| f(head));
        Some(Corrections(PerQuota::collect(
            self.quotas.iter().map(read),
            None,
        )))
    }
}

/// What a response says its request cost in each quota of its route, where it says.
#[derive(Debug)]
pub(crate) struct Corrections(PerQuota<Option<u32>>);

/// One value per quota of a route: the first two inline (any after them take the `fill`
/// given), so that a weighed request of a route of one or two quotas allocates nothing for
/// them; more on the heap.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PerQuota<T> {
    Two([T; 2]),
    Many(Box<[T]>),
}

impl<T: Copy> PerQuota<T> {
    fn collect(values: impl ExactSizeIterator<Item = T>, fill: T) -> Self {
        if values.len() > 2 {
            return Self::Many(values.collect());
        }
        let mut two = [fill; 2];
        for (slot, value) in two.iter_mut().zip(values) {
            *slot = value;
        }
        Self::Two(two)
    }

    #[inline]
    fn get(&self, index: usize) -> Option<T> {
        match self {
            Self::Two(two) => two.get(index).copied(),
            Self::Many(many) => many.get(index).copied(),
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::Two(two) => two.len(),
            Self::Many(many) => many.len(),
        }
    }
}

/// What one request costs in each quota of its route, in the route's order (quotas past its
/// values cost one). A request of a route that weighs nothing costs [`Costs::one`], whatever
/// its number of quotas. A route of more than two quotas puts its requests' costs on the heap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Costs(Option<PerQuota<u32>>);

impl Costs {
    /// One unit in every quota.
    #[inline]
    pub(crate) fn one() -> Self {
        Self(None)
    }

    fn collect(costs: impl ExactSizeIterator<Item = u32>) -> Self {
        Self(Some(PerQuota::collect(costs, 1)))
    }

    /// What it costs in quota `index`.
    #[inline]
    pub(crate) fn get(&self, index: usize) -> u32 {
        let cost = self.0.as_ref().and_then(|costs| costs.get(index));
        cost.unwrap_or(1)
    }

    /// The costs a response says, and what was taken where it says nothing.
    pub(crate) fn corrected(&self, said: &Corrections) -> Costs {
        let cost = |i: usize| said.0.get(i).flatten().unwrap_or_else(|| self.get(i));
        Self::collect((0..said.0.len()).map(cost))
    }

    /// Whether it is one unit in every quota.
    #[inline]
    pub(crate) fn is_one(&self) -> bool {
        self.0.is_none()
    }

    /// The first quota among `rates` it can never fit in, and its cost there.
    pub(crate) fn too_high<'r>(
        &self,
        rates: impl IntoIterator<Item = &'r Rate>,
    ) -> Option<(Quota, u32)> {
        rates
            .into_iter()
            .enumerate()
            .map(|(i, rate)| (rate, self.get(i)))
            .find(|(rate, cost)| !rate.fits(*cost))
            .map(|(rate, cost)| (rate.quota, cost))
    }
}
