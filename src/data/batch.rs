//! Padded batches of tokenised examples.

use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::data::TokenizedExample;

/// A right-padded batch: `ids` and `weights` (1.0 on target tokens, 0.0 on prompt and padding)
/// of shape `[batch, max_len]`. With causal attention, real tokens never see the padding
/// after them, so no attention mask is needed.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Token ids, `[batch, seq]`.
    pub ids: Tensor<2, Int>,
    /// Loss weights, `[batch, seq]`.
    pub weights: Tensor<2>,
    /// Number of target tokens in the batch.
    pub num_targets: usize,
}

impl Batch {
    /// Pads `examples` with `pad_id` to the longest and uploads them to `device`.
    ///
    /// # Panics
    ///
    /// If `examples` is empty.
    pub fn new(examples: &[&TokenizedExample], pad_id: u32, device: &Device) -> Self {
        assert!(!examples.is_empty(), "a batch needs at least one example");
        let seq = examples
            .iter()
            .map(|e| e.ids.len())
            .max()
            .expect("non-empty");
        let mut ids = Vec::with_capacity(examples.len() * seq);
        let mut weights = Vec::with_capacity(examples.len() * seq);
        let mut num_targets = 0;
        for example in examples {
            for t in 0..seq {
                ids.push(i64::from(example.ids.get(t).copied().unwrap_or(pad_id)));
                let target = example.targets.get(t).copied().unwrap_or(false);
                // Position 0 is never predicted.
                num_targets += usize::from(target && t > 0);
                weights.push(if target { 1.0f32 } else { 0.0 });
            }
        }
        Self {
            ids: Tensor::from_data(TensorData::new(ids, [examples.len(), seq]), device),
            weights: Tensor::from_data(TensorData::new(weights, [examples.len(), seq]), device),
            num_targets,
        }
    }
}
