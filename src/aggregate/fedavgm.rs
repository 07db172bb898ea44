//! FedAvgM (Hsu et al., 2019): FedAvg with server momentum, as Flower's `FedAvgM`.

use crate::aggregate::{Aggregator, ClientUpdate, weighted_mean, zip_map};
use crate::error::{Error, Result};
use crate::params::ParamMap;

/// With `avg` the FedAvg result and `x` the current global:
/// pseudo-gradient `g = x - avg`; momentum `m = g` in the first round, then
/// `m = momentum * m + g`; new global `x - server_lr * m`. Defaults: `server_lr = 1`,
/// `momentum = 0.9`. With momentum 0 and `server_lr = 1` it is FedAvg.
#[derive(Debug, Clone, PartialEq)]
pub struct FedAvgM {
    server_lr: f64,
    momentum: f64,
    velocity: Option<ParamMap>,
}

impl Default for FedAvgM {
    fn default() -> Self {
        Self {
            server_lr: 1.0,
            momentum: 0.9,
            velocity: None,
        }
    }
}

impl FedAvgM {
    /// FedAvgM with server learning rate `server_lr` and momentum `momentum`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] unless `server_lr > 0` and `0 <= momentum < 1`.
    pub fn new(server_lr: f64, momentum: f64) -> Result<Self> {
        let valid = server_lr.is_finite() && server_lr > 0.0 && (0.0..1.0).contains(&momentum);
        if !valid {
            return Err(Error::InvalidArgument(format!(
                "FedAvgM needs server_lr > 0 and 0 <= momentum < 1, got {server_lr} and {momentum}"
            )));
        }
        Ok(Self {
            server_lr,
            momentum,
            velocity: None,
        })
    }
}

impl Aggregator for FedAvgM {
    fn name(&self) -> String {
        format!("fedavgm(lr={}, momentum={})", self.server_lr, self.momentum)
    }

    fn aggregate(&mut self, global: &ParamMap, updates: &[ClientUpdate]) -> Result<ParamMap> {
        let avg = weighted_mean(global, updates)?;
        let gradient = zip_map(global, &avg, |x, a| x - a)?;
        let velocity = match &self.velocity {
            Some(v) if self.momentum > 0.0 => zip_map(v, &gradient, |m, g| self.momentum * m + g)?,
            _ => gradient,
        };
        let new = zip_map(global, &velocity, |x, m| x - self.server_lr * m)?;
        self.velocity = Some(velocity);
        Ok(new)
    }

    fn state(&self) -> ParamMap {
        self.velocity.clone().unwrap_or_default()
    }

    fn load_state(&mut self, state: &ParamMap) -> Result<()> {
        self.velocity = (!state.is_empty()).then(|| state.clone());
        Ok(())
    }

    fn reset(&mut self) {
        self.velocity = None;
    }
}
