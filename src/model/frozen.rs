//! The frozen base weights in either of their two representations: `f32` tensors, or a GGUF
//! file's quantised blocks kept as they are ([`QuantisedMatrix`]).

use burn::module::{Module, Param};
use burn::nn::Embedding;
use burn::tensor::module::linear;
use burn::tensor::{Device, Int, Tensor};

use crate::model::frozen_matmul::{FrozenBase, frozen_linear, on_rows};
use crate::model::host_kernels::runs_on_flex;
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
            FrozenWeight::Quantised(matrix) => matrix.to_weight_tensor(device),
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
            FrozenWeight::Dense(weight) => {
                let weight = weight.val();
                // A weight someone made trainable again needs burn's own op for its gradient.
                if !runs_on_flex(&x.device(), x.dtype()) || weight.is_require_grad() {
                    return linear(x, weight, bias);
                }
                let d_out = weight.dims()[1];
                let base = FrozenBase::Dense(weight);
                with_bias(on_rows(x, d_out, |x| frozen_linear(x, base)), bias)
            }
            FrozenWeight::Quantised(matrix) => with_bias(matrix.forward(x), bias),
        }
    }

    /// The weight as the fused LoRA op takes it, or `None` when that op cannot serve: a dense
    /// weight someone made trainable again.
    pub(crate) fn frozen_base(&self) -> Option<FrozenBase> {
        match self {
            FrozenWeight::Dense(weight) => {
                let weight = weight.val();
                (!weight.is_require_grad()).then_some(FrozenBase::Dense(weight))
            }
            FrozenWeight::Quantised(matrix) => Some(FrozenBase::Quantised(matrix.clone())),
        }
    }
}

/// `y + bias` with the bias broadcast over the leading dimensions.
pub(crate) fn with_bias<const D: usize>(y: Tensor<D>, bias: Option<Tensor<1>>) -> Tensor<D> {
    match bias {
        Some(bias) => y + bias.unsqueeze(),
        None => y,
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
}

#[cfg(test)]
mod tests {
    use burn::tensor::module::linear;
    use burn::tensor::{Device, Distribution, Tensor};

    use super::FrozenWeight;

    fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    /// The frozen product (flex's custom op) against burn's `linear`, with a bias and a 3-D
    /// input: same values, same input gradient, no gradient for the weight.
    #[test]
    fn a_dense_frozen_weight_computes_what_burn_linear_does() {
        let device = Device::default().autodiff();
        let weight = Tensor::<2>::random([48, 80], Distribution::Normal(0.0, 0.2), &device);
        let bias = Tensor::<1>::random([80], Distribution::Normal(0.0, 0.2), &device);
        let x = Tensor::<3>::random([2, 5, 48], Distribution::Normal(0.0, 1.0), &device);
        let upstream = Tensor::<3>::random([2, 5, 80], Distribution::Normal(0.0, 1.0), &device);
        let frozen = FrozenWeight::dense(weight.clone());

        let x1 = x.clone().require_grad();
        let y1 = frozen.linear(x1.clone(), Some(bias.clone()));
        let grads = (y1.clone() * upstream.clone()).sum().backward();
        let g1 = x1.grad(&grads).unwrap();
        let FrozenWeight::Dense(param) = &frozen else {
            unreachable!()
        };
        assert!(param.val().grad(&grads).is_none());

        let x2 = x.require_grad();
        let y2 = linear(x2.clone(), weight, Some(bias));
        let g2 = x2.grad(&(y2.clone() * upstream).sum().backward()).unwrap();

        assert!(max_diff(y1.inner(), y2.inner()) < 1e-5);
        assert!(max_diff(g1, g2) < 1e-5);
    }
}
