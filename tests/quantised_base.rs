//! A frozen base kept in its GGUF blocks (`BaseWeights::Quantised`) against the same file
//! decoded to f32: logits, LoRA gradients, chunked products, lookups, DevFT submodels.
//! The blocks are written by this file's own quantisers; decoding them is checked against
//! the `gguf` package in tests/gguf.rs.

mod common;

use burn::tensor::{Distribution, Int, Tensor, TensorData};
use common::gguf_writer::{f32_bytes, tiny_llama_gguf};
use common::{device, id_tensor, tiny_llama_dir, values};
use devft::model::gguf::{BaseWeights, GgufType};
use devft::model::{
    CausalLm, DECODED_VALUES, FrozenWeight, Projection, QuantisedMatrix, TokenEmbedding,
    import_adapter, next_token_loss,
};
use devft::{Error, ParamMap};

fn f16(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_le_bytes()
}

/// 32 four-bit quants packed as ggml does: value `j` in the low nibble of byte `j`, value
/// `j + 16` in its high nibble.
fn pack_nibbles(q: &[u8]) -> impl Iterator<Item = u8> + '_ {
    (0..16).map(|j| q[j] | (q[j + 16] << 4))
}

/// Q8_0: `x = d q`, `d = max |x| / 127`.
fn quantise_q8_0(values: &[f32]) -> Vec<u8> {
    values
        .chunks(32)
        .flat_map(|block| {
            let d = block.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let quants = block.iter().map(move |v| (v * inv).round() as i8 as u8);
            f16(d).into_iter().chain(quants)
        })
        .collect()
}

/// Q4_0: `x = d (q - 8)`, `d` from the value of largest magnitude.
fn quantise_q4_0(values: &[f32]) -> Vec<u8> {
    values
        .chunks(32)
        .flat_map(|block| {
            let extreme = block
                .iter()
                .copied()
                .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
            let d = extreme / -8.0;
            let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
            let q: Vec<u8> = block
                .iter()
                .map(|v| (v * inv + 8.0).round().clamp(0.0, 15.0) as u8)
                .collect();
            f16(d)
                .into_iter()
                .chain(pack_nibbles(&q).collect::<Vec<_>>())
        })
        .collect()
}

/// Q4_1: `x = d q + m`, `m` the block's minimum.
fn quantise_q4_1(values: &[f32]) -> Vec<u8> {
    values
        .chunks(32)
        .flat_map(|block| {
            let min = block.iter().copied().fold(f32::INFINITY, f32::min);
            let max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let d = (max - min) / 15.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let q: Vec<u8> = block
                .iter()
                .map(|v| ((v - min) * inv).round().clamp(0.0, 15.0) as u8)
                .collect();
            let header = f16(d).into_iter().chain(f16(min));
            header.chain(pack_nibbles(&q).collect::<Vec<_>>())
        })
        .collect()
}

/// The tiny-llama fixture as a GGUF with its matrices in Q4_1, Q4_0 and Q8_0 (rows that are
/// not whole blocks, `down_proj`'s 176, and the norms stay F32); `tied` drops the separate
/// LM head so that the embedding serves as both.
fn quantised_tiny_llama(tied: bool) -> (tempfile::TempDir, std::path::PathBuf) {
    let mut params =
        ParamMap::load_safetensors(tiny_llama_dir().join("model.safetensors")).unwrap();
    if tied {
        params.remove("lm_head.weight");
    }
    let bytes = tiny_llama_gguf(&params, |name, dims, values| {
        if dims.len() != 2 || !dims[0].is_multiple_of(32) {
            f32_bytes(values)
        } else if name.contains("q_proj") || name.contains("k_proj") || name == "lm_head.weight" {
            (3, quantise_q4_1(values))
        } else if name.contains("v_proj") || name.contains("o_proj") {
            (2, quantise_q4_0(values))
        } else {
            (8, quantise_q8_0(values))
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-q.gguf");
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

fn max_abs(values: &[f32]) -> f32 {
    values.iter().fold(0f32, |m, v| m.max(v.abs()))
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// Logits and every LoRA gradient of the model at `path` loaded as `base`, with the fixture's
/// PEFT adapter, on one sequence.
fn logits_and_lora_grads(
    path: &std::path::Path,
    base: BaseWeights,
) -> (Vec<f32>, Vec<(String, Vec<f32>)>) {
    let device = device().autodiff();
    let model = CausalLm::from_gguf_with(path, base, &device).unwrap();
    let model = import_adapter(&model, tiny_llama_dir().join("adapter"))
        .expect("the fixture's adapter fits");
    let ids = [3u32, 7, 11, 5, 60, 2, 9];
    let logits = model.forward(id_tensor(&ids, &device));
    let loss = next_token_loss(logits.clone(), id_tensor(&ids, &device), None);
    let grads = loss.backward();
    let mut lora_grads = Vec::new();
    for (l, layer) in model.layers.iter().enumerate() {
        for p in Projection::ALL {
            let adapter = layer.projection(p).adapter.as_ref().unwrap();
            for (which, param) in [("A", &adapter.a), ("B", &adapter.b)] {
                let grad = param.val().grad(&grads).expect("adapters are trained");
                lora_grads.push((format!("{l}.{}.{which}", p.path()), values(grad)));
            }
        }
    }
    (values(logits.inner()), lora_grads)
}

#[test]
fn the_quantised_resident_model_equals_the_decoded_f32_model() {
    for tied in [false, true] {
        let (_dir, path) = quantised_tiny_llama(tied);
        let device = device();
        let dense = CausalLm::from_gguf_with(&path, BaseWeights::F32, &device).unwrap();
        let quantised = CausalLm::from_gguf_with(&path, BaseWeights::Quantised, &device).unwrap();
        assert_eq!(quantised.config().tie_word_embeddings, tied);

        // Which weights stay in blocks: the 2-D tensors of a block type.
        let layer = &quantised.layers[0];
        assert!(layer.self_attn.q_proj.weight.is_quantised());
        assert!(layer.mlp.up_proj.weight.is_quantised());
        assert!(
            !layer.mlp.down_proj.weight.is_quantised(),
            "F32 in the file"
        );
        assert!(matches!(
            quantised.embed_tokens,
            TokenEmbedding::Quantised(_)
        ));
        assert!(quantised.lm_head.is_quantised());
        let q_bytes = layer.self_attn.q_proj.weight.storage_bytes();
        assert_eq!(q_bytes, 64 * 64 / 32 * 20, "Q4_1: 20 bytes per 32 values");
        assert_eq!(
            dense.layers[0].self_attn.q_proj.weight.storage_bytes(),
            64 * 64 * 4
        );

        // The blocks as the file stores them (a tied head shares the embedding's): Q8_0 34
        // bytes per 32 values, Q4_1 20, Q4_0 18; down_proj (176-wide rows) and norms in f32.
        let per_layer = 64 * 64 / 32 * 20   // q_proj, Q4_1
            + 32 * 64 / 32 * 20             // k_proj, Q4_1
            + 32 * 64 / 32 * 18             // v_proj, Q4_0
            + 64 * 64 / 32 * 18             // o_proj, Q4_0
            + 2 * 176 * 64 / 32 * 34        // gate_proj and up_proj, Q8_0
            + 64 * 176 * 4                  // down_proj, f32
            + 2 * 64 * 4; // the two norms
        let table = 256 * 64 / 32 * 34; // Q8_0 embedding
        let head = if tied { 0 } else { 256 * 64 / 32 * 20 }; // Q4_1 head
        let expected = table + head + 8 * per_layer + 64 * 4;
        assert_eq!(quantised.weight_bytes(), expected as u64);
        assert_eq!(
            dense.weight_bytes(),
            4 * dense.base_params().num_values() as u64 + if tied { 4 * 256 * 64 } else { 0 }
        );

        // Every base tensor reads back as the f32 model's (the same decoding).
        assert_eq!(quantised.base_params(), dense.base_params(), "tied: {tied}");

        let (dense_logits, dense_grads) = logits_and_lora_grads(&path, BaseWeights::F32);
        let (q_logits, q_grads) = logits_and_lora_grads(&path, BaseWeights::Quantised);
        let diff = max_abs_diff(&q_logits, &dense_logits);
        assert!(diff < 1e-4, "tied {tied}: logits differ by {diff}");
        for ((name, q), (_, d)) in q_grads.iter().zip(&dense_grads) {
            let scale = max_abs(d);
            assert!(scale > 0.0, "{name}: a zero gradient tests nothing");
            let diff = max_abs_diff(q, d);
            assert!(
                diff <= 1e-4 * scale,
                "tied {tied}: {name} differs by {diff} (scale {scale})"
            );
        }
    }
}

/// A random Q8_0 matrix of `rows` x `cols` and its decoded values `[rows, cols]`.
fn random_matrix(rows: usize, cols: usize, seed: u64) -> (QuantisedMatrix, Tensor<2>) {
    let device = device();
    let values: Vec<f32> = (0..rows * cols)
        .map(|i| {
            let x = (i as u64)
                .wrapping_mul(6364136223846793005)
                .wrapping_add(seed);
            ((x >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        })
        .collect();
    let matrix = QuantisedMatrix::new(GgufType::Q8_0, rows, cols, quantise_q8_0(&values)).unwrap();
    let decoded = matrix.to_host().to_tensor::<2>(&device).unwrap();
    (matrix, decoded)
}

#[test]
fn products_over_several_decoded_chunks_equal_a_dense_matmul() {
    // More rows than one chunk holds, and a last chunk that is not full.
    let (rows, cols) = (DECODED_VALUES / 512 + 100, 512);
    let (matrix, decoded) = random_matrix(rows, cols, 7);
    let device = device().autodiff();
    let x = Tensor::<3>::random([2, 3, cols], Distribution::Normal(0.0, 1.0), &device);
    let upstream = Tensor::<3>::random([2, 3, rows], Distribution::Normal(0.0, 1.0), &device);

    let xq = x.clone().require_grad();
    let yq = matrix.forward(xq.clone());
    let gq = xq
        .grad(&(yq.clone() * upstream.clone()).sum().backward())
        .unwrap();

    let xd = x.require_grad();
    let w = Tensor::<2>::from_inner(decoded.transpose()).unsqueeze::<3>();
    let yd = xd.clone().matmul(w);
    let gd = xd.grad(&(yd.clone() * upstream).sum().backward()).unwrap();

    assert_eq!(yq.dims(), [2, 3, rows]);
    let (yq, yd) = (values(yq.inner()), values(yd.inner()));
    assert!(max_abs_diff(&yq, &yd) <= 1e-5 * max_abs(&yd));
    let (gq, gd) = (values(gq), values(gd));
    assert!(max_abs_diff(&gq, &gd) <= 1e-5 * max_abs(&gd));
}

#[test]
fn lookups_reorders_and_bad_shapes() {
    let (matrix, decoded) = random_matrix(5, 64, 3);
    let device = device();
    let rows = values(decoded);
    let ids = Tensor::<2, Int>::from_data(TensorData::from([[4i64, 0], [2, 4]]), &device);
    let looked_up = values(matrix.embed(ids));
    for (slot, id) in [4usize, 0, 2, 4].into_iter().enumerate() {
        assert_eq!(
            &looked_up[slot * 64..(slot + 1) * 64],
            &rows[id * 64..(id + 1) * 64]
        );
    }

    let reordered = matrix.with_row_order(&[2, 0, 1, 4, 3]).unwrap().to_host();
    assert_eq!(&reordered.values()[..64], &rows[2 * 64..3 * 64]);
    assert_eq!(&reordered.values()[4 * 64..], &rows[3 * 64..4 * 64]);
    for order in [vec![0, 1, 2, 3], vec![0, 1, 2, 3, 3], vec![0, 1, 2, 3, 5]] {
        assert!(matches!(
            matrix.with_row_order(&order),
            Err(Error::InvalidArgument(_))
        ));
    }

    // 48 values are not whole 32-value blocks; 3 rows need 3 x 34 bytes.
    for (rows, cols, bytes) in [(1, 48, 51), (3, 32, 100), (0, 32, 0)] {
        let err = QuantisedMatrix::new(GgufType::Q8_0, rows, cols, vec![0; bytes]).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    }
}

#[test]
fn fused_submodels_of_a_quantised_base_equal_those_of_the_f32_base() {
    use devft::prelude::{DifferentialFuser, Grouping, build_submodel};
    let (_dir, path) = quantised_tiny_llama(true);
    let device = device();
    let grouping = Grouping::new(vec![vec![0, 1, 2], vec![3], vec![4, 5, 6, 7]], 8).unwrap();
    let fuser = DifferentialFuser::new(0.1).unwrap();
    let ids = [5u32, 9, 13, 2];
    let mut logits = Vec::new();
    for base in [BaseWeights::F32, BaseWeights::Quantised] {
        let model = CausalLm::from_gguf_with(&path, base, &device).unwrap();
        let submodel = build_submodel(&model, &grouping, &fuser).unwrap();
        // Fused layers are f32; a group of one keeps its blocks.
        let quantised = base == BaseWeights::Quantised;
        assert!(!submodel.layers[0].self_attn.q_proj.weight.is_quantised());
        assert_eq!(
            submodel.layers[1].self_attn.q_proj.weight.is_quantised(),
            quantised
        );
        logits.push(values(submodel.forward(id_tensor(&ids, &device))));
    }
    let diff = max_abs_diff(&logits[0], &logits[1]);
    assert!(diff < 1e-4, "submodel logits differ by {diff}");
}

#[test]
fn merging_into_a_quantised_weight_makes_it_f32() {
    let (_dir, path) = quantised_tiny_llama(false);
    let device = device();
    let mut model = CausalLm::from_gguf_with(&path, BaseWeights::Quantised, &device).unwrap();
    let before = model.layers[0].projection_weights();
    let mut weights = ParamMap::new();
    for (name, tensor) in before.iter() {
        let shifted: Vec<f32> = tensor.values().iter().map(|v| v + 0.5).collect();
        weights.insert(
            name,
            devft::HostTensor::new(tensor.shape().to_vec(), shifted).unwrap(),
        );
    }
    let mut layers = ParamMap::new();
    for (name, tensor) in weights.iter() {
        layers.insert(format!("model.layers.0.{name}"), tensor.clone());
    }
    for l in 1..8 {
        for (name, tensor) in model.layers[l].projection_weights().iter() {
            layers.insert(format!("model.layers.{l}.{name}"), tensor.clone());
        }
    }
    model.load_projection_weights(&layers).unwrap();
    let q = &model.layers[0].self_attn.q_proj.weight;
    assert!(matches!(q, FrozenWeight::Dense(_)));
    assert_eq!(model.layers[0].projection_weights(), weights);
    assert!(!model.layers[1].self_attn.q_proj.weight.is_quantised());
}

#[test]
fn quantised_weights_need_a_gguf_file() {
    let err = CausalLm::load_with(tiny_llama_dir(), BaseWeights::Quantised, &device()).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert!("q4".parse::<BaseWeights>().is_err());
}

/// Every block type kept resident, against the `gguf` package's decoding of the same blocks
/// (`tests/fixtures/gguf-quants`: 3 rows of 512 random quants per type, K-quants included).
#[test]
fn every_block_type_multiplies_as_the_gguf_package_decodes_it() {
    use devft::model::gguf::GgufFile;
    let path = tiny_llama_dir().join("../gguf-quants/quants.gguf");
    let file = GgufFile::open(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let device = device();
    let x = Tensor::<2>::random([4, 512], Distribution::Normal(0.0, 1.0), &device);
    let mut kinds = 0;
    for (name, info) in &file.tensors {
        if name.ends_with(".expected") {
            continue;
        }
        let blocks = bytes[info.range.clone()].to_vec();
        let matrix = QuantisedMatrix::new(info.kind, 3, 512, blocks).unwrap();
        let expected = file.tensor(&format!("{name}.expected")).unwrap();
        let expected = expected.to_tensor::<2>(&device).unwrap();
        let want = values(x.clone().matmul(expected.transpose()));
        let got = values(matrix.forward(x.clone()));
        let diff = max_abs_diff(&got, &want);
        assert!(diff <= 1e-5 * max_abs(&want), "{name}: {diff}");
        kinds += 1;
    }
    assert_eq!(
        kinds, 10,
        "Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the five K-quants"
    );
}

/// A LoRA layer with each kind of frozen base, as flex runs it (one fused op), against the
/// same layer written with burn's own ops on the decoded weight: `x W + s (x A) B`, and the
/// gradients of `x`, `A` and `B` (also with `x` or `A` not tracked, as in a first layer or
/// FFA-LoRA).
#[test]
fn lora_layers_on_either_base_equal_burn_ops() {
    use burn::tensor::module::linear;
    use devft::model::{LoraLinear, LowRankAdapter};

    let (matrix, decoded) = random_matrix(96, 64, 11);
    let device = device().autodiff();
    let w = Tensor::<2>::from_inner(decoded.transpose()).to_device(&device);
    let a = Tensor::<2>::random([64, 4], Distribution::Normal(0.0, 0.3), &device);
    let b = Tensor::<2>::random([4, 96], Distribution::Normal(0.0, 0.3), &device);
    let x = Tensor::<3>::random([2, 7, 64], Distribution::Normal(0.0, 1.0), &device);
    let upstream = Tensor::<3>::random([2, 7, 96], Distribution::Normal(0.0, 1.0), &device);
    let scaling = 2.5;

    for quantised in [false, true] {
        for (track_x, track_a) in [(true, true), (false, true), (true, false)] {
            let weight = if quantised {
                FrozenWeight::Quantised(matrix.clone())
            } else {
                FrozenWeight::dense(w.clone())
            };
            let mut layer = LoraLinear::from_weight(weight, None);
            let mut adapter = LowRankAdapter::new(a.clone(), b.clone(), scaling, 0.0);
            if !track_a {
                adapter.a = adapter.a.set_require_grad(false);
            }
            layer.adapter = Some(adapter);
            let xf = if track_x {
                x.clone().require_grad()
            } else {
                x.clone()
            };
            let y = layer.forward(xf.clone());
            let grads = (y.clone() * upstream.clone()).sum().backward();
            let adapter = layer.adapter.as_ref().unwrap();

            let (xr, ar, br) = (
                x.clone().require_grad(),
                a.clone().require_grad(),
                b.clone().require_grad(),
            );
            let low = linear(xr.clone(), ar.clone(), None).mul_scalar(scaling);
            let yr = linear(xr.clone(), w.clone(), None) + linear(low, br.clone(), None);
            let rgrads = (yr.clone() * upstream.clone()).sum().backward();

            let case = format!("quantised {quantised}, x {track_x}, A {track_a}");
            let close = |got: Vec<f32>, want: Vec<f32>, what: &str| {
                let diff = max_abs_diff(&got, &want);
                assert!(
                    diff <= 1e-5 * max_abs(&want).max(1.0),
                    "{case}: {what} differs by {diff}"
                );
            };
            close(values(y.inner()), values(yr.inner()), "y");
            close(
                values(adapter.b.val().grad(&grads).unwrap()),
                values(br.grad(&rgrads).unwrap()),
                "dB",
            );
            match adapter.a.val().grad(&grads) {
                Some(da) => close(values(da), values(ar.grad(&rgrads).unwrap()), "dA"),
                None => assert!(!track_a, "{case}: A lost its gradient"),
            }
            match xf.grad(&grads) {
                Some(dx) => close(values(dx), values(xr.grad(&rgrads).unwrap()), "dx"),
                None => assert!(!track_x, "{case}: x lost its gradient"),
            }
        }
    }
}

/// A block whose scale is NaN decodes to NaN: loading the quantised base refuses it by name,
/// like the f32 loader does, before any training can spread it.
#[test]
fn a_nan_block_scale_is_refused_when_kept_quantised() {
    let params = ParamMap::load_safetensors(tiny_llama_dir().join("model.safetensors")).unwrap();
    let bytes = tiny_llama_gguf(&params, |name, dims, values| {
        if dims.len() != 2 || !dims[0].is_multiple_of(32) {
            return f32_bytes(values);
        }
        let mut blocks = quantise_q8_0(values);
        if name == "model.layers.3.mlp.up_proj.weight" {
            blocks[34 * 5..34 * 5 + 2].copy_from_slice(&half::f16::NAN.to_le_bytes());
        }
        (8, blocks)
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nan.gguf");
    std::fs::write(&path, bytes).unwrap();
    for base in [BaseWeights::F32, BaseWeights::Quantised] {
        let err = CausalLm::from_gguf_with(&path, base, &device()).unwrap_err();
        match err {
            Error::NonFinite { name } => assert_eq!(name, "model.layers.3.mlp.up_proj.weight"),
            other => panic!("{base:?}: {other}"),
        }
    }
}
