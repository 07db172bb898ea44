//! The common currency of devft: a named, ordered map of host tensors.
//!
//! A [`ParamMap`] is what a PyTorch state dict or a Flower `ArrayRecord` is: parameter names
//! mapped to dense `f32` tensors. Models read their parameters out into one and write them back
//! from one ([`crate::model::CausalLm::lora_params`]), adapters are exported from one, and on the
//! wire it travels as safetensors bytes ([`ParamMap::to_safetensors_bytes`]), whose length is the
//! communication cost.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use safetensors::{Dtype, View};

use crate::error::{Error, Result};

/// A dense, row-major `f32` tensor held in host memory.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    shape: Vec<usize>,
    values: Vec<f32>,
}

impl HostTensor {
    /// Creates a tensor from its shape and row-major values.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when the number of values is not the product of `shape`.
    pub fn new(shape: Vec<usize>, values: Vec<f32>) -> Result<Self> {
        let expected = shape.iter().product::<usize>();
        if expected != values.len() {
            return Err(Error::InvalidArgument(format!(
                "shape {shape:?} needs {expected} values, got {}",
                values.len()
            )));
        }
        Ok(Self { shape, values })
    }

    /// A tensor of zeros.
    pub fn zeros(shape: Vec<usize>) -> Self {
        let len = shape.iter().product();
        Self {
            shape,
            values: vec![0.0; len],
        }
    }

    /// The tensor's shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The row-major values.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Mutable access to the row-major values (the shape is fixed).
    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.values
    }

    /// Consumes the tensor, returning its values.
    pub fn into_values(self) -> Vec<f32> {
        self.values
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Whether every value is finite (no NaN, no infinity).
    pub fn is_finite(&self) -> bool {
        self.values.iter().all(|v| v.is_finite())
    }

    /// The transpose of a 2-D tensor.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when the tensor is not 2-D.
    pub fn transposed(&self) -> Result<Self> {
        let [rows, cols] = self.shape[..] else {
            return Err(Error::InvalidArgument(format!(
                "transpose needs a 2-D tensor, got shape {:?}",
                self.shape
            )));
        };
        let mut values = vec![0.0; self.values.len()];
        for r in 0..rows {
            for c in 0..cols {
                values[c * rows + r] = self.values[r * cols + c];
            }
        }
        Ok(Self {
            shape: vec![cols, rows],
            values,
        })
    }

    /// Reads a burn tensor back to the host.
    pub fn from_tensor<const D: usize>(tensor: Tensor<D>) -> Self {
        let shape = tensor.dims().to_vec();
        let values = tensor
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("a float tensor converted to f32 reads back as f32");
        Self { shape, values }
    }

    /// Uploads the tensor to `device` as a rank-`D` burn tensor.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when the tensor's rank is not `D`.
    pub fn to_tensor<const D: usize>(&self, device: &Device) -> Result<Tensor<D>> {
        if self.shape.len() != D {
            return Err(Error::InvalidArgument(format!(
                "expected a rank-{D} tensor, got shape {:?}",
                self.shape
            )));
        }
        let data = TensorData::new(self.values.clone(), self.shape.clone());
        Ok(Tensor::from_data(data, device))
    }

    /// Decodes a safetensors tensor view (f32, f16 or bf16) into `f32` values.
    pub(crate) fn from_view(
        name: &str,
        dtype: Dtype,
        shape: &[usize],
        bytes: &[u8],
    ) -> Result<Self> {
        let values: Vec<f32> = match dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(Error::UnsupportedDtype {
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        if values.len() != shape.iter().product::<usize>() {
            return Err(Error::MalformedSafetensors {
                source_name: name.to_string(),
                reason: format!("data length does not match shape {shape:?}"),
            });
        }
        Ok(Self {
            shape: shape.to_vec(),
            values,
        })
    }
}

/// Serialises as little-endian `f32` for safetensors.
impl View for &HostTensor {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    fn data_len(&self) -> usize {
        self.values.len() * 4
    }
}

/// Parameter names mapped to host tensors, in name order.
///
/// # Example
///
/// ```
/// use devft::{HostTensor, ParamMap};
///
/// let mut params = ParamMap::new();
/// params.insert("layers.0.q_proj.lora_A.weight", HostTensor::zeros(vec![4, 64]));
/// let bytes = params.to_safetensors_bytes()?;
/// let back = ParamMap::from_safetensors_bytes(&bytes, "wire")?;
/// assert_eq!(back, params);
/// # Ok::<(), devft::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParamMap {
    tensors: BTreeMap<String, HostTensor>,
}

impl ParamMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts (or replaces) a tensor.
    pub fn insert(&mut self, name: impl Into<String>, tensor: HostTensor) {
        self.tensors.insert(name.into(), tensor);
    }

    /// The tensor called `name`, if present.
    pub fn get(&self, name: &str) -> Option<&HostTensor> {
        self.tensors.get(name)
    }

    /// The tensor called `name`.
    ///
    /// # Errors
    ///
    /// [`Error::MissingTensor`] when absent.
    pub fn require(&self, name: &str) -> Result<&HostTensor> {
        self.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
        })
    }

    /// Removes and returns the tensor called `name`.
    pub fn remove(&mut self, name: &str) -> Option<HostTensor> {
        self.tensors.remove(name)
    }

    /// The names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// `(name, tensor)` pairs, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &HostTensor)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the map holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The total number of scalar values over all tensors.
    pub fn num_values(&self) -> usize {
        self.tensors.values().map(HostTensor::len).sum()
    }

    /// A new map with every name passed through `rename`.
    pub fn renamed(self, mut rename: impl FnMut(&str) -> String) -> Self {
        Self {
            tensors: self
                .tensors
                .into_iter()
                .map(|(k, v)| (rename(&k), v))
                .collect(),
        }
    }

    /// The map as safetensors bytes (`f32`, little endian): the wire format of devft.
    ///
    /// # Errors
    ///
    /// [`Error::MalformedSafetensors`] if the safetensors encoder refuses the data.
    pub fn to_safetensors_bytes(&self) -> Result<Vec<u8>> {
        safetensors::serialize(self.tensors.iter().map(|(k, v)| (k.as_str(), v)), None).map_err(
            |e| Error::MalformedSafetensors {
                source_name: "<serialisation>".to_string(),
                reason: e.to_string(),
            },
        )
    }

    /// Decodes safetensors bytes (f32, f16 or bf16 tensors) into a map.
    ///
    /// The header is validated against the buffer's real length before any tensor is decoded,
    /// so a truncated or inflated buffer is rejected without allocating what it claims.
    ///
    /// # Errors
    ///
    /// [`Error::MalformedSafetensors`] for a bad header or truncated data,
    /// [`Error::UnsupportedDtype`] for tensors that are not floating point.
    pub fn from_safetensors_bytes(bytes: &[u8], source_name: &str) -> Result<Self> {
        let header = SafetensorsHeader::parse(bytes, source_name)?;
        let mut map = ParamMap::new();
        for name in header.names() {
            let tensor = header.tensor(bytes, &name)?;
            map.insert(name, tensor);
        }
        Ok(map)
    }

    /// Reads a safetensors file into a map.
    ///
    /// # Errors
    ///
    /// As [`ParamMap::from_safetensors_bytes`], plus [`Error::Io`].
    pub fn load_safetensors(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_safetensors_bytes(&bytes, &path.display().to_string())
    }

    /// Writes the map to a safetensors file.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when the file cannot be written.
    pub fn save_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_safetensors_bytes()?;
        std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
    }
}

impl FromIterator<(String, HostTensor)> for ParamMap {
    fn from_iter<I: IntoIterator<Item = (String, HostTensor)>>(iter: I) -> Self {
        Self {
            tensors: iter.into_iter().collect(),
        }
    }
}

impl Extend<(String, HostTensor)> for ParamMap {
    fn extend<I: IntoIterator<Item = (String, HostTensor)>>(&mut self, iter: I) {
        self.tensors.extend(iter);
    }
}

impl IntoIterator for ParamMap {
    type Item = (String, HostTensor);
    type IntoIter = std::collections::btree_map::IntoIter<String, HostTensor>;

    fn into_iter(self) -> Self::IntoIter {
        self.tensors.into_iter()
    }
}

/// The validated header of a safetensors buffer; tensors are decoded on demand.
///
/// `read_metadata` checks that the declared offsets tile the data section and that the buffer
/// is exactly as long as the header says, so nothing is allocated for sizes the file merely
/// claims.
pub(crate) struct SafetensorsHeader {
    source_name: String,
    header_len: usize,
    metadata: safetensors::tensor::Metadata,
}

impl SafetensorsHeader {
    /// Parses and validates the header of `bytes`.
    pub(crate) fn parse(bytes: &[u8], source_name: &str) -> Result<Self> {
        let (header_len, metadata) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| {
                Error::MalformedSafetensors {
                    source_name: source_name.to_string(),
                    reason: e.to_string(),
                }
            })?;
        Ok(Self {
            source_name: source_name.to_string(),
            header_len,
            metadata,
        })
    }

    /// The tensor names, sorted.
    pub(crate) fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.metadata.tensors().keys().cloned().collect();
        names.sort();
        names
    }

    /// Decodes tensor `name` of `bytes` (the same buffer the header was parsed from) into `f32`.
    pub(crate) fn tensor(&self, bytes: &[u8], name: &str) -> Result<HostTensor> {
        let info = self
            .metadata
            .info(name)
            .ok_or_else(|| Error::MissingTensor {
                name: name.to_string(),
            })?;
        let (start, end) = info.data_offsets;
        let data_start = 8 + self.header_len;
        let data = bytes
            .get(data_start + start..data_start + end)
            .ok_or_else(|| Error::MalformedSafetensors {
                source_name: self.source_name.clone(),
                reason: format!("tensor `{name}` lies outside the data section"),
            })?;
        HostTensor::from_view(name, info.dtype, &info.shape, data)
    }
}

/// Parses an index written canonically inside a tensor name: ASCII digits without sign or
/// leading zero (`0`, `7`, `12`), so that `00`, `+1` or `١` never alias a real index.
pub(crate) fn parse_index(text: &str) -> Option<usize> {
    let canonical = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    if canonical { text.parse().ok() } else { None }
}

/// Anything that hands out named tensors on demand: a [`ParamMap`], a checkpoint on disk.
pub trait TensorSource {
    /// Every tensor name the source holds, sorted.
    fn tensor_names(&self) -> Vec<String>;

    /// Decodes the tensor called `name`.
    ///
    /// # Errors
    ///
    /// [`Error::MissingTensor`] when absent; source-specific decoding errors otherwise.
    fn load_tensor(&self, name: &str) -> Result<HostTensor>;

    /// The matrix called `name` in the quantised blocks it is stored in, when the source keeps
    /// it that way (a GGUF source opened with [`crate::model::gguf::BaseWeights::Quantised`]);
    /// `None` makes the loader decode it with [`TensorSource::load_tensor`]. The loader asks
    /// only for projection weights, the token embedding and the LM head. Default: `None`.
    ///
    /// # Errors
    ///
    /// Source-specific decoding errors.
    fn load_quantised(&self, name: &str) -> Result<Option<crate::model::QuantisedMatrix>> {
        let _ = name;
        Ok(None)
    }
}

impl TensorSource for ParamMap {
    fn tensor_names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn load_tensor(&self, name: &str) -> Result<HostTensor> {
        self.require(name).cloned()
    }
}
