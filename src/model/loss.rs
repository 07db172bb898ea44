//! Next-token cross-entropy, as transformers' `ForCausalLMLoss` computes it.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor};

use crate::data::Batch;
use crate::error::{Error, Result};
use crate::model::CausalLm;
use crate::model::cross_entropy::cross_entropy_rows;

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
    let [batch, seq, vocab] = logits.dims();
    assert!(seq >= 2, "next-token loss needs at least two positions");
    let device = logits.device();
    // Every position's row is scored against the next token (the last against a placeholder
    // with weight 0), so the logits are used in place rather than sliced and copied, as
    // transformers pads its shifted labels with -100.
    let last = |t: Tensor<2, Int>| Tensor::cat(vec![t, Tensor::zeros([batch, 1], &device)], 1);
    let targets = last(input_ids.narrow(1, 1, seq - 1)).reshape([batch * seq]);
    let losses = row_losses(logits.reshape([batch * seq, vocab]), targets).reshape([batch, seq]);
    let weights = match weights {
        None => Tensor::ones([batch, seq - 1], &device),
        Some(weights) => weights.narrow(1, 1, seq - 1),
    };
    let weights = Tensor::cat(vec![weights, Tensor::zeros([batch, 1], &device)], 1);
    let total = weights.clone().sum();
    (losses * weights).sum() / total
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
    let losses = row_losses(model.logits_from_hidden(rows), batch.predicted_ids.clone());
    Ok(losses.mean())
}

/// Cross-entropy of each row of `logits` (`[n, vocab]`) against its target (`[n]`): fused
/// on the flex backend ([`cross_entropy_rows`]), else `-log_softmax` gathered at the target.
fn row_losses(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    if let Some(losses) = cross_entropy_rows(&logits, &targets) {
        return losses;
    }
    let n = targets.dims()[0];
    log_softmax(logits, 1)
        .gather(1, targets.reshape([n, 1]))
        .reshape([n])
        .neg()
}
