//! Writing GGUF files for tests: a minimal v3 writer, and the tiny-llama fixture converted
//! to GGUF the way llama.cpp's converter lays it out (Q/K rows permuted, llama.cpp names).

use devft::ParamMap;

/// A tensor to write: name, GGUF dims (innermost first), type id, raw data.
pub struct Raw<'a>(pub &'a str, pub Vec<u64>, pub u32, pub Vec<u8>);

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// A metadata value to write.
pub enum Kv {
    U32(u32),
    F32(f32),
    Str(&'static str),
    /// An array of `u8` (GGUF type 0).
    BytesArray(Vec<u8>),
}

/// A GGUF v3 file with the architecture `llama`, alignment 32, and `kvs`.
pub fn write_with(kvs: &[(&str, Kv)], tensors: &[Raw]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((kvs.len() as u64 + 2).to_le_bytes());
    string(&mut out, "general.alignment");
    out.extend(4u32.to_le_bytes());
    out.extend(32u32.to_le_bytes());
    string(&mut out, "general.architecture");
    out.extend(8u32.to_le_bytes());
    string(&mut out, "llama");
    for (key, value) in kvs {
        string(&mut out, key);
        match value {
            Kv::U32(v) => {
                out.extend(4u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            Kv::F32(v) => {
                out.extend(6u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            Kv::Str(v) => {
                out.extend(8u32.to_le_bytes());
                string(&mut out, v);
            }
            Kv::BytesArray(items) => {
                out.extend(9u32.to_le_bytes());
                out.extend(0u32.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                out.extend(items);
            }
        }
    }
    let mut offset = 0u64;
    let mut offsets = Vec::new();
    for Raw(name, dims, kind, data) in tensors {
        string(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(kind.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offsets.push(offset);
        offset += (data.len() as u64).div_ceil(32) * 32;
    }
    while !out.len().is_multiple_of(32) {
        out.push(0);
    }
    let start = out.len();
    for (Raw(_, _, _, data), off) in tensors.iter().zip(offsets) {
        out.resize(start + off as usize, 0);
        out.extend(data);
    }
    out
}

pub fn write(tensors: &[Raw]) -> Vec<u8> {
    write_with(&[], tensors)
}

/// llama.cpp's Q/K row permutation: `gguf_row[h*D + 2i + j] = hf_row[h*D + j*D/2 + i]`.
pub fn permute_rows(values: &[f32], rows: usize, heads: usize) -> Vec<f32> {
    let cols = values.len() / rows;
    let (d, half) = (rows / heads, rows / heads / 2);
    let mut out = vec![0.0; values.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let (dst, src) = (h * d + 2 * i + j, h * d + j * half + i);
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&values[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// The tiny-llama fixture (`params`, its safetensors) as a GGUF file, each tensor stored as
/// `encode(hf_name, gguf_dims, values)` returns it: `(ggml type id, bytes)`, with `values` in
/// GGUF's row order (Q/K rows already permuted).
pub fn tiny_llama_gguf(
    params: &ParamMap,
    encode: impl Fn(&str, &[u64], &[f32]) -> (u32, Vec<u8>),
) -> Vec<u8> {
    let rename = |hf: &str| -> String {
        let fixed = [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("model.norm.weight", "output_norm.weight"),
            ("lm_head.weight", "output.weight"),
        ];
        if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
            return g.to_string();
        }
        let rest = hf.strip_prefix("model.layers.").unwrap();
        let (layer, inner) = rest.split_once('.').unwrap();
        let map = [
            ("self_attn.q_proj", "attn_q"),
            ("self_attn.k_proj", "attn_k"),
            ("self_attn.v_proj", "attn_v"),
            ("self_attn.o_proj", "attn_output"),
            ("mlp.gate_proj", "ffn_gate"),
            ("mlp.up_proj", "ffn_up"),
            ("mlp.down_proj", "ffn_down"),
            ("input_layernorm", "attn_norm"),
            ("post_attention_layernorm", "ffn_norm"),
        ];
        let (module, suffix) = inner.rsplit_once('.').unwrap();
        let short = map.iter().find(|(h, _)| *h == module).unwrap().1;
        format!("blk.{layer}.{short}.{suffix}")
    };
    let names: Vec<String> = params.names().map(str::to_string).collect();
    let tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)> = names
        .iter()
        .map(|name| {
            let t = params.get(name).unwrap();
            let values = if name.ends_with("q_proj.weight") {
                permute_rows(t.values(), t.shape()[0], 4)
            } else if name.ends_with("k_proj.weight") {
                permute_rows(t.values(), t.shape()[0], 2)
            } else {
                t.values().to_vec()
            };
            let dims: Vec<u64> = t.shape().iter().rev().map(|&d| d as u64).collect();
            let (kind, data) = encode(name, &dims, &values);
            (rename(name), dims, kind, data)
        })
        .collect();
    let raws: Vec<Raw> = tensors
        .iter()
        .map(|(n, d, k, b)| Raw(n, d.clone(), *k, b.clone()))
        .collect();
    write_with(
        &[
            ("llama.embedding_length", Kv::U32(64)),
            ("llama.feed_forward_length", Kv::U32(176)),
            ("llama.block_count", Kv::U32(8)),
            ("llama.attention.head_count", Kv::U32(4)),
            ("llama.attention.head_count_kv", Kv::U32(2)),
            ("llama.rope.dimension_count", Kv::U32(16)),
            ("llama.rope.freq_base", Kv::F32(10000.0)),
            ("llama.attention.layer_norm_rms_epsilon", Kv::F32(1e-5)),
            ("llama.context_length", Kv::U32(128)),
            ("general.name", Kv::Str("tiny")),
        ],
        &raws,
    )
}

/// `values` as little-endian F32 bytes (GGUF type 0).
pub fn f32_bytes(values: &[f32]) -> (u32, Vec<u8>) {
    (0, values.iter().flat_map(|v| v.to_le_bytes()).collect())
}
