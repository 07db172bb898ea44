//! Scoring a token sequence: every position's logits and the mean next-token loss.

use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::error::Result;
use crate::model::causal_lm::CausalLm;
use crate::model::loss::next_token_loss;
use crate::params::HostTensor;

/// `[1, len]` token tensor on `device`.
pub fn token_tensor(ids: &[u32], device: &Device) -> Tensor<2, Int> {
    let values: Vec<i64> = ids.iter().map(|&id| i64::from(id)).collect();
    Tensor::from_data(TensorData::new(values, [1, ids.len()]), device)
}

/// What [`CausalLm::score`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceScores {
    /// Logits `[seq, vocab]`.
    pub logits: HostTensor,
    /// Mean cross-entropy of predicting token `t + 1` from positions `0..=t` (transformers'
    /// `model(ids, labels=ids).loss`); `None` for a single token.
    pub loss: Option<f32>,
}

impl SequenceScores {
    /// The logits of each position, one row of `vocab` values each.
    pub fn rows(&self) -> Vec<&[f32]> {
        self.logits
            .values()
            .chunks(self.logits.shape()[1])
            .collect()
    }
}

impl CausalLm {
    /// Logits and mean next-token loss of one sequence.
    ///
    /// # Errors
    ///
    /// [`crate::Error::InvalidArgument`] for an empty sequence or an id outside the
    /// vocabulary.
    pub fn score(&self, ids: &[u32]) -> Result<SequenceScores> {
        self.check_ids(ids)?;
        let tokens = token_tensor(ids, &self.device());
        let logits = self.forward(tokens.clone());
        let loss = (ids.len() > 1).then(|| {
            HostTensor::from_tensor(next_token_loss(logits.clone(), tokens, None)).values()[0]
        });
        let [_, seq, vocab] = logits.dims();
        let logits = HostTensor::from_tensor(logits.reshape([seq, vocab]));
        Ok(SequenceScores { logits, loss })
    }
}
