//! LoRA: a frozen linear layer plus a trainable low-rank update.
//!
//! `y = x W + b + (alpha / r) · dropout(x) A B`, with `A: [d_in, r]` and `B: [r, d_out]` (burn's
//! `[in, out]` layout; PEFT stores the transposes, `lora_A: [r, in]`, `lora_B: [out, r]`, and the
//! conversion happens only at the PEFT boundary, [`crate::model::peft`]).
//!
//! The update is applied as two thin matmuls (`(x A) B`), never as a dense `A B` delta: the
//! backward pass then needs no `d_in x d_out` gradient for the frozen weight. See
//! docs/performance.md for the measurement against burn's built-in `apply_lora`, which merges the
//! delta into the weight on every forward.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::module::linear;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::model::frozen::{FrozenWeight, with_bias};
use crate::model::frozen_matmul::{lora_linear, on_rows};
use crate::model::host_kernels::runs_on_flex;
use crate::params::HostTensor;

/// The seven projections of a Llama-family decoder layer that LoRA can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Projection {
    /// `self_attn.q_proj`
    #[serde(rename = "q_proj")]
    Q,
    /// `self_attn.k_proj`
    #[serde(rename = "k_proj")]
    K,
    /// `self_attn.v_proj`
    #[serde(rename = "v_proj")]
    V,
    /// `self_attn.o_proj`
    #[serde(rename = "o_proj")]
    O,
    /// `mlp.gate_proj`
    #[serde(rename = "gate_proj")]
    Gate,
    /// `mlp.up_proj`
    #[serde(rename = "up_proj")]
    Up,
    /// `mlp.down_proj`
    #[serde(rename = "down_proj")]
    Down,
}

impl Projection {
    /// All seven, in the order DevFT concatenates them: q, k, v, o, gate, up, down.
    pub const ALL: [Projection; 7] = [
        Projection::Q,
        Projection::K,
        Projection::V,
        Projection::O,
        Projection::Gate,
        Projection::Up,
        Projection::Down,
    ];

    /// The module name PEFT's `target_modules` uses (`q_proj`, ..., `down_proj`).
    pub fn module_name(self) -> &'static str {
        match self {
            Projection::Q => "q_proj",
            Projection::K => "k_proj",
            Projection::V => "v_proj",
            Projection::O => "o_proj",
            Projection::Gate => "gate_proj",
            Projection::Up => "up_proj",
            Projection::Down => "down_proj",
        }
    }

    /// The path inside a decoder layer (`self_attn.q_proj`, `mlp.down_proj`, ...).
    pub fn path(self) -> &'static str {
        match self {
            Projection::Q => "self_attn.q_proj",
            Projection::K => "self_attn.k_proj",
            Projection::V => "self_attn.v_proj",
            Projection::O => "self_attn.o_proj",
            Projection::Gate => "mlp.gate_proj",
            Projection::Up => "mlp.up_proj",
            Projection::Down => "mlp.down_proj",
        }
    }

    /// Parses a PEFT module name.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a name that is not one of the seven.
    pub fn from_module_name(name: &str) -> crate::Result<Self> {
        Projection::ALL
            .into_iter()
            .find(|p| p.module_name() == name)
            .ok_or_else(|| {
                Error::InvalidConfig(format!(
                    "unknown LoRA target module `{name}` (expected q_proj, k_proj, v_proj, \
                     o_proj, gate_proj, up_proj or down_proj)"
                ))
            })
    }
}

/// The largest LoRA rank devft accepts (ranks above a model's width add nothing; this bound
/// keeps a rank read from a file from sizing an allocation the process cannot survive).
pub const MAX_LORA_RANK: usize = 1 << 16;

/// LoRA hyper-parameters, with PEFT's names and meanings.
#[derive(Config, Debug, PartialEq)]
pub struct LoraConfig {
    /// Rank `r` of the update.
    pub r: usize,
    /// `lora_alpha`; the update is scaled by `lora_alpha / r`.
    pub lora_alpha: f64,
    /// Dropout on the adapter's input during training. Default: 0.0.
    #[config(default = 0.0)]
    pub lora_dropout: f64,
    /// Which projections get an adapter. Default: all seven.
    #[config(default = "Projection::ALL.to_vec()")]
    pub target_modules: Vec<Projection>,
}

impl LoraConfig {
    /// The scale `lora_alpha / r` applied to the update.
    pub fn scaling(&self) -> f64 {
        self.lora_alpha / self.r as f64
    }

    /// Checks the values.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when `r` is 0 or above [`MAX_LORA_RANK`], `lora_alpha` is not finite, the dropout is outside
    /// `[0, 1)`, or no target is given.
    pub fn validate(&self) -> crate::Result<()> {
        if self.r == 0 || self.r > MAX_LORA_RANK {
            return Err(Error::InvalidConfig(format!(
                "LoRA rank `r` ({}) must lie in 1..={MAX_LORA_RANK}",
                self.r
            )));
        }
        if !self.lora_alpha.is_finite() {
            return Err(Error::InvalidConfig("`lora_alpha` must be finite".into()));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(Error::InvalidConfig(format!(
                "`lora_dropout` ({}) must lie in [0, 1)",
                self.lora_dropout
            )));
        }
        if self.target_modules.is_empty() {
            return Err(Error::InvalidConfig("no LoRA target module given".into()));
        }
        Ok(())
    }
}

/// The trainable low-rank pair of one projection.
#[derive(Module, Debug)]
pub struct LowRankAdapter {
    /// `A: [d_in, r]`.
    pub a: Param<Tensor<2>>,
    /// `B: [r, d_out]`.
    pub b: Param<Tensor<2>>,
    /// `lora_alpha / r`.
    pub scaling: f64,
    /// Dropout on the adapter's input.
    pub dropout: Dropout,
}

impl LowRankAdapter {
    /// An adapter from `a: [d_in, r]` and `b: [r, d_out]` (burn layout), trainable.
    pub fn new(a: Tensor<2>, b: Tensor<2>, scaling: f64, dropout: f64) -> Self {
        Self {
            a: Param::from_tensor(a),
            b: Param::from_tensor(b),
            scaling,
            dropout: DropoutConfig::new(dropout).init(),
        }
    }

    /// Builds an adapter from host tensors in burn layout (`a: [d_in, r]`, `b: [r, d_out]`).
    pub(crate) fn from_host(
        a: &HostTensor,
        b: &HostTensor,
        scaling: f64,
        dropout: f64,
        device: &Device,
    ) -> crate::Result<Self> {
        Ok(Self::new(
            a.to_tensor(device)?,
            b.to_tensor(device)?,
            scaling,
            dropout,
        ))
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.a.shape().dims::<2>()[1]
    }
}

/// A frozen linear layer with an optional LoRA adapter.
#[derive(Module, Debug)]
pub struct LoraLinear {
    /// The frozen base weight (`[d_in, d_out]`), `f32` or kept quantised.
    pub weight: FrozenWeight,
    /// The frozen bias `[d_out]`, if the layer has one.
    pub bias: Option<Param<Tensor<1>>>,
    /// The adapter, when this projection is a LoRA target.
    pub adapter: Option<LowRankAdapter>,
}

impl LoraLinear {
    /// A frozen layer (no gradients for its weight or bias) from a weight in burn layout
    /// `[d_in, d_out]` and an optional bias `[d_out]`, without adapter.
    pub fn frozen(weight: Tensor<2>, bias: Option<Tensor<1>>) -> Self {
        Self::from_weight(FrozenWeight::dense(weight), bias)
    }

    /// A frozen layer from a weight in either representation and an optional bias `[d_out]`,
    /// without adapter.
    pub fn from_weight(weight: FrozenWeight, bias: Option<Tensor<1>>) -> Self {
        Self {
            weight,
            bias: bias.map(|b| Param::from_tensor(b).set_require_grad(false)),
            adapter: None,
        }
    }

    /// `[d_in, d_out]`.
    pub fn dims(&self) -> [usize; 2] {
        self.weight.dims()
    }

    /// The effective weight `W + (alpha / r) A B` in burn layout `[d_in, d_out]` (just `W`
    /// without adapter; a quantised `W` is decoded onto `device`). This is the only place the
    /// dense delta is formed; the forward pass never does.
    pub fn effective_weight(&self, device: &Device) -> Tensor<2> {
        let weight = self.weight.to_tensor(device);
        match &self.adapter {
            None => weight,
            Some(adapter) => {
                weight
                    + adapter
                        .a
                        .val()
                        .matmul(adapter.b.val())
                        .mul_scalar(adapter.scaling)
            }
        }
    }

    /// Applies the layer.
    ///
    /// # Shapes
    ///
    /// - input: `[..., d_in]`
    /// - output: `[..., d_out]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let bias = self.bias.as_ref().map(|b| b.val());
        // On flex, without dropout: one op, the update added into the base's result in place.
        let fused = self
            .adapter
            .as_ref()
            .filter(|adapter| adapter.dropout.prob == 0.0 && runs_on_flex(&x.device(), x.dtype()))
            .and_then(|adapter| Some((adapter, self.weight.frozen_base()?)));
        if let Some((adapter, base)) = fused {
            let (a, b) = (adapter.a.val(), adapter.b.val());
            let d_out = self.dims()[1];
            let y = on_rows(x, d_out, |x| lora_linear(x, base, a, b, adapter.scaling));
            return with_bias(y, bias);
        }
        let base = self.weight.linear(x.clone(), bias);
        match &self.adapter {
            None => base,
            Some(adapter) => {
                // Scale the rank-r intermediate, not the d_out-wide result: one pass over
                // `r` values per token instead of `d_out`.
                let x = adapter.dropout.forward(x);
                let low = linear(x, adapter.a.val(), None).mul_scalar(adapter.scaling);
                base + linear(low, adapter.b.val(), None)
            }
        }
    }
}
