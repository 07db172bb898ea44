//! Reading GGUF files (llama.cpp's format, versions 2 and 3): metadata, tensor index and
//! dequantisation (F32, F16, BF16, the legacy quants Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the
//! K-quants Q2_K to Q6_K: [`GgufType`]).
//!
//! Every length and offset the file declares is checked against the bytes really present
//! before anything is allocated, so a malformed or hostile file gives [`Error::Gguf`], never a
//! huge allocation or a panic.

use std::collections::BTreeMap;
use std::path::Path;

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::model::causal_lm::CausalLm;
use crate::model::checkpoint::map_file;
use crate::model::config::{DecoderConfig, HfConfig};
use crate::model::quantised::QuantisedMatrix;
use crate::params::{HostTensor, TensorSource};

mod quants;

pub(crate) use quants::dequantize_into;
pub use quants::{GgufType, dequantize};

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
    /// An array of values, stored compactly by element type.
    Array(GgufArray),
}

/// A metadata array, held in its element type's own width, so that its memory stays
/// proportional to its bytes in the file (a tokenizer's vocabulary of 49k strings, a table of
/// a million `u8`).
#[derive(Debug, Clone, PartialEq)]
pub enum GgufArray {
    /// `u8` items.
    U8(Vec<u8>),
    /// `i8` items.
    I8(Vec<i8>),
    /// `u16` items.
    U16(Vec<u16>),
    /// `i16` items.
    I16(Vec<i16>),
    /// `u32` items.
    U32(Vec<u32>),
    /// `i32` items.
    I32(Vec<i32>),
    /// `f32` items.
    F32(Vec<f32>),
    /// Boolean items.
    Bool(Vec<bool>),
    /// String items.
    String(Vec<String>),
    /// `u64` items.
    U64(Vec<u64>),
    /// `i64` items.
    I64(Vec<i64>),
    /// `f64` items.
    F64(Vec<f64>),
    /// Nested arrays.
    Array(Vec<GgufArray>),
}

impl GgufArray {
    /// The number of items.
    pub fn len(&self) -> usize {
        match self {
            GgufArray::U8(v) => v.len(),
            GgufArray::I8(v) => v.len(),
            GgufArray::U16(v) => v.len(),
            GgufArray::I16(v) => v.len(),
            GgufArray::U32(v) => v.len(),
            GgufArray::I32(v) => v.len(),
            GgufArray::F32(v) => v.len(),
            GgufArray::Bool(v) => v.len(),
            GgufArray::String(v) => v.len(),
            GgufArray::U64(v) => v.len(),
            GgufArray::I64(v) => v.len(),
            GgufArray::F64(v) => v.len(),
            GgufArray::Array(v) => v.len(),
        }
    }

    /// Whether the array has no items.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The items as strings, if this is an array of strings.
    pub fn strings(&self) -> Option<&[String]> {
        match self {
            GgufArray::String(v) => Some(v),
            _ => None,
        }
    }

    /// Item `index` as a [`GgufValue`] (scalars and strings are copied), if in range.
    pub fn get(&self, index: usize) -> Option<GgufValue> {
        Some(match self {
            GgufArray::U8(v) => GgufValue::Uint(u64::from(*v.get(index)?)),
            GgufArray::I8(v) => GgufValue::Int(i64::from(*v.get(index)?)),
            GgufArray::U16(v) => GgufValue::Uint(u64::from(*v.get(index)?)),
            GgufArray::I16(v) => GgufValue::Int(i64::from(*v.get(index)?)),
            GgufArray::U32(v) => GgufValue::Uint(u64::from(*v.get(index)?)),
            GgufArray::I32(v) => GgufValue::Int(i64::from(*v.get(index)?)),
            GgufArray::F32(v) => GgufValue::Float(f64::from(*v.get(index)?)),
            GgufArray::Bool(v) => GgufValue::Bool(*v.get(index)?),
            GgufArray::String(v) => GgufValue::String(v.get(index)?.clone()),
            GgufArray::U64(v) => GgufValue::Uint(*v.get(index)?),
            GgufArray::I64(v) => GgufValue::Int(*v.get(index)?),
            GgufArray::F64(v) => GgufValue::Float(*v.get(index)?),
            GgufArray::Array(v) => GgufValue::Array(v.get(index)?.clone()),
        })
    }

    /// The items, one [`GgufValue`] at a time.
    pub fn iter(&self) -> impl Iterator<Item = GgufValue> + '_ {
        (0..self.len()).filter_map(|i| self.get(i))
    }
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

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("source_name", &self.source_name)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
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

    fn value(&mut self, kind: u32) -> Result<GgufValue> {
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
            9 => GgufValue::Array(self.array(0)?),
            10 => GgufValue::Uint(self.u64()?),
            11 => GgufValue::Int(self.u64()? as i64),
            12 => GgufValue::Float(f64::from_bits(self.u64()?)),
            other => return Err(self.error(format!("unknown metadata value type {other}"))),
        })
    }
}

impl Reader<'_> {
    /// An array: its item type, its count (bounded by the bytes left at the item type's
    /// smallest encoding) and its items, kept in their own width.
    fn array(&mut self, depth: usize) -> Result<GgufArray> {
        if depth > 4 {
            return Err(self.error("arrays nested too deeply"));
        }
        let item = self.u32()?;
        // Smallest encoding of one item: strings and arrays carry an 8-byte length (arrays
        // also a 4-byte type).
        let min_size = match item {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 | 10..=12 => 8,
            9 => 12,
            other => return Err(self.error(format!("unknown metadata array type {other}"))),
        };
        let n = self.count("array item", min_size)?;
        macro_rules! items {
            ($variant:ident, $read:expr) => {{
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push($read);
                }
                GgufArray::$variant(items)
            }};
        }
        Ok(match item {
            0 => items!(U8, self.take(1)?[0]),
            1 => items!(I8, self.take(1)?[0] as i8),
            2 => items!(
                U16,
                u16::from_le_bytes(self.take(2)?.try_into().expect("2"))
            ),
            3 => items!(
                I16,
                i16::from_le_bytes(self.take(2)?.try_into().expect("2"))
            ),
            4 => items!(U32, self.u32()?),
            5 => items!(I32, self.u32()? as i32),
            6 => items!(F32, f32::from_bits(self.u32()?)),
            7 => items!(Bool, self.take(1)?[0] != 0),
            8 => items!(String, self.string()?),
            9 => items!(Array, self.array(depth + 1)?),
            10 => items!(U64, self.u64()?),
            11 => items!(I64, self.u64()? as i64),
            _ => items!(F64, f64::from_bits(self.u64()?)),
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
        Self::parse(map_file(path)?, &path.display().to_string())
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
            let value = r.value(kind)?;
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
                r.error(format!(
                    "tensor `{name}` has unsupported type {kind_id} (supported: {})",
                    GgufType::SUPPORTED
                ))
            })?;
            let count = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
            let (per_block, block_bytes) = kind.block();
            // Blocks never span rows: the innermost dimension is a whole number of blocks.
            let size = count
                .filter(|_| dims[0] % per_block as u64 == 0)
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

/// Transformers module paths inside a layer and their llama.cpp names.
const LAYER_NAMES: [(&str, &str); 9] = [
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
];

/// Whole-model tensors: transformers name and llama.cpp name.
const TOP_NAMES: [(&str, &str); 3] = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// Renames `name` from one naming to the other: `forward` maps transformers to GGUF.
fn rename(name: &str, forward: bool) -> Option<String> {
    let pick = |pair: &(&'static str, &'static str)| if forward { *pair } else { (pair.1, pair.0) };
    if let Some((_, to)) = TOP_NAMES.iter().map(pick).find(|(from, _)| *from == name) {
        return Some(to.to_string());
    }
    let (prefix, to_prefix) = if forward {
        ("model.layers.", "blk.")
    } else {
        ("blk.", "model.layers.")
    };
    let (layer, inner) = name.strip_prefix(prefix)?.split_once('.')?;
    let (module, suffix) = inner.rsplit_once('.')?;
    let (_, to) = LAYER_NAMES
        .iter()
        .map(pick)
        .find(|(from, _)| *from == module)?;
    Some(format!("{to_prefix}{layer}.{to}.{suffix}"))
}

/// The GGUF (llama.cpp) name of a transformers tensor name, if it has one.
fn gguf_name(hf: &str) -> Option<String> {
    rename(hf, true)
}

/// The transformers name of a GGUF tensor name, if it has one.
fn hf_name(gguf: &str) -> Option<String> {
    rename(gguf, false)
}

/// The row order that undoes llama.cpp's per-head row permutation of Q and K (made for its
/// interleaved RoPE): `hf_row[h*D + j*D/2 + i] = gguf_row[h*D + 2i + j]`; entry `r` is the
/// GGUF row that becomes row `r`.
fn unpermuted_order(rows: usize, heads: usize) -> Result<Vec<usize>> {
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(Error::InvalidConfig(format!(
            "cannot split {rows} rows into {heads} heads of even width"
        )));
    }
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut order = vec![0; rows];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                order[h * head_dim + j * half + i] = h * head_dim + 2 * i + j;
            }
        }
    }
    Ok(order)
}

/// The rows of `data` (each `row_len` items) in `order`: row `r` of the result is row
/// `order[r]` of `data`. Serves decoded values and quantised blocks alike.
pub(crate) fn reordered_rows<T: Copy>(data: &[T], row_len: usize, order: &[usize]) -> Vec<T> {
    order
        .iter()
        .flat_map(|&src| &data[src * row_len..(src + 1) * row_len])
        .copied()
        .collect()
}

/// [`unpermuted_order`] applied to the rows of a decoded tensor.
fn unpermute_rows(tensor: &HostTensor, heads: usize) -> Result<HostTensor> {
    let rows = tensor.shape()[0];
    let cols = tensor.len() / rows.max(1);
    let order = unpermuted_order(rows, heads)?;
    HostTensor::new(
        tensor.shape().to_vec(),
        reordered_rows(tensor.values(), cols, &order),
    )
}

impl GgufFile {
    fn meta(&self, key: &str) -> Option<&GgufValue> {
        let arch = self.metadata.get("general.architecture")?.as_str()?;
        self.metadata.get(&format!("{arch}.{key}"))
    }

    fn meta_usize(&self, key: &str) -> Result<usize> {
        self.meta(key)
            .and_then(GgufValue::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| Error::Gguf {
                source_name: self.source_name.clone(),
                reason: format!("metadata `<arch>.{key}` is missing or not an integer"),
            })
    }

    /// The architecture (`general.architecture`).
    pub fn architecture(&self) -> Option<&str> {
        self.metadata.get("general.architecture")?.as_str()
    }

    /// The decoder configuration from the GGUF metadata (`llama` and `qwen2` architectures).
    ///
    /// # Errors
    ///
    /// [`Error::Gguf`] for another architecture or missing keys, and the errors of
    /// [`crate::model::HfConfig::resolve`].
    pub fn decoder_config(&self) -> Result<DecoderConfig> {
        let arch = self.architecture().unwrap_or_default().to_string();
        if arch != "llama" && arch != "qwen2" {
            return Err(Error::Gguf {
                source_name: self.source_name.clone(),
                reason: format!("architecture `{arch}` is not supported (llama, qwen2)"),
            });
        }
        let hidden = self.meta_usize("embedding_length")?;
        let heads = self.meta_usize("attention.head_count")?;
        let vocab = match self.meta_usize("vocab_size") {
            Ok(v) => v,
            Err(_) => self
                .tensors
                .get("token_embd.weight")
                .and_then(|t| t.dims.get(1).copied())
                .ok_or_else(|| Error::MissingTensor {
                    name: "token_embd.weight".into(),
                })?,
        };
        let hf = HfConfig {
            model_type: Some(arch),
            hidden_size: hidden,
            intermediate_size: self.meta_usize("feed_forward_length")?,
            num_hidden_layers: self.meta_usize("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: self.meta_usize("attention.head_count_kv").ok(),
            head_dim: self.meta_usize("rope.dimension_count").ok(),
            vocab_size: vocab,
            rms_norm_eps: self
                .meta("attention.layer_norm_rms_epsilon")
                .and_then(GgufValue::as_f64)
                .unwrap_or(1e-5),
            rope_theta: self.meta("rope.freq_base").and_then(GgufValue::as_f64),
            rope_scaling: None,
            rope_parameters: None,
            max_position_embeddings: self.meta_usize("context_length").unwrap_or(2048),
            tie_word_embeddings: Some(!self.tensors.contains_key("output.weight")),
            attention_bias: None,
            mlp_bias: None,
            hidden_act: None,
            sliding_window: None,
            use_sliding_window: None,
            bos_token_id: None,
            eos_token_id: None,
        };
        hf.resolve().map_err(|e| match e {
            Error::InvalidConfig(msg) => Error::Gguf {
                source_name: self.source_name.clone(),
                reason: format!("invalid metadata: {}", name_metadata_keys(&msg)),
            },
            other => other,
        })
    }
}

/// Where each `config.json` field of [`GgufFile::decoder_config`] comes from in the metadata.
const CONFIG_KEYS: [(&str, &str); 10] = [
    ("hidden_size", "embedding_length"),
    ("intermediate_size", "feed_forward_length"),
    ("num_hidden_layers", "block_count"),
    ("num_attention_heads", "attention.head_count"),
    ("num_key_value_heads", "attention.head_count_kv"),
    ("head_dim", "rope.dimension_count"),
    ("vocab_size", "vocab_size"),
    ("max_position_embeddings", "context_length"),
    ("rms_norm_eps", "attention.layer_norm_rms_epsilon"),
    ("rope_theta", "rope.freq_base"),
];

/// A configuration error message with each `config.json` field followed by its GGUF key.
fn name_metadata_keys(msg: &str) -> String {
    CONFIG_KEYS.iter().fold(msg.to_string(), |msg, (hf, gguf)| {
        msg.replace(&format!("`{hf}`"), &format!("`{hf}` (`<arch>.{gguf}`)"))
    })
}

/// How the frozen base weights of a GGUF file are held in memory.
///
/// ```
/// use devft::model::gguf::BaseWeights;
///
/// assert_eq!("quantised".parse::<BaseWeights>()?, BaseWeights::Quantised);
/// assert_eq!(BaseWeights::default(), BaseWeights::F32);
/// # Ok::<(), devft::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BaseWeights {
    /// Every tensor decoded to `f32` at load.
    #[default]
    F32,
    /// The projection weights, the token embedding and the LM head kept in the file's own
    /// blocks ([`crate::model::QuantisedMatrix`]; those the file stores as F32 are decoded);
    /// norms and adapters are `f32`. About a sixth of the `f32` memory for a 4-bit file.
    Quantised,
}

impl BaseWeights {
    /// The names [`BaseWeights::from_str`](std::str::FromStr) accepts.
    pub const NAMES: &'static str = "f32, quantised";
}

impl std::str::FromStr for BaseWeights {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        match name {
            "f32" => Ok(BaseWeights::F32),
            "quantised" => Ok(BaseWeights::Quantised),
            other => Err(Error::InvalidArgument(format!(
                "unknown base weights `{other}` (expected one of {})",
                BaseWeights::NAMES
            ))),
        }
    }
}

/// A GGUF file seen through transformers' tensor names and layout (Q/K rows un-permuted for
/// the `llama` architecture), so that [`CausalLm::from_source`] can load it.
pub struct GgufSource<'a> {
    file: &'a GgufFile,
    config: DecoderConfig,
    unpermute: bool,
    base: BaseWeights,
}

impl<'a> GgufSource<'a> {
    /// The view of `file` for `config` (from [`GgufFile::decoder_config`]), decoding every
    /// tensor to `f32`.
    pub fn new(file: &'a GgufFile, config: DecoderConfig) -> Self {
        let unpermute = file.architecture() == Some("llama");
        Self {
            file,
            config,
            unpermute,
            base: BaseWeights::F32,
        }
    }

    /// The same view holding the base weights as `base` says.
    pub fn with_base(self, base: BaseWeights) -> Self {
        Self { base, ..self }
    }

    /// The heads whose rows llama.cpp permuted in tensor `name`, if any.
    fn permuted_heads(&self, name: &str) -> Option<usize> {
        if !self.unpermute {
            None
        } else if name.ends_with("q_proj.weight") {
            Some(self.config.num_heads)
        } else if name.ends_with("k_proj.weight") {
            Some(self.config.num_kv_heads)
        } else {
            None
        }
    }
}

impl TensorSource for GgufSource<'_> {
    fn tensor_names(&self) -> Vec<String> {
        self.file
            .tensors
            .keys()
            .map(|n| hf_name(n).unwrap_or_else(|| n.clone()))
            .collect()
    }

    fn load_tensor(&self, name: &str) -> Result<HostTensor> {
        let gguf = gguf_name(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
        })?;
        let tensor = self.file.tensor(&gguf).map_err(|_| Error::MissingTensor {
            name: format!("{name} ({gguf})"),
        })?;
        match self.permuted_heads(name) {
            Some(heads) => unpermute_rows(&tensor, heads),
            None => Ok(tensor),
        }
    }

    fn load_quantised(&self, name: &str) -> Result<Option<QuantisedMatrix>> {
        let info = gguf_name(name).and_then(|gguf| self.file.tensors.get(&gguf));
        let Some(info) = info.filter(|info| {
            self.base == BaseWeights::Quantised
                && info.kind != GgufType::F32
                && info.dims.len() == 2
        }) else {
            return Ok(None);
        };
        let blocks = self.file.bytes[info.range.clone()].to_vec();
        let matrix =
            QuantisedMatrix::new(info.kind, info.dims[1], info.dims[0], blocks).map_err(|e| {
                Error::Gguf {
                    source_name: self.file.source_name.clone(),
                    reason: format!("tensor `{name}`: {e}"),
                }
            })?;
        match self.permuted_heads(name) {
            Some(heads) => {
                let order = unpermuted_order(matrix.shape()[0], heads)?;
                Ok(Some(matrix.with_row_order(&order)?))
            }
            None => Ok(Some(matrix)),
        }
    }
}

impl CausalLm {
    /// Loads a GGUF file (`llama` or `qwen2` architecture; tensors of any [`GgufType`],
    /// dequantised to f32) onto `device`.
    ///
    /// # Errors
    ///
    /// The errors of [`GgufFile::open`], [`GgufFile::decoder_config`] and
    /// [`CausalLm::from_source`].
    pub fn from_gguf(path: impl AsRef<Path>, device: &burn::tensor::Device) -> Result<Self> {
        Self::from_gguf_with(path, BaseWeights::F32, device)
    }

    /// [`CausalLm::from_gguf`] with the base weights held as `base` says
    /// ([`BaseWeights::Quantised`] keeps them in the file's blocks).
    ///
    /// # Errors
    ///
    /// Those of [`CausalLm::from_gguf`].
    pub fn from_gguf_with(
        path: impl AsRef<Path>,
        base: BaseWeights,
        device: &burn::tensor::Device,
    ) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let config = file.decoder_config()?;
        let source = GgufSource::new(&file, config.clone()).with_base(base);
        Self::from_source(config, &source, device)
    }
}
