//! SwiGLU's gating, `silu(gate) * up`, as one op on burn's flex backend: one parallel pass
//! forward, and one backward pass giving both inputs their gradients from the saved inputs
//! (no sigmoid, SiLU or product tensor is kept). burn's ops make five tensors and as many
//! passes for the same (`docs/performance.md`). Other backends use burn's ops.

use burn::tensor::Tensor;
use burn::tensor::activation::silu;

use crate::model::host_kernels::runs_on_flex;

/// `silu(gate) * up`, elementwise, for tensors of one shape.
pub(crate) fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    if runs_on_flex(&gate.device(), gate.dtype()) && gate.dims() == up.dims() {
        #[cfg(feature = "flex")]
        return flex::swiglu(gate, up);
    }
    silu(gate) * up
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
    use burn::tensor::Tensor;
    use rayon::prelude::*;

    use crate::model::host_kernels::{exp, tensor, values, values_mut};

    /// Elements per parallel task: large enough that a task outweighs its scheduling.
    const CHUNK: usize = 1 << 14;

    #[backend_extension(Flex, Autodiff)]
    pub trait SwigluOps: Backend {
        /// `silu(gate) * up` for two contiguous tensors of one shape.
        fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;
    }

    pub(super) fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
        Tensor::from_dispatch(<Dispatch as SwigluOps>::swiglu(
            gate.into_dispatch(),
            up.into_dispatch(),
        ))
    }

    fn sigmoid(x: f32) -> f32 {
        1.0 / (1.0 + exp(-x))
    }

    fn forward(gate: &FloatTensor<Flex>, up: &FloatTensor<Flex>) -> FloatTensor<Flex> {
        let (g, u) = (values(gate), values(up));
        assert_eq!(
            g.len(),
            u.len(),
            "gate and up of one shape (the caller checks)"
        );
        // Written straight into fresh memory by the pool (no serial zeroing pass first).
        let mut y = Vec::with_capacity(g.len());
        y.spare_capacity_mut()[..g.len()]
            .par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .for_each(|(y, (g, u))| {
                for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                    y.write(g * sigmoid(g) * u);
                }
            });
        // SAFETY: the chunks of `y`, `g` and `u` have equal lengths, so the loop wrote every
        // one of the `g.len()` elements.
        unsafe { y.set_len(g.len()) };
        tensor(y, gate.shape())
    }

    impl SwigluOps for Flex {
        fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
            forward(&gate.to_contiguous(), &up.to_contiguous())
        }
    }

    #[derive(Debug)]
    struct SwigluBackward;

    impl Backward<Flex, 2> for SwigluBackward {
        /// The gate and up inputs.
        type State = (FloatTensor<Flex>, FloatTensor<Flex>);

        /// With `σ = sigmoid(g)`: `dg = dy u σ (1 + g (1 - σ))`, `du = dy g σ`.
        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [gate_node, up_node] = ops.parents;
            // The saved inputs are not needed after this pass: their buffers become the
            // gradients (in place when the state holds the only reference, as it does after
            // the forward pass), `dg` over `gate` and `du` over `up`.
            let (mut dg, mut du) = ops.state;
            let dy = grads.consume::<Flex>(&ops.node).to_contiguous();
            let dy = values(&dy);
            // Both gradients in one pass (registered only where an input needs one).
            values_mut(&mut dg)
                .par_chunks_mut(CHUNK)
                .zip(values_mut(&mut du).par_chunks_mut(CHUNK))
                .zip(dy.par_chunks(CHUNK))
                .for_each(|((dg, du), dy)| {
                    for ((dg, du), &dy) in dg.iter_mut().zip(du.iter_mut()).zip(dy) {
                        let (g, u) = (*dg, *du);
                        let s = sigmoid(g);
                        *du = dy * g * s;
                        *dg = dy * u * s * (1.0 + g * (1.0 - s));
                    }
                });
            if let Some(node) = gate_node {
                grads.register::<Flex>(node.id, dg);
            }
            if let Some(node) = up_node {
                grads.register::<Flex>(node.id, du);
            }
        }
    }

    impl<C: CheckpointStrategy> SwigluOps for Autodiff<Flex, C> {
        fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
            let nodes = [gate.node(), up.node()];
            let gate = gate.into_primitive().to_contiguous();
            let up = up.into_primitive().to_contiguous();
            let y = forward(&gate, &up);
            match SwigluBackward
                .prepare::<C>(nodes)
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish((gate, up), y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            }
        }
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use burn::tensor::{Device, Distribution, Tensor};

    use super::*;

    #[test]
    fn values_and_gradients_match_burn() {
        let device = Device::flex().autodiff();
        // Wide enough for several parallel chunks, with large inputs where σ saturates.
        let normal = Distribution::Normal(0.0, 4.0);
        let gate = Tensor::<3>::random([3, 7, 5000], normal, &device);
        let up = Tensor::<3>::random([3, 7, 5000], normal, &device);
        let upstream = Tensor::<3>::random([3, 7, 5000], normal, &device);
        let run = |fused: bool| {
            let (g, u) = (gate.clone().require_grad(), up.clone().require_grad());
            let y = if fused {
                swiglu(g.clone(), u.clone())
            } else {
                silu(g.clone()) * u.clone()
            };
            let grads = (y.clone() * upstream.clone()).sum().backward();
            let dg = Tensor::<3>::from_inner(g.grad(&grads).unwrap());
            let du = Tensor::<3>::from_inner(u.grad(&grads).unwrap());
            [y, dg, du]
        };
        let fused = run(true);
        let expected = run(false);
        for (name, (a, b)) in ["value", "gate's gradient", "up's gradient"]
            .iter()
            .zip(fused.into_iter().zip(expected))
        {
            let scale = b.clone().abs().max().into_scalar::<f32>().max(1.0);
            let diff = (a - b).abs().max().into_scalar::<f32>() / scale;
            assert!(diff < 1e-6, "{name} differs by {diff} of its scale");
        }
    }
}
