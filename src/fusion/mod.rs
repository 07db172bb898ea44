//! Layer fusion: one layer from a group of layers, tensor by tensor (DESIGN section 1.1,
//! step 3).
//!
//! [`LayerFuser`] is the seam: the paper's differential-based fusion ([`DifferentialFuser`])
//! and the ablations ([`AnchorFuser`], [`MeanFuser`]) implement it. A fuser sees one tensor
//! name at a time with the group's tensors for it (the anchor's first), so fusing never needs
//! more than one tensor per member in memory; [`fuse_layers`] applies it to whole layers.

mod anchor;
mod differential;
mod mean;

pub use anchor::AnchorFuser;
pub use differential::DifferentialFuser;
pub use mean::MeanFuser;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::params::{HostTensor, ParamMap};

/// Fuses a group of layers into one.
///
/// # Example
///
/// A user-defined fuser that keeps the element-wise median of two or more layers:
///
/// ```
/// use devft::fusion::{LayerFuser, fuse_layers};
/// use devft::{HostTensor, ParamMap};
///
/// struct Median;
///
/// impl LayerFuser for Median {
///     fn fuse_tensor(&self, _name: &str, members: &[&HostTensor]) -> devft::Result<HostTensor> {
///         let values = (0..members[0].len())
///             .map(|i| {
///                 let mut column: Vec<f32> = members.iter().map(|t| t.values()[i]).collect();
///                 column.sort_by(f32::total_cmp);
///                 column[column.len() / 2]
///             })
///             .collect();
///         HostTensor::new(members[0].shape().to_vec(), values)
///     }
/// }
///
/// let layer = |v: f32| {
///     let mut p = ParamMap::new();
///     p.insert("w", HostTensor::new(vec![2], vec![v, -v]).unwrap());
///     p
/// };
/// let fused = fuse_layers(&Median, &[layer(1.0), layer(5.0), layer(2.0)])?;
/// assert_eq!(fused.get("w").unwrap().values(), &[2.0, -2.0]);
/// # Ok::<(), devft::Error>(())
/// ```
pub trait LayerFuser: Send {
    /// Fuses the group's tensors called `name` into one. `members[0]` is the anchor's (the
    /// group's smallest layer index), the rest follow in layer order; all have the same shape.
    ///
    /// # Errors
    ///
    /// Implementation-specific; the provided fusers do not fail on valid input.
    fn fuse_tensor(&self, name: &str, members: &[&HostTensor]) -> Result<HostTensor>;

    /// The fuser and its parameters in a few words, e.g. `differential(beta=0.1)`. It travels
    /// in a stage's set-up message, and a client refuses a stage built by another fuser than
    /// its own. Default: the type's name.
    fn describe(&self) -> String {
        std::any::type_name::<Self>().to_string()
    }
}

/// Fuses whole layers given as parameter maps (the anchor first), tensor by tensor.
///
/// # Errors
///
/// [`Error::InvalidArgument`] for an empty group, [`Error::MissingTensor`] or
/// [`Error::UnexpectedTensor`] when the layers do not hold the same tensor names, and
/// [`Error::ShapeMismatch`] when a tensor's shape differs between layers.
pub fn fuse_layers(fuser: &dyn LayerFuser, layers: &[ParamMap]) -> Result<ParamMap> {
    let anchor = layers
        .first()
        .ok_or_else(|| Error::InvalidArgument("cannot fuse an empty group".into()))?;
    for layer in &layers[1..] {
        if let Some(extra) = layer.names().find(|n| anchor.get(n).is_none()) {
            return Err(Error::UnexpectedTensor {
                name: extra.to_string(),
            });
        }
    }
    let mut fused = ParamMap::new();
    for (name, first) in anchor.iter() {
        let members = layers
            .iter()
            .map(|layer| layer.require(name))
            .collect::<Result<Vec<_>>>()?;
        check_same_shapes(name, &members)?;
        let tensor = if members.len() == 1 {
            first.clone()
        } else {
            fuser.fuse_tensor(name, &members)?
        };
        fused.insert(name, tensor);
    }
    Ok(fused)
}

/// Checks that every member has the anchor's shape.
pub(crate) fn check_same_shapes(name: &str, members: &[&HostTensor]) -> Result<()> {
    if let Some(bad) = members.iter().find(|t| t.shape() != members[0].shape()) {
        return Err(Error::ShapeMismatch {
            name: name.to_string(),
            expected: members[0].shape().to_vec(),
            found: bad.shape().to_vec(),
        });
    }
    Ok(())
}

/// `anchor + beta * sum_j (member_j - anchor)`, accumulated in f64, in parallel chunks.
pub(crate) fn differential(members: &[&HostTensor], beta: f64) -> HostTensor {
    let anchor = members[0];
    let mut values = vec![0.0f32; anchor.len()];
    values
        .par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(chunk, out)| {
            let start = chunk << 16;
            for (k, slot) in out.iter_mut().enumerate() {
                let a = f64::from(anchor.values()[start + k]);
                let spread: f64 = members[1..]
                    .iter()
                    .map(|t| f64::from(t.values()[start + k]) - a)
                    .sum();
                *slot = (a + beta * spread) as f32;
            }
        });
    HostTensor::new(anchor.shape().to_vec(), values).expect("same shape as the anchor")
}

/// Which fusion to use, for configs and command lines.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FuserKind {
    /// [`DifferentialFuser`] with its beta.
    Differential {
        /// The differential weight.
        beta: f64,
    },
    /// [`AnchorFuser`].
    Anchor,
    /// [`MeanFuser`].
    Mean,
}

impl FuserKind {
    /// The fuser.
    ///
    /// # Errors
    ///
    /// As [`DifferentialFuser::new`].
    pub fn build(self) -> Result<Box<dyn LayerFuser>> {
        Ok(match self {
            FuserKind::Differential { beta } => Box::new(DifferentialFuser::new(beta)?),
            FuserKind::Anchor => Box::new(AnchorFuser),
            FuserKind::Mean => Box::new(MeanFuser),
        })
    }
}
