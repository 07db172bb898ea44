//! The full causal language model: embeddings, decoder layers, final norm and LM head
//! (transformers' `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`).

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::{Embedding, RmsNorm};
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::model::attention::{AttentionContext, LayerCache};
use crate::model::checkpoint::Checkpoint;
use crate::model::config::DecoderConfig;
use crate::model::decoder::{DecoderLayer, TensorSpec, frozen_norm, layer_tensor_specs};
use crate::model::frozen::{FrozenWeight, TokenEmbedding};
use crate::model::gguf::BaseWeights;
use crate::model::lora::{LoraConfig, Projection};
use crate::model::quantised::QuantisedMatrix;
use crate::model::rms_norm::rms_norm;
use crate::model::rope::RotaryEmbedding;
use crate::params::{HostTensor, ParamMap, TensorSource, parse_index};

/// Keys and values of every layer for incremental decoding.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    len: usize,
}

impl KvCache {
    /// An empty cache for `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            len: 0,
        }
    }

    /// The number of positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A Llama-family causal language model with optional LoRA adapters.
///
/// Every base parameter is frozen; only adapters (attached with [`CausalLm::with_lora`] or
/// imported from PEFT) are trainable. Build one from a HuggingFace directory with
/// [`CausalLm::load`], or a random one with [`CausalLm::random`].
#[derive(Module, Debug)]
pub struct CausalLm {
    /// Token embedding, `[vocab, hidden]`.
    pub embed_tokens: TokenEmbedding,
    /// The decoder layers, in order.
    pub layers: Vec<DecoderLayer>,
    /// Final RMSNorm.
    pub norm: RmsNorm,
    /// LM head weight `[hidden, vocab]`. With tied `f32` embeddings it is the embedding's
    /// transpose, stored once: a matmul against a transposed view costs about 30% more on the
    /// CPU backends, for every forward and backward pass. Tied quantised embeddings share
    /// their blocks with the head.
    pub lm_head: FrozenWeight,
    #[module(skip)]
    config: DecoderConfig,
    #[module(skip)]
    rope: RotaryEmbedding,
    #[module(skip)]
    lora: Option<LoraConfig>,
}

/// Top-level (non-layer) tensors in transformers' naming.
fn top_level_specs(config: &DecoderConfig) -> Vec<TensorSpec> {
    let mut specs = vec![
        TensorSpec {
            name: "model.embed_tokens.weight".into(),
            shape: vec![config.vocab_size, config.hidden_size],
        },
        TensorSpec {
            name: "model.norm.weight".into(),
            shape: vec![config.hidden_size],
        },
    ];
    if !config.tie_word_embeddings {
        specs.push(TensorSpec {
            name: "lm_head.weight".into(),
            shape: vec![config.vocab_size, config.hidden_size],
        });
    }
    specs
}

fn layer_prefix(index: usize) -> String {
    format!("model.layers.{index}.")
}

/// Splits `model.layers.{i}.{inner}` into `(i, inner)`; `i` must be written canonically.
pub(crate) fn split_layer_name(name: &str) -> Option<(usize, &str)> {
    let (index, inner) = name.strip_prefix("model.layers.")?.split_once('.')?;
    Some((parse_index(index)?, inner))
}

impl CausalLm {
    /// Loads a HuggingFace model directory (`config.json` plus `model.safetensors` or a sharded
    /// index), or a `.gguf` file ([`CausalLm::from_gguf`]), onto `device`.
    ///
    /// # Errors
    ///
    /// Any error of [`DecoderConfig::from_hf_file`], [`Checkpoint::open`],
    /// [`CausalLm::from_gguf`] and [`CausalLm::from_source`].
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Self::load_with(dir, BaseWeights::F32, device)
    }

    /// [`CausalLm::load`] with the base weights held as `base` says.
    ///
    /// # Errors
    ///
    /// Those of [`CausalLm::load`], and [`Error::InvalidArgument`] when `base` asks for
    /// quantised weights from a HuggingFace directory (only GGUF files store blocks).
    pub fn load_with(dir: impl AsRef<Path>, base: BaseWeights, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        if dir.is_file()
            && dir
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            return Self::from_gguf_with(dir, base, device);
        }
        if base != BaseWeights::F32 {
            return Err(Error::InvalidArgument(format!(
                "{base:?} base weights need a .gguf file; {} is not one",
                dir.display()
            )));
        }
        let config = DecoderConfig::from_hf_file(dir.join("config.json"))?;
        let checkpoint = Checkpoint::open(dir)?;
        Self::from_source(config, &checkpoint, device)
    }

    /// Builds the model from tensors in transformers' naming and layout, one layer at a time.
    ///
    /// # Errors
    ///
    /// [`Error::MissingTensor`], [`Error::UnexpectedTensor`] (names the model has no place for,
    /// other than `rotary_emb.inv_freq` buffers and a redundant tied `lm_head.weight`; layer
    /// indices must be written canonically, `model.layers.7.`, not `07` or `+7`),
    /// [`Error::ShapeMismatch`] or [`Error::NonFinite`] (a NaN or infinite weight, norm or
    /// embedding), each naming the tensor. Presence is checked before any tensor is decoded.
    pub fn from_source(
        config: DecoderConfig,
        source: &impl TensorSource,
        device: &Device,
    ) -> Result<Self> {
        let names = source.tensor_names();
        let layer_specs = layer_tensor_specs(&config);
        let top_specs = top_level_specs(&config);
        let known = |name: &str| -> bool {
            if top_specs.iter().any(|s| s.name == name)
                || name.ends_with("rotary_emb.inv_freq")
                || (config.tie_word_embeddings && name == "lm_head.weight")
            {
                return true;
            }
            split_layer_name(name).is_some_and(|(i, inner)| {
                i < config.num_layers && layer_specs.iter().any(|s| s.name == inner)
            })
        };
        if let Some(extra) = names.iter().find(|n| !known(n)) {
            return Err(Error::UnexpectedTensor {
                name: extra.clone(),
            });
        }
        // Every name is known and unique, so a count short of the model's means a tensor is
        // missing: say which before decoding (and allocating) anything.
        let needed = top_specs.len() + config.num_layers * layer_specs.len();
        if names.len() < needed {
            let present: std::collections::BTreeSet<&str> =
                names.iter().map(String::as_str).collect();
            let missing = top_specs
                .iter()
                .map(|s| s.name.clone())
                .chain((0..config.num_layers).flat_map(|i| {
                    layer_specs
                        .iter()
                        .map(move |s| format!("{}{}", layer_prefix(i), s.name))
                }))
                .find(|name| !present.contains(name.as_str()));
            if let Some(name) = missing {
                return Err(Error::MissingTensor { name });
            }
        }
        // Every tensor read, decoded or kept in blocks, has its spec's shape and finite values.
        let check = |spec: &TensorSpec, shape: &[usize], finite: &dyn Fn() -> bool| {
            if shape != spec.shape.as_slice() {
                return Err(Error::ShapeMismatch {
                    name: spec.name.clone(),
                    expected: spec.shape.clone(),
                    found: shape.to_vec(),
                });
            }
            if !finite() {
                return Err(Error::NonFinite {
                    name: spec.name.clone(),
                });
            }
            Ok(())
        };
        let load = |spec: &TensorSpec| -> Result<HostTensor> {
            let tensor = source.load_tensor(&spec.name)?;
            check(spec, tensor.shape(), &|| tensor.is_finite())?;
            Ok(tensor)
        };
        let load_quantised = |spec: &TensorSpec| -> Result<Option<QuantisedMatrix>> {
            let Some(matrix) = source.load_quantised(&spec.name)? else {
                return Ok(None);
            };
            check(spec, &matrix.shape(), &|| matrix.is_finite())?;
            Ok(Some(matrix))
        };
        // A matrix as the source keeps it: quantised blocks, or decoded values.
        enum Stored {
            Blocks(QuantisedMatrix),
            Values(HostTensor),
        }
        let stored = |spec: &TensorSpec| -> Result<Stored> {
            match load_quantised(spec)? {
                Some(matrix) => Ok(Stored::Blocks(matrix)),
                None => Ok(Stored::Values(load(spec)?)),
            }
        };
        // The head is `[hidden, vocab]` in burn's layout: a decoded one is transposed once.
        let head = |matrix: &Stored| -> Result<FrozenWeight> {
            Ok(match matrix {
                Stored::Blocks(blocks) => FrozenWeight::Quantised(blocks.clone()),
                Stored::Values(values) => {
                    FrozenWeight::dense(values.transposed()?.to_tensor(device)?)
                }
            })
        };
        let table = stored(&top_specs[0])?;
        let lm_head = match top_specs.get(2) {
            Some(spec) => head(&stored(spec)?)?,
            None => head(&table)?,
        };
        let embed = match table {
            Stored::Blocks(blocks) => TokenEmbedding::Quantised(blocks),
            Stored::Values(values) => TokenEmbedding::Dense(Embedding {
                weight: Param::from_tensor(values.to_tensor(device)?).set_require_grad(false),
            }),
        };
        let norm = frozen_norm(&load(&top_specs[1])?, config.rms_norm_eps, device)?;
        let mut layers = Vec::new();
        for i in 0..config.num_layers {
            let prefix = layer_prefix(i);
            let mut params = ParamMap::new();
            let mut quantised = BTreeMap::new();
            for spec in &layer_specs {
                let full = TensorSpec {
                    name: format!("{prefix}{}", spec.name),
                    shape: spec.shape.clone(),
                };
                // Only projection weights may stay in blocks.
                let projection = Projection::ALL
                    .into_iter()
                    .find(|p| spec.name == format!("{}.weight", p.path()));
                let blocks = match projection {
                    Some(p) => load_quantised(&full)?.map(|matrix| (p, matrix)),
                    None => None,
                };
                match blocks {
                    Some((p, matrix)) => {
                        quantised.insert(p, matrix);
                    }
                    None => params.insert(spec.name.clone(), load(&full)?),
                }
            }
            layers.push(DecoderLayer::from_parts(
                &config, &params, quantised, device,
            )?);
        }
        Ok(Self::assemble(config, embed, layers, norm, lm_head))
    }

    fn assemble(
        config: DecoderConfig,
        embed_tokens: TokenEmbedding,
        layers: Vec<DecoderLayer>,
        norm: RmsNorm,
        lm_head: FrozenWeight,
    ) -> Self {
        let rope = RotaryEmbedding::new(config.head_dim, config.rope_theta, config.rope_scaling);
        Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            config,
            rope,
            lora: None,
        }
    }

    /// A randomly initialised model (uniform weights with standard deviation 0.02, unit norms),
    /// seeded, for tests and benchmarks.
    ///
    /// # Example
    ///
    /// ```
    /// use burn::tensor::{Int, Tensor};
    /// use devft::model::{CausalLm, DecoderConfig, LoraConfig};
    ///
    /// let device = devft::device::default_device()?;
    /// let config = DecoderConfig { num_layers: 2, vocab_size: 100, ..DecoderConfig::smollm2_135m() };
    /// let model = CausalLm::random(config, 0, &device)?.with_lora(&LoraConfig::new(4, 8.0), 0)?;
    /// let ids = Tensor::<2, Int>::from_ints([[1, 2, 3]], &device);
    /// assert_eq!(model.forward(ids).dims(), [1, 3, 100]);
    /// // Two layers, seven adapted projections, A and B each.
    /// assert_eq!(model.lora_params().len(), 2 * 7 * 2);
    /// # Ok::<(), devft::Error>(())
    /// ```
    pub fn random(config: DecoderConfig, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        let bound = 0.02 * 3f32.sqrt();
        let mut sample = |shape: &[usize]| -> HostTensor {
            let len = shape.iter().product();
            let values = (0..len).map(|_| rng.random_range(-bound..bound)).collect();
            HostTensor::new(shape.to_vec(), values).expect("length matches shape")
        };
        let mut params = ParamMap::new();
        for spec in top_level_specs(&config) {
            let tensor = if spec.shape.len() == 1 {
                HostTensor::new(spec.shape.clone(), vec![1.0; spec.shape[0]])?
            } else {
                sample(&spec.shape)
            };
            params.insert(spec.name, tensor);
        }
        for i in 0..config.num_layers {
            for spec in layer_tensor_specs(&config) {
                let tensor = if spec.name.ends_with("layernorm.weight") {
                    HostTensor::new(spec.shape.clone(), vec![1.0; spec.shape[0]])?
                } else {
                    sample(&spec.shape)
                };
                params.insert(format!("{}{}", layer_prefix(i), spec.name), tensor);
            }
        }
        Self::from_source(config, &params, device)
    }

    /// Attaches fresh LoRA adapters to every layer: `A` drawn as PEFT does
    /// (Kaiming-uniform, bound `1/sqrt(d_in)`), `B = 0`, so the model's output is unchanged.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when `config` fails [`LoraConfig::validate`].
    pub fn with_lora(mut self, config: &LoraConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let device = self.device();
        for layer in &mut self.layers {
            layer.attach_lora(config, &device, |_, a_shape, b_shape| {
                let bound = 1.0 / (a_shape[1] as f32).sqrt();
                let a = (0..a_shape[0] * a_shape[1])
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                (
                    HostTensor::new(a_shape.to_vec(), a).expect("length matches shape"),
                    HostTensor::zeros(b_shape.to_vec()),
                )
            })?;
        }
        self.lora = Some(config.clone());
        Ok(self)
    }

    /// A model sharing this one's embeddings, final norm, head and LoRA configuration, with
    /// `layers` as its decoder stack (a DevFT submodel when they are fused layers).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when `layers` is empty.
    pub fn with_layers(&self, layers: Vec<DecoderLayer>) -> Result<Self> {
        if layers.is_empty() {
            return Err(Error::InvalidArgument(
                "a model needs at least one layer".into(),
            ));
        }
        Ok(Self {
            embed_tokens: self.embed_tokens.clone(),
            norm: self.norm.clone(),
            lm_head: self.lm_head.clone(),
            config: DecoderConfig {
                num_layers: layers.len(),
                ..self.config.clone()
            },
            layers,
            rope: self.rope.clone(),
            lora: self.lora.clone(),
        })
    }

    /// The resolved configuration.
    pub fn config(&self) -> &DecoderConfig {
        &self.config
    }

    /// The LoRA configuration of the attached adapters, if any.
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora.as_ref()
    }

    /// The device the parameters live on.
    pub fn device(&self) -> Device {
        self.norm.gamma.val().device()
    }

    /// The bytes the model's weights take in memory: 4 per `f32` parameter, plus the blocks
    /// of the weights kept quantised (those a tied LM head shares with the embedding counted
    /// once).
    ///
    /// ```
    /// use burn::module::Module;
    /// use devft::model::CausalLm;
    ///
    /// let device = devft::device::default_device()?;
    /// let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-llama");
    /// let model = CausalLm::load(dir, &device)?;
    /// assert_eq!(model.weight_bytes(), 4 * model.num_params() as u64);
    /// # Ok::<(), devft::Error>(())
    /// ```
    pub fn weight_bytes(&self) -> u64 {
        let weights = self.layers.iter().flat_map(|layer| {
            Projection::ALL
                .into_iter()
                .map(|p| &layer.projection(p).weight)
        });
        let mut matrices: Vec<&QuantisedMatrix> = std::iter::once(&self.lm_head)
            .chain(weights)
            .filter_map(|weight| match weight {
                FrozenWeight::Quantised(matrix) => Some(matrix),
                FrozenWeight::Dense(_) => None,
            })
            .collect();
        if let TokenEmbedding::Quantised(matrix) = &self.embed_tokens {
            matrices.push(matrix);
        }
        let distinct = matrices
            .iter()
            .enumerate()
            .filter(|(i, m)| !matrices[..*i].iter().any(|other| other.shares_blocks(m)));
        let quantised: usize = distinct.map(|(_, m)| m.storage_bytes()).sum();
        4 * self.num_params() as u64 + quantised as u64
    }

    /// The number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Every base tensor, in transformers' naming and layout.
    pub fn base_params(&self) -> ParamMap {
        let mut params = ParamMap::new();
        params.insert("model.embed_tokens.weight", self.embed_tokens.to_host());
        params.insert(
            "model.norm.weight",
            HostTensor::from_tensor(self.norm.gamma.val()),
        );
        if !self.config.tie_word_embeddings {
            params.insert("lm_head.weight", self.lm_head.to_host());
        }
        params.extend(self.gather_layers(DecoderLayer::base_params));
        params
    }

    /// Every LoRA tensor, in PEFT's layout, named `model.layers.{i}.{path}.lora_A.weight` etc.
    /// (PEFT's saved keys without the `base_model.model.` prefix).
    pub fn lora_params(&self) -> ParamMap {
        self.gather_layers(DecoderLayer::lora_params)
    }

    /// Overwrites every adapter from a map named as [`CausalLm::lora_params`] names it.
    ///
    /// All tensors are checked before any is written, so on error the model is unchanged.
    ///
    /// # Errors
    ///
    /// [`Error::MissingTensor`], [`Error::UnexpectedTensor`], [`Error::ShapeMismatch`] or
    /// [`Error::NonFinite`], naming the tensor.
    pub fn load_lora_params(&mut self, params: &ParamMap) -> Result<()> {
        self.update_layers(params, DecoderLayer::load_lora_params)
    }

    /// Adds `scaling * A B` of each layer's LoRA pairs, of any rank, to its frozen projection
    /// weights ([`DecoderLayer::merge_adapter`]); `adapter` is named as
    /// [`CausalLm::lora_params`] names it. FLoRA merges its stacked adapter this way.
    ///
    /// ```
    /// use devft::model::{CausalLm, DecoderConfig, LoraConfig};
    ///
    /// let device = devft::device::default_device()?;
    /// let config = DecoderConfig { num_layers: 2, vocab_size: 100, ..DecoderConfig::smollm2_135m() };
    /// let model = CausalLm::random(config, 0, &device)?.with_lora(&LoraConfig::new(2, 4.0), 1)?;
    /// let mut merged = model.clone();
    /// // A rank-4 pair (twice the adapter's rank) for every targeted projection: A random, B zero.
    /// let stacked = model.clone().with_lora(&LoraConfig::new(4, 8.0), 2)?.lora_params();
    /// merged.merge_adapter(&stacked)?;
    /// assert_eq!(merged.projection_weights(), model.projection_weights());
    /// # Ok::<(), devft::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::MissingTensor`], [`Error::UnexpectedTensor`], [`Error::ShapeMismatch`] or
    /// [`Error::NonFinite`], naming the tensor. On error the model is unchanged.
    pub fn merge_adapter(&mut self, adapter: &ParamMap) -> Result<()> {
        self.update_layers(adapter, DecoderLayer::merge_adapter)
    }

    /// Every layer's projection weights ([`DecoderLayer::projection_weights`]), named
    /// `model.layers.{i}.{path}.weight`.
    pub fn projection_weights(&self) -> ParamMap {
        self.gather_layers(DecoderLayer::projection_weights)
    }

    /// `tensors` of every layer in one map, each name prefixed `model.layers.{i}.`: the
    /// inverse of [`CausalLm::update_layers`]' split.
    fn gather_layers(&self, tensors: impl Fn(&DecoderLayer) -> ParamMap) -> ParamMap {
        let mut params = ParamMap::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let prefix = layer_prefix(i);
            for (name, tensor) in tensors(layer) {
                params.insert(format!("{prefix}{name}"), tensor);
            }
        }
        params
    }

    /// Overwrites every layer's projection weights from a map like
    /// [`CausalLm::projection_weights`].
    ///
    /// # Errors
    ///
    /// As [`DecoderLayer::load_projection_weights`], naming the tensor. On error the model is
    /// unchanged.
    pub fn load_projection_weights(&mut self, weights: &ParamMap) -> Result<()> {
        self.update_layers(weights, DecoderLayer::load_projection_weights)
    }

    /// Splits `params` (named `model.layers.{i}.{inner}`) by layer and applies `update` to a
    /// copy of every layer; the model changes only if every layer succeeds.
    fn update_layers(
        &mut self,
        params: &ParamMap,
        update: impl Fn(&mut DecoderLayer, &ParamMap) -> Result<()>,
    ) -> Result<()> {
        let mut per_layer = vec![ParamMap::new(); self.layers.len()];
        for (name, tensor) in params.iter() {
            let slot = split_layer_name(name).filter(|(index, _)| *index < self.layers.len());
            let Some((index, inner)) = slot else {
                return Err(Error::UnexpectedTensor {
                    name: name.to_string(),
                });
            };
            per_layer[index].insert(inner, tensor.clone());
        }
        let mut updated = self.layers.clone();
        for (i, (layer, params)) in updated.iter_mut().zip(&per_layer).enumerate() {
            update(layer, params).map_err(|e| e.with_name_prefix(&layer_prefix(i)))?;
        }
        self.layers = updated;
        Ok(())
    }

    /// Saves `config.json` and `model.safetensors` (base weights only) into `dir`, in
    /// transformers' format, so that transformers and [`CausalLm::load`] can read it.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when the directory or files cannot be written.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let config_path = dir.join("config.json");
        let json = serde_json::to_string_pretty(&self.config.to_hf_config())
            .map_err(|e| Error::json(&config_path, e))?;
        std::fs::write(&config_path, json).map_err(|e| Error::io(&config_path, e))?;
        self.base_params()
            .save_safetensors(dir.join("model.safetensors"))
    }

    /// Logits for every position.
    ///
    /// # Shapes
    ///
    /// - input_ids: `[batch, seq]`
    /// - output: `[batch, seq, vocab]`
    pub fn forward(&self, input_ids: Tensor<2, Int>) -> Tensor<3> {
        self.logits_from_hidden(self.hidden_inner(input_ids, None))
    }

    /// The final-norm hidden states for every position: [`CausalLm::forward`] without the
    /// head, so that a caller can apply the head to the positions it needs
    /// ([`CausalLm::logits_from_hidden`]).
    ///
    /// # Shapes
    ///
    /// - input_ids: `[batch, seq]`
    /// - output: `[batch, seq, hidden]`
    pub fn hidden_states(&self, input_ids: Tensor<2, Int>) -> Tensor<3> {
        self.hidden_inner(input_ids, None)
    }

    /// Applies the head to final-norm hidden states.
    ///
    /// # Shapes
    ///
    /// - hidden: `[..., hidden]`
    /// - output: `[..., vocab]`
    pub fn logits_from_hidden<const D: usize>(&self, hidden: Tensor<D>) -> Tensor<D> {
        self.lm_head.linear(hidden, None)
    }

    /// Logits for the new positions, attending over the cached ones; the cache is extended.
    ///
    /// # Shapes
    ///
    /// - input_ids: `[batch, new]`
    /// - output: `[batch, new, vocab]`
    pub fn forward_cached(&self, input_ids: Tensor<2, Int>, cache: &mut KvCache) -> Tensor<3> {
        self.logits_from_hidden(self.hidden_inner(input_ids, Some(cache)))
    }

    fn hidden_inner(
        &self,
        input_ids: Tensor<2, Int>,
        mut cache: Option<&mut KvCache>,
    ) -> Tensor<3> {
        let [_, seq] = input_ids.dims();
        let device = input_ids.device();
        let past = cache.as_ref().map_or(0, |c| c.len);
        let (cos, sin) = self.rope.tables(past, seq, &device);
        let context = AttentionContext {
            cos,
            sin,
            mask: self.attention_mask(past, seq, &device),
            window: self.config.sliding_window,
        };
        let mut x = self.embed_tokens.forward(input_ids);
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(x, &context, slot);
        }
        if let Some(cache) = cache {
            cache.len += seq;
        }
        rms_norm(&self.norm, x)
    }

    /// `true` where query `past + i` may not see key `j`: the future, and keys beyond the
    /// sliding window.
    fn attention_mask(&self, past: usize, seq: usize, device: &Device) -> Option<Tensor<4, Bool>> {
        let total = past + seq;
        let window = self.config.sliding_window.filter(|w| *w < total);
        if seq == 1 && window.is_none() {
            return None;
        }
        let mut mask = Vec::with_capacity(seq * total);
        for i in 0..seq {
            let query = past + i;
            for key in 0..total {
                let future = key > query;
                let outside = window.is_some_and(|w| query - key.min(query) >= w);
                mask.push(future || outside);
            }
        }
        Some(Tensor::from_data(
            TensorData::new(mask, [1, 1, seq, total]),
            device,
        ))
    }
}
