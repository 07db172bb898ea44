//! Llama-family decoders with LoRA: configuration, layers, checkpoint loading, PEFT interop and
//! generation.
//!
//! The architecture follows transformers' `modeling_llama.py` (which Mistral and Qwen2 share up
//! to biases, tying and sliding windows): pre-norm RMSNorm layers, rotary embeddings in the
//! `rotate_half` layout, grouped-query causal attention, and a SwiGLU MLP.

mod attention;
mod causal_attention;
mod causal_lm;
mod checkpoint;
mod config;
mod cross_entropy;
mod decoder;
mod frozen;
mod frozen_matmul;
mod generate;
pub mod gguf;
mod host_kernels;
mod lora;
mod loss;
mod mlp;
pub mod peft;
mod quantised;
mod rms_norm;
mod rope;
mod score;
mod swiglu;

pub use attention::{AttentionContext, LayerCache, SelfAttention};
pub(crate) use causal_lm::split_layer_name;
pub use causal_lm::{CausalLm, KvCache};
pub use checkpoint::Checkpoint;
pub use config::{DecoderConfig, HfConfig, RopeParameters, RopeScaling, TokenIds, limits};
pub use decoder::{DecoderLayer, TensorSpec, layer_tensor_specs, projection_dims};
pub use frozen::{FrozenWeight, TokenEmbedding};
pub use lora::{LoraConfig, LoraLinear, LowRankAdapter, MAX_LORA_RANK, Projection};
pub use loss::{next_token_loss, target_token_loss};
pub use mlp::SwiGluMlp;
pub use peft::{PEFT_OPTIONS_WITHOUT_MATH, PeftAdapterConfig, export_adapter, import_adapter};
pub use quantised::{DECODED_VALUES, QuantisedMatrix};
pub use rope::{RotaryEmbedding, apply_rotary};
pub use score::{SequenceScores, token_tensor};
