//! RMSNorm, `x / sqrt(mean(x²) + eps) * gamma` over the last dimension, as one op on burn's
//! flex backend: one parallel pass forward (keeping each row's root mean square) and one
//! backward. burn's `RmsNorm::forward` is seven ops with as many tensors and passes, forward
//! and again backward, 61 times per SmolLM2 step (`docs/performance.md`). Other backends use
//! burn's module.

use burn::nn::RmsNorm;
use burn::tensor::Tensor;

use crate::model::host_kernels::runs_on_flex;

/// `norm.forward(x)`, fused on flex.
pub(crate) fn rms_norm<const D: usize>(norm: &RmsNorm, x: Tensor<D>) -> Tensor<D> {
    let gamma = norm.gamma.val();
    if runs_on_flex(&x.device(), x.dtype()) && x.dims()[D - 1] == gamma.dims()[0] {
        #[cfg(feature = "flex")]
        return flex::rms_norm(x, gamma, norm.epsilon);
    }
    norm.forward(x)
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

    use crate::model::host_kernels::{tensor, values, values_mut};

    /// Rows per parallel task.
    const ROWS_PER_TASK: usize = 16;

    #[backend_extension(Flex, Autodiff)]
    pub trait RmsNormOps: Backend {
        /// RMSNorm of the rows of `x` (last dimension the width of `gamma`).
        fn rms_norm(
            x: FloatTensor<Self>,
            gamma: FloatTensor<Self>,
            epsilon: f64,
        ) -> FloatTensor<Self>;
    }

    pub(super) fn rms_norm<const D: usize>(
        x: Tensor<D>,
        gamma: Tensor<1>,
        epsilon: f64,
    ) -> Tensor<D> {
        Tensor::from_dispatch(<Dispatch as RmsNormOps>::rms_norm(
            x.into_dispatch(),
            gamma.into_dispatch(),
            epsilon,
        ))
    }

    /// The normalised rows and each row's root mean square `sqrt(mean(x²) + eps)`.
    fn forward(x: &[f32], gamma: &[f32], epsilon: f64) -> (Vec<f32>, Vec<f32>) {
        let width = gamma.len();
        assert!(
            width > 0 && x.len().is_multiple_of(width),
            "rows as wide as gamma (the caller checks)"
        );
        let mut rms = vec![0.0f32; x.len() / width];
        // Written straight into fresh memory by the pool (no serial zeroing pass first).
        let mut y = Vec::with_capacity(x.len());
        y.spare_capacity_mut()[..x.len()]
            .par_chunks_mut(width * ROWS_PER_TASK)
            .zip(rms.par_chunks_mut(ROWS_PER_TASK))
            .zip(x.par_chunks(width * ROWS_PER_TASK))
            .for_each(|((y, rms), x)| {
                for ((y, rms), x) in y.chunks_mut(width).zip(rms).zip(x.chunks(width)) {
                    let mean_square = x.iter().map(|v| v * v).sum::<f32>() / width as f32;
                    *rms = (mean_square + epsilon as f32).sqrt();
                    for ((y, &x), &g) in y.iter_mut().zip(x).zip(gamma) {
                        y.write(x / *rms * g);
                    }
                }
            });
        // SAFETY: `x.len()` is a whole number of rows (asserted above), so the chunks of `y`
        // and `x` pair up row for row, each with its `rms`, and the loop wrote every element.
        unsafe { y.set_len(x.len()) };
        (y, rms)
    }

    impl RmsNormOps for Flex {
        fn rms_norm(
            x: FloatTensor<Self>,
            gamma: FloatTensor<Self>,
            epsilon: f64,
        ) -> FloatTensor<Self> {
            let shape = x.shape();
            let (x, gamma) = (x.to_contiguous(), gamma.to_contiguous());
            tensor(forward(values(&x), values(&gamma), epsilon).0, shape)
        }
    }

    /// What the backward keeps: `x`, `gamma` (both contiguous) and each row's root mean square.
    #[derive(Clone, Debug)]
    struct Saved {
        x: FloatTensor<Flex>,
        gamma: FloatTensor<Flex>,
        rms: Vec<f32>,
    }

    #[derive(Debug)]
    struct RmsNormBackward;

    impl Backward<Flex, 2> for RmsNormBackward {
        type State = Saved;

        /// Per row, with `u = dy gamma`: `dx = u / rms - x (u · x) / (n rms³)`; and
        /// `dgamma = Σ_rows dy x / rms`.
        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [x_node, gamma_node] = ops.parents;
            let Saved { x, gamma, rms } = ops.state;
            // `dy` is not needed after this pass: its buffer becomes `dx` (in place when the
            // gradient holds the only reference to it).
            let mut dy = grads.consume::<Flex>(&ops.node).to_contiguous();
            let (xs, g) = (values(&x), values(&gamma));
            let width = g.len();
            let (want_dx, want_dgamma) = (x_node.is_some(), gamma_node.is_some());
            // One pass: each task adds up its rows' share of `dgamma`, then overwrites its
            // rows of `dy` with `dx`.
            let dgamma_shares: Vec<Vec<f32>> = values_mut(&mut dy)
                .par_chunks_mut(width * ROWS_PER_TASK)
                .zip(xs.par_chunks(width * ROWS_PER_TASK))
                .zip(rms.par_chunks(ROWS_PER_TASK))
                .map(|((dy, x), rms)| {
                    let mut dgamma = vec![0.0f32; if want_dgamma { width } else { 0 }];
                    for ((dy, x), &rms) in dy.chunks_mut(width).zip(x.chunks(width)).zip(rms) {
                        for ((dg, &d), &x) in dgamma.iter_mut().zip(dy.iter()).zip(x) {
                            *dg += d * x / rms;
                        }
                        if want_dx {
                            let ux: f32 =
                                dy.iter().zip(g).zip(x).map(|((d, g), x)| d * g * x).sum();
                            let coefficient = ux / (width as f32 * rms * rms * rms);
                            for ((d, &g), &x) in dy.iter_mut().zip(g).zip(x) {
                                *d = *d * g / rms - x * coefficient;
                            }
                        }
                    }
                    dgamma
                })
                .collect();
            if let Some(node) = x_node {
                grads.register::<Flex>(node.id, dy);
            }
            if let Some(node) = gamma_node {
                let mut dgamma = vec![0.0f32; width];
                for share in dgamma_shares {
                    dgamma.iter_mut().zip(share).for_each(|(sum, v)| *sum += v);
                }
                grads.register::<Flex>(node.id, tensor(dgamma, [width]));
            }
        }
    }

    impl<C: CheckpointStrategy> RmsNormOps for Autodiff<Flex, C> {
        fn rms_norm(
            x: FloatTensor<Self>,
            gamma: FloatTensor<Self>,
            epsilon: f64,
        ) -> FloatTensor<Self> {
            let nodes = [x.node(), gamma.node()];
            let shape = x.shape();
            let x = x.into_primitive().to_contiguous();
            let gamma = gamma.into_primitive().to_contiguous();
            let (y, rms) = forward(values(&x), values(&gamma), epsilon);
            let y = tensor(y, shape);
            match RmsNormBackward
                .prepare::<C>(nodes)
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish(Saved { x, gamma, rms }, y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            }
        }
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use burn::module::Param;
    use burn::nn::RmsNormConfig;
    use burn::tensor::{Device, Distribution, Tensor};

    use super::*;

    /// Values and the gradients of `x` and of a trainable `gamma` equal burn's module's.
    #[test]
    fn values_and_gradients_match_burn() {
        let device = Device::flex().autodiff();
        let mut norm = RmsNormConfig::new(40).with_epsilon(1e-5).init(&device);
        let gamma = Tensor::<1>::random([40], Distribution::Uniform(0.5, 1.5), &device);
        norm.gamma = Param::from_tensor(gamma);
        let x = Tensor::<3>::random([3, 37, 40], Distribution::Normal(0.0, 2.0), &device);
        let upstream = Tensor::<3>::random([3, 37, 40], Distribution::Normal(0.0, 1.0), &device);
        let run = |fused: bool| {
            let x = x.clone().require_grad();
            let y = if fused {
                rms_norm(&norm, x.clone())
            } else {
                norm.forward(x.clone())
            };
            let grads = (y.clone() * upstream.clone()).sum().backward();
            let dx = Tensor::<3>::from_inner(x.grad(&grads).unwrap());
            let dgamma = Tensor::<1>::from_inner(norm.gamma.val().grad(&grads).unwrap());
            (y, dx, dgamma)
        };
        let (y, dx, dgamma) = run(true);
        let (y_ref, dx_ref, dgamma_ref) = run(false);
        let diff3 = |a: Tensor<3>, b: Tensor<3>| (a - b).abs().max().into_scalar::<f32>();
        assert!(diff3(y, y_ref) < 1e-5);
        assert!(diff3(dx, dx_ref) < 1e-5);
        let dgamma_diff = (dgamma - dgamma_ref).abs().max().into_scalar::<f32>();
        assert!(dgamma_diff < 1e-4, "{dgamma_diff}");
    }
}
