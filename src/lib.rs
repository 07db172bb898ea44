//! # devft: Developmental Federated Tuning on burn
//!
//! devft fine-tunes LoRA adapters of Llama-family language models across many federated
//! clients, following DevFT: early stages train a small submodel made by grouping similar
//! decoder layers and fusing each group into one; each later stage grows the submodel until the
//! last trains the full model.
//!
//! - [`model`]: a Llama / Mistral / Qwen2 / SmolLM2 decoder with LoRA adapters that matches
//!   transformers and PEFT, with checkpoint loading, PEFT import/export and generation.
//! - [`grouping`]: [`grouping::LayerGrouper`] and the paper's spectral grouping plus the even
//!   and random ablations.
//! - [`fusion`]: [`fusion::LayerFuser`] and differential, anchor-only and mean fusion.
//! - [`schedule`]: [`schedule::StageScheduler`], geometric and explicit stage plans.
//! - [`transfer`]: fused submodels and knowledge transfer back to the full model.
//! - [`fidelity`]: how far a fused submodel's loss is from the full model's before training.
//! - [`ParamMap`]: the named tensors every component exchanges; [`tokenizer`] and [`device`].
//!
//! ```no_run
//! use devft::prelude::*;
//!
//! let device = devft::device::default_device()?;
//! let model = CausalLm::load("path/to/hf-model", &device)?;
//! let model = devft::model::import_adapter(&model, "path/to/peft-adapter")?;
//! let answer = model.generate_greedy(&[1, 2, 3], 16, &[2])?;
//! # Ok::<(), devft::Error>(())
//! ```
#![warn(missing_docs)]
#![deny(rustdoc::broken_intra_doc_links)]

pub mod aggregate;
pub mod allocator;
pub mod assets;
pub mod data;
pub mod device;
mod error;
pub mod federated;
pub mod fidelity;
pub mod fusion;
pub mod grouping;
pub mod model;
mod params;
pub mod schedule;
pub mod tokenizer;
pub mod transfer;

pub use error::{Error, Result};
pub use params::{HostTensor, ParamMap, TensorSource};

/// The types most programs need.
pub mod prelude {
    pub use crate::fusion::{AnchorFuser, DifferentialFuser, LayerFuser, MeanFuser};
    pub use crate::grouping::{
        EvenGrouper, Grouping, LayerGrouper, LayerSource, RandomGrouper, SpectralGrouper,
    };
    pub use crate::model::{
        CausalLm, DecoderConfig, LoraConfig, Projection, export_adapter, import_adapter,
        next_token_loss,
    };
    pub use crate::schedule::{ExplicitScheduler, GeometricScheduler, Stage, StageScheduler};
    pub use crate::tokenizer::{ChatTurn, PromptTemplate, Role, Tokenizer};
    pub use crate::transfer::{build_submodel, transfer_lora};
    pub use crate::{Error, HostTensor, ParamMap, Result};
}
