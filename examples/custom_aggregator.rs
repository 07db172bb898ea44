//! A user-defined aggregator, written outside the crate, driving the DevFT loop through the
//! `Aggregator` trait alone: FedProx with a server-side step size (clients get the proximal
//! term through `ClientInstructions`, the server moves `eta` of the way to the weighted mean).
//!
//! ```text
//! cargo run --release --example custom_aggregator
//! ```
//!
//! Runs on the tiny Llama fixture and the in-repo instruction data (byte-level tokens), with
//! DevFT stages of 2, 4 and 8 layers.

use std::process::ExitCode;

use devft::aggregate::{Aggregator, ClientInstructions, ClientUpdate, check_updates};
use devft::data::{ByteEncoder, load_alpaca, partition_dirichlet, tokenize_examples};
use devft::federated::{FederatedConfig, FederatedRun, LocalTrainingConfig, Strategy};
use devft::fusion::DifferentialFuser;
use devft::grouping::SpectralGrouper;
use devft::model::{CausalLm, LoraConfig};
use devft::schedule::ExplicitScheduler;
use devft::tokenizer::PromptTemplate;
use devft::{HostTensor, ParamMap, Result};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-llama");
const DATA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/data/tiny_instructions.jsonl"
);

/// FedProx clients, damped server step.
struct DampedFedProx {
    mu: f64,
    eta: f64,
}

impl Aggregator for DampedFedProx {
    fn name(&self) -> String {
        format!("damped-fedprox(mu={}, eta={})", self.mu, self.eta)
    }

    fn client_instructions(&self) -> ClientInstructions {
        ClientInstructions {
            proximal_mu: self.mu,
            ..Default::default()
        }
    }

    fn aggregate(&mut self, global: &ParamMap, updates: &[ClientUpdate]) -> Result<ParamMap> {
        check_updates(global, updates)?;
        let total: f64 = updates.iter().map(|u| u.num_examples as f64).sum();
        let mut out = ParamMap::new();
        for (name, tensor) in global.iter() {
            let mut values: Vec<f64> = vec![0.0; tensor.len()];
            for update in updates {
                let w = update.num_examples as f64 / total;
                for (v, x) in values.iter_mut().zip(update.params.require(name)?.values()) {
                    *v += w * f64::from(*x);
                }
            }
            let moved = tensor
                .values()
                .iter()
                .zip(values)
                .map(|(g, mean)| (f64::from(*g) + self.eta * (mean - f64::from(*g))) as f32)
                .collect();
            out.insert(name, HostTensor::new(tensor.shape().to_vec(), moved)?);
        }
        Ok(out)
    }
}

fn run() -> Result<()> {
    let device = devft::device::default_device()?;
    let examples = load_alpaca(DATA, PromptTemplate::Alpaca)?;
    let tokenized = tokenize_examples(&examples, &ByteEncoder, 64)?;
    let (eval, train) = tokenized.split_at(24);
    let labels: Vec<String> = train
        .iter()
        .map(|e| e.label.clone().unwrap_or_default())
        .collect();
    let mut names = labels.clone();
    names.sort();
    names.dedup();
    let label_ids: Vec<usize> = labels
        .iter()
        .map(|l| names.binary_search(l).expect("present"))
        .collect();
    let clients = partition_dirichlet(&label_ids, 6, 0.5, 0)?
        .into_iter()
        .map(|part| part.into_iter().map(|i| train[i].clone()).collect())
        .collect();

    let model = CausalLm::load(FIXTURE, &device)?.with_lora(&LoraConfig::new(4, 8.0), 0)?;
    let strategy = Strategy {
        scheduler: Box::new(ExplicitScheduler::capacities(vec![2, 4, 8])),
        grouper: Box::new(SpectralGrouper::new()),
        fuser: Box::new(DifferentialFuser::default()),
    };
    let local = LocalTrainingConfig::new()
        .with_learning_rate(5e-3)
        .with_local_steps(3);
    let config = FederatedConfig::new(9, local).with_clients_per_round(3);
    let aggregator = DampedFedProx { mu: 0.01, eta: 0.8 };
    println!("aggregator: {}", aggregator.name());
    let mut federated = FederatedRun::new(
        config,
        strategy,
        Box::new(aggregator),
        clients,
        eval.to_vec(),
    )?
    .with_progress("devft");
    let outcome = federated.run(model, &device.clone().autodiff())?;
    for m in &outcome.metrics {
        println!(
            "round {} stage {} (K={}): train {:.4} eval {:.4}, up {} B",
            m.round,
            m.stage + 1,
            m.capacity,
            m.train_loss.unwrap_or(f64::NAN),
            m.eval_loss.unwrap_or(f64::NAN),
            m.bytes_up.total
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
