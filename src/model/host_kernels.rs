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

/// The values of a contiguous `f32` flex tensor, to overwrite: in place when the tensor is
/// the only owner of its buffer, else in a copy the tensor then owns.
#[cfg(feature = "flex")]
pub(crate) fn values_mut(tensor: &mut FloatTensor<Flex>) -> &mut [f32] {
    let (start, end) = tensor
        .layout()
        .contiguous_offsets()
        .expect("a contiguous f32 tensor");
    &mut tensor.storage_mut::<f32>()[start..end]
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

    /// Whether distinct elements of a `rows x cols` matrix laid out so are distinct places
    /// (rows side by side without overlap, or columns).
    fn is_one_to_one(&self, rows: usize, cols: usize) -> bool {
        rows <= 1
            || cols <= 1 && self.row_stride > 0
            || self.row_stride >= cols * self.col_stride && self.col_stride > 0
            || self.col_stride >= rows * self.row_stride && self.row_stride > 0
    }

    /// Panics unless a `rows x cols` matrix laid out so fits in `len` elements.
    pub(crate) fn check(&self, rows: usize, cols: usize, len: usize) {
        let last =
            self.offset + (rows.max(1) - 1) * self.row_stride + (cols.max(1) - 1) * self.col_stride;
        assert!(last < len, "a strided matrix reaches past its buffer");
    }
}

#[cfg(feature = "flex")]
/// `dst = lhs rhs` (`dst += lhs rhs` with `accumulate`) for `lhs` `[m, k]` and `rhs`
/// `[k, n]`.
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
    assert!(
        dst_at.is_one_to_one(m, n),
        "a product's rows or columns overlap"
    );
    lhs_at.check(m, k, lhs.len());
    rhs_at.check(k, n, rhs.len());
    // SAFETY: the checks keep every element read or written inside its slice and tell distinct
    // elements of `dst` apart, and `dst` is borrowed mutably, so it aliases neither operand.
    unsafe {
        product(
            [m, n, k],
            scale,
            dst.as_mut_ptr(),
            dst_at,
            accumulate,
            lhs.as_ptr(),
            lhs_at,
            rhs.as_ptr(),
            rhs_at,
        );
    }
}

#[cfg(feature = "flex")]
/// `lhs rhs` as a new row-major `[m, n]` buffer.
pub(crate) fn matmul(
    mnk: [usize; 3],
    lhs: &[f32],
    lhs_at: Strided,
    rhs: &[f32],
    rhs_at: Strided,
) -> Vec<f32> {
    scaled_matmul(mnk, 1.0, lhs, lhs_at, rhs, rhs_at)
}

#[cfg(feature = "flex")]
/// `scale lhs rhs` as a new row-major `[m, n]` buffer, written once by the product (not
/// zeroed first).
pub(crate) fn scaled_matmul(
    [m, n, k]: [usize; 3],
    scale: f32,
    lhs: &[f32],
    lhs_at: Strided,
    rhs: &[f32],
    rhs_at: Strided,
) -> Vec<f32> {
    if m == 0 || n == 0 || k == 0 {
        return vec![0.0; m * n];
    }
    lhs_at.check(m, k, lhs.len());
    rhs_at.check(k, n, rhs.len());
    let mut dst = Vec::with_capacity(m * n);
    // SAFETY: the product writes each of the `m n` elements of the fresh buffer without
    // reading it (`accumulate` is false, `m`, `n`, `k` > 0), so all are initialised before
    // `set_len`; the operands are in bounds as checked.
    unsafe {
        product(
            [m, n, k],
            scale,
            dst.as_mut_ptr(),
            Strided::row_major(0, n),
            false,
            lhs.as_ptr(),
            lhs_at,
            rhs.as_ptr(),
            rhs_at,
        );
        dst.set_len(m * n);
    }
    dst
}

/// Products of at least this many multiply-adds (`m n k`) use gemm's own threads, unless gemm
/// would pack an operand serially first ([`packs_serially`]).
#[cfg(feature = "flex")]
const GEMM_THREADS_MIN: usize = 192 * 192 * 192;

/// Other products of at least this many (a LoRA factor's, `512 x 576 x 8`: a tenth of a
/// millisecond) called outside the pool are split into one block of rows (or columns) per
/// thread; smaller ones run as one call.
#[cfg(feature = "flex")]
const SPLIT_MIN: usize = 1 << 20;

/// The fewest rows (or columns) a thread's block of a split product gets.
#[cfg(feature = "flex")]
const BLOCK_MIN: usize = 64;

/// The length of each block when `len` rows (or columns) are split into one block per pool
/// thread, no block under [`BLOCK_MIN`] unless there is only one (then `len` itself, or 1 for
/// none).
#[cfg(feature = "flex")]
pub(crate) fn block_len(len: usize) -> usize {
    let blocks = rayon::current_num_threads().min(len / BLOCK_MIN).max(1);
    len.div_ceil(blocks).max(1)
}

/// Whether gemm, running a product on its own threads, would first pack an operand on the
/// calling thread alone while its pool waits. gemm multiplies into a column-major `dst`
/// (transposing the problem when `dst` is row-major), and packs its left-hand operand up
/// front unless that is column-major too: a row-major `dst` with a `rhs` read through a
/// transposed view, as every input gradient `dy Wᵀ` of a frozen `W` is, packs all of `W`
/// serially (gemm 0.19, `gemm_basic_generic`'s `do_prepack_lhs`).
#[cfg(feature = "flex")]
fn packs_serially(dst_at: Strided, lhs_at: Strided, rhs_at: Strided) -> bool {
    if dst_at.col_stride < dst_at.row_stride {
        rhs_at.col_stride != 1
    } else {
        lhs_at.row_stride != 1
    }
}

#[cfg(feature = "flex")]
/// A pointer moved into the tasks of [`product`], each of which writes its own block.
#[derive(Clone, Copy)]
struct SharedPtr<T>(T);

#[cfg(feature = "flex")]
impl<T: Copy> SharedPtr<T> {
    /// The pointers (a method, so that closures capture the wrapper rather than its field).
    fn get(self) -> T {
        self.0
    }
}

#[cfg(feature = "flex")]
// SAFETY: the tasks holding copies write disjoint elements (see `product`).
unsafe impl<T> Send for SharedPtr<T> {}
#[cfg(feature = "flex")]
// SAFETY: as above.
unsafe impl<T> Sync for SharedPtr<T> {}

#[cfg(feature = "flex")]
/// `dst (+)= scale lhs rhs` through gemm: products of at least [`GEMM_THREADS_MIN`] on gemm's
/// own threads unless gemm [`packs_serially`]; those, and smaller ones of at least
/// [`SPLIT_MIN`], split into one block per pool thread, each thread packing its own block
/// (`docs/performance.md`, lever 11).
///
/// # Safety
///
/// Every element of the three operands at their strides is in bounds, `dst` aliases neither
/// operand, and distinct `(row, column)` of `dst` are distinct elements.
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    [m, n, k]: [usize; 3],
    scale: f32,
    dst: *mut f32,
    dst_at: Strided,
    accumulate: bool,
    lhs: *const f32,
    lhs_at: Strided,
    rhs: *const f32,
    rhs_at: Strided,
) {
    let ptrs = SharedPtr((dst, lhs, rhs));
    let call = |[m, n]: [usize; 2], [dst_off, lhs_off, rhs_off]: [usize; 3], parallelism| {
        let (dst, lhs, rhs) = ptrs.get();
        // SAFETY: the caller's contract; each block is a sub-matrix of the checked ones.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.add(dst_at.offset + dst_off),
                dst_at.col_stride as isize,
                dst_at.row_stride as isize,
                accumulate,
                lhs.add(lhs_at.offset + lhs_off),
                lhs_at.col_stride as isize,
                lhs_at.row_stride as isize,
                rhs.add(rhs_at.offset + rhs_off),
                rhs_at.col_stride as isize,
                rhs_at.row_stride as isize,
                1.0,
                scale,
                false,
                false,
                false,
                parallelism,
            )
        }
    };
    let work = m * n * k;
    let nested = rayon::current_thread_index().is_some();
    if work >= GEMM_THREADS_MIN && (nested || !packs_serially(dst_at, lhs_at, rhs_at)) {
        return call([m, n], [0, 0, 0], gemm::Parallelism::Rayon(0));
    }
    // Split along the longer side of dst, so that each block stays wide.
    let by_rows = m >= n;
    let len = if by_rows { m } else { n };
    let block = block_len(len);
    if work < SPLIT_MIN || block >= len || nested {
        return call([m, n], [0, 0, 0], gemm::Parallelism::None);
    }
    // The blocks write disjoint elements of dst.
    rayon::scope(|scope| {
        for start in (0..len).step_by(block) {
            let size = block.min(len - start);
            let call = &call;
            scope.spawn(move |_| {
                if by_rows {
                    let offsets = [start * dst_at.row_stride, start * lhs_at.row_stride, 0];
                    call([size, n], offsets, gemm::Parallelism::None);
                } else {
                    let offsets = [start * dst_at.col_stride, 0, start * rhs_at.col_stride];
                    call([m, size], offsets, gemm::Parallelism::None);
                }
            });
        }
    });
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

    /// `scale lhs rhs (+ dst)` by the definition, for row-major `lhs`, `rhs` and `dst`.
    fn naive(m: usize, n: usize, k: usize, lhs: &[f32], rhs: &[f32], dst: &[f32]) -> Vec<f32> {
        let mut out = dst.to_vec();
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|p| f64::from(lhs[i * k + p]) * f64::from(rhs[p * n + j]))
                    .sum();
                out[i * n + j] += (0.5 * dot) as f32;
            }
        }
        out
    }

    /// Products big enough to be split across threads (by rows, then by columns, thin and
    /// wide, blocks of equal and unequal size) or for gemm's threads (the last), with and
    /// without accumulation, and the transposed view of an operand (split at every size
    /// here), equal the definition.
    #[test]
    fn split_products_equal_the_definition() {
        let values = |len: usize, seed: usize| -> Vec<f32> {
            (0..len)
                .map(|i| ((i * 7 + seed * 13) % 23) as f32 / 23.0 - 0.5)
                .collect()
        };
        for [m, n, k] in [
            [640, 8, 600],
            [8, 700, 600],
            [301, 130, 40],
            [300, 301, 40],
            [200, 256, 160],
        ] {
            assert!(m * n * k >= SPLIT_MIN && m.max(n) >= 2 * BLOCK_MIN);
            let lhs = values(m * k, 1);
            let rhs = values(k * n, 2);
            let start = values(m * n, 3);
            let expected = naive(m, n, k, &lhs, &rhs, &start);
            let mut dst = start.clone();
            scaled_matmul_into(
                [m, n, k],
                0.5,
                &mut dst,
                Strided::row_major(0, n),
                true,
                &lhs,
                Strided::row_major(0, k),
                &rhs,
                Strided::row_major(0, n),
            );
            let fresh = scaled_matmul(
                [m, n, k],
                0.5,
                &lhs,
                Strided::row_major(0, k),
                &rhs,
                Strided::row_major(0, n),
            );
            // rhs read through its transpose: rhsᵀ stored row-major is `[n, k]`.
            let rhs_t: Vec<f32> = (0..n * k).map(|i| rhs[(i % k) * n + i / k]).collect();
            let through_transpose = scaled_matmul(
                [m, n, k],
                0.5,
                &lhs,
                Strided::row_major(0, k),
                &rhs_t,
                Strided::column_major(0, k),
            );
            let zeros = vec![0.0; m * n];
            let expected_fresh = naive(m, n, k, &lhs, &rhs, &zeros);
            for (got, want) in [
                (&dst, &expected),
                (&fresh, &expected_fresh),
                (&through_transpose, &expected_fresh),
            ] {
                let diff = got
                    .iter()
                    .zip(want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(diff < 1e-4, "[{m}, {n}, {k}]: differs by {diff}");
            }
        }
    }

    #[test]
    fn sum_exp_adds_every_value() {
        let values: Vec<f32> = (0..37).map(|i| i as f32 * 0.1 - 2.0).collect();
        let exact: f64 = values.iter().map(|&v| (f64::from(v) - 0.5).exp()).sum();
        let sum = f64::from(sum_exp(&values, 0.5));
        assert!((sum - exact).abs() < 1e-6 * exact, "{sum} vs {exact}");
    }
}
