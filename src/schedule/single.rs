//! One stage on the full model: plain federated LoRA (FedIT).

use crate::error::{Error, Result};
use crate::schedule::{Stage, StageScheduler};

/// A single stage training all layers for the whole budget: with it, the DevFT loop is plain
/// federated LoRA (FedIT).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SingleStage;

impl StageScheduler for SingleStage {
    fn plan(&self, num_layers: usize, total_rounds: usize) -> Result<Vec<Stage>> {
        if num_layers == 0 || total_rounds == 0 {
            return Err(Error::InvalidArgument(
                "need at least one layer and one round".into(),
            ));
        }
        Ok(vec![Stage {
            capacity: num_layers,
            rounds: total_rounds,
        }])
    }
}
