//! Products with a frozen weight on burn's flex backend: `x W` for an `f32` weight and `x Mᵀ`
//! for a quantised one ([`QuantisedMatrix`]), as custom ops whose backward computes the
//! input's gradient only and keeps the weight as it is stored (`docs/custom-ops.md`).
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

/// `x Mᵀ` for `x` `[n, cols]` on flex.
pub(crate) fn quantised_linear(x: Tensor<2>, weight: &QuantisedMatrix) -> Tensor<2> {
    #[cfg(feature = "flex")]
    {
        flex::quantised_linear(x, weight)
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = (x, weight);
        unreachable!("only a flex tensor takes this path")
    }
}

/// `x W` for `x` `[n, d_in]` and a frozen `W` `[d_in, d_out]` on flex.
pub(crate) fn dense_linear(x: Tensor<2>, weight: Tensor<2>) -> Tensor<2> {
    #[cfg(feature = "flex")]
    {
        flex::dense_linear(x, weight)
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = (x, weight);
        unreachable!("only a flex tensor takes this path")
    }
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

    use crate::model::host_kernels::{tensor, values};
    use crate::model::quantised::QuantisedMatrix;

    #[backend_extension(Flex, Autodiff)]
    pub trait FrozenMatmulOps: Backend {
        /// `x Mᵀ` for `x` `[n, cols]`.
        fn quantised_linear(x: FloatTensor<Self>, weight: QuantisedMatrix) -> FloatTensor<Self>;
        /// `x W` for `x` `[n, d_in]`, `W` `[d_in, d_out]` frozen (no gradient).
        fn dense_linear(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self>;
    }

    pub(super) fn quantised_linear(x: Tensor<2>, weight: &QuantisedMatrix) -> Tensor<2> {
        Tensor::from_dispatch(<Dispatch as FrozenMatmulOps>::quantised_linear(
            x.into_dispatch(),
            weight.clone(),
        ))
    }

    pub(super) fn dense_linear(x: Tensor<2>, weight: Tensor<2>) -> Tensor<2> {
        Tensor::from_dispatch(<Dispatch as FrozenMatmulOps>::dense_linear(
            x.into_dispatch(),
            weight.into_dispatch(),
        ))
    }

    /// A matrix inside a slice: the offset of its first element and its row and column
    /// strides, in elements.
    #[derive(Clone, Copy)]
    struct Strided {
        offset: usize,
        row_stride: usize,
        col_stride: usize,
    }

    impl Strided {
        fn row_major(offset: usize, row_stride: usize) -> Self {
            Self {
                offset,
                row_stride,
                col_stride: 1,
            }
        }

        fn column_major(col_stride: usize) -> Self {
            Self {
                offset: 0,
                row_stride: 1,
                col_stride,
            }
        }

        /// Panics unless a `rows x cols` matrix laid out so fits in `len` elements.
        fn check(&self, rows: usize, cols: usize, len: usize) {
            let last = self.offset
                + (rows.max(1) - 1) * self.row_stride
                + (cols.max(1) - 1) * self.col_stride;
            assert!(last < len, "a strided matrix reaches past its buffer");
        }
    }

    /// `dst = lhs rhs` (`dst += lhs rhs` with `accumulate`) for `lhs` `[m, k]` and `rhs`
    /// `[k, n]`, multi-threaded for products as large as those flex's own matmul splits.
    #[allow(clippy::too_many_arguments)]
    fn matmul_into(
        [m, n, k]: [usize; 3],
        dst: &mut [f32],
        dst_at: Strided,
        accumulate: bool,
        lhs: &[f32],
        lhs_at: Strided,
        rhs: &[f32],
        rhs_at: Strided,
    ) {
        if m == 0 || n == 0 || k == 0 {
            return;
        }
        dst_at.check(m, n, dst.len());
        lhs_at.check(m, k, lhs.len());
        rhs_at.check(k, n, rhs.len());
        let parallelism = if m * n * k >= 192 * 192 * 192 {
            gemm::Parallelism::Rayon(0)
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: the three checks above keep every element gemm reads or writes inside its
        // slice, and `dst` is borrowed mutably, so it aliases neither operand.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr().add(dst_at.offset),
                dst_at.col_stride as isize,
                dst_at.row_stride as isize,
                accumulate,
                lhs.as_ptr().add(lhs_at.offset),
                lhs_at.col_stride as isize,
                lhs_at.row_stride as isize,
                rhs.as_ptr().add(rhs_at.offset),
                rhs_at.col_stride as isize,
                rhs_at.row_stride as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
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
                Strided::column_major(cols),
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
        let mut y = vec![0.0f32; n * d_out];
        matmul_into(
            [n, d_out, d_in],
            &mut y,
            Strided::row_major(0, d_out),
            false,
            x,
            Strided::row_major(0, d_in),
            values(weight),
            Strided::row_major(0, d_out),
        );
        y
    }

    /// `dx = dy Wᵀ` for row-major `dy` `[n, d_out]`.
    fn dense_backward(dy: &[f32], weight: &FloatTensor<Flex>) -> Vec<f32> {
        let [d_in, d_out] = dims(weight);
        let n = dy.len() / d_out;
        let mut dx = vec![0.0f32; n * d_in];
        matmul_into(
            [n, d_in, d_out],
            &mut dx,
            Strided::row_major(0, d_in),
            false,
            dy,
            Strided::row_major(0, d_out),
            values(weight),
            Strided::column_major(d_out),
        );
        dx
    }

    impl FrozenMatmulOps for Flex {
        fn quantised_linear(x: FloatTensor<Self>, weight: QuantisedMatrix) -> FloatTensor<Self> {
            let y = quantised_forward(values(&x.to_contiguous()), &weight);
            let rows = weight.shape()[0];
            let n = y.len() / rows;
            tensor(y, [n, rows])
        }

        fn dense_linear(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
            let weight = weight.to_contiguous();
            let y = dense_forward(values(&x.to_contiguous()), &weight);
            let d_out = dims(&weight)[1];
            let n = y.len() / d_out;
            tensor(y, [n, d_out])
        }
    }

    /// Keeps only the quantised matrix (its shared blocks) for the backward.
    #[derive(Debug)]
    struct QuantisedLinearBackward;

    impl Backward<Flex, 1> for QuantisedLinearBackward {
        type State = QuantisedMatrix;

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let weight = ops.state;
            unary::<Flex, _>(ops.parents, ops.node, grads, |dy| {
                let dx = quantised_backward(values(&dy.to_contiguous()), &weight);
                let cols = weight.shape()[1];
                let n = dx.len() / cols;
                tensor(dx, [n, cols])
            });
        }
    }

    /// Keeps only the weight (a shared handle to its storage) for the backward.
    #[derive(Debug)]
    struct DenseLinearBackward;

    impl Backward<Flex, 1> for DenseLinearBackward {
        type State = FloatTensor<Flex>;

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let weight = ops.state;
            unary::<Flex, _>(ops.parents, ops.node, grads, |dy| {
                let dx = dense_backward(values(&dy.to_contiguous()), &weight);
                let d_in = dims(&weight)[0];
                let n = dx.len() / d_in;
                tensor(dx, [n, d_in])
            });
        }
    }

    impl<C: CheckpointStrategy> FrozenMatmulOps for Autodiff<Flex, C> {
        fn quantised_linear(x: FloatTensor<Self>, weight: QuantisedMatrix) -> FloatTensor<Self> {
            let guard = x.node();
            let y = Flex::quantised_linear(x.into_primitive(), weight.clone());
            match QuantisedLinearBackward
                .prepare::<C>([guard])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish(weight, y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            }
        }

        fn dense_linear(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
            let guard = x.node();
            // The weight is frozen: it gets no parent node, so no gradient is made for it.
            let weight = weight.into_primitive().to_contiguous();
            let y = Flex::dense_linear(x.into_primitive(), weight.clone());
            match DenseLinearBackward
                .prepare::<C>([guard])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish(weight, y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            }
        }
    }
}
