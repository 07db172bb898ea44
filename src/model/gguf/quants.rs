//! GGUF storage types and their dequantisation to f32, following ggml's block layouts
//! (`ggml-common.h`, `dequantize_row_*` in `ggml-quants.c`).
//!
//! Legacy quants hold 32 values per block; K-quants hold 256 values per super-block, split
//! into sub-blocks with their own 4- to 8-bit scales (and minimums for the "affine" kinds).
//! All multi-byte fields are little-endian; `d` and `dmin` are f16.

use rayon::prelude::*;

/// The storage type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    Bf16,
    /// Blocks of 32: f16 scale `d`, 32 x i8; `x = d q`.
    Q8_0,
    /// Blocks of 32: f16 `d`, 16 bytes of nibbles; `x = d (q - 8)`.
    Q4_0,
    /// Blocks of 32: f16 `d`, f16 `m`, 16 bytes of nibbles; `x = d q + m`.
    Q4_1,
    /// Blocks of 32: f16 `d`, 32 high bits, 16 bytes of nibbles; `x = d (q - 16)`, `q` 5-bit.
    Q5_0,
    /// Blocks of 32: f16 `d`, f16 `m`, 32 high bits, 16 bytes of nibbles; `x = d q + m`.
    Q5_1,
    /// Super-blocks of 256 in 16 sub-blocks of 16: 4-bit scale and min per sub-block, 2-bit
    /// quants, f16 `d` and `dmin`; `x = d sc q - dmin m`.
    Q2K,
    /// Super-blocks of 256 in 16 sub-blocks of 16: 6-bit signed scales, 2 low bits and 1 high
    /// bit per quant, f16 `d`; `x = d (sc - 32) (q - 4 if the high bit is clear)`.
    Q3K,
    /// Super-blocks of 256 in 8 sub-blocks of 32: 6-bit scale and min, 4-bit quants, f16 `d`
    /// and `dmin`; `x = d sc q - dmin m`.
    Q4K,
    /// As [`GgufType::Q4K`] with a fifth quant bit: `q` in `0..32`.
    Q5K,
    /// Super-blocks of 256 in 16 sub-blocks of 16: i8 scales, 6-bit quants, f16 `d`;
    /// `x = d sc (q - 32)`.
    Q6K,
}

/// Values per K-quant super-block.
const QK_K: usize = 256;

impl GgufType {
    /// The supported types, as listed in error messages.
    pub const SUPPORTED: &'static str =
        "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";

    /// The type with ggml's id `id` (`ggml_type`), if supported.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgufType::F32,
            1 => GgufType::F16,
            2 => GgufType::Q4_0,
            3 => GgufType::Q4_1,
            6 => GgufType::Q5_0,
            7 => GgufType::Q5_1,
            8 => GgufType::Q8_0,
            10 => GgufType::Q2K,
            11 => GgufType::Q3K,
            12 => GgufType::Q4K,
            13 => GgufType::Q5K,
            14 => GgufType::Q6K,
            30 => GgufType::Bf16,
            _ => return None,
        })
    }

    /// `(values per block, bytes per block)`.
    pub fn block(self) -> (usize, usize) {
        match self {
            GgufType::F32 => (1, 4),
            GgufType::F16 | GgufType::Bf16 => (1, 2),
            GgufType::Q8_0 => (32, 34),
            GgufType::Q4_0 => (32, 18),
            GgufType::Q4_1 => (32, 20),
            GgufType::Q5_0 => (32, 22),
            GgufType::Q5_1 => (32, 24),
            GgufType::Q2K => (QK_K, 84),
            GgufType::Q3K => (QK_K, 110),
            GgufType::Q4K => (QK_K, 144),
            GgufType::Q5K => (QK_K, 176),
            GgufType::Q6K => (QK_K, 210),
        }
    }
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Dequantises a whole tensor's data. A trailing partial block is ignored (the file reader
/// checks every tensor's length against its declared size when the file is opened).
///
/// ```
/// use devft::model::gguf::{GgufType, dequantize};
///
/// // One Q8_0 block: scale 0.5 (f16 0x3800), then 32 signed quants.
/// let mut block = vec![0x00, 0x38];
/// block.extend((0..32).map(|i| (i as i8 - 16) as u8));
/// let values = dequantize(GgufType::Q8_0, &block);
/// assert_eq!(values[0], -8.0);
/// assert_eq!(values[31], 7.5);
/// ```
pub fn dequantize(kind: GgufType, data: &[u8]) -> Vec<f32> {
    let (per_block, block_bytes) = kind.block();
    let blocks = data.len() / block_bytes;
    let mut out = vec![0.0f32; blocks * per_block];
    // Blocks are independent: decode them in parallel chunks (a 7B model's tensors are large).
    const BLOCKS_PER_TASK: usize = 64;
    out.par_chunks_mut(per_block * BLOCKS_PER_TASK)
        .zip(data.par_chunks(block_bytes * BLOCKS_PER_TASK))
        .for_each(|(values, bytes)| dequantize_into(kind, bytes, values));
    out
}

/// Dequantises whole blocks of `data` into `out` (one block's values per block, in order),
/// on the calling thread: the building block of [`crate::model::QuantisedMatrix`], which
/// decodes a few rows at a time.
pub(crate) fn dequantize_into(kind: GgufType, data: &[u8], out: &mut [f32]) {
    let (per_block, block_bytes) = kind.block();
    for (y, b) in out
        .chunks_exact_mut(per_block)
        .zip(data.chunks_exact(block_bytes))
    {
        dequantize_block(kind, b, y);
    }
}

/// Decodes one block `b` into `y` (`y.len()` values per block).
fn dequantize_block(kind: GgufType, b: &[u8], y: &mut [f32]) {
    match kind {
        GgufType::F32 => y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgufType::F16 => y[0] = f16_at(b, 0),
        GgufType::Bf16 => y[0] = half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgufType::Q8_0 => {
            let d = f16_at(b, 0);
            for (y, &q) in y.iter_mut().zip(&b[2..]) {
                *y = d * f32::from(q as i8);
            }
        }
        GgufType::Q4_0 => nibbles(&b[2..18], y, f16_at(b, 0), 8.0, 0.0),
        GgufType::Q4_1 => nibbles(&b[4..20], y, f16_at(b, 0), 0.0, f16_at(b, 2)),
        GgufType::Q5_0 => five_bits(&b[2..6], &b[6..22], y, f16_at(b, 0), 16.0, 0.0),
        GgufType::Q5_1 => five_bits(&b[4..8], &b[8..24], y, f16_at(b, 0), 0.0, f16_at(b, 2)),
        GgufType::Q2K => q2_k(b, y),
        GgufType::Q3K => q3_k(b, y),
        GgufType::Q4K => q4_k(b, y, false),
        GgufType::Q5K => q4_k(b, y, true),
        GgufType::Q6K => q6_k(b, y),
    }
}

/// 32 values from 16 bytes of nibbles: value `j` in the low nibble of byte `j`, value
/// `j + 16` in its high nibble; `x = d (q - offset) + m`.
fn nibbles(qs: &[u8], y: &mut [f32], d: f32, offset: f32, m: f32) {
    for (j, &q) in qs.iter().enumerate() {
        y[j] = d * (f32::from(q & 0x0F) - offset) + m;
        y[j + 16] = d * (f32::from(q >> 4) - offset) + m;
    }
}

/// As [`nibbles`], with the fifth bit of value `j` in bit `j` of the little-endian `qh`.
fn five_bits(qh: &[u8], qs: &[u8], y: &mut [f32], d: f32, offset: f32, m: f32) {
    let high = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let bit = |j: usize| if high >> j & 1 == 1 { 16.0 } else { 0.0 };
    for (j, &q) in qs.iter().enumerate() {
        y[j] = d * (f32::from(q & 0x0F) + bit(j) - offset) + m;
        y[j + 16] = d * (f32::from(q >> 4) + bit(j + 16) - offset) + m;
    }
}

/// Q2_K: `scales[16] qs[64] d dmin`. Each 128-value half uses 32 bytes of `qs`; its four
/// 2-bit planes (shift 0, 2, 4, 6) give 32 values each, as two sub-blocks of 16.
fn q2_k(b: &[u8], y: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    let mut out = y.chunks_exact_mut(16);
    let mut scale = scales.iter();
    for half in qs.chunks_exact(32) {
        for shift in [0, 2, 4, 6] {
            for sixteen in half.chunks_exact(16) {
                let sc = scale.next().copied().unwrap_or(0);
                let (dl, ml) = (d * f32::from(sc & 0x0F), dmin * f32::from(sc >> 4));
                let y = out.next().expect("16 sub-blocks of 16");
                for (y, &q) in y.iter_mut().zip(sixteen) {
                    *y = dl * f32::from(q >> shift & 3) - ml;
                }
            }
        }
    }
}

/// Q3_K: `hmask[32] qs[64] scales[12] d`. The 16 6-bit scales are packed as 4 low bits
/// (bytes 0-7, two per byte) and 2 high bits (bytes 8-11, four per byte). Value planes as in
/// Q2_K; the high-bit plane `m` runs over `hmask` once per plane across the whole block.
fn q3_k(b: &[u8], y: &mut [f32]) {
    let (hmask, qs, packed) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = f16_at(b, 108);
    let scale = |i: usize| -> f32 {
        let low = if i < 8 {
            packed[i] & 0x0F
        } else {
            packed[i - 8] >> 4
        };
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
        f32::from((low | high << 4) as i8 - 32)
    };
    let mut out = y.chunks_exact_mut(16);
    let mut index = 0;
    let mut plane = 0;
    for half in qs.chunks_exact(32) {
        for shift in [0, 2, 4, 6] {
            for (part, sixteen) in half.chunks_exact(16).enumerate() {
                let dl = d * scale(index);
                index += 1;
                let high = &hmask[16 * part..16 * part + 16];
                let y = out.next().expect("16 sub-blocks of 16");
                for ((y, &q), &h) in y.iter_mut().zip(sixteen).zip(high) {
                    let low = i16::from(q >> shift & 3);
                    let offset = if h >> plane & 1 == 1 { 0 } else { 4 };
                    *y = dl * f32::from(low - offset);
                }
            }
            plane += 1;
        }
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) of Q4_K and Q5_K, packed in 12 bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    };
    (f32::from(sc), f32::from(m))
}

/// Q4_K: `d dmin scales[12] qs[128]`; Q5_K: `d dmin scales[12] qh[32] qs[128]`. Each 64
/// values use 32 bytes of `qs`: low nibbles for the first sub-block of 32, high for the second;
/// Q5_K's fifth bit of value `l` of sub-block `s` is bit `s` of `qh[l]`.
fn q4_k(b: &[u8], y: &mut [f32], fifth_bit: bool) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let (qh, qs) = if fifth_bit {
        (&b[16..48], &b[48..176])
    } else {
        (&b[0..0], &b[16..144])
    };
    for (pair, (y, q)) in y.chunks_exact_mut(64).zip(qs.chunks_exact(32)).enumerate() {
        let (y_low, y_high) = y.split_at_mut(32);
        for (s, (y, nibble_shift)) in [(y_low, 0), (y_high, 4)].into_iter().enumerate() {
            let sub = 2 * pair + s;
            let (sc, m) = scale_min_k4(sub, scales);
            let (dl, ml) = (d * sc, dmin * m);
            for (l, y) in y.iter_mut().enumerate() {
                let mut value = f32::from(q[l] >> nibble_shift & 0x0F);
                if fifth_bit && qh[l] >> sub & 1 == 1 {
                    value += 16.0;
                }
                *y = dl * value - ml;
            }
        }
    }
}

/// Q6_K: `ql[128] qh[64] scales[16] d`. Each 128 values use 64 bytes of `ql`, 32 of `qh` and
/// 8 scales; value `l + 32 k` (k in 0..4) takes nibble `k / 2` of `ql[l + 32 (k % 2)]` and
/// bits `2k, 2k + 1` of `qh[l]`.
fn q6_k(b: &[u8], y: &mut [f32]) {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    for (n, y) in y.chunks_exact_mut(128).enumerate() {
        let (ql, qh, sc) = (
            &ql[64 * n..64 * n + 64],
            &qh[32 * n..32 * n + 32],
            &scales[8 * n..8 * n + 8],
        );
        for l in 0..32 {
            for k in 0..4 {
                let low = ql[l + 32 * (k % 2)] >> (4 * (k / 2)) & 0x0F;
                let high = qh[l] >> (2 * k) & 3;
                let q = i16::from(low | high << 4) - 32;
                let scale = f32::from(sc[l / 16 + 2 * k] as i8);
                y[l + 32 * k] = d * scale * f32::from(q);
            }
        }
    }
}
