//! Padded batches of tokenised examples.

use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::data::TokenizedExample;

/// A right-padded batch: `ids` and `weights` (1.0 on target tokens, 0.0 on prompt and padding)
/// of shape `[batch, max_len]`, and the positions that predict a target with the tokens they
/// predict (for [`crate::model::target_token_loss`]). With causal attention, real tokens never
/// see the padding after them, so no attention mask is needed.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Token ids, `[batch, seq]`.
    pub ids: Tensor<2, Int>,
    /// Loss weights, `[batch, seq]`.
    pub weights: Tensor<2>,
    /// Number of target tokens in the batch.
    pub num_targets: usize,
    /// Flat indices `b * seq + t` of the positions whose next token is a target,
    /// `[num_targets]`.
    pub predicting_rows: Tensor<1, Int>,
    /// The target token each of `predicting_rows` predicts, `[num_targets]`.
    pub predicted_ids: Tensor<1, Int>,
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
        let mut predicting_rows = Vec::new();
        let mut predicted_ids = Vec::new();
        for (b, example) in examples.iter().enumerate() {
            for t in 0..seq {
                let id = i64::from(example.ids.get(t).copied().unwrap_or(pad_id));
                ids.push(id);
                let target = example.targets.get(t).copied().unwrap_or(false);
                // Position 0 is never predicted; position t - 1 predicts token t.
                if target && t > 0 {
                    predicting_rows.push((b * seq + t - 1) as i64);
                    predicted_ids.push(id);
                }
                weights.push(if target { 1.0f32 } else { 0.0 });
            }
        }
        let num_targets = predicted_ids.len();
        Self {
            ids: Tensor::from_data(TensorData::new(ids, [examples.len(), seq]), device),
            weights: Tensor::from_data(TensorData::new(weights, [examples.len(), seq]), device),
            num_targets,
            predicting_rows: Tensor::from_data(
                TensorData::new(predicting_rows, [num_targets]),
                device,
            ),
            predicted_ids: Tensor::from_data(TensorData::new(predicted_ids, [num_targets]), device),
        }
    }
}
