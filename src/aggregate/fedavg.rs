//! FedAvg (McMahan et al., 2017); on LoRA adapters this is FedIT (Zhang et al., 2024).

use crate::aggregate::{Aggregator, ClientUpdate, weighted_mean};
use crate::error::Result;
use crate::params::ParamMap;

/// The new global is the example-weighted mean of the clients' adapters:
/// `w = sum_k (n_k / n) w_k`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FedAvg;

impl Aggregator for FedAvg {
    fn name(&self) -> String {
        "fedavg".into()
    }

    fn aggregate(&mut self, global: &ParamMap, updates: &[ClientUpdate]) -> Result<ParamMap> {
        weighted_mean(global, updates)
    }
}
