//! Anchor-only fusion: the paper's ablation that keeps the anchor layer (DBLF with beta = 0).

use crate::error::Result;
use crate::fusion::LayerFuser;
use crate::params::HostTensor;

/// Keeps the anchor's (smallest layer index) tensors and ignores the other members.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AnchorFuser;

impl LayerFuser for AnchorFuser {
    fn describe(&self) -> String {
        "anchor".to_string()
    }

    fn fuse_tensor(&self, _name: &str, members: &[&HostTensor]) -> Result<HostTensor> {
        Ok(members[0].clone())
    }
}
