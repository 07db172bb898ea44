//! Greedy decoding with a KV cache.

use crate::error::{Error, Result};
use crate::model::causal_lm::{CausalLm, KvCache};
use crate::model::score::token_tensor;

impl CausalLm {
    /// Greedily extends `prompt` by up to `max_new_tokens` tokens, stopping after the first token
    /// in `stop_tokens` (which is included in the output). Returns the new tokens only.
    ///
    /// The prompt is processed in one pass; each further token reuses the cached keys and
    /// values, so a step costs one position, not the whole sequence.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for an empty prompt, a token id outside the vocabulary, or a
    /// total length beyond `max_position_embeddings`.
    pub fn generate_greedy(
        &self,
        prompt: &[u32],
        max_new_tokens: usize,
        stop_tokens: &[u32],
    ) -> Result<Vec<u32>> {
        self.check_ids(prompt)?;
        let limit = self.config().max_position_embeddings;
        if prompt.len() + max_new_tokens > limit {
            return Err(Error::InvalidArgument(format!(
                "prompt ({}) plus {max_new_tokens} new tokens exceeds the model's {limit} positions",
                prompt.len()
            )));
        }
        let device = self.device();
        let mut cache = KvCache::new(self.num_layers());
        let mut generated = Vec::new();
        let mut input = prompt.to_vec();
        for _ in 0..max_new_tokens {
            let logits = self.forward_cached(token_tensor(&input, &device), &mut cache);
            let [_, seq, vocab] = logits.dims();
            let last = logits.narrow(1, seq - 1, 1).reshape([vocab]);
            let next = last
                .argmax(0)
                .into_data()
                .convert::<i64>()
                .try_to_vec::<i64>()
                .expect("argmax reads back as integers")[0] as u32;
            generated.push(next);
            if stop_tokens.contains(&next) {
                break;
            }
            input = vec![next];
        }
        Ok(generated)
    }

    /// Checks that every id is inside the vocabulary and that there is at least one.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] otherwise.
    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Err(Error::InvalidArgument("no token ids given".into()));
        }
        let vocab = self.config().vocab_size;
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
        Ok(())
    }
}
