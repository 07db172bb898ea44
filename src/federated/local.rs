//! Local training on one client: AdamW on the adapter, response-token loss, optional FedProx
//! proximal term and FFA-LoRA freezing, seeded batch order.

use burn::config::Config;
use burn::grad_clipping::GradientClippingConfig;
use burn::module::{Module, Param};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::aggregate::ClientInstructions;
use crate::data::{Batch, TokenizedExample};
use crate::error::Error;
use crate::model::{CausalLm, Projection, target_token_loss};
use crate::params::ParamMap;

/// Hyper-parameters of a client's local training.
#[derive(Config, Debug, PartialEq)]
pub struct LocalTrainingConfig {
    /// AdamW learning rate. Default: 3e-4.
    #[config(default = 3e-4)]
    pub learning_rate: f64,
    /// Optimizer steps per round. Default: 4.
    #[config(default = 4)]
    pub local_steps: usize,
    /// Examples per step. Default: 4.
    #[config(default = 4)]
    pub batch_size: usize,
    /// AdamW decoupled weight decay. Default: 0.0.
    #[config(default = 0.0)]
    pub weight_decay: f64,
    /// Gradient clipping by L2 norm, per parameter tensor (burn's semantics). Default: 1.0.
    #[config(default = "Some(1.0)")]
    pub grad_clip_norm: Option<f64>,
    /// Token id used to pad batches. Default: 0.
    #[config(default = 0)]
    pub pad_id: u32,
}

/// What a client's local training reports.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalOutcome {
    /// The trained adapter, in [`CausalLm::lora_params`] naming.
    pub adapter: ParamMap,
    /// Mean training loss over the steps.
    pub mean_loss: f64,
    /// Examples drawn over all steps.
    pub examples_seen: usize,
}

/// Trains `model`'s adapter (set to the global adapter by the caller) on `examples` for
/// `config.local_steps` AdamW steps on `train_device` (an autodiff device), and returns the
/// trained adapter. Batches follow a seeded shuffle of the examples, so a run is reproducible.
///
/// # Errors
///
/// [`Error::InvalidArgument`] when the client has no example, the model has no adapter, the
/// batch size or step count is zero, or a batch has no target token; [`Error::NonFinite`]
/// when the loss diverges.
pub fn train_local(
    model: &CausalLm,
    examples: &[TokenizedExample],
    config: &LocalTrainingConfig,
    instructions: &ClientInstructions,
    train_device: &Device,
    seed: u64,
) -> crate::Result<LocalOutcome> {
    if examples.is_empty() {
        return Err(Error::InvalidArgument(
            "the client has no training example".into(),
        ));
    }
    if config.batch_size == 0 || config.local_steps == 0 {
        return Err(Error::InvalidArgument(
            "batch size and local steps must be positive".into(),
        ));
    }
    if model.lora_config().is_none() {
        return Err(Error::InvalidArgument(
            "the model has no LoRA adapter to train".into(),
        ));
    }
    let global = model.lora_params();
    let mut model = model.clone().to_device(train_device).train();
    if instructions.freeze_lora_a {
        freeze_lora_a(&mut model);
    }
    let proximal = (instructions.proximal_mu > 0.0)
        .then(|| anchors(&model))
        .map(|a| (instructions.proximal_mu, a));
    let mut optimizer = AdamWConfig::new()
        .with_weight_decay(config.weight_decay as f32)
        .with_grad_clipping(
            config
                .grad_clip_norm
                .map(|n| GradientClippingConfig::Norm(n as f32)),
        )
        .init();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut order: Vec<usize> = Vec::new();
    let mut losses = Vec::with_capacity(config.local_steps);
    let mut examples_seen = 0;
    for _ in 0..config.local_steps {
        let mut picked = Vec::with_capacity(config.batch_size);
        while picked.len() < config.batch_size.min(examples.len()) {
            if order.is_empty() {
                order = (0..examples.len()).collect();
                order.shuffle(&mut rng);
            }
            picked.push(&examples[order.pop().expect("refilled above")]);
        }
        examples_seen += picked.len();
        let batch = Batch::new(&picked, config.pad_id, train_device);
        let mut loss = target_token_loss(&model, &batch)?;
        let task_loss = f64::from(
            loss.clone()
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("f32 loss")[0],
        );
        if !task_loss.is_finite() {
            return Err(Error::NonFinite {
                name: "local training loss".into(),
            });
        }
        losses.push(task_loss);
        if let Some((mu, anchors)) = &proximal {
            loss = loss + proximal_term(&model, anchors).mul_scalar(mu / 2.0);
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(config.learning_rate, model, grads);
    }
    let adapter = model.lora_params();
    debug_assert_eq!(adapter.len(), global.len());
    Ok(LocalOutcome {
        adapter,
        mean_loss: losses.iter().sum::<f64>() / losses.len() as f64,
        examples_seen,
    })
}

/// The adapters' values at the start of the round, as constants on the training device.
fn anchors(model: &CausalLm) -> Vec<Tensor<2>> {
    adapter_tensors(model)
        .into_iter()
        .map(|t| t.detach())
        .collect()
}

/// Every adapter tensor of the model, A then B per projection, layer by layer.
fn adapter_tensors(model: &CausalLm) -> Vec<Tensor<2>> {
    model
        .layers
        .iter()
        .flat_map(|layer| {
            Projection::ALL.into_iter().filter_map(move |p| {
                layer
                    .projection(p)
                    .adapter
                    .as_ref()
                    .map(|a| [a.a.val(), a.b.val()])
            })
        })
        .flatten()
        .collect()
}

/// `sum ||w - w_anchor||^2` over the adapter.
fn proximal_term(model: &CausalLm, anchors: &[Tensor<2>]) -> Tensor<1> {
    adapter_tensors(model)
        .into_iter()
        .zip(anchors)
        .map(|(w, a)| (w - a.clone()).powf_scalar(2.0).sum())
        .reduce(|x, y| x + y)
        .expect("the model has adapters")
}

fn freeze_lora_a(model: &mut CausalLm) {
    for layer in &mut model.layers {
        for p in Projection::ALL {
            if let Some(adapter) = layer.projection_mut(p).adapter.as_mut() {
                adapter.a = Param::from_tensor(adapter.a.val().detach()).set_require_grad(false);
            }
        }
    }
}
