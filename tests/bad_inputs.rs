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
