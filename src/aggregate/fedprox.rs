//! FedProx (Li et al., 2020): FedAvg on the server, a proximal term on the clients.

use crate::aggregate::{Aggregator, ClientInstructions, ClientUpdate, weighted_mean};
use crate::error::{Error, Result};
use crate::params::ParamMap;

/// Clients minimise `loss + mu / 2 * ||w - w_global||^2` over the adapter (the client's duty,
/// announced through [`ClientInstructions::proximal_mu`] and applied by devft's local trainer);
/// the server aggregates as FedAvg. With `mu = 0` this is FedAvg.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FedProx {
    mu: f64,
}

impl FedProx {
    /// FedProx with proximal weight `mu`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when `mu` is negative or not finite.
    pub fn new(mu: f64) -> Result<Self> {
        if !(mu.is_finite() && mu >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "FedProx mu must be >= 0, got {mu}"
            )));
        }
        Ok(Self { mu })
    }
}

impl Aggregator for FedProx {
    fn name(&self) -> String {
        format!("fedprox(mu={})", self.mu)
    }

    fn client_instructions(&self) -> ClientInstructions {
        ClientInstructions {
            proximal_mu: self.mu,
            ..Default::default()
        }
    }

    fn aggregate(&mut self, global: &ParamMap, updates: &[ClientUpdate]) -> Result<ParamMap> {
        weighted_mean(global, updates)
    }
}
