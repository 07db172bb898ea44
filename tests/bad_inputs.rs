//! Malformed files and configs give typed errors, never panics.

mod common;

use std::path::Path;

use common::*;
use devft::model::{CausalLm, DecoderConfig, HfConfig, import_adapter};
use devft::{Error, HostTensor, ParamMap};

/// Copies the tiny-llama model (and adapter) into a temporary directory.
fn copy_fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(tiny_llama_dir().join(file), dir.path().join(file)).unwrap();
    }
    std::fs::create_dir(dir.path().join("adapter")).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(
            tiny_llama_dir().join("adapter").join(file),
            dir.path().join("adapter").join(file),
        )
        .unwrap();
    }
    dir
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(path, serde_json::to_string(&value).unwrap()).unwrap();
}

fn tiny_config() -> DecoderConfig {
    DecoderConfig::from_hf_file(tiny_llama_dir().join("config.json")).unwrap()
}

#[test]
fn truncated_safetensors_is_malformed() {
    let dir = copy_fixture();
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = CausalLm::load(dir.path(), &device()).unwrap_err();
    assert!(matches!(err, Error::MalformedSafetensors { .. }), "{err}");
}

#[test]
fn header_claiming_a_huge_size_is_rejected_without_allocating() {
    let mut bytes = u64::MAX.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    let err = ParamMap::from_safetensors_bytes(&bytes, "huge").unwrap_err();
    assert!(matches!(err, Error::MalformedSafetensors { .. }), "{err}");

    let header =
        br#"{"x":{"dtype":"F32","shape":[1000000000,1000],"data_offsets":[0,4000000000000]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0; 16]);
    let err = ParamMap::from_safetensors_bytes(&bytes, "inflated").unwrap_err();
    assert!(matches!(err, Error::MalformedSafetensors { .. }), "{err}");
}

#[test]
fn garbage_bytes_are_malformed() {
    let err = ParamMap::from_safetensors_bytes(b"not a safetensors file", "garbage").unwrap_err();
    assert!(matches!(err, Error::MalformedSafetensors { .. }), "{err}");
}

#[test]
fn heads_not_dividing_hidden_size_is_an_invalid_config() {
    let dir = copy_fixture();
    edit_json(&dir.path().join("config.json"), |c| {
        c["num_attention_heads"] = 3.into();
        c["num_key_value_heads"] = 3.into();
        c.as_object_mut().unwrap().remove("head_dim");
    });
    let err = CausalLm::load(dir.path(), &device()).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidConfig(msg) if msg.contains("does not divide hidden_size")),
        "{err}"
    );
}

#[test]
fn kv_heads_not_dividing_heads_is_an_invalid_config() {
    let dir = copy_fixture();
    edit_json(&dir.path().join("config.json"), |c| {
        c["num_key_value_heads"] = 3.into()
    });
    let err = HfConfig::load(dir.path().join("config.json"))
        .unwrap()
        .resolve()
        .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
}

#[test]
fn unsupported_activation_and_rope_are_invalid_configs() {
    let dir = copy_fixture();
    let path = dir.path().join("config.json");
    edit_json(&path, |c| c["hidden_act"] = "gelu".into());
    assert!(matches!(
        HfConfig::load(&path).unwrap().resolve(),
        Err(Error::InvalidConfig(_))
    ));
    edit_json(&path, |c| {
        c["hidden_act"] = "silu".into();
        c["rope_parameters"]["rope_type"] = "yarn".into();
    });
    assert!(matches!(
        HfConfig::load(&path).unwrap().resolve(),
        Err(Error::InvalidConfig(_))
    ));
}

#[test]
fn config_that_is_not_json_is_a_json_error() {
    let dir = copy_fixture();
    std::fs::write(dir.path().join("config.json"), "{ hidden_size: ").unwrap();
    let err = CausalLm::load(dir.path(), &device()).unwrap_err();
    assert!(matches!(err, Error::Json { .. }), "{err}");
}

#[test]
fn wrong_shape_is_named() {
    let mut params =
        ParamMap::load_safetensors(tiny_llama_dir().join("model.safetensors")).unwrap();
    params.insert(
        "model.layers.3.mlp.up_proj.weight",
        HostTensor::zeros(vec![176, 63]),
    );
    let err = CausalLm::from_source(tiny_config(), &params, &device()).unwrap_err();
    match err {
        Error::ShapeMismatch {
            name,
            expected,
            found,
        } => {
            assert_eq!(name, "model.layers.3.mlp.up_proj.weight");
            assert_eq!(expected, vec![176, 64]);
            assert_eq!(found, vec![176, 63]);
        }
        other => panic!("unexpected error {other}"),
    }
}

#[test]
fn missing_and_unexpected_tensors_are_named() {
    let mut params =
        ParamMap::load_safetensors(tiny_llama_dir().join("model.safetensors")).unwrap();
    params.remove("model.layers.5.post_attention_layernorm.weight");
    let err = CausalLm::from_source(tiny_config(), &params, &device()).unwrap_err();
    assert!(
        matches!(&err, Error::MissingTensor { name } if name == "model.layers.5.post_attention_layernorm.weight"),
        "{err}"
    );

    let mut params =
        ParamMap::load_safetensors(tiny_llama_dir().join("model.safetensors")).unwrap();
    params.insert(
        "model.layers.8.input_layernorm.weight",
        HostTensor::zeros(vec![64]),
    );
    let err = CausalLm::from_source(tiny_config(), &params, &device()).unwrap_err();
    assert!(
        matches!(&err, Error::UnexpectedTensor { name } if name == "model.layers.8.input_layernorm.weight"),
        "{err}"
    );
}

#[test]
fn adapter_rank_disagreeing_with_config_is_rejected() {
    let dir = copy_fixture();
    edit_json(&dir.path().join("adapter/adapter_config.json"), |c| {
        c["r"] = 8.into()
    });
    let model = CausalLm::load(dir.path(), &device()).unwrap();
    let err = import_adapter(&model, dir.path().join("adapter")).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidAdapter(msg) if msg.contains("rank")),
        "{err}"
    );
}

#[test]
fn adapter_missing_a_module_or_with_unsupported_options_is_rejected() {
    let dir = copy_fixture();
    let path = dir.path().join("adapter/adapter_model.safetensors");
    let mut tensors = ParamMap::load_safetensors(&path).unwrap();
    tensors.remove("base_model.model.model.layers.2.mlp.gate_proj.lora_B.weight");
    tensors.save_safetensors(&path).unwrap();
    let model = CausalLm::load(dir.path(), &device()).unwrap();
    let err = import_adapter(&model, dir.path().join("adapter")).unwrap_err();
    assert!(
        matches!(&err, Error::MissingTensor { name } if name == "base_model.model.model.layers.2.mlp.gate_proj.lora_B.weight"),
        "{err}"
    );

    edit_json(&dir.path().join("adapter/adapter_config.json"), |c| {
        c["use_dora"] = true.into()
    });
    let err = import_adapter(&model, dir.path().join("adapter")).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidAdapter(msg) if msg.contains("use_dora")),
        "{err}"
    );
}

#[test]
fn non_finite_adapter_values_are_rejected_and_leave_the_model_unchanged() {
    let model = CausalLm::load(tiny_llama_dir(), &device()).unwrap();
    let mut model = import_adapter(&model, tiny_llama_dir().join("adapter")).unwrap();
    let before = model.lora_params();
    let mut params = before.clone();
    let name = "model.layers.4.self_attn.k_proj.lora_A.weight";
    let mut bad = params.get(name).unwrap().clone();
    bad.values_mut()[3] = f32::NAN;
    params.insert(name, bad);
    let err = model.load_lora_params(&params).unwrap_err();
    assert!(
        matches!(&err, Error::NonFinite { name: n } if n == name),
        "{err}"
    );
    assert_eq!(model.lora_params(), before);
}

#[test]
fn out_of_vocabulary_prompt_is_an_invalid_argument() {
    let model = CausalLm::load(tiny_llama_dir(), &device()).unwrap();
    let err = model.generate_greedy(&[1, 256], 4, &[]).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert!(matches!(
        model.generate_greedy(&[], 4, &[]),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn missing_model_directory_is_an_io_error() {
    let err = CausalLm::load("/nonexistent/devft-model", &device()).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
}

/// Loads the fixture copy after `edit` changed its config.json; the error it gives.
fn load_with_config(edit: impl FnOnce(&mut serde_json::Value)) -> Error {
    let dir = copy_fixture();
    edit_json(&dir.path().join("config.json"), edit);
    CausalLm::load(dir.path(), &device()).unwrap_err()
}

#[test]
fn absurd_sizes_in_config_json_are_refused_before_allocating() {
    // Once: `num_hidden_layers` of 1e9 aborted the process in an allocation, and a head_dim
    // of 2^62 overflowed. Each error names the file, the field and the limit.
    for (field, value) in [
        ("num_hidden_layers", serde_json::json!(1_000_000_000u64)),
        ("num_hidden_layers", serde_json::json!(u64::MAX)),
        ("head_dim", serde_json::json!(1u64 << 62)),
        ("vocab_size", serde_json::json!(1u64 << 40)),
        ("intermediate_size", serde_json::json!(1u64 << 50)),
        ("num_attention_heads", serde_json::json!(1u64 << 40)),
    ] {
        let err = load_with_config(|c| c[field] = value.clone());
        assert!(
            matches!(&err, Error::InvalidConfig(m)
                if m.contains("config.json") && m.contains(field) && m.contains("limit")),
            "{field} = {value}: {err}"
        );
    }
}

#[test]
fn rope_and_window_values_are_validated() {
    // Once these loaded and gave finite logits.
    let err = load_with_config(|c| {
        c["rope_parameters"] = serde_json::json!({"rope_type": "linear", "factor": 0.0})
    });
    assert!(
        matches!(&err, Error::InvalidConfig(m) if m.contains("factor")),
        "{err}"
    );
    let err = load_with_config(|c| {
        c["rope_parameters"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 4.0, "high_freq_factor": 1.0,
            "original_max_position_embeddings": 8192})
    });
    assert!(
        matches!(&err, Error::InvalidConfig(m) if m.contains("low_freq_factor")),
        "{err}"
    );
    let err = load_with_config(|c| c["sliding_window"] = 0.into());
    assert!(
        matches!(&err, Error::InvalidConfig(m) if m.contains("sliding_window")),
        "{err}"
    );
    let err = load_with_config(|c| c["rope_parameters"]["rope_theta"] = (-5.0).into());
    assert!(
        matches!(&err, Error::InvalidConfig(m) if m.contains("rope_theta")),
        "{err}"
    );
}

/// Loads the fixture's weights with tensor `name` passed through `edit`.
fn load_with_tensor(name: &str, edit: impl FnOnce(&mut [f32])) -> devft::Result<CausalLm> {
    let mut params =
        ParamMap::load_safetensors(tiny_llama_dir().join("model.safetensors")).unwrap();
    let mut tensor = params.get(name).unwrap().clone();
    edit(tensor.values_mut());
    params.insert(name, tensor);
    CausalLm::from_source(tiny_config(), &params, &device())
}

#[test]
fn non_finite_base_weights_norms_and_embeddings_are_refused_at_load() {
    // Once an all-NaN q_proj loaded and printed finite logits (attention swallowed the NaN).
    for (name, value) in [
        ("model.layers.2.self_attn.q_proj.weight", f32::NAN),
        ("model.embed_tokens.weight", f32::INFINITY),
        ("model.layers.0.input_layernorm.weight", f32::NAN),
        ("model.norm.weight", f32::NEG_INFINITY),
    ] {
        let err = load_with_tensor(name, |v| v.fill(value)).unwrap_err();
        assert!(
            matches!(&err, Error::NonFinite { name: n } if n == name),
            "{name}: {err}"
        );
    }
    // One bad value is enough.
    let err =
        load_with_tensor("model.layers.7.mlp.down_proj.weight", |v| v[5] = f32::NAN).unwrap_err();
    assert!(matches!(err, Error::NonFinite { .. }), "{err}");
}

#[test]
fn non_canonical_layer_indices_are_unexpected_tensors() {
    // Once `model.layers.00.*` and `model.layers.+1.*` were ignored beside the real ones.
    for alias in [
        "model.layers.00.mlp.up_proj.weight",
        "model.layers.+1.mlp.up_proj.weight",
    ] {
        let mut params =
            ParamMap::load_safetensors(tiny_llama_dir().join("model.safetensors")).unwrap();
        let real = params
            .get("model.layers.0.mlp.up_proj.weight")
            .unwrap()
            .clone();
        params.insert(alias, real);
        let err = CausalLm::from_source(tiny_config(), &params, &device()).unwrap_err();
        assert!(
            matches!(&err, Error::UnexpectedTensor { name } if name == alias),
            "{alias}: {err}"
        );
    }
}

/// The fixture's weights split into a sharded checkpoint whose index names `shard_name`
/// (written where `shard_path` says) for every tensor.
fn sharded_fixture(shard_name: &str, shard_path: &Path, dir: &Path) {
    std::fs::copy(
        tiny_llama_dir().join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let params = ParamMap::load_safetensors(tiny_llama_dir().join("model.safetensors")).unwrap();
    params.save_safetensors(shard_path).unwrap();
    let weight_map: serde_json::Map<String, serde_json::Value> = params
        .names()
        .map(|n| (n.to_string(), shard_name.into()))
        .collect();
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({ "metadata": {}, "weight_map": weight_map }).to_string(),
    )
    .unwrap();
}

#[test]
fn shard_paths_must_stay_inside_the_model_directory() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    std::fs::create_dir(&model_dir).unwrap();
    // The same weights load through a plain shard name...
    sharded_fixture(
        "shard-1.safetensors",
        &model_dir.join("shard-1.safetensors"),
        &model_dir,
    );
    CausalLm::load(&model_dir, &device()).unwrap();
    // ...but not through an absolute path or `..`, though the file exists there.
    let outside = dir.path().join("outside.safetensors");
    for name in [
        outside.display().to_string(),
        "../outside.safetensors".to_string(),
    ] {
        sharded_fixture(&name, &outside, &model_dir);
        let err = CausalLm::load(&model_dir, &device()).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidConfig(m) if m.contains("not a file name")),
            "{name}: {err}"
        );
    }
}

#[test]
fn a_directory_in_place_of_the_weights_is_named_as_such() {
    // Once reported as the kernel's "No such device".
    let dir = copy_fixture();
    let weights = dir.path().join("model.safetensors");
    std::fs::remove_file(&weights).unwrap();
    std::fs::create_dir(&weights).unwrap();
    let err = CausalLm::load(dir.path(), &device()).unwrap_err();
    assert!(
        matches!(&err, Error::Io { path, source } if path == &weights
            && source.to_string().contains("not a regular file")),
        "{err}"
    );
}

#[test]
fn set_peft_options_devft_does_not_implement_are_refused() {
    // Once these were ignored and the adapter computed something else than in PEFT.
    let dir = copy_fixture();
    let model = CausalLm::load(dir.path(), &device()).unwrap();
    let config_path = dir.path().join("adapter/adapter_config.json");
    let original = std::fs::read_to_string(&config_path).unwrap();
    for (key, value) in [
        ("layer_replication", serde_json::json!([[0, 4], [2, 8]])),
        ("exclude_modules", serde_json::json!(["q_proj"])),
        ("lora_bias", serde_json::json!(true)),
        ("use_qalora", serde_json::json!(true)),
        ("an_option_from_the_future", serde_json::json!(1)),
    ] {
        std::fs::write(&config_path, &original).unwrap();
        edit_json(&config_path, |c| c[key] = value.clone());
        let err = import_adapter(&model, dir.path().join("adapter")).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidAdapter(m) if m.contains(key)),
            "{key}: {err}"
        );
    }
    // Options that do not change the math are accepted with any value.
    std::fs::write(&config_path, &original).unwrap();
    edit_json(&config_path, |c| {
        c["init_lora_weights"] = "gaussian".into();
        c["peft_version"] = "9.9.9".into();
        c["an_option_from_the_future"] = serde_json::Value::Null;
    });
    import_adapter(&model, dir.path().join("adapter")).unwrap();
}

#[test]
fn absurd_adapter_ranks_are_refused_before_allocating() {
    // Once r = 1e7 aborted in an allocation, r = 2^62 overflowed, and r = 100000 with no
    // tensor allocated 3.8 GB before naming the missing one (now above the rank limit; a
    // rank under it with no tensor is named missing before anything is allocated).
    let dir = copy_fixture();
    let model = CausalLm::load(dir.path(), &device()).unwrap();
    let adapter = dir.path().join("adapter");
    for r in [100_000u64, 10_000_000, 1 << 62] {
        edit_json(&adapter.join("adapter_config.json"), |c| c["r"] = r.into());
        let err = import_adapter(&model, &adapter).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidAdapter(m) if m.contains("rank")),
            "r = {r}: {err}"
        );
    }
    edit_json(&adapter.join("adapter_config.json"), |c| {
        c["r"] = 60_000.into()
    });
    ParamMap::new()
        .save_safetensors(adapter.join("adapter_model.safetensors"))
        .unwrap();
    let err = import_adapter(&model, &adapter).unwrap_err();
    assert!(
        matches!(&err, Error::MissingTensor { name } if name.ends_with("lora_A.weight")),
        "{err}"
    );
}

#[test]
fn adapter_tensors_of_the_wrong_width_are_refused_before_allocating() {
    // A file whose A tensors have the right rank but a width of 1 would otherwise size the
    // model's adapters from the config, not from the bytes present.
    let dir = copy_fixture();
    let model = CausalLm::load(dir.path(), &device()).unwrap();
    let path = dir.path().join("adapter/adapter_model.safetensors");
    let mut tensors = ParamMap::load_safetensors(&path).unwrap();
    let name = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight";
    tensors.insert(name, HostTensor::zeros(vec![4, 1]));
    tensors.save_safetensors(&path).unwrap();
    let err = import_adapter(&model, dir.path().join("adapter")).unwrap_err();
    assert!(
        matches!(&err, Error::ShapeMismatch { name: n, .. } if n == name),
        "{err}"
    );
}
