//! An independent, naive float64 forward pass of a Llama-family decoder, written from
//! transformers' equations directly on a [`ParamMap`] (no burn), to check the crate's model on
//! configurations that have no Python fixture (Qwen2-style biases, tied embeddings, GQA).

use devft::ParamMap;
use devft::model::DecoderConfig;

fn get(params: &ParamMap, name: &str) -> Vec<f64> {
    params
        .get(name)
        .unwrap_or_else(|| panic!("missing {name}"))
        .values()
        .iter()
        .map(|v| f64::from(*v))
        .collect()
}

/// `y = W x + b` with `W: [out, in]` row-major.
fn linear(w: &[f64], b: Option<&[f64]>, x: &[f64], d_out: usize) -> Vec<f64> {
    let d_in = x.len();
    (0..d_out)
        .map(|o| {
            let dot: f64 = (0..d_in).map(|i| w[o * d_in + i] * x[i]).sum();
            dot + b.map_or(0.0, |b| b[o])
        })
        .collect()
}

fn rms_norm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| v * inv * g).collect()
}

fn rope(x: &mut [f64], pos: usize, theta: f64) {
    let d = x.len();
    let half = d / 2;
    for i in 0..half {
        let freq = 1.0 / theta.powf((2 * i) as f64 / d as f64);
        let (s, c) = (pos as f64 * freq).sin_cos();
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * c - b * s;
        x[i + half] = b * c + a * s;
    }
}

/// Logits `[seq][vocab]` for `ids`, from HF-named tensors (`model.layers.{i}...`), with
/// LoRA tensors (`...lora_A.weight` `[r, in]`, `...lora_B.weight` `[out, r]`) added as
/// `W + scaling * B A` when present.
pub fn logits(
    config: &DecoderConfig,
    params: &ParamMap,
    ids: &[u32],
    scaling: f64,
) -> Vec<Vec<f64>> {
    let h = config.hidden_size;
    let hd = config.head_dim;
    let (nh, nkv) = (config.num_heads, config.num_kv_heads);
    let embed = get(params, "model.embed_tokens.weight");
    let mut xs: Vec<Vec<f64>> = ids
        .iter()
        .map(|&t| embed[t as usize * h..(t as usize + 1) * h].to_vec())
        .collect();
    let weight = |prefix: &str, d_out: usize, d_in: usize| -> Vec<f64> {
        let mut w = get(params, &format!("{prefix}.weight"));
        if let (Some(a), Some(b)) = (
            params.get(&format!("{prefix}.lora_A.weight")),
            params.get(&format!("{prefix}.lora_B.weight")),
        ) {
            let r = a.shape()[0];
            for o in 0..d_out {
                for i in 0..d_in {
                    let delta: f64 = (0..r)
                        .map(|k| {
                            f64::from(b.values()[o * r + k]) * f64::from(a.values()[k * d_in + i])
                        })
                        .sum();
                    w[o * d_in + i] += scaling * delta;
                }
            }
        }
        w
    };
    let bias = |prefix: &str| {
        params
            .get(&format!("{prefix}.bias"))
            .map(|_| get(params, &format!("{prefix}.bias")))
    };
    for l in 0..config.num_layers {
        let p = format!("model.layers.{l}");
        let wq = weight(&format!("{p}.self_attn.q_proj"), nh * hd, h);
        let wk = weight(&format!("{p}.self_attn.k_proj"), nkv * hd, h);
        let wv = weight(&format!("{p}.self_attn.v_proj"), nkv * hd, h);
        let wo = weight(&format!("{p}.self_attn.o_proj"), h, nh * hd);
        let (bq, bk, bv, bo) = (
            bias(&format!("{p}.self_attn.q_proj")),
            bias(&format!("{p}.self_attn.k_proj")),
            bias(&format!("{p}.self_attn.v_proj")),
            bias(&format!("{p}.self_attn.o_proj")),
        );
        let ln1 = get(params, &format!("{p}.input_layernorm.weight"));
        let ln2 = get(params, &format!("{p}.post_attention_layernorm.weight"));
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (pos, x) in xs.iter().enumerate() {
            let n = rms_norm(x, &ln1, config.rms_norm_eps);
            let mut q = linear(&wq, bq.as_deref(), &n, nh * hd);
            let mut k = linear(&wk, bk.as_deref(), &n, nkv * hd);
            for head in q.chunks_mut(hd) {
                rope(head, pos, config.rope_theta);
            }
            for head in k.chunks_mut(hd) {
                rope(head, pos, config.rope_theta);
            }
            qs.push(q);
            ks.push(k);
            vs.push(linear(&wv, bv.as_deref(), &n, nkv * hd));
        }
        let group = nh / nkv;
        let mut next = Vec::new();
        for (t, x) in xs.iter().enumerate() {
            let mut attn = vec![0.0; nh * hd];
            for head in 0..nh {
                let kv = head / group;
                let q = &qs[t][head * hd..(head + 1) * hd];
                let scores: Vec<f64> = (0..=t)
                    .map(|s| {
                        let k = &ks[s][kv * hd..(kv + 1) * hd];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = exps.iter().sum();
                for (s, e) in exps.iter().enumerate() {
                    for d in 0..hd {
                        attn[head * hd + d] += e / total * vs[s][kv * hd + d];
                    }
                }
            }
            let o = linear(&wo, bo.as_deref(), &attn, h);
            let hidden: Vec<f64> = x.iter().zip(&o).map(|(a, b)| a + b).collect();
            let n = rms_norm(&hidden, &ln2, config.rms_norm_eps);
            let m = config.intermediate_size;
            let gate = linear(
                &weight(&format!("{p}.mlp.gate_proj"), m, h),
                bias(&format!("{p}.mlp.gate_proj")).as_deref(),
                &n,
                m,
            );
            let up = linear(
                &weight(&format!("{p}.mlp.up_proj"), m, h),
                bias(&format!("{p}.mlp.up_proj")).as_deref(),
                &n,
                m,
            );
            let act: Vec<f64> = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let down = linear(
                &weight(&format!("{p}.mlp.down_proj"), h, m),
                bias(&format!("{p}.mlp.down_proj")).as_deref(),
                &act,
                h,
            );
            next.push(hidden.iter().zip(&down).map(|(a, b)| a + b).collect());
        }
        xs = next;
    }
    let norm = get(params, "model.norm.weight");
    let head = if config.tie_word_embeddings {
        embed.clone()
    } else {
        get(params, "lm_head.weight")
    };
    xs.iter()
        .map(|x| {
            linear(
                &head,
                None,
                &rms_norm(x, &norm, config.rms_norm_eps),
                config.vocab_size,
            )
        })
        .collect()
}
