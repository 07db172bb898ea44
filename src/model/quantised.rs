//! A frozen matrix kept in a GGUF file's own quantised blocks (QLoRA's idea: the base stays
//! small, only the adapters are `f32`).
//!
//! [`QuantisedMatrix`] multiplies without ever holding all of its `f32` values: the forward
//! pass `x Mᵀ` and the backward pass for the input, `dy M`, decode a few rows at a time (at
//! most [`DECODED_VALUES`] values, 4 MiB) and hand each slice to the matmul kernel, so a
//! 4-bit base costs about a sixth of its `f32` size in memory during training too. On
//! burn's flex backend this is a custom op with a hand-written backward whose saved state is
//! the blocks themselves (an `Arc`), not a dequantised copy (`docs/custom-ops.md` explains the
//! route and why burn's own quantised tensors do not fit). On other backends the matrix is
//! decoded whole for each product, which is correct but saves no memory.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use burn::module::{
    Content, Devices, Module, ModuleDisplay, ModuleDisplayDefault, ModuleMapper, ModuleVisitor,
};
use burn::tensor::module::linear;
use burn::tensor::{Device, Int, Tensor, TensorData};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::frozen_matmul::{FrozenBase, frozen_linear, on_rows};
use crate::model::gguf::{GgufType, dequantize_into, reordered_rows};
use crate::model::host_kernels::runs_on_flex;
use crate::params::HostTensor;

/// The most values a product decodes at once (rows of the matrix, 4 MiB of `f32`).
pub const DECODED_VALUES: usize = 1 << 20;

/// A `[rows, cols]` matrix stored as GGUF blocks, row-major like GGUF's data (each row
/// `cols / values_per_block` whole blocks). As a frozen linear layer's weight it has
/// PyTorch's `[out, in]` layout: [`QuantisedMatrix::forward`] computes `x Mᵀ`.
///
/// Cloning shares the blocks.
///
/// ```
/// use devft::model::QuantisedMatrix;
/// use devft::model::gguf::GgufType;
///
/// // One row of one Q8_0 block: scale 0.5 (f16 0x3800), quants 0, 1, ..., 31.
/// let mut block = vec![0x00, 0x38];
/// block.extend(0u8..32);
/// let m = QuantisedMatrix::new(GgufType::Q8_0, 1, 32, block)?;
/// assert_eq!(m.to_host().values()[3], 1.5);
/// assert_eq!(m.storage_bytes(), 34);
/// # Ok::<(), devft::Error>(())
/// ```
#[derive(Clone)]
pub struct QuantisedMatrix {
    kind: GgufType,
    rows: usize,
    cols: usize,
    blocks: Arc<[u8]>,
}

impl fmt::Debug for QuantisedMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuantisedMatrix")
            .field("kind", &self.kind)
            .field("shape", &[self.rows, self.cols])
            .field("bytes", &self.blocks.len())
            .finish()
    }
}

impl QuantisedMatrix {
    /// A matrix of `rows` rows of `cols` values from `blocks`, GGUF's data of a tensor of
    /// type `kind` with dimensions `[cols, rows]` (innermost first).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when a dimension is 0, `cols` is not a whole number of
    /// `kind`'s blocks, or `blocks` does not hold exactly `rows` rows.
    pub fn new(kind: GgufType, rows: usize, cols: usize, blocks: Vec<u8>) -> Result<Self> {
        let (per_block, block_bytes) = kind.block();
        let row_bytes = (cols / per_block).checked_mul(block_bytes);
        let expected = row_bytes.and_then(|r| r.checked_mul(rows));
        if rows == 0 || cols == 0 || !cols.is_multiple_of(per_block) {
            return Err(Error::InvalidArgument(format!(
                "a {kind:?} matrix needs non-zero dimensions and rows of whole {per_block}-value \
                 blocks, got [{rows}, {cols}]"
            )));
        }
        if expected != Some(blocks.len()) {
            return Err(Error::InvalidArgument(format!(
                "a [{rows}, {cols}] {kind:?} matrix takes {expected:?} bytes, got {}",
                blocks.len()
            )));
        }
        Ok(Self {
            kind,
            rows,
            cols,
            blocks: blocks.into(),
        })
    }

    /// The storage type of the blocks.
    pub fn kind(&self) -> GgufType {
        self.kind
    }

    /// `[rows, cols]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// The bytes the blocks take (what the matrix costs in memory).
    pub fn storage_bytes(&self) -> usize {
        self.blocks.len()
    }

    /// Whether `other` shares this matrix's blocks (a clone of it, as a tied LM head is of
    /// the embedding).
    pub fn shares_blocks(&self, other: &QuantisedMatrix) -> bool {
        Arc::ptr_eq(&self.blocks, &other.blocks)
    }

    fn row_bytes(&self) -> usize {
        self.blocks.len() / self.rows
    }

    /// Rows `range` decoded to `f32`, row-major, rows in parallel.
    pub(crate) fn decode_rows(&self, range: Range<usize>) -> Vec<f32> {
        let row_bytes = self.row_bytes();
        let bytes = &self.blocks[range.start * row_bytes..range.end * row_bytes];
        let mut values = vec![0.0f32; range.len() * self.cols];
        values
            .par_chunks_mut(self.cols)
            .zip(bytes.par_chunks(row_bytes))
            .with_min_len(16)
            .for_each(|(row, bytes)| dequantize_into(self.kind, bytes, row));
        values
    }

    /// The row ranges a product decodes one after the other: at most [`DECODED_VALUES`]
    /// values each (at least one row).
    pub(crate) fn row_chunks(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        let step = (DECODED_VALUES / self.cols).max(1);
        (0..self.rows)
            .step_by(step)
            .map(move |start| start..(start + step).min(self.rows))
    }

    /// The whole matrix in `f32`, `[rows, cols]`.
    pub fn to_host(&self) -> HostTensor {
        let values = self.decode_rows(0..self.rows);
        HostTensor::new(vec![self.rows, self.cols], values).expect("rows x cols values")
    }

    /// The whole matrix decoded as a linear layer's weight in burn's `[cols, rows]` layout on
    /// `device`.
    pub(crate) fn to_weight_tensor(&self, device: &Device) -> Tensor<2> {
        self.to_host()
            .transposed()
            .and_then(|w| w.to_tensor(device))
            .expect("a 2-D matrix")
    }

    /// Whether every value is finite (decoded a chunk of rows at a time).
    pub fn is_finite(&self) -> bool {
        self.row_chunks()
            .all(|rows| self.decode_rows(rows).iter().all(|v| v.is_finite()))
    }

    /// The matrix with its rows reordered: row `i` of the result is row `order[i]` of this
    /// one (blocks never span rows, so this is exact).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when `order` is not a permutation of the rows.
    pub fn with_row_order(&self, order: &[usize]) -> Result<Self> {
        let mut seen = vec![false; self.rows];
        let is_permutation = order.len() == self.rows
            && order
                .iter()
                .all(|&r| r < self.rows && !std::mem::replace(&mut seen[r], true));
        if !is_permutation {
            return Err(Error::InvalidArgument(format!(
                "a row order of {} rows must list each of 0..{} once",
                self.rows, self.rows
            )));
        }
        Ok(Self {
            blocks: reordered_rows(&self.blocks, self.row_bytes(), order).into(),
            ..self.clone()
        })
    }

    /// Looks up rows by id: `[batch, seq]` ids give `[batch, seq, cols]` (an embedding
    /// table's lookup; no gradient flows into the matrix).
    ///
    /// # Panics
    ///
    /// When an id is negative or not below the number of rows, like burn's own embedding.
    pub fn embed(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let [batch, seq] = ids.dims();
        let device = ids.device();
        let ids = ids
            .into_data()
            .convert::<i64>()
            .try_into_vec::<i64>()
            .expect("int ids");
        let row_bytes = self.row_bytes();
        let mut values = vec![0.0f32; ids.len() * self.cols];
        values
            .par_chunks_mut(self.cols)
            .zip(ids.par_iter())
            .for_each(|(row, &id)| {
                let r = usize::try_from(id)
                    .ok()
                    .filter(|&r| r < self.rows)
                    .unwrap_or_else(|| panic!("token id {id} outside 0..{}", self.rows));
                dequantize_into(self.kind, &self.blocks[r * row_bytes..][..row_bytes], row);
            });
        Tensor::from_data(TensorData::new(values, [batch, seq, self.cols]), &device)
    }

    /// `x Mᵀ`: a frozen linear layer with this matrix as its `[out, in]` weight. The
    /// gradient flows to `x` only.
    ///
    /// # Shapes
    ///
    /// - x: `[..., cols]`
    /// - output: `[..., rows]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let device = x.device();
        if !runs_on_flex(&device, x.dtype()) {
            return linear(x, self.to_weight_tensor(&device), None);
        }
        let base = FrozenBase::Quantised(self.clone());
        on_rows(x, self.rows, |x| frozen_linear(x, base))
    }
}

/// The matrix is frozen host data: no parameters to visit or map, no device of its own.
impl Module for QuantisedMatrix {
    fn collect_devices(&self, devices: Devices) -> Devices {
        devices
    }

    fn fork(self, _: &Device) -> Self {
        self
    }

    fn to_device(self, _: &Device) -> Self {
        self
    }

    fn train(self) -> Self {
        self
    }

    fn valid(&self) -> Self {
        self.clone()
    }

    fn materialize(self) -> Self {
        self
    }

    fn visit<V: ModuleVisitor>(&self, _: &mut V) {}

    fn map<M: ModuleMapper>(self, _: &mut M) -> Self {
        self
    }
}

impl ModuleDisplayDefault for QuantisedMatrix {
    fn content(&self, content: Content) -> Option<Content> {
        content
            .add_single(&format!(
                "QuantisedMatrix {{kind: {:?}, shape: [{}, {}]}}",
                self.kind, self.rows, self.cols
            ))
            .optional()
    }
}

impl ModuleDisplay for QuantisedMatrix {}
