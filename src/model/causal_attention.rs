//! Causal grouped-query self-attention with rotary embeddings as one op on burn's flex
//! backend, for a forward pass without a key/value cache (training, scoring).
//!
//! Per batch row and head, the op rotates the head's queries and its group's keys, forms the
//! scores with `gemm`, takes the masked softmax in place and multiplies by the values; the
//! keys and values of a group are read where the projections wrote them, never repeated for
//! each query head. The backward keeps only the inputs and each row's log-sum-exp and
//! recomputes the probabilities (as flash attention does), so no `[heads, seq, seq]` tensor
//! outlives the forward. burn's own path (`repeat_kv`, two rotations, `attention`) makes a
//! dozen tensors of that size or of the keys' and does as many passes, forward and backward
//! (`docs/performance.md`). Other backends, and forward passes with a cache, use that path.

use burn::tensor::Tensor;

/// The shape of one fused attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AttentionLayout {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; divides `heads`.
    pub kv_heads: usize,
    /// Width of one head (even).
    pub head_dim: usize,
    /// Keys at most this far behind a query are seen (Mistral's sliding window).
    pub window: Option<usize>,
}

/// `softmax(rope(q) rope(k)ᵀ / √head_dim + causal mask) v`, heads side by side, for `q`
/// `[batch, seq, heads * head_dim]`, `k` and `v` `[batch, seq, kv_heads * head_dim]` and RoPE
/// tables `cos`, `sin` `[seq, head_dim]`; the result is `[batch, seq, heads * head_dim]`.
/// Query head `h` attends with key/value head `h / (heads / kv_heads)`, as transformers'
/// `repeat_kv` arranges them. Only for flex tensors
/// ([`crate::model::host_kernels::runs_on_flex`]).
pub(crate) fn causal_attention(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    cos: &Tensor<2>,
    sin: &Tensor<2>,
    layout: AttentionLayout,
) -> Tensor<3> {
    #[cfg(feature = "flex")]
    {
        flex::causal_attention(q, k, v, cos, sin, layout)
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = (q, k, v, cos, sin, layout);
        unreachable!("only a flex tensor takes this path")
    }
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
    use burn::tensor::Tensor;
    use rayon::prelude::*;

    use super::AttentionLayout;
    use crate::model::host_kernels::{
        Strided, exp, matmul, matmul_into, scaled_matmul, sum_exp, tensor, values,
    };

    #[backend_extension(Flex, Autodiff)]
    pub trait CausalAttentionOps: Backend {
        /// See [`super::causal_attention`]; `cos` and `sin` get no gradient.
        fn causal_attention(
            q: FloatTensor<Self>,
            k: FloatTensor<Self>,
            v: FloatTensor<Self>,
            cos: FloatTensor<Self>,
            sin: FloatTensor<Self>,
            layout: AttentionLayout,
        ) -> FloatTensor<Self>;
    }

    pub(super) fn causal_attention(
        q: Tensor<3>,
        k: Tensor<3>,
        v: Tensor<3>,
        cos: &Tensor<2>,
        sin: &Tensor<2>,
        layout: AttentionLayout,
    ) -> Tensor<3> {
        Tensor::from_dispatch(<Dispatch as CausalAttentionOps>::causal_attention(
            q.into_dispatch(),
            k.into_dispatch(),
            v.into_dispatch(),
            cos.clone().into_dispatch(),
            sin.clone().into_dispatch(),
            layout,
        ))
    }

    /// The host view of one call: its buffers (row-major, contiguous) and sizes.
    struct Inputs<'a> {
        q: &'a [f32],
        k: &'a [f32],
        v: &'a [f32],
        cos: &'a [f32],
        sin: &'a [f32],
        batch: usize,
        seq: usize,
        layout: AttentionLayout,
    }

    impl Inputs<'_> {
        /// Query heads per key/value head.
        fn group(&self) -> usize {
            self.layout.heads / self.layout.kv_heads
        }

        /// Row stride of the queries (and of the result).
        fn q_width(&self) -> usize {
            self.layout.heads * self.layout.head_dim
        }

        /// Row stride of the keys and values.
        fn kv_width(&self) -> usize {
            self.layout.kv_heads * self.layout.head_dim
        }

        /// Where head `head` of batch row `b` starts in a buffer of rows `width` wide.
        fn head_at(&self, b: usize, head: usize, width: usize) -> Strided {
            Strided::row_major(b * self.seq * width + head * self.layout.head_dim, width)
        }

        /// The first key query `i` sees (it sees every key up to itself).
        fn first_key(&self, i: usize) -> usize {
            self.layout.window.map_or(0, |w| (i + 1).saturating_sub(w))
        }

        /// The RoPE tables' rows for position `i`.
        fn tables(&self, i: usize) -> (&[f32], &[f32]) {
            let d = self.layout.head_dim;
            (&self.cos[i * d..][..d], &self.sin[i * d..][..d])
        }

        /// Where row `i` of one head (laid out as `at` says) lies in its buffer.
        fn head_row(&self, at: Strided, i: usize) -> std::ops::Range<usize> {
            let start = at.offset + i * at.row_stride;
            start..start + self.layout.head_dim
        }

        /// `[seq, head_dim]`: the rows of one head of `x` (laid out as `at` says), rotated.
        fn rotated(&self, x: &[f32], at: Strided) -> Vec<f32> {
            let mut out = vec![0.0f32; self.seq * self.layout.head_dim];
            for (i, row) in out.chunks_exact_mut(self.layout.head_dim).enumerate() {
                let (cos, sin) = self.tables(i);
                rotate(&x[self.head_row(at, i)], cos, sin, row);
            }
            out
        }

        /// Copies the `[seq, head_dim]` `rows` into one head of `dst` (laid out as `at` says).
        fn place(&self, rows: &[f32], dst: &mut [f32], at: Strided) {
            for (i, row) in rows.chunks_exact(self.layout.head_dim).enumerate() {
                dst[self.head_row(at, i)].copy_from_slice(row);
            }
        }

        /// `[seq, seq]`: `scale qr krᵀ` turned, row by row, into the probabilities of the
        /// keys each query sees (zero elsewhere), and each row's log-sum-exp.
        fn probabilities(
            &self,
            qr: &[f32],
            kr: &[f32],
            lse: Option<&[f32]>,
        ) -> (Vec<f32>, Vec<f32>) {
            let (s, d) = (self.seq, self.layout.head_dim);
            let mut p = scaled_matmul(
                [s, s, d],
                self.scale(),
                qr,
                Strided::row_major(0, d),
                kr,
                Strided::column_major(0, d),
            );
            let mut row_lse = vec![0.0f32; s];
            for (i, row) in p.chunks_exact_mut(s).enumerate() {
                let seen = self.first_key(i)..i + 1;
                let known = lse.map(|lse| lse[i]);
                row_lse[i] = softmax_in_place(&mut row[seen.clone()], known);
                row[..seen.start].fill(0.0);
                row[seen.end..].fill(0.0);
            }
            (p, row_lse)
        }

        fn scale(&self) -> f32 {
            (1.0 / (self.layout.head_dim as f64).sqrt()) as f32
        }
    }

    /// `x cos + rotate_half(x) sin` for one row (`rotate_half([x1, x2]) = [-x2, x1]`).
    fn rotate(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
        let half = x.len() / 2;
        for j in 0..half {
            out[j] = x[j] * cos[j] + -x[j + half] * sin[j];
            out[j + half] = x[j + half] * cos[j + half] + x[j] * sin[j + half];
        }
    }

    /// The transpose of [`rotate`]: the gradient of its input given its output's `dy`.
    fn rotate_back(dy: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
        let half = dy.len() / 2;
        for j in 0..half {
            out[j] = dy[j] * cos[j] + dy[j + half] * sin[j + half];
            out[j + half] = dy[j + half] * cos[j + half] - dy[j] * sin[j];
        }
    }

    /// Softmax of `row` in place; returns its log-sum-exp. With `lse` known (the backward),
    /// `exp(x - lse)` reproduces the forward's probabilities without another reduction.
    fn softmax_in_place(row: &mut [f32], lse: Option<f32>) -> f32 {
        let shift = lse.unwrap_or_else(|| row.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        let lse = lse.unwrap_or_else(|| shift + sum_exp(row, shift).ln());
        for x in row.iter_mut() {
            *x = exp(*x - lse);
        }
        lse
    }

    /// The result `[batch, seq, heads * head_dim]` and each query row's log-sum-exp
    /// `[batch, heads, seq]`.
    fn forward(inputs: &Inputs) -> (Vec<f32>, Vec<f32>) {
        let AttentionLayout {
            heads,
            kv_heads,
            head_dim: d,
            ..
        } = inputs.layout;
        let (s, qw, kw) = (inputs.seq, inputs.q_width(), inputs.kv_width());
        let keys: Vec<Vec<f32>> = (0..inputs.batch * kv_heads)
            .into_par_iter()
            .map(|t| inputs.rotated(inputs.k, inputs.head_at(t / kv_heads, t % kv_heads, kw)))
            .collect();
        let per_head: Vec<(Vec<f32>, Vec<f32>)> = (0..inputs.batch * heads)
            .into_par_iter()
            .map(|t| {
                let (b, head) = (t / heads, t % heads);
                let group = head / inputs.group();
                let qr = inputs.rotated(inputs.q, inputs.head_at(b, head, qw));
                let (p, lse) = inputs.probabilities(&qr, &keys[b * kv_heads + group], None);
                let o = matmul(
                    [s, d, s],
                    &p,
                    Strided::row_major(0, s),
                    inputs.v,
                    inputs.head_at(b, group, kw),
                );
                (o, lse)
            })
            .collect();
        let mut out = vec![0.0f32; inputs.batch * s * qw];
        let mut lse = Vec::with_capacity(inputs.batch * heads * s);
        for (t, (o, head_lse)) in per_head.into_iter().enumerate() {
            inputs.place(&o, &mut out, inputs.head_at(t / heads, t % heads, qw));
            lse.extend(head_lse);
        }
        (out, lse)
    }

    /// One backward task's gradients, `[seq, head_dim]` each, before they are rotated back
    /// into place.
    struct GroupGradients {
        /// Of the rotated queries, one per query head of the group.
        dqr: Vec<Vec<f32>>,
        /// Of the group's rotated keys.
        dkr: Vec<f32>,
        /// Of the group's values.
        dv: Vec<f32>,
    }

    /// Gradients of `q`, `k` and `v` (their layouts) given the result's `dy`, one task per
    /// batch row and key/value head, each summing over the query heads of its group.
    fn backward(inputs: &Inputs, lse: &[f32], dy: &[f32]) -> [Vec<f32>; 3] {
        let AttentionLayout {
            heads,
            kv_heads,
            head_dim: d,
            ..
        } = inputs.layout;
        let (s, qw, kw) = (inputs.seq, inputs.q_width(), inputs.kv_width());
        let scale = inputs.scale();
        let per_group: Vec<GroupGradients> = (0..inputs.batch * kv_heads)
            .into_par_iter()
            .map(|t| {
                let (b, group) = (t / kv_heads, t % kv_heads);
                let kv_at = inputs.head_at(b, group, kw);
                let kr = inputs.rotated(inputs.k, kv_at);
                let mut dkr = vec![0.0f32; s * d];
                let mut dv = vec![0.0f32; s * d];
                let mut dqr = Vec::with_capacity(inputs.group());
                for r in 0..inputs.group() {
                    let head = group * inputs.group() + r;
                    let q_at = inputs.head_at(b, head, qw);
                    let qr = inputs.rotated(inputs.q, q_at);
                    let head_lse = &lse[(b * heads + head) * s..][..s];
                    let (p, _) = inputs.probabilities(&qr, &kr, Some(head_lse));
                    // dv += pᵀ dy_head
                    matmul_into(
                        [s, d, s],
                        &mut dv,
                        Strided::row_major(0, d),
                        r > 0,
                        &p,
                        Strided::column_major(0, s),
                        dy,
                        q_at,
                    );
                    // dp = dy_head vᵀ, then ds = p (dp - rowsum(p dp)) scale in place
                    let mut ds = matmul(
                        [s, s, d],
                        dy,
                        q_at,
                        inputs.v,
                        Strided::column_major(kv_at.offset, kw),
                    );
                    for (ds, p) in ds.chunks_exact_mut(s).zip(p.chunks_exact(s)) {
                        let dot: f32 = ds.iter().zip(p).map(|(ds, p)| ds * p).sum();
                        for (ds, p) in ds.iter_mut().zip(p) {
                            *ds = p * (*ds - dot) * scale;
                        }
                    }
                    // dqr = ds kr, dkr += dsᵀ qr
                    let dq = matmul(
                        [s, d, s],
                        &ds,
                        Strided::row_major(0, s),
                        &kr,
                        Strided::row_major(0, d),
                    );
                    matmul_into(
                        [s, d, s],
                        &mut dkr,
                        Strided::row_major(0, d),
                        r > 0,
                        &ds,
                        Strided::column_major(0, s),
                        &qr,
                        Strided::row_major(0, d),
                    );
                    dqr.push(dq);
                }
                GroupGradients { dqr, dkr, dv }
            })
            .collect();
        let mut dq = vec![0.0f32; inputs.q.len()];
        let mut dk = vec![0.0f32; inputs.k.len()];
        let mut dv = vec![0.0f32; inputs.v.len()];
        let unrotate = |rows: &[f32], dst: &mut [f32], at: Strided| {
            for (i, row) in rows.chunks_exact(d).enumerate() {
                let (cos, sin) = inputs.tables(i);
                rotate_back(row, cos, sin, &mut dst[inputs.head_row(at, i)]);
            }
        };
        for (t, GroupGradients { dqr, dkr, dv: dvg }) in per_group.into_iter().enumerate() {
            let (b, group) = (t / kv_heads, t % kv_heads);
            for (r, rows) in dqr.iter().enumerate() {
                let head = group * inputs.group() + r;
                unrotate(rows, &mut dq, inputs.head_at(b, head, qw));
            }
            let kv_at = inputs.head_at(b, group, kw);
            unrotate(&dkr, &mut dk, kv_at);
            inputs.place(&dvg, &mut dv, kv_at);
        }
        [dq, dk, dv]
    }

    /// The contiguous inputs of one call, kept by the backward.
    #[derive(Clone, Debug)]
    struct Saved {
        q: FloatTensor<Flex>,
        k: FloatTensor<Flex>,
        v: FloatTensor<Flex>,
        cos: FloatTensor<Flex>,
        sin: FloatTensor<Flex>,
        layout: AttentionLayout,
    }

    impl Saved {
        fn new(
            q: FloatTensor<Flex>,
            k: FloatTensor<Flex>,
            v: FloatTensor<Flex>,
            cos: FloatTensor<Flex>,
            sin: FloatTensor<Flex>,
            layout: AttentionLayout,
        ) -> Self {
            Self {
                q: q.to_contiguous(),
                k: k.to_contiguous(),
                v: v.to_contiguous(),
                cos: cos.to_contiguous(),
                sin: sin.to_contiguous(),
                layout,
            }
        }

        fn inputs(&self) -> Inputs<'_> {
            let shape = self.q.shape();
            Inputs {
                q: values(&self.q),
                k: values(&self.k),
                v: values(&self.v),
                cos: values(&self.cos),
                sin: values(&self.sin),
                batch: shape[0],
                seq: shape[1],
                layout: self.layout,
            }
        }
    }

    impl CausalAttentionOps for Flex {
        fn causal_attention(
            q: FloatTensor<Self>,
            k: FloatTensor<Self>,
            v: FloatTensor<Self>,
            cos: FloatTensor<Self>,
            sin: FloatTensor<Self>,
            layout: AttentionLayout,
        ) -> FloatTensor<Self> {
            let shape = q.shape();
            let saved = Saved::new(q, k, v, cos, sin, layout);
            tensor(forward(&saved.inputs()).0, shape)
        }
    }

    #[derive(Debug)]
    struct CausalAttentionBackward;

    impl Backward<Flex, 3> for CausalAttentionBackward {
        /// The inputs and each query row's log-sum-exp.
        type State = (Saved, Vec<f32>);

        fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
            let (saved, lse) = ops.state;
            let dy = grads.consume::<Flex>(&ops.node).to_contiguous();
            let gradients = backward(&saved.inputs(), &lse, values(&dy));
            let shapes = [saved.q.shape(), saved.k.shape(), saved.v.shape()];
            for ((node, grad), shape) in ops.parents.into_iter().zip(gradients).zip(shapes) {
                if let Some(node) = node {
                    grads.register::<Flex>(node.id, tensor(grad, shape));
                }
            }
        }
    }

    impl<C: CheckpointStrategy> CausalAttentionOps for Autodiff<Flex, C> {
        fn causal_attention(
            q: FloatTensor<Self>,
            k: FloatTensor<Self>,
            v: FloatTensor<Self>,
            cos: FloatTensor<Self>,
            sin: FloatTensor<Self>,
            layout: AttentionLayout,
        ) -> FloatTensor<Self> {
            let nodes = [q.node(), k.node(), v.node()];
            let shape = q.shape();
            let saved = Saved::new(
                q.into_primitive(),
                k.into_primitive(),
                v.into_primitive(),
                cos.into_primitive(),
                sin.into_primitive(),
                layout,
            );
            let (out, lse) = forward(&saved.inputs());
            let out = tensor(out, shape);
            match CausalAttentionBackward
                .prepare::<C>(nodes)
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish((saved, lse), out),
                OpsKind::UnTracked(prep) => prep.finish(out),
            }
        }
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::{Bool, Device, Distribution, Tensor, TensorData};

    use super::*;
    use crate::model::config::RopeScaling;
    use crate::model::rope::{RotaryEmbedding, apply_rotary};

    /// The same attention from burn's ops: rotations, `repeat_kv`, a boolean mask, `attention`.
    fn reference(
        [q, k, v]: [Tensor<3>; 3],
        cos: &Tensor<2>,
        sin: &Tensor<2>,
        layout: AttentionLayout,
    ) -> Tensor<3> {
        let [batch, seq, _] = q.dims();
        let d = layout.head_dim;
        let heads = |t: Tensor<3>, n: usize| t.reshape([batch, seq, n, d]).swap_dims(1, 2);
        let q = apply_rotary(heads(q, layout.heads), cos, sin);
        let k = apply_rotary(heads(k, layout.kv_heads), cos, sin);
        let v = heads(v, layout.kv_heads);
        let group = layout.heads / layout.kv_heads;
        let repeat = |x: Tensor<4>| {
            x.unsqueeze_dim::<5>(2)
                .expand([batch, layout.kv_heads, group, seq, d])
                .reshape([batch, layout.heads, seq, d])
        };
        let mut mask = Vec::new();
        for i in 0..seq {
            for j in 0..seq {
                let outside = layout.window.is_some_and(|w| i >= j && i - j >= w);
                mask.push(j > i || outside);
            }
        }
        let mask: Tensor<4, Bool> =
            Tensor::from_data(TensorData::new(mask, [1, 1, seq, seq]), &q.device());
        let mask = mask.expand([batch, layout.heads, seq, seq]);
        let out = attention(
            q,
            repeat(k),
            repeat(v),
            Some(mask),
            None,
            AttentionModuleOptions::default(),
        );
        out.swap_dims(1, 2).reshape([batch, seq, layout.heads * d])
    }

    fn max_abs_diff(a: Tensor<3>, b: Tensor<3>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    /// Values and the gradients of `q`, `k` and `v` (under a random upstream gradient) of the
    /// fused op equal burn's path.
    fn check(batch: usize, seq: usize, layout: AttentionLayout) {
        let device = Device::flex().autodiff();
        let d = layout.head_dim;
        let rope = RotaryEmbedding::new(d, 10_000.0, RopeScaling::None);
        let (cos, sin) = rope.tables(0, seq, &device);
        let widths = [layout.heads * d, layout.kv_heads * d, layout.kv_heads * d];
        let inputs = widths
            .map(|w| Tensor::<3>::random([batch, seq, w], Distribution::Normal(0.0, 1.0), &device));
        let upstream = Tensor::<3>::random(
            [batch, seq, layout.heads * d],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let run = |fused: bool| {
            let tracked = inputs.clone().map(|t| t.require_grad());
            let [q, k, v] = tracked.clone();
            let out = if fused {
                causal_attention(q, k, v, &cos, &sin, layout)
            } else {
                reference([q, k, v], &cos, &sin, layout)
            };
            let grads = (out.clone() * upstream.clone()).sum().backward();
            let grads = tracked.map(|t| Tensor::<3>::from_inner(t.grad(&grads).unwrap()));
            (out, grads)
        };
        let (out, grads) = run(true);
        let (expected, expected_grads) = run(false);
        let diff = max_abs_diff(out, expected);
        assert!(diff < 1e-5, "{layout:?}: output differs by {diff}");
        for (name, (grad, expected)) in ["q", "k", "v"]
            .iter()
            .zip(grads.into_iter().zip(expected_grads))
        {
            let diff = max_abs_diff(grad, expected);
            assert!(
                diff < 1e-5,
                "{layout:?}: gradient of {name} differs by {diff}"
            );
        }
    }

    fn layout(
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        window: Option<usize>,
    ) -> AttentionLayout {
        AttentionLayout {
            heads,
            kv_heads,
            head_dim,
            window,
        }
    }

    #[test]
    fn grouped_query_heads_match_burn() {
        check(2, 9, layout(6, 2, 8, None));
    }

    #[test]
    fn one_key_head_per_query_head_matches_burn() {
        check(1, 5, layout(3, 3, 4, None));
    }

    #[test]
    fn sliding_window_matches_burn() {
        check(2, 8, layout(4, 1, 6, Some(3)));
    }

    #[test]
    fn one_position_matches_burn() {
        check(3, 1, layout(2, 1, 4, None));
    }
}
