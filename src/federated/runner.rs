//! The in-process driver: a [`Server`] and its [`Client`]s in one process, the messages
//! between them encoded and decoded as on a network.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::Device;

use crate::aggregate::Aggregator;
use crate::data::TokenizedExample;
use crate::error::{Error, Result};
use crate::federated::client::Client;
use crate::federated::evaluate::evaluate_loss;
use crate::federated::faults::{Fault, FaultInjector};
use crate::federated::metrics::{Ledger, RoundMetrics};
use crate::federated::protocol::{Message, ProbeTask, StageSetup, TrainReply, TrainTask};
use crate::federated::server::{ClientTask, Evaluation, PersonalState, Server, validate_config};
use crate::federated::stage_model::StageModel;
use crate::federated::{FederatedConfig, Strategy};
use crate::model::CausalLm;
use crate::params::ParamMap;
use crate::schedule::StageOutcome;

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

/// A federated fine-tuning run in one process: DevFT stages (or one FedIT stage), an
/// aggregator, clients. It drives a [`Server`] and one [`Client`] per data partition
/// through the same messages a networked deployment sends, so its ledger counts what would
/// cross the network; the clients share one device ([`StageModel`]), as clients of one
/// machine would.
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
    /// Taken by the first [`FederatedRun::run`].
    parts: Option<(Strategy, Box<dyn Aggregator>)>,
    clients: Vec<Client>,
    /// Each client's declared memory budget in bytes (`None`: no limit).
    memory_budgets: Vec<Option<u64>>,
    eval: Vec<TokenizedExample>,
    faults: Option<Box<dyn FaultInjector>>,
    metrics_path: Option<PathBuf>,
    checkpoint_dir: Option<PathBuf>,
    stop_after_round: Option<usize>,
    progress: bool,
    label: String,
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
        if eval.is_empty() {
            return Err(Error::InvalidArgument(
                "a run needs evaluation examples".into(),
            ));
        }
        validate_config(&config, clients.len())?;
        Ok(Self {
            memory_budgets: vec![None; clients.len()],
            config,
            parts: Some((strategy, aggregator)),
            clients: clients
                .into_iter()
                .enumerate()
                .map(|(id, examples)| Client::new(id, examples))
                .collect(),
            eval,
            faults: None,
            metrics_path: None,
            checkpoint_dir: None,
            stop_after_round: None,
            progress: false,
            label: "run".into(),
        })
    }

    /// Gives each client (in client order) the training memory it declares, in bytes
    /// (`None`: no limit). A client is sampled only in stages whose memory estimate fits its
    /// budget ([`Server::declare_memory_budget`]).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when there is not one budget per client.
    pub fn with_memory_budgets(mut self, budgets: Vec<Option<u64>>) -> Result<Self> {
        if budgets.len() != self.clients.len() {
            return Err(Error::InvalidArgument(format!(
                "{} memory budgets for {} clients",
                budgets.len(),
                self.clients.len()
            )));
        }
        self.memory_budgets = budgets;
        Ok(self)
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
    /// A checkpoint is a directory `round-NNNNNN` (named in `LATEST`) with `state.json` and
    /// the tensors: the full model's stage-start adapter, the stage's global adapter, the
    /// aggregator's state, the clients' kept tensors and the merges into the base.
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

    /// Runs (or resumes) the whole schedule. `model` is the full model with LoRA attached, on
    /// an inference device; clients train on `train_device` (an autodiff device).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when the model has no adapter, the plan is invalid or the
    /// run already ran; a checkpoint that belongs to another run; I/O errors of metrics and
    /// checkpoints. Client failures and aggregator failures are not errors: they are recorded
    /// in the metrics.
    pub fn run(&mut self, model: CausalLm, train_device: &Device) -> Result<RunOutcome> {
        let (strategy, aggregator) = self.parts.take().ok_or_else(|| {
            Error::InvalidArgument("this run has run already; make a new one".into())
        })?;
        let base = model.clone();
        let mut server = Server::new(
            self.config.clone(),
            strategy,
            aggregator,
            model,
            self.clients.len(),
        )?;
        for (client, budget) in self.memory_budgets.iter().enumerate() {
            server.declare_memory_budget(client, *budget)?;
        }
        if let Some(dir) = &self.checkpoint_dir
            && let Some(personal) = server.restore(dir)?
        {
            for (id, own) in personal {
                self.clients[id].set_personal(server.stage(), own);
            }
        }
        if let Some(tasks) = server.configure_probe()? {
            let replies = tasks
                .iter()
                .map(|task| (task.client, self.client_probe(&server, &base, task)))
                .collect();
            server.aggregate_probe(replies)?;
        }
        // The clients' shared device: the stage as the set-up messages build it.
        let mut device: Option<StageModel> = None;
        let progress = self.progress_bar(server.rounds_done());
        while !server.is_finished() {
            let tasks = server.configure_round()?;
            let replies = tasks
                .tasks
                .iter()
                .map(|task| {
                    let reply = self.client_round(
                        &mut device,
                        &server,
                        &base,
                        task,
                        tasks.round,
                        train_device,
                    );
                    (task.client, reply)
                })
                .collect();
            server.aggregate_round(replies)?;
            let personal = self.personal_of(tasks.stage);
            let evaluation = if server.evaluation_due() {
                let eval_started = Instant::now();
                let eval_model = server.evaluation_model(&personal)?;
                let loss = evaluate_loss(
                    &eval_model,
                    &self.eval,
                    self.config.eval_batch_size,
                    self.config.local.pad_id,
                )?;
                Some(Evaluation {
                    loss,
                    seconds: eval_started.elapsed().as_secs_f64(),
                })
            } else {
                None
            };
            let metrics = server.finish_round(evaluation, &personal)?;
            if let Some(bar) = &progress {
                if let Some(loss) = metrics.eval_loss {
                    bar.set_message(format!(
                        "stage {} (K={}) eval {loss:.4}",
                        metrics.stage + 1,
                        metrics.capacity,
                    ));
                }
                bar.inc(1);
            }
            self.write_metrics(&metrics)?;
            if let Some(dir) = &self.checkpoint_dir {
                server.save_checkpoint(dir, &self.personal_state(server.stage()))?;
            }
            if self.stop_after_round == Some(server.rounds_done()) {
                return outcome(&server, false);
            }
        }
        if let Some(bar) = progress {
            bar.finish();
        }
        outcome(&server, true)
    }

    /// One sampled client's round, as its device would run it: set the stage up from the
    /// set-up message if it brings one, decode the task, train, encode the reply. Injected
    /// faults replace or corrupt the reply.
    fn client_round(
        &mut self,
        device: &mut Option<StageModel>,
        server: &Server,
        base: &CausalLm,
        task: &ClientTask,
        round: usize,
        train_device: &Device,
    ) -> std::result::Result<Vec<u8>, String> {
        let fault = self
            .faults
            .as_ref()
            .and_then(|f| f.fault(round, task.client));
        match &fault {
            Some(Fault::Error(reason)) => return Err(reason.clone()),
            Some(Fault::DropOut) => return Err("dropped out".to_string()),
            _ => {}
        }
        let mut train = || -> Result<Vec<u8>> {
            if let Some(bytes) = &task.setup {
                let setup = StageSetup::from_bytes(bytes, usize::MAX, "server")?;
                if device.as_ref().map(StageModel::stage) != Some(setup.stage) {
                    let fuser = server.strategy().fuser.as_ref();
                    *device = Some(StageModel::build(base, &setup, fuser)?);
                }
            }
            let work = TrainTask::from_bytes(&task.task, usize::MAX, "server")?;
            if device.as_ref().map(StageModel::stage) != Some(work.stage) {
                // Resumed from a checkpoint: the shared device restarts with the stage the
                // server rebuilt (the same set-up, the same merges).
                *device = server.stage_model().cloned();
            }
            let stage = device.as_mut().ok_or_else(|| {
                Error::InvalidArgument("no stage is set up on this device".into())
            })?;
            self.clients[task.client]
                .train(stage, &work, train_device)?
                .to_bytes()
        };
        let mut bytes = train().map_err(|e| e.to_string())?;
        corrupt(&mut bytes, fault.as_ref(), task.max_reply_bytes);
        Ok(bytes)
    }

    /// One sampled client's answer to the probe before the first stage, through bytes.
    fn client_probe(
        &self,
        server: &Server,
        base: &CausalLm,
        task: &ClientTask,
    ) -> std::result::Result<Vec<u8>, String> {
        let probe = || -> Result<Vec<u8>> {
            let work = ProbeTask::from_bytes(&task.task, usize::MAX, "server")?;
            let fuser = server.strategy().fuser.as_ref();
            self.clients[task.client]
                .probe(base, &work, fuser)?
                .to_bytes()
        };
        probe().map_err(|e| e.to_string())
    }

    /// Every client's kept tensors of `stage` with its example count, in client order.
    fn personal_of(&self, stage: usize) -> Vec<(ParamMap, usize)> {
        self.clients
            .iter()
            .filter_map(|c| Some((c.personal(stage)?.clone(), c.examples().len())))
            .collect()
    }

    /// Every client's kept tensors of `stage`, by client id, for a checkpoint.
    fn personal_state(&self, stage: usize) -> PersonalState {
        self.clients
            .iter()
            .filter_map(|c| Some((c.id(), c.personal(stage)?.clone())))
            .collect()
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

    fn progress_bar(&self, rounds_done: usize) -> Option<indicatif::ProgressBar> {
        if !self.progress {
            return None;
        }
        let bar = indicatif::ProgressBar::new(self.config.rounds as u64);
        bar.set_position(rounds_done as u64);
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

fn outcome(server: &Server, completed: bool) -> Result<RunOutcome> {
    Ok(RunOutcome {
        model: server.model()?,
        metrics: server.metrics().to_vec(),
        ledger: server.ledger().clone(),
        stages: server.stage_outcomes().to_vec(),
        completed,
    })
}

/// Applies an injected message fault to the reply a client sends.
fn corrupt(bytes: &mut Vec<u8>, fault: Option<&Fault>, max_bytes: usize) {
    // `poison(i, values)` edits the values of the `i`-th tensor (in name order).
    let rewrite = |bytes: &mut Vec<u8>, poison: &dyn Fn(usize, &mut [f32])| {
        if let Ok(mut reply) = TrainReply::from_bytes(bytes, usize::MAX, "fault") {
            reply.adapter = std::mem::take(&mut reply.adapter)
                .into_iter()
                .enumerate()
                .map(|(i, (name, mut tensor))| {
                    poison(i, tensor.values_mut());
                    (name, tensor)
                })
                .collect();
            if let Ok(b) = reply.to_bytes() {
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
