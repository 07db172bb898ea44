//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod gguf_writer;
pub mod reference;

use std::path::PathBuf;

use burn::tensor::{Device, Int, Tensor};
use devft::data::{ByteEncoder, TokenizedExample, load_alpaca, partition_iid, tokenize_examples};
use devft::tokenizer::PromptTemplate;

/// `tests/fixtures/tiny-llama`: a copy of `shared/fixtures/tiny-llama` (transformers + PEFT).
pub fn tiny_llama_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama")
}

/// Reads a JSON file of the tiny-llama fixture.
pub fn fixture_json(name: &str) -> serde_json::Value {
    let path = tiny_llama_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap()
}

/// A JSON array of numbers, flattened.
pub fn flat_f64(value: &serde_json::Value) -> Vec<f64> {
    match value {
        serde_json::Value::Array(items) => items.iter().flat_map(flat_f64).collect(),
        serde_json::Value::Number(n) => vec![n.as_f64().unwrap()],
        other => panic!("not a number array: {other}"),
    }
}

/// Token ids from a JSON array.
pub fn ids(value: &serde_json::Value) -> Vec<u32> {
    flat_f64(value).into_iter().map(|v| v as u32).collect()
}

/// A host tensor's values as `f64`.
pub fn f64_values(tensor: &devft::HostTensor) -> Vec<f64> {
    tensor.values().iter().map(|&v| f64::from(v)).collect()
}

/// The largest absolute difference.
pub fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - y).abs())
        .fold(0.0, f64::max)
}

/// The CPU device the tests run on.
pub fn device() -> Device {
    devft::device::default_device().expect("a backend feature is enabled")
}

/// `[1, len]` token tensor.
pub fn id_tensor(ids: &[u32], device: &Device) -> Tensor<2, Int> {
    devft::model::token_tensor(ids, device)
}

/// Reads a float tensor back as `f32` values.
pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

/// The in-repo instruction data (`tests/fixtures/data/tiny_instructions.jsonl`), byte-tokenised
/// to 64 tokens: six IID clients, and the first 24 examples held out for evaluation.
pub fn tiny_federated_data() -> (Vec<Vec<TokenizedExample>>, Vec<TokenizedExample>) {
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

/// The tiny fixture model with a LoRA adapter (r = 4, alpha 8, seed 0) on every projection.
pub fn tiny_lora_model() -> devft::model::CausalLm {
    devft::model::CausalLm::load(tiny_llama_dir(), &device())
        .unwrap()
        .with_lora(&devft::model::LoraConfig::new(4, 8.0), 0)
        .unwrap()
}

/// The federated settings the runner tests share on the tiny fixture: `rounds` rounds of 3
/// clients, each training `local_steps` AdamW steps (learning rate 5e-3) of 4 examples, with
/// the run seed `seed` (which picks the clients of each round).
pub fn tiny_config(
    rounds: usize,
    local_steps: usize,
    seed: u64,
) -> devft::federated::FederatedConfig {
    let local = devft::federated::LocalTrainingConfig::new()
        .with_learning_rate(5e-3)
        .with_local_steps(local_steps)
        .with_batch_size(4);
    devft::federated::FederatedConfig::new(rounds, local)
        .with_clients_per_round(3)
        .with_seed(seed)
}

/// Metrics without what no two runs share: wall-clock times, measured memory, and the
/// whole size of the replies, whose headers carry the measured memory
/// ([`assert_same_traffic`] compares those per reply).
pub fn timeless(metrics: &[devft::federated::RoundMetrics]) -> Vec<devft::federated::RoundMetrics> {
    metrics
        .iter()
        .cloned()
        .map(|m| devft::federated::RoundMetrics {
            wall_seconds: 0.0,
            eval_seconds: 0.0,
            peak_rss_bytes: None,
            bytes_up: devft::federated::WireSize {
                total: 0,
                ..m.bytes_up
            },
            ..m
        })
        .collect()
}

/// Asserts two ledgers record the same traffic. A reply's size carries the client's measured
/// peak memory in its header, which no two runs share: its whole-message size may differ by
/// the digits of that number; everything else must be equal.
pub fn assert_same_traffic(a: &devft::federated::Ledger, b: &devft::federated::Ledger) {
    assert_eq!(a.entries.len(), b.entries.len(), "ledger entries");
    for (x, y) in a.entries.iter().zip(&b.entries) {
        let same_but_reply_header = devft::federated::LedgerEntry {
            up: devft::federated::WireSize {
                total: y.up.total,
                ..x.up
            },
            ..*x
        };
        assert_eq!(same_but_reply_header, *y);
        assert!(
            x.up.total.abs_diff(y.up.total) <= 24,
            "round {} client {}: replies of {} and {} bytes",
            x.round,
            x.client,
            x.up.total,
            y.up.total
        );
    }
}

/// The two-stage DevFT strategy the runner tests share on the tiny fixture: three rounds on
/// two fused layers (spectral grouping, differential fusion), then two on the full model
/// (8 layers). With three of six clients per round, some clients miss rounds of the first
/// stage.
pub fn tiny_two_stages() -> devft::federated::Strategy {
    use devft::schedule::{ExplicitScheduler, Stage};
    devft::federated::Strategy {
        scheduler: Box::new(ExplicitScheduler::stages(&[
            Stage {
                capacity: 2,
                rounds: 3,
            },
            Stage {
                capacity: 8,
                rounds: 2,
            },
        ])),
        grouper: Box::new(devft::grouping::SpectralGrouper::new()),
        fuser: Box::new(devft::fusion::DifferentialFuser::default()),
    }
}
