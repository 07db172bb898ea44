//! Rotary position embeddings as transformers' Llama computes them (`rotate_half` layout).
//!
//! `inv_freq[i] = 1 / theta^(2i / head_dim)` (optionally rescaled, see [`RopeScaling`]),
//! `cos/sin[p] = cos/sin(p * inv_freq)` repeated twice, and
//! `x' = x * cos + rotate_half(x) * sin` with `rotate_half([x1, x2]) = [-x2, x1]`.
//! Arithmetic is in `f32`, in the same order as transformers, so that tables match bit for bit
//! where the math library agrees.

use burn::tensor::{Device, Tensor, TensorData};

use crate::model::config::RopeScaling;

/// Inverse frequencies of a rotary embedding; tables are computed per call for the positions
/// needed, so memory does not grow with the model's maximum context.
#[derive(Debug, Clone, PartialEq)]
pub struct RotaryEmbedding {
    inv_freq: Vec<f32>,
}

impl RotaryEmbedding {
    /// Builds the inverse frequencies for `head_dim` (even) and base `theta`.
    pub fn new(head_dim: usize, theta: f64, scaling: RopeScaling) -> Self {
        let theta = theta as f32;
        let mut inv_freq: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / theta.powf(i as f32 / head_dim as f32))
            .collect();
        match scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => {
                for f in &mut inv_freq {
                    *f /= factor as f32;
                }
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old_len = original_max_position_embeddings as f64;
                let low_freq_wavelen = old_len / low_freq_factor;
                let high_freq_wavelen = old_len / high_freq_factor;
                for f in &mut inv_freq {
                    let freq = f64::from(*f);
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    *f = if wavelen < high_freq_wavelen {
                        *f
                    } else if wavelen > low_freq_wavelen {
                        (freq / factor) as f32
                    } else {
                        let smooth = (old_len / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        ((1.0 - smooth) * freq / factor + smooth * freq) as f32
                    };
                }
            }
        }
        Self { inv_freq }
    }

    /// `cos` and `sin` tables for positions `start..start + len`, each `[len, head_dim]`.
    pub fn tables(&self, start: usize, len: usize, device: &Device) -> (Tensor<2>, Tensor<2>) {
        let half = self.inv_freq.len();
        let head_dim = 2 * half;
        let mut cos = Vec::with_capacity(len * head_dim);
        let mut sin = Vec::with_capacity(len * head_dim);
        for p in start..start + len {
            let angles: Vec<f32> = self.inv_freq.iter().map(|f| p as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
        (
            Tensor::from_data(TensorData::new(cos, [len, head_dim]), device),
            Tensor::from_data(TensorData::new(sin, [len, head_dim]), device),
        )
    }
}

/// Applies the rotation to `x` of shape `[batch, heads, seq, head_dim]` with tables
/// `[seq, head_dim]`.
pub fn apply_rotary(x: Tensor<4>, cos: &Tensor<2>, sin: &Tensor<2>) -> Tensor<4> {
    let [_, _, seq, head_dim] = x.dims();
    let half = head_dim / 2;
    let cos = cos.clone().reshape([1, 1, seq, head_dim]);
    let sin = sin.clone().reshape([1, 1, seq, head_dim]);
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos + rotated * sin
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_zero_is_identity_rotation() {
        let rope = RotaryEmbedding::new(8, 10_000.0, RopeScaling::None);
        let device = Device::default();
        let (cos, sin) = rope.tables(0, 1, &device);
        let cos = cos.into_data().try_to_vec::<f32>().unwrap();
        let sin = sin.into_data().try_to_vec::<f32>().unwrap();
        assert!(cos.iter().all(|c| *c == 1.0));
        assert!(sin.iter().all(|s| *s == 0.0));
    }

    #[test]
    fn inverse_frequencies_follow_the_formula() {
        let rope = RotaryEmbedding::new(4, 100.0, RopeScaling::None);
        assert_eq!(rope.inv_freq, vec![1.0, 0.1]);
        let scaled = RotaryEmbedding::new(4, 100.0, RopeScaling::Linear { factor: 2.0 });
        assert_eq!(scaled.inv_freq, vec![0.5, 0.05]);
    }
}
