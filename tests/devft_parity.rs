//! Parity of grouping, fusion and the fused submodel with the numpy reference
//! `tests/fixtures/tiny-llama/devft_reference.json` (see that folder's README).

mod common;

use common::*;
use devft::fusion::DifferentialFuser;
use devft::grouping::{Grouping, LayerGrouper, SpectralGrouper, layer_similarity};
use devft::model::{CausalLm, import_adapter, next_token_loss};
use devft::transfer::build_submodel;

fn reference() -> serde_json::Value {
    fixture_json("devft_reference.json")
}

fn tuned_model() -> CausalLm {
    let model = CausalLm::load(tiny_llama_dir(), &device()).unwrap();
    import_adapter(&model, tiny_llama_dir().join("adapter")).unwrap()
}

fn matrix(value: &serde_json::Value) -> Vec<Vec<f64>> {
    value.as_array().unwrap().iter().map(flat_f64).collect()
}

fn assert_close(name: &str, ours: &[f64], expected: &[f64], tol: f64) {
    assert_eq!(ours.len(), expected.len(), "{name}: length");
    let diff = ours
        .iter()
        .zip(expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(diff <= tol, "{name}: differs by {diff} (tolerance {tol})");
}

fn groups(value: &serde_json::Value) -> Vec<Vec<usize>> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|g| flat_f64(g).into_iter().map(|v| v as usize).collect())
        .collect()
}

#[test]
fn similarity_graph_and_eigenvalues_match() {
    let reference = reference();
    let sim = layer_similarity(&tuned_model()).unwrap();
    let layer_norms = flat_f64(&reference["layer_vector"]["l2_norm"]);
    assert_close("layer norms", &sim.norms, &layer_norms, 1e-4);
    assert_close(
        "cosine",
        &sim.cosine.concat(),
        &matrix(&reference["cosine_raw"]).concat(),
        1e-5,
    );
    assert_close(
        "similarity",
        &sim.similarity.concat(),
        &matrix(&reference["similarity"]).concat(),
        1e-5,
    );
    assert_close("degree", &sim.degree, &flat_f64(&reference["degree"]), 1e-5);
    assert_close(
        "laplacian",
        &sim.laplacian.concat(),
        &matrix(&reference["laplacian"]).concat(),
        1e-5,
    );
    let (_, details) = SpectralGrouper::new().group_similarity(&sim, 2).unwrap();
    assert_close(
        "eigenvalues",
        &details.eigenvalues,
        &flat_f64(&reference["laplacian_eigenvalues"]),
        1e-5,
    );
    // Spectral embedding up to the sign of each column (ours use the same sign rule).
    let expected = matrix(&reference["by_k"]["2"]["embedding"]);
    assert_close(
        "embedding",
        &details.embedding.concat(),
        &expected.concat(),
        1e-3,
    );
}

#[test]
fn spectral_groups_match_for_k2_and_k4() {
    let reference = reference();
    let model = tuned_model();
    for k in ["2", "4"] {
        let expected = Grouping::new(groups(&reference["by_k"][k]["groups"]), 8).unwrap();
        let ours = SpectralGrouper::new()
            .group(&model, k.parse().unwrap())
            .unwrap();
        assert_eq!(ours, expected, "k = {k}");
    }
}

#[test]
fn fused_tensors_match_for_k2() {
    let reference = reference();
    let by_k = &reference["by_k"]["2"];
    let model = tuned_model();
    let grouping = Grouping::new(groups(&by_k["groups"]), 8).unwrap();
    let submodel =
        build_submodel(&model, &grouping, &DifferentialFuser::new(0.1).unwrap()).unwrap();
    assert_eq!(submodel.num_layers(), 2);

    let mut checked = 0;
    for (g, stats) in by_k["fused_tensor_stats"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let fused = submodel.layers[g].params();
        for (name, expected) in stats["tensors"].as_object().unwrap() {
            let tensor = fused.get(name).unwrap_or_else(|| panic!("missing {name}"));
            let shape: Vec<usize> = flat_f64(&expected["shape"])
                .iter()
                .map(|&v| v as usize)
                .collect();
            assert_eq!(tensor.shape(), shape.as_slice(), "{name}");
            let values = f64_values(tensor);
            let sum: f64 = values.iter().sum();
            let l2 = values.iter().map(|v| v * v).sum::<f64>().sqrt();
            let (exp_sum, exp_l2) = (
                expected["sum"].as_f64().unwrap(),
                expected["l2_norm"].as_f64().unwrap(),
            );
            assert!(
                (l2 - exp_l2).abs() <= 1e-5 * exp_l2,
                "group {g} {name}: l2 {l2} vs {exp_l2}"
            );
            assert!(
                (sum - exp_sum).abs() <= 1e-5 * exp_l2.max(1.0),
                "group {g} {name}: sum {sum} vs {exp_sum}"
            );
            assert_close(name, &values[..5], &flat_f64(&expected["first5"]), 1e-5);
            checked += 1;
        }
    }
    assert_eq!(checked, 2 * 23);

    let full = &by_k["full_fused_tensors_group0"];
    let fused = submodel.layers[0].params();
    for name in [
        "self_attn.q_proj.weight",
        "self_attn.q_proj.lora_A.weight",
        "self_attn.q_proj.lora_B.weight",
    ] {
        let ours = f64_values(fused.get(name).unwrap());
        assert_close(name, &ours, &flat_f64(&full[name]), 1e-5);
    }
}

#[test]
fn fused_submodel_logits_match_with_and_without_lora() {
    let reference = reference();
    let by_k = &reference["by_k"]["2"];
    let expected_submodel = &by_k["submodel"];
    let ids = ids(&expected_submodel["input_ids"]);
    let grouping = Grouping::new(groups(&by_k["groups"]), 8).unwrap();
    let fuser = DifferentialFuser::new(0.1).unwrap();
    let device = device();

    let cases = [
        (tuned_model(), "logits_lora", "loss_lora"),
        (
            CausalLm::load(tiny_llama_dir(), &device).unwrap(),
            "logits_base_no_lora",
            "loss_base_no_lora",
        ),
    ];
    for (model, logits_key, loss_key) in cases {
        let submodel = build_submodel(&model, &grouping, &fuser).unwrap();
        let logits = submodel.forward(id_tensor(&ids, &device));
        let loss = values(next_token_loss(
            logits.clone(),
            id_tensor(&ids, &device),
            None,
        ))[0];
        let diff = max_abs_diff(&values(logits), &flat_f64(&expected_submodel[logits_key]));
        assert!(diff < 1e-4, "{logits_key}: differs by {diff}");
        let expected_loss = expected_submodel[loss_key].as_f64().unwrap();
        assert!(
            (f64::from(loss) - expected_loss).abs() < 1e-5,
            "{loss_key}: {loss} vs {expected_loss}"
        );
    }
}
