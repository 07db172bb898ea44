//! Products with a frozen weight on burn's flex backend: `x W` for an `f32` weight and `x Mᵀ`
//! for a quantised one ([`QuantisedMatrix`]), as custom ops whose backward computes the
//! input's gradient only and keeps the weight as it is stored (`docs/custom-ops.md`); and a
//! LoRA layer over either, `x W + s (x A) B` in one op ([`lora_linear`]).
//!
//! Both write their results with the `gemm` crate (the kernel flex's own matmul calls)
//! straight into buffers they hand to flex without a copy. flex's matmul does the same
//! product, but its output buffer is allocated and then copied once more to be aligned
//! (burn-flex 0.22.1, `FlexTensor::empty`), a full extra pass over every product's result
//! with fresh pages to fault in (`docs/performance.md`).
//!
//! Callers check [`crate::model::host_kernels::runs_on_flex`] first; other backends use
//! burn's own ops.

use burn::tensor::Tensor;

use crate::model::quantised::QuantisedMatrix;

/// `x W` for `x` `[n, d_in]` and a frozen base on flex (`x Mᵀ` for a quantised `M`).
pub(crate) fn frozen_linear(x: Tensor<2>, base: FrozenBase) -> Tensor<2> {
    #[cfg(feature = "flex")]
    {
        flex::frozen_linear(x, base)
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = (x, base);
        unreachable!("only a flex tensor takes this path")
    }
}

/// `x W + s (x A) B` for `x` `[n, d_in]`, a frozen base `W` (`[d_in, d_out]` `f32`, or a
/// quantised `[d_out, d_in]` matrix), and a trainable LoRA pair `A` `[d_in, r]`, `B`
/// `[r, d_out]` on flex: one op whose result buffer takes the low-rank update in place, and
/// whose backward gives `x`, `A` and `B` their gradients (the base none).
pub(crate) fn lora_linear(
    x: Tensor<2>,
    base: FrozenBase,
    a: Tensor<2>,
    b: Tensor<2>,
    scaling: f64,
) -> Tensor<2> {
    #[cfg(feature = "flex")]
    {
        flex::lora_linear(x, base, a, b, scaling)
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = (x, base, a, b, scaling);
        unreachable!("only a flex tensor takes this path")
    }
}

/// `f` applied to `x` `[..., d_in]` folded into rows `[n, d_in]`, its `[n, d_out]` result
/// unfolded to `[..., d_out]`.
pub(crate) fn on_rows<const D: usize>(
    x: Tensor<D>,
    d_out: usize,
    f: impl FnOnce(Tensor<2>) -> Tensor<2>,
) -> Tensor<D> {
    let mut dims = x.dims();
    let d_in = dims[D - 1];
    let n = dims[..D - 1].iter().product();
    let y = f(x.reshape([n, d_in]));
    dims[D - 1] = d_out;
    y.reshape(dims)
}

/// The frozen weight of [`frozen_linear`] and [`lora_linear`] (made for one call and moved into it, so the size
/// of a tensor handle in one variant costs nothing worth a box).
#[allow(clippy::large_enum_variant)]
pub(crate) enum FrozenBase {
    /// `W` `[d_in, d_out]`.
    Dense(Tensor<2>),
    /// `M` `[d_out, d_in]`.
    Quantised(QuantisedMatrix),
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
    use burn::tensor::Tensor;

    use rayon::prelude::*;

    use crate::model::host_kernels::{
        Strided, block_len, matmul, matmul_into, scaled_matmul, scaled_matmul_into, tensor, values,
    };
    use crate::model::quantised::QuantisedMatrix;

    #[backend_extension(Flex, Autodiff)]
    pub trait FrozenMatmulOps: Backend {
        /// `x Mᵀ` for `x` `[n, cols]`.
        fn quantised_linear(x: FloatTensor<Self>, weight: QuantisedMatrix) -> FloatTensor<Self>;
        /// `x W` for `x` `[n, d_in]`, `W` `[d_in, d_out]` frozen (no gradient).
        fn dense_linear(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self>;
        /// `x W + s (x A) B`, `W` frozen.
        fn lora_dense_linear(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            a: FloatTensor<Self>,
            b: FloatTensor<Self>,
            scaling: f64,
        ) -> FloatTensor<Self>;
        /// `x Mᵀ + s (x A) B`.
        fn lora_quantised_linear(
            x: FloatTensor<Self>,
            weight: QuantisedMatrix,
            a: FloatTensor<Self>,
            b: FloatTensor<Self>,
            scaling: f64,
        ) -> FloatTensor<Self>;
    }

    pub(super) fn frozen_linear(x: Tensor<2>, base: super::FrozenBase) -> Tensor<2> {
        let x = x.into_dispatch();
        Tensor::from_dispatch(match base {
            super::FrozenBase::Dense(weight) => {
                <Dispatch as FrozenMatmulOps>::dense_linear(x, weight.into_dispatch())
            }
            super::FrozenBase::Quantised(weight) => {
                <Dispatch as FrozenMatmulOps>::quantised_linear(x, weight)
            }
        })
    }

    pub(super) fn lora_linear(
        x: Tensor<2>,
        base: super::FrozenBase,
        a: Tensor<2>,
        b: Tensor<2>,
        scaling: f64,
    ) -> Tensor<2> {
        let (x, a, b) = (x.into_dispatch(), a.into_dispatch(), b.into_dispatch());
        Tensor::from_dispatch(match base {
            super::FrozenBase::Dense(weight) => <Dispatch as FrozenMatmulOps>::lora_dense_linear(
                x,
                weight.into_dispatch(),
                a,
                b,
                scaling,
            ),
            super::FrozenBase::Quantised(weight) => {
                <Dispatch as FrozenMatmulOps>::lora_quantised_linear(x, weight, a, b, scaling)
            }
        })
    }

    /// `y = x Mᵀ` for row-major `x` `[n, cols]`: each chunk of rows of `M` is decoded and
    /// multiplied straight into its columns of `y`.
    fn quantised_forward(x: &[f32], weight: &QuantisedMatrix) -> Vec<f32> {
        let [rows, cols] = weight.shape();
        let n = x.len() / cols;
        let mut y = vec![0.0f32; n * rows];
        for chunk in weight.row_chunks() {
            let w = weight.decode_rows(chunk.clone());
            matmul_into(
                [n, chunk.len(), cols],
                &mut y,
                Strided::row_major(chunk.start, rows),
                false,
                x,
                Strided::row_major(0, cols),
                &w,
                Strided::column_major(0, cols),
            );
        }
        y
    }

    /// `dx = dy M` for row-major `dy` `[n, rows]`, summed over the chunks of rows of `M`.
    fn quantised_backward(dy: &[f32], weight: &QuantisedMatrix) -> Vec<f32> {
        let [rows, cols] = weight.shape();
        let n = dy.len() / rows;
        let mut dx = vec![0.0f32; n * cols];
        for chunk in weight.row_chunks() {
            let w = weight.decode_rows(chunk.clone());
            matmul_into(
                [n, cols, chunk.len()],
                &mut dx,
                Strided::row_major(0, cols),
                chunk.start > 0,
                dy,
                Strided::row_major(chunk.start, rows),
                &w,
                Strided::row_major(0, cols),
            );
        }
        dx
    }

    /// `[d_in, d_out]` of a contiguous 2-D flex weight.
    fn dims(weight: &FloatTensor<Flex>) -> [usize; 2] {
        let shape = weight.shape();
        [shape[0], shape[1]]
    }

    /// `y = x W` for row-major `x` `[n, d_in]` and `W` `[d_in, d_out]`.
    fn dense_forward(x: &[f32], weight: &FloatTensor<Flex>) -> Vec<f32> {
        let [d_in, d_out] = dims(weight);
        let n = x.len() / d_in;
        matmul(
            [n, d_out, d_in],
            x,
            Strided::row_major(0, d_in),
            values(weight),
            Strided::row_major(0, d_out),
        )
    }

    /// `dx = dy Wᵀ` for row-major `dy` `[n, d_out]`.
    fn dense_backward(dy: &[f32], weight: &FloatTensor<Flex>) -> Vec<f32> {
        let [d_in, d_out] = dims(weight);
        let n = dy.len() / d_out;
        matmul(
            [n, d_in, d_out],
            dy,
            Strided::row_major(0, d_out),
            values(weight),
            Strided::column_major(0, d_out),
        )
    }

    /// The frozen part of a LoRA product, as its backward keeps it.
    #[derive(Clone, Debug)]
    enum Base {
        Dense(FloatTensor<Flex>),
        Quantised(QuantisedMatrix),
    }

    impl Base {
        /// `[d_in, d_out]`.
        fn dims(&self) -> [usize; 2] {
            match self {
                Base::Dense(weight) => dims(weight),
                Base::Quantised(matrix) => {
                    let [rows, cols] = matrix.shape();
                    [cols, rows]
                }
            }
        }

        fn forward(&self, x: &[f32]) -> Vec<f32> {
            match self {
                Base::Dense(weight) => dense_forward(x, weight),
                Base::Quantised(matrix) => quantised_forward(x, matrix),
            }
        }

        fn backward(&self, dy: &[f32]) -> Vec<f32> {
            match self {
                Base::Dense(weight) => dense_backward(dy, weight),
                Base::Quantised(matrix) => quantised_backward(dy, matrix),
            }
        }
    }

    /// `(y, x A)` with `y = base(x) + s (x A) B`, the update accumulated into `y` in place, both
    /// low-rank products of a block of rows ([`block_len`]) on one pool thread (on the calling
    /// thread where all rows make one block, as in token-by-token generation).
    fn lora_forward(
        base: &Base,
        x: &[f32],
        a: &FloatTensor<Flex>,
        b: &FloatTensor<Flex>,
        scaling: f32,
    ) -> (Vec<f32>, Vec<f32>) {
        let [d_in, d_out] = base.dims();
        let r = dims(a)[1];
        let n = x.len() / d_in;
        let (a, b) = (values(a), values(b));
        let mut y = base.forward(x);
        let mut xa = vec![0.0f32; n * r];
        let block = block_len(n);
        let update = |(i, (y, xa)): (usize, (&mut [f32], &mut [f32]))| {
            let start = i * block;
            let rows = block.min(n - start);
            matmul_into(
                [rows, r, d_in],
                xa,
                Strided::row_major(0, r),
                false,
                &x[start * d_in..(start + rows) * d_in],
                Strided::row_major(0, d_in),
                a,
                Strided::row_major(0, r),
            );
            scaled_matmul_into(
                [rows, d_out, r],
                scaling,
                y,
                Strided::row_major(0, d_out),
                true,
                xa,
                Strided::row_major(0, r),
                b,
                Strided::row_major(0, d_out),
            );
        };
        if block >= n {
            update((0, (&mut y, &mut xa)));
        } else {
            y.par_chunks_mut((block * d_out).max(1))
                .zip(xa.par_chunks_mut((block * r).max(1)))
                .enumerate()
                .for_each(update);
        }
        (y, xa)
    }

    /// `base(x)` for `x` `[n, d_in]`.
    fn frozen_flex(x: FloatTensor<Flex>, base: &Base) -> FloatTensor<Flex> {
        let y = base.forward(values(&x.to_contiguous()));
        let d_out = base.dims()[1];
        let n = y.len() / d_out;
        tensor(y, [n, d_out])
    }

    fn lora_flex(
        x: FloatTensor<Flex>,
        base: Base,
        a: FloatTensor<Flex>,
        b: FloatTensor<Flex>,
        scaling: f64,
    ) -> FloatTensor<Flex> {
        let (a, b) = (a.to_contiguous(), b.to_contiguous());
        let (y, _) = lora_forward(&base, values(&x.to_contiguous()), &a, &b, scaling as f32);
        let d_out = base.dims()[1];
        let n = y.len() / d_out;
        tensor(y, [n, d_out])
    }

    impl FrozenMatmulOps for Flex {
        fn lora_dense_linear(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            a: FloatTensor<Self>,
            b: FloatTensor<Self>,
            scaling: f64,
        ) -> FloatTensor<Self> {
            lora_flex(x, Base::Dense(weight.to_contiguous()), a, b, scaling)
        }

        fn lora_quantised_linear(
            x: FloatTensor<Self>,
            weight: QuantisedMatrix,
            a: FloatTensor<Self>,
            b: FloatTensor<Self>,
            scaling: f64,
        ) -> FloatTensor<Self> {
            lora_flex(x, Base::Quantised(weight), a, b, scaling)
        }

        fn quantised_linear(x: FloatTensor<Self>, weight: QuantisedMatrix) -> FloatTensor<Self> {
            frozen_flex(x, &Base::Quantised(weight))
        }

        fn dense_linear(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
            frozen_flex(x, &Base::Dense(weight.to_contiguous()))
        }
    }

    /// Keeps only the base as stored (an `Arc` of the quantised blocks, or a shared handle to
    /// the `f32` weight's storage) for the backward.
    #[derive(Debug)]
    struct FrozenLinearBackward;

    impl Backward<Flex, 1> for FrozenLinearBackward {
        type State = Base;

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let base = ops.state;
            unary::<Flex, _>(ops.parents, ops.node, grads, |dy| {
                let dx = base.backward(values(&dy.to_contiguous()));
                let d_in = base.dims()[0];
                let n = dx.len() / d_in;
                tensor(dx, [n, d_in])
            });
        }
    }

    /// What the LoRA backward keeps: the base as stored, `x`, `x A`, `A`, `B` and `s`.
    #[derive(Clone, Debug)]
    struct LoraState {
        base: Base,
        x: FloatTensor<Flex>,
        xa: FloatTensor<Flex>,
        a: FloatTensor<Flex>,
        b: FloatTensor<Flex>,
        scaling: f32,
    }

    #[derive(Debug)]
    struct LoraLinearBackward;

    impl Backward<Flex, 3> for LoraLinearBackward {
        type State = LoraState;

        /// With `g = dy Bᵀ`: `dx = base'(dy) + s g Aᵀ`, `dA = s xᵀ g`, `dB = s (x A)ᵀ dy`,
        /// each computed only for an input that needs it.
        fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [x_node, a_node, b_node] = ops.parents;
            let state = ops.state;
            let dy = grads.consume::<Flex>(&ops.node).to_contiguous();
            let dy = values(&dy);
            let [d_in, d_out] = state.base.dims();
            let r = dims(&state.a)[1];
            let n = dy.len() / d_out;
            let mut dx = x_node.as_ref().map(|_| state.base.backward(dy));
            let (da, db) = low_rank_backward(
                &state,
                dy,
                dx.as_deref_mut(),
                a_node.is_some(),
                b_node.is_some(),
            );
            if let (Some(node), Some(dx)) = (x_node, dx) {
                grads.register::<Flex>(node.id, tensor(dx, [n, d_in]));
            }
            if let (Some(node), Some(da)) = (a_node, da) {
                grads.register::<Flex>(node.id, tensor(da, [d_in, r]));
            }
            if let (Some(node), Some(db)) = (b_node, db) {
                grads.register::<Flex>(node.id, tensor(db, [r, d_out]));
            }
        }
    }

    /// The low-rank part of the LoRA backward in one parallel region: for each block of rows
    /// ([`block_len`]), with `g = dy Bᵀ` of its rows, `dx += s g Aᵀ` (where `dx` is
    /// given) and the block's shares of `dA = s xᵀ g` (built transposed) and
    /// `dB = s (x A)ᵀ dy` (where wanted), the shares summed after. Each block reads its rows of `dy` once for both `g` and `dB`,
    /// and the four thin products share one hand-off to the pool instead of one each.
    fn low_rank_backward(
        state: &LoraState,
        dy: &[f32],
        dx: Option<&mut [f32]>,
        want_a: bool,
        want_b: bool,
    ) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
        let [d_in, d_out] = state.base.dims();
        let r = dims(&state.a)[1];
        let n = dy.len() / d_out;
        let s = state.scaling;
        let (x, xa, a, b) = (
            values(&state.x),
            values(&state.xa),
            values(&state.a),
            values(&state.b),
        );
        let block = block_len(n);
        let shares = |start: usize, dx: Option<&mut [f32]>| {
            let rows = block.min(n - start);
            let dy = &dy[start * d_out..(start + rows) * d_out];
            let g = (dx.is_some() || want_a).then(|| {
                matmul(
                    [rows, r, d_out],
                    dy,
                    Strided::row_major(0, d_out),
                    b,
                    Strided::column_major(0, d_out),
                )
            });
            if let (Some(dx), Some(g)) = (dx, &g) {
                scaled_matmul_into(
                    [rows, d_in, r],
                    s,
                    dx,
                    Strided::row_major(0, d_in),
                    true,
                    g,
                    Strided::row_major(0, r),
                    a,
                    Strided::column_major(0, r),
                );
            }
            // dA's share transposed, `s gᵀ x` `[r, d_in]` (as dB's), so that gemm's full-width
            // kernel runs along `d_in` rather than along the rank.
            let da_t = g.filter(|_| want_a).map(|g| {
                scaled_matmul(
                    [r, d_in, rows],
                    s,
                    &g,
                    Strided::column_major(0, r),
                    &x[start * d_in..(start + rows) * d_in],
                    Strided::row_major(0, d_in),
                )
            });
            let db = want_b.then(|| {
                scaled_matmul(
                    [r, d_out, rows],
                    s,
                    &xa[start * r..(start + rows) * r],
                    Strided::column_major(0, r),
                    dy,
                    Strided::row_major(0, d_out),
                )
            });
            (da_t, db)
        };
        let blocks: Vec<_> = match dx {
            // All rows in one block (token-by-token generation, small batches): no hand-off.
            dx if block >= n => vec![shares(0, dx)],
            Some(dx) => dx
                .par_chunks_mut((block * d_in).max(1))
                .enumerate()
                .map(|(i, dx)| shares(i * block, Some(dx)))
                .collect(),
            None => (0..n.div_ceil(block))
                .into_par_iter()
                .map(|i| shares(i * block, None))
                .collect(),
        };
        let mut da_t = want_a.then(|| vec![0.0f32; r * d_in]);
        let mut db = want_b.then(|| vec![0.0f32; r * d_out]);
        for (block_da_t, block_db) in blocks {
            for (sum, share) in [(&mut da_t, block_da_t), (&mut db, block_db)] {
                if let (Some(sum), Some(share)) = (sum.as_mut(), share) {
                    sum.iter_mut().zip(share).for_each(|(sum, x)| *sum += x);
                }
            }
        }
        let da = da_t.map(|da_t| {
            (0..d_in * r)
                .map(|i| da_t[(i % r) * d_in + i / r])
                .collect()
        });
        (da, db)
    }

    fn frozen_autodiff<C: CheckpointStrategy>(
        x: FloatTensor<Autodiff<Flex, C>>,
        base: Base,
    ) -> FloatTensor<Autodiff<Flex, C>> {
        let guard = x.node();
        let y = frozen_flex(x.into_primitive(), &base);
        match FrozenLinearBackward
            .prepare::<C>([guard])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(base, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn lora_autodiff<C: CheckpointStrategy>(
        x: FloatTensor<Autodiff<Flex, C>>,
        base: Base,
        a: FloatTensor<Autodiff<Flex, C>>,
        b: FloatTensor<Autodiff<Flex, C>>,
        scaling: f64,
    ) -> FloatTensor<Autodiff<Flex, C>> {
        let nodes = [x.node(), a.node(), b.node()];
        let x = x.into_primitive().to_contiguous();
        let a = a.into_primitive().to_contiguous();
        let b = b.into_primitive().to_contiguous();
        let (y, xa) = lora_forward(&base, values(&x), &a, &b, scaling as f32);
        let [_, d_out] = base.dims();
        let n = y.len() / d_out;
        let r = dims(&a)[1];
        let y = tensor(y, [n, d_out]);
        match LoraLinearBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let xa = tensor(xa, [n, r]);
                let scaling = scaling as f32;
                prep.finish(
                    LoraState {
                        base,
                        x,
                        xa,
                        a,
                        b,
                        scaling,
                    },
                    y,
                )
            }
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    impl<C: CheckpointStrategy> FrozenMatmulOps for Autodiff<Flex, C> {
        fn lora_dense_linear(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            a: FloatTensor<Self>,
            b: FloatTensor<Self>,
            scaling: f64,
        ) -> FloatTensor<Self> {
            // The weight is frozen: it gets no parent node, so no gradient is made for it.
            let weight = weight.into_primitive().to_contiguous();
            lora_autodiff::<C>(x, Base::Dense(weight), a, b, scaling)
        }

        fn lora_quantised_linear(
            x: FloatTensor<Self>,
            weight: QuantisedMatrix,
            a: FloatTensor<Self>,
            b: FloatTensor<Self>,
            scaling: f64,
        ) -> FloatTensor<Self> {
            lora_autodiff::<C>(x, Base::Quantised(weight), a, b, scaling)
        }

        fn quantised_linear(x: FloatTensor<Self>, weight: QuantisedMatrix) -> FloatTensor<Self> {
            frozen_autodiff::<C>(x, Base::Quantised(weight))
        }

        fn dense_linear(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
            // The weight is frozen: it gets no parent node, so no gradient is made for it.
            let weight = weight.into_primitive().to_contiguous();
            frozen_autodiff::<C>(x, Base::Dense(weight))
        }
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use burn::tensor::{Device, Distribution, Tensor};

    use super::{FrozenBase, lora_linear};

    /// The largest difference relative to the largest magnitude of `expected` (sums over
    /// hundreds of rows reach ~100, where float reassociation alone moves them by ~1e-5).
    fn relative_diff(actual: Tensor<2>, expected: Tensor<2>) -> f32 {
        let scale: f32 = expected.clone().abs().max().into_scalar();
        (actual - expected).abs().max().into_scalar::<f32>() / scale
    }

    /// `lora_linear`'s value and the gradients of `x`, `A` and `B` (under a random upstream
    /// gradient) equal burn's own products, for `rows` rows of `x`.
    fn check(rows: usize) {
        let device = Device::flex().autodiff();
        let (d_in, d_out, r, scaling) = (40, 56, 4, 0.75);
        let normal = Distribution::Normal(0.0, 1.0);
        let inputs = [[rows, d_in], [d_in, r], [r, d_out]]
            .map(|shape| Tensor::<2>::random(shape, normal, &device));
        let weight = Tensor::<2>::random([d_in, d_out], normal, &device);
        let upstream = Tensor::<2>::random([rows, d_out], normal, &device);
        let run = |fused: bool| {
            let tracked = inputs.clone().map(|t| t.require_grad());
            let [x, a, b] = tracked.clone();
            let out = if fused {
                lora_linear(x, FrozenBase::Dense(weight.clone()), a, b, scaling)
            } else {
                x.clone().matmul(weight.clone()) + x.matmul(a).matmul(b).mul_scalar(scaling)
            };
            let grads = (out.clone() * upstream.clone()).sum().backward();
            let grads = tracked.map(|t| Tensor::<2>::from_inner(t.grad(&grads).unwrap()));
            (out, grads)
        };
        let (out, grads) = run(true);
        let (expected, expected_grads) = run(false);
        let diff = relative_diff(out, expected);
        assert!(
            diff < 1e-5,
            "{rows} rows: output differs by {diff} (relative)"
        );
        for (name, (grad, expected)) in ["x", "A", "B"]
            .iter()
            .zip(grads.into_iter().zip(expected_grads))
        {
            let diff = relative_diff(grad, expected);
            assert!(
                diff < 1e-5,
                "{rows} rows: gradient of {name} differs by {diff} (relative)"
            );
        }
    }

    #[test]
    fn a_few_rows_match_burn() {
        check(5);
    }

    /// On three threads, 301 rows make three uneven blocks of the low-rank backward.
    #[test]
    fn rows_split_over_threads_match_burn() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        pool.install(|| check(301));
        check(301);
    }
}
