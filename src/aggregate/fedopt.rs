//! Adaptive federated optimisation (Reddi et al., 2021): FedAdam, FedYogi, FedAdagrad, as
//! Flower's `FedOpt` strategies compute them.
//!
//! With `avg` the FedAvg result and `x` the current global, `delta = avg - x`,
//! `m = beta_1 m + (1 - beta_1) delta` (zeros before the first round), and
//! - FedAdam: `v = beta_2 v + (1 - beta_2) delta^2`, and the step uses the bias-corrected
//!   `eta_t = eta sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1))` for round `t` (from 1);
//! - FedYogi: `v = v - (1 - beta_2) delta^2 sign(v - delta^2)`;
//! - FedAdagrad: `v = v + delta^2`;
//!
//! then `x = x + eta_t m / (sqrt(v) + tau)` (`eta_t = eta` for Yogi and Adagrad).

use crate::aggregate::{Aggregator, ClientUpdate, state_counter, weighted_mean, zip_map};
use crate::error::{Error, Result};
use crate::params::{HostTensor, ParamMap};

/// Which second-moment rule a [`FedOpt`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FedOptVariant {
    /// Adam's exponential average, with bias correction of the step.
    Adam,
    /// Yogi's sign-controlled additive update.
    Yogi,
    /// Adagrad's running sum.
    Adagrad,
}

/// A server optimiser over FedAvg pseudo-gradients.
#[derive(Debug, Clone, PartialEq)]
pub struct FedOpt {
    variant: FedOptVariant,
    eta: f64,
    beta_1: f64,
    beta_2: f64,
    tau: f64,
    round: usize,
    m: Option<ParamMap>,
    v: Option<ParamMap>,
}

/// FedAdam; defaults (Flower's): `eta = 0.1, beta_1 = 0.9, beta_2 = 0.99, tau = 1e-9`.
pub type FedAdam = FedOpt;
/// FedYogi; defaults (Flower's): `eta = 0.01, beta_1 = 0.9, beta_2 = 0.99, tau = 1e-3`.
pub type FedYogi = FedOpt;
/// FedAdagrad; defaults (Flower's): `eta = 0.1, beta_1 = 0, tau = 1e-9`.
pub type FedAdagrad = FedOpt;

impl FedOpt {
    /// A server optimiser of `variant` with explicit hyper-parameters.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] unless `eta > 0`, `0 <= beta_1, beta_2 < 1` and `tau > 0`.
    pub fn new(
        variant: FedOptVariant,
        eta: f64,
        beta_1: f64,
        beta_2: f64,
        tau: f64,
    ) -> Result<Self> {
        let ok = eta.is_finite()
            && eta > 0.0
            && (0.0..1.0).contains(&beta_1)
            && (0.0..1.0).contains(&beta_2)
            && tau.is_finite()
            && tau > 0.0;
        if !ok {
            return Err(Error::InvalidArgument(format!(
                "FedOpt needs eta > 0, 0 <= beta_1, beta_2 < 1 and tau > 0; got eta={eta}, \
                 beta_1={beta_1}, beta_2={beta_2}, tau={tau}"
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

    /// FedAdam with Flower's defaults.
    pub fn adam() -> Self {
        Self::new(FedOptVariant::Adam, 0.1, 0.9, 0.99, 1e-9).expect("valid defaults")
    }

    /// FedYogi with Flower's defaults.
    pub fn yogi() -> Self {
        Self::new(FedOptVariant::Yogi, 0.01, 0.9, 0.99, 1e-3).expect("valid defaults")
    }

    /// FedAdagrad with Flower's defaults.
    pub fn adagrad() -> Self {
        Self::new(FedOptVariant::Adagrad, 0.1, 0.0, 0.99, 1e-9).expect("valid defaults")
    }
}

const ROUND_KEY: &str = "fedopt.round";

impl Aggregator for FedOpt {
    fn name(&self) -> String {
        format!("fed{:?}(eta={})", self.variant, self.eta).to_lowercase()
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
            FedOptVariant::Adam => zip_map(&v_prev, &delta, |v, d| b2 * v + (1.0 - b2) * d * d)?,
            FedOptVariant::Yogi => zip_map(&v_prev, &delta, |v, d| {
                v - (1.0 - b2) * d * d * (v - d * d).signum_or_zero()
            })?,
            FedOptVariant::Adagrad => zip_map(&v_prev, &delta, |v, d| v + d * d)?,
        };
        self.round += 1;
        let t = self.round as f64;
        let eta = match self.variant {
            FedOptVariant::Adam => {
                self.eta * (1.0 - b2.powf(t + 1.0)).sqrt() / (1.0 - b1.powf(t + 1.0))
            }
            _ => self.eta,
        };
        let step = zip_map(&m, &v, |m, v| eta * m / (v.sqrt() + self.tau))?;
        let new = zip_map(global, &step, |x, s| x + s)?;
        self.m = Some(m);
        self.v = Some(v);
        Ok(new)
    }

    fn state(&self) -> ParamMap {
        let mut state = ParamMap::new();
        for (prefix, moments) in [("m.", &self.m), ("v.", &self.v)] {
            for (name, tensor) in moments.iter().flat_map(ParamMap::iter) {
                state.insert(format!("{prefix}{name}"), tensor.clone());
            }
        }
        state.insert(
            ROUND_KEY,
            HostTensor::new(vec![1], vec![self.round as f32]).expect("one value"),
        );
        state
    }

    fn load_state(&mut self, state: &ParamMap) -> Result<()> {
        let round = state_counter(state, ROUND_KEY)?;
        let split = |prefix: &str| -> Option<ParamMap> {
            let map: ParamMap = state
                .iter()
                .filter_map(|(n, t)| {
                    n.strip_prefix(prefix)
                        .map(|rest| (rest.to_string(), t.clone()))
                })
                .collect();
            (!map.is_empty()).then_some(map)
        };
        self.m = split("m.");
        self.v = split("v.");
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
trait SignumOrZero {
    fn signum_or_zero(self) -> f64;
}

impl SignumOrZero for f64 {
    fn signum_or_zero(self) -> f64 {
        if self == 0.0 { 0.0 } else { self.signum() }
    }
}
