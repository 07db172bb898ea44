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

/// `e^x` in `f32` without a call into libm, so that loops over it vectorise: Cody–Waite
/// reduction to `x = k ln 2 + r`, `|r| <= ln 2 / 2`, then Cephes' `expf` polynomial for
/// `e^r`, scaled by `2^k` through the exponent bits. Within 2 ulp of the exact value where
/// that is a normal float; 0 below `-87.3` (where `e^x` is subnormal), `e^88` above `88`,
/// NaN for NaN.
#[cfg(feature = "flex")]
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOWEST: f32 = -87.33;
    const HIGHEST: f32 = 88.0;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let clamped = x.clamp(LOWEST, HIGHEST);
    let rounded = clamped * std::f32::consts::LOG2_E + ROUND;
    let k = rounded - ROUND;
    // k as an integer, read from the mantissa bits (`as i32` would saturate, lane by lane).
    let k_bits = rounded.to_bits().wrapping_sub(ROUND.to_bits());
    let r = clamped - k * LN2_HI - k * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let er = p * (r * r) + r + 1.0;
    let scaled = er * f32::from_bits(k_bits.wrapping_add(127) << 23);
    if x < LOWEST { 0.0 } else { scaled }
}

#[cfg(feature = "flex")]
/// `Σ e^(v - shift)` over `values`, in 16 partial sums so that the loop vectorises.
pub(crate) fn sum_exp(values: &[f32], shift: f32) -> f32 {
    let mut lanes = [0.0f32; 16];
    let chunks = values.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|&v| exp(v - shift)).sum();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += exp(v - shift);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_the_exact_value() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let exact = f64::from(x).exp();
            let ulp = f64::from(f32::EPSILON) * exact;
            let err = (f64::from(exp(x)) - exact).abs();
            assert!(err <= 2.0 * ulp, "exp({x}) = {} vs {exact}", exp(x));
            x += 0.000_37;
        }
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn sum_exp_adds_every_value() {
        let values: Vec<f32> = (0..37).map(|i| i as f32 * 0.1 - 2.0).collect();
        let exact: f64 = values.iter().map(|&v| (f64::from(v) - 0.5).exp()).sum();
        let sum = f64::from(sum_exp(&values, 0.5));
        assert!((sum - exact).abs() < 1e-6 * exact, "{sum} vs {exact}");
    }
}
