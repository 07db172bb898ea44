//! Parity with transformers + PEFT on `tests/fixtures/tiny-llama` (see its README.md).

mod common;

use burn::tensor::Tensor;
use common::*;
use devft::data::{Batch, TokenizedExample};
use devft::model::{
    CausalLm, FrozenWeight, TokenEmbedding, import_adapter, next_token_loss, target_token_loss,
};

fn check_logits(model: &CausalLm, fixture: &serde_json::Value) {
    let device = model.device();
    for sequence in fixture["sequences"].as_array().unwrap() {
        let ids = ids(&sequence["input_ids"]);
        let logits = model.forward(id_tensor(&ids, &device));
        let loss = next_token_loss(logits.clone(), id_tensor(&ids, &device), None);
        let diff = max_abs_diff(&values(logits), &flat_f64(&sequence["logits"]));
        assert!(diff < 1e-4, "logits of {ids:?} differ by {diff}");
        let loss = f64::from(values(loss)[0]);
        let expected = sequence["loss"].as_f64().unwrap();
        assert!((loss - expected).abs() < 1e-5, "loss {loss} vs {expected}");
    }
}

#[test]
fn base_logits_and_losses_match_transformers() {
    let model = CausalLm::load(tiny_llama_dir(), &device()).unwrap();
    check_logits(&model, &fixture_json("logits.json"));
}

#[test]
fn score_matches_transformers_logits_and_loss() {
    let model = CausalLm::load(tiny_llama_dir(), &device()).unwrap();
    let fixture = fixture_json("logits.json");
    let sequence = &fixture["sequences"][1];
    let scores = model.score(&ids(&sequence["input_ids"])).unwrap();
    let diff = max_abs_diff(scores.logits.values(), &flat_f64(&sequence["logits"]));
    assert!(diff < 1e-4, "logits differ by {diff}");
    assert_eq!(scores.rows().len(), ids(&sequence["input_ids"]).len());
    let loss = f64::from(scores.loss.unwrap());
    assert!((loss - sequence["loss"].as_f64().unwrap()).abs() < 1e-5);
    assert!(model.score(&[5]).unwrap().loss.is_none());
}

#[test]
fn peft_adapter_logits_match_peft() {
    let model = CausalLm::load(tiny_llama_dir(), &device()).unwrap();
    let model = import_adapter(&model, tiny_llama_dir().join("adapter")).unwrap();
    let lora = model.lora_config().unwrap();
    assert_eq!((lora.r, lora.lora_alpha), (4, 8.0));
    check_logits(&model, &fixture_json("logits_lora.json"));
}

#[test]
fn lora_gradients_match_peft() {
    let device = device().autodiff();
    let model = CausalLm::load(tiny_llama_dir(), &device).unwrap();
    let model = import_adapter(&model, tiny_llama_dir().join("adapter")).unwrap();
    let fixture = fixture_json("grads_lora.json");
    let ids = ids(&fixture["input_ids"]);
    let logits = model.forward(id_tensor(&ids, &device));
    let loss = next_token_loss(logits, id_tensor(&ids, &device), None);
    let grads = loss.backward();

    let mut checked = 0;
    for entry in fixture["grads"].as_object().unwrap().values() {
        let key = entry["saved_key"].as_str().unwrap();
        let (layer, rest) = key
            .strip_prefix("base_model.model.model.layers.")
            .unwrap()
            .split_once('.')
            .unwrap();
        let layer = &model.layers[layer.parse::<usize>().unwrap()];
        let projection = devft::model::Projection::ALL
            .into_iter()
            .find(|p| rest.starts_with(p.path()))
            .unwrap();
        let adapter = layer.projection(projection).adapter.as_ref().unwrap();
        // burn stores A as [in, r] and B as [r, out]: the transposes of PEFT's tensors.
        let param = if rest.ends_with("lora_A.weight") {
            &adapter.a
        } else {
            &adapter.b
        };
        let grad: Tensor<2> = param.val().grad(&grads).expect("adapter has a gradient");
        let grad = values(grad.transpose());
        let expected = flat_f64(&entry["grad"]);
        let scale = expected.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let diff = max_abs_diff(&grad, &expected);
        assert!(
            diff <= 1e-4 * scale,
            "{key}: gradient differs by {diff} (scale {scale})"
        );
        checked += 1;
    }
    assert_eq!(checked, 4);
}

#[test]
fn base_weights_receive_no_gradient() {
    let device = device().autodiff();
    let model = CausalLm::load(tiny_llama_dir(), &device).unwrap();
    let model = import_adapter(&model, tiny_llama_dir().join("adapter")).unwrap();
    let ids = [3u32, 7, 11, 5];
    let loss = next_token_loss(
        model.forward(id_tensor(&ids, &device)),
        id_tensor(&ids, &device),
        None,
    );
    let grads = loss.backward();
    let layer = &model.layers[0];
    let FrozenWeight::Dense(q_weight) = &layer.self_attn.q_proj.weight else {
        panic!("a safetensors checkpoint loads f32 weights");
    };
    assert!(q_weight.val().grad(&grads).is_none());
    assert!(layer.input_layernorm.gamma.val().grad(&grads).is_none());
    let TokenEmbedding::Dense(embedding) = &model.embed_tokens else {
        panic!("a safetensors checkpoint loads an f32 embedding");
    };
    assert!(embedding.weight.val().grad(&grads).is_none());
    let adapter = layer.self_attn.q_proj.adapter.as_ref().unwrap();
    assert!(adapter.a.val().grad(&grads).is_some());
}

#[test]
fn naive_reference_forward_agrees_with_transformers() {
    // Validates the test-only float64 reference used for configurations without a fixture.
    let config =
        devft::model::DecoderConfig::from_hf_file(tiny_llama_dir().join("config.json")).unwrap();
    let params =
        devft::ParamMap::load_safetensors(tiny_llama_dir().join("model.safetensors")).unwrap();
    let fixture = fixture_json("logits.json");
    let sequence = &fixture["sequences"][0];
    let logits: Vec<f64> =
        reference::logits(&config, &params, &ids(&sequence["input_ids"]), 0.0).concat();
    let expected = flat_f64(&sequence["logits"]);
    let diff = logits
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(diff < 1e-4, "reference differs by {diff}");
}

#[test]
fn target_token_loss_matches_transformers_logits_with_prompts_and_padding() {
    let model = CausalLm::load(tiny_llama_dir(), &device()).unwrap();
    let fixture = fixture_json("logits.json");
    let sequences = fixture["sequences"].as_array().unwrap();
    let example = |i: usize, targets: &[bool]| TokenizedExample {
        ids: ids(&sequences[i]["input_ids"])[..targets.len()].to_vec(),
        targets: targets.to_vec(),
        label: None,
    };
    // Sequence 0 whole, as a prompt of 3 and an answer of 4; sequence 1 cut to 9 tokens with
    // a gap in its targets; the batch is padded to 9.
    let (t, f) = (true, false);
    let examples = [
        example(0, &[f, f, f, t, t, t, t]),
        example(1, &[f, f, t, t, f, t, t, f, t]),
    ];
    // Expected, from transformers' logits (causal: a cut sequence keeps its earlier logits).
    let mut total = 0.0;
    let mut count = 0;
    for (i, e) in examples.iter().enumerate() {
        let rows = sequences[i]["logits"].as_array().unwrap();
        for pos in 1..e.ids.len() {
            if !e.targets[pos] {
                continue;
            }
            let row = flat_f64(&rows[pos - 1]);
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let logsumexp = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
            total += logsumexp - row[e.ids[pos] as usize];
            count += 1;
        }
    }
    let expected = total / count as f64;
    let refs: Vec<&TokenizedExample> = examples.iter().collect();
    let batch = Batch::new(&refs, 0, &device());
    assert_eq!(batch.num_targets, count);
    let loss = f64::from(values(target_token_loss(&model, &batch).unwrap())[0]);
    assert!((loss - expected).abs() < 1e-5, "{loss} vs {expected}");
    let weighted = next_token_loss(
        model.forward(batch.ids.clone()),
        batch.ids.clone(),
        Some(batch.weights.clone()),
    );
    let weighted = f64::from(values(weighted)[0]);
    assert!(
        (weighted - expected).abs() < 1e-5,
        "{weighted} vs {expected}"
    );

    let prompt_only = example(0, &[f, f, f]);
    let batch = Batch::new(&[&prompt_only], 0, &device());
    assert!(target_token_loss(&model, &batch).is_err());
}
