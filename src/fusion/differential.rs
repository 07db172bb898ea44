//! Differential-based layer fusion (DBLF).

use crate::error::{Error, Result};
use crate::fusion::{LayerFuser, differential};
use crate::params::HostTensor;

/// `theta_fused = theta_anchor + beta * sum_{j != anchor} (theta_j - theta_anchor)`, applied to
/// every tensor of the layer (projection weights and biases, both norms, LoRA A and B
/// separately). The anchor is the group's smallest layer index. Default beta: 0.1 (the paper
/// used 0.15 for its largest model).
///
/// ```
/// use devft::fusion::{DifferentialFuser, LayerFuser};
/// use devft::HostTensor;
///
/// let t = |v: f32| HostTensor::new(vec![1], vec![v]).unwrap();
/// let fused = DifferentialFuser::new(0.1)?.fuse_tensor("w", &[&t(1.0), &t(3.0), &t(-1.0)])?;
/// // 1 + 0.1 * ((3 - 1) + (-1 - 1)) = 1
/// assert_eq!(fused.values(), &[1.0]);
/// # Ok::<(), devft::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DifferentialFuser {
    beta: f64,
}

impl Default for DifferentialFuser {
    fn default() -> Self {
        Self { beta: 0.1 }
    }
}

impl DifferentialFuser {
    /// A fuser with differential weight `beta`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when `beta` is negative or not finite.
    pub fn new(beta: f64) -> Result<Self> {
        if !beta.is_finite() || beta < 0.0 {
            return Err(Error::InvalidArgument(format!(
                "beta must be finite and non-negative, got {beta}"
            )));
        }
        Ok(Self { beta })
    }

    /// The differential weight.
    pub fn beta(&self) -> f64 {
        self.beta
    }
}

impl LayerFuser for DifferentialFuser {
    fn describe(&self) -> String {
        format!("differential(beta={})", self.beta)
    }

    fn fuse_tensor(&self, _name: &str, members: &[&HostTensor]) -> Result<HostTensor> {
        Ok(differential(members, self.beta))
    }
}
