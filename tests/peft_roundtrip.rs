//! Export and import of PEFT adapters.

mod common;

use common::*;
use devft::ParamMap;
use devft::model::{
    CausalLm, LoraConfig, PeftAdapterConfig, Projection, export_adapter, import_adapter,
};

#[test]
fn fixture_adapter_round_trips_with_identical_keys_shapes_and_values() {
    let model = CausalLm::load(tiny_llama_dir(), &device()).unwrap();
    let model = import_adapter(&model, tiny_llama_dir().join("adapter")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    export_adapter(&model, dir.path()).unwrap();

    let original =
        ParamMap::load_safetensors(tiny_llama_dir().join("adapter/adapter_model.safetensors"))
            .unwrap();
    let exported =
        ParamMap::load_safetensors(dir.path().join("adapter_model.safetensors")).unwrap();
    let names = |m: &ParamMap| m.names().map(String::from).collect::<Vec<_>>();
    assert_eq!(names(&exported), names(&original));
    for (name, tensor) in original.iter() {
        let ours = exported.get(name).unwrap();
        assert_eq!(ours.shape(), tensor.shape(), "{name}");
        assert_eq!(ours.values(), tensor.values(), "{name} values changed");
    }

    let text = std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap();
    let config: PeftAdapterConfig = serde_json::from_str(&text).unwrap();
    assert_eq!(config.peft_type, "LORA");
    assert_eq!(config.to_lora().unwrap(), *model.lora_config().unwrap());
}

#[test]
fn fresh_adapter_export_import_is_identity() {
    let device = device();
    let base = CausalLm::load(tiny_llama_dir(), &device).unwrap();
    let lora = LoraConfig::new(3, 6.0).with_target_modules(vec![
        Projection::Q,
        Projection::V,
        Projection::Down,
    ]);
    let mut model = base.clone().with_lora(&lora, 5).unwrap();
    // Give B values so the round trip is not trivially zeros.
    let mut params = model.lora_params();
    let names: Vec<String> = params.names().map(String::from).collect();
    for name in names {
        let t = params.get(&name).unwrap().clone();
        let v = (0..t.len()).map(|i| i as f32 * 1e-3 - 0.01).collect();
        params.insert(name, devft::HostTensor::new(t.shape().to_vec(), v).unwrap());
    }
    model.load_lora_params(&params).unwrap();
    assert_eq!(params.len(), 2 * 3 * model.num_layers());

    let dir = tempfile::tempdir().unwrap();
    export_adapter(&model, dir.path()).unwrap();
    let back = import_adapter(&base, dir.path()).unwrap();
    assert_eq!(back.lora_params(), params);
    assert_eq!(back.lora_config(), Some(&lora));
    assert!(
        base.lora_config().is_none(),
        "import leaves the base model untouched"
    );
}

#[test]
fn zero_b_adapter_leaves_logits_unchanged() {
    let device = device();
    let base = CausalLm::load(tiny_llama_dir(), &device).unwrap();
    let model = base.clone().with_lora(&LoraConfig::new(4, 8.0), 1).unwrap();
    let ids = [1u32, 9, 4, 200];
    let a = values(base.forward(id_tensor(&ids, &device)));
    let b = values(model.forward(id_tensor(&ids, &device)));
    assert_eq!(a, b);
}

#[test]
fn greedy_generation_with_cache_matches_full_recomputation() {
    let device = device();
    let model = CausalLm::load(tiny_llama_dir(), &device).unwrap();
    let model = import_adapter(&model, tiny_llama_dir().join("adapter")).unwrap();
    let prompt = vec![1u32, 42, 17, 99];
    let generated = model.generate_greedy(&prompt, 8, &[]).unwrap();
    assert_eq!(generated.len(), 8);

    // Without a cache: re-run the whole sequence each step and take the argmax.
    let mut sequence = prompt.clone();
    for _ in 0..8 {
        let logits = values(model.forward(id_tensor(&sequence, &device)));
        let vocab = model.config().vocab_size;
        let last = &logits[(sequence.len() - 1) * vocab..];
        let next = (0..vocab)
            .max_by(|&i, &j| last[i].total_cmp(&last[j]))
            .unwrap();
        sequence.push(next as u32);
    }
    assert_eq!(generated, sequence[prompt.len()..]);
}

#[test]
fn generation_stops_at_a_stop_token() {
    let model = CausalLm::load(tiny_llama_dir(), &device()).unwrap();
    let prompt = [1u32, 42, 17, 99];
    let free = model.generate_greedy(&prompt, 6, &[]).unwrap();
    let stop = free[2];
    let stopped = model.generate_greedy(&prompt, 6, &[stop]).unwrap();
    let first = free.iter().position(|&t| t == stop).unwrap();
    assert_eq!(stopped, free[..=first]);
}
