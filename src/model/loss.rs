//! Next-token cross-entropy, as transformers' `ForCausalLMLoss` computes it.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor};

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
