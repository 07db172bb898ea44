//! The server / client split, driven by hand the way a networked deployment drives it: every
//! client on its own device (its own `StageModel`), every message through bytes. The result
//! must be exactly the in-process `FederatedRun`'s, whose clients share one device; FLoRA's
//! merges must reach clients that missed rounds; aggregator failures are round data; federated
//! evaluation agrees with evaluating the server's model directly.

mod common;

use common::*;
use devft::aggregate::{Aggregator, FedAvg, FedSaLora, Flora, Krum};
use devft::federated::protocol::{
    DeviceState, EvaluateReply, Message, StageSetup, StartAdapter, TrainTask,
};
use devft::federated::{
    Client, Evaluation, FederatedConfig, FederatedRun, Ledger, RoundMetrics, Server, StageModel,
    Strategy, adapter_sha256, compact_start, evaluate_loss,
};
use devft::fusion::{DifferentialFuser, MeanFuser};
use devft::model::{CausalLm, LoraConfig};
use devft::transfer::{build_submodel, transfer_merge, transfer_merged_weights};
use devft::{HostTensor, ParamMap};

fn model() -> CausalLm {
    tiny_lora_model()
}

fn config(rounds: usize) -> FederatedConfig {
    // Samples clients 0, 3, 4, then 1, 2, 5, then 0, 1, 4: clients 0 and 4 miss round 2.
    tiny_config(rounds, 2, 4)
}

fn strategy() -> Strategy {
    tiny_two_stages()
}

struct Finished {
    model: CausalLm,
    ledger: Ledger,
    metrics: Vec<RoundMetrics>,
    /// The most merges one train task carried.
    most_merges_in_a_task: usize,
}

/// Every client's kept tensors of `stage` with its example count.
fn personal_of(clients: &[Client], stage: usize) -> Vec<(ParamMap, usize)> {
    clients
        .iter()
        .filter_map(|c| Some((c.personal(stage)?.clone(), c.examples().len())))
        .collect()
}

/// A run with one device per client, all traffic as bytes.
fn distributed(aggregator: Box<dyn Aggregator>) -> Finished {
    distributed_with(config(5), aggregator, Processes::Lasting)
}

/// How the clients' processes live.
#[derive(Clone, Copy, PartialEq)]
enum Processes {
    /// One process per client for the whole run.
    Lasting,
    /// A fresh process per message that keeps nothing (`stateless_clients`).
    Forgetful,
    /// A fresh process per message that restarts from the state the last one saved.
    Restarted,
}

/// [`distributed`] with `config` and clients' processes living as `processes` says.
fn distributed_with(
    config: FederatedConfig,
    aggregator: Box<dyn Aggregator>,
    processes: Processes,
) -> Finished {
    let (data, eval) = tiny_federated_data();
    let base = model();
    let mut server = Server::new(config, strategy(), aggregator, model(), data.len()).unwrap();
    let mut clients: Vec<Client> = data
        .into_iter()
        .enumerate()
        .map(|(id, examples)| Client::new(id, examples))
        .collect();
    let mut devices: Vec<Option<StageModel>> = vec![None; clients.len()];
    let fuser = DifferentialFuser::default();
    let mut most_merges_in_a_task = 0;
    while !server.is_finished() {
        let tasks = server.configure_round().unwrap();
        let mut replies = Vec::new();
        for task in &tasks.tasks {
            let device = &mut devices[task.client];
            if let Some(bytes) = &task.setup {
                let setup = StageSetup::from_bytes(bytes, usize::MAX, "server").unwrap();
                *device = Some(StageModel::build(&base, &setup, &fuser).unwrap());
            }
            let work = TrainTask::from_bytes(&task.task, usize::MAX, "server").unwrap();
            most_merges_in_a_task = most_merges_in_a_task.max(work.merges.merges.len());
            let reply = clients[task.client]
                .train(device.as_mut().unwrap(), &work, &device_autodiff())
                .unwrap();
            replies.push((task.client, Ok(reply.to_bytes().unwrap())));
            match processes {
                Processes::Lasting => {}
                Processes::Forgetful => *device = None,
                Processes::Restarted => {
                    let client = &mut clients[task.client];
                    let saved = client.state(device.as_ref().unwrap()).to_bytes().unwrap();
                    let state = DeviceState::from_bytes(&saved, usize::MAX, "self").unwrap();
                    let examples = client.examples().to_vec();
                    let (restored, stage) =
                        Client::restore(task.client, examples, state, &base, &fuser).unwrap();
                    *client = restored;
                    *device = Some(stage);
                }
            }
        }
        server.aggregate_round(replies).unwrap();
        let personal = personal_of(&clients, tasks.stage);
        let eval_model = server.evaluation_model(&personal).unwrap();
        let loss = evaluate_loss(&eval_model, &eval, 8, 0).unwrap();
        let evaluation = Evaluation { loss, seconds: 0.0 };
        server.finish_round(Some(evaluation), &personal).unwrap();
    }
    Finished {
        model: server.model().unwrap(),
        ledger: server.ledger().clone(),
        metrics: server.metrics().to_vec(),
        most_merges_in_a_task,
    }
}

fn device_autodiff() -> burn::tensor::Device {
    device().autodiff()
}

fn in_process(aggregator: Box<dyn Aggregator>) -> Finished {
    in_process_with(config(5), aggregator)
}

fn in_process_with(config: FederatedConfig, aggregator: Box<dyn Aggregator>) -> Finished {
    let (clients, eval) = tiny_federated_data();
    let outcome = FederatedRun::new(config, strategy(), aggregator, clients, eval)
        .unwrap()
        .run(model(), &device_autodiff())
        .unwrap();
    Finished {
        model: outcome.model,
        ledger: outcome.ledger,
        metrics: outcome.metrics,
        most_merges_in_a_task: 0,
    }
}

fn assert_same_run(distributed: &Finished, in_process: &Finished, name: &str) {
    assert_eq!(
        distributed.model.lora_params(),
        in_process.model.lora_params(),
        "{name}: adapters"
    );
    assert_eq!(
        distributed.model.projection_weights(),
        in_process.model.projection_weights(),
        "{name}: base weights"
    );
    assert_same_traffic(&distributed.ledger, &in_process.ledger);
    assert_eq!(
        timeless(&distributed.metrics),
        timeless(&in_process.metrics),
        "{name}: metrics"
    );
}

#[test]
fn clients_on_their_own_devices_give_the_in_process_run_exactly() {
    let before = model();
    for (name, make) in [
        (
            "fedavg",
            (|| Box::new(FedAvg)) as fn() -> Box<dyn Aggregator>,
        ),
        ("fedsa", || Box::new(FedSaLora)),
    ] {
        let apart = distributed(make());
        let together = in_process(make());
        assert_same_run(&apart, &together, name);
        assert_ne!(apart.model.lora_params(), before.lora_params(), "{name}");
        // Every sampled client new to a stage was sent its set-up once, counted apart from
        // the tasks; a stage's later rounds send set-ups only to clients new to it.
        let setup_per_stage: Vec<usize> = [0usize, 1]
            .iter()
            .map(|&stage| {
                let rounds: Vec<usize> = apart
                    .metrics
                    .iter()
                    .filter(|m| m.stage == stage)
                    .map(|m| m.round)
                    .collect();
                let mut seen = std::collections::BTreeSet::new();
                for m in apart.metrics.iter().filter(|m| rounds.contains(&m.round)) {
                    seen.extend(m.clients_sampled.iter().copied());
                }
                seen.len()
            })
            .collect();
        let setups: Vec<usize> = [0usize, 1]
            .iter()
            .map(|&stage| {
                apart
                    .ledger
                    .entries
                    .iter()
                    .filter(|e| e.setup.total > 0)
                    .filter(|e| apart.metrics[e.round - 1].stage == stage)
                    .count()
            })
            .collect();
        assert_eq!(setups, setup_per_stage, "{name}: set-ups sent");
    }
}

#[test]
fn flora_merges_reach_clients_that_missed_rounds() {
    let apart = distributed(Box::new(Flora));
    let together = in_process(Box::new(Flora));
    assert_same_run(&apart, &together, "flora");
    assert!(
        apart.most_merges_in_a_task >= 2,
        "no client caught up on missed merges (at most {})",
        apart.most_merges_in_a_task
    );
    assert_ne!(
        apart.model.projection_weights(),
        model().projection_weights()
    );
}

#[test]
fn clients_restarted_from_their_saved_state_give_the_same_run() {
    for (name, make) in [
        ("flora", (|| Box::new(Flora)) as fn() -> Box<dyn Aggregator>),
        ("fedsa", || Box::new(FedSaLora)),
    ] {
        let restarted = distributed_with(config(5), make(), Processes::Restarted);
        let together = in_process(make());
        assert_same_run(&restarted, &together, name);
    }
}

#[test]
fn stateless_clients_get_everything_in_every_task_and_the_same_result() {
    let stateless = || config(5).with_stateless_clients(true);
    let apart = distributed_with(stateless(), Box::new(Flora), Processes::Forgetful);
    let together = in_process_with(stateless(), Box::new(Flora));
    assert_same_run(&apart, &together, "stateless flora");
    // The same training as with stateful clients; only the traffic differs.
    let stateful = in_process(Box::new(Flora));
    assert_eq!(
        apart.model.projection_weights(),
        stateful.model.projection_weights()
    );
    assert_eq!(apart.model.lora_params(), stateful.model.lora_params());
    for (a, b) in apart.ledger.entries.iter().zip(&stateful.ledger.entries) {
        assert!(
            a.setup.total > 0,
            "round {}: every task has its set-up",
            a.round
        );
        assert!(a.down.total >= b.down.total && a.up.payload == b.up.payload);
    }
    // FedSA-LoRA keeps tensors on clients, which stateless clients cannot.
    let (clients, _) = tiny_federated_data();
    let refused = Server::new(
        stateless(),
        strategy(),
        Box::new(FedSaLora),
        model(),
        clients.len(),
    );
    assert!(matches!(refused, Err(devft::Error::InvalidArgument(_))));
}

#[test]
fn replaying_a_stages_merges_on_members_equals_transferring_the_trained_weights() {
    let full = model();
    let grouping =
        devft::grouping::Grouping::new(vec![vec![0, 3, 5], vec![1, 2, 4, 6, 7]], 8).unwrap();
    let fused = build_submodel(&full, &grouping, &DifferentialFuser::default()).unwrap();
    // Two merges of different ranks, with deterministic values.
    let merge = |rank: usize, seed: f32| -> ParamMap {
        fused
            .lora_params()
            .iter()
            .map(|(name, t)| {
                let shape = if name.contains("lora_A") {
                    vec![rank, t.shape()[1]]
                } else {
                    vec![t.shape()[0], rank]
                };
                let n = shape.iter().product::<usize>();
                let values = (0..n)
                    .map(|i| ((i as f32 * 0.37 + seed).sin()) * 0.05)
                    .collect();
                (name.to_string(), HostTensor::new(shape, values).unwrap())
            })
            .collect()
    };
    let merges = [merge(3, 0.5), merge(6, 1.5)];
    let mut trained = fused.clone();
    for m in &merges {
        trained.merge_adapter(m).unwrap();
    }
    let mut expected = full.clone();
    transfer_merged_weights(&mut expected, &fused, &trained, &grouping).unwrap();
    let mut replayed = full.clone();
    for m in &merges {
        transfer_merge(&mut replayed, &grouping, m).unwrap();
    }
    let (a, b) = (expected.projection_weights(), replayed.projection_weights());
    let mut largest = 0f32;
    for (name, t) in a.iter() {
        for (x, y) in t.values().iter().zip(b.get(name).unwrap().values()) {
            largest = largest.max((x - y).abs());
        }
    }
    assert!(largest < 1e-6, "largest difference {largest}");
    assert_ne!(a, full.projection_weights());
    let mut outside = ParamMap::new();
    outside.insert(
        "model.layers.2.self_attn.q_proj.lora_A.weight",
        HostTensor::zeros(vec![1, 1]),
    );
    assert!(transfer_merge(&mut replayed, &grouping, &outside).is_err());
}

#[test]
fn an_aggregator_failure_is_round_data_and_keeps_the_global_adapter() {
    let (clients, eval) = tiny_federated_data();
    let before = model().lora_params();
    // Multi-Krum keeping five of three replies fails every round.
    let outcome = FederatedRun::new(
        config(2),
        Strategy::fedit(),
        Box::new(Krum::multi(0, 5)),
        clients,
        eval,
    )
    .unwrap()
    .run(model(), &device_autodiff())
    .unwrap();
    assert!(outcome.completed);
    for m in &outcome.metrics {
        assert!(!m.aggregated);
        let error = m.aggregation_error.as_deref().unwrap_or("");
        assert!(error.contains("Multi-Krum"), "round {}: {error:?}", m.round);
        assert!(m.clients_failed.is_empty());
    }
    assert_eq!(outcome.model.lora_params(), before);
}

#[test]
fn federated_evaluation_equals_evaluating_the_servers_model() {
    let (data, eval) = tiny_federated_data();
    let base = model();
    let mut server =
        Server::new(config(5), strategy(), Box::new(Flora), model(), data.len()).unwrap();
    let mut clients: Vec<Client> = data
        .into_iter()
        .enumerate()
        .map(|(id, examples)| Client::new(id, examples))
        .collect();
    let fuser = DifferentialFuser::default();
    let mut devices: Vec<Option<StageModel>> = vec![None; clients.len()];
    // Two rounds, so that FLoRA has merged once and the evaluators must catch up.
    for _ in 0..2 {
        let tasks = server.configure_round().unwrap();
        let mut replies = Vec::new();
        for task in &tasks.tasks {
            if let Some(bytes) = &task.setup {
                let setup = StageSetup::from_bytes(bytes, usize::MAX, "server").unwrap();
                devices[task.client] = Some(StageModel::build(&base, &setup, &fuser).unwrap());
            }
            let work = TrainTask::from_bytes(&task.task, usize::MAX, "server").unwrap();
            let reply = clients[task.client]
                .train(
                    devices[task.client].as_mut().unwrap(),
                    &work,
                    &device_autodiff(),
                )
                .unwrap();
            replies.push((task.client, Ok(reply.to_bytes().unwrap())));
        }
        server.aggregate_round(replies).unwrap();
        if server.rounds_done() == 0 {
            server.finish_round(None, &[]).unwrap();
        }
    }
    // Clients 0 and 5 evaluate different halves of the held-out set.
    let halves = [&eval[..12], &eval[12..]];
    let evaluators = [0, 5];
    let tasks = server.configure_evaluation(&evaluators, &[]).unwrap();
    let mut replies = Vec::new();
    for (task, examples) in tasks.iter().zip(halves) {
        if let Some(bytes) = &task.setup {
            let setup = StageSetup::from_bytes(bytes, usize::MAX, "server").unwrap();
            devices[task.client] = Some(StageModel::build(&base, &setup, &fuser).unwrap());
        }
        let work =
            devft::federated::protocol::EvaluateTask::from_bytes(&task.task, usize::MAX, "server")
                .unwrap();
        let reply = clients[task.client]
            .evaluate(devices[task.client].as_mut().unwrap(), &work, examples)
            .unwrap();
        let bytes = reply.to_bytes().unwrap();
        assert_eq!(
            EvaluateReply::from_bytes(&bytes, 1 << 16, "client").unwrap(),
            reply
        );
        replies.push((task.client, Ok(bytes)));
    }
    // A reply for a client that was not asked is ignored.
    replies.push((3, Ok(vec![0u8; 8])));
    let federated = server.aggregate_evaluation(replies).unwrap().unwrap();
    let model = server.evaluation_model(&[]).unwrap();
    let targets = |x: &[devft::data::TokenizedExample]| -> f64 {
        x.iter()
            .map(|e| e.targets.iter().filter(|&&t| t).count() as f64)
            .sum()
    };
    let expected = halves
        .iter()
        .map(|h| evaluate_loss(&model, h, 8, 0).unwrap() * targets(h))
        .sum::<f64>()
        / targets(&eval);
    assert!(
        (federated - expected).abs() < 1e-5,
        "{federated} vs {expected}"
    );
    let evaluation_traffic = server.ledger().entries.iter().filter(|e| e.evaluation);
    assert_eq!(evaluation_traffic.filter(|e| e.up.total > 0).count(), 2);
}

#[test]
fn set_ups_send_the_start_adapter_compactly_and_exactly() {
    let (data, _) = tiny_federated_data();
    let mut server =
        Server::new(config(5), strategy(), Box::new(FedAvg), model(), data.len()).unwrap();
    let mut setups = Vec::new();
    while !server.is_finished() {
        let tasks = server.configure_round().unwrap();
        if setups.len() == tasks.stage {
            let bytes = tasks.tasks.iter().find_map(|t| t.setup.as_ref()).unwrap();
            setups.push(StageSetup::from_bytes(bytes, usize::MAX, "server").unwrap());
        }
        let replies = tasks
            .tasks
            .iter()
            .map(|t| (t.client, Err("not trained here".to_string())))
            .collect();
        server.aggregate_round(replies).unwrap();
        server.finish_round(None, &[]).unwrap();
    }
    // Stage 0: the initial adapter, named by its hash; nothing travels.
    let initial = model().lora_params();
    assert_eq!(
        setups[0].start,
        StartAdapter::Initial {
            sha256: adapter_sha256(&initial).unwrap()
        }
    );
    assert_eq!(setups[0].num_values(), 0);
    // Stage 1: one adapter per group of stage 0's two groups: a quarter of the 8 layers'.
    let StartAdapter::PerGroup { grouping, adapter } = &setups[1].start else {
        panic!("stage 1 starts from {:?}", setups[1].start);
    };
    assert_eq!(grouping.len(), 2);
    assert_eq!(4 * adapter.num_values(), initial.num_values());
    // Expanded on a device, it is exactly the server's full model's adapter (no client
    // trained, so stage 1 ended where it started).
    let stage = StageModel::build(&model(), &setups[1], &DifferentialFuser::default()).unwrap();
    let expected = server.model().unwrap().lora_params();
    assert_eq!(
        stage
            .knowledge(&stage.submodel().lora_params())
            .unwrap()
            .lora_params(),
        expected
    );
    // A device whose base starts from another adapter (another seed) refuses stage 0.
    let other = CausalLm::load(tiny_llama_dir(), &device())
        .unwrap()
        .with_lora(&LoraConfig::new(4, 8.0), 1)
        .unwrap();
    let err = StageModel::build(&other, &setups[0], &DifferentialFuser::default()).unwrap_err();
    assert!(err.to_string().contains("SHA-256"), "{err}");
    // Without a grouping to compress by, or for an adapter that is not per group, the whole.
    assert!(matches!(
        compact_start(&initial, Some(grouping)).unwrap(),
        StartAdapter::Full { .. }
    ));
}

#[test]
fn a_device_refuses_a_stage_fused_by_another_fuser() {
    let (data, _) = tiny_federated_data();
    let mut server =
        Server::new(config(5), strategy(), Box::new(FedAvg), model(), data.len()).unwrap();
    let tasks = server.configure_round().unwrap();
    let setup =
        StageSetup::from_bytes(tasks.tasks[0].setup.as_ref().unwrap(), usize::MAX, "s").unwrap();
    assert_eq!(setup.fuser, "differential(beta=0.1)");
    let err = StageModel::build(&model(), &setup, &MeanFuser).unwrap_err();
    assert!(err.to_string().contains("mean"), "{err}");
    // A task for another stage is refused by the client, not run on the wrong submodel.
    let mut stage = StageModel::build(&model(), &setup, &DifferentialFuser::default()).unwrap();
    let mut work = TrainTask::from_bytes(&tasks.tasks[0].task, usize::MAX, "s").unwrap();
    work.stage = 1;
    let mut client = Client::new(0, tiny_federated_data().0.remove(0));
    let err = client
        .train(&mut stage, &work, &device_autodiff())
        .unwrap_err();
    assert!(err.to_string().contains("stage 1"), "{err}");
}
