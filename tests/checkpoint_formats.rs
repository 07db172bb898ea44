//! Sharded checkpoints and half-precision tensors.

mod common;

use std::collections::BTreeMap;

use common::*;
use devft::ParamMap;
use devft::model::CausalLm;
use safetensors::Dtype;
use safetensors::tensor::TensorView;

/// Writes `params` as safetensors with every tensor converted to `dtype` (F16 or BF16),
/// returning the values the file really holds (rounded), as f32.
fn write_half(params: &ParamMap, dtype: Dtype, path: &std::path::Path) -> ParamMap {
    let mut bytes = BTreeMap::new();
    let mut rounded = ParamMap::new();
    for (name, tensor) in params.iter() {
        let (raw, values): (Vec<u8>, Vec<f32>) = match dtype {
            Dtype::F16 => {
                let h: Vec<half::f16> = tensor
                    .values()
                    .iter()
                    .map(|v| half::f16::from_f32(*v))
                    .collect();
                (
                    h.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    h.iter().map(|x| x.to_f32()).collect(),
                )
            }
            _ => {
                let h: Vec<half::bf16> = tensor
                    .values()
                    .iter()
                    .map(|v| half::bf16::from_f32(*v))
                    .collect();
                (
                    h.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    h.iter().map(|x| x.to_f32()).collect(),
                )
            }
        };
        rounded.insert(
            name,
            devft::HostTensor::new(tensor.shape().to_vec(), values).unwrap(),
        );
        bytes.insert(name.to_string(), (tensor.shape().to_vec(), raw));
    }
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(n, (shape, raw))| {
            (
                n.clone(),
                TensorView::new(dtype, shape.clone(), raw).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
    rounded
}

#[test]
fn f16_and_bf16_checkpoints_load_exactly() {
    let params = ParamMap::load_safetensors(tiny_llama_dir().join("model.safetensors")).unwrap();
    for dtype in [Dtype::F16, Dtype::BF16] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            tiny_llama_dir().join("config.json"),
            dir.path().join("config.json"),
        )
        .unwrap();
        let rounded = write_half(&params, dtype, &dir.path().join("model.safetensors"));
        let model = CausalLm::load(dir.path(), &device()).unwrap();
        assert_eq!(model.base_params(), rounded, "{dtype:?}");
    }
}

#[test]
fn sharded_checkpoint_loads_like_a_single_file() {
    let params = ParamMap::load_safetensors(tiny_llama_dir().join("model.safetensors")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        tiny_llama_dir().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let (mut first, mut second) = (ParamMap::new(), ParamMap::new());
    let mut weight_map = serde_json::Map::new();
    for (i, (name, tensor)) in params.iter().enumerate() {
        let file = if i % 2 == 0 {
            "model-00001-of-00002.safetensors"
        } else {
            "model-00002-of-00002.safetensors"
        };
        weight_map.insert(name.to_string(), file.into());
        if i % 2 == 0 { &mut first } else { &mut second }.insert(name, tensor.clone());
    }
    first
        .save_safetensors(dir.path().join("model-00001-of-00002.safetensors"))
        .unwrap();
    second
        .save_safetensors(dir.path().join("model-00002-of-00002.safetensors"))
        .unwrap();
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();

    let model = CausalLm::load(dir.path(), &device()).unwrap();
    assert_eq!(model.base_params(), params);

    // An index that points a tensor at the wrong shard is an error naming it.
    let mut wrong = index.clone();
    wrong["weight_map"]["model.norm.weight"] = if first.get("model.norm.weight").is_some() {
        "model-00002-of-00002.safetensors".into()
    } else {
        "model-00001-of-00002.safetensors".into()
    };
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        wrong.to_string(),
    )
    .unwrap();
    let err = CausalLm::load(dir.path(), &device()).unwrap_err();
    assert!(
        matches!(&err, devft::Error::MissingTensor { name } if name.starts_with("model.norm.weight")),
        "{err}"
    );
}
