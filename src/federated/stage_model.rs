//! A device's copy of the current stage, built from a [`StageSetup`] and its own base model.

use crate::error::{Error, Result};
use crate::federated::protocol::{MergeSync, MergedStage, StageSetup, StartAdapter};
use crate::fusion::LayerFuser;
use crate::grouping::Grouping;
use crate::model::CausalLm;
use crate::params::ParamMap;
use crate::transfer::{build_submodel, expand_to_members, transfer_lora, transfer_merge};

/// The stage as one device holds it: the full model at the stage's start (its base, the
/// merges of earlier stages, the stage-start adapter), the stage's fused submodel, and the
/// merges of this stage applied to it so far.
///
/// The server and every client build theirs with [`StageModel::build`] from the same
/// [`StageSetup`], so they hold the same submodel without it ever being sent.
#[derive(Debug, Clone)]
pub struct StageModel {
    setup: StageSetup,
    full: CausalLm,
    submodel: CausalLm,
    merges: Vec<ParamMap>,
}

impl StageModel {
    /// Builds the stage from `base` (the device's base model with a LoRA adapter attached, as
    /// the run started) and the server's set-up, fusing with `fuser`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when `fuser` is not the set-up's fuser or the base has no
    /// adapter; the errors of [`transfer_merge`], [`CausalLm::load_lora_params`] and
    /// [`build_submodel`] when the set-up does not fit the base model.
    pub fn build(base: &CausalLm, setup: &StageSetup, fuser: &dyn LayerFuser) -> Result<Self> {
        if setup.fuser != fuser.describe() {
            return Err(Error::InvalidArgument(format!(
                "stage {} is fused with `{}`, this device fuses with `{}`",
                setup.stage,
                setup.fuser,
                fuser.describe()
            )));
        }
        let adapter = start_adapter(base, &setup.start)?;
        let full = full_model(base, &setup.history, &adapter)?;
        let submodel = build_submodel(&full, &setup.grouping, fuser)?;
        Ok(Self {
            setup: setup.clone(),
            full,
            submodel,
            merges: Vec::new(),
        })
    }

    /// The stage index.
    pub fn stage(&self) -> usize {
        self.setup.stage
    }

    /// The stage's grouping.
    pub fn grouping(&self) -> &Grouping {
        &self.setup.grouping
    }

    /// The set-up the stage was built from.
    pub fn setup(&self) -> &StageSetup {
        &self.setup
    }

    /// The fused submodel with this stage's merges applied (its adapter is whatever was
    /// built or loaded last; trainers load the task's adapter into a copy).
    pub fn submodel(&self) -> &CausalLm {
        &self.submodel
    }

    /// The stage's merges applied so far, in order.
    pub fn merges(&self) -> &[ParamMap] {
        &self.merges
    }

    /// Applies the merges of `sync` this device lacks, in order; those it has are skipped.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when `sync` starts after a merge this device has not seen
    /// (a gap); the errors of [`CausalLm::merge_adapter`] for a merge that does not fit.
    pub fn sync(&mut self, sync: &MergeSync) -> Result<()> {
        if sync.first > self.merges.len() {
            return Err(Error::InvalidArgument(format!(
                "merges from {} were sent, but this device has applied only {} of stage {}",
                sync.first,
                self.merges.len(),
                self.setup.stage
            )));
        }
        for merge in sync.merges.iter().skip(self.merges.len() - sync.first) {
            self.submodel.merge_adapter(merge)?;
            self.merges.push(merge.clone());
        }
        Ok(())
    }

    /// The full model carrying the stage's knowledge: `adapter` (the submodel's) copied to
    /// every member of its group, and the stage's merges replayed on the members.
    ///
    /// # Errors
    ///
    /// The errors of [`CausalLm::load_lora_params`] when `adapter` does not fit the submodel.
    pub fn knowledge(&self, adapter: &ParamMap) -> Result<CausalLm> {
        let mut submodel = self.submodel.clone();
        submodel.load_lora_params(adapter)?;
        let mut full = self.full.clone();
        transfer_lora(&mut full, &submodel, &self.setup.grouping)?;
        for merge in &self.merges {
            transfer_merge(&mut full, &self.setup.grouping, merge)?;
        }
        Ok(full)
    }
}

/// The full model from `base`: every earlier stage's merges replayed on the member layers,
/// then `adapter` loaded.
///
/// # Errors
///
/// As [`transfer_merge`] and [`CausalLm::load_lora_params`].
pub fn full_model(
    base: &CausalLm,
    history: &[MergedStage],
    adapter: &ParamMap,
) -> Result<CausalLm> {
    if base.lora_config().is_none() {
        return Err(Error::InvalidArgument(
            "the base model has no LoRA adapter".into(),
        ));
    }
    let mut full = base.clone();
    for stage in history {
        for merge in &stage.merges {
            transfer_merge(&mut full, &stage.grouping, merge)?;
        }
    }
    full.load_lora_params(adapter)?;
    Ok(full)
}

/// Lower-case hex SHA-256 of an adapter's safetensors bytes: how a stage's set-up names the
/// initial adapter every device starts with.
///
/// # Errors
///
/// As [`ParamMap::to_safetensors_bytes`].
pub fn adapter_sha256(adapter: &ParamMap) -> Result<String> {
    use sha2::{Digest, Sha256};
    Ok(format!(
        "{:x}",
        Sha256::digest(adapter.to_safetensors_bytes()?)
    ))
}

/// The most compact exact [`StartAdapter`] for `adapter` (a full model's), given the grouping
/// of the stage before, if any: the initial adapter's hash before the first stage; one
/// adapter per group when every member of each group holds its anchor's (as after a
/// transfer); else the whole adapter.
///
/// # Errors
///
/// As [`adapter_sha256`].
pub fn compact_start(adapter: &ParamMap, previous: Option<&Grouping>) -> Result<StartAdapter> {
    let Some(grouping) = previous else {
        return Ok(StartAdapter::Initial {
            sha256: adapter_sha256(adapter)?,
        });
    };
    let layer = |i: usize| format!("model.layers.{i}.");
    let mut per_group = ParamMap::new();
    for (g, group) in grouping.groups().iter().enumerate() {
        let anchor = layer(group[0]);
        for (name, tensor) in adapter.iter().filter(|(n, _)| n.starts_with(&anchor)) {
            per_group.insert(
                format!("{}{}", layer(g), &name[anchor.len()..]),
                tensor.clone(),
            );
        }
    }
    let exact = expand_to_members(&per_group, grouping).is_ok_and(|expanded| &expanded == adapter);
    Ok(if exact {
        StartAdapter::PerGroup {
            grouping: grouping.clone(),
            adapter: per_group,
        }
    } else {
        StartAdapter::Full {
            adapter: adapter.clone(),
        }
    })
}

/// The full model's adapter a set-up's start describes, on a device with `base`.
fn start_adapter(base: &CausalLm, start: &StartAdapter) -> Result<ParamMap> {
    match start {
        StartAdapter::Initial { sha256 } => {
            let own = base.lora_params();
            let ours = adapter_sha256(&own)?;
            if &ours != sha256 {
                return Err(Error::InvalidArgument(format!(
                    "this device's initial adapter (SHA-256 {ours}) is not the run's ({sha256}): \
                     the model or the LoRA settings or seed differ"
                )));
            }
            Ok(own)
        }
        StartAdapter::PerGroup { grouping, adapter } => {
            if grouping.num_layers() != base.num_layers() {
                return Err(Error::InvalidArgument(format!(
                    "the start adapter's grouping covers {} layers, the model has {}",
                    grouping.num_layers(),
                    base.num_layers()
                )));
            }
            expand_to_members(adapter, grouping)
        }
        StartAdapter::Full { adapter } => Ok(adapter.clone()),
    }
}
