//! The SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`.

use burn::module::Module;
use burn::tensor::Tensor;

use crate::model::lora::LoraLinear;
use crate::model::swiglu::swiglu;

/// SwiGLU MLP of a Llama-family layer.
#[derive(Module, Debug)]
pub struct SwiGluMlp {
    /// Gate projection, `[hidden, intermediate]`.
    pub gate_proj: LoraLinear,
    /// Up projection, `[hidden, intermediate]`.
    pub up_proj: LoraLinear,
    /// Down projection, `[intermediate, hidden]`.
    pub down_proj: LoraLinear,
}

impl SwiGluMlp {
    /// # Shapes
    ///
    /// - x: `[batch, seq, hidden]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let gated = swiglu(self.gate_proj.forward(x.clone()), self.up_proj.forward(x));
        self.down_proj.forward(gated)
    }
}
