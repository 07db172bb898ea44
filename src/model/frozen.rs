//! The frozen base weights in either of their two representations: `f32` tensors, or a GGUF
//! file's quantised blocks kept as they are ([`QuantisedMatrix`]).

use burn::module::{Module, Param};
use burn::nn::Embedding;
use burn::tensor::module::linear;
use burn::tensor::{Device, Int, Tensor};

use crate::model::quantised::QuantisedMatrix;
use crate::params::HostTensor;

/// A frozen projection weight, `W` in `y = x W` (no gradient is ever made for it).
#[derive(Module, Debug)]
pub enum FrozenWeight {
    /// `f32`, in burn's `[d_in, d_out]` layout.
    Dense(Param<Tensor<2>>),
    /// Quantised blocks in the file's `[d_out, d_in]` layout, decoded a few rows at a time
    /// inside each product.
    Quantised(QuantisedMatrix),
}

impl FrozenWeight {
    /// A frozen `f32` weight `[d_in, d_out]`.
    pub fn dense(weight: Tensor<2>) -> Self {
        FrozenWeight::Dense(Param::from_tensor(weight).set_require_grad(false))
    }

    /// `[d_in, d_out]`.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            FrozenWeight::Dense(weight) => weight.shape().dims(),
            FrozenWeight::Quantised(matrix) => {
                let [rows, cols] = matrix.shape();
                [cols, rows]
            }
        }
    }

    /// Whether the weight is kept quantised.
    pub fn is_quantised(&self) -> bool {
        matches!(self, FrozenWeight::Quantised(_))
    }

    /// The bytes the weight takes in memory.
    pub fn storage_bytes(&self) -> usize {
        match self {
            FrozenWeight::Dense(weight) => weight.shape().num_elements() * size_of::<f32>(),
            FrozenWeight::Quantised(matrix) => matrix.storage_bytes(),
        }
    }

    /// The weight as an `f32` tensor `[d_in, d_out]` (a quantised one decoded whole onto
    /// `device`; a dense one stays where it is).
    pub fn to_tensor(&self, device: &Device) -> Tensor<2> {
        match self {
            FrozenWeight::Dense(weight) => weight.val(),
            FrozenWeight::Quantised(matrix) => matrix
                .to_host()
                .transposed()
                .and_then(|w| w.to_tensor(device))
                .expect("a 2-D matrix"),
        }
    }

    /// The weight in transformers' `[d_out, d_in]` layout, on the host.
    pub fn to_host(&self) -> HostTensor {
        match self {
            FrozenWeight::Dense(weight) => HostTensor::from_tensor(weight.val())
                .transposed()
                .expect("a 2-D weight"),
            FrozenWeight::Quantised(matrix) => matrix.to_host(),
        }
    }

    /// `x W + bias`.
    ///
    /// # Shapes
    ///
    /// - x: `[..., d_in]`
    /// - output: `[..., d_out]`
    pub fn linear<const D: usize>(&self, x: Tensor<D>, bias: Option<Tensor<1>>) -> Tensor<D> {
        match self {
            FrozenWeight::Dense(weight) => linear(x, weight.val(), bias),
            FrozenWeight::Quantised(matrix) => {
                let y = matrix.forward(x);
                match bias {
                    Some(bias) => y + bias.unsqueeze(),
                    None => y,
                }
            }
        }
    }
}

/// The frozen token embedding table `[vocab, hidden]`.
#[derive(Module, Debug)]
pub enum TokenEmbedding {
    /// `f32`.
    Dense(Embedding),
    /// Quantised blocks; a lookup decodes only the rows it needs.
    Quantised(QuantisedMatrix),
}

impl TokenEmbedding {
    /// The embeddings of `ids`.
    ///
    /// # Shapes
    ///
    /// - ids: `[batch, seq]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        match self {
            TokenEmbedding::Dense(embedding) => embedding.forward(ids),
            TokenEmbedding::Quantised(matrix) => matrix.embed(ids),
        }
    }

    /// The table `[vocab, hidden]` on the host.
    pub fn to_host(&self) -> HostTensor {
        match self {
            TokenEmbedding::Dense(embedding) => HostTensor::from_tensor(embedding.weight.val()),
            TokenEmbedding::Quantised(matrix) => matrix.to_host(),
        }
    }

    /// The bytes the table takes in memory.
    pub fn storage_bytes(&self) -> usize {
        match self {
            TokenEmbedding::Dense(embedding) => {
                embedding.weight.shape().num_elements() * size_of::<f32>()
            }
            TokenEmbedding::Quantised(matrix) => matrix.storage_bytes(),
        }
    }
}
