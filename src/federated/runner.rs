//! The round loop.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use burn::module::Module;
use burn::tensor::Device;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::index::sample;

use crate::aggregate::{
    Aggregator, ClientUpdate, check_update, check_update_norm, is_lora_a, partial_mean,
};
use crate::data::TokenizedExample;
use crate::error::{Error, Result};
use crate::federated::checkpoint::{Checkpoint, RunShape, RunState};
use crate::federated::evaluate::evaluate_loss;
use crate::federated::faults::{Fault, FaultInjector};
use crate::federated::local::train_local;
use crate::federated::metrics::{Ledger, LedgerEntry, RoundMetrics};
use crate::federated::wire::{self, WireSize};
use crate::federated::{FederatedConfig, Strategy};
use crate::grouping::Grouping;
use crate::model::CausalLm;
use crate::params::{HostTensor, ParamMap, parse_index};
use crate::schedule::{Stage, StageOutcome, validate_plan};
use crate::transfer::{build_submodel, transfer_lora, transfer_merged_weights};

/// Prefix of the tensors a merging aggregator's clients merge, in the server's message.
const MERGE_PREFIX: &str = "merge.";

/// The result of [`FederatedRun::run`].
#[derive(Debug)]
pub struct RunOutcome {
    /// The full model carrying everything learned (adapters transferred after each stage).
    pub model: CausalLm,
    /// Metrics of every round, including rounds before a resume.
    pub metrics: Vec<RoundMetrics>,
    /// Traffic of every round and client.
    pub ledger: Ledger,
    /// Finished stages with their final losses.
    pub stages: Vec<StageOutcome>,
    /// `false` when the run stopped early ([`FederatedRun::stop_after_round`]).
    pub completed: bool,
}

/// A federated fine-tuning run: DevFT stages (or one FedIT stage), an aggregator, clients.
///
/// ```no_run
/// use devft::aggregate::FedAvg;
/// use devft::federated::{FederatedConfig, FederatedRun, LocalTrainingConfig, Strategy};
/// # fn clients() -> Vec<Vec<devft::data::TokenizedExample>> { vec![] }
/// # fn eval() -> Vec<devft::data::TokenizedExample> { vec![] }
///
/// let device = devft::device::default_device()?;
/// let model = devft::model::CausalLm::load("model-dir", &device)?
///     .with_lora(&devft::model::LoraConfig::new(8, 16.0), 0)?;
/// let config = FederatedConfig::new(40, LocalTrainingConfig::new());
/// let mut run = FederatedRun::new(config, Strategy::devft(), Box::new(FedAvg), clients(), eval())?
///     .with_metrics_file("metrics.jsonl")
///     .with_checkpoints("checkpoints");
/// let outcome = run.run(model, &device.clone().autodiff())?;
/// # Ok::<(), devft::Error>(())
/// ```
pub struct FederatedRun {
    config: FederatedConfig,
    strategy: Strategy,
    aggregator: Box<dyn Aggregator>,
    clients: Vec<Vec<TokenizedExample>>,
    eval: Vec<TokenizedExample>,
    faults: Option<Box<dyn FaultInjector>>,
    metrics_path: Option<PathBuf>,
    checkpoint_dir: Option<PathBuf>,
    stop_after_round: Option<usize>,
    progress: bool,
    label: String,
}

/// The stage being trained.
struct StageRun {
    grouping: Grouping,
    submodel: CausalLm,
    global: ParamMap,
    stage_start_lora: ParamMap,
    /// FedSA-LoRA: each client's own `lora_B` tensors, kept between rounds of the stage.
    personal: BTreeMap<usize, ParamMap>,
    /// The submodel as built at the stage's start: merging aggregators transfer the change
    /// of its projection weights since.
    fused: CausalLm,
    /// Merging aggregators (FLoRA): the last aggregate, which the next round's clients, and
    /// then the server, merge into the base weights.
    pending_merge: ParamMap,
}

fn mix(seed: u64, value: u64) -> u64 {
    let mut x = seed ^ value.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl FederatedRun {
    /// A run over `clients` (tokenised examples per client) evaluated on `eval`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when there are no clients or no evaluation examples, more
    /// clients per round than clients, `min_successful_clients` outside
    /// `1..=clients_per_round`, zero rounds, or an update bound below 1.
    pub fn new(
        config: FederatedConfig,
        strategy: Strategy,
        aggregator: Box<dyn Aggregator>,
        clients: Vec<Vec<TokenizedExample>>,
        eval: Vec<TokenizedExample>,
    ) -> Result<Self> {
        let invalid = |msg: String| Err(Error::InvalidArgument(msg));
        if clients.is_empty() || eval.is_empty() {
            return invalid("a run needs clients and evaluation examples".into());
        }
        if config.rounds == 0 {
            return invalid("a run needs at least one round".into());
        }
        if config.clients_per_round == 0 || config.clients_per_round > clients.len() {
            return invalid(format!(
                "cannot sample {} of {} clients per round",
                config.clients_per_round,
                clients.len()
            ));
        }
        if config.min_successful_clients == 0
            || config.min_successful_clients > config.clients_per_round
        {
            return invalid(format!(
                "min_successful_clients ({}) must lie in 1..={}",
                config.min_successful_clients, config.clients_per_round
            ));
        }
        if !(config.max_update_norm_factor >= 1.0 && config.max_update_factor >= 1.0) {
            return invalid(format!(
                "max_update_norm_factor ({}) and max_update_factor ({}) must be at least 1",
                config.max_update_norm_factor, config.max_update_factor
            ));
        }
        Ok(Self {
            config,
            strategy,
            aggregator,
            clients,
            eval,
            faults: None,
            metrics_path: None,
            checkpoint_dir: None,
            stop_after_round: None,
            progress: false,
            label: "run".into(),
        })
    }

    /// Injects client faults (tests, chaos drills).
    pub fn with_faults(mut self, faults: impl FaultInjector + 'static) -> Self {
        self.faults = Some(Box::new(faults));
        self
    }

    /// Appends one JSON line of [`RoundMetrics`] per round to `path`.
    pub fn with_metrics_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.metrics_path = Some(path.into());
        self
    }

    /// Checkpoints after every round under `dir`, and resumes from it when it holds one.
    pub fn with_checkpoints(mut self, dir: impl Into<PathBuf>) -> Self {
        self.checkpoint_dir = Some(dir.into());
        self
    }

    /// Stops after global round `round` (as if killed), leaving the checkpoint behind.
    pub fn stop_after_round(mut self, round: usize) -> Self {
        self.stop_after_round = Some(round);
        self
    }

    /// Shows a progress bar on stderr, labelled `label`.
    pub fn with_progress(mut self, label: impl Into<String>) -> Self {
        self.progress = true;
        self.label = label.into();
        self
    }

    fn start_stage(&mut self, model: &CausalLm, capacity: usize) -> Result<StageRun> {
        let grouping = if capacity == model.num_layers() {
            Grouping::singletons(capacity)
        } else {
            self.strategy.grouper.group(model, capacity)?
        };
        let submodel = build_submodel(model, &grouping, self.strategy.fuser.as_ref())?;
        self.aggregator.reset();
        Ok(StageRun {
            global: submodel.lora_params(),
            stage_start_lora: model.lora_params(),
            grouping,
            fused: submodel.clone(),
            submodel,
            personal: BTreeMap::new(),
            pending_merge: ParamMap::new(),
        })
    }

    fn resume_stage(&mut self, model: &mut CausalLm, checkpoint: &Checkpoint) -> Result<StageRun> {
        model.load_lora_params(&checkpoint.stage_start_lora)?;
        let grouping = checkpoint.state.grouping.clone();
        let fused = build_submodel(model, &grouping, self.strategy.fuser.as_ref())?;
        let mut submodel = fused.clone();
        if !checkpoint.submodel_weights.is_empty() {
            submodel.load_projection_weights(&checkpoint.submodel_weights)?;
        }
        submodel.load_lora_params(&checkpoint.global)?;
        self.aggregator.load_state(&checkpoint.aggregator)?;
        Ok(StageRun {
            global: checkpoint.global.clone(),
            stage_start_lora: checkpoint.stage_start_lora.clone(),
            grouping,
            fused,
            submodel,
            personal: split_personal(&checkpoint.personal, &checkpoint.global, self.clients.len())?,
            pending_merge: checkpoint.pending_merge.clone(),
        })
    }

    /// Runs (or resumes) the whole schedule. `model` is the full model with LoRA attached, on
    /// an inference device; clients train on `train_device` (an autodiff device).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when the model has no adapter or the plan is invalid, a
    /// checkpoint that belongs to another run, and I/O errors of metrics and checkpoints.
    /// Client failures are not errors: they are recorded in the metrics.
    pub fn run(&mut self, mut model: CausalLm, train_device: &Device) -> Result<RunOutcome> {
        if model.lora_config().is_none() {
            return Err(Error::InvalidArgument(
                "the model needs a LoRA adapter to train".into(),
            ));
        }
        let num_layers = model.num_layers();
        let shape = RunShape {
            seed: self.config.seed,
            num_clients: self.clients.len(),
            num_layers,
            rounds: self.config.rounds,
        };
        let resumed = match &self.checkpoint_dir {
            Some(dir) => Checkpoint::load_latest(dir, shape)?,
            None => None,
        };
        let (mut state, mut stage_run) = match resumed {
            Some(checkpoint) => {
                if !checkpoint.model_weights.is_empty() {
                    model.load_projection_weights(&checkpoint.model_weights)?;
                }
                let stage_run = if checkpoint.state.rounds_done_in_stage == 0 {
                    // Stopped between stages: the next stage starts afresh from the full model.
                    model.load_lora_params(&checkpoint.stage_start_lora)?;
                    None
                } else {
                    Some(self.resume_stage(&mut model, &checkpoint)?)
                };
                (checkpoint.state, stage_run)
            }
            None => {
                let plan = self
                    .strategy
                    .scheduler
                    .plan(num_layers, self.config.rounds)?;
                validate_plan(&plan, num_layers, self.config.rounds)?;
                let state = RunState {
                    seed: self.config.seed,
                    num_clients: self.clients.len(),
                    plan,
                    stage: 0,
                    rounds_done_in_stage: 0,
                    rounds_done: 0,
                    grouping: Grouping::singletons(num_layers),
                    metrics: Vec::new(),
                    ledger: Ledger::default(),
                    stage_outcomes: Vec::new(),
                };
                (state, None)
            }
        };
        let progress = self.progress_bar(&state);
        // One round per iteration: `rounds_done` grows by one each time and the plan (checked
        // to add up to the budget) ends the loop after `config.rounds` rounds at most.
        while state.stage < state.plan.len() {
            if state.rounds_done >= self.config.rounds {
                return Err(Error::InvalidArgument(format!(
                    "the plan asks for more than the run's {} rounds",
                    self.config.rounds
                )));
            }
            let stage = state.plan[state.stage];
            let setup_started = Instant::now();
            let mut current = match stage_run.take() {
                Some(run) => run,
                None => self.start_stage(&model, stage.capacity)?,
            };
            // Grouping and fusion count towards the stage's first round.
            let setup_seconds = setup_started.elapsed().as_secs_f64();
            state.grouping = current.grouping.clone();
            let metrics = self.round(
                &model,
                &mut current,
                &mut state,
                stage,
                train_device,
                setup_seconds,
            )?;
            if let Some(bar) = &progress {
                bar.set_message(format!(
                    "stage {} (K={}) eval {:.4}",
                    state.stage + 1,
                    stage.capacity,
                    metrics.eval_loss.unwrap_or(f64::NAN)
                ));
                bar.inc(1);
            }
            self.write_metrics(&metrics)?;
            state.metrics.push(metrics);
            state.rounds_done_in_stage += 1;
            state.rounds_done += 1;
            let stage_finished = state.rounds_done_in_stage >= stage.rounds;
            if stage_finished {
                self.finish_stage(&mut model, &current, &mut state, stage)?;
            }
            if let Some(dir) = &self.checkpoint_dir {
                self.checkpoint(&model, &current, &state, stage_finished)
                    .save(dir)?;
            }
            if !stage_finished {
                stage_run = Some(current);
            }
            if self.stop_after_round == Some(state.rounds_done) {
                return Ok(RunOutcome {
                    model,
                    metrics: state.metrics,
                    ledger: state.ledger,
                    stages: state.stage_outcomes,
                    completed: false,
                });
            }
        }
        if let Some(bar) = progress {
            bar.finish();
        }
        Ok(RunOutcome {
            model,
            metrics: state.metrics,
            ledger: state.ledger,
            stages: state.stage_outcomes,
            completed: true,
        })
    }

    /// The checkpoint after a round; `stage_finished` when the round ended its stage (the
    /// stage's adapters are then in `model`, and nothing of the stage needs keeping).
    fn checkpoint(
        &self,
        model: &CausalLm,
        current: &StageRun,
        state: &RunState,
        stage_finished: bool,
    ) -> Checkpoint {
        let mid_stage = |map: ParamMap| if stage_finished { ParamMap::new() } else { map };
        let merges = self.aggregator.merges_into_base();
        let weights = |keep: bool, model: &CausalLm| {
            if keep {
                model.projection_weights()
            } else {
                ParamMap::new()
            }
        };
        Checkpoint {
            state: state.clone(),
            stage_start_lora: if stage_finished {
                model.lora_params()
            } else {
                current.stage_start_lora.clone()
            },
            global: mid_stage(current.global.clone()),
            aggregator: self.aggregator.state(),
            personal: mid_stage(join_personal(&current.personal)),
            model_weights: weights(merges, model),
            submodel_weights: weights(merges && !stage_finished, &current.submodel),
            pending_merge: mid_stage(current.pending_merge.clone()),
        }
    }

    fn finish_stage(
        &mut self,
        model: &mut CausalLm,
        current: &StageRun,
        state: &mut RunState,
        stage: Stage,
    ) -> Result<()> {
        self.transfer(model, current)?;
        let last = state.metrics.last();
        state.stage_outcomes.push(StageOutcome {
            stage,
            eval_loss: last.and_then(|m| m.eval_loss),
            train_loss: last.and_then(|m| m.train_loss),
        });
        state.stage += 1;
        state.rounds_done_in_stage = 0;
        if state.stage < state.plan.len() {
            let remaining = self
                .strategy
                .scheduler
                .revise(&state.stage_outcomes, state.plan[state.stage..].to_vec());
            let mut plan = state.plan[..state.stage].to_vec();
            plan.extend(remaining);
            validate_plan(&plan, model.num_layers(), self.config.rounds)?;
            state.plan = plan;
        }
        Ok(())
    }

    fn round(
        &mut self,
        model: &CausalLm,
        current: &mut StageRun,
        state: &mut RunState,
        stage: Stage,
        train_device: &Device,
        setup_seconds: f64,
    ) -> Result<RoundMetrics> {
        let started = Instant::now();
        let round = state.rounds_done + 1;
        let round_seed = mix(self.config.seed, round as u64);
        let mut rng = StdRng::seed_from_u64(round_seed);
        let mut sampled: Vec<usize> =
            sample(&mut rng, self.clients.len(), self.config.clients_per_round).into_vec();
        sampled.sort_unstable();
        let mut message = current.global.clone();
        for (name, tensor) in current.pending_merge.iter() {
            message.insert(format!("{MERGE_PREFIX}{name}"), tensor.clone());
        }
        let (down_bytes, down_size) = wire::encode(&message)?;
        let max_bytes = ((down_bytes.len() as f64) * self.config.max_update_factor).ceil() as usize;
        let instructions = self.aggregator.client_instructions();
        let mut updates = Vec::new();
        let mut kept = Vec::new();
        let mut failed = Vec::new();
        let mut losses = Vec::new();
        for &client in &sampled {
            let fault = self.faults.as_ref().and_then(|f| f.fault(round, client));
            let mut up_size = WireSize::default();
            let reply = match &fault {
                Some(Fault::Error(reason)) => Err(reason.clone()),
                Some(Fault::DropOut) => Err("dropped out".to_string()),
                _ => self
                    .client_round(
                        current,
                        client,
                        &down_bytes,
                        &instructions,
                        train_device,
                        mix(round_seed, client as u64),
                    )
                    .map_err(|e| e.to_string()),
            };
            let reply = reply.and_then(|(adapter, loss)| {
                let adapter = if instructions.personal_lora_b {
                    let (shared, own): (ParamMap, ParamMap) =
                        adapter.into_iter().partition(|(name, _)| is_lora_a(name));
                    kept.push((client, own));
                    shared
                } else {
                    adapter
                };
                let (mut bytes, size) = wire::encode(&adapter).map_err(|e| e.to_string())?;
                corrupt(&mut bytes, fault.as_ref(), max_bytes);
                up_size = WireSize {
                    payload: size.payload,
                    total: bytes.len() as u64,
                };
                let mut params = wire::decode(&bytes, max_bytes, &format!("client {client}"))
                    .map_err(|e| e.to_string())?;
                if instructions.personal_lora_b {
                    // Only A travelled; the update's B is the global one, left as it is.
                    for (name, tensor) in current.global.iter().filter(|(n, _)| !is_lora_a(n)) {
                        params.insert(name, tensor.clone());
                    }
                }
                let update = ClientUpdate {
                    client,
                    params,
                    num_examples: self.clients[client].len(),
                    metrics: BTreeMap::from([("train_loss".to_string(), loss)]),
                };
                check_update(&current.global, &update).map_err(|e| e.to_string())?;
                check_update_norm(&current.global, &update, self.config.max_update_norm_factor)
                    .map_err(|e| e.to_string())?;
                Ok(update)
            });
            state.ledger.entries.push(LedgerEntry {
                round,
                client,
                up: up_size,
                down: down_size,
            });
            match reply {
                Ok(update) => {
                    losses.push((update.metrics["train_loss"], update.num_examples as f64));
                    updates.push(update);
                }
                Err(reason) => {
                    eprintln!("round {round}: client {client} failed: {reason}");
                    failed.push((client, reason));
                }
            }
        }
        current.personal.extend(kept);
        if !current.pending_merge.is_empty() {
            // The server merges what it sent, as the clients did.
            let pending = std::mem::take(&mut current.pending_merge);
            current.submodel.merge_adapter(&pending)?;
        }
        let aggregated = updates.len() >= self.config.min_successful_clients;
        if aggregated {
            let aggregate = self.aggregator.aggregate(&current.global, &updates)?;
            if self.aggregator.merges_into_base() {
                current.pending_merge = aggregate;
                current.global = fresh_adapter(&current.submodel, mix(round_seed, u64::MAX))?;
            } else {
                current.global = aggregate;
            }
            current.submodel.load_lora_params(&current.global)?;
        } else {
            eprintln!(
                "round {round}: {} of {} clients succeeded, fewer than {}; the global adapter is unchanged",
                updates.len(),
                sampled.len(),
                self.config.min_successful_clients
            );
        }
        let eval_started = Instant::now();
        let mut eval_model = model.clone();
        self.transfer(&mut eval_model, current)?;
        let eval_loss = evaluate_loss(
            &eval_model,
            &self.eval,
            self.config.eval_batch_size,
            self.config.local.pad_id,
        )?;
        let weight: f64 = losses.iter().map(|(_, w)| w).sum();
        let (bytes_up, bytes_down) = state.ledger.round_totals(round);
        Ok(RoundMetrics {
            stage: state.stage,
            capacity: stage.capacity,
            round,
            clients_sampled: sampled,
            clients_failed: failed,
            train_loss: (weight > 0.0)
                .then(|| losses.iter().map(|(l, w)| l * w).sum::<f64>() / weight),
            eval_loss: Some(eval_loss),
            bytes_up,
            bytes_down,
            wall_seconds: setup_seconds + started.elapsed().as_secs_f64(),
            eval_seconds: eval_started.elapsed().as_secs_f64(),
            memory_bytes: self.memory_estimate(current),
            aggregated,
        })
    }

    /// One client's work: decode the global adapter, train locally, return the adapter.
    fn client_round(
        &self,
        current: &StageRun,
        client: usize,
        down_bytes: &[u8],
        instructions: &crate::aggregate::ClientInstructions,
        train_device: &Device,
        seed: u64,
    ) -> Result<(ParamMap, f64)> {
        let (merge, mut received): (ParamMap, ParamMap) =
            wire::decode(down_bytes, usize::MAX, "server")?
                .into_iter()
                .partition(|(name, _)| name.starts_with(MERGE_PREFIX));
        if instructions.personal_lora_b
            && let Some(own) = current.personal.get(&client)
        {
            received.extend(own.clone());
        }
        let mut local = current.submodel.clone();
        if !merge.is_empty() {
            local.merge_adapter(&merge.renamed(|name| name[MERGE_PREFIX.len()..].to_string()))?;
        }
        local.load_lora_params(&received)?;
        let outcome = train_local(
            &local,
            &self.clients[client],
            &self.config.local,
            instructions,
            train_device,
            seed,
        )?;
        Ok((outcome.adapter, outcome.mean_loss))
    }

    /// The submodel whose adapter is evaluated and transferred: the global adapter, with
    /// FedSA-LoRA's personal `B`s replaced by their example-weighted mean.
    /// With a merging aggregator, the last aggregate is merged into it.
    fn evaluated_submodel(&self, current: &StageRun) -> Result<CausalLm> {
        let mut submodel = current.submodel.clone();
        if !current.pending_merge.is_empty() {
            submodel.merge_adapter(&current.pending_merge)?;
        }
        if current.personal.is_empty() {
            return Ok(submodel);
        }
        let updates: Vec<ClientUpdate> = current
            .personal
            .iter()
            .map(|(&client, own)| {
                let mut params = current.global.clone();
                params.extend(own.clone());
                ClientUpdate {
                    client,
                    params,
                    num_examples: self.clients[client].len(),
                    metrics: BTreeMap::new(),
                }
            })
            .collect();
        submodel.load_lora_params(&partial_mean(&current.global, &updates, |n| !is_lora_a(n))?)?;
        Ok(submodel)
    }

    /// Carries the stage's knowledge into `model`: adapters, and merged weights when the
    /// aggregator merges.
    fn transfer(&self, model: &mut CausalLm, current: &StageRun) -> Result<()> {
        let evaluated = self.evaluated_submodel(current)?;
        transfer_lora(model, &evaluated, &current.grouping)?;
        if self.aggregator.merges_into_base() {
            transfer_merged_weights(model, &current.fused, &evaluated, &current.grouping)?;
        }
        Ok(())
    }

    /// Parameters, plus gradients and two AdamW moments of the trainable values, plus an
    /// activation estimate for one batch (12 hidden-sized values per token and layer, and the
    /// logits of the target positions twice), in bytes of f32.
    fn memory_estimate(&self, current: &StageRun) -> u64 {
        let submodel = &current.submodel;
        let config = submodel.config();
        // Counted from shapes: no tensor is read back to the host for this.
        let trainable = current.global.num_values() as u64;
        let parameters = submodel.num_params() as u64;
        let longest = |count: fn(&TokenizedExample) -> usize| {
            let most = self.clients.iter().flatten().map(count).max().unwrap_or(0);
            (self.config.local.batch_size * most) as u64
        };
        let tokens = longest(|e| e.ids.len());
        let targets = longest(|e| e.targets.iter().filter(|&&t| t).count());
        let activations = tokens * 12 * config.hidden_size as u64 * config.num_layers as u64
            + targets * 2 * config.vocab_size as u64;
        4 * (parameters + 3 * trainable + activations)
    }

    fn write_metrics(&self, metrics: &RoundMetrics) -> Result<()> {
        let Some(path) = &self.metrics_path else {
            return Ok(());
        };
        let line = serde_json::to_string(metrics).map_err(|e| Error::json(path, e))?;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        writeln!(file, "{line}").map_err(|e| Error::io(path, e))
    }

    fn progress_bar(&self, state: &RunState) -> Option<indicatif::ProgressBar> {
        if !self.progress {
            return None;
        }
        let bar = indicatif::ProgressBar::new(self.config.rounds as u64);
        bar.set_position(state.rounds_done as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} rounds {elapsed_precise} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(self.label.clone());
        Some(bar)
    }
}

/// A fresh adapter for `submodel` (`A` random, `B = 0`), as every round of a merging
/// aggregator starts from.
fn fresh_adapter(submodel: &CausalLm, seed: u64) -> Result<ParamMap> {
    let config = submodel
        .lora_config()
        .cloned()
        .ok_or_else(|| Error::InvalidArgument("the submodel has no adapter".into()))?;
    Ok(submodel.clone().with_lora(&config, seed)?.lora_params())
}

/// Personal tensors of all clients in one map, named `client.{id}.{name}`.
fn join_personal(personal: &BTreeMap<usize, ParamMap>) -> ParamMap {
    personal
        .iter()
        .flat_map(|(client, own)| {
            own.iter()
                .map(move |(name, t)| (format!("client.{client}.{name}"), t.clone()))
        })
        .collect()
}

/// The inverse of [`join_personal`], checked: every client exists and every tensor is one of
/// the global adapter's `lora_B` tensors, with its shape.
fn split_personal(
    joined: &ParamMap,
    global: &ParamMap,
    num_clients: usize,
) -> Result<BTreeMap<usize, ParamMap>> {
    let mut personal: BTreeMap<usize, ParamMap> = BTreeMap::new();
    for (name, tensor) in joined.iter() {
        let parsed = name
            .strip_prefix("client.")
            .and_then(|rest| rest.split_once('.'))
            .and_then(|(id, inner)| Some((parse_index(id)?, inner)))
            .filter(|(client, inner)| *client < num_clients && !is_lora_a(inner));
        let Some((client, inner)) = parsed else {
            return Err(Error::UnexpectedTensor {
                name: name.to_string(),
            });
        };
        let expected = global.get(inner).ok_or_else(|| Error::UnexpectedTensor {
            name: name.to_string(),
        })?;
        if expected.shape() != tensor.shape() {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: expected.shape().to_vec(),
                found: tensor.shape().to_vec(),
            });
        }
        if !tensor.is_finite() {
            return Err(Error::NonFinite {
                name: name.to_string(),
            });
        }
        personal
            .entry(client)
            .or_default()
            .insert(inner, tensor.clone());
    }
    Ok(personal)
}

/// Applies an injected message fault to the bytes a client sends.
fn corrupt(bytes: &mut Vec<u8>, fault: Option<&Fault>, max_bytes: usize) {
    // `poison(i, values)` edits the values of the `i`-th tensor (in name order).
    let rewrite = |bytes: &mut Vec<u8>, poison: &dyn Fn(usize, &mut [f32])| {
        if let Ok(params) = ParamMap::from_safetensors_bytes(bytes, "fault") {
            let poisoned: ParamMap = params
                .into_iter()
                .enumerate()
                .map(|(i, (name, mut tensor)): (usize, (String, HostTensor))| {
                    poison(i, tensor.values_mut());
                    (name, tensor)
                })
                .collect();
            if let Ok(b) = poisoned.to_safetensors_bytes() {
                *bytes = b;
            }
        }
    };
    match fault {
        Some(Fault::TruncatedUpdate) => bytes.truncate(bytes.len() / 2),
        Some(Fault::OversizedUpdate) => bytes.resize(max_bytes + 1, 0),
        Some(Fault::NanUpdate) => rewrite(bytes, &|i, values| {
            if let (0, Some(first)) = (i, values.first_mut()) {
                *first = f32::NAN;
            }
        }),
        Some(Fault::HugeUpdate) => rewrite(bytes, &|_, values| values.fill(3e38)),
        _ => {}
    }
}
