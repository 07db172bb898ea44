//! Import and export of LoRA adapters in HuggingFace PEFT's on-disk layout.
//!
//! A PEFT adapter directory holds `adapter_config.json` and `adapter_model.safetensors` with
//! keys such as `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (`[r, in]`) and
//! `...lora_B.weight` (`[out, r]`). Adapters written by [`export_adapter`] load in Python with
//! `PeftModel.from_pretrained`, and adapters saved by PEFT load here with [`import_adapter`].

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::causal_lm::CausalLm;
use crate::model::decoder::projection_dims;
use crate::model::lora::{LoraConfig, Projection};
use crate::params::ParamMap;

/// The prefix PEFT puts before the transformers name of a tensor.
pub const PEFT_KEY_PREFIX: &str = "base_model.model.";

/// The subset of PEFT's `adapter_config.json` that devft reads and writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeftAdapterConfig {
    /// Always `LORA`.
    pub peft_type: String,
    /// Rank.
    pub r: usize,
    /// Scale numerator.
    pub lora_alpha: f64,
    /// Dropout on the adapter input.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Target module names (a list; regex strings are not supported).
    pub target_modules: serde_json::Value,
    /// Bias training mode; only `none` is supported.
    #[serde(default = "default_bias")]
    pub bias: String,
    /// rsLoRA scaling (`alpha / sqrt(r)`); unsupported.
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA; unsupported.
    #[serde(default)]
    pub use_dora: bool,
    /// Whether weights are stored `[in, out]`; unsupported.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Per-module ranks; must be empty.
    #[serde(default)]
    pub rank_pattern: serde_json::Map<String, serde_json::Value>,
    /// Per-module alphas; must be empty.
    #[serde(default)]
    pub alpha_pattern: serde_json::Map<String, serde_json::Value>,
    /// Restricts the adapted layers; must be absent.
    #[serde(default)]
    pub layers_to_transform: Option<serde_json::Value>,
    /// Extra fully trained modules; must be absent.
    #[serde(default)]
    pub modules_to_save: Option<serde_json::Value>,
    /// PEFT task type (`CAUSAL_LM` or null).
    #[serde(default)]
    pub task_type: Option<String>,
    /// Base model path, informational.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Whether the adapter is for inference only.
    #[serde(default)]
    pub inference_mode: bool,
    /// Every other key of the file. Keys in [`PEFT_OPTIONS_WITHOUT_MATH`] are accepted with
    /// any value; any other key must hold a neutral value (`null`, `false`, `[]` or `{}`),
    /// since a set option changes what the adapter computes (`lora_bias`, `use_qalora`,
    /// `layer_replication`, `exclude_modules`, ...) and devft refuses what it does not
    /// implement rather than ignore it.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// PEFT `adapter_config.json` keys that do not change what a saved LoRA adapter computes
/// (bookkeeping, initialisation schemes, training-time parallelism), accepted with any value.
pub const PEFT_OPTIONS_WITHOUT_MATH: [&str; 11] = [
    "peft_version",
    "revision",
    "auto_mapping",
    "init_lora_weights",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "megatron_config",
    "megatron_core",
    "runtime_config",
];

/// Options that only matter together with another one devft refuses when set
/// (`layers_pattern` with `layers_to_transform`, `qalora_group_size` with `use_qalora`,
/// `ensure_weight_tying` with trainable embeddings), accepted with any value.
const PEFT_OPTIONS_ONLY_WITH_REFUSED: [&str; 3] =
    ["layers_pattern", "qalora_group_size", "ensure_weight_tying"];

/// Whether a JSON value leaves a PEFT option off.
fn is_neutral(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::Null | serde_json::Value::Bool(false) => true,
        serde_json::Value::Array(items) => items.is_empty(),
        serde_json::Value::Object(map) => map.is_empty(),
        _ => false,
    }
}

fn default_bias() -> String {
    "none".to_string()
}

impl PeftAdapterConfig {
    /// The PEFT config describing `lora`.
    pub fn from_lora(lora: &LoraConfig) -> Self {
        Self {
            peft_type: "LORA".into(),
            r: lora.r,
            lora_alpha: lora.lora_alpha,
            lora_dropout: lora.lora_dropout,
            target_modules: serde_json::Value::Array(
                lora.target_modules
                    .iter()
                    .map(|p| serde_json::Value::String(p.module_name().into()))
                    .collect(),
            ),
            bias: default_bias(),
            use_rslora: false,
            use_dora: false,
            fan_in_fan_out: false,
            rank_pattern: Default::default(),
            alpha_pattern: Default::default(),
            layers_to_transform: None,
            modules_to_save: None,
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: None,
            inference_mode: true,
            other: Default::default(),
        }
    }

    /// Converts to a [`LoraConfig`], rejecting PEFT features devft does not implement.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidAdapter`] naming the unsupported field: any option that is set and
    /// is not one devft implements or one of [`PEFT_OPTIONS_WITHOUT_MATH`].
    pub fn to_lora(&self) -> Result<LoraConfig> {
        let unsupported =
            |what: &str| Err(Error::InvalidAdapter(format!("{what} is not supported")));
        if self.peft_type != "LORA" {
            return unsupported(&format!("peft_type `{}`", self.peft_type));
        }
        if self.bias != "none" {
            return unsupported(&format!("bias `{}`", self.bias));
        }
        if self.use_rslora {
            return unsupported("use_rslora");
        }
        if self.use_dora {
            return unsupported("use_dora");
        }
        if self.fan_in_fan_out {
            return unsupported("fan_in_fan_out");
        }
        if !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty() {
            return unsupported("rank_pattern/alpha_pattern");
        }
        if self
            .layers_to_transform
            .as_ref()
            .is_some_and(|v| !v.is_null())
        {
            return unsupported("layers_to_transform");
        }
        if self.modules_to_save.as_ref().is_some_and(|v| !v.is_null()) {
            return unsupported("modules_to_save");
        }
        let accepted = |key: &str| {
            PEFT_OPTIONS_WITHOUT_MATH.contains(&key)
                || PEFT_OPTIONS_ONLY_WITH_REFUSED.contains(&key)
        };
        if let Some((key, value)) = self
            .other
            .iter()
            .find(|(key, value)| !accepted(key) && !is_neutral(value))
        {
            return unsupported(&format!("option `{key}` = {value}"));
        }
        let names = self.target_modules.as_array().ok_or_else(|| {
            Error::InvalidAdapter("target_modules must be a list of module names".into())
        })?;
        let mut targets = Vec::new();
        for name in names {
            let name = name.as_str().ok_or_else(|| {
                Error::InvalidAdapter("target_modules must be a list of module names".into())
            })?;
            targets.push(
                Projection::from_module_name(name)
                    .map_err(|e| Error::InvalidAdapter(e.to_string()))?,
            );
        }
        targets.sort();
        targets.dedup();
        let lora = LoraConfig::new(self.r, self.lora_alpha)
            .with_lora_dropout(self.lora_dropout)
            .with_target_modules(targets);
        lora.validate()
            .map_err(|e| Error::InvalidAdapter(e.to_string()))?;
        Ok(lora)
    }
}

/// Writes the model's adapters as a PEFT adapter directory.
///
/// # Errors
///
/// [`Error::InvalidAdapter`] if the model has no adapter; [`Error::Io`] on write failure.
pub fn export_adapter(model: &CausalLm, dir: impl AsRef<Path>) -> Result<()> {
    let dir = dir.as_ref();
    let lora = model
        .lora_config()
        .ok_or_else(|| Error::InvalidAdapter("the model has no LoRA adapter to export".into()))?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let config_path = dir.join("adapter_config.json");
    let json = serde_json::to_string_pretty(&PeftAdapterConfig::from_lora(lora))
        .map_err(|e| Error::json(&config_path, e))?;
    std::fs::write(&config_path, json).map_err(|e| Error::io(&config_path, e))?;
    model
        .lora_params()
        .renamed(|name| format!("{PEFT_KEY_PREFIX}{name}"))
        .save_safetensors(dir.join("adapter_model.safetensors"))
}

/// Reads a PEFT adapter directory and returns a copy of `model` carrying it (replacing any
/// adapter); `model` itself is left as it was.
///
/// # Errors
///
/// [`Error::Io`]/[`Error::Json`] for unreadable files, [`Error::InvalidAdapter`] for an
/// unsupported config or tensors whose rank disagrees with `r`, and
/// [`Error::MissingTensor`]/[`Error::UnexpectedTensor`]/[`Error::ShapeMismatch`] naming the
/// offending key.
pub fn import_adapter(model: &CausalLm, dir: impl AsRef<Path>) -> Result<CausalLm> {
    let dir = dir.as_ref();
    let config_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let peft: PeftAdapterConfig =
        serde_json::from_str(&text).map_err(|e| Error::json(&config_path, e))?;
    let lora = peft.to_lora()?;
    let tensors = ParamMap::load_safetensors(dir.join("adapter_model.safetensors"))?;
    let mut params = ParamMap::new();
    for (name, tensor) in tensors {
        let Some(inner) = name.strip_prefix(PEFT_KEY_PREFIX) else {
            return Err(Error::UnexpectedTensor { name });
        };
        let rank = if name.ends_with(".lora_A.weight") {
            tensor.shape().first().copied()
        } else if name.ends_with(".lora_B.weight") {
            tensor.shape().get(1).copied()
        } else {
            return Err(Error::UnexpectedTensor { name });
        };
        if tensor.shape().len() != 2 || rank != Some(lora.r) {
            return Err(Error::InvalidAdapter(format!(
                "tensor `{name}` has shape {:?}, whose rank disagrees with r = {} in \
                 adapter_config.json",
                tensor.shape(),
                lora.r
            )));
        }
        params.insert(inner, tensor);
    }
    // Every adapter tensor must be present with its full shape before any is allocated, so
    // that a rank in the config costs memory only if the file really holds it.
    for layer in 0..model.num_layers() {
        for &projection in &lora.target_modules {
            let [d_in, d_out] = projection_dims(model.config(), projection);
            for (factor, shape) in [("lora_A", [lora.r, d_in]), ("lora_B", [d_out, lora.r])] {
                let name = format!("model.layers.{layer}.{}.{factor}.weight", projection.path());
                let tensor = params.get(&name).ok_or_else(|| Error::MissingTensor {
                    name: format!("{PEFT_KEY_PREFIX}{name}"),
                })?;
                if tensor.shape() != shape {
                    return Err(Error::ShapeMismatch {
                        name: format!("{PEFT_KEY_PREFIX}{name}"),
                        expected: shape.to_vec(),
                        found: tensor.shape().to_vec(),
                    });
                }
            }
        }
    }
    let mut model = model.clone().with_lora(&lora, 0)?;
    model
        .load_lora_params(&params)
        .map_err(|e| e.with_name_prefix(PEFT_KEY_PREFIX))?;
    Ok(model)
}
