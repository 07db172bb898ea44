//! The federated loop on the tiny fixture model and the in-repo instruction data: DevFT and
//! FedIT both learn, DevFT's first stage sends capacity/layers of FedIT's bytes, a killed run
//! resumes bit for bit, and faulty clients are survived.

mod common;

use common::*;
use devft::aggregate::{FedAvg, FedProx};
use devft::data::{ByteEncoder, TokenizedExample, load_alpaca, partition_iid, tokenize_examples};
use devft::federated::{
    Fault, FederatedConfig, FederatedRun, LocalTrainingConfig, RandomFailures, RoundMetrics,
    RunOutcome, Strategy, evaluate_loss,
};
use devft::fusion::DifferentialFuser;
use devft::grouping::SpectralGrouper;
use devft::model::{CausalLm, LoraConfig};
use devft::schedule::ExplicitScheduler;
use devft::tokenizer::PromptTemplate;

fn data() -> (Vec<Vec<TokenizedExample>>, Vec<TokenizedExample>) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/data/tiny_instructions.jsonl"
    );
    let examples = load_alpaca(path, PromptTemplate::Alpaca).unwrap();
    let tokenized = tokenize_examples(&examples, &ByteEncoder, 64).unwrap();
    let (eval, train) = tokenized.split_at(24);
    let parts = partition_iid(train.len(), 6, 0).unwrap();
    let clients = parts
        .iter()
        .map(|p| p.iter().map(|&i| train[i].clone()).collect())
        .collect();
    (clients, eval.to_vec())
}

fn model() -> CausalLm {
    CausalLm::load(tiny_llama_dir(), &device())
        .unwrap()
        .with_lora(&LoraConfig::new(4, 8.0), 0)
        .unwrap()
}

fn config(rounds: usize) -> FederatedConfig {
    let local = LocalTrainingConfig::new()
        .with_learning_rate(5e-3)
        .with_local_steps(3)
        .with_batch_size(4);
    FederatedConfig::new(rounds, local)
        .with_clients_per_round(3)
        .with_seed(11)
}

fn devft_three_stages() -> Strategy {
    Strategy {
        scheduler: Box::new(ExplicitScheduler::capacities(vec![2, 4, 8])),
        grouper: Box::new(SpectralGrouper::new()),
        fuser: Box::new(DifferentialFuser::default()),
    }
}

fn run(
    strategy: Strategy,
    config: FederatedConfig,
    configure: impl FnOnce(FederatedRun) -> FederatedRun,
) -> RunOutcome {
    let (clients, eval) = data();
    let mut run =
        configure(FederatedRun::new(config, strategy, Box::new(FedAvg), clients, eval).unwrap());
    run.run(model(), &device().autodiff()).unwrap()
}

fn initial_eval_loss() -> f64 {
    let (_, eval) = data();
    evaluate_loss(&model(), &eval, 8, 0).unwrap()
}

/// Metrics without the wall-clock time, which no two runs share.
fn timeless(metrics: &[RoundMetrics]) -> Vec<RoundMetrics> {
    metrics
        .iter()
        .cloned()
        .map(|m| RoundMetrics {
            wall_seconds: 0.0,
            ..m
        })
        .collect()
}

#[test]
fn devft_and_fedit_both_learn_and_devft_stage_one_sends_a_quarter() {
    let before = initial_eval_loss();
    let devft = run(devft_three_stages(), config(6), |r| r);
    let fedit = run(Strategy::fedit(), config(6), |r| r);
    assert!(devft.completed && fedit.completed);
    let capacities: Vec<usize> = devft.metrics.iter().map(|m| m.capacity).collect();
    assert_eq!(capacities, [2, 2, 4, 4, 8, 8]);
    for (name, outcome) in [("devft", &devft), ("fedit", &fedit)] {
        let after = outcome.metrics.last().unwrap().eval_loss.unwrap();
        assert!(
            after < before - 0.1,
            "{name}: eval loss {before} -> {after}"
        );
        // The returned model carries the learning: evaluate it independently of the loop.
        let (_, eval) = data();
        let direct = evaluate_loss(&outcome.model, &eval, 8, 0).unwrap();
        assert!((direct - after).abs() < 1e-5, "{name}: {direct} vs {after}");
    }
    for round in 0..2 {
        let (d, f) = (&devft.metrics[round], &fedit.metrics[round]);
        assert!(d.clients_failed.is_empty() && f.clients_failed.is_empty());
        assert_eq!(
            d.bytes_up.payload * 8,
            f.bytes_up.payload * 2,
            "round {}",
            round + 1
        );
        assert_eq!(d.bytes_down.payload * 8, f.bytes_down.payload * 2);
    }
    let (up, down) = devft.ledger.totals();
    assert!(up.total >= up.payload && down.total >= down.payload && up.payload > 0);
}

#[test]
fn a_killed_run_resumes_bit_for_bit() {
    let straight = run(devft_three_stages(), config(6), |r| r);
    for stop in [1, 2, 3] {
        let dir = tempfile::tempdir().unwrap();
        let metrics = dir.path().join("metrics.jsonl");
        let first = run(devft_three_stages(), config(6), |r| {
            r.with_checkpoints(dir.path())
                .with_metrics_file(&metrics)
                .stop_after_round(stop)
        });
        assert!(!first.completed);
        assert_eq!(first.metrics.len(), stop);
        let resumed = run(devft_three_stages(), config(6), |r| {
            r.with_checkpoints(dir.path()).with_metrics_file(&metrics)
        });
        assert!(resumed.completed);
        assert_eq!(
            resumed.model.lora_params(),
            straight.model.lora_params(),
            "stopped after {stop}"
        );
        assert_eq!(
            timeless(&resumed.metrics),
            timeless(&straight.metrics),
            "stopped after {stop}"
        );
        assert_eq!(resumed.ledger, straight.ledger);
        let lines = std::fs::read_to_string(&metrics).unwrap();
        assert_eq!(
            lines.lines().count(),
            6,
            "one JSON line per round across both runs"
        );
        let parsed: RoundMetrics = serde_json::from_str(lines.lines().last().unwrap()).unwrap();
        assert_eq!(parsed.round, 6);
    }
}

#[test]
fn training_improves_with_thirty_percent_of_clients_failing() {
    let before = initial_eval_loss();
    let outcome = run(
        Strategy::fedit(),
        config(6).with_clients_per_round(4),
        |r| r.with_faults(RandomFailures { rate: 0.3, seed: 5 }),
    );
    let failures: usize = outcome.metrics.iter().map(|m| m.clients_failed.len()).sum();
    assert!(failures >= 3, "only {failures} failures injected");
    let after = outcome.metrics.last().unwrap().eval_loss.unwrap();
    assert!(after < before - 0.1, "eval loss {before} -> {after}");
}

#[test]
fn bad_updates_are_rejected_and_named() {
    let faults = |round: usize, client: usize| -> Option<Fault> {
        if round != 1 {
            return None;
        }
        match client {
            0 => Some(Fault::NanUpdate),
            1 => Some(Fault::TruncatedUpdate),
            2 => Some(Fault::OversizedUpdate),
            _ => None,
        }
    };
    let outcome = run(
        Strategy::fedit(),
        config(2).with_clients_per_round(6),
        |r| r.with_faults(faults),
    );
    let first = &outcome.metrics[0];
    assert!(first.aggregated, "the three good clients were aggregated");
    let reason = |c: usize| {
        first
            .clients_failed
            .iter()
            .find(|(id, _)| *id == c)
            .map(|(_, r)| r.clone())
    };
    assert!(
        reason(0).is_some_and(|r| r.contains("non-finite") && r.contains("client 0")),
        "{:?}",
        reason(0)
    );
    assert!(
        reason(1).is_some_and(|r| r.contains("malformed") && r.contains("client 1")),
        "{:?}",
        reason(1)
    );
    assert!(
        reason(2).is_some_and(|r| r.contains("more than") && r.contains("client 2")),
        "{:?}",
        reason(2)
    );
    assert_eq!(first.clients_failed.len(), 3);
    assert!(outcome.metrics[1].clients_failed.is_empty());
}

#[test]
fn too_few_successful_clients_keep_the_global_unchanged() {
    let all_fail = |_: usize, _: usize| Some(Fault::DropOut);
    let before = model().lora_params();
    let outcome = run(
        Strategy::fedit(),
        config(2).with_min_successful_clients(2),
        |r| r.with_faults(all_fail),
    );
    assert!(outcome.metrics.iter().all(|m| !m.aggregated));
    assert_eq!(outcome.model.lora_params(), before);
}

#[test]
fn fedprox_runs_through_the_aggregator_trait() {
    let (clients, eval) = data();
    let before = initial_eval_loss();
    let mut run = FederatedRun::new(
        config(4),
        devft_three_stages_short(),
        Box::new(FedProx::new(0.1).unwrap()),
        clients,
        eval,
    )
    .unwrap();
    let outcome = run.run(model(), &device().autodiff()).unwrap();
    assert!(outcome.metrics.last().unwrap().eval_loss.unwrap() < before);
}

fn devft_three_stages_short() -> Strategy {
    Strategy {
        scheduler: Box::new(ExplicitScheduler::capacities(vec![2, 8])),
        ..devft_three_stages()
    }
}

#[test]
fn invalid_run_settings_are_rejected() {
    let (clients, eval) = data();
    let err = FederatedRun::new(
        config(4).with_clients_per_round(7),
        Strategy::fedit(),
        Box::new(FedAvg),
        clients.clone(),
        eval.clone(),
    );
    assert!(matches!(err, Err(devft::Error::InvalidArgument(_))));
    let err = FederatedRun::new(
        config(0),
        Strategy::fedit(),
        Box::new(FedAvg),
        clients.clone(),
        eval.clone(),
    );
    assert!(matches!(err, Err(devft::Error::InvalidArgument(_))));
    let err = FederatedRun::new(config(4), Strategy::fedit(), Box::new(FedAvg), vec![], eval);
    assert!(matches!(err, Err(devft::Error::InvalidArgument(_))));
    // A schedule with more stages than rounds fails at planning time.
    let mut run = FederatedRun::new(
        config(2),
        devft_three_stages(),
        Box::new(FedAvg),
        clients,
        data().1,
    )
    .unwrap();
    assert!(matches!(
        run.run(model(), &device().autodiff()),
        Err(devft::Error::InvalidArgument(_))
    ));
}

#[test]
fn fedsa_lora_sends_only_a_keeps_b_per_client_and_resumes_exactly() {
    use devft::aggregate::{FedSaLora, is_lora_a};
    let before = initial_eval_loss();
    let a_values: usize = model()
        .lora_params()
        .iter()
        .filter(|(n, _)| is_lora_a(n))
        .map(|(_, t)| t.len())
        .sum();
    let (clients, eval) = data();
    let fresh = || {
        FederatedRun::new(
            config(4),
            Strategy::fedit(),
            Box::new(FedSaLora),
            clients.clone(),
            eval.clone(),
        )
        .unwrap()
    };
    let straight = fresh().run(model(), &device().autodiff()).unwrap();
    for m in &straight.metrics {
        assert_eq!(
            m.bytes_up.payload,
            (3 * 4 * a_values) as u64,
            "round {}: only A goes up",
            m.round
        );
    }
    let after = straight.metrics.last().unwrap().eval_loss.unwrap();
    assert!(after < before - 0.05, "eval loss {before} -> {after}");

    let dir = tempfile::tempdir().unwrap();
    let first = fresh()
        .with_checkpoints(dir.path())
        .stop_after_round(2)
        .run(model(), &device().autodiff())
        .unwrap();
    assert!(!first.completed);
    let resumed = fresh()
        .with_checkpoints(dir.path())
        .run(model(), &device().autodiff())
        .unwrap();
    assert_eq!(resumed.model.lora_params(), straight.model.lora_params());
    assert_eq!(timeless(&resumed.metrics), timeless(&straight.metrics));
}
