//! Server-side aggregation of client adapter updates (DESIGN section 2, `Aggregator`).
//!
//! An [`Aggregator`] takes the current global adapter and the round's [`ClientUpdate`]s and
//! returns the new global adapter. It may keep server state across rounds (momentum, Adam
//! moments), exposed for checkpoints as a [`ParamMap`], and may prescribe client-side behaviour
//! through [`ClientInstructions`] (FedProx's proximal term, FFA-LoRA's frozen `A`).
//!
//! Every implementation lives in its own file and follows Flower's server strategies where
//! Flower has one; [`weighted_mean`] is the one weighted average they share.
//!
//! - averaging: [`FedAvg`], [`FedProx`], [`FedAvgM`];
//! - adaptive server optimisers: [`FedAdam`], [`FedYogi`], [`FedAdagrad`];
//! - LoRA-specific: [`FfaLora`], [`FedSaLora`], [`Flora`];
//! - Byzantine-robust: [`TrimmedMean`], [`FedMedian`], [`Krum`], [`Bulyan`];
//! - differential privacy: [`DpFixedClipping`], wrapping any of the above.

mod bulyan;
mod by_name;
mod dp;
mod fedavg;
mod fedavgm;
mod fedmedian;
mod fedopt;
mod fedprox;
mod fedsa_lora;
mod ffa_lora;
mod flora;
mod krum;
mod trimmed_mean;

pub use bulyan::Bulyan;
pub use by_name::{AGGREGATOR_NAMES, by_name};
pub use dp::DpFixedClipping;
pub use fedavg::FedAvg;
pub use fedavgm::FedAvgM;
pub use fedmedian::FedMedian;
pub use fedopt::{FedAdagrad, FedAdam, FedYogi};
pub use fedprox::FedProx;
pub use fedsa_lora::FedSaLora;
pub use ffa_lora::FfaLora;
pub use flora::Flora;
pub use krum::Krum;
pub use trimmed_mean::TrimmedMean;

use std::collections::BTreeMap;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::params::{HostTensor, ParamMap};

/// One client's reply to a training round.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientUpdate {
    /// The client's id.
    pub client: usize,
    /// The client's adapter after local training (the full adapter, not a difference).
    pub params: ParamMap,
    /// Number of training examples the client used (the FedAvg weight).
    pub num_examples: usize,
    /// Client metrics, e.g. `train_loss`.
    pub metrics: BTreeMap<String, f64>,
}

/// What the server asks clients to do during local training.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClientInstructions {
    /// FedProx: add `mu / 2 * ||w - w_global||^2` over the adapter to the local loss.
    pub proximal_mu: f64,
    /// FFA-LoRA: keep every `lora_A` at its received value (train `B` only).
    pub freeze_lora_a: bool,
    /// Adapter tensors whose name contains one of these stay on the client between rounds
    /// and never travel (FedSA-LoRA: `[".lora_B."]`).
    pub kept_on_client: Vec<String>,
}

impl ClientInstructions {
    /// Whether the adapter tensor `name` stays on the client instead of travelling
    /// ([`ClientInstructions::kept_on_client`]). Such a tensor starts from the stage's fused
    /// value on each client and then stays there; the server fills it from the global adapter
    /// before aggregating a reply.
    pub fn keeps_on_client(&self, name: &str) -> bool {
        self.kept_on_client
            .iter()
            .any(|part| name.contains(part.as_str()))
    }

    /// Whether any tensor stays on clients.
    pub fn keeps_any(&self) -> bool {
        !self.kept_on_client.is_empty()
    }
}

/// Combines client updates into a new global adapter.
///
/// # Example
///
/// A user-defined aggregator (here a coordinate-wise median, a simpler cousin of the built-in
/// [`FedMedian`]) plugs in like the built-in ones:
///
/// ```
/// use devft::aggregate::{Aggregator, ClientUpdate, check_updates};
/// use devft::{HostTensor, ParamMap};
///
/// struct Median;
///
/// impl Aggregator for Median {
///     fn name(&self) -> String {
///         "median".into()
///     }
///
///     fn aggregate(&mut self, global: &ParamMap, updates: &[ClientUpdate]) -> devft::Result<ParamMap> {
///         check_updates(global, updates)?;
///         let mut out = ParamMap::new();
///         for (name, tensor) in global.iter() {
///             let values = (0..tensor.len())
///                 .map(|i| {
///                     let mut column: Vec<f32> =
///                         updates.iter().map(|u| u.params.get(name).unwrap().values()[i]).collect();
///                     column.sort_by(f32::total_cmp);
///                     column[column.len() / 2]
///                 })
///                 .collect();
///             out.insert(name, HostTensor::new(tensor.shape().to_vec(), values)?);
///         }
///         Ok(out)
///     }
/// }
///
/// let update = |client, v: f32| {
///     let mut params = ParamMap::new();
///     params.insert("w", HostTensor::new(vec![1], vec![v]).unwrap());
///     ClientUpdate { client, params, num_examples: 1, metrics: Default::default() }
/// };
/// let mut global = ParamMap::new();
/// global.insert("w", HostTensor::new(vec![1], vec![0.0]).unwrap());
/// let new = Median.aggregate(&global, &[update(0, 1.0), update(1, 9.0), update(2, 2.0)])?;
/// assert_eq!(new.get("w").unwrap().values(), &[2.0]);
/// # Ok::<(), devft::Error>(())
/// ```
pub trait Aggregator: Send {
    /// A short name for logs and metrics.
    fn name(&self) -> String;

    /// What clients must do during local training. Default: plain local training.
    fn client_instructions(&self) -> ClientInstructions {
        ClientInstructions::default()
    }

    /// The new global adapter from the current one and the round's valid updates.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when there is no update, and the errors of
    /// [`check_updates`] for inconsistent ones.
    fn aggregate(&mut self, global: &ParamMap, updates: &[ClientUpdate]) -> Result<ParamMap>;

    /// Server state to checkpoint (empty for stateless aggregators).
    fn state(&self) -> ParamMap {
        ParamMap::new()
    }

    /// Restores [`Aggregator::state`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when the state does not belong to this aggregator.
    fn load_state(&mut self, state: &ParamMap) -> Result<()> {
        if state.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "{} keeps no state, but a state of {} tensors was given",
                self.name(),
                state.len()
            )))
        }
    }

    /// Forgets server state, e.g. when a new DevFT stage changes the adapter's shape.
    fn reset(&mut self) {}

    /// Whether [`Aggregator::aggregate`] returns an adapter to merge into the base weights
    /// rather than the next global adapter. Default: `false`.
    ///
    /// When `true` (FLoRA), the returned adapter may have any rank; the loop sends it to the
    /// next round's clients, which merge `scaling * A B` into their base weights
    /// ([`crate::model::CausalLm::merge_adapter`]), as does the server; every round then
    /// starts from a fresh adapter, and stage transfer carries the merged weights
    /// ([`crate::transfer::transfer_merged_weights`]).
    fn merges_into_base(&self) -> bool {
        false
    }
}

/// A boxed aggregator (`Box<dyn Aggregator>` included) is an aggregator: every method is
/// forwarded, so wrappers such as [`DpFixedClipping`] take one chosen at run time.
impl<A: Aggregator + ?Sized> Aggregator for Box<A> {
    fn name(&self) -> String {
        (**self).name()
    }

    fn client_instructions(&self) -> ClientInstructions {
        (**self).client_instructions()
    }

    fn aggregate(&mut self, global: &ParamMap, updates: &[ClientUpdate]) -> Result<ParamMap> {
        (**self).aggregate(global, updates)
    }

    fn state(&self) -> ParamMap {
        (**self).state()
    }

    fn load_state(&mut self, state: &ParamMap) -> Result<()> {
        (**self).load_state(state)
    }

    fn reset(&mut self) {
        (**self).reset()
    }

    fn merges_into_base(&self) -> bool {
        (**self).merges_into_base()
    }
}

/// Checks that there is at least one update and that every update has exactly the global's
/// tensor names and shapes, finite values and a positive example count.
///
/// # Errors
///
/// [`Error::InvalidArgument`] (no update, zero examples), [`Error::MissingTensor`],
/// [`Error::UnexpectedTensor`], [`Error::ShapeMismatch`] or [`Error::NonFinite`], each naming
/// the client.
pub fn check_updates(global: &ParamMap, updates: &[ClientUpdate]) -> Result<()> {
    if updates.is_empty() {
        return Err(Error::InvalidArgument(
            "no client update to aggregate".into(),
        ));
    }
    for update in updates {
        check_update(global, update)?;
    }
    Ok(())
}

/// [`check_updates`] for one update.
///
/// # Errors
///
/// As [`check_updates`].
pub fn check_update(global: &ParamMap, update: &ClientUpdate) -> Result<()> {
    let client = update.client;
    if update.num_examples == 0 {
        return Err(Error::InvalidArgument(format!(
            "client {client} reports zero examples"
        )));
    }
    for (name, tensor) in global.iter() {
        let theirs = update
            .params
            .get(name)
            .ok_or_else(|| Error::MissingTensor {
                name: format!("{name} (client {client})"),
            })?;
        if theirs.shape() != tensor.shape() {
            return Err(Error::ShapeMismatch {
                name: format!("{name} (client {client})"),
                expected: tensor.shape().to_vec(),
                found: theirs.shape().to_vec(),
            });
        }
        if !theirs.is_finite() {
            return Err(Error::NonFinite {
                name: format!("{name} (client {client})"),
            });
        }
    }
    if let Some(extra) = update.params.names().find(|n| global.get(n).is_none()) {
        return Err(Error::UnexpectedTensor {
            name: format!("{extra} (client {client})"),
        });
    }
    Ok(())
}

/// The L2 norm of every value of `params`, accumulated in f64 (so finite `f32` values near
/// `f32::MAX` give a finite, huge norm rather than an overflow).
pub fn params_norm(params: &ParamMap) -> f64 {
    params
        .iter()
        .flat_map(|(_, t)| t.values())
        .map(|v| f64::from(*v).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// Refuses an update whose norm ([`params_norm`]) exceeds `factor` times the global adapter's
/// (taken as at least 1): finite but absurd values, such as a client sending `3e38`, would
/// otherwise pass [`check_update`] and poison the aggregate.
///
/// ```
/// use devft::aggregate::{ClientUpdate, check_update_norm};
/// use devft::{HostTensor, ParamMap};
///
/// let map = |v: f32| {
///     let mut params = ParamMap::new();
///     params.insert("w", HostTensor::new(vec![2], vec![v, v]).unwrap());
///     params
/// };
/// let update = |v| ClientUpdate { client: 3, params: map(v), num_examples: 1, metrics: Default::default() };
/// assert!(check_update_norm(&map(2.0), &update(2.5), 10.0).is_ok());
/// assert!(check_update_norm(&map(2.0), &update(3e38), 10.0).is_err());
/// ```
///
/// # Errors
///
/// [`Error::RejectedUpdate`] naming the client, the norm and the bound.
pub fn check_update_norm(global: &ParamMap, update: &ClientUpdate, factor: f64) -> Result<()> {
    let bound = factor * params_norm(global).max(1.0);
    let norm = params_norm(&update.params);
    if norm <= bound {
        return Ok(());
    }
    Err(Error::RejectedUpdate {
        client: update.client,
        reason: format!(
            "its norm {norm:.4e} exceeds {bound:.4e} ({factor} times the global adapter's)"
        ),
    })
}

/// The example-weighted mean of the updates' parameters (FedAvg), accumulated in f64.
///
/// # Errors
///
/// As [`check_updates`].
pub fn weighted_mean(global: &ParamMap, updates: &[ClientUpdate]) -> Result<ParamMap> {
    check_updates(global, updates)?;
    let total: f64 = updates.iter().map(|u| u.num_examples as f64).sum();
    let weights: Vec<f64> = updates
        .iter()
        .map(|u| u.num_examples as f64 / total)
        .collect();
    combine(global, updates, &weights)
}

/// `sum_k weights[k] * update_k` per tensor, accumulated in f64, in parallel chunks.
pub(crate) fn combine(
    global: &ParamMap,
    updates: &[ClientUpdate],
    weights: &[f64],
) -> Result<ParamMap> {
    const CHUNK: usize = 1 << 14;
    let mut out = ParamMap::new();
    for (name, tensor) in global.iter() {
        let sources = updates
            .iter()
            .map(|u| u.params.require(name).map(HostTensor::values))
            .collect::<Result<Vec<_>>>()?;
        let mut values = vec![0.0f32; tensor.len()];
        values
            .par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(chunk, out)| {
                let start = chunk * CHUNK;
                let mut acc = vec![0.0f64; out.len()];
                for (source, w) in sources.iter().zip(weights) {
                    for (a, v) in acc.iter_mut().zip(&source[start..start + out.len()]) {
                        *a += w * f64::from(*v);
                    }
                }
                for (o, a) in out.iter_mut().zip(acc) {
                    *o = a as f32;
                }
            });
        out.insert(name, HostTensor::new(tensor.shape().to_vec(), values)?);
    }
    Ok(out)
}

/// `reduce(column)` for every coordinate, where `column` holds the updates' values at that
/// coordinate as f64, in the order of `updates` (`reduce` may reorder it). The result is
/// rounded to f32 once. Coordinates are processed in parallel chunks.
pub(crate) fn per_coordinate(
    global: &ParamMap,
    updates: &[&ClientUpdate],
    reduce: impl Fn(&mut [f64]) -> f64 + Sync,
) -> Result<ParamMap> {
    const CHUNK: usize = 1 << 12;
    let mut out = ParamMap::new();
    for (name, tensor) in global.iter() {
        let sources = updates
            .iter()
            .map(|u| u.params.require(name).map(HostTensor::values))
            .collect::<Result<Vec<_>>>()?;
        if let Some(source) = sources.iter().find(|s| s.len() != tensor.len()) {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: vec![tensor.len()],
                found: vec![source.len()],
            });
        }
        let mut values = vec![0.0f32; tensor.len()];
        values
            .par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(chunk, out)| {
                let start = chunk * CHUNK;
                let mut column = vec![0.0f64; sources.len()];
                for (k, o) in out.iter_mut().enumerate() {
                    for (c, source) in column.iter_mut().zip(&sources) {
                        *c = f64::from(source[start + k]);
                    }
                    *o = reduce(&mut column) as f32;
                }
            });
        out.insert(name, HostTensor::new(tensor.shape().to_vec(), values)?);
    }
    Ok(out)
}

/// Whether a tensor name is a LoRA `A` factor.
pub fn is_lora_a(name: &str) -> bool {
    name.contains(".lora_A.")
}

/// The weighted mean of the tensors for which `averaged(name)` holds; the others keep the
/// global's value.
pub(crate) fn partial_mean(
    global: &ParamMap,
    updates: &[ClientUpdate],
    averaged: impl Fn(&str) -> bool,
) -> Result<ParamMap> {
    Ok(weighted_mean(global, updates)?
        .into_iter()
        .map(|(name, tensor)| {
            if averaged(&name) {
                (name, tensor)
            } else {
                let kept = global.get(&name).expect("checked names").clone();
                (name, kept)
            }
        })
        .collect())
}

/// Reads a counter kept in an aggregator's state (a round number): one whole value in
/// `0..=2^24`, the range an `f32` holds exactly.
///
/// # Errors
///
/// [`Error::MissingTensor`] when absent, [`Error::InvalidArgument`] for any other content.
pub(crate) fn state_counter(state: &ParamMap, key: &str) -> Result<u64> {
    match state.require(key)?.values() {
        [v] if (0.0..=16_777_216.0).contains(v) && v.fract() == 0.0 => Ok(*v as u64),
        _ => Err(Error::InvalidArgument(format!(
            "aggregator state `{key}` must hold one whole count in 0..=2^24"
        ))),
    }
}

/// Applies `f(global, other)` element-wise over matching tensors of two maps with the same
/// names and shapes.
pub(crate) fn zip_map(a: &ParamMap, b: &ParamMap, f: impl Fn(f64, f64) -> f64) -> Result<ParamMap> {
    let mut out = ParamMap::new();
    for (name, x) in a.iter() {
        let y = b.require(name)?;
        if x.shape() != y.shape() {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: x.shape().to_vec(),
                found: y.shape().to_vec(),
            });
        }
        let values = x
            .values()
            .iter()
            .zip(y.values())
            .map(|(p, q)| f(f64::from(*p), f64::from(*q)) as f32)
            .collect();
        out.insert(name, HostTensor::new(x.shape().to_vec(), values)?);
    }
    Ok(out)
}
