//! FedSA-LoRA (Guo et al., 2025): `A` learns what clients share and is aggregated; `B`
//! stays on each client.

use crate::aggregate::{Aggregator, ClientInstructions, ClientUpdate, is_lora_a, partial_mean};
use crate::error::Result;
use crate::params::ParamMap;

/// Clients keep their own `lora_B` from round to round and send only `lora_A`
/// ([`ClientInstructions::kept_on_client`] is `[".lora_B."]`: clients and server apply it, and
/// only the `A` bytes travel); the server averages the `A` tensors by examples and
/// leaves the global `B` as it is.
///
/// devft's loop evaluates (and transfers between DevFT stages) the global `A` with the
/// example-weighted mean of the clients' `B`: an evaluation-only view that a deployment would
/// obtain from a separate, evaluation-only upload.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FedSaLora;

impl Aggregator for FedSaLora {
    fn name(&self) -> String {
        "fedsa-lora".into()
    }

    fn client_instructions(&self) -> ClientInstructions {
        ClientInstructions {
            kept_on_client: vec![".lora_B.".into()],
            ..Default::default()
        }
    }

    fn aggregate(&mut self, global: &ParamMap, updates: &[ClientUpdate]) -> Result<ParamMap> {
        partial_mean(global, updates, is_lora_a)
    }
}
