//! What devft's hand-written CPU kernels share: telling whether a tensor lives on burn's flex
//! backend, moving `f32` values between flex tensors and host slices without copies where flex
//! allows, and matrix products into strided places of host buffers.

#[cfg(feature = "flex")]
use burn::backend::tensor::FloatTensor;
#[cfg(feature = "flex")]
use burn::backend::{DispatchDevice, Flex};
use burn::tensor::{DType, Device};
#[cfg(feature = "flex")]
use burn::tensor::{Shape, TensorData};

/// Whether `device` is flex's, with or without autodiff, and `dtype` is `f32`: the case the
/// kernels handle (other backends keep burn's own ops).
#[cfg(feature = "flex")]
pub(crate) fn runs_on_flex(device: &Device, dtype: DType) -> bool {
    // Other backends' variants exist only with their features.
    #[allow(unreachable_patterns)]
    let flex = match device.as_dispatch() {
        DispatchDevice::Flex(_) => true,
        DispatchDevice::Autodiff(device) => {
            matches!(device.clone().inner(), DispatchDevice::Flex(_))
        }
        _ => false,
    };
    flex && dtype == DType::F32
}

/// Without the flex feature: never.
#[cfg(not(feature = "flex"))]
pub(crate) fn runs_on_flex(_: &Device, _: DType) -> bool {
    false
}

/// The values of a contiguous `f32` flex tensor.
#[cfg(feature = "flex")]
pub(crate) fn values(tensor: &FloatTensor<Flex>) -> &[f32] {
    tensor.as_slice::<f32>().expect("a contiguous f32 tensor")
}

/// A flex tensor holding `values` in row-major `shape`.
#[cfg(feature = "flex")]
pub(crate) fn tensor(values: Vec<f32>, shape: impl Into<Shape>) -> FloatTensor<Flex> {
    FloatTensor::<Flex>::from_data(TensorData::new(values, shape.into()))
}

#[cfg(feature = "flex")]
/// A matrix inside a slice: the offset of its first element and its row and column
/// strides, in elements.
#[derive(Clone, Copy)]
pub(crate) struct Strided {
    /// Index of the first element.
    pub offset: usize,
    /// Elements from one row to the next.
    pub row_stride: usize,
    /// Elements from one column to the next.
    pub col_stride: usize,
}

#[cfg(feature = "flex")]
impl Strided {
    /// Rows of `row_stride` elements from `offset`, columns adjacent.
    pub(crate) fn row_major(offset: usize, row_stride: usize) -> Self {
        Self {
            offset,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transpose of [`Strided::row_major`]: columns of `col_stride` elements from
    /// `offset`, rows adjacent.
    pub(crate) fn column_major(offset: usize, col_stride: usize) -> Self {
        Self {
            offset,
            row_stride: 1,
            col_stride,
        }
    }

    /// Panics unless a `rows x cols` matrix laid out so fits in `len` elements.
    fn check(&self, rows: usize, cols: usize, len: usize) {
        let last =
            self.offset + (rows.max(1) - 1) * self.row_stride + (cols.max(1) - 1) * self.col_stride;
        assert!(last < len, "a strided matrix reaches past its buffer");
    }
}

#[cfg(feature = "flex")]
/// `dst = lhs rhs` (`dst += lhs rhs` with `accumulate`) for `lhs` `[m, k]` and `rhs`
/// `[k, n]`, multi-threaded for products as large as those flex's own matmul splits.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_into(
    mnk: [usize; 3],
    dst: &mut [f32],
    dst_at: Strided,
    accumulate: bool,
    lhs: &[f32],
    lhs_at: Strided,
    rhs: &[f32],
    rhs_at: Strided,
) {
    scaled_matmul_into(mnk, 1.0, dst, dst_at, accumulate, lhs, lhs_at, rhs, rhs_at);
}

#[cfg(feature = "flex")]
/// [`matmul_into`] of `scale lhs rhs`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn scaled_matmul_into(
    [m, n, k]: [usize; 3],
    scale: f32,
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
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}
