//! The federated runtime: clients, local training, the round loop with DevFT stages, the
//! communication ledger, metrics, checkpoints and fault handling.
//!
//! The loop is split as a deployment splits it, following Flower's configure/aggregate steps:
//! a [`Server`] owns the DevFT state and runs each round as tasks out, replies in; a
//! [`Client`] owns its data and trains on a [`StageModel`] its device builds from the stage's
//! set-up; everything between them is a [`protocol`] message (JSON header, safetensors
//! tensors), decoded with size limits and counted in the [`Ledger`]. Inconsistent,
//! non-finite or absurd updates are rejected naming the client, the rest are aggregated with
//! any [`crate::aggregate::Aggregator`]; a failing client or aggregator is data, not a panic.
//! Stages come from a [`crate::schedule::StageScheduler`]; between stages the full model is
//! regrouped, fused and, after training, receives the stage's knowledge
//! ([`crate::transfer`]). Plain federated LoRA (FedIT) is the same loop with one full-model
//! stage ([`Strategy::fedit`]). [`FederatedRun`] drives a server and its clients in one
//! process.

mod checkpoint;
mod client;
mod evaluate;
mod faults;
mod local;
mod memory;
mod metrics;
pub mod protocol;
mod runner;
mod server;
mod stage_model;

pub use client::Client;
pub use evaluate::evaluate_loss;
pub use faults::{Fault, FaultInjector, RandomFailures};
pub use local::{LocalOutcome, LocalTrainingConfig, train_local};
pub use memory::{measure_peak_rss, parse_memory_budgets, training_memory_estimate};
pub use metrics::{Ledger, LedgerEntry, RoundMetrics, WireSize};
pub use runner::{FederatedRun, RunOutcome};
pub use server::{ClientTask, Evaluation, PersonalState, RoundTasks, Server};
pub use stage_model::{StageModel, adapter_sha256, compact_start, full_model};

use burn::config::Config;

use crate::fusion::{DifferentialFuser, LayerFuser};
use crate::grouping::{LayerGrouper, SpectralGrouper};
use crate::schedule::{GeometricScheduler, SingleStage, StageScheduler};

/// Settings of a federated run.
#[derive(Config, Debug)]
pub struct FederatedConfig {
    /// Total rounds over all stages.
    pub rounds: usize,
    /// Local training of each client.
    pub local: LocalTrainingConfig,
    /// Clients sampled per round. Default: 4.
    #[config(default = 4)]
    pub clients_per_round: usize,
    /// Fewest successful clients for a round to change the global adapter. Default: 1.
    #[config(default = 1)]
    pub min_successful_clients: usize,
    /// Seed of client sampling and local batch order. Default: 0.
    #[config(default = 0)]
    pub seed: u64,
    /// Batch size of the held-out evaluation. Default: 8.
    #[config(default = 8)]
    pub eval_batch_size: usize,
    /// A client message may be at most this many times the size of the server's. Default: 2.
    #[config(default = 2.0)]
    pub max_update_factor: f64,
    /// A client update's norm may be at most this many times the global adapter's (at least
    /// 1); larger ones are rejected like any other failed client
    /// ([`crate::aggregate::check_update_norm`]). Infinity turns the check off. Default: 10.
    #[config(default = 10.0)]
    pub max_update_norm_factor: f64,
    /// Clients keep nothing between rounds (as Flower ClientApps started afresh for each
    /// message): every task then comes with the stage set-up and all of the stage's merges,
    /// and the ledger counts them. Default: false.
    #[config(default = false)]
    pub stateless_clients: bool,
    /// Held-out evaluation every this many rounds, and always at a stage's last round and the
    /// run's last ([`Server::evaluation_due`]); 0 or 1: every round. Default: 1.
    #[config(default = 1)]
    pub eval_every: usize,
    /// Examples of its own each client evaluates the probe's candidate submodels on, for a
    /// scheduler that probes ([`crate::schedule::StageScheduler::probe_capacities`]).
    /// Default: 8.
    #[config(default = 8)]
    pub probe_examples: usize,
    /// Longest tokenised example a client trains on, for the server's memory estimate of a
    /// stage, which it compares with the clients' declared budgets
    /// ([`Server::declare_memory_budget`]). Default: 512.
    #[config(default = 512)]
    pub max_example_tokens: usize,
}

/// How a run develops the model: stage plan, grouping and fusion.
pub struct Strategy {
    /// The stage plan.
    pub scheduler: Box<dyn StageScheduler>,
    /// How layers are grouped for submodels.
    pub grouper: Box<dyn LayerGrouper>,
    /// How a group becomes one layer.
    pub fuser: Box<dyn LayerFuser>,
}

impl Strategy {
    /// DevFT as published: capacities 4, 8, 16, ... (doubling) up to the full model, spectral
    /// grouping, differential fusion with beta 0.1.
    pub fn devft() -> Self {
        Self {
            scheduler: Box::new(GeometricScheduler::default()),
            grouper: Box::new(SpectralGrouper::new()),
            fuser: Box::new(DifferentialFuser::default()),
        }
    }

    /// Plain federated LoRA on the full model (FedIT).
    pub fn fedit() -> Self {
        Self {
            scheduler: Box::new(SingleStage),
            grouper: Box::new(SpectralGrouper::new()),
            fuser: Box::new(DifferentialFuser::default()),
        }
    }
}
