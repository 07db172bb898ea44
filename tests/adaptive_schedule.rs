//! The scheduler hooks in the federated loop on the tiny fixture: the probe before the first
//! stage (clients' losses of candidate submodels, against the same losses computed directly),
//! a stage ended early with its rounds moved on, and held-out evaluation every K rounds.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use devft::aggregate::FedAvg;
use devft::federated::{FederatedConfig, FederatedRun, RunOutcome, Strategy};
use devft::fidelity::submodel_loss;
use devft::fusion::DifferentialFuser;
use devft::grouping::{Grouping, LayerGrouper, SpectralGrouper};
use devft::schedule::{
    AdaptiveScheduler, ExplicitScheduler, ProbeOutcome, Stage, StageProgress, StageScheduler,
};

fn config(rounds: usize) -> FederatedConfig {
    tiny_config(rounds, 2, 5)
}

fn run(scheduler: Box<dyn StageScheduler>, config: FederatedConfig) -> RunOutcome {
    let (clients, eval) = tiny_federated_data();
    let strategy = Strategy {
        scheduler,
        grouper: Box::new(SpectralGrouper::new()),
        fuser: Box::new(DifferentialFuser::default()),
    };
    FederatedRun::new(config, strategy, Box::new(FedAvg), clients, eval)
        .unwrap()
        .run(tiny_lora_model(), &device().autodiff())
        .unwrap()
}

/// An adaptive scheduler that also records the probe it is given.
struct Recording {
    inner: AdaptiveScheduler,
    seen: Arc<Mutex<Option<ProbeOutcome>>>,
}

impl StageScheduler for Recording {
    fn plan(&self, num_layers: usize, total_rounds: usize) -> devft::Result<Vec<Stage>> {
        self.inner.plan(num_layers, total_rounds)
    }
    fn probe_capacities(&self, num_layers: usize) -> Vec<usize> {
        self.inner.probe_capacities(num_layers)
    }
    fn after_probe(&self, probe: &ProbeOutcome, plan: Vec<Stage>) -> Vec<Stage> {
        *self.seen.lock().unwrap() = Some(probe.clone());
        self.inner.after_probe(probe, plan)
    }
}

#[test]
fn the_probe_reports_the_sampled_clients_submodel_losses_and_sets_the_plan() {
    let seen = Arc::new(Mutex::new(None));
    let scheduler = Recording {
        inner: AdaptiveScheduler::new()
            .with_candidates(vec![0.25, 0.5])
            .with_tolerance(0.5),
        seen: seen.clone(),
    };
    let outcome = run(Box::new(scheduler), config(4));
    let probe = seen
        .lock()
        .unwrap()
        .clone()
        .expect("the scheduler saw a probe");

    // The same losses, computed directly on the probed clients' first 8 examples.
    let probed: Vec<usize> = outcome
        .ledger
        .entries
        .iter()
        .filter(|e| e.round == 0)
        .map(|e| e.client)
        .collect();
    assert_eq!(probed.len(), 3);
    let (clients, _) = tiny_federated_data();
    let model = tiny_lora_model();
    let fuser = DifferentialFuser::default();
    let mut expected = Vec::new();
    for k in [2, 4, 8] {
        let grouping = if k == 8 {
            Grouping::singletons(8)
        } else {
            SpectralGrouper::new().group(&model, k).unwrap()
        };
        let (mut total, mut targets) = (0.0, 0usize);
        for &c in &probed {
            let examples = &clients[c][..8.min(clients[c].len())];
            let n: usize = examples
                .iter()
                .map(|e| e.targets.iter().skip(1).filter(|&&t| t).count())
                .sum();
            total += submodel_loss(&model, &grouping, &fuser, examples, 8, 0).unwrap() * n as f64;
            targets += n;
        }
        expected.push(total / targets as f64);
    }
    let measured: Vec<f64> = probe.losses.iter().map(|(_, l)| *l).collect();
    assert_eq!(
        probe.losses.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
        [2, 4]
    );
    for (m, e) in measured.iter().chain([&probe.full_loss]).zip(&expected) {
        assert!((m - e).abs() < 1e-9, "probe {m}, direct {e}");
    }

    // The plan starts at the smallest candidate within 50% of the full model's loss.
    let first = [2, 4]
        .into_iter()
        .zip(&expected)
        .find(|(_, l)| **l <= expected[2] * 1.5)
        .map_or(8, |(k, _)| k);
    assert_eq!(outcome.metrics[0].capacity, first);
    let first_round = &outcome.metrics[0];
    assert!(
        first_round
            .schedule
            .as_deref()
            .is_some_and(|s| s.starts_with("probe: ")),
        "{:?}",
        first_round.schedule
    );
    assert!(first_round.bytes_probe_up.total > 0 && first_round.bytes_probe_down.total > 0);
    assert!(
        outcome.metrics[1..]
            .iter()
            .all(|m| m.bytes_probe_up.total == 0)
    );
    assert_eq!(outcome.metrics.len(), 4);
}

/// Ends stage 0 after its first round.
struct Impatient;

impl StageScheduler for Impatient {
    fn plan(&self, num_layers: usize, total_rounds: usize) -> devft::Result<Vec<Stage>> {
        ExplicitScheduler::capacities(vec![2, num_layers]).plan(num_layers, total_rounds)
    }
    fn ends_early(&self, progress: &StageProgress<'_>) -> bool {
        assert!(progress.train_losses.iter().all(Option::is_some));
        progress.index == 0 && progress.train_losses.len() == 1
    }
}

#[test]
fn a_stage_ended_early_gives_its_rounds_to_the_next_and_evaluation_follows_eval_every() {
    let outcome = run(Box::new(Impatient), config(6).with_eval_every(4));
    let capacities: Vec<usize> = outcome.metrics.iter().map(|m| m.capacity).collect();
    assert_eq!(capacities, [2, 8, 8, 8, 8, 8]);
    let note = outcome.metrics[0].schedule.as_deref().unwrap_or_default();
    assert!(note.contains("ended after 1 of 3 rounds"), "{note}");
    assert!(note.ends_with("plan 2x1, 8x5"), "{note}");
    assert!(outcome.metrics[1..].iter().all(|m| m.schedule.is_none()));
    // Evaluated: the end of stage 1 (round 1), every 4th round, and the last.
    let evaluated: Vec<usize> = outcome
        .metrics
        .iter()
        .filter(|m| m.eval_loss.is_some())
        .map(|m| m.round)
        .collect();
    assert_eq!(evaluated, [1, 4, 6]);
    assert!(
        outcome
            .metrics
            .iter()
            .all(|m| m.eval_loss.is_some() == (m.eval_seconds > 0.0))
    );
}

#[test]
fn without_a_probe_or_early_end_the_run_follows_its_plan() {
    let outcome = run(
        Box::new(ExplicitScheduler::capacities(vec![2, 8])),
        config(4),
    );
    let capacities: Vec<usize> = outcome.metrics.iter().map(|m| m.capacity).collect();
    assert_eq!(capacities, [2, 2, 8, 8]);
    assert!(outcome.ledger.entries.iter().all(|e| e.round > 0));
    assert!(
        outcome
            .metrics
            .iter()
            .all(|m| m.schedule.is_none() && m.eval_loss.is_some())
    );
}
