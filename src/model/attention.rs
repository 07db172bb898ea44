//! Causal self-attention with grouped-query heads and rotary embeddings (transformers'
//! `LlamaAttention`, which Mistral and Qwen2 share).

use burn::module::Module;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Tensor};

use crate::model::causal_attention::{AttentionLayout, causal_attention};
use crate::model::host_kernels::runs_on_flex;
use crate::model::lora::LoraLinear;
use crate::model::rope::apply_rotary;

/// Keys and values already seen by one layer, `[batch, kv_heads, seq, head_dim]` each.
#[derive(Debug, Clone)]
pub struct LayerCache {
    /// Cached keys (after rotation).
    pub keys: Tensor<4>,
    /// Cached values.
    pub values: Tensor<4>,
}

/// Position information shared by every layer of one forward pass.
#[derive(Debug, Clone)]
pub struct AttentionContext {
    /// RoPE cosines for the new positions, `[seq, head_dim]`.
    pub cos: Tensor<2>,
    /// RoPE sines for the new positions, `[seq, head_dim]`.
    pub sin: Tensor<2>,
    /// `true` where a query may not see a key, `[1, 1, seq, past + seq]`; `None` when every
    /// query sees every key (one new token, no window).
    pub mask: Option<Tensor<4, Bool>>,
    /// The sliding window `mask` was built with, if any. A forward pass without a cache on
    /// flex applies the causal mask and this window itself instead of reading `mask`.
    pub window: Option<usize>,
}

/// Multi-head causal self-attention with GQA.
#[derive(Module, Debug)]
pub struct SelfAttention {
    /// Query projection, `[hidden, heads * head_dim]`.
    pub q_proj: LoraLinear,
    /// Key projection, `[hidden, kv_heads * head_dim]`.
    pub k_proj: LoraLinear,
    /// Value projection, `[hidden, kv_heads * head_dim]`.
    pub v_proj: LoraLinear,
    /// Output projection, `[heads * head_dim, hidden]`.
    pub o_proj: LoraLinear,
    /// Number of query heads.
    pub num_heads: usize,
    /// Number of key/value heads.
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

impl SelfAttention {
    /// Attends over the new positions and, when `cache` is given, the cached ones (the cache is
    /// extended with the new keys and values).
    ///
    /// # Shapes
    ///
    /// - x: `[batch, seq, hidden]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(
        &self,
        x: Tensor<3>,
        context: &AttentionContext,
        cache: Option<&mut Option<LayerCache>>,
    ) -> Tensor<3> {
        let [batch, seq, _] = x.dims();
        let q = self.q_proj.forward(x.clone());
        let k = self.k_proj.forward(x.clone());
        let v = self.v_proj.forward(x);
        if cache.is_none() && runs_on_flex(&q.device(), q.dtype()) {
            let layout = AttentionLayout {
                heads: self.num_heads,
                kv_heads: self.num_kv_heads,
                head_dim: self.head_dim,
                window: context.window,
            };
            let out = causal_attention(q, k, v, &context.cos, &context.sin, layout);
            return self.o_proj.forward(out);
        }
        let heads =
            |t: Tensor<3>, n: usize| t.reshape([batch, seq, n, self.head_dim]).swap_dims(1, 2);
        let q = heads(q, self.num_heads);
        let k = heads(k, self.num_kv_heads);
        let v = heads(v, self.num_kv_heads);
        let q = apply_rotary(q, &context.cos, &context.sin);
        let mut k = apply_rotary(k, &context.cos, &context.sin);
        let mut v = v;
        if let Some(cache) = cache {
            if let Some(past) = cache.take() {
                k = Tensor::cat(vec![past.keys, k], 2);
                v = Tensor::cat(vec![past.values, v], 2);
            }
            *cache = Some(LayerCache {
                keys: k.clone(),
                values: v.clone(),
            });
        }
        let k = self.repeat_kv(k);
        let v = self.repeat_kv(v);
        let total = k.dims()[2];
        let mask = context
            .mask
            .clone()
            .map(|m| m.expand([batch, self.num_heads, seq, total]));
        let out = attention(q, k, v, mask, None, AttentionModuleOptions::default());
        let out = out
            .swap_dims(1, 2)
            .reshape([batch, seq, self.num_heads * self.head_dim]);
        self.o_proj.forward(out)
    }

    /// Repeats each key/value head `heads / kv_heads` times (transformers' `repeat_kv`).
    fn repeat_kv(&self, x: Tensor<4>) -> Tensor<4> {
        let n_rep = self.num_heads / self.num_kv_heads;
        if n_rep == 1 {
            return x;
        }
        let [batch, kv_heads, seq, head_dim] = x.dims();
        x.unsqueeze_dim::<5>(2)
            .expand([batch, kv_heads, n_rep, seq, head_dim])
            .reshape([batch, kv_heads * n_rep, seq, head_dim])
    }
}
