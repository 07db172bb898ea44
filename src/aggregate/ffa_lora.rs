//! FFA-LoRA (Sun et al., 2024): `A` frozen at its initial value, only `B` trained and shared.

use crate::aggregate::{Aggregator, ClientInstructions, ClientUpdate, is_lora_a, partial_mean};
use crate::error::Result;
use crate::params::ParamMap;

/// Clients keep every `lora_A` frozen ([`ClientInstructions::freeze_lora_a`]); the server
/// averages the `lora_B` tensors by examples and keeps the global `lora_A` as it is, so the
/// aggregate of products `B A` is exact.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FfaLora;

impl Aggregator for FfaLora {
    fn name(&self) -> String {
        "ffa-lora".into()
    }

    fn client_instructions(&self) -> ClientInstructions {
        ClientInstructions {
            freeze_lora_a: true,
            ..Default::default()
        }
    }

    fn aggregate(&mut self, global: &ParamMap, updates: &[ClientUpdate]) -> Result<ParamMap> {
        partial_mean(global, updates, |name| !is_lora_a(name))
    }
}
