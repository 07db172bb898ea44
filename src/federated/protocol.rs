//! The messages between a DevFT server and its clients, versioned and self-contained.
//!
//! A message is one byte string: the magic `DEVFTMSG`, the protocol version (`u32`, little
//! endian), the length of a JSON header (`u64`, little endian), the JSON header, and the
//! message's tensors as one safetensors buffer (names prefixed by their section). Everything a
//! remote client needs travels in them; nothing is read from the server's memory.
//!
//! | message          | direction        | carries                                                |
//! |------------------|------------------|--------------------------------------------------------|
//! | [`StageSetup`]   | server to client | grouping, fuser, full adapter, merged-base history      |
//! | [`TrainTask`]    | server to client | global adapter, missed merges, instructions, settings   |
//! | [`TrainReply`]   | client to server | trained adapter (shared part), example count, metrics   |
//! | [`EvaluateTask`] | server to client | evaluated adapter, missed merges                        |
//! | [`EvaluateReply`]| client to server | held-out loss and its number of target tokens           |
//! | [`ProbeTask`]    | server to client | candidate groupings to evaluate before the first stage  |
//! | [`ProbeReply`]   | client to server | each candidate's loss on the client's own examples      |
//! | [`DeviceState`]  | client to itself | what a client holds between rounds, to restart with      |
//!
//! Decoding checks the magic, the version, the header against the real length and the
//! tensors against the header, and refuses a message longer than the caller's bound before
//! looking inside.
//!
//! ```
//! use devft::federated::protocol::{Message, TrainReply};
//! use devft::{HostTensor, ParamMap};
//!
//! let mut adapter = ParamMap::new();
//! adapter.insert("w", HostTensor::new(vec![2], vec![0.5, -1.0])?);
//! let reply = TrainReply {
//!     round: 3,
//!     client: 7,
//!     num_examples: 12,
//!     metrics: [("train_loss".to_string(), 1.25)].into(),
//!     adapter,
//! };
//! let bytes = reply.to_bytes()?;
//! assert_eq!(TrainReply::from_bytes(&bytes, 1 << 20, "client 7")?, reply);
//! assert!(TrainReply::from_bytes(&bytes[..bytes.len() - 1], 1 << 20, "client 7").is_err());
//! # Ok::<(), devft::Error>(())
//! ```

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::aggregate::ClientInstructions;
use crate::error::{Error, Result};
use crate::federated::LocalTrainingConfig;
use crate::federated::metrics::WireSize;
use crate::grouping::Grouping;
use crate::params::ParamMap;

/// The protocol version this crate speaks; a message of another version is refused.
pub const PROTOCOL_VERSION: u32 = 1;

const MAGIC: &[u8; 8] = b"DEVFTMSG";
/// Magic, version and header length.
const PREAMBLE: usize = 8 + 4 + 8;

/// A message of the protocol: encodes to bytes and decodes from them with a size bound.
pub trait Message: Sized {
    /// The message's name in its header (`"train_task"`, ...).
    const KIND: &'static str;

    /// Encodes the message.
    ///
    /// # Errors
    ///
    /// [`Error::MalformedSafetensors`] if a tensor cannot be serialised.
    fn to_bytes(&self) -> Result<Vec<u8>>;

    /// Decodes a message received from `sender`, refusing one longer than `max_bytes`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidMessage`] naming `sender` for an oversized, truncated or malformed
    /// message, one of another kind or protocol version, or tensors that disagree with the
    /// header.
    fn from_bytes(bytes: &[u8], max_bytes: usize, sender: &str) -> Result<Self>;

    /// The message's size on the wire: its tensor payload and its whole length.
    ///
    /// # Errors
    ///
    /// As [`Message::to_bytes`].
    fn wire_size(&self) -> Result<WireSize> {
        Ok(WireSize {
            payload: 4 * self.num_values() as u64,
            total: self.to_bytes()?.len() as u64,
        })
    }

    /// Number of tensor values the message carries.
    fn num_values(&self) -> usize;
}

/// What a client needs to build a stage's submodel from its own copy of the base model.
#[derive(Debug, Clone, PartialEq)]
pub struct StageSetup {
    /// Stage index (0-based).
    pub stage: usize,
    /// How the full model's layers are grouped; one fused layer per group.
    pub grouping: Grouping,
    /// The fuser and its parameters ([`crate::fusion::LayerFuser::describe`]); a client
    /// refuses a stage whose fuser differs from its own.
    pub fuser: String,
    /// The full model's adapter at the stage's start, as compactly as it can travel.
    pub start: StartAdapter,
    /// What earlier stages merged into the base weights (merging aggregators such as FLoRA;
    /// otherwise each finished stage with no merge), stage by stage.
    pub history: Vec<MergedStage>,
}

/// The full model's adapter at a stage's start, in its most compact exact form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StartAdapter {
    /// The adapter every device's base model starts with (attached with the run's seed),
    /// identified by the SHA-256 of its safetensors bytes; a device with another refuses the
    /// stage. Nothing else travels.
    Initial {
        /// Lower-case hex SHA-256 of the adapter's safetensors bytes.
        sha256: String,
    },
    /// After a stage's transfer every layer of a group holds the same adapter: it travels
    /// once per group of `grouping` (the previous stage's), named as that stage's submodel
    /// names its layers.
    PerGroup {
        /// The previous stage's grouping.
        grouping: Grouping,
        /// One adapter per group.
        #[serde(skip)]
        adapter: ParamMap,
    },
    /// Every layer's adapter.
    Full {
        /// The adapter.
        #[serde(skip)]
        adapter: ParamMap,
    },
}

impl StartAdapter {
    /// The tensors that travel.
    fn tensors(&self) -> &ParamMap {
        static EMPTY: std::sync::OnceLock<ParamMap> = std::sync::OnceLock::new();
        match self {
            StartAdapter::Initial { .. } => EMPTY.get_or_init(ParamMap::new),
            StartAdapter::PerGroup { adapter, .. } | StartAdapter::Full { adapter } => adapter,
        }
    }

    /// The same start with `tensors` as its adapter (decoding).
    fn with_tensors(self, tensors: ParamMap, sender: &str) -> Result<Self> {
        match self {
            StartAdapter::Initial { .. } if !tensors.is_empty() => Err(Error::InvalidMessage {
                sender: sender.to_string(),
                reason: "an initial start adapter carries no tensor".into(),
            }),
            StartAdapter::Initial { sha256 } => Ok(StartAdapter::Initial { sha256 }),
            StartAdapter::PerGroup { grouping, .. } => Ok(StartAdapter::PerGroup {
                grouping,
                adapter: tensors,
            }),
            StartAdapter::Full { .. } => Ok(StartAdapter::Full { adapter: tensors }),
        }
    }
}

/// The merges of one finished stage: each merge adapter (named in the stage's submodel
/// numbering) is added to every member layer of its group.
#[derive(Debug, Clone, PartialEq)]
pub struct MergedStage {
    /// The stage's grouping.
    pub grouping: Grouping,
    /// The stage's merge adapters in the order they were applied.
    pub merges: Vec<ParamMap>,
}

/// Merges a client may have missed, numbered within the stage.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MergeSync {
    /// Index (within the stage) of `merges[0]`; the client applies those it lacks.
    pub first: usize,
    /// Merge adapters, in order.
    pub merges: Vec<ParamMap>,
}

/// One round's training work for one client.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainTask {
    /// Global round (1-based).
    pub round: usize,
    /// Stage index the task belongs to.
    pub stage: usize,
    /// Seed of the client's batch order.
    pub seed: u64,
    /// What the aggregator asks of local training.
    pub instructions: ClientInstructions,
    /// Local training settings.
    pub local: LocalTrainingConfig,
    /// The global adapter of the stage's submodel (for a personal-`B` aggregator, the
    /// client's own `B` replaces the global one once it has one).
    pub adapter: ParamMap,
    /// Merges into the base the client may not have applied yet.
    pub merges: MergeSync,
}

/// A client's answer to a [`TrainTask`].
#[derive(Debug, Clone, PartialEq)]
pub struct TrainReply {
    /// The task's round.
    pub round: usize,
    /// The replying client.
    pub client: usize,
    /// Training examples the client holds (its FedAvg weight).
    pub num_examples: usize,
    /// Client metrics: `train_loss`, `memory_estimate_bytes`.
    pub metrics: BTreeMap<String, f64>,
    /// The trained adapter, without the tensors the instructions keep on the client.
    pub adapter: ParamMap,
}

/// Evaluate the full model carrying the stage's knowledge on the client's held-out data.
#[derive(Debug, Clone, PartialEq)]
pub struct EvaluateTask {
    /// Global round.
    pub round: usize,
    /// Stage index.
    pub stage: usize,
    /// The adapter of the stage's submodel to transfer to the full model and evaluate.
    pub adapter: ParamMap,
    /// Merges into the base the client may not have applied yet.
    pub merges: MergeSync,
    /// Evaluation batch size.
    pub batch_size: usize,
    /// Padding token id.
    pub pad_id: u32,
}

/// A client's answer to an [`EvaluateTask`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluateReply {
    /// The task's round.
    pub round: usize,
    /// The replying client.
    pub client: usize,
    /// Mean loss over the client's held-out target tokens.
    pub loss: f64,
    /// Number of target tokens the loss averages.
    pub num_targets: usize,
}

/// Before the first stage, for a scheduler that chooses its plan from the clients' measure of
/// candidate submodels ([`crate::schedule::StageScheduler::probe_capacities`]): each candidate
/// is the fused submodel of the initial full model with one grouping, evaluated with forward
/// passes on a few of the client's own examples. No tensor travels: the candidates are built
/// from the client's own base model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeTask {
    /// One grouping per candidate; the last groups every layer alone (the full model).
    pub candidates: Vec<Grouping>,
    /// The fuser's [`crate::fusion::LayerFuser::describe`].
    pub fuser: String,
    /// SHA-256 of the initial adapter (as [`StartAdapter::Initial`]).
    pub start_sha256: String,
    /// Examples of its own the client evaluates (its first ones).
    pub max_examples: usize,
    /// Batch size of the forward passes.
    pub batch_size: usize,
    /// Padding token id.
    pub pad_id: u32,
}

/// A client's answer to a [`ProbeTask`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeReply {
    /// The replying client.
    pub client: usize,
    /// Mean loss of each candidate over the same target tokens, in the task's order.
    pub losses: Vec<f64>,
    /// Number of target tokens each loss averages.
    pub num_targets: usize,
}

/// What a client holds between rounds, for a client process that restarts between messages
/// (Flower starts one per message): the stage's set-up, the merges applied since, and the
/// tensors the client keeps. It never crosses the network; it is not counted in the ledger.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceState {
    /// The client.
    pub client: usize,
    /// The set-up of the stage the device holds.
    pub setup: StageSetup,
    /// The stage's merges the device applied, in order.
    pub merges: Vec<ParamMap>,
    /// The client's kept tensors and the stage they belong to.
    pub personal: Option<(usize, ParamMap)>,
}

/// Writes a message: preamble, JSON header, tensors.
fn encode(header: &impl Serialize, tensors: &ParamMap) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(header).map_err(|e| Error::InvalidMessage {
        sender: "this process".into(),
        reason: format!("cannot encode the header: {e}"),
    })?;
    let tensors = tensors.to_safetensors_bytes()?;
    let mut bytes = Vec::with_capacity(PREAMBLE + json.len() + tensors.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&json);
    bytes.extend_from_slice(&tensors);
    Ok(bytes)
}

/// Reads a message of `kind`: checks the bound, the preamble and the version, parses the
/// header and the tensors.
fn decode<H: DeserializeOwned + Tagged>(
    bytes: &[u8],
    max_bytes: usize,
    sender: &str,
) -> Result<(H, ParamMap)> {
    let invalid = |reason: String| Error::InvalidMessage {
        sender: sender.to_string(),
        reason,
    };
    if bytes.len() > max_bytes {
        return Err(invalid(format!(
            "{} bytes, more than the {max_bytes} allowed",
            bytes.len()
        )));
    }
    if bytes.len() < PREAMBLE || &bytes[..8] != MAGIC {
        return Err(invalid("not a devft message (bad magic)".into()));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != PROTOCOL_VERSION {
        return Err(invalid(format!(
            "protocol version {version}, this devft speaks {PROTOCOL_VERSION}"
        )));
    }
    let json_len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
    let rest = &bytes[PREAMBLE..];
    if json_len > rest.len() as u64 {
        return Err(invalid(format!(
            "a header of {json_len} bytes in a message of {} (truncated?)",
            bytes.len()
        )));
    }
    let (json, tensors) = rest.split_at(json_len as usize);
    #[derive(Deserialize)]
    struct Kind {
        kind: String,
    }
    let kind: Kind =
        serde_json::from_slice(json).map_err(|e| invalid(format!("bad header: {e}")))?;
    if kind.kind != H::KIND {
        return Err(invalid(format!(
            "a `{}` message where `{}` was expected",
            kind.kind,
            H::KIND
        )));
    }
    let header: H =
        serde_json::from_slice(json).map_err(|e| invalid(format!("bad header: {e}")))?;
    let tensors = ParamMap::from_safetensors_bytes(tensors, sender)
        .map_err(|e| invalid(format!("malformed tensors: {e}")))?;
    Ok((header, tensors))
}

/// A header of the message kind `KIND`.
trait Tagged {
    const KIND: &'static str;
}

/// Splits `tensors` named `{section}/{name}` into the sections `expected` lists (in order);
/// any other name is an error.
fn sections(tensors: ParamMap, expected: &[String], sender: &str) -> Result<Vec<ParamMap>> {
    let mut out = vec![ParamMap::new(); expected.len()];
    for (name, tensor) in tensors {
        let found = name.split_once('/').and_then(|(section, inner)| {
            let index = expected.iter().position(|s| s == section)?;
            Some((index, inner.to_string()))
        });
        let Some((index, inner)) = found else {
            return Err(Error::InvalidMessage {
                sender: sender.to_string(),
                reason: format!("unexpected tensor `{name}`"),
            });
        };
        out[index].insert(inner, tensor);
    }
    if let Some(empty) = expected
        .iter()
        .zip(&out)
        .skip(1)
        .find(|(_, m)| m.is_empty())
    {
        return Err(Error::InvalidMessage {
            sender: sender.to_string(),
            reason: format!("section `{}` has no tensor", empty.0),
        });
    }
    Ok(out)
}

/// A header may not announce more merge sections than the message has tensors (every merge
/// has at least one), so a forged count cannot make the reader allocate.
fn check_section_count(count: usize, tensors: &ParamMap, sender: &str) -> Result<()> {
    if count > tensors.len() {
        return Err(Error::InvalidMessage {
            sender: sender.to_string(),
            reason: format!(
                "the header announces {count} merges, the message has {} tensors",
                tensors.len()
            ),
        });
    }
    Ok(())
}

/// One map with every section's tensors named `{section}/{name}`.
fn joined<'a>(parts: impl IntoIterator<Item = (String, &'a ParamMap)>) -> ParamMap {
    parts
        .into_iter()
        .flat_map(|(section, map)| {
            map.iter()
                .map(move |(name, t)| (format!("{section}/{name}"), t.clone()))
        })
        .collect()
}

fn merge_sections(prefix: &str, count: usize) -> impl Iterator<Item = String> + '_ {
    (0..count).map(move |i| format!("{prefix}{i}"))
}

macro_rules! header {
    ($name:ident, $kind:literal, { $($field:ident : $ty:ty),* $(,)? }) => {
        #[derive(Serialize, Deserialize)]
        struct $name {
            kind: String,
            $($field: $ty,)*
        }

        impl Tagged for $name {
            const KIND: &'static str = $kind;
        }
    };
}

/// The set-up's fields that travel in a header.
#[derive(Serialize, Deserialize)]
struct SetupFields {
    stage: usize,
    grouping: Grouping,
    fuser: String,
    start: StartAdapter,
    history: Vec<(Grouping, usize)>,
}

impl SetupFields {
    /// The merges the history announces, plus `more` (saturating: a forged count must not
    /// overflow).
    fn merge_count(&self, more: usize) -> usize {
        self.history
            .iter()
            .fold(more, |total, (_, count)| total.saturating_add(*count))
    }
}

impl StageSetup {
    /// The header fields and the tensor sections of the set-up.
    fn parts(&self) -> (SetupFields, Vec<(String, &ParamMap)>) {
        let fields = SetupFields {
            stage: self.stage,
            grouping: self.grouping.clone(),
            fuser: self.fuser.clone(),
            start: self.start.clone(),
            history: self
                .history
                .iter()
                .map(|s| (s.grouping.clone(), s.merges.len()))
                .collect(),
        };
        let mut parts = vec![("start".to_string(), self.start.tensors())];
        for (s, stage) in self.history.iter().enumerate() {
            for (m, merge) in stage.merges.iter().enumerate() {
                parts.push((format!("history.{s}.{m}"), merge));
            }
        }
        (fields, parts)
    }

    /// The section names [`StageSetup::parts`] writes for `fields`.
    fn section_names(fields: &SetupFields) -> Vec<String> {
        let mut names = vec!["start".to_string()];
        for (s, (_, count)) in fields.history.iter().enumerate() {
            names.extend(merge_sections(&format!("history.{s}."), *count));
        }
        names
    }

    /// The set-up from its fields and its sections (in [`StageSetup::section_names`] order,
    /// taken from the front of `parts`).
    fn from_parts(
        fields: SetupFields,
        parts: &mut impl Iterator<Item = ParamMap>,
        sender: &str,
    ) -> Result<Self> {
        let start = fields
            .start
            .with_tensors(parts.next().unwrap_or_default(), sender)?;
        let history = fields
            .history
            .into_iter()
            .map(|(grouping, count)| MergedStage {
                grouping,
                merges: parts.by_ref().take(count).collect(),
            })
            .collect();
        Ok(Self {
            stage: fields.stage,
            grouping: fields.grouping,
            fuser: fields.fuser,
            start,
            history,
        })
    }
}

header!(SetupHeader, "stage_setup", {
    setup: SetupFields,
});

impl Message for StageSetup {
    const KIND: &'static str = "stage_setup";

    fn to_bytes(&self) -> Result<Vec<u8>> {
        let (setup, parts) = self.parts();
        let header = SetupHeader {
            kind: Self::KIND.into(),
            setup,
        };
        encode(&header, &joined(parts))
    }

    fn from_bytes(bytes: &[u8], max_bytes: usize, sender: &str) -> Result<Self> {
        let (header, tensors) = decode::<SetupHeader>(bytes, max_bytes, sender)?;
        check_section_count(header.setup.merge_count(0), &tensors, sender)?;
        let names = Self::section_names(&header.setup);
        let mut parts = sections(tensors, &names, sender)?.into_iter();
        Self::from_parts(header.setup, &mut parts, sender)
    }

    fn num_values(&self) -> usize {
        self.start.tensors().num_values()
            + self
                .history
                .iter()
                .flat_map(|s| &s.merges)
                .map(ParamMap::num_values)
                .sum::<usize>()
    }
}

header!(DeviceStateHeader, "device_state", {
    client: usize,
    setup: SetupFields,
    merges: usize,
    personal_stage: Option<usize>,
});

impl Message for DeviceState {
    const KIND: &'static str = "device_state";

    fn to_bytes(&self) -> Result<Vec<u8>> {
        let (setup, mut parts) = self.setup.parts();
        let empty = ParamMap::new();
        parts.push((
            "personal".to_string(),
            self.personal.as_ref().map_or(&empty, |(_, p)| p),
        ));
        for (m, merge) in self.merges.iter().enumerate() {
            parts.push((format!("merge.{m}"), merge));
        }
        let header = DeviceStateHeader {
            kind: Self::KIND.into(),
            client: self.client,
            setup,
            merges: self.merges.len(),
            personal_stage: self.personal.as_ref().map(|(stage, _)| *stage),
        };
        encode(&header, &joined(parts))
    }

    fn from_bytes(bytes: &[u8], max_bytes: usize, sender: &str) -> Result<Self> {
        let (header, tensors) = decode::<DeviceStateHeader>(bytes, max_bytes, sender)?;
        // The personal section may be empty; it is set apart from the sections that may not.
        let (personal, tensors): (ParamMap, ParamMap) = tensors
            .into_iter()
            .partition(|(name, _)| name.starts_with("personal/"));
        let personal = personal.renamed(|name| name["personal/".len()..].to_string());
        check_section_count(header.setup.merge_count(header.merges), &tensors, sender)?;
        let mut names = StageSetup::section_names(&header.setup);
        names.extend(merge_sections("merge.", header.merges));
        let mut parts = sections(tensors, &names, sender)?.into_iter();
        let setup = StageSetup::from_parts(header.setup, &mut parts, sender)?;
        let personal = match (header.personal_stage, personal.is_empty()) {
            (Some(stage), _) => Some((stage, personal)),
            (None, true) => None,
            (None, false) => {
                return Err(Error::InvalidMessage {
                    sender: sender.to_string(),
                    reason: "personal tensors without their stage".into(),
                });
            }
        };
        Ok(Self {
            client: header.client,
            setup,
            merges: parts.collect(),
            personal,
        })
    }

    fn num_values(&self) -> usize {
        self.setup.num_values()
            + self.merges.iter().map(ParamMap::num_values).sum::<usize>()
            + self.personal.as_ref().map_or(0, |(_, p)| p.num_values())
    }
}

header!(TrainTaskHeader, "train_task", {
    round: usize,
    stage: usize,
    seed: u64,
    instructions: ClientInstructions,
    local: LocalTrainingConfig,
    first_merge: usize,
    merges: usize,
});

impl Message for TrainTask {
    const KIND: &'static str = "train_task";

    fn to_bytes(&self) -> Result<Vec<u8>> {
        let header = TrainTaskHeader {
            kind: Self::KIND.into(),
            round: self.round,
            stage: self.stage,
            seed: self.seed,
            instructions: self.instructions.clone(),
            local: self.local.clone(),
            first_merge: self.merges.first,
            merges: self.merges.merges.len(),
        };
        encode(&header, &with_merges(&self.adapter, &self.merges))
    }

    fn from_bytes(bytes: &[u8], max_bytes: usize, sender: &str) -> Result<Self> {
        let (header, tensors) = decode::<TrainTaskHeader>(bytes, max_bytes, sender)?;
        let (adapter, merges) = split_merges(tensors, header.first_merge, header.merges, sender)?;
        Ok(Self {
            round: header.round,
            stage: header.stage,
            seed: header.seed,
            instructions: header.instructions,
            local: header.local,
            adapter,
            merges,
        })
    }

    fn num_values(&self) -> usize {
        self.adapter.num_values() + self.merges.num_values()
    }
}

header!(TrainReplyHeader, "train_reply", {
    round: usize,
    client: usize,
    num_examples: usize,
    metrics: BTreeMap<String, f64>,
});

impl Message for TrainReply {
    const KIND: &'static str = "train_reply";

    fn to_bytes(&self) -> Result<Vec<u8>> {
        let header = TrainReplyHeader {
            kind: Self::KIND.into(),
            round: self.round,
            client: self.client,
            num_examples: self.num_examples,
            metrics: self.metrics.clone(),
        };
        encode(&header, &joined([("adapter".to_string(), &self.adapter)]))
    }

    fn from_bytes(bytes: &[u8], max_bytes: usize, sender: &str) -> Result<Self> {
        let (header, tensors) = decode::<TrainReplyHeader>(bytes, max_bytes, sender)?;
        let adapter = sections(tensors, &["adapter".to_string()], sender)?
            .pop()
            .expect("one section");
        Ok(Self {
            round: header.round,
            client: header.client,
            num_examples: header.num_examples,
            metrics: header.metrics,
            adapter,
        })
    }

    fn num_values(&self) -> usize {
        self.adapter.num_values()
    }
}

header!(EvaluateTaskHeader, "evaluate_task", {
    round: usize,
    stage: usize,
    first_merge: usize,
    merges: usize,
    batch_size: usize,
    pad_id: u32,
});

impl Message for EvaluateTask {
    const KIND: &'static str = "evaluate_task";

    fn to_bytes(&self) -> Result<Vec<u8>> {
        let header = EvaluateTaskHeader {
            kind: Self::KIND.into(),
            round: self.round,
            stage: self.stage,
            first_merge: self.merges.first,
            merges: self.merges.merges.len(),
            batch_size: self.batch_size,
            pad_id: self.pad_id,
        };
        encode(&header, &with_merges(&self.adapter, &self.merges))
    }

    fn from_bytes(bytes: &[u8], max_bytes: usize, sender: &str) -> Result<Self> {
        let (header, tensors) = decode::<EvaluateTaskHeader>(bytes, max_bytes, sender)?;
        let (adapter, merges) = split_merges(tensors, header.first_merge, header.merges, sender)?;
        Ok(Self {
            round: header.round,
            stage: header.stage,
            adapter,
            merges,
            batch_size: header.batch_size,
            pad_id: header.pad_id,
        })
    }

    fn num_values(&self) -> usize {
        self.adapter.num_values() + self.merges.num_values()
    }
}

header!(EvaluateReplyHeader, "evaluate_reply", {
    reply: EvaluateReply,
});

impl Message for EvaluateReply {
    const KIND: &'static str = "evaluate_reply";

    fn to_bytes(&self) -> Result<Vec<u8>> {
        let header = EvaluateReplyHeader {
            kind: Self::KIND.into(),
            reply: self.clone(),
        };
        encode(&header, &ParamMap::new())
    }

    fn from_bytes(bytes: &[u8], max_bytes: usize, sender: &str) -> Result<Self> {
        let (header, tensors) = decode::<EvaluateReplyHeader>(bytes, max_bytes, sender)?;
        sections(tensors, &[], sender)?;
        Ok(header.reply)
    }

    fn num_values(&self) -> usize {
        0
    }
}

header!(ProbeTaskHeader, "probe_task", {
    task: ProbeTask,
});

impl Message for ProbeTask {
    const KIND: &'static str = "probe_task";

    fn to_bytes(&self) -> Result<Vec<u8>> {
        let header = ProbeTaskHeader {
            kind: Self::KIND.into(),
            task: self.clone(),
        };
        encode(&header, &ParamMap::new())
    }

    fn from_bytes(bytes: &[u8], max_bytes: usize, sender: &str) -> Result<Self> {
        let (header, tensors) = decode::<ProbeTaskHeader>(bytes, max_bytes, sender)?;
        sections(tensors, &[], sender)?;
        Ok(header.task)
    }

    fn num_values(&self) -> usize {
        0
    }
}

header!(ProbeReplyHeader, "probe_reply", {
    reply: ProbeReply,
});

impl Message for ProbeReply {
    const KIND: &'static str = "probe_reply";

    fn to_bytes(&self) -> Result<Vec<u8>> {
        let header = ProbeReplyHeader {
            kind: Self::KIND.into(),
            reply: self.clone(),
        };
        encode(&header, &ParamMap::new())
    }

    fn from_bytes(bytes: &[u8], max_bytes: usize, sender: &str) -> Result<Self> {
        let (header, tensors) = decode::<ProbeReplyHeader>(bytes, max_bytes, sender)?;
        sections(tensors, &[], sender)?;
        Ok(header.reply)
    }

    fn num_values(&self) -> usize {
        0
    }
}

impl MergeSync {
    /// Number of tensor values of the merges.
    pub fn num_values(&self) -> usize {
        self.merges.iter().map(ParamMap::num_values).sum()
    }
}

fn with_merges(adapter: &ParamMap, merges: &MergeSync) -> ParamMap {
    let parts = std::iter::once(("adapter".to_string(), adapter)).chain(
        merges
            .merges
            .iter()
            .enumerate()
            .map(|(m, merge)| (format!("merge.{m}"), merge)),
    );
    joined(parts)
}

fn split_merges(
    tensors: ParamMap,
    first: usize,
    count: usize,
    sender: &str,
) -> Result<(ParamMap, MergeSync)> {
    check_section_count(count, &tensors, sender)?;
    let names: Vec<String> = std::iter::once("adapter".to_string())
        .chain(merge_sections("merge.", count))
        .collect();
    let mut parts = sections(tensors, &names, sender)?.into_iter();
    let adapter = parts.next().expect("the first section");
    Ok((
        adapter,
        MergeSync {
            first,
            merges: parts.collect(),
        },
    ))
}
