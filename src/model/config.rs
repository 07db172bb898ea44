//! Model configuration: HuggingFace's `config.json` and the resolved [`DecoderConfig`].
//!
//! Two configs, as candle does: [`HfConfig`] mirrors `config.json` key for key (optional keys
//! are `Option`), and [`HfConfig::resolve`] turns it into a validated [`DecoderConfig`] that
//! the model is built from. Both transformers 4 (`rope_theta`, `rope_scaling`) and
//! transformers 5 (`rope_parameters`) spellings are read.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// `config.json` of a Llama-family checkpoint (Llama, Mistral, Qwen2, SmolLM2), as written by
/// transformers.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct HfConfig {
    /// `model_type`: `llama`, `mistral`, `qwen2`, ...
    #[serde(default)]
    pub model_type: Option<String>,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (GQA); defaults to the number of query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base (transformers 4 spelling).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// RoPE scaling (transformers 4 spelling).
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    /// RoPE base and scaling (transformers 5 spelling).
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    /// Longest sequence the model was trained for.
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// Whether the LM head shares the token embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    /// Whether q, k, v and o projections have biases (Llama's `attention_bias`).
    #[serde(default)]
    pub attention_bias: Option<bool>,
    /// Whether the MLP projections have biases.
    #[serde(default)]
    pub mlp_bias: Option<bool>,
    /// Activation of the MLP; only `silu` is supported.
    #[serde(default)]
    pub hidden_act: Option<String>,
    /// Mistral's sliding attention window.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Qwen2's switch for the sliding window.
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    /// Beginning-of-sequence token id.
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    /// End-of-sequence token id(s).
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
}

/// One token id or a list of them (`eos_token_id` may be either).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// RoPE parameters as transformers writes them (`rope_parameters` or `rope_scaling`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct RopeParameters {
    /// RoPE base (transformers 5 puts it here).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// `default`, `linear` or `llama3`.
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
    /// Scaling factor (`linear`, `llama3`).
    #[serde(default)]
    pub factor: Option<f64>,
    /// `llama3`: low-frequency factor.
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    /// `llama3`: high-frequency factor.
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    /// `llama3`: the context length the frequencies were designed for.
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

fn default_max_position_embeddings() -> usize {
    2048
}

/// How rotary frequencies are rescaled for long contexts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor` (transformers' `linear`).
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1's piecewise frequency scaling (transformers' `llama3`).
    Llama3 {
        /// Scaling factor for low frequencies.
        factor: f64,
        /// Wavelength threshold factor for low frequencies.
        low_freq_factor: f64,
        /// Wavelength threshold factor for high frequencies.
        high_freq_factor: f64,
        /// Original training context.
        original_max_position_embeddings: usize,
    },
}

/// A resolved, validated decoder configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecoderConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Number of query heads.
    pub num_heads: usize,
    /// Number of key/value heads (divides `num_heads`).
    pub num_kv_heads: usize,
    /// Per-head width (even).
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE frequency scaling.
    pub rope_scaling: RopeScaling,
    /// Longest supported sequence.
    pub max_position_embeddings: usize,
    /// Whether the LM head is the transposed token embedding.
    pub tie_word_embeddings: bool,
    /// Whether q, k and v have biases (Qwen2; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Whether o has a bias (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Whether gate, up and down have biases.
    pub mlp_bias: bool,
    /// Sliding attention window, if any.
    pub sliding_window: Option<usize>,
}

impl HfConfig {
    /// Reads `config.json`.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] or [`Error::Json`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::json(path, e))
    }

    /// Validates the config and resolves defaults.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when a size is zero, the heads do not divide the hidden size,
    /// the KV heads do not divide the heads, the head width is odd, the activation is not SiLU,
    /// or the RoPE type is unsupported.
    pub fn resolve(&self) -> Result<DecoderConfig> {
        let invalid = |msg: String| Err(Error::InvalidConfig(msg));
        for (name, value, limit) in [
            ("hidden_size", self.hidden_size, limits::MAX_WIDTH),
            (
                "intermediate_size",
                self.intermediate_size,
                limits::MAX_WIDTH,
            ),
            (
                "num_hidden_layers",
                self.num_hidden_layers,
                limits::MAX_LAYERS,
            ),
            (
                "num_attention_heads",
                self.num_attention_heads,
                limits::MAX_HEADS,
            ),
            ("vocab_size", self.vocab_size, limits::MAX_VOCAB),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                limits::MAX_POSITIONS,
            ),
        ] {
            check_size(name, value, limit)?;
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return invalid(format!(
                "num_attention_heads ({}) does not divide hidden_size ({})",
                self.num_attention_heads, self.hidden_size
            ));
        }
        let num_kv_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        if num_kv_heads == 0 || !self.num_attention_heads.is_multiple_of(num_kv_heads) {
            return invalid(format!(
                "num_key_value_heads ({num_kv_heads}) must divide num_attention_heads ({})",
                self.num_attention_heads
            ));
        }
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads);
        check_size("head_dim", head_dim, limits::MAX_HEAD_DIM)?;
        if !head_dim.is_multiple_of(2) {
            return invalid(format!("head_dim ({head_dim}) must be even"));
        }
        // Both factors are bounded above, so the product cannot overflow; it is bounded too.
        check_size(
            "num_attention_heads * head_dim",
            self.num_attention_heads * head_dim,
            limits::MAX_WIDTH,
        )?;
        if let Some(act) = &self.hidden_act
            && act != "silu"
        {
            return invalid(format!("hidden_act `{act}` is not supported (only `silu`)"));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            return invalid(format!(
                "rms_norm_eps ({}) must lie in (0, 1)",
                self.rms_norm_eps
            ));
        }
        let rope = self
            .rope_parameters
            .clone()
            .or_else(|| self.rope_scaling.clone())
            .unwrap_or_default();
        let rope_theta = rope.rope_theta.or(self.rope_theta).unwrap_or(10_000.0);
        if !(rope_theta.is_finite() && rope_theta > 1.0) {
            return invalid(format!("rope_theta ({rope_theta}) must be greater than 1"));
        }
        let rope_scaling = resolve_rope_scaling(&rope)?;
        let is_qwen2 = self.model_type.as_deref() == Some("qwen2");
        let attention_bias = self.attention_bias.unwrap_or(false);
        let sliding_window = match (is_qwen2, self.use_sliding_window) {
            (true, Some(true)) => self.sliding_window,
            (true, _) => None,
            (false, _) => self.sliding_window,
        };
        if let Some(window) = sliding_window {
            check_size("sliding_window", window, limits::MAX_POSITIONS)?;
        }
        Ok(DecoderConfig {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads,
            head_dim,
            vocab_size: self.vocab_size,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            qkv_bias: is_qwen2 || attention_bias,
            o_bias: attention_bias,
            mlp_bias: self.mlp_bias.unwrap_or(false),
            sliding_window,
        })
    }
}

fn resolve_rope_scaling(rope: &RopeParameters) -> Result<RopeScaling> {
    let need = |value: Option<f64>, key: &str| -> Result<f64> {
        let value =
            value.ok_or_else(|| Error::InvalidConfig(format!("rope scaling needs `{key}`")))?;
        if !(value.is_finite() && value > 0.0) {
            return Err(Error::InvalidConfig(format!(
                "rope scaling `{key}` ({value}) must be positive and finite"
            )));
        }
        Ok(value)
    };
    match rope.rope_type.as_deref().unwrap_or("default") {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: need(rope.factor, "factor")?,
        }),
        "llama3" => {
            let low_freq_factor = need(rope.low_freq_factor, "low_freq_factor")?;
            let high_freq_factor = need(rope.high_freq_factor, "high_freq_factor")?;
            if low_freq_factor >= high_freq_factor {
                return Err(Error::InvalidConfig(format!(
                    "rope scaling needs low_freq_factor ({low_freq_factor}) < \
                     high_freq_factor ({high_freq_factor})"
                )));
            }
            let original = rope.original_max_position_embeddings.ok_or_else(|| {
                Error::InvalidConfig("rope scaling needs `original_max_position_embeddings`".into())
            })?;
            check_size(
                "original_max_position_embeddings",
                original,
                limits::MAX_POSITIONS,
            )?;
            Ok(RopeScaling::Llama3 {
                factor: need(rope.factor, "factor")?,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: original,
            })
        }
        other => Err(Error::InvalidConfig(format!(
            "rope type `{other}` is not supported (default, linear, llama3)"
        ))),
    }
}

/// Checks a size read from a file: positive and at most `limit`.
fn check_size(name: &str, value: usize, limit: usize) -> Result<()> {
    if value == 0 {
        return Err(Error::InvalidConfig(format!("`{name}` must be positive")));
    }
    if value > limit {
        return Err(Error::InvalidConfig(format!(
            "`{name}` ({value}) exceeds devft's limit of {limit}"
        )));
    }
    Ok(())
}

/// Upper bounds on the sizes a configuration may declare.
///
/// A size read from a file is checked against these before anything is allocated for it, so
/// that a corrupt or hostile `config.json` or GGUF header gives [`Error::InvalidConfig`]
/// instead of an allocation the process cannot survive. Each is well above every published
/// Llama-family model (Llama 3.1 405B: 126 layers, hidden 16384, MLP 53248, 128 heads of 128;
/// the largest vocabularies are about 256k).
pub mod limits {
    /// Decoder layers.
    pub const MAX_LAYERS: usize = 1024;
    /// Residual-stream, MLP and attention widths (`hidden_size`, `intermediate_size`,
    /// heads times head width).
    pub const MAX_WIDTH: usize = 1 << 18;
    /// Attention heads (query or key/value).
    pub const MAX_HEADS: usize = 1024;
    /// Width of one attention head.
    pub const MAX_HEAD_DIM: usize = 1024;
    /// Vocabulary entries.
    pub const MAX_VOCAB: usize = 1 << 22;
    /// Positions (`max_position_embeddings`, sliding windows, RoPE's original context).
    pub const MAX_POSITIONS: usize = 1 << 24;
}

impl DecoderConfig {
    /// Loads and resolves `config.json`.
    ///
    /// # Errors
    ///
    /// As [`HfConfig::load`] and [`HfConfig::resolve`]; configuration errors name the file.
    pub fn from_hf_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        HfConfig::load(path)?
            .resolve()
            .map_err(|e| e.in_file(&path.display().to_string()))
    }

    /// A config with SmolLM2-135M's shape: 30 layers, hidden 576, MLP 1536, 9 heads, 3 KV heads,
    /// vocabulary 49152, tied embeddings, RoPE base 100000.
    pub fn smollm2_135m() -> Self {
        Self {
            hidden_size: 576,
            intermediate_size: 1536,
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            vocab_size: 49152,
            rms_norm_eps: 1e-5,
            rope_theta: 100_000.0,
            rope_scaling: RopeScaling::None,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            sliding_window: None,
        }
    }

    /// Writes this config as a transformers-style `config.json` (`llama`, or `qwen2` when
    /// q/k/v have biases and o has none), so that it can be read back with [`HfConfig::load`].
    pub fn to_hf_config(&self) -> HfConfig {
        let qwen2 = self.qkv_bias && !self.o_bias;
        HfConfig {
            model_type: Some(if qwen2 { "qwen2" } else { "llama" }.to_string()),
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_layers,
            num_attention_heads: self.num_heads,
            num_key_value_heads: Some(self.num_kv_heads),
            head_dim: Some(self.head_dim),
            vocab_size: self.vocab_size,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: Some(self.rope_theta),
            rope_scaling: match self.rope_scaling {
                RopeScaling::None => None,
                RopeScaling::Linear { factor } => Some(RopeParameters {
                    rope_type: Some("linear".into()),
                    factor: Some(factor),
                    ..Default::default()
                }),
                RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings,
                } => Some(RopeParameters {
                    rope_type: Some("llama3".into()),
                    factor: Some(factor),
                    low_freq_factor: Some(low_freq_factor),
                    high_freq_factor: Some(high_freq_factor),
                    original_max_position_embeddings: Some(original_max_position_embeddings),
                    ..Default::default()
                }),
            },
            rope_parameters: None,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: Some(self.tie_word_embeddings),
            attention_bias: (!qwen2).then_some(self.o_bias),
            mlp_bias: Some(self.mlp_bias),
            hidden_act: Some("silu".to_string()),
            sliding_window: self.sliding_window,
            use_sliding_window: qwen2.then_some(self.sliding_window.is_some()),
            bos_token_id: None,
            eos_token_id: None,
        }
    }
}
