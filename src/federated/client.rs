//! A federated client: its data, its personal state, local training and evaluation.

use std::collections::BTreeMap;

use burn::tensor::Device;

use crate::data::TokenizedExample;
use crate::error::{Error, Result};
use crate::federated::evaluate::evaluate_loss;
use crate::federated::local::train_local;
use crate::federated::memory::{measure_peak_rss, training_memory_estimate};
use crate::federated::protocol::{
    DeviceState, EvaluateReply, EvaluateTask, ProbeReply, ProbeTask, StageSetup, StartAdapter,
    TrainReply, TrainTask,
};
use crate::federated::stage_model::StageModel;
use crate::fusion::LayerFuser;
use crate::model::CausalLm;
use crate::params::ParamMap;

/// One participant of a run. It owns its training examples and what the aggregator keeps on
/// clients (FedSA-LoRA's `B`); the stage's model comes from its device ([`StageModel`]).
///
/// ```no_run
/// use devft::federated::protocol::{Message, StageSetup, TrainTask};
/// use devft::federated::{Client, StageModel};
/// use devft::fusion::DifferentialFuser;
/// # fn receive() -> Vec<u8> { vec![] }
/// # fn send(_: Vec<u8>) {}
/// # fn examples() -> Vec<devft::data::TokenizedExample> { vec![] }
///
/// let device = devft::device::default_device()?;
/// let base = devft::model::CausalLm::load("model-dir", &device)?
///     .with_lora(&devft::model::LoraConfig::new(8, 16.0), 0)?;
/// let setup = StageSetup::from_bytes(&receive(), usize::MAX, "server")?;
/// let mut stage = StageModel::build(&base, &setup, &DifferentialFuser::default())?;
/// let mut client = Client::new(3, examples());
/// let task = TrainTask::from_bytes(&receive(), usize::MAX, "server")?;
/// let reply = client.train(&mut stage, &task, &device.clone().autodiff())?;
/// send(devft::federated::protocol::Message::to_bytes(&reply)?);
/// # Ok::<(), devft::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    id: usize,
    examples: Vec<TokenizedExample>,
    /// The stage the personal tensors belong to, and the tensors.
    personal: Option<(usize, ParamMap)>,
}

impl Client {
    /// Client `id` holding `examples`. A client without examples fails every training task
    /// with a clear error, as a failed client of the round.
    pub fn new(id: usize, examples: Vec<TokenizedExample>) -> Self {
        Self {
            id,
            examples,
            personal: None,
        }
    }

    /// The client's id.
    pub fn id(&self) -> usize {
        self.id
    }

    /// The client's training examples.
    pub fn examples(&self) -> &[TokenizedExample] {
        &self.examples
    }

    /// The tensors kept on this client for `stage` (FedSA-LoRA's `B`), if any.
    pub fn personal(&self, stage: usize) -> Option<&ParamMap> {
        self.personal
            .as_ref()
            .filter(|(s, _)| *s == stage)
            .map(|(_, p)| p)
    }

    /// Restores [`Client::personal`] (from a checkpoint).
    pub fn set_personal(&mut self, stage: usize, tensors: ParamMap) {
        self.personal = (!tensors.is_empty()).then_some((stage, tensors));
    }

    /// What this client and its device hold, to restart from ([`Client::restore`]).
    pub fn state(&self, stage: &StageModel) -> DeviceState {
        DeviceState {
            client: self.id,
            setup: stage.setup().clone(),
            merges: stage.merges().to_vec(),
            personal: self.personal.clone(),
        }
    }

    /// Restarts client `id`, holding `examples`, from a [`Client::state`] on a device with
    /// `base` and `fuser`: the stage is rebuilt from its set-up and the merges replayed.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for the state of another client; the errors of
    /// [`StageModel::build`] and [`StageModel::sync`].
    pub fn restore(
        id: usize,
        examples: Vec<TokenizedExample>,
        state: DeviceState,
        base: &CausalLm,
        fuser: &dyn LayerFuser,
    ) -> Result<(Self, StageModel)> {
        if state.client != id {
            return Err(Error::InvalidArgument(format!(
                "the state of client {} cannot restore client {id}",
                state.client
            )));
        }
        let mut stage = StageModel::build(base, &state.setup, fuser)?;
        stage.sync(&crate::federated::protocol::MergeSync {
            first: 0,
            merges: state.merges,
        })?;
        let client = Self {
            id,
            examples,
            personal: state.personal,
        };
        Ok((client, stage))
    }

    /// Trains on the task: applies the merges the device lacks, loads the task's adapter (with
    /// the client's own personal tensors when it keeps some), runs local training on
    /// `train_device` (an autodiff device) and replies with the shared part of the adapter.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when the task belongs to another stage than `stage`; the
    /// errors of [`StageModel::sync`], [`CausalLm::load_lora_params`] and
    /// [`crate::federated::train_local`].
    pub fn train(
        &mut self,
        stage: &mut StageModel,
        task: &TrainTask,
        train_device: &Device,
    ) -> Result<TrainReply> {
        check_stage(stage, task.stage)?;
        stage.sync(&task.merges)?;
        // Tensors kept on clients start from the stage's fused values and then stay here.
        let mut received: ParamMap = stage
            .submodel()
            .lora_params()
            .into_iter()
            .filter(|(name, _)| task.instructions.keeps_on_client(name))
            .collect();
        received.extend(task.adapter.clone());
        if let Some(own) = self.personal(task.stage) {
            received.extend(own.clone());
        }
        let mut local = stage.submodel().clone();
        local.load_lora_params(&received)?;
        let (outcome, peak_rss) = measure_peak_rss(|| {
            train_local(
                &local,
                &self.examples,
                &task.local,
                &task.instructions,
                train_device,
                task.seed,
            )
        });
        let outcome = outcome?;
        let (own, shared): (ParamMap, ParamMap) = outcome
            .adapter
            .into_iter()
            .partition(|(name, _)| task.instructions.keeps_on_client(name));
        if !own.is_empty() {
            self.personal = Some((task.stage, own));
        }
        let longest = |count: fn(&TokenizedExample) -> usize| {
            task.local.batch_size * self.examples.iter().map(count).max().unwrap_or(0)
        };
        let memory = training_memory_estimate(
            &local,
            received.num_values(),
            longest(|e| e.ids.len()),
            longest(|e| e.targets.iter().filter(|&&t| t).count()),
        );
        let mut metrics = BTreeMap::from([
            ("train_loss".to_string(), outcome.mean_loss),
            ("memory_estimate_bytes".to_string(), memory as f64),
        ]);
        if let Some(peak) = peak_rss {
            metrics.insert("peak_rss_bytes".to_string(), peak as f64);
        }
        Ok(TrainReply {
            round: task.round,
            client: self.id,
            num_examples: self.examples.len(),
            metrics,
            adapter: shared,
        })
    }

    /// Evaluates the full model carrying the stage's knowledge on `examples` (the client's
    /// held-out data), on the stage model's device.
    ///
    /// # Errors
    ///
    /// As [`Client::train`], and [`crate::federated::evaluate_loss`].
    pub fn evaluate(
        &self,
        stage: &mut StageModel,
        task: &EvaluateTask,
        examples: &[TokenizedExample],
    ) -> Result<EvaluateReply> {
        check_stage(stage, task.stage)?;
        stage.sync(&task.merges)?;
        let model = stage.knowledge(&task.adapter)?;
        let loss = evaluate_loss(&model, examples, task.batch_size, task.pad_id)?;
        Ok(EvaluateReply {
            round: task.round,
            client: self.id,
            loss,
            num_targets: predicted_targets(examples),
        })
    }
}

impl Client {
    /// Answers a probe before the first stage: the loss of each candidate's fused submodel,
    /// built from `base` (the device's base model with the run's initial adapter) with
    /// `fuser`, on the client's first [`ProbeTask::max_examples`] examples (forward passes
    /// only).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when the client has no example or the task is for another
    /// fuser or initial adapter; the errors of building a candidate that does not fit `base`.
    pub fn probe(
        &self,
        base: &CausalLm,
        task: &ProbeTask,
        fuser: &dyn LayerFuser,
    ) -> Result<ProbeReply> {
        let examples = &self.examples[..task.max_examples.min(self.examples.len())];
        let losses = task
            .candidates
            .iter()
            .map(|grouping| {
                let setup = StageSetup {
                    stage: 0,
                    grouping: grouping.clone(),
                    fuser: task.fuser.clone(),
                    start: StartAdapter::Initial {
                        sha256: task.start_sha256.clone(),
                    },
                    history: Vec::new(),
                };
                let stage = StageModel::build(base, &setup, fuser)?;
                evaluate_loss(stage.submodel(), examples, task.batch_size, task.pad_id)
            })
            .collect::<Result<Vec<f64>>>()?;
        Ok(ProbeReply {
            client: self.id,
            losses,
            num_targets: predicted_targets(examples),
        })
    }
}

/// The target tokens a loss over `examples` averages: every target but one at position 0,
/// which no position predicts (as [`crate::data::Batch`] counts them).
fn predicted_targets(examples: &[TokenizedExample]) -> usize {
    examples
        .iter()
        .map(|e| e.targets.iter().skip(1).filter(|&&t| t).count())
        .sum()
}

fn check_stage(stage: &StageModel, task_stage: usize) -> Result<()> {
    if stage.stage() != task_stage {
        return Err(Error::InvalidArgument(format!(
            "the task is for stage {task_stage}, this device holds stage {}",
            stage.stage()
        )));
    }
    Ok(())
}
