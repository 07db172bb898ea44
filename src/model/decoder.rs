//! One pre-norm decoder layer: `h = x + attn(norm1(x))`, `y = h + mlp(norm2(h))`.
//!
//! Layers expose their parameters by name, in transformers' naming and PyTorch's `[out, in]`
//! layout (`self_attn.q_proj.weight`, `input_layernorm.weight`, ...), and their LoRA tensors in
//! PEFT's (`self_attn.q_proj.lora_A.weight: [r, in]`, `...lora_B.weight: [out, r]`), because
//! grouping, fusion and transfer work layer by layer on those maps.

use std::collections::BTreeMap;

use burn::module::{Module, Param};
use burn::nn::RmsNorm;
use burn::tensor::{Device, Tensor};

use crate::error::{Error, Result};
use crate::model::attention::{AttentionContext, LayerCache, SelfAttention};
use crate::model::config::DecoderConfig;
use crate::model::frozen::FrozenWeight;
use crate::model::lora::{LoraConfig, LoraLinear, LowRankAdapter, Projection};
use crate::model::mlp::SwiGluMlp;
use crate::model::quantised::QuantisedMatrix;
use crate::model::rms_norm::rms_norm;
use crate::params::{HostTensor, ParamMap};

/// Name and `[out, in]` shape of every tensor of one layer, with whether it is a projection
/// weight (stored transposed in burn).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    /// The name inside the layer, e.g. `self_attn.q_proj.weight`.
    pub name: String,
    /// The shape in transformers' layout.
    pub shape: Vec<usize>,
}

/// The tensors of one decoder layer in transformers' naming and layout.
pub fn layer_tensor_specs(config: &DecoderConfig) -> Vec<TensorSpec> {
    let mut specs = Vec::new();
    for projection in Projection::ALL {
        let [d_in, d_out] = projection_dims(config, projection);
        specs.push(TensorSpec {
            name: format!("{}.weight", projection.path()),
            shape: vec![d_out, d_in],
        });
        if projection_has_bias(config, projection) {
            specs.push(TensorSpec {
                name: format!("{}.bias", projection.path()),
                shape: vec![d_out],
            });
        }
    }
    for norm in ["input_layernorm.weight", "post_attention_layernorm.weight"] {
        specs.push(TensorSpec {
            name: norm.to_string(),
            shape: vec![config.hidden_size],
        });
    }
    specs
}

/// `[d_in, d_out]` of a projection.
pub fn projection_dims(config: &DecoderConfig, projection: Projection) -> [usize; 2] {
    let hidden = config.hidden_size;
    let q = config.num_heads * config.head_dim;
    let kv = config.num_kv_heads * config.head_dim;
    match projection {
        Projection::Q => [hidden, q],
        Projection::K | Projection::V => [hidden, kv],
        Projection::O => [q, hidden],
        Projection::Gate | Projection::Up => [hidden, config.intermediate_size],
        Projection::Down => [config.intermediate_size, hidden],
    }
}

fn projection_has_bias(config: &DecoderConfig, projection: Projection) -> bool {
    match projection {
        Projection::Q | Projection::K | Projection::V => config.qkv_bias,
        Projection::O => config.o_bias,
        Projection::Gate | Projection::Up | Projection::Down => config.mlp_bias,
    }
}

/// Checks that `params` holds exactly the tensors of `specs` with the right shapes.
pub(crate) fn check_exact(params: &ParamMap, specs: &[TensorSpec], prefix: &str) -> Result<()> {
    for spec in specs {
        let tensor = params.get(&spec.name).ok_or_else(|| Error::MissingTensor {
            name: format!("{prefix}{}", spec.name),
        })?;
        if tensor.shape() != spec.shape.as_slice() {
            return Err(Error::ShapeMismatch {
                name: format!("{prefix}{}", spec.name),
                expected: spec.shape.clone(),
                found: tensor.shape().to_vec(),
            });
        }
    }
    if let Some(extra) = params.names().find(|n| !specs.iter().any(|s| s.name == *n)) {
        return Err(Error::UnexpectedTensor {
            name: format!("{prefix}{extra}"),
        });
    }
    Ok(())
}

/// [`check_exact`] without prefix, then [`Error::NonFinite`] for the first tensor holding NaN
/// or an infinity.
fn check_exact_finite(params: &ParamMap, specs: &[TensorSpec]) -> Result<()> {
    check_exact(params, specs, "")?;
    match params.iter().find(|(_, t)| !t.is_finite()) {
        Some((name, _)) => Err(Error::NonFinite {
            name: name.to_string(),
        }),
        None => Ok(()),
    }
}

pub(crate) fn frozen_norm(weight: &HostTensor, eps: f64, device: &Device) -> Result<RmsNorm> {
    Ok(RmsNorm {
        gamma: Param::from_tensor(weight.to_tensor(device)?).set_require_grad(false),
        epsilon: eps,
    })
}

/// A Llama-family decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    /// Attention block.
    pub self_attn: SelfAttention,
    /// Feed-forward block.
    pub mlp: SwiGluMlp,
    /// RMSNorm before attention.
    pub input_layernorm: RmsNorm,
    /// RMSNorm before the MLP.
    pub post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    /// Builds a frozen layer (no adapters) from its tensors in transformers' naming and layout.
    ///
    /// # Errors
    ///
    /// [`Error::MissingTensor`], [`Error::UnexpectedTensor`] or [`Error::ShapeMismatch`] when
    /// `params` does not hold exactly [`layer_tensor_specs`].
    pub fn from_params(config: &DecoderConfig, params: &ParamMap, device: &Device) -> Result<Self> {
        Self::from_parts(config, params, BTreeMap::new(), device)
    }

    /// [`DecoderLayer::from_params`] with the weights of some projections kept quantised:
    /// `params` then holds every tensor but those weights. The caller
    /// ([`crate::model::CausalLm::from_source`]) has checked each matrix against its spec.
    ///
    /// # Errors
    ///
    /// Those of [`DecoderLayer::from_params`].
    pub(crate) fn from_parts(
        config: &DecoderConfig,
        params: &ParamMap,
        mut quantised: BTreeMap<Projection, QuantisedMatrix>,
        device: &Device,
    ) -> Result<Self> {
        let weight_name = |p: Projection| format!("{}.weight", p.path());
        let specs: Vec<TensorSpec> = layer_tensor_specs(config)
            .into_iter()
            .filter(|s| !quantised.keys().any(|&p| s.name == weight_name(p)))
            .collect();
        check_exact(params, &specs, "")?;
        let mut proj = |p: Projection| -> Result<LoraLinear> {
            let weight = match quantised.remove(&p) {
                Some(matrix) => FrozenWeight::Quantised(matrix),
                None => FrozenWeight::dense(
                    params
                        .require(&weight_name(p))?
                        .transposed()?
                        .to_tensor(device)?,
                ),
            };
            let bias = params
                .get(&format!("{}.bias", p.path()))
                .map(|b| b.to_tensor::<1>(device))
                .transpose()?;
            Ok(LoraLinear::from_weight(weight, bias))
        };
        Ok(Self {
            self_attn: SelfAttention {
                q_proj: proj(Projection::Q)?,
                k_proj: proj(Projection::K)?,
                v_proj: proj(Projection::V)?,
                o_proj: proj(Projection::O)?,
                num_heads: config.num_heads,
                num_kv_heads: config.num_kv_heads,
                head_dim: config.head_dim,
            },
            mlp: SwiGluMlp {
                gate_proj: proj(Projection::Gate)?,
                up_proj: proj(Projection::Up)?,
                down_proj: proj(Projection::Down)?,
            },
            input_layernorm: frozen_norm(
                params.require("input_layernorm.weight")?,
                config.rms_norm_eps,
                device,
            )?,
            post_attention_layernorm: frozen_norm(
                params.require("post_attention_layernorm.weight")?,
                config.rms_norm_eps,
                device,
            )?,
        })
    }

    /// One of the seven projections.
    pub fn projection(&self, projection: Projection) -> &LoraLinear {
        match projection {
            Projection::Q => &self.self_attn.q_proj,
            Projection::K => &self.self_attn.k_proj,
            Projection::V => &self.self_attn.v_proj,
            Projection::O => &self.self_attn.o_proj,
            Projection::Gate => &self.mlp.gate_proj,
            Projection::Up => &self.mlp.up_proj,
            Projection::Down => &self.mlp.down_proj,
        }
    }

    /// One of the seven projections, mutably.
    pub fn projection_mut(&mut self, projection: Projection) -> &mut LoraLinear {
        match projection {
            Projection::Q => &mut self.self_attn.q_proj,
            Projection::K => &mut self.self_attn.k_proj,
            Projection::V => &mut self.self_attn.v_proj,
            Projection::O => &mut self.self_attn.o_proj,
            Projection::Gate => &mut self.mlp.gate_proj,
            Projection::Up => &mut self.mlp.up_proj,
            Projection::Down => &mut self.mlp.down_proj,
        }
    }

    /// The frozen base tensors, in transformers' naming and `[out, in]` layout.
    pub fn base_params(&self) -> ParamMap {
        let mut params = ParamMap::new();
        for p in Projection::ALL {
            let linear = self.projection(p);
            params.insert(format!("{}.weight", p.path()), linear.weight.to_host());
            if let Some(bias) = &linear.bias {
                params.insert(
                    format!("{}.bias", p.path()),
                    HostTensor::from_tensor(bias.val()),
                );
            }
        }
        params.insert(
            "input_layernorm.weight",
            HostTensor::from_tensor(self.input_layernorm.gamma.val()),
        );
        params.insert(
            "post_attention_layernorm.weight",
            HostTensor::from_tensor(self.post_attention_layernorm.gamma.val()),
        );
        params
    }

    /// The LoRA tensors, in PEFT's naming and layout (`lora_A: [r, in]`, `lora_B: [out, r]`).
    pub fn lora_params(&self) -> ParamMap {
        let mut params = ParamMap::new();
        for p in Projection::ALL {
            if let Some(adapter) = &self.projection(p).adapter {
                let a = HostTensor::from_tensor(adapter.a.val());
                let b = HostTensor::from_tensor(adapter.b.val());
                params.insert(
                    format!("{}.lora_A.weight", p.path()),
                    a.transposed().expect("LoRA A is 2-D"),
                );
                params.insert(
                    format!("{}.lora_B.weight", p.path()),
                    b.transposed().expect("LoRA B is 2-D"),
                );
            }
        }
        params
    }

    /// Every tensor of the layer: [`DecoderLayer::base_params`] and
    /// [`DecoderLayer::lora_params`] in one map.
    pub fn params(&self) -> ParamMap {
        let mut params = self.base_params();
        for (name, tensor) in self.lora_params() {
            params.insert(name, tensor);
        }
        params
    }

    /// Builds a layer from [`DecoderLayer::params`]-style tensors: the base tensors, plus, with
    /// `lora`, the adapters of `lora.target_modules`.
    ///
    /// # Errors
    ///
    /// [`Error::MissingTensor`], [`Error::UnexpectedTensor`] or [`Error::ShapeMismatch`] naming
    /// the tensor.
    pub fn from_all_params(
        config: &DecoderConfig,
        params: &ParamMap,
        lora: Option<&LoraConfig>,
        device: &Device,
    ) -> Result<Self> {
        let is_lora = |name: &str| name.contains(".lora_A.") || name.contains(".lora_B.");
        let (adapters, base): (ParamMap, ParamMap) = params
            .clone()
            .into_iter()
            .partition(|(name, _)| is_lora(name));
        let mut layer = Self::from_params(config, &base, device)?;
        if let Some(lora) = lora {
            layer.attach_lora(lora, device, |_, a_shape, b_shape| {
                (
                    HostTensor::zeros(a_shape.to_vec()),
                    HostTensor::zeros(b_shape.to_vec()),
                )
            })?;
            layer.load_lora_params(&adapters)?;
        } else if let Some(name) = adapters.names().next() {
            return Err(Error::UnexpectedTensor {
                name: name.to_string(),
            });
        }
        Ok(layer)
    }

    /// The projections that carry an adapter.
    pub fn lora_targets(&self) -> Vec<Projection> {
        Projection::ALL
            .into_iter()
            .filter(|p| self.projection(*p).adapter.is_some())
            .collect()
    }

    /// Attaches fresh adapters to the projections named in `config` (replacing existing
    /// ones), with `A` and `B` given in PEFT layout by `init(projection, [r, in], [out, r])`.
    pub(crate) fn attach_lora(
        &mut self,
        config: &LoraConfig,
        device: &Device,
        mut init: impl FnMut(Projection, [usize; 2], [usize; 2]) -> (HostTensor, HostTensor),
    ) -> Result<()> {
        for p in Projection::ALL {
            let linear = self.projection_mut(p);
            if !config.target_modules.contains(&p) {
                linear.adapter = None;
                continue;
            }
            let [d_in, d_out] = linear.dims();
            let (a, b) = init(p, [config.r, d_in], [d_out, config.r]);
            linear.adapter = Some(LowRankAdapter::from_host(
                &a.transposed()?,
                &b.transposed()?,
                config.scaling(),
                config.lora_dropout,
                device,
            )?);
        }
        Ok(())
    }

    /// The names and PEFT-layout shapes (`lora_A: [r, in]`, `lora_B: [out, r]`) of the
    /// targets' LoRA pairs, with the rank of each given by `rank`.
    fn lora_specs(&self, rank: impl Fn(Projection) -> usize) -> Vec<TensorSpec> {
        self.lora_targets()
            .into_iter()
            .flat_map(|p| {
                let [d_in, d_out] = self.projection(p).dims();
                let r = rank(p);
                [
                    TensorSpec {
                        name: format!("{}.lora_A.weight", p.path()),
                        shape: vec![r, d_in],
                    },
                    TensorSpec {
                        name: format!("{}.lora_B.weight", p.path()),
                        shape: vec![d_out, r],
                    },
                ]
            })
            .collect()
    }

    /// Overwrites the adapters' tensors from a map in PEFT's naming and layout, keeping their
    /// scaling and dropout.
    ///
    /// # Errors
    ///
    /// [`Error::MissingTensor`], [`Error::UnexpectedTensor`] or [`Error::ShapeMismatch`] unless
    /// `params` holds exactly this layer's LoRA tensors with their shapes;
    /// [`Error::NonFinite`] for NaN or infinite values. The layer is unchanged on error.
    pub fn load_lora_params(&mut self, params: &ParamMap) -> Result<()> {
        let specs = self.lora_specs(|p| {
            let adapter = self.projection(p).adapter.as_ref();
            adapter.map_or(0, LowRankAdapter::rank)
        });
        check_exact_finite(params, &specs)?;
        for p in self.lora_targets() {
            let a = params
                .require(&format!("{}.lora_A.weight", p.path()))?
                .transposed()?;
            let b = params
                .require(&format!("{}.lora_B.weight", p.path()))?
                .transposed()?;
            let adapter = self
                .projection_mut(p)
                .adapter
                .as_mut()
                .expect("targets carry adapters");
            let device = adapter.a.val().device();
            adapter.a = Param::from_tensor(a.to_tensor(&device)?);
            adapter.b = Param::from_tensor(b.to_tensor(&device)?);
        }
        Ok(())
    }

    /// Adds `scaling * A B` of a LoRA pair of any rank `R` to each targeted projection's
    /// frozen weight, with the layer's own LoRA scaling: FLoRA's merge of a stacked adapter
    /// ([`crate::aggregate::Flora`]). `params` is in PEFT's naming and layout
    /// (`lora_A: [R, in]`, `lora_B: [out, R]`) and holds exactly the targets' pairs; the
    /// adapters themselves are left as they are.
    ///
    /// # Errors
    ///
    /// [`Error::MissingTensor`], [`Error::UnexpectedTensor`], [`Error::ShapeMismatch`] (also
    /// for `A` and `B` of different ranks) or [`Error::NonFinite`]. The layer is unchanged on
    /// error.
    pub fn merge_adapter(&mut self, params: &ParamMap) -> Result<()> {
        // The rank is whatever `A` has (at least 1); `B` must agree with it.
        let specs = self.lora_specs(|p| {
            let a = params.get(&format!("{}.lora_A.weight", p.path()));
            a.and_then(|a| a.shape().first().copied())
                .unwrap_or(0)
                .max(1)
        });
        check_exact_finite(params, &specs)?;
        let targets = self.lora_targets();
        let mut merged = Vec::with_capacity(targets.len());
        for p in targets {
            let a = params.require(&format!("{}.lora_A.weight", p.path()))?;
            let b = params.require(&format!("{}.lora_B.weight", p.path()))?;
            let linear = self.projection(p);
            let adapter = linear.adapter.as_ref().expect("targets carry adapters");
            let device = self.input_layernorm.gamma.val().device();
            let weight = linear.weight.to_tensor(&device);
            let delta = a
                .transposed()?
                .to_tensor::<2>(&device)?
                .matmul(b.transposed()?.to_tensor::<2>(&device)?)
                .mul_scalar(adapter.scaling);
            merged.push((p, weight + delta));
        }
        for (p, weight) in merged {
            self.projection_mut(p).weight = FrozenWeight::dense(weight);
        }
        Ok(())
    }

    /// The seven projections' weights in transformers' naming and `[out, in]` layout (the
    /// part of the base that merging aggregators change).
    pub fn projection_weights(&self) -> ParamMap {
        let mut params = ParamMap::new();
        for p in Projection::ALL {
            params.insert(
                format!("{}.weight", p.path()),
                self.projection(p).weight.to_host(),
            );
        }
        params
    }

    /// Overwrites the projections' weights from a map like
    /// [`DecoderLayer::projection_weights`].
    ///
    /// # Errors
    ///
    /// [`Error::MissingTensor`], [`Error::UnexpectedTensor`], [`Error::ShapeMismatch`] or
    /// [`Error::NonFinite`]. The layer is unchanged on error.
    pub fn load_projection_weights(&mut self, params: &ParamMap) -> Result<()> {
        let specs: Vec<TensorSpec> = Projection::ALL
            .into_iter()
            .map(|p| {
                let [d_in, d_out] = self.projection(p).dims();
                TensorSpec {
                    name: format!("{}.weight", p.path()),
                    shape: vec![d_out, d_in],
                }
            })
            .collect();
        check_exact_finite(params, &specs)?;
        let device = self.input_layernorm.gamma.val().device();
        let mut weights = Vec::with_capacity(specs.len());
        for p in Projection::ALL {
            let weight = params.require(&format!("{}.weight", p.path()))?;
            weights.push((p, weight.transposed()?.to_tensor::<2>(&device)?));
        }
        for (p, weight) in weights {
            self.projection_mut(p).weight = FrozenWeight::dense(weight);
        }
        Ok(())
    }

    /// Applies the layer.
    ///
    /// # Shapes
    ///
    /// - x: `[batch, seq, hidden]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(
        &self,
        x: Tensor<3>,
        context: &AttentionContext,
        cache: Option<&mut Option<LayerCache>>,
    ) -> Tensor<3> {
        let normed = rms_norm(&self.input_layernorm, x.clone());
        let h = x + self.self_attn.forward(normed, context, cache);
        let normed = rms_norm(&self.post_attention_layernorm, h.clone());
        h + self.mlp.forward(normed)
    }
}
