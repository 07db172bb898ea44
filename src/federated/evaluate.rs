//! Held-out loss.

use crate::data::{Batch, TokenizedExample};
use crate::error::{Error, Result};
use crate::model::{CausalLm, target_token_loss};

/// Mean next-token loss over every target token of `examples` (batches weighted by their
/// number of targets), computed on `model`'s own device.
///
/// # Errors
///
/// [`Error::InvalidArgument`] when there is no example or `batch_size` is 0.
pub fn evaluate_loss(
    model: &CausalLm,
    examples: &[TokenizedExample],
    batch_size: usize,
    pad_id: u32,
) -> Result<f64> {
    if examples.is_empty() || batch_size == 0 {
        return Err(Error::InvalidArgument(
            "evaluation needs examples and a batch size".into(),
        ));
    }
    let device = model.device();
    let mut total = 0.0;
    let mut targets = 0usize;
    for chunk in examples.chunks(batch_size) {
        let refs: Vec<&TokenizedExample> = chunk.iter().collect();
        let batch = Batch::new(&refs, pad_id, &device);
        if batch.num_targets == 0 {
            continue;
        }
        let loss = target_token_loss(model, &batch)?
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("f32")[0];
        total += f64::from(loss) * batch.num_targets as f64;
        targets += batch.num_targets;
    }
    if targets == 0 {
        return Err(Error::InvalidArgument(
            "the evaluation set has no target token".into(),
        ));
    }
    Ok(total / targets as f64)
}
