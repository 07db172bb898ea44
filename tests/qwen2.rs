//! A Qwen2-style model (q/k/v biases, no o bias, tied embeddings, GQA) built with the crate,
//! saved in transformers' format, reloaded, and checked against an independent float64
//! forward pass.

mod common;

use common::*;
use devft::model::{CausalLm, DecoderConfig, HfConfig, LoraConfig, RopeScaling};
use devft::{Error, HostTensor, ParamMap};

fn qwen2_config() -> DecoderConfig {
    DecoderConfig {
        hidden_size: 32,
        intermediate_size: 48,
        num_layers: 3,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
        vocab_size: 64,
        rms_norm_eps: 1e-6,
        rope_theta: 1_000_000.0,
        rope_scaling: RopeScaling::None,
        max_position_embeddings: 128,
        tie_word_embeddings: true,
        qkv_bias: true,
        o_bias: false,
        mlp_bias: false,
        sliding_window: None,
    }
}

/// Gives the biases visible values (random init is small) so that a forward pass that
/// ignored them would fail.
fn with_large_biases(model: CausalLm) -> CausalLm {
    let config = model.config().clone();
    let mut params = model.base_params();
    let names: Vec<String> = params
        .names()
        .filter(|n| n.ends_with(".bias"))
        .map(String::from)
        .collect();
    assert_eq!(
        names.len(),
        3 * config.num_layers,
        "q, k and v biases in every layer"
    );
    for (k, name) in names.iter().enumerate() {
        let len = params.get(name).unwrap().len();
        let values = (0..len)
            .map(|i| ((i + k) as f32 * 0.37).sin() * 0.5)
            .collect();
        params.insert(name.clone(), HostTensor::new(vec![len], values).unwrap());
    }
    CausalLm::from_source(config, &params, &model.device()).unwrap()
}

#[test]
fn qwen2_save_reload_matches_reference_forward() {
    let device = device();
    let model = with_large_biases(CausalLm::random(qwen2_config(), 7, &device).unwrap());
    let dir = tempfile::tempdir().unwrap();
    model.save(dir.path()).unwrap();

    let hf = HfConfig::load(dir.path().join("config.json")).unwrap();
    assert_eq!(hf.model_type.as_deref(), Some("qwen2"));
    let saved = ParamMap::load_safetensors(dir.path().join("model.safetensors")).unwrap();
    assert!(
        saved.get("lm_head.weight").is_none(),
        "tied head is not saved"
    );
    assert!(saved.get("model.layers.0.self_attn.q_proj.bias").is_some());
    assert!(saved.get("model.layers.0.self_attn.o_proj.bias").is_none());

    let reloaded = CausalLm::load(dir.path(), &device).unwrap();
    assert_eq!(reloaded.config(), model.config());
    assert_eq!(reloaded.base_params(), model.base_params());

    let ids = [5u32, 17, 3, 60, 22, 9];
    let ours = values(reloaded.forward(id_tensor(&ids, &device)));
    let expected = reference::logits(reloaded.config(), &saved, &ids, 0.0).concat();
    let diff = max_abs_diff(&ours, &expected);
    assert!(
        diff < 1e-4,
        "Qwen2 logits differ from the reference by {diff}"
    );
}

#[test]
fn qwen2_biases_change_the_output() {
    let device = device();
    let model = CausalLm::random(qwen2_config(), 7, &device).unwrap();
    let biased = with_large_biases(model.clone());
    let ids = [1u32, 2, 3];
    let a = values(model.forward(id_tensor(&ids, &device)));
    let b = values(biased.forward(id_tensor(&ids, &device)));
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(diff > 1e-3, "biases had no effect ({diff})");
}

#[test]
fn qwen2_lora_matches_reference_with_merged_delta() {
    let device = device();
    let model = with_large_biases(CausalLm::random(qwen2_config(), 3, &device).unwrap());
    let lora = LoraConfig::new(2, 4.0);
    let mut model = model.with_lora(&lora, 11).unwrap();
    // Non-zero B so the adapter matters.
    let mut adapters = model.lora_params();
    let names: Vec<String> = adapters.names().map(String::from).collect();
    for (k, name) in names.iter().enumerate() {
        let t = adapters.get(name).unwrap().clone();
        let values = (0..t.len())
            .map(|i| ((i * 7 + k) as f32 * 0.13).cos() * 0.05)
            .collect();
        adapters.insert(
            name.clone(),
            HostTensor::new(t.shape().to_vec(), values).unwrap(),
        );
    }
    model.load_lora_params(&adapters).unwrap();

    let mut all = model.base_params();
    for (name, tensor) in adapters {
        all.insert(name, tensor);
    }
    let ids = [4u32, 8, 15, 16, 23, 42];
    let ours = values(model.forward(id_tensor(&ids, &device)));
    let expected = reference::logits(model.config(), &all, &ids, lora.scaling()).concat();
    let diff = max_abs_diff(&ours, &expected);
    assert!(diff < 1e-4, "Qwen2 + LoRA logits differ by {diff}");
}

#[test]
fn qwen2_checkpoint_without_q_bias_is_rejected() {
    let device = device();
    let model = CausalLm::random(qwen2_config(), 1, &device).unwrap();
    let mut params = model.base_params();
    params.remove("model.layers.1.self_attn.q_proj.bias");
    let err = CausalLm::from_source(qwen2_config(), &params, &device).unwrap_err();
    assert!(
        matches!(&err, Error::MissingTensor { name } if name == "model.layers.1.self_attn.q_proj.bias"),
        "{err}"
    );
}
