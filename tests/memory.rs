//! Client memory: the training memory estimate, the measured peak, and clients whose
//! declared budget leaves them out of the stages they cannot hold.

mod common;

use burn::module::Module;
use common::*;
use devft::aggregate::FedAvg;
use devft::federated::{
    FederatedConfig, FederatedRun, RunOutcome, Server, training_memory_estimate,
};

fn config() -> FederatedConfig {
    tiny_config(5, 1, 4).with_max_example_tokens(64)
}

/// The first stage's estimate, as the server computes it when it starts the stage.
fn first_stage_estimate() -> u64 {
    let (clients, _) = tiny_federated_data();
    let mut server = Server::new(
        config(),
        tiny_two_stages(),
        Box::new(FedAvg),
        tiny_lora_model(),
        clients.len(),
    )
    .unwrap();
    server.configure_round().unwrap();
    server.stage_memory_estimate().unwrap()
}

/// The full model's estimate for a batch of 4 examples of 64 tokens, counted here.
fn full_model_estimate() -> u64 {
    let model = tiny_lora_model();
    let params: usize = model.base_params().num_values() + model.lora_params().num_values();
    let trainable = model.lora_params().num_values() as u64;
    let config = model.config();
    let tokens = 4 * 64;
    let activations =
        tokens * 12 * config.hidden_size as u64 * 8 + tokens * 2 * config.vocab_size as u64;
    4 * (params as u64 + 3 * trainable + activations)
}

fn run_with_budgets(budgets: Vec<Option<u64>>) -> devft::Result<RunOutcome> {
    let (clients, eval) = tiny_federated_data();
    let mut run = FederatedRun::new(config(), tiny_two_stages(), Box::new(FedAvg), clients, eval)?
        .with_memory_budgets(budgets)?;
    run.run(tiny_lora_model(), &device().autodiff())
}

#[test]
fn the_estimate_counts_parameters_optimizer_state_and_activations() {
    let model = tiny_lora_model();
    assert_eq!(
        model.num_params(),
        model.base_params().num_values() + model.lora_params().num_values(),
        "the estimate's parameter count is every base and adapter value"
    );
    let trainable = model.lora_params().num_values();
    assert_eq!(
        training_memory_estimate(&model, trainable, 4 * 64, 4 * 64),
        full_model_estimate()
    );
}

#[test]
fn clients_whose_budget_is_below_a_stages_estimate_are_left_out_of_that_stage() {
    let small = first_stage_estimate();
    let full = full_model_estimate();
    assert!(
        small < full,
        "two fused layers need less than eight: {small} vs {full}"
    );
    let between = (small + full) / 2;
    let mut budgets = vec![None; 6];
    budgets[0] = Some(between);
    budgets[1] = Some(between);
    let outcome = run_with_budgets(budgets).unwrap();
    assert!(outcome.completed);
    let (first, second): (Vec<_>, Vec<_>) = outcome.metrics.iter().partition(|m| m.stage == 0);
    assert_eq!((first.len(), second.len()), (3, 2));
    for m in &first {
        assert!(
            m.clients_excluded.is_empty(),
            "round {}: {:?}",
            m.round,
            m.clients_excluded
        );
    }
    assert!(
        first
            .iter()
            .any(|m| m.clients_sampled.iter().any(|&c| c < 2)),
        "the small clients take part in the first stage"
    );
    for m in &second {
        let excluded: Vec<usize> = m.clients_excluded.iter().map(|(c, _)| *c).collect();
        assert_eq!(excluded, vec![0, 1], "round {}", m.round);
        assert!(
            m.clients_excluded[0].1.contains("memory budget"),
            "{:?}",
            m.clients_excluded
        );
        assert_eq!(m.clients_sampled.len(), 3);
        assert!(
            m.clients_sampled.iter().all(|&c| c >= 2),
            "{:?}",
            m.clients_sampled
        );
        assert!(m.aggregated);
    }
}

#[test]
fn a_stage_no_client_can_hold_is_a_clear_error() {
    let small = first_stage_estimate();
    let error = run_with_budgets(vec![Some(small); 6])
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("stage 2") && error.contains("memory"),
        "{error}"
    );
}

#[test]
fn budgets_must_name_every_client() {
    let (clients, eval) = tiny_federated_data();
    let run =
        FederatedRun::new(config(), tiny_two_stages(), Box::new(FedAvg), clients, eval).unwrap();
    assert!(run.with_memory_budgets(vec![None; 5]).is_err());
    let mut server = Server::new(
        config(),
        tiny_two_stages(),
        Box::new(FedAvg),
        tiny_lora_model(),
        6,
    )
    .unwrap();
    assert!(server.declare_memory_budget(6, Some(1)).is_err());
}

#[cfg(target_os = "linux")]
#[test]
fn the_measured_peak_reaches_the_metrics() {
    // Other tests of this binary reset the process's peak concurrently; a reset keeps what
    // is resident then, and the model always is.
    let outcome = run_with_budgets(vec![None; 6]).unwrap();
    let model_bytes = 4 * tiny_lora_model().num_params() as u64;
    for m in &outcome.metrics {
        let peak = m.peak_rss_bytes.expect("measured");
        assert!(
            peak >= model_bytes,
            "round {}: {peak} < {model_bytes}",
            m.round
        );
    }
}
