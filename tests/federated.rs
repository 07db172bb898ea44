//! The federated loop on the tiny fixture model and the in-repo instruction data: DevFT and
//! FedIT both learn, DevFT's first stage sends capacity/layers of FedIT's bytes, a killed run
//! resumes bit for bit, faulty clients are survived, and FLoRA's stacked aggregate is merged
//! exactly.

mod common;

use common::*;
use devft::aggregate::{Aggregator, ClientUpdate, FedAvg, FedProx, Flora};
use devft::federated::{
    Fault, FederatedConfig, FederatedRun, RandomFailures, RoundMetrics, RunOutcome, Strategy,
    evaluate_loss,
};
use devft::fusion::DifferentialFuser;
use devft::grouping::{Grouping, SpectralGrouper};
use devft::model::{CausalLm, LoraConfig};
use devft::schedule::ExplicitScheduler;
use devft::transfer::{build_submodel, transfer_merged_weights};
use devft::{HostTensor, ParamMap};

fn model() -> CausalLm {
    tiny_lora_model()
}

fn config(rounds: usize) -> FederatedConfig {
    tiny_config(rounds, 3, 11)
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
    let (clients, eval) = tiny_federated_data();
    let mut run =
        configure(FederatedRun::new(config, strategy, Box::new(FedAvg), clients, eval).unwrap());
    run.run(model(), &device().autodiff()).unwrap()
}

fn initial_eval_loss() -> f64 {
    let (_, eval) = tiny_federated_data();
    evaluate_loss(&model(), &eval, 8, 0).unwrap()
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
        let (_, eval) = tiny_federated_data();
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
        assert_same_traffic(&resumed.ledger, &straight.ledger);
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
    let (clients, eval) = tiny_federated_data();
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
    let (clients, eval) = tiny_federated_data();
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
        tiny_federated_data().1,
    )
    .unwrap();
    assert!(matches!(
        run.run(model(), &device().autodiff()),
        Err(devft::Error::InvalidArgument(_))
    ));
}

/// Runs `fresh()` with checkpoints until it stops after round `stop`, then resumes it in a
/// new run to the end.
fn stop_and_resume(fresh: impl Fn() -> FederatedRun, stop: usize) -> RunOutcome {
    let dir = tempfile::tempdir().unwrap();
    let first = fresh()
        .with_checkpoints(dir.path())
        .stop_after_round(stop)
        .run(model(), &device().autodiff())
        .unwrap();
    assert!(!first.completed);
    assert_eq!(first.metrics.len(), stop);
    let resumed = fresh()
        .with_checkpoints(dir.path())
        .run(model(), &device().autodiff())
        .unwrap();
    assert!(resumed.completed);
    resumed
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
    let (clients, eval) = tiny_federated_data();
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

    let resumed = stop_and_resume(fresh, 2);
    assert_eq!(resumed.model.lora_params(), straight.model.lora_params());
    assert_eq!(timeless(&resumed.metrics), timeless(&straight.metrics));
}

/// Every tensor of `params` refilled with deterministic values in `[-scale, scale)`.
fn pseudo_random(params: &ParamMap, seed: u64, scale: f32) -> ParamMap {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    params
        .iter()
        .map(|(name, t)| {
            let values = (0..t.len())
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
                })
                .collect();
            (
                name.to_string(),
                HostTensor::new(t.shape().to_vec(), values).unwrap(),
            )
        })
        .collect()
}

/// `[rows, cols]` row-major product of `x: [rows, inner]` and `y: [inner, cols]`, in f64.
fn matmul(x: &HostTensor, y: &HostTensor) -> Vec<f64> {
    let (rows, inner, cols) = (x.shape()[0], x.shape()[1], y.shape()[1]);
    let mut out = vec![0.0; rows * cols];
    for i in 0..rows {
        for k in 0..inner {
            let xv = f64::from(x.values()[i * inner + k]);
            for j in 0..cols {
                out[i * cols + j] += xv * f64::from(y.values()[k * cols + j]);
            }
        }
    }
    out
}

#[test]
fn flora_merges_the_example_weighted_sum_of_client_products() {
    let base = model();
    let scaling = base.lora_config().unwrap().scaling();
    let global = base.lora_params();
    let sizes = [1, 2, 5];
    let updates: Vec<ClientUpdate> = sizes
        .iter()
        .enumerate()
        .map(|(k, &n)| ClientUpdate {
            client: k,
            params: pseudo_random(&global, k as u64 + 1, 0.5),
            num_examples: n,
            metrics: Default::default(),
        })
        .collect();
    let stacked = Flora.aggregate(&global, &updates).unwrap();
    let mut merged = base.clone();
    merged.merge_adapter(&stacked).unwrap();

    // W + s * sum_k p_k B_k A_k, by hand, in PEFT layout (W: [out, in], A: [r, in], B: [out, r]).
    let before = base.projection_weights();
    let after = merged.projection_weights();
    let total: f64 = sizes.iter().sum::<usize>() as f64;
    let mut checked = 0;
    for (name, weight) in before.iter() {
        let stem = name.strip_suffix(".weight").unwrap();
        let a_name = format!("{stem}.lora_A.weight");
        let b_name = format!("{stem}.lora_B.weight");
        let mut expected: Vec<f64> = weight.values().iter().map(|&w| f64::from(w)).collect();
        for (update, &n) in updates.iter().zip(&sizes) {
            let product = matmul(
                update.params.get(&b_name).unwrap(),
                update.params.get(&a_name).unwrap(),
            );
            for (e, p) in expected.iter_mut().zip(product) {
                *e += scaling * n as f64 / total * p;
            }
        }
        let diff = max_abs_diff(after.get(name).unwrap().values(), &expected);
        assert!(diff < 1e-5, "{name}: {diff}");
        checked += 1;
    }
    assert_eq!(checked, 7 * base.num_layers());
}

#[test]
fn a_merged_adapter_gives_the_logits_of_the_adapter() {
    let mut with_adapter = model();
    let trained = pseudo_random(&with_adapter.lora_params(), 7, 0.3);
    with_adapter.load_lora_params(&trained).unwrap();
    let ids = id_tensor(&[1, 5, 9, 33, 2, 17], &device());
    let expected = values(with_adapter.forward(ids.clone()));

    let mut merged = with_adapter.clone();
    merged.merge_adapter(&trained).unwrap();
    let zero_b: ParamMap = trained
        .iter()
        .map(|(name, t)| {
            let t = if name.contains(".lora_B.") {
                HostTensor::zeros(t.shape().to_vec())
            } else {
                t.clone()
            };
            (name.to_string(), t)
        })
        .collect();
    merged.load_lora_params(&zero_b).unwrap();
    let found = values(merged.forward(ids));
    let expected: Vec<f64> = expected.iter().map(|&v| f64::from(v)).collect();
    let diff = max_abs_diff(&found, &expected);
    assert!(diff < 1e-4, "max logit difference {diff}");
    // The merge really changed the weights (the adapter is not negligible).
    assert_ne!(
        merged.projection_weights(),
        with_adapter.projection_weights()
    );
}

#[test]
fn merged_weights_transfer_to_every_member_of_their_group() {
    let base = model();
    let grouping = Grouping::new(vec![vec![0, 3, 4], vec![1, 2], vec![5, 6, 7]], 8).unwrap();
    let fused = build_submodel(&base, &grouping, &DifferentialFuser::default()).unwrap();
    let mut trained = fused.clone();
    // A rank-2 pair per projection of the submodel, merged.
    let rank2 = fused
        .clone()
        .with_lora(&LoraConfig::new(2, 8.0), 3)
        .unwrap()
        .lora_params();
    trained
        .merge_adapter(&pseudo_random(&rank2, 5, 0.2))
        .unwrap();
    let mut full = base.clone();
    transfer_merged_weights(&mut full, &fused, &trained, &grouping).unwrap();

    let (before, after) = (base.projection_weights(), full.projection_weights());
    let (fused_w, trained_w) = (fused.projection_weights(), trained.projection_weights());
    for (g, group) in grouping.groups().iter().enumerate() {
        for &member in group {
            for (name, weight) in before.iter() {
                let Some(inner) = name.strip_prefix(&format!("model.layers.{member}.")) else {
                    continue;
                };
                let sub = format!("model.layers.{g}.{inner}");
                let expected: Vec<f64> = weight
                    .values()
                    .iter()
                    .zip(trained_w.get(&sub).unwrap().values())
                    .zip(fused_w.get(&sub).unwrap().values())
                    .map(|((&w, &t), &f)| f64::from(w) + f64::from(t) - f64::from(f))
                    .collect();
                let diff = max_abs_diff(after.get(name).unwrap().values(), &expected);
                assert!(diff < 1e-6, "{name}: {diff}");
                assert_ne!(after.get(name), before.get(name), "{name} changed");
            }
        }
    }
    assert_eq!(full.lora_params(), base.lora_params(), "adapters untouched");
}

#[test]
fn flora_learns_in_the_devft_loop_sends_the_stack_down_and_resumes_bit_for_bit() {
    let before = initial_eval_loss();
    let per_layer_values = model().lora_params().num_values() / 8;
    let (clients, eval) = tiny_federated_data();
    let fresh = || {
        FederatedRun::new(
            config(6),
            devft_three_stages(),
            Box::new(Flora),
            clients.clone(),
            eval.clone(),
        )
        .unwrap()
    };
    let straight = fresh().run(model(), &device().autodiff()).unwrap();
    assert!(straight.completed);
    for (i, m) in straight.metrics.iter().enumerate() {
        let adapter = 4 * per_layer_values * m.capacity;
        // A stage's first round sends the adapter; later rounds also the stack of the
        // previous round's three clients.
        let first_of_stage = i == 0 || straight.metrics[i - 1].stage != m.stage;
        let per_client = if first_of_stage { adapter } else { 4 * adapter };
        assert_eq!(
            m.bytes_down.payload,
            (3 * per_client) as u64,
            "round {}",
            m.round
        );
        assert_eq!(
            m.bytes_up.payload,
            (3 * adapter) as u64,
            "round {}",
            m.round
        );
    }
    let after = straight.metrics.last().unwrap().eval_loss.unwrap();
    assert!(after < before - 0.05, "eval loss {before} -> {after}");
    assert_ne!(
        straight.model.projection_weights(),
        model().projection_weights(),
        "FLoRA trains through the base weights"
    );

    for stop in [1, 2, 3] {
        let resumed = stop_and_resume(fresh, stop);
        assert_eq!(
            resumed.model.projection_weights(),
            straight.model.projection_weights(),
            "stopped after {stop}"
        );
        assert_eq!(resumed.model.lora_params(), straight.model.lora_params());
        assert_eq!(timeless(&resumed.metrics), timeless(&straight.metrics));
        assert_same_traffic(&resumed.ledger, &straight.ledger);
    }
}

#[test]
fn absurd_finite_updates_are_rejected_and_do_not_poison_the_adapter() {
    let faults =
        |round: usize, client: usize| (round == 1 && client == 0).then_some(Fault::HugeUpdate);
    let outcome = run(
        Strategy::fedit(),
        config(2).with_clients_per_round(6),
        |r| r.with_faults(faults),
    );
    let first = &outcome.metrics[0];
    assert!(first.aggregated);
    let reasons: Vec<&String> = first.clients_failed.iter().map(|(_, r)| r).collect();
    assert!(
        matches!(reasons.as_slice(), [r] if r.contains("client 0") && r.contains("norm")),
        "{reasons:?}"
    );
    assert!(
        outcome
            .model
            .lora_params()
            .iter()
            .all(|(_, t)| t.is_finite())
    );
    assert!(
        outcome
            .metrics
            .iter()
            .all(|m| m.eval_loss.unwrap().is_finite())
    );
    // The bound is configurable: turned off, the same update passes and poisons the adapter.
    let unbounded = run(
        Strategy::fedit(),
        config(1)
            .with_clients_per_round(6)
            .with_max_update_norm_factor(f64::INFINITY),
        |r| r.with_faults(faults),
    );
    assert!(unbounded.metrics[0].clients_failed.is_empty());
    let largest = unbounded
        .model
        .lora_params()
        .iter()
        .flat_map(|(_, t)| t.values().to_vec())
        .fold(0f32, |m, v| m.max(v.abs()));
    assert!(largest > 1e37, "{largest}");
}

/// A DevFT run (capacities 2 then 8, 2 rounds each) stopped mid-stage after round 1, with
/// its checkpoint directory; `edit` changes the checkpoint's `state.json` before resuming,
/// and the resume's result is returned.
fn resume_after_editing(
    edit: impl FnOnce(&std::path::Path, &mut serde_json::Value),
) -> devft::Result<RunOutcome> {
    let dir = tempfile::tempdir().unwrap();
    let fresh = || {
        let (clients, eval) = tiny_federated_data();
        FederatedRun::new(
            config(4),
            devft_three_stages_short(),
            Box::new(FedAvg),
            clients,
            eval,
        )
        .unwrap()
        .with_checkpoints(dir.path())
    };
    let first = fresh()
        .stop_after_round(1)
        .run(model(), &device().autodiff())
        .unwrap();
    assert!(!first.completed);
    let latest = std::fs::read_to_string(dir.path().join("LATEST")).unwrap();
    let state_path = dir.path().join(latest.trim()).join("state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    edit(dir.path(), &mut state);
    std::fs::write(&state_path, serde_json::to_string(&state).unwrap()).unwrap();
    fresh().run(model(), &device().autodiff())
}

fn assert_invalid_checkpoint(result: devft::Result<RunOutcome>, needle: &str) {
    match result {
        Err(devft::Error::InvalidCheckpoint { reason, .. }) => {
            assert!(reason.contains(needle), "{reason}")
        }
        other => panic!("expected an invalid checkpoint ({needle}), got {other:?}"),
    }
}

#[test]
fn an_unedited_checkpoint_resumes() {
    let outcome = resume_after_editing(|_, _| {}).unwrap();
    assert!(outcome.completed);
    assert_eq!(outcome.metrics.len(), 4);
}

#[test]
fn resume_refuses_counters_that_disagree_with_the_plan() {
    // Once these overflowed (usize::MAX), spun forever (more rounds in the stage than it
    // has), or reported a finished run that trained nothing (stage 99).
    assert_invalid_checkpoint(
        resume_after_editing(|_, s| s["rounds_done"] = u64::MAX.into()),
        "rounds done",
    );
    assert_invalid_checkpoint(
        resume_after_editing(|_, s| s["rounds_done_in_stage"] = 5.into()),
        "rounds done in stage 0",
    );
    assert_invalid_checkpoint(
        resume_after_editing(|_, s| s["stage"] = 99.into()),
        "stage 99 does not exist",
    );
}

#[test]
fn resume_refuses_plans_that_do_not_fit_the_run() {
    // A stage without rounds once spun forever; a stored plan of 10^12 rounds trained
    // without end; an empty plan reported a finished run.
    assert_invalid_checkpoint(
        resume_after_editing(|_, s| s["plan"][1]["rounds"] = 0.into()),
        "has no rounds",
    );
    assert_invalid_checkpoint(
        resume_after_editing(|_, s| s["plan"][1]["rounds"] = 1_000_000_000_000u64.into()),
        "the budget is 4",
    );
    assert_invalid_checkpoint(
        resume_after_editing(|_, s| s["plan"] = serde_json::json!([])),
        "at least one stage",
    );
}

#[test]
fn resume_refuses_a_grouping_outside_the_model() {
    let err = resume_after_editing(|_, s| s["grouping"]["groups"][0][0] = 99.into()).unwrap_err();
    assert!(
        matches!(&err, devft::Error::Json { source, .. } if source.to_string().contains("layer 99 is out of range")),
        "{err}"
    );
    // A valid partition, but of other layers than the model's.
    assert_invalid_checkpoint(
        resume_after_editing(|_, s| s["grouping"] = serde_json::json!({"groups": [[0], [1]]})),
        "covers 2 layers",
    );
}

#[test]
fn resume_refuses_a_missing_or_foreign_latest() {
    assert_invalid_checkpoint(
        resume_after_editing(|dir, _| std::fs::remove_file(dir.join("LATEST")).unwrap()),
        "no `LATEST`",
    );
    assert_invalid_checkpoint(
        resume_after_editing(|dir, _| std::fs::write(dir.join("LATEST"), "../elsewhere").unwrap()),
        "not a round directory",
    );
}

#[test]
fn a_scheduler_planning_a_stage_without_rounds_is_refused_before_training() {
    use devft::schedule::{Stage, StageScheduler};
    struct ZeroRounds;
    impl StageScheduler for ZeroRounds {
        fn plan(&self, num_layers: usize, total_rounds: usize) -> devft::Result<Vec<Stage>> {
            Ok(vec![
                Stage {
                    capacity: 2,
                    rounds: 0,
                },
                Stage {
                    capacity: num_layers,
                    rounds: total_rounds,
                },
            ])
        }
    }
    let (clients, eval) = tiny_federated_data();
    let strategy = Strategy {
        scheduler: Box::new(ZeroRounds),
        ..devft_three_stages()
    };
    let mut run = FederatedRun::new(config(2), strategy, Box::new(FedAvg), clients, eval).unwrap();
    let err = run.run(model(), &device().autodiff()).unwrap_err();
    assert!(
        matches!(&err, devft::Error::InvalidArgument(m) if m.contains("no rounds")),
        "{err}"
    );
}

#[test]
fn dp_over_flora_merges_like_flora_and_boxed_aggregators_are_aggregators() {
    use devft::aggregate::DpFixedClipping;
    fn assert_send<T: Send>(_: &T) {}
    let (clients, eval) = tiny_federated_data();
    let run_with = |aggregator: Box<dyn Aggregator>| {
        assert_send(&aggregator);
        FederatedRun::new(
            config(4),
            devft_three_stages_short(),
            aggregator,
            clients.clone(),
            eval.clone(),
        )
        .unwrap()
        .run(model(), &device().autodiff())
        .unwrap()
    };
    let flora = run_with(Box::new(Flora));
    // No noise and a clipping norm no update reaches: DP must change nothing, which it can
    // only if it forwards FLoRA's merging to the loop (once it failed with a shape mismatch).
    let inner: Box<dyn Aggregator> = Box::new(Flora);
    let dp = DpFixedClipping::new(inner, 0.0, 1e30, 3, 0).unwrap();
    assert!(dp.merges_into_base());
    let wrapped = run_with(Box::new(dp));
    // Equal up to the f64 round trip of DP's clipping, `g + (w - g)`.
    let largest_difference = |a: &ParamMap, b: &ParamMap| {
        assert_eq!(a.names().collect::<Vec<_>>(), b.names().collect::<Vec<_>>());
        a.iter()
            .flat_map(|(name, t)| t.values().iter().zip(b.get(name).unwrap().values()))
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    let weights = largest_difference(
        &wrapped.model.projection_weights(),
        &flora.model.projection_weights(),
    );
    let adapters = largest_difference(&wrapped.model.lora_params(), &flora.model.lora_params());
    assert!(weights < 1e-5 && adapters < 1e-5, "{weights} {adapters}");
    assert_ne!(
        flora.model.projection_weights(),
        model().projection_weights()
    );
}
