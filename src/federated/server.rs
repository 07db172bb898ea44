//! The DevFT server: the stage plan, grouping and fusion at a stage's start, the global
//! adapter, the aggregator, and the transfer at a stage's end, one round at a time.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::index::sample;

use crate::aggregate::{
    Aggregator, ClientInstructions, ClientUpdate, check_update, check_update_norm, partial_mean,
};
use crate::error::{Error, Result};
use crate::federated::checkpoint::{Checkpoint, RunShape, RunState};
use crate::federated::memory::training_memory_estimate;
use crate::federated::metrics::WireSize;
use crate::federated::metrics::{Ledger, LedgerEntry, RoundMetrics};
use crate::federated::protocol::{
    EvaluateReply, EvaluateTask, MergeSync, MergedStage, Message, StageSetup, TrainReply, TrainTask,
};
use crate::federated::stage_model::{StageModel, compact_start, full_model};
use crate::federated::{FederatedConfig, Strategy};
use crate::grouping::Grouping;
use crate::model::CausalLm;
use crate::params::{ParamMap, parse_index};
use crate::schedule::{Stage, StageOutcome, StageProgress, validate_plan};

mod probe;

/// The server of a run. One round is two steps: [`Server::configure_round`] gives the sampled
/// clients their messages; [`Server::aggregate_round`] takes their replies (or why there is
/// none) and aggregates; after an optional evaluation, [`Server::finish_round`] closes the
/// round and, at a stage's end, transfers the stage's knowledge to the full model and plans
/// the next stage.
///
/// The server never sees client data: example counts and losses come in the replies. Its
/// state is checkpointed by [`Server::save_checkpoint`] and restored by [`Server::restore`].
///
/// A server and two clients, each client on its own device, every message through bytes:
///
/// ```
/// use devft::aggregate::FedAvg;
/// use devft::data::{ByteEncoder, load_alpaca, partition_iid, tokenize_examples};
/// use devft::federated::protocol::{Message, StageSetup, TrainTask};
/// use devft::federated::{
///     Client, FederatedConfig, LocalTrainingConfig, Server, StageModel, Strategy,
/// };
/// use devft::fusion::DifferentialFuser;
/// use devft::model::{CausalLm, LoraConfig};
/// use devft::tokenizer::PromptTemplate;
///
/// let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
/// let device = devft::device::default_device()?;
/// let base = CausalLm::load(format!("{fixtures}/tiny-llama"), &device)?
///     .with_lora(&LoraConfig::new(4, 8.0), 0)?;
/// let data = load_alpaca(format!("{fixtures}/data/tiny_instructions.jsonl"), PromptTemplate::Alpaca)?;
/// let examples = tokenize_examples(&data, &ByteEncoder, 64)?;
/// let mut clients: Vec<Client> = partition_iid(examples.len(), 2, 0)?
///     .into_iter()
///     .enumerate()
///     .map(|(id, part)| Client::new(id, part.iter().map(|&i| examples[i].clone()).collect()))
///     .collect();
/// let mut stages: Vec<Option<StageModel>> = vec![None, None]; // each client's device
///
/// let local = LocalTrainingConfig::new().with_local_steps(1);
/// let config = FederatedConfig::new(2, local).with_clients_per_round(2);
/// let mut server = Server::new(config, Strategy::fedit(), Box::new(FedAvg), base.clone(), 2)?;
/// while !server.is_finished() {
///     let round = server.configure_round()?;
///     let mut replies = Vec::new();
///     for task in &round.tasks {
///         // On the client's machine:
///         let stage = &mut stages[task.client];
///         if let Some(bytes) = &task.setup {
///             let setup = StageSetup::from_bytes(bytes, usize::MAX, "server")?;
///             *stage = Some(StageModel::build(&base, &setup, &DifferentialFuser::default())?);
///         }
///         let work = TrainTask::from_bytes(&task.task, usize::MAX, "server")?;
///         let stage = stage.as_mut().expect("the first task of a stage brings its set-up");
///         let reply = clients[task.client].train(stage, &work, &device.clone().autodiff())?;
///         replies.push((task.client, Ok(reply.to_bytes()?)));
///     }
///     server.aggregate_round(replies)?;
///     let metrics = server.finish_round(None, &[])?;
///     assert!(metrics.aggregated && metrics.train_loss.is_some());
/// }
/// assert_ne!(server.model()?.lora_params(), base.lora_params());
/// # Ok::<(), devft::Error>(())
/// ```
pub struct Server {
    config: FederatedConfig,
    strategy: Strategy,
    aggregator: Box<dyn Aggregator>,
    base: CausalLm,
    state: RunState,
    /// The full model's adapter at the current stage's start.
    full_adapter: ParamMap,
    /// Merges of finished stages (merging aggregators).
    history: Vec<MergedStage>,
    current: Option<ServerStage>,
    pending: Option<PendingRound>,
    /// The probe's candidates, its cost so far and when its tasks went out.
    probe_sent: Option<(Vec<Grouping>, ProbeCost, Instant)>,
    /// The finished probe's cost, for the first round's metrics.
    probe_cost: Option<ProbeCost>,
    /// A scheduling decision for the next finished round's metrics.
    schedule_note: Option<String>,
    /// The memory budget each client declared, in bytes (`None`: no limit).
    memory_budgets: Vec<Option<u64>>,
}

/// Bytes and seconds of the probe before the first stage.
#[derive(Debug, Clone, Copy, Default)]
struct ProbeCost {
    up: WireSize,
    down: WireSize,
    seconds: f64,
}

/// The stage being trained, as the server holds it.
struct ServerStage {
    setup: StageSetup,
    /// The set-up as sent, encoded once for the stage, and its size.
    setup_bytes: Vec<u8>,
    setup_size: WireSize,
    model: StageModel,
    global: ParamMap,
    /// Clients that hold this stage's set-up, with the number of its merges they were sent.
    synced: BTreeMap<usize, usize>,
    /// Training memory of the stage's submodel for a client with the run's longest examples
    /// ([`training_memory_estimate`]).
    memory_estimate: u64,
}

impl ServerStage {
    /// What `client` is sent besides its task, and marks it as holding the stage with every
    /// merge so far: the set-up (with its size) when it does not hold the stage yet, and the
    /// merges it was not sent.
    fn sync(&mut self, client: usize) -> (Option<Vec<u8>>, WireSize, MergeSync) {
        let first = self.synced.insert(client, self.model.merges().len());
        let merges = MergeSync {
            first: first.unwrap_or(0),
            merges: self.model.merges()[first.unwrap_or(0)..].to_vec(),
        };
        match first {
            Some(_) => (None, WireSize::default(), merges),
            None => (Some(self.setup_bytes.clone()), self.setup_size, merges),
        }
    }
}

/// A round between its two steps.
struct PendingRound {
    round: usize,
    sampled: Vec<usize>,
    started: Instant,
    setup_seconds: f64,
    /// Per sampled client: set-up and task sizes, and the largest reply accepted.
    sent: BTreeMap<usize, (WireSize, WireSize, usize)>,
    /// Clients left out of sampling, with the reason.
    excluded: Vec<(usize, String)>,
    /// Filled by [`Server::aggregate_round`].
    metrics: Option<RoundMetrics>,
}

/// The messages of one round.
#[derive(Debug, Clone)]
pub struct RoundTasks {
    /// Global round (1-based).
    pub round: usize,
    /// Stage index.
    pub stage: usize,
    /// Layers of the stage's submodel.
    pub capacity: usize,
    /// One entry per sampled client, in client order.
    pub tasks: Vec<ClientTask>,
}

/// What one sampled client is sent.
#[derive(Debug, Clone)]
pub struct ClientTask {
    /// The client.
    pub client: usize,
    /// A [`StageSetup`] message, when the client does not hold the stage yet.
    pub setup: Option<Vec<u8>>,
    /// The task: a [`TrainTask`] or an [`EvaluateTask`] message.
    pub task: Vec<u8>,
    /// The largest reply the server accepts from this client, in bytes.
    pub max_reply_bytes: usize,
}

/// Each client's tensors kept on the client (FedSA-LoRA's `B`), by client id.
pub type PersonalState = BTreeMap<usize, ParamMap>;

/// A held-out evaluation of a round, for [`Server::finish_round`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    /// The loss.
    pub loss: f64,
    /// Seconds it took.
    pub seconds: f64,
}

/// The clients whose memory budget fits `estimate`, and the others with the reason.
fn eligible_clients(budgets: &[Option<u64>], estimate: u64) -> (Vec<usize>, Vec<(usize, String)>) {
    let mut eligible = Vec::with_capacity(budgets.len());
    let mut excluded = Vec::new();
    for (client, budget) in budgets.iter().enumerate() {
        match budget {
            Some(budget) if *budget < estimate => excluded.push((
                client,
                format!(
                    "memory budget {} < the stage's estimate {}",
                    format_bytes(*budget),
                    format_bytes(estimate)
                ),
            )),
            _ => eligible.push(client),
        }
    }
    (eligible, excluded)
}

/// Bytes in MiB, for messages.
fn format_bytes(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / f64::from(1 << 20))
}

/// SplitMix-style mixing of a seed with a value: the run's seeds derive from its seed, the
/// round and the client, so there is no other random state to checkpoint.
pub(crate) fn mix(seed: u64, value: u64) -> u64 {
    let mut x = seed ^ value.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Checks a run's settings against its number of clients.
///
/// # Errors
///
/// [`Error::InvalidArgument`] when there are no clients, zero rounds, more clients per round
/// than clients, `min_successful_clients` outside `1..=clients_per_round`, or an update bound
/// below 1.
pub(crate) fn validate_config(config: &FederatedConfig, num_clients: usize) -> Result<()> {
    let invalid = |msg: String| Err(Error::InvalidArgument(msg));
    if num_clients == 0 {
        return invalid("a run needs clients".into());
    }
    if config.rounds == 0 {
        return invalid("a run needs at least one round".into());
    }
    if config.clients_per_round == 0 || config.clients_per_round > num_clients {
        return invalid(format!(
            "cannot sample {} of {num_clients} clients per round",
            config.clients_per_round
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
    Ok(())
}

impl Server {
    /// A server for a run over `num_clients` clients, starting from `model` (the full model
    /// with its LoRA adapter attached; the clients start from the same base). Plans the
    /// stages.
    ///
    /// # Errors
    ///
    /// The errors of the settings' validation ([`Error::InvalidArgument`]), an adapter-less
    /// model, and an invalid plan.
    pub fn new(
        config: FederatedConfig,
        strategy: Strategy,
        aggregator: Box<dyn Aggregator>,
        model: CausalLm,
        num_clients: usize,
    ) -> Result<Self> {
        validate_config(&config, num_clients)?;
        if model.lora_config().is_none() {
            return Err(Error::InvalidArgument(
                "the model has no LoRA adapter; attach one with `with_lora`".into(),
            ));
        }
        if config.stateless_clients && aggregator.client_instructions().keeps_any() {
            return Err(Error::InvalidArgument(format!(
                "{} keeps tensors on clients, which stateless clients cannot",
                aggregator.name()
            )));
        }
        let num_layers = model.num_layers();
        let plan = strategy.scheduler.plan(num_layers, config.rounds)?;
        validate_plan(&plan, num_layers, config.rounds)?;
        let state = RunState {
            seed: config.seed,
            num_clients,
            plan,
            stage: 0,
            rounds_done_in_stage: 0,
            rounds_done: 0,
            grouping: Grouping::singletons(num_layers),
            metrics: Vec::new(),
            ledger: Ledger::default(),
            stage_outcomes: Vec::new(),
            history: Vec::new(),
            merges_in_stage: 0,
            synced: BTreeMap::new(),
            probe: None,
        };
        Ok(Self {
            full_adapter: model.lora_params(),
            config,
            strategy,
            aggregator,
            base: model,
            state,
            history: Vec::new(),
            current: None,
            pending: None,
            probe_sent: None,
            probe_cost: None,
            schedule_note: None,
            memory_budgets: vec![None; num_clients],
        })
    }

    /// Records the training memory `client` declared it has, in bytes (`None`: no limit).
    /// From the next round on, [`Server::configure_round`] samples the client only for stages
    /// whose memory estimate ([`training_memory_estimate`] for a batch of
    /// [`FederatedConfig::max_example_tokens`]-token examples) fits the budget; the round's
    /// metrics list the clients left out and why.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a client id outside the run.
    pub fn declare_memory_budget(&mut self, client: usize, bytes: Option<u64>) -> Result<()> {
        let num_clients = self.memory_budgets.len();
        let budget = self.memory_budgets.get_mut(client).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "client {client} declared a memory budget, but the run has {num_clients} clients"
            ))
        })?;
        *budget = bytes;
        Ok(())
    }

    /// The current stage's training memory estimate per client, in bytes (after
    /// [`Server::configure_round`] started the stage).
    pub fn stage_memory_estimate(&self) -> Option<u64> {
        self.current.as_ref().map(|c| c.memory_estimate)
    }

    /// Whether every stage of the plan is done.
    pub fn is_finished(&self) -> bool {
        self.state.stage >= self.state.plan.len()
    }

    /// Global rounds done.
    pub fn rounds_done(&self) -> usize {
        self.state.rounds_done
    }

    /// Metrics of every round so far.
    pub fn metrics(&self) -> &[RoundMetrics] {
        &self.state.metrics
    }

    /// Traffic so far.
    pub fn ledger(&self) -> &Ledger {
        &self.state.ledger
    }

    /// Finished stages with their final losses.
    pub fn stage_outcomes(&self) -> &[StageOutcome] {
        &self.state.stage_outcomes
    }

    /// The stage plan, as revised so far.
    pub fn plan(&self) -> &[Stage] {
        &self.state.plan
    }

    /// Index of the current stage (the plan's length once finished).
    pub fn stage(&self) -> usize {
        self.state.stage
    }

    /// How the run develops the model.
    pub fn strategy(&self) -> &Strategy {
        &self.strategy
    }

    /// The server's own copy of the current stage (with every merge made so far).
    pub fn stage_model(&self) -> Option<&StageModel> {
        self.current.as_ref().map(|c| &c.model)
    }

    /// The current stage's set-up message (after [`Server::configure_round`] started it),
    /// e.g. for a client that lost its state.
    pub fn stage_setup(&self) -> Option<&StageSetup> {
        self.current.as_ref().map(|c| &c.setup)
    }

    /// The full model carrying everything learned so far: the adapters transferred at the
    /// end of each finished stage (and their merged weights).
    ///
    /// # Errors
    ///
    /// As [`full_model`].
    pub fn model(&self) -> Result<CausalLm> {
        full_model(&self.base, &self.history, &self.full_adapter)
    }

    /// Starts the next round: starts the stage if needed (grouping and fusion), samples the
    /// clients (among those whose declared memory budget fits the stage) and encodes their
    /// messages.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when the run is finished, a round is already open, or fewer
    /// clients than [`FederatedConfig::min_successful_clients`] have the memory the stage
    /// needs; the errors of grouping, fusion and encoding.
    pub fn configure_round(&mut self) -> Result<RoundTasks> {
        if self.is_finished() {
            return Err(Error::InvalidArgument("the run is finished".into()));
        }
        if self.pending.is_some() {
            return Err(Error::InvalidArgument(
                "the previous round is still open; finish it first".into(),
            ));
        }
        if self.state.rounds_done >= self.config.rounds {
            return Err(Error::InvalidArgument(format!(
                "the plan asks for more than the run's {} rounds",
                self.config.rounds
            )));
        }
        let setup_started = Instant::now();
        if self.current.is_none() {
            self.current = Some(self.start_stage()?);
        }
        let setup_seconds = setup_started.elapsed().as_secs_f64();
        let started = Instant::now();
        let round = self.state.rounds_done + 1;
        let round_seed = mix(self.config.seed, round as u64);
        let mut rng = StdRng::seed_from_u64(round_seed);
        let current = self.current.as_mut().expect("started above");
        let (eligible, excluded) = eligible_clients(&self.memory_budgets, current.memory_estimate);
        if eligible.len() < self.config.min_successful_clients {
            return Err(Error::InvalidArgument(format!(
                "stage {} needs about {} of memory per client; {} client(s) declared that much, \
                 fewer than min_successful_clients ({})",
                self.state.stage + 1,
                format_bytes(current.memory_estimate),
                eligible.len(),
                self.config.min_successful_clients
            )));
        }
        let count = self.config.clients_per_round.min(eligible.len());
        let mut sampled: Vec<usize> = sample(&mut rng, eligible.len(), count)
            .into_iter()
            .map(|i| eligible[i])
            .collect();
        sampled.sort_unstable();
        let instructions = self.aggregator.client_instructions();
        let mut tasks = Vec::with_capacity(sampled.len());
        let mut sent = BTreeMap::new();
        for &client in &sampled {
            let (setup, setup_size, merges) = current.sync(client);
            let task = TrainTask {
                round,
                stage: self.state.stage,
                seed: mix(round_seed, client as u64),
                instructions: instructions.clone(),
                local: self.config.local.clone(),
                adapter: shared_part(&current.global, &instructions, false),
                merges,
            };
            let train = task.to_bytes()?;
            let max_reply_bytes = (train.len() as f64 * self.config.max_update_factor).ceil();
            let down = WireSize {
                payload: 4 * task.num_values() as u64,
                total: train.len() as u64,
            };
            sent.insert(client, (setup_size, down, max_reply_bytes as usize));
            tasks.push(ClientTask {
                client,
                setup,
                task: train,
                max_reply_bytes: max_reply_bytes as usize,
            });
        }
        self.pending = Some(PendingRound {
            round,
            sampled,
            started,
            setup_seconds,
            sent,
            excluded,
            metrics: None,
        });
        Ok(RoundTasks {
            round,
            stage: self.state.stage,
            capacity: self.state.plan[self.state.stage].capacity,
            tasks,
        })
    }

    /// Takes the round's replies: `(client, Ok(reply bytes))`, or `(client, Err(reason))` for a
    /// client that failed or never answered. Each reply is decoded under its size bound and
    /// checked; a bad one is a failed client. With enough valid updates the aggregator
    /// computes the new global adapter; an aggregator error is recorded, not raised, and
    /// leaves the global adapter as it was.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when no round is open or it was aggregated already; errors
    /// of loading the aggregate into the server's submodel.
    pub fn aggregate_round(
        &mut self,
        replies: Vec<(usize, std::result::Result<Vec<u8>, String>)>,
    ) -> Result<&RoundMetrics> {
        let pending = match self.pending.as_mut() {
            Some(p) if p.metrics.is_none() => p,
            _ => {
                return Err(Error::InvalidArgument(
                    "no configured round is waiting for replies".into(),
                ));
            }
        };
        let current = self.current.as_mut().expect("a stage is running");
        let instructions = self.aggregator.client_instructions();
        let mut replies: BTreeMap<usize, std::result::Result<Vec<u8>, String>> =
            replies.into_iter().collect();
        let mut updates = Vec::new();
        let mut failed = Vec::new();
        let mut losses = Vec::new();
        let mut memory = 0u64;
        let mut peak_rss = None;
        for &client in &pending.sampled {
            let (setup, down, max_bytes) = pending.sent[&client];
            let mut up = WireSize::default();
            let reply = replies
                .remove(&client)
                .unwrap_or_else(|| Err("no reply".to_string()))
                .and_then(|bytes| {
                    up.total = bytes.len() as u64;
                    let reply =
                        TrainReply::from_bytes(&bytes, max_bytes, &format!("client {client}"))
                            .map_err(|e| e.to_string())?;
                    up.payload = 4 * reply.adapter.num_values() as u64;
                    self::update_from(reply, client, pending.round, &current.global, &instructions)
                        .and_then(|update| {
                            check_update(&current.global, &update)?;
                            check_update_norm(
                                &current.global,
                                &update,
                                self.config.max_update_norm_factor,
                            )?;
                            Ok(update)
                        })
                        .map_err(|e| e.to_string())
                });
            self.state.ledger.entries.push(LedgerEntry {
                round: pending.round,
                client,
                up,
                down,
                setup,
                evaluation: false,
            });
            match reply {
                Ok(update) => {
                    let metric = |key: &str| update.metrics.get(key).copied();
                    if let Some(loss) = metric("train_loss") {
                        losses.push((loss, update.num_examples as f64));
                    }
                    let bytes = |value: f64| value.clamp(0.0, u64::MAX as f64) as u64;
                    memory = memory.max(bytes(metric("memory_estimate_bytes").unwrap_or(0.0)));
                    if let Some(peak) = metric("peak_rss_bytes") {
                        peak_rss = peak_rss.max(Some(bytes(peak)));
                    }
                    updates.push(update);
                }
                Err(reason) => {
                    eprintln!("round {}: client {client} failed: {reason}", pending.round);
                    // It may have lost the stage: the next task carries the set-up again.
                    current.synced.remove(&client);
                    failed.push((client, reason));
                }
            }
        }
        if self.config.stateless_clients {
            current.synced.clear();
        }
        for (client, _) in replies {
            eprintln!(
                "round {}: ignoring a reply from client {client}, which was not sampled",
                pending.round
            );
        }
        let mut aggregation_error = None;
        let mut aggregated = false;
        if updates.len() >= self.config.min_successful_clients {
            match self.aggregator.aggregate(&current.global, &updates) {
                Ok(aggregate) => {
                    aggregated = true;
                    if self.aggregator.merges_into_base() {
                        current.model.sync(&MergeSync {
                            first: current.model.merges().len(),
                            merges: vec![aggregate],
                        })?;
                        let seed = mix(mix(self.config.seed, pending.round as u64), u64::MAX);
                        current.global = fresh_adapter(current.model.submodel(), seed)?;
                    } else {
                        current.global = aggregate;
                    }
                }
                Err(e) => {
                    eprintln!(
                        "round {}: aggregation failed: {e}; the global adapter is unchanged",
                        pending.round
                    );
                    aggregation_error = Some(e.to_string());
                }
            }
        } else {
            eprintln!(
                "round {}: {} of {} clients succeeded, fewer than {}; the global adapter is unchanged",
                pending.round,
                updates.len(),
                pending.sampled.len(),
                self.config.min_successful_clients
            );
        }
        let weight: f64 = losses.iter().map(|(_, w)| w).sum();
        let (bytes_up, bytes_down) = self.state.ledger.round_totals(pending.round);
        let stage = self.state.plan[self.state.stage];
        Ok(pending.metrics.insert(RoundMetrics {
            stage: self.state.stage,
            capacity: stage.capacity,
            round: pending.round,
            clients_sampled: pending.sampled.clone(),
            clients_excluded: pending.excluded.clone(),
            clients_failed: failed,
            train_loss: (weight > 0.0)
                .then(|| losses.iter().map(|(l, w)| l * w).sum::<f64>() / weight),
            eval_loss: None,
            bytes_up,
            bytes_down,
            bytes_setup: self.state.ledger.round_setup(pending.round),
            wall_seconds: 0.0,
            eval_seconds: 0.0,
            memory_bytes: memory,
            peak_rss_bytes: peak_rss,
            aggregated,
            aggregation_error,
            schedule: None,
            bytes_probe_up: WireSize::default(),
            bytes_probe_down: WireSize::default(),
        }))
    }

    /// The adapter of the stage's submodel that evaluation and the stage's transfer use: the
    /// global adapter, with the tensors clients keep (FedSA-LoRA's `B`) replaced by the
    /// example-weighted mean of `personal` (each client's kept tensors and example count).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when no stage is running; the errors of the mean for
    /// personal tensors that do not fit the global adapter.
    pub fn evaluated_adapter(&self, personal: &[(ParamMap, usize)]) -> Result<ParamMap> {
        let current = self
            .current
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("no stage is running".into()))?;
        if personal.is_empty() {
            return Ok(current.global.clone());
        }
        let instructions = self.aggregator.client_instructions();
        let updates: Vec<ClientUpdate> = personal
            .iter()
            .enumerate()
            .map(|(client, (own, num_examples))| {
                let mut params = current.global.clone();
                params.extend(own.clone());
                ClientUpdate {
                    client,
                    params,
                    num_examples: *num_examples,
                    metrics: BTreeMap::new(),
                }
            })
            .collect();
        partial_mean(&current.global, &updates, |n| {
            instructions.keeps_on_client(n)
        })
    }

    /// The full model carrying the current stage's knowledge ([`Server::evaluated_adapter`]
    /// transferred, merges replayed): what a held-out evaluation of this round evaluates.
    ///
    /// # Errors
    ///
    /// As [`Server::evaluated_adapter`] and [`StageModel::knowledge`].
    pub fn evaluation_model(&self, personal: &[(ParamMap, usize)]) -> Result<CausalLm> {
        let adapter = self.evaluated_adapter(personal)?;
        self.current
            .as_ref()
            .expect("checked by evaluated_adapter")
            .model
            .knowledge(&adapter)
    }

    /// Federated evaluation of the aggregated round: an [`EvaluateTask`] for each of
    /// `clients` (with the stage set-up for those that lack it), to be answered with
    /// [`crate::federated::Client::evaluate`] on their held-out data and passed to
    /// [`Server::aggregate_evaluation`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] unless the round is aggregated and not finished, or for a
    /// client id out of range; as [`Server::evaluated_adapter`].
    pub fn configure_evaluation(
        &mut self,
        clients: &[usize],
        personal: &[(ParamMap, usize)],
    ) -> Result<Vec<ClientTask>> {
        let round = match &self.pending {
            Some(p) if p.metrics.is_some() => p.round,
            _ => {
                return Err(Error::InvalidArgument(
                    "evaluation follows an aggregated round".into(),
                ));
            }
        };
        if let Some(&client) = clients.iter().find(|&&c| c >= self.state.num_clients) {
            return Err(Error::InvalidArgument(format!(
                "client {client} does not exist ({} clients)",
                self.state.num_clients
            )));
        }
        let adapter = self.evaluated_adapter(personal)?;
        let current = self.current.as_mut().expect("a stage is running");
        let mut tasks = Vec::with_capacity(clients.len());
        for &client in clients {
            let (setup, setup_size, merges) = current.sync(client);
            let task = EvaluateTask {
                round,
                stage: self.state.stage,
                adapter: adapter.clone(),
                merges,
                batch_size: self.config.eval_batch_size,
                pad_id: self.config.local.pad_id,
            };
            let bytes = task.to_bytes()?;
            self.state.ledger.entries.push(LedgerEntry {
                round,
                client,
                up: WireSize::default(),
                down: WireSize {
                    payload: 4 * task.num_values() as u64,
                    total: bytes.len() as u64,
                },
                setup: setup_size,
                evaluation: true,
            });
            tasks.push(ClientTask {
                client,
                setup,
                task: bytes,
                max_reply_bytes: 1 << 16,
            });
        }
        Ok(tasks)
    }

    /// Takes the replies to [`Server::configure_evaluation`]: the target-weighted mean of
    /// the valid losses, or `None` when none is valid. A bad reply is logged and skipped.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] unless the round is aggregated and not finished.
    pub fn aggregate_evaluation(
        &mut self,
        replies: Vec<(usize, std::result::Result<Vec<u8>, String>)>,
    ) -> Result<Option<f64>> {
        let round = match &self.pending {
            Some(p) if p.metrics.is_some() => p.round,
            _ => {
                return Err(Error::InvalidArgument(
                    "evaluation follows an aggregated round".into(),
                ));
            }
        };
        let (mut total, mut targets) = (0.0, 0usize);
        for (client, reply) in replies {
            let entry = self
                .state
                .ledger
                .entries
                .iter_mut()
                .rev()
                .take_while(|e| e.round == round)
                .find(|e| e.client == client && e.evaluation && e.up.total == 0);
            let checked = reply.and_then(|bytes| {
                let sender = format!("client {client}");
                let reply = EvaluateReply::from_bytes(&bytes, 1 << 16, &sender)
                    .map_err(|e| e.to_string())?;
                if reply.client != client || reply.round != round {
                    return Err(format!("{sender} answered for another client or round"));
                }
                if !reply.loss.is_finite() || reply.loss < 0.0 {
                    return Err(format!("{sender} reported the loss {}", reply.loss));
                }
                Ok((reply, bytes.len()))
            });
            let Some(entry) = entry else {
                eprintln!(
                    "round {round}: ignoring an evaluation from client {client}, which was not asked"
                );
                continue;
            };
            match checked {
                Ok((reply, len)) => {
                    entry.up.total = len as u64;
                    total += reply.loss * reply.num_targets as f64;
                    targets += reply.num_targets;
                }
                Err(reason) => {
                    eprintln!("round {round}: evaluation of client {client} failed: {reason}")
                }
            }
        }
        Ok((targets > 0).then(|| total / targets as f64))
    }

    /// Closes the aggregated round with its held-out evaluation, if any. At a stage's end the
    /// stage's knowledge ([`Server::evaluated_adapter`] of `personal`) moves into the full
    /// model and the scheduler revises the remaining plan.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when no aggregated round is open; the errors of the
    /// transfer and of an invalid revised plan.
    pub fn finish_round(
        &mut self,
        evaluation: Option<Evaluation>,
        personal: &[(ParamMap, usize)],
    ) -> Result<RoundMetrics> {
        if self.pending.as_ref().is_none_or(|p| p.metrics.is_none()) {
            return Err(Error::InvalidArgument(
                "no aggregated round to finish".into(),
            ));
        }
        let pending = self.pending.take().expect("checked above");
        let mut metrics = pending.metrics.expect("checked above");
        if self.config.stateless_clients
            && let Some(current) = self.current.as_mut()
        {
            current.synced.clear();
        }
        metrics.eval_loss = evaluation.map(|e| e.loss);
        metrics.eval_seconds = evaluation.map_or(0.0, |e| e.seconds);
        let ends_stage = self.round_ends_stage(&metrics);
        let mut probe_seconds = 0.0;
        if let Some(cost) = self.probe_cost.take() {
            metrics.bytes_probe_up = cost.up;
            metrics.bytes_probe_down = cost.down;
            probe_seconds = cost.seconds;
        }
        let mut notes: Vec<String> = self.schedule_note.take().into_iter().collect();
        self.state.rounds_done_in_stage += 1;
        self.state.rounds_done += 1;
        let index = self.state.stage;
        let planned = self.state.plan[index];
        let done = self.state.rounds_done_in_stage;
        if ends_stage && done < planned.rounds {
            // Ended early: the unspent rounds go to the next stage.
            self.state.plan[index].rounds = done;
            self.state.plan[index + 1].rounds += planned.rounds - done;
            notes.push(format!(
                "stage {} ended after {done} of {} rounds (its training loss stopped improving)",
                index + 1,
                planned.rounds
            ));
        }
        self.state.metrics.push(metrics.clone());
        if ends_stage {
            let before = self.state.plan.clone();
            self.finish_stage(self.state.plan[index], personal)?;
            if self.state.plan != before || !notes.is_empty() {
                notes.push(format!("plan {}", probe::describe_plan(&self.state.plan)));
            }
        }
        metrics.schedule = (!notes.is_empty()).then(|| notes.join("; "));
        metrics.wall_seconds =
            probe_seconds + pending.setup_seconds + pending.started.elapsed().as_secs_f64();
        let last = self.state.metrics.last_mut().expect("pushed above");
        last.wall_seconds = metrics.wall_seconds;
        last.schedule.clone_from(&metrics.schedule);
        Ok(metrics)
    }

    /// Whether the aggregated, unfinished round should be evaluated on the held-out set:
    /// every [`FederatedConfig::eval_every`] rounds, at a stage's last round (the stage's
    /// outcome carries its loss) and at the run's last. `false` when no round is aggregated.
    pub fn evaluation_due(&self) -> bool {
        let Some(metrics) = self.pending.as_ref().and_then(|p| p.metrics.as_ref()) else {
            return false;
        };
        let round = self.state.rounds_done + 1;
        self.config.eval_every <= 1
            || round.is_multiple_of(self.config.eval_every)
            || round == self.config.rounds
            || self.round_ends_stage(metrics)
    }

    /// Whether the stage ends with the round of `metrics` (aggregated, not yet finished): its
    /// planned rounds are spent, or the scheduler ends it early (never the last stage).
    fn round_ends_stage(&self, metrics: &RoundMetrics) -> bool {
        let index = self.state.stage;
        let stage = self.state.plan[index];
        let done = self.state.rounds_done_in_stage + 1;
        if done >= stage.rounds {
            return true;
        }
        if index + 1 == self.state.plan.len() {
            return false;
        }
        let mut train_losses: Vec<Option<f64>> = self
            .state
            .metrics
            .iter()
            .filter(|m| m.stage == index)
            .map(|m| m.train_loss)
            .collect();
        train_losses.push(metrics.train_loss);
        self.strategy.scheduler.ends_early(&StageProgress {
            index,
            stage,
            train_losses: &train_losses,
        })
    }

    fn start_stage(&mut self) -> Result<ServerStage> {
        let capacity = self.state.plan[self.state.stage].capacity;
        let full = full_model(&self.base, &self.history, &self.full_adapter)?;
        let grouping = if capacity == full.num_layers() {
            Grouping::singletons(capacity)
        } else {
            self.strategy.grouper.group(&full, capacity)?
        };
        self.aggregator.reset();
        self.state.grouping = grouping.clone();
        self.state.synced.clear();
        self.stage_from(grouping, Vec::new(), None)
    }

    /// The stage with `grouping`, its merges so far replayed, and `global` (or the fused
    /// submodel's adapter).
    fn stage_from(
        &self,
        grouping: Grouping,
        merges: Vec<ParamMap>,
        global: Option<ParamMap>,
    ) -> Result<ServerStage> {
        let previous = self.history.last().map(|s| &s.grouping);
        let setup = StageSetup {
            stage: self.state.stage,
            grouping,
            fuser: self.strategy.fuser.describe(),
            start: compact_start(&self.full_adapter, previous)?,
            history: self.history.clone(),
        };
        let mut model = StageModel::build(&self.base, &setup, self.strategy.fuser.as_ref())?;
        model.sync(&MergeSync { first: 0, merges })?;
        let global = match global {
            Some(global) => global,
            None => model.submodel().lora_params(),
        };
        let local = &self.config.local;
        let batch_tokens = local.batch_size * self.config.max_example_tokens;
        let memory_estimate = training_memory_estimate(
            model.submodel(),
            global.num_values(),
            batch_tokens,
            batch_tokens,
        );
        let setup_bytes = setup.to_bytes()?;
        let setup_size = WireSize {
            payload: 4 * setup.num_values() as u64,
            total: setup_bytes.len() as u64,
        };
        Ok(ServerStage {
            setup,
            setup_bytes,
            setup_size,
            model,
            global,
            synced: self.state.synced.clone(),
            memory_estimate,
        })
    }

    fn finish_stage(&mut self, stage: Stage, personal: &[(ParamMap, usize)]) -> Result<()> {
        let adapter = self.evaluated_adapter(personal)?;
        let current = self.current.take().expect("a stage is running");
        self.full_adapter = current.model.knowledge(&adapter)?.lora_params();
        self.history.push(MergedStage {
            grouping: current.setup.grouping.clone(),
            merges: current.model.merges().to_vec(),
        });
        let last = self.state.metrics.last();
        self.state.stage_outcomes.push(StageOutcome {
            stage,
            eval_loss: last.and_then(|m| m.eval_loss),
            train_loss: last.and_then(|m| m.train_loss),
        });
        self.state.stage += 1;
        self.state.rounds_done_in_stage = 0;
        self.state.synced.clear();
        if self.state.stage < self.state.plan.len() {
            let remaining = self.strategy.scheduler.revise(
                &self.state.stage_outcomes,
                self.state.plan[self.state.stage..].to_vec(),
            );
            let mut plan = self.state.plan[..self.state.stage].to_vec();
            plan.extend(remaining);
            validate_plan(&plan, self.base.num_layers(), self.config.rounds)?;
            self.state.plan = plan;
        }
        Ok(())
    }

    /// Writes the server's state, and `personal` (each client's kept tensors), as a
    /// checkpoint under `dir` ([`crate::federated::FederatedRun::with_checkpoints`] describes
    /// the layout).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] while a round is open; I/O errors.
    pub fn save_checkpoint(&self, dir: &Path, personal: &PersonalState) -> Result<()> {
        if self.pending.is_some() {
            return Err(Error::InvalidArgument(
                "a checkpoint is taken between rounds".into(),
            ));
        }
        let mut state = self.state.clone();
        if let Some(current) = &self.current {
            state.synced = current.synced.clone();
        }
        state.merges_in_stage = self.current.as_ref().map_or(0, |c| c.model.merges().len());
        state.history = self
            .history
            .iter()
            .map(|s| (s.grouping.clone(), s.merges.len()))
            .collect();
        let mid_stage = self.current.as_ref();
        let merges = self
            .history
            .iter()
            .map(|s| s.merges.as_slice())
            .chain(mid_stage.map(|c| c.model.merges()))
            .enumerate()
            .flat_map(|(s, merges)| {
                merges.iter().enumerate().flat_map(move |(m, merge)| {
                    merge
                        .iter()
                        .map(move |(name, t)| (format!("{s}.{m}.{name}"), t.clone()))
                })
            })
            .collect();
        Checkpoint {
            state,
            stage_start_lora: self.full_adapter.clone(),
            global: mid_stage.map_or_else(ParamMap::new, |c| c.global.clone()),
            aggregator: self.aggregator.state(),
            personal: join_personal(personal),
            merges,
        }
        .save(dir)
    }

    /// Restores the run checkpointed under `dir` into this freshly made server (made with the
    /// run's settings), or returns `None` when `dir` holds no checkpoint. Returns each
    /// client's kept tensors (checked against the global adapter), to give back to the
    /// clients.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when the server has started; [`Error::InvalidCheckpoint`]
    /// for a checkpoint of another run or an inconsistent one; the errors of reading it and
    /// of rebuilding the stage from it.
    pub fn restore(&mut self, dir: &Path) -> Result<Option<PersonalState>> {
        if self.state.rounds_done > 0 || self.current.is_some() || self.pending.is_some() {
            return Err(Error::InvalidArgument(
                "only a server that has not started can restore a checkpoint".into(),
            ));
        }
        let shape = RunShape {
            seed: self.config.seed,
            num_clients: self.state.num_clients,
            num_layers: self.base.num_layers(),
            rounds: self.config.rounds,
        };
        let Some(checkpoint) = Checkpoint::load_latest(dir, shape)? else {
            return Ok(None);
        };
        let invalid = |reason: String| Error::InvalidCheckpoint {
            path: dir.to_path_buf(),
            reason,
        };
        let mut merges = split_merges(&checkpoint.merges, &checkpoint.state).map_err(invalid)?;
        let current_merges = merges.pop().unwrap_or_default();
        self.history = checkpoint
            .state
            .history
            .iter()
            .zip(merges)
            .map(|((grouping, _), merges)| MergedStage {
                grouping: grouping.clone(),
                merges,
            })
            .collect();
        self.full_adapter = checkpoint.stage_start_lora;
        self.state = checkpoint.state;
        // Rebuilding the full model checks the adapter and the merges against the model.
        self.model()?;
        if self.state.rounds_done_in_stage > 0 {
            let current = self.stage_from(
                self.state.grouping.clone(),
                current_merges,
                Some(checkpoint.global.clone()),
            )?;
            // The global adapter must fit the stage's submodel.
            current
                .model
                .submodel()
                .clone()
                .load_lora_params(&checkpoint.global)?;
            self.current = Some(current);
            self.aggregator.load_state(&checkpoint.aggregator)?;
        } else if !checkpoint.global.is_empty() {
            return Err(invalid("it holds a stage's adapter between stages".into()));
        }
        let global = self
            .current
            .as_ref()
            .map_or_else(ParamMap::new, |c| c.global.clone());
        let instructions = self.aggregator.client_instructions();
        split_personal(
            &checkpoint.personal,
            &global,
            &instructions,
            self.state.num_clients,
        )
        .map(Some)
    }
}
/// The update a reply carries: checked to answer this round as the client it came from, with
/// the tensors clients keep filled from the global adapter.
fn update_from(
    reply: TrainReply,
    client: usize,
    round: usize,
    global: &ParamMap,
    instructions: &ClientInstructions,
) -> Result<ClientUpdate> {
    if reply.client != client || reply.round != round {
        return Err(Error::RejectedUpdate {
            client,
            reason: format!(
                "it answers round {} as client {}, not round {round} as client {client}",
                reply.round, reply.client
            ),
        });
    }
    if let Some(name) = reply
        .adapter
        .names()
        .find(|n| instructions.keeps_on_client(n))
    {
        return Err(Error::UnexpectedTensor {
            name: format!("{name} (client {client}; it stays on the client)"),
        });
    }
    let mut params = reply.adapter;
    params.extend(shared_part(global, instructions, true));
    Ok(ClientUpdate {
        client,
        params,
        num_examples: reply.num_examples,
        metrics: reply.metrics,
    })
}

/// The tensors of `adapter` that travel (`kept == false`) or stay on clients (`kept`).
fn shared_part(adapter: &ParamMap, instructions: &ClientInstructions, kept: bool) -> ParamMap {
    adapter
        .iter()
        .filter(|(name, _)| instructions.keeps_on_client(name) == kept)
        .map(|(name, t)| (name.to_string(), t.clone()))
        .collect()
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

/// Every stage's merges from a checkpoint's `merges` map (named `{stage}.{merge}.{name}`),
/// checked against the counts the state records: the finished stages' in `history`, then the
/// current stage's `merges_in_stage`.
fn split_merges(
    joined: &ParamMap,
    state: &RunState,
) -> std::result::Result<Vec<Vec<ParamMap>>, String> {
    let counts = state
        .history
        .iter()
        .map(|(_, count)| *count)
        .chain(std::iter::once(state.merges_in_stage));
    let mut stages: Vec<Vec<ParamMap>> = counts.map(|n| vec![ParamMap::new(); n]).collect();
    for (name, tensor) in joined.iter() {
        let mut parts = name.splitn(3, '.');
        let slot = match (parts.next(), parts.next(), parts.next()) {
            (Some(s), Some(m), Some(inner)) => parse_index(s)
                .zip(parse_index(m))
                .map(|(s, m)| (s, m, inner)),
            _ => None,
        };
        let merge = slot.and_then(|(s, m, inner)| Some((stages.get_mut(s)?.get_mut(m)?, inner)));
        let Some((merge, inner)) = merge else {
            return Err(format!(
                "merge tensor `{name}` names no merge the state records"
            ));
        };
        merge.insert(inner, tensor.clone());
    }
    if let Some((s, m)) = stages
        .iter()
        .enumerate()
        .find_map(|(s, merges)| merges.iter().position(ParamMap::is_empty).map(|m| (s, m)))
    {
        return Err(format!("merge {m} of stage {s} has no tensor"));
    }
    Ok(stages)
}

/// Personal tensors of all clients in one map, named `client.{id}.{name}`.
fn join_personal(personal: &PersonalState) -> ParamMap {
    personal
        .iter()
        .flat_map(|(client, own)| {
            own.iter()
                .map(move |(name, t)| (format!("client.{client}.{name}"), t.clone()))
        })
        .collect()
}

/// The inverse of [`join_personal`], checked: every client exists and every tensor is one of
/// the global adapter's that clients keep, with its shape and finite values.
fn split_personal(
    joined: &ParamMap,
    global: &ParamMap,
    instructions: &ClientInstructions,
    num_clients: usize,
) -> Result<PersonalState> {
    let mut personal = PersonalState::new();
    for (name, tensor) in joined.iter() {
        let parsed = name
            .strip_prefix("client.")
            .and_then(|rest| rest.split_once('.'))
            .and_then(|(id, inner)| Some((parse_index(id)?, inner)))
            .filter(|(client, inner)| *client < num_clients && instructions.keeps_on_client(inner));
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
