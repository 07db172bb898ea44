//! Adaptive federated optimisation (Reddi et al., 2021): [`FedAdam`], [`FedYogi`] and
//! [`FedAdagrad`], as Flower 1.42's `FedAdam`, `FedYogi` and `FedAdagrad` strategies compute
//! them (`flwr/server/strategy/fedadam.py`, `fedyogi.py`, `fedadagrad.py`).
//!
//! With `avg` the FedAvg result (example-weighted mean) and `x` the current global,
//! `delta = avg - x`, `m = beta_1 m + (1 - beta_1) delta` (zeros before the first round), and
//! - FedAdam: `v = beta_2 v + (1 - beta_2) delta^2`, and the step uses the bias-corrected
//!   `eta_t = eta sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1))` for round `t` (from 1);
//! - FedYogi: `v = v - (1 - beta_2) delta^2 sign(v - delta^2)`;
//! - FedAdagrad: `beta_1 = 0`, so `m = delta`, and `v = v + delta^2`;
//!
//! then `x = x + eta_t m / (sqrt(v) + tau)` (`eta_t = eta` for Yogi and Adagrad).
//!
//! The three are distinct types sharing one private implementation; the state each writes
//! ([`Aggregator::state`]) is keyed by its own name, so a checkpoint of one cannot be
//! resumed by another.

use crate::aggregate::{Aggregator, ClientUpdate, state_counter, weighted_mean, zip_map};
use crate::error::{Error, Result};
use crate::params::{HostTensor, ParamMap};

/// Which second-moment rule the shared implementation applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Adam,
    Yogi,
    Adagrad,
}

impl Variant {
    /// The aggregator's name, also the prefix of every key of its state.
    fn tag(self) -> &'static str {
        match self {
            Self::Adam => "fedadam",
            Self::Yogi => "fedyogi",
            Self::Adagrad => "fedadagrad",
        }
    }

    const ALL: [Self; 3] = [Self::Adam, Self::Yogi, Self::Adagrad];
}

/// The math of all three optimisers, written once.
#[derive(Debug, Clone, PartialEq)]
struct FedOptCore {
    variant: Variant,
    eta: f64,
    beta_1: f64,
    beta_2: f64,
    tau: f64,
    round: usize,
    m: Option<ParamMap>,
    v: Option<ParamMap>,
}

impl FedOptCore {
    fn new(variant: Variant, eta: f64, beta_1: f64, beta_2: f64, tau: f64) -> Result<Self> {
        let ok = eta.is_finite()
            && eta > 0.0
            && (0.0..1.0).contains(&beta_1)
            && (0.0..1.0).contains(&beta_2)
            && tau.is_finite()
            && tau > 0.0;
        if !ok {
            let betas = match variant {
                Variant::Adagrad => String::new(),
                _ => format!(", 0 <= beta_1, beta_2 < 1 (got {beta_1}, {beta_2})"),
            };
            return Err(Error::InvalidArgument(format!(
                "{} needs eta > 0 (got {eta}){betas} and tau > 0 (got {tau})",
                variant.tag()
            )));
        }
        Ok(Self {
            variant,
            eta,
            beta_1,
            beta_2,
            tau,
            round: 0,
            m: None,
            v: None,
        })
    }

    fn name(&self) -> String {
        format!("{}(eta={})", self.variant.tag(), self.eta)
    }

    fn round_key(&self) -> String {
        format!("{}.round", self.variant.tag())
    }

    fn aggregate(&mut self, global: &ParamMap, updates: &[ClientUpdate]) -> Result<ParamMap> {
        let avg = weighted_mean(global, updates)?;
        let delta = zip_map(&avg, global, |a, x| a - x)?;
        let zeros = || zip_map(global, global, |_, _| 0.0);
        let m_prev = self.m.take().map_or_else(zeros, Ok)?;
        let v_prev = self.v.take().map_or_else(zeros, Ok)?;
        let (b1, b2) = (self.beta_1, self.beta_2);
        let m = zip_map(&m_prev, &delta, |m, d| b1 * m + (1.0 - b1) * d)?;
        let v = match self.variant {
            Variant::Adam => zip_map(&v_prev, &delta, |v, d| b2 * v + (1.0 - b2) * d * d)?,
            Variant::Yogi => zip_map(&v_prev, &delta, |v, d| {
                v - (1.0 - b2) * d * d * signum_or_zero(v - d * d)
            })?,
            Variant::Adagrad => zip_map(&v_prev, &delta, |v, d| v + d * d)?,
        };
        self.round += 1;
        let t = self.round as f64;
        let eta = match self.variant {
            Variant::Adam => self.eta * (1.0 - b2.powf(t + 1.0)).sqrt() / (1.0 - b1.powf(t + 1.0)),
            Variant::Yogi | Variant::Adagrad => self.eta,
        };
        let step = zip_map(&m, &v, |m, v| eta * m / (v.sqrt() + self.tau))?;
        let new = zip_map(global, &step, |x, s| x + s)?;
        self.m = Some(m);
        self.v = Some(v);
        Ok(new)
    }

    fn state(&self) -> ParamMap {
        let tag = self.variant.tag();
        let mut state = ParamMap::new();
        for (moment, map) in [("m", &self.m), ("v", &self.v)] {
            for (name, tensor) in map.iter().flat_map(ParamMap::iter) {
                state.insert(format!("{tag}.{moment}.{name}"), tensor.clone());
            }
        }
        state.insert(
            self.round_key(),
            HostTensor::new(vec![1], vec![self.round as f32]).expect("one value"),
        );
        state
    }

    fn load_state(&mut self, state: &ParamMap) -> Result<()> {
        let tag = self.variant.tag();
        let own = format!("{tag}.");
        if let Some(foreign) = state.names().find(|n| !n.starts_with(&own)) {
            let writer = Variant::ALL
                .iter()
                .map(|v| v.tag())
                .find(|other| foreign.starts_with(&format!("{other}.")));
            return Err(Error::InvalidArgument(match writer {
                Some(other) => format!(
                    "aggregator state written by {other} cannot be loaded into {tag} \
                     (key `{foreign}`)"
                ),
                None => format!("aggregator state key `{foreign}` does not belong to {tag}"),
            }));
        }
        let round = state_counter(state, &self.round_key())?;
        let split = |moment: &str| -> Option<ParamMap> {
            let prefix = format!("{tag}.{moment}.");
            let map: ParamMap = state
                .iter()
                .filter_map(|(n, t)| {
                    n.strip_prefix(&prefix)
                        .map(|rest| (rest.to_string(), t.clone()))
                })
                .collect();
            (!map.is_empty()).then_some(map)
        };
        let (m, v) = (split("m"), split("v"));
        let consistent = match (&m, &v) {
            (None, None) => true,
            (Some(m), Some(v)) => {
                m.len() == v.len()
                    && m.iter().all(|(name, t)| {
                        v.get(name).is_some_and(|other| other.shape() == t.shape())
                    })
            }
            _ => false,
        };
        let count = |map: &Option<ParamMap>| map.as_ref().map_or(0, ParamMap::len);
        let counted = count(&m) + count(&v) + 1;
        if !consistent || counted != state.len() {
            return Err(Error::InvalidArgument(format!(
                "{tag} state must hold `{tag}.round` and matching `{tag}.m.*` / `{tag}.v.*` \
                 moments"
            )));
        }
        self.m = m;
        self.v = v;
        self.round = round as usize;
        Ok(())
    }

    fn reset(&mut self) {
        self.m = None;
        self.v = None;
        self.round = 0;
    }
}

/// `sign(x)` with `sign(0) = 0`, as numpy's.
fn signum_or_zero(x: f64) -> f64 {
    if x == 0.0 { 0.0 } else { x.signum() }
}

/// FedAdam: Adam on the server over FedAvg pseudo-gradients, as Flower's `FedAdam`.
///
/// With `delta = avg - x` (`avg` the example-weighted mean of the updates, `x` the current
/// global) and `m = v = 0` before the first round, round `t` (from 1) computes
///
/// ```text
/// m     = beta_1 m + (1 - beta_1) delta
/// v     = beta_2 v + (1 - beta_2) delta^2
/// eta_t = eta sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1))
/// x     = x + eta_t m / (sqrt(v) + tau)
/// ```
///
/// (exponent `t + 1`, as Flower writes it). Defaults (Flower 1.42's):
/// `eta = 0.1, beta_1 = 0.9, beta_2 = 0.99, tau = 1e-9`. Flower's `eta_l` is the clients'
/// learning rate and has no server-side role.
///
/// # Example
///
/// ```
/// use devft::aggregate::{Aggregator, ClientUpdate, FedAdam};
/// use devft::{HostTensor, ParamMap};
///
/// let map = |v: f32| {
///     let mut params = ParamMap::new();
///     params.insert("w", HostTensor::new(vec![1], vec![v]).unwrap());
///     params
/// };
/// let update = |client, v| ClientUpdate { client, params: map(v), num_examples: 1, metrics: Default::default() };
/// let mut adam = FedAdam::default();
/// // delta = 2: m = 0.2, v = 0.04, so the step is eta_1 = 0.1 sqrt(1 - 0.99^2) / (1 - 0.9^2).
/// let new = adam.aggregate(&map(0.0), &[update(0, 1.0), update(1, 3.0)])?;
/// let eta_1 = 0.1 * (1.0 - 0.99f64.powi(2)).sqrt() / (1.0 - 0.9f64.powi(2));
/// assert!((f64::from(new.get("w").unwrap().values()[0]) - eta_1).abs() < 1e-6);
/// assert_eq!(adam.name(), "fedadam(eta=0.1)");
/// # Ok::<(), devft::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct FedAdam {
    core: FedOptCore,
}

impl FedAdam {
    /// FedAdam with server learning rate `eta`, moment decays `beta_1` and `beta_2` and
    /// adaptivity `tau`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] unless `eta > 0`, `0 <= beta_1, beta_2 < 1` and `tau > 0`.
    pub fn new(eta: f64, beta_1: f64, beta_2: f64, tau: f64) -> Result<Self> {
        FedOptCore::new(Variant::Adam, eta, beta_1, beta_2, tau).map(|core| Self { core })
    }
}

impl Default for FedAdam {
    /// Flower 1.42's defaults: `eta = 0.1, beta_1 = 0.9, beta_2 = 0.99, tau = 1e-9`.
    fn default() -> Self {
        Self::new(0.1, 0.9, 0.99, 1e-9).expect("valid defaults")
    }
}

/// FedYogi: Yogi on the server over FedAvg pseudo-gradients, as Flower's `FedYogi`.
///
/// With `delta = avg - x` (`avg` the example-weighted mean of the updates, `x` the current
/// global) and `m = v = 0` before the first round, every round computes
///
/// ```text
/// m = beta_1 m + (1 - beta_1) delta
/// v = v - (1 - beta_2) delta^2 sign(v - delta^2)      (sign(0) = 0)
/// x = x + eta m / (sqrt(v) + tau)
/// ```
///
/// without bias correction. Defaults (Flower 1.42's):
/// `eta = 0.01, beta_1 = 0.9, beta_2 = 0.99, tau = 1e-3`.
///
/// ```
/// use devft::aggregate::{Aggregator, FedYogi};
///
/// assert_eq!(FedYogi::default().name(), "fedyogi(eta=0.01)");
/// assert!(FedYogi::new(0.01, 0.9, 1.0, 1e-3).is_err());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct FedYogi {
    core: FedOptCore,
}

impl FedYogi {
    /// FedYogi with server learning rate `eta`, moment decays `beta_1` and `beta_2` and
    /// adaptivity `tau`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] unless `eta > 0`, `0 <= beta_1, beta_2 < 1` and `tau > 0`.
    pub fn new(eta: f64, beta_1: f64, beta_2: f64, tau: f64) -> Result<Self> {
        FedOptCore::new(Variant::Yogi, eta, beta_1, beta_2, tau).map(|core| Self { core })
    }
}

impl Default for FedYogi {
    /// Flower 1.42's defaults: `eta = 0.01, beta_1 = 0.9, beta_2 = 0.99, tau = 1e-3`.
    fn default() -> Self {
        Self::new(0.01, 0.9, 0.99, 1e-3).expect("valid defaults")
    }
}

/// FedAdagrad: Adagrad on the server over FedAvg pseudo-gradients, as Flower's `FedAdagrad`.
///
/// With `delta = avg - x` (`avg` the example-weighted mean of the updates, `x` the current
/// global) and `v = 0` before the first round, every round computes
///
/// ```text
/// v = v + delta^2
/// x = x + eta delta / (sqrt(v) + tau)
/// ```
///
/// Flower hard-wires `beta_1 = 0` (no momentum) and has no `beta_2`, so neither is a
/// parameter here. Defaults (Flower 1.42's): `eta = 0.1, tau = 1e-9`. The first round moves
/// every coordinate by about `eta * sign(delta)`:
///
/// ```
/// use devft::aggregate::{Aggregator, ClientUpdate, FedAdagrad};
/// use devft::{HostTensor, ParamMap};
///
/// let map = |v: f32| {
///     let mut params = ParamMap::new();
///     params.insert("w", HostTensor::new(vec![1], vec![v]).unwrap());
///     params
/// };
/// let update = |client, v| ClientUpdate { client, params: map(v), num_examples: 1, metrics: Default::default() };
/// let mut adagrad = FedAdagrad::new(0.5, 1e-9)?;
/// let new = adagrad.aggregate(&map(0.0), &[update(0, 1.0), update(1, 3.0)])?;
/// assert!((new.get("w").unwrap().values()[0] - 0.5).abs() < 1e-6);
/// # Ok::<(), devft::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct FedAdagrad {
    core: FedOptCore,
}

impl FedAdagrad {
    /// FedAdagrad with server learning rate `eta` and adaptivity `tau`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] unless `eta > 0` and `tau > 0`.
    pub fn new(eta: f64, tau: f64) -> Result<Self> {
        FedOptCore::new(Variant::Adagrad, eta, 0.0, 0.0, tau).map(|core| Self { core })
    }
}

impl Default for FedAdagrad {
    /// Flower 1.42's defaults: `eta = 0.1, tau = 1e-9`.
    fn default() -> Self {
        Self::new(0.1, 1e-9).expect("valid defaults")
    }
}

/// Forwards [`Aggregator`] to the shared [`FedOptCore`].
macro_rules! forward_to_core {
    ($($ty:ty),*) => {$(
        impl Aggregator for $ty {
            fn name(&self) -> String {
                self.core.name()
            }

            fn aggregate(
                &mut self,
                global: &ParamMap,
                updates: &[ClientUpdate],
            ) -> Result<ParamMap> {
                self.core.aggregate(global, updates)
            }

            fn state(&self) -> ParamMap {
                self.core.state()
            }

            fn load_state(&mut self, state: &ParamMap) -> Result<()> {
                self.core.load_state(state)
            }

            fn reset(&mut self) {
                self.core.reset()
            }
        }
    )*};
}

forward_to_core!(FedAdam, FedYogi, FedAdagrad);
