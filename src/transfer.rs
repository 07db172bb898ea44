//! Submodels and knowledge transfer (DESIGN section 1.1, steps 3 and 5).
//!
//! [`build_submodel`] fuses each group of a [`Grouping`] into one layer, keeping the
//! embeddings, final norm and head; [`transfer_lora`] copies each fused layer's trained
//! adapter back to every member of its group, so that the full model carries the stage's
//! knowledge into the next grouping. Aggregators that merge into the base weights (FLoRA)
//! train the fused layers' projections themselves; [`transfer_merged_weights`] carries that
//! change back, and [`transfer_merge`] does the same one merge adapter at a time (what a
//! remote client can replay from the merges it was sent).

use crate::error::{Error, Result};
use crate::fusion::{LayerFuser, fuse_layers};
use crate::grouping::Grouping;
use crate::model::{CausalLm, DecoderLayer, FrozenWeight, Projection};
use crate::params::ParamMap;

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
    check_submodel(grouping, submodel)?;
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

fn check_submodel(grouping: &Grouping, submodel: &CausalLm) -> Result<()> {
    if submodel.num_layers() != grouping.len() {
        return Err(Error::InvalidArgument(format!(
            "the submodel has {} layers, the grouping {} groups",
            submodel.num_layers(),
            grouping.len()
        )));
    }
    Ok(())
}

/// Adds what training merged into each fused layer's projection weights, `trained - fused`,
/// to every member of its group: the knowledge transfer of merging aggregators
/// ([`crate::aggregate::Aggregator::merges_into_base`]). `fused` is the submodel as
/// [`build_submodel`] made it, `trained` the same submodel after the stage's merges.
///
/// # Errors
///
/// [`Error::InvalidArgument`] when the grouping does not match the three models, and
/// [`Error::ShapeMismatch`] when their projections differ in shape. On error `model` is
/// unchanged.
pub fn transfer_merged_weights(
    model: &mut CausalLm,
    fused: &CausalLm,
    trained: &CausalLm,
    grouping: &Grouping,
) -> Result<()> {
    check_covers(grouping, model)?;
    check_submodel(grouping, fused)?;
    check_submodel(grouping, trained)?;
    let mut layers = model.layers.clone();
    let device = model.device();
    for (g, group) in grouping.groups().iter().enumerate() {
        for p in Projection::ALL {
            let before = fused.layers[g].projection(p);
            let after = trained.layers[g].projection(p);
            let expected = layers[group[0]].projection(p).dims();
            for (which, dims) in [("fused", before.dims()), ("trained", after.dims())] {
                if dims != expected {
                    return Err(Error::ShapeMismatch {
                        name: format!("{which} submodel layer {g} {}.weight", p.path()),
                        expected: expected.to_vec(),
                        found: dims.to_vec(),
                    });
                }
            }
            let delta = after.weight.to_tensor(&device) - before.weight.to_tensor(&device);
            for &member in group {
                let linear = layers[member].projection_mut(p);
                let weight = linear.weight.to_tensor(&device) + delta.clone();
                linear.weight = FrozenWeight::dense(weight);
            }
        }
    }
    model.layers = layers;
    Ok(())
}

/// Merges `merge`, a merge adapter of a submodel built from `grouping` (named as
/// [`CausalLm::lora_params`] names the submodel's layers, any rank), into every member layer
/// of its group: `scaling * A B` of fused layer `g` is added to the projection weights of
/// each layer of group `g` ([`CausalLm::merge_adapter`]). Replaying a stage's merges this way
/// gives, up to float rounding, what [`transfer_merged_weights`] gives from the trained
/// submodel.
///
/// # Errors
///
/// [`Error::InvalidArgument`] when the grouping does not cover the model,
/// [`Error::UnexpectedTensor`] for a name outside the submodel, and the errors of
/// [`CausalLm::merge_adapter`]. On error `model` is unchanged.
pub fn transfer_merge(model: &mut CausalLm, grouping: &Grouping, merge: &ParamMap) -> Result<()> {
    check_covers(grouping, model)?;
    model.merge_adapter(&expand_to_members(merge, grouping)?)
}

/// Tensors named by group (`model.layers.{g}.*`, as a submodel built from `grouping` names
/// its layers) copied to every member layer of their group (`model.layers.{member}.*`).
///
/// # Errors
///
/// [`Error::UnexpectedTensor`] for a name that is not a layer's or names no group.
pub fn expand_to_members(per_group: &ParamMap, grouping: &Grouping) -> Result<ParamMap> {
    let mut expanded = ParamMap::new();
    for (name, tensor) in per_group.iter() {
        let slot = crate::model::split_layer_name(name).filter(|(g, _)| *g < grouping.len());
        let Some((group, inner)) = slot else {
            return Err(Error::UnexpectedTensor {
                name: name.to_string(),
            });
        };
        for member in &grouping.groups()[group] {
            expanded.insert(format!("model.layers.{member}.{inner}"), tensor.clone());
        }
    }
    Ok(expanded)
}
