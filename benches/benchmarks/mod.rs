pub mod aggregate;
pub mod devft_core;
pub mod lora_layer;
