//! A run's settings as flat key/values (a Flower run config), and what they build: the
//! model, the data of every partition, the federated settings, the strategy and the
//! aggregator. The server, every client and the in-process run build from the same settings,
//! so they agree on the partitions without exchanging data.

use std::collections::BTreeMap;
use std::path::PathBuf;

use devft::aggregate::{Aggregator, by_name};
use devft::data::{
    ByteEncoder, TextEncoder, TokenizedExample, load_alpaca, partition_dirichlet, partition_iid,
    tokenize_examples,
};
use devft::federated::{FederatedConfig, LocalTrainingConfig, Strategy, parse_memory_budgets};
use devft::fusion::{DifferentialFuser, FuserKind};
use devft::grouping::GrouperKind;
use devft::model::gguf::BaseWeights;
use devft::model::{CausalLm, LoraConfig};
use devft::schedule::{ExplicitScheduler, GeometricScheduler, SingleStage, Stage, StageScheduler};
use devft::tokenizer::{PromptTemplate, Tokenizer};
use devft::{Error, Result};

/// A setting's value as a run config holds it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A string.
    Text(String),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A boolean.
    Bool(bool),
}

/// Every key [`Settings`] reads, with its default (`None`: required).
pub const KEYS: [(&str, Option<&str>); 26] = [
    ("model", None),
    ("data", None),
    ("tokenizer", Some("bytes")),
    ("template", Some("alpaca")),
    ("max-len", Some("128")),
    ("num-eval", Some("24")),
    ("num-partitions", None),
    ("partition", Some("iid")),
    ("rounds", Some("4")),
    ("clients-per-round", Some("2")),
    ("min-successful-clients", Some("1")),
    ("seed", Some("0")),
    ("schedule", Some("devft")),
    ("grouper", Some("spectral")),
    ("fuser", Some("differential:0.1")),
    ("aggregator", Some("fedavg")),
    ("lora-rank", Some("8")),
    ("lora-alpha", Some("16")),
    ("learning-rate", Some("0.0003")),
    ("local-steps", Some("4")),
    ("batch-size", Some("4")),
    ("eval-batch-size", Some("8")),
    ("stateless-clients", Some("false")),
    ("max-update-norm-factor", Some("10")),
    ("client-memory", Some("none")),
    ("base", Some("f32")),
];

/// The parsed settings of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    values: BTreeMap<String, Value>,
}

impl Settings {
    /// Settings from key/values; keys outside [`KEYS`] are ignored (a Flower run config also
    /// holds the app's own keys), missing ones take their defaults.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when a required key is missing.
    pub fn new(values: BTreeMap<String, Value>) -> Result<Self> {
        let mut kept = BTreeMap::new();
        for (key, default) in KEYS {
            match (values.get(key), default) {
                (Some(v), _) => {
                    kept.insert(key.to_string(), v.clone());
                }
                (None, Some(d)) => {
                    kept.insert(key.to_string(), Value::Text(d.to_string()));
                }
                (None, None) => {
                    return Err(Error::InvalidArgument(format!(
                        "the setting `{key}` is required"
                    )));
                }
            }
        }
        Ok(Self { values: kept })
    }

    /// The settings as JSON (every key, defaults filled in).
    pub fn to_json(&self) -> serde_json::Value {
        self.values
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::Text(s) => serde_json::json!(s),
                    Value::Int(i) => serde_json::json!(i),
                    Value::Float(f) => serde_json::json!(f),
                    Value::Bool(b) => serde_json::json!(b),
                };
                (k.clone(), v)
            })
            .collect()
    }

    fn text(&self, key: &str) -> String {
        match &self.values[key] {
            Value::Text(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            Value::Float(f) => f.to_string(),
            Value::Bool(b) => b.to_string(),
        }
    }

    fn parse<T: std::str::FromStr>(&self, key: &str) -> Result<T> {
        let text = self.text(key);
        text.trim().parse().map_err(|_| {
            Error::InvalidArgument(format!(
                "the setting `{key}` = `{text}` is not a valid {}",
                std::any::type_name::<T>()
            ))
        })
    }

    fn path(&self, key: &str) -> PathBuf {
        PathBuf::from(self.text(key))
    }

    /// Number of data partitions (clients).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when it is not a positive count.
    pub fn num_partitions(&self) -> Result<usize> {
        match self.parse::<usize>("num-partitions")? {
            0 => Err(Error::InvalidArgument(
                "the setting `num-partitions` must be positive".into(),
            )),
            n => Ok(n),
        }
    }

    /// The full model with a fresh adapter (seeded by `seed`), on `device`, its frozen base
    /// held as `base` says (`f32`, or `quantised`: a GGUF file's blocks kept as they are).
    ///
    /// # Errors
    ///
    /// The errors of loading the model and of an invalid LoRA configuration;
    /// [`Error::InvalidArgument`] for an unknown `base` or `quantised` with a model that is
    /// not a GGUF file.
    pub fn model(&self, device: &burn::tensor::Device) -> Result<CausalLm> {
        let lora = LoraConfig::new(self.parse("lora-rank")?, self.parse("lora-alpha")?);
        let base: BaseWeights = self.text("base").trim().parse()?;
        CausalLm::load_with(self.path("model"), base, device)?.with_lora(&lora, self.parse("seed")?)
    }

    /// The held-out examples and every partition's training examples.
    ///
    /// # Errors
    ///
    /// The errors of loading and tokenising the data; [`Error::InvalidArgument`] when the data
    /// hold no more examples than `num-eval`, or for an unknown tokenizer, template or
    /// partition scheme.
    pub fn data(&self) -> Result<(Vec<TokenizedExample>, Vec<Vec<TokenizedExample>>)> {
        let template = match self.text("template").as_str() {
            "alpaca" => PromptTemplate::Alpaca,
            "chatml" => PromptTemplate::ChatMl,
            "llama3" => PromptTemplate::Llama3,
            "inst" => PromptTemplate::Inst,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown template `{other}` (alpaca, chatml, llama3, inst)"
                )));
            }
        };
        let examples = load_alpaca(self.path("data"), template)?;
        let tokenizer;
        let encoder: &dyn TextEncoder = match self.text("tokenizer").as_str() {
            "bytes" => &ByteEncoder,
            path => {
                tokenizer = Tokenizer::from_file(path)?;
                &tokenizer
            }
        };
        let tokenized = tokenize_examples(&examples, encoder, self.parse("max-len")?)?;
        let num_eval: usize = self.parse("num-eval")?;
        if tokenized.len() <= num_eval {
            return Err(Error::InvalidArgument(format!(
                "{} examples leave none for training after {num_eval} held out",
                tokenized.len()
            )));
        }
        let (eval, train) = tokenized.split_at(num_eval);
        let partitions = self.num_partitions()?;
        let seed: u64 = self.parse("seed")?;
        let scheme = self.text("partition");
        let parts = match scheme.split_once(':') {
            None if scheme == "iid" => partition_iid(train.len(), partitions, seed)?,
            Some(("dirichlet", alpha)) => {
                let alpha: f64 = alpha.parse().map_err(|_| {
                    Error::InvalidArgument(format!("dirichlet alpha `{alpha}` is not a number"))
                })?;
                // One label per example: its index modulo the partitions, so each client
                // gets a skewed share of the data's order.
                let labels: Vec<usize> = (0..train.len()).map(|i| i % partitions).collect();
                partition_dirichlet(&labels, partitions, alpha, seed)?
            }
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "unknown partition `{scheme}` (iid, dirichlet:<alpha>)"
                )));
            }
        };
        let clients = parts
            .iter()
            .map(|part| part.iter().map(|&i| train[i].clone()).collect())
            .collect();
        Ok((eval.to_vec(), clients))
    }

    /// The federated settings.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a value that does not parse.
    pub fn federated_config(&self) -> Result<FederatedConfig> {
        let local = LocalTrainingConfig::new()
            .with_learning_rate(self.parse("learning-rate")?)
            .with_local_steps(self.parse("local-steps")?)
            .with_batch_size(self.parse("batch-size")?);
        Ok(FederatedConfig::new(self.parse("rounds")?, local)
            .with_clients_per_round(self.parse("clients-per-round")?)
            .with_min_successful_clients(self.parse("min-successful-clients")?)
            .with_seed(self.parse("seed")?)
            .with_eval_batch_size(self.parse("eval-batch-size")?)
            .with_stateless_clients(self.parse("stateless-clients")?)
            .with_max_update_norm_factor(self.parse("max-update-norm-factor")?)
            .with_max_example_tokens(self.parse("max-len")?))
    }

    /// Each partition's declared training memory: `client-memory`, a comma-separated list
    /// (one entry for all) of sizes like `640M` or `none`
    /// ([`devft::federated::parse_memory_budgets`]).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a list that does not parse or fit the partitions.
    pub fn memory_budgets(&self) -> Result<Vec<Option<u64>>> {
        parse_memory_budgets(&self.text("client-memory"), self.num_partitions()?)
    }

    /// The stage plan, grouping and fusion: `schedule` is `devft` (capacities doubling from
    /// 4), `fedit` (the full model only) or `capacity:rounds,...`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a schedule, grouper or fuser that does not parse.
    pub fn strategy(&self) -> Result<Strategy> {
        let schedule = self.text("schedule");
        let scheduler: Box<dyn StageScheduler> = match schedule.as_str() {
            "devft" => Box::new(GeometricScheduler::default()),
            "fedit" => Box::new(SingleStage),
            stages => Box::new(ExplicitScheduler::stages(&parse_stages(stages)?)),
        };
        let grouper: GrouperKind = self.text("grouper").parse()?;
        Ok(Strategy {
            scheduler,
            grouper: grouper.build(self.parse("seed")?),
            fuser: self.fuser()?.build()?,
        })
    }

    fn fuser(&self) -> Result<FuserKind> {
        let spec = self.text("fuser");
        match spec.split_once(':') {
            None if spec == "differential" => Ok(FuserKind::Differential {
                beta: DifferentialFuser::default().beta(),
            }),
            None if spec == "anchor" => Ok(FuserKind::Anchor),
            None if spec == "mean" => Ok(FuserKind::Mean),
            Some(("differential", beta)) => Ok(FuserKind::Differential {
                beta: beta.parse().map_err(|_| {
                    Error::InvalidArgument(format!("fuser beta `{beta}` is not a number"))
                })?,
            }),
            _ => Err(Error::InvalidArgument(format!(
                "unknown fuser `{spec}` (differential[:beta], anchor, mean)"
            ))),
        }
    }

    /// The aggregator ([`by_name`]).
    ///
    /// # Errors
    ///
    /// As [`by_name`].
    pub fn aggregator(&self) -> Result<Box<dyn Aggregator>> {
        by_name(&self.text("aggregator"))
    }
}

/// `capacity:rounds,capacity:rounds,...`.
fn parse_stages(text: &str) -> Result<Vec<Stage>> {
    text.split(',')
        .map(|stage| {
            let parsed = stage
                .split_once(':')
                .and_then(|(c, r)| Some((c.trim().parse().ok()?, r.trim().parse().ok()?)));
            let (capacity, rounds) = parsed.ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "schedule stage `{stage}` is not `capacity:rounds` (or use devft, fedit)"
                ))
            })?;
            Ok(Stage { capacity, rounds })
        })
        .collect()
}
