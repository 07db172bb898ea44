//! Checkpoints of a run, written atomically: a new round directory is filled, renamed into
//! place, and only then named in `LATEST` (itself replaced by rename), so a crash at any
//! moment leaves the previous checkpoint intact.

use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::federated::metrics::{Ledger, RoundMetrics};
use crate::grouping::Grouping;
use crate::params::ParamMap;
use crate::schedule::{ProbeOutcome, Stage, StageOutcome, validate_plan};

/// Everything needed to continue a run exactly where it stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct RunState {
    /// Seed of the run (sampling and batch order derive from it and the round number, so
    /// there is no other RNG state).
    pub seed: u64,
    /// Number of clients the run was started with.
    pub num_clients: usize,
    /// The stage plan (as revised so far).
    pub plan: Vec<Stage>,
    /// Index of the current stage.
    pub stage: usize,
    /// Rounds of the current stage already done.
    pub rounds_done_in_stage: usize,
    /// Global rounds done.
    pub rounds_done: usize,
    /// The current stage's grouping.
    pub grouping: Grouping,
    /// Metrics of every round so far.
    pub metrics: Vec<RoundMetrics>,
    /// Traffic so far.
    pub ledger: Ledger,
    /// Finished stages.
    pub stage_outcomes: Vec<StageOutcome>,
    /// Each finished stage's grouping and number of merges into the base (merging
    /// aggregators; zero otherwise).
    #[serde(default)]
    pub history: Vec<(Grouping, usize)>,
    /// Merges into the base made so far in the current stage.
    #[serde(default)]
    pub merges_in_stage: usize,
    /// Clients holding the current stage's set-up, with the number of its merges each was
    /// sent.
    #[serde(default)]
    pub synced: BTreeMap<usize, usize>,
    /// The probe's result, when the scheduler probed before the first stage.
    #[serde(default)]
    pub probe: Option<ProbeOutcome>,
}

/// What a checkpoint must agree with to be resumed by a run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RunShape {
    /// The run's seed.
    pub seed: u64,
    /// The run's number of clients.
    pub num_clients: usize,
    /// The full model's number of layers.
    pub num_layers: usize,
    /// The run's total rounds.
    pub rounds: usize,
}

impl RunState {
    /// Checks the state against itself and against the run resuming it: the plan is valid
    /// for the run, the counters agree with the plan and with each other, the grouping
    /// partitions the model's layers into the stage's capacity.
    fn check(&self, run: RunShape) -> std::result::Result<(), String> {
        if self.seed != run.seed || self.num_clients != run.num_clients {
            return Err(format!(
                "it belongs to a run with seed {} and {} clients, not seed {} and {} clients",
                self.seed, self.num_clients, run.seed, run.num_clients
            ));
        }
        validate_plan(&self.plan, run.num_layers, run.rounds)
            .map_err(|e| format!("its plan does not fit this run: {e}"))?;
        if self.stage > self.plan.len() {
            return Err(format!(
                "stage {} does not exist (the plan has {} stages)",
                self.stage,
                self.plan.len()
            ));
        }
        let rounds_in_stage = self.plan.get(self.stage).map_or(0, |s| s.rounds);
        if self.rounds_done_in_stage >= rounds_in_stage.max(1) {
            return Err(format!(
                "{} rounds done in stage {}, which has {rounds_in_stage}",
                self.rounds_done_in_stage, self.stage
            ));
        }
        let before: usize = self.plan[..self.stage].iter().map(|s| s.rounds).sum();
        if self.rounds_done != before + self.rounds_done_in_stage {
            return Err(format!(
                "{} rounds done, but the plan's stages before stage {} and its counter give {}",
                self.rounds_done,
                self.stage,
                before + self.rounds_done_in_stage
            ));
        }
        if self.metrics.len() != self.rounds_done || self.stage_outcomes.len() != self.stage {
            return Err(format!(
                "{} rounds and {} stages done, but {} round metrics and {} stage outcomes",
                self.rounds_done,
                self.stage,
                self.metrics.len(),
                self.stage_outcomes.len()
            ));
        }
        if let Some(entry) = self
            .ledger
            .entries
            .iter()
            .find(|e| e.round > self.rounds_done)
        {
            return Err(format!("the ledger has an entry for round {}", entry.round));
        }
        if self.grouping.num_layers() != run.num_layers {
            return Err(format!(
                "its grouping covers {} layers, the model has {}",
                self.grouping.num_layers(),
                run.num_layers
            ));
        }
        if self.history.len() != self.stage {
            return Err(format!(
                "{} stages done, but the history records {}",
                self.stage,
                self.history.len()
            ));
        }
        for (s, (grouping, merges)) in self.history.iter().enumerate() {
            if grouping.num_layers() != run.num_layers
                || grouping.len() != self.plan[s].capacity
                || *merges > self.plan[s].rounds
            {
                return Err(format!(
                    "stage {s}'s history ({} groups of {} layers, {merges} merges) does not \
                     fit its plan",
                    grouping.len(),
                    grouping.num_layers()
                ));
            }
        }
        if self.merges_in_stage > self.rounds_done_in_stage {
            return Err(format!(
                "{} merges after {} rounds of the stage",
                self.merges_in_stage, self.rounds_done_in_stage
            ));
        }
        let stale = |(&client, &merges): (&usize, &usize)| {
            client >= run.num_clients || merges > self.merges_in_stage
        };
        if (self.rounds_done_in_stage == 0 && !self.synced.is_empty())
            || self.synced.iter().any(stale)
        {
            return Err("its clients' synchronisation does not fit the stage".into());
        }
        if self.rounds_done_in_stage > 0 && self.grouping.len() != self.plan[self.stage].capacity {
            return Err(format!(
                "its grouping has {} groups, stage {} has capacity {}",
                self.grouping.len(),
                self.stage,
                self.plan[self.stage].capacity
            ));
        }
        Ok(())
    }
}

/// The tensors of a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Checkpoint {
    pub state: RunState,
    /// The full model's adapter when the current stage began (the submodel is rebuilt from it).
    pub stage_start_lora: ParamMap,
    /// The current global adapter of the submodel.
    pub global: ParamMap,
    /// The aggregator's server state.
    pub aggregator: ParamMap,
    /// Per-client state kept on the clients (FedSA-LoRA's `B`), named `client.{id}.{name}`.
    pub personal: ParamMap,
    /// Merging aggregators (FLoRA): every merge into the base so far, named
    /// `{stage}.{merge}.{name}` (empty otherwise).
    pub merges: ParamMap,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(path, e)
}

impl Checkpoint {
    /// Writes the checkpoint under `dir` and points `LATEST` at it; older rounds are removed.
    pub(crate) fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let name = format!("round-{:06}", self.state.rounds_done);
        let tmp = dir.join(format!("{name}.tmp"));
        let final_dir = dir.join(&name);
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        let state_path = tmp.join("state.json");
        let json =
            serde_json::to_string_pretty(&self.state).map_err(|e| Error::json(&state_path, e))?;
        std::fs::write(&state_path, json).map_err(io(&state_path))?;
        for (name, tensors) in self.tensor_files() {
            tensors.save_safetensors(tmp.join(format!("{name}.safetensors")))?;
        }
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).map_err(io(&final_dir))?;
        }
        std::fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;
        let latest_tmp = dir.join("LATEST.tmp");
        std::fs::write(&latest_tmp, &name).map_err(io(&latest_tmp))?;
        std::fs::rename(&latest_tmp, dir.join("LATEST")).map_err(io(dir))?;
        for entry in std::fs::read_dir(dir).map_err(io(dir))?.flatten() {
            let path: PathBuf = entry.path();
            let file = entry.file_name().to_string_lossy().to_string();
            if file.starts_with("round-") && file != name && path.is_dir() {
                std::fs::remove_dir_all(&path).map_err(io(&path))?;
            }
        }
        Ok(())
    }

    /// Reads the checkpoint `LATEST` names and checks its state against `run`
    /// ([`RunState::check`]), or `None` when `dir` holds no checkpoint at all.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidCheckpoint`] when round directories exist without `LATEST`, when
    /// `LATEST` does not name a round directory of `dir`, or when the state is inconsistent;
    /// the I/O, JSON and safetensors errors of reading it.
    pub(crate) fn load_latest(dir: &Path, run: RunShape) -> Result<Option<Self>> {
        let invalid = |reason: String| Error::InvalidCheckpoint {
            path: dir.to_path_buf(),
            reason,
        };
        let latest = dir.join("LATEST");
        if !latest.exists() {
            let rounds = match std::fs::read_dir(dir) {
                Ok(entries) => entries
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("round-"))
                    .count(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
                Err(e) => return Err(Error::io(dir, e)),
            };
            if rounds > 0 {
                return Err(invalid(format!(
                    "it holds {rounds} round director{} but no `LATEST`; restore `LATEST` or \
                     remove the directory to start afresh",
                    if rounds == 1 { "y" } else { "ies" }
                )));
            }
            return Ok(None);
        }
        let name = std::fs::read_to_string(&latest).map_err(io(&latest))?;
        let name = name.trim();
        let is_round = name
            .strip_prefix("round-")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !is_round {
            return Err(invalid(format!(
                "`LATEST` names `{name}`, not a round directory"
            )));
        }
        let round_dir = dir.join(name);
        let state_path = round_dir.join("state.json");
        let text = std::fs::read_to_string(&state_path).map_err(io(&state_path))?;
        let state: RunState =
            serde_json::from_str(&text).map_err(|e| Error::json(&state_path, e))?;
        state.check(run).map_err(invalid)?;
        let load =
            |name: &str| ParamMap::load_safetensors(round_dir.join(format!("{name}.safetensors")));
        Ok(Some(Self {
            state,
            stage_start_lora: load("stage_start_lora")?,
            global: load("global")?,
            aggregator: load("aggregator")?,
            personal: load("personal")?,
            merges: load("merges")?,
        }))
    }

    /// Every tensor map with its file name (without `.safetensors`).
    fn tensor_files(&self) -> [(&'static str, &ParamMap); 5] {
        [
            ("stage_start_lora", &self.stage_start_lora),
            ("global", &self.global),
            ("aggregator", &self.aggregator),
            ("personal", &self.personal),
            ("merges", &self.merges),
        ]
    }
}
