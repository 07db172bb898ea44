//! Next-token cross-entropy, as transformers' `ForCausalLMLoss` computes it.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor};

use crate::data::Batch;
use crate::error::{Error, Result};
use crate::model::CausalLm;

/// Mean next-token cross-entropy of `logits` against `input_ids` shifted by one.
///
/// Position `t` predicts token `t + 1`; with `weights` (`[batch, seq]`, 1 where token `t` is a
/// target to learn, 0 elsewhere, e.g. prompt tokens) the mean runs over the weighted targets
/// only, as transformers does with label `-100`.
///
/// # Shapes
///
/// - logits: `[batch, seq, vocab]`
/// - input_ids: `[batch, seq]`
/// - weights: `[batch, seq]`
/// - output: `[1]`
///
/// # Panics
///
/// If `seq < 2` (there is no next token to predict).
pub fn next_token_loss(
    logits: Tensor<3>,
    input_ids: Tensor<2, Int>,
    weights: Option<Tensor<2>>,
) -> Tensor<1> {
    let [batch, seq, _] = logits.dims();
    assert!(seq >= 2, "next-token loss needs at least two positions");
    let predictions = logits.narrow(1, 0, seq - 1);
    let targets = input_ids.narrow(1, 1, seq - 1);
    let log_probs = log_softmax(predictions, 2);
    let picked = log_probs
        .gather(2, targets.reshape([batch, seq - 1, 1]))
        .reshape([batch, seq - 1]);
    match weights {
        None => picked.mean().neg(),
        Some(weights) => {
            let weights = weights.narrow(1, 1, seq - 1);
            let total = weights.clone().sum();
            (picked * weights).sum().neg() / total
        }
    }
}

/// Mean next-token cross-entropy of `model` over the target tokens of `batch`: the value of
/// [`next_token_loss`] with the batch's weights, but the head and the softmax run only on the
/// positions that predict a target. Prompt and padding positions skip the vocabulary-wide
/// work, which for a small model with a large vocabulary (SmolLM2: 49,152 entries, 576 wide)
/// costs as much as several decoder layers per position.
///
/// # Errors
///
/// [`Error::InvalidArgument`] when the batch has no target token.
pub fn target_token_loss(model: &CausalLm, batch: &Batch) -> Result<Tensor<1>> {
    if batch.num_targets == 0 {
        return Err(Error::InvalidArgument(
            "the batch has no target token".into(),
        ));
    }
    let hidden = model.hidden_states(batch.ids.clone());
    let [b, s, h] = hidden.dims();
    let rows = hidden
        .reshape([b * s, h])
        .select(0, batch.predicting_rows.clone());
    let log_probs = log_softmax(model.logits_from_hidden(rows), 1);
    let picked = log_probs.gather(
        1,
        batch.predicted_ids.clone().reshape([batch.num_targets, 1]),
    );
    Ok(picked.mean().neg())
}
