//! Fused cross-entropy of logit rows against target ids on burn's CPU backend (flex):
//! `logsumexp(row) - row[target]` in one pass over each row, and the gradient
//! `softmax(row) - onehot(target)` (times the upstream gradient) in one more, rows in
//! parallel, without materialising the softmax or log-probabilities. A custom op with a
//! hand-written backward through burn's backend extension (`docs/custom-ops.md`).

use burn::tensor::{Int, Tensor};

/// Per-row cross-entropy `logsumexp(logits[i]) - logits[i, targets[i]]`, `[n]`, for
/// `logits` `[n, vocab]`, fused on the flex backend (with or without autodiff). `None` on
/// other backends, for non-`f32` logits and for targets outside the vocabulary: the caller
/// computes it with burn's own ops.
pub(crate) fn cross_entropy_rows(
    logits: &Tensor<2>,
    targets: &Tensor<1, Int>,
) -> Option<Tensor<1>> {
    #[cfg(feature = "flex")]
    {
        flex::cross_entropy_rows(logits, targets)
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = (logits, targets);
        None
    }
}

#[cfg(feature = "flex")]
mod flex {
    use std::sync::Arc;

    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
    use burn::tensor::{Int, Tensor};
    use rayon::prelude::*;

    use crate::model::host_kernels::{exp, runs_on_flex, sum_exp, tensor, values, values_mut};

    /// Target ids on the host, one per logit row.
    #[derive(Clone, Debug)]
    pub struct TargetIds(Arc<[u32]>);

    #[backend_extension(Flex, Autodiff)]
    pub trait CrossEntropyOps: Backend {
        /// `[n]` per-row cross-entropy of `logits` `[n, vocab]` against `targets`.
        fn cross_entropy_rows(logits: FloatTensor<Self>, targets: TargetIds) -> FloatTensor<Self>;
    }

    pub(super) fn cross_entropy_rows(
        logits: &Tensor<2>,
        targets: &Tensor<1, Int>,
    ) -> Option<Tensor<1>> {
        let [rows, vocab] = logits.dims();
        if !runs_on_flex(&logits.device(), logits.dtype()) || targets.dims()[0] != rows {
            return None;
        }
        let ids: Vec<u32> = targets
            .clone()
            .into_data()
            .convert::<i64>()
            .try_into_vec::<i64>()
            .ok()?
            .into_iter()
            .map(|t| u32::try_from(t).ok().filter(|&t| (t as usize) < vocab))
            .collect::<Option<_>>()?;
        let targets = TargetIds(ids.into());
        Some(Tensor::from_dispatch(
            <Dispatch as CrossEntropyOps>::cross_entropy_rows(
                logits.clone().into_dispatch(),
                targets,
            ),
        ))
    }

    /// Per row of the row-major `logits`: `(logsumexp, logsumexp - row[target])`.
    fn forward(values: &[f32], targets: &TargetIds) -> (Vec<f32>, Vec<f32>) {
        let vocab = values.len() / targets.0.len().max(1);
        values
            .par_chunks(vocab.max(1))
            .zip(targets.0.par_iter())
            .map(|(row, &target)| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum = sum_exp(row, max);
                let lse = max + sum.ln();
                (lse, lse - row[target as usize])
            })
            .unzip()
    }

    impl CrossEntropyOps for Flex {
        fn cross_entropy_rows(logits: FloatTensor<Self>, targets: TargetIds) -> FloatTensor<Self> {
            let n = targets.0.len();
            tensor(forward(values(&logits.to_contiguous()), &targets).1, [n])
        }
    }

    /// What the backward keeps: the logits (contiguous), each row's logsumexp and the targets.
    #[derive(Debug)]
    struct CrossEntropyBackward;

    impl Backward<Flex, 1> for CrossEntropyBackward {
        type State = (FloatTensor<Flex>, Arc<[f32]>, TargetIds);

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let (mut logits, lse, targets) = ops.state;
            unary::<Flex, _>(ops.parents, ops.node, grads, move |upstream| {
                let upstream = upstream.to_contiguous();
                let upstream = values(&upstream);
                let vocab = logits.shape().num_elements() / targets.0.len().max(1);
                // The gradient overwrites the logits, which nothing else holds by now: no
                // second logits-sized buffer (100 MB for SmolLM2's 512 x 49,152).
                values_mut(&mut logits)
                    .par_chunks_mut(vocab.max(1))
                    .enumerate()
                    .for_each(|(i, row)| {
                        let (lse, dy) = (lse[i], upstream[i]);
                        for x in row.iter_mut() {
                            *x = exp(*x - lse) * dy;
                        }
                        row[targets.0[i] as usize] -= dy;
                    });
                logits
            });
        }
    }

    impl<C: CheckpointStrategy> CrossEntropyOps for Autodiff<Flex, C> {
        fn cross_entropy_rows(logits: FloatTensor<Self>, targets: TargetIds) -> FloatTensor<Self> {
            let guard = logits.node();
            // Made contiguous once: the forward reads it and the backward keeps it.
            let logits = logits.into_primitive().to_contiguous();
            let (lse, loss) = forward(values(&logits), &targets);
            let loss = tensor(loss, [targets.0.len()]);
            match CrossEntropyBackward
                .prepare::<C>([guard])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish((logits, lse.into(), targets), loss),
                OpsKind::UnTracked(prep) => prep.finish(loss),
            }
        }
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use burn::tensor::activation::log_softmax;
    use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};

    use super::cross_entropy_rows;

    /// `-log_softmax(logits)[target]` per row, with burn's own ops.
    fn reference(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
        let n = targets.dims()[0];
        log_softmax(logits, 1)
            .gather(1, targets.reshape([n, 1]))
            .reshape([n])
            .neg()
    }

    fn max_diff(a: Tensor<1>, b: Tensor<1>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    #[test]
    fn fused_rows_and_gradient_equal_log_softmax() {
        let device = Device::flex().autodiff();
        let logits = Tensor::<2>::random([6, 37], Distribution::Normal(0.0, 3.0), &device);
        let targets =
            Tensor::<1, Int>::from_data(TensorData::from([3i64, 0, 36, 7, 7, 20]), &device);
        let weights = Tensor::<1>::random([6], Distribution::Uniform(0.5, 2.0), &device);

        let x = logits.clone().require_grad();
        let fused = cross_entropy_rows(&x, &targets).expect("flex runs the fused op");
        let grads = (fused.clone() * weights.clone()).sum().backward();
        let fused_grad = x.grad(&grads).unwrap();

        let y = logits.require_grad();
        let expected = reference(y.clone(), targets);
        let grads = (expected.clone() * weights).sum().backward();
        let expected_grad = y.grad(&grads).unwrap();

        assert!(max_diff(fused.inner(), expected.inner()) < 1e-5);
        let grad_diff: f32 = (fused_grad - expected_grad).abs().max().into_scalar();
        assert!(grad_diff < 1e-6, "{grad_diff}");
    }

    #[test]
    fn without_autodiff_and_with_bad_targets() {
        let device = Device::flex();
        let logits = Tensor::<2>::random([3, 11], Distribution::Normal(0.0, 1.0), &device);
        let targets = Tensor::<1, Int>::from_data(TensorData::from([1i64, 10, 4]), &device);
        let fused = cross_entropy_rows(&logits, &targets).unwrap();
        assert!(max_diff(fused, reference(logits.clone(), targets)) < 1e-5);
        let outside = Tensor::<1, Int>::from_data(TensorData::from([1i64, 11, 4]), &device);
        assert!(cross_entropy_rows(&logits, &outside).is_none());
    }

    /// Logits an op produced (as the LM head's are) are the backward's alone, so it writes the
    /// gradient over them; the test above holds its logits elsewhere, so there it copies.
    #[test]
    fn the_gradient_over_logits_nothing_else_holds() {
        let device = Device::flex().autodiff();
        let base = Tensor::<2>::random([5, 23], Distribution::Normal(0.0, 2.0), &device);
        let targets = Tensor::<1, Int>::from_data(TensorData::from([0i64, 22, 5, 5, 11]), &device);
        let gradient_of = |fused: bool| {
            let x = base.clone().require_grad();
            let logits = x.clone() * 1.5;
            let losses = if fused {
                let losses = cross_entropy_rows(&logits, &targets).expect("flex runs the fused op");
                drop(logits);
                losses
            } else {
                reference(logits, targets.clone())
            };
            x.grad(&losses.sum().backward()).unwrap()
        };
        let (fused, expected) = (gradient_of(true), gradient_of(false));
        let diff: f32 = (fused - expected).abs().max().into_scalar();
        assert!(diff < 1e-6, "{diff}");
    }
}
