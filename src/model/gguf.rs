//! Reading GGUF files (llama.cpp's format, versions 2 and 3): metadata, tensor index and
//! dequantisation of F32, F16, BF16, Q8_0, Q4_0 and Q4_1 tensors.
//!
//! Every length and offset the file declares is checked against the bytes really present
//! before anything is allocated, so a malformed or hostile file gives [`Error::Gguf`], never a
//! huge allocation or a panic.

use std::collections::BTreeMap;
use std::path::Path;

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::params::HostTensor;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Any unsigned integer type.
    Uint(u64),
    /// Any signed integer type.
    Int(i64),
    /// `f32` or `f64`.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string.
    String(String),
    /// An array of values.
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::Uint(v) => Some(v),
            GgufValue::Int(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::Float(v) => Some(v),
            GgufValue::Uint(v) => Some(v as f64),
            GgufValue::Int(v) => Some(v as f64),
            _ => None,
        }
    }

    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }
}

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
}

impl GgufType {
    fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgufType::F32,
            1 => GgufType::F16,
            2 => GgufType::Q4_0,
            3 => GgufType::Q4_1,
            8 => GgufType::Q8_0,
            30 => GgufType::Bf16,
            _ => return None,
        })
    }

    /// `(values per block, bytes per block)`.
    fn block(self) -> (usize, usize) {
        match self {
            GgufType::F32 => (1, 4),
            GgufType::F16 | GgufType::Bf16 => (1, 2),
            GgufType::Q8_0 => (32, 34),
            GgufType::Q4_0 => (32, 18),
            GgufType::Q4_1 => (32, 20),
        }
    }
}

/// One entry of the tensor index.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    /// Dimensions innermost first, as GGUF lists them (`[in, out]` for a matrix).
    pub dims: Vec<usize>,
    /// Storage type.
    pub kind: GgufType,
    /// Absolute byte range of the data in the file.
    pub range: std::ops::Range<usize>,
}

/// A parsed GGUF file whose tensors are decoded on demand.
pub struct GgufFile {
    source_name: String,
    bytes: Mmap,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata key-value pairs.
    pub metadata: BTreeMap<String, GgufValue>,
    /// Tensor index by name.
    pub tensors: BTreeMap<String, GgufTensorInfo>,
}

/// A cursor that refuses to read past the end.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    source: &'a str,
}

impl<'a> Reader<'a> {
    fn error(&self, reason: impl Into<String>) -> Error {
        Error::Gguf {
            source_name: self.source.to_string(),
            reason: reason.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(self.error(format!(
                "truncated: {n} bytes needed at offset {}",
                self.pos
            )));
        };
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    /// A count that must fit in what is left, at `min_size` bytes per item.
    fn count(&mut self, what: &str, min_size: usize) -> Result<usize> {
        let n = self.u64()?;
        let left = (self.bytes.len() - self.pos) as u64;
        if n.saturating_mul(min_size as u64) > left {
            return Err(self.error(format!(
                "{what} count {n} exceeds the file's remaining {left} bytes (truncated or corrupt)"
            )));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String> {
        let len = self.count("string length", 1)?;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.error("a string is not UTF-8"))
    }

    fn value(&mut self, kind: u32, depth: usize) -> Result<GgufValue> {
        Ok(match kind {
            0 => GgufValue::Uint(u64::from(self.take(1)?[0])),
            1 => GgufValue::Int(i64::from(self.take(1)?[0] as i8)),
            2 => GgufValue::Uint(u64::from(u16::from_le_bytes(
                self.take(2)?.try_into().expect("2"),
            ))),
            3 => GgufValue::Int(i64::from(i16::from_le_bytes(
                self.take(2)?.try_into().expect("2"),
            ))),
            4 => GgufValue::Uint(u64::from(self.u32()?)),
            5 => GgufValue::Int(i64::from(self.u32()? as i32)),
            6 => GgufValue::Float(f64::from(f32::from_bits(self.u32()?))),
            7 => GgufValue::Bool(self.take(1)?[0] != 0),
            8 => GgufValue::String(self.string()?),
            9 => {
                if depth > 4 {
                    return Err(self.error("arrays nested too deeply"));
                }
                let item = self.u32()?;
                let n = self.count("array", 1)?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(item, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::Uint(self.u64()?),
            11 => GgufValue::Int(self.u64()? as i64),
            12 => GgufValue::Float(f64::from_bits(self.u64()?)),
            other => return Err(self.error(format!("unknown metadata value type {other}"))),
        })
    }
}

impl GgufFile {
    /// Memory-maps and parses `path`.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when the file cannot be read; [`Error::Gguf`] for a bad magic, an
    /// unsupported version or quant type, counts or offsets beyond the file, or truncated data.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only map; the file is not expected to change while open.
        let bytes = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(bytes, &path.display().to_string())
    }

    fn parse(bytes: Mmap, source_name: &str) -> Result<Self> {
        let mut r = Reader {
            bytes: &bytes,
            pos: 0,
            source: source_name,
        };
        if r.take(4).ok() != Some(b"GGUF".as_slice()) {
            return Err(r.error("bad magic (not a GGUF file)"));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(r.error(format!("unsupported GGUF version {version} (2 and 3 are)")));
        }
        let tensor_count = r.count("tensor", 24)?;
        let kv_count = r.count("metadata", 13)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..kv_count {
            let key = r.string()?;
            let kind = r.u32()?;
            let value = r.value(kind, 0)?;
            metadata.insert(key, value);
        }
        let mut raw = Vec::with_capacity(tensor_count);
        for _ in 0..tensor_count {
            let name = r.string()?;
            let n_dims = r.u32()? as usize;
            if n_dims == 0 || n_dims > 4 {
                return Err(r.error(format!("tensor `{name}` has {n_dims} dimensions")));
            }
            let dims = (0..n_dims).map(|_| r.u64()).collect::<Result<Vec<u64>>>()?;
            let kind_id = r.u32()?;
            let offset = r.u64()?;
            raw.push((name, dims, kind_id, offset));
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(GgufValue::as_u64)
            .unwrap_or(32) as usize;
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(r.error(format!("alignment {alignment} is not a power of two")));
        }
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let mut tensors = BTreeMap::new();
        for (name, dims, kind_id, offset) in raw {
            let kind = GgufType::from_id(kind_id).ok_or_else(|| {
                r.error(format!("tensor `{name}` has unsupported type {kind_id} (F32, F16, BF16, Q8_0, Q4_0, Q4_1 are)"))
            })?;
            let count = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
            let (per_block, block_bytes) = kind.block();
            let size = count
                .filter(|c| c % per_block as u64 == 0)
                .and_then(|c| (c / per_block as u64).checked_mul(block_bytes as u64));
            let start = (data_start as u64).checked_add(offset);
            let end = start.zip(size).and_then(|(s, n)| s.checked_add(n));
            match (start, end) {
                (Some(start), Some(end)) if end <= bytes.len() as u64 => {
                    tensors.insert(
                        name,
                        GgufTensorInfo {
                            dims: dims.iter().map(|&d| d as usize).collect(),
                            kind,
                            range: start as usize..end as usize,
                        },
                    );
                }
                _ => {
                    return Err(r.error(format!(
                        "tensor `{name}` ({dims:?}, {kind:?}) at offset {offset} lies past the end of the file"
                    )));
                }
            }
        }
        Ok(Self {
            source_name: source_name.to_string(),
            version,
            metadata,
            tensors,
            bytes,
        })
    }

    /// Decodes tensor `name` into f32, with GGUF's innermost-first dimensions reversed into
    /// row-major order (`[out, in]` for a matrix).
    ///
    /// # Errors
    ///
    /// [`Error::MissingTensor`] when absent.
    pub fn tensor(&self, name: &str) -> Result<HostTensor> {
        let info = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            name: format!("{name} (in {})", self.source_name),
        })?;
        let data = &self.bytes[info.range.clone()];
        let values = dequantize(info.kind, data);
        HostTensor::new(info.dims.iter().rev().copied().collect(), values)
    }
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Dequantises a whole tensor's data (its length is checked against the declared size when
/// the file is opened).
pub fn dequantize(kind: GgufType, data: &[u8]) -> Vec<f32> {
    match kind {
        GgufType::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        GgufType::F16 => data.chunks_exact(2).map(|b| f16_at(b, 0)).collect(),
        GgufType::Bf16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        GgufType::Q8_0 => data
            .chunks_exact(34)
            .flat_map(|b| {
                let d = f16_at(b, 0);
                b[2..].iter().map(move |&q| d * f32::from(q as i8))
            })
            .collect(),
        GgufType::Q4_0 => data
            .chunks_exact(18)
            .flat_map(|b| {
                let d = f16_at(b, 0);
                let q = &b[2..];
                let low = q.iter().map(move |&x| d * (f32::from(x & 0x0F) - 8.0));
                let high = q.iter().map(move |&x| d * (f32::from(x >> 4) - 8.0));
                low.chain(high)
            })
            .collect(),
        GgufType::Q4_1 => data
            .chunks_exact(20)
            .flat_map(|b| {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let q = &b[4..];
                let low = q.iter().map(move |&x| d * f32::from(x & 0x0F) + m);
                let high = q.iter().map(move |&x| d * f32::from(x >> 4) + m);
                low.chain(high)
            })
            .collect(),
    }
}
