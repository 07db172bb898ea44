//! Submodels and knowledge transfer (DESIGN section 1.1, steps 3 and 5).
//!
//! [`build_submodel`] fuses each group of a [`Grouping`] into one layer, keeping the
//! embeddings, final norm and head; [`transfer_lora`] copies each fused layer's trained
//! adapter back to every member of its group, so that the full model carries the stage's
//! knowledge into the next grouping.

use crate::error::{Error, Result};
use crate::fusion::{LayerFuser, fuse_layers};
use crate::grouping::Grouping;
use crate::model::{CausalLm, DecoderLayer};

fn check_covers(grouping: &Grouping, model: &CausalLm) -> Result<()> {
    if grouping.num_layers() != model.num_layers() {
        return Err(Error::InvalidArgument(format!(
            "the grouping covers {} layers, the model has {}",
            grouping.num_layers(),
            model.num_layers()
        )));
    }
    Ok(())
}

/// The submodel with one fused layer per group, in group (anchor) order.
///
/// Every tensor of a layer takes part in fusion: projection weights and biases, both norms,
/// and the LoRA factors A and B separately (not their product). A group of one layer is copied
/// unchanged.
///
/// # Errors
///
/// [`Error::InvalidArgument`] when the grouping does not cover the model's layers, and any
/// error of the fuser or of rebuilding a layer.
pub fn build_submodel(
    model: &CausalLm,
    grouping: &Grouping,
    fuser: &dyn LayerFuser,
) -> Result<CausalLm> {
    check_covers(grouping, model)?;
    let device = model.device();
    let layers = grouping
        .groups()
        .iter()
        .map(|group| -> Result<DecoderLayer> {
            if let [single] = group.as_slice() {
                return Ok(model.layers[*single].clone());
            }
            let members: Vec<_> = group.iter().map(|&l| model.layers[l].params()).collect();
            let fused = fuse_layers(fuser, &members)?;
            DecoderLayer::from_all_params(model.config(), &fused, model.lora_config(), &device)
        })
        .collect::<Result<Vec<_>>>()?;
    model.with_layers(layers)
}

/// Copies the adapter of submodel layer g to every layer of group g of `model`.
///
/// All copies are checked before any is made: on error `model` is unchanged.
///
/// # Errors
///
/// [`Error::InvalidArgument`] when the grouping does not match the model or the submodel,
/// and the errors of [`DecoderLayer::load_lora_params`] when the adapters differ in shape.
pub fn transfer_lora(model: &mut CausalLm, submodel: &CausalLm, grouping: &Grouping) -> Result<()> {
    check_covers(grouping, model)?;
    if submodel.num_layers() != grouping.len() {
        return Err(Error::InvalidArgument(format!(
            "the submodel has {} layers, the grouping {} groups",
            submodel.num_layers(),
            grouping.len()
        )));
    }
    let mut layers = model.layers.clone();
    for (group, fused) in grouping.groups().iter().zip(&submodel.layers) {
        let adapter = fused.lora_params();
        for &member in group {
            layers[member].load_lora_params(&adapter)?;
        }
    }
    model.layers = layers;
    Ok(())
}
