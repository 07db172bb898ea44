//! Mean fusion: the paper's "plain" merge ablation, the element-wise average of the group.

use crate::error::Result;
use crate::fusion::{LayerFuser, differential};
use crate::params::HostTensor;

/// The element-wise mean of the group's tensors (DBLF with beta = 1 / group size).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MeanFuser;

impl LayerFuser for MeanFuser {
    fn describe(&self) -> String {
        "mean".to_string()
    }

    fn fuse_tensor(&self, _name: &str, members: &[&HostTensor]) -> Result<HostTensor> {
        Ok(differential(members, 1.0 / members.len() as f64))
    }
}
