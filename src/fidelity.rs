//! Submodel fidelity: how well a fused submodel stands in for the full model before any
//! training.
//!
//! A DevFT stage trains adapters on a submodel of K fused layers. When fusion breaks the
//! model (its loss far above the full model's), the stage's adapters learn to repair the
//! submodel rather than the task, and what they learn transfers badly to the full model.
//! [`submodel_loss`] measures one submodel's held-out loss; [`fidelity_sweep`] measures it
//! over capacities, groupers and fusers, which is how a first stage should be chosen.
//!
//! # Example
//!
//! ```
//! use devft::data::TokenizedExample;
//! use devft::fidelity::{FidelityCase, fidelity_sweep};
//! use devft::fusion::{DifferentialFuser, MeanFuser};
//! use devft::grouping::{EvenGrouper, SpectralGrouper};
//! use devft::model::{CausalLm, DecoderConfig};
//!
//! let device = devft::device::default_device()?;
//! let config = DecoderConfig {
//!     num_layers: 4, hidden_size: 32, intermediate_size: 64, num_heads: 2, num_kv_heads: 1,
//!     head_dim: 16, vocab_size: 20, ..DecoderConfig::smollm2_135m()
//! };
//! let model = CausalLm::random(config, 0, &device)?;
//! let examples = vec![TokenizedExample {
//!     ids: vec![1, 5, 9, 14, 3, 7],
//!     targets: vec![false, false, true, true, true, true],
//!     label: None,
//! }];
//! let (spectral, even) = (SpectralGrouper::new(), EvenGrouper);
//! let (differential, mean) = (DifferentialFuser::default(), MeanFuser);
//! let case = FidelityCase::new(&[1, 2, 4], 8, 0)
//!     .with_grouper("spectral", &spectral)
//!     .with_grouper("even", &even)
//!     .with_fuser("differential(0.1)", &differential)
//!     .with_fuser("mean", &mean);
//! let report = fidelity_sweep(&model, &examples, &case, |_| {})?;
//! assert_eq!(report.points.len(), 3 * 2 * 2);
//! // K = L is the full model itself, whatever the grouper and fuser.
//! let full = report.points.iter().filter(|p| p.capacity == 4);
//! assert!(full.into_iter().all(|p| p.loss == report.full_loss));
//! # Ok::<(), devft::Error>(())
//! ```

use serde::Serialize;

use crate::data::TokenizedExample;
use crate::error::{Error, Result};
use crate::federated::evaluate_loss;
use crate::fusion::LayerFuser;
use crate::grouping::{Grouping, LayerGrouper};
use crate::model::CausalLm;
use crate::transfer::build_submodel;

/// The held-out loss of the submodel that `fuser` makes of `model` with `grouping`, before any
/// training: [`build_submodel`] then [`evaluate_loss`].
///
/// # Errors
///
/// The errors of [`build_submodel`] (a grouping that does not cover the model, a failing
/// fuser) and of [`evaluate_loss`] (no example, a zero batch size, no target token).
pub fn submodel_loss(
    model: &CausalLm,
    grouping: &Grouping,
    fuser: &dyn LayerFuser,
    examples: &[TokenizedExample],
    batch_size: usize,
    pad_id: u32,
) -> Result<f64> {
    let submodel = build_submodel(model, grouping, fuser)?;
    evaluate_loss(&submodel, examples, batch_size, pad_id)
}

/// What [`fidelity_sweep`] measures: capacities, and named groupers and fusers.
pub struct FidelityCase<'a> {
    capacities: Vec<usize>,
    batch_size: usize,
    pad_id: u32,
    groupers: Vec<(String, &'a dyn LayerGrouper)>,
    fusers: Vec<(String, &'a dyn LayerFuser)>,
}

impl<'a> FidelityCase<'a> {
    /// These capacities (numbers of fused layers), evaluated in batches of `batch_size`
    /// padded with `pad_id`; add groupers and fusers with [`Self::with_grouper`] and
    /// [`Self::with_fuser`].
    pub fn new(capacities: &[usize], batch_size: usize, pad_id: u32) -> Self {
        Self {
            capacities: capacities.to_vec(),
            batch_size,
            pad_id,
            groupers: Vec::new(),
            fusers: Vec::new(),
        }
    }

    /// Adds a grouper, reported under `name`.
    pub fn with_grouper(mut self, name: &str, grouper: &'a dyn LayerGrouper) -> Self {
        self.groupers.push((name.to_string(), grouper));
        self
    }

    /// Adds a fuser, reported under `name`.
    pub fn with_fuser(mut self, name: &str, fuser: &'a dyn LayerFuser) -> Self {
        self.fusers.push((name.to_string(), fuser));
        self
    }
}

/// One submodel's loss in a [`FidelityReport`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FidelityPoint {
    /// The grouper's name.
    pub grouper: String,
    /// The fuser's name.
    pub fuser: String,
    /// Layers of the submodel.
    pub capacity: usize,
    /// Held-out loss before training.
    pub loss: f64,
    /// The groups of layers that were fused (layer indices, in group order).
    pub groups: Vec<Vec<usize>>,
}

/// The result of [`fidelity_sweep`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FidelityReport {
    /// Layers of the full model.
    pub num_layers: usize,
    /// Held-out loss of the full model.
    pub full_loss: f64,
    /// One point per grouper, capacity and fuser, in that nesting order.
    pub points: Vec<FidelityPoint>,
}

impl FidelityReport {
    /// The smallest capacity whose loss, with this grouper and fuser, is at most `tolerance`
    /// above the full model's (`None` when no measured capacity is).
    pub fn smallest_within(&self, grouper: &str, fuser: &str, tolerance: f64) -> Option<usize> {
        self.points
            .iter()
            .filter(|p| p.grouper == grouper && p.fuser == fuser)
            .filter(|p| p.loss <= self.full_loss + tolerance)
            .map(|p| p.capacity)
            .min()
    }
}

/// The loss of every submodel of `case` on `examples`, and of the full model. A grouping into
/// singletons (K = L) is the full model whatever the fuser, so it is not evaluated again.
/// `on_point` sees each point as it is measured (for progress output).
///
/// # Errors
///
/// [`Error::InvalidArgument`] when the case has no capacity, grouper or fuser, or a capacity
/// is 0 or above the model's layers; the errors of the groupers and of [`submodel_loss`].
pub fn fidelity_sweep(
    model: &CausalLm,
    examples: &[TokenizedExample],
    case: &FidelityCase<'_>,
    mut on_point: impl FnMut(&FidelityPoint),
) -> Result<FidelityReport> {
    let num_layers = model.num_layers();
    if case.capacities.is_empty() || case.groupers.is_empty() || case.fusers.is_empty() {
        return Err(Error::InvalidArgument(
            "a fidelity sweep needs capacities, a grouper and a fuser".into(),
        ));
    }
    if let Some(&bad) = case.capacities.iter().find(|&&k| k == 0 || k > num_layers) {
        return Err(Error::InvalidArgument(format!(
            "capacity {bad} is not in 1..={num_layers}"
        )));
    }
    let full_loss = evaluate_loss(model, examples, case.batch_size, case.pad_id)?;
    let mut points = Vec::new();
    for (grouper_name, grouper) in &case.groupers {
        for &capacity in &case.capacities {
            let grouping = grouper.group(model, capacity)?;
            for (fuser_name, fuser) in &case.fusers {
                let loss = if grouping.len() == num_layers {
                    full_loss
                } else {
                    submodel_loss(
                        model,
                        &grouping,
                        *fuser,
                        examples,
                        case.batch_size,
                        case.pad_id,
                    )?
                };
                let point = FidelityPoint {
                    grouper: grouper_name.clone(),
                    fuser: fuser_name.clone(),
                    capacity,
                    loss,
                    groups: grouping.groups().to_vec(),
                };
                on_point(&point);
                points.push(point);
            }
        }
    }
    Ok(FidelityReport {
        num_layers,
        full_loss,
        points,
    })
}
